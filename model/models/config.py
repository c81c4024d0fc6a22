"""The model config saved inside every checkpoint and bundle (nanoGPT style: the artifact describes itself).

`ModelConfig` holds what every architecture shares; `options` holds the chosen architecture's own
fields, one frozen dataclass per architecture (`ARCH_OPTIONS`). Both are parsed strictly: an unknown
key, or an option of another architecture, is refused with the keys that are known. The classes that
build a model from a config are in `model.models` (`build_model`), so this module imports no model.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from model.features.spec import SpecError, from_dict_strict

SEQ_VARIANTS = ("pos", "mix-pbe", "mix-tapf", "pos-tapf")
TAPF_PLACEMENTS = ("encoded", "input")
AGGREGATE_TOKENS = ("all", "final")
NS_LAYER_TOKENS = ("all", "clicks")


@dataclass(frozen=True, kw_only=True)
class ArchOptions:
    """Base of every architecture's own options."""

    # Options added after checkpoints were first written, whose default then changed behaviour -> the value that
    # keeps the behaviour of a checkpoint written before the option existed (`ModelConfig.from_saved`).
    SAVED_BEFORE: ClassVar[dict[str, Any]] = {}

    def check(self, config: ModelConfig) -> None:
        """Refuse (SpecError) options that do not fit the rest of the config; called by `ModelConfig`."""


@dataclass(frozen=True, kw_only=True)
class TargetAttentionOptions(ArchOptions):
    """DIN, Transformer and dual-stream: a DIN activation unit pools the (encoded) tokens per candidate."""

    attention_hidden: int = 32  # DIN activation-unit width

    def __post_init__(self) -> None:
        if self.attention_hidden < 1:
            raise SpecError(f"attention_hidden must be >= 1, got {self.attention_hidden}")


@dataclass(frozen=True, kw_only=True)
class DINOptions(TargetAttentionOptions):
    """DIN. polarity_pools: with a mixed sequence (mix-pbe, mix-tapf), one target-attention pool over the click
    tokens and another over the skip tokens (one activation unit scores every token; each polarity has its own
    masked softmax; an empty pool is zeros), and the head reads both, so a skip weighs in its own pool instead of
    competing with the clicks for one softmax's mass (DFN's separate click / unclick pools). Ignored for
    positive-only sequences (pos, pos-tapf): the model is then exactly the one-pool DIN. On by default (it won on
    the quality-bar worlds, BENCHMARKS.md *DIN with one pool per polarity*); checkpoints written before the option
    existed keep their one pool (`SAVED_BEFORE`)."""

    polarity_pools: bool = True

    SAVED_BEFORE: ClassVar[dict[str, Any]] = {"polarity_pools": False}  # checkpoints before it had one pool


@dataclass(frozen=True, kw_only=True)
class OneTransOptions(ArchOptions):
    n_ns_tokens: int = 4  # NS tokens made by the auto-split MLP
    pyramid_final: float = 0.5  # share of S queries the last layer keeps
    # Which S tokens TAPF gates and the NS tokens pool. "all" = every token, each at the last layer that
    # updated it (the pyramid's exits); "final" = only the tokens the last layer kept (the most recent; in a
    # mixed sequence those are mostly skips, since skips outnumber clicks).
    aggregate: str = "all"
    # Encoded placement: TAPF gates each encoded token plus its own RMS-normalised input token.
    gate_token_skip: bool = True
    # The NS tokens' final aggregation: False = one softmax over all S tokens (clicks and skips compete for one
    # attention mass, and trained models leave the skips next to none); True = one softmax over the click tokens
    # and one over the skip tokens, each with its own query and output projection (polarity-separated pooling, as
    # DFN pools its feedback sequences). Mixed sequences only: a positive-only sequence has no skips to pool.
    # BENCHMARKS.md *OneTrans: one aggregation pool per polarity*: skip response 91% vs 73% of users, 3 seeds.
    polarity_pools: bool = True
    # What the NS tokens read from the S tokens in each layer of the stack: "all" = clicks and skips in one softmax;
    # "clicks" = the click tokens only (skips then reach the NS tokens through their own pool at the end,
    # `polarity_pools`, and through the click tokens that attend to them in the S stack). No effect on a positive-only
    # sequence. BENCHMARKS.md *OneTrans: what the NS layers read*: "clicks" lifts mix-pbe from below positive-only to
    # above it and costs the served mix-tapf a little (L=100, 3 seeds), so the default stays "all".
    ns_layers_read: str = "all"

    SAVED_BEFORE: ClassVar[dict[str, Any]] = {"polarity_pools": False}  # checkpoints before it had one pool

    def __post_init__(self) -> None:
        if self.n_ns_tokens < 1:
            raise SpecError(f"n_ns_tokens must be >= 1, got {self.n_ns_tokens}")
        if self.ns_layers_read not in NS_LAYER_TOKENS:
            raise SpecError(f"ns_layers_read must be one of {NS_LAYER_TOKENS}, got {self.ns_layers_read!r}")
        if self.aggregate not in AGGREGATE_TOKENS:
            raise SpecError(f"aggregate must be one of {AGGREGATE_TOKENS}, got {self.aggregate!r}")
        if not 0.0 < self.pyramid_final <= 1.0:
            raise SpecError(f"pyramid_final must be in (0, 1], got {self.pyramid_final}")


