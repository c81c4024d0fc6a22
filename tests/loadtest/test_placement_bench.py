"""`polarity bench --only placement`: the serving cost of the two TAPF placements (torch eager)."""

from __future__ import annotations

from loadtest.bench.placement import placement_cost


def _table_rows(md: str) -> list[list[str]]:
    rows = [line for line in md.splitlines() if line.startswith("|") and not line.startswith("|---")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in rows]


def test_placement_cost_table() -> None:
    body = placement_cost(seq_len=8, d_model=8, candidates=(2, 3), repeats=1, n_items=30)
    header, *rows = _table_rows(body)
    assert header[:2] == ["model", "TAPF placement"] and len(header) == 4
    assert [(r[0], r[1]) for r in rows] == [("DIN", "encoded"), ("Transformer", "encoded"), ("Transformer", "input"),
                                            ("OneTrans", "encoded"), ("OneTrans", "input"), ("HyFormer", "encoded"),
                                            ("HyFormer", "input"), ("MixFormer", "encoded"), ("MixFormer", "input")]
    assert all(float(c) > 0 for r in rows for c in r[2:])
