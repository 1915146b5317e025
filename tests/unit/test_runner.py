"""The runner's bookkeeping on a toy DAG: outputs published by rename, manifests that name what a
stage was made from, skip when equal, refusal when the inputs changed, debris never mistaken for output.
(The tracker is a recorder: MLflow itself is exercised by the integration tests.)"""

import contextlib
import json
from pathlib import Path

import pytest

from pipeline import runner
from pipeline.dag import Node
from schemas import artifacts as A
from schemas.config import PipelineConfig
from schemas.errors import ConfigError

CALLS = []


def _source(cfg):
    return Path(cfg.path).read_text()


def _make(cfg, out_dir, seed):
    CALLS.append("make")
    f = out_dir / "made.txt"
    f.write_text(f"{Path(cfg.path).read_text()} {seed}")
    return A.NormStatsFile(path=str(f), version="v1")


def _use(cfg, out_dir, stats):
    CALLS.append("use")
    if (out_dir / "boom").exists() or getattr(_use, "fail", False):
        raise RuntimeError("stage failed")
    (out_dir / "used.txt").write_text(Path(stats.path).read_text())
    return A.NormStatsFile(path=str(out_dir / "used.txt"), version="v2")


NODES = (Node("make", _make, "data", {"seed": "seed"}, {"stats": A.NormStatsFile}, source=_source),
         Node("use", _use, "normalize", {"stats": "stats"}, {"used": A.NormStatsFile}))


class _Tracker:
    def stage_skipped(self, *a):
        CALLS.append("skipped")

    @contextlib.contextmanager
    def stage(self, *a):
        yield self

    def epoch_logger(self):
        return None

    def log_outputs(self, outputs):
        pass


def _cfg(tmp_path):
    src = tmp_path / "src.txt"
    if not src.exists():
        src.write_text("data-1")
    return PipelineConfig.model_validate({"storage": str(tmp_path / "runs"), "data": {"source": "parquet", "path": str(src)},
                                          "train": {"model": {"kind": "mlp"}}})


def test_publish_skip_and_refuse_changed_source(tmp_path):
    CALLS.clear()
    cfg = _cfg(tmp_path)
    out = runner.run(cfg, "r1", _Tracker(), NODES)
    root = tmp_path / "runs" / "r1"
    assert sorted(p.name for p in root.iterdir()) == ["make", "use"]  # no .partial left
    assert out["used"].path == str(root / "use" / "used.txt")  # paths point to the published directory
    assert Path(out["used"].path).read_text() == "data-1 0"
    manifest = json.loads((root / "make" / "manifest.json").read_text())
    assert manifest["made_from"]["runtime"] == {"seed": 0} and manifest["made_from"]["source"]

    CALLS.clear()
    runner.run(cfg, "r1", _Tracker(), NODES)
    assert CALLS == ["skipped", "skipped"]

    (tmp_path / "src.txt").write_text("data-2, changed since the run started")
    with pytest.raises(ConfigError, match=r"--run-id r1: stage 'make' was completed from other inputs \(source changed\)"):
        runner.run(cfg, "r1", _Tracker(), NODES)


def test_failed_stage_leaves_only_partial_debris_which_the_next_attempt_removes(tmp_path):
    CALLS.clear()
    cfg = _cfg(tmp_path)
    _use.fail = True
    try:
        with pytest.raises(RuntimeError, match="stage failed"):
            runner.run(cfg, "r2", _Tracker(), NODES)
    finally:
        _use.fail = False
    root = tmp_path / "runs" / "r2"
    assert (root / "make" / "manifest.json").exists()
    assert not (root / "use").exists() and (root / "use.partial").exists()  # never mistaken for output
    (root / "use.partial" / "stray.txt").write_text("debris")
    runner.run(cfg, "r2", _Tracker(), NODES)
    assert not (root / "use.partial").exists() and not (root / "use" / "stray.txt").exists()
    assert CALLS == ["make", "use", "skipped", "use"]


def test_wrong_output_count_is_a_bug_not_a_silent_drop(tmp_path):
    def two(cfg, out_dir, seed):
        return A.NormStatsFile(path="a", version="1"), A.NormStatsFile(path="b", version="2")

    nodes = (Node("make", two, "data", {"seed": "seed"}, {"stats": A.NormStatsFile}),)
    with pytest.raises(RuntimeError, match=r"stage 'make' returned 2 value\(s\), declared 1"):
        runner.run(_cfg(tmp_path), "r3", _Tracker(), nodes)
    assert not (tmp_path / "runs" / "r3" / "make").exists()


