"""The one output path for progress lines, on the driver and in Ray workers alike.

Plain stdout writes, not ``print`` (Ray Train patches ``print`` in its workers and every line would
reach the driver twice) and not ``logging`` (unconfigured in Ray workers, so INFO lines vanish).
"""

from __future__ import annotations

import sys


def say(message: str) -> None:
    """One progress line, flushed at once so it interleaves correctly with Ray's own output."""
    sys.stdout.write(f"[bnflow] {message}\n")
    sys.stdout.flush()
