"""The champion gate against a real MLflow server, and the registered pyfunc loaded and served the
way a user would: in a fresh process without Ray, and by ``mlflow models serve``."""

import json
import os
import subprocess
import sys
import urllib.request

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.tracking import registry, served
from schemas.config import GateConfig, ModelConfig
from tasks.nn.models import NormalizedClassifier, build_model
from tests.conftest import free_port, stop, wait_until_answers

NAME = "gate-digits"


@pytest.fixture(scope="module")
def digits():
    """Raw digits rows: the first 1200 to fit on, the rest as the 'test split' every gate scores."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = d.data.astype(np.float32), d.target.astype(np.int64)
    return (x[:1200], y[:1200]), (x[1200:], y[1200:])


def _model(digits, steps: int) -> NormalizedClassifier:
    """An MLP behind the raw rows' z-score, fitted for ``steps`` full-batch Adam steps (0: random)."""
    (x, y), _ = digits
    torch.manual_seed(0)
    net = build_model(ModelConfig(kind="mlp", hidden=(32,)), (64,), 10)
    shift, scale = x.mean(0), np.where(x.std(0) > 0, x.std(0), 1.0)
    model = NormalizedClassifier(net, shift, scale, (64,))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model.eval()


def _log(mlflow_server, model, run_name) -> str:
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_experiment("gate")
    with mlflow.start_run(run_name=run_name):
        return served.log(model, "model_recalibrated", [str(c) for c in range(10)]).model_uri


def _gate(mlflow_server, digits, model, run_id, cfg=GateConfig()):
    _, (x, y) = digits
    return registry.gate(MlflowClient(mlflow_server), NAME, run_id, _log(mlflow_server, model, run_id), x, y, cfg,
                         say=lambda _: None)


@pytest.fixture(scope="module")
def gated(mlflow_server, digits):
    """Three runs in order: a decent model, a worse one, a better one."""
    # This module leaves "gate" as the process's active MLflow experiment, on purpose: the pipeline
    # runs of the modules after it (test_reliability) must not depend on it. They once failed with
    # "active experiment ID does not match" when logging their models.
    return {run_id: _gate(mlflow_server, digits, _model(digits, steps), run_id)
            for run_id, steps in (("first", 30), ("worse", 3), ("better", 300))}


def test_a_first_model_becomes_champion_a_worse_one_does_not_a_better_one_does(mlflow_server, digits, gated):
    client = MlflowClient(mlflow_server)
    first, worse, better = gated["first"], gated["worse"], gated["better"]
    assert first.promoted and first.champion_version is None and first.reason.startswith("first model")
    assert not worse.promoted and worse.champion_version == first.version
    assert worse.candidate_accuracy < worse.champion_accuracy and "below tracking.gate.min_improvement" in worse.reason
    assert better.promoted and better.champion_version == first.version  # compared with the champion, not the worse one
    assert better.candidate_accuracy > better.champion_accuracy
    assert client.get_model_version_by_alias(NAME, "champion").version == better.version
    # the champion's score was measured now, on these rows: it is the first model's own score
    assert better.champion_accuracy == pytest.approx(first.candidate_accuracy, abs=1e-12)
    tags = client.get_model_version(NAME, worse.version).tags
    assert tags["bnflow.gate"] == "not promoted" and tags["bnflow.gate_reason"] == worse.reason
    # the candidate's score is its accuracy on the raw rows, recomputed here with the torch module
    _, (x, y) = digits
    model = _model(digits, 300)
    with torch.no_grad():
        expect = float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
    assert better.candidate_accuracy == pytest.approx(expect, abs=1e-12)


def test_a_rerun_of_a_run_id_reuses_its_version_and_decision(mlflow_server, digits, gated):
    client = MlflowClient(mlflow_server)
    versions = len(client.search_model_versions(f"name = '{NAME}'"))
    _, (x, y) = digits
    again = registry.gate(client, NAME, "worse", "runs:/unused/model", x, y, GateConfig(), say=lambda _: None)
    assert again == gated["worse"]
    assert len(client.search_model_versions(f"name = '{NAME}'")) == versions


