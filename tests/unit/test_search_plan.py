"""The search's pure decisions: the plan's checks, trials per round, trials at once, the ranking and
the winner (pipeline/search/plan.py). The search itself runs in tests/integration/test_search.py."""

from __future__ import annotations

import math

import pytest

from pipeline import recipes
from pipeline.search import plan
from schemas.errors import ConfigError


def _cfg(*sets):
    return recipes.load("digits", list(sets))


def test_the_plan_checks_every_bound_against_the_config_and_keeps_the_shipped_space():
    dims = plan.checked_space(_cfg())
    assert sorted(dims) == ["train.batch_size", "train.optimizer.lr", "train.optimizer.momentum"]
    assert dims["train.optimizer.momentum"].kind == "one_minus_loguniform"
    with pytest.raises(ConfigError, match=r"search.space.train.batch_size=int\(1, 8\): .*at least 2 rows"):
        plan.checked_space(_cfg("search.space.train.batch_size=int(1, 8)"))  # batch 1 breaks BatchNorm: the field's own rule
    with pytest.raises(ConfigError, match="only train.. fields other than workers"):
        plan.checked_space(_cfg("search.space.train.workers=int(1, 2)"))
    with pytest.raises(ConfigError, match="search.space: empty"):
        plan.checked_space(recipes.load("fashion_mnist"))
    with pytest.raises(ConfigError, match="2 rounds need at least 4 trials"):
        plan.checked_space(_cfg("search.trials=3"))


def test_trials_split_over_rounds_and_fit_the_cluster():
    assert plan.round_sizes(16, 2) == [8, 8]
    assert plan.round_sizes(7, 3) == [3, 2, 2]
    assert sum(plan.round_sizes(13, 4)) == 13
    cfg = _cfg()  # 2 workers x 1 CPU per trial
    assert plan.concurrency(cfg, 2) == 1 and plan.concurrency(cfg, 9) == 4 and plan.concurrency(cfg, 1) == 1
    assert plan.concurrency(_cfg("search.parallel=2"), 16) == 2


def test_rounds_draw_from_their_own_seeds():
    assert plan.round_seed(0, 1) == plan.round_seed(0, 1)
    assert len({plan.round_seed(s, r) for s in range(3) for r in range(1, 4)}) == 9


def _o(trial, status, score):
    return plan.Outcome(trial, 1, {}, status, score, 3, 1.0)


def test_the_ranking_and_the_winner():
    outs = [_o("a", "completed", 0.9), _o("b", "stopped", 0.95), _o("c", "failed", None),
            _o("d", "completed", 0.9), _o("e", "completed", math.nan), _o("f", "completed", 0.8)]
    assert [o.trial for o in plan.ranked(outs, "max")] == ["b", "a", "d", "f", "c", "e"]
    assert plan.best(outs, "max").trial == "a"  # stopped trials never win: their budget was cut; ties by id
    assert plan.best(outs, "min").trial == "f"
    assert plan.best([_o("x", "failed", None), _o("y", "stopped", 0.5)], "max") is None
