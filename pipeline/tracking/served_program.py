"""The served bnflow model as MLflow "models from code": a ``torch.export`` program behind the
pyfunc contract. MLflow copies THIS FILE into the logged model and runs it when the model loads.

It imports torch, numpy, pandas and mlflow only -- never ``tasks``, ``schemas``, ``pipeline`` or the
user's package -- so a logged model loads (``mlflow.pyfunc.load_model``, ``mlflow models serve``)
where none of them is installed. The network is the model's ``program`` artifact, written by
``torch.export.save`` (graph and weights, no Python class); ``contract`` (JSON) names the classes and
the input columns. ``pipeline.tracking.served.log`` writes both.

The contract is the one ``pipeline.tracking.served.ServedClassifier`` has kept since the first
registered model: raw rows in (a 2-D array, or a DataFrame with a wide table's columns by name),
one row out per input row with ``predicted_class``, ``predicted_name`` and a
``probability.<class name>`` column per class (softmax of the logits in float64). The two are kept
equal by ``tests/unit/test_served.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch


class ServedProgram(mlflow.pyfunc.PythonModel):
    """Raw features in; probabilities and the predicted class out, through an exported program."""

    # Inputs are checked against the logged signature (feature count and names); MLflow's check of
    # ``predict``'s type hints would only advise adding them.
    _skip_type_hint_validation = True

    def load_context(self, context):
        contract = json.loads(Path(context.artifacts["contract"]).read_text())
        self.class_names = list(contract["class_names"])
        self.feature_names = contract.get("feature_names")
        self.num_features = int(contract["num_features"])
        self.program = torch.export.load(context.artifacts["program"]).module()

    def predict(self, context, model_input, params=None):
        x = self._features(model_input)
        if len(x):
            with torch.no_grad():
                probs = torch.softmax(self.program(torch.from_numpy(x)).double(), dim=1).numpy()
        else:  # the program is exported for batches of one row or more
            probs = np.zeros((0, len(self.class_names)))
        pred = probs.argmax(1)
        out = pd.DataFrame({"predicted_class": pred.astype(np.int64),
                            "predicted_name": np.asarray(self.class_names, dtype=object)[pred]})
        for i, name in enumerate(self.class_names):
            out[f"probability.{name}"] = probs[:, i]
        return out

    def _features(self, model_input) -> np.ndarray:
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
        return np.array(x, order="C")  # a copy: pandas may hand over a read-only view, which torch warns about


mlflow.models.set_model(ServedProgram())
