"""`polarity export`: one TAPFGate node + its function, folded weights, the attention output, parity with
torch (both outputs, both paths), the manifest and its checks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.bundle import (
    ATTENTION_NAME,
    MANIFEST_FILE,
    MODEL_FILE,
    OPTIMIZED_MODEL_FILE,
    PROBABILITY_MODEL_FILE,
    BundleError,
    BundleExpectation,
    load_manifest,
    verify_bundle,
)
from export.custom_kernel import kernel_library_path, kernel_status
from export.graph import unfolded_parameter_ops
from export.parity import ParityError, assert_parity, check_parity
from export.pipeline import export_bundle
from export.reference import ExportError, load_run, random_inputs, reference_outputs
from export.tapf_onnx import TAPF_DOMAIN, TAPF_DOT_POOL_OP, TAPF_MLP_POOL_OP, TAPF_OP
from model.features.inputs import INPUT_NAMES, InputArrays
from model.features.spec import FeatureSpec, SequenceSpec
from model.models.config import DINOptions
from model.training.batches import to_tensors

ROOT = Path(__file__).resolve().parents[2]
# Bundle name -> (arch, seq variant): every arch with the TAPF gate, and some without a gate.
VARIANTS = {"onetrans": ("onetrans", "mix-tapf"), "onetrans-pools": ("onetrans", "mix-tapf"),
            "din": ("din", "mix-tapf"),
            "transformer": ("transformer", "mix-tapf"), "transformer-pbe": ("transformer", "mix-pbe"),
            "hyformer": ("hyformer", "mix-tapf"), "hyformer-pbe": ("hyformer", "mix-pbe"),
            "mixformer": ("mixformer", "mix-tapf"), "mixformer-pbe": ("mixformer", "mix-pbe"),
            "sine": ("sine", "mix-pbe"), "din-pbe": ("din", "mix-pbe"), "din-one-pool": ("din", "mix-tapf")}
GATED = [name for name, (_, seq) in VARIANTS.items() if seq.endswith("tapf")]
# Bundle name -> its --model-overrides beyond the defaults. DIN and OneTrans pool clicks and skips separately by
# default (`polarity_pools`): "din-one-pool" and "onetrans" pool them as one, "onetrans-pools" separately.
OVERRIDES: dict[str, dict[str, object]] = {"din-one-pool": {"polarity_pools": False},
                                           "onetrans": {"polarity_pools": False},
                                           "onetrans-pools": {"polarity_pools": True}}
SEQ_LEN, D_MODEL = 10, 16


@dataclass(frozen=True)
class Exported:
    arch: str
    run_dir: Path
    bundle: Path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Exported]]:
    """Tiny trained runs (the three archs with TAPF, a transformer without) and their bundles."""
    from model.data.events import write_event_log
    from model.data.synthetic import SyntheticWorldConfig, generate
    from model.training.config import TrainConfig
    from model.training.loop import train

    root = tmp_path_factory.mktemp("export")
    log = write_event_log(generate(SyntheticWorldConfig(users=50, items=200, events=3000)), root / "events.parquet")
    threads = torch.get_num_threads()
    out: dict[str, Exported] = {}
    try:
        for name, (arch, seq) in VARIANTS.items():
            run_dir = root / f"run_{name}"
            train(TrainConfig(data=str(log), arch=arch, seq=seq, seq_len=SEQ_LEN, d_model=D_MODEL, batch_size=256,
                              max_train_samples=1500, threads=1, model_overrides=OVERRIDES.get(name, {})),
                  out=run_dir, progress=False)
            bundle = export_bundle(run_dir, root / f"bundle_{name}", optimize=True)
            out[name] = Exported(arch, run_dir, bundle)
    finally:
        torch.set_num_threads(threads)
    yield out


def _graph(bundle: Path, name: str = MODEL_FILE) -> onnx.ModelProto:
    return onnx.load(str(bundle / name))


def _torch_probs(run_dir: Path, inputs: InputArrays) -> np.ndarray:
    run = load_run(run_dir)
    with torch.no_grad():
        return torch.sigmoid(run.model(**to_tensors(inputs))).numpy()


def _ort_outputs(model_path: Path, inputs: InputArrays) -> dict[str, np.ndarray]:
    """Stock ONNX Runtime (CPU, no custom-op library): the file runs unchanged."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(model_path), sess_options=opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs.as_dict()), strict=True))


