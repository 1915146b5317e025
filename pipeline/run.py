"""``python -m pipeline run``: one recipe end to end, then the champion gate, in a tracked session."""

from __future__ import annotations

from pathlib import Path


def command(args) -> int:
    """Run (or resume) the recipe of ``args``; returns the exit code."""
    from pipeline import recipes, session

    cfg = recipes.load(args.recipe, args.overrides)
    run_id, tags = session.run_identity(args.run_id, args.slot, args.schedule, cfg.name)

    def work(tracker, console):
        from pipeline import runner, warm_start

        given = warm_start.given(tracker.cfg, Path(tracker.cfg.storage).resolve() / run_id)
        produced = runner.run(tracker.cfg, run_id, tracker, given=given, console=console)
        evaluation = produced["evaluation"]
        decision = tracker.gate(produced["raw"], console.say) if tracker.cfg.tracking.register_model else None
        # The headline numbers on the parent; per-class ones stay on the evaluate run.
        tracker.finish("FINISHED", summary=headline(evaluation.metrics), tags=evaluation.tags)
        return evaluation, decision

    done = session.tracked(cfg, run_id, tags, work, resume=f"--run-id {run_id}", verbose=args.verbose,
                           wait_for_lock=args.wait_for_lock)
    if isinstance(done, int):
        return done
    evaluation, decision = done.value
    print(f"\n[bnflow] done in {done.seconds:.0f}s  (bn: {cfg.train.bn_mode}, workers: {cfg.train.workers})\n"
          + session.outcome_lines(evaluation, decision)
          + f"  MLflow run: {done.tracker.parent_id}  (run id {run_id}; resume with --run-id {run_id})\n"
          + f"  model: {done.tracker.logged_model('recalibrate')}  (for mlflow models serve -m, pipeline adapt --model, "
            "train.model.weights)\n"
          + session.where(done.tracker), flush=True)
    return 0


def headline(metrics: dict) -> dict:
    """The test metrics that go on the parent run (not the per-class ones)."""
    return {k: v for k, v in metrics.items() if k.startswith("test_") and "." not in k}
