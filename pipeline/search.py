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

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from ray.tune import Callback

from pipeline import runner, space as S
from pipeline.dag import DATA, FINISH, TRAIN
from pipeline.tracking import TAG_RUN_ID, TAG_STAGE, Tracker
from schemas import artifacts as A
from schemas.config import PipelineConfig
from schemas.errors import ConfigError, TrainingDiverged
from tasks.console import say

TRIAL_MEMORY = 512 * 2**20  # bytes a trial's own process reserves
TRIALS_DIR = "trials"
RESULT_FILE = "result.json"
TAG_KIND = "bnflow.kind"  # "search" on a search's parent run
TAG_TRIAL = "bnflow.trial"
TAG_ROUND = "bnflow.round"
TAG_TRIAL_STATUS = "bnflow.trial_status"
# Tune settings for an embedded search: Ctrl-C must reach bnflow (which marks runs KILLED and says
# how to resume) instead of Tune's own handler, which would end the round as if it were complete;
# trials keep the driver's working directory (relative paths in a recipe mean the same there); its
# console table stays off (bnflow says one line per finished trial); a result without the metric
# (a diverged trial's end, an epoch without validation under train.eval_every > 1) is not an error:
# ASHA skips it.
TUNE_SETTINGS = {"TUNE_DISABLE_SIGINT_HANDLER": "1", "RAY_CHDIR_TO_TRIAL_DIR": "0", "RAY_AIR_NEW_OUTPUT": "0",
                 "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1"}


@dataclass(frozen=True)
class Trial:
    id: str  # r<round>-t<index>: sorts in sampling order
    round: int
    values: dict[str, Any]


@dataclass
class Outcome:
    """What a trial came to; the content of its ``result.json``."""

    trial: str
    round: int
    values: dict[str, Any]
    status: str  # completed | stopped (by successive halving) | failed
    score: Optional[float]  # the metric at its last reported epoch; None when it reported none
    epochs: int
    epoch_seconds: float  # its epochs' compute, summed
    note: str = ""
    run_id: str = ""  # its MLflow run

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.__dict__, indent=1, default=_plain))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "Outcome":
        return cls(**json.loads(path.read_text()))


def _plain(value):
    return value.item() if isinstance(value, np.generic) else list(value) if isinstance(value, tuple) else str(value)


# -- the plan: checked before anything runs --------------------------------------------------------
def plan(cfg: PipelineConfig) -> dict[str, S.Dim]:
    """The search space of ``cfg.search``, every field and bound checked against the config.

    Raises:
        ConfigError: an empty space, a field outside train.*, an unknown field (with a "did you
            mean"), a distribution that does not parse, a bound the field refuses, or fewer trials
            than two per round.
    """
    from pipeline import recipes

    s = cfg.search
    if not s.space:
        raise ConfigError("search.space: empty; give the fields to search in the recipe's search: section or with "
                          "--set 'search.space.train.optimizer.lr=loguniform(1e-3, 1)'")
    if s.rounds > 1 and s.trials < 2 * s.rounds:
        raise ConfigError(f"search.trials={s.trials}: {s.rounds} rounds need at least {2 * s.rounds} trials (two per round "
                          "to narrow around); raise --trials or lower --stages")
    dims = {}
    for name, text in sorted(s.space.items()):
        if not name.startswith("train.") or name in ("train.workers", "train.cpus_per_worker", "train.use_gpu"):
            raise ConfigError(f"search.space.{name}: only train.* fields other than workers, cpus_per_worker and use_gpu "
                              "can be searched (the data stages run once for every trial; the trials share the cluster)")
        dim = S.parse(name, text)
        probes = dim.choices if dim.kind == "choice" else (dim._from(dim.bounds()[0]), dim._from(dim.bounds()[1]))
        for value in probes:
            try:
                recipes.with_values(cfg, {name: value})
            except ConfigError as e:
                raise ConfigError(f"search.space.{name}={text}: {e}") from None
        dims[name] = dim
    return dims


