"""``python -m pipeline submit``: run a recipe as a Ray job on a cluster, from a laptop or a scheduler.

The config is loaded and checked here first (a bad ``--set`` never reaches the cluster). The job runs
``python -m pipeline run`` from a copy of this checkout (``working_dir``; ``.gitignore`` and
``.rayignore`` keep virtualenvs, run outputs and local MLflow stores at home). The tracking URI and
MLflow's credentials travel as environment variables of the job, never on its command line.

Each run id has a deterministic submission id, ``bnflow-<run id>`` (``-r1``, ``-r2``, ... for retries
after a failed attempt), so submitting a run id (or a ``--slot``) again never starts a second job
beside a live one and never meets Ray's "submission id already exists": a live job is followed, a
succeeded one is reported, a failed one is retried and resumes its run.

The user's network (``train.model.class_path``) is imported here first (a typo never reaches the
cluster), and its code goes with the job when the cluster could not import it otherwise: a package
outside the checkout travels in ``runtime_env["py_modules"]``; one in the checkout's root travels in
the working_dir; an installed one is the cluster's to have (``place_code``).
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import shutil
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

from schemas.errors import ConfigError, ModelError

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


def working_dir() -> Optional[Path]:
    """The job's working_dir: this checkout, when bnflow runs from one (else the cluster's own bnflow runs)."""
    return PROJECT_ROOT if (PROJECT_ROOT / "pyproject.toml").exists() else None


@dataclass(frozen=True)
class UserCode:
    """Where the module of ``train.model.class_path`` lives here, and how the job gets it (``how``):

    - ``working_dir``: the checkout's root holds it, and the job's copy of the checkout carries it;
    - ``installed``: a distribution of this interpreter (or part of Python): the cluster must have it;
    - ``py_modules``: anywhere else; shipped with the job, ``why`` says why the working_dir does not.
    """

    class_path: str
    package: str  # the top-level module: 'userpkg' of 'userpkg.nets:TinyCNN'
    path: Optional[Path]  # its package directory or single-module file; None when built into Python
    how: Literal["working_dir", "installed", "py_modules"]
    why: str = ""

    def line(self) -> Optional[str]:
        """What ``pipeline submit`` tells the user about it, or None."""
        if self.how == "installed":
            if self.package in sys.stdlib_module_names:
                return None
            return (f"note: train.model.class_path's package '{self.package}' is installed here{_distribution(self.package)}; "
                    "the cluster's Python must have it too (it is not shipped with the job)")
        if self.how == "py_modules":
            what = f"{self.path} (as package '{self.package}')" if self.path.is_file() else str(self.path)
            return f"shipping {what} with the job (py_modules): train.model.class_path's package '{self.package}' is {self.why}"
        return None


def place_code(class_path: str, package: str, path: Optional[Path], root: Optional[Path], installed: Sequence[Path],
               left_out: Optional[Callable[[Path, Path], Optional[Path]]] = None) -> UserCode:
    """How the job gets top-level module ``package`` of ``class_path``, found here at ``path``.

    Args:
        path: the package's directory or the single module's file (absolute, symlinks resolved);
            None for a module built into Python.
        root: the job's working_dir (``working_dir()``), None when the job has none.
        installed: the directories of this interpreter's distributions and standard library (``install_dirs()``).
        left_out: ``(path, root)`` -> the first of ``path``'s files that the working_dir's upload
            leaves out, or None; default ``left_out_of_upload`` (Ray's own ignore rules).

    Raises:
        ModelError: a compiled single-file module that is neither installed nor in the checkout
            (py_modules ships directories and .py files only).
    """
    if path is None or any(path.is_relative_to(d) for d in installed):
        return UserCode(class_path, package, path, "installed")
    if root is None:
        why = "not installed (the job runs the cluster's own bnflow, without a working_dir)"
    elif not path.is_relative_to(root):
        why = f"outside the checkout {root}"
    elif path.parent != root:  # the job imports from the working_dir's root only
        why = f"imported from {path.parent}, below the checkout's root (the job's import path)"
    else:
        dropped = (left_out or left_out_of_upload)(path, root)
        if dropped is None:
            return UserCode(class_path, package, path, "working_dir")
        why = f"in the checkout, but its .gitignore/.rayignore leave {dropped.relative_to(root)} out of the job's working_dir"
    if path.suffix not in ("", ".py"):
        raise ModelError(f"train.model.class_path={class_path}: '{package}' is a compiled module ({path}) that is not "
                         "installed; Ray ships only directories and .py files with a job: install it on the cluster "
                         "(and here) as a package")
    return UserCode(class_path, package, path, "py_modules", why)


def find_code(class_path: str) -> tuple[str, Optional[Path]]:
    """Import the module of ``class_path`` here; its top-level module's name and its package directory
    (the one holding the named module, for a namespace package split over several) or single-module
    file, None when built into Python.

    Raises:
        ModelError: the module cannot be imported or lacks the name (one line, from ``resolve``).
    """
    from tasks.nn.network import resolve

    resolve(class_path)
    module_name = class_path.partition(":")[0]
    package = module_name.split(".")[0]
    top = sys.modules[package]
    portions = [Path(p).resolve() for p in getattr(top, "__path__", None) or []]
    if portions:
        file = getattr(sys.modules[module_name], "__file__", None)
        holder = [p for p in portions if file and Path(file).resolve().is_relative_to(p)]
        return package, (holder or portions)[0]
    file = getattr(top, "__file__", None)
    return package, Path(file).resolve() if file else None


def install_dirs() -> list[Path]:
    """Where this interpreter's distributions and standard library live."""
    import site
    import sysconfig

    dirs = {sysconfig.get_path(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")} | set(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.add(site.getusersitepackages())
    return sorted(Path(d).resolve() for d in dirs if d)


def left_out_of_upload(path: Path, root: Path) -> Optional[Path]:
    """The first .py file of ``path`` (a package directory or a module file under ``root``) that Ray
    leaves out when it uploads ``root`` as a job's working_dir, or None when all travel: Ray's own walk,
    with its default excludes (.git, .venv, ...) and every .gitignore (unless
    RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1) and .rayignore on the way."""
    import logging

    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    include_gitignore = os.environ.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    files = sorted(f for f in path.rglob("*.py") if "__pycache__" not in f.parts) if path.is_dir() else [path]
    uploaded: set[Path] = set()
    _dir_travel(root, [_get_excludes(root, ray_constants.get_runtime_env_default_excludes())], uploaded.add,
                include_gitignore=include_gitignore, logger=logging.getLogger(__name__))  # not Ray's INFO lines
    return next((f for f in files if f not in uploaded), None)


def user_code(cfg) -> Optional[UserCode]:
    """Where the network of ``cfg`` comes from and how the job gets it; None for a built-in.

    Raises:
        ModelError: its module cannot be imported here (checked before anything is submitted), or a
            compiled module the job cannot take along.
    """
    class_path = cfg.train.model.class_path
    if class_path is None:
        return None
    package, path = find_code(class_path)
    return place_code(class_path, package, path, working_dir(), install_dirs())


def job_runtime_env(env: dict[str, str], code: Optional[UserCode], staging: Path) -> dict:
    """The job's ``runtime_env``: ``env`` as its environment, this checkout as its working_dir, and the
    user's network code in ``py_modules`` when ``code`` says so.

    Ray 2.60's job client uploads only directories from ``py_modules`` (a ``.py`` file fails in
    ``submit_job`` with "directory ... must be an existing directory"), so a single-module file is
    copied into ``staging`` as a package of the same name (``nets.py`` -> ``nets/__init__.py``):
    ``import nets`` works the same. ``staging`` must last until the job is submitted.
    """
    runtime_env = {"env_vars": env}
    root = working_dir()
    if root is not None:  # a checkout: the job runs this code, not what the cluster has
        runtime_env["working_dir"] = str(root)
    if code is not None and code.how == "py_modules":
        module = code.path
        if module.is_file():
            (staging / code.package).mkdir()
            shutil.copy2(module, staging / code.package / "__init__.py")
            module = staging / code.package
        runtime_env["py_modules"] = [str(module)]
    return runtime_env


def _distribution(package: str) -> str:
    """' (name version)' of the distribution that installed top-level module ``package``, or ''."""
    import importlib.metadata as md

    names = md.packages_distributions().get(package) or []
    try:
        return f" ({names[0]} {md.version(names[0])})" if names else ""
    except md.PackageNotFoundError:
        return ""


def submission_ids(run_id: str):
    yield f"bnflow-{run_id}"
    n = 1
    while True:
        yield f"bnflow-{run_id}-r{n}"
        n += 1


def submit(client, run_args: list[str], env: dict[str, str], run_id: str, wait: bool, say,
           metadata: Optional[dict[str, str]] = None, code: Optional[UserCode] = None) -> int:
    """Submit (or find) the job of ``run_id`` and, with ``wait``, follow it; returns the exit code.
    ``metadata`` (e.g. the schedule and slot) goes on the job, where ``pipeline schedule`` reads it;
    ``code`` (``user_code``) is the network's code, shipped with a job submitted now when it must be."""
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
    with tempfile.TemporaryDirectory(prefix="bnflow-submit-") as staging:  # uploaded by submit_job
        runtime_env = job_runtime_env(env, code, Path(staging))
        line = code.line() if code is not None else None
        if line:
            say(line)
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
