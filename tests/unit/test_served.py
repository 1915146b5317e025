"""The served model: a torch.export program behind the pyfunc contract, with its checkpoint beside it.

Each model is logged to a local sqlite store and read back through MLflow; the ground truth is the
torch module's own softmax in float64.
"""

import json

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.tracking import served
from schemas.artifacts import CheckpointState, ModelSpec, Network, NormStats
from schemas.errors import DataError, ModelError
from tasks.nn.models import LeNet, NormalizedClassifier, served_model


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A local tracking store (sqlite, artifacts on disk) and an experiment in it."""
    root = tmp_path_factory.mktemp("store")
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    exp = mlflow.create_experiment("served", artifact_location=(root / "artifacts").as_uri())
    yield exp
    mlflow.set_tracking_uri(before)


def _with_statistics(net: torch.nn.Module, shape, seed: int) -> torch.nn.Module:
    """``net`` after a few training-mode batches: BN running statistics that are not 0/1."""
    torch.manual_seed(seed)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(32, *shape) * 2.0 + 0.5)
    return net.eval()


def _checkpoint(tmp_path, features_column="features", feature_names=None) -> tuple[str, CheckpointState]:
    """A bnflow checkpoint of an MLP over 6 raw features and 3 classes, with optimizer state."""
    d, k = 6, 3
    net = Network(class_path="tasks.nn.models:MLP", init_args={"in_features": d, "num_classes": k, "hidden": [16, 8]})
    from tasks.nn.network import construct

    model = _with_statistics(construct(net), (d,), seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    model(torch.randn(4, d)).sum().backward()
    opt.step()
    model.eval()
    shift, scale = [0.5, -1.0, 0.0, 2.0, 1.0, -0.5], [2.0, 1.0, 0.5, 3.0, 1.0, 4.0]
    stats = NormStats(method="standard", per="feature", num_features=d, count=100.0, mean=shift, std=scale,
                      min=[-9.0] * d, max=[9.0] * d, constant_units=[], shift=shift, scale=scale, config_hash="h", version="v")
    state = CheckpointState(epoch=2, config={}, bn_mode="sync", network=net, norm_stats=stats,
                            spec=ModelSpec(num_features=d, num_classes=k, class_names=["cat", "dog", "eel"],
                                           feature_names=feature_names, features_column=features_column),
                            model={k_: v.detach().clone() for k_, v in model.state_dict().items()},
                            optimizer=opt.state_dict(), rng={"torch": torch.get_rng_state()})
    path = tmp_path / "checkpoint.pt"
    state.save(path)
    return str(path), state


def _log(store, module, *args, **kwargs):
    with mlflow.start_run(experiment_id=store):
        return served.log(module, *args, **kwargs)


def _softmax(module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(module(torch.from_numpy(x)).double(), dim=1).numpy()


def _probs(out: pd.DataFrame, names) -> np.ndarray:
    return out[[f"probability.{n}" for n in names]].to_numpy()


def test_an_image_network_predicts_as_the_module_for_one_row_and_five(store):
    """LeNet over (1, 8, 8) images: rows of 64 raw pixels in, the exported program answers."""
    net = _with_statistics(LeNet((1, 8, 8), 4), (1, 8, 8), seed=0)
    module = NormalizedClassifier(net, np.full(64, 0.3), np.full(64, 1.7), (1, 8, 8)).eval()
    names = ["a", "b", "c", "d"]
    uri = _log(store, module, "model", names).model_uri
    pyfunc = mlflow.pyfunc.load_model(uri)
    rng = np.random.default_rng(0)
    for n in (1, 5):
        x = rng.normal(size=(n, 64)).astype(np.float32) * 2.0
        out = pyfunc.predict(x)
        want = _softmax(module, x)
        np.testing.assert_allclose(_probs(out, names), want, rtol=0, atol=1e-6)
        assert out["predicted_class"].tolist() == want.argmax(1).tolist()
        assert out["predicted_name"].tolist() == [names[i] for i in want.argmax(1)]


def test_the_program_answers_exactly_what_the_pickled_classifier_answered(store):
    """One output contract for the models registered before and after the move to torch.export:
    same columns in the same order, same dtypes, same values; and the same one-line shape error."""
    net = _with_statistics(LeNet((1, 8, 8), 3), (1, 8, 8), seed=2)
    module = NormalizedClassifier(net, np.zeros(64), np.ones(64), (1, 8, 8)).eval()
    names = ["x", "y", "z"]
    program = mlflow.pyfunc.load_model(_log(store, module, "model", names).model_uri).unwrap_python_model()
    legacy = served.ServedClassifier(module, names)
    x = np.random.default_rng(1).normal(size=(7, 64)).astype(np.float32)
    new, old = program.predict(None, x), legacy.predict(None, x)
    assert list(new.columns) == list(old.columns) == ["predicted_class", "predicted_name", "probability.x",
                                                      "probability.y", "probability.z"]
    assert new.dtypes.to_dict() == old.dtypes.to_dict()
    pd.testing.assert_frame_equal(new, old, check_exact=False, rtol=0, atol=1e-6)
    for bad in (np.zeros((3, 5), np.float32), np.zeros(64, np.float32)):
        with pytest.raises(ValueError) as got:
            program.predict(None, bad)
        with pytest.raises(ValueError) as want:
            legacy.predict(None, bad)
        assert str(got.value) == str(want.value) and "\n" not in str(got.value)


def test_a_wide_model_takes_its_columns_by_name_and_keeps_its_checkpoint(store, tmp_path):
    """A wide table's model: a DataFrame in any column order; the stored checkpoint rebuilds the
    network (load), lacks the optimizer state, and gives the warm start its weights."""
    cols = [f"f{i}" for i in range(6)]
    path, state = _checkpoint(tmp_path, feature_names=cols)
    module = served_model(state)
    info = _log(store, module, "model", state.spec.names(), cols, checkpoint=path)
    assert info.signature.inputs.input_names() == cols
    pyfunc = mlflow.pyfunc.load_model(info.model_uri)
    x = np.random.default_rng(2).normal(size=(5, 6)).astype(np.float32) * 3.0
    frame = pd.DataFrame(x, columns=cols)[cols[::-1]]  # the caller's order
    np.testing.assert_allclose(_probs(pyfunc.predict(frame), state.spec.names()), _softmax(module, x), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="lacks feature column 'f0'"):
        pyfunc.unwrap_python_model().predict(None, frame.drop(columns="f0"))

    rebuilt, names, got_info = served.load(info.model_uri)
    assert names == ["cat", "dog", "eel"] and type(rebuilt.model).__name__ == "MLP"
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in rebuilt.modules())  # real BN layers, for adapt
    np.testing.assert_allclose(_softmax(rebuilt, x), _softmax(module, x), rtol=0, atol=1e-12)
    assert served.inputs(got_info) == (cols, "features")
    stored = CheckpointState.load(served.checkpoint_path(info.model_uri))
    assert stored.optimizer is None and stored.rng is None and stored.spec == state.spec
    weights = served.network_weights(info.model_uri)
    assert weights.keys() == state.model.keys() and all(torch.equal(weights[k], state.model[k]) for k in weights)


def test_a_model_without_a_checkpoint_loads_as_its_program(store):
    net = _with_statistics(LeNet((1, 8, 8), 3), (1, 8, 8), seed=3)
    module = NormalizedClassifier(net, np.zeros(64), np.ones(64), (1, 8, 8)).eval()
    uri = _log(store, module, "model", ["a", "b", "c"]).model_uri
    assert served.checkpoint_path(uri) is None
    program, names, _ = served.load(uri)
    x = np.random.default_rng(3).normal(size=(2, 64)).astype(np.float32)
    np.testing.assert_allclose(_softmax(program, x), _softmax(module, x), rtol=0, atol=1e-6)
    with pytest.raises(ModelError, match="logged without a bnflow checkpoint"):
        served.network_weights(uri)


class _Branchy(torch.nn.Module):
    """A forward that branches in Python on a tensor's value: torch.export cannot trace it."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


