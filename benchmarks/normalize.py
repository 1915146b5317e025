"""Normalization fit + transform: bnflow's normalize stage against what users would otherwise pick.

Competitors, all in this one run on the same Ray instance and the same input bytes:
  * bnflow   -- tasks.normalize.normalize (Ray tasks over file groups: one fit pass + one transform pass)
  * ray_data -- ray.data.preprocessors.StandardScaler (fit, then transform + write_parquet)
  * sklearn  -- pyarrow read, sklearn.preprocessing.StandardScaler fit_transform, pyarrow write (as bnflow writes)
  * floor    -- pyarrow read, NumPy float64 two-pass mean/std, transform, pyarrow write (as bnflow; one process)

Cases: (i) Fashion-MNIST train, 60000 x 784 float32 (per-feature statistics); (ii) synthetic
2,000,000 x 64 float32 with mean 1e4 and std 0.1, the numerically hard case. Every competitor
reads Parquet and writes Parquet (end to end). bnflow reads the project's example schema (one
fixed-size-list column); Ray Data's and scikit-learn's scalers need one column per feature, so they
get the same values in that layout.

    python -m benchmarks.normalize [--hard-rows 2000000]

Writes benchmarks/results/normalize.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

RESULTS = Path(__file__).resolve().parent / "results" / "normalize.json"
ROWS_PER_FILE = 16_384  # as the ingest stage writes splits


class PeakMemory:
    """Peak resident memory of this process plus every Ray worker process (absolute, sampled every
    50 ms; Ray workers are found by their ``ray::`` process titles). Idle workers kept warm from an
    earlier competitor count too, so read it with ``start_mb`` beside it."""

    @staticmethod
    def _rss() -> int:
        total = psutil.Process().memory_info().rss
        for p in psutil.process_iter(["cmdline"]):
            try:
                cmd = p.info["cmdline"] or []
                if cmd and cmd[0].startswith("ray::"):
                    total += p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def __enter__(self):
        self.base = self._rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.mb = self.peak / 2**20
        self.start_mb = self.base / 2**20


def _write_inputs(x: np.ndarray, root: Path) -> tuple[Path, Path]:
    """The same values twice: bnflow's schema (list column) and one float column per feature."""
    from schemas import arrow
    from tasks import arrow_io

    listed, wide = root / "listed", root / "wide"
    listed.mkdir(parents=True)
    wide.mkdir(parents=True)
    schema = arrow.example_schema(x.shape[1])
    y = np.zeros(len(x), dtype=np.int64)
    names = [f"f{i}" for i in range(x.shape[1])]
    for i, s in enumerate(range(0, len(x), ROWS_PER_FILE)):
        part = x[s : s + ROWS_PER_FILE]
        pq.write_table(arrow_io.to_table(part, y[s : s + ROWS_PER_FILE], schema), listed / f"part-{i:05d}.parquet")
        pq.write_table(pa.table({n: part[:, j] for j, n in enumerate(names)}), wide / f"part-{i:05d}.parquet")
    return listed, wide


def _read_wide(path: Path) -> np.ndarray:
    t = pq.read_table(path)
    return np.column_stack([c.to_numpy() for c in t.columns])


def _write_wide(x: np.ndarray, path: Path) -> None:
    """The competitors' output, written with the same Parquet options as bnflow's (no dictionary
    pages, ``tasks.arrow_io.write_file``), so the comparison is of the normalizing, not the writer."""
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({f"f{j}": x[:, j] for j in range(x.shape[1])}), path / "out.parquet", use_dictionary=False)


def run_floor(wide: Path, out: Path) -> dict:
    t0 = time.perf_counter()
    x = _read_wide(wide)
    t1 = time.perf_counter()
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=0)
    x64 -= mean
    std = np.sqrt(np.einsum("ij,ij->j", x64, x64) / len(x64))
    del x64
    t2 = time.perf_counter()
    y = ((x - mean.astype(np.float32)) * (1 / np.where(std == 0, 1, std)).astype(np.float32))
    _write_wide(y, out)
    t3 = time.perf_counter()
    return {"read_s": t1 - t0, "fit_s": t2 - t1, "transform_write_s": t3 - t2, "total_s": t3 - t0, "std": std}


def run_sklearn(wide: Path, out: Path) -> dict:
    from sklearn.preprocessing import StandardScaler

    t0 = time.perf_counter()
    x = _read_wide(wide)
    t1 = time.perf_counter()
    scaler = StandardScaler().fit(x)
    t2 = time.perf_counter()
    _write_wide(scaler.transform(x), out)
    t3 = time.perf_counter()
    return {"read_s": t1 - t0, "fit_s": t2 - t1, "transform_write_s": t3 - t2, "total_s": t3 - t0, "std": scaler.scale_}


def run_ray_data(wide: Path, out: Path, d: int) -> dict:
    import ray
    from ray.data.preprocessors import StandardScaler

    cols = [f"f{i}" for i in range(d)]
    t0 = time.perf_counter()
    ds = ray.data.read_parquet(str(wide))
    scaler = StandardScaler(columns=cols).fit(ds)
    t1 = time.perf_counter()
    scaler.transform(ds).write_parquet(str(out))
    t2 = time.perf_counter()
    std = np.array([scaler.stats_[f"std({c})"] for c in cols])
    return {"fit_s": t1 - t0, "transform_write_s": t2 - t1, "total_s": t2 - t0, "std": std}


