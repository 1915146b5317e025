"""Walks the DAG in topological order: skip what is complete, run the rest, record everything.

The commit protocol: a stage is complete exactly when ``<storage>/<run id>/<stage>/manifest.json``
exists. The manifest is written last (``schemas.artifacts.write_atomic``: whole or absent) and lists
every output, and readers read only what it lists (a split's files are in its ``SplitInfo``). A
stage directory without a manifest is debris of an interrupted attempt and is replaced. On a local
or NFS disk the stage is also written in ``<stage>.partial/`` and renamed into place with its
manifest, so a complete stage directory is never written into again; the protocol does not rely
on the rename (an object store, which has none, can take the stage's files in place and the
manifest last). The manifest records the
stage's outputs and what they were made from: the config section's hash, the runtime values it
takes (the seed), the content digest of every input artifact (split digests, statistics versions,
checkpoint digests) and, for ingest, a fingerprint of the source files.

On a resumed run, a complete stage whose recorded inputs equal today's is skipped. One whose
inputs differ (the source data or an upstream artifact changed) is refused: a run id names one
set of inputs. A ``.partial`` directory is debris of an interrupted attempt and is removed, except
for stages declared resumable (train), which continue from their own checkpoints in it.

Stages named in ``cfg.reuse`` (ingest and normalize by default) are also shared between runs of
one storage: a stage whose inputs equal those of a complete stage of another run is hard-linked
from it instead of recomputed; a changed field reruns that stage and, through the digests, the
ones downstream.

The caller holds the run's lease (``pipeline.lease``): one process at a time works in a run directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

from pydantic import BaseModel

from pipeline.dag import PIPELINE, RUNTIME_VALUES, Node, validate
from schemas.artifacts import write_atomic
from schemas.config import PipelineConfig, config_hash
from schemas.errors import ConfigError
from tasks.console import Console

MANIFEST = "manifest.json"
MANIFEST_VERSION = "2"
PARTIAL = ".partial"
CACHE_DIR = ".stage-cache"  # under storage: made_from -> the stage directory that holds those outputs


def run(cfg: PipelineConfig, run_id: str, tracker, nodes: tuple[Node, ...] = PIPELINE,
        given: dict | None = None, console: Console | None = None) -> dict:
    """Run (or resume) pipeline ``run_id``; returns every artifact by name. ``given`` holds artifacts
    made before this walk, by name (a search hands its trials the shared data this way); they enter
    the manifests' digests like any stage's outputs. ``tracker`` records each stage: a
    ``pipeline.tracking.runs.Tracker`` or anything with its ``stage`` and ``stage_skipped``; the
    runner's lines and the stages' progress go to ``console`` (default: a new one on this process's
    stdout and stderr).

    Raises:
        ConfigError: a complete stage of this run id was made from other inputs than today's.
    """
    order = validate(nodes, given=tuple(given or ()))
    console = console or Console()
    root = Path(cfg.storage).resolve() / run_id
    produced: dict = {"weights": None, **(given or {}), "seed": cfg.seed}
    for i, node in enumerate(order, 1):
        section = getattr(cfg, node.config)
        made_from = _made_from(node, section, produced)
        stage_dir, partial = root / node.name, root / f"{node.name}{PARTIAL}"
        outputs = _load_manifest(stage_dir, node, made_from, run_id)
        reused = None
        if outputs is None and node.name in cfg.reuse:
            reused, outputs = _reuse(root.parent, node, made_from, partial, stage_dir)
        if outputs is not None:
            where = f"reused from {reused}" if reused else f"complete in {stage_dir}, skipped"
            console.say(f"stage {i}/{len(order)} {node.name}: {where}")
            tracker.stage_skipped(node.name, section, node.params, outputs)
        else:
            _prepare(partial, resumable=node.resumable, made_from=made_from)
            if not console.interactive():  # in a log, the start of a long stage; on a terminal its bar says so
                console.say(f"stage {i}/{len(order)} {node.name}: running")
            t0 = time.perf_counter()
            with tracker.stage(node.name, section, node.params) as stage:
                sinks = {"epoch_logger": lambda: _saying(stage.epoch_logger(), console), "console": lambda: console}
                kwargs = {p: produced[a] for p, a in node.inputs.items()}
                kwargs.update({p: sinks[s]() for p, s in node.sinks.items()})
                result = node.fn(cfg=section, out_dir=partial, **kwargs)
                outputs = _check_outputs(node, result, partial, stage_dir)
                _write_manifest(partial, node, made_from, outputs)
                _publish(partial, stage_dir)
                if node.name in cfg.reuse:
                    _remember(root.parent, node, made_from, stage_dir)
                stage.log_outputs(outputs)
            console.say(f"stage {i}/{len(order)} {node.name}: done in {time.perf_counter() - t0:.1f}s")
        produced.update(outputs)
    return produced


def _saying(log, console: Console):
    """The epoch logger as a stage sees it, ``(epoch, metrics) -> None``: what the tracker has to
    say about it (the server went away, came back) is said here, not by the stage."""
    def on_epoch(epoch: int, metrics: dict) -> None:
        note = log(epoch, metrics)
        if note:
            console.say(note)
    return on_epoch


def cache_key(made_from: dict) -> str:
    """The stage cache's key for a stage made from ``made_from``: its entry is
    ``<storage>/.stage-cache/<stage>-<key>.json``."""
    return hashlib.sha256(json.dumps(made_from, sort_keys=True).encode()).hexdigest()[:24]


def _cache_entry(storage: Path, node: Node, made_from: dict) -> Path:
    return storage / CACHE_DIR / f"{node.name}-{cache_key(made_from)}.json"


def _remember(storage: Path, node: Node, made_from: dict, stage_dir: Path) -> None:
    """Index a complete stage by what it was made from, for ``_reuse`` by later runs."""
    entry = _cache_entry(storage, node, made_from)
    entry.parent.mkdir(exist_ok=True)
    write_atomic(entry, json.dumps({"stage_dir": str(stage_dir)}))


def _reuse(storage: Path, node: Node, made_from: dict, partial: Path, stage_dir: Path):
    """An earlier run's complete outputs for identical inputs, hard-linked into this run and
    published; (where from, outputs), or (None, None) when there is nothing valid to reuse."""
    entry = _cache_entry(storage, node, made_from)
    if not entry.exists():
        return None, None
    source = Path(json.loads(entry.read_text())["stage_dir"])
    manifest = source / MANIFEST
    body = json.loads(manifest.read_text()) if manifest.exists() else {}
    if body.get("made_from") != made_from:
        return None, None  # that run was deleted or its stage replaced: recompute
    if partial.exists():
        _remove(partial)
    shutil.copytree(source, partial, copy_function=_link_or_copy, ignore=shutil.ignore_patterns(MANIFEST))
    outputs = {k: node.outputs[k].model_validate(_retarget(v, str(source), str(stage_dir)))
               for k, v in body["outputs"].items()}
    _write_manifest(partial, node, made_from, outputs)
    _publish(partial, stage_dir)
    return source.parent.name, outputs


def _link_or_copy(src: str, dst: str) -> None:
    """Published files are never written again, so a hard link is a safe copy; a plain copy where
    the filesystem has no hard links."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _made_from(node: Node, section, produced: dict) -> dict:
    """What a stage's result depends on: its config, its seed, its inputs' contents, its source."""
    inputs = {p: artifact_digest(produced[a]) for p, a in node.inputs.items() if a not in RUNTIME_VALUES}
    runtime = {p: artifact_digest(produced[a]) if isinstance(produced[a], BaseModel) else produced[a]
               for p, a in node.inputs.items() if a in RUNTIME_VALUES}
    made = {"config": config_hash(section), "runtime": runtime, "inputs": inputs}
    if node.source is not None:
        made["source"] = node.source(section)
    return made