def _ort_probs(model_path: Path, inputs: InputArrays) -> np.ndarray:
    return _ort_outputs(model_path, inputs)["probability"]


# ---------------------------------------------------------------------------- graph structure


@pytest.mark.parametrize("arch", VARIANTS)
def test_one_tapf_node_per_gate_and_the_function_is_in_the_model(exported: dict[str, Exported], arch: str) -> None:
    model = _graph(exported[arch].bundle)
    onnx.checker.check_model(model)
    gates = [n for n in model.graph.node if (n.domain, n.op_type) == (TAPF_DOMAIN, TAPF_OP)]
    expected = 1 if arch in GATED else 0
    assert len(gates) == expected
    # Nothing else of the gate's maths is left in the main graph: no other custom-domain node.
    assert [n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx")] == [TAPF_OP] * expected
    functions = {(f.domain, f.name): f for f in model.functions}
    if expected:
        assert set(functions) == {(TAPF_DOMAIN, TAPF_OP)}
        body = functions[(TAPF_DOMAIN, TAPF_OP)]
        assert {"Tanh", "Relu", "MatMul", "Gather"} <= {n.op_type for n in body.node}
        assert {o.domain: o.version for o in model.opset_import}[TAPF_DOMAIN] == 1
        inits = {i.name: i for i in model.graph.initializer}
        for idx, shape in zip((4, 5, 6, 7), ((D_MODEL, D_MODEL),) * 3 + ((3, D_MODEL),), strict=True):
            assert gates[0].input[idx] in inits, f"TAPFGate input {idx} is not a folded initializer"
            assert tuple(inits[gates[0].input[idx]].dims) == shape
    else:
        assert (TAPF_DOMAIN, TAPF_OP) not in functions


@pytest.mark.parametrize("arch", VARIANTS)
def test_weights_are_folded(exported: dict[str, Exported], arch: str) -> None:
    model = _graph(exported[arch].bundle)
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    raw_param_ops = [n.op_type for n in model.graph.node
                     if n.op_type in ("Slice", "Transpose") and n.input and n.input[0] in constants]
    assert raw_param_ops == []
    assert unfolded_parameter_ops(model) == []


def test_folded_gate_weights_match_the_checkpoint(exported: dict[str, Exported]) -> None:
    """The node's constants are the trained gate folded (and stored input-major, x @ W)."""
    ex = exported["din"]
    run = load_run(ex.run_dir)
    folded = {k: v.detach().numpy() for k, v in run.model.gate.folded().items()}
    model = _graph(ex.bundle)
    gate = next(n for n in model.graph.node if n.op_type == TAPF_OP)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    np.testing.assert_allclose(inits[gate.input[4]], folded["w_int"].T, atol=1e-7)
    np.testing.assert_allclose(inits[gate.input[5]], folded["w_tok"].T, atol=1e-7)
    np.testing.assert_allclose(inits[gate.input[6]], folded["w_mix"].T, atol=1e-7)
    np.testing.assert_allclose(inits[gate.input[7]], folded["pol_bias"], atol=1e-7)


@pytest.mark.parametrize("arch", VARIANTS)
def test_dynamic_users_and_candidates_fixed_length(exported: dict[str, Exported], arch: str) -> None:
    model = _graph(exported[arch].bundle)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*model.graph.input, *model.graph.output]}
    assert [v.name for v in model.graph.input] == list(INPUT_NAMES)
    assert [v.name for v in model.graph.output] == ["probability", ATTENTION_NAME]
    assert dims[ATTENTION_NAME] == ["N", SEQ_LEN]
    for name in ("seq_item", "seq_category", "seq_polarity", "seq_event", "seq_mask"):
        assert dims[name] == ["U", SEQ_LEN]
    assert dims["user_stats"] == ["U", 4]
    for name in ("cand_item", "cand_category", "cand_user", "probability"):
        assert dims[name] == ["N"]
    spec = load_run(exported[arch].run_dir).spec
    for u, n in ((1, 1), (2, 3), (6, 40), (3, 2)):
        inputs = random_inputs(spec, n_users=u, n_candidates=n, seed=u * 100 + n)
        outs = _ort_outputs(exported[arch].bundle / MODEL_FILE, inputs)
        assert outs["probability"].shape == (n,) and outs[ATTENTION_NAME].shape == (n, SEQ_LEN)