def round_sizes(trials: int, rounds: int) -> list[int]:
    return [trials // rounds + (1 if r < trials % rounds else 0) for r in range(rounds)]


def round_seed(seed: int, round_: int) -> int:
    return int(np.random.SeedSequence([seed, round_]).generate_state(1)[0])


def concurrency(cfg: PipelineConfig, cluster_cpus: float) -> int:
    """Trials at once: what the cluster's CPUs hold (each trial's workers reserve theirs), capped
    by ``search.parallel``."""
    per_trial = cfg.train.workers * cfg.train.cpus_per_worker
    fits = max(1, int(cluster_cpus // per_trial))
    return min(fits, cfg.search.parallel) if cfg.search.parallel else fits


# -- the search ------------------------------------------------------------------------------------
@dataclass
class SearchResult:
    outcomes: list[Outcome]
    best: Outcome
    produced: dict
    space_per_round: list[dict[str, S.Dim]]
    seconds: dict[str, float] = field(default_factory=dict)


def search(cfg: PipelineConfig, search_id: str, tracker: Tracker, dims: dict[str, S.Dim]) -> SearchResult:
    """Run (or resume) search ``search_id`` end to end; the caller holds its lease and its open
    parent run (``tracker``).

    Raises:
        ConfigError: no trial completed (every one failed or diverged).
    """
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    root = Path(cfg.storage).resolve() / search_id
    data = runner.run(cfg, search_id, tracker, nodes=DATA)
    seconds["data_s"] = time.perf_counter() - t0
    given = {k: data[k] for k in ("data", "norm_stats")}
    outcomes: list[Outcome] = []
    spaces = []
    current = dims
    t_trials = time.perf_counter()
    sizes = round_sizes(cfg.search.trials, cfg.search.rounds)
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
                  for i, values in enumerate(S.sample(current, n, round_seed(cfg.search.seed, r)), 1)]
        say(f"search round {r}/{len(sizes)}: {n} trials in " + ", ".join(f"{k}={d}" for k, d in current.items()))
        outcomes += _round(cfg, search_id, tracker, root, trials, given)
    seconds["trials_s"] = time.perf_counter() - t_trials
    seconds["epochs_s"] = sum(o.epoch_seconds for o in outcomes)

    best = _best(outcomes, cfg.search.direction)
    if best is None:
        raise ConfigError(f"search {search_id}: no trial completed; every one failed or diverged (see the trial runs' "
                          "bnflow.trial_status): lower the learning-rate range or add train.grad_clip_norm")
    say(f"search: best trial {best.trial} ({cfg.search.metric}={best.score:.4f}): "
        + ", ".join(f"{k}={_fmt(v)}" for k, v in best.values.items()))
    t_finish = time.perf_counter()
    winner = _trial_config(cfg, search_id, best.values)
    trained = runner.run(winner, best.trial, _NoTracking(), nodes=TRAIN, given=given)  # complete: read from its manifest
    finish_cfg = winner.model_copy(update={"storage": cfg.storage})
    produced = runner.run(finish_cfg, search_id, tracker, nodes=FINISH,
                          given={**data, "trained": trained["trained"], "history": trained["history"]})
    seconds["finish_s"] = time.perf_counter() - t_finish
    seconds["wall_s"] = time.perf_counter() - t0
    return SearchResult(outcomes, best, produced, spaces, seconds)


def _best(outcomes: list[Outcome], mode: str) -> Optional[Outcome]:
    done = [o for o in outcomes if o.status == "completed" and o.score is not None and math.isfinite(o.score)]
    if not done:
        return None
    return sorted(done, key=lambda o: (-o.score if mode == "max" else o.score, o.trial))[0]


def ranked(outcomes: list[Outcome], mode: str) -> list[Outcome]:
    """Best first: scored trials by score (ties by id), then the ones without a score."""
    def key(o: Outcome):
        if o.score is None or not math.isfinite(o.score):
            return (1, 0.0, o.trial)
        return (0, -o.score if mode == "max" else o.score, o.trial)
    return sorted(outcomes, key=key)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _trial_config(cfg: PipelineConfig, search_id: str, values: dict) -> PipelineConfig:
    from pipeline import recipes

    trial = recipes.with_values(cfg, values)
    budget = cfg.search.epochs or cfg.train.epochs
    update = {"storage": str(Path(cfg.storage).resolve() / search_id / TRIALS_DIR), "reuse": ()}
    if "train.epochs" not in values:
        trial = recipes.with_values(trial, {"train.epochs": budget})
    return trial.model_copy(update=update)


def _round(cfg: PipelineConfig, search_id: str, tracker: Tracker, root: Path, trials: list[Trial], given: dict) -> list[Outcome]:
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
            say(f"search trial {t.id}: {done[t.id].status} in an earlier attempt, not repeated")
        else:
            todo.append(t)
    if not todo:
        return [done[t.id] for t in trials]
    budget = cfg.search.epochs or cfg.train.epochs
    runs = {t.id: _trial_run(tracker, t) for t in todo}
    specs = [{"trial": t.id, "round": t.round, "values": t.values, "run_id": runs[t.id],
              "cfg": _trial_config(cfg, search_id, t.values).model_dump(mode="json")} for t in todo]
    shared = {"search_id": search_id, "parent": tracker.parent_id, "uri": tracker.uri,
              "given": {k: (type(v).__name__, v.model_dump(mode="json")) for k, v in given.items()}}
    parallel = concurrency(cfg, ray.cluster_resources().get("CPU", 1))
    recorder = _Recorder(root / TRIALS_DIR, tracker, cfg.search.metric, budget, len(trials), len(done))
    trainable = tune.with_parameters(_trial_main, shared=shared)
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
    tracker._log_params(run.info.run_id, {f"search.{k}": _fmt(v) for k, v in t.values.items()})
    return run.info.run_id


class _Recorder(Callback):
    """Tune callback in the driver: keeps each trial's reports, and when Tune is done with a trial
    writes its outcome beside it and marks its MLflow run."""

    def __init__(self, trials_dir: Path, tracker: Tracker, metric: str, budget: int, total: int, done: int):
        self.trials_dir, self.tracker, self.metric, self.budget = trials_dir, tracker, metric, budget
        self.total, self.finished = total, done
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
        say(f"search trial {out.trial} ({self.finished}/{self.total} of round {out.round}): {status}, {score}; "
            + ", ".join(f"{k.removeprefix('train.')}={_fmt(v)}" for k, v in out.values.items())
            + ("" if status == "completed" else f" ({note})"))


def _diverged(trial_dir: Path) -> Path | None:
    from tasks.train import DIVERGED_FILE

    path = trial_dir / "train.partial" / DIVERGED_FILE
    return path if path.exists() else None


def _trial_error(trial_dir: Path) -> str:
    failed = _diverged(trial_dir)
    return f"diverged: {failed.read_text().strip()[:200]}" if failed else "failed (see the Ray Tune trial's error file)"


# -- the search's record in MLflow -------------------------------------------------------------------
def record(tracker: Tracker, result: SearchResult) -> None:
    """On the search's parent run: the ranking table (CSV and an MLflow table), the score against
    every searched field (log axes where sampled on a log scale), the winner, the counts and where
    the seconds went; each trial run gets its rank."""
    import tempfile

    from mlflow.entities import Metric, RunTag

    cfg = tracker.cfg
    order = ranked(result.outcomes, cfg.search.direction)
    fields = sorted(result.space_per_round[0])
    rows = [{"rank": i, "trial": o.trial, "round": o.round, cfg.search.metric: o.score, "status": o.status, "epochs": o.epochs,
             **{f: o.values[f] for f in fields}, "note": o.note, "run_id": o.run_id} for i, o in enumerate(order, 1)]
    client = tracker.client
    with tempfile.TemporaryDirectory() as d:
        table = Path(d) / "search_trials.csv"
        _write_csv(table, rows)
        plot = Path(d) / "search_scores.png"
        plot_scores(result, cfg.search.metric, plot)
        for f in (table, plot):
            client.log_artifact(tracker.parent_id, str(f), artifact_path="search")
    client.log_table(tracker.parent_id, data={k: [_cell(r[k]) for r in rows] for k in rows[0]}, artifact_file="search/trials_table.json")
    counts = {s: sum(o.status == s for o in result.outcomes) for s in ("completed", "stopped", "failed")}
    metrics = {f"search_best_{cfg.search.metric}": result.best.score, "search_trials": len(result.outcomes),
               **{f"search_{k}": v for k, v in counts.items()}, **{f"search_{k}": v for k, v in result.seconds.items()}}
    if result.seconds.get("epochs_s"):
        metrics["search_wall_over_epochs"] = result.seconds["wall_s"] / result.seconds["epochs_s"]
    tags = {"bnflow.search.best_trial": result.best.trial, "bnflow.search.best_run": result.best.run_id}
    client.log_batch(tracker.parent_id, metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()],
                     tags=[RunTag(k, v) for k, v in tags.items()])
    tracker._log_params(tracker.parent_id, {f"best.{k}": _fmt(v) for k, v in result.best.values.items()})
    for i, o in enumerate(order, 1):
        if o.run_id:
            client.set_tag(o.run_id, "bnflow.rank", str(i))


def _cell(value):
    return value if isinstance(value, (int, float, str)) or value is None else json.dumps(value, default=_plain)


def _write_csv(path: Path, rows: list[dict]) -> None:
    import csv

    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: _cell(v) for k, v in r.items()})


