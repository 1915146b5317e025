"""The model bnflow logs and registers: an MLflow pyfunc that takes RAW rows and answers with
class probabilities and the predicted class.

The network sits behind its training normalization statistics (``tasks.nn.models.NormalizedClassifier``),
so a caller sends features as they come -- the same columns (a wide table) or the same flat vector
the training data had -- and never refits or reapplies the normalization. ``predict`` returns one row
per input row: ``predicted_class`` (the label number), ``predicted_name`` and one
``probability.<class name>`` column per class (softmax of the logits, summing to 1).

How it is stored: ``torch.export`` turns the module into a program (aten graph and weights, no
Python class), and MLflow's "models from code" serves it through ``served_program.py``, a file of
its own that imports torch, numpy, pandas and mlflow only. Networks are the user's (any
``nn.Module`` by import path): a pickle would need the user's package and bnflow wherever the model
is served, ``code_paths`` would ship bnflow but never the user's package, and MLflow's own pytorch
flavour (``pt2``) answers logits, not this contract. So the model loads with
``mlflow.pyfunc.load_model`` and serves with ``mlflow models serve --env-manager local`` in any
process that has those four libraries. Beside the program the model keeps the bnflow checkpoint it
came from (artifact ``checkpoint``), from which ``load`` rebuilds the trainable network for ``adapt``
and warm starts.

Models registered before 2026-12-01 are cloudpickles of ``ServedClassifier`` (below) with bnflow's
code beside them; ``load`` and the champion gate still read them.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import mlflow
import numpy as np

from schemas.errors import ModelError

PROGRAM_FILE = Path(__file__).with_name("served_program.py")
FORMAT = "bnflow.program/1"  # the model's metadata["bnflow"]["format"]; absent in pickled models


class ServedClassifier(mlflow.pyfunc.PythonModel):
    """Raw features in; probabilities and the predicted class out (models logged before 2026-12-01).

    Registered models pickle this class by reference: its module path and name are a contract
    with every model already registered (``pipeline.served`` still names it for those logged before
    the driver side was split into rooms). New models are served by ``served_program.ServedProgram``.
    """

    # MLflow wraps a subclass's ``predict`` for type-hint validation and, without hints, advises
    # adding them; inputs are checked against the logged signature instead, which knows the
    # feature count and names.
    _skip_type_hint_validation = True

    def __init__(self, module, class_names: list[str], feature_names: Optional[list[str]] = None):
        self.module = module.eval()
        self.class_names = list(class_names)
        self.feature_names = feature_names

    @property
    def num_features(self) -> int:
        return int(self.module.shift.numel())

    def predict(self, context, model_input, params=None):
        import pandas as pd
        import torch

        x = self._features(model_input)
        with torch.no_grad():
            probs = torch.softmax(self.module(torch.from_numpy(x)).double(), dim=1).numpy()
        pred = probs.argmax(1)
        out = pd.DataFrame({"predicted_class": pred.astype(np.int64),
                            "predicted_name": np.asarray(self.class_names, dtype=object)[pred]})
        for i, name in enumerate(self.class_names):
            out[f"probability.{name}"] = probs[:, i]
        return out

    def _features(self, model_input) -> np.ndarray:
        import pandas as pd

        if isinstance(model_input, pd.DataFrame):
            if self.feature_names:
                missing = [c for c in self.feature_names if c not in model_input.columns]
                if missing:
                    raise ValueError(f"input lacks feature column '{missing[0]}'; the model takes {len(self.feature_names)} "
                                     f"columns by name: {self.feature_names[:5]}...")
                model_input = model_input[self.feature_names]
            model_input = model_input.to_numpy()
        x = np.asarray(model_input, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"input of shape {x.shape}; the model takes rows of {self.num_features} raw features")
        return np.ascontiguousarray(x)


def log(module, name: str, class_names: list[str], feature_names: Optional[list[str]] = None,
        registered_model_name: Optional[str] = None, run_id: Optional[str] = None, checkpoint: Optional[str] = None,
        features_column: str = "features"):
    """Log ``module`` (raw feature rows (N, D) -> logits, a ``NormalizedClassifier``) as an exported
    program behind ``served_program.py``, in run ``run_id`` (default: the active run), with a
    signature and an input example; returns MLflow's ModelInfo. The run's store is MLflow's
    process-wide tracking URI, set at the top of the command.

    Args:
        feature_names: a wide table's columns: the model then takes a DataFrame by column name.
        checkpoint: the bnflow checkpoint file the module was built from, stored in the model
            (without optimizer, scheduler and RNG state) so that ``load`` rebuilds the trainable
            network; None for a module with no checkpoint (then ``load`` answers the program).
        features_column: the source's list column of features, recorded for ``adapt``.

    Raises:
        ModelError: ``torch.export`` cannot trace the network (for every batch size from 1).
    """
    import pandas as pd
    import torch
    from mlflow.models import Model, infer_signature

    from pipeline.tracking import served_program

    num_features = int(module.shift.numel())
    contract = {"format": FORMAT, "class_names": [str(c) for c in class_names], "num_features": num_features,
                "feature_names": list(feature_names) if feature_names else None, "features_column": features_column}
    with tempfile.TemporaryDirectory() as d:
        artifacts = {"program": str(Path(d) / "program.pt2"), "contract": str(Path(d) / "contract.json")}
        torch.export.save(export(module, num_features), artifacts["program"])
        Path(artifacts["contract"]).write_text(json.dumps(contract))
        if checkpoint is not None:
            artifacts["checkpoint"] = _slim_checkpoint(checkpoint, Path(d) / "checkpoint.pt")
        # The output schema, from the program as it will be served.
        program = served_program.ServedProgram()
        program.load_context(mlflow.pyfunc.PythonModelContext(artifacts=artifacts, model_config=None))
        example = np.zeros((2, num_features), dtype=np.float32)
        if feature_names:  # a wide table: columns by name, so a caller's column order cannot matter
            example = pd.DataFrame(example, columns=feature_names)
        with warnings.catch_warnings():  # "integer columns cannot hold missing values": predicted_class never misses
            warnings.filterwarnings("ignore", message=".*integer column", category=UserWarning)
            signature = infer_signature(example, program.predict(None, example))
        model_id = None
        if run_id is not None:
            # Model.log (the call under mlflow.pyfunc.log_model) takes the run by id, but would make the
            # logged model in the process's active experiment: make it in the run's own, where
            # runs:/RUN_ID/NAME finds it and beside the run's artifacts.
            client = mlflow.MlflowClient()
            model_id = client.create_logged_model(experiment_id=client.get_run(run_id).info.experiment_id, name=name,
                                                  source_run_id=run_id).model_id
        # The contract travels twice: as the artifact the served program reads (a PythonModel sees
        # only its artifacts and model_config, and Model.log copies a model_config into the run's
        # params) and as the model's metadata, which ``load`` and ``adapt`` read without a download.
        return Model.log(
            artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=run_id, model_id=model_id,
            python_model=str(PROGRAM_FILE), artifacts=artifacts, metadata={"bnflow": contract},
            signature=signature, input_example=example,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", "pandas",
                              f"mlflow=={mlflow.__version__}"],
            registered_model_name=registered_model_name,
        )


def export(module, num_features: int):
    """``module`` in eval mode as a ``torch.export`` program over batches of any size from 1.

    Raises:
        ModelError: naming the network class, the first line of the tracer's error and the fix.
    """
    import torch

    net = getattr(module, "model", module)
    was_training = module.training
    module.eval()
    try:
        batch = torch.export.Dim("batch", min=1)
        return torch.export.export(module, (torch.zeros(2, num_features),), dynamic_shapes=({0: batch},))
    except Exception as e:  # the tracer raises many types; each is this one line to the user
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        first = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
        cls = type(net)
        raise ModelError(f"cannot export {cls.__module__}.{cls.__qualname__} for serving ({first}); make forward "
                         "traceable by torch.export: no Python branch on tensor values, no fixed batch size") from None
    finally:
        module.train(was_training)


def _slim_checkpoint(path: str, out: Path) -> str:
    """The checkpoint at ``path`` without what only resuming training reads, written to ``out``."""
    from schemas.artifacts import CheckpointState

    state = CheckpointState.load(path)
    state.model_copy(update={"optimizer": None, "scheduler": None, "rng": None, "best_model": None}).save(out)
    return str(out)


def load(model_uri: str):
    """(the torch module, class names, ModelInfo) of a logged bnflow model.

    The module takes raw rows and answers logits. For a model logged as a program it is rebuilt
    from the stored checkpoint (``tasks.nn.models.served_model``: real BatchNorm layers, trainable),
    which needs bnflow and the network's package; without a stored checkpoint it is the exported
    program itself. Also reads the pickled pyfuncs of earlier bnflow and models logged with the
    pytorch flavour before those (class names None).
    """
    local = _local(model_uri)
    info = mlflow.models.get_model_info(local)
    contract = _contract(info)
    if contract is not None:
        import torch

        ckpt = _artifact(local, "checkpoint")
        if ckpt is not None:
            from schemas.artifacts import CheckpointState
            from tasks.nn.models import served_model

            module = served_model(CheckpointState.load(ckpt))
        else:
            module = torch.export.load(_artifact(local, "program")).module()
        return module, list(contract["class_names"]), info
    if "python_function" in info.flavors and "pytorch" not in info.flavors:
        served = mlflow.pyfunc.load_model(local).unwrap_python_model()
        return getattr(served, "module", None), getattr(served, "class_names", None), info
    return mlflow.pytorch.load_model(local), None, info


def checkpoint_path(model_uri: str) -> Optional[str]:
    """Local path of the bnflow checkpoint stored in a logged model (read it, do not change it:
    for a local store it is the store's own file); None for a model stored without one (pickled
    models of earlier bnflow, a model adapted from one)."""
    return _artifact(_local(model_uri), "checkpoint")


def network_weights(model_uri: str) -> dict:
    """The network's state dict (no normalization buffers) of a logged bnflow model, for a warm start.

    Raises:
        ModelError: the model does not load, or holds no network bnflow can read the weights of.
    """
    from mlflow.exceptions import MlflowException

    try:
        local = _local(model_uri)
        if _contract(mlflow.models.get_model_info(local)) is not None:
            ckpt = _artifact(local, "checkpoint")
            if ckpt is None:
                raise ModelError(f"train.model.weights={model_uri}: the model was logged without a bnflow checkpoint "
                                 "(adapted from a model of an earlier bnflow?); give the model it came from")
            from schemas.artifacts import CheckpointState

            return CheckpointState.load(ckpt).model
        module = load(local)[0]
    except (MlflowException, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"train.model.weights={model_uri}: cannot load it ({first}); give a logged bnflow model, "
                         "e.g. runs:/RUN_ID/model_recalibrated or models:/NAME@ALIAS") from None
    if not hasattr(module, "model"):
        raise ModelError(f"train.model.weights={model_uri}: not a bnflow model (raw features in, normalization inside)")
    return module.model.state_dict()


def inputs(info) -> tuple[Optional[list[str]], str]:
    """(a wide table's feature columns or None, the list column of a row's features) that the
    logged model of ``info`` (``mlflow.models.get_model_info``) was trained on."""
    contract = _contract(info)
    if contract is not None:
        return contract.get("feature_names"), contract.get("features_column") or "features"
    sig = info.signature  # earlier models: the columns are the signature's names, the column always "features"
    if sig is None or sig.inputs is None or not sig.inputs.has_input_names():
        return None, "features"
    return sig.inputs.input_names(), "features"


def _contract(info) -> Optional[dict]:
    meta = (info.metadata or {}).get("bnflow")
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def _local(model_uri: str) -> str:
    """The model's directory on this machine: downloaded once (a local store's own directory as it is)."""
    return mlflow.artifacts.download_artifacts(artifact_uri=model_uri)


def _artifact(local: str, key: str) -> Optional[str]:
    """Local path of the pyfunc artifact ``key`` of the model in directory ``local``, or None."""
    from mlflow.models import Model

    conf = Model.load(local).flavors.get("python_function", {}).get("artifacts") or {}
    entry = conf.get(key)
    return str(Path(local) / entry["path"]) if entry else None
