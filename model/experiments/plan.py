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


@dataclass(frozen=True)
class Run:
    """One planned training run: arch × sequence variant × setting × seed."""

    arch: str
    seq: str
    seed: int
    setting: str = ""  # "" | "L50" | "r0.3" | an ablation mode
    fields: tuple[tuple[str, Any], ...] = ()  # TrainConfig fields this run sets

    def key(self, experiment: str) -> str:
        variant = f"{self.seq}-{self.setting}" if self.setting else self.seq
        return f"{experiment}-{self.arch}-{variant}-seed{self.seed}"

    @property
    def group(self) -> tuple[str, str, str]:
        return self.arch, self.seq, self.setting

def supported(arch: str, seq: str) -> bool:
    """Whether the model config accepts this arch × sequence variant (dual_stream has no TAPF)."""
    try:
        ModelConfig(arch=arch, seq_variant=seq)
    except SpecError:
        return False
    return True

def plan(name: str, *, archs: list[str], seeds: int) -> list[Run]:
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
            runs += [Run(a, v, seed) for a in archs for v in RQ1_VARIANTS if supported(a, v)]
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
            runs.append(Run("dual_stream", "mix-pbe", seed, "", (("seq_mode", None),)))
    return runs  # seed-major: an interrupted experiment already has every setting for its first seeds

def train_config(run: Run, *, data: str, overrides: dict[str, Any]) -> TrainConfig:
    """The run's TrainConfig: user overrides, then the experiment's own fields on top."""
    fields = {**overrides, **dict(run.fields), "data": data, "arch": run.arch, "seq": run.seq, "seed": run.seed}
    return TrainConfig.from_dict(fields)
