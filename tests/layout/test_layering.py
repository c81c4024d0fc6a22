"""The dependency rule, read from the source (AST), not from convention:

    loadtest -> service -> export -> model
    service imports only model.features.* and the two torch-free export modules (bundle, custom_kernel)
    model imports nothing from export/, service/ or loadtest/; model.features imports only numpy

Every import counts, also one inside a function (a lazy import is still a dependency). The same graph must
have no cycle between modules, and no module may import another module's private (`_name`) names.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("model", "export", "service", "loadtest")
LAYER = {name: i for i, name in enumerate(PACKAGES)}  # a package may import only packages of a lower or equal layer
SERVICE_MAY_IMPORT = ("model.features", "export.bundle", "export.custom_kernel")
TORCH_FREE_EXPORT = ("export.bundle", "export.custom_kernel")
HEAVY = ("torch", "pyarrow", "onnx", "onnxscript", "onnx_ir", "matplotlib", "tqdm")
STDLIB = frozenset(sys.stdlib_module_names)


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the module (or package) imported
    names: tuple[str, ...]  # names taken from it (`from target import a, b`)
    line: int


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))
            if "__pycache__" not in p.parts}


def imports_of(name: str, path: Path) -> Iterator[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(name, alias.name, (), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)] if node.level > 1 else anchor
                base = ".".join([*anchor, base] if base else anchor)
            yield Import(name, base, tuple(a.name for a in node.names), node.lineno)


def resolved_targets(imp: Import, modules: dict[str, Path]) -> list[str]:
    """Project modules an import depends on: `from pkg import sub` names the submodule when there is one."""
    subs = [f"{imp.target}.{n}" for n in imp.names if f"{imp.target}.{n}" in modules]
    rest = [n for n in imp.names if f"{imp.target}.{n}" not in modules]
    found = subs + ([imp.target] if imp.target in modules and (rest or not imp.names) else [])
    return found


def all_imports(modules: dict[str, Path]) -> list[Import]:
    return [imp for name, path in modules.items() for imp in imports_of(name, path)]


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def top(name: str) -> str:
    return name.split(".")[0]


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(modules: dict[str, Path]) -> list[str]:
    found = []
    for imp in all_imports(modules):
        src, dst = top(imp.module), top(imp.target)
        where = f"{shown(modules[imp.module])}:{imp.line}: {imp.module} imports {imp.target}"
        if dst in LAYER and LAYER[dst] > LAYER[src]:
            found.append(f"{where} (a lower layer imports an upper one)")
        if src == "service" and dst in LAYER and dst != "service":
            targets = resolved_targets(imp, modules) or [imp.target]
            if not all(within(t, SERVICE_MAY_IMPORT) for t in targets):
                found.append(f"{where} (service may import only {', '.join(SERVICE_MAY_IMPORT)})")
        torch_free = src == "service" or within(imp.module, (*TORCH_FREE_EXPORT, "model.features"))
        if torch_free and dst in HEAVY:
            found.append(f"{where} (torch-free code imports {dst})")
        if within(imp.module, ("model.features",)) and dst not in STDLIB and dst not in ("numpy", "__future__") \
                and not within(imp.target, ("model.features",)):
            found.append(f"{where} (model.features is numpy-only)")
        if within(imp.module, TORCH_FREE_EXPORT) and dst in LAYER and not within(imp.target, ("model.features",)) \
                and not within(imp.target, TORCH_FREE_EXPORT):
            found.append(f"{where} (the service's export modules may import only model.features)")
    return found


def test_the_dependency_rule_holds() -> None:
    assert violations(project_modules()) == []


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for imp in all_imports(modules):
        for target in resolved_targets(imp, modules):
            if target != imp.module:
                graph[imp.module].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_no_import_cycle() -> None:
    assert find_cycle(import_graph()) is None


def test_private_names_stay_in_their_module() -> None:
    modules = project_modules()
    leaks = [f"{shown(modules[imp.module])}:{imp.line}: {imp.module} imports {n} from {imp.target}"
             for imp in all_imports(modules) if top(imp.target) in LAYER
             for n in imp.names if n.startswith("_") and not n.startswith("__")]
    assert leaks == []


@pytest.mark.parametrize("source, expected", [
    ("import export.pipeline\n", "a lower layer imports an upper one"),
    ("def f():\n    from service.app import create_app\n", "a lower layer imports an upper one"),
    ("import torch\n", "model.features is numpy-only"),
])
def test_the_rule_sees_a_violation(tmp_path: Path, source: str, expected: str) -> None:
    """The checker is not vacuous: a model module importing upward (also lazily), or a features module
    importing torch, is reported."""
    probe = tmp_path / "probe.py"
    probe.write_text(source)
    found = violations({**project_modules(), "model.features._probe": probe})
    assert any(expected in v and "_probe" in v for v in found)


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_polarity_parser_loads_no_training_stack() -> None:
    """`polarity --help` and `polarity serve` build every subcommand's parser: none may pull torch or pyarrow."""
    import subprocess

    code = ("import sys; from model.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'pyarrow', 'onnx', 'matplotlib') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_the_device_checks_import_path_still_works() -> None:
    """`shared/devcheck/prepare.sh` imports `loadtest.random_bundle.random_run` (the pre-layering path)."""
    from loadtest.harness.random_bundle import random_run
    from loadtest.random_bundle import random_run as old_path

    assert old_path is random_run
