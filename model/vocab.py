"""Vocabularies built on the training part only; unseen ids map to the OOV index. Torch-free.

The vocab files travel with checkpoints and bundles, so the service maps raw ids exactly as the
trainer did.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np

from model.data.events import NO_CATEGORY, EventTable, event_polarity
from model.feature_spec import DEFAULT_EVENT_POLARITY, FIRST_ID_INDEX, OOV_INDEX, PAD_INDEX

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

    def event_index(self, names: Sequence[str], polarity: Sequence[int] | np.ndarray) -> np.ndarray:
        """Event-type indices; a type the model never saw falls back to the generic one."""
        generic = {1: self._event_index["positive"], -1: self._event_index["negative"]}
        return np.fromiter(
            (self._event_index.get(n, generic[int(p)]) for n, p in zip(names, polarity, strict=True)),
            dtype=np.int64,
        )

    def candidate_category(self, item_idx: np.ndarray, raw_category: Sequence[str | None]) -> np.ndarray:
        """A candidate's category: the one given with it, else the training-time one of the item."""
        given = self.category_index(raw_category)
        known = np.array([c is not None for c in raw_category], dtype=bool)
        return np.where(known, given, self.item_category[item_idx])

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


def build_vocabulary(table: EventTable, train_rows: np.ndarray) -> Vocabulary:
    """Items, categories and event types seen in the training rows."""
    train = table.take(train_rows)
    item_codes = np.unique(train.item)
    cat_codes = np.unique(train.category[train.category != NO_CATEGORY])
    items = tuple(str(table.item_keys[c]) for c in item_codes)
    categories = tuple(str(table.category_keys[c]) for c in cat_codes)

    # Each item's category: the one of its last training event (items rarely change category).
    cat_index = np.full(len(table.category_keys) + 1, OOV_INDEX, dtype=np.int64)
    cat_index[cat_codes] = np.arange(len(cat_codes)) + FIRST_ID_INDEX
    item_category = np.full(len(items) + FIRST_ID_INDEX, OOV_INDEX, dtype=np.int64)
    item_category[PAD_INDEX] = PAD_INDEX
    item_pos = np.searchsorted(item_codes, train.item)
    item_category[item_pos + FIRST_ID_INDEX] = cat_index[train.category]  # last write wins

    seen = {table.event_types[c] for c in np.unique(train.event)} | {"positive", "negative"}
    names = tuple(sorted(seen))
    signs = event_polarity(table.event_types, table.event, table.label)
    polarity_of = dict(zip(table.event_types, signs, strict=True)) | {
        k: v for k, v in DEFAULT_EVENT_POLARITY.items() if k in ("positive", "negative")
    }
    return Vocabulary(
        items=items,
        categories=categories,
        item_category=item_category,
        event_types=("<pad>", *names),
        event_polarity=(0, *(polarity_of.get(n, DEFAULT_EVENT_POLARITY.get(n, -1)) for n in names)),
    )
