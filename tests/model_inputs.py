"""A tiny feature spec and random model inputs for it, shared by the model tests (torch)."""

from __future__ import annotations

import torch

from model.features.spec import FeatureSpec, SequenceSpec

SPEC = FeatureSpec(sequence=SequenceSpec(seq_len=12, history_cap=64, stats_cap=32), n_items=50, n_categories=7,
                   event_types=("<pad>", "click", "skip"), event_polarity=(0, 1, -1))


def random_inputs(u: int, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs of `u` users (the first with a short, left-padded history) and `n` candidates spread over them."""
    g = torch.Generator().manual_seed(seed)
    length = SPEC.sequence.seq_len
    mask = torch.ones(u, length, dtype=torch.bool)
    mask[0, : length // 2] = False  # a short, left-padded history
    pol = (torch.randint(0, 2, (u, length), generator=g) * 2 - 1) * mask
    return {
        "seq_item": torch.randint(2, 50, (u, length), generator=g) * mask,
        "seq_category": torch.randint(2, 7, (u, length), generator=g) * mask,
        "seq_polarity": pol, "seq_event": torch.where(pol > 0, 1, 2) * mask, "seq_mask": mask,
        "user_stats": torch.rand(u, 4, generator=g),
        "cand_item": torch.randint(1, 50, (n,), generator=g), "cand_category": torch.randint(1, 7, (n,), generator=g),
        "cand_user": torch.randint(0, u, (n,), generator=g),
    }
