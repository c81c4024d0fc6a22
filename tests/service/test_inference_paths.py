"""The ONNX backend's paths on the real tiny bundle: the probability-only graph, IOBinding into bucketed buffers,
and the device checks (TF32 off, a provider that did not start, compute nodes off the accelerator), with the CPU
execution provider standing in for a GPU where one is needed."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import service.inference as inference
from export.bundle import load_manifest
from model.features.inputs import INPUT_NAMES
from service.device_placement import (
    RECORD_ASSIGNMENT,
    node_assignment,
    placement,
    probe_feed,
    profiled_nodes,
    profiled_run,
)
from service.errors import StartupError
from service.inference import CPU, CUDA, OnnxBackend, choose_providers, default_buckets
from service.settings import Settings

AZURE = "AzureExecutionProvider"  # in every ONNX Runtime build, with kernels for none of the model's ops


def _inputs(manifest: Any, *, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One user's random sequence (oldest positions padded) and n candidates."""
    rng = np.random.default_rng(seed)
    spec = manifest.feature_spec
    length = spec.sequence.seq_len
    mask = np.arange(length)[None, :] >= rng.integers(0, length)
    pol = np.where(rng.random((1, length)) < 0.5, 1, -1) * mask
    return {"seq_item": rng.integers(2, spec.n_items, (1, length)) * mask,
            "seq_category": rng.integers(2, spec.n_categories, (1, length)) * mask,
            "seq_polarity": pol.astype(np.int64), "seq_event": np.where(pol > 0, 1, 2) * mask, "seq_mask": mask,
            "user_stats": rng.random((1, 4)).astype(np.float32),
            "cand_item": rng.integers(1, spec.n_items, n), "cand_category": rng.integers(1, spec.n_categories, n),
            "cand_user": np.zeros(n, dtype=np.int64)}


def test_requests_without_explain_run_the_probability_only_graph(tiny_bundle: Any) -> None:
    manifest = load_manifest(tiny_bundle.bundle)
    assert manifest.probability_model_path is not None and manifest.probability_model_path.is_file()
    backend = OnnxBackend(manifest, device="cpu", intra_op_threads=1)
    assert backend.probability_session is not None
    assert [o.name for o in backend.probability_session.get_outputs()] == ["probability"]
    assert [o.name for o in backend.session.get_outputs()] == ["probability", "attention"]
    x = _inputs(manifest, n=9)
    full, short = backend.run(x, attention=True), backend.run(x, attention=False)
    assert full["attention"].shape == (9, manifest.seq_len) and "attention" not in short
    np.testing.assert_allclose(short["probs"], full["probs"], rtol=0, atol=1e-6)


def test_bucketed_io_binding_gives_the_plain_runs_outputs(tiny_bundle: Any) -> None:
    manifest = load_manifest(tiny_bundle.bundle)
    plain = OnnxBackend(manifest, device="cpu", intra_op_threads=1, buckets=())
    bound = OnnxBackend(manifest, device="cpu", intra_op_threads=1, buckets=(4, 16))
    assert not plain.bound and len(bound.bound) == 2  # both graphs
    for n in (1, 3, 4, 5, 16, 17):  # below, at and between buckets, and past the largest (runs unbound)
        x = _inputs(manifest, n=n, seed=n)
        for attention in (True, False):
            want, got = plain.run(x, attention=attention), bound.run(x, attention=attention)
            assert got.keys() == want.keys()
            for key in want:
                assert got[key].shape == want[key].shape
                np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-6, err_msg=f"{key} N={n}")
    # An answer is the caller's: the next call (same bucket, same buffers) does not change it.
    first = bound.run(_inputs(manifest, n=3, seed=1), attention=True)
    kept = {k: v.copy() for k, v in first.items()}
    bound.run(_inputs(manifest, n=3, seed=2), attention=True)
    for key in kept:
        np.testing.assert_array_equal(first[key], kept[key])


def test_default_buckets_are_powers_of_two_up_to_the_limit() -> None:
    assert default_buckets(2000) == (16, 32, 64, 128, 256, 512, 1024, 2000)
    assert default_buckets(16) == (16,)


