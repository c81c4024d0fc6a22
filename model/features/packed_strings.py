"""Strings as columns: byte ranges of one UTF-8 buffer, and their vocabulary lookup in numpy. Torch-free.

The service reads a user's history from Redis as one buffer (`service.history_store`); each item id,
event name and category of it is a byte range of that buffer (`PackedStrings`), never a Python `str`.
`StringIndex` maps such a column to vocabulary indices with one sorted search: the same indices as
looking each string up in the vocabulary's dict (`Vocabulary.item_index`), without an object per string.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_EMPTY_I = np.zeros(0, dtype=np.int64)
# _PREFIX_MASK[k]: the top k bytes of a uint64.
_PREFIX_MASK = np.array([0] + [((1 << (8 * k)) - 1) << (8 * (8 - k)) for k in range(1, 9)], dtype=np.uint64)

# A sorted fixed-width copy of a vocabulary holds n_names x (longest name) bytes; past this size the index
# looks strings up one by one instead (a vocabulary of millions of long ids).
MAX_INDEX_BYTES = 256 << 20


@dataclass(frozen=True, kw_only=True)
class PackedStrings:
    """n strings, string k being the UTF-8 bytes `data[start[k]:stop[k]]`; `null[k]` marks a missing one (None)."""

    data: bytes
    start: np.ndarray  # (n,) int64
    stop: np.ndarray  # (n,) int64
    null: np.ndarray | None = None  # (n,) bool, or None when no string is missing

    def __len__(self) -> int:
        return int(self.start.shape[0])

    @property
    def lengths(self) -> np.ndarray:
        out: np.ndarray = self.stop - self.start
        return out

    @staticmethod
    def empty() -> PackedStrings:
        return PackedStrings(data=b"", start=_EMPTY_I, stop=_EMPTY_I)

    @staticmethod
    def of(values: Sequence[str | None]) -> PackedStrings:
        """Pack Python strings (None: missing)."""
        encoded = [b"" if v is None else v.encode("utf-8", "surrogatepass") for v in values]
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        stop = np.cumsum(lengths)
        null = np.fromiter((v is None for v in values), dtype=bool, count=len(values))
        return PackedStrings(data=b"".join(encoded), start=stop - lengths, stop=stop,
                             null=null if null.any() else None)

    def take(self, rows: slice | np.ndarray) -> PackedStrings:
        """The strings of some rows (of the same buffer)."""
        return PackedStrings(data=self.data, start=self.start[rows], stop=self.stop[rows],
                             null=None if self.null is None else self.null[rows])

    @staticmethod
    def concat(parts: Sequence[PackedStrings]) -> PackedStrings:
        """All strings of `parts`, in order (no copy of the bytes when they share one buffer)."""
        if len(parts) == 1:
            return parts[0]
        nulls = [p.null if p.null is not None else np.zeros(len(p), dtype=bool) for p in parts]
        null = np.concatenate(nulls) if any(p.null is not None for p in parts) else None
        if all(p.data is parts[0].data for p in parts):
            return PackedStrings(data=parts[0].data, start=np.concatenate([p.start for p in parts]),
                                 stop=np.concatenate([p.stop for p in parts]), null=null)
        shift = np.cumsum([0] + [len(p.data) for p in parts[:-1]]).tolist()
        return PackedStrings(data=b"".join(p.data for p in parts),
                             start=np.concatenate([p.start + k for p, k in zip(parts, shift, strict=True)]),
                             stop=np.concatenate([p.stop + k for p, k in zip(parts, shift, strict=True)]), null=null)

    def tolist(self) -> list[str | None]:
        data = self.data
        null = self.null if self.null is not None else np.zeros(len(self), dtype=bool)
        return [None if missing else data[a:b].decode("utf-8", "surrogatepass")
                for a, b, missing in zip(self.start.tolist(), self.stop.tolist(), null.tolist(), strict=True)]

    def prefix_keys(self) -> np.ndarray:
        """(n,) uint64: each string's first 8 bytes as a big-endian integer, zero-padded: for strings of at most 8
        bytes the same order and equality as the strings (trailing NULs aside), from one gather over a strided
        view of the buffer (an 8-byte window at every offset)."""
        padded = self.data + bytes(8)
        windows = np.ndarray(shape=(len(padded) - 7,), dtype=">u8", buffer=padded, strides=(1,))
        out: np.ndarray = windows[self.start] & _PREFIX_MASK[np.minimum(self.stop - self.start, 8)]
        return out

    def fixed_width(self, width: int | None = None, *, terminated: bool = False) -> np.ndarray:
        """(n,) `S<width>` array of the strings' bytes, zero-padded (default width: the longest string).

        A string longer than `width` is cut; a missing one is empty. `terminated`: each string followed by a 0x01
        byte (width one more), so that strings differing only in trailing NULs stay distinct (an `S` array
        ignores trailing NULs)."""
        lengths = self.stop - self.start
        n = len(self)
        if width is None:
            width = int(lengths.max(initial=0)) + (1 if terminated else 0)
        width = max(1, width)
        cols = np.arange(width)
        if self.data:
            data = np.frombuffer(self.data, dtype=np.uint8)
            gathered = data[np.minimum(self.start[:, None] + cols, data.shape[0] - 1)]
            out = np.where(cols < lengths[:, None], gathered, np.uint8(0))
        else:
            out = np.zeros((n, width), dtype=np.uint8)
        if terminated:
            out[np.arange(n), np.minimum(lengths, width - 1)] = 1
        return out.view(f"S{width}").reshape(n)


class StringIndex:
    """Vocabulary strings -> their indices (`first` + position), looked up for a whole `PackedStrings` at once.

    Exactly a dict lookup per string: a string equal to a name (byte for byte) gets that name's index
    (the last one's, when a name repeats, as a dict built in order keeps it), anything else or a
    missing string gets `missing`. Names of at most 8 bytes (numeric ids, event names) are searched as
    big-endian integers, which numpy compares far faster than `S` strings."""

    def __init__(self, names: Sequence[str | None], *, first: int) -> None:
        """`names[k]` gets index `first + k`; a None entry is no name (nothing maps to its index)."""
        kept = [k for k, name in enumerate(names) if name is not None]
        encoded = [name.encode("utf-8", "surrogatepass") for name in names if name is not None]
        width = max((len(e) for e in encoded), default=1) or 1
        # `S` arrays compare with trailing NULs ignored: a name ending in NUL would be ambiguous.
        self._sorted_search = (bool(encoded) and all(not e.endswith(b"\x00") for e in encoded)
                               and width * len(encoded) <= MAX_INDEX_BYTES)
        self._short = width <= 8
        self._width = width
        self._by_name: dict[bytes, int] = {}
        if not self._sorted_search:
            self._by_name = {name: first + k for k, name in zip(kept, encoded, strict=True)}
        else:
            array = (PackedStrings.of([e.decode("utf-8", "surrogatepass") for e in encoded]).prefix_keys()
                     if self._short else np.array(encoded, dtype=f"S{width}"))
            order = np.argsort(array, kind="stable")
            self._names = array[order]
            self._lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))[order]
            self._indices = np.asarray(kept, dtype=np.int64)[order] + first

    def lookup(self, strings: PackedStrings, *, missing: int) -> np.ndarray:
        """(n,) int64 index of each string (`missing` for an unknown or missing one)."""
        n = len(strings)
        if n == 0:
            return _EMPTY_I.copy()
        if strings.null is not None and strings.null.all():
            return np.full(n, missing, dtype=np.int64)
        if not self._sorted_search:
            get = self._by_name.get
            data = strings.data
            found = np.fromiter((get(data[a:b], missing) for a, b in zip(strings.start.tolist(),
                                 strings.stop.tolist(), strict=True)), dtype=np.int64, count=n)
        else:
            keys = strings.prefix_keys() if self._short else strings.fixed_width(self._width)
            # side="right" - 1: the last of equal names (the stable sort keeps their order), as the dict does.
            at = self._names.searchsorted(keys, side="right") - 1
            at[at < 0] = 0
            hit = (self._names[at] == keys) & (self._lengths[at] == strings.stop - strings.start)
            found = np.where(hit, self._indices[at], missing)
        if strings.null is not None:
            found[strings.null] = missing
        return found
