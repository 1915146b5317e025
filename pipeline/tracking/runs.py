"""The MLflow runs of a pipeline run: one parent run per run id, one nested child run per stage.

This is the one place where a run's parent is created (``Tracker.start``) and its stage children
(``Tracker.stage``). The caller holds the run's lease, so at most one parent per run id is ever
created; a retried or resumed run reopens it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from pipeline.tracking import epochs
from pipeline.tracking.uri import default_tracking_uri, source_tags
from schemas import artifacts as A
from schemas.config import PipelineConfig, flatten
from schemas.errors import ConfigError

TAG_RUN_ID = "bnflow.run_id"
TAG_STAGE = "bnflow.stage"
TAG_MODEL_URI = "bnflow.model_uri"  # on train and recalibrate: the logged model's models:/m-... URI
# MLflow 3 opens an experiment without this tag in its GenAI view; bnflow's runs are model training.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


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
        self.stage_runs: dict[str, str] = {}

    def attach(self, parent_id: str, stage_runs: dict[str, str]) -> None:
        """Work inside runs that another process made instead of creating them: the parent, and per
        stage the run that stands for it (a search trial's train stage logs to its trial run)."""
        self.parent_id = parent_id
        self.stage_runs = dict(stage_runs)

    @staticmethod
    def uri_for(cfg: PipelineConfig) -> str:
        return default_tracking_uri(cfg.tracking.uri)

    # -- parent -------------------------------------------------------------------------------
    def check_resumable(self) -> None:
        """Refuse, before anything starts, to resume ``run_id`` with another config than its own.

        Raises:
            ConfigError: naming the first param that differs.
        """
        found = self.find("pipeline")
        if found:
            self._check_same_config(found.data.params)

    def start(self) -> str:
        """Reopen the parent run of ``run_id`` if one exists, else create it; log the config."""
        found = self.find("pipeline")
        if found:
            self._check_same_config(found.data.params)
            self.parent_id = found.info.run_id
            self.client.update_run(self.parent_id, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment_id, run_name=self.run_id,
                                         tags={**self.tags, TAG_RUN_ID: self.run_id, TAG_STAGE: "pipeline"})
            self.parent_id = run.info.run_id
            self.log_params(self.parent_id, self._params())
            self.client.log_text(self.parent_id, self.cfg.model_dump_json(indent=1), "config.json")
        return self.parent_id

    def find(self, stage: str):
        """The run of ``stage`` (``"pipeline"``: the parent) of this run id, or None."""
        if stage in self.stage_runs:
            return self.client.get_run(self.stage_runs[stage])
        found = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{TAG_RUN_ID}` = '{self.run_id}' and tags.`{TAG_STAGE}` = '{stage}'",
            order_by=["attributes.start_time ASC"])
        return found[0] if found else None

    def _params(self) -> dict[str, str]:
        params = flatten(self.cfg)
        if not self.cfg.search.space:  # a run, not a search: the search section says nothing about it
            params = {k: v for k, v in params.items() if not k.startswith("search.")}
        return {**params, **self.derived}

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        """Log the params ``run_id`` does not have yet (MLflow refuses to change a logged param)."""
        existing = self.client.get_run(run_id).data.params
        new = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
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

    def logged_model(self, stage: str) -> Optional[str]:
        """The URI of the model ``stage`` (train or recalibrate) logged: its own ``models:/m-...``
        (what ``mlflow models serve -m``, ``adapt --model`` and ``train.model.weights`` take), or
        ``runs:/<stage run>/model_<stage>`` for a run logged before models had their own URI."""
        run = self.find(stage)
        if run is None:
            return None
        name = "recalibrated" if stage == "recalibrate" else "trained"
        return run.data.tags.get(TAG_MODEL_URI, f"runs:/{run.info.run_id}/model_{name}")

    def gate(self, raw: A.Dataset, say=print):
        """Register the recalibrated model and decide whether it becomes the champion
        (``pipeline.tracking.registry``), scoring on ``raw``'s test rows; the decision goes on the evaluate
        run and the parent. Returns the ``registry.Decision``."""
        from pipeline.tracking import registry
        from tasks import arrow_io
        from tasks.reader import Split

        table = Split(arrow_io.split_files(raw.split("test"))).read_all()
        x, y = arrow_io.features_numpy(table), arrow_io.labels_numpy(table)
        model_uri = self.logged_model("recalibrate")
        decision = registry.gate(self.client, self.cfg.tracking.register_model, self.run_id, model_uri, x, y,
                                 self.cfg.tracking.gate,
                                 raw.feature_names, say)
        metrics = [Metric(k, v, 0, 0) for k, v in decision.metrics().items()]
        tags = [RunTag(k, v) for k, v in decision.tags().items()]
        for run_id in (self.find("evaluate").info.run_id, self.parent_id):
            self.client.log_batch(run_id, metrics=metrics, tags=tags)
        return decision

    # -- children -----------------------------------------------------------------------------
    def child(self, stage: str) -> str:
        """The child run of ``stage``, created under the parent if it has none yet."""
        found = self.find(stage)
        if found:
            return found.info.run_id
        run = self.client.create_run(
            self.experiment_id, run_name=stage,
            tags={**self.tags, TAG_RUN_ID: self.run_id, TAG_STAGE: stage, "mlflow.parentRunId": self.parent_id})
        return run.info.run_id

    def stage_skipped(self, stage: str, section, derived=None, outputs: Optional[dict] = None) -> None:
        """A stage complete on disk. If an earlier attempt stopped before its tracking was complete
        (the child is not FINISHED), log its outputs now, so storage and MLflow agree."""
        found = self.find(stage)
        if found is not None and found.info.status == "FINISHED":
            self.client.set_tag(found.info.run_id, "bnflow.skipped", "complete from an earlier attempt")
            return
        with self.stage(stage, section, derived) as run:
            run.log_outputs(outputs or {})

    @contextlib.contextmanager
    def stage(self, stage: str, section, derived=None):
        """The child run of ``stage``, RUNNING while the block runs; FINISHED after it, FAILED if it
        raises (an interruption is marked KILLED by ``finish``)."""
        child = self.child(stage)
        self.client.update_run(child, status="RUNNING")
        self.log_params(child, {**flatten(section, prefix=f"{stage}."), **(derived(section) if derived else {})})
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

    def epoch_logger(self) -> epochs.EpochLogger:
        return epochs.for_run(self.tracker.uri, self.run_id, self.client)

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
        """Log the epochs of ``epochs`` that the driver's epoch logger could not (a tracking outage, a
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
        from mlflow.entities import DatasetInput, InputTag

        # MLflow registers the local-file source twice (schemes "" and "file") and warns that a path
        # is ambiguous unless told which one to use.
        local = [s for s in get_registered_sources() if s._get_source_type() == "local"][:1] or None
        inputs = []
        for split, info in ds.splits.items():
            # MLflow's own dataset digest hashes only the first 10,000 rows: carry ours, over all bytes.
            meta = MetaDataset(resolve_dataset_source(Path(info.path).as_uri(), candidate_sources=local), name=f"{name}/{split}", digest=info.digest[:32])
            entity = meta._to_mlflow_entity()
            inputs.append(DatasetInput(entity, tags=[InputTag("mlflow.data.context", split),
                                                                     InputTag("bnflow.rows", str(info.rows)),
                                                                     InputTag("bnflow.sha256", info.digest)]))
        self.client.log_inputs(self.run_id, datasets=inputs)

    def _log_model(self, name: str, ckpt: A.Checkpoint) -> None:
        from pipeline.tracking import served
        from tasks.nn.models import served_model

        state = A.CheckpointState.load(ckpt.path)
        self.client.log_artifact(self.run_id, ckpt.path, artifact_path=f"checkpoints/{name}")
        info = served.log(served_model(state), f"model_{name}", state.spec.names(), state.spec.feature_names,
                          run_id=self.run_id, checkpoint=ckpt.path, features_column=state.spec.features_column)
        # The logged model's own URI (models:/m-...): the registry takes it without a lookup by run.
        self.client.set_tag(self.run_id, TAG_MODEL_URI, info.model_uri)
