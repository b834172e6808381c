"""cluster/ configs, checked offline: the launcher YAML against Ray's own schema (the check `ray up`
runs), the KubeRay manifests structurally, and the RayService's Serve config against ours."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_launcher_config_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text()))
    validate_config(config)  # raises on any schema violation
    types = config["available_node_types"]
    assert config["head_node_type"] == "head" and types["head"]["resources"] == {"CPU": 0}
    assert types["gpu_worker"]["max_workers"] >= 1 and types["cpu_worker"]["min_workers"] == 0


def _pod_specs(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    for group in groups:
        assert "rayStartParams" in group and group["template"]["spec"]["containers"]
    return groups


def test_kuberay_manifests_are_complete():
    manifests = {p.name: yaml.safe_load(p.read_text()) for p in (ROOT / "cluster" / "kuberay").glob("*.yaml")}
    assert {m["kind"] for m in manifests.values()} == {"RayCluster", "RayJob", "RayService"}
    for manifest in manifests.values():
        assert manifest["apiVersion"] == "ray.io/v1" and manifest["metadata"]["name"]
    cluster = manifests["raycluster.yaml"]["spec"]
    workers = _pod_specs(cluster)[1:]
    assert any("nvidia.com/gpu" in c["resources"]["limits"] for w in workers for c in w["template"]["spec"]["containers"])
    job = manifests["rayjob-pipeline.yaml"]["spec"]
    assert job["entrypoint"].startswith("python -m jobs.pipeline") and (ROOT / "jobs" / "pipeline.py").is_file()
    _pod_specs(job["rayClusterSpec"])
    _pod_specs(manifests["rayservice.yaml"]["spec"]["rayClusterConfig"])


def test_rayservice_serves_the_same_app_as_serve_configs():
    service = yaml.safe_load(yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayservice.yaml").read_text())
                             ["spec"]["serveConfigV2"])
    local = yaml.safe_load((ROOT / "serve_configs" / "recommend.yaml").read_text())
    (app,), (ours,) = service["applications"], local["applications"]
    assert app["import_path"] == ours["import_path"] == "slim_ray.serve_app:build_app"
    assert app["deployments"] == ours["deployments"]
    import importlib

    module, name = ours["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), name))
