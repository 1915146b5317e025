"""MLflow tracking: one parent run per pipeline run, one nested child run per stage.

A run's MLflow calls live here, in ``pipeline/served.py`` (the logged model) and in
``pipeline/registry.py`` (the champion gate). Stages never touch MLflow; the train stage receives an
``EpochLogger`` that the driver calls once per epoch as the epoch's checkpoint lands, so per-epoch
metrics appear in the UI while training runs, are written by exactly one process, and never cost
the training loop a request.
"""

from __future__ import annotations

import contextlib
import os
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Optional

import mlflow
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from schemas import artifacts as A
from schemas.config import PipelineConfig, flatten
from schemas.errors import ConfigError

TAG_RUN_ID = "bnflow.run_id"
TAG_STAGE = "bnflow.stage"
TAG_MODEL_URI = "bnflow.model_uri"  # on train and recalibrate: the logged model's models:/m-... URI
PROJECT_ROOT = Path(__file__).resolve().parent.parent
CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
# MLflow 3 opens an experiment without this tag in its GenAI view; bnflow's runs are model training.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
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
    import getpass
    import subprocess

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


class EpochLogger:
    """Per-epoch metrics to one MLflow run, from the process that calls it (the driver).

    Logging is idempotent per epoch (a step already in the run is not logged again), and a tracking
    outage does not stop training: a batch that cannot be sent stays buffered and goes with the
    next epoch's (each try waits at most a few seconds), and whatever is still missing
    when training ends is filled in by the driver from the train history. Nothing is logged once
    the run is no longer RUNNING (a killed run stays as it was left).
    """

    def __init__(self, run_id: str, client: MlflowClient):
        self.run_id = run_id
        self.client = client
        self.pending: list[Metric] = []
        self.warned = False

    def __call__(self, epoch: int, metrics: dict) -> Optional[str]:
        """Log one epoch; returns a line for the console the first time the server is unreachable."""
        import time

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, epoch) for k, v in metrics.items()]
        try:
            with _short_requests():
                self._send()
        except Exception as e:  # an outage: keep the metrics for the next try
            if not self.warned:
                self.warned = True
                return f"tracking server unreachable ({type(e).__name__}); metrics are buffered and training goes on"
        return None

    def _send(self) -> None:
        if self.client.get_run(self.run_id).info.status != "RUNNING":
            self.pending = []
            return
        # Idempotent: an epoch a killed attempt already logged is not logged twice (its checkpoint
        # can be on disk before Ray Train registers it, so the resumed run may train it again). An
        # epoch's metrics go in one batch, so one key tells.
        logged = {m.step for m in self.client.get_metric_history(self.run_id, self.pending[0].key)}
        fresh = [m for m in self.pending if m.step not in logged]
        if fresh:
            self.client.log_batch(self.run_id, metrics=fresh)
        self.pending = []


