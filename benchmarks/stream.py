"""A train worker's streamed shard (tasks/stream.py): shuffle quality, epoch time, Ray Data, memory.

    python -m benchmarks.stream [--part all|shuffle|epoch|raydata|memory] [--repeats 3]

- ``shuffle``: Fashion-MNIST's 60,000 train rows stored sorted by label, in the stages' files and
  row groups. Mean total-variation distance between each batch's label mix (batches of 128) and
  the split's: stored order, a full shuffle, and the stream with the default buffer (both ranks of
  2). Then a grid over row-group size and buffer size, at x1 and at x10 rows (label-only tables:
  the order does not depend on the features), the measurement behind ``ROWS_PER_GROUP`` and the
  default ``train.shuffle_buffer_rows``; and the read time of one rank's epoch per group size.
- ``epoch``: one rank of 2's epoch of real rows (batches of 128) with the default buffer against
  the same reader with a buffer holding the whole shard (all in memory): a training epoch of the
  default recipe's LeNet-BN on one thread, as a worker runs it, and the reader alone; medians of
  ``--repeats`` alternating runs.
- ``raydata``: on 2 Ray Train workers, an epoch of ``ShardStream`` against Ray Data's
  ``iter_torch_batches`` (``local_shuffle_buffer_size`` the same) over the same Parquet files,
  alternating in the same workers; rank 0's median epoch seconds.
- ``memory``: the train stage (1 epoch, 2 workers, LeNet) on Fashion-MNIST x1 and on a x10 train
  split (600,000 rows: the train rows repeated with a seeded jitter), each in a fresh process: peak
  RSS of rank 0's worker and of the stage's driver; and of the process that ran ingest + normalize
  before it (those stages do not stream yet: see the README).

Merges into benchmarks/results/stream.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "stream.json"
BATCH = 128
WORLD = 2


def _mean_tv(labels: np.ndarray, classes: int = 10) -> float:
    """Mean over full batches of 0.5 * sum |batch class share - split class share|."""
    p = np.bincount(labels, minlength=classes) / len(labels)
    n = len(labels) // BATCH
    counts = np.stack([np.bincount(labels[i * BATCH:(i + 1) * BATCH], minlength=classes) for i in range(n)])
    return float(np.mean(0.5 * np.abs(counts / BATCH - p).sum(axis=1)))


def _fmnist():
    from tasks.ingest import FASHION_MNIST_DIR, _fashion_mnist

    (x, y), _ = _fashion_mnist(Path(FASHION_MNIST_DIR))
    return ((x - x.mean()) / x.std()).astype(np.float32), y.astype(np.int64)


def _write_split(x: np.ndarray, y: np.ndarray, out: Path, group_rows: int) -> list[str]:
    import pyarrow.parquet as pq

    from schemas import arrow
    from tasks import arrow_io

    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, s in enumerate(range(0, len(y), arrow_io.ROWS_PER_FILE)):
        f = out / f"part-{i:05d}.parquet"
        table = arrow_io.to_table(x[s:s + arrow_io.ROWS_PER_FILE], y[s:s + arrow_io.ROWS_PER_FILE], arrow.example_schema(x.shape[1]))
        pq.write_table(table, f, use_dictionary=False, row_group_size=group_rows)
        files.append(str(f))
    return files


def _labels(files, rank, buffer_rows, features: int):
    from tasks.stream import ShardStream

    stream = ShardStream(files, rank, WORLD, (features,), buffer_rows)
    return np.concatenate([yb.numpy() for _, yb in stream.epoch(1, 0, BATCH)])


def shuffle(root: Path, repeats: int) -> dict:
    from schemas.config import TrainConfig
    from tasks import arrow_io
    from tasks.stream import ShardStream

    default = TrainConfig().shuffle_buffer_rows
    x, y = _fmnist()
    order = np.argsort(y, kind="stable")
    xs, ys = x[order], y[order]
    files = _write_split(xs, ys, root / "sorted", arrow_io.ROWS_PER_GROUP)
    streamed = [_mean_tv(_labels(files, r, default, 784)) for r in range(WORLD)]
    out = {"rows": len(y), "batch": BATCH, "world": WORLD, "row_group_rows": arrow_io.ROWS_PER_GROUP, "buffer_rows": default,
           "tv_stored_order": _mean_tv(ys), "tv_full_shuffle": _mean_tv(ys[np.random.default_rng(0).permutation(len(ys))]),
           "tv_stream_default": float(np.mean(streamed)), "tv_stream_default_per_rank": streamed}
    print(json.dumps(out), flush=True)
    grid = []
    for scale in (1, 10):
        y_big = np.sort(np.tile(y, scale))
        one = np.zeros((len(y_big), 1), dtype=np.float32)
        for group in (2048, 1024, 512, 256, 128):
            g_files = _write_split(one, y_big, root / f"grid-{scale}-{group}", group)
            for buffer in (8192, 16384, 32768, 65536):
                grid.append({"scale": scale, "row_group_rows": group, "buffer_rows": buffer,
                             "tv": _mean_tv(_labels(g_files, 0, buffer, 1))})
                print(json.dumps(grid[-1]), flush=True)
    out["grid_rank0"] = grid
    reads = {}
    for group in (2048, 512, 256, 128):
        g_files = _write_split(x, y, root / f"read-{group}", group)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for xb, _ in ShardStream(g_files, 0, WORLD, (784,), default).epoch(1, 0, BATCH):
                pass
            times.append(time.perf_counter() - t0)
        reads[str(group)] = statistics.median(times)
    out["epoch_read_s_by_row_group_rows"] = reads
    print(json.dumps(reads), flush=True)
    return out


def epoch(root: Path, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    from schemas.config import ModelConfig, TrainConfig
    from tasks import arrow_io
    from tasks.nn.models import build_model
    from tasks.stream import ShardStream

    torch.set_num_threads(1)  # as a worker with train.cpus_per_worker=1
    x, y = _fmnist()
    files = _write_split(x, y, root / "fmnist", arrow_io.ROWS_PER_GROUP)
    ways = {"stream_default_buffer": TrainConfig().shuffle_buffer_rows, "buffer_whole_shard": len(y)}
    runs: dict[str, dict[str, list[float]]] = {k: {"reader_s": [], "train_epoch_s": []} for k in ways}
    for rep in range(repeats):
        for name in (list(ways) if rep % 2 == 0 else list(reversed(ways))):
            stream = ShardStream(files, 0, WORLD, (1, 28, 28), ways[name])
            t0 = time.perf_counter()
            for xb, yb in stream.epoch(rep + 1, 0, BATCH):
                xb.sum()
            runs[name]["reader_s"].append(time.perf_counter() - t0)
            torch.manual_seed(0)
            model = build_model(ModelConfig(kind="lenet"), (1, 28, 28), 10)
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            t0 = time.perf_counter()
            for xb, yb in stream.epoch(rep + 1, 0, BATCH):
                loss = F.cross_entropy(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
            runs[name]["train_epoch_s"].append(time.perf_counter() - t0)
            print(name, rep, {k: v[-1] for k, v in runs[name].items()}, flush=True)
    med = {k: {m: statistics.median(v[m]) for m in v} for k, v in runs.items()}
    out = {"rows": len(y), "rank": 0, "world": WORLD, "batch": BATCH, "repeats": repeats, "model": "LeNet-BN, 1 thread",
           "runs": runs, "median_s": med,
           "train_epoch_ratio_stream_over_in_memory": med["stream_default_buffer"]["train_epoch_s"] / med["buffer_whole_shard"]["train_epoch_s"],
           "reader_only_ratio_stream_over_in_memory": med["stream_default_buffer"]["reader_s"] / med["buffer_whole_shard"]["reader_s"]}
    print(json.dumps({k: out[k] for k in ("median_s", "train_epoch_ratio_stream_over_in_memory", "reader_only_ratio_stream_over_in_memory")}), flush=True)
    return out


def _compare_loop(config: dict) -> None:
    """On each Ray Train worker: alternate epochs of ShardStream and of Ray Data's shard."""
    import ray.train

    from tasks.stream import ShardStream

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    shard = ray.train.get_dataset_shard("train")
    times: dict[str, list[float]] = {"bnflow": [], "ray_data": []}
    for rep in range(config["repeats"]):
        for name in (("bnflow", "ray_data") if rep % 2 == 0 else ("ray_data", "bnflow")):
            t0, rows = time.perf_counter(), 0
            if name == "bnflow":
                for xb, yb in ShardStream(config["files"], rank, world, (1, 28, 28), config["buffer"]).epoch(rep + 1, 0, BATCH):
                    xb.sum()
                    rows += len(yb)
            else:
                for b in shard.iter_torch_batches(batch_size=BATCH, local_shuffle_buffer_size=config["buffer"],
                                                  local_shuffle_seed=rep, drop_last=True):
                    b["features"].view(-1, 1, 28, 28).sum()
                    rows += len(b["label"])
            times[name].append(time.perf_counter() - t0)
            times.setdefault(name + "_rows", []).append(rows)
    if rank == 0:
        Path(config["out"]).write_text(json.dumps(times))


