"""The history read decoded by numpy (`service.history_columns`) and looked up by `StringIndex`: the same
columns and vocabulary indices as parsing every member with `json` and looking every id up in a dict."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from model.features.packed_strings import PackedStrings, StringIndex
from service.history_columns import DamagedHistory, RawHistory, decode_history

ALPHABET = ["a", "b", "7", "é", "ü", "用", "🙂", "\u2028", " ", ":", ",", "[", "]", "{", "}", "\x7f"]
ESCAPED = ['"', "\\", "\n", "\t", "\x00", "\x1f"]


def _string(rng: random.Random, *, escapes: bool, min_len: int = 1) -> str:
    pool = ALPHABET + (ESCAPED if escapes else [])
    return "".join(rng.choice(pool) for _ in range(rng.randint(min_len, 8)))


def _events(rng: random.Random, n: int, *, escapes: bool) -> list[tuple[int, float, str, str, str | None]]:
    out = []
    for k in range(n):
        cat = None if rng.random() < 0.4 else _string(rng, escapes=escapes, min_len=0)
        out.append((k + 1, rng.uniform(-1e12, 1e12), _string(rng, escapes=escapes),
                    _string(rng, escapes=escapes, min_len=0), cat))
    return sorted(out, key=lambda e: (e[1], e[0]))


def _reply(events: list[tuple[int, float, str, str, str | None]]) -> bytes:
    """What READ_SCRIPT answers for these events: member and score lines, as the writer and Redis write them."""
    lines = []
    for seq, ts, item, event, cat in events:
        payload = json.dumps([item, event, cat], ensure_ascii=False, separators=(",", ":"))
        lines += [f"{seq:016d}:{payload}", f"{ts:.17g}"]
    return "\n".join(lines).encode("utf-8")


@pytest.mark.parametrize("escapes", [False, True], ids=["numpy-path", "json-path"])
def test_decode_matches_a_json_parse_of_every_member(escapes: bool) -> None:
    rng = random.Random(7 if escapes else 3)
    for n in (0, 1, 2, 5, 64):
        events = _events(rng, n, escapes=escapes)
        h = decode_history(_reply(events))
        assert len(h) == n
        assert h.seqs.tolist() == [e[0] for e in events]
        assert h.timestamps.tolist() == [e[1] for e in events]  # bit for bit
        assert h.item_ids == [e[2] for e in events]
        assert h.events == [e[3] for e in events]
        assert h.categories == [e[4] for e in events]


def test_an_escape_anywhere_gives_the_same_columns_for_the_other_members() -> None:
    rng = random.Random(11)
    events = _events(rng, 20, escapes=False)
    plain = decode_history(_reply(events))
    escaped = [*events[:7], (99, events[6][1], 'q"uote', "click", None), *events[7:]]
    both = decode_history(_reply(escaped))
    assert both.item_ids[:7] + both.item_ids[8:] == plain.item_ids
    assert both.item_ids[7] == 'q"uote'
    assert both.categories[:7] + both.categories[8:] == plain.categories


@pytest.mark.parametrize("reply", [
    b'0000000000000001:["i","click",null]',  # a member without its score
    b'0000000000000001:["i","click",null]\nnot-a-number',
    b'000000000000001:["i","click",null]\n1.5',  # 15-digit counter
    b'00000000000000x1:["i","click",null]\n1.5',
    b'0000000000000001:["i","click"]\n1.5',  # two fields
    b'0000000000000001:["i","click",null]x\n1.5',
    b'0000000000000001:["i","click",7]\n1.5',
    b'0000000000000001:["i",null,null]\n1.5',
    b'0000000000000001:["i","click",null\n1.5',
    b'0000000000000001:["i","click"\n1.0\n0000000000000002:null],["i2","like",null]\n2.0',  # joins into valid JSON
])
def test_damaged_replies_are_refused(reply: bytes) -> None:
    with pytest.raises(DamagedHistory):
        decode_history(reply)


def test_raw_history_of_lists_round_trips() -> None:
    h = RawHistory.of(item_ids=["a", "é"], categories=[None, "c"], events=["click", "skip"], timestamps=[1.0, 2.0],
                      seqs=[3, 4])
    assert (h.item_ids, h.categories, h.events, h.seqs.tolist()) == (["a", "é"], [None, "c"], ["click", "skip"], [3, 4])
    with pytest.raises(ValueError, match="same length"):
        RawHistory.of(item_ids=["a"], categories=[], events=["click"], timestamps=[1.0], seqs=[1])


@pytest.mark.parametrize("names", [
    ("a", "b", "ab", "é", "🙂", "", "x" * 40),
    ("a", "b", "a", "c"),  # a repeated name: the last index, as a dict built in order keeps it
    ("a", "a\x00", "b"),  # a name ending in NUL: looked up one by one
])
def test_string_index_equals_dict_lookups(names: tuple[str, ...]) -> None:
    rng = random.Random(5)
    queries: list[str | None] = [rng.choice(names) for _ in range(50)]
    queries += ["zz", "a\x00", "\x00", "x" * 41, "x" * 39, "ab\x00", None, "", "é", "e"]
    index = StringIndex(names, first=2)
    lookup = {name: 2 + k for k, name in enumerate(names)}
    want = [1 if q is None else lookup.get(q, 1) for q in queries]
    assert index.lookup(PackedStrings.of(queries), missing=1).tolist() == want


def test_fixed_width_cuts_and_pads() -> None:
    packed = PackedStrings.of(["ab", "", "é", None, "abcdef"])
    assert packed.fixed_width().tolist() == [b"ab", b"", "é".encode(), b"", b"abcdef"]
    assert packed.fixed_width(3).tolist() == [b"ab", b"", "é".encode(), b"", b"abc"]
    assert np.array_equal(packed.lengths, [2, 0, 2, 0, 6])


@pytest.mark.parametrize("with_category", [False, True], ids=["no-category", "category"])
def test_a_history_of_one_layout_decodes_to_the_same_columns(with_category: bool) -> None:
    """Every payload `["i","e",null]`, or every one `["i","e","c"]`: the usual history, decoded by its own shorter
    path (one reshape of the quotes' positions)."""
    rng = random.Random(13)
    for n in (1, 2, 64):
        events = [(seq, ts, item, event, (_string(rng, escapes=False, min_len=0) if with_category else None))
                  for seq, ts, item, event, _ in _events(rng, n, escapes=False)]
        h = decode_history(_reply(events))
        assert (h.item_ids, h.events, h.categories) == ([e[2] for e in events], [e[3] for e in events],
                                                         [e[4] for e in events])
        assert h.timestamps.tolist() == [e[1] for e in events] and h.seqs.tolist() == [e[0] for e in events]
        assert (h.category.null is not None and h.category.null.all()) == (not with_category)


@pytest.mark.parametrize("reply", [
    b'0000000000000001:["i","click",nulx]\n1.5',  # four quotes where they belong, the rest not `,null]`
    b'0000000000000001:["i""click",null]\n1.5',
    b'0000000000000001:["i","click","c"}\n1.5',
    b'0000000000000001:["i","click"."c"]\n1.5',
    # eight quotes for two events, five in the first and three in the second
    b'0000000000000001:["a"","e",null]\n1.0\n0000000000000002:["b,"e",null]\n2.0',
    # twelve quotes for two events, seven and five
    b'0000000000000001:["a"","e","c"]\n1.0\n0000000000000002:["b,"e","c"]\n2.0',
])
def test_damaged_replies_of_one_layout_are_refused(reply: bytes) -> None:
    with pytest.raises(DamagedHistory):
        decode_history(reply)
