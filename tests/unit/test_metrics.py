"""Evaluation metrics (tasks/metrics.py) against scikit-learn and a float64 recomputation."""

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from tasks.metrics import ECE_BINS, Scores


def _case(rows=3000, k=7, seed=0):
    """Logits that are right more often than not, with a class that is never predicted (precision 0)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, rows)
    logits = rng.normal(0, 1.5, (rows, k))
    logits[np.arange(rows), y] += rng.uniform(0, 3, rows)
    logits[:, k - 1] -= 20  # class k-1 is never the arg-max
    return torch.from_numpy(logits), torch.from_numpy(y)


def _ece_reference(probs: np.ndarray, y: np.ndarray) -> float:
    """ECE the textbook way: loop over the 15 bins (lo, hi] and weigh |acc - conf| by the bin's share."""
    conf, pred = probs.max(1), probs.argmax(1)
    total = 0.0
    for b in range(ECE_BINS):
        lo, hi = b / ECE_BINS, (b + 1) / ECE_BINS
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            total += inside.mean() * abs((pred[inside] == y[inside]).mean() - conf[inside].mean())
    return total


@pytest.mark.parametrize("batch", [1, 64, 3000])
def test_scores_match_scikit_learn_for_any_batch_size(batch):
    logits, y = _case()
    k = logits.shape[1]
    s = Scores(k, top_k=3)
    for lb, yb in zip(logits.split(batch), y.split(batch)):
        s.update(lb.float(), yb)
    probs = torch.softmax(logits.float().double(), 1).numpy()
    pred, yn = probs.argmax(1), y.numpy()
    summary, pc = s.summary(), s.per_class()

    assert summary["accuracy"] == pytest.approx(skm.accuracy_score(yn, pred), abs=1e-12)
    assert s.top_k == 3
    assert summary["topk_accuracy"] == pytest.approx(skm.top_k_accuracy_score(yn, probs, k=3, labels=range(k)), abs=1e-12)
    assert summary["loss"] == pytest.approx(skm.log_loss(yn, probs, labels=range(k)), rel=1e-9)
    p, r, f1, support = skm.precision_recall_fscore_support(yn, pred, labels=range(k), zero_division=0)
    np.testing.assert_allclose(pc["precision"], p, atol=1e-12)
    np.testing.assert_allclose(pc["recall"], r, atol=1e-12)
    np.testing.assert_allclose(pc["f1"], f1, atol=1e-12)
    np.testing.assert_array_equal(pc["support"], support)
    assert pc["precision"][k - 1] == 0  # never predicted: precision 0, not NaN
    assert summary["macro_f1"] == pytest.approx(skm.f1_score(yn, pred, average="macro", labels=range(k), zero_division=0), abs=1e-12)
    for c in range(k):
        assert pc["nll"][c] == pytest.approx(-np.log(probs[yn == c, c]).mean(), rel=1e-9)
    np.testing.assert_array_equal(s.confusion, skm.confusion_matrix(yn, pred, labels=range(k)))
    assert summary["ece"] == pytest.approx(_ece_reference(probs, yn), abs=1e-12)


def test_ece_is_zero_for_a_calibrated_model_and_the_gap_for_an_overconfident_one():
    """Every row at confidence 0.7: right on 70% of rows -> ECE 0; right on 40% -> ECE 0.3."""
    k, rows = 4, 1000
    # Logits whose softmax is 0.7 on the predicted class: log(0.7) vs log(0.1) for the others.
    logits = torch.full((rows, k), float(np.log(0.1)), dtype=torch.float64)
    logits[:, 0] = float(np.log(0.7))
    for right, expected in ((0.7, 0.0), (0.4, 0.3)):
        y = torch.zeros(rows, dtype=torch.int64)
        y[int(right * rows):] = 1
        s = Scores(k, top_k=1)
        s.update(logits, y)
        assert s.ece() == pytest.approx(expected, abs=1e-9)
        rel = s.reliability()
        assert rel["rows"][10] == rows  # 0.7 lies in bin (10/15, 11/15]


def test_top_k_is_capped_at_the_number_of_classes():
    logits, y = _case(rows=50, k=3)
    s = Scores(3, top_k=5)
    s.update(logits, y)
    assert s.top_k == 3 and s.summary()["topk_accuracy"] == 1.0


def test_the_top_k_metric_has_one_name_whatever_the_class_count():
    """Issue 21: top-5 accuracy was logged as top3_accuracy on 3-class data, so runs on different
    data did not line up; the key is topk_accuracy and k is ``Scores.top_k`` (evaluate's bnflow.topk tag)."""
    keys = []
    for k in (3, 10):
        logits, y = _case(rows=50, k=k)
        s = Scores(k, top_k=5)
        s.update(logits, y)
        keys.append(set(s.summary()))
    assert keys[0] == keys[1] and "topk_accuracy" in keys[0]
