"""``python -m pipeline``: run a recipe, show the resolved config, or print its JSON schema.

A user error (bad recipe, bad data, too many workers, a run id in use) prints one line and exits
with code 2; Ctrl-C exits 130 and SIGTERM 143, with the open MLflow runs marked KILLED.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import secrets
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from schemas.errors import ConfigError, UserError, find_user_error

DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # pipeline.submit's, without importing Ray for --help
EXIT_USER_ERROR = 2
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description="bnflow: BatchNorm training pipeline on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", "run (or resume) a recipe end to end"), ("show-config", "print the resolved config"),
                       ("submit", "run a recipe as a Ray job on a cluster and follow it"),
                       ("schedule", "submit a recipe's job for every due cron slot (a long-running process)"),
                       ("search", "hyperparameter search: random trials on Ray Tune, coarse to fine; the best one recalibrated and evaluated")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--recipe", default=None, help="recipe name (one of the shipped recipes) or a YAML path (default: fashion_mnist)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config field, e.g. --set train.epochs=3 (repeatable)")
    run = sub.choices["run"]
    run.add_argument("--run-id", default=None, help="resume this run id (completed stages are skipped, training continues from its last epoch)")
    _slot_arguments(run)
    run.add_argument("--verbose", action="store_true", help="also show Ray's and MLflow's own logs and the workers' output")
    run.add_argument("--wait-for-lock", action="store_true", help="if another process works on this run id, wait for it instead of exiting")
    submit = sub.choices["submit"]
    submit.add_argument("--address", default=None, help=f"the Ray dashboard's address (default: RAY_ADDRESS, else {DEFAULT_ADDRESS})")
    submit.add_argument("--run-id", default=None, help="the run id (a live job of it is followed, a failed one retried and resumed)")
    _slot_arguments(submit)
    submit.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                        help="follow the job's output and exit with its result (default), or return once submitted")
    submit.add_argument("--verbose", action="store_true", help="the job also shows Ray's and MLflow's own logs")
    srch = sub.choices["search"]
    srch.add_argument("--trials", type=int, default=None, help="trials over all rounds (default: the recipe's search.trials)")
    srch.add_argument("--stages", type=int, default=None, help="coarse-to-fine rounds (default: the recipe's search.rounds)")
    srch.add_argument("--search-id", default=None, help="resume this search (finished trials are not repeated)")
    srch.add_argument("--verbose", action="store_true", help="also show Ray's, Ray Tune's and MLflow's own logs")
    sched = sub.choices["schedule"]
    sched.add_argument("--address", default=None, help=f"the Ray dashboard's address (default: RAY_ADDRESS, else {DEFAULT_ADDRESS})")
    sched.add_argument("--schedule", default=None, metavar="NAME", help="the schedule's name in its run ids (default: the recipe's name)")
    sched.add_argument("--cron", required=True, help="five-field cron expression in UTC, e.g. '0 2 * * *'")
    sched.add_argument("--catchup", default="latest", help="slots missed while no scheduler ran: none, latest (default) or all")
    sched.add_argument("--max-active", type=int, default=1, help="at most this many of the schedule's jobs at once (default 1)")
    sched.add_argument("--overlap", default="queue", help="a slot due while max-active jobs run: queue (default) or skip")
    sched.add_argument("--once", action="store_true", help="submit what is due now and exit (for a cron of your own)")
    sched.add_argument("--verbose", action="store_true", help="the jobs also show Ray's and MLflow's own logs")
    sub.choices["show-config"].add_argument("--json-schema", action="store_true", help="print the config's JSON schema instead")
    adapt = sub.add_parser("adapt", help="re-estimate a logged model's BatchNorm statistics on new unlabeled data (AdaBN)")
    adapt.add_argument("--model", required=True, metavar="URI", help="the logged model, e.g. runs:/RUN_ID/model_recalibrated or models:/NAME@champion")
    adapt.add_argument("--data", required=True, metavar="DIR", help="directory of Parquet files with the new rows' RAW features (labels not needed, never read)")
    adapt.add_argument("--register", default=None, metavar="NAME", help="also register the adapted model under NAME (a new version)")
    adapt.add_argument("--rows", type=int, default=None, help="rows to re-estimate from, a seeded random sample (default: 10,000 or all)")
    adapt.add_argument("--batch-size", type=int, default=256, help="calibration batch size (default 256)")
    adapt.add_argument("--seed", type=int, default=0, help="seed of the row sample (default 0)")
    adapt.add_argument("--experiment", default=None, help="MLflow experiment of the new run (default: the source run's)")
    adapt.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    adapt.add_argument("--verbose", action="store_true", help="also show MLflow's own logs")
    return parser


def _slot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slot", default=None, metavar="TIME",
                   help="the schedule slot this run fills, e.g. 2026-11-24T02:00Z: the run id is derived from it, so a "
                        "retry of the slot resumes its run (instead of --run-id)")
    p.add_argument("--schedule", default=None, metavar="NAME", help="the schedule's name in the slot's run id (default: the recipe's name)")


def _run_identity(args, cfg) -> tuple[str, dict[str, str]]:
    """The run id (given, derived from --slot, or new) and the tags that say where it came from."""
    from pipeline import slots

    if args.slot is None:
        if args.schedule is not None:
            raise ConfigError("--schedule names the schedule of a --slot; give --slot too, or drop --schedule")
        run_id = args.run_id or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        tags = {}
    else:
        if args.run_id is not None:
            raise ConfigError("--slot and --run-id both name the run; give one (a slot's run id is derived from it)")
        slot = slots.parse_slot(args.slot)
        schedule = slots.check_schedule_name(args.schedule or cfg.name)
        run_id = slots.slot_run_id(schedule, slot)
        tags = {"bnflow.schedule": schedule, "bnflow.slot": slots.slot_label(slot)}
    if not RUN_ID.fullmatch(run_id):
        raise ConfigError(f"--run-id {run_id!r}: use letters, digits, '.', '_' and '-' only (no path separators), "
                          "starting with a letter or digit, at most 128 characters")
    return run_id, tags


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "show-config":
            return _show_config(args)
        if args.command == "submit":
            return _submit(args)
        if args.command == "schedule":
            return _schedule(args)
        if args.command == "adapt":
            return _adapt(args)
        if args.command == "search":
            return _search(args)
        return _run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:  # a user error raised inside a Ray worker arrives wrapped
        inner = find_user_error(e)
        if inner is None:
            raise
        print(f"error: {inner}", file=sys.stderr)
        return EXIT_USER_ERROR


def _adapt(args) -> int:
    import mlflow

    from pipeline import adapt
    from pipeline.tracking import check_reachable, default_tracking_uri, ui_command
    from tasks.console import say

    for flag, value, low in (("--rows", args.rows, 2), ("--batch-size", args.batch_size, 2)):
        if value is not None and value < low:
            raise ConfigError(f"{flag} {value}: must be at least {low}")
    _quiet_libraries(args.verbose)
    uri = default_tracking_uri(args.tracking_uri)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    t0 = time.perf_counter()
    done = adapt.adapt(args.model, args.data, register=args.register, rows=args.rows, batch_size=args.batch_size,
                       seed=args.seed, experiment=args.experiment)
    say(f"adapted {args.model} on {done.rows} rows of {args.data} in {time.perf_counter() - t0:.0f}s")
    print(f"  model: {done.model_uri}" + (f"  (registered as {args.register} version {done.version})" if done.version else ""))
    print(f"  MLflow run: {done.run_id}")
    print(f"  {'see it at' if uri.startswith('http') else 'see it with'}: {ui_command(uri, done.experiment_id, done.run_id)}", flush=True)
    return 0


def _show_config(args) -> int:
    from pipeline import recipes
    from schemas.config import PipelineConfig

    if args.json_schema:
        print(json.dumps(PipelineConfig.model_json_schema(), indent=1))
        return 0
    print(recipes.load(args.recipe, args.overrides).model_dump_json(indent=1))
    return 0


def _submit(args) -> int:
    from pipeline import recipes, submit
    from tasks.console import say

    cfg = recipes.load(args.recipe, args.overrides)
    run_id, tags = _run_identity(args, cfg)
    _quiet_libraries(args.verbose)
    address = submit.dashboard_address(args.address)
    run_args, env = submit.plan(cfg, args.recipe, args.overrides, address)
    run_args += ["--slot", tags["bnflow.slot"], "--schedule", tags["bnflow.schedule"]] if tags else ["--run-id", run_id]
    if args.verbose:
        run_args.append("--verbose")
    return submit.submit(submit.connect(address), run_args, env, run_id, args.wait, say, metadata=tags)


def _schedule(args) -> int:
    from pydantic import ValidationError

    from pipeline import recipes, schedule, slots, submit
    from tasks.console import say

    try:
        policy = schedule.ScheduleConfig(cron=args.cron, catchup=args.catchup, max_active=args.max_active, overlap=args.overlap)
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0]).replace("_", "-") if err["loc"] else "cron"
        raise ConfigError(f"--{field} {getattr(args, field.replace('-', '_'))!r}: {err['msg'].removeprefix('Value error, ')}") from None
    cfg = recipes.load(args.recipe, args.overrides)  # checked once, here, not at 02:00
    name = slots.check_schedule_name(args.schedule or cfg.name)
    _quiet_libraries(args.verbose)
    address = submit.dashboard_address(args.address)
    submit.plan(cfg, args.recipe, args.overrides, address)  # refused now, not at the first slot
    client = submit.connect(address)

    def submit_slot(slot):
        one = argparse.Namespace(**{**vars(args), "slot": slots.slot_label(slot), "schedule": name, "run_id": None, "wait": False})
        _submit(one)

    now = schedule.utcnow()
    scheduler = schedule.Scheduler(policy, schedule.cluster_jobs(client, name), submit_slot, say, started=now)
    say(f"schedule {name}: '{policy.cron}' (UTC) on {address}; catchup={policy.catchup}, max_active={policy.max_active}, "
        f"overlap={policy.overlap}")
    if args.once:
        try:
            scheduler.tick(now)
        except Exception as e:  # the cluster went away between connecting and submitting
            say(f"schedule {name}: {e}; nothing submitted, the slot is due again at the next --once")
            return 1
        return 0
    try:
        scheduler.run_forever(schedule.utcnow, time.sleep)
    except KeyboardInterrupt:
        say(f"schedule {name}: stopped (jobs already submitted go on)")
        return 130


class Interrupted(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt for SIGINT."""


