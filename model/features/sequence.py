"""The one mixed-polarity sequence builder (paper §3.3). Torch-free.

Trainer and service call the same function, `build_sequences`:

- offline, for millions of training samples at once: the history table holds every user's
  events, and each sample asks for its user's sequence at the sample's own timestamp;
- online: the service reads its users' two histories from Redis, wraps them in a table of those
  users (`service.assembly.assemble_sequences`) and asks for each sequence at request time.

A sample at time t sees only events with timestamp < t (never the current or a later event, nor
one at the same instant). Tokens are ordered by (timestamp, seq), where `seq` is file order
offline and ingestion order online — the same thing when a log is replayed.

Everything is vectorised over samples: no Python loop runs per sample or per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.features.spec import FIRST_ID_INDEX, OOV_INDEX, PAD_INDEX, SequenceSpec

_EMPTY_I = np.zeros(0, dtype=np.int64)
_EMPTY_F = np.zeros(0, dtype=np.float64)


@dataclass(frozen=True, kw_only=True)
class PolarityStreams:
    """Events of one polarity for U users, CSR layout.

    User u's events are rows ptr[u]:ptr[u+1], sorted by (timestamp, seq).
    """

    ptr: np.ndarray  # (U+1,) int64
    item: np.ndarray  # (E,) int64 item index
    category: np.ndarray  # (E,) int64 category index
    event: np.ndarray  # (E,) int64 event-type index
    timestamp: np.ndarray  # (E,) float64 seconds
    seq: np.ndarray  # (E,) int64 tie-break order (file order offline, ingestion order online)

    @property
    def n_users(self) -> int:
        return int(self.ptr.shape[0] - 1)

    @staticmethod
    def from_user_sorted(
        *,
        n_users: int,
        user: np.ndarray,
        item: np.ndarray,
        category: np.ndarray,
        event: np.ndarray,
        timestamp: np.ndarray,
        seq: np.ndarray,
    ) -> PolarityStreams:
        """Build from flat arrays already sorted by (user, timestamp, seq)."""
        counts = np.bincount(user, minlength=n_users) if user.size else np.zeros(n_users, np.int64)
        ptr = np.zeros(n_users + 1, dtype=np.int64)
        np.cumsum(counts, out=ptr[1:])
        return PolarityStreams(
            ptr=ptr,
            item=np.ascontiguousarray(item, dtype=np.int64),
            category=np.ascontiguousarray(category, dtype=np.int64),
            event=np.ascontiguousarray(event, dtype=np.int64),
            timestamp=np.ascontiguousarray(timestamp, dtype=np.float64),
            seq=np.ascontiguousarray(seq, dtype=np.int64),
        )

    @staticmethod
    def empty(n_users: int) -> PolarityStreams:
        return PolarityStreams(
            ptr=np.zeros(n_users + 1, dtype=np.int64), item=_EMPTY_I, category=_EMPTY_I,
            event=_EMPTY_I, timestamp=_EMPTY_F, seq=_EMPTY_I,
        )


@dataclass(frozen=True, kw_only=True)
class HistoryTable:
    """Positive and negative event streams of the same U users."""

    positives: PolarityStreams
    negatives: PolarityStreams

    def __post_init__(self) -> None:
        if self.positives.n_users != self.negatives.n_users:
            raise ValueError("positive and negative streams must cover the same users")

    @property
    def n_users(self) -> int:
        return self.positives.n_users


@dataclass(frozen=True, kw_only=True)
class SequenceBatch:
    """S sequences of L tokens, left-padded and chronological (last column = most recent)."""

    item: np.ndarray  # (S, L) int64, PAD_INDEX on padding
    category: np.ndarray  # (S, L) int64
    event: np.ndarray  # (S, L) int64
    polarity: np.ndarray  # (S, L) int64 in {-1, 0, +1}
    timestamp: np.ndarray  # (S, L) float64, 0 on padding
    mask: np.ndarray  # (S, L) bool, True on real tokens
    stats: np.ndarray  # (S, 4) float32, see `model.features.spec.HISTORY_STAT_NAMES`
    n_positive: np.ndarray  # (S,) int64 positives of the user before the cutoff (all, not only those in the sequence)
    n_negative: np.ndarray  # (S,) int64 negatives of the user before the cutoff


def build_sequences(
    table: HistoryTable,
    *,
    user: np.ndarray,
    cutoff: np.ndarray,
    spec: SequenceSpec,
    n_items: int = 0,
) -> SequenceBatch:
    """Assemble each query's sequence from the events of `table` strictly before its cutoff.

    user: (S,) int64 row of `table` for each query; cutoff: (S,) float64 query times.
    n_items: catalogue size (only used by mode `random_universe`).
    """
    user = np.asarray(user, dtype=np.int64)
    cutoff = np.asarray(cutoff, dtype=np.float64)
    if user.shape != cutoff.shape or user.ndim != 1:
        raise ValueError("user and cutoff must be 1-D arrays of the same length")
    if np.isnan(cutoff).any():
        raise ValueError("cutoff contains NaN")
    if user.shape[0] == 1 and table.n_users == 1 and spec.mode in _ONE_QUERY_MODES:
        one = _one_query(table, float(cutoff[0]), spec)
        if one is not None:
            return one
    pos, neg = table.positives, table.negatives
    L = spec.seq_len
    S = user.shape[0]

    # Events of the user before the cutoff, per polarity: (S,)
    n_pos = _count_before(pos, user, cutoff)
    n_neg = _count_before(neg, user, cutoff)

    # Slots per polarity, then how many tokens each polarity really gets: (S,)
    pos_budget, neg_budget = spec.pos_budget, spec.neg_budget
    if spec.fill_budget:
        k_pos = np.minimum(n_pos, pos_budget + np.maximum(neg_budget - n_neg, 0))
        k_neg = np.minimum(n_neg, neg_budget + np.maximum(pos_budget - n_pos, 0))
    else:
        k_pos = np.minimum(n_pos, pos_budget)
        k_neg = np.minimum(n_neg, neg_budget)
    max_pos = int(k_pos.max(initial=0))
    max_neg = int(k_neg.max(initial=0))

    # Which events fill the slots: the most recent k before the cutoff, as user-local indices.
    j_pos = np.arange(max_pos, dtype=np.int64)[None, :]  # (1, Kp)
    valid_pos = j_pos < k_pos[:, None]  # (S, Kp)
    local_pos = (n_pos - k_pos)[:, None] + j_pos  # (S, Kp) index within the user's positives
    j_neg = np.arange(max_neg, dtype=np.int64)[None, :]
    valid_neg = j_neg < k_neg[:, None]  # (S, Kn)
    if spec.mode == "random_history":
        # One random negative per equal stratum of the whole history before the cutoff: distinct,
        # already chronological, spread over all of it instead of the recent end.
        u01 = _uniform(spec.seed, n_pos, n_neg, cutoff, max_neg, salt=1)  # (S, Kn)
        width = n_neg / np.maximum(k_neg, 1)
        local_neg = np.floor((j_neg + u01) * width[:, None]).astype(np.int64)
        local_neg = np.minimum(local_neg, np.maximum(n_neg - 1, 0)[:, None])
    else:
        local_neg = (n_neg - k_neg)[:, None] + j_neg  # (S, Kn)

    glob_pos = np.where(valid_pos, pos.ptr[user][:, None] + local_pos, 0)  # (S, Kp) rows of `pos`
    glob_neg = np.where(valid_neg, neg.ptr[user][:, None] + local_neg, 0)  # (S, Kn) rows of `neg`

    # Column of every selected token in the merged, left-padded sequence.
    total = k_pos + k_neg  # (S,)
    start = (L - total)[:, None]  # first real column
    if spec.mode == "grouped":
        col_pos = start + j_pos
        col_neg = start + k_pos[:, None] + j_neg
    else:
        # Merge by (timestamp, seq): a token's rank in the merged sequence is its rank among its
        # own polarity plus the number of selected tokens of the other polarity before it.
        neg_before_pos = _count_before_events(neg, user, pos, glob_pos)  # (S, Kp) user-local
        pos_before_neg = _count_before_events(pos, user, neg, glob_neg)  # (S, Kn)
        if spec.mode == "random_history":
            sel_neg_before = _count_less_rows(local_neg, k_neg, neg_before_pos)
        else:
            sel_neg_before = np.clip(neg_before_pos - (n_neg - k_neg)[:, None], 0, k_neg[:, None])
        sel_pos_before = np.clip(pos_before_neg - (n_pos - k_pos)[:, None], 0, k_pos[:, None])
        col_pos = start + j_pos + sel_neg_before
        col_neg = start + j_neg + sel_pos_before

    out_item = np.full((S, L), PAD_INDEX, dtype=np.int64)
    out_cat = np.full((S, L), PAD_INDEX, dtype=np.int64)
    out_event = np.zeros((S, L), dtype=np.int64)
    out_pol = np.zeros((S, L), dtype=np.int64)
    out_ts = np.zeros((S, L), dtype=np.float64)
    rows_p, cols_p = np.nonzero(valid_pos)
    rows_n, cols_n = np.nonzero(valid_neg)
    for stream, rows, cols, glob, col, sign in (
        (pos, rows_p, cols_p, glob_pos, col_pos, 1),
        (neg, rows_n, cols_n, glob_neg, col_neg, -1),
    ):
        g = glob[rows, cols]
        c = col[rows, cols]
        out_item[rows, c] = stream.item[g]
        out_cat[rows, c] = stream.category[g]
        out_event[rows, c] = stream.event[g]
        out_ts[rows, c] = stream.timestamp[g]
        out_pol[rows, c] = sign
    mask = out_pol != 0

    if spec.mode == "random_universe":
        # Negative tokens keep their time and type but point at random catalogue items.
        if n_items <= FIRST_ID_INDEX:
            raise ValueError("mode random_universe needs n_items (the catalogue size)")
        u01 = _uniform(spec.seed, n_pos, n_neg, cutoff, L, salt=2)
        rand_item = FIRST_ID_INDEX + np.floor(u01 * (n_items - FIRST_ID_INDEX)).astype(np.int64)
        is_neg = out_pol < 0
        out_item = np.where(is_neg, rand_item, out_item)
        out_cat = np.where(is_neg, OOV_INDEX, out_cat)
    elif spec.mode == "random_polarity":
        # Same items in the same order; the polarities of the real tokens are shuffled per row.
        keys = np.where(mask, _uniform(spec.seed, n_pos, n_neg, cutoff, L, salt=3), -1.0)
        perm = np.argsort(keys, axis=1, kind="stable")  # padding first, then real tokens shuffled
        out_pol = np.take_along_axis(out_pol, perm, axis=1)

    stats = _history_stats(table, user, cutoff, n_pos, n_neg, spec.stats_cap)
    return SequenceBatch(
        item=out_item, category=out_cat, event=out_event, polarity=out_pol,
        timestamp=out_ts, mask=mask, stats=stats, n_positive=n_pos, n_negative=n_neg,
    )


# The modes without random draws, which `_one_query` builds.
_ONE_QUERY_MODES = frozenset({"pos", "mix", "grouped"})


def _one_query(table: HistoryTable, cutoff: float, spec: SequenceSpec) -> SequenceBatch | None:
    """The sequence of a one-user table at one cutoff (the service's request): the same tokens, columns and
    statistics as the batched path below, computed with a few whole-array operations on the two histories
    instead of the (S, K) machinery a batch needs. None (the batched path then runs) when two selected tokens
    of different polarity tie on (timestamp, seq), which an ingested or logged history never holds."""
    pos, neg = table.positives, table.negatives
    L = spec.seq_len
    n_pos = int(pos.timestamp.searchsorted(cutoff, side="left"))
    n_neg = int(neg.timestamp.searchsorted(cutoff, side="left"))
    pos_budget, neg_budget = spec.pos_budget, spec.neg_budget
    if spec.fill_budget:
        k_pos = min(n_pos, pos_budget + max(neg_budget - n_neg, 0))
        k_neg = min(n_neg, neg_budget + max(pos_budget - n_pos, 0))
    else:
        k_pos, k_neg = min(n_pos, pos_budget), min(n_neg, neg_budget)
    p, q = slice(n_pos - k_pos, n_pos), slice(n_neg - k_neg, n_neg)  # the most recent k before the cutoff
    total = k_pos + k_neg
    out_item = np.full((1, L), PAD_INDEX, dtype=np.int64)
    out_cat = np.full((1, L), PAD_INDEX, dtype=np.int64)
    out_event = np.zeros((1, L), dtype=np.int64)
    out_pol = np.zeros((1, L), dtype=np.int64)
    out_ts = np.zeros((1, L), dtype=np.float64)
    if total:
        ts = np.concatenate([pos.timestamp[p], neg.timestamp[q]])
        order: slice | np.ndarray = slice(None)  # positives, then negatives (or one polarity, already in order)
        if spec.mode != "grouped" and k_pos and k_neg:
            seq = np.concatenate([pos.seq[p], neg.seq[q]])
            order = np.lexsort((seq, ts))
            ts_sorted, seq_sorted = ts[order], seq[order]
            if ((ts_sorted[1:] == ts_sorted[:-1]) & (seq_sorted[1:] == seq_sorted[:-1])).any():
                return None
        at = slice(L - total, L)
        out_item[0, at] = np.concatenate([pos.item[p], neg.item[q]])[order]
        out_cat[0, at] = np.concatenate([pos.category[p], neg.category[q]])[order]
        out_event[0, at] = np.concatenate([pos.event[p], neg.event[q]])[order]
        out_ts[0, at] = ts[order]
        out_pol[0, at] = np.concatenate([np.ones(k_pos, dtype=np.int64), -np.ones(k_neg, dtype=np.int64)])[order]
    last = max(pos.timestamp[n_pos - 1] if n_pos else -np.inf, neg.timestamp[n_neg - 1] if n_neg else -np.inf)
    n_pos_a, n_neg_a = np.array([n_pos], dtype=np.int64), np.array([n_neg], dtype=np.int64)
    return SequenceBatch(
        item=out_item, category=out_cat, event=out_event, polarity=out_pol, timestamp=out_ts, mask=out_pol != 0,
        stats=_one_query_stats(n_pos, n_neg, float(last), cutoff, spec.stats_cap), n_positive=n_pos_a,
        n_negative=n_neg_a,
    )


def _one_query_stats(n_pos: int, n_neg: int, last: float, cutoff: float, cap: int) -> np.ndarray:
    """`_history_stats` of one query, with the same numpy operations on the same float64 values."""
    cp, cn = float(min(n_pos, cap)), float(min(n_neg, cap))
    rate = cp / (cp + cn) if cp + cn > 0 else 0.0
    gap = cutoff - last if np.isfinite(last) and np.isfinite(cutoff) else 0.0
    logs = np.log1p(np.array([cp, cn, max(gap, 0.0)], dtype=np.float64))
    return np.array([[logs[0], logs[1], rate, logs[2]]], dtype=np.float64).astype(np.float32)


def _count_before(stream: PolarityStreams, user: np.ndarray, cutoff: np.ndarray) -> np.ndarray:
    """Events of `user` in `stream` with timestamp < cutoff, per query: (S,) int64.

    A vectorised binary search inside each user's sorted slice.
    """
    if stream.n_users == 1:
        # One user (the service's table): his slice is the whole sorted array, so numpy's own
        # binary search gives the same counts without a Python-level loop per halving.
        return np.searchsorted(stream.timestamp, cutoff, side="left").astype(np.int64)
    lo = stream.ptr[user].copy()
    hi = stream.ptr[user + 1].copy()
    start = lo.copy()
    ts = stream.timestamp
    while True:
        active = lo < hi
        if not active.any():
            break
        mid = (lo + hi) // 2
        below = np.zeros_like(active)
        below[active] = ts[mid[active]] < cutoff[active]
        lo = np.where(active & below, mid + 1, lo)
        hi = np.where(active & ~below, mid, hi)
    counts: np.ndarray = lo - start
    return counts


def _count_before_events(
    other: PolarityStreams, user: np.ndarray, stream: PolarityStreams, glob: np.ndarray
) -> np.ndarray:
    """For events `glob` (S, K) of `stream`, how many of the user's `other` events precede them.

    "Precede" is (timestamp, seq) order. Returns user-local counts, (S, K) int64.
    """
    S, K = glob.shape
    if K == 0:
        return np.zeros((S, 0), dtype=np.int64)
    ts = stream.timestamp[glob.ravel()] if stream.timestamp.size else np.zeros(S * K)
    sq = stream.seq[glob.ravel()] if stream.seq.size else np.zeros(S * K, dtype=np.int64)
    if other.n_users == 1:
        return _count_before_one_user(other, ts, sq).reshape(S, K)
    u = np.broadcast_to(user[:, None], (S, K)).ravel()
    lo = other.ptr[u].copy()
    hi = other.ptr[u + 1].copy()
    start = lo.copy()
    o_ts, o_seq = other.timestamp, other.seq
    while True:
        active = lo < hi
        if not active.any():
            break
        mid = (lo + hi) // 2
        m = mid[active]
        t_act = ts[active]
        before = np.zeros_like(active)
        before[active] = (o_ts[m] < t_act) | ((o_ts[m] == t_act) & (o_seq[m] < sq[active]))
        lo = np.where(active & before, mid + 1, lo)
        hi = np.where(active & ~before, mid, hi)
    counts: np.ndarray = (lo - start).reshape(S, K)
    return counts


def _count_before_one_user(other: PolarityStreams, ts: np.ndarray, sq: np.ndarray) -> np.ndarray:
    """How many events of a one-user `other` precede each (ts, sq) in (timestamp, seq) order: (Q,) int64.

    Sorts the user's events and the queries together by (timestamp, seq, queries first), so that an
    event equal to a query on both keys does not count as before it, then counts the events ahead
    of each query: the same strict comparison as the binary search of `_count_before_events`."""
    n_other = other.timestamp.shape[0]
    is_event = np.concatenate([np.ones(n_other, dtype=np.int64), np.zeros(ts.shape[0], dtype=np.int64)])
    order = np.lexsort((is_event, np.concatenate([other.seq, sq]), np.concatenate([other.timestamp, ts])))
    event_sorted = is_event[order]
    events_ahead = np.cumsum(event_sorted) - event_sorted  # events strictly before each sorted position
    query_at = event_sorted == 0
    counts = np.empty(ts.shape[0], dtype=np.int64)
    counts[order[query_at] - n_other] = events_ahead[query_at]
    return counts


def _count_less_rows(sorted_rows: np.ndarray, n_valid: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per row, how many of the first n_valid entries of `sorted_rows` are < each of `values`."""
    S, J = values.shape
    lo = np.zeros((S, J), dtype=np.int64)
    hi = np.broadcast_to(n_valid[:, None], (S, J)).copy()
    rows = np.broadcast_to(np.arange(S)[:, None], (S, J))
    if sorted_rows.shape[1] == 0:
        return lo
    while True:
        active = lo < hi
        if not active.any():
            break
        mid = (lo + hi) // 2
        less = sorted_rows[rows, np.minimum(mid, sorted_rows.shape[1] - 1)] < values
        lo = np.where(active & less, mid + 1, lo)
        hi = np.where(active & ~less, mid, hi)
    return lo


def _history_stats(
    table: HistoryTable,
    user: np.ndarray,
    cutoff: np.ndarray,
    n_pos: np.ndarray,
    n_neg: np.ndarray,
    cap: int,
) -> np.ndarray:
    """(S, 4) float32: log1p(#pos), log1p(#neg), positive rate, log1p(seconds since last event).

    Counts are clipped at `cap` so a capped online history (Redis keeps the most recent events)
    gives the same numbers as the full offline log.
    """
    cp = np.minimum(n_pos, cap).astype(np.float64)
    cn = np.minimum(n_neg, cap).astype(np.float64)
    both = cp + cn
    rate = np.divide(cp, both, out=np.zeros_like(cp), where=both > 0)
    last = np.full(user.shape, -np.inf)
    for stream, n in ((table.positives, n_pos), (table.negatives, n_neg)):
        has = n > 0
        idx = stream.ptr[user[has]] + n[has] - 1
        last[has] = np.maximum(last[has], stream.timestamp[idx])
    gap = np.where(np.isfinite(last) & np.isfinite(cutoff), cutoff - last, 0.0)
    out = np.stack([np.log1p(cp), np.log1p(cn), rate, np.log1p(np.maximum(gap, 0.0))], axis=1)
    return out.astype(np.float32)


_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a counter-based hash, so random modes need no shared RNG state."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    out: np.ndarray = x ^ (x >> np.uint64(31))
    return out


def _uniform(seed: int, n_pos: np.ndarray, n_neg: np.ndarray, cutoff: np.ndarray, width: int,
             *, salt: int) -> np.ndarray:
    """(S, width) uniforms in [0, 1) that depend only on (seed, salt, query counts, cutoff, slot).

    Offline and online queries with the same history and cutoff draw the same numbers.
    """
    with np.errstate(over="ignore"):
        key = _mix64(np.full(n_pos.shape, (seed * 1_000_003 + salt) & 0xFFFFFFFF, dtype=np.uint64)
                     ^ n_pos.astype(np.uint64) * _GOLDEN)
        key = _mix64(key ^ n_neg.astype(np.uint64) * _M1)
        key = _mix64(key ^ np.where(np.isfinite(cutoff), cutoff, 0.0).astype(np.float64).view(np.uint64))
        slots = np.arange(width, dtype=np.uint64)[None, :]
        bits = _mix64(key[:, None] ^ (slots + np.uint64(1)) * _GOLDEN)
    return (bits >> np.uint64(11)).astype(np.float64) / float(1 << 53)
