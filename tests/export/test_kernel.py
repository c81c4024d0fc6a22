"""The fused `tapf.fused::TAPFGate` CPU kernel (export/kernels) against the torch op, per instruction set.

Skipped when the library is not built (`make -C export/kernels`); the bundles then run through
the model-local ONNX function, which test_export.py covers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from export.custom_kernel import kernel_isa, kernel_library_path, kernel_status
from export.tapf_onnx import gate_model

ROOT = Path(__file__).resolve().parents[2]

# Each ISA runs in a fresh interpreter (the library picks its ISA once per process). The cases and
# the torch op's outputs are computed here once; the child only needs numpy and ONNX Runtime.
_SCRIPT = r"""
import json, sys
import numpy as np, onnxruntime as ort
from export.custom_kernel import kernel_isa

library, cases_file = sys.argv[1], sys.argv[2]
data = np.load(cases_file)
out = {}
for name in json.loads(str(data["names"])):
    feed = {k: data[f"{name}/{k}"] for k in ("tokens", "polarity", "cand", "cand_user")}
    want = data[f"{name}/want"]
    pad = int(data[f"{name}/pad"])
    model = data[f"{name}/model"].tobytes()
    res = {}
    for path in ("kernel", "function"):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        if path == "kernel":
            opts.register_custom_ops_library(library)
        got = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"]).run(None, feed)[0]
        res[path] = float(np.abs(got - want).max()) if want.size else 0.0
        res[path + "_pad_exact"] = bool(np.array_equal(got[:, :pad], feed["tokens"][feed["cand_user"]][:, :pad]))
    out[name] = res
print(json.dumps({"isa": kernel_isa(), "cases": out}))
"""

# name -> (seed, U, L, N, d, leading padding tokens)
_CASES = {
    "U=1 N=1 d=16": (0, 1, 9, 1, 16, 0),
    "U=3 N=11 d=16 padded": (1, 3, 10, 11, 16, 4),
    "U=2 N=5 d=12 (remainder columns)": (2, 2, 7, 5, 12, 2),
    "U=1 N=64 d=64": (3, 1, 20, 64, 64, 5),
    "U=4 N=300 d=32 (threads)": (4, 4, 13, 300, 32, 3),
    "U=2 N=3 d=8 all padding": (5, 2, 6, 3, 8, 6),
    "U=2 N=4 d=5 (scalar)": (6, 2, 5, 4, 5, 1),
    "U=2 N=7 d=24 (one 16-lane vector + remainder)": (7, 2, 8, 7, 24, 2),
}


@pytest.fixture(scope="module")
def kernel_cases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random gate inputs, the `tapf::gate` torch op's outputs and the gate-only ONNX models, in one .npz."""
    import torch

    from model.modules.polarity_gate import tapf_gate

    arrays: dict[str, np.ndarray] = {"names": np.array(json.dumps(list(_CASES)))}
    for name, (seed, u, length, n, d, pad) in _CASES.items():
        rng = np.random.default_rng(seed)
        w = {k: (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32) for k in ("w_int", "w_tok", "w_mix")}
        w["pol_bias"] = (0.3 * rng.standard_normal((3, d))).astype(np.float32)
        tokens = rng.standard_normal((u, length, d)).astype(np.float32)
        pol = rng.choice([-1.0, 1.0], size=(u, length)).astype(np.float32)
        pol[:, :pad] = 0.0
        tokens[:, :pad] = 0.0
        cand = rng.standard_normal((n, d)).astype(np.float32)
        cu = rng.integers(0, u, size=n).astype(np.int64)
        with torch.no_grad():
            want = tapf_gate(*(torch.from_numpy(a) for a in (tokens, pol, cand, cu, w["w_int"], w["w_tok"],
                                                              w["w_mix"], w["pol_bias"]))).numpy()
        onnx_w = {k: (v.T.copy() if k != "pol_bias" else v) for k, v in w.items()}  # the node is input-major
        model = gate_model(onnx_w).SerializeToString()
        arrays.update({f"{name}/tokens": tokens, f"{name}/polarity": pol, f"{name}/cand": cand,
                       f"{name}/cand_user": cu, f"{name}/want": want, f"{name}/pad": np.array(pad),
                       f"{name}/model": np.frombuffer(model, dtype=np.uint8)})
    path = tmp_path_factory.mktemp("kernel") / "cases.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


