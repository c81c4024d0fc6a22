"""The vocabulary builder: items, categories and event types of a log's training part (training only;
the service loads the built vocabulary from its bundle, `model.features.vocab`)."""

from __future__ import annotations

import numpy as np

from model.data.events import NO_CATEGORY, EventTable
from model.features.events import event_type_polarity, vocabulary_event_types
from model.features.spec import FIRST_ID_INDEX, OOV_INDEX, PAD_INDEX
from model.features.vocab import Vocabulary


def build_vocabulary(table: EventTable, train_rows: np.ndarray) -> Vocabulary:
    """Items, categories and event types seen in the training rows. An event type's polarity is the
    default mapping's, else the majority label of its rows over the whole log (`model.features.events`)."""
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

    event_types = vocabulary_event_types(table.event_types[c] for c in np.unique(train.event))
    counts = {name: (int((table.event == code).sum()), int(table.label[table.event == code].sum()))
              for code, name in enumerate(table.event_types)}
    polarity = [event_type_polarity(name, events=counts.get(name, (0, 0))[0], positives=counts.get(name, (0, 0))[1])
                for name in event_types[1:]]
    return Vocabulary(items=items, categories=categories, item_category=item_category, event_types=event_types,
                      event_polarity=(0, *polarity))
