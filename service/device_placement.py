"""Which execution provider runs each node of an ONNX Runtime session; a GPU session whose compute falls back to
the CPU is refused. Torch-free, onnx-free.

ONNX Runtime assigns every node to the first provider in the session's list that has a kernel for it, and quietly
runs the rest on the CPU: a model that "runs on CUDA" may copy its activations to the host and back at every such
node. The assignment is recorded at session creation (`session.record_ep_graph_assignment_info`) and read with
`get_provider_graph_assignment_info()`. A CUDA session legitimately keeps shape arithmetic on the CPU (ONNX
Runtime moves small int64 shape computations there on purpose); what must not land there is a node that
produces floating-point data. The dtypes come from one profiled run at start-up (ONNX Runtime's profile records
each node's output types); a node the profile does not show counts as compute unless its op is pure shape work.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

RECORD_ASSIGNMENT = "session.record_ep_graph_assignment_info"
FLOAT_TYPES = frozenset({"float", "float16", "bfloat16", "double"})
SHAPE_OPS = frozenset({"Shape", "Size", "Squeeze", "Unsqueeze", "Reshape", "Concat", "Gather", "Slice", "Cast",
                       "ConstantOfShape", "Range", "Expand", "Equal", "Where", "Add", "Sub", "Mul", "Div", "Min",
                       "Max", "Not", "And", "Or", "Less", "Greater", "Identity", "Constant", "ReduceProd"})
# Listed first among the fallbacks: where the time (and the copies) go.
HEAVY_OPS = frozenset({"MatMul", "Gemm", "FusedMatMul", "MatMulNBits", "Attention", "MultiHeadAttention", "Softmax",
                       "LayerNormalization", "SkipLayerNormalization", "TAPFGate", "TAPFGateDotPool",
                       "TAPFGateMLPPool", "Einsum", "Conv"})
_NUMPY_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
                "tensor(float)": np.float32, "tensor(double)": np.float64}


@dataclass(frozen=True, kw_only=True)
class Placement:
    """Nodes per provider, and the compute nodes that run off the accelerator (`fallbacks`, "Op name")."""

    accelerator: str | None  # the provider the session was meant to run on; None for a CPU session
    nodes: dict[str, int]
    fallbacks: tuple[str, ...]

    def describe(self) -> dict[str, Any]:
        return {"accelerator": self.accelerator, "nodes": dict(self.nodes),
                "compute_nodes_off_accelerator": list(self.fallbacks)}

    def summary(self) -> str:
        nodes = ", ".join(f"{provider} {count}" for provider, count in self.nodes.items())
        if self.accelerator is None:
            return f"nodes: {nodes}"
        off = f"{len(self.fallbacks)} compute node(s) off it: {', '.join(self.fallbacks[:8])}" if self.fallbacks \
            else "no compute node off it"
        return f"nodes: {nodes}; accelerator {self.accelerator}, {off}"


def node_assignment(session: Any) -> dict[str, tuple[str, str]]:
    """node name -> (provider, op type), from the assignment the session recorded (`RECORD_ASSIGNMENT` set)."""
    out: dict[str, tuple[str, str]] = {}
    for subgraph in session.get_provider_graph_assignment_info():
        for node in subgraph.get_nodes():
            out[str(node.name)] = (str(subgraph.ep_name), str(node.op_type))
    return out


def probe_feed(session: Any) -> dict[str, np.ndarray]:
    """A minimal valid feed from the graph's declared inputs: every symbolic axis 2 long, all zeros (padding
    ids, empty masks, candidates of user 0)."""
    feed: dict[str, np.ndarray] = {}
    for value in session.get_inputs():
        shape = [d if isinstance(d, int) else 2 for d in value.shape]
        feed[value.name] = np.zeros(shape, dtype=_NUMPY_TYPES.get(value.type, np.float32))
    return feed


@dataclass(frozen=True)
class ProfiledNode:
    provider: str
    op_type: str
    float_output: bool  # it produced floating-point data


def profiled_nodes(profile: list[dict[str, Any]]) -> dict[str, ProfiledNode]:
    """The nodes a profiled run executed (the optimised graph: fused nodes under their new names), from ONNX
    Runtime profile events."""
    out: dict[str, ProfiledNode] = {}
    for event in profile:
        name = str(event.get("name", ""))
        if event.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        args = event.get("args", {})
        types = [t for entry in args.get("output_type_shape", []) for t in entry]
        out[name.removesuffix("_kernel_time")] = ProfiledNode(provider=str(args.get("provider", "")),
                                                               op_type=str(args.get("op_name", "")),
                                                               float_output=any(t in FLOAT_TYPES for t in types))
    return out


def profiled_run(session: Any, feed: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Run `feed` once on a session created with profiling on, end the profiling and return its events (the
    profile file is removed)."""
    session.run(None, feed)
    path = Path(session.end_profiling())
    try:
        events: list[dict[str, Any]] = json.loads(path.read_text())
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
    return events


def profile_prefix() -> str:
    """Where a start-up profile is written (then read and removed)."""
    return os.path.join(tempfile.gettempdir(), f"polarity-placement-{os.getpid()}")


def placement(session: Any, *, accelerator: str | None, profile: list[dict[str, Any]] | None) -> Placement:
    """The session's placement (nodes per provider, as assigned); with an accelerator, the compute nodes off it:
    those the profiled run executed elsewhere that produced floating-point data, and those assigned elsewhere that
    the profile does not show (fused away or not run) unless their op is pure shape work. Matrix products first."""
    assigned = node_assignment(session)
    nodes = Counter(provider for provider, _ in assigned.values())
    off: dict[str, str] = {}
    if accelerator is not None:
        ran = profiled_nodes(profile or [])
        off = {name: node.op_type for name, node in ran.items() if node.provider != accelerator and node.float_output}
        off.update({name: op_type for name, (provider, op_type) in assigned.items()
                    if provider != accelerator and name not in ran and op_type not in SHAPE_OPS})
    fallbacks = sorted(off.items(), key=lambda item: (item[1] not in HEAVY_OPS, item[1], item[0]))
    return Placement(accelerator=accelerator, nodes=dict(nodes.most_common()),
                     fallbacks=tuple(f"{op_type} {name}" for name, op_type in fallbacks))
