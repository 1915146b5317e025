"""``python -m pipeline search``: hyperparameter search the way the course teaches it.

    ingest -> normalize              once, in ``<storage>/<search id>/`` (every trial reads them)
    round 1 .. K                     random trials of the train stage on Ray Tune; successive
                                     halving (ASHA) stops the bad ones at its rungs; each next
                                     round samples a space narrowed around the best so far
    recalibrate -> evaluate          the winner's checkpoint, like a normal run (and the champion
                                     gate when ``tracking.register_model`` is set)

A trial is the DAG's train node, walked by the same runner as ``run`` (a trial's directory
``<storage>/<search id>/trials/<trial>/`` holds its resumable ``train.partial`` and, once complete,
its manifest), inside a Tune function trainable that builds and fits its own ``TorchTrainer``
(Train V2 trainers are not Tune trainables). The trainable reserves no CPU of its own: its
trainer's workers reserve theirs, and Tune runs at most as many trials at once as the cluster's
CPUs hold, so trials cannot deadlock waiting for each other's workers.

Every trial reports each finished epoch to Tune (for ASHA, ``time_attr="epoch"``) and to its own
MLflow run, nested under the search's parent run, from the trial's process only (one writer; a
retried epoch is not logged twice). The driver writes ``result.json`` beside a trial when Tune is
done with it: a search rerun with ``--search-id`` skips those trials, resumes an interrupted one
from its last epoch, and samples the same configurations (round k draws from seed (search.seed, k)
in a space that depends only on earlier rounds' results).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from ray.tune import Callback

from pipeline import dag, runner, warm_start
from pipeline.search import space as S
from pipeline.search import plan
from pipeline.search.plan import (RESULT_FILE, TAG_ROUND, TAG_TRIAL, TAG_TRIAL_STATUS, TRIALS_DIR, Outcome, SearchResult,
                                  Trial, fmt)
from pipeline.search.trial import trial_main
from pipeline.tracking.runs import TAG_RUN_ID, TAG_STAGE, Tracker
from schemas.config import PipelineConfig
from schemas.errors import ConfigError
from tasks.console import Console

TRIAL_MEMORY = 512 * 2**20  # bytes a trial's own process reserves
# Tune settings for an embedded search: Ctrl-C must reach bnflow (which marks runs KILLED and says
# how to resume) instead of Tune's own handler, which would end the round as if it were complete;
# trials keep the driver's working directory (relative paths in a recipe mean the same there); its
# console table stays off (bnflow says one line per finished trial); a result without the metric
# (a diverged trial's end, an epoch without validation under train.eval_every > 1) is not an error:
# ASHA skips it.
TUNE_SETTINGS = {"TUNE_DISABLE_SIGINT_HANDLER": "1", "RAY_CHDIR_TO_TRIAL_DIR": "0", "RAY_AIR_NEW_OUTPUT": "0",
                 "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1"}


# -- the search ------------------------------------------------------------------------------------
def search(cfg: PipelineConfig, search_id: str, tracker: Tracker, dims: dict[str, S.Dim], console: Console) -> SearchResult:
    """Run (or resume) search ``search_id`` end to end; the caller holds its lease and its open
    parent run (``tracker``).

    Raises:
        ConfigError: no trial completed (every one failed or diverged).
    """
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    root = Path(cfg.storage).resolve() / search_id
    data = runner.run(cfg, search_id, tracker, nodes=dag.select("ingest", "normalize"), console=console)
    seconds["data_s"] = time.perf_counter() - t0
    given = {k: data[k] for k in ("data", "norm_stats")}
    weights = warm_start.given(cfg, root)["weights"]
    if weights is not None:  # every trial, and the winner, start from the same warm start
        given["weights"] = weights
    outcomes: list[Outcome] = []
    spaces = []
    current = dims
    t_trials = time.perf_counter()
    sizes = plan.round_sizes(cfg.search.trials, cfg.search.rounds)
    for r, n in enumerate(sizes, 1):
        if r > 1:
            scored = [(o.values, o.score) for o in outcomes
                      if o.status != "failed" and o.score is not None and math.isfinite(o.score)]
            if len(scored) < 2:
                raise ConfigError(f"search {search_id}: fewer than two trials gave a score before round {r}; every other "
                                  "one failed: widen or move search.space (see the trial runs' bnflow.trial_status)")
            current = S.narrow(current, scored, cfg.search.direction, keep=cfg.search.keep, margin=cfg.search.margin)
        spaces.append(current)
        trials = [Trial(f"r{r}-t{i:02d}", r, values)
                  for i, values in enumerate(S.sample(current, n, plan.round_seed(cfg.search.seed, r)), 1)]
        console.say(f"search round {r}/{len(sizes)}: {n} trials in " + ", ".join(f"{k}={d}" for k, d in current.items()))
        outcomes += _round(cfg, search_id, tracker, root, trials, given, console)
    seconds["trials_s"] = time.perf_counter() - t_trials
    seconds["epochs_s"] = sum(o.epoch_seconds for o in outcomes)

    best = plan.best(outcomes, cfg.search.direction)
    if best is None:
        raise ConfigError(f"search {search_id}: no trial completed; every one failed or diverged (see the trial runs' "
                          "bnflow.trial_status): lower the learning-rate range or add train.grad_clip_norm")
    console.say(f"search: best trial {best.trial} ({cfg.search.metric}={best.score:.4f}): "
        + ", ".join(f"{k}={fmt(v)}" for k, v in best.values.items()))
    t_finish = time.perf_counter()
    winner = plan.trial_config(cfg, search_id, best.values)
    trained = runner.run(winner, best.trial, _NoTracking(), nodes=dag.select("train"), given=given, console=console)  # complete: read from its manifest
    finish_cfg = winner.model_copy(update={"storage": cfg.storage})
    produced = runner.run(finish_cfg, search_id, tracker, nodes=dag.select("recalibrate", "evaluate"), console=console,
                          given={**data, "trained": trained["trained"], "history": trained["history"]})
    seconds["finish_s"] = time.perf_counter() - t_finish
    seconds["wall_s"] = time.perf_counter() - t0
    return SearchResult(outcomes, best, produced, spaces, seconds)


def _round(cfg: PipelineConfig, search_id: str, tracker: Tracker, root: Path, trials: list[Trial], given: dict,
           console: Console) -> list[Outcome]:
    """One round's trials on Ray Tune; the outcomes of all of them (earlier attempts' included)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    for key, value in TUNE_SETTINGS.items():
        os.environ.setdefault(key, value)
    done: dict[str, Outcome] = {}
    todo = []
    for t in trials:
        path = root / TRIALS_DIR / t.id / RESULT_FILE
        if path.exists():
            done[t.id] = Outcome.load(path)
            console.say(f"search trial {t.id}: {done[t.id].status} in an earlier attempt, not repeated")
        else:
            todo.append(t)
    if not todo:
        return [done[t.id] for t in trials]
    budget = cfg.search.epochs or cfg.train.epochs
    runs = {t.id: _trial_run(tracker, t) for t in todo}
    specs = [{"trial": t.id, "round": t.round, "values": t.values, "run_id": runs[t.id],
              "cfg": plan.trial_config(cfg, search_id, t.values).model_dump(mode="json")} for t in todo]
    shared = {"search_id": search_id, "parent": tracker.parent_id, "uri": tracker.uri,
              "given": {k: (type(v).__name__, v.model_dump(mode="json")) for k, v in given.items()}}
    parallel = plan.concurrency(cfg, ray.cluster_resources().get("CPU", 1))
    recorder = _Recorder(root / TRIALS_DIR, tracker, cfg.search.metric, budget, len(trials), len(done), console)
    trainable = tune.with_parameters(trial_main, shared=shared)
    tuner = tune.Tuner(
        # No CPU of its own: the trial's Ray Train workers reserve theirs (see the module docstring).
        # Its memory (the process imports torch) is what makes its bundle non-empty, as Tune requires.
        tune.with_resources(trainable, {"cpu": 0, "memory": TRIAL_MEMORY}),
        param_space={"spec": tune.grid_search(specs)},
        tune_config=tune.TuneConfig(
            # max_t one past the budget: ASHA stops a trial that reaches max_t, which would kill a
            # finishing trial before its train stage is published.
            scheduler=ASHAScheduler(time_attr="epoch", metric=cfg.search.metric, mode=cfg.search.direction, max_t=budget + 1,
                                    grace_period=min(cfg.search.grace_epochs, budget),
                                    reduction_factor=cfg.search.reduction_factor),
            # No actor reuse: it saved ~6 s a trial (4 digits trials: 126 -> 102 s), but a trial
            # that ASHA stops leaves its fit() thread, controller and workers running in a reused
            # actor, holding the CPUs the next trial waits for; a new actor per trial kills them.
            max_concurrent_trials=parallel, reuse_actors=False),
        run_config=tune.RunConfig(name=f"round{trials[0].round}", storage_path=str(root / "tune"), callbacks=[recorder, _quiet_progress()],
                                  verbose=0, failure_config=tune.FailureConfig(max_failures=0)),
    )
    tuner.fit()
    missing = [t.id for t in todo if t.id not in recorder.outcomes]
    if missing:  # Tune ended without reporting them (it should not): say so rather than score them
        raise RuntimeError(f"search {search_id}: Ray Tune ended without finishing trials {missing}; rerun with --search-id {search_id}")
    return [done.get(t.id) or recorder.outcomes[t.id] for t in trials]


