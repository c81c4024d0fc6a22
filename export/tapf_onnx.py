# The function body below is onnxscript's DSL: its tensor "types" are annotations for the ONNX
# converter, which mypy cannot follow through the generated op stubs.
# mypy: disable-error-code="arg-type,type-var"
"""The TAPF gate in ONNX: one `tapf.fused::TAPFGate` node plus a model-local function of the same name.

The exporter translates every `tapf::gate` call (see `model.modules.polarity_gate`) into ONE node
of the custom domain `tapf.fused`. The model file also carries a function `tapf.fused::TAPFGate`
whose body is the folded gate in stock ONNX ops, so an ONNX Runtime without the custom-op library
runs the file unchanged by inlining that function; with the library loaded the node runs the fused
kernel instead.

Node contract (opset `tapf.fused` version 1), all float32 except `cand_user`:

    inputs   tokens (U, L, d), polarity (U, L) in {-1, 0, +1} (0 = padding), cand (N, d),
             cand_user (N,) int64 in [0, U),
             w_int, w_tok, w_mix (d, d) **stored as (d_in, d_out)**: x @ W, i.e. the transpose of
             the torch `F.linear` weights (folded into initializers at export),
             pol_bias (3, d): rows for polarity -1, 0 (padding), +1
    output   gated (N, L, d)

    h  = tokens[cand_user]                         (N, L, d)
    e  = relu((h * cand[:, None]) @ w_int)         paper eq. 3
    a  = tokens @ w_tok + pol_bias[polarity + 1]   (U, L, d), once per user
    t  = tanh(a[cand_user] + e @ w_mix)            = 2 sigmoid(.) - 1, eq. 4 folded
    out = h + polarity[cand_user][..., None] * t * e   eq. 5
"""

from __future__ import annotations

from typing import Any

import onnx
import onnx_ir as ir
import onnxscript
from onnxscript import FLOAT, INT64
from onnxscript import opset20 as op
from onnxscript.values import Op, Opset

TAPF_DOMAIN = "tapf.fused"
TAPF_OP = "TAPFGate"
TAPF_DOMAIN_VERSION = 1
ONNX_OPSET = 20  # the default-domain opset of the exported graph and of the function body

TAPF_INPUTS = ("tokens", "polarity", "cand", "cand_user", "w_int", "w_tok", "w_mix", "pol_bias")
WEIGHT_INPUTS = (4, 5, 6, 7)  # positions of the folded constant inputs of the node

tapf_opset = Opset(TAPF_DOMAIN, TAPF_DOMAIN_VERSION)


@onnxscript.script(tapf_opset, default_opset=op)
def TAPFGate(
    tokens: FLOAT, polarity: FLOAT, cand: FLOAT, cand_user: INT64, w_int: FLOAT, w_tok: FLOAT, w_mix: FLOAT,
    pol_bias: FLOAT,
) -> FLOAT:
    h = op.Gather(tokens, cand_user, axis=0)
    x = op.Mul(h, op.Unsqueeze(cand, op.Constant(value_ints=[1])))
    e = op.Relu(op.MatMul(x, w_int))
    pidx = op.Cast(op.Add(polarity, op.Constant(value_float=1.0)), to=7)  # 7 = INT64
    a_user = op.Add(op.MatMul(tokens, w_tok), op.Gather(pol_bias, pidx, axis=0))
    t = op.Tanh(op.Add(op.Gather(a_user, cand_user, axis=0), op.MatMul(e, w_mix)))
    p = op.Unsqueeze(op.Gather(polarity, cand_user, axis=0), op.Constant(value_ints=[2]))
    return op.Add(h, op.Mul(op.Mul(p, t), e))



def op_schema() -> onnx.defs.OpSchema:
    """The node's schema (for the exporter; not registered globally)."""
    param = onnx.defs.OpSchema.FormalParameter
    inputs = [param(name, "tensor(int64)" if name == "cand_user" else "T") for name in TAPF_INPUTS]
    return onnx.defs.OpSchema(
        TAPF_OP, TAPF_DOMAIN, TAPF_DOMAIN_VERSION,
        doc=__doc__ or "", inputs=inputs, outputs=[param("gated", "T")],
        type_constraints=[("T", ["tensor(float)"], "float32 activations and weights")],
    )


# A plain op (no function attached) for the translation: the exporter's version-conversion pass
# inlines every model-local function it finds, so the node is emitted bare and the function is
# attached after export (`attach_function`).
_TAPF_NODE = Op(tapf_opset, TAPF_OP, op_schema())


def translate_tapf_gate(tokens: Any, polarity: Any, cand: Any, cand_user: Any, w_int: Any, w_tok: Any,
                        w_mix: Any, pol_bias: Any) -> Any:
    """Custom translation of `torch.ops.tapf.gate.default` into one `tapf.fused::TAPFGate` node.

    The torch op takes `F.linear` weights (d_out, d_in); the node takes (d_in, d_out). The
    transposes are of constants and are folded into initializers right after export.
    """
    return _TAPF_NODE(tokens, polarity, cand, cand_user, op.Transpose(w_int, perm=[1, 0]),
                      op.Transpose(w_tok, perm=[1, 0]), op.Transpose(w_mix, perm=[1, 0]), pol_bias)


def function_proto() -> onnx.FunctionProto:
    """The model-local function `tapf.fused::TAPFGate` (the folded gate in stock ONNX ops)."""
    return TAPFGate.to_function_proto()


def attach_function(model: ir.Model) -> None:
    """Add the `tapf.fused::TAPFGate` function and the domain import to `model` (idempotent)."""
    model.opset_imports.setdefault(TAPF_DOMAIN, TAPF_DOMAIN_VERSION)
    func = ir.serde.deserialize_function(function_proto())
    model.functions[func.identifier()] = func


def gate_model(weights: dict[str, Any], *, seq_len: int | None = None) -> onnx.ModelProto:
    """A model holding only the gate: inputs tokens/polarity/cand/cand_user, output `gated`, the
    weights (`w_int`, `w_tok`, `w_mix` input-major (d_in, d_out), `pol_bias` (3, d), numpy float32)
    as initializers, and the function attached (kernel tests and benchmarks)."""
    from onnx import TensorProto, helper, numpy_helper

    d = int(weights["w_int"].shape[0])
    length: int | str = seq_len if seq_len is not None else "L"
    inits = [numpy_helper.from_array(weights[k], k) for k in ("w_int", "w_tok", "w_mix", "pol_bias")]
    node = helper.make_node(TAPF_OP, list(TAPF_INPUTS), ["gated"], domain=TAPF_DOMAIN)
    graph = helper.make_graph(
        [node], "tapf_gate",
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["U", length, d]),
         helper.make_tensor_value_info("polarity", TensorProto.FLOAT, ["U", length]),
         helper.make_tensor_value_info("cand", TensorProto.FLOAT, ["N", d]),
         helper.make_tensor_value_info("cand_user", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("gated", TensorProto.FLOAT, ["N", length, d])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET),
                                                    helper.make_opsetid(TAPF_DOMAIN, TAPF_DOMAIN_VERSION)],
                              functions=[function_proto()])
    model.ir_version = 10
    return model
