"""What the public routes may say about the machine: no absolute file-system paths.

`/v1/model` and `/readyz` describe the bundle, the provider and the kernel. The paths inside (the bundle's
directory, the training log named in the manifest's train config, the kernel library) tell a caller where things
live on the host and who ran the training; `without_absolute_paths` keeps a path relative to the model directory
when it lies under it, and only the last component otherwise.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any

# An absolute POSIX path inside any text: "/" + at least two components, not preceded by a word character or a dot
# (so URLs' "//host/x" and relative "a/b" stay, and "redis://h:1/0" has no match after its scheme).
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s/'\",;:()\[\]{}]+/)+[^\s/'\",;:()\[\]{}]*")


def _shown(path: str, root: str | None) -> str:
    if root is not None:
        root_path, candidate = PurePosixPath(root), PurePosixPath(path)
        if candidate == root_path:
            return "."
        if root_path in candidate.parents:
            return candidate.relative_to(root_path).as_posix()
    return PurePosixPath(path).name or "."


def without_absolute_paths(value: Any, *, root: str | None = None) -> Any:
    """`value` (JSON-like) with every absolute path in a string replaced by its part under `root` (the model
    directory), else by its last component."""
    if isinstance(value, dict):
        return {k: without_absolute_paths(v, root=root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_absolute_paths(v, root=root) for v in value]
    if isinstance(value, str) and "/" in value:
        return _ABSOLUTE_PATH.sub(lambda m: _shown(m.group(0), root), value)
    return value