@contextlib.contextmanager
def _short_requests():
    """MLflow's HTTP requests without retries and with a 5 s timeout inside the block: a server that
    is down costs the progress watch seconds, not MLflow's minutes of retries. MLflow reads these
    variables per request; the driver's other calls keep their retries."""
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Tracker:
    """Opens (or reopens) the parent run and one child per stage.

    ``derived`` are params computed from the config (e.g. the resolved BN mode), logged beside it;
    ``tags`` go on every run of it (e.g. a schedule's slot).
    The caller holds the run's lease, so at most one parent run per run id is ever created.
    """

    def __init__(self, cfg: PipelineConfig, run_id: str, derived: Optional[dict[str, str]] = None,
                 tags: Optional[dict[str, str]] = None):
        self.uri = self.uri_for(cfg)
        self.cfg = cfg
        self.run_id = run_id
        self.derived = derived or {}
        self.client = MlflowClient(self.uri)
        mlflow.set_tracking_uri(self.uri)
        exp = self.client.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            location = None
            if self.uri.startswith("sqlite:"):  # keep artifacts beside the local store, absolute
                location = (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
            self.experiment_id = self.client.create_experiment(cfg.tracking.experiment, artifact_location=location,
                                                               tags=EXPERIMENT_KIND)
        else:
            self.experiment_id = exp.experiment_id
            if not set(EXPERIMENT_KIND) & set(exp.tags):  # made elsewhere: say what it holds, unless someone did
                for k, v in EXPERIMENT_KIND.items():
                    self.client.set_experiment_tag(self.experiment_id, k, v)
        self.tags = {**source_tags(), **(tags or {})}
        self.parent_id: Optional[str] = None
        self.open_child: Optional[str] = None

    @staticmethod
    def uri_for(cfg: PipelineConfig) -> str:
        return default_tracking_uri(cfg.tracking.uri)

    # -- parent -------------------------------------------------------------------------------
    def start(self) -> str:
        """Reopen the parent run of ``run_id`` if one exists, else create it; log the config."""
        found = self._find("pipeline")
        if found:
            self._check_same_config(found.data.params)
            self.parent_id = found.info.run_id
            self.client.update_run(self.parent_id, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment_id, run_name=self.run_id,
                                         tags={**self.tags, TAG_RUN_ID: self.run_id, TAG_STAGE: "pipeline"})
            self.parent_id = run.info.run_id
            self._log_params(self.parent_id, self._params())
            self.client.log_text(self.parent_id, self.cfg.model_dump_json(indent=1), "config.json")
        return self.parent_id

    def _find(self, stage: str):
        found = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{TAG_RUN_ID}` = '{self.run_id}' and tags.`{TAG_STAGE}` = '{stage}'",
            order_by=["attributes.start_time ASC"])
        return found[0] if found else None

    def _params(self) -> dict[str, str]:
        params = flatten(self.cfg)
        if not self.cfg.search.space:  # a run, not a search: the search section says nothing about it
            params = {k: v for k, v in params.items() if not k.startswith("search.")}
        return {**params, **self.derived}

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        existing = self.client.get_run(run_id).data.params
        new = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(run_id, params=new[i : i + 100])

    def _check_same_config(self, logged: dict[str, str]) -> None:
        """A resumed run must keep its config: its params in MLflow describe every stage."""
        changed = [(k, logged.get(k), v) for k, v in self._params().items() if logged.get(k) != str(v)[:6000]]
        if changed:
            k, old, new = changed[0]
            more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
            raise ConfigError(
                f"--run-id {self.run_id}: that run was started with {k}={old}, not {new}{more}; "
                "resume with the same recipe and --set values, or start a new run without --run-id")

    def finish(self, status: str, summary: Optional[dict] = None, tags: Optional[dict[str, str]] = None) -> None:
        """End the parent (and a stage child left open by an interruption) as FINISHED, FAILED or KILLED;
        ``summary`` metrics and ``tags`` go on the parent first, where the runs table shows them."""
        if summary or tags:
            self.client.log_batch(self.parent_id, metrics=[Metric(k, float(v), 0, 0) for k, v in (summary or {}).items()],
                                  tags=[RunTag(k, v) for k, v in (tags or {}).items()])
        if self.open_child is not None:
            self.client.set_terminated(self.open_child, status)
            self.open_child = None
        if self.parent_id is not None:
            self.client.set_terminated(self.parent_id, status)

    def gate(self, raw: A.Dataset, say=print):
        """Register the recalibrated model and decide whether it becomes the champion
        (pipeline/registry.py), scoring on ``raw``'s test rows; the decision goes on the evaluate
        run and the parent. Returns the ``registry.Decision``."""
        import numpy as np

        from pipeline import registry
        from tasks import arrow_io

        tables = [arrow_io.read_table(f) for f in arrow_io.split_files(raw.split("test").path)]
        x = np.concatenate([arrow_io.features_numpy(t) for t in tables])
        y = np.concatenate([arrow_io.labels_numpy(t) for t in tables])
        recal = self._find("recalibrate")
        model_uri = recal.data.tags.get(TAG_MODEL_URI, f"runs:/{recal.info.run_id}/model_recalibrated")
        decision = registry.gate(self.client, self.cfg.tracking.register_model, self.run_id, model_uri, x, y,
                                 self.cfg.tracking.gate,
                                 raw.feature_names, say)
        metrics = [Metric(k, v, 0, 0) for k, v in decision.metrics().items()]
        tags = [RunTag(k, v) for k, v in decision.tags().items()]
        for run_id in (self._find("evaluate").info.run_id, self.parent_id):
            self.client.log_batch(run_id, metrics=metrics, tags=tags)
        return decision

    # -- children -----------------------------------------------------------------------------
    def _child(self, stage: str) -> str:
        found = self._find(stage)
        if found:
            return found.info.run_id
        run = self.client.create_run(
            self.experiment_id, run_name=stage,
            tags={**self.tags, TAG_RUN_ID: self.run_id, TAG_STAGE: stage, "mlflow.parentRunId": self.parent_id})
        return run.info.run_id

    def stage_skipped(self, stage: str, section, derived=None, outputs: Optional[dict] = None) -> None:
        """A stage complete on disk. If an earlier attempt stopped before its tracking was complete
        (the child is not FINISHED), log its outputs now, so storage and MLflow agree."""
        found = self._find(stage)
        if found is not None and found.info.status == "FINISHED":
            self.client.set_tag(found.info.run_id, "bnflow.skipped", "complete from an earlier attempt")
            return
        with self.stage(stage, section, derived) as run:
            run.log_outputs(outputs or {})

    @contextlib.contextmanager
    def stage(self, stage: str, section, derived=None):
        """The child run of ``stage``, RUNNING while the block runs; FINISHED after it, FAILED if it
        raises (an interruption is marked KILLED by ``finish``)."""
        child = self._child(stage)
        self.client.update_run(child, status="RUNNING")
        self._log_params(child, {**flatten(section, prefix=f"{stage}."), **(derived(section) if derived else {})})
        self.open_child = child
        try:
            yield _StageRun(self, stage, child)
        except Exception:
            self.client.set_terminated(child, "FAILED")
            self.open_child = None
            raise
        self.client.set_terminated(child, "FINISHED")
        self.open_child = None


class _StageRun:
    def __init__(self, tracker: Tracker, stage: str, run_id: str):
        self.tracker, self.stage, self.run_id = tracker, stage, run_id
        self.client = tracker.client

    def epoch_logger(self) -> EpochLogger:
        return EpochLogger(self.run_id, self.client)

    def log_outputs(self, outputs: dict) -> None:
        for name, art in outputs.items():
            if isinstance(art, A.Dataset):
                self._log_dataset(name, art)
            elif isinstance(art, A.NormStatsFile):
                self.client.log_artifact(self.run_id, art.path)
                self.client.set_tag(self.run_id, "bnflow.norm_stats_version", art.version)
                dropped = A.NormStats.load(art.path).dropped_rows
                self.client.log_batch(self.run_id, metrics=[
                    Metric(f"dropped_rows_{split}", float(dropped.get(split, 0)), 0, 0) for split in ("train", "val", "test")])
            elif isinstance(art, A.Checkpoint):
                self._log_model(name, art)
            elif isinstance(art, A.TrainHistory):
                self.client.log_artifact(self.run_id, art.path)
                self.client.set_tag(self.run_id, "bnflow.bn_mode", self.tracker.cfg.train.bn_mode)
                stop = {"bnflow.stop_reason": art.stop_reason or "ran every epoch",
                        **({"bnflow.best_epoch": str(art.best_epoch)} if art.best_epoch is not None else {})}
                self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in stop.items()])
                self._fill_epoch_gaps(art.epochs)
            elif isinstance(art, A.Evaluation):
                metrics = [Metric(k, float(v), 0, 0) for k, v in art.metrics.items()]
                for i in range(0, len(metrics), 500):
                    self.client.log_batch(self.run_id, metrics=metrics[i : i + 500])
                self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in art.tags.items()])
                for f in art.files:
                    self.client.log_artifact(self.run_id, f)

    def _fill_epoch_gaps(self, epochs: list[dict]) -> None:
        """Log the epochs of ``epochs`` that the workers' logger could not (a tracking outage, a
        crash between checkpoint and log); steps already present are never logged twice."""
        missing = []
        for key in sorted({k for e in epochs for k in e if k != "epoch"}):
            have = {m.step for m in self.client.get_metric_history(self.run_id, key)}
            missing += [Metric(key, float(e[key]), 0, int(e["epoch"])) for e in epochs if key in e and int(e["epoch"]) not in have]
        for i in range(0, len(missing), 500):
            self.client.log_batch(self.run_id, metrics=missing[i : i + 500])

    def _log_dataset(self, name: str, ds: A.Dataset) -> None:
        from mlflow.data.dataset_source_registry import get_registered_sources, resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import InputTag

        # MLflow registers the local-file source twice (schemes "" and "file") and warns that a path
        # is ambiguous unless told which one to use.
        local = [s for s in get_registered_sources() if s._get_source_type() == "local"][:1] or None
        inputs = []
        for split, info in ds.splits.items():
            # MLflow's own dataset digest hashes only the first 10,000 rows: carry ours, over all bytes.
            meta = MetaDataset(resolve_dataset_source(Path(info.path).as_uri(), candidate_sources=local), name=f"{name}/{split}", digest=info.digest[:32])
            entity = meta._to_mlflow_entity()
            inputs.append(mlflow.entities.DatasetInput(entity, tags=[InputTag("mlflow.data.context", split),
                                                                     InputTag("bnflow.rows", str(info.rows)),
                                                                     InputTag("bnflow.sha256", info.digest)]))
        self.client.log_inputs(self.run_id, datasets=inputs)

    def _log_model(self, name: str, ckpt: A.Checkpoint) -> None:
        from pipeline import served
        from tasks.nn.models import served_model

        state = A.CheckpointState.load(ckpt.path)
        self.client.log_artifact(self.run_id, ckpt.path, artifact_path=f"checkpoints/{name}")
        # start_run(run_id) refuses a run of another experiment than the process's active one (set
        # by anything that ran before in this process): make this run's experiment the active one.
        mlflow.set_experiment(experiment_id=self.tracker.experiment_id)
        with mlflow.start_run(run_id=self.run_id, nested=True):
            info = served.log(served_model(state), f"model_{name}", state.spec.names(), state.spec.feature_names)
        # The logged model's own URI (models:/m-...): the registry takes it without a lookup by run.
        self.client.set_tag(self.run_id, TAG_MODEL_URI, info.model_uri)