def _on_sigterm(signum, frame):
    raise Interrupted()


def _run(args) -> int:
    from pipeline import recipes

    cfg = recipes.load(args.recipe, args.overrides)
    run_id, tags = _run_identity(args, cfg)

    def work(tracker, say):
        from pipeline import runner

        produced = runner.run(tracker.cfg, run_id, tracker)
        evaluation = produced["evaluation"]
        decision = tracker.gate(produced["raw"], say) if tracker.cfg.tracking.register_model else None
        # The headline numbers on the parent; per-class ones stay on the evaluate run.
        tracker.finish("FINISHED", summary={k: v for k, v in evaluation.metrics.items() if k.startswith("test_") and "." not in k},
                       tags=evaluation.tags)
        return evaluation, decision

    done = _tracked(cfg, run_id, tags, args, work, resume=f"--run-id {run_id}")
    if isinstance(done, int):
        return done
    tracker, seconds, (evaluation, decision) = done
    print(f"\n[bnflow] done in {seconds:.0f}s  (bn: {cfg.train.bn_mode}, workers: {cfg.train.workers})\n"
          + _outcome_lines(tracker, evaluation, decision) + f"  MLflow run: {tracker.parent_id}  (run id {run_id}; resume with --run-id {run_id})\n"
          + _where(tracker), flush=True)
    return 0


