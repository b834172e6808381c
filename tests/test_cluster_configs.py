"""cluster/ configs, checked offline: the launcher YAML against Ray's own schema (the check `ray up`
runs); the KubeRay manifests' Kubernetes parts (the shared PVC, and every pod template inside the Ray
custom resources) against the Kubernetes API schema with kubernetes-validate, strict (unknown fields
fail); the custom resources' own fields structurally (no KubeRay CRD schema ships offline); and the
RayService's Serve config against ours."""

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
    assert config["docker"]["image"] in IMAGES and types["gpu_worker"]["docker"]["worker_image"].endswith("-gpu")
    assert "-v /mnt/shared:/mnt/shared" in config["docker"]["run_options"]
    assert any("/mnt/shared" in c for c in config["initialization_commands"])
    assert types["gpu_worker"]["max_workers"] >= 1 and types["cpu_worker"]["min_workers"] == 0


IMAGES = {"ghcr.io/your-org/slim-ray:2.60.0-cpu", "ghcr.io/your-org/slim-ray:2.60.0-gpu"}  # the Dockerfile's tags


def _pod_specs(spec: dict) -> list[dict]:
    """Every Ray group of a cluster spec, each checked: it mounts the shared volume at /mnt/shared, tells
    slim-ray so (SLIM_RAY_STORAGE) and runs one of the Dockerfile's images."""
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    for group in groups:
        pod = group["template"]["spec"]
        assert "rayStartParams" in group and pod["containers"]
        assert pod["volumes"] == [{"name": "shared", "persistentVolumeClaim": {"claimName": "slim-ray-shared"}}]
        for container in pod["containers"]:
            assert {"name": "shared", "mountPath": "/mnt/shared"} in container["volumeMounts"]
            assert {"name": "SLIM_RAY_STORAGE", "value": "/mnt/shared"} in container["env"]
            assert container["image"] in IMAGES
    gpu = [g for g in groups if any("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])]
    assert gpu and all(c["image"].endswith("-gpu") for g in gpu for c in g["template"]["spec"]["containers"])
    return groups


def test_kuberay_manifests_are_complete():
    manifests = {p.name: yaml.safe_load(p.read_text()) for p in (ROOT / "cluster" / "kuberay").glob("*.yaml")}
    assert {m["kind"] for m in manifests.values()} == {"RayCluster", "RayJob", "RayService", "PersistentVolumeClaim"}
    claim = manifests["shared-storage.yaml"]
    assert claim["metadata"]["name"] == "slim-ray-shared" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for manifest in (m for m in manifests.values() if m["kind"] != "PersistentVolumeClaim"):
        assert manifest["apiVersion"] == "ray.io/v1" and manifest["metadata"]["name"]
    _pod_specs(manifests["raycluster.yaml"]["spec"])
    job = manifests["rayjob-pipeline.yaml"]["spec"]
    assert job["entrypoint"].startswith("python -m jobs.pipeline") and (ROOT / "jobs" / "pipeline.py").is_file()
    assert "run.output_dir=runs/" in job["entrypoint"]  # relative: onto the shared volume
    _pod_specs(job["rayClusterSpec"])
    _pod_specs(manifests["rayservice.yaml"]["spec"]["rayClusterConfig"])
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "FROM ${BASE}" in dockerfile and "rayproject/ray:2.60.0" in dockerfile and "FLAVOR=gpu" in dockerfile


KUBERNETES = "1.33.0"  # a version KubeRay 1.4 supports; the schemas ship inside kubernetes-validate


def _pod_templates(manifest: dict) -> list[dict]:
    spec = manifest["spec"]
    cluster = {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
               "RayService": spec.get("rayClusterConfig")}[manifest["kind"]]
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [g["template"] for g in groups] + ([spec["submitterPodTemplate"]] if "submitterPodTemplate" in spec else [])


def _validate_pod_template(template: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "slim-ray"},
                                  "template": template}, KUBERNETES, strict=True)


def test_kuberay_manifests_pass_the_kubernetes_schema():
    import copy

    import kubernetes_validate
    import pytest

    templates = 0
    for path in sorted((ROOT / "cluster" / "kuberay").glob("*.yaml")):
        manifest = yaml.safe_load(path.read_text())
        if manifest["kind"] == "PersistentVolumeClaim":
            kubernetes_validate.validate(manifest, KUBERNETES, strict=True)
            continue
        for template in _pod_templates(manifest):
            _validate_pod_template(template)
            templates += 1
    assert templates >= 7  # head + CPU + GPU groups of three clusters, at least
    broken = copy.deepcopy(template)
    broken["spec"]["containers"][0]["volumeMount"] = broken["spec"]["containers"][0].pop("volumeMounts")
    with pytest.raises(kubernetes_validate.ValidationError, match="volumeMount"):
        _validate_pod_template(broken)  # a misspelt field is caught, not ignored


def test_relative_run_folders_land_on_the_shared_storage(monkeypatch):
    from slim_ray.config import load_config

    monkeypatch.setenv("SLIM_RAY_STORAGE", "/mnt/shared")
    assert load_config(None, ["run.output_dir=runs/ml100k"]).run.output_dir == Path("/mnt/shared/runs/ml100k")
    assert load_config(None, ["run.output_dir=/data/run"]).run.output_dir == Path("/data/run")
    monkeypatch.delenv("SLIM_RAY_STORAGE")
    assert load_config(None, ["run.output_dir=runs/ml100k"]).run.output_dir == Path("runs/ml100k")


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
