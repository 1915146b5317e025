"""What progress reporting costs the step loop: rank 0's loop with no progress at all, with the
writer it had until 2026-12-01 (the whole history as JSON, twice a second, from inside the step
loop), and with ``tasks.train_progress.ProgressWriter`` (a few dozen bytes at most once a second;
the history once per epoch), side by side in one process, alternating, on one thread.

The step is the digits recipe's: its MLP (64 -> 256 -> 128 -> 10 with BatchNorm) on batches of 64,
SGD with momentum; the history holds ``--epochs`` epochs of the train metrics bnflow keeps, as a
long run's does near its end. Medians of ``--repeats``; the ratios are the figures.

    python -m benchmarks.progress_cost [--steps 3000] [--repeats 3] [--epochs 200] [--dir PATH]

``--dir`` is where the files go (default: a temporary directory on local disk; a run's storage on
NFS or an object store makes the old writer's cost larger, not the new one's per step).
Writes benchmarks/results/progress_cost.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "progress_cost.json"


class HistoryTwiceASecond:
    """The writer the loop had before: every 0.5 s the whole history and clock, atomically."""

    def __init__(self, out_dir: Path, steps: int, history: list[dict], clock):
        self.path, self.steps, self.history, self.clock = out_dir / "progress.json", steps, history, clock
        self.last = 0.0

    def step(self, epoch: int, step: int) -> None:
        now = time.monotonic()
        if now - self.last < 0.5:
            return
        self.last = now
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"epoch": epoch, "step": step, "steps": self.steps, "resumed_after": 0,
                                   "history": self.history, "clock": {"marks": self.clock.marks, "spans": self.clock.spans}}))
        tmp.replace(self.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    from schemas.config import ModelConfig
    from tasks.nn.models import build_model
    from tasks.train_loop import Clock
    from tasks.train_progress import ProgressWriter

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="mlp", hidden=(256, 128)), (64,), 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    keys = ("train_loss", "train_accuracy", "lr", "epoch_seconds", "val_loss", "val_accuracy", "grad_norm_max",
            "grad_first_to_last")
    history = [{"epoch": e, **{k: 0.123456789 for k in keys}} for e in range(1, args.epochs + 1)]
    clock = Clock()

    def loop(writer) -> float:
        t0 = time.perf_counter()
        for s in range(args.steps):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if writer is not None:
                writer.step(args.epochs + 1, s + 1)
        return (time.perf_counter() - t0) / args.steps

    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        out = Path(d)
        ways = {"none": lambda: None,
                "history_twice_a_second": lambda: HistoryTwiceASecond(out, args.steps, history, clock),
                "progress_writer": lambda: ProgressWriter(out, args.steps, history, clock)}
        loop(None)  # warm-up: allocator, autograd graph
        times: dict[str, list[float]] = {k: [] for k in ways}
        for _ in range(args.repeats):
            for name, make in ways.items():
                times[name].append(loop(make()))
        sizes = {}
        for name in ("history_twice_a_second", "progress_writer"):  # one write each, each in a directory of its own
            (out / name).mkdir()
            writer = HistoryTwiceASecond(out / name, args.steps, history, clock) if name != "progress_writer" else \
                ProgressWriter(out / name, args.steps, history, clock)
            writer.step(args.epochs + 1, 1)
            sizes[name] = (out / name / "progress.json").stat().st_size
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "date": time.strftime("%Y-%m-%d"), "steps": args.steps, "repeats": args.repeats, "history_epochs": args.epochs,
        "step_ms_median": {k: round(v * 1e3, 4) for k, v in med.items()},
        "bytes_per_step_write": sizes, "step_writes_per_second": {"history_twice_a_second": 2, "progress_writer": 1},
        "overhead_vs_none": {k: round(med[k] / med["none"] - 1, 4) for k in ways if k != "none"},
        "step_ms_all": {k: [round(t * 1e3, 4) for t in v] for k, v in times.items()},
    }
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