def _search(args) -> int:
    from pipeline import recipes, search

    overrides = list(args.overrides)
    overrides += [f"search.trials={args.trials}"] if args.trials is not None else []
    overrides += [f"search.rounds={args.stages}"] if args.stages is not None else []
    cfg = recipes.load(args.recipe, overrides)
    dims = search.plan(cfg)  # a bad space is one line before anything starts
    search_id = args.search_id or f"{cfg.name}-search-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    if not RUN_ID.fullmatch(search_id):
        raise ConfigError(f"--search-id {search_id!r}: use letters, digits, '.', '_' and '-' only (no path separators), "
                          "starting with a letter or digit, at most 128 characters")

    def work(tracker, say):
        result = search.search(tracker.cfg, search_id, tracker, dims)
        search.record(tracker, result)
        evaluation = result.produced["evaluation"]
        decision = tracker.gate(result.produced["raw"], say) if tracker.cfg.tracking.register_model else None
        summary = {k: v for k, v in evaluation.metrics.items() if k.startswith("test_") and "." not in k}
        tracker.finish("FINISHED", summary=summary, tags=evaluation.tags)
        return result, evaluation, decision

    done = _tracked(cfg, search_id, {search.TAG_KIND: "search"}, args, work, resume=f"--search-id {search_id}", kind="search")
    if isinstance(done, int):
        return done
    tracker, seconds, (result, evaluation, decision) = done
    counts = {s: sum(o.status == s for o in result.outcomes) for s in ("completed", "stopped", "failed")}
    best = result.best
    print(f"\n[bnflow] search done in {seconds:.0f}s: {len(result.outcomes)} trials in {cfg.search.rounds} round(s) "
          f"({counts['completed']} completed, {counts['stopped']} stopped early, {counts['failed']} failed)\n"
          f"  best trial {best.trial}: {cfg.search.metric}={best.score:.4f} with "
          + ", ".join(f"{k}={search._fmt(v)}" for k, v in best.values.items()) + "\n"
          + _outcome_lines(tracker, evaluation, decision)
          + f"  MLflow run: {tracker.parent_id}  (search id {search_id}; resume with --search-id {search_id})\n"
          + _where(tracker), flush=True)
    return 0


