"""``python -m pipeline gc``: remove what interrupted and deleted runs left in a storage directory.

What the commit protocol (``pipeline.runner``) leaves behind and this removes:

- ``<run>/<stage>.partial/``: an attempt that never published (a killed run; train's keeps its
  epoch checkpoints there so that a resume continues) once nothing in it changed for
  ``--older-than``;
- ``<run>/<stage>/`` without ``manifest.json``: debris the runner would replace, same age rule;
- ``*.trash-*``: a directory ``runner._remove`` renamed aside and did not finish deleting;
- ``.stage-cache/*.json`` entries whose stage no longer holds a manifest made from the same inputs
  (its run was deleted or the stage replaced): pointers to nothing.

It never removes a directory that holds a manifest (a committed stage, whatever its age), and it
skips every run whose lease beat within ``--older-than`` (someone may be working there). It prints
each removal and the bytes freed: files that have no other hard link (a stage reused by hard links
frees nothing while another run holds the same files).

Local and shared filesystems only: ``storage`` on an object store is not supported yet.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Iterator, NamedTuple

from pipeline.lease import LEASE_FILE
from pipeline.runner import CACHE_DIR, MANIFEST, PARTIAL, cache_key
from schemas.errors import ConfigError

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


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
    found: list[Debris] = []
    for run_dir in sorted(p for p in storage.iterdir() if p.is_dir() and p.name != CACHE_DIR):
        if _lease_alive(run_dir, now - older_than_s):
            continue
        for entry in sorted(run_dir.iterdir()):
            if not entry.is_dir():
                continue
            if ".trash-" in entry.name:
                found.append(Debris(entry, "left half-deleted", _freed(entry)))
            elif (entry / MANIFEST).exists():
                continue  # committed: never removed
            elif now - _newest(entry) < older_than_s:
                continue
            elif entry.name.endswith(PARTIAL):
                found.append(Debris(entry, "an attempt that never published", _freed(entry)))
            else:
                found.append(Debris(entry, "a stage directory without a manifest", _freed(entry)))
    cache = storage / CACHE_DIR
    for entry in sorted(cache.glob("*.json")) if cache.is_dir() else []:
        if not _cache_entry_valid(entry):
            found.append(Debris(entry, "a stage-cache entry whose stage is gone", entry.stat().st_size))
    return found


def remove(found: list[Debris]) -> None:
    for d in found:
        if d.path.is_dir():
            shutil.rmtree(d.path)
        else:
            d.path.unlink(missing_ok=True)


def command(args) -> int:
    if args.storage is None:
        from pipeline import recipes

        args.storage = recipes.load(args.recipe, []).storage
    storage = Path(args.storage)
    if "://" in args.storage:
        raise ConfigError(f"--storage={args.storage}: gc cleans local and shared filesystems; storage on an object "
                          "store is not supported yet")
    if not storage.is_dir():
        raise ConfigError(f"--storage={args.storage}: not a directory; give the storage directory of your runs "
                          "(the recipe's storage field)")
    found = find(storage, parse_age(args.older_than))
    verb = "would remove" if args.dry_run else "removing"
    for d in found:
        print(f"gc: {verb} {d.path} ({_size(d.freed)}; {d.reason})")
    if not args.dry_run:
        remove(found)
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
