"""The model config saved inside every checkpoint and bundle, and `build_model` that rebuilds from it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from model.feature_spec import FeatureSpec, SpecError, from_dict_strict

ARCHS = ("din", "transformer", "onetrans", "dual_stream")
SEQ_VARIANTS = ("pos", "mix-pbe", "mix-tapf", "pos-tapf")
TAPF_PLACEMENTS = ("encoded", "input")
AGGREGATE_TOKENS = ("all", "final")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    arch: str = "onetrans"
    seq_variant: str = "mix-tapf"  # pos | mix-pbe | mix-tapf | pos-tapf
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    ffn_mult: int = 2
    # TAPF placement: "encoded" = gate the candidate-independent encoder output per candidate
    # (the encoder runs once per user); "input" = the paper's literal order, gate the input
    # tokens and run the whole encoder once per candidate.
    tapf_placement: str = "encoded"
    d_polarity: int = 16  # d_p, width of TAPF's polarity embedding b_p (eq. 4)
    event_embedding: bool = False  # learned embedding per event type (click/like/skip/dislike)
    attention_hidden: int = 32  # DIN activation-unit width
    head_hidden: tuple[int, ...] = (128, 64)
    n_ns_tokens: int = 4  # OneTrans: NS tokens made by the auto-split MLP
    pyramid_final: float = 0.5  # OneTrans: share of S queries the last layer keeps
    # OneTrans: which S tokens TAPF gates and the NS tokens pool. "all" = every token, each at the last layer
    # that updated it (the pyramid's exits); "final" = only the tokens the last layer kept (the most recent;
    # in a mixed sequence those are mostly skips, since skips outnumber clicks).
    aggregate: str = "all"
    # OneTrans, encoded placement: TAPF gates each encoded token plus its own RMS-normalised input token.
    gate_token_skip: bool = True

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise SpecError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.seq_variant not in SEQ_VARIANTS:
            raise SpecError(f"seq_variant must be one of {SEQ_VARIANTS}, got {self.seq_variant!r}")
        if self.tapf_placement not in TAPF_PLACEMENTS:
            raise SpecError(f"tapf_placement must be one of {TAPF_PLACEMENTS}, got {self.tapf_placement!r}")
        if self.d_model % self.n_heads:
            raise SpecError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.arch == "dual_stream" and self.uses_tapf:
            raise SpecError("dual_stream separates polarities structurally; use seq_variant mix-pbe or pos")
        if self.aggregate not in AGGREGATE_TOKENS:
            raise SpecError(f"aggregate must be one of {AGGREGATE_TOKENS}, got {self.aggregate!r}")
        if not 0.0 < self.pyramid_final <= 1.0:
            raise SpecError(f"pyramid_final must be in (0, 1], got {self.pyramid_final}")

    @property
    def uses_tapf(self) -> bool:
        return self.seq_variant.endswith("tapf")

    @property
    def uses_polarity_embedding(self) -> bool:
        return self.seq_variant.startswith("mix")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["head_hidden"] = list(self.head_hidden)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        if "head_hidden" in data:
            data["head_hidden"] = tuple(data["head_hidden"])
        cfg: ModelConfig = from_dict_strict(cls, data)
        return cfg


def build_model(config: ModelConfig, spec: FeatureSpec) -> nn.Module:
    from model.models.din import DIN
    from model.models.dual_stream import DualStream
    from model.models.onetrans import OneTrans
    from model.models.transformer import TransformerCTR

    classes: dict[str, type[nn.Module]] = {"din": DIN, "transformer": TransformerCTR, "onetrans": OneTrans,
                                           "dual_stream": DualStream}
    return classes[config.arch](config=config, spec=spec)
