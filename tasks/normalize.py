"""Normalize stage: fit statistics on the train split in one distributed pass, apply them to every split.

Fit: every Arrow block of the train split is reduced on a Ray Data worker to per-feature (or
per-channel) count, mean, M2 (float64, two-pass within the block), min and max; the driver merges
the block moments with Chan's parallel merge (``tasks.moments``). Apply: every split is transformed
with the train statistics only, never refitted.

Note that ``standard`` divides by the POPULATION standard deviation sqrt(M2 / n), as scikit-learn's
StandardScaler does. A feature with zero spread is centred and left unscaled (scale 1).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas import arrow
from schemas.artifacts import Dataset, NormStatsFile, SplitInfo
from schemas.config import NormalizeConfig, config_hash
from schemas.errors import DataError, find_user_error
from tasks import arrow_io, moments

log = logging.getLogger(__name__)
STATS_SCHEMA_VERSION = "1"


def normalize(cfg: NormalizeConfig, raw: Dataset, out_dir: Path) -> tuple[Dataset, NormStatsFile]:
    """Fit on ``raw``'s train split, write every split normalized under ``out_dir``.

    Raises:
        SchemaMismatch: a split whose Arrow schema breaks the example-schema contract.
        DataError: an empty split, or NaN/inf features under ``nonfinite: error``.
    """
    expected = arrow.example_schema(raw.num_features)
    for name, split in raw.splits.items():
        if not any(Path(split.path).glob("*.parquet")):
            raise DataError(f"normalize: split '{name}' has no Parquet files under {split.path}")

    groups = _stat_groups(cfg, raw)
    scans = {name: _scan(s.path, groups, expected, name) for name, s in raw.splits.items()}
    dropped = {}
    for name, scan in scans.items():
        if scan["rows"] - scan["nonfinite"] == 0:
            raise DataError(f"normalize: split '{name}' has no usable rows ({scan['rows']} rows, {scan['nonfinite']} with NaN/inf)")
        if scan["nonfinite"]:
            if cfg.nonfinite == "error":
                raise DataError(
                    f"{arrow.FEATURES}: {scan['nonfinite']} row(s) of split '{name}' hold NaN or inf; clean them or set normalize.nonfinite=drop")
            dropped[name] = scan["nonfinite"]
            log.warning("normalize: dropping %d row(s) with NaN/inf from split '%s'", scan["nonfinite"], name)

    stats = _finish(cfg, scans["train"], groups, raw)
    stats["dropped_rows"] = dropped
    stats_path = out_dir / "norm_stats.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    stats_path.write_text(json.dumps(stats, indent=1))

    shift = np.asarray(stats["shift"], dtype=np.float32)
    inv_scale = (1.0 / np.asarray(stats["scale"], dtype=np.float64)).astype(np.float32)
    meta = {"bnflow.image_shape": ",".join(map(str, raw.image_shape)) if raw.image_shape else "",
            "bnflow.norm_stats_version": stats["version"], "bnflow.norm_config_hash": stats["config_hash"]}
    out_schema = arrow.example_schema(raw.num_features, meta)
    splits = {}
    for name, split in raw.splits.items():
        dest = out_dir / name
        dest.mkdir(parents=True)
        written = _over_files(_file_groups(split.path), _transform_files, out_dir=str(dest),
                              shift=shift, inv_scale=inv_scale, schema=out_schema)
        files = sorted((str(w["file"]), str(w["digest"]), int(w["rows"])) for w in written)
        splits[name] = SplitInfo(path=str(dest), rows=sum(n for _, _, n in files),
                                 digest=arrow_io.combine_digests([d for _, d, _ in files]))
    return raw.model_copy(update={"splits": splits}), NormStatsFile(path=str(stats_path), version=stats["version"])


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
    return {"rows": np.array([rows]), "nonfinite": np.array([nonfinite]),
            "count": np.array([float(m.count)]), "mean": m.mean[None], "m2": m.m2[None],
            "min": mn[None], "max": mx[None]}


def _file_groups(path: str) -> list[list[str]]:
    """A split's Parquet files in about 2 groups per cluster CPU: one Ray Data task each.

    Ray Data's own ``read_parquet`` spends most of its time on per-file planning and re-blocking
    when a split has many small files (measured here: 8.6-15 s to read 2M x 64 float32 in 123
    files that pyarrow reads in 2 s), so each task reads its files with pyarrow directly.
    """
    import ray

    files = sorted(str(f) for f in Path(path).glob("*.parquet"))
    parts = max(1, min(len(files), 2 * int(ray.cluster_resources().get("CPU", 1))))
    return [files[i::parts] for i in range(parts) if files[i::parts]]


def _over_files(file_groups: list[list[str]], fn, **kwargs) -> list[dict]:
    """Run ``fn(files, **kwargs) -> dict of equal-length arrays`` on each file group with Ray
    Data; returns all their rows."""
    import ray

    ds = ray.data.from_items([{"files": g} for g in file_groups], override_num_blocks=len(file_groups))
    ds.context.raise_original_map_exception = True  # this dataset only: keep DataError's type

    def call(batch):
        return fn(list(batch["files"][0]), **kwargs)

    try:
        return ds.map_batches(call, batch_size=1, batch_format="numpy").take_all()
    except Exception as e:  # a data-contract error raised in a task arrives wrapped by Ray
        inner = find_user_error(e)
        if inner is None:
            raise
        # Ray Data appends lines of retry advice to the message; ours is the first line.
        raise type(inner)(str(inner).splitlines()[0]) from None


def _fit_files(files: list[str], groups: int, expected: pa.Schema, split: str) -> dict:
    """Stats of a group of files: each file's schema checked against the contract, each file's
    block stats merged with Chan's merge."""
    parts = []
    for f in files:
        table = pq.read_table(f)
        arrow.check(table.schema, expected, where=f"normalize input split '{split}' ({Path(f).name})")
        parts.append(_block_stats(table, groups))
    m = moments.merge_all([moments.Moments(p["count"][0], p["mean"][0], p["m2"][0]) for p in parts])
    return {"rows": np.array([sum(int(p["rows"][0]) for p in parts)]),
            "nonfinite": np.array([sum(int(p["nonfinite"][0]) for p in parts)]),
            "count": np.array([float(m.count)]), "mean": m.mean[None], "m2": m.m2[None],
            "min": np.min([p["min"][0] for p in parts], axis=0)[None],
            "max": np.max([p["max"][0] for p in parts], axis=0)[None]}


