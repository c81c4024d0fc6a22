"""`polarity experiment` on a tiny synthetic log: tables, JSON, plots, resume, attention share."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from model.data.events import write_event_log
from model.data.loaders import load_events
from model.data.synthetic import SyntheticWorldConfig, generate
from model.experiments import diagnostics, runner
from model.experiments import plan as planning

# threads=1: on a busy 2-core machine torch's default 2 threads contend and run tiny batches
# tens of times slower.
OVERRIDES = {"seq_len": 10, "batch_size": 256, "d_model": 16, "max_train_samples": 2000, "threads": 1}
RQ1_ROWS = ("Pos Seq", "Pos Seq + TAPF", "Mix Seq + PB", "Mix Seq + TAPF")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def log_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 30 users keep it fast; buckets where a metric is undefined (e.g. GAUC with no user holding both
    # labels) report None with a note instead of failing (tests/model/test_train.py covers that).
    columns = generate(SyntheticWorldConfig(users=30, items=200, events=4000, seed=0))
    return write_event_log(columns, tmp_path_factory.mktemp("data") / "log.csv")


@pytest.fixture(scope="module")
def rq1_out(log_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rq1")
    runner.run_experiment("rq1", data=str(log_path), out=out, seeds=2, archs=["din"], train_overrides=OVERRIDES)
    return out


def _table_rows(md: str) -> list[list[str]]:
    """The rows (header first) of the first markdown table of `md` (the cost/frontier table follows it)."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    rows = [line for line in lines[start:end] if not line.startswith("|---")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in rows]


def test_rq1_table_json_and_plot(rq1_out: Path, log_path: Path) -> None:
    md = (rq1_out / "rq1.md").read_text()
    header, *rows = _table_rows(md)
    for col in ("Type", "Model", "Sequence", "AUC", "Δ", "GAUC", "logloss"):
        assert col in header
    assert any("AUC/AUC_pos − 1" in c for c in header) and any("RelaImpr" in c for c in header)
    assert [r[header.index("Sequence")] for r in rows] == list(RQ1_ROWS)
    assert rows[0][header.index("Model")] == "DIN"
    for r in rows:
        for col in ("AUC", "GAUC", "logloss"):
            assert re.fullmatch(r"\d+\.\d{4}±\d+\.\d{4}", r[header.index(col)]), r
    assert "polarity experiment rq1 --data" in md and "--seeds 2 --archs din --train-overrides" in md
    assert "Machine:" in md and "Date:" in md

    raw = json.loads((rq1_out / "rq1.json").read_text())
    assert len(raw["runs"]) == 2 * len(RQ1_ROWS)
    assert {(r["seq"], r["seed"]) for r in raw["runs"]} == {(v, s) for v in planning.RQ1_VARIANTS for s in (0, 1)}
    for r in raw["runs"]:
        assert set(r["test"]) >= {"auc", "gauc", "logloss"}
        assert (Path(r["run_dir"]) / "metrics.json").exists()
        assert Path(r["run_dir"]).name == r["name"] and r["name"].startswith(f"rq1-din-{r['seq']}-seed")
    for png in ("rq1.png", "rq1_attention.png"):
        assert (rq1_out / png).stat().st_size > 1000
    att = (rq1_out / "rq1_attention.md").read_text()
    assert "rq1-din-mix-pbe-seed0" in att and "rq1-din-mix-tapf-seed0" in att and "pos-seed" not in att
    assert {a["seq"] for a in raw["attention"]} == {"mix-pbe", "mix-tapf"}


def test_resume_trains_nothing(rq1_out: Path, log_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runner, "train", boom)
    before = {p: p.stat().st_mtime_ns for p in (rq1_out / "runs").glob("*/metrics.json")}
    runner.run_experiment("rq1", data=str(log_path), out=rq1_out, seeds=2, archs=["din"],
                               train_overrides=OVERRIDES)
    assert {p: p.stat().st_mtime_ns for p in (rq1_out / "runs").glob("*/metrics.json")} == before
    raw = json.loads((rq1_out / "rq1.json").read_text())
    assert len(raw["runs"]) == 8 and all(r["resumed"] for r in raw["runs"])