def test_absolute_threshold_blocks_a_first_model():
    promoted, reason = registry.decide(0.8, None, None, GateConfig(min_accuracy=0.9))
    assert not promoted and "tracking.gate.min_accuracy=0.9" in reason
    assert registry.decide(0.905, 0.9, "3", GateConfig(min_improvement=0.01))[0] is False
    assert registry.decide(0.911, 0.9, "3", GateConfig(min_improvement=0.01))[0] is True


def test_the_champion_loads_in_a_fresh_process_without_ray(mlflow_server, digits, gated, tmp_path):
    _, (x, _) = digits
    script = (
        "import json, sys, numpy as np, mlflow\n"
        f"m = mlflow.pyfunc.load_model('models:/{NAME}@champion')\n"
        "out = m.predict(np.asarray(json.loads(sys.stdin.read()), dtype=np.float32))\n"
        "print(json.dumps({'ray': 'ray' in sys.modules, 'classes': out['predicted_class'].tolist(),"
        " 'sums': out.filter(like='probability.').sum(axis=1).tolist(),"
        " 'input': m.metadata.get_input_schema().to_dict(), 'example': m.metadata.saved_input_example_info is not None}))\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    done = subprocess.run([sys.executable, "-c", script], input=json.dumps(x[:5].tolist()), capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["ray"] is False and got["example"] is True
    assert got["input"][0]["type"] == "tensor" and got["input"][0]["tensor-spec"]["shape"] == [-1, 64]
    np.testing.assert_allclose(got["sums"], 1.0, rtol=1e-9)
    model = _model(digits, 300)
    with torch.no_grad():
        assert got["classes"] == model(torch.from_numpy(x[:5])).argmax(1).tolist()


def test_mlflow_models_serve_answers_with_probabilities(mlflow_server, digits, gated, tmp_path):
    _, (x, _) = digits
    port = free_port()
    # mlflow models serve execs `uvicorn` by name: the venv's bin, as an activated venv would have it
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server,
           "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@champion",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        wait_until_answers(f"http://127.0.0.1:{port}/ping", proc, tmp_path / "serve.log", timeout=180, poll_s=1)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps({"inputs": x[:3].tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
    finally:
        stop(proc)
    rows = answer["predictions"]
    assert len(rows) == 3
    for row in rows:
        probs = [row[f"probability.{c}"] for c in range(10)]
        assert sum(probs) == pytest.approx(1.0) and row["predicted_class"] == int(np.argmax(probs))


def test_an_outage_while_rescoring_the_champion_is_an_error_and_a_rerun_decides(tmp_path, digits, monkeypatch):
    """Regression (issue 21): any exception while rescoring the champion was recorded as a "not
    promoted" decision that every rerun then returned. Here the registry's server really goes away
    between the candidate's score and the champion's."""
    from tests.conftest import start_mlflow_server

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own minutes of retries, off for the test
    port = free_port()
    (tmp_path / "m").mkdir()
    server = start_mlflow_server(tmp_path / "m", port)
    uri = f"http://127.0.0.1:{port}"
    _, (x, y) = digits
    try:
        first = _gate(uri, digits, _model(digits, 30), "first")
        assert first.promoted
        candidate = _log(uri, _model(digits, 300), "second")

        def score_while_the_server_goes(model_uri, x, y, names):
            if model_uri.endswith("@champion"):
                stop(server)
            return registry.accuracy(model_uri, x, y, names)

        client = MlflowClient(uri)
        with pytest.raises(registry.RegistryUnavailable, match="rerun to decide"):
            registry.gate(client, NAME, "second", candidate, x, y, GateConfig(), say=lambda _: None,
                          score=score_while_the_server_goes)
        server = start_mlflow_server(tmp_path / "m", port)
        again = registry.gate(client, NAME, "second", candidate, x, y, GateConfig(), say=lambda _: None)
        assert again.promoted and again.champion_version == first.version
        assert again.champion_accuracy == pytest.approx(first.candidate_accuracy, abs=1e-12)
        assert len(client.search_model_versions(f"name = '{NAME}' and tags.`bnflow.run_id` = 'second'")) == 1
    finally:
        stop(server)
