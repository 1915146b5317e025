"""MLflow tracking: one parent run per pipeline run, one nested child run per stage.

All MLflow calls of bnflow live here. Stages never touch MLflow; the train stage receives an
``EpochLogger`` (picklable) that its rank-0 worker calls once per epoch, so per-epoch metrics
appear in the UI while training runs and are written by exactly one process.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Optional

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from schemas import artifacts as A
from schemas.config import PipelineConfig, flatten
from schemas.errors import ConfigError

TAG_RUN_ID = "bnflow.run_id"
TAG_STAGE = "bnflow.stage"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def default_tracking_uri(cfg_uri: Optional[str]) -> str:
    """The config's URI, else MLFLOW_TRACKING_URI, else a sqlite store in the working directory."""
    if cfg_uri:
        return cfg_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


class EpochLogger:
    """Per-epoch metrics to one MLflow run, from the process that calls it (rank 0)."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri = tracking_uri
        self.run_id = run_id

    def __call__(self, epoch: int, metrics: dict) -> None:
        import time

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, epoch) for k, v in metrics.items()]
        MlflowClient(self.tracking_uri).log_batch(self.run_id, metrics=batch)


class Tracker:
    """Opens (or reopens) the parent run and one child per stage."""

    def __init__(self, cfg: PipelineConfig, run_id: str):
        self.uri = default_tracking_uri(cfg.tracking.uri)
        self.cfg = cfg
        self.run_id = run_id
        self.client = MlflowClient(self.uri)
        mlflow.set_tracking_uri(self.uri)
        exp = self.client.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            location = None
            if self.uri.startswith("sqlite:"):  # keep artifacts beside the local store, absolute
                location = (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
            self.experiment_id = self.client.create_experiment(cfg.tracking.experiment, artifact_location=location)
        else:
            self.experiment_id = exp.experiment_id
        self.parent_id: Optional[str] = None

    # -- parent -------------------------------------------------------------------------------
    def start(self) -> str:
        """Reopen the parent run of ``run_id`` if one exists, else create it; log the config."""
        found = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{TAG_RUN_ID}` = '{self.run_id}' and tags.`{TAG_STAGE}` = 'pipeline'")
        if found:
            self._check_same_config(found[0].data.params)
            self.parent_id = found[0].info.run_id
            self.client.update_run(self.parent_id, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment_id, run_name=self.run_id,
                                         tags={TAG_RUN_ID: self.run_id, TAG_STAGE: "pipeline"})
            self.parent_id = run.info.run_id
            items = list(self._params().items())
            for i in range(0, len(items), 100):
                self.client.log_batch(self.parent_id, params=[mlflow.entities.Param(k, v) for k, v in items[i : i + 100]])
            self.client.log_text(self.parent_id, self.cfg.model_dump_json(indent=1), "config.json")
        return self.parent_id

    def _params(self) -> dict[str, str]:
        params = flatten(self.cfg)
        params["train.bn_mode"] = self.cfg.train.bn_mode  # the resolved BN mode, not just the knob
        return {k: v[:6000] for k, v in params.items()}

    def _check_same_config(self, logged: dict[str, str]) -> None:
        """A resumed run must keep its config: its params in MLflow describe every stage."""
        changed = [(k, logged.get(k), v) for k, v in self._params().items() if logged.get(k) != v]
        if changed:
            k, old, new = changed[0]
            more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
            raise ConfigError(
                f"--run-id {self.run_id}: that run was started with {k}={old}, not {new}{more}; "
                "resume with the same recipe and --set values, or start a new run without --run-id")

    def finish(self, ok: bool, summary: Optional[dict] = None) -> None:
        if summary:
            self.client.log_batch(self.parent_id, metrics=[Metric(k, float(v), 0, 0) for k, v in summary.items()])
        self.client.set_terminated(self.parent_id, "FINISHED" if ok else "FAILED")

    # -- children -----------------------------------------------------------------------------
    def _child(self, stage: str) -> str:
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{TAG_RUN_ID}` = '{self.run_id}' and tags.`{TAG_STAGE}` = '{stage}'")
        if found:
            return found[0].info.run_id
        run = self.client.create_run(
            self.experiment_id, run_name=stage,
            tags={TAG_RUN_ID: self.run_id, TAG_STAGE: stage, "mlflow.parentRunId": self.parent_id})
        return run.info.run_id

    def stage_skipped(self, stage: str) -> None:
        self.client.set_tag(self._child(stage), "bnflow.skipped", "complete from an earlier attempt")

    @contextlib.contextmanager
    def stage(self, stage: str, section):
        child = self._child(stage)
        self.client.update_run(child, status="RUNNING")
        params = flatten(section, prefix=f"{stage}.")
        if stage == "train":
            params["train.bn_mode"] = section.bn_mode
        existing = self.client.get_run(child).data.params
        new = [mlflow.entities.Param(k, v[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(child, params=new[i : i + 100])
        try:
            yield _StageRun(self, stage, child)
        except BaseException:
            self.client.set_terminated(child, "FAILED")
            raise
        self.client.set_terminated(child, "FINISHED")


class _StageRun:
    def __init__(self, tracker: Tracker, stage: str, run_id: str):
        self.tracker, self.stage, self.run_id = tracker, stage, run_id
        self.client = tracker.client

    def epoch_logger(self) -> EpochLogger:
        return EpochLogger(self.tracker.uri, self.run_id)

    def log_outputs(self, outputs: dict) -> None:
        for name, art in outputs.items():
            if isinstance(art, A.Dataset):
                self._log_dataset(name, art)
            elif isinstance(art, A.NormStatsFile):
                self.client.log_artifact(self.run_id, art.path)
                self.client.set_tag(self.run_id, "bnflow.norm_stats_version", art.version)
                dropped = json.loads(Path(art.path).read_text()).get("dropped_rows", {})
                self.client.log_batch(self.run_id, metrics=[
                    Metric(f"dropped_rows_{split}", float(dropped.get(split, 0)), 0, 0) for split in ("train", "val", "test")])
            elif isinstance(art, A.Checkpoint):
                self._log_model(name, art)
            elif isinstance(art, A.TrainHistory):
                self.client.log_artifact(self.run_id, art.path)
                self.client.set_tag(self.run_id, "bnflow.bn_mode", self.tracker.cfg.train.bn_mode)
            elif isinstance(art, A.Evaluation):
                metrics = [Metric(k, float(v), 0, 0) for k, v in art.metrics.items()]
                self.client.log_batch(self.run_id, metrics=metrics)
                for f in art.files:
                    self.client.log_artifact(self.run_id, f)

    def _log_dataset(self, name: str, ds: A.Dataset) -> None:
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import InputTag

        inputs = []
        for split, info in ds.splits.items():
            # MLflow's own dataset digest hashes only the first 10,000 rows: carry ours, over all bytes.
            meta = MetaDataset(resolve_dataset_source(Path(info.path).as_uri()), name=f"{name}/{split}", digest=info.digest[:32])
            entity = meta._to_mlflow_entity()
            inputs.append(mlflow.entities.DatasetInput(entity, tags=[InputTag("mlflow.data.context", split),
                                                                     InputTag("bnflow.rows", str(info.rows)),
                                                                     InputTag("bnflow.sha256", info.digest)]))
        self.client.log_inputs(self.run_id, datasets=inputs)

    def _log_model(self, name: str, ckpt: A.Checkpoint) -> None:
        import numpy as np
        import torch
        from mlflow.models import infer_signature

        from tasks.nn.models import served_model

        state = torch.load(ckpt.path, weights_only=False)
        model = served_model(state)
        example = np.zeros((2, state["spec"]["num_features"]), dtype=np.float32)
        with torch.no_grad():
            logits = model(torch.from_numpy(example)).numpy()
        self.client.log_artifact(self.run_id, ckpt.path, artifact_path=f"checkpoints/{name}")
        register = self.tracker.cfg.tracking.register_model if name == "recalibrated" else None
        with mlflow.start_run(run_id=self.run_id, nested=True):
            mlflow.pytorch.log_model(
                model, name=f"model_{name}", signature=infer_signature(example, logits), input_example=example,
                # pickle, not pt2: a traced graph would pin the batch size of the example.
                serialization_format="pickle",
                code_paths=[str(PROJECT_ROOT / "tasks"), str(PROJECT_ROOT / "schemas")],
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", "pydantic", "pyarrow"],
                registered_model_name=register,
            )
