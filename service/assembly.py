"""The online path of the one sequence builder: raw histories from Redis -> `SequenceBatch`. Torch-free.

Raw ids become vocabulary indices exactly as the trainer's `model.data.samples.encode_events` maps them,
then `model.features.sequence.build_sequences` — the same function the trainer uses — selects and merges
the tokens. Nothing here selects, merges or pads on its own.

Mapping (identical to offline):
- item: `vocab.item_index`, unseen -> OOV;
- category: the event's own category via `vocab.category_index`; an event without one, or with
  one unseen in training, is OOV (offline history tokens do *not* fall back to the item's
  training category — only candidates do, see `Vocabulary.candidate_category`);
- event type: the name normalised like the log reader does (`strip().lower()`), then
  `vocab.event_index(names, polarity)`; an empty or unseen name falls back to the generic
  `positive` / `negative` type of the event's polarity.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from model.features.packed_strings import PackedStrings
from model.features.sequence import HistoryTable, PolarityStreams, SequenceBatch, build_sequences
from model.features.spec import SequenceSpec
from model.features.vocab import Vocabulary
from service.history_columns import UserHistory


def assemble_sequences(
    histories: Sequence[UserHistory],
    *,
    cutoff: np.ndarray | Sequence[float],
    vocab: Vocabulary,
    spec: SequenceSpec,
) -> SequenceBatch:
    """One sequence per history (U of them), each from its events strictly before its cutoff.

    cutoff: (U,) query times (request time online). One `build_sequences` call for all U.
    """
    cut = np.asarray(cutoff, dtype=np.float64).reshape(-1)
    if cut.shape[0] != len(histories):
        raise ValueError(f"{len(histories)} histories but {cut.shape[0]} cutoffs")
    n_users = len(histories)
    if n_users == 1 and histories[0].events is not None:  # the score path: one read of one user
        return build_sequences(_one_user_table(histories[0], vocab), user=np.zeros(1, dtype=np.int64), cutoff=cut,
                               spec=spec, n_items=vocab.n_items)
    raws = [h.positives for h in histories] + [h.negatives for h in histories]
    lengths = np.fromiter(map(len, raws), dtype=np.int64, count=2 * n_users)
    n_pos = int(lengths[:n_users].sum())
    if int(lengths.sum()) == 0:
        table = HistoryTable(positives=PolarityStreams.empty(n_users), negatives=PolarityStreams.empty(n_users))
    else:
        # Every event of both polarities looked up at once (the columns stay numpy: ids as byte ranges, event
        # names through their few distinct values), then split back by polarity.
        parts = [r for r in raws if len(r)]
        item = vocab.item_index_packed(PackedStrings.concat([r.item for r in parts]))
        category = vocab.category_index_packed(PackedStrings.concat([r.category for r in parts]))
        sign = np.ones(int(lengths.sum()), dtype=np.int64)
        sign[n_pos:] = -1
        event = vocab.event_index_packed(PackedStrings.concat([r.event for r in parts]), sign)
        timestamp = np.concatenate([r.timestamps for r in parts])
        seq = np.concatenate([r.seqs for r in parts])
        users = np.arange(n_users, dtype=np.int64)
        user = np.concatenate([users, users]).repeat(lengths)
        # Each history comes sorted by (timestamp, seq) from the store (`RawHistory`'s contract), and the users
        # are concatenated in order: each polarity's streams are user-sorted as they are.
        table = HistoryTable(**{name: PolarityStreams.from_user_sorted(
            n_users=n_users, user=user[rows], item=item[rows], category=category[rows], event=event[rows],
            timestamp=timestamp[rows], seq=seq[rows]) for name, rows in (("positives", slice(0, n_pos)),
                                                                           ("negatives", slice(n_pos, None)))})
    return build_sequences(
        table, user=np.arange(n_users, dtype=np.int64), cutoff=cut, spec=spec, n_items=vocab.n_items
    )


def _one_user_table(history: UserHistory, vocab: Vocabulary) -> HistoryTable:
    """The table of one user read from the store, whose events come as one set of columns (positives first): the
    same lookups and streams as the general path above, on those columns as they are (no split and re-join)."""
    events = history.events
    assert events is not None
    n, n_pos = len(events), history.n_positive
    if n == 0:
        return HistoryTable(positives=PolarityStreams.empty(1), negatives=PolarityStreams.empty(1))
    item = vocab.item_index_packed(events.item)
    category = vocab.category_index_packed(events.category)
    sign = np.ones(n, dtype=np.int64)
    sign[n_pos:] = -1
    event = vocab.event_index_packed(events.event, sign)

    def streams(rows: slice, count: int) -> PolarityStreams:
        return PolarityStreams(ptr=np.array([0, count], dtype=np.int64), item=item[rows], category=category[rows],
                               event=event[rows], timestamp=events.timestamps[rows], seq=events.seqs[rows])

    return HistoryTable(positives=streams(slice(0, n_pos), n_pos), negatives=streams(slice(n_pos, n), n - n_pos))
