"""The feature specification: everything needed to turn raw events into model inputs.

It travels inside every checkpoint and every exported bundle (nanoGPT style: the artifact
describes itself), so the trainer, the exporter and the service agree on vocabularies,
sequence length and polarity ratio without any other input. Torch-free.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Index 0 is padding everywhere; index 1 is the out-of-vocabulary bucket (cold-start items,
# unseen categories). Real ids start at 2.
PAD_INDEX = 0
OOV_INDEX = 1
FIRST_ID_INDEX = 2

N_HISTORY_STATS = 4  # log1p(#pos), log1p(#neg), positive rate, log1p(seconds since last event)
HISTORY_STAT_NAMES = ("log_n_pos", "log_n_neg", "pos_rate", "log_secs_since_last")

SEQUENCE_MODES = ("pos", "mix", "grouped", "random_history", "random_polarity", "random_universe")


class SpecError(ValueError):
    """A spec or config that cannot be used (unknown keys, bad values)."""


def from_dict_strict(cls: type, data: dict[str, Any]) -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown keys (typos must not pass silently)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SpecError(f"{cls.__name__}: unknown key(s) {unknown}; known keys are {sorted(names)}")
    return cls(**data)


@dataclass(frozen=True, kw_only=True)
class SequenceSpec:
    """How a behaviour sequence is assembled (paper §3.3)."""

    seq_len: int = 100  # L
    pos_ratio: float = 0.5  # r: floor(r*L) positive slots, floor((1-r)*L) negative slots
    mode: str = "mix"
    fill_budget: bool = False  # let one polarity use the slots the other leaves empty
    history_cap: int = 512  # per-polarity events the online store must keep per user (at least)
    # History counts are clipped here, well below history_cap, so that an online history trimmed
    # to its most recent events gives the same statistics as the full offline log.
    stats_cap: int = 256
    seed: int = 0  # for the random_* ablation modes (counter-based, so offline == online)

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise SpecError(f"seq_len must be >= 1, got {self.seq_len}")
        if not 0.0 <= self.pos_ratio <= 1.0:
            raise SpecError(f"pos_ratio must be in [0, 1], got {self.pos_ratio}")
        if self.mode not in SEQUENCE_MODES:
            raise SpecError(f"mode must be one of {SEQUENCE_MODES}, got {self.mode!r}")
        if self.history_cap < self.seq_len:
            raise SpecError(f"history_cap ({self.history_cap}) must be >= seq_len ({self.seq_len})")
        if not 1 <= self.stats_cap <= self.history_cap:
            raise SpecError(f"stats_cap must be in [1, history_cap], got {self.stats_cap}")

    @property
    def pos_budget(self) -> int:
        """floor(r L) positive slots (all L slots in `pos` mode)."""
        if self.mode == "pos":
            return self.seq_len
        return int(self.pos_ratio * self.seq_len + 1e-9)

    @property
    def neg_budget(self) -> int:
        """floor((1 - r) L) negative slots (none in `pos` mode)."""
        if self.mode == "pos":
            return 0
        return int((1.0 - self.pos_ratio) * self.seq_len + 1e-9)


@dataclass(frozen=True, kw_only=True)
class FeatureSpec:
    """Vocabulary sizes and the sequence spec; vocab contents live in `Vocabulary`."""

    sequence: SequenceSpec = field(default_factory=SequenceSpec)
    n_items: int  # including PAD and OOV
    n_categories: int  # including PAD and OOV
    event_types: tuple[str, ...]  # index 0 is "<pad>"
    event_polarity: tuple[int, ...]  # polarity per event type index (0 for "<pad>")
    n_stats: int = N_HISTORY_STATS

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["event_types"] = list(self.event_types)
        d["event_polarity"] = list(self.event_polarity)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureSpec:
        data = dict(data)
        seq = from_dict_strict(SequenceSpec, dict(data.pop("sequence", {})))
        data["event_types"] = tuple(data.get("event_types", ()))
        data["event_polarity"] = tuple(data.get("event_polarity", ()))
        spec: FeatureSpec = from_dict_strict(cls, {**data, "sequence": seq})
        return spec

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: Path) -> FeatureSpec:
        return cls.from_dict(json.loads(path.read_text()))
