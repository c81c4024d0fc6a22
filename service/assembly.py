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
from itertools import chain

import numpy as np

from model.features.events import normalise_event_name
from model.features.sequence import HistoryTable, PolarityStreams, SequenceBatch, build_sequences
from model.features.spec import SequenceSpec
from model.features.vocab import Vocabulary
from service.history_store import RawHistory, UserHistory


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
    table = HistoryTable(
        positives=_streams([h.positives for h in histories], 1, vocab),
        negatives=_streams([h.negatives for h in histories], -1, vocab),
    )
    return build_sequences(
        table, user=np.arange(len(histories), dtype=np.int64), cutoff=cut, spec=spec, n_items=vocab.n_items
    )


def _streams(raws: Sequence[RawHistory], sign: int, vocab: Vocabulary) -> PolarityStreams:
    """U users' events of one polarity as CSR streams sorted by (user, timestamp, seq)."""
    n_users = len(raws)
    lengths = np.fromiter((len(r.item_ids) for r in raws), dtype=np.int64, count=n_users)
    total = int(lengths.sum())
    if total == 0:
        return PolarityStreams.empty(n_users)
    user = np.repeat(np.arange(n_users, dtype=np.int64), lengths)
    for r in raws:
        n = len(r.item_ids)
        if not (len(r.categories) == len(r.events) == r.timestamps.shape[0] == r.seqs.shape[0] == n):
            raise ValueError("RawHistory columns must all have the same length")
    timestamp = np.concatenate([np.asarray(r.timestamps, dtype=np.float64) for r in raws])
    seq = np.concatenate([np.asarray(r.seqs, dtype=np.int64) for r in raws])
    item = vocab.item_index(chain.from_iterable(r.item_ids for r in raws))
    category = vocab.category_index(chain.from_iterable(r.categories for r in raws))
    event = _event_index([e for r in raws for e in r.events], sign, vocab)
    # Each history comes sorted by (timestamp, seq) from the store (`RawHistory`'s contract), and the users
    # are concatenated in order: the streams are user-sorted as they are.
    return PolarityStreams.from_user_sorted(
        n_users=n_users, user=user, item=item, category=category, event=event, timestamp=timestamp, seq=seq,
    )


def _event_index(events: list[str], sign: int, vocab: Vocabulary) -> np.ndarray:
    """(E,) event-type indices of raw event names of one polarity.

    A history holds a handful of distinct names: each is normalised and looked up once, and the
    events take their name's index (elementwise the same as looking every event up)."""
    distinct = list(dict.fromkeys(events))
    position = {name: k for k, name in enumerate(distinct)}
    per_name = vocab.event_index([normalise_event_name(e) for e in distinct], np.full(len(distinct), sign))
    out: np.ndarray = per_name[np.fromiter(map(position.__getitem__, events), dtype=np.int64, count=len(events))]
    return out
