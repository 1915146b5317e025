"""The checkpoint and statistics files: typed, versioned, loadable with weights_only=True."""

import json

import pytest
import torch

from schemas.artifacts import CheckpointState, ModelSpec, NormStats
from schemas.errors import DataError


def test_checkpoint_round_trip_is_weights_only_and_version_checked(tmp_path):
    """A checkpoint is plain types and tensors: torch.load(weights_only=True) reads it; another layout
    version or a non-checkpoint file is a one-line DataError."""
    stats = NormStats(method="standard", per="feature", num_features=2, count=3.0, mean=[0, 1], std=[1, 2],
                      min=[0, 0], max=[1, 1], constant_units=[], shift=[0, 1], scale=[1, 2], config_hash="h", version="v")
    model = torch.nn.Linear(2, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(4, 2)).sum().backward()
    opt.step()
    state = CheckpointState(epoch=3, config={"model": {"kind": "mlp"}}, bn_mode="sync", spec=ModelSpec(num_features=2, num_classes=3),
                            norm_stats=stats, model=model.state_dict(), optimizer=opt.state_dict(),
                            rng={"torch": torch.get_rng_state()}, history=[{"epoch": 1.0, "train_loss": 0.5}])
    state.save(tmp_path / "c.pt")
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert raw["version"] == "2" and raw["norm_stats"]["scale"] == [1, 2]
    back = CheckpointState.load(tmp_path / "c.pt")
    assert back.epoch == 3 and back.spec.num_classes == 3 and back.norm_stats == stats
    assert torch.equal(back.model["weight"], model.state_dict()["weight"])
    assert torch.equal(back.optimizer["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"])

    torch.save({**raw, "version": "1"}, tmp_path / "old.pt")
    with pytest.raises(DataError, match=r"old.pt: version '1', expected '2'"):
        CheckpointState.load(tmp_path / "old.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(DataError, match=r"junk.pt: not a readable bnflow checkpoint"):
        CheckpointState.load(tmp_path / "junk.pt")
    stats.save(tmp_path / "s.json")
    assert NormStats.load(tmp_path / "s.json") == stats
    (tmp_path / "s2.json").write_text(json.dumps({**stats.model_dump(), "schema_version": "0"}))
    with pytest.raises(DataError, match=r"s2.json: schema_version '0', expected '1'"):
        NormStats.load(tmp_path / "s2.json")
