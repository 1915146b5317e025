"""``python -m pipeline submit``: run a recipe as a Ray job on a cluster, from a laptop or a scheduler.

The config is loaded and checked here first (a bad ``--set`` never reaches the cluster). The job runs
``python -m pipeline run`` from a copy of this checkout (``working_dir``; ``.gitignore`` and
``.rayignore`` keep virtualenvs, run outputs and local MLflow stores at home). The tracking URI and
MLflow's credentials travel as environment variables of the job, never on its command line.

Each run id has a deterministic submission id, ``bnflow-<run id>`` (``-r1``, ``-r2``, ... for retries
after a failed attempt), so submitting a run id (or a ``--slot``) again never starts a second job
beside a live one and never meets Ray's "submission id already exists": a live job is followed, a
succeeded one is reported, a failed one is retried and resumes its run.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Optional

from schemas.errors import ConfigError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # a head on this machine (its dashboard port)
PROJECT_ROOT = Path(__file__).resolve().parents[2]
LIVE = ("PENDING", "RUNNING")
ENDED = ("SUCCEEDED", "FAILED", "STOPPED")


def dashboard_address(address: Optional[str]) -> str:
    """``--address``, else RAY_ADDRESS, else a local head; the Jobs API lives on the dashboard (http)."""
    address = (address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS).rstrip("/")
    if not address.startswith(("http://", "https://")):
        raise ConfigError(f"--address {address}: jobs are submitted to the Ray dashboard's http address, "
                          f"e.g. {DEFAULT_ADDRESS} (the head's port 8265, or a tunnel to it: ray dashboard cluster.yaml)")
    return address


def is_loopback(address: str) -> bool:
    host = urllib.parse.urlsplit(address).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def token() -> Optional[str]:
    """The Ray auth token, from where Ray's own clients look: RAY_AUTH_TOKEN, the file at
    RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def connect(address: str):
    """A ``JobSubmissionClient`` for ``address``, with the auth token when there is one.

    Raises:
        ConfigError: nothing answers there, or the cluster wants a token this side lacks or it refuses.
    """
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    tok = token()
    headers = {"Authorization": f"Bearer {tok}"} if tok else None
    try:
        client = JobSubmissionClient(address, headers=headers)
        client.list_jobs()  # the first authenticated call: a wrong token fails here, not mid-submission
        return client
    except AuthenticationError:
        if tok is None:
            raise ConfigError(f"--address {address}: the cluster requires a Ray auth token and none was found; set "
                              "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (on the head: ray get-auth-token)") from None
        raise ConfigError(f"--address {address}: the cluster refused this Ray auth token; use the head's "
                          "(ray get-auth-token on the head) in RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH") from None
    except OSError as e:  # refused, DNS, timeout (requests' errors are OSErrors too)
        raise ConfigError(f"--address {address}: no Ray dashboard answers there ({type(e).__name__}); start the cluster or fix "
                          "--address / RAY_ADDRESS") from None


def plan(cfg, recipe: Optional[str], overrides: list[str], address: str) -> tuple[list[str], dict[str, str]]:
    """The job's ``run`` arguments and environment for ``cfg`` (already loaded from ``recipe`` and
    ``overrides``).

    Raises:
        ConfigError: a local tracking store or a relative storage path on a cluster of other machines
            (its workers could not reach them), or a recipe file outside this checkout.
    """
    from pipeline.tracking.uri import CREDENTIAL_ENV, SUBMITTER_ENV, default_tracking_uri, split_credentials, source_tags

    local = is_loopback(address)
    uri = default_tracking_uri(cfg.tracking.uri)
    if not uri.startswith(("http://", "https://")):
        if not local:
            raise ConfigError(f"tracking.uri={uri}: a local store is not reachable from the cluster's nodes; point "
                              "tracking.uri (or MLFLOW_TRACKING_URI) at an MLflow server, e.g. http://mlflow:5000")
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # relative: the job runs elsewhere
            uri = f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    storage = Path(cfg.storage)
    if not storage.is_absolute():
        if not local:
            raise ConfigError(f"storage={cfg.storage}: a relative path would land in the job's temporary working "
                              "directory; set storage to a directory every node sees, e.g. /mnt/shared/bnflow")
        storage = storage.resolve()
    clean, user, password = split_credentials(uri)
    env = {"MLFLOW_TRACKING_URI": clean}
    for key, value in zip(CREDENTIAL_ENV, (user or os.environ.get(CREDENTIAL_ENV[0]), password or os.environ.get(CREDENTIAL_ENV[1]))):
        if value:
            env[key] = value
    tags = source_tags()  # who submitted, from which commit: the job's copy of the code has no .git
    env[SUBMITTER_ENV["user"]] = tags["mlflow.user"]
    if "mlflow.source.git.commit" in tags:
        env[SUBMITTER_ENV["commit"]] = tags["mlflow.source.git.commit"]

    args = []
    if recipe is not None:
        if recipe.endswith((".yaml", ".yml")):
            path = Path(recipe).resolve()
            if not path.is_relative_to(PROJECT_ROOT):
                raise ConfigError(f"--recipe {recipe}: only files inside {PROJECT_ROOT} travel with the job; copy it there")
            recipe = str(path.relative_to(PROJECT_ROOT))
        args += ["--recipe", recipe]
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key not in ("tracking.uri", "storage"):  # these two travel resolved, below and in env
            args += ["--set", item]
    args += ["--set", f"storage={storage}"]
    return args, env