def test_cuda_provider_options_turn_tf32_off_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inference, "available_providers", lambda: [CUDA, CPU])
    assert choose_providers("cuda") == [(CUDA, {"use_tf32": "0"}), (CPU, {})]
    assert choose_providers("auto", tf32=True) == [(CUDA, {"use_tf32": "1"}), (CPU, {})]
    assert choose_providers("cuda", cuda_graphs=True)[0] == (CUDA, {"use_tf32": "0", "enable_cuda_graph": "1"})
    assert choose_providers("cpu") == [(CPU, {})]


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_a_cuda_provider_that_does_not_start_is_refused(tiny_bundle: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """get_available_providers() lists CUDA wherever onnxruntime-gpu is installed, GPU or not: the backend asks the
    session which provider it really got. Here the CUDA provider cannot start (this ONNX Runtime has none), so the
    session comes up on the CPU only, and device=cuda is refused."""
    monkeypatch.setattr(inference, "choose_providers", lambda device, **kw: [(CUDA, {"use_tf32": "0"}), (CPU, {})])
    with pytest.raises(StartupError, match="failed to initialise"):
        OnnxBackend(load_manifest(tiny_bundle.bundle), device="cuda", intra_op_threads=1)


def test_compute_nodes_off_the_accelerator_refuse_the_backend(tiny_bundle: Any,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The Azure provider stands in for a GPU provider that lacks kernels: it starts, but every node lands on the
    CPU. The backend names the compute nodes that would run off the accelerator and refuses to start."""
    monkeypatch.setattr(inference, "choose_providers", lambda device, **kw: [(AZURE, {}), (CPU, {})])
    with pytest.raises(StartupError, match=r"compute node\(s\) of model.onnx would run on the CPU") as caught:
        OnnxBackend(load_manifest(tiny_bundle.bundle), device="cuda", intra_op_threads=1)
    listed = str(caught.value).split(": ", 2)[2]
    assert listed.startswith(("MatMul", "Gemm", "FusedMatMul", "TAPFGate")), listed[:200]  # the heavy ones first


@pytest.mark.filterwarnings("ignore:Specified provider")
@pytest.mark.parametrize("accelerator", [AZURE, CUDA])
def test_device_auto_serves_on_the_cpu_when_the_accelerator_is_unusable(
        tiny_bundle: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, accelerator: str) -> None:
    """Where device=cuda refuses (a provider that did not start, compute nodes left to the CPU), device=auto serves
    on the CPU and says why in the log."""
    monkeypatch.setattr(inference, "choose_providers", lambda device, **kw: [(accelerator, {}), (CPU, {})])
    caplog.set_level("WARNING", logger="polarity.service")
    backend = OnnxBackend(load_manifest(tiny_bundle.bundle), device="auto", intra_op_threads=1)
    assert backend.provider == CPU and backend.accelerator is None and not backend.placement.fallbacks
    assert backend.run(_inputs(load_manifest(tiny_bundle.bundle), n=3))["probs"].shape == (3,)
    assert any("device=auto" in r.getMessage() and "serving on the CPU" in r.getMessage() for r in caplog.records)


def test_placement_counts_only_float_producing_nodes_as_compute(tiny_bundle: Any) -> None:
    """Shape arithmetic (int64 outputs) may stay on the CPU in a GPU session; float-producing nodes may not. With
    the CPU provider as the accelerator nothing is off it; with the stand-in, the executed nodes that produced
    float data are, and the executed shape nodes are not."""
    import onnxruntime as ort

    path = str(load_manifest(tiny_bundle.bundle).model_path)

    def session(providers: list[str]) -> Any:
        options = ort.SessionOptions()
        options.add_session_config_entry(RECORD_ASSIGNMENT, "1")
        options.enable_profiling = True
        return ort.InferenceSession(path, sess_options=options, providers=providers)

    on_cpu = session([CPU])
    profile = profiled_run(on_cpu, probe_feed(on_cpu))
    assert not placement(on_cpu, accelerator=CPU, profile=profile).fallbacks
    stand_in = session([AZURE, CPU])
    profile = profiled_run(stand_in, probe_feed(stand_in))
    ran = profiled_nodes(profile)
    where = placement(stand_in, accelerator=AZURE, profile=profile)
    assert set(where.nodes) == {CPU} and sum(where.nodes.values()) == len(node_assignment(stand_in))
    flagged = {entry.split(" ", 1)[1] for entry in where.fallbacks}
    computing = {name for name, node in ran.items() if node.float_output}
    shaping = {name for name, node in ran.items() if not node.float_output}
    assert computing and shaping and computing <= flagged
    assert not flagged & shaping  # shape arithmetic may stay on the CPU
    assert "compute_nodes_off_accelerator" in where.describe()


def test_the_cpu_backend_reports_its_placement(tiny_bundle: Any, redis_url: str) -> None:
    from service.model_slot import load_model

    settings = Settings(bundle=tiny_bundle.bundle, redis_url=redis_url, inference_threads=1)
    model = load_model(tiny_bundle.bundle, settings=settings, backend_factory=inference.onnx_backend_factory)
    placed = model.describe()["placement"]  # what /readyz shows under details.model
    assert placed["accelerator"] is None and placed["compute_nodes_off_accelerator"] == []
    assert set(placed["nodes"]) == {CPU} and placed["nodes"][CPU] > 10


def test_probe_feed_fits_the_graph(tiny_bundle: Any) -> None:
    backend = OnnxBackend(load_manifest(tiny_bundle.bundle), device="cpu", intra_op_threads=1)
    feed = probe_feed(backend.session)
    assert tuple(feed) == INPUT_NAMES
    assert backend.session.run(None, feed)[0].shape == (2,)


def test_settings_check_buckets_and_cuda_graphs(tiny_bundle: Any) -> None:
    assert Settings(bundle=tiny_bundle.bundle, inference_buckets=[64, 16, 16]).inference_buckets == [16, 64]
    with pytest.raises(ValueError, match="positive"):
        Settings(bundle=tiny_bundle.bundle, inference_buckets=[0])
    with pytest.raises(ValueError, match="micro-batching"):
        Settings(bundle=tiny_bundle.bundle, cuda_graphs=True, microbatch_max_wait_us=100)
    with pytest.raises(StartupError, match="CUDA graphs need"):
        OnnxBackend(load_manifest(tiny_bundle.bundle), device="cpu", cuda_graphs=True)
