"""Training progress, from rank 0 of the train workers to the driver, through two small files beside
the checkpoints (storage every node sees):

- ``progress.json``: where the loop is (epoch, step, steps per epoch), a few dozen bytes, replaced
  at most once a second. The loop pays one monotonic clock read per step for it; the write itself
  happens once a second, not per step (``benchmarks/progress_cost.py`` measures both).
- ``epochs.json``: the finished epochs' metrics and rank 0's clock (where the seconds went),
  replaced once per epoch, after that epoch's checkpoint has been reported to Ray Train.

The driver's ``ProgressWatch`` reads them twice a second while ``trainer.fit()`` runs: it moves the
bar (on a terminal), says one line per finished epoch, and hands each finished epoch to ``on_epoch``.
Every file is replaced with ``schemas.artifacts.write_atomic``: a reader sees a whole file or the
previous one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

from schemas.artifacts import write_atomic
from tasks.console import Console, Progress

PROGRESS_FILE = "progress.json"
EPOCHS_FILE = "epochs.json"
EpochCallback = Callable[[int, dict], None]


class ProgressWriter:
    """Rank 0's side. ``step`` is called after every optimizer step and writes at most once per
    ``every_s`` seconds; ``epoch_done`` after every epoch's checkpoint."""

    def __init__(self, out_dir: str | Path, steps: int, history: list[dict], clock, every_s: float = 1.0):
        self.dir, self.steps, self.history, self.clock = Path(out_dir), steps, history, clock
        self.resumed_after = len(history)
        self.every_s = every_s
        self.next_write = 0.0

    def step(self, epoch: int, step: int) -> None:
        now = time.monotonic()
        if now < self.next_write:
            return
        self.next_write = now + self.every_s
        write_atomic(self.dir / PROGRESS_FILE, json.dumps({"epoch": epoch, "step": step, "steps": self.steps}))

    def epoch_done(self, epoch: int) -> None:
        clock = {"marks": self.clock.marks, "spans": self.clock.spans, "peak_rss_bytes": peak_rss_bytes()}
        write_atomic(self.dir / EPOCHS_FILE, json.dumps({"resumed_after": self.resumed_after, "history": self.history,
                                                         "clock": clock}))
        write_atomic(self.dir / PROGRESS_FILE, json.dumps({"epoch": epoch, "step": self.steps, "steps": self.steps}))


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far: Linux's ``VmHWM``. Not ``ru_maxrss``, which
    a process started by fork + exec inherits from its parent (a worker forked from a large
    process would report that process's peak); ``ru_maxrss`` only where /proc is missing."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def read(path: Path) -> Optional[dict]:
    """A progress file's content, or None before it is first written."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not written yet, or a filesystem that showed a partial file
        return None


class ProgressWatch:
    """The driver's side, called twice a second (see the module docstring)."""

    def __init__(self, out_dir: Path, epochs: int, bar: Progress, console: Console, on_epoch: Optional[EpochCallback] = None):
        self.dir, self.epochs, self.bar, self.console, self.on_epoch = Path(out_dir), epochs, bar, console, on_epoch
        self.on_epoch_s = 0.0  # the driver's time in on_epoch, beside the loop, for the timings
        self.said_epoch: Optional[int] = None  # last epoch with a line; None before the first read
        self.said_resume = 0
        self.said_notes: set[str] = set()

    def __call__(self) -> None:
        done = read(self.dir / EPOCHS_FILE)
        if done is not None:
            self._epochs(done)
        where = read(self.dir / PROGRESS_FILE)
        if where is None:
            self.bar.tick()  # the workers are still starting: the elapsed time moves
            return
        last = done["history"][-1] if done and done["history"] else {}
        postfix = {k: f"{last[k]:.4g}" for k in ("train_loss", "val_accuracy") if k in last}
        self.bar.set((where["epoch"] - 1) * where["steps"] + where["step"], total=self.epochs * where["steps"],
                     desc=f"train epoch {where['epoch']}/{self.epochs}", **postfix)

    def _epochs(self, done: dict) -> None:
        if self.said_epoch is None:
            self.said_epoch = done["resumed_after"]
        if done["resumed_after"] and done["resumed_after"] != self.said_resume:  # a resumed run, or a restarted group
            self.said_resume = done["resumed_after"]
            self.console.say(f"train: resuming after epoch {done['resumed_after']} from its checkpoint")
        for h in done["history"]:
            if h["epoch"] <= self.said_epoch:
                continue
            self.said_epoch = h["epoch"]
            # On a terminal too: the bar goes when training ends, the epoch lines stay in the scrollback.
            self.console.say(f"train epoch {h['epoch']}/{self.epochs} " + " ".join(
                f"{k}={v:.4g}" for k, v in h.items() if k != "epoch" and not k.startswith("grad_")))
            for flag in ("grad_vanishing", "grad_exploding"):  # once per run: the curve reading repeats it
                if h.get(flag) and flag not in self.said_notes:
                    self.said_notes.add(flag)
                    self.console.say(f"train: gradients {flag.removeprefix('grad_')} at epoch {h['epoch']} "
                        f"(first/last layer norm ratio {h['grad_first_to_last']:.2g}, largest norm {h['grad_norm_max']:.3g})")
            if self.on_epoch is not None:
                t0 = time.perf_counter()
                self.on_epoch(h["epoch"], {k: v for k, v in h.items() if k != "epoch"})
                self.on_epoch_s += time.perf_counter() - t0
