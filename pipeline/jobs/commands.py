"""``python -m pipeline submit`` and ``python -m pipeline schedule``: the commands around
``submit`` (one Ray job per run id) and ``schedule`` (one job per due cron slot)."""

from __future__ import annotations

import argparse
import time


def submit_command(args) -> int:
    """Submit the recipe of ``args`` as a Ray job (and follow it unless ``--no-wait``); the exit code."""
    from pipeline import recipes, session
    from pipeline.jobs import submit
    from tasks.console import Console

    say = Console().say

    cfg = recipes.load(args.recipe, args.overrides)
    run_id, tags = session.run_identity(args.run_id, args.slot, args.schedule, cfg.name)
    address = submit.dashboard_address(args.address)
    run_args, env = submit.plan(cfg, args.recipe, args.overrides, address)
    code = submit.user_code(cfg)  # the network's module imported here: a typo is one line before anything is submitted
    run_args += ["--slot", tags["bnflow.slot"], "--schedule", tags["bnflow.schedule"]] if tags else ["--run-id", run_id]
    if args.verbose:
        run_args.append("--verbose")
    return submit.submit(submit.connect(address), run_args, env, run_id, args.wait, say, metadata=tags, code=code)


def schedule_command(args) -> int:
    """Submit the recipe's job for every due slot of ``--cron`` until stopped (or once, ``--once``)."""
    from pydantic import ValidationError

    from pipeline import recipes
    from pipeline.jobs import schedule, slots, submit
    from schemas.errors import ConfigError
    from schemas.schedule import CronSchedule
    from tasks.console import Console

    say = Console().say

    try:
        policy = CronSchedule(cron=args.cron, catchup=args.catchup, max_active=args.max_active, overlap=args.overlap)
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0]).replace("_", "-") if err["loc"] else "cron"
        raise ConfigError(f"--{field} {getattr(args, field.replace('-', '_'))!r}: {err['msg'].removeprefix('Value error, ')}") from None
    cfg = recipes.load(args.recipe, args.overrides)  # checked once, here, not at 02:00
    name = slots.check_schedule_name(args.schedule or cfg.name)
    address = submit.dashboard_address(args.address)
    submit.plan(cfg, args.recipe, args.overrides, address)  # refused now, not at the first slot
    submit.user_code(cfg)  # and the network's module imports here
    client = submit.connect(address)

    def submit_slot(slot):
        one = argparse.Namespace(**{**vars(args), "slot": slots.slot_label(slot), "schedule": name, "run_id": None, "wait": False})
        submit_command(one)

    now = schedule.utcnow()
    scheduler = schedule.Scheduler(policy, schedule.cluster_jobs(client, name), submit_slot, say, started=now)
    say(f"schedule {name}: '{policy.cron}' (UTC) on {address}; catchup={policy.catchup}, max_active={policy.max_active}, "
        f"overlap={policy.overlap}")
    if args.once:
        try:
            scheduler.tick(now)
        except Exception as e:  # the cluster went away between connecting and submitting
            say(f"schedule {name}: {e}; nothing submitted, the slot is due again at the next --once")
            return 1
        return 0
    try:
        scheduler.run_forever(schedule.utcnow, time.sleep)
    except KeyboardInterrupt:
        say(f"schedule {name}: stopped (jobs already submitted go on)")
        return 130
