"""Classification metrics accumulated over test batches: exact over every row, in one pass.

``Scores`` keeps only sums (a confusion matrix, per-class negative log-likelihood, top-k hits and
the calibration bins), so the evaluate stage streams any number of rows in constant memory and the
result does not depend on the batch size. Every sum is float64.

Definitions (the reference for the tests, which recompute each one with scikit-learn):

- accuracy: share of rows whose arg-max class is the label; top-k accuracy: share whose label is
  among the k largest logits (ties broken by class index, as ``torch.topk`` does). Its key is
  ``topk_accuracy`` whatever k is (``Scores.top_k``: the asked k capped at the number of classes),
  so runs on data with different class counts report the same metric; k is recorded beside it.
- precision, recall, F1 per class from the confusion matrix; a class never predicted (or never
  present) has precision (recall) 0, as scikit-learn's ``zero_division=0``; macro-F1 is the
  unweighted mean of the per-class F1.
- NLL per class: mean of -log softmax(logits)[label] over the rows OF that class; its row-weighted
  mean is the mean cross-entropy.
- ECE (expected calibration error, Guo et al. 2017): the confidence of a row is its largest softmax
  probability; rows fall into 15 equal-width bins of confidence, bin b holding (b/15, (b+1)/15]
  (a confidence of exactly 0 cannot occur: it is at least 1/num_classes); ECE = sum over bins of
  (rows in bin / all rows) * |accuracy in bin - mean confidence in bin|.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

ECE_BINS = 15


class Scores:
    """Running sums for one model's predictions; ``update`` per batch, then ``summary``."""

    def __init__(self, num_classes: int, top_k: int):
        self.k, self.top_k = num_classes, min(top_k, num_classes)
        self.confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.nll_sum = np.zeros(num_classes)
        self.top_k_hits = 0
        self.bin_rows = np.zeros(ECE_BINS, dtype=np.int64)
        self.bin_confidence = np.zeros(ECE_BINS)
        self.bin_correct = np.zeros(ECE_BINS)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logp = F.log_softmax(logits.double(), dim=1)
        pred = logp.argmax(1)
        y = labels.numpy()
        np.add.at(self.confusion, (y, pred.numpy()), 1)
        np.add.at(self.nll_sum, y, -logp.gather(1, labels[:, None]).squeeze(1).numpy())
        self.top_k_hits += int((logp.topk(self.top_k, dim=1).indices == labels[:, None]).any(1).sum())
        confidence = logp.max(1).values.exp().numpy()
        b = np.clip(np.ceil(confidence * ECE_BINS).astype(np.int64) - 1, 0, ECE_BINS - 1)
        np.add.at(self.bin_rows, b, 1)
        np.add.at(self.bin_confidence, b, confidence)
        np.add.at(self.bin_correct, b, (pred == labels).numpy().astype(np.float64))

    @property
    def rows(self) -> int:
        return int(self.confusion.sum())

    def per_class(self) -> dict[str, np.ndarray]:
        """precision, recall, f1, nll and support, one entry per class."""
        cm = self.confusion.astype(np.float64)
        tp, predicted, support = np.diag(cm), cm.sum(0), cm.sum(1)
        precision = np.divide(tp, predicted, out=np.zeros(self.k), where=predicted > 0)
        recall = np.divide(tp, support, out=np.zeros(self.k), where=support > 0)
        denom = precision + recall
        f1 = np.divide(2 * precision * recall, denom, out=np.zeros(self.k), where=denom > 0)
        nll = np.divide(self.nll_sum, support, out=np.full(self.k, np.nan), where=support > 0)
        return {"precision": precision, "recall": recall, "f1": f1, "nll": nll, "support": support}

    def ece(self) -> float:
        n = max(self.rows, 1)
        filled = self.bin_rows > 0
        gap = np.abs(self.bin_correct[filled] - self.bin_confidence[filled])  # both are sums over the bin
        return float(gap.sum() / n)

    def reliability(self) -> dict[str, list]:
        """Per bin: rows, mean confidence, accuracy (NaN for an empty bin) -- the reliability diagram."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return {"edges": np.linspace(0, 1, ECE_BINS + 1).tolist(), "rows": self.bin_rows.tolist(),
                    "confidence": (self.bin_confidence / self.bin_rows).tolist(),
                    "accuracy": (self.bin_correct / self.bin_rows).tolist()}

    def summary(self) -> dict[str, float]:
        """The headline numbers: accuracy, top-k accuracy (k: ``self.top_k``), mean cross-entropy, macro-F1, ECE."""
        n = max(self.rows, 1)
        return {"accuracy": float(np.trace(self.confusion) / n), "topk_accuracy": self.top_k_hits / n,
                "loss": float(self.nll_sum.sum() / n), "macro_f1": float(self.per_class()["f1"].mean()),
                "ece": self.ece()}