@dataclass(frozen=True, kw_only=True)
class DualStreamOptions(TargetAttentionOptions):
    """Dual stream; with `contrastive_weight` > 0 the dual encoder's contrastive term is added to the training
    loss (`DualStream.auxiliary_loss`; the served model is the same)."""

    contrastive_weight: float = 0.0
    contrastive_temperature: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.contrastive_weight < 0 or self.contrastive_temperature <= 0:
            raise SpecError("contrastive_weight must be >= 0 and contrastive_temperature > 0")


@dataclass(frozen=True, kw_only=True)
class QueryTokenOptions(ArchOptions):
    """HyFormer and MixFormer: query tokens per candidate read the sequence layer by layer (`models.unified`)."""

    # Encoded placement: TAPF gates each final sequence state plus its own RMS-normalised input token.
    gate_token_skip: bool = True


@dataclass(frozen=True, kw_only=True)
class HyFormerOptions(QueryTokenOptions):
    n_global_tokens: int = 2  # global query tokens N_q; Query Boosting mixes N_q + 2 tokens

    def check(self, config: ModelConfig) -> None:
        if self.n_global_tokens < 1 or config.d_model % (self.n_global_tokens + 2):
            raise SpecError(f"hyformer mixes n_global_tokens + 2 = {self.n_global_tokens + 2} tokens: d_model "
                            f"({config.d_model}) must be divisible by it")


@dataclass(frozen=True, kw_only=True)
class MixFormerOptions(QueryTokenOptions):
    n_mix_heads: int = 4  # non-sequential heads N (head mixing splits d into N slices)

    def check(self, config: ModelConfig) -> None:
        if self.n_mix_heads < 1 or config.d_model % self.n_mix_heads:
            raise SpecError(f"mixformer: d_model ({config.d_model}) must be divisible by n_mix_heads "
                            f"({self.n_mix_heads})")


@dataclass(frozen=True, kw_only=True)
class SINEOptions(ArchOptions):
    n_interests: int = 3  # sub-interest prototypes K
    cross_interest_weight: float = 0.5  # beta on attention across sub-interests (1 within one)
    rand_weight: float = 0.5  # L1: BPR of the next positive against a random catalogue item
    # L2: BPR of the next positive against the skip right before it. 0.1, not 0.5: with 0.5 the observed skips
    # as negatives cost 0.017 valid AUC against 0.1 (single-seed probes, BENCHMARKS.md *RQ1 with every architecture*).
    feedback_weight: float = 0.1
    dcor_weight: float = 0.1  # L_dis: distance correlation of the prototypes

    def __post_init__(self) -> None:
        if self.n_interests < 2:
            raise SpecError(f"sine needs at least 2 sub-interests, got {self.n_interests}")
        if not 0.0 <= self.cross_interest_weight <= 1.0:
            raise SpecError(f"cross_interest_weight must be in [0, 1], got {self.cross_interest_weight}")
        if min(self.rand_weight, self.feedback_weight, self.dcor_weight) < 0:
            raise SpecError("sine's loss weights must be >= 0")

    def check(self, config: ModelConfig) -> None:
        if config.uses_tapf:
            raise SpecError("sine has no per-token candidate pooling for TAPF to gate; use seq_variant mix-pbe or pos")


# Architecture name -> its options class. `model.models.ARCHITECTURES` maps the same names to model classes.
ARCH_OPTIONS: dict[str, type[ArchOptions]] = {
    "din": DINOptions,
    "transformer": TargetAttentionOptions,
    "onetrans": OneTransOptions,
    "dual_stream": DualStreamOptions,
    "hyformer": HyFormerOptions,
    "mixformer": MixFormerOptions,
    "sine": SINEOptions,
}
ARCHS = tuple(ARCH_OPTIONS)