def artifact_digest(art: BaseModel) -> str:
    """An artifact's identity, independent of where it lies: its fields without the paths, which
    leaves content digests (split digests, statistics versions, checkpoint digests, histories)."""
    def content(value):
        if isinstance(value, dict):
            return {k: content(v) for k, v in value.items() if k not in ("path", "files")}
        if isinstance(value, list):
            return [content(v) for v in value]
        return value

    return hashlib.sha256(json.dumps(content(art.model_dump(mode="json")), sort_keys=True).encode()).hexdigest()[:16]


def _prepare(partial: Path, resumable: bool, made_from: dict) -> None:
    """A .partial directory for this attempt: an interrupted attempt's is kept for a resumable stage
    with the same inputs, removed otherwise."""
    key_file = partial / ".made_from.json"
    if partial.exists():
        same = key_file.exists() and json.loads(key_file.read_text()) == made_from
        if not (resumable and same):
            _remove(partial)
    partial.mkdir(parents=True, exist_ok=True)
    key_file.write_text(json.dumps(made_from, sort_keys=True))


def _remove(path: Path) -> None:
    """Delete a directory by first renaming it aside: a crash midway leaves no half-deleted stage."""
    aside = path.with_name(f"{path.name}.trash-{uuid.uuid4().hex[:8]}")
    os.rename(path, aside)
    shutil.rmtree(aside)


