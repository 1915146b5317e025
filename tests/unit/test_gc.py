"""``python -m pipeline gc`` on a storage directory holding what interrupted and deleted runs leave.
(That it removes nothing of a real complete run, whose stage cache points at it, is checked on
the digits run in tests/integration/test_pipeline.py.)"""

import json
import os
import time

import pytest

from pipeline.cli import main
from pipeline.lease import LEASE_FILE
from pipeline.runner import CACHE_DIR, MANIFEST, PARTIAL, cache_key

DAY = 86400


def _stage(run_dir, name, made_from, size=1000):
    d = run_dir / name
    d.mkdir(parents=True)
    (d / "part-00000.parquet").write_bytes(b"x" * size)
    (d / MANIFEST).write_text(json.dumps({"made_from": made_from, "outputs": {}}))
    return d


def _debris(path, size, age_s):
    path.mkdir(parents=True)
    f = path / "checkpoint.pt"
    f.write_bytes(b"y" * size)
    old = time.time() - age_s
    for p in (f, path):
        os.utime(p, (old, old))
    return path


@pytest.fixture
def storage(tmp_path):
    s = tmp_path / "runs"
    made = {"config": "abc", "runtime": {"seed": 0}, "inputs": {}}
    a = s / "run-a"
    ingest = _stage(a, "ingest", made)
    linked = a / "normalize"  # a stage reused from run-a by run-b: the same files, hard-linked
    _stage(a, "normalize", {"config": "n"})
    reused = _debris(s / "run-b" / "normalize.partial", 10, 2 * DAY)
    os.link(linked / "part-00000.parquet", reused / "linked.parquet")
    old = time.time() - 2 * DAY
    for p in (linked / "part-00000.parquet", reused):  # one inode: both names are two days old
        os.utime(p, (old, old))
    _debris(a / f"train{PARTIAL}", 5000, 2 * DAY)  # killed two days ago
    _debris(a / f"recalibrate{PARTIAL}", 300, 60)  # a minute ago: maybe still running
    _debris(a / "evaluate", 700, 2 * DAY)  # no manifest
    _debris(a / "train.trash-0123abcd", 40, 0)  # half-deleted, any age
    _debris(s / "run-live" / f"train{PARTIAL}", 900, 2 * DAY)
    beat = s / "run-live" / f"{LEASE_FILE}.tok.beat"
    beat.write_text("7")  # its owner beat five minutes ago (beats come every 10 s; it may be stuck in a long step)
    os.utime(beat, (time.time() - 300, time.time() - 300))
    _debris(s / "search-1" / "tune", 50, 2 * DAY)  # a search's directory: not the runner's layout
    _stage(s / "search-1" / "trials" / "t0", "ingest", {"config": "t"})
    _debris(s / "search-1" / "trials" / "t0" / f"train{PARTIAL}", 60, 2 * DAY)
    cache = s / CACHE_DIR
    cache.mkdir()
    (cache / f"ingest-{cache_key(made)}.json").write_text(json.dumps({"stage_dir": str(ingest)}))
    (cache / f"ingest-{cache_key({'config': 'gone'})}.json").write_text(json.dumps({"stage_dir": str(s / "deleted" / "ingest")}))
    (cache / f"normalize-{cache_key({'config': 'old'})}.json").write_text(json.dumps({"stage_dir": str(linked)}))  # replaced since
    return s


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


EXPECTED = ["run-a/evaluate", "run-a/train.partial", "run-a/train.trash-0123abcd", "run-b/normalize.partial"]


def test_dry_run_lists_and_removes_nothing(storage, capsys):
    before = _tree(storage)
    assert main(["gc", "--storage", str(storage), "--older-than", "1d", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert _tree(storage) == before
    for rel in EXPECTED:
        assert f"gc: would remove {storage / rel} (" in out
    assert out.count("would remove") == len(EXPECTED) + 2  # and the two dangling cache entries
    # bytes freed: 700 + 5000 + 40 + 10 (the hard-linked file frees nothing) + the two entries
    entries = sum(len(json.dumps({"stage_dir": x})) for x in (str(storage / "deleted" / "ingest"), str(storage / "run-a" / "normalize")))
    assert f"gc: would free {(5750 + entries) / 1024:.1f} KB in 6 item(s)" in out
    assert "search-1" not in out


def test_a_live_run_is_kept_even_with_older_than_zero(storage, capsys):
    assert main(["gc", "--storage", str(storage), "--older-than", "0s"]) == 0
    left = _tree(storage)
    assert "run-live/train.partial/checkpoint.pt" in left  # its lease beat within the last ten minutes
    assert "run-a/recalibrate.partial" not in left  # 0s: any age goes
    assert "search-1/tune" in left and "search-1/trials/t0/train.partial" in left


def test_gc_removes_debris_and_never_a_committed_stage_or_a_live_run(storage, capsys):
    assert main(["gc", "--storage", str(storage), "--older-than", "1d"]) == 0
    left = _tree(storage)
    for rel in EXPECTED:
        assert rel not in left
    for kept in ["run-a/ingest/manifest.json", "run-a/normalize/part-00000.parquet", "run-a/recalibrate.partial",
                 "run-live/train.partial/checkpoint.pt"]:
        assert kept in left
    assert [p for p in left if p.startswith(CACHE_DIR + "/")] == [f"{CACHE_DIR}/ingest-{cache_key({'config': 'abc', 'runtime': {'seed': 0}, 'inputs': {}})}.json"]
    assert (storage / "run-a" / "normalize" / "part-00000.parquet").stat().st_nlink == 1  # its link in run-b went
    capsys.readouterr()
    assert main(["gc", "--storage", str(storage), "--older-than", "1d"]) == 0  # a second pass: nothing left to do
    assert "gc: freed 0 B in 0 item(s)" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--older-than", "a week"], "error: --older-than='a week': give a number and a unit, e.g. 7d, 12h, 30m or 0s"),
    (["--storage", "/nonexistent/runs"], "error: --storage=/nonexistent/runs: not a directory; give the storage directory"),
    (["--storage", "s3://bucket/runs"], "error: --storage=s3://bucket/runs: gc cleans local and shared filesystems"),
])
def test_bad_arguments_are_one_line(storage, capsys, args, message):
    full = ["gc", *(["--storage", str(storage)] if "--storage" not in args else []), *args]
    assert main(full) == 2
    assert capsys.readouterr().err.startswith(message)


def test_the_storage_comes_from_the_recipe_and_its_overrides(storage, capsys):
    assert main(["gc", "--recipe", "digits", "--set", f"storage={storage}", "--dry-run"]) == 0
    assert f"under {storage}" in capsys.readouterr().out

