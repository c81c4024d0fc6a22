"""The FLOP count the serving benchmarks report (`loadtest.bench.inference.request_flops`)."""

from __future__ import annotations

from typing import Any

import torch

from loadtest.bench.inference import request_flops
from model.features.spec import FeatureSpec, SequenceSpec
from model.models import build_model
from model.models.config import ModelConfig


def _model(arch: str, d: int, length: int) -> tuple[torch.nn.Module, FeatureSpec]:
    torch.manual_seed(0)
    spec = FeatureSpec(sequence=SequenceSpec(seq_len=length), n_items=50, n_categories=3,
                       event_types=("<pad>", "click", "skip"), event_polarity=(0, 1, -1))
    return build_model(ModelConfig(arch=arch, seq_variant="mix-tapf", d_model=d, n_heads=2), spec).eval(), spec


def test_flops_count_the_fused_gate() -> None:
    """The gate is counted as its GEMMs: 4·N·L·d² per request (W_int, W_mix per candidate token) plus 2·L·d²
    (W_tok once for the one user with a full history), linear in N."""
    d, length = 16, 12
    model, spec = _model("onetrans", d, length)
    gate = {n: request_flops(model, spec, n_cand=n) - request_flops(model, spec, n_cand=n, count_gate=False)
            for n in (100, 200)}
    assert gate[100] == 4 * 100 * length * d * d + 2 * length * d * d
    assert gate[200] - gate[100] == 4 * 100 * length * d * d


def test_flops_grow_linearly_in_candidates_for_every_arch() -> None:
    """Past the per-user part, every candidate costs the same: f(3N) - f(2N) == f(2N) - f(N) > 0."""
    for arch in ("onetrans", "din", "transformer"):
        model, spec = _model(arch, 16, 10)
        f = {n: request_flops(model, spec, n_cand=n) for n in (50, 100, 150)}
        assert f[150] - f[100] == f[100] - f[50] > 0, arch


def test_node_flops_from_profile_shapes() -> None:
    """The per-node FLOPs of the serving bench's profile table: 2·batch·M·K·N for (batched) matrix products, the
    transposed B of a FusedMatMul recognised, the TAPF gate as its GEMMs, nothing for memory-bound ops."""
    from loadtest.bench.inference import node_flops

    assert node_flops("MatMul", [[500, 4, 100], [500, 100, 64]]) == 2 * 500 * 4 * 100 * 64
    assert node_flops("MatMul", [[4, 500, 64], [4, 64, 128]]) == 2 * 4 * 500 * 64 * 128
    assert node_flops("FusedMatMul", [[500, 4, 64], [500, 100, 64]]) == 2 * 500 * 4 * 64 * 100
    assert node_flops("Gemm", [[32, 64], [64, 16]]) == 2 * 32 * 64 * 16
    tokens, cand = [1, 100, 64], [500, 64]
    assert node_flops("TAPFGate", [tokens, [1, 100], cand, [500]]) == 4 * 500 * 100 * 64 * 64 + 2 * 100 * 64 * 64
    assert node_flops("Add", [[2, 3], [2, 3]]) is None


def test_node_profile_tables_a_real_bundle(tiny_bundle: Any) -> None:
    from export.bundle import load_manifest
    from export.reference import random_inputs
    from loadtest.bench.inference import node_profile

    manifest = load_manifest(tiny_bundle.bundle)
    feed = random_inputs(manifest.feature_spec, n_users=1, n_candidates=20, seed=0).as_dict()
    lines = node_profile(manifest.model_path, feed, kernel=False, peak=100.0, runs=2)
    ops = [line.split(" | ")[0].lstrip("| ") for line in lines if line.startswith("| ") and " | " in line]
    assert "MatMul" in ops or "FusedMatMul" in ops
    assert any(line.startswith("| `node_") for line in lines)  # the slowest nodes, by name
