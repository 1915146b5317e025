"""A search's plan, decided before anything runs: the space checked against the config, the
rounds and their seeds, how many trials run at once, each trial's config, and the ranking of what
the trials came to. No Ray, no MLflow; the driver (``rounds``) and the report (``report``) use it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from pipeline.search import space as S
from schemas.artifacts import write_atomic
from schemas.config import PipelineConfig
from schemas.errors import ConfigError

TRIALS_DIR = "trials"
RESULT_FILE = "result.json"
TAG_KIND = "bnflow.kind"  # "search" on a search's parent run
TAG_TRIAL = "bnflow.trial"
TAG_ROUND = "bnflow.round"
TAG_TRIAL_STATUS = "bnflow.trial_status"

@dataclass(frozen=True)
class Trial:
    id: str  # r<round>-t<index>: sorts in sampling order
    round: int
    values: dict[str, Any]


@dataclass
class Outcome:
    """What a trial came to; the content of its ``result.json``."""

    trial: str
    round: int
    values: dict[str, Any]
    status: str  # completed | stopped (by successive halving) | failed
    score: Optional[float]  # the metric at its last reported epoch; None when it reported none
    epochs: int
    epoch_seconds: float  # its epochs' compute, summed
    note: str = ""
    run_id: str = ""  # its MLflow run

    def save(self, path: Path) -> None:
        write_atomic(path, json.dumps(self.__dict__, indent=1, default=plain))

    @classmethod
    def load(cls, path: Path) -> "Outcome":
        return cls(**json.loads(path.read_text()))


@dataclass
class SearchResult:
    outcomes: list[Outcome]
    best: Outcome
    produced: dict
    space_per_round: list[dict[str, S.Dim]]
    seconds: dict[str, float] = field(default_factory=dict)


def plain(value):
    return value.item() if isinstance(value, np.generic) else list(value) if isinstance(value, tuple) else str(value)


def checked_space(cfg: PipelineConfig) -> dict[str, S.Dim]:
    """The search space of ``cfg.search``, every field and bound checked against the config.

    Raises:
        ConfigError: an empty space, a field outside train.*, an unknown field (with a "did you
            mean"), a distribution that does not parse, a bound the field refuses, or fewer trials
            than two per round.
    """
    from pipeline import recipes

    s = cfg.search
    if not s.space:
        raise ConfigError("search.space: empty; give the fields to search in the recipe's search: section or with "
                          "--set 'search.space.train.optimizer.lr=loguniform(1e-3, 1)'")
    if s.rounds > 1 and s.trials < 2 * s.rounds:
        raise ConfigError(f"search.trials={s.trials}: {s.rounds} rounds need at least {2 * s.rounds} trials (two per round "
                          "to narrow around); raise --trials or lower --stages")
    dims = {}
    for name, text in sorted(s.space.items()):
        if not name.startswith("train.") or name in ("train.workers", "train.cpus_per_worker", "train.use_gpu"):
            raise ConfigError(f"search.space.{name}: only train.* fields other than workers, cpus_per_worker and use_gpu "
                              "can be searched (the data stages run once for every trial; the trials share the cluster)")
        dim = S.parse(name, text)
        for value in dim.extremes():
            try:
                recipes.with_values(cfg, {name: value})
            except ConfigError as e:
                raise ConfigError(f"search.space.{name}={text}: {e}") from None
        dims[name] = dim
    return dims


def round_sizes(trials: int, rounds: int) -> list[int]:
    return [trials // rounds + (1 if r < trials % rounds else 0) for r in range(rounds)]


def round_seed(seed: int, round_: int) -> int:
    return int(np.random.SeedSequence([seed, round_]).generate_state(1)[0])


def concurrency(cfg: PipelineConfig, cluster_cpus: float) -> int:
    """Trials at once: what the cluster's CPUs hold (each trial's workers reserve theirs), capped
    by ``search.parallel``."""
    per_trial = cfg.train.workers * cfg.train.cpus_per_worker
    fits = max(1, int(cluster_cpus // per_trial))
    return min(fits, cfg.search.parallel) if cfg.search.parallel else fits


def best(outcomes: list[Outcome], mode: str) -> Optional[Outcome]:
    done = [o for o in outcomes if o.status == "completed" and o.score is not None and math.isfinite(o.score)]
    if not done:
        return None
    return sorted(done, key=lambda o: (-o.score if mode == "max" else o.score, o.trial))[0]


def ranked(outcomes: list[Outcome], mode: str) -> list[Outcome]:
    """Best first: scored trials by score (ties by id), then the ones without a score."""
    def key(o: Outcome):
        if o.score is None or not math.isfinite(o.score):
            return (1, 0.0, o.trial)
        return (0, -o.score if mode == "max" else o.score, o.trial)
    return sorted(outcomes, key=key)


def fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def trial_config(cfg: PipelineConfig, search_id: str, values: dict) -> PipelineConfig:
    from pipeline import recipes

    trial = recipes.with_values(cfg, values)
    budget = cfg.search.epochs or cfg.train.epochs
    update = {"storage": str(Path(cfg.storage).resolve() / search_id / TRIALS_DIR), "reuse": ()}
    if "train.epochs" not in values:
        trial = recipes.with_values(trial, {"train.epochs": budget})
    return trial.model_copy(update=update)

