"""A user's histories as columns, and how the store's read reply becomes them. Torch-free.

The read script (`service.history_scripts.READ_SCRIPT`) answers each polarity as one byte string: the
sorted set's `ZRANGE ... WITHSCORES` elements joined by newlines, i.e. per event a member line
`<16-digit seq>:<payload>` and a score line (the timestamp as Redis formats it, exact). A payload is
the writer's compact JSON `["item","event",null|"category"]`, which never holds a raw newline.

`decode_history` turns that text into a `RawHistory` with numpy alone: the lines, sequence numbers and
timestamps, and each string as a byte range of the reply (`PackedStrings`); no Python object is made
per event. A payload with a JSON escape (a backslash anywhere in the reply) is parsed by `json` instead,
with the same result.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from model.features.packed_strings import PackedStrings

_NEWLINE, _QUOTE, _COLON, _COMMA, _OPEN, _CLOSE = (ord(c) for c in '\n":,[]')
_SEQ_DIGITS = 16  # members start with the arrival counter zero-padded to 16 digits, then ':'
_HEAD = np.arange(_SEQ_DIGITS + 1)
# Each head byte minus its lowest allowed value, at most its range: 16 digits '0'-'9', then ':'.
_HEAD_LOW = np.array([ord("0")] * _SEQ_DIGITS + [_COLON], dtype=np.uint8)
_HEAD_RANGE = np.array([9] * _SEQ_DIGITS + [0], dtype=np.uint8)
_SIX = np.arange(6)
# `at` columns: 0 start, 1-6 the first six quotes, 7 stop. Spans checked: '["' item (quote 1 right after the
# start), '","' (quote 3 two after quote 2), then with a category '","' (quote 5 two after quote 4) and '"]' (stop two
# after quote 6), or without one ',null]' (stop seven after quote 4).
_SPAN_FROM = np.array([0, 2, 4, 6, 4])
_SPAN_TO = np.array([1, 3, 5, 7, 7])
_SPANS = np.array([[1, 2, 0, 0, 7], [1, 2, 2, 2, 0]])  # rows: without a category, with one
_SPANS_FREE = np.array([[False, False, True, True, False], [False, False, False, False, True]])
# Marks: '[' at the start, ',' after the item's and the event's closing quotes, then the 4 bytes after that ('"' and
# the category's first bytes, or 'null'), and ']' before the stop.
_MARK_COLUMNS = np.array([0, 2, 4, 4, 4, 4, 4, 7])
_MARK_OFFSETS = np.array([0, 1, 1, 2, 3, 4, 5, -1])
_MARKS = np.frombuffer(b'[,,null][,,"???]', dtype=np.uint8).reshape(2, 8)
_MARKS_FREE = np.array([[False] * 8, [False, False, False, False, True, True, True, False]])
# The uniform layouts' fixed bytes (`_uniform_payload_columns`): '[' ',' ',null]' without a category, '[' ',' ',' ']'
# with one.
_NULL_TAIL = np.arange(-6, 0)
_NULL_MARKS = np.frombuffer(b"[,,null]", dtype=np.uint8)
_CATEGORY_MARKS = np.frombuffer(b"[,,]", dtype=np.uint8)
_EMPTY_I = np.zeros(0, dtype=np.int64)
_EMPTY_F = np.zeros(0, dtype=np.float64)


class DamagedHistory(ValueError):
    """A stored history the decoder cannot read (not written by this store's writer)."""


@dataclass(frozen=True, kw_only=True)
class RawHistory:
    """One polarity of one user's history, oldest to newest by (timestamp, seq), as columns."""

    item: PackedStrings
    event: PackedStrings
    category: PackedStrings  # missing where the event had none
    timestamps: np.ndarray  # (n,) float64
    seqs: np.ndarray  # (n,) int64 per-user arrival counter (breaks timestamp ties)

    def __post_init__(self) -> None:
        n = self.timestamps.shape[0]
        if not (len(self.item) == len(self.event) == len(self.category) == self.seqs.shape[0] == n):
            raise ValueError("RawHistory columns must all have the same length")

    def __len__(self) -> int:
        return int(self.timestamps.shape[0])

    def take(self, rows: slice) -> RawHistory:
        """The events of a range of rows (views: no copy)."""
        return RawHistory(item=self.item.take(rows), event=self.event.take(rows), category=self.category.take(rows),
                          timestamps=self.timestamps[rows], seqs=self.seqs[rows])

    @property
    def item_ids(self) -> list[str]:
        return [s or "" for s in self.item.tolist()]

    @property
    def events(self) -> list[str]:
        return [s or "" for s in self.event.tolist()]

    @property
    def categories(self) -> list[str | None]:
        return self.category.tolist()

    @staticmethod
    def of(*, item_ids: Sequence[str], categories: Sequence[str | None], events: Sequence[str],
           timestamps: np.ndarray | Sequence[float], seqs: np.ndarray | Sequence[int]) -> RawHistory:
        """From Python lists (tests, tools); the store's reads are decoded by `decode_history`."""
        return RawHistory(item=PackedStrings.of(item_ids), event=PackedStrings.of(events),
                          category=PackedStrings.of(categories), timestamps=np.asarray(timestamps, dtype=np.float64),
                          seqs=np.asarray(seqs, dtype=np.int64))

    @staticmethod
    def empty() -> RawHistory:
        none = PackedStrings.empty()
        return RawHistory(item=none, event=none, category=none, timestamps=_EMPTY_F, seqs=_EMPTY_I)


class UserHistory:
    """One user's two histories. Read from the store they are one set of columns (`events`: the positives, then
    the negatives), which the one-user path of `service.assembly` uses as they are; `positives` and `negatives`
    are views of it, made when first asked for."""

    __slots__ = ("_events", "_n_positive", "_negatives", "_positives")

    def __init__(self, *, positives: RawHistory, negatives: RawHistory) -> None:
        self._events: RawHistory | None = None
        self._n_positive = len(positives)
        self._positives: RawHistory | None = positives
        self._negatives: RawHistory | None = negatives

    @staticmethod
    def joined(events: RawHistory, n_positive: int) -> UserHistory:
        """The history whose first `n_positive` events are the positives and the rest the negatives."""
        if not 0 <= n_positive <= len(events):
            raise ValueError(f"{n_positive} positives among {len(events)} events")
        out = UserHistory.__new__(UserHistory)
        out._events, out._n_positive, out._positives, out._negatives = events, n_positive, None, None
        return out

    @property
    def events(self) -> RawHistory | None:
        """Both histories as one set of columns, positives first (None when built from two separate ones)."""
        return self._events

    @property
    def n_positive(self) -> int:
        return self._n_positive

    @property
    def positives(self) -> RawHistory:
        if self._positives is None:
            assert self._events is not None
            self._positives = self._events.take(slice(0, self._n_positive))
        return self._positives

    @property
    def negatives(self) -> RawHistory:
        if self._negatives is None:
            assert self._events is not None
            self._negatives = self._events.take(slice(self._n_positive, len(self._events)))
        return self._negatives

    @staticmethod
    def empty() -> UserHistory:
        return UserHistory(positives=RawHistory.empty(), negatives=RawHistory.empty())


def _ragged(start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """The positions start[k]..stop[k]-1 of every k, concatenated."""
    lengths = stop - start
    offsets = lengths.cumsum() - lengths
    out: np.ndarray = (start - offsets).repeat(lengths) + np.arange(int(lengths.sum()), dtype=np.int64)
    return out


def decode_user_history(n_positive: int, text: bytes) -> UserHistory:
    """The read reply of one user (see the module docstring): `n_positive` events of the positive history, then
    the negative ones, in one text. DamagedHistory when it is not what the writer writes."""
    events = decode_history(text)
    if not 0 <= n_positive <= len(events):
        raise DamagedHistory(f"the reply counts {n_positive} positives among {len(events)} events")
    return UserHistory.joined(events, n_positive)


def decode_history(text: bytes) -> RawHistory:
    """Member and score lines (see the module docstring) -> RawHistory; DamagedHistory when they are not what the
    writer writes."""
    if not text:
        return RawHistory.empty()
    buf = np.frombuffer(text + b"\n", dtype=np.uint8)
    ends = np.flatnonzero(buf == _NEWLINE)  # every line's terminating newline
    if ends.size % 2:
        raise DamagedHistory("a history read back an odd number of lines (a member holds a newline)")
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    m_start, m_stop, s_start, s_stop = starts[0::2], ends[0::2], starts[1::2], ends[1::2]
    n = m_start.shape[0]
    try:  # the score lines with their newlines, parsed in C
        timestamps = np.fromstring(buf[_ragged(s_start, s_stop + 1)].tobytes(), dtype=np.float64, sep="\n")
    except ValueError:
        timestamps = _EMPTY_F
    if timestamps.shape[0] != n:
        raise DamagedHistory("a history score is not a number")
    # The arrival counter's 16 digits and the ':' after them, as one (n, 17) block: checked, then parsed in C.
    if (m_stop - m_start < _SEQ_DIGITS + 2).any():
        raise DamagedHistory("a history member does not start with its arrival counter")
    head = buf[m_start[:, None] + _HEAD]
    if not ((head - _HEAD_LOW) <= _HEAD_RANGE).all():
        raise DamagedHistory("a history member does not start with its arrival counter")
    seqs = np.fromstring(head.tobytes(), dtype=np.int64, sep=":")
    p_start = m_start + _SEQ_DIGITS + 1
    columns = None
    if b"\\" not in text:
        quotes = np.flatnonzero(buf == _QUOTE)
        columns = _uniform_payload_columns(text, buf, quotes, p_start, m_stop)
        if columns is None:  # categories on some events only (or an unusual layout)
            columns = _payload_columns(text, buf, quotes, p_start, m_stop)
    if columns is None:  # an escape in some payload (or an unusual layout): json parses the payloads
        columns = _payload_columns_json([text[a:b] for a, b in zip(p_start.tolist(), m_stop.tolist(), strict=True)])
    item, event, category = columns
    return RawHistory(item=item, event=event, category=category, timestamps=timestamps, seqs=seqs)


def _uniform_payload_columns(text: bytes, buf: np.ndarray, quotes: np.ndarray, start: np.ndarray, stop: np.ndarray
                             ) -> tuple[PackedStrings, PackedStrings, PackedStrings] | None:
    """`_payload_columns` of a history whose payloads all have the same layout, `["i","e",null]` (4 quotes each) or
    `["i","e","c"]` (6 each), the usual case: with `quotes` (every '"' of the reply) 4 or 6 per event, row k of
    `quotes.reshape(n, 4 or 6)` is payload k's own quotes exactly when its first quote is right after the payload's
    '[' and its last at the layout's place before the payload's end (then each payload holds at least that many
    quotes, and there are no more in all). The same checks as `_payload_columns`, in fewer array operations; None
    when the layout is another (the general function then decides)."""
    n = start.shape[0]
    if quotes.shape[0] == 4 * n:
        q = quotes.reshape(n, 4)
        at = np.empty((n, 8), dtype=np.int64)  # '[', the ',' after the item, then ',null]'
        at[:, 0] = start
        at[:, 1] = q[:, 1] + 1
        at[:, 2:] = stop[:, None] + _NULL_TAIL
        if not (((q[:, 0] - start) == 1) & ((q[:, 2] - q[:, 1]) == 2) & ((stop - q[:, 3]) == 7)).all():
            return None
        if not (buf[at] == _NULL_MARKS).all():
            return None
        none = np.zeros(n, dtype=np.int64)
        category = PackedStrings(data=text, start=none, stop=none, null=np.ones(n, dtype=bool))
    elif quotes.shape[0] == 6 * n:
        q = quotes.reshape(n, 6)
        at = np.empty((n, 4), dtype=np.int64)  # '[', the ',' after the item and after the event, ']'
        at[:, 0] = start
        at[:, 1] = q[:, 1] + 1
        at[:, 2] = q[:, 3] + 1
        at[:, 3] = stop - 1
        if not (((q[:, 0] - start) == 1) & ((q[:, 2] - q[:, 1]) == 2) & ((q[:, 4] - q[:, 3]) == 2)
                & ((stop - q[:, 5]) == 2)).all():
            return None
        if not (buf[at] == _CATEGORY_MARKS).all():
            return None
        category = PackedStrings(data=text, start=q[:, 4] + 1, stop=q[:, 5])
    else:
        return None
    item = PackedStrings(data=text, start=q[:, 0] + 1, stop=q[:, 1])
    event = PackedStrings(data=text, start=q[:, 2] + 1, stop=q[:, 3])
    return item, event, category


def _payload_columns(text: bytes, buf: np.ndarray, quotes: np.ndarray, start: np.ndarray, stop: np.ndarray
                     ) -> tuple[PackedStrings, PackedStrings, PackedStrings] | None:
    """Item, event and category byte ranges of payloads `["i","e",null]` / `["i","e","c"]` without escapes
    (every '"' delimits a string; UTF-8 never puts one inside a multi-byte character), `quotes` the positions of
    every '"'; None when a payload is laid out otherwise."""
    first = quotes.searchsorted(start)
    count = quotes.searchsorted(stop) - first
    has_category = count == 6
    kind = has_category.astype(np.intp)  # 0: `null`, 1: a category string
    # Per payload: its start, its first six quotes (the last two belong to the next line without a category), its
    # stop. Both layouts are checked at once: the distances between them and the bytes at fixed places, against
    # each layout's expected values ("don't care" where the layout has none).
    at = np.concatenate([start[:, None], quotes[np.minimum(first[:, None] + _SIX, quotes.shape[0] - 1)],
                         stop[:, None]], axis=1)
    spans = at[:, _SPAN_TO] - at[:, _SPAN_FROM]
    marks = buf[np.minimum(at[:, _MARK_COLUMNS] + _MARK_OFFSETS, buf.shape[0] - 1)]
    if kind.all() or not kind.any():  # one layout throughout (the usual history): compare with its row
        k = int(kind[0])
        ok = ((spans == _SPANS[k]) | _SPANS_FREE[k]).all() and ((marks == _MARKS[k]) | _MARKS_FREE[k]).all()
    else:
        ok = ((spans == _SPANS[kind]) | _SPANS_FREE[kind]).all() and ((marks == _MARKS[kind]) | _MARKS_FREE[kind]).all()
    if not (ok and (has_category | (count == 4)).all()):
        return None
    item = PackedStrings(data=text, start=at[:, 1] + 1, stop=at[:, 2])
    event = PackedStrings(data=text, start=at[:, 3] + 1, stop=at[:, 4])
    category = PackedStrings(data=text, start=(at[:, 5] + 1) * kind, stop=at[:, 6] * kind,
                             null=None if kind.all() else ~has_category)
    return item, event, category


def _payload_columns_json(payloads: list[bytes]) -> tuple[PackedStrings, PackedStrings, PackedStrings]:
    """The payloads parsed by `json` (one array of all of them; one by one when that fails)."""
    rows: Any = None
    if all(p[:1] == b"[" and p[-1:] == b"]" for p in payloads):
        try:
            rows = json.loads(b"[" + b",".join(payloads) + b"]")
        except ValueError:
            rows = None
    try:
        if not isinstance(rows, list) or len(rows) != len(payloads):
            rows = [json.loads(p) for p in payloads]
    except ValueError as exc:
        raise DamagedHistory(f"a history member's payload is not JSON: {exc}") from None
    if any(type(row) is not list or len(row) != 3 or type(row[0]) is not str or type(row[1]) is not str
           or (row[2] is not None and type(row[2]) is not str) for row in rows):
        raise DamagedHistory("a history member's payload is not [item_id, event, category]")
    items, events, categories = zip(*rows, strict=True) if rows else ((), (), ())
    return PackedStrings.of(items), PackedStrings.of(events), PackedStrings.of(categories)