OptionsT = TypeVar("OptionsT", bound=ArchOptions)


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
    # HNT-style weak signals (`model.modules.weak_signals`): hesitation token type + negative-transfer gate.
    weak_signals: bool = False
    head_hidden: tuple[int, ...] = (128, 64)
    dropout: float = 0.0  # in the prediction head's hidden layers (training only; export runs in eval mode)
    options: ArchOptions | None = None  # the arch's own options; None = its defaults

    def __post_init__(self) -> None:
        if self.arch not in ARCH_OPTIONS:
            raise SpecError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        kind = ARCH_OPTIONS[self.arch]
        if self.options is None:
            object.__setattr__(self, "options", kind())
        elif type(self.options) is not kind:
            raise SpecError(f"arch {self.arch!r} takes {kind.__name__} options, got {type(self.options).__name__}")
        if self.seq_variant not in SEQ_VARIANTS:
            raise SpecError(f"seq_variant must be one of {SEQ_VARIANTS}, got {self.seq_variant!r}")
        if self.tapf_placement not in TAPF_PLACEMENTS:
            raise SpecError(f"tapf_placement must be one of {TAPF_PLACEMENTS}, got {self.tapf_placement!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise SpecError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.d_model % self.n_heads:
            raise SpecError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.arch == "dual_stream" and self.uses_tapf:
            raise SpecError("dual_stream separates polarities structurally; use seq_variant mix-pbe or pos")
        assert self.options is not None
        self.options.check(self)

    @property
    def uses_tapf(self) -> bool:
        return self.seq_variant.endswith("tapf")

    @property
    def uses_polarity_embedding(self) -> bool:
        return self.seq_variant.startswith("mix")

    def arch_options(self, kind: type[OptionsT]) -> OptionsT:
        """This config's options as `kind` (a model reads its own options through this)."""
        if not isinstance(self.options, kind):
            raise SpecError(f"arch {self.arch!r} has {type(self.options).__name__} options, not {kind.__name__}")
        return self.options

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        d["head_hidden"] = list(self.head_hidden)
        d["options"] = dataclasses.asdict(self.options) if self.options is not None else {}
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Strict: keys are ModelConfig's fields, `options` a dict of the arch's options. An arch option may
        also be given at the top level (`--model-overrides '{"aggregate": "final"}'`); it joins `options`.
        A checkpoint's config goes through `from_saved` instead."""
        data = dict(data)
        arch = data.get("arch", cls.arch)
        if arch not in ARCH_OPTIONS:
            raise SpecError(f"arch must be one of {ARCHS}, got {arch!r}")
        kind = ARCH_OPTIONS[arch]
        shared = {f.name for f in dataclasses.fields(cls)}
        own = {f.name for f in dataclasses.fields(kind)}
        options = dict(data.pop("options", None) or {})
        unknown = sorted(k for k in data if k not in shared and k not in own)
        if unknown:
            raise SpecError(f"ModelConfig: unknown key(s) {unknown} for arch {arch!r}; known keys are "
                            f"{sorted((shared - {'options'}) | own)}")
        for key in [k for k in data if k not in shared]:
            options[key] = data.pop(key)
        check_value_types(cls, data)
        check_value_types(kind, options)
        if "head_hidden" in data:
            data["head_hidden"] = tuple(data["head_hidden"])
        cfg: ModelConfig = from_dict_strict(cls, {**data, "options": from_dict_strict(kind, options)})
        return cfg

    @classmethod
    def from_saved(cls, data: dict[str, Any]) -> ModelConfig:
        """A config that `to_dict` wrote (a checkpoint's). `to_dict` writes every option of the arch, so an option
        missing from its `options` did not exist when it was written: it takes the value that keeps the behaviour
        the checkpoint was trained with (`ArchOptions.SAVED_BEFORE`), not today's default."""
        data = dict(data)
        kind = ARCH_OPTIONS.get(data.get("arch", cls.arch))
        if kind is not None and isinstance(data.get("options"), dict):
            data["options"] = {**kind.SAVED_BEFORE, **data["options"]}
        return cls.from_dict(data)


def check_value_types(cls: type, values: dict[str, Any]) -> None:
    """SpecError naming the key whose value has the wrong JSON type for dataclass `cls`'s field (an int
    where a width is expected, a list of ints for `head_hidden`); keys that are not fields are left to the
    strict parser. bool is not taken for a number, a number is taken for a float."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        kind = hints.get(key)
        if kind is None:
            continue
        ok = _TYPE_CHECKS.get(kind)
        if ok is not None and not ok(value):
            raise SpecError(f"{cls.__name__}: {key!r} must be {_TYPE_NAMES[kind]}, got {value!r} "
                            f"({type(value).__name__})")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_TYPE_CHECKS: dict[Any, Any] = {
    int: _is_int,
    float: lambda v: _is_int(v) or isinstance(v, float),
    bool: lambda v: isinstance(v, bool),
    str: lambda v: isinstance(v, str),
    tuple[int, ...]: lambda v: isinstance(v, list | tuple) and all(_is_int(x) for x in v),
}
_TYPE_NAMES: dict[Any, str] = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
                               tuple[int, ...]: "a list of integers"}
