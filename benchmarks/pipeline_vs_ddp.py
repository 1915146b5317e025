"""The default recipe through the whole pipeline vs a plain PyTorch DDP script of the same training,
with where each one's seconds go.

Plain DDP: 2 processes x 1 thread, gloo on loopback, Fashion-MNIST read from the IDX files and
z-scored with train statistics, the same LeNet-BN, optimizer, schedule, batch size and epochs as the
recipe, plain BatchNorm (torch's SyncBatchNorm cannot run on CPU). The pipeline runs twice in a
subprocess, with `train.bn=local` (like for like) and with its default `bn=sync`.

Breakdown. Plain: process spawn (to the process group), data load, epochs. Pipeline: process start
(interpreter, imports, config, MLflow run) up to Ray, Ray start, each stage's wall; inside train,
from the stage's timings.json: Ray Train's worker-group start (fit() to the loop), shard read,
model setup (build, optimizer, DDP), epochs' compute, validation, checkpoint writes, the return from
fit(); the driver's MLflow writes run beside the loop. Fixed overhead = pipeline wall - epochs' compute.
Each pipeline run gets a fresh embedded Ray and fresh storage; its sqlite tracking store is created
just before it (untimed, recorded as store_create_s_not_in_wall): only a store's first run pays
MLflow's schema migration, every scheduled or repeated run finds the store there.

    python -m benchmarks.pipeline_vs_ddp [--epochs 10]

Writes benchmarks/results/pipeline_vs_ddp.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results" / "pipeline_vs_ddp.json"


def _plain_ddp(rank, port, epochs, queue, t_spawn):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    spawn_s = time.time() - t_spawn
    from pipeline import recipes
    from tasks.ingest import FASHION_MNIST_DIR, _fashion_mnist
    from tasks.nn.models import build_model
    from tasks.train_loop import build_optimizer, build_scheduler

    cfg = recipes.load("fashion_mnist", [f"train.epochs={epochs}"]).train
    t_start = time.perf_counter()
    (x, y), (xt, yt) = _fashion_mnist(Path(FASHION_MNIST_DIR))
    mean, std = x.mean(), x.std()
    x, xt = torch.from_numpy((x - mean) / std).view(-1, 1, 28, 28), torch.from_numpy((xt - mean) / std).view(-1, 1, 28, 28)
    y, yt = torch.from_numpy(y), torch.from_numpy(yt)
    x, y = x[rank::2], y[rank::2]
    data_s = time.perf_counter() - t_start
    torch.manual_seed(0)
    model = build_model(cfg.model, (1, 28, 28), 10)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = build_optimizer(cfg.optimizer, model)
    sched = build_scheduler(cfg.schedule, opt, cfg.epochs)
    gen = torch.Generator().manual_seed(rank)
    epoch_s = []
    for _ in range(cfg.epochs):
        t0 = time.perf_counter()
        ddp.train()
        order = torch.randperm(len(y), generator=gen)
        for s in range(len(y) // cfg.batch_size):
            idx = order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            loss = F.cross_entropy(ddp(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        epoch_s.append(time.perf_counter() - t0)
    model.eval()
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
    if rank == 0:
        queue.put({"wall_s": time.perf_counter() - t_start, "spawn_s": spawn_s, "data_load_s": data_s,
                   "epoch_s": epoch_s, "test_accuracy": acc})
    dist.destroy_process_group()


def _pipeline(epochs, bn, recipe="fashion_mnist"):
    with tempfile.TemporaryDirectory() as tmp:
        sets = ([f"train.epochs={epochs}"] if epochs else []) + ([f"train.bn={bn}"] if bn else [])
        sets += [f"storage={tmp}/runs", f"tracking.uri=sqlite:///{tmp}/mlflow.db"]
        cmd = [sys.executable, "-m", "pipeline", "run", "--recipe", recipe] + [a for v in sets for a in ("--set", v)]
        # The tracking store exists before the timed run, as it does for every run but a store's first
        # (a scheduled run, a rerun): creating a sqlite store is MLflow's one-time schema migration.
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import sys, mlflow; mlflow.MlflowClient(sys.argv[1]).search_experiments()",
                        f"sqlite:///{tmp}/mlflow.db"], check=True, capture_output=True)
        store_create_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
        wall = time.perf_counter() - t0
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-3000:])
        text = out.stdout
        stages = {m[0]: float(m[1]) for m in re.findall(r"stage \d/\d (\w+): done in ([\d.]+)s", text)}
        run_dir = next(Path(tmp, "runs").glob("*/train")).parent
        hist = json.loads((run_dir / "train" / "history.json").read_text())
        timings = run_dir / "train" / "timings.json"  # absent before bnflow wrote one: a partial breakdown
        train = json.loads(timings.read_text()) if timings.exists() else {}
        ray_s = float(m[1]) if (m := re.search(r"embedded Ray started in ([\d.]+)s", text)) else None
        done_s = float(re.search(r"\] done in ([\d.]+)s", text)[1])
        before = float(re.search(r"before BN recalibration: ([\d.]+)", text)[1])
        after = float(re.search(r"after  BN recalibration: ([\d.]+)", text)[1])
    epoch_s = [h["epoch_seconds"] for h in hist]
    return {"wall_s": wall, "fixed_overhead_s": wall - sum(epoch_s),
            # the CLI's own clock starts after imports and config; Ray starts inside it
            "process_start_s": wall - done_s, "ray_start_s": ray_s, "stage_s": stages, "train": train,
            "store_create_s_not_in_wall": store_create_s,
            "epoch_s": epoch_s, "test_accuracy_before_recal": before, "test_accuracy_after_recal": after}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    args = p.parse_args(argv)
    from pipeline import recipes

    epochs = args.epochs or recipes.load("fashion_mnist").train.epochs
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    t0 = time.perf_counter()
    procs = [ctx.Process(target=_plain_ddp, args=(r, port, epochs, queue, time.time())) for r in range(2)]
    for proc in procs:
        proc.start()
    plain = queue.get(timeout=3600)
    for proc in procs:
        proc.join()
    plain["wall_s_with_spawn"] = time.perf_counter() - t0
    print("plain DDP", json.dumps(plain), flush=True)
    local = _pipeline(epochs, "local")
    print("pipeline bn=local", json.dumps(local), flush=True)
    sync = _pipeline(epochs, "sync")
    print("pipeline bn=sync", json.dumps(sync), flush=True)
    digits = _pipeline(None, None, recipe="digits")
    print("pipeline digits", json.dumps(digits), flush=True)
    result = {
        "epochs": epochs, "workers": 2, "threads_per_worker": 1,
        "plain_ddp": plain, "pipeline_bn_local": local, "pipeline_bn_sync": sync, "pipeline_digits": digits,
        "wall_ratio_pipeline_local_over_plain_ddp": local["wall_s"] / plain["wall_s_with_spawn"],
        "wall_ratio_pipeline_sync_over_plain_ddp": sync["wall_s"] / plain["wall_s_with_spawn"],
        "command": "python -m benchmarks.pipeline_vs_ddp " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if "ratio" in k}, indent=1))
    print(breakdown(result))


def breakdown(result: dict) -> str:
    """The README's table: where each run's seconds go."""
    p, runs = result["plain_ddp"], [("bn=local", result["pipeline_bn_local"]), ("bn=sync", result["pipeline_bn_sync"]),
                                    ("digits", result["pipeline_digits"])]
    rows = [("wall", p["wall_s_with_spawn"], [r["wall_s"] for _, r in runs]),
            ("epochs' compute", sum(p["epoch_s"]), [sum(r["epoch_s"]) for _, r in runs]),
            ("fixed overhead", p["wall_s_with_spawn"] - sum(p["epoch_s"]), [r["fixed_overhead_s"] for _, r in runs]),
            ("process start / spawn", p["spawn_s"], [r["process_start_s"] for _, r in runs]),
            ("data load", p["data_load_s"], [None] * len(runs)),
            ("Ray start", None, [r.get("ray_start_s") for _, r in runs])]
    for stage in ("ingest", "normalize", "train", "recalibrate", "evaluate"):
        rows.append((f"stage {stage}", None, [r["stage_s"].get(stage) for _, r in runs]))
    for key, label in (("fit_to_loop_s", "train: fit() to loop"), ("data_load_s", "train: shard read"),
                       ("model_setup_s", "train: model setup (build, optimizer, DDP)"),
                       ("ddp_setup_s", "train: of which SyncBN + DDP"), ("fit_to_first_step_s", "train: fit() to first step"),
                       ("validation_s", "train: validation"), ("checkpoint_s", "train: checkpoints"),
                       ("loop_end_to_fit_return_s", "train: loop end to fit() return"),
                       ("driver_mlflow_s", "train: MLflow epoch logging (driver, beside the loop)")):
        rows.append((label, None, [r["train"].get(key) for _, r in runs]))
    cell = lambda v: "" if v is None else f"{v:.1f}"  # noqa: E731
    lines = ["| seconds | plain DDP | " + " | ".join(f"pipeline {n}" for n, _ in runs) + " |",
             "|---|" + "---:|" * (len(runs) + 1)]
    lines += [f"| {label} | {cell(pv)} | " + " | ".join(cell(v) for v in vs) + " |" for label, pv, vs in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
