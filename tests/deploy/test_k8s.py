"""The Kustomize manifests: every overlay renders with `kubectl kustomize`, every built-in object
validates strictly against the Kubernetes schema, and ports, probes, drain timing and the GPU
request agree with aicc's settings."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from aicc.config import Settings
from tests.deploy.conftest import SettingsFor

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
QUEUE_DEPTH = "cpu+queue-depth"
"""The CPU overlay with the optional queue-depth component (rendered from a scratch dir)."""
K8S_VERSION = kubernetes_validate.latest_version()
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
"""Kinds kubernetes-validate has no schema for (CRDs): checked by shape below."""

Manifest = dict[str, Any]


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    assert kubectl is not None, "kubectl renders the manifests (kubectl kustomize)"
    return kubectl


@cache
def _render(variant: str) -> tuple[Manifest, ...]:
    if variant == QUEUE_DEPTH:
        return _render_with_component(K8S / "overlays" / "cpu", K8S / "components" / "queue-depth")
    return _kustomize(K8S / "overlays" / variant)


def _kustomize(directory: Path) -> tuple[Manifest, ...]:
    result = subprocess.run(
        [_kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def _render_with_component(overlay: Path, component: Path) -> tuple[Manifest, ...]:
    # Kustomize wants references relative to the kustomization.
    with tempfile.TemporaryDirectory() as name:
        scratch = Path(name)
        (scratch / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "resources": [os.path.relpath(overlay, scratch)],
                    "components": [os.path.relpath(component, scratch)],
                }
            )
        )
        return _kustomize(scratch)


def _one(manifests: tuple[Manifest, ...], kind: str) -> Manifest:
    (found,) = [m for m in manifests if m["kind"] == kind]
    return found


def _container(manifests: tuple[Manifest, ...]) -> Manifest:
    (container,) = _one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    return dict(container)


def _flags(args: list[str]) -> dict[str, str]:
    """`serve --device cuda` → {"device": "cuda"} (every flag of ours takes one value)."""
    assert args[0] == "serve"
    words = args[1:]
    assert len(words) % 2 == 0, args
    assert all(w.startswith("--") for w in words[::2]), args
    pairs = zip(words[::2], words[1::2], strict=True)
    return {name[2:].replace("-", "_"): value for name, value in pairs}


def _pod_settings(
    manifests: tuple[Manifest, ...], settings_for: SettingsFor, tmp_path: Path
) -> Settings:
    """The settings the pod's `aicc` computes: its env, its mounted ConfigMap, its flags."""
    pod = _one(manifests, "Deployment")["spec"]["template"]["spec"]
    container = _container(manifests)
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    config_path = Path(env.pop("AICC_CONFIG"))
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volume_name = mounts[str(config_path.parent)]
    (volume,) = [v for v in pod["volumes"] if v["name"] == volume_name]
    config_map = [
        m
        for m in manifests
        if m["kind"] == "ConfigMap" and m["metadata"]["name"] == volume["configMap"]["name"]
    ]
    assert config_map, f"no ConfigMap {volume['configMap']['name']}"
    config_file = tmp_path / config_path.name
    config_file.write_text(config_map[0]["data"][config_path.name])
    return settings_for(env, config_file, **_flags(container["args"]))


def _named_port(container: Manifest, name: str) -> int:
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return int(port)


def _quantity(value: str) -> float:
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


@pytest.mark.parametrize("variant", [*OVERLAYS, QUEUE_DEPTH])
def test_every_builtin_object_validates_strictly(variant: str) -> None:
    manifests = _render(variant)
    kinds = {m["kind"] for m in manifests}
    assert {
        "Deployment",
        "Service",
        "Ingress",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Secret",
        "ConfigMap",
        "PersistentVolumeClaim",
        "ServiceMonitor",
    } <= kinds
    for manifest in manifests:
        if (manifest["apiVersion"], manifest["kind"]) in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def test_strict_validation_catches_a_wrong_field() -> None:
    deployment = _one(_render("cpu"), "Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pth"] = "/"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


