"""The model being served: bundle manifest, vocabulary, sequence spec and inference backend, swapped atomically.

A request takes `slot.current` once and uses that `LoadedModel` to the end, so a hot reload never
changes the model under a request in flight: old requests finish on the old model, new ones start
on the new one. A bundle that fails any check (sha256, graph inputs/outputs, feature spec, warm-up)
is refused and the old model keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.bundle import (
    ATTENTION_NAME,
    OUTPUT_NAME,
    BundleError,
    BundleExpectation,
    Manifest,
    check_expectation,
    load_manifest,
)
from model.features.inputs import INPUT_NAMES, inputs_from_sequences
from model.features.spec import FeatureSpec, SequenceSpec
from model.features.vocab import Vocabulary
from service.assembly import assemble_sequences
from service.errors import BundleRejected, StartupError
from service.history_columns import UserHistory
from service.inference import InferenceBackend
from service.settings import Settings

log = logging.getLogger("polarity.service")

BackendFactory = Callable[[Manifest, Settings], InferenceBackend]


@dataclass(frozen=True, kw_only=True)
class LoadedModel:
    manifest: Manifest
    vocab: Vocabulary
    feature_spec: FeatureSpec
    backend: InferenceBackend
    loaded_at: float

    @property
    def spec(self) -> SequenceSpec:
        return self.feature_spec.sequence

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def has_attention(self) -> bool:
        return ATTENTION_NAME in self.manifest.output_names

    def describe(self) -> dict[str, Any]:
        m = self.manifest.data["model"]
        placement = getattr(self.backend, "placement", None)  # which provider runs the graph's nodes (ONNX backend)
        return {"name": m["name"], "version": m["version"], "arch": m["arch"], "seq_len": m["seq_len"],
                "pos_ratio": m["pos_ratio"], "provider": self.backend.provider, "kernel": self.backend.kernel,
                "attention_output": self.has_attention, "path": str(self.manifest.root),
                "placement": None if placement is None else placement.describe()}


def _verify_bundle(root: Path, settings: Settings) -> tuple[Manifest, Vocabulary, FeatureSpec]:
    """Load and verify a bundle; refuse one this service cannot feed (BundleError with the reason)."""
    verified = load_manifest(root)  # schema + sha256 of every file, before anything reads them
    vocab = Vocabulary.load(verified.vocab_dir)
    sequence = verified.feature_spec.sequence  # load_manifest checked it parses
    # What this service's assembler produces for the bundle's own sequence spec: vocabulary
    # sizes from the shipped vocab files and the builder's statistics width.
    produced = vocab.feature_spec(sequence)
    check_expectation(verified, BundleExpectation(feature_spec=produced, input_names=INPUT_NAMES,
                                                  output_names=(OUTPUT_NAME,)))  # `attention` optional
    if settings.history_cap < sequence.history_cap:
        raise BundleError(f"{root}: the model needs histories of {sequence.history_cap} events per polarity "
                          f"but the store keeps {settings.history_cap} (raise POLARITY_HISTORY_CAP)")
    return verified, vocab, verified.feature_spec


def load_model(root: Path, *, settings: Settings, backend_factory: BackendFactory) -> LoadedModel:
    """Verify, open and warm up a bundle (blocking; run it in a thread)."""
    manifest, vocab, feature_spec = _verify_bundle(root, settings)
    backend = backend_factory(manifest, settings)
    model = LoadedModel(manifest=manifest, vocab=vocab, feature_spec=feature_spec, backend=backend,
                        loaded_at=time.time())
    warm_up(model)
    return model


def warm_up(model: LoadedModel) -> None:
    """One cold-start request through the real path: allocates the session's buffers before traffic."""
    seqs = assemble_sequences([UserHistory.empty()], cutoff=[time.time()], vocab=model.vocab, spec=model.spec)
    items = np.array([1, 1], dtype=np.int64)
    inputs = inputs_from_sequences(seqs, cand_item=items, cand_user=np.zeros(2, dtype=np.int64),
                                   cand_category=model.vocab.candidate_category(items, [None, None]))
    for attention in (True, False):  # both graphs, when the bundle has a probability-only one
        probs = model.backend.run(inputs.as_dict(), attention=attention)["probs"]
        if probs.shape != (2,) or not np.all(np.isfinite(probs)):
            raise BundleError(f"{model.manifest.root}: warm-up run returned {probs.shape} / non-finite probabilities")


class ModelSlot:
    """Holds the `LoadedModel` being served; `reload` swaps it atomically."""

    def __init__(self, *, settings: Settings, backend_factory: BackendFactory) -> None:
        self._settings = settings
        self._factory = backend_factory
        self._current: LoadedModel | None = None
        self._lock = asyncio.Lock()

    @property
    def loaded(self) -> bool:
        return self._current is not None

    @property
    def current(self) -> LoadedModel:
        model = self._current
        if model is None:
            raise RuntimeError("no model loaded")
        return model

    async def load_initial(self, root: Path) -> LoadedModel:
        try:
            model = await asyncio.to_thread(load_model, root, settings=self._settings, backend_factory=self._factory)
        except (BundleError, OSError, ValueError, KeyError) as exc:
            raise StartupError(str(exc)) from exc
        self._current = model
        return model

    async def reload(self, root: Path) -> tuple[LoadedModel, LoadedModel]:
        """Load `root` beside the current model, then swap. Returns (old, new); BundleRejected keeps the old."""
        async with self._lock:  # one reload at a time; scoring never waits on this lock
            old = self.current
            try:
                new = await asyncio.to_thread(load_model, root, settings=self._settings,
                                              backend_factory=self._factory)
            except (BundleError, StartupError, OSError, ValueError, KeyError) as exc:
                raise BundleRejected(str(exc)) from exc
            self._current = new
            return old, new
