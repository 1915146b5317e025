"""Walks the DAG in topological order: skip what is complete, run the rest, record everything.

A stage's outputs live under ``<storage>/<run id>/<stage>/``; its manifest (the outputs, the
config hash and the digest of its inputs) is written last and atomically. A stage whose manifest
exists and matches its inputs is not run again; any other content of its directory is treated as
debris from a failed attempt and removed before the stage runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from pipeline.dag import PIPELINE, Node, validate
from pipeline.tracking import Tracker
from schemas.config import PipelineConfig, config_hash

log = logging.getLogger("bnflow")
MANIFEST = "manifest.json"
MANIFEST_VERSION = "1"


def run(cfg: PipelineConfig, run_id: str, tracker: Tracker, nodes: tuple[Node, ...] = PIPELINE) -> dict:
    """Run (or resume) pipeline ``run_id``; returns every artifact by name."""
    order = validate(nodes)
    root = Path(cfg.storage).resolve() / run_id
    root.mkdir(parents=True, exist_ok=True)
    produced: dict = {"seed": cfg.seed}
    keys: dict[str, str] = {}
    for i, node in enumerate(order, 1):
        section = getattr(cfg, node.config)
        key = _input_key(node, section, keys, cfg.seed)
        stage_dir = root / node.name
        outputs = _load_manifest(stage_dir, node, key)
        if outputs is not None:
            print(f"[bnflow] stage {i}/{len(order)} {node.name}: complete in {stage_dir}, skipped", flush=True)
            tracker.stage_skipped(node.name)
        else:
            if stage_dir.exists():
                shutil.rmtree(stage_dir)
            stage_dir.mkdir(parents=True)
            print(f"[bnflow] stage {i}/{len(order)} {node.name}: running", flush=True)
            t0 = time.perf_counter()
            with tracker.stage(node.name, section) as stage:
                kwargs = {p: (stage.epoch_logger() if art == "epoch_logger" else produced[art]) for p, art in node.inputs.items()}
                result = node.fn(cfg=section, out_dir=stage_dir, **kwargs)
                values = result if isinstance(result, tuple) else (result,)
                outputs = dict(zip(node.outputs, values))
                stage.log_outputs(outputs)
                _write_manifest(stage_dir, node, key, outputs)
            print(f"[bnflow] stage {i}/{len(order)} {node.name}: done in {time.perf_counter() - t0:.1f}s", flush=True)
        for name in node.outputs:
            keys[name] = key
        produced.update(outputs)
    return produced


def _input_key(node: Node, section, keys: dict[str, str], seed: int) -> str:
    """What a stage's result depends on: its config and the keys of the artifacts it reads."""
    parts = {"config": config_hash(section), "seed": seed if "seed" in node.inputs.values() else None,
             "inputs": {p: keys.get(a) for p, a in node.inputs.items() if a != "epoch_logger"}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _write_manifest(stage_dir: Path, node: Node, key: str, outputs: dict) -> None:
    body = {"manifest_version": MANIFEST_VERSION, "stage": node.name, "input_key": key,
            "outputs": {k: v.model_dump(mode="json") for k, v in outputs.items()}}
    tmp = stage_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(body, indent=1))
    os.replace(tmp, stage_dir / MANIFEST)  # atomic: a manifest is either whole or absent


def _load_manifest(stage_dir: Path, node: Node, key: str) -> dict | None:
    path = stage_dir / MANIFEST
    if not path.exists():
        return None
    body = json.loads(path.read_text())
    if body.get("manifest_version") != MANIFEST_VERSION or body.get("input_key") != key:
        return None
    return {k: node.outputs[k].model_validate(v) for k, v in body["outputs"].items()}
