"""`python -m export.arch_costs`: request cost of a bundle and the cost/quality frontier of an rq1 directory; the
same cost beside every `polarity experiment` table (a tiny rq1 whose runs are exported and timed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import BuiltBundle

from export.arch_costs import BundleServingCost, bundle_request_ms, frontier, render
from model.experiments.report import cheapest_near_best
from model.experiments.runner import run_experiment


def test_frontier_keeps_the_models_nothing_beats_on_both() -> None:
    points = [(0.70, 10.0), (0.72, 20.0), (0.69, 5.0), (0.71, 30.0), (0.72, 25.0), (0.69, 6.0)]
    # (0.71, 30) loses to (0.72, 20) on both; (0.72, 25) ties the AUC but costs more; (0.69, 6) costs more than
    # (0.69, 5) for the same AUC.
    assert frontier(points) == [True, True, True, False, False, False]


def test_render_names_the_cheapest_model_near_the_best() -> None:
    rows = [{"arch": "din", "seq": "pos", "setting": "", "auc_mean": 0.700, "auc_std": 0.001, "gauc_mean": 0.6,
             "samples_per_s": 9000.0, "ms": 2.0, "frontier": True},
            {"arch": "din", "seq": "mix-tapf", "setting": "", "auc_mean": 0.7205, "auc_std": 0.002, "gauc_mean": 0.61,
             "samples_per_s": 5000.0, "ms": 9.0, "frontier": True},
            {"arch": "hyformer", "seq": "mix-tapf", "setting": "", "auc_mean": 0.7215, "auc_std": 0.001,
             "gauc_mean": 0.62, "samples_per_s": 2000.0, "ms": 30.0, "frontier": True}]
    md = render(rows, n_candidates=500, threads=1)
    assert "| DIN | Pos | 0.7000 ± 0.0010 | — |" in md
    assert "|  | Mix + TAPF | 0.7205 ± 0.0020 | +0.0205 |" in md
    assert "Best test AUC: HyFormer Mix + TAPF (0.7215)" in md
    assert "within 0.002 of it: DIN Mix + TAPF (0.7205, 9.00 ms)" in md


def test_bundle_request_ms_times_one_request(tiny_bundle: BuiltBundle) -> None:
    ms = bundle_request_ms(tiny_bundle.bundle, n_candidates=20, reps=2)
    assert 0.0 < ms < 10_000.0


def _group(auc: float, auc_std: float, ms: float | None, seeds: int = 3) -> dict[str, object]:
    return {"seeds": seeds, "fields": {}, "auc": (auc, auc_std, seeds), "gauc": None, "logloss": None,
            "serving_ms": None if ms is None else (ms, 0.1, seeds), "samples_per_s": (1000.0, 10.0, seeds)}


def test_cheapest_near_best_names_the_cheapest_group_within_the_margin() -> None:
    groups = {("onetrans", "mix-tapf", ""): _group(0.7210, 0.001, 30.0),
              ("din", "mix-tapf", ""): _group(0.7195, 0.002, 4.0),  # within 0.002 of the best, the cheapest
              ("din", "pos", ""): _group(0.7100, 0.001, 2.0),  # cheaper still, but 0.011 below
              ("transformer", "mix-pbe", ""): _group(0.7200, 0.001, 9.0)}
    sentence = cheapest_near_best(groups)
    assert sentence.startswith("The cheapest run within 0.002 AUC of the best (OneTrans Mix Seq + TAPF, AUC "
                               "0.7210±0.0010, 30.00 ms per request) is DIN Mix Seq + TAPF: AUC 0.7195±0.0020 at "
                               "4.00 ms per request (7.5× cheaper).")
    groups[("din", "mix-tapf", "")] = _group(0.7185, 0.002, 4.0)  # now 0.0025 below: Transformer is the one
    assert "is Transformer Mix Seq + PB: AUC 0.7200" in cheapest_near_best(groups)
    only_best = {k: g for k, g in groups.items() if k[0] == "onetrans"}
    assert "is the best itself: OneTrans Mix Seq + TAPF" in cheapest_near_best(only_best)
    unmeasured = {k: _group(0.7, 0.0, None) for k in groups}
    assert "No serving cost was measured" in cheapest_near_best(unmeasured)


@pytest.fixture(scope="module")
def costed_rq1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny rq1 (DIN Pos and Mix + TAPF, 2 seeds) whose runs are exported and timed after training."""
    import torch

    from model.data.events import write_event_log
    from model.data.synthetic import SyntheticWorldConfig, generate

    root = tmp_path_factory.mktemp("costed_rq1")
    log = write_event_log(generate(SyntheticWorldConfig(users=30, items=200, events=4000, seed=0)), root / "log.csv")
    threads = torch.get_num_threads()
    try:
        run_experiment("rq1", data=str(log), out=root / "out", seeds=2, archs=["din"],
                       variants=("pos", "mix-tapf"),
                       train_overrides={"seq_len": 10, "batch_size": 256, "d_model": 16, "max_train_samples": 2000,
                                        "threads": 1},
                       serving_cost=BundleServingCost(candidates=50, reps=2, check=False))
    finally:
        torch.set_num_threads(threads)
    return root / "out"


def test_every_experiment_row_has_its_serving_time_and_training_rate(costed_rq1: Path) -> None:
    raw = json.loads((costed_rq1 / "rq1.json").read_text())
    assert len(raw["runs"]) == 4 and raw["serving"]["candidates"] == 50
    for r in raw["runs"]:
        assert r["serving_ms"] > 0 and r["samples_per_s"] > 0
        assert (costed_rq1 / "bundles" / r["name"] / "model.onnx").is_file()  # that run's own bundle was timed
    md = (costed_rq1 / "rq1.md").read_text()
    lines = md.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("| Type |"))
    assert "| ms / request | train samples/s | seeds |" in lines[at]
    rows = lines[at + 2:at + 4]
    assert rows[0].startswith("| Two-Stage | DIN | Pos Seq |") and "| Mix Seq + TAPF |" in rows[1]
    for row, seq in zip(rows, ("pos", "mix-tapf"), strict=True):
        cells = [c.strip() for c in row.strip("|").split("|")]
        ms = [r["serving_ms"] for r in raw["runs"] if r["seq"] == seq]
        sps = [r["samples_per_s"] for r in raw["runs"] if r["seq"] == seq]
        assert cells[-3] == f"{np.mean(ms):.2f}±{np.std(ms, ddof=1):.2f}"  # mean ± std over the 2 seeds
        assert cells[-2] == f"{np.mean(sps):,.0f}±{np.std(sps, ddof=1):,.0f}"


def test_each_experiment_writes_a_frontier_and_rq1_ends_with_the_cheapest_run(costed_rq1: Path) -> None:
    md = (costed_rq1 / "rq1.md").read_text()
    assert "### Cost beside quality (rq1)" in md and "![rq1 frontier](rq1_frontier.png)" in md
    assert "--serving-candidates 50 --out" in md and "--no-serving-cost" not in md  # the command reproduces it
    assert (costed_rq1 / "rq1_frontier.png").stat().st_size > 1000
    frontier_rows = [line for line in md.splitlines() if line.startswith("| DIN ")]
    assert len(frontier_rows) == 2 and any(line.rstrip().endswith("| ✓ |") for line in frontier_rows)
    last = md.rstrip().splitlines()[-1]
    assert last.startswith("The cheapest run within 0.002 AUC of the best")
    assert "DIN Pos Seq" in last or "DIN Mix Seq + TAPF" in last
