"""Recipes: a YAML file plus ``--set key=value`` overrides, resolved into one validated config."""

from __future__ import annotations

import difflib
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from schemas.config import RECIPES_DIR, PipelineConfig
from schemas.errors import ConfigError

DEFAULT_RECIPE = "fashion_mnist"


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
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item}: expected key=value, e.g. --set train.optimizer.lr=0.1")
        _assign(raw, key.strip().split("."), _parse_value(value))
    return validate(raw)


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
    field = ".".join(loc) or "config"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    if first["type"] == "extra_forbidden":
        known = _known_fields(PipelineConfig, loc[:-1])
        close = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f"did you mean '{'.'.join(loc[:-1] + [close[0]])}'?" if close else f"known keys here: {known}"
        return f"{field}: unknown key; {hint}{more}"
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
