"""`python -m loadtest.harness.bench_server`: the real service with a chosen inference backend, for benchmarks.

Backends (the same model each time):
- `onnx`: the bundle in ONNX Runtime, the service's default (set POLARITY_TAPF_KERNEL=off in the
  environment to run the TAPF function fallback instead of the fused kernel);
- `per-candidate`: the run's model exported as is (paper-form gate, no folding, no serving rewrite:
  `loadtest.bench.inference.naive_export`) and fed one copied sequence per candidate (U = N, cand_user =
  arange) — what a naive per-candidate export computes (`loadtest.bench.inference._per_candidate`);
- `torch`: the run's checkpoint in torch eager (`loadtest.harness.torch_backend`).

A separate process, so the load generator's CPU and GIL never share the server's; served over the HTTP protocol
`polarity serve` uses (`service.http_protocol.guarded_protocol`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from export.bundle import Manifest
from model.features.inputs import INPUT_NAMES


class PerCandidateBackend:
    """A naive export of the run's model, every candidate with its own copy of its user's sequence."""

    def __init__(self, manifest: Manifest, settings: Any, *, run_dir: Path) -> None:
        import tempfile

        import onnxruntime as ort

        from export.reference import load_run
        from loadtest.bench.inference import naive_export

        path = naive_export(load_run(run_dir).model, manifest.feature_spec, Path(tempfile.mkdtemp()) / "naive.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = settings.inference_threads
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        self.provider = "CPUExecutionProvider"
        self.kernel = "naive-per-candidate"

    def run(self, inputs: dict[str, np.ndarray], *, attention: bool = True) -> dict[str, np.ndarray]:
        cu = inputs["cand_user"]
        feed = {k: (inputs[k][cu] if k.startswith("seq_") or k == "user_stats" else inputs[k]) for k in INPUT_NAMES}
        feed["cand_user"] = np.arange(len(cu), dtype=np.int64)
        (probs,) = self.session.run(None, feed)
        return {"probs": np.asarray(probs, dtype=np.float32).reshape(-1)}


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    from service.app import create_app
    from service.http_protocol import guarded_protocol
    from service.settings import Settings
    from service.startup import connection_limits

    p = argparse.ArgumentParser(prog="python -m loadtest.harness.bench_server")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--key-prefix", default="bench")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--threads", type=int, default=2, help="inference intra-op threads")
    p.add_argument("--workers", type=int, default=1,
                   help="concurrent inferences (1: each one gets every intra-op thread; more oversubscribes 2 cores)")
    p.add_argument("--shards", type=int, default=1,
                   help="candidate shards per request, each on --threads threads (1: off; 0: the service default)")
    p.add_argument("--spinning", action="store_true", help="ONNX Runtime threads busy-wait (inference_spinning)")
    p.add_argument("--backend", choices=("onnx", "per-candidate", "torch"), default="onnx")
    p.add_argument("--run-dir", type=Path, default=None, help="checkpoint for --backend torch and per-candidate")
    p.add_argument("--set", action="append", default=[], metavar="NAME=JSON",
                   help="any other Settings field, its value as JSON (e.g. inference_inline_max_candidates=0)")
    args = p.parse_args(argv)
    extra = {}
    for item in args.set:
        name, _, value = item.partition("=")
        extra[name] = json.loads(value)

    factory: Any = None
    if args.backend == "per-candidate":
        if args.run_dir is None:
            p.error("--backend per-candidate needs --run-dir")
        run_dir = args.run_dir

        def factory(manifest: Manifest, settings: Any) -> PerCandidateBackend:
            return PerCandidateBackend(manifest, settings, run_dir=run_dir)
    elif args.backend == "torch":
        if args.run_dir is None:
            p.error("--backend torch needs --run-dir")
        from loadtest.harness.torch_backend import torch_backend_factory

        factory = torch_backend_factory(args.run_dir, threads=args.threads)
    # Benchmarks measure scoring with history: give Redis a generous budget instead of degrading.
    settings = Settings(bundle=args.bundle, redis_url=args.redis_url, key_prefix=args.key_prefix, port=args.port,
                        inference_threads=args.threads, inference_workers=args.workers, inference_shards=args.shards,
                        inference_spinning=args.spinning, score_redis_budget_ms=2000,
                        redis_timeout_ms=2000, log_level="warning", **extra)
    # The HTTP protocol `polarity serve` runs (service/http_protocol.py): the connection guard, one write per answer.
    uvicorn.run(create_app(settings, backend_factory=factory), host="127.0.0.1", port=args.port,
                log_level="warning", access_log=False, lifespan="on",
                http=guarded_protocol(connection_limits(settings)), timeout_keep_alive=settings.keep_alive_timeout_s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
