"""What `pipeline submit` sends, and what it refuses, without a cluster; slots and their run ids."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from pipeline import recipes
from pipeline.jobs import slots, submit
from schemas.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _plan(address, *overrides, recipe="digits"):
    cfg = recipes.load(recipe, list(overrides))
    return submit.plan(cfg, recipe, list(overrides), address)


def test_credentials_and_tracking_uri_travel_as_env_never_as_arguments(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    args, env = _plan("http://head:8265", "tracking.uri=http://alice:s3cret@mlflow:5000", "storage=/shared/runs",
                      "train.epochs=3")
    assert "s3cret" not in " ".join(args) and "mlflow:5000" not in " ".join(args)
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]) == ("alice", "s3cret")
    assert args == ["--recipe", "digits", "--set", "train.epochs=3", "--set", "storage=/shared/runs"]


def test_a_cluster_of_other_machines_gets_no_local_store_and_no_relative_storage():
    with pytest.raises(ConfigError, match=r"^tracking.uri=sqlite:.*not reachable from the cluster's nodes"):
        _plan("http://head:8265", "tracking.uri=sqlite:///mlflow.db", "storage=/shared/runs")
    with pytest.raises(ConfigError, match=r"^storage=runs: a relative path would land in the job's temporary"):
        _plan("http://head:8265", "tracking.uri=http://mlflow:5000", "storage=runs")


def test_a_local_head_gets_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args, env = _plan("http://127.0.0.1:8265", "storage=runs")
    assert env["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert args[-2:] == ["--set", f"storage={tmp_path / 'runs'}"]


def test_a_recipe_file_must_travel_with_the_job(tmp_path):
    outside = tmp_path / "mine.yaml"
    shutil.copy(ROOT / "pipeline" / "recipes" / "digits.yaml", outside)
    with pytest.raises(ConfigError, match=r"^--recipe .*mine.yaml: only files inside"):
        _plan("http://127.0.0.1:8265", recipe=str(outside))
    args, _ = _plan("http://127.0.0.1:8265", recipe=str(ROOT / "pipeline" / "recipes" / "digits.yaml"))
    assert args[:2] == ["--recipe", "pipeline/recipes/digits.yaml"]  # relative to the job's working dir


def test_the_address_is_the_dashboard():
    with pytest.raises(ConfigError, match=r"^--address ray://head:10001: jobs are submitted to the Ray dashboard's http"):
        submit.dashboard_address("ray://head:10001")
    assert submit.dashboard_address("http://head:8265/") == "http://head:8265"


def test_submission_ids_are_a_function_of_the_run_id():
    ids = submit.submission_ids("nightly-20261124T0200Z")
    assert [next(ids) for _ in range(3)] == ["bnflow-nightly-20261124T0200Z", "bnflow-nightly-20261124T0200Z-r1",
                                             "bnflow-nightly-20261124T0200Z-r2"]


def test_a_token_is_found_where_rays_clients_look(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert submit.token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert submit.token() == "from-home"
    (tmp_path / "t").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert submit.token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert submit.token() == "from-env"


@pytest.mark.parametrize("text, run_id", [("2026-11-24T02:00Z", "n-20261124T0200Z"),
                                          ("2026-11-24T03:00+01:00", "n-20261124T0200Z"),
                                          ("2026-11-24 02:00:00+00:00", "n-20261124T0200Z")])
def test_one_instant_is_one_run_id(text, run_id):
    assert slots.slot_run_id("n", slots.parse_slot(text)) == run_id


@pytest.mark.parametrize("text, message", [("2026-11-24T02:00", "give the time zone"), ("tomorrow", "not an ISO 8601 time"),
                                           ("2026-11-24T02:00:30Z", "slots are whole minutes")])
def test_an_ambiguous_slot_is_refused(text, message):
    with pytest.raises(ConfigError, match=message):
        slots.parse_slot(text)


def test_the_job_leaves_environments_outputs_and_local_stores_behind(tmp_path):
    """The files Ray would upload as the job's working_dir, with this checkout's ignore files."""
    from ray._private.runtime_env.packaging import _dir_travel, get_excludes_from_ignore_files

    for name in (".gitignore", ".rayignore"):
        shutil.copy(ROOT / name, tmp_path / name)
    for f in (".venv/bin/python", "runs/r1/train/checkpoint.pt", "mlflow.db", "mlartifacts/1/a", "bnflow.egg-info/PKG-INFO",
              "pipeline/cli.py", "pipeline/recipes/digits.yaml"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("x")
    uploaded = []
    excludes = get_excludes_from_ignore_files(tmp_path, include_gitignore=True, logger=logging.getLogger("test"))
    _dir_travel(tmp_path, excludes, lambda p: p.is_file() and uploaded.append(str(p.relative_to(tmp_path))),
                include_gitignore=True, logger=logging.getLogger("test"))
    uploaded = [f for f in uploaded if f not in (".gitignore", ".rayignore")]  # Ray leaves these out itself
    assert sorted(uploaded) == ["pipeline/cli.py", "pipeline/recipes/digits.yaml"]
