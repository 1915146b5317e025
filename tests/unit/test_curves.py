"""The five readings of the train/val loss curves (tasks/curves.py), one synthetic run each."""

import math

import pytest

from schemas.config import CurvesConfig
from tasks.curves import read_curves


def _history(train, val):
    return [{"epoch": i + 1, "train_loss": t, "val_loss": v} for i, (t, v) in enumerate(zip(train, val))]


CASES = {
    "still_learning": ([1.0, 0.8, 0.6, 0.45, 0.35], [1.0, 0.82, 0.64, 0.5, 0.4]),
    "overfitting": ([1.0, 0.5, 0.3, 0.2, 0.1, 0.05], [1.0, 0.6, 0.5, 0.6, 0.8, 1.0]),
    # train keeps falling while val sits at its best: the onset of overfitting, before val rises
    "overfitting_flat_val": ([1.0, 0.6, 0.4, 0.3, 0.2, 0.1], [1.0, 0.7, 0.55, 0.553, 0.551, 0.556]),
    "converged": ([1.0, 0.5, 0.4, 0.399, 0.398, 0.398], [1.0, 0.5, 0.45, 0.45, 0.449, 0.45]),
    "diverging": ([1.0, 0.5, 0.6, 0.9, 1.4], [1.0, 0.6, 0.7, 1.0, 1.5]),
    "diverging_nan": ([1.0, 0.5, math.nan, math.nan], [1.0, 0.6, math.nan, math.nan]),
    # train and val flat, val far above train: high variance without a trend left to read
    "overfitting_gap": ([1.0, 0.3, 0.05, 0.0401, 0.04, 0.04], [1.2, 1.0, 0.9, 0.9, 0.9, 0.9]),
    "data_problem": ([1.0, 0.99, 0.99, 0.99, 0.99], [1.0, 0.9, 0.8, 0.7, 0.6]),
    "data_problem_gap": ([1.0, 0.9, 0.85, 0.84, 0.84], [0.5, 0.4, 0.35, 0.34, 0.34]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_case_is_read_as_itself(case):
    reading = read_curves(_history(*CASES[case]), CurvesConfig())
    assert reading.kind == case.split("_nan")[0].split("_flat")[0].split("_gap")[0].split("_noise")[0]
    assert reading.note.startswith(reading.kind.replace("_", " "))


def test_noise_of_a_near_zero_train_loss_is_not_a_divergence():
    """A run that overfit 40 rows: train loss 2.7 -> 0.0069 -> 0.0114 (1.65x its minimum, but 0.2% of
    the drop it made). It read as diverging before the rise was measured against the drop."""
    train = [2.69, 1.05, 0.16, 0.064, 0.02, 0.0107, 0.0069, 0.0077, 0.0114]
    val = [2.35, 1.55, 1.21, 1.15, 1.10, 1.093, 1.099, 1.1009, 1.1012]
    reading = read_curves(_history(train, val), CurvesConfig())
    assert reading.kind == "overfitting", reading


def test_overfitting_names_the_best_epoch():
    assert "epoch 3" in read_curves(_history(*CASES["overfitting"]), CurvesConfig()).note


def test_too_few_points_say_what_to_change():
    reading = read_curves(_history([1.0, 0.5], [1.0, 0.6]), CurvesConfig())
    assert reading.kind == "too_short" and "evaluate.curves.window" in reading.note


def test_thresholds_are_the_config_fields():
    """The converged run reads as still learning once 'flat' is stricter than its last drop."""
    run = _history(*CASES["converged"])  # both curves fell by 0.2-0.5% over the last 3 points
    assert read_curves(run, CurvesConfig()).kind == "converged"
    assert read_curves(run, CurvesConfig(flat=0.001)).kind == "still_learning"
    assert read_curves(run, CurvesConfig(window=6)).kind == "too_short"


def test_val_every_other_epoch_is_read_on_its_own_points():
    """With train.eval_every=2 the val curve has half the points; the window counts val points."""
    history = _history([1.0, 0.8, 0.6, 0.45, 0.35, 0.27, 0.2, 0.15], [1.0] * 8)
    for e, v in zip(history, [None, 0.9, None, 0.7, None, 0.5, None, 0.4]):
        if v is None:
            del e["val_loss"]
        else:
            e["val_loss"] = v
    assert read_curves(history, CurvesConfig()).kind == "still_learning"