def _transform_files(files: list[str], out_dir: str, **kwargs) -> dict:
    """Normalize each file into ``out_dir`` under the same name (so output order and digests are
    deterministic); returns each written file's name, digest and row count."""
    names, digests, rows = [], [], []
    for f in files:
        out = _apply_block(pq.read_table(f), **kwargs)
        dest = Path(out_dir) / Path(f).name
        pq.write_table(out, dest)
        names.append(dest.name)
        digests.append(arrow_io.file_digest(dest))  # just written: still in the page cache
        rows.append(out.num_rows)
    return {"file": np.array(names), "digest": np.array(digests), "rows": np.array(rows)}  # a row per file


def _scan(path: str, groups: int, expected: pa.Schema, split: str) -> dict:
    """One distributed pass: merged moments, min, max and row counts of a split."""
    parts = _over_files(_file_groups(path), _fit_files, groups=groups, expected=expected, split=split)
    merged = moments.merge_all([moments.empty(groups)] + [moments.Moments(p["count"], p["mean"], p["m2"]) for p in parts])
    return {"rows": int(sum(p["rows"] for p in parts)), "nonfinite": int(sum(p["nonfinite"] for p in parts)),
            "moments": merged, "min": np.min([np.full(groups, np.inf)] + [p["min"] for p in parts], axis=0),
            "max": np.max([np.full(groups, -np.inf)] + [p["max"] for p in parts], axis=0)}


def _finish(cfg: NormalizeConfig, scan: dict, groups: int, raw: Dataset) -> dict:
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
        log.warning("normalize: %d constant %s(s) (zero spread on train) are centred, not scaled: %s",
                    len(constant), unit, constant[:20])
    scale = np.where(scale == 0, 1.0, scale)
    per_unit = raw.num_features // groups
    body = {
        "schema_version": STATS_SCHEMA_VERSION, "method": cfg.method,
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
    return body


def _apply_block(batch: pa.Table, shift: np.ndarray, inv_scale: np.ndarray, schema: pa.Schema) -> pa.Table:
    x = arrow_io.features_numpy(batch)
    y = arrow_io.labels_numpy(batch)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():  # only reached under nonfinite=drop: the scan raised otherwise
        x, y = x[finite], y[finite]
    out = (x - shift) * inv_scale
    return arrow_io.to_table(out, y, schema)


def load_stats(path: str | Path) -> dict:
    """Read a statistics artifact, checking its schema version."""
    stats = json.loads(Path(path).read_text())
    if stats.get("schema_version") != STATS_SCHEMA_VERSION:
        raise DataError(f"{path}: normalization statistics schema_version {stats.get('schema_version')!r}, expected {STATS_SCHEMA_VERSION!r}")
    return stats
