"""The optional fused `tapf.fused::TAPFGate` CPU kernel (an ONNX Runtime custom-op library).

Torch-free and onnx-free: the service imports it to decide how to open a bundle.

The library is built from `export/kernels/` by `make -C export/kernels` (also `make setup`) into
`export/kernels/build/libtapf_ort.so`. When it is not built, or cannot be loaded, every bundle still
runs through the model-local ONNX function `tapf.fused::TAPFGate` (stock kernels, inlined by ONNX
Runtime) and `kernel_status()` says why, once, for logs and /readyz details.

Never register the library in a session whose providers include CUDA: the node would be pinned to
the CPU; there the inlined function runs on stock CUDA kernels.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
LIBRARY_NAME = "libtapf_ort.so"
ENV_LIBRARY = "POLARITY_TAPF_KERNEL"  # explicit path to the library; "off" disables it
_reported: set[str] = set()


def kernel_library_path() -> Path | None:
    """The built custom-op library, or None (not built / disabled)."""
    override = os.environ.get(ENV_LIBRARY, "").strip()
    if override.lower() in ("0", "off", "none", "false"):
        return None
    candidate = Path(override) if override else KERNEL_DIR / "build" / LIBRARY_NAME
    return candidate if candidate.is_file() else None


def kernel_isa(path: Path | None = None) -> str | None:
    """The instruction set the library picks on this CPU ("avx512", "avx2", "generic"; "wide16" only when
    TAPF_ISA forces it), or None.

    The library has no link-time dependency on ONNX Runtime, so ctypes can load it on its own."""
    import ctypes

    path = path or kernel_library_path()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
        fn = lib.TapfKernelIsa
        fn.restype = ctypes.c_char_p
        raw = fn()
        return raw.decode() if isinstance(raw, bytes) else None
    except (OSError, AttributeError):
        return None


def kernel_status() -> dict[str, Any]:
    """What the service reports (log line, /readyz details): is the fused kernel available, and if not, why."""
    path = kernel_library_path()
    if path is None:
        why = (f"{ENV_LIBRARY} disables it" if os.environ.get(ENV_LIBRARY, "").strip().lower()
               in ("0", "off", "none", "false") else f"{LIBRARY_NAME} not built (make -C export/kernels)")
        return {"fused_kernel": False, "path": None, "isa": None, "reason": why, "fallback": "onnx-function"}
    return {"fused_kernel": True, "path": str(path), "isa": kernel_isa(path), "reason": None, "fallback": None}


def build_kernel(*, quiet: bool = True) -> Path | None:
    """Build the library with `make -C export/kernels` (fetches the ORT headers on first build).
    Returns its path, or None when the build is impossible here (no compiler, no apt, offline);
    the reason is logged once."""
    import subprocess

    try:
        proc = subprocess.run(["make", "-C", str(KERNEL_DIR)], capture_output=quiet, text=True, timeout=900)
    except (OSError, subprocess.SubprocessError) as exc:
        _once("build", f"TAPF fused kernel build impossible ({exc}); using the ONNX function fallback")
        return None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] if quiet else []
        _once("build", f"TAPF fused kernel build failed ({' '.join(tail) or proc.returncode}); "
                       "using the ONNX function fallback")
        return None
    return kernel_library_path()


def register_kernel(session_options: Any, providers: list[str] | tuple[str, ...]) -> bool:
    """Register the library on ONNX Runtime `session_options` when it exists and the session is
    CPU-only; returns whether it was registered. Logs the fallback reason once per process."""
    if any("CUDA" in p or "Tensorrt" in p for p in providers):
        _once("cuda", "TAPF fused kernel not registered: CUDA session (the ONNX function runs on CUDA kernels)")
        return False
    path = kernel_library_path()
    if path is None:
        _once("missing", f"TAPF fused kernel unavailable ({kernel_status()['reason']}); "
                         "using the ONNX function fallback")
        return False
    try:
        session_options.register_custom_ops_library(str(path))
    except Exception as exc:
        _once("load", f"TAPF fused kernel {path} failed to load ({exc}); using the ONNX function fallback")
        return False
    return True


def _once(key: str, message: str) -> None:
    if key not in _reported:
        _reported.add(key)
        log.warning(message)
