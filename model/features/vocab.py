"""Vocabularies built on the training part only; unseen ids map to the OOV index. Torch-free.

The vocab files travel with checkpoints and bundles, so the service maps raw ids exactly as the
trainer did.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np

from model.features.events import GENERIC_EVENT, normalise_event_name
from model.features.packed_strings import PackedStrings, StringIndex
from model.features.spec import FIRST_ID_INDEX, OOV_INDEX, FeatureSpec, SequenceSpec

VOCAB_FILES = ("items.json", "categories.json", "item_category.json", "event_types.json")


@dataclass(frozen=True, kw_only=True)
class Vocabulary:
    items: tuple[str, ...]  # raw item id of index FIRST_ID_INDEX + i
    categories: tuple[str, ...]  # raw category of index FIRST_ID_INDEX + i
    item_category: np.ndarray  # (n_items,) int64 category index of each item index
    event_types: tuple[str, ...]  # index 0 is "<pad>"
    event_polarity: tuple[int, ...]  # +1 / -1 per event type (0 for "<pad>")
    _item_index: dict[str, int] = field(init=False, repr=False, compare=False)
    _category_index: dict[str, int] = field(init=False, repr=False, compare=False)
    _event_index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_item_index", {k: i + FIRST_ID_INDEX for i, k in enumerate(self.items)})
        object.__setattr__(
            self, "_category_index", {k: i + FIRST_ID_INDEX for i, k in enumerate(self.categories)}
        )
        object.__setattr__(self, "_event_index", {k: i for i, k in enumerate(self.event_types)})

    @property
    def n_items(self) -> int:
        return len(self.items) + FIRST_ID_INDEX

    @property
    def n_categories(self) -> int:
        return len(self.categories) + FIRST_ID_INDEX

    def item_index(self, raw: Iterable[str]) -> np.ndarray:
        # map(dict.get) runs the lookups in C, without a Python frame per id (the serving hot path).
        return np.fromiter(map(self._item_index.get, raw, repeat(OOV_INDEX)), dtype=np.int64)

    def category_index(self, raw: Iterable[str | None]) -> np.ndarray:
        # None is never a key (keys are strings), so it maps to OOV like an unseen category.
        lookup = self._category_index.get
        return np.fromiter(map(lookup, raw, repeat(OOV_INDEX)), dtype=np.int64)  # type: ignore[arg-type]

    def item_index_packed(self, raw: PackedStrings) -> np.ndarray:
        """`item_index` of packed strings (the service's history read), in numpy: no `str` per id."""
        return self._packed_items.lookup(raw, missing=OOV_INDEX)

    def category_index_packed(self, raw: PackedStrings) -> np.ndarray:
        """`category_index` of packed strings (a missing one is OOV, like None)."""
        return self._packed_categories.lookup(raw, missing=OOV_INDEX)

    def event_index_packed(self, raw: PackedStrings, polarity: np.ndarray) -> np.ndarray:
        """`event_index` of the normalised raw names (`normalise_event_name`), in numpy: a name already in its
        normal form (the service's writer stores them so) is found directly; any other is normalised once per
        distinct name."""
        found = self._packed_events.lookup(raw, missing=-1)
        missed = np.flatnonzero(found < 0)
        if missed.size:
            others = raw.take(missed)
            _, first, inverse = np.unique(others.fixed_width(terminated=True), return_index=True, return_inverse=True)
            names = [normalise_event_name(name or "") for name in others.take(first).tolist()]
            signs = np.asarray(polarity)[missed]
            per_sign = {sign: self.event_index(names, np.full(len(names), sign)) for sign in (1, -1)}
            inverse = inverse.reshape(-1)
            found[missed] = np.where(signs > 0, per_sign[1][inverse], per_sign[-1][inverse])
        return found

    @cached_property
    def _packed_events(self) -> StringIndex:
        """The event types whose name is its own normal form (a raw name equal to one needs no normalising)."""
        normal = [name if normalise_event_name(name) == name else None for name in self.event_types]
        return StringIndex(normal, first=0)

    @cached_property
    def _packed_items(self) -> StringIndex:
        return StringIndex(self.items, first=FIRST_ID_INDEX)

    @cached_property
    def _packed_categories(self) -> StringIndex:
        return StringIndex(self.categories, first=FIRST_ID_INDEX)

    def event_index(self, names: Sequence[str], polarity: Sequence[int] | np.ndarray) -> np.ndarray:
        """Event-type indices; a type the model never saw falls back to the generic one."""
        generic = {sign: self._event_index[name] for sign, name in GENERIC_EVENT.items()}
        return np.fromiter(
            (self._event_index.get(n, generic[int(p)]) for n, p in zip(names, polarity, strict=True)),
            dtype=np.int64,
        )

    def candidate_category(self, item_idx: np.ndarray, raw_category: Sequence[str | None]) -> np.ndarray:
        """A candidate's category: the one given with it, else the training-time one of the item."""
        given = self.category_index(raw_category)
        known = np.array([c is not None for c in raw_category], dtype=bool)
        return np.where(known, given, self.item_category[item_idx])

    def feature_spec(self, sequence: SequenceSpec) -> FeatureSpec:
        """The feature spec of a model over this vocabulary and `sequence` (the one place one is built)."""
        return FeatureSpec(sequence=sequence, n_items=self.n_items, n_categories=self.n_categories,
                           event_types=self.event_types, event_polarity=self.event_polarity)

    def save(self, directory: Path) -> list[Path]:
        directory.mkdir(parents=True, exist_ok=True)
        files = {
            "items.json": list(self.items),
            "categories.json": list(self.categories),
            "item_category.json": self.item_category.tolist(),
            "event_types.json": {"names": list(self.event_types), "polarity": list(self.event_polarity)},
        }
        paths = []
        for name, payload in files.items():
            path = directory / name
            path.write_text(json.dumps(payload, ensure_ascii=False))
            paths.append(path)
        return paths

    @classmethod
    def load(cls, directory: Path) -> Vocabulary:
        def read(name: str) -> Any:
            return json.loads((directory / name).read_text())

        events = read("event_types.json")
        return cls(
            items=tuple(read("items.json")),
            categories=tuple(read("categories.json")),
            item_category=np.asarray(read("item_category.json"), dtype=np.int64),
            event_types=tuple(events["names"]),
            event_polarity=tuple(int(p) for p in events["polarity"]),
        )
