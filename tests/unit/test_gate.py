"""The champion gate's handling of errors (pure logic, a fake registry client): an outage is an
error that decides nothing; a champion that cannot score the rows is a recorded decision."""

from types import SimpleNamespace

import numpy as np
import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, TEMPORARILY_UNAVAILABLE

from pipeline.tracking import registry
from schemas.config import GateConfig


class FakeClient:
    """A registry holding version 1 (the champion) and version 2 (this run's, not decided yet)."""

    def __init__(self, search_error=None):
        self.search_error = search_error
        self.tags: dict[tuple[str, str], str] = {}
        self.alias = "1"

    def search_model_versions(self, filter_string):
        if self.search_error:
            raise self.search_error
        return [SimpleNamespace(version="2", tags={})]

    def get_model_version_by_alias(self, name, alias):
        return SimpleNamespace(version=self.alias)

    def set_model_version_tag(self, name, version, key, value):
        self.tags[(version, key)] = value

    def set_registered_model_alias(self, name, alias, version):
        self.alias = version


def scorer(champion_error):
    def score(uri, x, y, feature_names):
        if uri.endswith("@champion"):
            raise champion_error
        return 0.9
    return score


X, Y = np.zeros((4, 2), np.float32), np.zeros(4, np.int64)


@pytest.mark.parametrize("outage", [requests.exceptions.ConnectionError("refused"), TimeoutError("timed out"),
                                    MlflowException("down", error_code=TEMPORARILY_UNAVAILABLE)])
def test_an_outage_while_scoring_the_champion_decides_nothing(outage):
    """Regression: any exception while rescoring the champion was tagged "not promoted", and a rerun
    returned that stored decision for good."""
    client = FakeClient()
    with pytest.raises(registry.RegistryUnavailable, match="champion"):
        registry.gate(client, "m", "run", "uri", X, Y, GateConfig(), say=lambda _: None, score=scorer(outage))
    assert client.tags == {} and client.alias == "1"


def test_a_champion_that_cannot_score_the_rows_is_a_recorded_decision():
    client = FakeClient()
    said = []
    decision = registry.gate(client, "m", "run", "uri", X, Y, GateConfig(), say=said.append,
                             score=scorer(ValueError("input of shape (4, 2); the model takes rows of 64 raw features")))
    assert not decision.promoted and "cannot score" in decision.reason
    assert client.tags[("2", "bnflow.gate")] == "not promoted" and client.alias == "1"
    assert "64 raw features" in said[0]


def test_an_unreadable_registry_is_not_read_as_no_version_yet():
    """Regression: any MlflowException in the lookup of the run's version read as "not registered
    yet", so a rerun during an outage registered a second version of the same run."""
    client = FakeClient(search_error=MlflowException("auth", error_code=PERMISSION_DENIED))
    with pytest.raises(MlflowException, match="auth"):
        registry.gate(client, "m", "run", "uri", X, Y, GateConfig(), say=lambda _: None, score=scorer(None))


def test_transient_is_read_through_the_chain_of_causes():
    try:
        try:
            raise requests.exceptions.ConnectionError("refused")
        except requests.exceptions.ConnectionError as e:
            raise MlflowException("API request failed") from e
    except MlflowException as wrapped:
        assert registry.is_transient(wrapped)
    assert not registry.is_transient(ValueError("wrong feature count"))
    assert not registry.is_transient(MlflowException("Failed to enforce schema"))  # MLflow's generic error


def test_an_outage_at_any_registry_call_is_one_retryable_error():
    """The registry going away while the decision is written (alias, tags) is the same retryable
    error as during scoring, not a traceback."""
    client = FakeClient()
    client.set_registered_model_alias = lambda *a: (_ for _ in ()).throw(requests.exceptions.ConnectionError("reset"))
    better = lambda uri, x, y, names: 0.95 if not uri.endswith("@champion") else 0.5  # noqa: E731
    with pytest.raises(registry.RegistryUnavailable, match="nothing was decided, rerun to decide"):
        registry.gate(client, "m", "run", "uri", X, Y, GateConfig(), say=lambda _: None, score=better)
    assert ("2", "bnflow.gate") not in client.tags  # the decision tag goes last: no decision recorded


@pytest.mark.parametrize("status", [502, 503, 429])
def test_a_gateway_error_after_mlflows_retries_is_an_outage(status):
    """MLflow's retries on 429/5xx end in requests' RetryError or HTTPError: still an outage."""
    response = requests.models.Response()
    response.status_code = status
    for outage in (requests.exceptions.RetryError("too many 5xx"), requests.exceptions.HTTPError(response=response)):
        client = FakeClient()
        with pytest.raises(registry.RegistryUnavailable):
            registry.gate(client, "m", "run", "uri", X, Y, GateConfig(), say=lambda _: None, score=scorer(outage))
        assert client.tags == {}