def test_folded_target_attention_computes_what_the_trained_one_does() -> None:
    """The serving rewrite of DIN's activation unit (one per-candidate matrix) against the module it replaces,
    for per-candidate tokens and for per-user tokens read through cand_user."""
    from export.serving.folded import FoldedTargetAttention
    from model.modules.attention import TargetAttention

    torch.manual_seed(3)
    att = TargetAttention(d_model=D_MODEL, hidden=8).eval()
    folded = FoldedTargetAttention(att)
    tokens_u, mask_u = torch.randn(3, SEQ_LEN, D_MODEL), torch.rand(3, SEQ_LEN) > 0.3
    mask_u[1] = False  # an empty history
    cand, cand_user = torch.randn(7, D_MODEL), torch.tensor([2, 0, 1, 1, 2, 0, 0])
    with torch.no_grad():
        for args in ((tokens_u[cand_user], cand, mask_u[cand_user]), (tokens_u, cand, mask_u, cand_user)):
            (want_pooled, want_w), (got_pooled, got_w) = att(*args), folded(*args)
            torch.testing.assert_close(got_pooled, want_pooled, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(got_w, want_w, atol=1e-6, rtol=1e-5)
            assert float(got_w[cand_user == 1].abs().sum()) == 0.0


# ---------------------------------------------------------------------------- parity


def _arbitrary(spec: FeatureSpec, u: int, n: int, seed: int) -> InputArrays:
    x = random_inputs(spec, n_users=u, n_candidates=n, seed=seed)
    cand_user = np.random.default_rng(seed).integers(0, u, size=n)  # unordered, repeats, maybe unused users
    return replace(x, cand_user=cand_user.astype(np.int64))


@pytest.mark.parametrize("arch", VARIANTS)
@pytest.mark.parametrize(("u", "n"), [(1, 7), (3, 11)])
def test_parity_with_torch(exported: dict[str, Exported], arch: str, u: int, n: int) -> None:
    ex = exported[arch]
    spec = load_run(ex.run_dir).spec
    inputs = _arbitrary(spec, u, n, seed=7 * u + n)
    want = _torch_probs(ex.run_dir, inputs)
    for name in (MODEL_FILE, OPTIMIZED_MODEL_FILE):
        got = _ort_outputs(ex.bundle / name, inputs)
        assert float(np.max(np.abs(got["probability"] - want))) < 1e-5, name
        with torch.no_grad():
            want_att = load_run(ex.run_dir).model.eval().attention(**to_tensors(inputs)).numpy()
        assert float(np.max(np.abs(got[ATTENTION_NAME] - want_att))) < 1e-5, name


@pytest.mark.parametrize("arch", VARIANTS)
def test_check_parity_covers_real_sequences_and_edge_cases(exported: dict[str, Exported], arch: str) -> None:
    ex = exported[arch]
    report = check_parity(ex.run_dir, ex.bundle, n_requests=3, max_candidates=300, kernel=False)
    assert report.passed, report.summary()
    assert report.max_abs_diff < 1e-5
    assert report.attention_max_abs_diff is not None and report.attention_max_abs_diff < 1e-5
    # The probability-only graph has no attention to compare; every other file does.
    assert all((c.attention_max_abs_diff is None) == (c.model_file == PROBABILITY_MODEL_FILE) for c in report.cases)
    assert report.data != "unavailable"  # the run's own log was used
    names = " ".join(c.name for c in report.cases)
    for needle in ("data request", "data micro-batch", "N=1", "empty history", "all padding", "OOV", "N=300",
                   "N=2000"):
        assert needle in names
    assert {c.model_file for c in report.cases} == {MODEL_FILE, PROBABILITY_MODEL_FILE, OPTIMIZED_MODEL_FILE}
    assert {c.n_users for c in report.cases if "micro-batch" in c.name} == {3}


@pytest.mark.parametrize("arch", GATED)
def test_parity_through_the_fused_kernel(exported: dict[str, Exported], arch: str) -> None:
    """Both paths of the same file: the custom-op library loaded, and the function fallback."""
    if kernel_library_path() is None:
        pytest.skip(f"fused kernel not built ({kernel_status()['reason']})")
    ex = exported[arch]
    report = check_parity(ex.run_dir, ex.bundle, n_requests=2, max_candidates=200, kernel=True)
    assert report.passed, report.summary()
    assert report.attention_max_abs_diff is not None and report.attention_max_abs_diff < 1e-5
    assert {c.path for c in report.cases} == {"function", "kernel"}
    assert {c.model_file for c in report.cases if c.path == "kernel"} == {MODEL_FILE, PROBABILITY_MODEL_FILE}


@pytest.mark.parametrize("arch", GATED)
def test_fuse_pooling_export_is_one_pooling_node_with_parity(exported: dict[str, Exported], arch: str,
                                                             tmp_path: Path) -> None:
    """`--fuse-pooling`: the gate and the attention that pools it are one node whose function holds exactly one
    TAPFGate node (then the attention in stock ops); the bundle still matches torch through the function fallback
    and, when built, the fused kernel."""
    ex = exported[arch]
    bundle = export_bundle(ex.run_dir, tmp_path / "fused", fuse_pooling=True)
    model = _graph(bundle)
    onnx.checker.check_model(model)
    # The query-token archs end in OneTrans's dot-product read-out; DIN and the Transformer in target attention.
    pooling = TAPF_DOT_POOL_OP if arch.startswith(("onetrans", "hyformer", "mixformer")) else TAPF_MLP_POOL_OP
    # DIN with `polarity_pools` calls the fused node once per polarity; OneTrans pools both through one node.
    n_pools = 2 if arch.startswith("din") and getattr(load_run(ex.run_dir).model, "polarity_pools", False) else 1
    assert [n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx")] == [pooling] * n_pools
    functions = {(f.domain, f.name): f for f in model.functions}
    assert set(functions) == {(TAPF_DOMAIN, TAPF_OP), (TAPF_DOMAIN, pooling)}
    pool_body = functions[(TAPF_DOMAIN, pooling)]
    assert [n.op_type for n in pool_body.node if n.domain == TAPF_DOMAIN] == [TAPF_OP]
    assert {"Softmax", "MatMul", "Where"} <= {n.op_type for n in pool_body.node}
    node = next(n for n in model.graph.node if n.op_type == pooling)
    assert node.input[4] in {i.name for i in model.graph.initializer}  # folded W_int, as for TAPFGate
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    assert manifest["onnx"]["custom_ops"] == [f"{TAPF_DOMAIN}::{pooling}"]
    report = check_parity(ex.run_dir, bundle, n_requests=2, max_candidates=200,
                          kernel=kernel_library_path() is not None)
    assert report.passed, report.summary()
    assert report.attention_max_abs_diff is not None and report.attention_max_abs_diff < 1e-5
    if kernel_library_path() is not None:
        assert {c.path for c in report.cases} == {"function", "kernel"}


def test_parity_refuses_a_drifted_attention_output(exported: dict[str, Exported], tmp_path: Path) -> None:
    """A graph whose probabilities match but whose attention does not fails the check."""
    ex = exported["din"]
    bundle = Path(shutil.copytree(ex.bundle, tmp_path / "bundle"))
    (bundle / OPTIMIZED_MODEL_FILE).unlink()
    model = onnx.load(str(bundle / MODEL_FILE))
    out = next(o for o in model.graph.output if o.name == ATTENTION_NAME)
    for node in model.graph.node:  # the graph computes "attention_raw"; a Mul by 1.01 writes the output
        node.output[:] = ["attention_raw" if o == ATTENTION_NAME else o for o in node.output]
        node.input[:] = ["attention_raw" if i == ATTENTION_NAME else i for i in node.input]
    scale = onnx.numpy_helper.from_array(np.array(1.01, dtype=np.float32), "drift")
    model.graph.initializer.append(scale)
    model.graph.node.append(onnx.helper.make_node("Mul", ["attention_raw", "drift"], [out.name]))
    onnx.save(model, str(bundle / MODEL_FILE))
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    manifest["onnx"]["optimized_file"] = None
    del manifest["files"][OPTIMIZED_MODEL_FILE]
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest))
    report = check_parity(ex.run_dir, bundle, use_data=False, max_candidates=20, kernel=False, verify=False)
    assert not report.passed
    assert report.max_abs_diff < 1e-5  # the probabilities still agree ...
    assert report.attention_max_abs_diff is not None and report.attention_max_abs_diff > 1e-4  # ... attention not
    assert "FAILED" in report.summary() and "attention" in report.summary()
    with pytest.raises(ParityError, match="parity FAILED"):
        assert_parity(report)