def plot_scores(result: SearchResult, metric: str, path: Path) -> None:
    """One panel per searched field: each trial's score against its value, coloured by round;
    hollow: stopped early; a star: the winner. Log x axes for log-sampled fields (1 - beta for
    one_minus_loguniform, the quantity that is log-uniform)."""
    import matplotlib.ticker

    from tasks.evaluate import pyplot

    plt = pyplot()

    dims = result.space_per_round[0]
    fields = sorted(dims)
    fig, axes = plt.subplots(1, len(fields), figsize=(4.2 * len(fields), 3.6), squeeze=False)
    colours = plt.get_cmap("viridis")
    rounds = max(o.round for o in result.outcomes)
    scored = [o for o in result.outcomes if o.score is not None and math.isfinite(o.score)]
    for ax, f in zip(axes[0], fields):
        dim = dims[f]
        flip = dim.kind == "one_minus_loguniform"
        for o in scored:
            v = o.values[f]
            x = (1.0 - v) if flip else (str(v) if dim.kind == "choice" else v)
            c = colours((o.round - 1) / max(rounds - 1, 1))
            ax.scatter([x], [o.score], s=40, facecolors=c if o.status == "completed" else "none", edgecolors=c)
        b = result.best.values[f]
        ax.scatter([(1.0 - b) if flip else (str(b) if dim.kind == "choice" else b)], [result.best.score], marker="*", s=220,
                   c="crimson", zorder=3, label=f"best {result.best.trial}")
        if dim.log_scale:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap
        ax.set_xlabel(f"1 - {f}" if flip else f)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="best", fontsize=8)
    fig.suptitle(f"{len(result.outcomes)} trials in {rounds} round(s): colour = round (dark: first), hollow = stopped early")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- one trial, in its Tune actor --------------------------------------------------------------------
