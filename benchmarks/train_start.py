"""How long the train stage takes from ``trainer.fit()`` to its first training step, against the floor
that Ray Train itself sets: the same ``TorchTrainer`` (same workers, CPUs, rendezvous config, storage)
running a train function that only notes the time it starts.

Both run in one Ray instance started the pipeline's way (``pipeline.cluster.connect``), on the
recipe's own normalized splits, alternating which goes first, ``--repeats`` times each. The floor is
what no bnflow code can remove while Ray Train is the engine: the controller actor, the placement
group, the worker actors and their imports, the process group. The stage's own part is the rest,
from its timings.json: reading the shard, building the model, SyncBatchNorm + DDP, the first step.

    python -m benchmarks.train_start [--recipe digits] [--repeats 3]

Writes benchmarks/results/train_start_<recipe>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _started(config: dict) -> None:
    """The floor's train function: the process group is up when it runs; note the time and return."""
    import ray.train

    if ray.train.get_context().get_world_rank() == 0:
        Path(config["stamp"]).write_text(str(time.time()))


def _floor(cfg, out: Path) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tasks.rendezvous import ScopedTorchConfig

    stamp = out / "started"
    trainer = TorchTrainer(_started, train_loop_config={"stamp": str(stamp)}, torch_config=ScopedTorchConfig(),
                           scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                                        resources_per_worker={"CPU": cfg.cpus_per_worker}),
                           run_config=RunConfig(name="floor", storage_path=str(out)))
    t0 = time.time()
    trainer.fit()
    return {"fit_to_train_fn_s": float(stamp.read_text()) - t0, "fit_s": time.time() - t0}


def _stage(cfg, data, stats, out: Path, seed: int) -> dict:
    from tasks import train

    train.train(cfg.model_copy(update={"epochs": 1}), data, stats, out, seed)
    return json.loads((out / train.TIMINGS_FILE).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="digits")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from pipeline import cluster, recipes
    from tasks.ingest import ingest
    from tasks.normalize import normalize

    cfg = recipes.load(args.recipe, [])
    with tempfile.TemporaryDirectory(prefix="bnflow-train-start-") as d:
        root = Path(d)
        t0 = time.perf_counter()
        cluster.connect(cfg)
        ray_start_s = time.perf_counter() - t0
        raw = ingest(cfg.data, root / "ingest", cfg.seed)
        data, stats = normalize(cfg.normalize, raw, root / "normalize")
        floors, stages = [], []
        for rep in range(args.repeats):
            order = ("floor", "stage") if rep % 2 == 0 else ("stage", "floor")
            for which in order:
                if which == "floor":
                    floors.append(_floor(cfg.train, root / f"floor-{rep}"))
                else:
                    stages.append(_stage(cfg.train, data, stats, root / f"stage-{rep}", cfg.seed))
                print(which, rep, json.dumps(floors[-1] if which == "floor" else stages[-1]), flush=True)

    def med(rows, key):
        return statistics.median(r[key] for r in rows if key in r)

    floor_s = med(floors, "fit_to_train_fn_s")
    stage_s = med(stages, "fit_to_first_step_s")
    result = {
        "recipe": args.recipe, "workers": cfg.train.workers, "cpus_per_worker": cfg.train.cpus_per_worker,
        "repeats": args.repeats, "ray_start_s": ray_start_s,
        "ray_train_floor_fit_to_train_fn_s": floor_s,
        "stage_fit_to_first_step_s": stage_s,
        "stage_over_floor_s": stage_s - floor_s,
        "stage_breakdown_median_s": {k: med(stages, k) for k in ("fit_to_loop_s", "data_load_s", "model_setup_s", "ddp_setup_s")},
        "floor_runs": floors, "stage_runs": stages,
        "command": f"python -m benchmarks.train_start --recipe {args.recipe} --repeats {args.repeats}",
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"train_start_{args.recipe}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"Ray Train floor (fit -> train function) {floor_s:.1f}s; train stage fit -> first step {stage_s:.1f}s "
          f"(+{stage_s - floor_s:.1f}s of bnflow's: {result['stage_breakdown_median_s']}); wrote {path}")


if __name__ == "__main__":
    main()
