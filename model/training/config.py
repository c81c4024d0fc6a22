"""`TrainConfig`: everything `polarity train` takes, checked before any data is read.

Defaults follow the paper (§4.1). The command line reads its flags, defaults and choices from these
fields (`model.config_flags`), so there is no second copy of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from model.config_flags import config_field
from model.data import SOURCES, SPLITS
from model.features.spec import SEQUENCE_MODES, SequenceSpec, SpecError, from_dict_strict
from model.models.config import ARCHS, SEQ_VARIANTS, ModelConfig
from model.training.schedule import LR_SCHEDULES

ABLATION_MODES = tuple(m for m in SEQUENCE_MODES if m not in ("pos", "mix"))


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything `polarity train` takes. Model shape defaults follow the paper (§4.1); the optimisation
    defaults (batch 256, peak lr 2e-3 with 200 warm-up steps and cosine decay over up to 5 epochs, validation
    every 500 steps, the best checkpoint by validation AUC, early stopping after 3 validations without a
    better one) are the ones measured in BENCHMARKS.md *Training that does not decay*."""

    data: str = config_field(help="event log (.csv/.parquet) or a KuaiRec/KuaiRand directory")
    source: str = config_field("auto", help="how to read --data", choices=SOURCES)
    arch: str = config_field("onetrans", help="model architecture", choices=ARCHS)
    seq: str = config_field("mix-tapf", help="sequence variant: positives only or mixed, with PBE or TAPF",
                            choices=SEQ_VARIANTS)
    seq_mode: str | None = config_field(None, help="data-side ablation of the mixed sequence",
                                        choices=ABLATION_MODES)
    seq_len: int = config_field(100, help="L, tokens per sequence")
    pos_ratio: float = config_field(0.5, help="r, share of positive slots")
    fill_budget: bool = config_field(False, help="let one polarity use the other's empty slots")
    split: str = config_field("temporal", help="how the log is split into train/valid/test", choices=SPLITS)
    epochs: int = config_field(5, help="passes over the training part at most (early stopping may end sooner); "
                                       "the cosine decay spans all of them")
    batch_size: int = config_field(256, help="samples per optimiser step")
    # The optimiser step sees the whole batch; forward/backward run in micro-batches whose
    # (N, L, d) activations stay in the CPU cache (same gradient, several times faster on CPU).
    micro_batch: int = config_field(256, help="samples per forward/backward chunk of a batch, same gradient "
                                                   "(0 = the whole batch)")
    lr: float = config_field(2e-3, help="peak learning rate (AdamW), reached after the warm-up")
    lr_schedule: str = config_field("cosine", help="after the warm-up: cosine decay to min_lr_ratio * lr over "
                                                  "all epochs' steps, or constant", choices=LR_SCHEDULES)
    warmup_steps: int = config_field(200, help="optimiser steps of linear warm-up from 0 to lr")
    min_lr_ratio: float = config_field(0.0, help="where the cosine decay ends, as a share of lr")
    weight_decay: float = config_field(0.0, help="AdamW decoupled weight decay")
    dropout: float = config_field(0.0, help="dropout in the prediction head's hidden layers (training only)")
    valid_every: int = config_field(500, help="validate every N optimiser steps and at each epoch's end "
                                              "(0 = at epoch ends only)")
    patience: int = config_field(3, help="stop after N validations in a row without a better validation AUC "
                                         "(0 = never stop early); the best one is the checkpoint kept")
    d_model: int = config_field(64, help="d, embedding and model width")
    seed: int = config_field(0, help="random seed (initialisation, shuffling, random_* ablations)")
    threads: int = config_field(0, help="torch intra-op threads (0 = all cores)")
    max_train_samples: int = config_field(0, help="train on the most recent N training impressions (0 = all)")
    eval_batch_size: int = config_field(8192, help="samples per evaluation batch")
    eval_valid: bool = config_field(True, help="evaluate the validation part (experiments reporting only test "
                                               "may skip it)")
    # > 0: stream a Parquet log sorted by user in user-aligned chunks of about this many rows
    # (bounded memory for 100M-event logs; temporal split only); 0: load the whole log in memory.
    stream_chunk_rows: int = config_field(0, help="stream a Parquet log sorted by user in chunks of about N rows "
                                                  "(bounded memory for 100M-event logs; temporal split); "
                                                  "0 = load it in memory")
    model_overrides: dict[str, Any] = config_field(  # noqa: RUF009 (config_field is dataclasses.field)
        factory=dict, help='JSON of model config fields, e.g. \'{"n_layers": 3}\' or \'{"aggregate": "final"}\'')

    def __post_init__(self) -> None:
        """Every choice and the model and sequence configs are checked here, before any data is read."""
        for name, choices in (("source", SOURCES), ("split", SPLITS), ("seq", SEQ_VARIANTS), ("arch", ARCHS)):
            if getattr(self, name) not in choices:
                raise SpecError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.seq_mode is not None and self.seq_mode not in ABLATION_MODES:
            raise SpecError(f"seq_mode must be one of {ABLATION_MODES}, got {self.seq_mode!r}")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise SpecError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("micro_batch", "threads", "max_train_samples", "stream_chunk_rows", "warmup_steps",
                     "valid_every", "patience"):
            if getattr(self, name) < 0:
                raise SpecError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise SpecError(f"lr must be > 0, got {self.lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise SpecError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise SpecError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            raise SpecError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.dropout < 1.0:
            raise SpecError(f"dropout must be in [0, 1), got {self.dropout}")
        self.model_config()  # unknown or bad model keys fail now, not after the log is read
        self.sequence_spec()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        cfg: TrainConfig = from_dict_strict(cls, data)
        return cfg

    def sequence_spec(self) -> SequenceSpec:
        mode = self.seq_mode or ("pos" if self.seq.startswith("pos") else "mix")
        return SequenceSpec(
            seq_len=self.seq_len, pos_ratio=1.0 if mode == "pos" else self.pos_ratio, mode=mode,
            fill_budget=self.fill_budget, seed=self.seed,
        )

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(
            {"arch": self.arch, "seq_variant": self.seq, "d_model": self.d_model, "dropout": self.dropout,
             **self.model_overrides}
        )
