"""A torch-eager `InferenceBackend` for the service: the same model served without ONNX Runtime.

Benchmarks only (the service itself never imports torch): passed to
`service.app.create_app(settings, backend_factory=torch_backend_factory(run_dir))`, it scores the
run's checkpoint — the model the bundle was exported from — in the same FastAPI app, so the
comparison with the ONNX bundle differs in the inference engine alone. The model is wrapped as the
exporter wraps it (`export.serving.model.ServingModel`: sigmoid, folded TAPF weights), so both paths
compute the same function.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.bundle import Manifest
from model.features.inputs import INPUT_NAMES


class TorchBackend:
    """`ServingModel` of a trained run, eager, under `torch.inference_mode` (thread-safe `run`)."""

    provider = "torch-eager-cpu"
    kernel = "torch"

    def __init__(self, model: torch.nn.Module, *, threads: int = 0, attention: bool = False, shards: int = 1,
                 shard_min_candidates: int = 128, concurrent_calls: int = 1) -> None:
        """`shards` > 1: a call's candidates as independent calls at once, as the ONNX backend does
        (`service.inference.CandidateShards`), each on `threads` torch threads (process-wide)."""
        from export.serving.model import ServingModel
        from service.inference import CandidateShards

        if threads:
            torch.set_num_threads(threads)
        # Same outputs as the bundle: with an attention output there, torch computes it too.
        self.served = ServingModel.from_trained(model, attention=attention).eval()
        self.sharder = CandidateShards(shards=shards, min_candidates=shard_min_candidates,
                                       concurrent_calls=concurrent_calls)

    def run(self, inputs: dict[str, np.ndarray], *, attention: bool = True) -> dict[str, np.ndarray]:
        """The attention weights, when the model computes them, whether asked or not (torch has one graph)."""
        return self.sharder.run(self._run_whole, inputs)

    def _run_whole(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = {k: torch.from_numpy(np.ascontiguousarray(inputs[k])) for k in INPUT_NAMES}
        with torch.inference_mode():
            out = self.served(**tensors)
        outputs = out if isinstance(out, tuple) else (out,)
        result = {"probs": outputs[0].numpy().astype(np.float32, copy=False).reshape(-1)}
        if len(outputs) > 1:
            result["attention"] = outputs[1].numpy().astype(np.float32, copy=False)
        return result


def torch_backend_factory(run_dir: Path | str, *, threads: int = 0) -> Callable[[Manifest, Any], TorchBackend]:
    """A `backend_factory` for `create_app` that serves `run_dir`'s checkpoint with torch.

    The bundle's manifest must describe the same model shape (seq_len, d_model, arch), so a wrong
    run directory fails at startup rather than scoring garbage.
    """
    from export.reference import load_run

    def factory(manifest: Manifest, settings: Any) -> TorchBackend:
        run = load_run(run_dir)
        mine = (run.model_config.arch, run.spec.sequence.seq_len, run.model_config.d_model)
        theirs = (manifest.data["model"]["arch"], manifest.data["model"]["seq_len"], manifest.data["model"]["d_model"])
        if mine != theirs:
            raise ValueError(f"run {run_dir} is (arch, L, d)={mine} but the bundle is {theirs}")
        from service.inference import inference_shards, inference_workers, intra_op_threads

        n_threads = threads or intra_op_threads(settings)
        return TorchBackend(run.model, threads=n_threads, attention=manifest.has_attention,
                            shards=inference_shards(settings, n_threads),
                            shard_min_candidates=settings.inference_shard_min_candidates,
                            concurrent_calls=inference_workers(settings))

    return factory
