"""Event logs: round trips, loaders and clear errors for bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.cli import main as cli_main
from model.data.events import EventLogError, read_event_log, write_event_log
from model.data.loaders import load_events
from model.data.split import split_events
from model.data.synthetic import SyntheticWorldConfig, generate
from model.data.vocabulary import build_vocabulary
from model.features.vocab import Vocabulary


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("ext", ["csv", "parquet"])
def test_round_trip_sorted_by_user_time_then_file_order(tmp_path: Path, ext: str) -> None:
    cols = {
        "user_id": np.array(["b", "a", "b", "a", "b"], dtype=object),
        "item_id": np.array([10, 11, 12, 13, 14]),
        "timestamp": np.array([5.0, 3.0, 5.0, 1.5, 2.0]),
        "label": np.array([1, 0, 0, 1, 0]),
    }
    table = read_event_log(write_event_log(cols, tmp_path / f"log.{ext}"))
    users = [table.user_keys[u] for u in table.user]
    items = [table.item_keys[i] for i in table.item]
    assert users == ["b", "b", "b", "a", "a"] or users == ["a", "a", "b", "b", "b"]
    by_user = {u: [it for uu, it in zip(users, items, strict=True) if uu == u] for u in ("a", "b")}
    assert by_user == {"a": ["13", "11"], "b": ["14", "10", "12"]}  # tie at t=5 keeps file order
    assert table.event_types == ("negative", "positive")
    assert table.label.sum() == 2


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("user_id,item_id,label\n1,2,1\n", "missing required column(s) ['timestamp']"),
        ("user_id,item_id,timestamp,label\n1,2,10,1\n1,3,noon,0\n", "row 2, column 'timestamp': not a number: 'noon'"),
        ("user_id,item_id,timestamp,label\n1,2,10,1\n1,3,11,2\n", "row 2, column 'label': must be 0 or 1"),
        ("user_id,item_id,timestamp,label\n1,2,10,1\n1,3,11,yes\n", "row 2, column 'label'"),
        ("user_id,item_id,timestamp,label\n1,2,10,1\n,3,11,0\n", "row 2, column 'user_id': empty value"),
        ("user_id,item_id,timestamp,label\n1,2,inf,1\n", "row 1, column 'timestamp': not a finite number"),
    ],
)
def test_bad_files_name_file_row_and_column(tmp_path: Path, text: str, needle: str) -> None:
    path = write_csv(tmp_path / "bad.csv", text)
    with pytest.raises(EventLogError) as err:
        read_event_log(path)
    assert str(path) in str(err.value) and needle in str(err.value)


def test_bad_file_via_cli_is_a_message_not_a_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_csv(tmp_path / "bad.csv", "user_id,item_id,timestamp,label\n1,2,x,1\n")
    code = cli_main(["train", "--data", str(path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert "row 1, column 'timestamp'" in err and "Traceback" not in err


def test_unknown_extension_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(EventLogError, match="no such file"):
        load_events(tmp_path / "nope.csv")
    (tmp_path / "log.txt").write_text("x")
    with pytest.raises(EventLogError, match="unknown extension"):
        read_event_log(tmp_path / "log.txt")


def test_optional_event_and_category_columns(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "log.csv",
        "user_id,item_id,timestamp,label,event,category\n"
        "u1,i1,1,1,click,cat|a\nu1,i2,2,0,skip,\nu1,i3,3,0,,b\nu1,i4,4,1,Like,b\n",
    )
    t = read_event_log(path)
    names = [t.event_types[e] for e in t.event]
    assert names == ["click", "skip", "negative", "like"]
    cats = [None if c < 0 else t.category_keys[c] for c in t.category]
    assert cats == ["cat|a", None, "b", "b"]


def test_kuairec_loader(tmp_path: Path) -> None:
    (tmp_path / "small_matrix.csv").write_text(
        "user_id,video_id,play_duration,video_duration,time,date,timestamp,watch_ratio\n"
        "14,148,4381,6067,2020-07-05 05:27:48.378,20200705,1593898068.378,0.72\n"
        "14,183,11635,6100,2020-07-05 05:28:00.057,20200705,1593898080.057,2.5\n"
        "15,148,100,6067,2020-07-05 05:29:00.000,20200705,,0.1\n"
    )
    (tmp_path / "item_categories.csv").write_text('video_id,feat\n148,"[8]"\n183,"[27, 9]"\n')
    t = load_events(tmp_path)
    assert len(t) == 2  # the row without a timestamp is dropped
    assert t.label.tolist() == [0, 1]  # watch_ratio >= 2.0 is positive
    assert [t.category_keys[c] for c in t.category] == ["8", "27"]
    assert [t.event_types[e] for e in t.event] == ["skip", "click"]


def test_kuairand_loader(tmp_path: Path) -> None:
    (tmp_path / "log_standard_4_08_to_4_21_1k.csv").write_text(
        "user_id,video_id,date,hourmin,time_ms,is_click,is_like,is_hate\n"
        "0,10,20220408,1200,1649390000000,1,1,0\n0,11,20220408,1201,1649390001500,0,0,1\n"
        "1,10,20220408,1202,1649390002000,0,0,0\n"
    )
    t = load_events(tmp_path)
    assert t.timestamp.tolist() == [1649390000.0, 1649390001.5, 1649390002.0]
    assert [t.event_types[e] for e in t.event] == ["like", "dislike", "skip"]
    assert t.label.tolist() == [1, 0, 0]


def test_synthetic_world_is_deterministic_and_calibrated() -> None:
    cfg = SyntheticWorldConfig(users=300, items=500, events=30_000, seed=3, positive_rate=0.2)
    a, b = generate(cfg), generate(cfg)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert 0.17 < a["label"].mean() < 0.23
    other = generate(SyntheticWorldConfig(users=300, items=500, events=30_000, seed=4))
    assert not np.array_equal(a["item_id"], other["item_id"])
    # Sorted by (user, timestamp) like a real log.
    order = np.lexsort((a["timestamp"], a["user_id"]))
    np.testing.assert_array_equal(order, np.arange(len(order)))


def test_synthetic_skips_carry_information() -> None:
    """A click after a skip of the same category is rarer than after a click: skips say 'inactive'."""
    cols = generate(SyntheticWorldConfig(users=500, items=2000, events=100_000, seed=1))
    same_user = cols["user_id"][1:] == cols["user_id"][:-1]
    same_cat = cols["category"][1:] == cols["category"][:-1]
    prev_click, nxt = cols["label"][:-1] == 1, cols["label"][1:]
    after_click = nxt[same_user & same_cat & prev_click].mean()
    after_skip = nxt[same_user & same_cat & ~prev_click].mean()
    assert after_click > 1.5 * after_skip


def test_temporal_split_and_vocab_on_train_only(tmp_path: Path) -> None:
    cols = generate(SyntheticWorldConfig(users=200, items=3000, events=20_000, seed=2))
    t = read_event_log(write_event_log(cols, tmp_path / "log.parquet"))
    parts = split_events(t)
    assert len(parts.train) + len(parts.valid) + len(parts.test) == len(t)
    assert abs(len(parts.test) / len(t) - 0.2) < 0.01 and abs(len(parts.valid) / len(t) - 0.1) < 0.01
    assert t.timestamp[parts.train].max() <= t.timestamp[parts.valid].min()
    assert t.timestamp[parts.valid].max() <= t.timestamp[parts.test].min()
    vocab = build_vocabulary(t, parts.train)
    train_items = {t.item_keys[i] for i in t.item[parts.train]}
    assert set(vocab.items) == train_items
    unseen = [t.item_keys[i] for i in t.item[parts.test] if t.item_keys[i] not in train_items]
    assert unseen, "this world should have cold-start items in test"
    assert set(vocab.item_index(unseen).tolist()) == {1}  # OOV
    vocab.save(tmp_path / "vocab")
    again = Vocabulary.load(tmp_path / "vocab")
    assert again.items == vocab.items and again.event_types == vocab.event_types
    np.testing.assert_array_equal(again.item_category, vocab.item_category)


def test_user_split_keeps_users_whole() -> None:
    cols = generate(SyntheticWorldConfig(users=100, items=300, events=5000, seed=5))
    import pyarrow as pa

    from model.data.events import table_from_arrow

    t = table_from_arrow(pa.table(cols), path=Path("mem"))
    parts = split_events(t, how="user")
    sets = [set(t.user[p].tolist()) for p in (parts.train, parts.valid, parts.test)]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