def _outcome_lines(tracker, evaluation, decision) -> str:
    metrics = evaluation.metrics
    return (f"  test accuracy before BN recalibration: {metrics['test_accuracy_before_recal']:.4f}\n"
            f"  test accuracy after  BN recalibration: {metrics['test_accuracy_after_recal']:.4f}\n"
            f"  training curves: {evaluation.tags.get('bnflow.curves_note', 'not read')}\n"
            + (f"  registry: {decision.name} version {decision.version} "
               f"{'is the champion' if decision.promoted else 'not promoted'}: {decision.reason}\n" if decision else ""))


def _where(tracker) -> str:
    from pipeline.tracking import ui_command

    return (f"  {'see it at' if tracker.uri.startswith('http') else 'see it with'}: "
            f"{ui_command(tracker.uri, tracker.experiment_id, tracker.parent_id)}")


def _tracked(cfg, run_id: str, tags: dict, args, work, resume: str, kind: str = "run"):
    """One tracked run's life around ``work(tracker, say)``: checks that fail in a second, the
    lease, the parent run, Ray; Ctrl-C (130) and SIGTERM (143) mark the open runs KILLED and say
    ``resume``; a failure marks them FAILED. Returns (tracker, seconds, what work returned), or the
    exit code of an interruption. ``work`` finishes the parent run itself."""
    from pipeline import cluster, dag
    from pipeline.lease import Lease
    from pipeline.tracking import Tracker, check_reachable
    from tasks.console import say
    from tasks.ingest import check_source

    _quiet_libraries(args.verbose)
    cfg = _credentials_out_of_config(cfg)
    check_source(cfg.data)  # bad source files answer in a second, before Ray or MLflow start
    root = _writable_run_dir(cfg.storage, run_id)
    tracker = None
    check_reachable(Tracker.uri_for(cfg))
    cluster.check_reachable()
    lease = Lease(root, run_id).acquire(wait=getattr(args, "wait_for_lock", False))
    main_thread = threading.current_thread() is threading.main_thread()  # signals can only be caught there
    previous = signal.getsignal(signal.SIGTERM)
    t0 = time.perf_counter()
    try:
        # The parent run first: resuming with another config is refused before Ray starts.
        tracker = Tracker(cfg, run_id, derived=dag.derived_params(cfg), tags=tags)
        parent = tracker.start()
        say(f"{kind} {run_id}: MLflow run {parent} in {tracker.uri}")
        cluster.connect(cfg, verbose=args.verbose)
        if main_thread:  # after ray.init, which installs a SIGTERM handler of its own
            signal.signal(signal.SIGTERM, _on_sigterm)
        value = work(tracker, say)
    except (KeyboardInterrupt, Interrupted) as e:
        code = 130 if isinstance(e, KeyboardInterrupt) else 143
        _stop_quietly(tracker)
        print(f"interrupted; resume with {resume}", file=sys.stderr)
        return code
    except BaseException:
        if tracker is not None and tracker.parent_id is not None:
            tracker.finish("FAILED")
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        lease.release()
    return tracker, time.perf_counter() - t0, value


