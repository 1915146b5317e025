"""The whole DAG on digits, on the session's Ray, tracked by a real MLflow server; read back through
the MLflow client. Then a resume (nothing re-runs, nothing duplicated) and a failing stage."""

import json
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from pipeline.tracking import served
from pipeline.cli import main
from pipeline.tracking.runs import TAG_RUN_ID, TAG_STAGE

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]
STAGES = {"ingest", "normalize", "train", "recalibrate", "evaluate"}
EPOCHS = 4
MODEL = "itest-digits"


def _runs(client, exp_name, run_id):
    exp = client.get_experiment_by_name(exp_name)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_RUN_ID}` = '{run_id}'")


@pytest.fixture(scope="module")
def digits_run(mlflow_server, tmp_path_factory):
    storage = tmp_path_factory.mktemp("storage")
    args = ["run", "--recipe", "digits", "--run-id", "itest-digits", "--set", f"storage={storage}",
            "--set", f"tracking.uri={mlflow_server}", "--set", "tracking.experiment=itest",
            "--set", f"train.epochs={EPOCHS}", "--set", "data.shift.corruptions=[brightness, inverted]",
            "--set", "data.shift.severities=[5]", "--set", "data.shift.rows=200",
            "--set", f"tracking.register_model={MODEL}"]
    assert main(args) == 0
    return args, storage, MlflowClient(mlflow_server)


def test_one_parent_and_one_child_per_stage(digits_run):
    _, _, client = digits_run
    runs = _runs(client, "itest", "itest-digits")
    parents = [r for r in runs if r.data.tags[TAG_STAGE] == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    children = {r.data.tags[TAG_STAGE]: r for r in runs if r.data.tags[TAG_STAGE] != "pipeline"}
    assert set(children) == STAGES and len(runs) == 6
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children.values())
    assert all(r.info.status == "FINISHED" for r in runs)
    assert parent.data.params["train.bn_mode"] == "sync"
    assert children["train"].data.params["train.bn_mode"] == "sync"
    config = json.loads(Path(client.download_artifacts(parent.info.run_id, "config.json")).read_text())
    assert config["train"]["epochs"] == EPOCHS
    assert parent.data.metrics["test_accuracy_after_recal"] >= 0.9


def test_gc_finds_nothing_to_remove_in_a_complete_run(digits_run, capsys):
    """gc against the real layout: a complete run's stages and the stage-cache entries that point
    at them are never listed, even with --older-than 0s."""
    from pipeline.runner import CACHE_DIR

    _, storage, _ = digits_run
    entries = sorted((storage / CACHE_DIR).glob("*.json"))
    assert entries  # ingest and normalize are indexed for reuse
    assert main(["gc", "--storage", str(storage), "--older-than", "0s", "--dry-run"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if "would remove" in line]
    assert not [line for line in listed if "/itest-digits/" in line or CACHE_DIR in line], listed


def test_per_epoch_metrics_one_series_from_one_writer(digits_run):
    _, _, client = digits_run
    train = next(r for r in _runs(client, "itest", "itest-digits") if r.data.tags[TAG_STAGE] == "train")
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"):
        hist = client.get_metric_history(train.info.run_id, key)
        assert sorted(m.step for m in hist) == list(range(1, EPOCHS + 1)), key
    lrs = [m.value for m in sorted(client.get_metric_history(train.info.run_id, "lr"), key=lambda m: m.step)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))  # the cosine schedule, as logged


def test_train_stage_says_where_its_seconds_went(digits_run):
    """timings.json: Ray Train's start, the shard read, model setup, the epochs and what sits between
    them, each measured by its own clock on rank 0 or the driver."""
    _, storage, _ = digits_run
    t = json.loads((storage / "itest-digits" / "train" / "timings.json").read_text())
    assert t["fit_to_loop_s"] > 0 and t["data_load_s"] > 0 and t["checkpoint_s"] > 0 and t["driver_mlflow_s"] > 0
    assert t["fit_to_first_step_s"] > t["fit_to_loop_s"] + t["data_load_s"] + t["model_setup_s"]
    # the epochs' compute, validation and checkpoints are timed apart, and all happen inside the loop
    assert t["epochs_compute_s"] + t["validation_s"] + t["checkpoint_s"] < t["loop_s"] < t["fit_s"]
    assert t["loop_end_to_fit_return_s"] >= 0


def test_artifacts_inputs_and_models(digits_run):
    _, storage, client = digits_run
    runs = {r.data.tags[TAG_STAGE]: r for r in _runs(client, "itest", "itest-digits")}
    ev = runs["evaluate"].info.run_id
    names = {a.path for a in client.list_artifacts(ev)}
    assert {"confusion_matrix.png", "learning_curves.png", "reliability_diagram.png", "per_class_f1.png",
            "per_class_metrics.csv", "evaluation.json"} <= names
    assert "norm_stats.json" in {a.path for a in client.list_artifacts(runs["normalize"].info.run_id)}
    assert runs["normalize"].data.metrics["dropped_rows_test"] == 0.0

    manifest = json.loads((storage / "itest-digits" / "normalize" / "manifest.json").read_text())
    inputs = client.get_run(runs["normalize"].info.run_id).inputs.dataset_inputs
    by_name = {d.dataset.name: d for d in inputs}
    test_info = manifest["outputs"]["data"]["splits"]["test"]
    assert by_name["data/test"].dataset.digest == test_info["digest"][:32]
    assert {t.key: t.value for t in by_name["data/test"].tags}["bnflow.sha256"] == test_info["digest"]

    # Both served models take RAW features (normalization inside) and classify the raw test split.
    raw = pq.read_table(storage / "itest-digits" / "ingest" / "test")
    x = raw.column("features").combine_chunks().flatten().to_numpy().reshape(raw.num_rows, -1).astype(np.float32)
    y = raw.column("label").to_numpy()
    for stage, name in (("train", "model_trained"), ("recalibrate", "model_recalibrated")):
        model = mlflow.pyfunc.load_model(f"runs:/{runs[stage].info.run_id}/{name}")
        out = model.predict(x)
        probs = out[[f"probability.{c}" for c in range(10)]].to_numpy()
        np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-9)
        assert (out["predicted_class"].to_numpy() == probs.argmax(1)).all()
        assert (out["predicted_name"] == out["predicted_class"].astype(str)).all()  # digits' names are their numbers
        assert (out["predicted_class"].to_numpy() == y).mean() >= 0.9


def test_evaluate_metrics_match_scikit_learn_on_the_checkpoints(digits_run):
    """Every logged headline and per-class metric recomputed from the checkpoints on the normalized
    test split with scikit-learn (ECE with the textbook bin loop)."""
    import torch
    from sklearn import metrics as skm

    from schemas.artifacts import CheckpointState
    from tasks.nn.models import model_from_checkpoint
    from tests.unit.test_metrics import _ece_reference

    _, storage, client = digits_run
    runs = {r.data.tags[TAG_STAGE]: r for r in _runs(client, "itest", "itest-digits")}
    m = runs["evaluate"].data.metrics
    test = pq.read_table(storage / "itest-digits" / "normalize" / "test")
    x = torch.from_numpy(test.column("features").combine_chunks().flatten().to_numpy().reshape(test.num_rows, -1).copy())
    y = test.column("label").to_numpy()
    for tag, stage in (("before", "train"), ("after", "recalibrate")):
        model = model_from_checkpoint(CheckpointState.load(storage / "itest-digits" / stage / "checkpoint.pt"))
        with torch.no_grad():
            probs = torch.softmax(model(x).double(), 1).numpy()
        pred = probs.argmax(1)
        assert m[f"test_accuracy_{tag}_recal"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-9)
        assert m[f"test_topk_accuracy_{tag}_recal"] == pytest.approx(skm.top_k_accuracy_score(y, probs, k=5), abs=1e-9)
        assert m[f"test_loss_{tag}_recal"] == pytest.approx(skm.log_loss(y, probs), rel=1e-5)
        assert m[f"test_macro_f1_{tag}_recal"] == pytest.approx(skm.f1_score(y, pred, average="macro"), abs=1e-9)
        assert m[f"test_ece_{tag}_recal"] == pytest.approx(_ece_reference(probs, y), abs=1e-6)
        p, r, f1, _ = skm.precision_recall_fscore_support(y, pred, zero_division=0)
        for c in range(10):
            assert m[f"test_precision_{tag}_recal.{c}"] == pytest.approx(p[c], abs=1e-9)
            assert m[f"test_recall_{tag}_recal.{c}"] == pytest.approx(r[c], abs=1e-9)
            assert m[f"test_f1_{tag}_recal.{c}"] == pytest.approx(f1[c], abs=1e-9)
            assert m[f"test_nll_{tag}_recal.{c}"] == pytest.approx(-np.log(probs[y == c, c]).mean(), rel=1e-5)
    # the curve reading, on the evaluate run and the parent (where the runs table shows it)
    for stage in ("evaluate", "pipeline"):
        tags = runs[stage].data.tags
        assert tags["bnflow.curves"] in ("still_learning", "converged", "overfitting")
        assert tags["bnflow.curves_note"].startswith(tags["bnflow.curves"].replace("_", " "))
    assert "test_f1_after_recal.3" not in runs["pipeline"].data.metrics  # per-class ones stay on the evaluate run


def test_the_first_registered_model_becomes_the_champion(digits_run):
    _, _, client = digits_run
    runs = {r.data.tags[TAG_STAGE]: r for r in _runs(client, "itest", "itest-digits")}
    version = client.get_model_version_by_alias(MODEL, "champion")
    assert version.run_id == runs["recalibrate"].info.run_id and version.tags["bnflow.run_id"] == "itest-digits"
    assert version.tags["bnflow.gate"] == "promoted" and version.tags["bnflow.gate_reason"].startswith("first model")
    ev = runs["evaluate"].data
    assert ev.tags["bnflow.gate"] == "promoted" and ev.tags["bnflow.model_version"] == f"{MODEL}/{version.version}"
    # scored through the registered pyfunc on the RAW test rows: the evaluate stage's number
    assert ev.metrics["gate_accuracy_candidate"] == pytest.approx(ev.metrics["test_accuracy_after_recal"], abs=2e-3)


def test_a_run_made_to_overfit_is_read_as_overfitting_stopped_early_and_not_promoted(digits_run, mlflow_server, capsys):
    """40 training rows, no weight decay, a constant rate: the val loss turns up while the train loss
    keeps falling. Early stopping (patience 8) ends it and keeps the best epoch's weights; the curves
    read as overfitting; registered under the digits run's model name, it is far worse on the same
    test rows and the champion stays where it was."""
    import torch

    from schemas.artifacts import CheckpointState
    from tasks.nn.models import model_from_checkpoint

    _, storage, client = digits_run
    champion = client.get_model_version_by_alias(MODEL, "champion").version
    epochs = 60
    assert main(["run", "--recipe", "digits", "--run-id", "itest-overfit", "--set", f"storage={storage}",
                 "--set", f"tracking.uri={mlflow_server}", "--set", "tracking.experiment=itest",
                 "--set", "data.max_train_rows=80", "--set", "data.val_fraction=0.5", "--set", f"train.epochs={epochs}",
                 "--set", "train.batch_size=10", "--set", "train.optimizer.weight_decay=0", "--set", "train.schedule.kind=constant",
                 "--set", "train.early_stopping.patience=8",
                 "--set", "recalibrate.estimator=ema", "--set", f"tracking.register_model={MODEL}"]) == 0
    out = capsys.readouterr().out
    assert "training curves: overfitting" in out and "not promoted" in out
    runs = {r.data.tags[TAG_STAGE]: r for r in _runs(client, "itest", "itest-overfit")}
    assert runs["pipeline"].data.tags["bnflow.curves"] == "overfitting"
    assert runs["pipeline"].data.tags["bnflow.grad_health"] == "ok"
    ev = runs["evaluate"].data
    assert ev.tags["bnflow.gate"] == "not promoted"
    assert ev.metrics["gate_accuracy_candidate"] < ev.metrics["gate_accuracy_champion"]
    assert client.get_model_version_by_alias(MODEL, "champion").version == champion

    # Early stopping: it stopped 8 evaluations after the best one, and the trained checkpoint holds
    # the best epoch's weights: recomputed in float64, their val loss is the one logged at that epoch.
    train = runs["train"].data.tags
    history = json.loads((storage / "itest-overfit" / "train" / "history.json").read_text())
    best = int(train["bnflow.best_epoch"])
    assert len(history) == best + 8 < epochs and "has not improved" in train["bnflow.stop_reason"]
    assert min(h["val_loss"] for h in history) == history[best - 1]["val_loss"]
    assert len(client.get_metric_history(runs["train"].info.run_id, "grad_norm/body.0")) == len(history)
    val = pq.read_table(storage / "itest-overfit" / "normalize" / "val")
    x = torch.from_numpy(val.column("features").combine_chunks().flatten().to_numpy().reshape(val.num_rows, -1).copy())
    model = model_from_checkpoint(CheckpointState.load(storage / "itest-overfit" / "train" / "checkpoint.pt")).double()
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(x.double()), torch.from_numpy(val.column("label").to_numpy()).long())
    assert float(loss) == pytest.approx(history[best - 1]["val_loss"], rel=1e-4)


def test_recalibration_on_two_workers_equals_one_process_over_the_same_batches(digits_run):
    """The stage ran on the train stage's 2 workers; redo it in this process over the same batches."""
    import torch

    from schemas.artifacts import CheckpointState, Dataset
    from schemas.config import RecalibrateConfig
    from tasks import arrow_io
    from tasks.nn.bn_stats import update_bn_stats
    from tasks.nn.models import model_from_checkpoint
    from tasks.recalibrate import batch_plan, read_rows

    _, storage, _ = digits_run
    run = storage / "itest-digits"
    recal = CheckpointState.load(run / "recalibrate" / "checkpoint.pt")
    data = Dataset.model_validate(json.loads((run / "normalize" / "manifest.json").read_text())["outputs"]["data"])
    train_rows = data.split("train").rows
    assert recal.recalibration == {"estimator": "exact", "split": "train", "rows": min(10_000, train_rows), "workers": 2}
    files = arrow_io.split_files(data.split("train"))
    cfg = RecalibrateConfig()
    plan = batch_plan([pq.read_metadata(f).num_rows for f in files], train_rows, cfg.batch_size, seed=0)
    x = torch.from_numpy(read_rows(files, plan["order"]))
    model = model_from_checkpoint(CheckpointState.load(run / "train" / "checkpoint.pt")).double()
    b = plan["bounds"]
    update_bn_stats(model, [x[b[i]:b[i + 1]].double() for i in range(len(b) - 1)])
    expect = model.state_dict()
    trained = CheckpointState.load(run / "train" / "checkpoint.pt").model
    for key, got in recal.model.items():
        if key.endswith(("running_mean", "running_var")):
            assert not torch.equal(got, trained[key]), key  # the stage did replace the training averages
            assert torch.allclose(got.double(), expect[key], rtol=1e-5, atol=1e-6), key
        else:
            assert torch.equal(got, trained[key]), key  # weights and num_batches_tracked untouched

    from schemas.artifacts import Checkpoint
    from schemas.errors import DataError
    from tasks.recalibrate import recalibrate

    ckpt = Checkpoint.model_validate(json.loads((run / "train" / "manifest.json").read_text())["outputs"]["trained"])
    with pytest.raises(DataError, match=r"recalibrate.split='shift-fog-5': the run has no such split; use one of "
                                        r"shift-brightness-5, shift-inverted-1, test, train, val"):
        recalibrate(RecalibrateConfig(split="shift-fog-5"), ckpt, data, run / "unused", seed=0)
    with pytest.raises(DataError, match=r"recalibrate.rows=5000: split 'train' holds only"):
        recalibrate(RecalibrateConfig(rows=5000), ckpt, data, run / "unused", seed=0)


def test_shifted_splits_are_scored_for_three_models_and_adaptation_undoes_brightness(digits_run):
    _, _, client = digits_run
    ev = next(r for r in _runs(client, "itest", "itest-digits") if r.data.tags[TAG_STAGE] == "evaluate")
    assert {"shift_accuracy.csv", "shift_accuracy.png"} <= {a.path for a in client.list_artifacts(ev.info.run_id)}
    m = ev.data.metrics
    # Brightness +0.5 of the pixel range, adapted on one half of the split, scored on the other.
    assert m["shift_accuracy_sev5_adapted"] >= m["shift_accuracy_sev5_trained"] + 0.3
    assert m["shift_accuracy_clean_adapted"] >= 0.85  # adapting to clean rows costs little
    assert {"shift_accuracy_inverted_trained", "shift_accuracy_inverted_adapted"} <= set(m)  # the control, reported


def test_adapt_reestimates_a_logged_models_statistics_on_unlabeled_rows(digits_run, mlflow_server, tmp_path, capsys):
    import mlflow
    import torch
    from sklearn.datasets import load_digits

    _, _, client = digits_run
    recal = next(r for r in _runs(client, "itest", "itest-digits") if r.data.tags[TAG_STAGE] == "recalibrate")
    uri = f"runs:/{recal.info.run_id}/model_recalibrated"
    digits = load_digits()
    x = np.clip(digits.data + 6.0, 0, 16).astype(np.float32)  # brighter: a covariate shift, no label column
    (tmp_path / "new").mkdir()
    pq.write_table(pa.table({"features": pa.array(list(x[:900]))}), tmp_path / "new" / "a.parquet")
    pq.write_table(pa.table({"features": pa.array(list(x[900:1200]))}), tmp_path / "new" / "b.parquet")

    args = ["adapt", "--model", uri, "--data", str(tmp_path / "new"), "--tracking-uri", mlflow_server,
            "--register", "itest-adapted", "--rows", "1000"]
    assert main(args) == 0
    out = capsys.readouterr().out
    run_id = out.split("MLflow run: ")[1].split()[0]
    run = client.get_run(run_id)
    assert run.data.tags["bnflow.adapted_from_run"] == recal.info.run_id and run.data.tags["bnflow.adapted_from_model"] == uri
    assert client.get_model_version("itest-adapted", "1").run_id == run_id

    mlflow.set_tracking_uri(mlflow_server)
    source = served.load(uri)[0]
    adapted, names, _ = served.load(f"runs:/{run_id}/model_adapted")
    assert names == [str(c) for c in range(10)]
    # Independent float64 check of the first BN layer: its input is Linear(normalized rows), whatever
    # the batches; the rows are adapt's seeded sample.
    rows = torch.from_numpy(x[:1200][np.random.default_rng(0).permutation(1200)[:1000]]).double()
    z = ((rows - source.shift.double()) * source.inv_scale.double()) @ source.model.body[0].weight.double().T
    bn = adapted.model.body[1]
    assert torch.allclose(bn.running_mean.double(), z.mean(0), rtol=1e-5, atol=1e-5)
    assert torch.allclose(bn.running_var.double(), z.var(0, unbiased=True), rtol=1e-5, atol=1e-5)
    assert torch.equal(adapted.shift, source.shift)  # the model's own normalization, never refitted
    keep = [k for k in source.state_dict() if "running" not in k]
    assert all(torch.equal(source.state_dict()[k], adapted.state_dict()[k]) for k in keep)
    with torch.no_grad():  # and it helps: accuracy on the shifted rows it was adapted on
        acc = {name: float((m(torch.from_numpy(x)).argmax(1).numpy() == digits.target).mean())
               for name, m in (("source", source.eval()), ("adapted", adapted.eval()))}
    assert acc["adapted"] >= acc["source"] + 0.2, acc


@pytest.mark.parametrize("case, words", [
    ("empty", "no .parquet file in it"),
    ("column", "no 'features' column"),
    ("count", "rows of 3 features in 'features'; the model takes 64"),
    ("rows", "--rows 5000: "),
])
def test_adapt_bad_input_is_one_line_and_exit_2(digits_run, mlflow_server, tmp_path, capsys, case, words):
    _, _, client = digits_run
    recal = next(r for r in _runs(client, "itest", "itest-digits") if r.data.tags[TAG_STAGE] == "recalibrate")
    d = tmp_path / "new"
    d.mkdir()
    if case == "column":
        pq.write_table(pa.table({"pixels": pa.array([[0.0] * 64] * 4)}), d / "a.parquet")
    elif case == "count":
        pq.write_table(pa.table({"features": pa.array([[0.0] * 3] * 4)}), d / "a.parquet")
    elif case == "rows":
        pq.write_table(pa.table({"features": pa.array([[0.0] * 64] * 4)}), d / "a.parquet")
    args = ["adapt", "--model", f"runs:/{recal.info.run_id}/model_recalibrated", "--data", str(d),
            "--tracking-uri", mlflow_server] + (["--rows", "5000"] if case == "rows" else [])
    before = len(client.search_runs([recal.info.experiment_id]))
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert len(client.search_runs([recal.info.experiment_id])) == before  # nothing logged


def test_resume_skips_complete_stages_and_reopens_the_parent(digits_run, capsys):
    args, storage, client = digits_run
    before = {r.info.run_id for r in _runs(client, "itest", "itest-digits")}
    mtime = (storage / "itest-digits" / "train" / "checkpoint.pt").stat().st_mtime
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") == 5
    after = _runs(client, "itest", "itest-digits")
    assert {r.info.run_id for r in after} == before
    assert (storage / "itest-digits" / "train" / "checkpoint.pt").stat().st_mtime == mtime


def test_resume_with_a_different_config_is_refused(digits_run, capsys):
    args, _, client = digits_run
    before = {r.info.run_id: r.info.status for r in _runs(client, "itest", "itest-digits")}
    assert main(args + ["--set", "train.epochs=7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"started with train.epochs={EPOCHS}, not 7" in err[0]
    assert {r.info.run_id: r.info.status for r in _runs(client, "itest", "itest-digits")} == before


def test_failed_stage_leaves_no_complete_output_and_exits_2(mlflow_server, tmp_path, capsys):
    src = tmp_path / "user"
    for split in ("train", "test"):
        (src / split).mkdir(parents=True)
        x = np.random.default_rng(0).normal(size=(40, 4))
        if split == "test":
            x[3, 1] = np.nan
        pq.write_table(pa.table({"features": pa.array(x.tolist()), "label": pa.array(np.arange(40) % 3)}),
                       src / split / "p.parquet")
    storage = tmp_path / "storage"
    args = ["run", "--recipe", "digits", "--run-id", "itest-bad", "--set", f"storage={storage}",
            "--set", f"tracking.uri={mlflow_server}", "--set", "tracking.experiment=itest",
            "--set", "data.source=parquet", "--set", f"data.path={src}", "--set", "data.num_classes=3"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 row(s) of split 'test' hold NaN or inf" in err[0]
    assert (storage / "itest-bad" / "ingest" / "manifest.json").exists()
    assert not (storage / "itest-bad" / "normalize" / "manifest.json").exists()
    client = MlflowClient(mlflow_server)
    status = {r.data.tags[TAG_STAGE]: r.info.status for r in _runs(client, "itest", "itest-bad")}
    assert status == {"pipeline": "FAILED", "ingest": "FINISHED", "normalize": "FAILED"}


def test_a_wide_table_trains_and_its_served_model_takes_columns_by_name(mlflow_server, tmp_path):
    """UCI wine (scikit-learn's bundled copy) as users hold it: one column per feature. Formerly
    refused with "column 'features' not in the train split"."""
    from mlflow.exceptions import MlflowException
    from sklearn.datasets import load_wine

    wine = load_wine(as_frame=True)
    frame = wine.frame.rename(columns={"target": "label"})
    frame.columns = [c.replace("/", "_") for c in frame.columns]
    test = frame.iloc[::5]
    src = tmp_path / "wine"
    for split, part in (("train", frame.drop(test.index)), ("test", test)):
        (src / split).mkdir(parents=True)
        pq.write_table(pa.Table.from_pandas(part, preserve_index=False), src / split / "p.parquet")
    names = [c for c in frame.columns if c != "label"]
    storage = tmp_path / "storage"
    assert main(["run", "--recipe", "digits", "--run-id", "itest-wine", "--set", f"storage={storage}",
                 "--set", f"tracking.uri={mlflow_server}", "--set", "tracking.experiment=itest",
                 "--set", "data.source=parquet", "--set", f"data.path={src}", "--set", "data.num_classes=3",
                 "--set", "data.class_names=[barolo, grignolino, barbera]",
                 "--set", "train.epochs=3", "--set", "train.batch_size=16", "--set", "recalibrate.estimator=ema"]) == 0

    manifest = json.loads((storage / "itest-wine" / "ingest" / "manifest.json").read_text())
    assert json.dumps(names) in json.dumps(manifest)  # the chosen columns and their order, recorded
    client = MlflowClient(mlflow_server)
    train = next(r for r in _runs(client, "itest", "itest-wine") if r.data.tags[TAG_STAGE] == "train")
    model_uri = f"runs:/{train.info.run_id}/model_trained"
    model = mlflow.pyfunc.load_model(model_uri)
    assert model.metadata.get_input_schema().input_names() == names
    x = test[names].astype("float32").reset_index(drop=True)
    shuffled = x[list(reversed(names))]  # the caller's column order does not matter: names do
    out = model.predict(x)
    np.testing.assert_array_equal(out, model.predict(shuffled))
    assert list(out.columns[2:]) == ["probability.barolo", "probability.grignolino", "probability.barbera"]
    assert (out["predicted_name"] == np.array(["barolo", "grignolino", "barbera"])[test["label"].to_numpy()]).mean() >= 0.8
    with pytest.raises(MlflowException, match="proline"):
        model.predict(x.drop(columns=["proline"]))


@pytest.mark.parametrize("policy", ["freeze", "freeze_stats"])
def test_fine_tuning_a_logged_model_with_frozen_bn_keeps_every_bn_buffer_bitwise(digits_run, mlflow_server, policy):
    """Warm start from the first run's logged model (an MLflow URI) with train.model.bn frozen: every
    BatchNorm buffer of the trained and the recalibrated checkpoint is the source's, bit for bit
    (recalibration leaves frozen layers alone); freeze also keeps gamma/beta, freeze_stats trains
    them; the network starts from the source's weights (its first epoch's loss is far below a
    fresh start's)."""
    import torch

    from schemas.artifacts import CheckpointState

    args, storage, client = digits_run
    recal = next(r for r in _runs(client, "itest", "itest-digits") if r.data.tags[TAG_STAGE] == "recalibrate")
    source = CheckpointState.load(storage / "itest-digits" / "recalibrate" / "checkpoint.pt")
    run_id = f"itest-{policy.replace('_', '-')}"
    assert main(["run", "--recipe", "digits", "--run-id", run_id, "--set", f"storage={storage}",
                 "--set", f"tracking.uri={mlflow_server}", "--set", "tracking.experiment=itest-finetune",
                 "--set", "train.epochs=1", "--set", f"train.model.bn={policy}",
                 "--set", f"train.model.weights=runs:/{recal.info.run_id}/model_recalibrated"]) == 0
    trained = CheckpointState.load(storage / run_id / "train" / "checkpoint.pt")
    recalibrated = CheckpointState.load(storage / run_id / "recalibrate" / "checkpoint.pt")
    bn = [k for k in source.model if k.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked")]
    assert len(bn) == 6  # two BatchNorm1d layers in the digits MLP
    for state in (trained, recalibrated):
        assert all(torch.equal(state.model[k], source.model[k]) for k in bn)
    assert "frozen" in recalibrated.recalibration["skipped"]
    affine = [k.replace("running_mean", w) for k in bn if k.endswith("running_mean") for w in ("weight", "bias")]
    same_affine = all(torch.equal(trained.model[k], source.model[k]) for k in affine)
    assert same_affine == (policy == "freeze")
    assert not torch.equal(trained.model["body.0.weight"], source.model["body.0.weight"])  # it did train
    fresh = json.loads((storage / "itest-digits" / "train" / "history.json").read_text())[0]["train_loss"]
    assert trained.history[0]["train_loss"] < 0.5 * fresh
