"""What `pipeline submit` sends, and what it refuses, without a cluster; slots and their run ids."""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path

import pytest

from pipeline import recipes
from pipeline.jobs import slots, submit
from schemas.errors import ConfigError, ModelError

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


TINY_CNN = '''
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
'''


def _package(parent: Path, name: str) -> Path:
    (parent / name).mkdir(parents=True)
    (parent / name / "__init__.py").write_text("")
    (parent / name / "nets.py").write_text(TINY_CNN)
    return parent / name


def _place(package_dir: Path, checkout: Path):
    return submit.place_code(f"{package_dir.stem}.nets:TinyCNN", package_dir.stem, package_dir, checkout, submit.install_dirs())


def test_where_the_networks_code_lives_decides_how_the_job_gets_it(tmp_path):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "pyproject.toml").write_text("")

    inside = _place(_package(checkout, "inside"), checkout)
    assert (inside.how, inside.line()) == ("working_dir", None)  # the job's copy of the checkout carries it

    beside = _place(_package(tmp_path, "beside"), checkout)
    assert (beside.how, beside.path) == ("py_modules", tmp_path / "beside")
    assert beside.line() == (f"shipping {tmp_path / 'beside'} with the job (py_modules): train.model.class_path's package "
                             f"'beside' is outside the checkout {checkout}")

    single = tmp_path / "single.py"
    single.write_text(TINY_CNN)
    single = _place(single, checkout)
    assert single.how == "py_modules" and single.line().startswith(f"shipping {tmp_path / 'single.py'} (as package 'single')")

    package, path = submit.find_code("torch.nn:BatchNorm2d")
    torch_code = submit.place_code("torch.nn:BatchNorm2d", package, path, checkout, submit.install_dirs())
    assert (torch_code.how, torch_code.package) == ("installed", "torch")
    assert torch_code.line().startswith("note: train.model.class_path's package 'torch' is installed here (torch ")
    assert torch_code.line().endswith("the cluster's Python must have it too (it is not shipped with the job)")


def test_code_the_working_dir_does_not_carry_is_shipped(tmp_path):
    """In the checkout is not enough: the job imports from the working_dir's root, and Ray's upload
    of it leaves out what .gitignore, .rayignore and its default excludes name."""
    checkout = tmp_path / "checkout"
    (checkout / "examples").mkdir(parents=True)
    deeper = _place(_package(checkout / "examples", "deeper"), checkout)
    assert deeper.how == "py_modules" and "imported from" in deeper.why

    (checkout / ".gitignore").write_text("ignored/\n")
    ignored = _place(_package(checkout, "ignored"), checkout)
    assert ignored.how == "py_modules"
    assert ignored.why == "in the checkout, but its .gitignore/.rayignore leave ignored/__init__.py out of the job's working_dir"

    (checkout / ".rayignore").write_text("partly/nets.py\n")
    assert _place(_package(checkout, "partly"), checkout).how == "py_modules"  # one file short is not the network

    in_venv = _package(checkout / "venv", "lib")  # Ray's default excludes: .git, .venv, venv, __pycache__
    assert submit.left_out_of_upload(in_venv, checkout) == in_venv / "__init__.py"


def test_a_compiled_module_outside_the_checkout_cannot_travel(tmp_path):
    with pytest.raises(ModelError, match=r"^train.model.class_path=fast:Net: 'fast' is a compiled module .*fast.so\) that is "
                                         r"not installed; Ray ships only directories and .py files"):
        submit.place_code("fast:Net", "fast", tmp_path / "fast.so", ROOT, submit.install_dirs())


def test_the_runtime_env_of_a_recipe_naming_a_package_outside_the_checkout(tmp_path, monkeypatch):
    name = f"userpkg_{uuid.uuid4().hex[:8]}"
    elsewhere = tmp_path / "elsewhere"
    pkg = _package(elsewhere, name)
    monkeypatch.syspath_prepend(str(elsewhere))  # as PYTHONPATH would
    cfg = recipes.load("digits", [f"train.model.class_path={name}.nets:TinyCNN"])
    code = submit.user_code(cfg)
    assert (code.how, code.package, code.path) == ("py_modules", name, pkg.resolve())
    runtime_env = submit.job_runtime_env({"MLFLOW_TRACKING_URI": "http://mlflow:5000"}, code, tmp_path / "staging")
    assert runtime_env == {"env_vars": {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}, "working_dir": str(ROOT),
                           "py_modules": [str(pkg.resolve())]}

    assert submit.user_code(recipes.load("digits", [])) is None  # a built-in: nothing to import or ship


def test_a_single_module_file_travels_as_a_package_of_its_name(tmp_path, monkeypatch):
    name = f"usermod_{uuid.uuid4().hex[:8]}"
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / f"{name}.py").write_text(TINY_CNN)
    monkeypatch.syspath_prepend(str(tmp_path / "elsewhere"))
    code = submit.user_code(recipes.load("digits", [f"train.model.class_path={name}:TinyCNN"]))
    (tmp_path / "staging").mkdir()
    runtime_env = submit.job_runtime_env({}, code, tmp_path / "staging")
    assert runtime_env["py_modules"] == [str(tmp_path / "staging" / name)]
    assert (tmp_path / "staging" / name / "__init__.py").read_text() == TINY_CNN


def test_rays_job_client_takes_no_single_file_py_module(tmp_path):
    """Why job_runtime_env wraps a single-module file: Ray 2.60's job client hands a .py entry of
    py_modules to its directory upload (no is_file), which refuses it. If this starts to pass, the
    wrap can go."""
    from ray.dashboard.modules.dashboard_sdk import SubmissionClient

    (tmp_path / "nets.py").write_text(TINY_CNN)
    client = SubmissionClient.__new__(SubmissionClient)  # no cluster: the package store answers "have it"
    client._package_exists = lambda uri: True
    with pytest.raises(ValueError, match="must be an existing directory"):
        client._upload_py_modules_if_needed({"py_modules": [str(tmp_path / "nets.py")]})
    _package(tmp_path, "pkg")
    runtime_env = {"py_modules": [str(tmp_path / "pkg")]}
    client._upload_py_modules_if_needed(runtime_env)
    assert runtime_env["py_modules"][0].startswith("gcs://_ray_pkg_")


def test_a_network_module_that_does_not_import_is_one_line():
    cfg = recipes.load("digits", ["train.model.class_path=no_such_pkg_x.nets:TinyCNN"])
    with pytest.raises(ModelError, match=r"^train.model.class_path=no_such_pkg_x.nets:TinyCNN: no module named 'no_such_pkg_x'"):
        submit.user_code(cfg)