def test_a_network_export_cannot_trace_is_one_line_naming_it_and_the_fix(store):
    module = NormalizedClassifier(_Branchy(), np.zeros(4), np.ones(4), (4,)).eval()
    with mlflow.start_run(experiment_id=store) as run:
        with pytest.raises(ModelError) as e:
            served.log(module, "model", ["a", "b"])
    msg = str(e.value)
    assert "\n" not in msg and "test_served._Branchy" in msg and "make forward traceable by torch.export" in msg
    assert not mlflow.MlflowClient().list_artifacts(run.info.run_id)  # nothing half-logged


def test_adapt_reads_the_column_the_model_was_trained_with(store, tmp_path):
    """Regression: a model trained with data.features_column=pixels refused adaptation rows in a
    'pixels' column ("no 'features' column"). Now adapt reads the column the model records, and
    the adapted model keeps it and a checkpoint with the adapted statistics."""
    from pipeline import adapt

    path, state = _checkpoint(tmp_path, features_column="pixels")
    uri = _log(store, served_model(state), "model_recalibrated", state.spec.names(), checkpoint=path,
               features_column="pixels").model_uri
    data = tmp_path / "new"
    data.mkdir()
    x = np.random.default_rng(4).normal(size=(300, 6)).astype(np.float32) + 4.0  # shifted rows
    pq.write_table(pa.table({"pixels": pa.array(list(x))}), data / "a.parquet")
    done = adapt.adapt(uri, str(data), rows=300)

    adapted, names, info = served.load(done.model_uri)
    assert served.inputs(info) == (None, "pixels") and names == ["cat", "dog", "eel"]
    z = ((torch.from_numpy(x).double() - adapted.shift.double()) * adapted.inv_scale.double()) @ \
        adapted.model.body[0].weight.double().T  # the first BN layer's input, in float64
    bn = adapted.model.body[1]
    assert torch.allclose(bn.running_mean.double(), z.mean(0), rtol=1e-5, atol=1e-5)
    assert torch.allclose(bn.running_var.double(), z.var(0, unbiased=True), rtol=1e-5, atol=1e-5)
    stored = CheckpointState.load(served.checkpoint_path(done.model_uri))
    assert torch.equal(stored.model["body.1.running_mean"], bn.running_mean)
    assert stored.spec == state.spec and stored.network == state.network

    (tmp_path / "old").mkdir()
    pq.write_table(pa.table({"features": pa.array(list(x))}), tmp_path / "old" / "a.parquet")
    with pytest.raises(DataError, match="no 'pixels' column"):
        adapt.adapt(uri, str(tmp_path / "old"))


def test_the_contract_is_recorded_in_the_models_metadata(store, tmp_path):
    path, state = _checkpoint(tmp_path, features_column="pixels")
    info = _log(store, served_model(state), "model", state.spec.names(), checkpoint=path, features_column="pixels")
    meta = mlflow.models.get_model_info(info.model_uri).metadata["bnflow"]
    assert meta == {"format": served.FORMAT, "class_names": ["cat", "dog", "eel"], "num_features": 6,
                    "feature_names": None, "features_column": "pixels"}
    local = mlflow.artifacts.download_artifacts(info.model_uri)
    assert json.loads(open(f"{local}/artifacts/contract.json").read()) == meta
    reqs = open(f"{local}/requirements.txt").read().split()
    assert f"torch=={torch.__version__.split('+')[0]}" in reqs and f"mlflow=={mlflow.__version__}" in reqs
    assert not any(r.startswith(("pydantic", "pyarrow")) for r in reqs)
    assert "code" not in mlflow.models.Model.load(local).flavors["python_function"] or \
        not mlflow.models.Model.load(local).flavors["python_function"]["code"]  # no code_paths
