"""Normalize stage: fit statistics on the train split in one distributed pass, apply them to every split.

Fit: the train split's files are cut into groups (about two per CPU), each reduced in a Ray task,
row group by row group (``tasks.reader``), to per-feature (or per-channel) count, mean, M2 (float64,
two-pass within a row group), min and max; the task and then the driver merge the moments with
Chan's parallel merge (``tasks.moments``). Apply: every split is transformed
with the train statistics only, never refitted.

Note that ``standard`` divides by the POPULATION standard deviation sqrt(M2 / n), as scikit-learn's
StandardScaler does. A feature with zero spread is centred and left unscaled (scale 1).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from schemas import arrow
from schemas.artifacts import NORM_STATS_VERSION, Dataset, NormStats, NormStatsFile, SplitInfo
from schemas.config import NormalizeConfig, config_hash
from schemas.errors import DataError, find_user_error
from tasks import arrow_io, moments
from tasks.console import QUIET, Console, Progress
from tasks.reader import Split



def normalize(cfg: NormalizeConfig, raw: Dataset, out_dir: Path, console: Console = QUIET) -> tuple[Dataset, NormStatsFile]:
    """Fit on ``raw``'s train split, write every split normalized under ``out_dir``; progress and
    notes (dropped rows, constant features) go to ``console``.

    Raises:
        SchemaMismatch: a split whose Arrow schema breaks the example-schema contract.
        DataError: an empty split, or NaN/inf features under ``nonfinite: error``.
    """
    expected = arrow.example_schema(raw.num_features)
    files = {name: arrow_io.check_split(split, expected, where=f"normalize input split '{name}'")
             for name, split in raw.splits.items()}

    groups = _stat_groups(cfg, raw)
    with console.progress("normalize", total=2 * sum(split.rows for split in raw.splits.values()), unit="rows") as bar:
        return _normalize(cfg, raw, out_dir, files, groups, bar, console)


def _normalize(cfg: NormalizeConfig, raw: Dataset, out_dir: Path, files: dict, groups: int, bar: Progress, console: Console):
    scans = {name: _scan(files[name], groups, bar) for name in raw.splits}
    dropped = {}
    for name, scan in scans.items():
        if scan["rows"] - scan["nonfinite"] == 0:
            raise DataError(f"normalize: split '{name}' has no usable rows ({scan['rows']} rows, {scan['nonfinite']} with NaN/inf)")
        if scan["nonfinite"]:
            if cfg.nonfinite == "error":
                raise DataError(
                    f"{arrow.FEATURES}: {scan['nonfinite']} row(s) of split '{name}' hold NaN or inf; clean them or set normalize.nonfinite=drop")
            dropped[name] = scan["nonfinite"]
            console.say(f"normalize: dropping {scan['nonfinite']} row(s) with NaN/inf from split '{name}'")

    stats = _finish(cfg, scans["train"], groups, raw, console).model_copy(update={"dropped_rows": dropped})
    stats_path = out_dir / "norm_stats.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    stats.save(stats_path)

    shift = np.asarray(stats.shift, dtype=np.float32)
    inv_scale = (1.0 / np.asarray(stats.scale, dtype=np.float64)).astype(np.float32)
    meta = {"bnflow.image_shape": ",".join(map(str, raw.image_shape)) if raw.image_shape else "",
            "bnflow.norm_stats_version": stats.version, "bnflow.norm_config_hash": stats.config_hash}
    out_schema = arrow.example_schema(raw.num_features, meta)
    splits = {}
    for name, split in raw.splits.items():
        dest = out_dir / name
        dest.mkdir(parents=True)
        results = _over_files(_file_groups(files[name]), _transform_files, bar, lambda r: sum(n for _, _, n in r),
                              out_dir=str(dest), shift=shift, inv_scale=inv_scale, schema=out_schema)
        written = sorted(w for group in results for w in group)
        splits[name] = SplitInfo(path=str(dest), rows=sum(n for _, _, n in written),
                                 digest=arrow_io.combine_digests([d for _, d, _ in written]), files=[f for f, _, _ in written])
    return raw.model_copy(update={"splits": splits}), NormStatsFile(path=str(stats_path), version=stats.version)


def _stat_groups(cfg: NormalizeConfig, raw: Dataset) -> int:
    """Number of statistic units: channels for per-channel image statistics, else features."""
    if cfg.per == "channel" and raw.image_shape:
        return raw.image_shape[0]
    return raw.num_features


def _block_stats(batch: pa.Table, groups: int) -> dict:
    x = arrow_io.features_numpy(batch)
    rows, per = len(x), x.shape[1] // groups
    # (N, D) -> (N, groups, D / groups): per-channel statistics reduce over rows and pixels.
    m = moments.of_array(x.reshape(rows, groups, per), axis=(0, 2))
    nonfinite = 0
    if not (np.isfinite(m.mean).all() and np.isfinite(m.m2).all()):
        # NaN/inf poison the sums, so the row-wise check runs only on blocks that hold some.
        finite = np.isfinite(x).all(axis=1)
        nonfinite = int(rows - finite.sum())
        x = x[finite]
        m = moments.of_array(x.reshape(len(x), groups, per), axis=(0, 2))
    xg = x.reshape(len(x), groups, per)
    if len(x):
        mn, mx = xg.min(axis=(0, 2)).astype(np.float64), xg.max(axis=(0, 2)).astype(np.float64)
    else:
        mn, mx = np.full(groups, np.inf), np.full(groups, -np.inf)
    return {"rows": rows, "nonfinite": nonfinite, "moments": m, "min": mn, "max": mx}


def _file_groups(files: list[str]) -> list[list[str]]:
    """A split's Parquet files in about 2 groups per cluster CPU: one Ray task each.

    Ray Data's own ``read_parquet`` spends most of its time on per-file planning and re-blocking
    when a split has many small files (measured here: 8.6-15 s to read 2M x 64 float32 in 123
    files that pyarrow reads in 2 s), so each task reads its files with pyarrow directly.
    """
    import ray

    parts = max(1, min(len(files), 2 * int(ray.cluster_resources().get("CPU", 1))))
    return [files[i::parts] for i in range(parts) if files[i::parts]]


def _over_files(file_groups: list[list[str]], fn, bar: Progress, rows: Callable[[object], int], **kwargs) -> list:
    """``fn(files, **kwargs)`` on each file group as a Ray task; returns the results in group order,
    advancing ``bar`` by ``rows(result)`` as each task ends.

    Raises:
        UserError: the first line of a data-contract error raised inside a task.
    """
    import ray

    task = ray.remote(num_cpus=1)(fn)
    try:
        refs = [task.remote(group, **kwargs) for group in file_groups]
        results, pending = {}, list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            results[done[0]] = ray.get(done[0])
            bar.update(rows(results[done[0]]))
        return [results[r] for r in refs]
    except Exception as e:  # a data-contract error raised in a task arrives wrapped by Ray
        inner = find_user_error(e)
        if inner is None:
            raise
        raise type(inner)(str(inner).splitlines()[0]) from None


def _fit_files(files: list[str], groups: int) -> dict:
    """Stats of a group of files, each file's moments merged with Chan's merge."""
    parts = list(Split(files).batches(transform=lambda t: _block_stats(t, groups)))
    return {"rows": sum(p["rows"] for p in parts), "nonfinite": sum(p["nonfinite"] for p in parts),
            "moments": moments.merge_all([p["moments"] for p in parts]),
            "min": np.min([p["min"] for p in parts], axis=0), "max": np.max([p["max"] for p in parts], axis=0)}


def _transform_files(files: list[str], out_dir: str, **kwargs) -> list[tuple[str, str, int]]:
    """Normalize each file into ``out_dir`` under the same name (so output order and digests are
    deterministic), one row group at a time; returns each written file's (name, digest, rows)."""
    written = []
    for f in files:
        dest = Path(out_dir) / Path(f).name
        rows = arrow_io.write_tables(Split([f]).batches(transform=lambda t: _apply_block(t, **kwargs)), dest, kwargs["schema"])
        written.append((dest.name, arrow_io.file_digest(dest), rows))  # just written: in the page cache
    return written


