"""Deployment files checked against the schemas of what reads them."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import ray
import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_the_cluster_config_passes_rays_own_schema_and_keeps_the_cluster_closed():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    errors = [f"{list(e.path)}: {e.message}" for e in jsonschema.Draft7Validator(schema).iter_errors(cfg)]
    assert errors == []
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)  # token auth on every node
    assert "--dashboard-host=127.0.0.1" in " ".join(cfg["head_start_ray_commands"])
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    # The project installs from its own pyproject.toml, not from a copied list of dependencies.
    assert any(c.endswith("pip install -q -e ~/bnflow") for c in cfg["setup_commands"])
    assert cfg["file_mounts"]["~/bnflow"] == "."
