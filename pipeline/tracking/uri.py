"""The tracking store: its URI, credentials kept out of it, a check that it answers, and where a
person looks at a run."""

from __future__ import annotations

import getpass
import os
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Optional

from schemas.errors import ConfigError

CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Set by ``pipeline submit`` for the job it submits: the job runs from an unpacked copy of the code
# (no .git) as the cluster's user, so the submitting side says who and which commit.
SUBMITTER_ENV = {"user": "BNFLOW_SUBMITTED_BY", "commit": "BNFLOW_GIT_COMMIT"}
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor in a submitted job's driver


def default_tracking_uri(cfg_uri: Optional[str]) -> str:
    """The config's URI, else MLFLOW_TRACKING_URI, else a sqlite store in the working directory."""
    if cfg_uri:
        return cfg_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def split_credentials(uri: str) -> tuple[str, Optional[str], Optional[str]]:
    """``http://user:pw@host/...`` -> (``http://host/...``, user, pw); other URIs unchanged."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri, None, None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    clean = urllib.parse.urlunsplit(parts._replace(netloc=hostport))
    return clean, urllib.parse.unquote(user) or None, urllib.parse.unquote(password) or None


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail before any compute when an http(s) tracking server does not answer, or when the URI is a
    file store, which MLflow 3 refuses unless ``MLFLOW_ALLOW_FILE_STORE=true``.

    Raises:
        ConfigError: naming the (credential-free) URI and the fix.
    """
    scheme = urllib.parse.urlsplit(uri).scheme
    if scheme in ("", "file") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
        path = urllib.parse.urlsplit(uri).path if scheme else uri
        raise ConfigError(f"tracking.uri={uri}: MLflow no longer accepts a file store; use a database, e.g. "
                          f"tracking.uri=sqlite:///{Path(path).resolve().parent / 'mlflow.db'} (or set "
                          "MLFLOW_ALLOW_FILE_STORE=true to keep the file store)")
    if scheme not in ("http", "https"):
        _check_scheme(uri)
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
    except Exception as e:  # connection refused, DNS, timeout, HTTP error: all mean "not usable"
        reason = getattr(e, "reason", None) or e
        raise ConfigError(f"tracking.uri={uri}: no MLflow server answers ({reason}); start it, or fix tracking.uri "
                          "(unset it to use a local sqlite store)") from None


def ui_command(uri: str, experiment_id: str = "", run_id: str = "") -> str:
    """Where a person looks at the run: its page for a tracking server, the command that serves a
    local store."""
    if uri.startswith(("http://", "https://")):
        # workflowType: MLflow 3's UI otherwise shows a run under its GenAI labels in a fresh browser.
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


def source_tags() -> dict[str, str]:
    """MLflow's standard source, user and git-commit tags, as MLflow's fluent API would set them."""
    from mlflow.entities import SourceType
    from mlflow.utils import mlflow_tags as T

    tags = {T.MLFLOW_SOURCE_NAME: "python -m pipeline run",
            T.MLFLOW_SOURCE_TYPE: SourceType.to_string(SourceType.JOB if os.environ.get(RAY_JOB_ENV) else SourceType.LOCAL),
            T.MLFLOW_USER: os.environ.get(SUBMITTER_ENV["user"]) or getpass.getuser()}
    commit = os.environ.get(SUBMITTER_ENV["commit"])
    if not commit:
        try:
            commit = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True,
                                    text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):  # no git, or not a checkout: no commit tag
            commit = ""
    if commit:
        tags[T.MLFLOW_GIT_COMMIT] = commit
    return tags


def _check_scheme(uri: str) -> None:
    """A scheme MLflow has no store for (a typo such as ``sqlite:/`` vs ``foo://``) is refused here,
    in a line, instead of by MLflow's store registry mid-run."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if urllib.parse.urlsplit(uri).scheme == "sqlite":
        return  # MLflow's own; constructing a client would create the database file
    try:
        MlflowClient(uri)
    except MlflowException as e:
        supported = e.message.partition("Supported URI schemes are: ")[2].partition(".")[0]
        raise ConfigError(f"tracking.uri={uri}: MLflow has no tracking store for this scheme; use an MLflow server "
                          f"(http://host:5000) or a database such as sqlite:///mlflow.db"
                          + (f" (schemes MLflow takes: {supported})" if supported else "")) from None
