"""The CUDA paths CI cannot run (its machines have no GPU), checked on one GPU without Ray or MLflow.

1. ``tasks.nn.SyncBatchNorm`` on CUDA tensors delegates to torch's kernel; in a DDP model over NCCL
   its forward, input/weight gradients and running statistics equal a float64 ``BatchNorm2d`` on
   the CPU (a world of one rank: NCCL refuses two ranks on one GPU, so the cross-rank reduction
   itself is torch's and is not exercised here).
2. The recalibrate stage's task body on CUDA: ``collect_bn_stats`` on a CUDA LeNet-BN, the share
   moved to the CPU by ``tasks.recalibrate._to_cpu``, shares merged and applied to a CUDA model,
   equal a float64 single pass on the CPU over the same batches.
3. Step time of LeNet-BN (batch 256, 28x28) under DDP on the GPU, SyncBatchNorm over plain
   BatchNorm, median of timed steps after warm-up, the two models alternating.

    python -m benchmarks.gpu_paths [--out FILE]    # default benchmarks/results/gpu_paths.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_paths.json"


def _lenet(sync: bool) -> nn.Module:
    from schemas.config import ModelConfig
    from tasks.nn import convert_sync_batchnorm
    from tasks.nn.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="lenet"), (1, 28, 28), 10)
    return convert_sync_batchnorm(model) if sync else model


def check_syncbn_matches_float64() -> dict:
    from tasks.nn import SyncBatchNorm

    torch.manual_seed(1)
    layer = SyncBatchNorm(6).cuda()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2.0), layer.bias.normal_()
    ref = nn.BatchNorm2d(6).double()
    ref.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in layer.state_dict().items()})
    ddp = nn.parallel.DistributedDataParallel(layer, device_ids=[0])
    x = (torch.randn(64, 6, 12, 12, dtype=torch.float64) * 3 + 100)
    g = torch.randn_like(x)
    xc = x.float().cuda().requires_grad_()
    calls = []
    torch_forward = nn.SyncBatchNorm.forward
    nn.SyncBatchNorm.forward = lambda self, input: calls.append(1) or torch_forward(self, input)
    try:
        y = ddp(xc)
    finally:
        nn.SyncBatchNorm.forward = torch_forward
    y.backward(g.float().cuda())
    xr = x.clone().requires_grad_()
    yr = ref(xr)
    yr.backward(g)
    err = lambda a, b: float((a.detach().double().cpu() - b.detach()).abs().max())  # noqa: E731
    return {"torch_syncbn_forward_calls": len(calls),
            "output_max_err": err(y, yr), "input_grad_max_err": err(xc.grad, xr.grad),
            "weight_grad_max_err": err(layer.weight.grad, ref.weight.grad),
            "running_var_max_err": err(layer.running_var, ref.running_var),
            "running_mean_max_err": err(layer.running_mean, ref.running_mean)}


def check_recalibration_shares_on_cuda() -> dict:
    from tasks.nn.bn_stats import apply_bn_stats, collect_bn_stats, merge_bn_stats, update_bn_stats
    from tasks.recalibrate import _to_cpu

    model = _lenet(sync=False).cuda()
    torch.manual_seed(2)
    batches = [torch.randn(n, 1, 28, 28) * 2 + 1 for n in (256, 256, 100, 256, 7)]
    shares = []
    for run in (batches[:2], batches[2:3], batches[3:]):
        s = collect_bn_stats(model, [b.cuda() for b in run], "exact")
        shares.append({**s, "layers": [None if a is None else _to_cpu(a) for a in s["layers"]]})
    merged = shares[0]
    for s in shares[1:]:
        merged = merge_bn_stats(merged, s)
    on_gpu = copy.deepcopy(model)
    rows = apply_bn_stats(on_gpu, merged)
    ref = copy.deepcopy(model).cpu().double()
    update_bn_stats(ref, [b.double() for b in batches])
    worst = max(float((on_gpu.state_dict()[k].double().cpu() - v).abs().max() / (v.abs().max() + 1e-12))
                for k, v in ref.state_dict().items() if k.endswith(("running_mean", "running_var")))
    return {"rows": rows, "share_devices": sorted({str(a.mean.device) for s in shares for a in s["layers"] if a is not None}),
            "buffers_device": str(next(on_gpu.buffers()).device), "max_relative_err_vs_float64_cpu": worst}


def time_steps(steps: int = 60, warmup: int = 15) -> dict:
    models = {}
    for name, sync in (("plain", False), ("sync", True)):
        m = _lenet(sync).cuda()
        models[name] = (nn.parallel.DistributedDataParallel(m, device_ids=[0]),)
        models[name] += (torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9),)
    x = torch.randn(256, 1, 28, 28, device="cuda")
    y = torch.randint(0, 10, (256,), device="cuda")
    times: dict[str, list[float]] = {"plain": [], "sync": []}
    for i in range(warmup + steps):
        for name, (ddp, opt) in models.items():
            torch.cuda.synchronize()
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()
            torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"steps": steps, "median_step_ms": {k: 1e3 * v for k, v in med.items()}, "sync_over_plain": med["sync"] / med["plain"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args()
    # Exactness is checked against float64: no TF32 in cuDNN convolutions or matmuls (both models
    # of the timing run under the same setting).
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    store = tempfile.mktemp(prefix="bnflow-nccl-")
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1, device_id=torch.device("cuda:0"))
    try:
        report = {"date": time.strftime("%Y-%m-%d"), "command": "python -m benchmarks.gpu_paths",
                  "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "nccl": ".".join(map(str, torch.cuda.nccl.version())),
                  "python": platform.python_version(), "world_size": 1,
                  "syncbn_vs_float64": check_syncbn_matches_float64(),
                  "recalibration_shares_on_cuda": check_recalibration_shares_on_cuda(),
                  "step_time": time_steps()}
    finally:
        dist.destroy_process_group()
        if os.path.exists(store):
            os.remove(store)
    Path(a.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
