"""SyncBatchNorm vs plain BatchNorm under DDP: training step time, side by side in one run.

2 processes x 1 thread, gloo on loopback, the LeNet-style CNN on real Fashion-MNIST batches. Each
process holds two DDP models (plain BN and tasks.nn.SyncBatchNorm) and alternates short blocks of
steps between them, so machine noise hits both alike; the ratio of median step times is reported.
Then a per-layer forward+backward microbenchmark.

    python -m benchmarks.syncbn [--steps 200] [--batch-size 128] [--model lenet|resnet20|resnet18]

``--model resnet18``: torchvision's ResNet-18 (or its same-shape stand-in, benchmarks/resnet18.py,
where torchvision does not import) on Fashion-MNIST images as 3 x 32 x 32 (grey replicated, padded);
``resnet20``: bnflow's built-in CIFAR-style ResNet-20 on the 1 x 28 x 28 images.

Writes benchmarks/results/syncbn.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from benchmarks import ranks

RESULTS = Path(__file__).resolve().parent / "results" / "syncbn.json"
WORKERS = 2
THREADS = 1
BLOCK = 10  # steps per alternation block


def _fashion_mnist(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from tasks.ingest import FASHION_MNIST_DIR, _fashion_mnist

    (x, y), _ = _fashion_mnist(Path(FASHION_MNIST_DIR))
    x = (x[:n] - x.mean()) / x.std()
    return torch.from_numpy(x).view(-1, 1, 28, 28), torch.from_numpy(y[:n])  # as the train stage shapes images


MODELS = {"lenet": "LeNet-5-style CNN, 4 BatchNorm layers", "resnet20": "built-in ResNet-20, 19 BatchNorm2d layers",
          "resnet18": "ResNet-18, 20 BatchNorm2d layers"}


def _build(name: str) -> nn.Module:
    from schemas.config import ModelConfig
    from tasks.nn.models import build_model

    if name == "resnet18":
        from benchmarks.resnet18 import resnet18

        return resnet18(num_classes=10)
    if name == "resnet20":
        return build_model(ModelConfig(kind="resnet", depth=20), (1, 28, 28), 10)
    return build_model(ModelConfig(kind="lenet"), (1, 28, 28), 10)


def _models(name: str):
    from tasks.nn import convert_sync_batchnorm

    torch.manual_seed(0)
    local = _build(name)
    torch.manual_seed(0)
    sync = convert_sync_batchnorm(_build(name))
    return {"local": local, "sync": sync}


def _images(x: torch.Tensor, name: str) -> torch.Tensor:
    """Fashion-MNIST batches as the network takes them: 3 x 32 x 32 for ResNet-18."""
    if name != "resnet18":
        return x
    return F.pad(x, (2, 2, 2, 2)).repeat(1, 3, 1, 1).contiguous()


def _step_times(model, opt, x, y, batch, steps, offset):
    times = []
    for s in range(steps):
        i = ((offset + s) * batch) % (len(y) - batch)
        xb, yb = x[i : i + batch], y[i : i + batch]
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times


def _micro(rank, reps=20):
    from tasks.nn import SyncBatchNorm

    out = {}
    shapes = {"bn2d_6x28x28": (128, 6, 28, 28), "bn2d_16x14x14": (128, 16, 14, 14), "bn1d_120": (128, 120)}
    for name, shape in shapes.items():
        c = shape[1]
        plain = (nn.BatchNorm2d(c) if len(shape) == 4 else nn.BatchNorm1d(c))
        ours = SyncBatchNorm(c)
        x = torch.randn(shape, requires_grad=True)
        g = torch.randn(shape)
        res = {}
        for label, layer in (("plain", plain), ("sync", ours)):
            ts = []
            for _ in range(reps):
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(10):  # amortizes the skew with which ranks leave the barrier
                    layer(x).backward(g)
                ts.append((time.perf_counter() - t0) / 10)
            res[label] = statistics.median(ts[5:])
        out[name] = {"plain_ms": res["plain"] * 1e3, "sync_ms": res["sync"] * 1e3, "ratio": res["sync"] / res["plain"]}
    # A bare small all_reduce: the latency floor every collective pays here.
    buf = torch.zeros(33, dtype=torch.float64)
    ts = []
    for _ in range(200):
        t0 = time.perf_counter()
        dist.all_reduce(buf)
        ts.append(time.perf_counter() - t0)
    out["all_reduce_33_float64_median_ms"] = statistics.median(ts[20:]) * 1e3
    return out


def _worker(rank, world, args):
    x, y = _fashion_mnist(20000)
    shard = slice(rank, None, WORKERS)
    x, y = _images(x[shard], args.model), y[shard]
    from tasks.train_loop import ddp_kwargs

    # Each mode with the DDP options the train stage gives it.
    models = {k: nn.parallel.DistributedDataParallel(m, **ddp_kwargs(k)) for k, m in _models(args.model).items()}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for k, m in models.items()}
    for k in models:  # warm-up
        _step_times(models[k], opts[k], x, y, args.batch_size, 5, 0)
    times = {k: [] for k in models}
    for block in range(args.steps // BLOCK):
        order = ("local", "sync") if block % 2 == 0 else ("sync", "local")
        for k in order:
            dist.barrier()
            times[k] += _step_times(models[k], opts[k], x, y, args.batch_size, BLOCK, block * BLOCK)
    return {"times": times, "micro": _micro(rank) if args.model == "lenet" else {}}


def _resnet18_source() -> str:
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001
        return "benchmarks/resnet18.py: torchvision does not import here"
    return "torchvision.models.resnet18"


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=128, help="per worker")
    p.add_argument("--model", choices=sorted(MODELS), default="lenet")
    args = p.parse_args(argv)
    results = dict(enumerate(ranks.run(_worker, WORKERS, args, threads=THREADS)))
    # A DDP step ends when the slowest rank ends: take the per-step max over ranks.
    step = {k: [max(t) for t in zip(*(results[r]["times"][k] for r in results))] for k in ("local", "sync")}
    med = {k: statistics.median(v) for k, v in step.items()}
    out = {
        "step_time_ratio_sync_over_local": med["sync"] / med["local"],
        "step_ms_median": {k: v * 1e3 for k, v in med.items()},
        "workers": WORKERS, "threads_per_worker": THREADS, "batch_size_per_worker": args.batch_size,
        "steps_per_mode": len(step["local"]), "model": MODELS[args.model] + (
            "" if args.model != "resnet18" else f" ({_resnet18_source()})"),
        "data": "Fashion-MNIST (Debian dataset-fashion-mnist)",
        "per_layer_fwd_bwd_rank0": results[0]["micro"],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "command": "python -m benchmarks.syncbn " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    existing[f"batch_{args.batch_size}" if args.model == "lenet" else f"{args.model}_batch_{args.batch_size}"] = out
    primary = existing.get("batch_128", out)
    existing.update({k: primary[k] for k in ("step_time_ratio_sync_over_local", "workers", "threads_per_worker", "command")})
    RESULTS.write_text(json.dumps(existing, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
