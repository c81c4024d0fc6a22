"""Event names and polarity rules: the one home of both. Torch-free, numpy-free.

Every path that turns an event into a token's polarity and event type reads these rules: the
offline log reader and vocabulary builders (`model.data`), the service's event mapping
(`service.event_mapping`) and its sequence assembly (`service.assembly`), so online histories
carry exactly the tokens the trainer saw.

- A name is compared after `normalise_event_name` (`strip().lower()`).
- A row with a label but no event name takes the generic type of its label (`positive` / `negative`).
- A named type's polarity is the default mapping's; a type the mapping does not know takes the
  majority label of its rows in the log (`majority_polarity`).
"""

from __future__ import annotations

from collections.abc import Iterable

# Named engagement types and their polarity: positive engagement +1, implicit or explicit negative -1.
# The service maps rows without a label through this table (overridable by POLARITY_EVENT_POLARITY).
ENGAGEMENT_POLARITY: dict[str, int] = {"click": 1, "like": 1, "skip": -1, "dislike": -1}

# The generic type of a row that has a label but no event name (label-only logs, `label`-only API rows).
GENERIC_EVENT: dict[int, str] = {1: "positive", -1: "negative"}

# Every type with a fixed polarity: the named engagement types plus the two generic ones.
DEFAULT_EVENT_POLARITY: dict[str, int] = {**ENGAGEMENT_POLARITY, **{name: sign for sign, name in GENERIC_EVENT.items()}}

PAD_EVENT = "<pad>"  # event-type index 0


def normalise_event_name(name: object) -> str:
    """The one spelling of an event type: `strip().lower()` (log reader, vocabulary and service alike)."""
    return str(name).strip().lower()


def label_polarity(label: int) -> int:
    """+1 for a positive label (1), -1 for anything else (0)."""
    return 1 if label == 1 else -1


def majority_polarity(*, events: int, positives: int) -> int:
    """Polarity of a type with no fixed sign: +1 when at least half of its rows are positive, else -1."""
    return 1 if events and positives / events >= 0.5 else -1


def event_type_polarity(name: str, *, events: int, positives: int) -> int:
    """A type's polarity: the default mapping's, else the majority label of its `events` rows."""
    if name in DEFAULT_EVENT_POLARITY:
        return DEFAULT_EVENT_POLARITY[name]
    return majority_polarity(events=events, positives=positives)


def vocabulary_event_types(seen: Iterable[str]) -> tuple[str, ...]:
    """Event-type vocabulary: padding first, then the seen types and the two generic ones, sorted."""
    return (PAD_EVENT, *sorted(set(seen) | set(GENERIC_EVENT.values())))
