"""``python -m pipeline``: the command line. It parses, dispatches to the command's module, and
turns errors into exit codes; it does nothing else.

A user error (bad recipe, bad data, too many workers, a run id in use) prints one line and exits
with code 2; a registry that cannot be reached at the champion gate prints one line and exits 1 (a
rerun of the run id decides); Ctrl-C exits 130 and SIGTERM 143, with the open MLflow runs marked
KILLED (``pipeline.session``).
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline import quiet
from pipeline.jobs.submit import DEFAULT_ADDRESS
from schemas.errors import ServiceUnavailable, UserError, find_user_error

EXIT_USER_ERROR = 2
EXIT_RETRY = 1


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
    gc = sub.add_parser("gc", help="remove what interrupted or deleted runs left in a storage directory (never a committed stage)")
    gc.add_argument("--storage", default=None, help="the storage directory (default: the recipe's storage)")
    gc.add_argument("--recipe", default=None, help="the recipe whose storage to clean (default: fashion_mnist)")
    gc.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe field, e.g. --set storage=/data/runs (repeatable)")
    gc.add_argument("--older-than", default="7d", help="leave what changed more recently than this alone: 7d (default), 12h, 30m, 0s")
    gc.add_argument("--dry-run", action="store_true", help="print what would be removed and the bytes it would free; remove nothing")
    gc.set_defaults(verbose=False)
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "show-config":
            return _show_config(args)
        quiet.configure(args.verbose)  # the process-wide settings, before any library is imported
        return _command(args.command)(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except ServiceUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_RETRY
    except Exception as e:  # a user error raised inside a Ray worker arrives wrapped
        inner = find_user_error(e)
        if inner is None:
            raise
        print(f"error: {inner}", file=sys.stderr)
        return EXIT_USER_ERROR


def _command(name: str):
    """The function that carries out command ``name`` (imported only when it runs)."""
    if name == "run":
        from pipeline.run import command
    elif name == "search":
        from pipeline.search.command import command
    elif name == "adapt":
        from pipeline.adapt import command
    elif name == "gc":
        from pipeline.gc import command
    elif name == "submit":
        from pipeline.jobs.commands import submit_command as command
    else:
        from pipeline.jobs.commands import schedule_command as command
    return command


def _show_config(args) -> int:
    from pipeline import recipes
    from schemas.config import PipelineConfig

    if args.json_schema:
        print(json.dumps(PipelineConfig.model_json_schema(), indent=1))
        return 0
    print(recipes.load(args.recipe, args.overrides).model_dump_json(indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
