"""Normalize stage on a real Ray instance, against float64 NumPy references."""


import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas import arrow
from schemas.artifacts import Dataset, NormStats
from schemas.config import DataConfig, NormalizeConfig
from schemas.errors import DataError, SchemaMismatch
from tasks import arrow_io
from tasks.console import Console
from tasks.ingest import ingest
from tasks.normalize import normalize

pytestmark = pytest.mark.usefixtures("ray_session")


def _x(info):
    t = pq.read_table(info.path)
    return arrow_io.features_numpy(t).astype(np.float64), t


def _dataset(tmp_path, splits: dict, image_shape=None) -> Dataset:
    d = next(iter(splits.values())).shape[1]
    schema = arrow.example_schema(d)
    infos = {name: arrow_io.write_split(arrow_io.to_table(x, np.arange(len(x)) % 3, schema), tmp_path / "raw" / name)
             for name, x in splits.items()}
    return Dataset(splits=infos, num_features=d, num_classes=3, image_shape=image_shape)


def test_per_channel_standard_fit_on_train_only(tmp_path):
    raw = ingest(DataConfig(source="fashion_mnist", max_train_rows=3000, max_test_rows=500), tmp_path / "raw", seed=0)
    out, stats_file = normalize(NormalizeConfig(method="standard", per="channel"), raw, tmp_path / "norm")
    xr, _ = _x(raw.splits["train"])
    mean, std = xr.mean(), xr.std()  # population std over every pixel of every train image
    stats = NormStats.load(stats_file.path)
    assert stats.per == "channel" and len(stats.mean) == 1
    assert abs(stats.mean[0] - mean) / mean < 1e-12
    assert abs(stats.std[0] - std) / std < 1e-12
    xn, table = _x(out.splits["train"])
    assert abs(xn.mean()) < 1e-5 and abs(xn.std() - 1) < 1e-5
    for split in ("val", "test"):  # transformed with the TRAIN statistics, never refitted
        raw_x, _ = _x(raw.splits[split])
        got, _ = _x(out.splits[split])
        np.testing.assert_allclose(got, (raw_x - mean) / std, atol=2e-5)
        assert out.splits[split].rows == raw.splits[split].rows
    meta = table.schema.metadata
    assert meta[b"bnflow.norm_stats_version"].decode() == stats_file.version
    assert meta[b"bnflow.norm_config_hash"].decode() == stats.config_hash
    assert meta[b"bnflow.image_shape"] == b"1,28,28"


def test_per_feature_minmax_and_constant_features_centred(tmp_path, capsys):
    rng = np.random.default_rng(0)
    train = rng.normal(5, 2, size=(300, 4)).astype(np.float32)
    train[:, 2] = 7.0  # constant feature
    test = rng.normal(5, 2, size=(50, 4)).astype(np.float32)
    raw = _dataset(tmp_path, {"train": train, "val": train[:20], "test": test})
    out, sf = normalize(NormalizeConfig(method="standard", per="feature"), raw, tmp_path / "std", console=Console())
    printed = capsys.readouterr().out
    assert "constant feature(s)" in printed and "[2]" in printed  # said through the console it was given
    xn, _ = _x(out.splits["train"])
    assert np.all(xn[:, 2] == 0.0) and np.all(np.isfinite(xn))
    t64 = train.astype(np.float64)
    np.testing.assert_allclose(NormStats.load(sf.path).std, t64.std(axis=0), rtol=1e-12)

    out, sf = normalize(NormalizeConfig(method="minmax", per="feature"), raw, tmp_path / "mm")
    xn, _ = _x(out.splits["train"])
    assert xn[:, [0, 1, 3]].min() == pytest.approx(0, abs=1e-6) and xn[:, [0, 1, 3]].max() == pytest.approx(1, abs=1e-6)
    xt, _ = _x(out.splits["test"])
    lo, hi = t64.min(axis=0), t64.max(axis=0)
    np.testing.assert_allclose(xt[:, 0], (test[:, 0] - lo[0]) / (hi[0] - lo[0]), atol=1e-5)


def test_nonfinite_error_names_count_and_fix(tmp_path):
    x = np.random.default_rng(1).normal(size=(100, 3)).astype(np.float32)
    bad = x.copy()
    bad[[3, 10, 11], 1] = np.nan
    bad[20, 0] = np.inf
    raw = _dataset(tmp_path, {"train": x, "val": x[:10], "test": bad})
    with pytest.raises(DataError, match=r"features: 4 row\(s\) of split 'test' hold NaN or inf; .*normalize.nonfinite=drop"):
        normalize(NormalizeConfig(per="feature"), raw, tmp_path / "n")


def test_nonfinite_drop_counts_per_split(tmp_path):
    x = np.random.default_rng(2).normal(size=(100, 3)).astype(np.float32)
    bad = x.copy()
    bad[[0, 5], 2] = -np.inf
    raw = _dataset(tmp_path, {"train": bad, "val": x[:10], "test": bad[:50]})
    out, sf = normalize(NormalizeConfig(per="feature", nonfinite="drop"), raw, tmp_path / "n")
    assert out.splits["train"].rows == 98 and out.splits["test"].rows == 48 and out.splits["val"].rows == 10
    stats = NormStats.load(sf.path)
    assert stats.dropped_rows == {"train": 2, "test": 2}
    keep = np.delete(bad, [0, 5], axis=0).astype(np.float64)
    np.testing.assert_allclose(stats.mean, keep.mean(axis=0), rtol=1e-12)


def test_empty_split_and_schema_mismatch(tmp_path):
    x = np.ones((10, 3), dtype=np.float32)
    raw = _dataset(tmp_path / "a", {"train": x, "val": x[:0], "test": x})
    with pytest.raises(DataError, match="split 'val' has no usable rows"):
        normalize(NormalizeConfig(per="feature"), raw, tmp_path / "a" / "n")

    raw = _dataset(tmp_path / "b", {"train": x, "val": x, "test": x})
    test_dir = raw.splits["test"].path
    for f in list(__import__("pathlib").Path(test_dir).glob("*.parquet")):
        f.unlink()
    pq.write_table(pa.table({"features": pa.array([[1.0, 2.0, 3.0]], pa.list_(pa.float64(), 3)),
                             "target": pa.array([1])}), f"{test_dir}/part-00000.parquet")
    with pytest.raises(SchemaMismatch, match=r"split 'test'.*field 'features': type fixed_size_list<\w+: double>\[3\], expected "
                                             r"fixed_size_list<\w+: float>\[3\]; missing field 'label'.*unexpected field 'target'") as e:
        normalize(NormalizeConfig(per="feature"), raw, tmp_path / "b" / "n")
    # Checked from the file footers before any task runs: the original one-line error.
    assert type(e.value) is SchemaMismatch and "\n" not in str(e.value)


def test_unreadable_parquet_files_are_named(tmp_path):
    """Regression: a truncated Parquet file or another file named .parquet gave a pyarrow traceback."""
    x = np.ones((10, 3), dtype=np.float32)
    raw = _dataset(tmp_path, {"train": x, "val": x, "test": x})
    part = next(__import__("pathlib").Path(raw.splits["val"].path).glob("*.parquet"))
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    with pytest.raises(DataError, match=rf"{part}: not a readable Parquet file .*replace or remove it"):
        normalize(NormalizeConfig(per="feature"), raw, tmp_path / "n")
    part.write_text("label,features\n1,2\n")
    with pytest.raises(DataError, match=rf"{part}: not a readable Parquet file"):
        normalize(NormalizeConfig(per="feature"), raw, tmp_path / "n2")