@pytest.mark.parametrize("arch", VARIANTS)
def test_attention_output_weighs_the_real_history_tokens(exported: dict[str, Exported], arch: str) -> None:
    """Rows sum to 1 over the user's real tokens, 0 on padding and for an empty history, so the service can
    report each candidate's attention share on positive vs negative tokens."""
    ex = exported[arch]
    spec = load_run(ex.run_dir).spec
    inputs = random_inputs(spec, n_users=4, n_candidates=30, seed=11, empty_users=1)
    att = _ort_outputs(ex.bundle / MODEL_FILE, inputs)[ATTENTION_NAME].astype(np.float64)  # (N, L)
    mask = inputs.seq_mask[inputs.cand_user]  # (N, L)
    polarity = inputs.seq_polarity[inputs.cand_user]
    has_history = mask.any(1)
    assert (~has_history).any() and has_history.any()
    assert np.all(att >= 0) and np.all(att[~mask] == 0)
    np.testing.assert_allclose(att.sum(1), has_history.astype(np.float64), atol=1e-5)
    share_pos, share_neg = (att * (polarity > 0)).sum(1), (att * (polarity < 0)).sum(1)
    np.testing.assert_allclose((share_pos + share_neg)[has_history], 1.0, atol=1e-5)
    want = reference_outputs(load_run(ex.run_dir).model, inputs)[ATTENTION_NAME]
    assert float(np.abs(att - want).max()) < 1e-5