def _quiet_progress():
    """Tune's legacy console callback, silent: without one of its own Tune adds one, which prints
    "Trial ... completed. Last result: ..." whatever the verbosity (bnflow says one line per trial)."""
    from ray.tune.progress_reporter import TrialProgressCallback

    class Quiet(TrialProgressCallback):
        def _print(self, msg: str) -> None:
            pass

    return Quiet()


def _trial_run(tracker: Tracker, t: Trial) -> str:
    """The trial's MLflow run under the search's parent (found again on a rerun, never doubled)."""
    client = tracker.client
    found = client.search_runs([tracker.experiment_id], filter_string=(
        f"tags.`{TAG_RUN_ID}` = '{tracker.run_id}' and tags.`{TAG_STAGE}` = 'trial' and tags.`{TAG_TRIAL}` = '{t.id}'"))
    if found:
        return found[0].info.run_id
    run = client.create_run(tracker.experiment_id, run_name=t.id, tags={
        **tracker.tags, TAG_RUN_ID: tracker.run_id, TAG_STAGE: "trial", TAG_TRIAL: t.id, TAG_ROUND: str(t.round),
        "mlflow.parentRunId": tracker.parent_id})
    tracker.log_params(run.info.run_id, {f"search.{k}": fmt(v) for k, v in t.values.items()})
    return run.info.run_id


