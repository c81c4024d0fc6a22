"""Serving benchmarks for the export path, as BENCHMARKS.md sections (`model.bench` format).

- `bench_gate`: the TAPF gate alone (B=512 candidates, L=100, d=64, 2 threads): a naive torch
  export of the paper form vs the folded graph in stock ops vs the bundle's function fallback vs
  the fused custom kernel, against the floor of the two (B*L, d) x (d, d) GEMMs it must do.
- `bench_serving`: the whole model per request (U=1, N=500, L=100, d=64): torch eager vs the same
  graph fed one copied sequence per candidate (what a naive per-candidate export computes) vs the
  bundle (one sequence, `cand_user`), function fallback and fused kernel.

Models are randomly initialised: speed does not depend on the weights.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.inliner
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from export.custom_kernel import kernel_isa, kernel_library_path
from export.onnx_export import ServingModel, export_onnx, random_inputs
from export.tapf_onnx import gate_model
from model.batch import INPUT_NAMES, InputArrays
from model.feature_spec import FeatureSpec, SequenceSpec
from model.models.config import ModelConfig, build_model
from model.modules.polarity_gate import TAPFGate

THREADS = 2


def _header(title: str) -> str:
    try:
        from model.bench import _header as bench_header

        return bench_header(title)
    except ImportError:
        return f"### {title}\n"


def _timeit(fn: Callable[[], Any], *, reps: int = 20, warmup: int = 3) -> float:
    """Median wall time in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _session(model: onnx.ModelProto | str | Path, *, kernel: bool = False) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if kernel:
        path = kernel_library_path()
        if path is None:
            raise RuntimeError("fused kernel not built")
        opts.register_custom_ops_library(str(path))
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])


class _PaperGate(nn.Module):
    """Eq. 3-5 literally (concat, sigmoid, 2g - 1), per candidate: what a naive export runs."""

    def __init__(self, gate: TAPFGate) -> None:
        super().__init__()
        self.gate = gate

    def forward(self, tokens: Tensor, polarity: Tensor, cand: Tensor, cand_user: Tensor) -> Tensor:
        g = self.gate
        h = tokens[cand_user]
        p = polarity[cand_user]
        e = torch.relu(F.linear(h * cand[:, None, :], g.w_int.weight))
        b = g.polarity((p + 1).long())
        gate = torch.sigmoid(g.w_g(torch.cat([h, e, b], dim=-1)))
        out: Tensor = h + p[..., None] * (2 * gate - 1) * e
        return out


def bench_gate(n_cand: int = 512, length: int = 100, d: int = 64) -> str:
    torch.manual_seed(0)
    gate = TAPFGate(d_model=d).eval()
    rng = np.random.default_rng(0)
    feed = {"tokens": rng.standard_normal((1, length, d)).astype(np.float32),
            "polarity": rng.choice([-1.0, 1.0], size=(1, length)).astype(np.float32),
            "cand": rng.standard_normal((n_cand, d)).astype(np.float32),
            "cand_user": np.zeros(n_cand, dtype=np.int64)}
    folded = {k: v.detach().numpy() for k, v in gate.folded().items()}
    weights = {k: (np.ascontiguousarray(v.T) if k != "pol_bias" else v).astype(np.float32) for k, v in folded.items()}
    fused = gate_model(weights, seq_len=length)
    rows: list[tuple[str, float]] = []

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        naive_path = Path(tmp) / "naive.onnx"
        args = tuple(torch.from_numpy(feed[k]) for k in ("tokens", "polarity", "cand", "cand_user"))
        torch.onnx.export(_PaperGate(gate), args, str(naive_path), dynamo=True, verbose=False,
                          input_names=["tokens", "polarity", "cand", "cand_user"])
        naive = _session(naive_path)
        rows.append(("naive torch export (paper form, eq. 3-5)", _timeit(lambda: naive.run(None, feed))))
    inlined = onnx.inliner.inline_local_functions(fused)
    plain = _session(inlined)
    rows.append(("folded graph (stock ops)", _timeit(lambda: plain.run(None, feed))))
    fallback = _session(fused)
    rows.append(("bundle: function fallback", _timeit(lambda: fallback.run(None, feed))))
    if kernel_library_path() is not None:
        kern = _session(fused, kernel=True)
        rows.append((f"bundle: fused kernel ({kernel_isa()})", _timeit(lambda: kern.run(None, feed))))

    from onnx import TensorProto, helper, numpy_helper

    gemm = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w_int"], ["z"]), helper.make_node("MatMul", ["z", "w_mix"], ["y"])],
        "two_gemms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", d])],
        [numpy_helper.from_array(weights["w_int"], "w_int"), numpy_helper.from_array(weights["w_mix"], "w_mix")]),
        opset_imports=[helper.make_opsetid("", 20)])
    gemm.ir_version = 10
    floor_sess = _session(gemm)
    x = rng.standard_normal((n_cand * length, d)).astype(np.float32)
    floor = _timeit(lambda: floor_sess.run(None, {"x": x}))

    lines = [_header("TAPF gate alone"), f"- B={n_cand} candidates, L={length}, d={d}, U=1, ONNX Runtime CPU, "
             f"{THREADS} threads; median of 20 runs\n",
             "| implementation | ms | × two-GEMM floor |", "|---|---|---|"]
    lines += [f"| {name} | {ms:.2f} | {ms / floor:.2f} |" for name, ms in rows]
    lines.append(f"| floor: two (B·L, d) × (d, d) MatMuls | {floor:.2f} | 1.00 |")
    lines.append("\nTarget: fused kernel within 1.3× of the two-GEMM floor.")
    return "\n".join(lines) + "\n"


