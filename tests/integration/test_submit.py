"""`pipeline submit` against a real `ray start --head` with token auth and a real MLflow server:
a slot runs once, its retries never start a second run, a user error in the job is exit code 2,
a missing or wrong token is one line, a network package that only the submitting machine has trains
on the cluster."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.tracking.runs import TAG_RUN_ID, TAG_STAGE
from tests.conftest import start_ray_head, stop_ray_head

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    token = secrets.token_hex(32)
    address, proc = start_ray_head(tmp_path_factory.mktemp("head"), token)
    yield address, token
    stop_ray_head(proc)


def _submit(address, *args, token=None, home=None, pythonpath=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    if token:
        env["RAY_AUTH_TOKEN"] = token
    if home:
        env["HOME"] = str(home)  # no ~/.ray/auth_token there
    proc = subprocess.run([sys.executable, "-m", "pipeline", "submit", "--address", address, "--recipe", "digits", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def _jobs(address, token):
    from ray.job_submission import JobSubmissionClient

    return {j.submission_id: j for j in JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"}).list_jobs()}


def test_a_slot_runs_once_and_its_retry_starts_nothing(head, mlflow_server, tmp_path):
    address, token = head
    common = ["--set", "train.epochs=2", "--set", "recalibrate.estimator=ema", "--set", f"storage={tmp_path}", "--set", f"tracking.uri={mlflow_server}",
              "--set", "tracking.experiment=submit", "--slot", "2026-11-24T02:00Z", "--schedule", "nightly"]
    code, out, err = _submit(address, *common, token=token)
    assert code == 0, out + err
    assert "submitted job bnflow-nightly-20261124T0200Z (run nightly-20261124T0200Z)" in out
    assert "[bnflow] stage 5/5 evaluate: done" in out  # the job's output, followed
    assert err == ""  # no Ray packaging chatter on the submitting side

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("submit")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_RUN_ID}` = 'nightly-20261124T0200Z'")
    parent = next(r for r in runs if r.data.tags[TAG_STAGE] == "pipeline")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["bnflow.slot"] == "2026-11-24T02:00Z" and parent.data.tags["bnflow.schedule"] == "nightly"
    assert parent.data.tags["mlflow.source.type"] == "JOB"
    head_commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    if head_commit:  # the job's copy of the code has no .git: the commit came from the submitting side
        assert parent.data.tags["mlflow.source.git.commit"] == head_commit
    assert mlflow_server not in _jobs(address, token)["bnflow-nightly-20261124T0200Z"].entrypoint  # env only

    before = set(_jobs(address, token))
    code, out, _ = _submit(address, *common, token=token)
    assert code == 0
    assert "already succeeded as job bnflow-nightly-20261124T0200Z" in out
    assert set(_jobs(address, token)) == before  # no second job
    assert len(client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_RUN_ID}` = 'nightly-20261124T0200Z'")) == 6


def test_a_user_error_in_the_job_exits_2_and_a_retry_takes_the_next_submission_id(head, mlflow_server, tmp_path):
    address, token = head
    common = ["--set", "train.workers=64", "--set", f"storage={tmp_path}", "--set", f"tracking.uri={mlflow_server}",
              "--set", "tracking.experiment=submit", "--slot", "2026-11-25T02:00Z", "--schedule", "nightly"]
    code, out, _ = _submit(address, *common, token=token)
    assert code == 2, out
    assert "error: train.workers=64" in out and "job bnflow-nightly-20261125T0200Z failed (exit code 2)" in out
    code, out, _ = _submit(address, *common, token=token)
    assert code == 2
    assert "submitted job bnflow-nightly-20261125T0200Z-r1" in out  # Ray refuses a reused submission id


def test_a_missing_or_wrong_token_is_one_line(head, tmp_path):
    address, _ = head
    code, out, err = _submit(address, token=None, home=tmp_path)
    assert code == 2 and out == ""
    assert err.strip() == (f"error: --address {address}: the cluster requires a Ray auth token and none was found; set "
                           "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (on the head: ray get-auth-token)")
    code, _, err = _submit(address, token="not-the-token")
    assert code == 2 and err.count("\n") == 1 and "refused this Ray auth token" in err


def test_the_scheduler_submits_the_due_slot_once_through_the_same_path(head, mlflow_server, tmp_path):
    import datetime as dt

    address, token = head
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}, "RAY_AUTH_TOKEN": token}
    cmd = [sys.executable, "-m", "pipeline", "schedule", "--address", address, "--recipe", "digits", "--schedule", "sched",
           "--cron", "*/5 * * * *", "--catchup", "latest", "--once", "--set", "train.workers=64",  # a job that ends at once
           "--set", f"storage={tmp_path}", "--set", f"tracking.uri={mlflow_server}", "--set", "tracking.experiment=submit"]
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stdout + first.stderr
    mine = {sid: j for sid, j in _jobs(address, token).items() if sid.startswith("bnflow-sched-")}
    assert len(mine) == 1
    (sid, job), = mine.items()
    slot = dt.datetime.strptime(job.metadata["bnflow.slot"], "%Y-%m-%dT%H:%MZ").replace(tzinfo=dt.timezone.utc)
    assert sid == f"bnflow-sched-{slot:%Y%m%dT%H%MZ}" and slot.minute % 5 == 0
    assert dt.timedelta(0) <= dt.datetime.now(dt.timezone.utc) - slot < dt.timedelta(minutes=10)
    assert f"submitted job {sid}" in first.stdout

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0
    if not again.stdout.count("submitted job"):  # unless a new 5-minute slot began in between
        assert {s for s in _jobs(address, token) if s.startswith("bnflow-sched-")} == {sid}


TINY_CNN = """
import torch
from torch import nn


