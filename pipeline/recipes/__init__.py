"""Recipes: a YAML file plus ``--set key=value`` overrides, resolved into one validated config.

The shipped recipes are the YAML files beside this module (package data: a wheel carries them).
"""

from __future__ import annotations

import difflib
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from schemas.config import OPTIMIZERS, PipelineConfig
from schemas.errors import ConfigError

DEFAULT_RECIPE = "fashion_mnist"
RECIPES_DIR = Path(__file__).resolve().parent


def available() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_path(recipe: str) -> Path:
    p = Path(recipe)
    if p.suffix in (".yaml", ".yml"):
        if not p.exists():
            raise ConfigError(f"--recipe {recipe}: file not found; give a YAML path or one of {available()}")
        return p
    candidate = RECIPES_DIR / f"{recipe}.yaml"
    if not candidate.exists():
        close = difflib.get_close_matches(recipe, available(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"--recipe {recipe}: no such recipe{hint}; choose one of {available()} or give a YAML path")
    return candidate


def load(recipe: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Resolve ``recipe`` (a name in recipes/ or a YAML path) with ``key=value`` overrides.

    Raises:
        ConfigError: an unreadable recipe, a malformed override, or a value that fails validation
            (the message names the dotted field, the value and the constraint).
    """
    path = recipe_path(recipe or DEFAULT_RECIPE)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    parsed = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item}: expected key=value, e.g. --set train.optimizer.lr=0.1")
        keys = key.strip().split(".")
        if keys[:2] == ["search", "space"] and len(keys) > 2:  # the space's keys are dotted field names
            keys = keys[:2] + [".".join(keys[2:])]
        parsed.append((keys, _parse_value(value)))
    _switch_optimizer(raw, parsed)
    _switch_network(raw, parsed)
    for keys, value in parsed:
        _assign(raw, keys, value)
    return validate(raw)


def with_values(cfg: PipelineConfig, values: dict) -> PipelineConfig:
    """``cfg`` with dotted fields set to ``values`` (a search trial's), validated as a whole, with the
    same optimizer-switch rule as ``--set``.

    Raises:
        ConfigError: a field or value the config refuses, named as in a recipe error.
    """
    raw = cfg.model_dump(mode="json")
    parsed = [(field.split("."), value) for field, value in values.items()]
    _switch_optimizer(raw, parsed)
    for keys, value in parsed:
        _assign(raw, keys, value)
    return validate(raw)


def _switch_optimizer(raw: dict, parsed: list) -> None:
    """``--set train.optimizer.name=X`` naming another optimizer than the recipe's starts the section
    afresh: the recipe's knobs belong to its own optimizer (SGD's momentum means nothing to Adam),
    and X's defaults apply unless other --set values give them."""
    names = [v for k, v in parsed if k == ["train", "optimizer", "name"]]
    section = (raw.get("train") or {}).get("optimizer") if isinstance(raw.get("train"), dict) else None
    if names and isinstance(section, dict) and names[-1] in OPTIMIZERS and section.get("name", "sgd") != names[-1]:
        raw["train"]["optimizer"] = {}


def _switch_network(raw: dict, parsed: list) -> None:
    """``--set train.model.class_path=...`` or ``--set train.model.kind=...`` names the network in
    place of the recipe's: the recipe's own choice (its kind, or its class_path and init_args) goes,
    as Lightning CLI replaces a class_path's arguments with the class. The other settings stay."""
    named = {k[2] for k, _ in parsed if k[:2] == ["train", "model"] and len(k) == 3 and k[2] in ("kind", "class_path")}
    train = raw.get("train") if isinstance(raw.get("train"), dict) else None
    model = train.get("model") if train is not None else None
    if not named or not isinstance(model, dict):
        return
    for key in ("kind", "class_path", "init_args"):
        if key not in named and not (key == "init_args" and "class_path" not in named):
            model.pop(key, None)


def validate(raw: dict) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_one_line(e, raw)) from None


def _parse_value(text: str):
    """YAML scalars, plus what YAML 1.1 leaves as strings but people mean as numbers (1e-3)."""
    if not text.strip():
        return None
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _assign(tree: dict, keys: list[str], value) -> None:
    for k in keys[:-1]:
        node = tree.get(k)
        if not isinstance(node, dict):
            node = tree[k] = {}
        tree = node
    tree[keys[-1]] = value


def _one_line(err: ValidationError, raw: dict) -> str:
    errors = err.errors()
    first = errors[0]
    loc = [str(p) for p in first["loc"]]
    tag = None
    if len(loc) > 2 and loc[:2] == ["train", "optimizer"] and loc[2] in OPTIMIZERS:
        tag = loc.pop(2)  # a discriminated union puts its tag in the location: drop it from the name
    field = ".".join(loc) or "config"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    if first["type"] == "extra_forbidden":
        if tag is not None:
            known = sorted(OPTIMIZERS[tag].model_fields)
            close = difflib.get_close_matches(loc[-1], known, n=1)
            fix = f"did you mean 'train.optimizer.{close[0]}'?" if close else "remove it or choose an optimizer that has it"
            return f"{field}: not a setting of the {tag} optimizer (its settings: {known}); {fix}{more}"
        known = _known_fields(PipelineConfig, loc[:-1])
        close = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f"did you mean '{'.'.join(loc[:-1] + [close[0]])}'?" if close else f"known keys here: {known}"
        return f"{field}: unknown key; {hint}{more}"
    if first["type"] == "union_tag_invalid":
        tag_value = (first.get("ctx") or {}).get("tag")
        return f"{field}.name={tag_value!r}: unknown optimizer; choose one of {sorted(OPTIMIZERS)}{more}"
    msg = first["msg"]
    if msg.startswith("Value error, "):
        return msg.removeprefix("Value error, ") + more
    value = first.get("input")
    return f"{field}={value!r}: {msg}; fix the recipe or --set {field}=<valid value>{more}"


def _known_fields(model: type[BaseModel], loc: list[str]) -> list[str]:
    for part in loc:
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return sorted(model.model_fields)
