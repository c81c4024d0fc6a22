"""A randomly initialised model of a given shape, saved as a run and exported as a real bundle.

Serving speed does not depend on the weights, so the benchmarks serve an untrained OneTrans+TAPF at
the paper's shape (L=100, d=64) through the real exporter (`export.pipeline.export_bundle`). Item
ids are "0".."n_items-1" and categories "0".."n_categories-1", like the synthetic world's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.features.spec import FIRST_ID_INDEX, PAD_INDEX
from model.features.vocab import Vocabulary

EVENT_TYPES = ("<pad>", "click", "dislike", "like", "negative", "positive", "skip")
EVENT_POLARITY = (0, 1, -1, 1, -1, 1, -1)


@dataclass(frozen=True, kw_only=True)
class RandomRun:
    run_dir: Path
    bundle: Path
    seq_len: int
    d_model: int


def random_vocabulary(*, n_items: int, n_categories: int, seed: int = 0) -> Vocabulary:
    rng = np.random.default_rng(seed)
    item_category = np.concatenate([[PAD_INDEX, PAD_INDEX],
                                    FIRST_ID_INDEX + rng.integers(0, n_categories, size=n_items)]).astype(np.int64)
    return Vocabulary(items=tuple(str(i) for i in range(n_items)),
                      categories=tuple(str(c) for c in range(n_categories)),
                      item_category=item_category[: n_items + FIRST_ID_INDEX], event_types=EVENT_TYPES,
                      event_polarity=EVENT_POLARITY)


def random_run(root: Path, *, seq_len: int = 100, d_model: int = 64, arch: str = "onetrans", seq: str = "mix-tapf",
               n_items: int = 20_000, n_categories: int = 50, seed: int = 0, check: bool = False,
               export: bool = True) -> RandomRun:
    """Write `root/run` (checkpoint of an untrained model) and export it to `root/bundle` (unless not
    `export`); reused when present."""
    import torch

    from export.pipeline import export_bundle
    from model.models import build_model
    from model.training.checkpoint import save_checkpoint
    from model.training.config import TrainConfig

    run_dir, bundle = root / "run", root / "bundle"
    if not (run_dir / "checkpoint.pt").is_file():
        torch.manual_seed(seed)
        cfg = TrainConfig(data="<random>", arch=arch, seq=seq, seq_len=seq_len, d_model=d_model, seed=seed)
        vocab = random_vocabulary(n_items=n_items, n_categories=n_categories, seed=seed)
        spec = vocab.feature_spec(cfg.sequence_spec())
        model = build_model(cfg.model_config(), spec).eval()
        save_checkpoint(run_dir, model=model, cfg=cfg, spec=spec, vocab=vocab, metrics={})
    if export and not (bundle / "manifest.json").is_file():
        export_bundle(run_dir, bundle, check=check, name=f"random-{arch}-L{seq_len}-d{d_model}")
    return RandomRun(run_dir=run_dir, bundle=bundle, seq_len=seq_len, d_model=d_model)
