"""The champion gate: a run's recalibrated model becomes a registered version, and the alias
``champion`` moves to it only when it earns it (in the manner of TFX's Evaluator "blessing").

A candidate is promoted when BOTH hold:

1. its test accuracy is at least ``tracking.gate.min_accuracy``, and
2. there is no champion yet, or its accuracy minus the champion's is at least
   ``tracking.gate.min_improvement`` -- the champion scored NOW, on this run's raw test rows,
   through the same registered pyfunc a caller would use (never a number copied from its old run,
   which was measured on other data).

A champion that cannot score this run's test rows (another feature contract, a model that no
longer loads) blocks the promotion: that is a decision, recorded with its reason; move the alias by
hand if the change is intended. A registry that cannot be reached (server down, a timeout) is not a
decision: the error is raised, nothing is recorded, and a rerun decides again. The decision, both
scores and the reason are tags on the version and on the run; a rerun of the same run id finds its
version (tag ``bnflow.run_id``) and its recorded decision instead of registering twice.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Optional

import numpy as np

from schemas.config import GateConfig
from schemas.errors import ServiceUnavailable

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


class RegistryUnavailable(ServiceUnavailable):
    """The registry or its artifact store did not answer; retry the run once it does."""


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) says the store is unreachable or
    overloaded, as opposed to a model that cannot do what is asked."""
    import requests
    from mlflow.exceptions import MlflowException

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (ConnectionError, TimeoutError, requests.exceptions.ConnectionError,
                              requests.exceptions.Timeout, requests.exceptions.RetryError)):
            return True
        if isinstance(error, requests.exceptions.HTTPError) and error.response is not None and (
                error.response.status_code == 429 or error.response.status_code >= 500):
            return True
        # Not every 500: MLflow raises its generic INTERNAL_ERROR for models that refuse their input too.
        if isinstance(error, MlflowException) and error.error_code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"):
            return True
        error = error.__cause__ or error.__context__
    return False


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
         feature_names: Optional[list[str]] = None, say=print, score=accuracy) -> Decision:
    """Register ``model_uri`` under ``name`` (once per bnflow run id) and move the alias if it earns it.

    Args:
        x, y: this run's RAW test rows and labels, scored by the candidate and the champion alike.
        score: ``(model URI, x, y, feature_names) -> accuracy``; the registered pyfunc's by default.

    Raises:
        RegistryUnavailable: the registry did not answer; nothing was decided (a rerun decides).
    """
    try:
        return _gate(client, name, run_id, model_uri, x, y, cfg, feature_names, say, score)
    except RegistryUnavailable:
        raise
    except Exception as e:  # any call to the registry: an outage is not a decision, a bug stays a bug
        if is_transient(e):
            raise RegistryUnavailable(f"model registry for {name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                                      "nothing was decided, rerun to decide") from e
        raise


def _gate(client, name, run_id, model_uri, x, y, cfg, feature_names, say, score) -> Decision:
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
    candidate = score(f"models:/{name}/{version}", x, y, feature_names)
    try:
        champion_version = client.get_model_version_by_alias(name, ALIAS).version
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):  # anything but "no such alias"
            raise RegistryUnavailable(f"model registry: {e.message.splitlines()[0]}") from e
        champion_version = None
    champion = None
    if champion_version == version:  # an earlier attempt of this run promoted it and stopped before its tags
        champion_version = None
    if champion_version is not None:
        try:
            champion = score(f"models:/{name}@{ALIAS}", x, y, feature_names)
        except Exception as e:
            if is_transient(e):
                raise RegistryUnavailable(f"the {ALIAS} (version {champion_version}) could not be fetched: "
                                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; rerun to decide") from e
            # another contract (features, classes), or a model that no longer loads: a decision
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
    """The version registered for ``run_id``, or None. An error is raised, never read as "none":
    reading an outage as "not registered yet" registered a second version of the same run."""
    found = client.search_model_versions(f"name = '{name}' and tags.`bnflow.run_id` = '{run_id}'")
    return found[0] if found else None