def raydata(root: Path, repeats: int) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from schemas.config import TrainConfig
    from tasks import arrow_io

    x, y = _fmnist()
    files = _write_split(x, y, root / "fmnist", arrow_io.ROWS_PER_GROUP)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only, as the embedded pipeline runs
    # 4 logical CPUs: the 2 workers' and 2 for Ray Data's read tasks (with none free they never start).
    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
             _temp_dir=str(root / "ray"), log_to_driver=False, logging_config=ray.LoggingConfig(log_level="WARNING"))
    try:
        out_file = root / "raydata.json"
        trainer = TorchTrainer(
            _compare_loop,
            train_loop_config={"files": files, "buffer": TrainConfig().shuffle_buffer_rows, "repeats": repeats,
                               "out": str(out_file)},
            scaling_config=ScalingConfig(num_workers=WORLD, resources_per_worker={"CPU": 1}),
            datasets={"train": ray.data.read_parquet(files)},
            run_config=RunConfig(storage_path=str(root / "ray_train")))
        trainer.fit()
        times = json.loads(out_file.read_text())
    finally:
        ray.shutdown()
    med = {k: statistics.median(times[k]) for k in ("bnflow", "ray_data")}
    out = {"rows": len(y), "world": WORLD, "batch": BATCH, "repeats": repeats, "rank0_epoch_s": times, "rank0_median_s": med,
           "ratio_bnflow_over_ray_data": med["bnflow"] / med["ray_data"]}
    print(json.dumps(out), flush=True)
    return out


