"""How the stages write their Parquet splits: pyarrow's defaults against ``tasks.arrow_io.write_file``
(no dictionary encoding), side by side in one process, on a standardized Fashion-MNIST train split.

Per repeat and per way of writing: write the split in ROWS_PER_FILE files, then read the first
half of it in stored order as a validating worker does (``tasks.reader.Split.slice``), then delete the files. Medians of
``--repeats``; the ratios are the figures (the machine is noisy).

    python -m benchmarks.parquet_io [--rows 54000] [--repeats 5]

Writes benchmarks/results/parquet_io.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

RESULTS = Path(__file__).resolve().parent / "results" / "parquet_io.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=54000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from schemas import arrow
    from tasks import arrow_io
    from tasks.ingest import FASHION_MNIST_DIR, _fashion_mnist
    from tasks.reader import list_parquet
    from tasks.reader import Split

    (x, y), _ = _fashion_mnist(Path(FASHION_MNIST_DIR))
    x, y = x[: args.rows], y[: args.rows]
    x = ((x - x.mean(axis=0)) / np.maximum(x.std(axis=0), 1e-6)).astype(np.float32)
    table = arrow_io.to_table(x, y, arrow.example_schema(x.shape[1]))
    ways = {"pyarrow_default": pq.write_table, "write_file": arrow_io.write_file}
    runs: dict[str, list[dict]] = {k: [] for k in ways}
    with tempfile.TemporaryDirectory(prefix="bnflow-parquet-io-") as d:
        for rep in range(args.repeats):
            for name, write in (ways.items() if rep % 2 == 0 else reversed(ways.items())):
                out = Path(d) / name
                out.mkdir()
                t0 = time.perf_counter()
                for i, start in enumerate(range(0, table.num_rows, arrow_io.ROWS_PER_FILE)):
                    write(table.slice(start, arrow_io.ROWS_PER_FILE), out / f"part-{i:05d}.parquet")
                write_s = time.perf_counter() - t0
                files = list_parquet(str(out))
                t0 = time.perf_counter()
                half = Split(files).slice(0, args.rows // 2)
                xs, ys = arrow_io.features_numpy(half), arrow_io.labels_numpy(half)
                read_s = time.perf_counter() - t0
                assert np.array_equal(xs, x[: args.rows // 2]) and np.array_equal(ys, y[: args.rows // 2])
                runs[name].append({"write_s": write_s, "read_shard_s": read_s,
                                   "bytes": sum(Path(f).stat().st_size for f in files)})
                shutil.rmtree(out)
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("write_s", "read_shard_s", "bytes")} for k, v in runs.items()}
    result = {
        "rows": args.rows, "features": int(x.shape[1]), "repeats": args.repeats, "median": med,
        "write_ratio_new_over_default": med["write_file"]["write_s"] / med["pyarrow_default"]["write_s"],
        "read_ratio_new_over_default": med["write_file"]["read_shard_s"] / med["pyarrow_default"]["read_shard_s"],
        "size_ratio_new_over_default": med["write_file"]["bytes"] / med["pyarrow_default"]["bytes"],
        "runs": runs, "command": f"python -m benchmarks.parquet_io --rows {args.rows} --repeats {args.repeats}",
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    print(f"write_file / pyarrow default: write {result['write_ratio_new_over_default']:.2f}x, "
          f"read_shard {result['read_ratio_new_over_default']:.2f}x, size {result['size_ratio_new_over_default']:.2f}x; "
          f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