@pytest.mark.parametrize("variant", OVERLAYS)
def test_service_monitor_scrapes_the_metrics_port(variant: str) -> None:
    manifests = _render(variant)
    monitor, service = _one(manifests, "ServiceMonitor"), _one(manifests, "Service")
    assert monitor["metadata"]["name"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scheme", "scrapeTimeout"}
    assert endpoint["path"] == "/metrics"
    assert re.fullmatch(r"\d+[smh]", endpoint["interval"])
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
    assert port["targetPort"] == "metrics"


@pytest.mark.parametrize("variant", OVERLAYS)
def test_ports_match_the_settings_the_pod_gets(
    variant: str, settings_for: SettingsFor, tmp_path: Path
) -> None:
    manifests = _render(variant)
    settings = _pod_settings(manifests, settings_for, tmp_path)
    container = _container(manifests)
    assert settings.port == Settings.model_fields["port"].default
    assert _named_port(container, "http") == settings.port
    assert _named_port(container, "metrics") == settings.metrics_port
    assert (settings.host, settings.metrics_host) == ("0.0.0.0", "0.0.0.0")
    service = _one(manifests, "Service")
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert {p["targetPort"] for p in service_ports.values()} == {"http", "metrics"}
    pod_labels = _one(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    backend = _one(manifests, "Ingress")["spec"]["rules"][0]["http"]["paths"][0]["backend"]
    assert backend["service"]["name"] == service["metadata"]["name"]
    assert backend["service"]["port"]["name"] == "http"  # never the credential-free metrics port


@pytest.mark.parametrize("variant", OVERLAYS)
def test_probes_use_the_health_routes(variant: str) -> None:
    container = _container(_render(variant))
    for probe, path in (
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # model load


@pytest.mark.parametrize("variant", OVERLAYS)
def test_drain_fits_in_the_termination_grace_period(
    variant: str, settings_for: SettingsFor, tmp_path: Path
) -> None:
    manifests = _render(variant)
    settings = _pod_settings(manifests, settings_for, tmp_path)
    pod = _one(manifests, "Deployment")["spec"]["template"]["spec"]
    command = _container(manifests)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop_s = float(command[1])
    assert 2 <= pre_stop_s <= 15
    assert settings.drain_timeout_s == Settings.model_fields["drain_timeout_s"].default
    assert pod["terminationGracePeriodSeconds"] > settings.drain_timeout_s + pre_stop_s
    # One writer of the state at a time: the old pod drains before the new one starts.
    assert _one(manifests, "Deployment")["spec"]["strategy"]["type"] == "Recreate"


@pytest.mark.parametrize("variant", OVERLAYS)
def test_volumes_secrets_and_resources(
    variant: str, settings_for: SettingsFor, tmp_path: Path
) -> None:
    manifests = _render(variant)
    settings = _pod_settings(manifests, settings_for, tmp_path)
    pod = _one(manifests, "Deployment")["spec"]["template"]["spec"]
    container = _container(manifests)
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    claims = {m["metadata"]["name"] for m in manifests if m["kind"] == "PersistentVolumeClaim"}
    for directory in (settings.model_dir, settings.state_dir):
        claim = volumes[mounts[str(directory)]]["persistentVolumeClaim"]["claimName"]
        assert claim in claims
    secrets = {m["metadata"]["name"] for m in manifests if m["kind"] == "Secret"}
    from_secrets = [e for e in container["env"] if "valueFrom" in e]
    assert {e["name"] for e in from_secrets} >= {"AICC_ADMIN_KEY", "AICC_MODEL_KEY"}
    for variable in from_secrets:
        reference = variable["valueFrom"]["secretKeyRef"]
        assert reference["name"] in secrets
        assert reference["optional"] is True
    resources = container["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys() & resources["limits"].keys()
    # llama.cpp threads = the CPU limit (a CPU quota does not change the CPUs a process sees).
    assert settings.threads == _quantity(resources["limits"]["cpu"])
    assert pod["securityContext"]["runAsNonRoot"] is True
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert f"--uid {pod['securityContext']['runAsUser']} " in dockerfile


@pytest.mark.parametrize("variant", OVERLAYS)
def test_gpu_only_in_the_gpu_overlay(
    variant: str, settings_for: SettingsFor, tmp_path: Path
) -> None:
    manifests = _render(variant)
    settings = _pod_settings(manifests, settings_for, tmp_path)
    container = _container(manifests)
    pod = _one(manifests, "Deployment")["spec"]["template"]["spec"]
    limits = container["resources"]["limits"]
    if variant == "gpu":
        assert settings.device == "cuda"
        assert container["args"] == ["serve", "--device", "cuda"]
        assert limits["nvidia.com/gpu"] == "1"
        assert container["image"].startswith("aicc-cuda:")
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {t["key"] for t in pod["tolerations"]} == {"nvidia.com/gpu"}
    else:
        assert settings.device == "cpu"
        assert "nvidia.com/gpu" not in limits
        assert container["image"].startswith("aicc:")
        assert "nodeSelector" not in pod


@pytest.mark.parametrize("variant", [*OVERLAYS, QUEUE_DEPTH])
def test_hpa_scales_the_deployment_on_cpu_70(variant: str) -> None:
    manifests = _render(variant)
    hpa, deployment = _one(manifests, "HorizontalPodAutoscaler"), _one(manifests, "Deployment")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        deployment["metadata"]["name"],
    )
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    metrics = hpa["spec"]["metrics"]
    cpu = [m for m in metrics if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
    assert cpu[0]["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}
    queue = [m for m in metrics if m["type"] == "Pods"]
    if variant == QUEUE_DEPTH:
        (metric,) = queue
        assert metric["pods"]["metric"]["name"] == "aicc_requests_waiting"
    else:
        assert queue == []  # the base needs no custom metrics API


def test_queue_depth_metric_is_one_aicc_exports() -> None:
    source = (ROOT / "src" / "aicc" / "observability" / "metrics.py").read_text()
    assert '"aicc_requests_waiting"' in source


@pytest.mark.parametrize("variant", OVERLAYS)
def test_pdb_selects_the_pods_and_ingress_has_tls(variant: str) -> None:
    manifests = _render(variant)
    pod_labels = _one(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"]
    pdb = _one(manifests, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # With one replica, minAvailable: 1 would block every node drain.
    assert pdb["spec"]["maxUnavailable"] == 1
    ingress = _one(manifests, "Ingress")
    (tls,) = ingress["spec"]["tls"]
    assert tls["secretName"]
    assert {rule["host"] for rule in ingress["spec"]["rules"]} <= set(tls["hosts"])
