"""The DAG, declared once as data and validated before anything runs.

    ingest -> normalize -> train -> recalibrate -> evaluate

Each node names the function it runs, the config section it receives as ``cfg``, the artifacts it
takes (function parameter -> artifact name) and the artifacts it produces, with their types (the
runner uses them to write and read stage manifests).
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Callable

from schemas import artifacts as A
from tasks.evaluate import evaluate
from tasks.ingest import ingest
from tasks.normalize import normalize
from tasks.recalibrate import recalibrate
from tasks.train import train

# Values the runner supplies itself rather than a stage: the seed and the per-epoch metrics sink.
RUNTIME_INPUTS = ("seed", "epoch_logger")


class DagError(Exception):
    """A wiring error in the DAG declaration (a bug in bnflow, not user input)."""


@dataclass(frozen=True)
class Node:
    name: str
    fn: Callable
    config: str
    inputs: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, type] = field(default_factory=dict)


PIPELINE: tuple[Node, ...] = (
    Node("ingest", ingest, "data", {"seed": "seed"}, {"raw": A.Dataset}),
    Node("normalize", normalize, "normalize", {"raw": "raw"}, {"data": A.Dataset, "norm_stats": A.NormStatsFile}),
    Node("train", train, "train",
         {"data": "data", "norm_stats": "norm_stats", "seed": "seed", "on_epoch": "epoch_logger"},
         {"trained": A.Checkpoint, "history": A.TrainHistory}),
    Node("recalibrate", recalibrate, "recalibrate", {"checkpoint": "trained", "data": "data"},
         {"recalibrated": A.Checkpoint}),
    Node("evaluate", evaluate, "evaluate",
         {"trained": "trained", "recalibrated": "recalibrated", "data": "data", "history": "history"},
         {"evaluation": A.Evaluation}),
)


def validate(nodes: tuple[Node, ...], runtime: tuple[str, ...] = RUNTIME_INPUTS) -> list[Node]:
    """Check the wiring and return the nodes in topological order.

    Raises:
        DagError: duplicate names, two producers of one artifact, an input nobody produces (with a
            "did you mean"), a cycle, or inputs that do not bind to the function's signature.
    """
    names = [n.name for n in nodes]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DagError(f"duplicate stage names: {dupes}")
    producer: dict[str, str] = {}
    for n in nodes:
        for out in n.outputs:
            if out in producer or out in runtime:
                raise DagError(f"artifact '{out}' has two producers: '{producer.get(out, 'runtime')}' and '{n.name}'")
            producer[out] = n.name
    for n in nodes:
        for param, art in n.inputs.items():
            if art not in producer and art not in runtime:
                close = difflib.get_close_matches(art, list(producer) + list(runtime), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise DagError(f"stage '{n.name}' input '{param}' wants artifact '{art}', which no stage produces{hint}")
        _check_signature(n)

    order: list[Node] = []
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    by_name = {n.name: n for n in nodes}

    def visit(n: Node, path: list[str]):
        if state.get(n.name) == 2:
            return
        if state.get(n.name) == 1:
            raise DagError("cycle: " + " -> ".join(path + [n.name]))
        state[n.name] = 1
        for art in n.inputs.values():
            if art in producer:
                visit(by_name[producer[art]], path + [n.name])
        state[n.name] = 2
        order.append(n)

    for n in nodes:
        visit(n, [])
    return order


def _check_signature(n: Node) -> None:
    params = inspect.signature(n.fn).parameters
    given = set(n.inputs) | {"cfg", "out_dir"}
    unknown = given - set(params)
    if unknown:
        raise DagError(f"stage '{n.name}': {n.fn.__name__}() has no parameter(s) {sorted(unknown)}")
    missing = [p for p, spec in params.items() if p not in given and spec.default is inspect.Parameter.empty]
    if missing:
        raise DagError(f"stage '{n.name}': {n.fn.__name__}() parameter(s) {missing} are not bound to any input")
