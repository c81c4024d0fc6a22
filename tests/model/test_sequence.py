"""The sequence builder against a slow, obviously-correct reference, plus leak and parity tests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.features.sequence import HistoryTable, PolarityStreams, build_sequences
from model.features.spec import SequenceSpec


@dataclass(frozen=True)
class Ev:
    user: int
    ts: float
    seq: int
    item: int
    cat: int
    event: int
    pol: int


def reference(events: list[Ev], user: int, cutoff: float, spec: SequenceSpec) -> dict[str, list]:
    """Paper §3.3 spelled out for one query, one token at a time."""
    before = sorted((e for e in events if e.user == user and e.ts < cutoff), key=lambda e: (e.ts, e.seq))
    pos = [e for e in before if e.pol > 0]
    neg = [e for e in before if e.pol < 0]
    kp_budget, kn_budget = spec.pos_budget, spec.neg_budget
    if spec.fill_budget:
        kp = min(len(pos), kp_budget + max(kn_budget - len(neg), 0))
        kn = min(len(neg), kn_budget + max(kp_budget - len(pos), 0))
    else:
        kp, kn = min(len(pos), kp_budget), min(len(neg), kn_budget)
    chosen_pos = pos[len(pos) - kp :]
    chosen_neg = neg[len(neg) - kn :]
    if spec.mode == "grouped":
        tokens = chosen_pos + chosen_neg
    else:
        tokens = sorted(chosen_pos + chosen_neg, key=lambda e: (e.ts, e.seq))
    pad = spec.seq_len - len(tokens)
    cp, cn = min(len(pos), spec.stats_cap), min(len(neg), spec.stats_cap)
    last = max((e.ts for e in before), default=None)
    return {
        "item": [0] * pad + [e.item for e in tokens],
        "category": [0] * pad + [e.cat for e in tokens],
        "event": [0] * pad + [e.event for e in tokens],
        "polarity": [0] * pad + [e.pol for e in tokens],
        "timestamp": [0.0] * pad + [e.ts for e in tokens],
        "stats": [
            np.log1p(cp), np.log1p(cn), cp / (cp + cn) if cp + cn else 0.0,
            np.log1p(cutoff - last) if last is not None else 0.0,
        ],
    }


def table_of(events: list[Ev], n_users: int) -> HistoryTable:
    streams = []
    for sign in (1, -1):
        chosen = sorted((e for e in events if e.pol == sign), key=lambda e: (e.user, e.ts, e.seq))
        col = lambda name, dt, chosen=chosen: np.array([getattr(e, name) for e in chosen], dtype=dt)  # noqa: E731
        streams.append(
            PolarityStreams.from_user_sorted(
                n_users=n_users, user=col("user", np.int64), item=col("item", np.int64),
                category=col("cat", np.int64), event=col("event", np.int64),
                timestamp=col("ts", np.float64), seq=col("seq", np.int64),
            )
        )
    return HistoryTable(positives=streams[0], negatives=streams[1])


def single_user_table(events: list[Ev], user: int) -> HistoryTable:
    mine = [e for e in events if e.user == user]
    renumbered = [Ev(0, e.ts, e.seq, e.item, e.cat, e.event, e.pol) for e in mine]
    return table_of(renumbered, 1)


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[Ev], int]:
    n_users = draw(st.integers(1, 4))
    n = draw(st.integers(0, 60))
    events = []
    for seq in range(n):
        # Few distinct timestamps so ties between and within polarities are common.
        events.append(
            Ev(
                user=draw(st.integers(0, n_users - 1)), ts=float(draw(st.integers(0, 12))), seq=seq,
                item=draw(st.integers(2, 30)), cat=draw(st.integers(2, 6)), event=draw(st.integers(1, 4)),
                pol=draw(st.sampled_from([1, -1])),
            )
        )
    return events, n_users


spec_strategy = st.builds(
    SequenceSpec,
    seq_len=st.integers(1, 12),
    pos_ratio=st.sampled_from([0.0, 0.25, 0.3, 0.5, 0.7, 1.0]),
    mode=st.sampled_from(["mix", "pos", "grouped"]),
    fill_budget=st.booleans(),
    history_cap=st.just(64),
    stats_cap=st.integers(1, 64),
)


@settings(max_examples=300, deadline=None)
@given(data=streams(), spec=spec_strategy, cutoffs=st.lists(st.integers(-1, 14), min_size=1, max_size=6))
def test_matches_reference(data: tuple[list[Ev], int], spec: SequenceSpec, cutoffs: list[int]) -> None:
    events, n_users = data
    table = table_of(events, n_users)
    users = np.array([i % n_users for i in range(len(cutoffs))], dtype=np.int64)
    cut = np.array(cutoffs, dtype=np.float64)
    out = build_sequences(table, user=users, cutoff=cut, spec=spec)
    for s, (u, c) in enumerate(zip(users, cut, strict=True)):
        ref = reference(events, int(u), float(c), spec)
        for name in ("item", "category", "event", "polarity", "timestamp"):
            assert getattr(out, name)[s].tolist() == ref[name], (name, s)
        assert out.mask[s].tolist() == [p != 0 for p in ref["polarity"]]
        np.testing.assert_allclose(out.stats[s], ref["stats"], rtol=1e-6, atol=1e-6)


@settings(max_examples=200, deadline=None)
@given(
    data=streams(),
    mode=st.sampled_from(["mix", "pos", "grouped", "random_history", "random_polarity", "random_universe"]),
    fill=st.booleans(),
    cutoffs=st.lists(st.integers(-1, 14), min_size=1, max_size=6),
)
def test_batch_equals_single_user(data: tuple[list[Ev], int], mode: str, fill: bool, cutoffs: list[int]) -> None:
    """The offline batch path and the online one-user path give identical tokens, in every mode."""
    events, n_users = data
    spec = SequenceSpec(seq_len=8, pos_ratio=0.5, mode=mode, fill_budget=fill, history_cap=64, stats_cap=32, seed=7)
    users = np.array([i % n_users for i in range(len(cutoffs))], dtype=np.int64)
    cut = np.array(cutoffs, dtype=np.float64)
    batch = build_sequences(table_of(events, n_users), user=users, cutoff=cut, spec=spec, n_items=40)
    for s, (u, c) in enumerate(zip(users, cut, strict=True)):
        one = build_sequences(
            single_user_table(events, int(u)), user=np.zeros(1, np.int64), cutoff=np.array([c]),
            spec=spec, n_items=40,
        )
        for name in ("item", "category", "event", "polarity", "timestamp", "mask", "stats"):
            np.testing.assert_array_equal(getattr(batch, name)[s], getattr(one, name)[0], err_msg=name)


def test_no_leak_of_current_or_later_events() -> None:
    """A sample at time t sees nothing at or after t: change the future, the sequence is the same."""
    rng = np.random.default_rng(0)
    events = [
        Ev(0, float(t), i, int(rng.integers(2, 50)), 2, 1, int(rng.choice([1, -1])))
        for i, t in enumerate(sorted(rng.integers(0, 100, size=80)))
    ]
    spec = SequenceSpec(seq_len=20, pos_ratio=0.5)
    cut = 50.0
    base = build_sequences(table_of(events, 1), user=np.zeros(1, np.int64), cutoff=np.array([cut]), spec=spec)
    # Flip every event at or after the cut-off (labels and items): nothing may change.
    flipped = [Ev(e.user, e.ts, e.seq, e.item + 1000, e.cat, e.event, -e.pol) if e.ts >= cut else e for e in events]
    other = build_sequences(table_of(flipped, 1), user=np.zeros(1, np.int64), cutoff=np.array([cut]), spec=spec)
    for name in ("item", "polarity", "timestamp", "stats"):
        np.testing.assert_array_equal(getattr(base, name), getattr(other, name))
    assert base.timestamp[base.mask].max() < cut
    # And flipping an event before the cut-off does change it (the test can fail).
    last_before = max(e.seq for e in events if e.ts < cut)
    changed = [Ev(e.user, e.ts, e.seq, e.item + 1000, e.cat, e.event, e.pol) if e.seq == last_before else e
               for e in events]
    third = build_sequences(table_of(changed, 1), user=np.zeros(1, np.int64), cutoff=np.array([cut]), spec=spec)
    assert not np.array_equal(base.item, third.item)


def test_budget_split_and_left_padding() -> None:
    events = [Ev(0, float(i), i, 100 + i, 2, 1, 1 if i % 3 == 0 else -1) for i in range(30)]
    spec = SequenceSpec(seq_len=10, pos_ratio=0.3)
    out = build_sequences(table_of(events, 1), user=np.zeros(1, np.int64), cutoff=np.array([1e9]), spec=spec)
    pol = out.polarity[0]
    assert (pol == 1).sum() == 3 and (pol == -1).sum() == 7
    assert np.all(np.diff(out.timestamp[0][out.mask[0]]) > 0)
    # The most recent positives (27, 24, 21) and negatives (29, 28, 26, 25, 23, 22, 20).
    assert sorted(out.item[0][pol == 1] - 100) == [21, 24, 27]
    assert sorted(out.item[0][pol == -1] - 100) == [20, 22, 23, 25, 26, 28, 29]


@pytest.mark.parametrize("mode", ["random_history", "random_polarity", "random_universe"])
def test_random_modes_change_what_they_should(mode: str) -> None:
    events = [Ev(0, float(i), i, 100 + i, 2, 1, 1 if i % 2 == 0 else -1) for i in range(200)]
    table = table_of(events, 1)
    mix = build_sequences(table, user=np.zeros(1, np.int64), cutoff=np.array([1e9]), spec=SequenceSpec(seq_len=40))
    rnd = build_sequences(
        table, user=np.zeros(1, np.int64), cutoff=np.array([1e9]),
        spec=SequenceSpec(seq_len=40, mode=mode, seed=3), n_items=5000,
    )
    pos_items = lambda b: sorted(b.item[0][b.polarity[0] == 1])  # noqa: E731
    if mode == "random_polarity":
        assert sorted(rnd.item[0]) == sorted(mix.item[0])
        assert (rnd.polarity[0] == 1).sum() == (mix.polarity[0] == 1).sum()
        assert not np.array_equal(rnd.polarity, mix.polarity)
    else:
        assert pos_items(rnd) == pos_items(mix)  # positives untouched
        neg_r = rnd.item[0][rnd.polarity[0] == -1]
        assert len(neg_r) == 20 and not np.array_equal(neg_r, mix.item[0][mix.polarity[0] == -1])
        if mode == "random_history":
            assert neg_r.min() - 100 < 100  # reaches back into old history, not only the recent end
            assert np.all(np.diff(rnd.timestamp[0][rnd.mask[0]]) > 0)


def test_rejects_bad_queries() -> None:
    table = table_of([], 1)
    with pytest.raises(ValueError, match="NaN"):
        build_sequences(table, user=np.zeros(1, np.int64), cutoff=np.array([np.nan]), spec=SequenceSpec())
    out = build_sequences(table, user=np.zeros(2, np.int64), cutoff=np.array([0.0, np.inf]), spec=SequenceSpec())
    assert not out.mask.any() and np.all(out.stats == 0)


@pytest.mark.parametrize("mode", ["mix", "random_history", "random_polarity"])
def test_one_user_table_matches_batch_on_equal_timestamp_and_seq(mode: str) -> None:
    """The one-user table (the service's) counts "before" strictly on (timestamp, seq) like the batch
    path: a positive and a negative equal on both keys are not before each other."""
    rng = np.random.default_rng(3)
    events = [Ev(0, float(rng.integers(0, 3)), int(rng.integers(0, 4)), int(rng.integers(2, 30)), 2, 1, pol)
              for _ in range(40) for pol in (1, -1)]  # few (timestamp, seq) pairs: many equal across polarities
    events += [Ev(1, 1.0, k, 5, 2, 1, 1) for k in range(3)]  # a second user makes the batch table multi-user
    spec = SequenceSpec(seq_len=30, pos_ratio=0.5, mode=mode, fill_budget=True, history_cap=64, stats_cap=32, seed=1)
    cut = np.array([-1.0, 0.0, 1.0, 2.0, 2.5, 9.0])
    batch = build_sequences(table_of(events, 2), user=np.zeros(cut.shape[0], np.int64), cutoff=cut, spec=spec)
    one = build_sequences(single_user_table(events, 0), user=np.zeros(cut.shape[0], np.int64), cutoff=cut, spec=spec)
    for name in ("item", "category", "event", "polarity", "timestamp", "mask", "stats"):
        np.testing.assert_array_equal(getattr(batch, name), getattr(one, name), err_msg=name)


@pytest.mark.parametrize("mode", ["mix", "pos", "grouped"])
@pytest.mark.parametrize("fill", [False, True])
def test_one_query_of_one_user_matches_the_batch_path_with_ties(mode: str, fill: bool) -> None:
    """One query on a one-user table (the service's request) takes the short path: the same tokens, columns and
    statistics as the batch path, also where timestamps tie across polarities, and where (timestamp, seq) pairs
    repeat (the short path hands those to the batch path)."""
    rng = np.random.default_rng(5)
    unique = [Ev(0, float(rng.integers(0, 4)), k, int(rng.integers(2, 30)), int(rng.integers(2, 6)),
                 int(rng.integers(1, 4)), int(rng.choice([1, -1]))) for k in range(50)]
    repeated = [Ev(0, float(rng.integers(0, 3)), int(rng.integers(0, 4)), int(rng.integers(2, 30)), 2, 1, pol)
                for _ in range(20) for pol in (1, -1)]
    spec = SequenceSpec(seq_len=16, pos_ratio=0.5, mode=mode, fill_budget=fill, history_cap=64, stats_cap=32)
    for events in (unique, repeated):
        batch_table = table_of([*events, Ev(1, 1.0, 99, 5, 2, 1, 1)], 2)  # two users: the batch path
        for c in (-1.0, 0.0, 1.0, 2.5, 9.0):
            one = build_sequences(table_of(events, 1), user=np.zeros(1, np.int64), cutoff=np.array([c]), spec=spec)
            batch = build_sequences(batch_table, user=np.zeros(1, np.int64), cutoff=np.array([c]), spec=spec)
            for name in ("item", "category", "event", "polarity", "timestamp", "mask", "stats", "n_positive",
                         "n_negative"):
                np.testing.assert_array_equal(getattr(one, name), getattr(batch, name), err_msg=f"{name} at {c}")
