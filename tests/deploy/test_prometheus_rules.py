"""Prometheus config and rules through Debian's promtool: check config, check rules, and the rule unit
tests in alerts_test.yml — which must cover every alert both firing and quiet. Metric names used by
rules, dashboards and the HPA adapter must exist in the service's registry."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import yaml
from deploy_paths import GRAFANA, K8S, PROMETHEUS, ROOT, tool

from service.metrics import ServiceMetrics


def promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    exe = tool("promtool", hint="Debian package prometheus: apt-get install prometheus")
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_promtool_check_config() -> None:
    proc = promtool("check", "config", "prometheus.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 rule files found" in proc.stdout


def test_kubernetes_scrape_config_parses_with_its_relabelling(tmp_path: Path) -> None:
    """Debian's Prometheus is built without Kubernetes service discovery, so the SD block is swapped for
    a static target; everything else (relabel regexes, rule files) goes through promtool unchanged."""
    config = yaml.safe_load((PROMETHEUS / "prometheus-kubernetes.yml").read_text())
    for job in config["scrape_configs"]:
        assert job.pop("kubernetes_sd_configs")[0]["role"] == "pod"
        job["static_configs"] = [{"targets": ["127.0.0.1:9"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(PROMETHEUS / "alerts.yml", tmp_path / "alerts.yml")
    proc = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_check_rules() -> None:
    proc = promtool("check", "rules", "alerts.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_rule_unit_tests_pass() -> None:
    proc = promtool("test", "rules", "alerts_test.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_rule_unit_tests_fail_when_an_alert_breaks(tmp_path: Path) -> None:
    """The unit tests can fail: raise the p99 budget tenfold and the firing case must break."""
    rules = (PROMETHEUS / "alerts.yml").read_text()
    assert ") > 0.05\n" in rules
    (tmp_path / "alerts.yml").write_text(rules.replace(") > 0.05\n", ") > 0.5\n"))
    shutil.copy(PROMETHEUS / "alerts_test.yml", tmp_path / "alerts_test.yml")
    proc = promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert proc.returncode != 0 and "PolarityP99OverBudget" in proc.stdout + proc.stderr


def alert_names() -> list[str]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule]


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    names = alert_names()
    required = {"PolarityP99OverBudget", "PolarityDegradedResponses", "PolarityRedisErrors", "PolarityIngestLag",
                "PolarityProviderFellBackToCPU"}
    assert required <= set(names)
    for name in names:
        mine = [case for case in cases if case["alertname"] == name]
        assert any(case.get("exp_alerts") for case in mine), f"{name}: no test where it fires"
        assert any(not case.get("exp_alerts") for case in mine), f"{name}: no test where it stays quiet"
    assert {case["alertname"] for case in cases} <= set(names), "a unit test names an alert that does not exist"


def exposed_series_names() -> set[str]:
    """Sample names the service can expose (histograms: _bucket/_sum/_count; counters: _total)."""
    names: set[str] = set()
    for family in ServiceMetrics().registry.collect():
        if family.type == "histogram":
            names |= {f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count"}
        elif family.type == "counter":
            names.add(f"{family.name}_total")
        else:
            names.add(family.name)
    return names


def referenced_metrics(text: str) -> set[str]:
    return set(re.findall(r"\b(polarity_[a-z_]+)\b", text))


def test_rules_dashboards_and_autoscaling_use_metrics_the_service_exposes() -> None:
    exposed = exposed_series_names()
    assert "polarity_http_request_duration_seconds_bucket" in exposed
    adapter = yaml.safe_load(yaml.safe_load((K8S / "prometheus-adapter-rules.yaml").read_text())["data"]["config.yaml"])
    texts = {
        "alerts.yml": (PROMETHEUS / "alerts.yml").read_text(),
        # what the adapter reads (its `name.as` is the name it publishes to the HPA, not a scraped series)
        "prometheus-adapter-rules.yaml": json.dumps([(r["seriesQuery"], r["metricsQuery"]) for r in adapter["rules"]]),
    }
    for path in (GRAFANA / "dashboards").glob("*.json"):
        board = json.loads(path.read_text())
        texts[path.name] = json.dumps([t["expr"] for p in board["panels"] for t in p.get("targets", [])]) + json.dumps(
            [v["definition"] for v in board["templating"]["list"] if v["type"] == "query"])
    for name, text in texts.items():
        unknown = referenced_metrics(text) - exposed
        assert referenced_metrics(text), name
        assert not unknown, f"{name} uses metrics the service does not expose: {sorted(unknown)}"


def test_every_alert_has_a_runbook_section_that_exists() -> None:
    """runbook_url names a heading of docs/runbooks.md (GitHub's anchor: the heading, lower-cased)."""
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    runbook = (ROOT / "docs/runbooks.md").read_text()
    anchors = {re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^## (.+)$", runbook, flags=re.M)}
    for rule in (r for g in groups for r in g["rules"] if "alert" in r):
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook_url"} <= set(annotations), rule["alert"]
        page, _, anchor = annotations["runbook_url"].partition("#")
        assert page == "docs/runbooks.md" and anchor in anchors, f"{rule['alert']}: {annotations['runbook_url']}"
        section = runbook.split(f"## {rule['alert']}\n", 1)[1].split("\n## ", 1)[0]
        assert "**Look at:**" in section and "**Act:**" in section, rule["alert"]