def _source(root: Path, scale: int) -> Path:
    """A parquet source: Fashion-MNIST's train rows ``scale`` times (copies after the first jittered
    by seeded noise of 2 grey levels, clipped) and its test rows, as list<float> pixels 0..255, in
    files of 60,000 rows and row groups of 16,384."""
    import pyarrow.parquet as pq

    from schemas import arrow
    from tasks import arrow_io
    from tasks.ingest import FASHION_MNIST_DIR, _fashion_mnist

    (x, y), (xt, yt) = _fashion_mnist(Path(FASHION_MNIST_DIR))
    src = root / f"source-x{scale}"
    for name in ("train", "test"):
        (src / name).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(scale)
    # One layout for every file and both sizes: a reader holds a row group's column chunk, so the
    # source's group size (not its row count) sets ingest's floor; pyarrow's default would put a
    # whole file in one group, dictionary-encoded or not depending on the values.
    layout = {"row_group_size": 16384, "use_dictionary": False}
    for k in range(scale):
        xk = x if k == 0 else np.clip(x + rng.normal(0, 2.0, size=x.shape), 0, 255).astype(np.float32)
        pq.write_table(arrow_io.to_table(xk, y, arrow.example_schema(784)), src / "train" / f"part-{k:03d}.parquet", **layout)
    pq.write_table(arrow_io.to_table(xt, yt, arrow.example_schema(784)), src / "test" / "part-000.parquet", **layout)
    return src


