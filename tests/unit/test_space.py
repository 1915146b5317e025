"""The search space (pipeline/space.py): the course's sampling rules, their errors, and coarse to fine."""

import math

import numpy as np
import pytest

from pipeline.search.space import narrow, parse, sample
from schemas.errors import ConfigError


def test_the_same_seed_gives_the_same_configurations():
    space = {"train.optimizer.lr": parse("train.optimizer.lr", "loguniform(1e-4, 1)"),
             "train.batch_size": parse("train.batch_size", "choice([32, 64, 128])")}
    assert sample(space, 8, seed=3) == sample(space, 8, seed=3)
    assert sample(space, 8, seed=3) != sample(space, 8, seed=4)


def test_loguniform_gives_every_decade_the_same_share():
    """lr = 10**(-4r), r uniform: 1e-4..1e-3 gets as many trials as 0.1..1 (a uniform draw would give it 0.1%)."""
    lr = np.array([c["lr"] for c in sample({"lr": parse("lr", "loguniform(1e-4, 1)")}, 4000, seed=0)])
    assert lr.min() >= 1e-4 and lr.max() <= 1
    shares = np.histogram(np.log10(lr), bins=[-4, -3, -2, -1, 0])[0] / len(lr)
    np.testing.assert_allclose(shares, 0.25, atol=0.03)


def test_one_minus_loguniform_spreads_beta_over_0_9_0_99_0_999():
    beta = np.array([c["b"] for c in sample({"b": parse("b", "one_minus_loguniform(0.9, 0.999)")}, 4000, seed=0)])
    assert beta.min() >= 0.9 and beta.max() <= 0.999
    assert np.mean(beta < 0.99) == pytest.approx(0.5, abs=0.03)  # uniform in beta would put 91% there


def test_int_and_choice_cover_their_values():
    got = sample({"e": parse("e", "int(2, 4)"), "h": parse("h", "choice([[64], [128, 64]])")}, 600, seed=0)
    assert sorted({c["e"] for c in got}) == [2, 3, 4]
    assert {c["h"] for c in got} == {(64,), (128, 64)}
    counts = np.bincount([c["e"] for c in got])[2:]
    assert counts.min() > 150  # the end points are not half as likely


@pytest.mark.parametrize("text, words", [
    ("loguniform(0, 1)", "log range must stay above 0"),
    ("loguniform(1e-2, 1e-3)", "empty range"),
    ("uniform(1, 1)", "empty range"),
    ("one_minus_loguniform(0.9, 1.0)", "strictly between 0 and 1"),
    ("choice([])", "non-empty list"),
    ("normal(0, 1)", "not a distribution"),
    ("uniform(a, b)", "cannot read the arguments"),
    ("int(1.5, 3)", "whole numbers"),
])
def test_a_bad_distribution_is_one_line_naming_field_and_value(text, words):
    with pytest.raises(ConfigError) as e:
        parse("train.optimizer.lr", text)
    assert str(e.value).startswith(f"search.space.train.optimizer.lr={text}: ") and words in str(e.value)
    assert "\n" not in str(e.value)


def _objective(c):
    """Only the learning rate matters (optimum 10**-2.3); the second field is noise-free and irrelevant."""
    return -(math.log10(c["lr"]) + 2.3) ** 2


def test_random_search_beats_a_grid_of_the_same_size_when_one_of_two_fields_matters():
    """The course's argument: 16 random trials try 16 learning rates, a 4 x 4 grid tries 4."""
    space = {"lr": parse("lr", "loguniform(1e-4, 1)"), "m": parse("m", "uniform(0, 1)")}
    grid_lr = np.logspace(-4, 0, 4)
    grid_best = max(_objective({"lr": lr}) for lr in grid_lr for _ in range(4))
    wins = 0
    for seed in range(100):
        random_best = max(_objective(c) for c in sample(space, 16, seed))
        wins += random_best > grid_best
        assert len({c["lr"] for c in sample(space, 16, seed)}) == 16
    assert wins >= 90, wins


def test_coarse_to_fine_closes_in_on_the_optimum():
    """Three rounds of 16 on a 2-D bowl: each round's range holds the optimum and shrinks; the best
    trial ends within 0.2 decades of the best learning rate."""
    def score(c):
        return -((math.log10(c["lr"]) + 2.3) ** 2 + ((math.log10(1 - c["beta"]) + 2.0) ** 2))

    space = {"lr": parse("lr", "loguniform(1e-5, 1)"), "beta": parse("beta", "one_minus_loguniform(0.8, 0.9999)"),
             "bs": parse("bs", "choice([32, 64])")}
    widths, best = [], None
    for round_ in range(3):
        trials = [(c, score(c)) for c in sample(space, 16, seed=round_)]
        best = max(trials, key=lambda t: t[1])[0]
        space = narrow(space, trials, mode="max")
        lr = space["lr"]
        assert lr.low <= 10 ** -2.3 <= lr.high and space["beta"].low <= 0.99 <= space["beta"].high
        widths.append(math.log10(lr.high / lr.low))
    assert widths[0] > widths[1] > widths[2]
    assert abs(math.log10(best["lr"]) + 2.3) < 0.2


def test_narrowing_keeps_the_top_trials_and_the_old_bounds():
    space = {"lr": parse("lr", "loguniform(1e-4, 1)"), "e": parse("e", "int(1, 20)"),
             "bs": parse("bs", "choice([16, 32, 64])")}
    trials = [({"lr": 1e-3, "e": 5, "bs": 32}, 0.9), ({"lr": 2e-3, "e": 7, "bs": 64}, 0.8),
              ({"lr": 0.5, "e": 19, "bs": 16}, 0.1), ({"lr": 1e-4, "e": 1, "bs": 16}, 0.2)]
    new = narrow(space, trials, mode="max", keep=0.5, margin=0.25)
    # kept: lr 1e-3, 2e-3 -> span log10 2 = 0.301 decades, padded by 0.075 decades each side
    assert new["lr"].low == pytest.approx(10 ** (-3 - 0.25 * math.log10(2)))
    assert new["lr"].high == pytest.approx(2e-3 * 10 ** (0.25 * math.log10(2)))
    assert (new["e"].low, new["e"].high) == (5, 7)
    assert new["bs"].choices == (32, 64)
    low = narrow(space, trials, mode="min", keep=0.5)  # minimizing keeps the other two
    assert low["bs"].choices == (16,) and low["lr"].low == pytest.approx(1e-4)
