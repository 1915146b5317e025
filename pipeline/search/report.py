"""A search's record on its MLflow parent run: the ranking table, the score against every searched
field, the winner, the counts and where the seconds went."""

from __future__ import annotations

import json
import math
from pathlib import Path

from pipeline.search.plan import SearchResult, fmt, plain, ranked
from pipeline.tracking.runs import Tracker

def record(tracker: Tracker, result: SearchResult) -> None:
    """On the search's parent run: the ranking table (CSV and an MLflow table), the score against
    every searched field (log axes where sampled on a log scale), the winner, the counts and where
    the seconds went; each trial run gets its rank."""
    import tempfile

    from mlflow.entities import Metric, RunTag

    cfg = tracker.cfg
    order = ranked(result.outcomes, cfg.search.direction)
    fields = sorted(result.space_per_round[0])
    rows = [{"rank": i, "trial": o.trial, "round": o.round, cfg.search.metric: o.score, "status": o.status, "epochs": o.epochs,
             **{f: o.values[f] for f in fields}, "note": o.note, "run_id": o.run_id} for i, o in enumerate(order, 1)]
    client = tracker.client
    with tempfile.TemporaryDirectory() as d:
        table = Path(d) / "search_trials.csv"
        _write_csv(table, rows)
        plot = Path(d) / "search_scores.png"
        plot_scores(result, cfg.search.metric, plot)
        for f in (table, plot):
            client.log_artifact(tracker.parent_id, str(f), artifact_path="search")
    client.log_table(tracker.parent_id, data={k: [_cell(r[k]) for r in rows] for k in rows[0]}, artifact_file="search/trials_table.json")
    counts = {s: sum(o.status == s for o in result.outcomes) for s in ("completed", "stopped", "failed")}
    metrics = {f"search_best_{cfg.search.metric}": result.best.score, "search_trials": len(result.outcomes),
               **{f"search_{k}": v for k, v in counts.items()}, **{f"search_{k}": v for k, v in result.seconds.items()}}
    if result.seconds.get("epochs_s"):
        metrics["search_wall_over_epochs"] = result.seconds["wall_s"] / result.seconds["epochs_s"]
    tags = {"bnflow.search.best_trial": result.best.trial, "bnflow.search.best_run": result.best.run_id}
    client.log_batch(tracker.parent_id, metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()],
                     tags=[RunTag(k, v) for k, v in tags.items()])
    tracker.log_params(tracker.parent_id, {f"best.{k}": fmt(v) for k, v in result.best.values.items()})
    for i, o in enumerate(order, 1):
        if o.run_id:
            client.set_tag(o.run_id, "bnflow.rank", str(i))


def _cell(value):
    return value if isinstance(value, (int, float, str)) or value is None else json.dumps(value, default=plain)


def _write_csv(path: Path, rows: list[dict]) -> None:
    import csv

    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: _cell(v) for k, v in r.items()})


def plot_scores(result: SearchResult, metric: str, path: Path) -> None:
    """One panel per searched field: each trial's score against its value, coloured by round;
    hollow: stopped early; a star: the winner. Log x axes for log-sampled fields (1 - beta for
    one_minus_loguniform, the quantity that is log-uniform)."""
    import matplotlib.ticker

    from tasks.evaluate import pyplot

    plt = pyplot()

    dims = result.space_per_round[0]
    fields = sorted(dims)
    fig, axes = plt.subplots(1, len(fields), figsize=(4.2 * len(fields), 3.6), squeeze=False)
    colours = plt.get_cmap("viridis")
    rounds = max(o.round for o in result.outcomes)
    scored = [o for o in result.outcomes if o.score is not None and math.isfinite(o.score)]
    for ax, f in zip(axes[0], fields):
        dim = dims[f]
        flip = dim.kind == "one_minus_loguniform"
        for o in scored:
            v = o.values[f]
            x = (1.0 - v) if flip else (str(v) if dim.kind == "choice" else v)
            c = colours((o.round - 1) / max(rounds - 1, 1))
            ax.scatter([x], [o.score], s=40, facecolors=c if o.status == "completed" else "none", edgecolors=c)
        b = result.best.values[f]
        ax.scatter([(1.0 - b) if flip else (str(b) if dim.kind == "choice" else b)], [result.best.score], marker="*", s=220,
                   c="crimson", zorder=3, label=f"best {result.best.trial}")
        if dim.log_scale:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap
        ax.set_xlabel(f"1 - {f}" if flip else f)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="best", fontsize=8)
    fig.suptitle(f"{len(result.outcomes)} trials in {rounds} round(s): colour = round (dark: first), hollow = stopped early")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

