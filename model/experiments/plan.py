"""Which runs an experiment needs, in execution order, and each run's TrainConfig."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from model.features.spec import SpecError
from model.models.config import ModelConfig
from model.training.config import TrainConfig

EXPERIMENTS = ("rq1", "length", "ratio", "ablation")

RQ1_VARIANTS = ("pos", "pos-tapf", "mix-pbe", "mix-tapf")

LENGTHS = (10, 20, 50, 100, 200)

RATIOS = tuple(round(0.1 * i, 1) for i in range(11))

ABLATION_MODES = ("random_universe", "random_history", "random_polarity", "grouped")

# `--archs` names that are a model with a training option rather than an architecture of their own:
# name -> (arch, the runs' setting, model overrides).
ARCH_PRESETS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "dual_encoder": ("dual_stream", "contrastive", {"contrastive_weight": 0.5}),
}

# Ablation settings that are model options: setting -> model overrides.
ABLATION_OPTIONS: dict[str, dict[str, Any]] = {"weak_signals": {"weak_signals": True}}


@dataclass(frozen=True)
class Run:
    """One planned training run: arch × sequence variant × setting × seed."""

    arch: str
    seq: str
    seed: int
    setting: str = ""  # "" | "L50" | "r0.3" | an ablation mode or model option | a preset's setting
    fields: tuple[tuple[str, Any], ...] = ()  # TrainConfig fields this run sets

    def key(self, experiment: str) -> str:
        variant = f"{self.seq}-{self.setting}" if self.setting else self.seq
        return f"{experiment}-{self.arch}-{variant}-seed{self.seed}"

    @property
    def group(self) -> tuple[str, str, str]:
        return self.arch, self.seq, self.setting

def supported(arch: str, seq: str) -> bool:
    """Whether the model config accepts this arch (or preset) × sequence variant (dual_stream and SINE have no
    TAPF)."""
    arch = ARCH_PRESETS[arch][0] if arch in ARCH_PRESETS else arch
    try:
        ModelConfig(arch=arch, seq_variant=seq)
    except SpecError:
        return False
    return True

def _model_fields(overrides: dict[str, Any], *rest: tuple[str, Any]) -> tuple[tuple[str, Any], ...]:
    """Run fields that set model overrides (as sorted pairs: a Run stays hashable)."""
    return (("model_overrides", tuple(sorted(overrides.items()))), *rest)


def plan(name: str, *, archs: list[str], seeds: int, variants: tuple[str, ...] = RQ1_VARIANTS) -> list[Run]:
    """The runs an experiment needs, in execution order."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose from {EXPERIMENTS}")
    if not archs:
        raise ValueError("archs must name at least one architecture")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    runs: list[Run] = []
    for seed in range(seeds):
        if name == "rq1":
            for a in archs:
                arch, setting, model = ARCH_PRESETS.get(a, (a, "", {}))
                fields = _model_fields(model) if model else ()
                runs += [Run(arch, v, seed, setting, fields) for v in variants if supported(a, v)]
        elif name == "length":
            runs += [Run(archs[0], v, seed, f"L{n}", (("seq_len", n),)) for n in LENGTHS for v in ("pos", "mix-tapf")
                     if supported(archs[0], v)]
        elif name == "ratio":
            for a in archs:
                v = "mix-tapf" if supported(a, "mix-tapf") else "mix-pbe"
                runs += [Run(a, v, seed, f"r{r:.1f}", (("pos_ratio", r),)) for r in RATIOS]
        else:  # ablation: the first arch that takes TAPF, plus the dual-stream encoder
            a = next((x for x in archs if supported(x, "mix-tapf")), "onetrans")
            runs.append(Run(a, "pos", seed, "", (("seq_mode", None),)))
            runs.append(Run(a, "mix-tapf", seed, "", (("seq_mode", None),)))
            runs += [Run(a, "mix-tapf", seed, m, (("seq_mode", m),)) for m in ABLATION_MODES]
            runs += [Run(a, "mix-tapf", seed, m, _model_fields(o, ("seq_mode", None)))
                     for m, o in ABLATION_OPTIONS.items()]
            runs.append(Run("dual_stream", "mix-pbe", seed, "", (("seq_mode", None),)))
            _, setting, model = ARCH_PRESETS["dual_encoder"]
            runs.append(Run("dual_stream", "mix-pbe", seed, setting, _model_fields(model, ("seq_mode", None))))
    return runs  # seed-major: an interrupted experiment already has every setting for its first seeds

def train_config(run: Run, *, data: str, overrides: dict[str, Any]) -> TrainConfig:
    """The run's TrainConfig: user overrides, then the experiment's own fields on top."""
    own = dict(run.fields)
    model = {**overrides.get("model_overrides", {}), **dict(own.pop("model_overrides", ()))}
    fields = {**overrides, **own, "data": data, "arch": run.arch, "seq": run.seq, "seed": run.seed}
    return TrainConfig.from_dict({**fields, "model_overrides": model} if model else fields)
