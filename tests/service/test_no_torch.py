"""The service process must not import torch: every module under service/, in a clean interpreter."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import service

ROOT = Path(__file__).resolve().parents[2]


def service_modules() -> list[str]:
    found = [m.name for m in pkgutil.walk_packages(service.__path__, prefix="service.")]
    return ["service", *sorted(found)]


def test_service_modules_are_found() -> None:
    names = service_modules()
    assert {"service.history_store", "service.assembly"} <= set(names)


def test_no_service_module_imports_torch() -> None:
    names = service_modules()
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "    assert 'torch' not in sys.modules, f'importing {name} imported torch'\n"
        "print('ok', len(sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.startswith("ok")
