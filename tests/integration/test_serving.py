"""A logged model serves where neither bnflow nor the user's package can be imported.

The network comes from a package written at test time (``userpkg``, a BatchNorm conv net), as a
user's does through ``train.model.class_path``. The model is logged to the session's real MLflow
server and registered with the alias ``champion``; then (1) ``mlflow.pyfunc.load_model`` in a fresh
process that cannot import ``pipeline``, ``tasks``, ``schemas`` or ``userpkg``, and (2) ``mlflow
models serve`` started as the README says, from a shell whose PATH lacks the virtualenv, answer
what the module answers in this process.
"""

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from pipeline.tracking import served
from tasks.nn.models import NormalizedClassifier
from tests.conftest import ROOT, free_port, wait_until_answers

NAME = "serving-test"
SHAPE = (1, 6, 6)
CLASSES = ["low", "mid", "high"]
HIDDEN = ("pipeline", "tasks", "schemas", "userpkg")  # what the serving side must not need

USERPKG = '''
import torch
from torch import nn


class TinyConv(nn.Module):
    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(2))
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(torch.flatten(self.body(x), 1))
'''


@pytest.fixture(scope="module")
def logged(mlflow_server, tmp_path_factory):
    """(the registered model's URI, the module, rows to score, the module's probabilities)."""
    pkg_root = tmp_path_factory.mktemp("user")
    (pkg_root / "userpkg").mkdir()
    (pkg_root / "userpkg" / "__init__.py").write_text("")
    (pkg_root / "userpkg" / "nets.py").write_text(USERPKG)
    sys.path.insert(0, str(pkg_root))
    try:
        from userpkg.nets import TinyConv

        torch.manual_seed(0)
        net = TinyConv(1, len(CLASSES))
        net.train()
        with torch.no_grad():
            for _ in range(3):
                net(torch.randn(16, *SHAPE) * 2.0 + 1.0)  # running statistics that are not the initial 0/1
        module = NormalizedClassifier(net.eval(), np.full(36, 0.5), np.full(36, 2.0), SHAPE).eval()
        mlflow.set_tracking_uri(mlflow_server)
        client = mlflow.MlflowClient()
        exp = client.get_experiment_by_name("serving") or client.get_experiment(client.create_experiment("serving"))
        run = client.create_run(exp.experiment_id, run_name="serving")
        info = served.log(module, "model_recalibrated", CLASSES, run_id=run.info.run_id, registered_model_name=NAME)
        client.set_terminated(run.info.run_id)
        client.set_registered_model_alias(NAME, "champion", info.registered_model_version)
    finally:
        sys.path.remove(str(pkg_root))
        for m in [m for m in sys.modules if m == "userpkg" or m.startswith("userpkg.")]:
            del sys.modules[m]
    x = np.random.default_rng(0).normal(size=(5, 36)).astype(np.float32) * 2.0
    with torch.no_grad():
        probs = torch.softmax(module(torch.from_numpy(x)).double(), dim=1).numpy()
    return f"models:/{NAME}@champion", x, probs


def test_the_pyfunc_predicts_in_a_process_without_bnflow_or_the_users_package(logged, mlflow_server, tmp_path):
    uri, x, probs = logged
    script = (
        "import json, sys\n"
        f"for name in {HIDDEN!r}:\n"
        "    sys.modules[name] = None  # import NAME now raises ImportError\n"
        f"sys.path = [p for p in sys.path if p not in ('', {str(ROOT)!r})]\n"
        "import numpy as np, mlflow\n"
        "x = np.asarray(json.loads(sys.stdin.read()), dtype=np.float32)\n"
        f"m = mlflow.pyfunc.load_model({uri!r})\n"
        "assert not any(n in sys.modules and sys.modules[n] is not None for n in " + repr(HIDDEN) + ")\n"
        "out = m.predict(x)\n"
        f"print(json.dumps(out[[f'probability.{{c}}' for c in {CLASSES!r}]].to_numpy().tolist()))\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([sys.executable, "-c", script], input=json.dumps(x.tolist()), capture_output=True, text=True,
                          cwd=tmp_path, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    np.testing.assert_allclose(json.loads(done.stdout.strip().splitlines()[-1]), probs, rtol=0, atol=1e-6)


def test_mlflow_models_serve_answers_a_rest_request_as_the_readme_shows(logged, mlflow_server, tmp_path):
    """The README's command: ``PATH="$PWD/.venv/bin:$PATH" .venv/bin/mlflow models serve ...``.
    MLflow starts the scoring server as ``uvicorn`` looked up on PATH; here PATH lacks the
    virtualenv, as in a shell where it is not activated, and a PYTHONPATH of stand-ins that raise
    on import keeps bnflow and the user's package out of the server."""
    uri, x, probs = logged
    venv_bin = Path(sys.executable).parent
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p and Path(p) != venv_bin)
    stand_ins = tmp_path / "hidden"
    for name in HIDDEN:
        (stand_ins / name).mkdir(parents=True)
        (stand_ins / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed where the model serves')\n")
    port = free_port()
    env = {**os.environ, "PATH": path, "PYTHONPATH": str(stand_ins), "MLFLOW_TRACKING_URI": mlflow_server,
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    command = (f'PATH="{venv_bin}:$PATH" {venv_bin / "mlflow"} models serve -m {uri} --env-manager local '
               f"-h 127.0.0.1 -p {port}")
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(["bash", "-c", command], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_until_answers(f"http://127.0.0.1:{port}/ping", proc, tmp_path / "serve.log", timeout=180)
        body = json.dumps({"inputs": x.tolist()}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=60).read())
    finally:
        try:
            os.killpg(proc.pid, 15)  # the shell's session: the mlflow CLI and the uvicorn it started
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()
    rows = answer["predictions"]
    assert [r["predicted_class"] for r in rows] == probs.argmax(1).tolist()
    assert [r["predicted_name"] for r in rows] == [CLASSES[i] for i in probs.argmax(1)]
    np.testing.assert_allclose([[r[f"probability.{c}"] for c in CLASSES] for r in rows], probs, rtol=0, atol=1e-6)
    assert "is not installed where the model serves" not in (tmp_path / "serve.log").read_text()