def test_attention_share(rq1_out: Path, log_path: Path) -> None:
    table = load_events(log_path)
    res = diagnostics.attention_share(rq1_out / "runs" / "rq1-din-mix-tapf-seed0", table, max_samples=300)
    assert res["samples"] == 300
    groups = res["groups"]
    assert groups["clicked"]["n"] + groups["skipped"]["n"] == groups["all"]["n"] > 0
    for g in groups.values():
        if g["n"]:
            assert 0.0 <= g["pos"] <= 1.0 and 0.0 <= g["neg"] <= 1.0
            assert g["pos"] + g["neg"] == pytest.approx(1.0)
    assert res["gap"] == pytest.approx(groups["clicked"]["pos"] - groups["skipped"]["pos"])


def test_plan_skips_unsupported_combos() -> None:
    runs = planning.plan("rq1", archs=["din", "dual_stream"], seeds=1)
    assert {(r.arch, r.seq) for r in runs if r.arch == "dual_stream"} == {("dual_stream", "pos"),
                                                                         ("dual_stream", "mix-pbe")}
    assert len(planning.plan("ratio", archs=["din"], seeds=2)) == 22
    assert {r.setting for r in planning.plan("length", archs=["din", "onetrans"], seeds=1)} == {
        f"L{n}" for n in planning.LENGTHS}
    with pytest.raises(ValueError):
        planning.plan("nope", archs=["din"], seeds=1)


def test_ablation_covers_modes_and_dual_stream(log_path: Path, tmp_path: Path) -> None:
    # jobs=2: runs train in spawned worker processes, each writing its own run directory.
    md = runner.run_experiment("ablation", data=str(log_path), out=tmp_path, seeds=1, archs=["din"],
                                    train_overrides=OVERRIDES, jobs=2)
    header, *rows = _table_rows(md.read_text())
    modes = [r[header.index("Sequence mode")] for r in rows]
    assert modes == ["pos", "mix", "mix", *planning.ABLATION_MODES, "mix (two encoders)", "mix (two encoders)"]
    assert all("±" in r[header.index("AUC")] for r in rows)
    raw = json.loads((tmp_path / "ablation.json").read_text())
    assert {(r["arch"], r["seq"], r["setting"]) for r in raw["runs"]} == {
        ("din", "pos", ""), ("din", "mix-tapf", ""), ("din", "mix-tapf", "weak_signals"),
        ("dual_stream", "mix-pbe", ""), ("dual_stream", "mix-pbe", "contrastive"),
        *(("din", "mix-tapf", m) for m in planning.ABLATION_MODES)}
    # seq_mode reached the data side; the model options reached the model.
    for r in raw["runs"]:
        cfg = json.loads((Path(r["run_dir"]) / "metrics.json").read_text())["config"]
        mode = r["setting"] if r["setting"] in planning.ABLATION_MODES else "pos" if r["seq"] == "pos" else "mix"
        assert cfg["sequence"]["mode"] == mode
        assert cfg["model"]["weak_signals"] == (r["setting"] == "weak_signals")
        assert (cfg["model"]["options"].get("contrastive_weight", 0) > 0) == (r["setting"] == "contrastive")
    # Dual-stream gives each polarity stream half of the attention by construction.
    dual = next(a for a in raw["attention"] if a["arch"] == "dual_stream")
    assert 0.0 <= dual["groups"]["all"]["pos"] <= 1.0
    assert (tmp_path / "ablation.png").stat().st_size > 1000


def test_skip_information_sees_the_skip_signal_of_the_synthetic_world(tmp_path: Path) -> None:
    cols = generate(SyntheticWorldConfig(users=300, items=2000, events=60_000, seed=2))
    info = diagnostics.skip_information(load_events(write_event_log(cols, tmp_path / "w.parquet")))
    assert 0.6 < info["auc_clicks"] < info["auc_clicks_and_skips"] and info["relative_gain"] > 0.005
    # Labels drawn independently of everything: neither feature set predicts anything.
    cols["label"] = (np.random.default_rng(0).random(len(cols["label"])) < 0.15).astype(np.int8)
    cols["event"] = np.where(cols["label"] == 1, "click", "skip").astype(object)
    noise = diagnostics.skip_information(load_events(write_event_log(cols, tmp_path / "n.parquet")))
    assert abs(noise["auc_clicks"] - 0.5) < 0.02 and abs(noise["relative_gain"]) < 0.02
