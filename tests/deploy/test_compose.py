"""deploy/compose.yaml against the compose-spec schema (check-jsonschema's vendored copy), plus the
wiring a schema cannot see: mounts that exist, the scrape targets Prometheus is given, the Grafana
datasource uid that every dashboard's `datasource` variable defaults to."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from dashboard_panels import panels
from deploy_paths import DEPLOY, GRAFANA, PROMETHEUS, ROOT, tool

COMPOSE = DEPLOY / "compose.yaml"


def check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    exe = tool("check-jsonschema", hint="pip install check-jsonschema (dev extra)")
    return subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=60)


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def test_compose_file_matches_the_compose_spec_schema() -> None:
    proc = check_compose_schema(COMPOSE)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_schema_check_rejects_a_broken_compose_file(tmp_path: Path) -> None:
    broken = compose()
    broken["services"]["redis"]["restart_policy"] = "always"  # not a compose key
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(broken))
    proc = check_compose_schema(path)
    assert proc.returncode != 0 and "restart_policy" in proc.stdout + proc.stderr


def service_env(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    return dict(env) if isinstance(env, dict) else dict(item.split("=", 1) for item in env)


def test_services_are_wired_together() -> None:
    services = compose()["services"]
    assert set(services) == {"redis", "polarity", "ingest", "prometheus", "grafana"}

    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes", "Redis must persist with AOF"
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])

    api, ingest = services["polarity"], services["ingest"]
    for svc in (api, ingest):
        build = svc["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).is_file()
        assert svc["read_only"] is True and "ALL" in svc["cap_drop"]
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
    bundle = [m for m in api["volumes"] if isinstance(m, dict) and m["target"] == "/models/current"]
    assert len(bundle) == 1 and bundle[0]["read_only"] is True, "the bundle is mounted read-only"
    assert service_env(api)["POLARITY_REDIS_URL"] == "redis://redis:6379/0"
    assert ingest["command"][0] == "ingest"
    args = ingest["command"]
    ingest_metrics = args[args.index("--metrics-port") + 1]
    assert args[args.index("--redis-url") + 1] == "redis://redis:6379/0"

    # Prometheus scrapes exactly these two, by compose service name.
    prom = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    targets = {job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
               for job in prom["scrape_configs"]}
    assert targets == {"polarity": ["polarity:8000"], "polarity-ingest": [f"ingest:{ingest_metrics}"]}

    # Read-only bind mounts of this directory exist.
    for name in ("prometheus", "grafana"):
        for mount in services[name]["volumes"]:
            src = mount.split(":")[0]
            if src.startswith("./"):
                assert (COMPOSE.parent / src).is_dir(), mount
                assert mount.endswith(":ro"), mount


def test_grafana_provisioning_points_at_the_dashboards_and_the_datasource_variable_defaults_to_it() -> None:
    grafana = compose()["services"]["grafana"]
    ds = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yaml").read_text())["datasources"]
    assert len(ds) == 1 and ds[0]["type"] == "prometheus" and ds[0]["url"] == "http://prometheus:9090"
    uid = ds[0]["uid"]
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/polarity.yaml").read_text())["providers"][0]
    mounted = {m.split(":")[1]: m.split(":")[0] for m in grafana["volumes"] if m.startswith("./")}
    assert mounted[provider["options"]["path"]] == "./grafana/dashboards"
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"].startswith(provider["options"]["path"])

    boards = sorted((GRAFANA / "dashboards").glob("*.json"))
    assert [b.name for b in boards] == ["polarity-ingestion.json", "polarity-latency.json"]
    uids = set()
    for path in boards:
        text = path.read_text()
        board = json.loads(text)
        assert "__inputs" not in board and "${DS_" not in text, f"{path.name} needs import-time inputs"
        uids.add(board["uid"])
        # Portable: every panel and query variable reads the `datasource` variable (so the board imports into any
        # Grafana), whose default is the provisioned datasource (so compose shows data with no click).
        variables = board["templating"]["list"]
        chooser = variables[0]
        assert chooser["name"] == "datasource" and chooser["type"] == "datasource", path.name
        assert chooser["query"] == "prometheus" and chooser["current"]["value"] == uid, path.name
        refs = list(_datasource_refs(board))
        assert refs, path.name
        for ref in refs:
            assert ref == {"type": "prometheus", "uid": "${datasource}"}, f"{path.name}: {ref}"
        for panel in panels(board):
            assert panel["datasource"]["uid"] == "${datasource}", f"{path.name}: {panel['title']}"
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}", f"{path.name}: {panel['title']}"
        for var in variables[1:]:
            assert var["datasource"]["uid"] == "${datasource}", f"{path.name}: variable {var['name']}"
    assert len(uids) == len(boards)


def _datasource_refs(node: Any) -> Any:
    """Every `"datasource": {...}` object anywhere in a dashboard."""
    if isinstance(node, dict):
        if isinstance(node.get("datasource"), dict):
            yield node["datasource"]
        for value in node.values():
            yield from _datasource_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _datasource_refs(value)


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_image_defaults_match_the_mounts(dockerfile: str) -> None:
    text = (ROOT / "deploy/docker" / dockerfile).read_text()
    assert "POLARITY_BUNDLE=/models/current" in text and "POLARITY_MODEL_DIR=/models" in text
    assert "POLARITY_HOST=0.0.0.0" in text  # reachable from Prometheus and the host port mapping
