"""Corruptions: deterministic, in range, growing with severity; the splits ingest adds; the shift table's means."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from schemas.config import DataConfig, ShiftConfig
from tasks import shift
from tasks.evaluate import shift_metrics
from tasks.ingest import ingest


def _images():
    g = np.random.default_rng(0)
    x = np.zeros((6, 1, 28, 28))
    x[:, :, 6:22, 8:20] = g.uniform(0.4, 1.0, size=(6, 1, 16, 12))  # an object on a dark background
    return x


@pytest.mark.parametrize("corruption", [c for c in shift.CORRUPTIONS if c != "inverted"])
def test_every_corruption_is_seeded_in_range_and_grows_with_severity(corruption):
    x = _images()
    out = [shift.corrupt(x, corruption, s, seed=1) for s in shift.SEVERITIES]
    assert all(o.shape == x.shape and o.min() >= 0 and o.max() <= 1 for o in out)
    assert np.array_equal(out[2], shift.corrupt(x, corruption, 3, seed=1))  # a function of (seed, corruption, severity)
    dist = [float(np.abs(o - x).mean()) for o in out]
    assert dist[0] > 0 and dist[-1] > dist[0], dist  # severity 5 moves the images further than severity 1


def test_inverted_is_one_minus_x_and_unknown_names_are_refused():
    x = _images()
    assert np.array_equal(shift.corrupt(x, "inverted", 1, seed=0), 1 - x)
    with pytest.raises(ValueError, match="unknown corruption 'snow'"):
        shift.corrupt(x, "snow", 1, seed=0)
    assert shift.parse_split(shift.split_name("gaussian_noise", 4)) == ("gaussian_noise", 4)
    assert shift.parse_split("test") is None


def test_ingest_adds_one_split_per_corruption_and_severity_from_the_raw_test_images(tmp_path):
    cfg = DataConfig(source="digits", shift=ShiftConfig(corruptions=["brightness", "inverted"], severities=[2, 5], rows=50))
    ds = ingest(cfg, tmp_path, seed=0)
    assert set(ds.splits) == {"train", "val", "test", "shift-brightness-2", "shift-brightness-5", "shift-inverted-1"}
    from tasks import arrow_io

    test = pq.read_table(arrow_io.split_files(ds.split("test"))[0])
    inv = pq.read_table(arrow_io.split_files(ds.split("shift-inverted-1"))[0])
    assert inv.num_rows == 50
    # Raw pixel scale (digits: 0..16) and the same rows and labels as the clean test split.
    np.testing.assert_allclose(arrow_io.features_numpy(inv), 16 - arrow_io.features_numpy(test)[:50], atol=1e-5)
    assert np.array_equal(arrow_io.labels_numpy(inv), arrow_io.labels_numpy(test)[:50])


def test_shift_on_tabular_data_is_a_clear_error(tmp_path):
    from schemas.errors import DataError

    import pyarrow as pa
    import pyarrow.parquet as pq

    for split in ("train", "test"):
        (tmp_path / "src" / split).mkdir(parents=True)
        pq.write_table(pa.table({"a": [1.0, 2.0, 3.0, 4.0], "b": [0.0, 1.0, 0.0, 1.0], "label": [0, 1, 0, 1]}),
                       tmp_path / "src" / split / "p.parquet")
    cfg = DataConfig(source="parquet", path=str(tmp_path / "src"), num_classes=2, shift=ShiftConfig())
    with pytest.raises(DataError, match="data.shift: corruptions need image data"):
        ingest(cfg, tmp_path / "out", seed=0)


def test_shift_metrics_average_the_corruptions_and_keep_the_controls_apart():
    row = lambda c, s, a: {"corruption": c, "severity": s, "accuracy_trained": a, "accuracy_recalibrated": a,  # noqa: E731
                           "accuracy_adapted": a + 0.1}
    table = [row("clean", 0, 0.9), row("fog", 1, 0.5), row("fog", 5, 0.2), row("contrast", 5, 0.4), row("inverted", 1, 0.0)]
    m = shift_metrics(table)
    assert m["shift_accuracy_trained"] == pytest.approx((0.5 + 0.2 + 0.4) / 3)
    assert m["shift_accuracy_sev5_adapted"] == pytest.approx(0.4)
    assert m["shift_accuracy_inverted_trained"] == 0.0 and m["shift_accuracy_clean_adapted"] == pytest.approx(1.0)
