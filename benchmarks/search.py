"""The digits recipe's own search (16 trials in 2 rounds, its `search:` section) against the shipped
recipe, run one after the other in the same benchmark, each in a fresh process with its own
embedded Ray and sqlite MLflow store.

Reports: the search winner's val accuracy (at its last epoch) and test accuracy after
recalibration next to the shipped recipe's; the search's wall time against the sum of its trials'
epoch compute (issue 12's target: at most 1.3x), broken down into the data stages, the trials
(with each completed trial's Ray Train worker-group start from its timings.json), and the winner's
recalibrate + evaluate; and how much of the epoch budget successive halving spent.

    python -m benchmarks.search [--trials 16] [--stages 2]

Writes benchmarks/results/search.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "search.json"
ROOT = Path(__file__).resolve().parents[1]


def _cli(args: list[str], cwd: Path) -> tuple[str, float]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r.stdout, time.perf_counter() - t0


def _after_recal(out: str) -> float:
    return float(re.search(r"test accuracy after  BN recalibration: ([0-9.]+)", out).group(1))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--stages", type=int, default=2)
    a = p.parse_args()
    from mlflow.tracking import MlflowClient

    from pipeline import recipes

    cfg = recipes.load("digits")

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        out, shipped_wall = _cli(["run", "--recipe", "digits", "--run-id", "shipped", "--set", f"storage={d}/runs"], d)
        shipped_hist = json.loads((d / "runs" / "shipped" / "train" / "history.json").read_text())
        shipped = {"val_accuracy": shipped_hist[-1]["val_accuracy"], "test_accuracy_after_recal": _after_recal(out),
                   "wall_s": shipped_wall, "epochs_s": sum(h["epoch_seconds"] for h in shipped_hist)}
        print(f"shipped recipe: {shipped}", flush=True)

        out, search_wall = _cli(["search", "--recipe", "digits", "--search-id", "bench", "--trials", str(a.trials),
                                 "--stages", str(a.stages), "--set", f"storage={d}/runs"], d)
        print(out[-1500:], flush=True)
        root = d / "runs" / "bench"
        results = [json.loads(f.read_text()) for f in sorted((root / "trials").glob("*/result.json"))]
        starts = [json.loads(f.read_text())["fit_to_loop_s"] for f in sorted((root / "trials").glob("*/train/timings.json"))]
        client = MlflowClient(f"sqlite:///{d / 'mlflow.db'}")
        parent = [r for r in client.search_runs([client.get_experiment_by_name("bnflow").experiment_id])
                  if r.data.tags.get("bnflow.kind") == "search" and r.data.tags.get("bnflow.stage") == "pipeline"][0]
        m = parent.data.metrics
        best = parent.data.tags["bnflow.search.best_trial"]
        budget = a.trials * (cfg.search.epochs or cfg.train.epochs)
        report = {
            "date": time.strftime("%Y-%m-%d"),
            "command": f"python -m benchmarks.search --trials {a.trials} --stages {a.stages}",
            "shipped": shipped,
            "search": {
                "best_trial": best, "best_values": next(r["values"] for r in results if r["trial"] == best),
                "val_accuracy": m["search_best_val_accuracy"], "test_accuracy_after_recal": _after_recal(out),
                "process_wall_s": search_wall, "wall_s": m["search_wall_s"], "data_s": m["search_data_s"],
                "trials_s": m["search_trials_s"], "finish_s": m["search_finish_s"], "epochs_s": m["search_epochs_s"],
                "wall_over_epochs": m["search_wall_over_epochs"],
                "trials": len(results), "completed": sum(r["status"] == "completed" for r in results),
                "stopped_early": sum(r["status"] == "stopped" for r in results),
                "failed": sum(r["status"] == "failed" for r in results),
                "epochs_run": sum(r["epochs"] for r in results), "epoch_budget": budget,
                "trial_overhead_s_mean": (m["search_trials_s"] - m["search_epochs_s"]) / max(len(results), 1),
                "ray_train_start_s_mean": sum(starts) / max(len(starts), 1),
            },
        }
        report["search_at_least_as_good"] = report["search"]["val_accuracy"] >= shipped["val_accuracy"]
    RESULTS.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
