"""The issue-22 models in `polarity experiment`: RQ1 rows for HyFormer, MixFormer, SINE and the contrastive
dual encoder; the ablation's contrastive-term and HNT weak-signal rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.data.events import write_event_log
from model.data.synthetic import SyntheticWorldConfig, generate
from model.experiments import plan as planning
from model.experiments import runner
from model.models.config import DualStreamOptions

OVERRIDES = {"seq_len": 10, "batch_size": 256, "d_model": 16, "max_train_samples": 1500, "threads": 1}


def test_rq1_plans_every_supported_variant_and_the_dual_encoder_preset() -> None:
    runs = planning.plan("rq1", archs=["hyformer", "mixformer", "sine", "dual_encoder"], seeds=1,
                            variants=("pos", "mix-pbe", "mix-tapf"))
    keys = [r.key("rq1") for r in runs]
    for arch in ("hyformer", "mixformer"):
        assert [k for k in keys if k.startswith(f"rq1-{arch}-")] == [
            f"rq1-{arch}-{v}-seed0" for v in ("pos", "mix-pbe", "mix-tapf")]
    assert "rq1-sine-mix-tapf-seed0" not in keys and "rq1-sine-mix-pbe-seed0" in keys  # SINE has no TAPF
    dual = [r for r in runs if r.arch == "dual_stream"]
    assert [r.key("rq1") for r in dual] == ["rq1-dual_stream-pos-contrastive-seed0",
                                             "rq1-dual_stream-mix-pbe-contrastive-seed0"]
    cfg = planning.train_config(dual[1], data="log.csv", overrides={"model_overrides": {"n_layers": 1}})
    assert cfg.model_overrides == {"n_layers": 1, "contrastive_weight": 0.5}  # the user's and the preset's
    assert cfg.model_config().arch_options(DualStreamOptions).contrastive_weight == 0.5


def test_ablation_adds_the_contrastive_term_and_the_weak_signals() -> None:
    runs = planning.plan("ablation", archs=["onetrans"], seeds=1)
    by_key = {r.key("ablation"): r for r in runs}
    weak = planning.train_config(by_key["ablation-onetrans-mix-tapf-weak_signals-seed0"], data="x", overrides={})
    assert weak.model_config().weak_signals and weak.seq_mode is None
    plain = planning.train_config(by_key["ablation-dual_stream-mix-pbe-seed0"], data="x", overrides={})
    contrastive = planning.train_config(by_key["ablation-dual_stream-mix-pbe-contrastive-seed0"], data="x",
                                           overrides={})
    assert plain.model_config().arch_options(DualStreamOptions).contrastive_weight == 0
    assert contrastive.model_config().arch_options(DualStreamOptions).contrastive_weight > 0


@pytest.fixture(scope="module")
def rq1_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        log = write_event_log(generate(SyntheticWorldConfig(users=30, items=200, events=3000, seed=1)),
                              tmp_path_factory.mktemp("data") / "log.csv")
        out = tmp_path_factory.mktemp("rq1")
        runner.run_experiment("rq1", data=str(log), out=out, seeds=1, archs=["sine", "dual_encoder"],
                                   train_overrides=OVERRIDES, variants=("mix-pbe",))
    finally:
        torch.set_num_threads(threads)
    return out


def test_rq1_table_has_a_row_per_model_and_the_command_reproduces_it(rq1_out: Path) -> None:
    md = (rq1_out / "rq1.md").read_text()
    table = md.split("### Cost beside quality")[0]  # the RQ1 table, not the cost/frontier table after it
    rows = [line for line in table.splitlines() if line.startswith("| ") and "Mix Seq + PB" in line]
    assert len(rows) == 2
    assert "SINE" in rows[0] and "Dual encoder + contrastive" in rows[1]
    assert "--archs sine,dual_encoder --variants mix-pbe" in md
    raw = json.loads((rq1_out / "rq1.json").read_text())
    names = sorted(r["name"] for r in raw["runs"])
    assert names == ["rq1-dual_stream-mix-pbe-contrastive-seed0", "rq1-sine-mix-pbe-seed0"]
    dual = next(r for r in raw["runs"] if r["arch"] == "dual_stream")
    metrics = json.loads((Path(dual["run_dir"]) / "metrics.json").read_text())
    assert metrics["config"]["model"]["options"]["contrastive_weight"] == 0.5