class _Recorder(Callback):
    """Tune callback in the driver: keeps each trial's reports, and when Tune is done with a trial
    writes its outcome beside it and marks its MLflow run."""

    def __init__(self, trials_dir: Path, tracker: Tracker, metric: str, budget: int, total: int, done: int,
                 console: Console):
        self.trials_dir, self.tracker, self.metric, self.budget = trials_dir, tracker, metric, budget
        self.total, self.finished, self.console = total, done, console
        self.reports: dict[str, list[dict]] = {}
        self.outcomes: dict[str, Outcome] = {}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.reports.setdefault(trial.config["spec"]["trial"], []).append(result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial, error=None)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, error=getattr(trial, "error_file", None) or "error")

    def _finish(self, trial, error) -> None:
        spec = trial.config["spec"]
        reports = self.reports.get(spec["trial"], [])
        epochs = int(max((r.get("epoch", 0) for r in reports), default=0))
        complete = (self.trials_dir / spec["trial"] / "train" / runner.MANIFEST).exists()
        scores = [r[self.metric] for r in reports if self.metric in r]
        if error is not None or _diverged(self.trials_dir / spec["trial"]):
            status, note = "failed", _trial_error(self.trials_dir / spec["trial"])
        elif complete:
            status, note = "completed", f"ran {epochs} epochs"
        else:
            status, note = "stopped", f"stopped by successive halving after epoch {epochs} of {self.budget}"
        out = Outcome(spec["trial"], spec["round"], spec["values"], status, float(scores[-1]) if scores else None, epochs,
                      float(sum(r.get("epoch_seconds", 0.0) for r in reports)), note, spec["run_id"])
        out.save(self.trials_dir / spec["trial"] / RESULT_FILE)
        self.outcomes[out.trial] = out
        self.finished += 1
        client = self.tracker.client
        client.set_tag(out.run_id, TAG_TRIAL_STATUS, f"{status}: {note}")
        if client.get_run(out.run_id).info.status in ("RUNNING", "SCHEDULED"):
            client.set_terminated(out.run_id, "FAILED" if status == "failed" else "FINISHED")
        score = f"{self.metric}={out.score:.4f}" if out.score is not None else "no score"
        self.console.say(f"search trial {out.trial} ({self.finished}/{self.total} of round {out.round}): {status}, {score}; "
            + ", ".join(f"{k.removeprefix('train.')}={fmt(v)}" for k, v in out.values.items())
            + ("" if status == "completed" else f" ({note})"))


def _diverged(trial_dir: Path) -> Path | None:
    from tasks.train import DIVERGED_FILE

    path = trial_dir / "train.partial" / DIVERGED_FILE
    return path if path.exists() else None


def _trial_error(trial_dir: Path) -> str:
    failed = _diverged(trial_dir)
    return f"diverged: {failed.read_text().strip()[:200]}" if failed else "failed (see the Ray Tune trial's error file)"


class _NoTracking:
    """For reading a complete stage back through the runner, which then records nothing."""

    def stage_skipped(self, *args, **kwargs) -> None:
        pass

    def stage(self, *args, **kwargs):
        raise RuntimeError("the winner's train stage is not complete on disk")