def test_bundle_without_attention_output(exported: dict[str, Exported], tmp_path: Path) -> None:
    """`attention=False` exports the probabilities only; they are the same, and every caller that reads
    only probabilities accepts both kinds of bundle."""
    ex = exported["din"]
    bundle = export_bundle(ex.run_dir, tmp_path / "probs_only", attention=False)
    manifest = load_manifest(bundle, expect=BundleExpectation())
    assert manifest.output_names == ("probability",) and not manifest.has_attention
    assert manifest.data["model"]["attention"] is None and manifest.probability_model_path is None
    spec = load_run(ex.run_dir).spec
    inputs = random_inputs(spec, n_users=3, n_candidates=25, seed=5)
    with_att = _ort_outputs(ex.bundle / MODEL_FILE, inputs)
    without = _ort_outputs(bundle / MODEL_FILE, inputs)
    assert list(without) == ["probability"]
    assert float(np.abs(with_att["probability"] - without["probability"]).max()) < 1e-6
    load_manifest(ex.bundle, expect=BundleExpectation())  # extra output: fine
    load_manifest(ex.bundle, expect=BundleExpectation(output_names=("probability", ATTENTION_NAME)))
    with pytest.raises(BundleError, match=r"caller reads \[.*\] \(missing \['attention'\]\)"):
        load_manifest(bundle, expect=BundleExpectation(output_names=("probability", ATTENTION_NAME)))


