"""The bad-input corpus, run as a user runs it: ``python -m pipeline run`` in a fresh process.

Every case ends with exit code 2 and ONE line on stderr naming the file or field and the fix, no
traceback anywhere in the output, no manifest for the stage that failed, and no MLflow run left
RUNNING. Cases found before Ray starts must answer fast.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _user_data(root: Path, kind: str) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        table = pa.table({"features": pa.array(rng.normal(size=(40, 4)).tolist()), "label": pa.array(np.arange(40) % 3)})
        pq.write_table(table, root / split / "p.parquet")
    part = root / "train" / "p.parquet"
    if kind == "truncated":
        part.write_bytes(part.read_bytes()[:200])
    elif kind == "not_parquet":
        part.write_text("features,label\n0.5,1\n")
    elif kind == "strings":
        pq.write_table(pa.table({"features": pa.array([["0.5", "1", "2", "3"]] * 40), "label": pa.array(np.arange(40) % 3)}), part)
    elif kind == "wider_test":
        pq.write_table(pa.table({"features": pa.array(rng.normal(size=(40, 5)).tolist()), "label": pa.array(np.arange(40) % 3)}),
                       root / "test" / "p.parquet")
    elif kind == "null_label":
        pq.write_table(pa.table({"features": pa.array(rng.normal(size=(40, 4)).tolist()),
                                 "label": pa.array([None] + list(np.arange(1, 40) % 3), pa.int64())}), part)
    return root


def _user_package(root: Path) -> Path:
    """A module of networks the way a user writes them, outside the checkout: ``Net`` is fine,
    ``Pooled`` forgets its classifier (returns (N, 16) features, not 10 logits)."""
    root.mkdir(parents=True)
    (root / "usernets.py").write_text(
        "import torch.nn as nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, in_features, num_classes, depth=1):\n"
        "        super().__init__()\n"
        "        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_features, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, num_classes))\n"
        "    def forward(self, x):\n"
        "        return self.body(x)\n"
        "class Pooled(nn.Module):\n"
        "    def __init__(self, in_features):\n"
        "        super().__init__()\n"
        "        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_features, 16), nn.BatchNorm1d(16))\n"
        "    def forward(self, x):\n"
        "        return self.body(x)\n")
    return root


def run_pipeline(tmp_path, *sets, run_id="bad", env=None):
    """`python -m pipeline run --recipe digits` in a fresh process with `sets` and `env` added;
    (the completed process, its seconds)."""
    args = [sys.executable, "-m", "pipeline", "run", "--recipe", "digits", "--run-id", run_id,
            "--set", f"storage={tmp_path / 'storage'}", "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    for s in sets:
        args += ["--set", s]
    t0 = time.time()
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, **(env or {})})
    return r, time.time() - t0


def _assert_clean_user_error(r, words: str, only_line: bool = True):
    """Exit 2, no traceback, one ``error:`` line with ``words``; with ``only_line`` nothing else on
    stderr (once Ray runs, Ray's own log lines share stderr: quieting them is another issue's)."""
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and words in errors[0], r.stderr[-3000:]
    if only_line:
        assert len(lines) == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stdout + r.stderr


def _no_running_runs(tmp_path):
    db = tmp_path / "mlflow.db"
    if not db.exists():
        return
    client = MlflowClient(f"sqlite:///{db}")
    exps = [e.experiment_id for e in client.search_experiments()]
    assert not [r for r in client.search_runs(exps) if r.info.status == "RUNNING"]


@pytest.mark.parametrize("case, sets, env, words", [
    ("run id with a separator", [], None, "use letters, digits"),
    ("unwritable storage", ["storage=/proc/bnflow"], None, "storage=/proc/bnflow: cannot write there"),
    ("unreachable tracking server", ["tracking.uri=http://127.0.0.1:{port}"], None,
     "tracking.uri=http://127.0.0.1:{port}: no MLflow server answers"),
    # Issue 21: was a KeyError traceback with exit 1.
    ("unknown tracking URI scheme", ["tracking.uri=foo://bar"], None, "tracking.uri=foo://bar: MLflow has no tracking store"),
    ("file store tracking URI", ["tracking.uri=./mlruns"], None,
     "tracking.uri=./mlruns: MLflow no longer accepts a file store; use a database, e.g. tracking.uri=sqlite:///"),
    ("unreachable Ray address", [], {"RAY_ADDRESS": "127.0.0.1:{port}"}, "RAY_ADDRESS=127.0.0.1:{port}: no Ray cluster answers"),
    ("truncated parquet", ["data.source=parquet", "data.path={data}", "data.num_classes=3"], None,
     "p.parquet: not a readable Parquet file"),
    ("non-parquet file named .parquet", ["data.source=parquet", "data.path={data}", "data.num_classes=3"], None,
     "p.parquet: not a readable Parquet file"),
    ("feature strings", ["data.source=parquet", "data.path={data}", "data.num_classes=3"], None,
     "holds string values, expected numbers; convert the features to float32"),
    # Issue 21: found from the Parquet footers (schemas, row-group statistics) before Ray starts.
    ("test split with more features", ["data.source=parquet", "data.path={data}"], None,
     "test/p.parquet has 5 features per row"),
    ("null label", ["data.source=parquet", "data.path={data}"], None, "data.label_column: 1 null label(s) in the train split"),
    ("num_classes the labels do not reach", ["data.source=parquet", "data.path={data}", "data.num_classes=10"], None,
     "data.num_classes=10 but the train labels use only 3 classes"),
    ("unknown optimizer knob", ["train.optimizer.beta1=0.5"], None, "not a setting of the sgd optimizer"),
    # Issue 22: the user's network, checked by building it and one forward before Ray starts.
    ("network module missing", ["train.model.class_path=nopkg.nets:Net"], None, "no module named 'nopkg'"),
    ("network class missing", ["train.model.class_path=usernets:Nett"], {"PYTHONPATH": "{user}"},
     "'usernets' has no attribute 'Nett'"),
    ("init_args the signature lacks", ["train.model.class_path=usernets:Net", "train.model.init_args={{depthh: 2}}"],
     {"PYTHONPATH": "{user}"}, "train.model.init_args do not fit usernets:Net"),
    ("network returns the wrong shape", ["train.model.class_path=usernets:Pooled"], {"PYTHONPATH": "{user}"},
     "it must return (N, num_classes=10) logits"),
    ("weights file missing", ["train.model.weights={user}/none.pt"], None, "train.model.weights="),
])
def test_fails_before_any_compute_with_one_line(tmp_path, case, sets, env, words):
    port = free_port()
    kind = {"truncated parquet": "truncated", "non-parquet file named .parquet": "not_parquet",
            "feature strings": "strings", "test split with more features": "wider_test", "null label": "null_label",
            "num_classes the labels do not reach": "good"}.get(case)
    data = _user_data(tmp_path / "user", kind) if kind else None
    fill = {"port": port, "data": data, "user": _user_package(tmp_path / "code")}
    sets = [s.format(**fill) for s in sets]
    env = {k: v.format(**fill) for k, v in (env or {}).items()}
    run_id = "../escape" if case == "run id with a separator" else "bad"
    r, seconds = run_pipeline(tmp_path, *sets, run_id=run_id, env=env)
    _assert_clean_user_error(r, words.format(**fill))
    assert seconds < 60  # before Ray and MLflow work: python start-up plus a check
    assert not (tmp_path / "escape").exists()
    assert not list((tmp_path / "storage").rglob("manifest.json")) if (tmp_path / "storage").exists() else True
    _no_running_runs(tmp_path)


def test_divergent_learning_rate_is_one_line_without_worker_tracebacks(tmp_path):
    r, _ = run_pipeline(tmp_path, "train.optimizer.lr=1e6", "train.epochs=3", "train.max_failures=2")
    _assert_clean_user_error(r, "training diverged; lower train.optimizer.lr or set train.grad_clip_norm", only_line=False)
    storage = tmp_path / "storage" / "bad"
    assert (storage / "normalize" / "manifest.json").exists()
    assert not (storage / "train").exists()  # the failed stage published nothing
    _no_running_runs(tmp_path)


def test_a_run_refused_after_ray_starts_leaves_nothing_behind(tmp_path):
    """Regression (issue 21): more workers than the cluster holds was refused after the parent run
    and the run directory were made, leaving a FAILED run and an empty directory."""
    r, _ = run_pipeline(tmp_path, "train.workers=8")
    _assert_clean_user_error(r, "train.workers=8", only_line=False)
    assert not (tmp_path / "storage" / "bad").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_adapt_in_a_fresh_directory_creates_no_store(tmp_path):
    """Regression (issue 21): ``adapt`` without --tracking-uri created an empty ./mlflow.db before
    saying that the model was not found."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    (tmp_path / "new").mkdir()
    r = subprocess.run([sys.executable, "-m", "pipeline", "adapt", "--model", "runs:/0123/model_recalibrated",
                        "--data", str(tmp_path / "new")], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    _assert_clean_user_error(r, "no such database, so no model to adapt")
    assert not (tmp_path / "mlflow.db").exists()
