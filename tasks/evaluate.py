"""Evaluate stage: test metrics before and after recalibration, confusion matrices, curves, diagnosis."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from schemas import arrow
from schemas.artifacts import Checkpoint, CheckpointState, Dataset, Evaluation, TrainHistory
from schemas.config import EvaluateConfig
from tasks import arrow_io, shift
from tasks.console import Progress
from tasks.nn.models import model_from_checkpoint


def evaluate(cfg: EvaluateConfig, trained: Checkpoint, recalibrated: Checkpoint, data: Dataset,
             history: TrainHistory, out_dir: Path) -> Evaluation:
    """Accuracy and mean cross-entropy over EVERY test row for both checkpoints, plus plots."""
    files = arrow_io.check_split(data.split("test").path, arrow.example_schema(data.num_features),
                                 where="evaluate input split 'test'")
    out_dir.mkdir(parents=True, exist_ok=True)
    models = {tag: model_from_checkpoint(CheckpointState.load(ckpt.path))
              for tag, ckpt in (("before", trained), ("after", recalibrated))}
    k = data.num_classes
    confusion = {tag: np.zeros((k, k), dtype=np.int64) for tag in models}
    loss = {tag: 0.0 for tag in models}
    rows = 0
    with torch.no_grad(), Progress("evaluate", total=data.split("test").rows, unit="rows") as bar:
        for f in files:
            table = arrow_io.read_table(f)
            x_all = arrow_io.features_tensor(table)
            y_all = torch.from_numpy(arrow_io.labels_numpy(table).astype(np.int64))
            for x, y in zip(x_all.split(cfg.batch_size), y_all.split(cfg.batch_size)):
                rows += len(y)
                bar.update(len(y))
                for tag, model in models.items():
                    logits = model(x)
                    loss[tag] += float(F.cross_entropy(logits, y, reduction="sum"))
                    np.add.at(confusion[tag], (y.numpy(), logits.argmax(1).numpy()), 1)
    if rows != data.split("test").rows:
        raise RuntimeError(f"evaluate read {rows} test rows, the split holds {data.split('test').rows}")

    metrics = {}
    for tag in models:
        metrics[f"test_accuracy_{tag}_recal"] = float(np.trace(confusion[tag]) / rows)
        metrics[f"test_loss_{tag}_recal"] = loss[tag] / rows
    metrics["test_rows"] = float(rows)
    diagnosis = diagnose(history.epochs)
    report = {"metrics": metrics, "diagnosis": diagnosis,
              "confusion_before_recal": confusion["before"].tolist(), "confusion_after_recal": confusion["after"].tolist()}
    files = [str(out_dir / "evaluation.json")]
    (out_dir / "evaluation.json").write_text(json.dumps(report, indent=1))
    files.append(_plot_confusion(confusion, out_dir / "confusion_matrix.png"))
    files.append(_plot_curves(history.epochs, diagnosis, out_dir / "loss_curves.png"))
    shifted = sorted(name for name in data.splits if shift.parse_split(name))
    if shifted:
        recal = CheckpointState.load(recalibrated.path).recalibration or {}
        table = shift_report(cfg, models["before"], models["after"], data, shifted)
        metrics.update(shift_metrics(table))
        files += _write_shift_table(table, out_dir / "shift_accuracy.csv")
        files.append(_plot_shift(table, f"recalibrated ({recal.get('estimator', '?')} on {recal.get('split', '?')})",
                                 out_dir / "shift_accuracy.png"))
    return Evaluation(metrics=metrics, files=files)


SHIFT_MODELS = ("trained", "recalibrated", "adapted")


def shift_report(cfg: EvaluateConfig, trained, recalibrated, data: Dataset, shifted: list[str]) -> list[dict]:
    """Accuracy of three models on every shifted split (and on the same clean test rows, severity 0).

    trained: the weights with training's running averages; recalibrated: the recalibrate stage's
    output; adapted: the trained weights with BN statistics re-estimated (``exact``) on one half of
    the split's rows (AdaBN, Li et al. 2016) -- labels unread. All three are scored on the OTHER
    half, so nothing is scored on the rows it adapted on. The halves are a fixed seeded split.
    """
    import copy

    from tasks.nn.bn_stats import update_bn_stats

    rows = max(data.split(name).rows for name in shifted)
    table = []
    with torch.no_grad(), Progress("evaluate shift", total=len(shifted) + 1, unit="splits") as bar:
        for name in ["test"] + shifted:
            x, y = _read_split(data, name, rows)
            order = torch.from_numpy(np.random.default_rng(0).permutation(len(y)))
            adapt_idx, score_idx = order[: len(y) // 2], order[len(y) // 2:]
            adapted = copy.deepcopy(trained)
            update_bn_stats(adapted, x[adapt_idx].split(cfg.adapt_batch_size), across_ranks=False)
            corruption, severity = shift.parse_split(name) or ("clean", 0)
            row = {"corruption": corruption, "severity": severity, "rows_adapted": len(adapt_idx), "rows_scored": len(score_idx)}
            for tag, model in zip(SHIFT_MODELS, (trained, recalibrated, adapted)):
                pred = torch.cat([model(xb).argmax(1) for xb in x[score_idx].split(cfg.batch_size)])
                row[f"accuracy_{tag}"] = float((pred == y[score_idx]).double().mean())
            table.append(row)
            bar.update(1)
    return table


def shift_metrics(table: list[dict]) -> dict:
    """Means over the shifted splits (the inverted control apart) per model, overall and at severity 5."""
    out = {}
    shifted = [r for r in table if r["corruption"] not in ("clean", "inverted")]
    for tag in SHIFT_MODELS:
        for key, rows in (("", shifted), ("_sev5", [r for r in shifted if r["severity"] == 5])):
            if rows:
                out[f"shift_accuracy{key}_{tag}"] = float(np.mean([r[f"accuracy_{tag}"] for r in rows]))
        for r in table:
            if r["corruption"] in ("clean", "inverted"):
                out[f"shift_accuracy_{r['corruption']}_{tag}"] = r[f"accuracy_{tag}"]
    return out


def _read_split(data: Dataset, name: str, rows: int):
    files = arrow_io.check_split(data.split(name).path, arrow.example_schema(data.num_features),
                                 where=f"evaluate input split '{name}'")
    tables = [arrow_io.read_table(f) for f in files]
    x = torch.cat([arrow_io.features_tensor(t) for t in tables])[:rows]
    y = torch.from_numpy(np.concatenate([arrow_io.labels_numpy(t) for t in tables]).astype(np.int64))[:rows]
    return x, y


def _write_shift_table(table: list[dict], path: Path) -> list[str]:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    return [str(path)]


def _plot_shift(table: list[dict], recal_label: str, path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clean = next(r for r in table if r["corruption"] == "clean")
    corruptions = list(dict.fromkeys(r["corruption"] for r in table if r["corruption"] != "clean"))
    cols = 3
    fig, axes = plt.subplots((len(corruptions) + cols - 1) // cols, cols, figsize=(4 * cols, 3 * ((len(corruptions) + cols - 1) // cols)),
                             squeeze=False, sharey=True)
    labels = {"trained": "as trained (EMA)", "recalibrated": recal_label, "adapted": "adapted to the split (AdaBN)"}
    for ax, corruption in zip(axes.flat, corruptions):
        rows = [clean] + sorted((r for r in table if r["corruption"] == corruption), key=lambda r: r["severity"])
        sev = [r["severity"] for r in rows]
        for tag, style in zip(SHIFT_MODELS, ("o-", "s--", "^-")):
            ax.plot(sev, [r[f"accuracy_{tag}"] for r in rows], style, label=labels[tag])
        ax.set_title(corruption)
        ax.set_xticks(sev)
        ax.set_xlabel("severity (0 = clean)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(corruptions):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("test accuracy")
    axes[0, 0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return str(path)


def diagnose(epochs: list[dict]) -> str:
    """Read the train/val loss curves the way the course does: diverging, data problem, overfitting,
    still learning, or converged."""
    train = [e["train_loss"] for e in epochs]
    val = [e["val_loss"] for e in epochs if "val_loss" in e]
    if not np.all(np.isfinite(train)) or (len(train) > 2 and train[-1] > 1.5 * min(train)):
        return "diverging: the train loss grows; lower the learning rate or clip gradients"
    if len(train) < 3 or len(val) < 3:
        return "too few epochs to read the curves"
    if train[-1] > 0.9 * train[0]:
        return "data problem or learning rate too low: the train loss barely moves"
    best = int(np.argmin(val))
    if val[-1] > 1.1 * val[best] and best < len(val) - 1 and train[-1] < train[best]:
        return f"overfitting: val loss is lowest at epoch {best + 1} and rises while train loss falls"
    recent = (train[-3] - train[-1]) / max(abs(train[-3]), 1e-12)
    if recent > 0.05:
        return "still learning: the train loss is still falling; more epochs would help"
    return "converged: train and val losses have flattened"


def _plot_confusion(confusion: dict, path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(confusion), figsize=(6 * len(confusion), 5))
    for ax, (tag, cm) in zip(np.atleast_1d(axes), confusion.items()):
        norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        acc = np.trace(cm) / max(cm.sum(), 1)
        ax.set_title(f"{tag} BN recalibration (accuracy {acc:.4f})")
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)


def _plot_curves(epochs: list[dict], diagnosis: str, path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    e = [r["epoch"] for r in epochs]
    for key, ax in (("loss", ax1), ("accuracy", ax2)):
        ax.plot(e, [r[f"train_{key}"] for r in epochs], "o-", label=f"train {key}")
        ve = [(r["epoch"], r[f"val_{key}"]) for r in epochs if f"val_{key}" in r]
        if ve:
            ax.plot(*zip(*ve), "s-", label=f"val {key}")
        ax.set_xlabel("epoch")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(diagnosis, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)
