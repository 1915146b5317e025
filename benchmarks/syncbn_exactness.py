"""SyncBatchNorm in float32 on data with a large offset (mean 1e4, std 1): error against float64.

The large-mean case of ``tests/unit/test_syncbn.py`` (2 gloo ranks x 512 rows x 3 channels x 8):
``tasks.nn.SyncBatchNorm`` over both ranks and torch's single-process ``BatchNorm1d`` on the whole
batch, both float32, each against a float64 reference with autograd through explicit ops.

    python -m benchmarks.syncbn_exactness

Writes benchmarks/results/syncbn_exactness.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results" / "syncbn_exactness.json"


def main() -> int:
    from tests.gloo_group import run_group
    from tests.unit import test_syncbn as cases

    world = 2
    ranks = run_group(cases._worker, world, "shm")
    idx = [c[0] for c in cases._cases(world)].index("large-mean")
    name, sizes, spatial, dtype, momentum, offset = cases._cases(world)[idx]
    x, g, w, b = cases._global_input(sizes, spatial, dtype, offset, seed=idx)
    ref = cases._reference(x, g, w, b, momentum)
    ours = {"y": torch.cat([r[name]["y"] for r in ranks]), "grad_x": torch.cat([r[name]["grad_x"] for r in ranks]),
            "grad_w": sum(r[name]["grad_w"].double() for r in ranks)}
    bn = nn.BatchNorm1d(3, eps=cases.EPS)
    with torch.no_grad():
        bn.weight.copy_(w), bn.bias.copy_(b)
    xt = x.float().clone().requires_grad_(True)
    yt = bn(xt)
    yt.backward(g.float())
    theirs = {"y": yt.detach(), "grad_x": xt.grad, "grad_w": bn.weight.grad}
    err = {side: {k: float((v.double() - ref[k]).abs().max()) for k, v in vals.items()}
           for side, vals in (("bnflow_syncbn", ours), ("torch_batchnorm1d", theirs))}
    result = {"benchmark": "syncbn_exactness", "date": time.strftime("%Y-%m-%d"),
              "case": f"float32, mean {offset:g}, std 1, {world} ranks x {sizes[0]} rows x 3 channels x {spatial[0]}",
              "max_abs_error_vs_float64": err,
              "torch_over_bnflow": {k: err["torch_batchnorm1d"][k] / err["bnflow_syncbn"][k] for k in ours}}
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
