"""The DAG, declared once as data and validated before anything runs.

    ingest -> normalize -> train -> recalibrate -> evaluate

Each node names the function it runs, the config section it receives as ``cfg``, the artifacts it
takes (function parameter -> artifact name), the artifacts it produces with their types (the
runner writes and reads them in stage manifests), the sinks the runner hands it (parameter ->
sink name: callables such as the per-epoch metrics logger, which are not inputs of its result), and
the derived params worth logging beside its config.
"""

from __future__ import annotations

import difflib
import graphlib
import inspect
from dataclasses import dataclass, field
from typing import Callable, Optional

from schemas import artifacts as A
from schemas.config import PipelineConfig
from tasks.evaluate import evaluate
from tasks.ingest import ingest
from tasks.source import source_fingerprint
from tasks.normalize import normalize
from tasks.recalibrate import recalibrate
from tasks.train import train

# Values the runner supplies itself rather than a stage; they are part of a stage's cache key.
# ``weights`` is the warm start (``pipeline.warm_start``), None unless a caller hands it in ``given``.
RUNTIME_VALUES = ("seed", "weights")
# What the runner supplies per stage run; they receive results and do not shape them: the per-epoch
# metrics logger, and the console every stage reports its progress through (stages never print).
SINKS = ("epoch_logger", "console")
SHOWN = {"console": "console"}


class DagError(Exception):
    """A wiring error in the DAG declaration (a bug in bnflow, not user input)."""


@dataclass(frozen=True)
class Node:
    name: str
    fn: Callable
    config: str
    inputs: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, type] = field(default_factory=dict)
    sinks: dict[str, str] = field(default_factory=dict)
    params: Optional[Callable] = None  # section -> {dotted name: value}: derived values to log as params
    source: Optional[Callable] = None  # section -> str: fingerprint of what the stage reads from outside the run
    resumable: bool = False  # continues from its own checkpoints in an interrupted attempt's .partial directory


PIPELINE: tuple[Node, ...] = (  # a search walks parts of it: the data stages once, train per trial, then the rest
    Node("ingest", ingest, "data", {"seed": "seed"}, {"raw": A.Dataset}, source=source_fingerprint),
    Node("normalize", normalize, "normalize", {"raw": "raw"}, {"data": A.Dataset, "norm_stats": A.NormStatsFile},
         sinks=SHOWN),
    Node("train", train, "train", {"data": "data", "norm_stats": "norm_stats", "seed": "seed", "weights": "weights"},
         {"trained": A.Checkpoint, "history": A.TrainHistory}, sinks={"on_epoch": "epoch_logger", **SHOWN},
         params=lambda section: {"train.bn_mode": section.bn_mode},  # the resolved mode, not just the knob
         resumable=True),
    Node("recalibrate", recalibrate, "recalibrate", {"checkpoint": "trained", "data": "data", "seed": "seed"},
         {"recalibrated": A.Checkpoint}, sinks=SHOWN),
    Node("evaluate", evaluate, "evaluate",
         {"trained": "trained", "recalibrated": "recalibrated", "data": "data", "history": "history"},
         {"evaluation": A.Evaluation}, sinks=SHOWN),
)


def select(*names: str) -> tuple[Node, ...]:
    """The named nodes of the pipeline, in its order (a search walks it in parts).

    Raises:
        DagError: a name that is not a stage (with a "did you mean").
    """
    known = [n.name for n in PIPELINE]
    for name in names:
        if name not in known:
            raise DagError(f"no stage named '{name}'{_hint(name, known)}")
    return tuple(n for n in PIPELINE if n.name in names)


def derived_params(cfg: PipelineConfig, nodes: tuple[Node, ...] = PIPELINE) -> dict[str, str]:
    """Every node's derived params for ``cfg`` (logged on the parent run beside the config)."""
    out: dict[str, str] = {}
    for n in nodes:
        if n.params is not None:
            out.update({k: str(v) for k, v in n.params(getattr(cfg, n.config)).items()})
    return out


def validate(nodes: tuple[Node, ...], given: tuple[str, ...] = ()) -> list[Node]:
    """Check the wiring and return the nodes in topological order. ``given`` names artifacts made
    before this walk (a search's shared data, a search winner's trained checkpoint).

    Raises:
        DagError: duplicate names, a config section the config tree does not have, two producers
            of one artifact, an input nobody produces or an unknown sink (with a "did you mean"),
            a cycle, or inputs that do not bind to the function's signature.
    """
    names = [n.name for n in nodes]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DagError(f"duplicate stage names: {dupes}")
    sections = list(PipelineConfig.model_fields)
    producer: dict[str, str] = {}
    for n in nodes:
        if n.config not in sections:
            raise DagError(f"stage '{n.name}' takes config section '{n.config}', which the config tree lacks{_hint(n.config, sections)}")
        for out in n.outputs:
            if out in producer or out in RUNTIME_VALUES or out in SINKS or out in given:
                raise DagError(f"artifact '{out}' has two producers: '{producer.get(out, 'runtime')}' and '{n.name}'")
            producer[out] = n.name
    for n in nodes:
        for param, art in n.inputs.items():
            if art not in producer and art not in RUNTIME_VALUES and art not in given:
                raise DagError(f"stage '{n.name}' input '{param}' wants artifact '{art}', which no stage produces"
                               f"{_hint(art, list(producer) + list(RUNTIME_VALUES) + list(given))}")
        for param, sink in n.sinks.items():
            if sink not in SINKS:
                raise DagError(f"stage '{n.name}' sink '{param}' wants '{sink}', which the runner does not supply{_hint(sink, SINKS)}")
        _check_signature(n)

    graph = {n.name: {producer[a] for a in n.inputs.values() if a in producer} for n in nodes}
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        raise DagError("cycle: " + " -> ".join(e.args[1])) from None
    by_name = {n.name: n for n in nodes}
    return [by_name[name] for name in order]


def _hint(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _check_signature(n: Node) -> None:
    params = inspect.signature(n.fn).parameters
    given = set(n.inputs) | set(n.sinks) | {"cfg", "out_dir"}
    unknown = given - set(params)
    if unknown:
        raise DagError(f"stage '{n.name}': {n.fn.__name__}() has no parameter(s) {sorted(unknown)}")
    missing = [p for p, spec in params.items() if p not in given and spec.default is inspect.Parameter.empty]
    if missing:
        raise DagError(f"stage '{n.name}': {n.fn.__name__}() parameter(s) {missing} are not bound to any input")
