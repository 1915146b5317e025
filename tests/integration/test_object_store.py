"""A parquet source in an S3-compatible object store (``data.path: s3://bucket/prefix``), against a
real server process (moto's standalone server on 127.0.0.1, the ``s3_server`` fixture): read as
from disk, end to end, and its failures as one line each before Ray starts. The endpoint and the
credentials reach bnflow only through the standard AWS variables."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from schemas.config import DataConfig
from tests.conftest import free_port, start_s3_server, stop
from tests.integration.test_bad_input import run_pipeline

BUCKET = "bnflow-data"


def _source(root, seed=0):
    """A digits-sized parquet source: train/ in three files (row groups of 100), test.parquet."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    (root / "train").mkdir(parents=True)
    for i, s in enumerate(range(0, 1400, 500)):
        pq.write_table(pa.table({"pixels": pa.array(list(x[s:min(s + 500, 1400)]), pa.list_(pa.float32())),
                                 "label": y[s:min(s + 500, 1400)]}), root / "train" / f"part-{i}.parquet", row_group_size=100)
    pq.write_table(pa.table({"pixels": pa.array(list(x[1400:]), pa.list_(pa.float32())), "label": y[1400:]}),
                   root / "test.parquet")
    return root


@pytest.fixture(scope="module")
def bucket(s3_server, tmp_path_factory):
    """The same source on disk and in the bucket; yields (local dir, its URI)."""
    import boto3

    local = _source(tmp_path_factory.mktemp("src") / "digits")
    s3 = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"], region_name=s3_server["AWS_DEFAULT_REGION"],
                      aws_access_key_id=s3_server["AWS_ACCESS_KEY_ID"], aws_secret_access_key=s3_server["AWS_SECRET_ACCESS_KEY"])
    s3.create_bucket(Bucket=BUCKET)
    for f in sorted(local.rglob("*.parquet")):
        s3.upload_file(str(f), BUCKET, f"digits/{f.relative_to(local)}")
    return local, f"s3://{BUCKET}/digits"


@pytest.fixture
def aws(s3_server, monkeypatch):
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    return s3_server


def _cfg(path):
    return DataConfig(source="parquet", path=str(path), features_column="pixels", image_shape=(1, 8, 8))


def test_a_source_in_a_bucket_ingests_exactly_as_from_disk(bucket, aws, tmp_path):
    from tasks.ingest import ingest
    from tasks.source import check_source, source_files, source_fingerprint

    local, uri = bucket
    files = source_files(_cfg(uri))
    assert files == [f"{uri}/train/part-{i}.parquet" for i in range(3)] + [f"{uri}/test.parquet"]
    assert source_files(_cfg(uri + "/")) == files  # a trailing slash names the same bucket and files
    assert check_source(_cfg(uri)) == check_source(_cfg(local))
    a = ingest(_cfg(local), tmp_path / "local", seed=3)
    b = ingest(_cfg(uri), tmp_path / "s3", seed=3)
    assert {k: v.digest for k, v in a.splits.items()} == {k: v.digest for k, v in b.splits.items()}
    assert a.splits["train"].rows + a.splits["val"].rows == 1400 and a.features_column == b.features_column == "pixels"
    # The fingerprint (what decides whether ingest's output is still current) sees an object rewritten.
    before = source_fingerprint(_cfg(uri))
    fs, inner = pafs.FileSystem.from_uri(f"{uri}/test.parquet")
    with fs.open_output_stream(inner) as out:
        out.write((local / "test.parquet").read_bytes())
    assert source_fingerprint(_cfg(uri)) != before


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_a_run_on_data_in_a_bucket_trains_the_weights_a_run_on_disk_trains(bucket, aws, tmp_path):
    """Two runs of the digits recipe, one reading its source from disk and one from the bucket:
    the trained weights are bitwise equal."""
    from pipeline.cli import main
    from schemas.artifacts import CheckpointState

    local, uri = bucket
    weights = []
    for name, path in (("disk", local), ("bucket", uri)):
        storage = tmp_path / name
        args = ["run", "--recipe", "digits", "--run-id", f"store-{name}", "--set", f"storage={storage}",
                "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "--set", "tracking.experiment=store",
                "--set", "train.epochs=2", "--set", "data.source=parquet", "--set", f"data.path={path}",
                "--set", "data.features_column=pixels", "--set", "data.image_shape=[1,8,8]"]
        assert main(args) == 0
        (checkpoint,) = storage.glob(f"store-{name}/train/checkpoint.pt")
        weights.append(CheckpointState.load(checkpoint).model)
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def _one_error_line(r, seconds, expected):
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stdout + r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], r.stderr
    assert seconds < 60  # before Ray starts


@pytest.mark.slow
@pytest.mark.parametrize("case", ["unreachable endpoint", "missing bucket", "missing prefix", "wrong credentials"])
def test_an_object_store_that_fails_is_one_line_before_ray_starts(bucket, s3_server, tmp_path, case):
    _, uri = bucket
    env = dict(s3_server)
    path, expected = uri, ""
    server = None
    if case == "unreachable endpoint":
        port = free_port()
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
        expected = f"data.path={uri}: the object store at http://127.0.0.1:{port} (AWS_ENDPOINT_URL) cannot be reached"
    elif case == "missing bucket":
        path = "s3://no-such-bucket/digits"
        expected = f"data.path={path}: bucket 'no-such-bucket' does not exist on the object store at"
    elif case == "missing prefix":
        path = f"s3://{BUCKET}/nothing-here"
        expected = f"data.path: {path} has no train/ directory or train.parquet file; put the train split there"
    else:
        port = free_port()
        server = start_s3_server(tmp_path, port, check_credentials=True)
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
        expected = "refused the credentials for bucket 'bnflow-data'; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    try:
        r, seconds = run_pipeline(tmp_path, "data.source=parquet", f"data.path={path}", "data.features_column=pixels", env=env)
    finally:
        if server is not None:
            stop(server)
    _one_error_line(r, seconds, expected)
