"""The model bnflow logs and registers: an MLflow pyfunc that takes RAW rows and answers with
class probabilities and the predicted class.

The network sits behind its training normalization statistics (``tasks.nn.models.NormalizedClassifier``),
so a caller sends features as they come -- the same columns (a wide table) or the same flat vector
the training data had -- and never refits or reapplies the normalization. ``predict`` returns one row
per input row: ``predicted_class`` (the label number), ``predicted_name`` and one
``probability.<class name>`` column per class (softmax of the logits, summing to 1).

It loads with ``mlflow.pyfunc.load_model`` in any process that has torch, numpy, pandas and the
``tasks``/``schemas``/``pipeline`` code MLflow stores beside it -- no Ray -- and serves with
``mlflow models serve -m models:/NAME@champion --env-manager local``.
"""

from __future__ import annotations

import warnings
from typing import Optional

import mlflow
import numpy as np


class ServedClassifier(mlflow.pyfunc.PythonModel):
    """Raw features in; probabilities and the predicted class out.

    Registered models pickle this class by reference: its module path and name are a contract
    with every model already registered (``pipeline.served`` still names it for those logged before
    the driver side was split into rooms).
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
        registered_model_name: Optional[str] = None, run_id: Optional[str] = None):
    """Log ``module`` (raw features -> logits) as a ``ServedClassifier`` in run ``run_id`` (default:
    the active run), with a signature and an input example; returns MLflow's ModelInfo. The run's
    store is MLflow's process-wide tracking URI, set at the top of the command."""
    import pandas as pd
    import torch
    from mlflow.models import Model, infer_signature

    from pipeline.tracking.uri import PROJECT_ROOT

    served = ServedClassifier(module, class_names, feature_names)
    example = np.zeros((2, served.num_features), dtype=np.float32)
    if feature_names:  # a wide table: columns by name, so a caller's column order cannot matter
        example = pd.DataFrame(example, columns=feature_names)
    with warnings.catch_warnings():  # "integer columns cannot hold missing values": predicted_class never misses
        warnings.filterwarnings("ignore", message=".*integer column", category=UserWarning)
        signature = infer_signature(example, served.predict(None, example))
    model_id = None
    if run_id is not None:
        # Model.log (the call under mlflow.pyfunc.log_model) takes the run by id, but would make the
        # logged model in the process's active experiment: make it in the run's own, where
        # runs:/RUN_ID/NAME finds it and beside the run's artifacts.
        client = mlflow.MlflowClient()
        model_id = client.create_logged_model(experiment_id=client.get_run(run_id).info.experiment_id, name=name,
                                              source_run_id=run_id).model_id
    return Model.log(
        artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=run_id, model_id=model_id, python_model=served,
        signature=signature,
        input_example=example,
        code_paths=[str(PROJECT_ROOT / d) for d in ("tasks", "schemas", "pipeline")],
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", "pandas", "pydantic", "pyarrow",
                          f"mlflow=={mlflow.__version__}"],
        registered_model_name=registered_model_name,
    )


def load(model_uri: str):
    """(the torch module, class names, ModelInfo) of a logged bnflow model; also reads models logged
    with the pytorch flavour by bnflow before the pyfunc (logits out)."""
    info = mlflow.models.get_model_info(model_uri)
    if "python_function" in info.flavors and "pytorch" not in info.flavors:
        served = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
        return getattr(served, "module", None), getattr(served, "class_names", None), info
    module = mlflow.pytorch.load_model(model_uri)
    return module, None, info
