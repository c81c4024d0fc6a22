# The function body below is onnxscript's DSL: its tensor "types" are annotations for the ONNX
# converter, which mypy cannot follow through the generated op stubs.
# mypy: disable-error-code="arg-type,type-var,return-value"
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
from onnxscript import BOOL, FLOAT, INT64
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



def op_schema(name: str = TAPF_OP, inputs: tuple[str, ...] = TAPF_INPUTS,
              outputs: tuple[str, ...] = ("gated",)) -> onnx.defs.OpSchema:
    """A `tapf.fused` node's schema (for the exporter; not registered globally): float32 everywhere but the
    int64 `cand_user` and the bool `mask`."""
    param = onnx.defs.OpSchema.FormalParameter
    types = {"cand_user": "tensor(int64)", "mask": "tensor(bool)"}
    return onnx.defs.OpSchema(
        name, TAPF_DOMAIN, TAPF_DOMAIN_VERSION,
        doc=__doc__ or "", inputs=[param(n, types.get(n, "T")) for n in inputs],
        outputs=[param(n, "T") for n in outputs],
        type_constraints=[("T", ["tensor(float)"], "float32 activations and weights")],
    )


# A plain op (no function attached) for the translation: the exporter's version-conversion pass
# inlines every model-local function it finds, so the node is emitted bare and the function is
# attached after export (`attach_function`).
_TAPF_NODE = Op(tapf_opset, TAPF_OP, op_schema())


def _input_major(*weights: Any) -> list[Any]:
    """`F.linear` weights (d_out, d_in) -> the nodes' (d_in, d_out), as Transposes of constants (folded later)."""
    return [op.Transpose(w, perm=[1, 0]) for w in weights]


def translate_tapf_gate(tokens: Any, polarity: Any, cand: Any, cand_user: Any, w_int: Any, w_tok: Any,
                        w_mix: Any, pol_bias: Any) -> Any:
    """Custom translation of `torch.ops.tapf.gate.default` into one `tapf.fused::TAPFGate` node.

    The torch op takes `F.linear` weights (d_out, d_in); the node takes (d_in, d_out). The
    transposes are of constants and are folded into initializers right after export.
    """
    return _TAPF_NODE(tokens, polarity, cand, cand_user, *_input_major(w_int, w_tok, w_mix), pol_bias)



def function_proto() -> onnx.FunctionProto:
    """The model-local function `tapf.fused::TAPFGate` (the folded gate in stock ONNX ops)."""
    return TAPFGate.to_function_proto()


def attach_function(model: ir.Model) -> None:
    """Add the `tapf.fused` functions the graph uses (`TAPFGate` always: the pooling functions call it) and the
    domain import to `model` (idempotent)."""
    model.opset_imports.setdefault(TAPF_DOMAIN, TAPF_DOMAIN_VERSION)
    used = {node.op_type for node in model.graph if node.domain == TAPF_DOMAIN}
    for script in (TAPFGate, TAPFGateDotPool, TAPFGateMLPPool):
        if script.name == TAPF_OP or script.name in used:
            func = ir.serde.deserialize_function(script.to_function_proto())
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


# --------------------------------------------------------------------------------------------
# The gate fused with the attention that pools it (serving graphs): one node each, whose model-local
# function is one `TAPFGate` node plus the pooling in stock ops. With the kernel library loaded the
# whole node runs in one pass and the (N, L, d) gated tokens never leave the kernel's scratch.
#
#   TAPFGateDotPool   ... gate inputs, mask (U, L) bool, query (N, T, d) (score scale folded in)
#                     -> pooled (N, T, d), weights (N, T, L)     (OneTrans aggregation)
#   TAPFGateMLPPool   ... gate inputs, mask (U, L) bool, att_cand (N, d), w_token, w_product (d, h),
#                     att_bias (N, h), w_score (h,) -> pooled (N, d), weights (N, L)   (DIN target attention)
# weights: softmax over the candidate's user's real tokens, exactly 0 on the others (all 0 for an empty history).

TAPF_DOT_POOL_OP = "TAPFGateDotPool"
TAPF_MLP_POOL_OP = "TAPFGateMLPPool"
TAPF_GATE_OPS = (TAPF_OP, TAPF_DOT_POOL_OP, TAPF_MLP_POOL_OP)  # each holds exactly one TAPF gate
DOT_POOL_INPUTS = (*TAPF_INPUTS, "mask", "query")
MLP_POOL_INPUTS = (*TAPF_INPUTS, "mask", "att_cand", "w_token", "w_product", "att_bias", "w_score")
_LOWEST = -3.4028234663852886e38  # float32's lowest: weight exactly 0 next to any real token


