"""``python -m pipeline search``: the search's tracked session around ``rounds.search``."""

from __future__ import annotations

from pipeline.search.plan import TAG_KIND


def command(args) -> int:
    """Run (or resume, with ``--search-id``) the search of ``args``; returns the exit code."""
    from pipeline import recipes, session
    from pipeline.run import headline
    from pipeline.search import plan, report, rounds

    overrides = list(args.overrides)
    overrides += [f"search.trials={args.trials}"] if args.trials is not None else []
    overrides += [f"search.rounds={args.stages}"] if args.stages is not None else []
    cfg = recipes.load(args.recipe, overrides)
    dims = plan.checked_space(cfg)  # a bad space is one line before anything starts
    search_id = session.check_run_id(args.search_id or session.new_id(cfg.name, "search"), "--search-id")

    def work(tracker, console):
        result = rounds.search(tracker.cfg, search_id, tracker, dims, console)
        report.record(tracker, result)
        evaluation = result.produced["evaluation"]
        decision = tracker.gate(result.produced["raw"], console.say) if tracker.cfg.tracking.register_model else None
        tracker.finish("FINISHED", summary=headline(evaluation.metrics), tags=evaluation.tags)
        return result, evaluation, decision

    done = session.tracked(cfg, search_id, {TAG_KIND: "search"}, work, resume=f"--search-id {search_id}", kind="search",
                           verbose=args.verbose)
    if isinstance(done, int):
        return done
    result, evaluation, decision = done.value
    counts = {s: sum(o.status == s for o in result.outcomes) for s in ("completed", "stopped", "failed")}
    best = result.best
    print(f"\n[bnflow] search done in {done.seconds:.0f}s: {len(result.outcomes)} trials in {cfg.search.rounds} round(s) "
          f"({counts['completed']} completed, {counts['stopped']} stopped early, {counts['failed']} failed)\n"
          f"  best trial {best.trial}: {cfg.search.metric}={best.score:.4f} with "
          + ", ".join(f"{k}={plan.fmt(v)}" for k, v in best.values.items()) + "\n"
          + session.outcome_lines(evaluation, decision)
          + f"  MLflow run: {done.tracker.parent_id}  (search id {search_id}; resume with --search-id {search_id})\n"
          + session.where(done.tracker), flush=True)
    return 0