@pytest.fixture(scope="module")
def library() -> Path:
    path = kernel_library_path()
    if path is None:
        pytest.skip(f"fused kernel not built ({kernel_status()['reason']})")
    return path


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def _available_isas() -> list[str]:
    flags = _cpu_flags()
    isas = ["generic"]
    if {"avx2", "fma"} <= flags:
        isas += ["avx2", "wide16"]  # wide16: the AVX-512 code path (16 lanes) built for AVX2
    if {"avx512f", "avx512dq", "avx512vl", "avx512bw"} <= flags:
        isas.append("avx512")
    return isas


def _run_with_isa(isa: str, script: str, library: Path, cases: Path) -> dict[str, Any]:
    """Run `script` (library path, cases file) in a fresh process with TAPF_ISA=isa (the library picks its ISA
    once per process); skip when this CPU lacks it. Returns the JSON the script prints last."""
    if isa not in _available_isas():
        pytest.skip(f"this CPU has no {isa}")
    env = {**os.environ, "TAPF_ISA": isa,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script, str(library), str(cases)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["isa"] == isa
    return result


@pytest.mark.parametrize("isa", ["generic", "avx2", "wide16", "avx512"])
def test_kernel_matches_the_torch_op(library: Path, kernel_cases: Path, isa: str) -> None:
    result = _run_with_isa(isa, _SCRIPT, library, kernel_cases)
    assert set(result["cases"]) == set(_CASES)
    for name, r in result["cases"].items():
        assert r["kernel"] < 1e-5, (name, r)
        assert r["function"] < 1e-5, (name, r)
        assert r["kernel_pad_exact"] and r["function_pad_exact"], name


def _gate_session(library: Path | None, d: int = 8) -> ort.InferenceSession:
    rng = np.random.default_rng(0)
    w = {k: rng.standard_normal((d, d)).astype(np.float32) for k in ("w_int", "w_tok", "w_mix")}
    w["pol_bias"] = rng.standard_normal((3, d)).astype(np.float32)
    opts = ort.SessionOptions()
    if library is not None:
        opts.register_custom_ops_library(str(library))
    return ort.InferenceSession(gate_model(w).SerializeToString(), sess_options=opts,
                                providers=["CPUExecutionProvider"])


def test_kernel_refuses_bad_inputs_with_a_clear_message(library: Path) -> None:
    session = _gate_session(library)
    feed = {"tokens": np.zeros((2, 3, 8), np.float32), "polarity": np.ones((2, 3), np.float32),
            "cand": np.zeros((4, 8), np.float32), "cand_user": np.array([0, 1, 2, 0], dtype=np.int64)}
    with pytest.raises(Exception, match=r"cand_user\[2\] = 2 is outside \[0, 2\)"):
        session.run(None, feed)
    feed["cand_user"] = np.zeros(4, dtype=np.int64)
    feed["polarity"] = np.full((2, 3), 0.5, np.float32)
    with pytest.raises(Exception, match="polarity must be -1, 0 or \\+1"):
        session.run(None, feed)


def test_kernel_handles_no_candidates(library: Path) -> None:
    feed = {"tokens": np.ones((1, 3, 8), np.float32), "polarity": np.ones((1, 3), np.float32),
            "cand": np.zeros((0, 8), np.float32), "cand_user": np.zeros(0, dtype=np.int64)}
    assert _gate_session(library).run(None, feed)[0].shape == (0, 3, 8)


def test_kernel_status_reports_the_isa(library: Path) -> None:
    status = kernel_status()
    assert status["fused_kernel"] is True and status["path"] == str(library)
    assert status["isa"] in ("avx512", "avx2", "generic") and kernel_isa() == status["isa"]


def _node_only_model(d: int = 8) -> bytes:
    """A TAPFGate node WITHOUT its function: a session can only be built when the library is registered."""
    rng = np.random.default_rng(1)
    w = {k: rng.standard_normal((d, d)).astype(np.float32) for k in ("w_int", "w_tok", "w_mix")}
    w["pol_bias"] = rng.standard_normal((3, d)).astype(np.float32)
    model = gate_model(w)
    del model.functions[:]
    return model.SerializeToString()


def test_kernel_registered_on_cpu_sessions_only(library: Path) -> None:
    """The CPU-only library must never be registered where CUDA runs the graph (the node would be pinned to
    the CPU); there the function is inlined into stock CUDA kernels."""
    from export.custom_kernel import register_kernel

    for providers in (["CUDAExecutionProvider", "CPUExecutionProvider"], ["TensorrtExecutionProvider"]):
        opts = ort.SessionOptions()
        assert register_kernel(opts, providers) is False
        with pytest.raises(Exception, match="TAPFGate"):  # no kernel and no function for the node
            ort.InferenceSession(_node_only_model(), sess_options=opts, providers=["CPUExecutionProvider"])
    opts = ort.SessionOptions()
    assert register_kernel(opts, ["CPUExecutionProvider"]) is True
    session = ort.InferenceSession(_node_only_model(), sess_options=opts, providers=["CPUExecutionProvider"])
    feed = {"tokens": np.ones((1, 3, 8), np.float32), "polarity": np.ones((1, 3), np.float32),
            "cand": np.ones((2, 8), np.float32), "cand_user": np.zeros(2, dtype=np.int64)}
    assert session.run(None, feed)[0].shape == (2, 3, 8)


def test_kernel_can_be_disabled_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from export.custom_kernel import ENV_LIBRARY, register_kernel

    monkeypatch.setenv(ENV_LIBRARY, "off")
    assert kernel_library_path() is None
    status = kernel_status()
    assert status["fused_kernel"] is False and status["fallback"] == "onnx-function" and ENV_LIBRARY in status["reason"]
    assert register_kernel(ort.SessionOptions(), ["CPUExecutionProvider"]) is False


def test_fallback_is_reported_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Without the library every session falls back to the function, and the log says so once per process."""
    import export.custom_kernel as ck

    monkeypatch.setattr(ck, "_reported", set())
    monkeypatch.setenv(ck.ENV_LIBRARY, "off")
    with caplog.at_level("WARNING", logger=ck.__name__):
        for _ in range(3):
            assert ck.register_kernel(ort.SessionOptions(), ["CPUExecutionProvider"]) is False
    messages = [r.getMessage() for r in caplog.records if r.name == ck.__name__]
    assert len(messages) == 1 and "ONNX function fallback" in messages[0]


# The gate fused with the attention that pools it (TAPFGateDotPool for OneTrans, TAPFGateMLPPool for DIN and
# the Transformer): whole exported models, kernel against the function fallback and the trained torch model.
_POOL_SCRIPT = r"""
import json, sys
import numpy as np, onnxruntime as ort
from export.custom_kernel import kernel_isa

library, cases_file = sys.argv[1], sys.argv[2]
data = np.load(cases_file)
sessions = {}
for model in json.loads(str(data["models"])):
    for path in ("kernel", "function"):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        if path == "kernel":
            opts.register_custom_ops_library(library)
        sessions[(model, path)] = ort.InferenceSession(data[f"{model}/model"].tobytes(), sess_options=opts,
                                                       providers=["CPUExecutionProvider"])
out = {}
for model, name in json.loads(str(data["cases"])):
    key = f"{model}/{name}"
    feed = {k[len(key) + 6:]: data[k] for k in data.files if k.startswith(f"{key}/feed/")}
    out[key] = {path: max(float(np.abs(g - data[f"{key}/want{i}"]).max())
                          for i, g in enumerate(sessions[(model, path)].run(None, feed)))
                for path in ("kernel", "function")}
print(json.dumps({"isa": kernel_isa(), "cases": out}))
"""

# One exported model per arch (exports are the slow part), each fed every input case. The widths cover a
# remainder after 8-lane vectors (12), exactly one 16-lane vector (16) and one plus a remainder (24).
_POOL_MODELS = {"onetrans d=12": ("onetrans", 12), "din d=24": ("din", 24), "transformer d=16": ("transformer", 16)}
# name -> (U, N, users with an empty history)
_POOL_INPUTS = {
    "U=1 N=1": (1, 1, 0),
    "U=3 N=40 one empty": (3, 40, 1),
    "U=4 N=300 (threads)": (4, 300, 0),
    "U=2 N=5 all empty": (2, 5, 2),
}


@pytest.fixture(scope="module")
def pool_cases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import onnx_ir as ir
    import torch

    from export.graph import export_onnx
    from export.reference import random_inputs, reference_outputs
    from export.serving.model import ServingModel
    from model.features.spec import FeatureSpec, SequenceSpec
    from model.models import build_model
    from model.models.config import ModelConfig

    cases = [(m, name) for m in _POOL_MODELS for name in _POOL_INPUTS]
    arrays: dict[str, np.ndarray] = {"models": np.array(json.dumps(list(_POOL_MODELS))),
                                     "cases": np.array(json.dumps(cases))}
    spec = FeatureSpec(sequence=SequenceSpec(seq_len=12), n_items=50, n_categories=6,
                       event_types=("<pad>", "click", "skip"), event_polarity=(0, 1, -1))
    for seed, (model_name, (arch, d)) in enumerate(_POOL_MODELS.items()):
        torch.manual_seed(seed)
        model = build_model(ModelConfig(arch=arch, seq_variant="mix-tapf", d_model=d, n_heads=2), spec).eval()
        served = ServingModel.from_trained(model, fuse_pooling=True)
        proto = ir.serde.serialize_model(export_onnx(served, spec, expected_gates=1))
        arrays[f"{model_name}/model"] = np.frombuffer(proto.SerializeToString(), dtype=np.uint8)
        for i, (name, (u, n, empty)) in enumerate(_POOL_INPUTS.items()):
            x = random_inputs(spec, n_users=u, n_candidates=n, seed=10 * seed + i, empty_users=empty)
            want = reference_outputs(model, x)
            key = f"{model_name}/{name}"
            arrays[f"{key}/want0"], arrays[f"{key}/want1"] = want["probability"], want["attention"]
            for k, value in x.as_dict().items():
                arrays[f"{key}/feed/{k}"] = value
    path = tmp_path_factory.mktemp("pool") / "cases.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


@pytest.mark.parametrize("isa", ["generic", "avx2", "wide16", "avx512"])
def test_fused_pooling_kernels_match_torch(library: Path, pool_cases: Path, isa: str) -> None:
    result = _run_with_isa(isa, _POOL_SCRIPT, library, pool_cases)
    assert set(result["cases"]) == {f"{m}/{name}" for m in _POOL_MODELS for name in _POOL_INPUTS}
    for name, r in result["cases"].items():
        assert r["kernel"] < 1e-5, (name, r)
        assert r["function"] < 1e-5, (name, r)


def test_fused_pooling_kernel_refuses_a_bad_mask_shape(library: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    from export.tapf_onnx import DOT_POOL_INPUTS, ONNX_OPSET, TAPF_DOMAIN, TAPF_DOT_POOL_OP

    d = 4
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((d, d)).astype(np.float32), k)
             for k in ("w_int", "w_tok", "w_mix")] + [numpy_helper.from_array(np.zeros((3, d), np.float32), "pol_bias")]
    types = {"cand_user": TensorProto.INT64, "mask": TensorProto.BOOL}
    graph = helper.make_graph(
        [helper.make_node(TAPF_DOT_POOL_OP, list(DOT_POOL_INPUTS), ["pooled", "weights"], domain=TAPF_DOMAIN)], "g",
        [helper.make_tensor_value_info(k, types.get(k, TensorProto.FLOAT), None)
         for k in DOT_POOL_INPUTS if k not in ("w_int", "w_tok", "w_mix", "pol_bias")],
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, None) for k in ("pooled", "weights")], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET),
                                                    helper.make_opsetid(TAPF_DOMAIN, 1)])
    model.ir_version = 10
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(str(library))
    sess = ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    feed = {"tokens": np.zeros((1, 5, d), np.float32), "polarity": np.zeros((1, 5), np.float32),
            "cand": np.zeros((2, d), np.float32), "cand_user": np.zeros(2, np.int64),
            "mask": np.ones((1, 4), bool), "query": np.zeros((2, 3, d), np.float32)}
    with pytest.raises(Exception, match=r"TAPFGateDotPool: mask has shape \(1, 4\), expected \(1, 5\)"):
        sess.run(None, feed)