def submission_ids(run_id: str):
    yield f"bnflow-{run_id}"
    n = 1
    while True:
        yield f"bnflow-{run_id}-r{n}"
        n += 1


def submit(client, run_args: list[str], env: dict[str, str], run_id: str, wait: bool, say,
           metadata: Optional[dict[str, str]] = None) -> int:
    """Submit (or find) the job of ``run_id`` and, with ``wait``, follow it; returns the exit code.
    ``metadata`` (e.g. the schedule and slot) goes on the job, where ``pipeline schedule`` reads it."""
    jobs = {j.submission_id: j for j in client.list_jobs() if j.submission_id}
    for sid in submission_ids(run_id):
        job = jobs.get(sid)
        if job is None:
            break
        status = str(job.status.value if hasattr(job.status, "value") else job.status)
        if status in LIVE:
            if not wait:
                say(f"run {run_id} is already running as job {sid}; follow it with: ray job logs -f {sid}")
                return 0
            say(f"run {run_id} is already running as job {sid}; following it")
            return follow(client, sid, say)
        if status == "SUCCEEDED":
            say(f"run {run_id} already succeeded as job {sid}; nothing to do (logs: ray job logs {sid})")
            return 0
    entrypoint = shlex.join(["python", "-m", "pipeline", "run", *run_args])
    runtime_env = {"env_vars": env}
    if (PROJECT_ROOT / "pyproject.toml").exists():  # a checkout: the job runs this code, not what the cluster has
        runtime_env["working_dir"] = str(PROJECT_ROOT)
    client.submit_job(entrypoint=entrypoint, submission_id=sid, runtime_env=runtime_env,
                      metadata={"bnflow.run_id": run_id, **(metadata or {})})
    say(f"submitted job {sid} (run {run_id})")
    if not wait:
        say(f"follow it with: ray job logs -f {sid}")
        return 0
    return follow(client, sid, say)


def follow(client, sid: str, say, poll_s: float = 1.0) -> int:
    """Print the job's output as it comes; return 0 when it succeeds, the driver's exit code when
    that is a user error (2) or an interruption (130, 143), else 1."""
    shown = 0
    try:
        while True:
            status = str(client.get_job_status(sid).value)
            logs = client.get_job_logs(sid)
            if len(logs) > shown:
                sys.stdout.write(logs[shown:])
                sys.stdout.flush()
                shown = len(logs)
            if status in ENDED:
                break
            time.sleep(poll_s)
    except KeyboardInterrupt:
        say(f"stopped following; job {sid} goes on (ray job logs -f {sid}; ray job stop {sid})")
        return 130
    info = client.get_job_info(sid)
    if status == "SUCCEEDED":
        return 0
    code = info.driver_exit_code
    say(f"job {sid} {status.lower()}" + (f" (exit code {code})" if code is not None else "")
        + (f": {info.message.strip().splitlines()[-1]}" if info.message and code not in (2, 130, 143) else ""))
    return code if code in (2, 130, 143) else 1
