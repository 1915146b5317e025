"""Nothing lost, nothing corrupted: a killed driver, a killed worker, Ctrl-C and SIGTERM, a tracking
server that restarts, credentials in the tracking URI, and a second owner of a run id. Every run is
the real pipeline on digits, on a real Ray and a real MLflow server; final weights are compared
bitwise with an uninterrupted run of the same config."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.lease import Lease
from pipeline.tracking.runs import TAG_RUN_ID, TAG_STAGE
from schemas.artifacts import CheckpointState
from tests.conftest import ROOT, free_port, start_cli, start_mlflow_server, stop, wait_for_line

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]
EPOCHS = 8  # a digits epoch takes ~0.2 s: enough of them that a run is still training when killed


def _args(run_id, storage, uri, *extra, epochs=EPOCHS):
    return ["run", "--recipe", "digits", "--run-id", run_id, "--set", f"storage={storage}",
            "--set", f"tracking.uri={uri}", "--set", "tracking.experiment=reliability",
            "--set", f"train.epochs={epochs}",
            # Training's reliability is under test here; the recalibrate stage's workers (a second
            # Ray Train worker group, ~10 s each time) are tested in test_pipeline and test_console.
            "--set", "recalibrate.estimator=ema", *extra]


def _runs(uri, run_id):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("reliability")
    return {r.info.run_id: r for r in client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_RUN_ID}` = '{run_id}'")}


def _by_stage(uri, run_id):
    runs = list(_runs(uri, run_id).values())
    stages = [r.data.tags[TAG_STAGE] for r in runs]
    assert len(stages) == len(set(stages)), f"duplicated runs: {stages}"
    return {r.data.tags[TAG_STAGE]: r for r in runs}


def _weights(storage, run_id):
    return CheckpointState.load(Path(storage) / run_id / "train" / "checkpoint.pt").model


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _steps(uri, child_id, key="train_loss"):
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(child_id, key))


@pytest.fixture(scope="module")
def reference(mlflow_server, tmp_path_factory):
    """One uninterrupted run: the weights every interrupted run must end with."""
    storage = tmp_path_factory.mktemp("ref")
    assert main(_args("rel-ref", storage, mlflow_server)) == 0
    return _weights(storage, "rel-ref")


def _leftovers(marker: str) -> list[str]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(p.info["cmdline"] or []):
                out.append(" ".join(p.info["cmdline"])[:120])
        except psutil.Error:
            pass
    return out


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback


def _workers(root: int) -> list[psutil.Process]:
    """The Ray Train worker processes under ``root``."""
    out = []
    for p in psutil.Process(root).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def _listening(root: int) -> list[tuple[str, str, int]]:
    """(process, address, port) of every listening TCP socket of ``root`` and its descendants."""
    out = []
    procs = [psutil.Process(root)]
    procs += procs[0].children(recursive=True)
    for p in procs:
        try:
            title = " ".join(p.cmdline())[:60]
            out += [(title, c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="tcp")
                    if c.status == psutil.CONN_LISTEN]
        except psutil.Error:  # a process that ended between the listing and the look
            pass
    return out


def test_killed_driver_resumes_from_its_last_epoch(reference, mlflow_server, tmp_path, capsys):
    """Also where the sockets are checked: during training, every socket the embedded run listens on
    (Ray's, gloo's and the DDP rendezvous store, which torch would bind to all interfaces) is on
    loopback."""
    storage = tmp_path / "s"
    args = _args("rel-kill", storage, mlflow_server)
    shm_before = set(os.listdir("/dev/shm"))
    ray_tmp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    proc = start_cli(args, ray_tmp)
    wait_for_line(proc, "train epoch 1/")
    # Epochs are fractions of a second: hold the workers still so that the driver dies mid-training
    # and not after a finished stage; they go on once it is dead and must then end by themselves.
    frozen = _workers(proc.pid)
    for p in frozen:
        p.suspend()
    listening = _listening(proc.pid)
    proc.kill()  # SIGKILL: no cleanup of any kind
    proc.wait()
    for p in frozen:
        try:
            p.resume()
        except psutil.NoSuchProcess:
            pass
    deadline = time.time() + 60
    while _leftovers(ray_tmp) and time.time() < deadline:
        time.sleep(1)
    assert _leftovers(ray_tmp) == []  # no Ray process of the killed driver survives
    assert not (storage / "rel-kill" / "train").exists()  # only the .partial work directory
    assert frozen and [s for s in listening if "RayTrainWorker" in s[0]], listening  # the workers were looked at
    assert [s for s in listening if not _loopback(s[1])] == []

    assert main(args) == 0
    out = capsys.readouterr().out
    assert "ingest: complete" in out and "normalize: complete" in out
    _assert_same_weights(_weights(storage, "rel-kill"), reference)
    stages = _by_stage(mlflow_server, "rel-kill")
    assert stages["pipeline"].info.status == "FINISHED"
    assert all(r.info.status == "FINISHED" for r in stages.values())
    assert _steps(mlflow_server, stages["train"].info.run_id) == list(range(1, EPOCHS + 1))  # no step twice
    assert not [f for f in set(os.listdir("/dev/shm")) - shm_before if f.startswith("psm_")]


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_marks_runs_killed_and_says_how_to_resume(mlflow_server, tmp_path, sig, code):
    run_id = f"rel-sig{code}"
    proc = start_cli(_args(run_id, tmp_path / "s", mlflow_server, epochs=30), tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    wait_for_line(proc, "train epoch 1/")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code
    assert err.strip().splitlines()[-1] == f"interrupted; resume with --run-id {run_id}"
    stages = _by_stage(mlflow_server, run_id)
    assert stages["pipeline"].info.status == "KILLED" and stages["train"].info.status == "KILLED"
    logged = _steps(mlflow_server, stages["train"].info.run_id)
    time.sleep(3)
    assert _steps(mlflow_server, stages["train"].info.run_id) == logged  # nothing logged after KILLED
    assert len(logged) < 30


def test_killed_worker_is_restarted_from_the_last_epoch(reference, mlflow_server, tmp_path):
    storage = tmp_path / "s"
    ckpts = storage / "rel-worker" / "train.partial" / "ray_train"
    killed = []

    def kill_one_worker():
        deadline = time.time() + 240
        while time.time() < deadline and not list(ckpts.glob("checkpoint_*")):
            time.sleep(0.05)
        for p in psutil.process_iter(["cmdline"]):
            if "RayTrainWorker" in " ".join(p.info["cmdline"] or []):
                p.kill()
                killed.append(p.pid)
                return

    t = threading.Thread(target=kill_one_worker)
    t.start()
    assert main(_args("rel-worker", storage, mlflow_server)) == 0
    t.join()
    assert killed, "no training worker was found to kill"
    _assert_same_weights(_weights(storage, "rel-worker"), reference)
    stages = _by_stage(mlflow_server, "rel-worker")
    assert _steps(mlflow_server, stages["train"].info.run_id) == list(range(1, EPOCHS + 1))


def test_tracking_outage_mid_training_loses_no_metric_and_no_secret(tmp_path, capsys):
    port = free_port()
    (tmp_path / "mlflow").mkdir()
    server = start_mlflow_server(tmp_path / "mlflow", port)
    uri = f"http://127.0.0.1:{port}"
    secret = "s3cr3t-pw"
    storage = tmp_path / "s"
    epochs = 40  # several seconds of training: the outage lands mid-training
    partial = storage / "rel-outage" / "train.partial" / "ray_train"
    state = {}

    def outage():
        nonlocal server
        deadline = time.time() + 240
        while time.time() < deadline and not list(partial.glob("checkpoint_*")):
            time.sleep(0.05)
        stop(server)
        state["mid_training"] = not (storage / "rel-outage" / "train").exists()
        time.sleep(4)
        server = start_mlflow_server(tmp_path / "mlflow", port)

    t = threading.Thread(target=outage)
    t.start()
    try:
        rc = main(_args("rel-outage", storage, f"http://bnuser:{secret}@127.0.0.1:{port}", epochs=epochs))
        t.join()
        assert rc == 0 and state["mid_training"]
        stages = _by_stage(uri, "rel-outage")
        assert _steps(uri, stages["train"].info.run_id) == list(range(1, epochs + 1))
        assert _steps(uri, stages["train"].info.run_id, "val_loss") == list(range(1, epochs + 1))

        printed = capsys.readouterr()
        assert secret not in printed.out + printed.err
        client = MlflowClient(uri)
        for run in stages.values():
            values = list(run.data.params.values()) + list(run.data.tags.values())
            assert not [v for v in values if secret in v], run.data.tags[TAG_STAGE]
            local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "dl" / run.info.run_id)))
            for f in local.rglob("*"):
                if f.is_file():
                    assert secret.encode() not in f.read_bytes(), f
        assert stages["pipeline"].data.params["tracking.uri"] == uri
        for f in storage.rglob("*"):
            if f.is_file() and f.stat().st_size < 5_000_000:
                assert secret.encode() not in f.read_bytes(), f
    finally:
        t.join()
        stop(server)


def test_a_run_id_in_use_is_refused_in_one_line(mlflow_server, tmp_path):
    storage = tmp_path / "s"
    (storage / "rel-held").mkdir(parents=True)
    with Lease(storage / "rel-held", "rel-held").acquire():
        r = subprocess.run([sys.executable, "-m", "pipeline", *_args("rel-held", storage, mlflow_server)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"in use by host {os.uname().nodename} pid {os.getpid()}" in lines[0]
    assert "--wait-for-lock" in lines[0]
    assert sorted(p.name for p in (storage / "rel-held").iterdir()) == []  # nothing written, lease released
