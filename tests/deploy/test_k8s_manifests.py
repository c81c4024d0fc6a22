"""Kubernetes manifests against the Kubernetes JSON schemas shipped inside kubernetes-validate (strict:
unknown fields fail; no network), plus the cross-references a schema cannot check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from deploy_paths import K8S

from service.settings import Settings

# Oldest and newest Kubernetes minor versions the manifests are checked against.
VERSIONS = ("1.29.0", "1.33.0")


def documents() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path.name, doc))
    return out


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in documents() if doc["kind"] == kind}


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_strictly(version: str) -> None:
    docs = documents()
    kinds = {doc["kind"] for _, doc in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap", "Secret",
            "PersistentVolumeClaim", "Namespace"} <= kinds
    for name, doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = f"{name} {doc['kind']}/{doc['metadata']['name']} (k8s {version})"
            pytest.fail(f"{where}: {exc.message} at {list(exc.path)}")


def test_validator_rejects_an_unknown_field() -> None:
    deployment = by_kind("Deployment")["polarity"]
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in c.get("env", [])}


def test_scoring_deployments_probe_limit_and_select_the_gpu() -> None:
    deployments = by_kind("Deployment")
    for name in ("polarity", "polarity-gpu"):
        c = container(deployments[name])
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        assert mounts["/models"]["readOnly"] is True
        refs = {ref.get("configMapRef", ref.get("secretRef", {})).get("name") for ref in c["envFrom"]}
        assert refs == {"polarity-settings", "polarity-api-key"}
    gpu = container(deployments["polarity-gpu"])
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env_of(gpu)["POLARITY_DEVICE"] == "cuda"
    assert "nvidia.com/gpu" not in str(container(deployments["polarity"])["resources"])
    assert deployments["polarity-gpu"]["spec"]["template"]["metadata"]["labels"]["polarity.io/accelerator"] == "gpu"


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_service_pdb_and_hpa_select_the_right_pods() -> None:
    deployments = by_kind("Deployment")
    pods = {name: d["spec"]["template"]["metadata"]["labels"] for name, d in deployments.items()}
    for name, d in deployments.items():
        assert matches(d["spec"]["selector"]["matchLabels"], pods[name])
    service = by_kind("Service")["polarity"]
    behind_service = {n for n, labels in pods.items() if matches(service["spec"]["selector"], labels)}
    assert behind_service == {"polarity", "polarity-gpu"}
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    pdbs = by_kind("PodDisruptionBudget")
    assert {n for n, labels in pods.items() if matches(pdbs["polarity"]["spec"]["selector"]["matchLabels"], labels)} \
        == {"polarity", "polarity-gpu"}
    assert {n for n, labels in pods.items()
            if matches(pdbs["polarity-ingest"]["spec"]["selector"]["matchLabels"], labels)} == {"polarity-ingest"}

    hpa = by_kind("HorizontalPodAutoscaler")["polarity"]
    assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    adapter = yaml.safe_load(by_kind("ConfigMap")["prometheus-adapter-polarity"]["data"]["config.yaml"])
    published = {rule["name"]["as"] for rule in adapter["rules"]}
    assert metrics["Pods"]["pods"]["metric"]["name"] in published


def test_configmap_sets_only_real_settings() -> None:
    data = by_kind("ConfigMap")["polarity-settings"]["data"]
    fields = {f"POLARITY_{name.upper()}" for name in Settings.model_fields}
    assert set(data) <= fields, set(data) - fields
    settings = Settings(**{k.removeprefix("POLARITY_").lower(): v for k, v in data.items()})  # types parse
    assert str(settings.bundle).startswith(str(settings.model_dir))
    assert settings.host == "0.0.0.0"
    for name in ("polarity", "polarity-gpu"):
        c = container(by_kind("Deployment")[name])
        assert c["ports"][0]["containerPort"] == settings.port
        assert set(env_of(c)) <= fields
    secret = by_kind("Secret")["polarity-api-key"]
    assert set(secret["stringData"]) == {"POLARITY_API_KEY"}


def test_ingester_joins_one_group_and_exposes_metrics_where_prometheus_looks() -> None:
    ingest = by_kind("Deployment")["polarity-ingest"]
    c = container(ingest)
    args = c["args"]
    assert args[0] == "ingest"
    assert args[args.index("--consumer") + 1] == "$(POD_NAME)"
    port = args[args.index("--metrics-port") + 1]
    assert ingest["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == port
    assert c["ports"][0]["containerPort"] == int(port)
    assert c["livenessProbe"]["httpGet"]["path"] == "/metrics"


def test_redis_cluster_notes_exist() -> None:
    notes = (K8S / "README.md").read_text()
    assert "{u:" in notes and "redis+cluster://" in notes


def test_manifests_have_no_real_secret() -> None:
    text = Path(K8S / "secret.example.yaml").read_text()
    assert "replace-with" in text
