"""Model compositions, and the registry that builds one from its config.

Each architecture is a `SequenceCTRModel` (`ctr_model.py`): logits from `forward`, the sigmoid in the
export wrapper, the loss in training. `ARCHITECTURES` maps the names of `config.ARCH_OPTIONS` to the
classes; `build_model` is the one way a checkpoint, a bundle export or a test rebuilds a model.

The classes are imported when a model is built, not when this package is: `model.models.config` (and
the `polarity` command's argument parser, which reads it) stays importable without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from model.features.spec import FeatureSpec
from model.models.config import ARCH_OPTIONS, ModelConfig

if TYPE_CHECKING:
    from model.models.ctr_model import SequenceCTRModel

# arch name -> "module:class" of its model
ARCHITECTURES: dict[str, str] = {
    "din": "model.models.din:DIN",
    "transformer": "model.models.transformer:TransformerCTR",
    "onetrans": "model.models.onetrans:OneTrans",
    "dual_stream": "model.models.dual_stream:DualStream",
    "hyformer": "model.models.hyformer:HyFormer",
    "mixformer": "model.models.mixformer:MixFormer",
    "sine": "model.models.sine:SINE",
}
assert set(ARCHITECTURES) == set(ARCH_OPTIONS), "every architecture needs its options class and its model class"


def model_class(arch: str) -> type[SequenceCTRModel]:
    """The model class registered for `arch` (its module imported now)."""
    module, name = ARCHITECTURES[arch].split(":")
    cls: type[SequenceCTRModel] = getattr(importlib.import_module(module), name)
    return cls


def build_model(config: ModelConfig, spec: FeatureSpec) -> SequenceCTRModel:
    return model_class(config.arch)(config=config, spec=spec)
