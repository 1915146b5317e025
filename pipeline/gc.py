"""``python -m pipeline gc``: remove what interrupted and deleted runs left in a storage directory.

What the commit protocol (``pipeline.runner``) leaves behind in ``<storage>/<run>/`` and this removes:

- ``<stage>.partial/``: an attempt that never published (a killed run; train's keeps its epoch
  checkpoints there so that a resume continues) once nothing in it changed for ``--older-than``;
- ``<stage>/`` without ``manifest.json``: debris the runner would replace, same age rule;
- ``<stage>.trash-*``: a directory ``runner._remove`` renamed aside to delete and did not finish;
- ``.stage-cache/*.json`` entries whose stage no longer holds a manifest made from the same inputs
  (its run was deleted or the stage replaced): pointers to nothing.

Only directories named after a stage of ``pipeline.dag.PIPELINE`` are considered (a search's
``trials/`` and ``tune/`` are not, nor anything of yours), and never one that holds a manifest at
any depth: a committed stage stays, whatever its age. Runs whose lease beat within ``--older-than``
(at least the last ten minutes) are skipped, and checked again just before each removal. It prints
each removal and the bytes freed: files that have no other hard link (a stage reused by hard links
frees nothing while another run holds the same files).

Local and shared filesystems only: ``storage`` on an object store is not supported yet, nor the
trial runs inside a search's directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Iterator, NamedTuple

from pipeline.dag import PIPELINE
from pipeline.lease import LEASE_FILE
from pipeline.runner import CACHE_DIR, MANIFEST, PARTIAL, cache_key
from schemas.errors import ConfigError

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
LIVE_LEASE_S = 600  # a run whose lease beat this recently is live whatever --older-than says (beats: every 10 s)


class Debris(NamedTuple):
    path: Path
    reason: str
    freed: int  # bytes that removing it gives back


def parse_age(text: str) -> float:
    """``7d``, ``12h``, ``30m``, ``0s`` -> seconds.

    Raises:
        ConfigError: anything else, with the form to use.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text or "")
    if not m:
        raise ConfigError(f"--older-than={text!r}: give a number and a unit, e.g. 7d, 12h, 30m or 0s")
    return float(m.group(1)) * UNITS[m.group(2)]


def find(storage: Path, older_than_s: float, now: float | None = None) -> list[Debris]:
    """Everything ``gc`` would remove under ``storage`` (see the module docstring), in path order."""
    now = time.time() if now is None else now
    stages = {n.name for n in PIPELINE}
    found: list[Debris] = []
    for run_dir in sorted(p for p in storage.iterdir() if p.is_dir() and p.name != CACHE_DIR):
        if _lease_alive(run_dir, now - max(older_than_s, LIVE_LEASE_S)):
            continue
        for entry in sorted(p for p in run_dir.iterdir() if p.is_dir()):
            stage, _, rest = entry.name.partition(".")
            if stage not in stages:
                continue  # not the runner's (a search's trials/ and tune/, anything of yours)
            if rest.startswith("trash-") or rest.startswith(PARTIAL[1:] + ".trash-"):
                found.append(Debris(entry, "left half-deleted", _freed(entry)))
            elif rest not in ("", PARTIAL[1:]) or any(entry.rglob(MANIFEST)):
                continue  # a committed stage (or holding one), never removed
            elif now - _newest(entry) >= older_than_s:
                reason = "an attempt that never published" if rest else "a stage directory without a manifest"
                found.append(Debris(entry, reason, _freed(entry)))
    cache = storage / CACHE_DIR
    for entry in sorted(cache.glob("*.json")) if cache.is_dir() else []:
        if not _cache_entry_valid(entry):
            found.append(Debris(entry, "a stage-cache entry whose stage is gone", entry.stat().st_size))
    return found


def remove(found: list[Debris], storage: Path) -> list[Debris]:
    """Remove ``found``, each after checking again that no lease in its run beat since ``find``
    (a run may have started meanwhile); returns what was removed."""
    removed = []
    for d in found:
        run_dir = d.path.parent
        if run_dir != storage / CACHE_DIR and _lease_alive(run_dir, time.time() - LIVE_LEASE_S):
            continue
        if d.path.is_dir():
            shutil.rmtree(d.path, ignore_errors=True)
        else:
            d.path.unlink(missing_ok=True)
        removed.append(d)
    return removed


def command(args) -> int:
    if args.storage is None:
        from pipeline import recipes

        args.storage = recipes.load(args.recipe, args.overrides).storage
    storage = Path(args.storage)
    if "://" in args.storage:
        raise ConfigError(f"--storage={args.storage}: gc cleans local and shared filesystems; storage on an object "
                          "store is not supported yet")
    if not storage.is_dir():
        raise ConfigError(f"--storage={args.storage}: not a directory; give the storage directory of your runs "
                          "(the recipe's storage field)")
    found = find(storage, parse_age(args.older_than))
    if not args.dry_run:
        found = remove(found, storage)
    for d in found:
        print(f"gc: {'would remove' if args.dry_run else 'removed'} {d.path} ({_size(d.freed)}; {d.reason})")
    total = sum(d.freed for d in found)
    print(f"gc: {'would free' if args.dry_run else 'freed'} {_size(total)} in {len(found)} item(s) under {storage}")
    return 0


def _lease_alive(run_dir: Path, since: float) -> bool:
    """A lease whose owner beat (or which was taken) after ``since``."""
    files = [run_dir / LEASE_FILE, *run_dir.glob(f"{LEASE_FILE}.*.beat")]
    return any(f.exists() and f.stat().st_mtime > since for f in files)


def _cache_entry_valid(entry: Path) -> bool:
    """The stage the entry points at still holds a manifest made from what the entry's name says."""
    try:
        stage_dir = Path(json.loads(entry.read_text())["stage_dir"])
        body = json.loads((stage_dir / MANIFEST).read_text())
    except (OSError, ValueError, KeyError):
        return False
    return entry.stem == f"{stage_dir.name}-{cache_key(body.get('made_from'))}"


def _files(path: Path) -> Iterator[Path]:
    if path.is_file():
        yield path
        return
    for root, _, names in os.walk(path):
        for n in names:
            yield Path(root) / n


def _newest(path: Path) -> float:
    """The latest modification time of ``path`` or anything in it."""
    return max([path.stat().st_mtime, *(f.lstat().st_mtime for f in _files(path))])


def _freed(path: Path) -> int:
    return sum(st.st_size for st in (f.lstat() for f in _files(path)) if st.st_nlink == 1)


def _size(n: int) -> str:
    """Bytes for people: 512 B, 3.4 MB."""
    if n < 1024:
        return f"{n} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1024
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}"