# Library warnings that say nothing about a bnflow run, by the logger that emits them (a filter on a
# logger sees only its own records). ``--verbose`` shows them.
KNOWN_HARMLESS = {
    # bnflow logs its own model object and loads it with its own code: the pickle advice does not apply.
    "mlflow.pyfunc": "Passing a Python object as `python_model`",
    # Good news, not a warning: a fresh local Ray turned token auth on.
    "ray._private.authentication.authentication_token_setup": "Token authentication is enabled for this Ray cluster",
    # bnflow turns Ray Data's bars off on purpose (its own bar and lines show progress).
    "ray.data._internal.progress": "Progress bars disabled",
    # `pipeline submit`: Ray announcing that it leaves .git and .venv out of the job (as .rayignore asks).
    "ray._private.runtime_env.working_dir": "is now ignored by default",
}


_quieted = False


def _quiet_libraries(verbose: bool) -> None:
    """Ray's and MLflow's INFO chatter (store creation, migrations, a "View run" line per run end,
    Ray Data's execution plans) and known-harmless warnings off the console, unless ``verbose``.
    Warnings and errors otherwise always show. (Ray's own console is set in ``cluster.connect``.)"""
    global _quieted
    if verbose or _quieted:  # once per process (`schedule` submits through `_submit` again and again)
        return
    _quieted = True
    # These set their loggers' levels when imported: import them first, then set the levels.
    for module in ("ray.data", "ray.job_submission"):
        importlib.import_module(module)

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # bnflow prints the one link that matters
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # "Downloading artifacts" bars of model loads
    # (Ray's job SDK modules set their own loggers to INFO: name them, not their parent.)
    for name in ("mlflow", "ray.data", "ray._private.runtime_env", "ray.dashboard.modules.dashboard_sdk",
                 "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for name, message in KNOWN_HARMLESS.items():
        logging.getLogger(name).addFilter(lambda record, m=message: m not in record.getMessage())


def _stop_quietly(tracker) -> None:
    """After an interruption: stop the training workers first (nothing may log after the run is
    marked), then mark the open runs KILLED. A tracking outage must not turn this into a traceback."""
    import ray

    if threading.current_thread() is threading.main_thread():
        # A terminal's Ctrl-C reaches every process of the group, and impatient users press it
        # twice: neither may cut this cleanup short. SIGKILL still ends it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if ray.is_initialized():
        ray.shutdown()
    if tracker is not None and tracker.parent_id is not None:
        try:
            tracker.finish("KILLED")
        except Exception:
            pass


def _credentials_out_of_config(cfg):
    """Move user:password of an http tracking URI into MLflow's credential variables, so the URI
    that reaches params, artifacts and the console carries none."""
    from pipeline.tracking import CREDENTIAL_ENV, default_tracking_uri, split_credentials

    uri = default_tracking_uri(cfg.tracking.uri)
    clean, user, password = split_credentials(uri)
    if clean == uri:
        return cfg
    for key, value in zip(CREDENTIAL_ENV, (user, password)):
        if value is not None:
            os.environ[key] = value
    if cfg.tracking.uri:
        return cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": clean})})
    os.environ["MLFLOW_TRACKING_URI"] = clean
    return cfg


def _writable_run_dir(storage: str, run_id: str) -> Path:
    root = Path(storage).resolve() / run_id
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-check-"):
            pass
    except OSError as e:
        raise ConfigError(f"storage={storage}: cannot write there ({e.strerror or e}); set storage to a writable directory "
                          "(on a cluster: one every node sees)") from None
    return root


if __name__ == "__main__":
    sys.exit(main())
