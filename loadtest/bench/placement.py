"""`polarity bench --only placement`: serving time per request of the two TAPF placements (torch eager)."""

from __future__ import annotations

import os

import numpy as np
import torch

from loadtest.bench.report import section_header
from model.experiments.report import ARCH_LABEL
from model.models.config import ModelConfig


@torch.no_grad()
def placement_cost(*, seq_len: int = 100, d_model: int = 64, candidates: tuple[int, ...] = (100, 500),
                   repeats: int = 7, n_items: int = 20_000) -> str:
    """Serving time per request (one user, N candidates, torch eager) of the two TAPF placements.

    "encoded": the sequence encoder runs once per user and TAPF gates its output per candidate;
    "input": the paper's literal order, TAPF gates the input tokens, so the encoder runs per candidate.
    DIN has no encoder, so its two placements are the same computation and only "encoded" is timed.
    Median of `repeats` calls after two warm-up calls; random weights (cost does not depend on them).
    """
    import time

    from model.features.spec import FeatureSpec, SequenceSpec
    from model.models import build_model

    spec = FeatureSpec(sequence=SequenceSpec(seq_len=seq_len), n_items=n_items + 2, n_categories=52,
                       event_types=("<pad>", "click", "skip"), event_polarity=(0, 1, -1))
    g = torch.Generator().manual_seed(0)
    polarity = torch.randint(0, 2, (1, seq_len), generator=g) * 2 - 1  # (1, L) full history
    seq = {"seq_item": torch.randint(2, n_items + 2, (1, seq_len), generator=g),
           "seq_category": torch.randint(2, 52, (1, seq_len), generator=g), "seq_polarity": polarity,
           "seq_event": torch.where(polarity > 0, 1, 2), "seq_mask": torch.ones(1, seq_len, dtype=torch.bool),
           "user_stats": torch.rand(1, spec.n_stats, generator=g)}
    rows = []
    for arch in ("din", "transformer", "onetrans", "hyformer", "mixformer"):
        for placement in ("encoded",) if arch == "din" else ("encoded", "input"):
            model = build_model(ModelConfig(arch=arch, seq_variant="mix-tapf", d_model=d_model,
                                            tapf_placement=placement), spec).eval()
            cells = []
            for n in candidates:
                x = {**seq, "cand_item": torch.randint(2, n_items + 2, (n,), generator=g),
                     "cand_category": torch.randint(2, 52, (n,), generator=g),
                     "cand_user": torch.zeros(n, dtype=torch.long)}
                times = []
                for i in range(repeats + 2):
                    t0 = time.perf_counter()
                    model(**x)
                    if i >= 2:
                        times.append(time.perf_counter() - t0)
                cells.append(f"{1000 * float(np.median(times)):.1f}")
            rows.append(f"| {ARCH_LABEL[arch]} | {placement} | " + " | ".join(cells) + " |")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"\nOne request = 1 user's sequence (L={seq_len}, all slots filled) + N candidates, mix-tapf, d={d_model}, "
            f"torch {torch.__version__} eager on CPU, {torch.get_num_threads()} threads, median of {repeats} calls. "
            f"Load average at the end: {load}.\n\n| model | TAPF placement | "
            + " | ".join(f"ms / request, N={n}" for n in candidates) + " |\n|---|---|" + "---|" * len(candidates)
            + "\n" + "\n".join(rows) + "\n")


def bench_placement() -> str:
    """TAPF placement: serving time per request, encoded vs literal input placement."""
    return section_header("TAPF placement: serving cost per request (torch)") + placement_cost()
