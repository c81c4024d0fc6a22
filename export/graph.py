"""The serving wrapper as an ONNX graph: dynamo export with the TAPF nodes, their functions attached, every
constant expression of the weights folded (and checked), batch axes named U and N."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import torch

from export.bundle import ATTENTION_NAME
from export.reference import ExportError, random_inputs
from export.serving.model import ServingModel
from export.tapf_onnx import (
    ONNX_OPSET,
    TAPF_DOMAIN,
    TAPF_GATE_OPS,
    attach_function,
    translate_gate_dot_pool,
    translate_gate_mlp_pool,
    translate_tapf_gate,
)
from model.features.inputs import INPUT_NAMES
from model.features.spec import FeatureSpec
from model.training.batches import to_tensors

_FOLDABLE_OPS = frozenset({"Transpose", "Slice", "Split", "Reshape", "Squeeze", "Unsqueeze", "Concat", "Cast",
                           "Mul", "Div", "Add", "Sub", "Neg", "Gemm", "MatMul", "Expand", "Identity"})

_USER_AXES = {name: "U" for name in INPUT_NAMES if name.startswith("seq_") or name == "user_stats"}

_CAND_AXES = {name: "N" for name in INPUT_NAMES if name.startswith("cand_")}


def ir_nodes(graph: ir.Graph | ir.Function) -> Iterator[ir.Node]:
    for node in graph:
        yield node
        for attr in node.attributes.values():
            if isinstance(attr, ir.Attr) and attr.type == ir.AttributeType.GRAPH and attr.value is not None:
                yield from ir_nodes(attr.value)

def _is_constant(value: ir.Value | None) -> bool:
    if value is None:
        return True
    if value.is_initializer() or value.const_value is not None:
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx")

def unfolded_parameter_ops(model: ir.Model | onnx.ModelProto) -> list[str]:
    """Nodes of the main graph that only compute on constants (weights): must be empty after folding."""
    if isinstance(model, onnx.ModelProto):
        model = ir.serde.deserialize_model(model)
    found = []
    for node in ir_nodes(model.graph):
        if node.domain not in ("", "ai.onnx") or node.op_type not in _FOLDABLE_OPS:
            continue
        data_inputs = [v for v in node.inputs if v is not None]
        if data_inputs and all(_is_constant(v) for v in data_inputs) and any(
            v.is_initializer() for v in data_inputs
        ):
            found.append(f"{node.op_type}({', '.join(v.name or '?' for v in data_inputs)})")
    return found

def dynamic_shapes() -> dict[str, dict[int, Any]]:
    users = torch.export.Dim("U", min=1, max=1 << 20)
    cands = torch.export.Dim("N", min=1, max=1 << 24)
    return {name: {0: users} if name in _USER_AXES else {0: cands} for name in INPUT_NAMES}

def _rename_dynamic_axes(model: ir.Model) -> None:
    """Name the batch axes U (users) and N (candidates) on every input and output (outputs are per candidate)."""
    for value in model.graph.inputs:
        axis = _USER_AXES.get(value.name or "") or _CAND_AXES.get(value.name or "")
        if axis and value.shape is not None and len(value.shape) >= 1:
            dims = list(value.shape)
            dims[0] = ir.SymbolicDim(axis)
            value.shape = ir.Shape(dims)
    for value in model.graph.outputs:
        if value.shape is not None and len(value.shape) >= 1:
            dims = list(value.shape)
            dims[0] = ir.SymbolicDim("N")
            value.shape = ir.Shape(dims)

def export_onnx(served: ServingModel, spec: FeatureSpec, *, expected_gates: int) -> ir.Model:
    """Export the wrapper to an ONNX IR model: one TAPFGate node per gate, its function attached,
    weights folded. Raises ExportError when the exporter cannot represent the model."""
    import onnxscript.optimizer

    example = to_tensors(random_inputs(spec, n_users=3, n_candidates=5, seed=1234))
    args = tuple(example[name] for name in INPUT_NAMES)
    try:
        with warnings.catch_warnings(), quiet_loggers("onnx_ir", "onnxscript"), \
                quiet_loggers("torch.onnx", level=logging.ERROR):  # "torchvision is not installed" chatter
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                served, args, dynamo=True, input_names=list(INPUT_NAMES), output_names=list(served.output_names),
                dynamic_shapes=dynamic_shapes(), opset_version=ONNX_OPSET, optimize=False, verbose=False,
                custom_translation_table={torch.ops.tapf.gate.default: translate_tapf_gate,
                                          torch.ops.tapf.gate_dot_pool.default: translate_gate_dot_pool,
                                          torch.ops.tapf.gate_mlp_pool.default: translate_gate_mlp_pool},
            )
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        summary = next((line for line in lines if line.startswith("<class")), lines[0] if lines else "")
        raise ExportError(f"the ONNX exporter cannot represent this model: {type(exc).__name__}: {summary}") from exc
    if program is None:
        raise ExportError("the ONNX exporter returned no program")
    model = program.model
    gates = [n for n in ir_nodes(model.graph) if n.domain == TAPF_DOMAIN and n.op_type in TAPF_GATE_OPS]
    if len(gates) != expected_gates * served.gate_passes:
        raise ExportError(f"expected {expected_gates * served.gate_passes} {TAPF_DOMAIN} gate node(s) (one of "
                          f"{TAPF_GATE_OPS}; {expected_gates} gate(s), {served.gate_passes} pass(es) each), the "
                          f"exported graph has "
                          f"{len(gates)}: the gate was not exported through the tapf::gate custom op")
    if expected_gates:
        attach_function(model)
    # Fold every constant expression of the weights, whatever its size (the defaults skip big tensors).
    with quiet_loggers("onnx_ir", "onnxscript"):
        onnxscript.optimizer.optimize(model, inline=False, input_size_limit=1 << 62, output_size_limit=1 << 62,
                                      num_iterations=3)
    leftover = unfolded_parameter_ops(model)
    if leftover:
        raise ExportError(f"weights not folded into initializers: {leftover[:5]}")
    _rename_dynamic_axes(model)
    model.graph.name = "polarity"
    names = tuple(v.name for v in model.graph.outputs)
    if names != served.output_names:
        raise ExportError(f"exported graph outputs {list(names)}, expected {list(served.output_names)}")
    return model

def probability_only(model: ir.Model) -> ir.Model:
    """A copy of an exported model with the `attention` output dropped, and every node (and initializer, and
    function) only that output needed: the graph a request without `explain` runs. The probability is computed
    by the very same nodes."""
    from onnx_ir.passes.common import RemoveUnusedFunctionsPass, RemoveUnusedNodesPass

    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    kept = [v for v in copy.graph.outputs if v.name != ATTENTION_NAME]
    if len(kept) == len(copy.graph.outputs):
        raise ExportError(f"the model has no {ATTENTION_NAME!r} output to drop")
    copy.graph.outputs.clear()
    copy.graph.outputs.extend(kept)
    RemoveUnusedNodesPass()(copy)
    RemoveUnusedFunctionsPass()(copy)  # type: ignore[no-untyped-call]
    return copy

@contextlib.contextmanager
def quiet_loggers(*names: str, level: int = logging.WARNING) -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in names]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(level, lg.level))
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, before, strict=True):
            lg.setLevel(lvl)

def save_optimized_copy(model_path: Path, out_path: Path) -> Path:
    """An ONNX Runtime-optimised copy (extended graph optimisations, CPU provider; the TAPF function
    is inlined into stock kernels there). Layout optimisations (level ALL) are left out: they tie the
    file to this machine's CPU."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(out_path)
    opts.log_severity_level = 3
    ort.InferenceSession(str(model_path), sess_options=opts, providers=["CPUExecutionProvider"])
    if not out_path.is_file():
        raise ExportError(f"ONNX Runtime did not write {out_path}")
    return out_path
