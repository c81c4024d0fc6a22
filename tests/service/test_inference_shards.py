"""Candidate sharding in the ONNX backend: a call split into shards returns exactly the whole call's outputs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from export.bundle import load_manifest
from model.features.inputs import INPUT_NAMES
from service.inference import (
    CandidateShards,
    OnnxBackend,
    available_cores,
    current_cpu,
    inference_shards,
    split_candidates,
)
from service.settings import Settings


def _inputs(*, users: int, per_user: int, seq_len: int, n_items: int, seed: int = 0) -> dict[str, np.ndarray]:
    """U users' random sequences (the oldest positions padded for some) and candidates of interleaved users."""
    rng = np.random.default_rng(seed)
    mask = np.ones((users, seq_len), dtype=bool)
    for u in range(users):
        mask[u, : rng.integers(0, seq_len + 1)] = False  # user 0 may have an empty history
    pol = np.where(rng.random((users, seq_len)) < 0.4, 1, -1) * mask
    n = users * per_user
    return {
        "seq_item": rng.integers(2, n_items, (users, seq_len)) * mask,
        "seq_category": rng.integers(2, 5, (users, seq_len)) * mask,
        "seq_polarity": pol.astype(np.int64),
        "seq_event": np.where(pol > 0, 1, 2) * mask,
        "seq_mask": mask,
        "user_stats": rng.random((users, 4)).astype(np.float32),
        "cand_item": rng.integers(1, n_items, n),
        "cand_category": rng.integers(1, 5, n),
        "cand_user": rng.permutation(np.repeat(np.arange(users), per_user)).astype(np.int64),  # not grouped by user
    }


def test_split_candidates_keeps_only_each_shards_users() -> None:
    x = _inputs(users=5, per_user=3, seq_len=6, n_items=50)
    shards = split_candidates(x, 4)
    assert [len(s["cand_user"]) for s in shards] == [3, 4, 4, 4]
    start = 0
    for s in shards:
        n = len(s["cand_user"])
        own = x["cand_user"][start : start + n]
        assert s["seq_item"].shape[0] == len(np.unique(own))  # only the users this shard's candidates read
        for name in INPUT_NAMES:
            if name.startswith("cand_") and name != "cand_user":
                np.testing.assert_array_equal(s[name], x[name][start : start + n])
        # each candidate still reads its own user's sequence
        np.testing.assert_array_equal(s["seq_item"][s["cand_user"]], x["seq_item"][own])
        np.testing.assert_array_equal(s["user_stats"][s["cand_user"]], x["user_stats"][own])
        start += n
    assert start == len(x["cand_user"])


@pytest.mark.parametrize(("users", "per_user"), [(1, 300), (7, 40)])
def test_sharded_run_equals_the_whole_run(tiny_bundle: Any, users: int, per_user: int) -> None:
    manifest = load_manifest(tiny_bundle.bundle)
    spec = manifest.feature_spec
    x = _inputs(users=users, per_user=per_user, seq_len=spec.sequence.seq_len, n_items=spec.n_items)
    whole = OnnxBackend(manifest, device="cpu", intra_op_threads=1)
    sharded = OnnxBackend(manifest, device="cpu", intra_op_threads=1, shards=3, shard_min_candidates=50)
    assert whole.shards == 1 and sharded.shards == 3
    expected, got = whole.run(x), sharded.run(x)
    assert set(got) == set(expected) == {"probs", "attention"}
    for key in expected:
        assert got[key].shape == expected[key].shape
        np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=1e-6)
    # below 2 * shard_min_candidates the call is not split (same outputs, one run)
    small = {k: (v[:60] if k.startswith("cand_") else v) for k, v in x.items()}
    np.testing.assert_allclose(sharded.run(small)["probs"], whole.run(small)["probs"], rtol=0, atol=1e-6)


def test_default_shards_fill_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("service.inference.available_cores", lambda: 8)
    assert inference_shards(Settings(), 1) == 8
    assert inference_shards(Settings(), 2) == 4
    assert inference_shards(Settings(inference_shards=1), 1) == 1
    assert inference_shards(Settings(inference_shards=3), 2) == 3


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_a_shard_runs_off_the_callers_core(tiny_bundle: Any) -> None:
    backend = OnnxBackend(load_manifest(tiny_bundle.bundle), device="cpu", intra_op_threads=1, shards=2,
                          shard_min_candidates=1)
    seen: list[set[int]] = []

    def recording(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seen.append(os.sched_getaffinity(0))
        return backend._run_whole(inputs)

    before = os.sched_getaffinity(0)
    here = current_cpu()
    assert here is not None and here in before
    x = _inputs(users=2, per_user=3, seq_len=load_manifest(tiny_bundle.bundle).feature_spec.sequence.seq_len,
                n_items=50)
    out = backend.sharder.run_elsewhere(recording, x, here)
    np.testing.assert_allclose(out["probs"], backend.run(x)["probs"], rtol=0, atol=1e-6)
    assert seen == [before - {here}]  # the shard may run anywhere but the caller's core
    assert os.sched_getaffinity(0) == before  # and the thread gets every core back


def test_available_cores_honours_a_cgroup_cpu_limit(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    assert available_cores(tmp_path) == affinity  # no cpu.max: the affinity
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cores(tmp_path) == affinity
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # a 1.5-CPU limit -> 2 cores' worth of threads
    assert available_cores(tmp_path) == min(affinity, 2)
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert available_cores(tmp_path) == 1


def test_a_shard_still_runs_when_its_core_cannot_be_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    """sched_setaffinity refused (the process's cpuset changed since start): the shard runs where it is."""
    def refuse(pid: int, cpus: Any) -> None:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "sched_setaffinity", refuse)
    assert CandidateShards.run_elsewhere(lambda x: {"probs": x["cand_user"] * 2.0}, {"cand_user": np.arange(3)},
                                         0)["probs"].tolist() == [0.0, 2.0, 4.0]
