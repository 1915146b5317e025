"""The process-wide settings of a bnflow command, made in one place: ``pipeline.cli.main`` calls
``configure`` right after parsing the arguments, before a command imports any library
(``show-config``, which imports none, skips it). Importing ``pipeline`` (which every serving process
of a logged model does) changes nothing.

What the libraries would otherwise put on a user's console: Ray's and MLflow's INFO chatter (store
creation, migrations, a "View run" line per run end), their progress bars, and warnings known to say
nothing about a bnflow run. ``--verbose`` keeps all of it. Warnings and errors otherwise always show.
(Ray's own console settings are made in ``pipeline.cluster.connect``.)
"""

from __future__ import annotations

import importlib
import logging
import os

# Library warnings that say nothing about a bnflow run, by the logger that emits them (a filter on a
# logger sees only its own records).
KNOWN_HARMLESS = {
    # bnflow logs its own model object and loads it with its own code: the pickle advice does not apply.
    "mlflow.pyfunc": "Passing a Python object as `python_model`",
    # Good news, not a warning: a fresh local Ray turned token auth on.
    "ray._private.authentication.authentication_token_setup": "Token authentication is enabled for this Ray cluster",
    # `pipeline submit`: Ray announcing that it leaves .git and .venv out of the job (as .rayignore asks).
    "ray._private.runtime_env.working_dir": "is now ignored by default",
}
# (Ray's job SDK modules set their own loggers to INFO when imported: name them, not their parent.)
QUIET_LOGGERS = ("mlflow", "ray._private.runtime_env", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk")

_configured = False


def configure(verbose: bool) -> None:
    """Set the process state bnflow's commands need; once per process.

    - MLflow's telemetry off unless the user set ``MLFLOW_DISABLE_TELEMETRY`` (its background thread
      deletes an ``os.environ`` key that a concurrent tracking request iterates: KeyError seen in
      searches); set before anything imports MLflow.
    - MLflow's own URL lines and artifact download bars off (bnflow prints the one link that matters).
    - Unless ``verbose``: the INFO loggers and known-harmless warnings above off the console.
    """
    global _configured
    if _configured:  # `schedule` submits through the submit command again and again
        return
    _configured = True
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if verbose:
        return
    # These set their loggers' levels when imported: import them first, then set the levels.
    for module in ("mlflow", "ray.job_submission"):
        importlib.import_module(module)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name, message in KNOWN_HARMLESS.items():
        logging.getLogger(name).addFilter(lambda record, m=message: m not in record.getMessage())