def _check_outputs(node: Node, result, partial: Path, stage_dir: Path) -> dict:
    """The stage's return value as {output name: artifact}, checked against the declaration, with
    paths into ``partial`` pointing to where the directory will be published."""
    values = result if isinstance(result, tuple) else (result,)
    if len(values) != len(node.outputs):
        raise RuntimeError(f"stage '{node.name}' returned {len(values)} value(s), declared {len(node.outputs)}: {list(node.outputs)}")
    outputs = {}
    for (name, kind), value in zip(node.outputs.items(), values):
        if not isinstance(value, kind):
            raise RuntimeError(f"stage '{node.name}' output '{name}' is a {type(value).__name__}, declared {kind.__name__}")
        outputs[name] = kind.model_validate(_retarget(value.model_dump(mode="json"), str(partial), str(stage_dir)))
    return outputs


def _retarget(value, old: str, new: str):
    if isinstance(value, dict):
        return {k: _retarget(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_retarget(v, old, new) for v in value]
    if isinstance(value, str) and (value == old or value.startswith(old + os.sep)):
        return new + value[len(old):]
    return value


def _publish(partial: Path, stage_dir: Path) -> None:
    """Rename the finished .partial directory into place (atomic on one filesystem)."""
    if stage_dir.exists():  # a complete stage whose manifest no longer matched: replaced, never mixed
        _remove(stage_dir)
    os.rename(partial, stage_dir)


def _write_manifest(stage_dir: Path, node: Node, made_from: dict, outputs: dict) -> None:
    """The stage's commit: written last, whole or absent, listing every output."""
    body = {"manifest_version": MANIFEST_VERSION, "stage": node.name, "made_from": made_from,
            "outputs": {k: v.model_dump(mode="json") for k, v in outputs.items()}}
    write_atomic(stage_dir / MANIFEST, json.dumps(body, indent=1))


def _load_manifest(stage_dir: Path, node: Node, made_from: dict, run_id: str) -> dict | None:
    path = stage_dir / MANIFEST
    if not path.exists():
        return None
    body = json.loads(path.read_text())
    if body.get("manifest_version") != MANIFEST_VERSION:
        return None
    recorded = body.get("made_from", {})
    if recorded != made_from:
        what = [k for k in ("source", "config", "runtime") if recorded.get(k) != made_from.get(k)]
        what += [f"input '{p}'" for p in made_from["inputs"] if recorded.get("inputs", {}).get(p) != made_from["inputs"][p]]
        raise ConfigError(
            f"--run-id {run_id}: stage '{node.name}' was completed from other inputs ({', '.join(what) or 'layout'} changed); "
            "a run id names one set of inputs: start a new run without --run-id")
    return {k: node.outputs[k].model_validate(v) for k, v in body["outputs"].items()}
