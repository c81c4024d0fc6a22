"""The FLOP count the serving benchmarks report (`loadtest.bench.inference.request_flops`)."""

from __future__ import annotations

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
