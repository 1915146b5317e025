"""A tracked run's session: everything around the work of ``run`` and ``search``.

In order: the checks that answer in a second (source files, tracking server, Ray address, storage),
the run id's lease, the refusal to resume with another config, Ray (and its resource check), the
MLflow parent run, then the work. Ctrl-C (130) and SIGTERM (143) stop the workers and mark the open
runs KILLED; a failure marks them FAILED. A run refused before its work starts leaves nothing behind:
no parent run, no run directory.
"""

from __future__ import annotations

import _thread
import os
import re
import secrets
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from schemas.errors import ConfigError, UserError

RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class Interrupted(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt for SIGINT."""


@dataclass
class Done:
    """A finished session: its tracker, its seconds and what the work returned."""

    tracker: Any
    seconds: float
    value: Any


def check_run_id(run_id: str, flag: str = "--run-id") -> str:
    if not RUN_ID.fullmatch(run_id):
        raise ConfigError(f"{flag} {run_id!r}: use letters, digits, '.', '_' and '-' only (no path separators), "
                          "starting with a letter or digit, at most 128 characters")
    return run_id


def new_id(name: str, kind: str = "") -> str:
    """A fresh id: the recipe's name, the kind (``search``), the time and a random suffix."""
    return f"{name}-{kind + '-' if kind else ''}{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def run_identity(run_id: Optional[str], slot: Optional[str], schedule: Optional[str], name: str) -> tuple[str, dict[str, str]]:
    """The run id (given, derived from a schedule's slot, or new) and the tags that say where it came from."""
    from pipeline.jobs import slots

    if slot is None:
        if schedule is not None:
            raise ConfigError("--schedule names the schedule of a --slot; give --slot too, or drop --schedule")
        return check_run_id(run_id or new_id(name)), {}
    if run_id is not None:
        raise ConfigError("--slot and --run-id both name the run; give one (a slot's run id is derived from it)")
    when = slots.parse_slot(slot)
    schedule = slots.check_schedule_name(schedule or name)
    tags = {"bnflow.schedule": schedule, "bnflow.slot": slots.slot_label(when)}
    return check_run_id(slots.slot_run_id(schedule, when)), tags


def tracked(cfg, run_id: str, tags: dict, work: Callable, resume: str, kind: str = "run", verbose: bool = False,
            wait_for_lock: bool = False):
    """One tracked run's life around ``work(tracker, console)`` (see the module docstring). ``work``
    finishes the parent run itself. Returns ``Done``, or the exit code of an interruption.

    MLflow's process-wide tracking URI is set here, once, to the run's store: the model logging
    MLflow offers (``Model.log``) and model loading read it from there.
    """
    import mlflow

    from pipeline import cluster, dag
    from pipeline.lease import Lease
    from pipeline.tracking.runs import Tracker
    from pipeline.tracking.uri import check_reachable
    from tasks.console import Console
    from tasks.nn.network import check_network
    from tasks.source import check_source

    console = Console()  # the command's one console: the runner and every stage report through it
    cfg = credentials_out_of_config(cfg)
    shape = check_source(cfg.data)  # bad source files answer in a second, before Ray or MLflow start
    if shape.input_shape is not None:  # and a network that cannot train on them
        check_network(cfg.train.model, shape.input_shape, shape.num_classes, console.say)
    check_reachable(Tracker.uri_for(cfg))
    cluster.check_reachable()
    root = Path(cfg.storage).resolve() / run_id
    fresh = not root.exists()
    writable_run_dir(cfg.storage, root)
    main_thread = threading.current_thread() is threading.main_thread()  # signals can only be caught there

    def on_lost(message):
        print(f"[bnflow] {message}; this process stops writing", file=sys.stderr, flush=True)
        if main_thread:  # interrupt_main reaches the main thread only, which runs this work only if we are on it
            _thread.interrupt_main()  # raises KeyboardInterrupt there: the branch below that checks lease.lost

    try:
        lease = Lease(root, run_id, on_lost=on_lost).acquire(wait=wait_for_lock)
    except UserError:
        _remove_if(fresh, root)
        raise
    tracker = None
    previous = signal.getsignal(signal.SIGTERM)
    t0 = time.perf_counter()
    try:
        tracker = Tracker(cfg, run_id, derived=dag.derived_params(cfg), tags=tags)
        mlflow.set_tracking_uri(tracker.uri)
        try:
            tracker.check_resumable()  # another config for this run id: refused before Ray starts
            cluster.connect(cfg, verbose=verbose)  # refuses more workers than the cluster holds
        except UserError:
            lease.release()
            _remove_if(fresh, root)
            raise
        if main_thread:  # after ray.init, which installs a SIGTERM handler of its own
            signal.signal(signal.SIGTERM, _on_sigterm)
        parent = tracker.start()
        console.say(f"{kind} {run_id}: MLflow run {parent} in {tracker.uri}")
        value = work(tracker, console)
    except (KeyboardInterrupt, Interrupted) as e:
        if lease.lost.is_set():
            _stop_quietly(None)  # the runs are the new owner's now: marking them KILLED would be writing
            print(f"error: lost the lease of run id {run_id} (another process took it over); "
                  "this process stopped without writing more", file=sys.stderr)
            return 1
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
    return Done(tracker, time.perf_counter() - t0, value)


def _on_sigterm(signum, frame):
    raise Interrupted()


def _remove_if(fresh: bool, root: Path) -> None:
    """A run directory this attempt made, removed after a refusal if it is empty: a refused run
    leaves nothing, and never removes what another process (the lease's winner) put there."""
    if fresh:
        try:
            root.rmdir()
        except OSError:
            pass


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


def credentials_out_of_config(cfg):
    """Move user:password of an http tracking URI into MLflow's credential variables, so the URI
    that reaches params, artifacts and the console carries none."""
    from pipeline.tracking.uri import CREDENTIAL_ENV, default_tracking_uri, split_credentials

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


def writable_run_dir(storage: str, root: Path) -> None:
    """Make ``root`` (a run's directory under ``storage``) and check that it can be written.

    Raises:
        ConfigError: naming ``storage`` and the fix.
    """
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-check-"):
            pass
    except OSError as e:
        raise ConfigError(f"storage={storage}: cannot write there ({e.strerror or e}); set storage to a writable directory "
                          "(on a cluster: one every node sees)") from None


def outcome_lines(evaluation, decision) -> str:
    """The end of a run on the console: test accuracy before and after recalibration, the curve
    reading and the gate's decision."""
    metrics = evaluation.metrics
    return (f"  test accuracy before BN recalibration: {metrics['test_accuracy_before_recal']:.4f}\n"
            f"  test accuracy after  BN recalibration: {metrics['test_accuracy_after_recal']:.4f}\n"
            f"  training curves: {evaluation.tags.get('bnflow.curves_note', 'not read')}\n"
            + (f"  registry: {decision.name} version {decision.version} "
               f"{'is the champion' if decision.promoted else 'not promoted'}: {decision.reason}\n" if decision else ""))


def where(tracker) -> str:
    """Where a person looks at the run."""
    from pipeline.tracking.uri import ui_command

    return (f"  {'see it at' if tracker.uri.startswith('http') else 'see it with'}: "
            f"{ui_command(tracker.uri, tracker.experiment_id, tracker.parent_id)}")