@pytest.mark.parametrize("arch", VARIANTS)
def test_the_probability_only_graph_is_the_full_graph_less_the_attention(exported: dict[str, Exported],
                                                                        arch: str) -> None:
    """A bundle with `attention` also holds `model.probability.onnx`: the same nodes computing the probability, every
    node only the attention needed dropped, listed (and hashed) in the manifest; a bundle without attention has none."""
    ex = exported[arch]
    manifest = load_manifest(ex.bundle)
    assert manifest.data["onnx"]["probability_file"] == PROBABILITY_MODEL_FILE
    assert PROBABILITY_MODEL_FILE in manifest.data["files"]
    full, short = _graph(ex.bundle), _graph(ex.bundle, PROBABILITY_MODEL_FILE)
    assert [o.name for o in short.graph.output] == ["probability"]
    # OneTrans averages its NS tokens' weights for the output alone; DIN's weights are what pools the sequence.
    assert len(short.graph.node) < len(full.graph.node) if arch == "onetrans" else len(short.graph.node) <= len(
        full.graph.node)
    assert {n.name for n in short.graph.node} <= {n.name for n in full.graph.node}
    spec = load_run(ex.run_dir).spec
    inputs = random_inputs(spec, n_users=2, n_candidates=13, seed=9)
    np.testing.assert_array_equal(_ort_outputs(ex.bundle / PROBABILITY_MODEL_FILE, inputs)["probability"],
                                  _ort_outputs(ex.bundle / MODEL_FILE, inputs)["probability"])


def test_kernel_library_path_is_none_or_a_file() -> None:
    path = kernel_library_path()
    assert path is None or path.is_file()
    assert kernel_status()["fused_kernel"] == (path is not None)


# ---------------------------------------------------------------------------- manifest and bundle checks


@pytest.mark.parametrize("arch", VARIANTS)
def test_manifest_describes_the_bundle(exported: dict[str, Exported], arch: str) -> None:
    ex = exported[arch]
    run = load_run(ex.run_dir)
    manifest = load_manifest(ex.bundle, expect=BundleExpectation(feature_spec=run.spec))
    data = manifest.data
    assert (data["model"]["arch"], data["model"]["seq_variant"]) == VARIANTS[arch]
    assert data["model"]["attention"] and "attention" in data["model"]["attention"]
    assert data["model"]["seq_len"] == SEQ_LEN and data["model"]["d_model"] == D_MODEL
    assert data["model"]["pos_ratio"] == 0.5 and data["model"]["sequence_mode"] == "mix"
    assert data["model"]["name"] and data["model"]["version"] and data["model"]["created_at"].endswith("Z")
    assert data["feature_spec"] == run.spec.to_dict()
    assert json.loads((ex.bundle / data["feature_spec_file"]).read_text()) == run.spec.to_dict()
    assert manifest.input_names == INPUT_NAMES and manifest.output_names == ("probability", ATTENTION_NAME)
    assert manifest.has_attention
    assert {t["name"]: t["dtype"] for t in data["inputs"]}["seq_mask"] == "bool"
    assert {t["name"]: t["shape"] for t in data["inputs"]}["seq_item"] == ["U", SEQ_LEN]
    assert {t["name"]: t["shape"] for t in data["inputs"]}["cand_user"] == ["N"]
    assert data["outputs"] == [{"name": "probability", "dtype": "float32", "shape": ["N"]},
                               {"name": ATTENTION_NAME, "dtype": "float32", "shape": ["N", SEQ_LEN]}]
    assert data["onnx"]["custom_domains"] == ({TAPF_DOMAIN: 1} if arch in GATED else {})
    assert data["onnx"]["custom_ops"] == data["onnx"]["functions"] == \
        ([f"{TAPF_DOMAIN}::{TAPF_OP}"] if arch in GATED else [])
    assert data["onnx"]["opset"] >= 18 and data["onnx"]["optimized_file"] == OPTIMIZED_MODEL_FILE
    assert data["training"]["metrics"]["valid"]["auc"] == pytest.approx(run.metrics["valid"]["auc"])
    expected_rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert data["git_revision"] == (expected_rev or "unknown")
    listed = set(data["files"])
    on_disk = {str(p.relative_to(ex.bundle)) for p in ex.bundle.rglob("*") if p.is_file()} - {MANIFEST_FILE}
    assert listed == on_disk
    assert manifest.load_vocabulary().items == run.vocab.items


