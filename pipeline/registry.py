"""The champion gate: a run's recalibrated model becomes a registered version, and the alias
``champion`` moves to it only when it earns it (in the manner of TFX's Evaluator "blessing").

A candidate is promoted when BOTH hold:

1. its test accuracy is at least ``tracking.gate.min_accuracy``, and
2. there is no champion yet, or its accuracy minus the champion's is at least
   ``tracking.gate.min_improvement`` -- the champion scored NOW, on this run's raw test rows,
   through the same registered pyfunc a caller would use (never a number copied from its old run,
   which was measured on other data).

A champion that cannot score this run's test rows (another feature contract) blocks the promotion:
move the alias by hand if the change is intended. The decision, both scores and the reason are tags
on the version and on the run; a rerun of the same run id finds its version (tag ``bnflow.run_id``)
and its recorded decision instead of registering twice.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Optional

import numpy as np

from schemas.config import GateConfig

ALIAS = "champion"


@dataclass(frozen=True)
class Decision:
    name: str
    version: str
    promoted: bool
    reason: str
    candidate_accuracy: float
    champion_accuracy: Optional[float] = None
    champion_version: Optional[str] = None

    def tags(self) -> dict[str, str]:
        return {"bnflow.gate": "promoted" if self.promoted else "not promoted", "bnflow.gate_reason": self.reason,
                "bnflow.model_version": f"{self.name}/{self.version}"}

    def metrics(self) -> dict[str, float]:
        out = {"gate_accuracy_candidate": self.candidate_accuracy}
        if self.champion_accuracy is not None:
            out["gate_accuracy_champion"] = self.champion_accuracy
        return out


def decide(candidate: float, champion: Optional[float], champion_version: Optional[str], gate: GateConfig) -> tuple[bool, str]:
    """The rule of the module docstring; (promoted, one-line reason)."""
    if candidate < gate.min_accuracy:
        return False, f"test accuracy {candidate:.4f} is below tracking.gate.min_accuracy={gate.min_accuracy}"
    if champion_version is None:
        return True, f"first model: no {ALIAS} yet, and test accuracy {candidate:.4f} passes the thresholds"
    if champion is None:
        return False, f"the {ALIAS} (version {champion_version}) cannot score this run's test rows; move the alias by hand"
    gain = candidate - champion
    if gain < gate.min_improvement:
        return False, (f"test accuracy {candidate:.4f} vs the {ALIAS}'s {champion:.4f} (version {champion_version}): "
                       f"gain {gain:+.4f} is below tracking.gate.min_improvement={gate.min_improvement}")
    return True, (f"test accuracy {candidate:.4f} vs the {ALIAS}'s {champion:.4f} (version {champion_version}): "
                  f"gain {gain:+.4f} meets tracking.gate.min_improvement={gate.min_improvement}")


def accuracy(model_uri: str, x: np.ndarray, y: np.ndarray, feature_names: Optional[list[str]] = None) -> float:
    """Share of rows a registered model classifies right, through its pyfunc (raw rows in)."""
    import mlflow
    import pandas as pd

    model = mlflow.pyfunc.load_model(model_uri)
    rows = pd.DataFrame(x, columns=feature_names) if feature_names else x
    out = model.predict(rows)
    if isinstance(out, pd.DataFrame) and "predicted_class" in out:
        pred = out["predicted_class"].to_numpy()
    else:  # a model logged before the pyfunc: logits out
        pred = np.asarray(out).argmax(1)
    return float((pred == y).mean())


def gate(client, name: str, run_id: str, model_uri: str, x: np.ndarray, y: np.ndarray, cfg: GateConfig,
         feature_names: Optional[list[str]] = None, say=print) -> Decision:
    """Register ``model_uri`` under ``name`` (once per bnflow run id) and move the alias if it earns it.

    Args:
        x, y: this run's RAW test rows and labels, scored by the candidate and the champion alike.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    version = _version_of(client, name, run_id)
    if version is None:
        # MLflow prints "Successfully registered model ..." itself; the caller says what happened once.
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            version = mlflow.register_model(model_uri, name, tags={"bnflow.run_id": run_id}).version
    elif "bnflow.gate" in version.tags:  # decided by an earlier attempt of this run
        t = version.tags
        return Decision(name, version.version, t["bnflow.gate"] == "promoted", t["bnflow.gate_reason"],
                        float(t["bnflow.gate_accuracy_candidate"]),
                        float(t["bnflow.gate_accuracy_champion"]) if "bnflow.gate_accuracy_champion" in t else None,
                        t.get("bnflow.gate_champion_version"))
    else:
        version = version.version
    candidate = accuracy(f"models:/{name}/{version}", x, y, feature_names)
    try:
        champion_version = client.get_model_version_by_alias(name, ALIAS).version
    except MlflowException:
        champion_version = None
    champion = None
    if champion_version == version:  # an earlier attempt of this run promoted it and stopped before its tags
        champion_version = None
    if champion_version is not None:
        try:
            champion = accuracy(f"models:/{name}@{ALIAS}", x, y, feature_names)
        except Exception as e:  # another contract (features, classes): it cannot be compared on these rows
            say(f"gate: the {ALIAS} (version {champion_version}) cannot score this run's test rows: {str(e).splitlines()[0]}")
    promoted, reason = decide(candidate, champion, champion_version, cfg)
    decision = Decision(name, version, promoted, reason, candidate, champion, champion_version)
    tags = {**decision.tags(), "bnflow.gate_accuracy_candidate": repr(candidate)}
    if champion is not None:
        tags.update({"bnflow.gate_accuracy_champion": repr(champion), "bnflow.gate_champion_version": champion_version})
    if promoted:
        client.set_registered_model_alias(name, ALIAS, version)
    for k, v in tags.items():  # the decision last: a version with it is complete
        if k != "bnflow.gate":
            client.set_model_version_tag(name, version, k, v)
    client.set_model_version_tag(name, version, "bnflow.gate", tags["bnflow.gate"])
    return decision


def _version_of(client, name: str, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name = '{name}' and tags.`bnflow.run_id` = '{run_id}'")
    except MlflowException:  # no such registered model yet
        return None
    return found[0] if found else None
