"""BN recalibration vs forward-only inference: rows per second on the same workers, side by side.

2 processes x 1 thread (the default recipe's workers), gloo on loopback, the default LeNet-BN on real
Fashion-MNIST rows (standardized), 10,000 calibration rows split over the ranks in batches of 256
(the recalibrate stage's defaults). Each rank alternates the two passes over the same batches:
  * recalibrate: ``tasks.nn.bn_stats.update_bn_stats`` (train-mode BN, per-layer float64 moments,
    pooled over both ranks, rank 0's buffers broadcast) -- the stage's whole worker-side compute;
  * inference: the same model in eval mode under ``torch.no_grad``.
The ratio of median times is the figure (the issue's target: recalibration >= 0.8x inference
throughput). Repeated for the exact and batch_mean estimators.

    python -m benchmarks.recalibrate [--rows 10000] [--repeats 9]

Writes benchmarks/results/recalibrate.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks import ranks

RESULTS = Path(__file__).resolve().parent / "results" / "recalibrate.json"
WORKERS = 2
BATCH = 256


def _rows(n: int) -> torch.Tensor:
    from tasks.ingest import FASHION_MNIST_DIR, _fashion_mnist

    (x, _), _ = _fashion_mnist(Path(FASHION_MNIST_DIR))
    x = x[:n].astype("float32")
    return torch.from_numpy((x - x.mean()) / x.std()).view(-1, 1, 28, 28)


def _model():
    from schemas.config import ModelConfig
    from tasks.nn.models import build_model

    torch.manual_seed(0)
    return build_model(ModelConfig(kind="lenet", init="kaiming"), (1, 28, 28), 10)


def _worker(rank: int, world: int, args) -> dict:
    from tasks.nn.bn_stats import update_bn_stats

    x = _rows(args.rows)
    mine = x[rank * len(x) // WORKERS: (rank + 1) * len(x) // WORKERS]
    batches = list(mine.split(BATCH))
    model = _model()
    passes = {
        "inference": lambda: _infer(model, batches),
        "exact": lambda: update_bn_stats(model, batches, estimator="exact"),
        "batch_mean": lambda: update_bn_stats(model, batches, estimator="batch_mean"),
    }
    for fn in passes.values():  # warm-up
        fn()
    times = {name: [] for name in passes}
    for _ in range(args.repeats):
        for name, fn in passes.items():  # interleaved: noise hits every pass alike
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            dist.barrier()  # a pass ends when the slowest rank ends (pooling waits for it anyway)
            times[name].append(time.perf_counter() - t0)
    return times


@torch.no_grad()
def _infer(model, batches) -> None:
    model.eval()
    for b in batches:
        model(b)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    times = ranks.run(_worker, WORKERS, args)[0]  # barriers make every rank's times the same passes
    median = {name: statistics.median(t) for name, t in times.items()}
    rows_per_s = {name: args.rows / m for name, m in median.items()}
    result = {
        "benchmark": "recalibrate", "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads available",
        "setup": f"{WORKERS} processes x 1 thread, gloo on loopback; LeNet-BN (default recipe); {args.rows} Fashion-MNIST rows, "
                 f"batch {BATCH}; {args.repeats} interleaved repeats, medians",
        "median_seconds": median, "rows_per_second": rows_per_s,
        "ratio_exact_over_inference": rows_per_s["exact"] / rows_per_s["inference"],
        "ratio_batch_mean_over_inference": rows_per_s["batch_mean"] / rows_per_s["inference"],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
