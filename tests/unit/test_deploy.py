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


# -- Kubernetes (deploy/kuberay) ----------------------------------------------------------------
# Core resources are checked strictly against Kubernetes' own OpenAPI schemas (kubernetes-validate
# ships them). KubeRay's CRD schemas ship in no package this project can install, so the RayCluster
# and RayJob are checked by the parts Kubernetes defines (every pod template, strictly, as a Pod),
# plus the KubeRay fields bnflow relies on and the entrypoints, parsed by bnflow's own CLI.
K8S_VERSION = "1.33"
KUBERAY = ROOT / "deploy" / "kuberay"


def _docs():
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path.name, doc


def _pod_templates(doc):
    spec = doc["spec"]
    cluster = spec["rayClusterSpec"] if doc["kind"] == "RayJob" else spec
    yield "head", cluster["headGroupSpec"]["template"]
    for group in cluster["workerGroupSpecs"]:
        yield group["groupName"], group["template"]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in spec:
        yield "submitter", spec["submitterPodTemplate"]


def _validate_core(doc):
    import kubernetes_validate

    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_core_manifests_pass_kubernetes_schemas():
    kinds = []
    for name, doc in _docs():
        if doc["apiVersion"].startswith("ray.io/"):
            continue
        _validate_core(doc)  # raises with the field path on any unknown or mistyped field
        kinds.append(doc["kind"])
    assert {"CronJob", "Deployment", "Service", "StatefulSet", "PersistentVolumeClaim", "Secret"} <= set(kinds)


def test_kuberay_resources_pod_templates_and_entrypoints():
    from pipeline import recipes
    from pipeline.cli import build_parser

    found = {}
    for name, doc in _docs():
        if not doc["apiVersion"].startswith("ray.io/"):
            continue
        assert doc["apiVersion"] == "ray.io/v1", name
        found[doc["kind"]] = doc
        cluster = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
        assert cluster["rayVersion"] == ray.__version__  # the image's Ray is the one bnflow pins
        for group, template in _pod_templates(doc):
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{name}-{group}"}, "spec": template["spec"]}
            _validate_core(pod)
            env = {e["name"]: e for c in template["spec"]["containers"] for e in c.get("env", [])}
            assert env["RAY_AUTH_MODE"]["value"] == "token", (name, group)  # token auth on every node
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "bnflow-ray-token"
        if doc["kind"] == "RayJob":
            argv = doc["spec"]["entrypoint"].split()
            assert argv[:3] == ["python", "-m", "pipeline"]
            args = build_parser().parse_args(argv[3:])
            recipes.load(args.recipe, args.overrides)
    assert set(found) == {"RayCluster", "RayJob"}


def test_the_cronjob_submits_a_slot_that_parses():
    import shlex

    from pipeline.cli import build_parser

    cron = next(doc for _, doc in _docs() if doc["kind"] == "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    script = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"][0]
    argv = shlex.split(script.replace('"$(date -u +%Y-%m-%dT02:00Z)"', "2026-11-24T02:00Z"))
    assert argv[:4] == ["exec", "python", "-m", "pipeline"]
    args = build_parser().parse_args(argv[4:])
    assert args.command == "submit" and args.slot == "2026-11-24T02:00Z" and args.schedule == "nightly"
