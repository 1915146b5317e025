"""``python -m pipeline search`` on digits: a real Ray with Ray Tune, a real MLflow server, a small
budget (4 trials of 3 epochs in 2 rounds). One search is interrupted with Ctrl-C after its first
finished trial and rerun with its id; everything the search records is checked on the result."""

from __future__ import annotations

import csv
import json
import math
import signal
import tempfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline import recipes
from pipeline.search import plan, space
from pipeline.cli import main
from pipeline.runner import artifact_digest
from pipeline.tracking.runs import TAG_RUN_ID, TAG_STAGE
from schemas import artifacts as A
from tests.conftest import start_cli, wait_for_line

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]
TRIALS, ROUNDS, EPOCHS = 4, 2, 3


def _args(search_id, storage, uri, *extra):
    return ["search", "--recipe", "digits", "--search-id", search_id, "--trials", str(TRIALS), "--stages", str(ROUNDS),
            "--set", f"storage={storage}", "--set", f"tracking.uri={uri}", "--set", "tracking.experiment=search",
            "--set", f"search.epochs={EPOCHS}", "--set", "recalibrate.estimator=ema", *extra]


def _runs(uri, search_id):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("search")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_RUN_ID}` = '{search_id}'")


def _results(storage, search_id) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text())
            for p in sorted((Path(storage) / search_id / plan.TRIALS_DIR).glob(f"*/{plan.RESULT_FILE}"))}


def test_an_interrupted_search_resumes_without_repeating_a_trial_and_records_everything(mlflow_server, tmp_path, capsys):
    storage, sid = tmp_path / "s", "srch"
    proc = start_cli(_args(sid, storage, mlflow_server), tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    wait_for_line(proc, "search trial r1-t01 (")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == f"interrupted; resume with --search-id {sid}"
    first = _results(storage, sid)
    assert "r1-t01" in first and len(first) < TRIALS
    sampled_before = {r.data.tags[plan.TAG_TRIAL]: r.data.params for r in _runs(mlflow_server, sid)
                      if r.data.tags.get(TAG_STAGE) == "trial"}
    assert {"r1-t01", "r1-t02"} <= set(sampled_before)  # a round's runs exist before its trials run

    assert main(_args(sid, storage, mlflow_server)) == 0
    out = capsys.readouterr().out
    for t in first:
        assert f"search trial {t}: {first[t]['status']} in an earlier attempt, not repeated" in out
    results = _results(storage, sid)
    assert sorted(results) == ["r1-t01", "r1-t02", "r2-t01", "r2-t02"]
    assert {t: results[t] for t in first} == first  # finished trials untouched

    runs = _runs(mlflow_server, sid)
    stages = [r.data.tags[TAG_STAGE] for r in runs]
    assert sorted(stages) == sorted(["pipeline", "ingest", "normalize", "recalibrate", "evaluate"] + ["trial"] * TRIALS)
    assert not list((storage / sid / plan.TRIALS_DIR).glob("*/ingest*"))  # the data stages ran once, for all
    parent = next(r for r in runs if r.data.tags[TAG_STAGE] == "pipeline")
    assert parent.info.status == "FINISHED" and parent.data.tags[plan.TAG_KIND] == "search"
    client = MlflowClient(mlflow_server)
    trials = {r.data.tags[plan.TAG_TRIAL]: r for r in runs if r.data.tags[TAG_STAGE] == "trial"}
    for t, res in results.items():
        run = trials[t]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and run.info.status == "FINISHED"
        assert run.data.tags[plan.TAG_ROUND] == t[1]
        assert run.data.tags[plan.TAG_TRIAL_STATUS].startswith(res["status"])
        # The sampled values are the trial's params, and a rerun sampled the same ones.
        assert {k: run.data.params[f"search.{k}"] for k in res["values"]} == {k: plan.fmt(v) for k, v in res["values"].items()}
        if t in sampled_before:
            assert {k: v for k, v in run.data.params.items() if k.startswith("search.")} == \
                   {k: v for k, v in sampled_before[t].items() if k.startswith("search.")}
        assert run.data.params["train.optimizer.lr"] == str(res["values"]["train.optimizer.lr"])  # the config trained
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy"))
        assert steps == list(range(1, res["epochs"] + 1))  # one writer, no epoch twice across the two attempts
        last = max(client.get_metric_history(run.info.run_id, "val_accuracy"), key=lambda m: m.step)
        assert math.isclose(last.value, res["score"])  # the score is the last epoch's, as logged
        assert (res["status"] == "completed") == (res["epochs"] == EPOCHS and (storage / sid / "trials" / t / "train").is_dir())

    # Round 2 sampled inside round 1's narrowed space.
    cfg = recipes.load("digits", [f"search.trials={TRIALS}", f"search.rounds={ROUNDS}"])
    narrowed = space.narrow(plan.checked_space(cfg), [(r["values"], r["score"]) for t, r in results.items() if t.startswith("r1")
                                                  and r["score"] is not None], "max")
    for t in ("r2-t01", "r2-t02"):
        for f, dim in narrowed.items():
            v = results[t]["values"][f]
            assert v in dim.choices if dim.kind == "choice" else dim.low <= v <= dim.high, (t, f, v, dim)

    # The winner: the best completed trial, recalibrated and evaluated under the parent.
    done = {t: r for t, r in results.items() if r["status"] == "completed"}
    best = max(sorted(done), key=lambda t: done[t]["score"])
    assert parent.data.tags["bnflow.search.best_trial"] == best
    assert parent.data.metrics["search_best_val_accuracy"] == pytest.approx(done[best]["score"])
    assert parent.data.metrics["search_trials"] == TRIALS
    assert {k: parent.data.params[f"best.{k}"] for k in done[best]["values"]} == \
           {k: plan.fmt(v) for k, v in done[best]["values"].items()}
    recal = json.loads((storage / sid / "recalibrate" / "manifest.json").read_text())
    trained = json.loads((storage / sid / "trials" / best / "train" / "manifest.json").read_text())
    assert recal["made_from"]["inputs"]["checkpoint"] == artifact_digest(A.Checkpoint.model_validate(trained["outputs"]["trained"]))
    assert "test_accuracy_after_recal" in parent.data.metrics

    # The ranking table and the plot on the parent.
    local = Path(client.download_artifacts(parent.info.run_id, "search", str(tmp_path / "dl")))
    with (local / "search_trials.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [r["trial"] for r in table][0] == best and len(table) == TRIALS
    scored = [float(r["val_accuracy"]) for r in table if r["val_accuracy"]]
    assert scored == sorted(scored, reverse=True)
    assert (local / "search_scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {t: int(trials[t].data.tags["bnflow.rank"]) for t in trials} == {r["trial"]: int(r["rank"]) for r in table}


def test_diverging_trials_are_failed_trials_and_a_search_with_no_other_is_one_line_exit_2(mlflow_server, tmp_path, capfd):
    storage, sid = tmp_path / "s", "div"
    code = main(["search", "--recipe", "digits", "--search-id", sid, "--trials", "1", "--stages", "1",
                 "--set", f"storage={storage}", "--set", f"tracking.uri={mlflow_server}", "--set", "tracking.experiment=search",
                 "--set", "search.epochs=2", "--set", "search.space={'train.optimizer.lr': 'loguniform(1e4, 1e6)'}"])
    out, err = capfd.readouterr()
    assert code == 2
    assert "Traceback" not in out + err  # a diverged trial is an outcome of the search, not a crash
    assert "no trial completed; every one failed or diverged" in err.strip().splitlines()[-1]
    results = _results(storage, sid)
    assert sorted(results) == ["r1-t01"]
    trials = {r.data.tags[plan.TAG_TRIAL]: r for r in _runs(mlflow_server, sid) if r.data.tags[TAG_STAGE] == "trial"}
    for t, res in results.items():
        assert res["status"] == "failed" and res["score"] is None and res["note"].startswith("diverged: train loss is nan")
        assert f"search trial {t} (" in out and "failed, no score" in out
        assert trials[t].info.status == "FAILED"
        assert trials[t].data.tags[plan.TAG_TRIAL_STATUS].startswith("failed: diverged")
        assert not (storage / sid / plan.TRIALS_DIR / t / "train").exists()  # nothing that looks complete


@pytest.mark.parametrize("sets, words", [
    (["search.space.train.optimizer.lrr=loguniform(1e-3, 1)"], "did you mean 'train.optimizer.lr'?"),
    (["search.space.train.optimizer.lr=uniform(0.1, 0.1)"], "an empty range (low 0.1 must be below high 0.1)"),
    (["search.space.train.optimizer.lr=uniform(0.5, 0.1)"], "an empty range (low 0.5 must be below high 0.1)"),
    (["search.space.train.optimizer.lr=loguniform(0, 1)"], "a log range must stay above 0"),
    (["search.space.normalize.method=choice(['standard'])"], "only train.* fields"),
])
def test_a_bad_space_is_one_line_and_exit_2_before_anything_runs(tmp_path, capsys, sets, words):
    args = ["search", "--recipe", "digits", "--set", f"storage={tmp_path / 's'}",
            "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 2  # what `python -m pipeline` exits with
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: search.space.") and words in lines[0], err
    assert not (tmp_path / "s").exists() and not (tmp_path / "mlflow.db").exists()  # nothing ran
