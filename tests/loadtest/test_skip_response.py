"""The skip-response measurement (loadtest/skip_response.py): its plan and arithmetic, and, through the live
service (real Redis, real HTTP, a real exported bundle), that it detects a model whose response is known.

The known response is planted in the data, not in the measurement: in the planted world every user has a
liked/disliked state per category that flips rarely, and the label of an exposure is the state of its category.
So the recent events of a category predict its next label, and a model that reads the mixed sequence learns to
score a category down after its recent skips and up after its recent clicks. A measurement that posted the events
to the wrong user, after the request time, or mixed up the candidate groups or the before/after scores would not
see it. Fixed seeds, no timing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from loadtest.skip_response import (
    CONDITIONS,
    SkipResponseConfig,
    bar_met,
    format_example,
    format_report,
    measure_in_process,
    plan_probes,
    posted_events,
    summarize_condition,
    user_diff,
)
from model.data.events import read_event_log, write_event_log


def planted_world(*, users: int = 200, items: int = 160, categories: int = 8, per_user: int = 60, flip: float = 0.1,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Columns of an event log where a category's recent events predict its next label (see the module doc)."""
    rng = np.random.default_rng(seed)
    cols: dict[str, list[object]] = {k: [] for k in ("user_id", "item_id", "timestamp", "label", "event", "category")}
    for u in range(users):
        liked = rng.random(categories) < 0.3
        t = 1_700_000_000 + int(rng.integers(0, 1000))
        for _ in range(per_user):
            c = int(rng.integers(categories))
            if rng.random() < flip:
                liked[c] = not liked[c]
            y = int(liked[c])
            t += int(rng.integers(600, 7200))
            row = (u, c + categories * int(rng.integers(items // categories)), t, y, "click" if y else "skip", c)
            for key, value in zip(cols, row, strict=True):
                cols[key].append(value)
    return {k: np.array(v, dtype=object if k == "event" else np.int64) for k, v in cols.items()}


@pytest.fixture(scope="module")
def planted_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_event_log(planted_world(), tmp_path_factory.mktemp("planted") / "events.parquet")


@pytest.fixture(scope="module")
def planted_bundle(planted_log: Path) -> Path:
    """OneTrans + TAPF (L=20, d=16) trained on the planted world, exported by the real exporter."""
    import torch

    from export.pipeline import export_bundle
    from model.training.config import TrainConfig
    from model.training.loop import train

    root = planted_log.parent
    threads = torch.get_num_threads()
    try:
        train(TrainConfig(data=str(planted_log), arch="onetrans", seq="mix-tapf", seq_len=20, d_model=16,
                          batch_size=128, lr=3e-3, epochs=2, threads=1, seed=0), out=root / "run", progress=False)
    finally:
        torch.set_num_threads(threads)
    return export_bundle(root / "run", root / "bundle", check=False, name="planted")


def test_the_plan_draws_users_candidates_and_posted_items_as_documented(planted_log: Path) -> None:
    table = read_event_log(planted_log)
    cfg = SkipResponseConfig(users=30, k=5, candidates=4, min_item_events=1, seed=3)
    probes = plan_probes(table, cfg)
    assert len(probes) == 30 and len({p.user for p in probes}) == 30
    item_cat = {str(table.item_keys[i]): str(table.category_keys[c]) for i, c in zip(table.item, table.category,
                                                                                       strict=True)}
    for p in probes:
        rows = p.rows
        assert (table.user_keys[table.user[rows]] == p.user).all()
        last_click = rows[table.label[rows] == 1][-1]
        assert str(table.category_keys[table.category[last_click]]) == p.category
        seen = {str(table.item_keys[i]) for i in table.item[rows]}
        assert len(p.same) == len(p.other) == 4 and len(p.posted) == 5
        assert len(set(p.same) | set(p.other) | set(p.posted)) == 13  # all distinct
        assert not seen & (set(p.same) | set(p.other) | set(p.posted))  # none in the user's history
        assert {item_cat[i] for i in p.same + p.posted} == {p.category}
        assert all(item_cat[i] == c != p.category for i, c in zip(p.other, p.other_categories, strict=True))
        assert p.request_time == p.last_time + cfg.gap_s == float(table.timestamp[rows[-1]]) + cfg.gap_s
        after = rows[rows > last_click]
        assert p.prior_skips == sum(int(table.label[r] == 0 and str(table.category_keys[table.category[r]]) ==
                                        p.category) for r in after)
    assert [p.user for p in plan_probes(table, cfg)] == [p.user for p in probes]  # deterministic per seed


def test_posted_events_fall_between_the_history_and_the_request(tmp_path: Path) -> None:
    table = read_event_log(write_event_log(planted_world(users=20), tmp_path / "e.parquet"))
    probe = plan_probes(table, SkipResponseConfig(users=1, min_item_events=1))[0]
    for condition, label in (("skip", 0), ("click", 1)):
        events = posted_events(probe, condition, user_id="u", run_id="r", gap_s=3600.0)
        ts = [e["timestamp"] for e in events]
        assert len(events) == 5 and ts == sorted(ts) and len(set(ts)) == 5
        assert probe.last_time < ts[0] and ts[-1] < probe.request_time
        assert {(e["label"], e["event"], e["category"]) for e in events} == {(label, condition, probe.category)}
        assert len({e["event_id"] for e in events}) == 5


def test_the_per_user_difference_and_the_summary() -> None:
    assert user_diff([0.5, 0.5, 0.2, 0.2], [0.3, 0.4, 0.25, 0.15], n_same=2) == pytest.approx((-0.15, 0.0, -0.15))
    s = summarize_condition([-0.2, -0.1, 0.0, 0.1], [-0.2, -0.1, 0.0, 0.1], [0.0] * 4, "skip")
    assert s["users"] == 4 and s["mean_diff"] == pytest.approx(-0.05)
    assert s["std_diff"] == pytest.approx(np.std([-0.2, -0.1, 0.0, 0.1], ddof=1))
    assert s["share_expected"] == 0.5 and s["share_tied"] == 0.25  # a tie is not on the expected side
    assert summarize_condition([-0.2, -0.1, 0.0, 0.1], [0.0] * 4, [0.0] * 4, "click")["share_expected"] == 0.25

    def report(skip: list[float], click: list[float]) -> dict[str, object]:
        zeros = [0.0] * 5
        return {"conditions": {"skip": summarize_condition(skip, zeros, zeros, "skip"),
                               "click": summarize_condition(click, zeros, zeros, "click")}}

    good = [-0.1, -0.2, -0.1, -0.3, 0.05]
    assert bar_met(report(good, [-x for x in good]))
    assert not bar_met(report(good, good))  # clicks on the wrong side
    assert not bar_met(report([-0.1, -0.2, -0.1, 0.3, 0.05], [0.1] * 5))  # 60% < 80%
    assert not bar_met(report([-0.01, -0.01, -0.01, -0.01, 0.5], [0.1] * 5))  # 80% but the mean is > 0


@pytest.mark.redis
@pytest.mark.slow
def test_the_measurement_detects_a_planted_skip_response(planted_log: Path, planted_bundle: Path,
                                                         redis_url: str) -> None:
    table = read_event_log(planted_log)
    cfg = SkipResponseConfig(users=40, k=5, candidates=4, min_item_events=1, seed=0)
    report = measure_in_process(table, planted_bundle, cfg, redis_url=redis_url, inference_threads=1)
    skip, click = report["conditions"]["skip"], report["conditions"]["click"]
    assert skip["users"] == click["users"] == 40
    # Skips of category c: c's candidates fall, the others hardly move.
    assert skip["share_expected"] >= 0.8 and skip["mean_diff"] < -0.05
    assert skip["mean_delta_same"] < -0.05 < skip["mean_delta_other"] + 0.05
    # Clicks of category c: the other way round.
    assert click["mean_diff"] > 0 and click["share_expected"] > 0.5
    assert bar_met(report) == (click["share_expected"] >= 0.8)
    assert report["model_version"] and set(report["diffs"]) == set(CONDITIONS)
    split = report["by_prior_skips"]["skip"]
    assert sum(g["users"] for g in split.values()) == 40
    assert sum(g["mean_diff"] * g["users"] for g in split.values()) / 40 == pytest.approx(skip["mean_diff"])
    assert "| skips |" in format_report(report) and report["example"]["user"] in format_example(report)


def test_world_response_counts_the_skips_of_the_last_click_category(tmp_path: Path) -> None:
    # One user, rows 0-6: click a, skip a, skip b, skip a, skip a, click b, click b. Against the last click on a:
    # row 1 (a, 0 skips of a since), row 2 (b, 1), row 3 (a, 1), row 4 (a, 2), row 5 (b, 3 -> capped 2); against
    # the click on b (row 5): row 6 (b, 0).
    cols = {"user_id": np.zeros(7, dtype=np.int64), "item_id": np.arange(7, dtype=np.int64),
            "timestamp": np.arange(7, dtype=np.int64) + 1_700_000_000, "label": np.array([1, 0, 0, 0, 0, 1, 1]),
            "event": np.array(["click", "skip", "skip", "skip", "skip", "click", "click"], dtype=object),
            "category": np.array([0, 0, 1, 0, 0, 1, 1], dtype=np.int64)}
    from loadtest.skip_response import world_response

    rows = {r["skips"]: r for r in world_response(read_event_log(write_event_log(cols, tmp_path / "w.parquet")),
                                                  k=2)["rows"]}
    assert (rows[0]["same_n"], rows[1]["same_n"], rows[2]["same_n"]) == (2, 1, 1)  # rows 1+6, 3, 4
    assert rows[0]["same_rate"] == 0.5 and rows[1]["same_rate"] == 0.0 and rows[2]["same_rate"] == 0.0
    assert (rows[0]["other_n"], rows[1]["other_n"], rows[2]["other_n"]) == (0, 1, 1)  # -, row 2, row 5
    assert rows[0]["other_rate"] is None and rows[1]["other_rate"] == 0.0 and rows[2]["other_rate"] == 1.0


def test_the_command_refuses_to_overwrite_and_asks_for_a_service(planted_log: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from model.cli import main

    existing = tmp_path / "r.json"
    existing.write_text("{}")
    assert main(["skip-response", "--data", str(planted_log), "--bundle", "b", "--out", str(existing)]) == 2
    assert "pass --force" in capsys.readouterr().err and existing.read_text() == "{}"
    assert main(["skip-response", "--data", str(planted_log)]) == 2
    assert "give --bundle" in capsys.readouterr().err