def _ingest(cfg, out_dir, seed):
    CALLS.append("ingest")
    text = f"{Path(cfg.path).read_text()} {seed}"
    (out_dir / "raw.txt").write_text(text)
    return A.NormStatsFile(path=str(out_dir / "raw.txt"), version=text)  # the version is the content


def _normalize(cfg, out_dir, raw):
    CALLS.append("normalize")
    text = f"{Path(raw.path).read_text()} {cfg.method}"
    (out_dir / "norm.txt").write_text(text)
    return A.NormStatsFile(path=str(out_dir / "norm.txt"), version=text)


def _train(cfg, out_dir, norm):
    CALLS.append("train")
    (out_dir / "model.txt").write_text(Path(norm.path).read_text())
    return A.NormStatsFile(path=str(out_dir / "model.txt"), version="m")


CHAIN = (Node("ingest", _ingest, "data", {"seed": "seed"}, {"raw": A.NormStatsFile}, source=_source),
         Node("normalize", _normalize, "normalize", {"raw": "raw"}, {"norm": A.NormStatsFile}),
         Node("train", _train, "train", {"norm": "norm"}, {"model": A.NormStatsFile}))


def test_stage_cache_reuses_identical_stages_across_runs_and_reruns_only_downstream_of_a_change(tmp_path):
    base = _cfg(tmp_path)
    CALLS.clear()
    runner.run(base, "day1", _Tracker(), CHAIN)
    assert CALLS == ["ingest", "normalize", "train"]
    indexed = sorted(p.name.split("-")[0] for p in (tmp_path / "runs" / ".stage-cache").iterdir())
    assert indexed == ["ingest", "normalize"]  # only the stages named in cfg.reuse

    CALLS.clear()  # a new run id, same inputs: ingest and normalize come from day1, train runs
    out = runner.run(base, "day2", _Tracker(), CHAIN)
    assert CALLS == ["skipped", "skipped", "train"]
    day2 = tmp_path / "runs" / "day2"
    assert out["norm"].path == str(day2 / "normalize" / "norm.txt")  # this run's own copy
    assert (day2 / "normalize" / "norm.txt").read_text() == "data-1 0 standard"
    assert json.loads((day2 / "normalize" / "manifest.json").read_text())["outputs"]["norm"]["path"] == out["norm"].path

    CALLS.clear()  # a changed normalize field: ingest reused, normalize and everything after rerun
    minmax = base.model_copy(update={"normalize": base.normalize.model_copy(update={"method": "minmax"})})
    runner.run(minmax, "day3", _Tracker(), CHAIN)
    assert CALLS == ["skipped", "normalize", "train"]

    CALLS.clear()  # reuse switched off: everything recomputed
    runner.run(base.model_copy(update={"reuse": ()}), "day4", _Tracker(), CHAIN)
    assert CALLS == ["ingest", "normalize", "train"]

    CALLS.clear()  # the source changed: nothing stale is reused
    (tmp_path / "src.txt").write_text("data-2")
    runner.run(base, "day5", _Tracker(), CHAIN)
    assert CALLS == ["ingest", "normalize", "train"]


def test_a_stage_is_complete_exactly_when_its_manifest_exists(tmp_path):
    """The commit protocol: a stage directory without its manifest (an attempt cut between its last
    output and its manifest, or an object store's half-written prefix) is debris, run again and
    replaced; its files are never taken as outputs."""
    CALLS.clear()
    cfg = _cfg(tmp_path)
    runner.run(cfg, "r3", _Tracker(), NODES)
    root = tmp_path / "runs" / "r3"
    (root / "use" / "manifest.json").unlink()
    (root / "use" / "used.txt").write_text("half-written")
    CALLS.clear()
    out = runner.run(cfg, "r3", _Tracker(), NODES)
    assert CALLS == ["skipped", "use"]
    assert Path(out["used"].path).read_text() == "data-1 0"
    assert (root / "use" / "manifest.json").exists()


def test_a_split_is_read_as_its_manifest_lists_it(tmp_path):
    """Readers trust only what a complete stage says it wrote: a file that appears in a split's
    directory later (a stray copy, another writer's debris) is not read."""
    import numpy as np

    from schemas import arrow
    from tasks import arrow_io
    from tasks.reader import Split

    info = arrow_io.write_split(arrow_io.to_table(np.ones((5, 2), np.float32), np.zeros(5), arrow.example_schema(2)),
                                tmp_path / "train")
    arrow_io.write_file(arrow_io.to_table(np.zeros((3, 2), np.float32), np.ones(3), arrow.example_schema(2)),
                        tmp_path / "train" / "part-99999.parquet")
    assert info.files == ["part-00000.parquet"]
    assert Split(arrow_io.split_files(info)).rows == 5