def run_bnflow(listed: Path, out: Path, d: int) -> dict:
    """The public stage entry on a dataset with only a train split: schema check, fit, transform,
    write, output digest -- everything the pipeline pays for."""
    from schemas.artifacts import Dataset, NormStats, SplitInfo
    from schemas.config import NormalizeConfig
    from tasks import normalize as N

    cfg = NormalizeConfig(method="standard", per="feature")
    raw = Dataset(splits={"train": SplitInfo(path=str(listed), rows=0, digest="")}, num_features=d, num_classes=10)
    fit_s = {}
    real_scan = N._scan

    def timed_scan(*a, **k):  # split the stage's wall time into fit and transform+write
        t = time.perf_counter()
        r = real_scan(*a, **k)
        fit_s["t"] = time.perf_counter() - t
        return r

    N._scan = timed_scan
    try:
        t0 = time.perf_counter()
        _, stats_file = N.normalize(cfg, raw, out)
        total = time.perf_counter() - t0
    finally:
        N._scan = real_scan
    std = np.asarray(NormStats.load(stats_file.path).std)
    return {"fit_s": fit_s["t"], "transform_write_s": total - fit_s["t"], "total_s": total, "std": std}


def bench_case(name: str, x: np.ndarray, work: Path) -> dict:
    n, d = x.shape
    ref_std = x.astype(np.float64).std(axis=0)  # float64 two-pass reference
    listed, wide = _write_inputs(x, work / name)
    mb = x.nbytes / 2**20
    runners = {
        "bnflow": lambda o: run_bnflow(listed, o, d),
        "ray_data_standard_scaler": lambda o: run_ray_data(wide, o, d),
        "sklearn_standard_scaler": lambda o: run_sklearn(wide, o),
        "numpy_two_pass_floor": lambda o: run_floor(wide, o),
    }
    out = {"rows": n, "features": d, "mb": mb}
    for label, fn in runners.items():
        dest = work / name / f"out-{label}"
        with PeakMemory() as mem:
            r = fn(dest)
        shutil.rmtree(dest, ignore_errors=True)
        std = r.pop("std")
        nz = ref_std > 0
        r["std_rel_err_max"] = float(np.max(np.abs(std[nz] - ref_std[nz]) / ref_std[nz]))
        r["rows_per_s_end_to_end"] = n / r["total_s"]
        r["mb_per_s_end_to_end"] = mb / r["total_s"]
        r["fit_rows_per_s"] = n / r["fit_s"]
        r["fit_mb_per_s"] = mb / r["fit_s"]
        r["transform_write_rows_per_s"] = n / r["transform_write_s"]
        r["transform_write_mb_per_s"] = mb / r["transform_write_s"]
        r["peak_rss_mb"] = mem.mb
        r["start_rss_mb"] = mem.start_mb
        out[label] = r
        print(f"[{name}] {label}: total {r['total_s']:.2f}s  fit {r['fit_s']:.2f}s  transform+write {r['transform_write_s']:.2f}s  "
              f"std rel err {r['std_rel_err_max']:.2e}  peak RSS {mem.mb:.0f} MB (start {mem.start_mb:.0f})", flush=True)
    b = out["bnflow"]["total_s"]
    out["speedup_vs_ray_data_standard_scaler"] = out["ray_data_standard_scaler"]["total_s"] / b
    out["speedup_vs_sklearn"] = out["sklearn_standard_scaler"]["total_s"] / b
    out["slowdown_vs_floor"] = b / out["numpy_two_pass_floor"]["total_s"]
    return out


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--hard-rows", type=int, default=2_000_000)
    p.add_argument("--fmnist-rows", type=int, default=60_000)
    args = p.parse_args(argv)

    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ray.data.DataContext.get_current().enable_progress_bars = False

    from tasks.ingest import FASHION_MNIST_DIR, _fashion_mnist

    (fm, _), _ = _fashion_mnist(Path(FASHION_MNIST_DIR))
    rng = np.random.default_rng(0)
    hard = (1e4 + 0.1 * rng.standard_normal((args.hard_rows, 64))).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        cases = {"fashion_mnist_60000x784": bench_case("fmnist", fm[: args.fmnist_rows], Path(tmp)),
                 "hard_2000000x64": bench_case("hard", hard, Path(tmp))}
    ray.shutdown()
    h = cases["hard_2000000x64"]
    result = {
        "speedup_vs_ray_data_standard_scaler": h["speedup_vs_ray_data_standard_scaler"],
        "speedup_vs_sklearn": h["speedup_vs_sklearn"],
        "slowdown_vs_numpy_floor_hard_case": h["slowdown_vs_floor"],
        "std_rel_err_hard_case": h["bnflow"]["std_rel_err_max"],
        "cases": cases,
        "machine": f"{os.cpu_count()} cores, ray {ray.__version__}",
        "command": "python -m benchmarks.normalize " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "cases"}, indent=1))


if __name__ == "__main__":
    main()