def _trial_main(config: dict, shared: dict) -> None:
    """A Tune function trainable: the train node of the DAG for one trial's config."""
    spec = config["spec"]
    cfg = PipelineConfig.model_validate(spec["cfg"])
    given = {name: getattr(A, kind).model_validate(body) for name, (kind, body) in shared["given"].items()}
    tracker = _TrialTracker(cfg, shared, spec)
    try:
        runner.run(cfg, spec["trial"], tracker, nodes=TRAIN, given=given)
    except TrainingDiverged:  # an outcome of searching, not a crash: the driver reads diverged.txt (no traceback)
        return


def _report(epoch: int, metrics: dict) -> None:
    from ray import tune

    tune.report({"epoch": int(epoch), **{k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}})


class _TrialTracker(Tracker):
    """The runner's tracker inside a trial: the train stage's run is the trial's own run (made by
    the driver), and every epoch also goes to Tune."""

    def __init__(self, cfg: PipelineConfig, shared: dict, spec: dict):
        cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": shared["uri"]})})
        super().__init__(cfg, shared["search_id"])
        self.parent_id = shared["parent"]
        self.trial_run = spec["run_id"]

    def _find(self, stage: str):
        return self.client.get_run(self.trial_run)

    def _child(self, stage: str) -> str:
        return self.trial_run

    def stage_skipped(self, stage: str, section, derived=None, outputs: Optional[dict] = None) -> None:
        # Complete from an earlier attempt: Tune still needs its epochs to rank it.
        for e in (outputs or {})["history"].epochs:
            _report(int(e["epoch"]), {k: v for k, v in e.items() if k != "epoch"})
        super().stage_skipped(stage, section, derived, outputs)

    @contextlib.contextmanager
    def stage(self, stage: str, section, derived=None):
        with super().stage(stage, section, derived) as run:
            yield _TrialStageRun(run)


class _TrialStageRun:
    def __init__(self, run):
        self.run = run

    def epoch_logger(self):
        log = self.run.epoch_logger()

        def both(epoch: int, metrics: dict) -> Optional[str]:
            note = log(epoch, metrics)
            _report(epoch, metrics)
            return note
        return both

    def log_outputs(self, outputs: dict) -> None:
        # A trial's model is not logged (16 trials, 16 models nobody serves): the winner's
        # recalibrated model is, by the search's recalibrate stage.
        self.run.log_outputs({k: v for k, v in outputs.items() if not isinstance(v, A.Checkpoint)})


class _NoTracking:
    """For reading a complete stage back through the runner, which then records nothing."""

    def stage_skipped(self, *args, **kwargs) -> None:
        pass

    def stage(self, *args, **kwargs):
        raise RuntimeError("the winner's train stage is not complete on disk")
