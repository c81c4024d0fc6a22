"""Inference backends: what the service calls (off the event loop) to score assembled inputs. Torch-free.

`InferenceBackend` is the small protocol the app depends on; `OnnxBackend` (the default) runs a
bundle's `model.onnx` in ONNX Runtime: CUDA when `device` is `cuda` or `auto` and a CUDA provider
exists, else CPU, where the fused TAPF kernel library is registered when built.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Protocol, runtime_checkable

import numpy as np

from export.bundle import ATTENTION_NAME, OUTPUT_NAME, Manifest
from export.custom_kernel import kernel_status, register_kernel
from model.batch import INPUT_NAMES
from service.errors import StartupError
from service.settings import Settings

log = logging.getLogger("polarity.service")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
KERNEL_FUSED = "tapf-fused"
KERNEL_FUNCTION = "onnx-function"


@runtime_checkable
class InferenceBackend(Protocol):
    """Scores model inputs: `{name: array}` keyed by `model.batch.INPUT_NAMES` ->
    `{"probs": (N,) float32, optionally "attention": (N, L) float32}`. Called from worker threads."""

    provider: str  # e.g. CPUExecutionProvider
    kernel: str  # e.g. tapf-fused | onnx-function | torch

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def choose_providers(device: str) -> list[str]:
    """ONNX Runtime providers for a requested device; StartupError when `cuda` cannot be had."""
    available = available_providers()
    if device == "cpu":
        return [CPU]
    if CUDA in available:
        return [CUDA, CPU]
    if device == "cuda":
        raise StartupError(
            f"device=cuda was requested but this ONNX Runtime has no {CUDA} (available: {', '.join(available)}); "
            "install onnxruntime-gpu on a machine with a CUDA GPU, or start with --device auto (falls back to CPU) "
            "or --device cpu"
        )
    return [CPU]


class OnnxBackend:
    """A bundle's graph in one ONNX Runtime session (thread-safe `run`)."""

    def __init__(self, manifest: Manifest, *, device: str, intra_op_threads: int = 0, spinning: bool = False) -> None:
        import onnxruntime as ort

        providers = choose_providers(device)
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads or (os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        # Spinning pool threads busy-wait for the next parallel section and keep spinning after a run:
        # on a few shared cores that CPU is taken from the event loop, Redis and the next request.
        # Blocking workers cost a wake-up (microseconds) per section instead.
        flag = "1" if spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", flag)
        options.add_session_config_entry("session.inter_op.allow_spinning", flag)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.kernel_registered = register_kernel(options, providers)
        self.kernel = KERNEL_FUSED if self.kernel_registered else KERNEL_FUNCTION
        self.kernel_path = kernel_status()["path"] if self.kernel_registered else None
        try:
            self.session = ort.InferenceSession(str(manifest.model_path), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise StartupError(f"{manifest.model_path}: ONNX Runtime cannot open the model: {exc}") from exc
        used = self.session.get_providers()
        self.provider = used[0] if used else CPU
        if device == "cuda" and self.provider != CUDA:
            raise StartupError(f"device=cuda was requested but ONNX Runtime runs the model on {self.provider} "
                               "(the CUDA provider failed to initialise; see the ONNX Runtime log)")
        self.requested = device
        graph_inputs = [i.name for i in self.session.get_inputs()]
        if tuple(graph_inputs) != INPUT_NAMES:
            raise StartupError(f"{manifest.model_path}: graph inputs {graph_inputs} != {list(INPUT_NAMES)}")
        self.output_names = [o.name for o in self.session.get_outputs()]
        if OUTPUT_NAME not in self.output_names:
            raise StartupError(f"{manifest.model_path}: graph has no {OUTPUT_NAME!r} output ({self.output_names})")
        log.info("ONNX Runtime session: provider=%s (requested %s), kernel=%s, threads=%d, spinning=%s",
                 self.provider, device, self.kernel, options.intra_op_num_threads, spinning)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(self.output_names, inputs)
        out: dict[str, Any] = dict(zip(self.output_names, values, strict=True))
        result = {"probs": np.asarray(out[OUTPUT_NAME], dtype=np.float32).reshape(-1)}
        if ATTENTION_NAME in out:
            result["attention"] = np.asarray(out[ATTENTION_NAME], dtype=np.float32)
        return result


def onnx_backend_factory(manifest: Manifest, settings: Settings) -> InferenceBackend:
    """The default `backend_factory` of `create_app`."""
    return OnnxBackend(manifest, device=settings.device, intra_op_threads=intra_op_threads(settings),
                       spinning=settings.inference_spinning)


def intra_op_threads(settings: Settings) -> int:
    """settings.inference_threads, else the cores shared out over the inference workers (no oversubscription)."""
    if settings.inference_threads:
        return settings.inference_threads
    cores = os.cpu_count() or 1
    return max(1, cores // (settings.inference_workers or cores))
