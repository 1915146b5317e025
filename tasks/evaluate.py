"""Evaluate stage: test metrics before and after recalibration, confusion matrices, curves, diagnosis."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from schemas import arrow
from schemas.artifacts import Checkpoint, CheckpointState, Dataset, Evaluation, TrainHistory
from schemas.config import EvaluateConfig
from tasks import arrow_io, shift
from tasks.console import QUIET, Console
from tasks.convergence import grad_health
from tasks.curves import read_curves
from tasks.metrics import Scores
from tasks.nn.models import model_from_checkpoint
from tasks.reader import Split


def evaluate(cfg: EvaluateConfig, trained: Checkpoint, recalibrated: Checkpoint, data: Dataset,
             history: TrainHistory, out_dir: Path, console: Console = QUIET) -> Evaluation:
    """Score both checkpoints on EVERY test row, read the training curves, and draw what a person checks.

    Metrics per model (``before``: as trained, ``after``: recalibrated), named
    ``test_<metric>_<model>_recal``: accuracy, topk_accuracy, loss (mean cross-entropy), macro-F1,
    ECE; per class ``test_<precision|recall|f1|nll>_<model>_recal.<class name>``. Definitions:
    tasks/metrics.py. The curve reading (tasks/curves.py) and the k of the top-k accuracy
    (``bnflow.topk``: ``cfg.top_k`` capped at the number of classes) come back as tags.
    """
    files = arrow_io.check_split(data.split("test"), arrow.example_schema(data.num_features),
                                 where="evaluate input split 'test'")
    out_dir.mkdir(parents=True, exist_ok=True)
    models = {tag: model_from_checkpoint(CheckpointState.load(ckpt.path))
              for tag, ckpt in (("before", trained), ("after", recalibrated))}
    names = data.class_names or [str(i) for i in range(data.num_classes)]
    scores = {tag: Scores(data.num_classes, cfg.top_k) for tag in models}
    with torch.no_grad(), console.progress("evaluate", total=data.split("test").rows, unit="rows") as bar:
        for table in Split(files).batches():
            x_all = arrow_io.features_tensor(table).view(-1, *data.input_shape)
            y_all = torch.from_numpy(arrow_io.labels_numpy(table).astype(np.int64))
            for x, y in zip(x_all.split(cfg.batch_size), y_all.split(cfg.batch_size)):
                bar.update(len(y))
                for tag, model in models.items():
                    scores[tag].update(model(x), y)
    rows = scores["after"].rows
    if rows != data.split("test").rows:
        raise RuntimeError(f"evaluate read {rows} test rows, the split holds {data.split('test').rows}")

    metrics = {"test_rows": float(rows)}
    per_class = {tag: s.per_class() for tag, s in scores.items()}
    for tag, s in scores.items():
        metrics.update({f"test_{key}_{tag}_recal": value for key, value in s.summary().items()})
        for key in ("precision", "recall", "f1", "nll"):
            metrics.update({f"test_{key}_{tag}_recal.{_metric_name(name)}": float(v)
                            for name, v in zip(names, per_class[tag][key]) if np.isfinite(v)})
    reading = read_curves(history.epochs, cfg.curves)
    health, health_note = grad_health(history.epochs)
    if health_note:  # the curve line names the likely cause when the gradients were flagged
        reading = reading._replace(note=f"{reading.note}; {health_note}")
    report = {"metrics": metrics, "topk": scores["after"].top_k, "curves": reading.kind, "diagnosis": reading.note,
              "class_names": names,
              "confusion_before_recal": scores["before"].confusion.tolist(),
              "confusion_after_recal": scores["after"].confusion.tolist(),
              "reliability_before_recal": scores["before"].reliability(),
              "reliability_after_recal": scores["after"].reliability()}
    files = [str(out_dir / "evaluation.json")]
    (out_dir / "evaluation.json").write_text(json.dumps(report, indent=1))
    files.append(_write_per_class(per_class, names, out_dir / "per_class_metrics.csv"))
    files.append(_plot_confusion({tag: s.confusion for tag, s in scores.items()}, names, out_dir / "confusion_matrix.png"))
    files.append(_plot_reliability(scores, out_dir / "reliability_diagram.png"))
    files.append(_plot_per_class_f1(per_class, names, out_dir / "per_class_f1.png"))
    files.append(_plot_curves(history.epochs, reading.note, out_dir / "learning_curves.png"))
    shifted = sorted(name for name in data.splits if shift.parse_split(name))
    if shifted:
        recal = CheckpointState.load(recalibrated.path).recalibration or {}
        table = shift_report(cfg, models["before"], models["after"], data, shifted, console)
        metrics.update(shift_metrics(table))
        files += _write_shift_table(table, out_dir / "shift_accuracy.csv")
        files.append(_plot_shift(table, f"recalibrated ({recal.get('estimator', '?')} on {recal.get('split', '?')})",
                                 out_dir / "shift_accuracy.png"))
    return Evaluation(metrics=metrics, files=files, tags={"bnflow.curves": reading.kind, "bnflow.curves_note": reading.note,
                                                          "bnflow.grad_health": health, "bnflow.topk": str(scores["after"].top_k)})


def _metric_name(name: str) -> str:
    """A class name as an MLflow metric-key part ("T-shirt/top" -> "T-shirt_top": a slash would nest it in the UI)."""
    return re.sub(r"[^A-Za-z0-9_\-. ]", "_", name)


def _write_per_class(per_class: dict, names: list[str], path: Path) -> str:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        keys = ("precision", "recall", "f1", "nll")
        writer.writerow(["class", "name", "support"] + [f"{k}_{tag}_recal" for tag in per_class for k in keys])
        for i, name in enumerate(names):
            writer.writerow([i, name, int(per_class["after"]["support"][i])]
                            + [f"{per_class[tag][k][i]:.6g}" for tag in per_class for k in keys])
    return str(path)


SHIFT_MODELS = ("trained", "recalibrated", "adapted")


def shift_report(cfg: EvaluateConfig, trained, recalibrated, data: Dataset, shifted: list[str],
                 console: Console = QUIET) -> list[dict]:
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
    with torch.no_grad(), console.progress("evaluate shift", total=len(shifted) + 1, unit="splits") as bar:
        for name in ["test"] + shifted:
            x, y = _read_split(data, name, rows)
            order = torch.from_numpy(np.random.default_rng(0).permutation(len(y)))
            adapt_idx, score_idx = order[: len(y) // 2], order[len(y) // 2:]
            adapted = copy.deepcopy(trained)
            update_bn_stats(adapted, x[adapt_idx].split(cfg.adapt_batch_size))
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
    files = arrow_io.check_split(data.split(name), arrow.example_schema(data.num_features),
                                 where=f"evaluate input split '{name}'")
    split = Split(files)
    table = split.take(np.arange(min(rows, split.rows)))
    return (arrow_io.features_tensor(table).view(-1, *data.input_shape),
            torch.from_numpy(arrow_io.labels_numpy(table).astype(np.int64)))


def _write_shift_table(table: list[dict], path: Path) -> list[str]:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    return [str(path)]


def _plot_shift(table: list[dict], recal_label: str, path: Path) -> str:
    plt = pyplot()
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
    return _save(fig, path)


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display): every plot bnflow writes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    pyplot().close(fig)
    return str(path)


def _plot_confusion(confusion: dict, names: list[str], path: Path) -> str:
    """Row-normalized confusion matrices (recall on the diagonal), counts in the cells, class names on the axes."""
    plt = pyplot()
    k = len(names)
    fig, axes = plt.subplots(1, len(confusion), figsize=(max(6, 0.6 * k + 2) * len(confusion), max(5, 0.55 * k + 1.5)))
    for ax, (tag, cm) in zip(np.atleast_1d(axes), confusion.items()):
        norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        ax.set_title(f"{_TITLES[tag]} (accuracy {np.trace(cm) / max(cm.sum(), 1):.4f})")
        ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), names, fontsize=8)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        if k <= 20:
            for i in range(k):
                for j in range(k):
                    if cm[i, j]:
                        ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                                color="white" if norm[i, j] > 0.5 else "black")
        fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    return _save(fig, path)


_TITLES = {"before": "as trained (EMA statistics)", "after": "recalibrated"}


def _plot_reliability(scores: dict, path: Path) -> str:
    """Reliability diagram: accuracy against confidence per bin (the diagonal is perfect calibration),
    with the share of rows per bin below."""
    plt = pyplot()
    fig, axes = plt.subplots(2, len(scores), figsize=(5 * len(scores), 6), sharex=True,
                             gridspec_kw={"height_ratios": [3, 1]}, squeeze=False)
    for col, (tag, s) in enumerate(scores.items()):
        r = s.reliability()
        edges = np.asarray(r["edges"])
        width = edges[1] - edges[0]
        acc = np.nan_to_num(np.asarray(r["accuracy"], dtype=float))
        conf = np.asarray(r["confidence"], dtype=float)
        top, bottom = axes[0, col], axes[1, col]
        top.bar(edges[:-1], acc, width=width, align="edge", edgecolor="black", label="accuracy in bin")
        filled = ~np.isnan(conf)
        top.bar(edges[:-1][filled], conf[filled] - acc[filled], bottom=acc[filled], width=width, align="edge",
                color="tab:red", alpha=0.3, label="gap to mean confidence")
        top.plot([0, 1], [0, 1], "k--", lw=1)
        top.set_title(f"{_TITLES[tag]}: ECE {s.ece():.4f}")
        top.set_ylabel("accuracy")
        top.set_ylim(0, 1)
        top.legend(fontsize=7, loc="upper left")
        bottom.bar(edges[:-1], np.asarray(r["rows"]) / max(s.rows, 1), width=width, align="edge", color="gray")
        bottom.set_xlabel("confidence (largest softmax probability)")
        bottom.set_ylabel("share of rows")
        bottom.set_xlim(0, 1)
    return _save(fig, path)


def _plot_per_class_f1(per_class: dict, names: list[str], path: Path) -> str:
    plt = pyplot()
    k = len(names)
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * k + 2), 4))
    x = np.arange(k)
    for i, (tag, pc) in enumerate(per_class.items()):
        ax.bar(x + (i - 0.5) * 0.4, pc["f1"], width=0.4, label=f"{_TITLES[tag]}, macro-F1 {pc['f1'].mean():.4f}")
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("F1 on the test split")
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def _plot_curves(epochs: list[dict], diagnosis: str, path: Path) -> str:
    """Train vs val loss and accuracy per epoch, and the learning rate on its own (log) axis."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    e = [r["epoch"] for r in epochs]
    for key, ax in zip(("loss", "accuracy"), axes):
        ax.plot(e, [r[f"train_{key}"] for r in epochs], "o-", label=f"train {key}")
        ve = [(r["epoch"], r[f"val_{key}"]) for r in epochs if f"val_{key}" in r]
        if ve:
            ax.plot(*zip(*ve), "s-", label=f"val {key}")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
        ax.grid(alpha=0.3)
    lr = [(r["epoch"], r["lr"]) for r in epochs if r.get("lr", 0) > 0]
    if lr:
        axes[2].plot(*zip(*lr), "o-", color="tab:green")
        axes[2].set_yscale("log")
    axes[2].set_title("learning rate (at the start of the epoch)")
    axes[2].set_xlabel("epoch")
    axes[2].grid(alpha=0.3)
    fig.suptitle(diagnosis, fontsize=9)
    return _save(fig, path)
