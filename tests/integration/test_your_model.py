"""A user's own network, from a package outside the checkout, through every stage, as a user runs
it: `python -m pipeline run` from their own directory with the package on PYTHONPATH (embedded Ray),
tracked by a real MLflow server; then `pipeline adapt`, the champion gate, and the registered model
served in a fresh process where neither the package nor bnflow can be imported.

The network holds the BatchNorm flavours bnflow must handle exactly: a BatchNorm fused with its
activation (a subclass that calls ``super().forward``), a plain ``BatchNorm2d``, and a layer frozen
on purpose that is not a ``_BatchNorm`` (a look-alike of torchvision's ``FrozenBatchNorm2d``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from schemas.artifacts import CheckpointState
from tests.conftest import ROOT

pytestmark = pytest.mark.slow
PKG = "bnflow_userpkg_itest"
MODEL = "itest-user-net"

NETS = '''
import torch
from torch import nn


class BNReLU2d(nn.BatchNorm2d):
    """BatchNorm fused with its activation."""

    def forward(self, x):
        return torch.relu(super().forward(x))


class FrozenBN2d(nn.Module):
    """Fixed per-channel affine from stored statistics (as torchvision.ops.FrozenBatchNorm2d)."""

    def __init__(self, c):
        super().__init__()
        self.register_buffer("weight", torch.ones(c) * 1.5)
        self.register_buffer("bias", torch.zeros(c) + 0.25)
        self.register_buffer("running_mean", torch.zeros(c) + 0.1)
        self.register_buffer("running_var", torch.ones(c) * 2.0)

    def forward(self, x):
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        return x * scale[None, :, None, None] + (self.bias - self.running_mean * scale)[None, :, None, None]


class SmallNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), BNReLU2d(width),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), FrozenBN2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten())
        self.classifier = nn.Linear(2 * width * 16, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))
'''


def _cli(args: list[str], cwd: Path, pkg_dir: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m pipeline ...` as a user runs it: their directory, their package on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": str(pkg_dir)}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def user_run(mlflow_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    pkg_dir, work = root / "elsewhere", root / "work"
    (pkg_dir / PKG).mkdir(parents=True)
    work.mkdir()
    (pkg_dir / PKG / "__init__.py").write_text("")
    (pkg_dir / PKG / "nets.py").write_text(textwrap.dedent(NETS))
    run_id = "itest-user-net"
    r = _cli(["run", "--recipe", "digits", "--run-id", run_id, "--set", f"train.model.class_path={PKG}.nets:SmallNet",
              "--set", "train.epochs=4", "--set", f"tracking.uri={mlflow_server}", "--set", "tracking.experiment=itest-user",
              "--set", f"tracking.register_model={MODEL}"], work, pkg_dir)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {"root": root, "pkg_dir": pkg_dir, "work": work, "out": r.stdout, "run_dir": work / "runs" / run_id,
            "uri": mlflow_server}


def _state(user_run, stage: str) -> CheckpointState:
    return CheckpointState.load(user_run["run_dir"] / stage / "checkpoint.pt")


def test_the_users_network_trains_with_sync_bn_and_is_recorded_by_import_path(user_run):
    trained, recal = _state(user_run, "train"), _state(user_run, "recalibrate")
    assert trained.network.class_path == f"{PKG}.nets:SmallNet"
    assert trained.network.init_args == {"in_channels": 1, "num_classes": 10}
    assert trained.bn_mode == "sync" and trained.config["workers"] == 2
    # The fused layer and the plain BN layer were trained (statistics moved off 0/1) and recalibrated
    # (exact statistics differ from the running averages); the frozen look-alike kept its buffers.
    for key in ("features.1.running_mean", "features.6.running_mean"):
        assert not torch.equal(trained.model[key], torch.zeros_like(trained.model[key]))
        assert not torch.equal(trained.model[key], recal.model[key])
    for state in (trained, recal):
        assert torch.equal(state.model["features.3.running_mean"], torch.zeros(32) + 0.1)
        assert torch.equal(state.model["features.3.weight"], torch.ones(32) * 1.5)
    out = user_run["out"]
    assert "test accuracy after  BN recalibration" in out
    after = float(out.split("test accuracy after  BN recalibration: ")[1].split()[0])
    assert after >= 0.9, out[-2000:]


def test_the_summary_names_the_logged_model_and_it_is_the_champion(user_run):
    import mlflow

    line = next(l for l in user_run["out"].splitlines() if l.strip().startswith("model: "))
    uri = line.split("model: ")[1].split()[0]
    assert uri.startswith("models:/m-")
    client = mlflow.MlflowClient(user_run["uri"])
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.source.endswith(uri.split("/")[-1]) or champion.run_id


def test_the_registered_model_serves_without_the_package_or_bnflow(user_run, tmp_path):
    """A fresh process that cannot import the user's package, tasks, schemas or pipeline loads the
    champion with mlflow.pyfunc and predicts what the checkpoint's network predicts."""
    sys.path.insert(0, str(user_run["pkg_dir"]))
    try:
        from tasks.nn.models import served_model

        module = served_model(_state(user_run, "recalibrate"))
    finally:
        sys.path.remove(str(user_run["pkg_dir"]))
    from sklearn.datasets import load_digits

    x = load_digits().data[:16].astype(np.float32)
    with torch.no_grad():
        expected = torch.softmax(module(torch.from_numpy(x)).double(), 1).numpy()
    np.save(tmp_path / "x.npy", x)
    child = textwrap.dedent(f"""
        import sys
        for name in ("tasks", "schemas", "pipeline", "{PKG}"):
            sys.modules[name] = None  # import raises ModuleNotFoundError
        sys.path = [p for p in sys.path if p not in ("", "{ROOT}", "{user_run['pkg_dir']}")]
        import json, mlflow, numpy as np
        mlflow.set_tracking_uri("{user_run['uri']}")
        out = mlflow.pyfunc.load_model("models:/{MODEL}@champion").predict(np.load("{tmp_path / 'x.npy'}"))
        print(json.dumps(out[[c for c in out.columns if c.startswith("probability.")]].to_numpy().tolist()))
    """)
    r = subprocess.run([sys.executable, "-c", child], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stderr[-3000:]
    got = np.array(json.loads(r.stdout.strip().splitlines()[-1]))
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_adapt_reestimates_the_users_network_on_its_own_column(user_run, tmp_path):
    """`pipeline adapt` rebuilds the user's network (its package on PYTHONPATH) and re-estimates
    its BatchNorm statistics on unlabeled rows; the frozen look-alike stays as it was."""
    from sklearn.datasets import load_digits

    x = np.clip(load_digits().data + 6.0, 0, 16).astype(np.float32)
    (tmp_path / "new").mkdir()
    pq.write_table(pa.table({"features": pa.array(list(x[:600]))}), tmp_path / "new" / "a.parquet")
    r = _cli(["adapt", "--model", f"models:/{MODEL}@champion", "--data", str(tmp_path / "new"),
              "--tracking-uri", user_run["uri"], "--rows", "500"], user_run["work"], user_run["pkg_dir"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "MLflow run: " in r.stdout
