"""The one output path for progress lines and bars: a ``Console``.

The driver makes one per command and hands it to the runner, which hands it to every stage (the
``console`` parameter): stages report through it and never print. A stage called on its own (a
test, a notebook) gets ``QUIET``, which shows nothing.

Lines are plain stdout writes, not ``print`` (Ray Train patches ``print`` in its workers and every
line would reach the driver twice) and not ``logging`` (unconfigured in Ray workers, so INFO lines
vanish). Bars are tqdm on stderr, and only on a terminal: piped into a log file (``ray job logs``,
cron, CI) a bar would be hundreds of carriage-return frames, so there the caller's own lines (one
per epoch, one per stage) are all that is written. While a bar is live, lines are written above it.
"""

from __future__ import annotations

import os
import sys
from typing import Optional


class Console:
    """Lines and bars for a person watching the run; ``quiet``: neither."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.bar = None  # the live tqdm bar, if any

    def interactive(self) -> bool:
        """Whether a person watches this output live (stderr is a terminal; BNFLOW_PROGRESS=0 says no)."""
        return not self.quiet and os.environ.get("BNFLOW_PROGRESS", "1") != "0" and sys.stderr.isatty()

    def say(self, message: str) -> None:
        """One progress line, flushed at once so it interleaves correctly with Ray's own output."""
        if self.quiet:
            return
        line = f"[bnflow] {message}"
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def progress(self, desc: str, total: Optional[float], unit: str = "it") -> "Progress":
        """A bar of ``total`` units (None: unknown yet), live on a terminal, a no-op elsewhere."""
        return Progress(self, desc, total, unit)


QUIET = Console(quiet=True)


class Progress:
    """A live bar on a terminal; a no-op elsewhere (see the module note).

    Use as a context manager; ``update`` advances it, ``set`` moves it to an absolute position.
    """

    def __init__(self, console: Console, desc: str, total: Optional[float], unit: str = "it"):
        self.console, self.desc, self.total, self.unit = console, desc, total, unit
        self.bar = None

    def __enter__(self) -> "Progress":
        if self.console.interactive():
            from tqdm import tqdm

            width = _fixed_width()
            self.bar = tqdm(total=self.total, desc=f"[bnflow] {self.desc}", unit=self.unit, file=sys.stderr, leave=False,
                            dynamic_ncols=width is None, ncols=width, unit_scale=self.unit == "rows")
            self.console.bar = self.bar
        return self

    def update(self, n: float = 1, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def set(self, position: float, total: Optional[float] = None, desc: Optional[str] = None, **postfix) -> None:
        if self.bar is None:
            return
        if total is not None and total != self.bar.total:
            self.bar.reset(total=total)
        if desc is not None:
            self.bar.set_description(f"[bnflow] {desc}", refresh=False)
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(position - self.bar.n)

    def tick(self) -> None:
        """Redraw (the elapsed time moves while nothing else does)."""
        if self.bar is not None:
            self.bar.refresh()

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
            self.console.bar = None


def _fixed_width():
    """80 on a terminal that reports 0 columns (some CI consoles and serial lines do; tqdm then draws
    nothing at all), else None: the bar follows the terminal's width."""
    try:
        columns = os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):
        return None
    return 80 if columns <= 0 else None
