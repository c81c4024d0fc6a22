"""`python -m export.arch_costs`: request cost of a bundle and the cost/quality frontier of an rq1 directory."""

from __future__ import annotations

from bundle_factory import BuiltBundle

from export.arch_costs import bundle_request_ms, frontier, render


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