class TinyCNN(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int = 8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.body(x))
"""


def test_a_network_package_only_the_submitting_machine_has_trains_on_the_cluster(head, mlflow_server, tmp_path):
    address, token = head
    name = f"userpkg_{secrets.token_hex(4)}"
    elsewhere = tmp_path / "elsewhere"  # beside nothing the cluster knows: not in the checkout, not installed
    (elsewhere / name).mkdir(parents=True)
    (elsewhere / name / "__init__.py").write_text("")
    (elsewhere / name / "nets.py").write_text(TINY_CNN)
    cluster_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # what the head was started with
    assert subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, env=cluster_env, capture_output=True).returncode != 0

    class_path = f"{name}.nets:TinyCNN"
    common = ["--set", "train.epochs=1", "--set", "recalibrate.estimator=ema", "--set", f"storage={tmp_path / 'runs'}",
              "--set", f"tracking.uri={mlflow_server}", "--set", "tracking.experiment=submit-code"]
    code, out, err = _submit(address, "--set", f"train.model.class_path={class_path}", *common, "--run-id", "usercode",
                             token=token, pythonpath=elsewhere)
    assert code == 0, out + err
    assert f"shipping {elsewhere / name} with the job (py_modules): train.model.class_path's package '{name}'" in out
    assert "submitted job bnflow-usercode (run usercode)" in out and "[bnflow] stage 5/5 evaluate: done" in out
    assert err == ""
    assert _jobs(address, token)["bnflow-usercode"].status == "SUCCEEDED"

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("submit-code")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_RUN_ID}` = 'usercode'")
    train = next(r for r in runs if r.data.tags[TAG_STAGE] == "train")
    assert train.info.status == "FINISHED"
    assert train.data.params["train.model.class_path"] == class_path

    before = set(_jobs(address, token))
    missing = f"nowhere_{secrets.token_hex(4)}"
    code, out, err = _submit(address, "--set", f"train.model.class_path={missing}.nets:TinyCNN", *common, "--run-id", "nocode",
                             token=token, pythonpath=elsewhere)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"error: train.model.class_path={missing}.nets:TinyCNN: no module named '{missing}'")
    assert set(_jobs(address, token)) == before  # nothing submitted
