"""The package works from a wheel, away from the source tree, and the README's commands stay true."""

from __future__ import annotations

import re
import shlex
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from pipeline import recipes

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_finds_its_recipes(tmp_path):
    """Regression: recipes lived outside every package, so a non-editable install could not load them."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("bnflow-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # The dependencies come from this environment (no network here); bnflow itself only from the wheel.
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = subprocess.run([py, "-c", "import pipeline, sys; print(pipeline.__file__)"], cwd=elsewhere,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and str(venv) in r.stdout, r.stderr  # imported from the wheel, not the tree
    r = subprocess.run([py, "-m", "pipeline", "show-config", "--recipe", "digits", "--set", "train.epochs=2"],
                       cwd=elsewhere, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert '"epochs": 2' in r.stdout and '"source": "digits"' in r.stdout


def _readme_commands() -> list[list[str]]:
    """Every `python -m pipeline ...` command line in the README, continuation lines joined."""
    text = ROOT.joinpath("README.md").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        m = re.search(r"python -m pipeline (.*)", line)
        if m:
            cmd = m.group(1).split("#")[0].split("`")[0].replace("[", " ").replace("]", " ")
            out.append([t for t in shlex.split(cmd) if t != "..."])
    return out


def _fill(argv: list[str]) -> list[str]:
    """Usage placeholders made concrete; a flag whose value the usage line elides is dropped."""
    placeholders = {"ID": "nightly-2026-11-24", "NAME|PATH.yaml": "digits", "key=value": "train.epochs=2",
                    "TIME": "2026-11-24T02:00Z", "URL": "http://127.0.0.1:8265", "none|latest|all": "latest",
                    "queue|skip": "queue", "|": None, "URI": "runs:/0123/model_recalibrated", "DIR": "new-rows",
                    "NAME": "fashion-adapted", "N": "1000", "K": "2"}
    argv = [placeholders.get(a, a) for a in argv if placeholders.get(a, a) is not None]
    out = []
    for i, a in enumerate(argv):
        takes_value = a in ("--recipe", "--set", "--run-id", "--slot", "--address")
        if takes_value and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            continue
        out.append(a)
    return out


def test_readme_commands_parse_and_their_recipes_and_overrides_validate(tmp_path):
    """Each README command line is parsed by the real CLI parser and its recipe and --set values
    resolved (placeholders such as ID or NAME|PATH.yaml are filled with real values first)."""
    from pipeline.cli import build_parser

    commands = _readme_commands()
    assert len(commands) >= 5
    parser = build_parser()
    for argv in commands:
        args = parser.parse_args(_fill(argv))
        if hasattr(args, "recipe"):  # adapt takes a logged model, not a recipe
            recipes.load(args.recipe, args.overrides)


@pytest.mark.parametrize("setting, client", [(None, "None"), ("false", "TelemetryClient")])
def test_mlflow_telemetry_is_off_unless_the_user_turns_it_on(setting, client):
    """Regression: MLflow's telemetry thread deletes a variable from os.environ when it cannot reach
    its server, and a tracking request iterating os.environ then failed with KeyError."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_DISABLE_TELEMETRY"}
    if setting is not None:
        env["MLFLOW_DISABLE_TELEMETRY"] = setting
    # MLflow also stays off under pytest or any CI system it recognises (PYTEST_CURRENT_TEST, CI,
    # GITHUB_ACTIONS, ...): the child process is made to look like a user's, then the client is set
    # up again, so only MLFLOW_DISABLE_TELEMETRY decides.
    code = ("from pipeline import quiet; quiet.configure(verbose=True); "
            "import mlflow, mlflow.telemetry.utils as u; u._IS_IN_CI_ENV_OR_TESTING = False; "
            "from mlflow.telemetry.client import get_telemetry_client, set_telemetry_client; set_telemetry_client(); "
            "print(type(get_telemetry_client()).__name__ if get_telemetry_client() else None)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.stdout.strip().splitlines()[-1] == client, r.stderr[-2000:]


def test_importing_bnflow_changes_no_process_state():
    """Regression: importing ``pipeline`` set an environment variable, and importing the served model's
    module replaced ``warnings.showwarning``: every serving process of a logged model got both. The
    commands set what they need first thing (``pipeline.quiet.configure``)."""
    # The libraries first (importing Ray sets variables of its own): what is measured is bnflow's import.
    code = ("import os, sys, warnings, json, mlflow, ray, ray.tune, ray.train; "
            "env = dict(os.environ); show = warnings.showwarning; "
            "import pipeline, pipeline.cli, pipeline.tracking.served, pipeline.tracking.runs, pipeline.runner, "
            "pipeline.search.rounds, pipeline.jobs.commands; "
            "print(json.dumps({'env': sorted(set(os.environ.items()) ^ set(env.items())), "
            "'showwarning': warnings.showwarning is show}))")
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # as a serving process has it
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got == {"env": [], "showwarning": True}
