"""One search trial, in its Ray Tune actor: the DAG's train node for the trial's config, logging to
the trial's MLflow run (made by the driver) and reporting every finished epoch to Tune.

This is the one place where a trial's epochs are reported to Tune (``report``).
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

from pipeline import dag, runner
from schemas import artifacts as A
from schemas.config import PipelineConfig
from schemas.errors import TrainingDiverged


def trial_main(config: dict, shared: dict) -> None:
    """A Tune function trainable: the train node of the DAG for one trial's config.

    It runs in a Tune actor, which on a cluster is not a child of the command's process: the
    process settings of ``pipeline.quiet.configure`` that MLflow needs (telemetry off) are made here,
    before MLflow is imported."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from pipeline.tracking.runs import Tracker

    spec = config["spec"]
    cfg = PipelineConfig.model_validate(spec["cfg"])
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": shared["uri"]})})
    given = {name: getattr(A, kind).model_validate(body) for name, (kind, body) in shared["given"].items()}
    tracker = Tracker(cfg, shared["search_id"])
    tracker.attach(shared["parent"], {"train": spec["run_id"]})
    try:
        runner.run(cfg, spec["trial"], TrialTracking(tracker), nodes=dag.select("train"), given=given)
    except TrainingDiverged:  # an outcome of searching, not a crash: the driver reads diverged.txt (no traceback)
        return


def report(epoch: int, metrics: dict) -> None:
    """One finished epoch to Tune (ASHA's time unit is the epoch)."""
    from ray import tune

    tune.report({"epoch": int(epoch), **{k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}})


class TrialTracking:
    """What the runner records inside a trial: the tracker's runs, every epoch also reported to
    Tune, and no logged model (16 trials, 16 models nobody serves: the winner's recalibrated model
    is logged by the search's recalibrate stage)."""

    def __init__(self, tracker):
        self.tracker = tracker

    def stage_skipped(self, stage: str, section, derived=None, outputs: Optional[dict] = None) -> None:
        # Complete from an earlier attempt: Tune still needs its epochs to rank it.
        for e in (outputs or {})["history"].epochs:
            report(int(e["epoch"]), {k: v for k, v in e.items() if k != "epoch"})
        self.tracker.stage_skipped(stage, section, derived, _without_models(outputs or {}))

    @contextlib.contextmanager
    def stage(self, stage: str, section, derived=None):
        with self.tracker.stage(stage, section, derived) as run:
            yield _TrialStageRun(run)


class _TrialStageRun:
    def __init__(self, run):
        self.run = run

    def epoch_logger(self):
        log = self.run.epoch_logger()

        def both(epoch: int, metrics: dict) -> Optional[str]:
            note = log(epoch, metrics)
            report(epoch, metrics)
            return note
        return both

    def log_outputs(self, outputs: dict) -> None:
        self.run.log_outputs(_without_models(outputs))


def _without_models(outputs: dict) -> dict:
    return {k: v for k, v in outputs.items() if not isinstance(v, A.Checkpoint)}
