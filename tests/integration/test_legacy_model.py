"""A model registered by an earlier bnflow still loads, predicts and is scored by the champion gate.

The fixture (``tests/fixtures/legacy_model``) was logged with the code of the commit in its
``COMMIT`` file by ``tests/fixtures/make_legacy_model.py``: a pickle that names the served class by
that commit's module path. Regression test for the move of ``pipeline/served.py``: without a way to
find the class under its old name, every champion registered before the move became unloadable and
the gate failed every gated run.
"""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.tracking import registry, served
from schemas.config import GateConfig
from tasks.nn.models import MLP, NormalizedClassifier

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "legacy_model"
NAME = "legacy-champion"


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
    """(the unpacked model directory, what it answered when it was logged)."""
    root = tmp_path_factory.mktemp("legacy")
    with tarfile.open(FIXTURE / "model.tar.gz") as tar:
        tar.extractall(root, filter="data")
    return root / "model", json.loads((FIXTURE / "expected.json").read_text())


def test_a_model_logged_by_the_previous_main_loads_and_predicts_as_it_did(legacy, tmp_path):
    model_dir, expected = legacy
    script = (
        "import json, sys, numpy as np, pandas as pd, mlflow\n"
        "e = json.loads(sys.stdin.read())\n"
        f"m = mlflow.pyfunc.load_model({str(model_dir)!r})\n"
        "out = m.predict(pd.DataFrame(np.asarray(e['x'], dtype=np.float32), columns=e['feature_names']))\n"
        "print(json.dumps({'classes': out['predicted_class'].tolist(),"
        " 'probs': out[[f'probability.{c}' for c in e['class_names']]].to_numpy().tolist()}))\n")
    done = subprocess.run([sys.executable, "-c", script], input=json.dumps(expected), capture_output=True, text=True,
                          cwd=tmp_path, timeout=300, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["classes"] == expected["predicted_class"]
    np.testing.assert_allclose(got["probs"], expected["probabilities"], rtol=1e-6, atol=1e-7)


def test_a_gated_run_still_compares_against_a_legacy_champion(mlflow_server, legacy):
    model_dir, expected = legacy
    client = MlflowClient(mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    exp = client.get_experiment_by_name("legacy") or client.get_experiment(client.create_experiment("legacy"))
    run = client.create_run(exp.experiment_id, run_name="legacy-champion")
    client.log_artifacts(run.info.run_id, str(model_dir), "model")
    client.set_terminated(run.info.run_id)
    client.create_registered_model(NAME)
    champion = client.create_model_version(NAME, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    client.set_registered_model_alias(NAME, "champion", champion.version)

    x = np.asarray(expected["x"], dtype=np.float32)
    then = np.asarray(expected["predicted_class"])
    y = then.copy()
    y[::4] = (y[::4] + 1) % 3  # a quarter wrong: the champion's accuracy is known from what it answered then
    torch.manual_seed(3)
    candidate = NormalizedClassifier(MLP(4, 3, (8,), 1e-5, 0.1).eval(), np.zeros(4), np.ones(4), (4,)).eval()
    mlflow.set_experiment("legacy")
    with mlflow.start_run(run_name="candidate"):
        uri = served.log(candidate, "model_recalibrated", expected["class_names"], expected["feature_names"]).model_uri
    decision = registry.gate(client, NAME, "candidate-run", uri, x, y, GateConfig(), expected["feature_names"],
                             say=lambda _: None)
    assert decision.champion_version == champion.version
    assert decision.champion_accuracy == pytest.approx(float((then == y).mean()), abs=1e-12)
    with torch.no_grad():
        mine = candidate(torch.from_numpy(x)).argmax(1).numpy()
    assert decision.candidate_accuracy == pytest.approx(float((mine == y).mean()), abs=1e-12)