def _scan(files: list[str], groups: int, bar: Progress) -> dict:
    """One distributed pass: merged moments, min, max and row counts of a split."""
    parts = _over_files(_file_groups(files), _fit_files, bar, lambda r: r["rows"], groups=groups)
    return {"rows": sum(p["rows"] for p in parts), "nonfinite": sum(p["nonfinite"] for p in parts),
            "moments": moments.merge_all([moments.empty(groups)] + [p["moments"] for p in parts]),
            "min": np.min([np.full(groups, np.inf)] + [p["min"] for p in parts], axis=0),
            "max": np.max([np.full(groups, -np.inf)] + [p["max"] for p in parts], axis=0)}


def _finish(cfg: NormalizeConfig, scan: dict, groups: int, raw: Dataset, console: Console) -> NormStats:
    m = scan["moments"]
    std = np.sqrt(m.variance(ddof=0))
    if cfg.method == "standard":
        shift, scale = m.mean, std
    elif cfg.method == "minmax":
        shift, scale = scan["min"], scan["max"] - scan["min"]
    else:
        shift, scale = np.zeros(groups), np.ones(groups)
    constant = [int(i) for i in np.flatnonzero(scale == 0)]
    if constant and cfg.method != "none":
        unit = "channel" if groups != raw.num_features else "feature"
        console.say(f"normalize: {len(constant)} constant {unit}(s) (zero spread on train) are centred, not scaled: {constant[:20]}")
    scale = np.where(scale == 0, 1.0, scale)
    per_unit = raw.num_features // groups
    body = {
        "schema_version": NORM_STATS_VERSION, "method": cfg.method,
        "per": "channel" if cfg.per == "channel" and raw.image_shape else "feature",
        "image_shape": list(raw.image_shape) if raw.image_shape else None,
        "num_features": raw.num_features, "count": float(m.count),
        "mean": m.mean.tolist(), "std": std.tolist(), "min": scan["min"].tolist(), "max": scan["max"].tolist(),
        "constant_units": constant,
        # Per-feature vectors ready to apply: x_norm = (x - shift) / scale.
        "shift": np.repeat(shift, per_unit).tolist(), "scale": np.repeat(scale, per_unit).tolist(),
    }
    body["config_hash"] = config_hash(cfg)
    body["version"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    return NormStats.model_validate(body)


def _apply_block(batch: pa.Table, shift: np.ndarray, inv_scale: np.ndarray, schema: pa.Schema) -> pa.Table:
    x = arrow_io.features_numpy(batch)
    y = arrow_io.labels_numpy(batch)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():  # only reached under nonfinite=drop: the scan raised otherwise
        x, y = x[finite], y[finite]
    out = (x - shift) * inv_scale
    return arrow_io.to_table(out, y, schema)