def _child_prepare(src: str, out: str) -> None:
    """Child process: ingest + normalize the source; prints the artifacts and this process's peak RSS."""
    from pipeline import cluster
    from tasks.ingest import ingest
    from tasks.normalize import normalize
    from tasks.train_progress import peak_rss_bytes

    cfg = _recipe(src)
    cluster.connect(cfg)  # normalize's file groups are Ray tasks
    raw = ingest(cfg.data, Path(out) / "ingest", cfg.seed)
    data, stats = normalize(cfg.normalize, raw, Path(out) / "normalize")
    print(json.dumps({"data": data.model_dump(mode="json"), "stats": stats.model_dump(mode="json"),
                      "peak_rss_mb": peak_rss_bytes() / 2**20}))


def _child_train(src: str, out: str, artifacts: str) -> None:
    """Child process: the train stage, 1 epoch; prints its driver's and rank 0's peak RSS."""
    from pipeline import cluster
    from schemas.artifacts import Dataset, NormStatsFile
    from tasks import train
    from tasks.train_progress import peak_rss_bytes

    cfg = _recipe(src)
    a = json.loads(artifacts)
    cluster.connect(cfg)
    t0 = time.perf_counter()
    train.train(cfg.train, Dataset.model_validate(a["data"]), NormStatsFile.model_validate(a["stats"]), Path(out) / "train", cfg.seed)
    timings = json.loads((Path(out) / "train" / train.TIMINGS_FILE).read_text())
    print(json.dumps({"driver_peak_rss_mb": peak_rss_bytes() / 2**20, "rank0_peak_rss_mb": timings["rank0_peak_rss_mb"],
                      "train_s": time.perf_counter() - t0, "epochs_compute_s": timings["epochs_compute_s"]}))


def _recipe(src: str):
    from pipeline import recipes

    return recipes.load("fashion_mnist", ["data.source=parquet", f"data.path={src}", "data.image_shape=[1,28,28]",
                                          "data.num_classes=10", "train.epochs=1"])


def memory(root: Path, repeats: int) -> dict:
    out = {}
    for scale in (1, 10):
        src = _source(root, scale)
        work = root / f"run-x{scale}"
        prep = _last_json([sys.executable, "-m", "benchmarks.stream", "--child", "prepare", str(src), str(work)])
        trained = _last_json([sys.executable, "-m", "benchmarks.stream", "--child", "train", str(src), str(work),
                              json.dumps({"data": prep["data"], "stats": prep["stats"]})])
        out[f"x{scale}"] = {"train_rows": prep["data"]["splits"]["train"]["rows"],
                            "ingest_normalize_driver_peak_rss_mb": prep["peak_rss_mb"], **trained}
        print(json.dumps(out[f"x{scale}"]), flush=True)
    for key in ("rank0_peak_rss_mb", "driver_peak_rss_mb", "ingest_normalize_driver_peak_rss_mb"):
        out[f"{key}_x10_over_x1"] = out["x10"][key] / out["x1"][key]
    return out


def _last_json(cmd: list[str]) -> dict:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:5])} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


PARTS = {"shuffle": shuffle, "epoch": epoch, "raydata": raydata, "memory": memory}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        {"prepare": _child_prepare, "train": _child_train}[sys.argv[2]](*sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", *PARTS], default="all")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for name in (PARTS if args.part == "all" else [args.part]):
        with tempfile.TemporaryDirectory(prefix=f"bnflow-stream-{name}-") as d:
            results[name] = {**PARTS[name](Path(d), args.repeats), "date": time.strftime("%Y-%m-%d"),
                             "command": f"python -m benchmarks.stream --part {name} --repeats {args.repeats}"}
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