@onnxscript.script(tapf_opset, default_opset=op)
def TAPFGateDotPool(
    tokens: FLOAT, polarity: FLOAT, cand: FLOAT, cand_user: INT64, w_int: FLOAT, w_tok: FLOAT, w_mix: FLOAT,
    pol_bias: FLOAT, mask: BOOL, query: FLOAT,
) -> tuple[FLOAT, FLOAT]:
    g = TAPFGate(tokens, polarity, cand, cand_user, w_int, w_tok, w_mix, pol_bias)
    scores = op.MatMul(query, op.Transpose(g, perm=[0, 2, 1]))
    valid = op.Unsqueeze(op.Gather(mask, cand_user, axis=0), op.Constant(value_ints=[1]))
    masked = op.Where(valid, scores, op.Constant(value_float=_LOWEST))
    weights = op.Mul(op.Softmax(masked, axis=-1), op.Cast(valid, to=1))  # 1 = FLOAT
    pooled = op.MatMul(weights, g)
    return pooled, weights


@onnxscript.script(tapf_opset, default_opset=op)
def TAPFGateMLPPool(
    tokens: FLOAT, polarity: FLOAT, cand: FLOAT, cand_user: INT64, w_int: FLOAT, w_tok: FLOAT, w_mix: FLOAT,
    pol_bias: FLOAT, mask: BOOL, att_cand: FLOAT, w_token: FLOAT, w_product: FLOAT, att_bias: FLOAT,
    w_score: FLOAT,
) -> tuple[FLOAT, FLOAT]:
    g = TAPFGate(tokens, polarity, cand, cand_user, w_int, w_tok, w_mix, pol_bias)
    per_cand = op.Add(w_token, op.Mul(op.Unsqueeze(att_cand, op.Constant(value_ints=[2])), w_product))
    hidden = op.Add(op.MatMul(g, per_cand), op.Unsqueeze(att_bias, op.Constant(value_ints=[1])))
    scores = op.MatMul(op.Mul(hidden, op.Sigmoid(hidden)), w_score)
    valid = op.Gather(mask, cand_user, axis=0)
    masked = op.Where(valid, scores, op.Constant(value_float=_LOWEST))
    weights = op.Mul(op.Softmax(masked, axis=-1), op.Cast(valid, to=1))
    pooled = op.Squeeze(op.MatMul(op.Unsqueeze(weights, op.Constant(value_ints=[1])), g),
                        op.Constant(value_ints=[1]))
    return pooled, weights


_POOL_OUTPUTS = ("pooled", "weights")
_DOT_POOL_NODE = Op(tapf_opset, TAPF_DOT_POOL_OP, op_schema(TAPF_DOT_POOL_OP, DOT_POOL_INPUTS, _POOL_OUTPUTS))
_MLP_POOL_NODE = Op(tapf_opset, TAPF_MLP_POOL_OP, op_schema(TAPF_MLP_POOL_OP, MLP_POOL_INPUTS, _POOL_OUTPUTS))


def translate_gate_dot_pool(tokens: Any, polarity: Any, cand: Any, cand_user: Any, w_int: Any, w_tok: Any,
                            w_mix: Any, pol_bias: Any, mask: Any, query: Any) -> Any:
    """`torch.ops.tapf.gate_dot_pool.default` -> one `tapf.fused::TAPFGateDotPool` node (weights as in
    `translate_tapf_gate`)."""
    return _DOT_POOL_NODE(tokens, polarity, cand, cand_user, *_input_major(w_int, w_tok, w_mix), pol_bias, mask,
                          query, _num_outputs=2)


def translate_gate_mlp_pool(tokens: Any, polarity: Any, cand: Any, cand_user: Any, w_int: Any, w_tok: Any,
                            w_mix: Any, pol_bias: Any, mask: Any, att_cand: Any, w_token: Any, w_product: Any,
                            att_bias: Any, w_score: Any) -> Any:
    """`torch.ops.tapf.gate_mlp_pool.default` -> one `tapf.fused::TAPFGateMLPPool` node."""
    return _MLP_POOL_NODE(tokens, polarity, cand, cand_user, *_input_major(w_int, w_tok, w_mix), pol_bias, mask,
                          att_cand, w_token, w_product, att_bias, w_score, _num_outputs=2)