@pytest.fixture()
def bundle_copy(exported: dict[str, Exported], tmp_path: Path) -> Path:
    return Path(shutil.copytree(exported["din"].bundle, tmp_path / "bundle"))


@pytest.mark.parametrize("victim", [MODEL_FILE, "vocab/items.json", "feature_spec.json"])
def test_tampered_file_is_refused(bundle_copy: Path, victim: str) -> None:
    path = bundle_copy / victim
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # same size, one bit flipped
    path.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match=rf"sha256 mismatch for {victim}.*modified after export"):
        load_manifest(bundle_copy)
    with pytest.raises(BundleError, match="sha256"):
        verify_bundle(bundle_copy)
    load_manifest(bundle_copy, verify=False)  # still readable when asked not to verify


def test_missing_and_resized_files_are_refused(bundle_copy: Path) -> None:
    (bundle_copy / "vocab" / "categories.json").write_text("[]")
    with pytest.raises(BundleError, match=r"vocab/categories.json is \d+ bytes but the manifest says"):
        load_manifest(bundle_copy)
    (bundle_copy / OPTIMIZED_MODEL_FILE).unlink()
    with pytest.raises(BundleError, match="missing"):
        verify_bundle(bundle_copy)


def test_invalid_manifest_is_refused(bundle_copy: Path) -> None:
    data = json.loads((bundle_copy / MANIFEST_FILE).read_text())
    del data["files"][MODEL_FILE]["sha256"]
    (bundle_copy / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"invalid manifest at files/model.onnx: 'sha256' is a required property"):
        load_manifest(bundle_copy)
    (bundle_copy / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_manifest(bundle_copy)


def test_wrong_feature_spec_is_refused(exported: dict[str, Exported]) -> None:
    ex = exported["din"]
    spec = load_run(ex.run_dir).spec
    other = replace(spec, sequence=SequenceSpec(seq_len=SEQ_LEN * 2, pos_ratio=0.5, mode="mix"))
    with pytest.raises(BundleError, match=r"feature spec mismatch: sequence.seq_len: expected 20, bundle has 10"):
        load_manifest(ex.bundle, expect=BundleExpectation(feature_spec=other))
    with pytest.raises(BundleError, match="n_items"):
        load_manifest(ex.bundle, expect=BundleExpectation(feature_spec={**spec.to_dict(), "n_items": 7}))
    with pytest.raises(BundleError, match="graph inputs are"):
        load_manifest(ex.bundle, expect=BundleExpectation(input_names=INPUT_NAMES[:-1]))


# ---------------------------------------------------------------------------- refusals


def _doctored_run(src: Path, dst: Path, edit: object) -> Path:
    shutil.copytree(src, dst)
    ckpt = torch.load(dst / "checkpoint.pt", map_location="cpu", weights_only=False)
    edit(ckpt)  # type: ignore[operator]
    torch.save(ckpt, dst / "checkpoint.pt")
    return dst


def _nan_weights(ckpt: dict) -> None:  # type: ignore[type-arg]
    ckpt["state_dict"]["gate.w_int.weight"][0, 0] = float("nan")


def _unknown_key(ckpt: dict) -> None:  # type: ignore[type-arg]
    ckpt["model_config"]["n_experts"] = 4  # written by a newer trainer this exporter does not know


def _unknown_arch(ckpt: dict) -> None:  # type: ignore[type-arg]
    ckpt["model_config"]["arch"] = "mystery"


def _shape_mismatch(ckpt: dict) -> None:  # type: ignore[type-arg]
    ckpt["model_config"]["d_model"] = 8


@pytest.mark.parametrize(("edit", "message"), [
    (_nan_weights, r"non-finite weights in \['gate.w_int.weight'\]"),
    (_unknown_key, r"checkpoint cannot be rebuilt: ModelConfig: unknown key\(s\) \['n_experts'\]"),
    (_unknown_arch, r"checkpoint cannot be rebuilt: arch must be one of"),
    (_shape_mismatch, r"checkpoint does not match its model config"),
])
def test_unrepresentable_checkpoint_is_refused(exported: dict[str, Exported], tmp_path: Path, edit: object,
                                               message: str) -> None:
    run_dir = _doctored_run(exported["din"].run_dir, tmp_path / "run", edit)
    with pytest.raises(ExportError, match=message):
        export_bundle(run_dir, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()  # nothing half-written


def _saved_before_polarity_pools(ckpt: dict) -> None:  # type: ignore[type-arg]
    del ckpt["model_config"]["options"]["polarity_pools"]  # as a trainer wrote it before the option existed


def test_a_checkpoint_from_before_polarity_pools_keeps_its_one_pool(exported: dict[str, Exported],
                                                                   tmp_path: Path) -> None:
    """A DIN checkpoint without the `polarity_pools` key (one pool over clicks and skips) loads as what it was
    trained as, although new runs default to the pools, and exports with parity."""
    run_dir = _doctored_run(exported["din-one-pool"].run_dir, tmp_path / "run", _saved_before_polarity_pools)
    run = load_run(run_dir)
    assert run.model_config.arch_options(DINOptions).polarity_pools is False
    assert load_run(exported["din"].run_dir).model_config.arch_options(DINOptions).polarity_pools is True
    assert not getattr(run.model, "polarity_pools", True)
    report = check_parity(run_dir, export_bundle(run_dir, tmp_path / "bundle"), n_requests=1, max_candidates=50,
                          kernel=False)
    assert report.passed, report.summary()


def test_not_a_run_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"no checkpoint\.pt"):
        export_bundle(tmp_path, tmp_path / "bundle")


# ---------------------------------------------------------------------------- CLI


def test_cli_export_with_check_and_optimize(exported: dict[str, Exported], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from model.cli import main

    out = tmp_path / "cli_bundle"
    assert main(["export", str(exported["din"].run_dir), "--out", str(out), "--optimize", "--check"]) == 0
    assert "bundle written to" in capsys.readouterr().out
    manifest = load_manifest(out)
    assert manifest.data["parity"]["passed"] is True
    assert manifest.data["parity"]["max_abs_diff"] < 1e-5
    assert (out / OPTIMIZED_MODEL_FILE).is_file() and OPTIMIZED_MODEL_FILE in manifest.data["files"]


def test_cli_export_refuses_a_bundle_over_tolerance(exported: dict[str, Exported], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from model.cli import main

    out = tmp_path / "refused"
    # A negative tolerance no output can meet stands in for a graph that drifted from torch.
    assert main(["export", str(exported["din"].run_dir), "--out", str(out), "--tol", "-1"]) != 0
    assert "parity FAILED" in capsys.readouterr().err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]


# ---------------------------------------------------------------------------- the service's side


def test_bundle_module_needs_neither_torch_nor_onnx(exported: dict[str, Exported]) -> None:
    code = (
        "import sys\n"
        "from export.bundle import load_manifest\n"
        "from export.custom_kernel import kernel_status\n"
        f"m = load_manifest({str(exported['din'].bundle)!r})\n"
        "kernel_status()\n"
        "bad = sorted(k for k in ('torch', 'onnx', 'onnxscript', 'onnx_ir') if k in sys.modules)\n"
        "assert not bad, bad\n"
        "print('ok', m.arch)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok din"
