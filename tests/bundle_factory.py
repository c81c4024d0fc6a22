"""A small real model bundle for tests outside `tests/export`: trained on the synthetic world and
exported by the real exporter (parity-checked), cached per arguments under one directory.

Service, load-test, deploy and reliability tests all score against a bundle built this way, so what
they serve is exactly what `polarity export` writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, kw_only=True)
class BuiltBundle:
    log: Path  # the synthetic event log the model was trained on
    run_dir: Path  # training run (checkpoint.pt, metrics.json)
    bundle: Path  # exported bundle (model.onnx, manifest.json, vocab/)


def build_bundle(root: Path, *, arch: str = "onetrans", seq: str = "mix-tapf", seq_len: int = 20, d_model: int = 16,
                 users: int = 60, items: int = 300, events: int = 6000, seed: int = 0,
                 max_train_samples: int = 3000, name: str = "tiny", version: str | None = None,
                 drop_category: bool = False) -> BuiltBundle:
    """Synth -> train -> export into `root` (reused when `root/bundle/manifest.json` exists).
    drop_category: write the log without its optional `category` column."""
    import torch

    from export.pipeline import export_bundle
    from model.data.events import write_event_log
    from model.data.synthetic import SyntheticWorldConfig, generate
    from model.training.config import TrainConfig
    from model.training.loop import train

    root.mkdir(parents=True, exist_ok=True)
    log, run_dir, bundle = root / "events.parquet", root / "run", root / "bundle"
    if (bundle / "manifest.json").is_file():
        return BuiltBundle(log=log, run_dir=run_dir, bundle=bundle)
    write_event_log(generate(SyntheticWorldConfig(users=users, items=items, events=events, seed=seed)), log)
    if drop_category:
        import pyarrow.parquet as pq

        pq.write_table(pq.read_table(log).drop(["category"]), log)
    threads = torch.get_num_threads()
    try:
        train(TrainConfig(data=str(log), arch=arch, seq=seq, seq_len=seq_len, d_model=d_model, batch_size=256,
                          max_train_samples=max_train_samples, threads=1, seed=seed), out=run_dir, progress=False)
        export_bundle(run_dir, bundle, check=True, name=name, version=version)
    finally:
        torch.set_num_threads(threads)
    return BuiltBundle(log=log, run_dir=run_dir, bundle=bundle)