def _random_model(arch: str, seq: str, length: int, d: int) -> tuple[nn.Module, FeatureSpec]:
    torch.manual_seed(0)
    spec = FeatureSpec(sequence=SequenceSpec(seq_len=length), n_items=20_002, n_categories=52,
                       event_types=("<pad>", "click", "negative", "positive", "skip"), event_polarity=(0, 1, -1, 1, -1))
    return build_model(ModelConfig(arch=arch, seq_variant=seq, d_model=d), spec).eval(), spec


def _per_candidate(x: InputArrays) -> InputArrays:
    """Every candidate with its own copy of its user's sequence (U = N, cand_user = arange)."""
    d = x.as_dict()
    cu = x.cand_user
    d.update({k: d[k][cu] for k in INPUT_NAMES if k.startswith("seq_") or k == "user_stats"})
    d["cand_user"] = np.arange(len(cu), dtype=np.int64)
    return InputArrays(**d)


def bench_serving(n_cand: int = 500, length: int = 100, d: int = 64) -> str:
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    lines = [_header("Whole model per request"),
             f"- U=1 request, N={n_cand} candidates, L={length}, d={d}; {THREADS} threads; median of 20 runs\n",
             "| arch | torch eager (ms) | per-candidate sequences, ONNX (ms) | bundle, function (ms) "
             "| bundle, fused kernel (ms) | × eager | × per-candidate |", "|---|---|---|---|---|---|---|"]
    try:
        for arch, seq in (("onetrans", "mix-tapf"), ("din", "mix-tapf"), ("transformer", "mix-tapf")):
            model, spec = _random_model(arch, seq, length, d)
            served = ServingModel.from_trained(model)
            onnx_model = export_onnx(served, spec, expected_gates=1)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "model.onnx"
                onnx.save_model(__import__("onnx_ir").serde.serialize_model(onnx_model), path)
                x = random_inputs(spec, n_users=1, n_candidates=n_cand, seed=0)
                tx = {k: torch.from_numpy(v) for k, v in x.as_dict().items()}
                with torch.no_grad():
                    eager = _timeit(lambda: served(**tx))  # noqa: B023
                fn = _session(path)
                per_cand_feed = _per_candidate(x).as_dict()
                naive = _timeit(lambda: fn.run(None, per_cand_feed), reps=10)  # noqa: B023
                bundle = _timeit(lambda: fn.run(None, x.as_dict()))  # noqa: B023
                kern = None
                if kernel_library_path() is not None:
                    ks = _session(path, kernel=True)
                    kern = _timeit(lambda: ks.run(None, x.as_dict()))  # noqa: B023
                best = min(bundle, kern) if kern is not None else bundle
                lines.append(f"| {arch}/{seq} | {eager:.2f} | {naive:.2f} | {bundle:.2f} | "
                             f"{'n/a' if kern is None else f'{kern:.2f}'} | {eager / best:.1f}× | {naive / best:.1f}× |")
    finally:
        torch.set_num_threads(threads)
    lines.append("\nTarget: the bundle ≥ 4× over torch eager and ≥ 2× over the per-candidate export.")
    return "\n".join(lines) + "\n"


BENCHES: dict[str, Callable[[], str]] = {"gate": bench_gate, "serving": bench_serving}
