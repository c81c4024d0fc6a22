"""Inference backends: what the service calls (off the event loop) to score assembled inputs. Torch-free.

`InferenceBackend` is the small protocol the app depends on; `OnnxBackend` (the default) runs a
bundle's `model.onnx` in ONNX Runtime: CUDA when `device` is `cuda` or `auto` and a CUDA provider
exists, else CPU, where the fused TAPF kernel library is registered when built. On CPU a request's
candidates can be split into shards scored at once on one session (`split_candidates`): each shard is a
whole, independent graph run, so the shards meet once at the end instead of at every parallel node.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Protocol, cast, runtime_checkable

import numpy as np

from export.bundle import ATTENTION_NAME, OUTPUT_NAME, Manifest
from export.custom_kernel import kernel_status, register_kernel
from model.features.inputs import INPUT_NAMES, USER_INPUTS
from service.bound_runs import BucketedRuns
from service.device_placement import RECORD_ASSIGNMENT, Placement, placement, probe_feed, profile_prefix, profiled_run
from service.errors import StartupError
from service.settings import Settings

log = logging.getLogger("polarity.service")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
KERNEL_FUSED = "tapf-fused"
KERNEL_FUNCTION = "onnx-function"


@runtime_checkable
class InferenceBackend(Protocol):
    """Scores model inputs: `{name: array}` keyed by `model.features.inputs.INPUT_NAMES` ->
    `{"probs": (N,) float32, and with `attention` (when the model has it) "attention": (N, L) float32}`.
    Called from worker threads, or on the event loop for small calls."""

    provider: str  # e.g. CPUExecutionProvider
    kernel: str  # e.g. tapf-fused | onnx-function | torch

    def run(self, inputs: dict[str, np.ndarray], *, attention: bool = True) -> dict[str, np.ndarray]: ...


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


ProviderList = list[tuple[str, dict[str, str]]]


def choose_providers(device: str, *, tf32: bool = False, cuda_graphs: bool = False) -> ProviderList:
    """ONNX Runtime providers (with their options) for a requested device; StartupError when `cuda` cannot be had.

    `get_available_providers()` lists CUDA whenever onnxruntime-gpu is installed, GPU or not: whether a device
    really runs the model is known only once a session is created on it (`OnnxBackend` checks). On CUDA, TF32
    MatMuls are off unless asked for (`tf32`): they keep 10 mantissa bits and move probabilities by ~1e-3, far
    past the bundle's 1e-5 parity."""
    available = available_providers()
    if device == "cpu":
        return [(CPU, {})]
    if CUDA in available:
        cuda = {"use_tf32": "1" if tf32 else "0"}
        if cuda_graphs:
            cuda["enable_cuda_graph"] = "1"
        return [(CUDA, cuda), (CPU, {})]
    if device == "cuda":
        raise StartupError(
            f"device=cuda was requested but this ONNX Runtime has no {CUDA} (available: {', '.join(available)}); "
            "install onnxruntime-gpu on a machine with a CUDA GPU, or start with --device auto (falls back to CPU) "
            "or --device cpu"
        )
    return [(CPU, {})]


class _AcceleratorUnusable(StartupError):
    """The accelerator's provider did not start, or would leave compute nodes to the CPU (device=auto then serves on
    the CPU; device=cuda refuses to start)."""


class OnnxBackend:
    """A bundle's graphs in ONNX Runtime sessions (thread-safe `run`): the full graph, and the probability-only
    graph (`model.probability.onnx`) for calls that do not want `attention`, when the bundle has it.

    On an accelerator the session must really run there: a CUDA provider that failed to initialise (no GPU,
    driver mismatch) or a compute node placed on the CPU refuses the backend (StartupError with the nodes), and
    the placement is logged and reported (`placement`, /readyz). Calls of U=1 and N up to the largest of
    `buckets` run through IOBinding into pre-allocated buffers, padded to a bucket (`service.bound_runs`);
    default: powers of two on CUDA, none on CPU."""

    def __init__(self, manifest: Manifest, *, device: str, intra_op_threads: int = 0, spinning: bool = False,
                 shards: int = 1, shard_min_candidates: int = 128, concurrent_calls: int = 1, tf32: bool = False,
                 buckets: tuple[int, ...] | None = None, cuda_graphs: bool = False, max_candidates: int = 2048) -> None:
        """`shards` > 1 (CPU only) splits a call of N candidates into up to `shards` runs of at least
        `shard_min_candidates`; `concurrent_calls` is how many `run`s the caller may have in flight."""
        providers = choose_providers(device, tf32=tf32, cuda_graphs=cuda_graphs)
        self.accelerator = providers[0][0] if providers[0][0] != CPU else None
        self.requested = device
        self.threads = intra_op_threads or available_cores()
        self.spinning = spinning
        self.kernel_registered = False
        try:
            self.session, self.placement = self._open(manifest.model_path, providers)
        except _AcceleratorUnusable as exc:
            if device != "auto":
                raise
            log.warning("device=auto: %s; serving on the CPU", exc)
            providers, self.accelerator = [(CPU, {})], None
            self.session, self.placement = self._open(manifest.model_path, providers)
        self.kernel = KERNEL_FUSED if self.kernel_registered else KERNEL_FUNCTION
        self.kernel_path = kernel_status()["path"] if self.kernel_registered else None
        used = self.session.get_providers()
        self.provider = used[0] if used else CPU
        graph_inputs = [i.name for i in self.session.get_inputs()]
        if tuple(graph_inputs) != INPUT_NAMES:
            raise StartupError(f"{manifest.model_path}: graph inputs {graph_inputs} != {list(INPUT_NAMES)}")
        self.output_names = [o.name for o in self.session.get_outputs()]
        if OUTPUT_NAME not in self.output_names:
            raise StartupError(f"{manifest.model_path}: graph has no {OUTPUT_NAME!r} output ({self.output_names})")
        probability_path = manifest.probability_model_path
        self.probability_session = None if probability_path is None else self._open(probability_path, providers)[0]
        if buckets is None:
            buckets = default_buckets(max_candidates) if self.accelerator == CUDA else ()
        if cuda_graphs and (device == "cpu" or not buckets):
            raise StartupError("CUDA graphs need device=cuda (or auto) and candidate buckets "
                               "(POLARITY_INFERENCE_BUCKETS)")
        cuda_graphs = cuda_graphs and self.accelerator == CUDA  # auto on a machine without a usable GPU: none
        device_type = "cuda" if self.accelerator == CUDA else "cpu"
        stats_width = int(self.session.get_inputs()[INPUT_NAMES.index("user_stats")].shape[1])
        self.bound = {id(sess): BucketedRuns(sess, buckets=buckets, seq_len=manifest.seq_len, n_stats=stats_width,
                                             device=device_type, cuda_graphs=cuda_graphs)
                      for sess in (self.session, self.probability_session) if sess is not None and buckets}
        # A GPU wants one large batch; on CPU a call's candidates may run as shards.
        self.sharder = CandidateShards(shards=shards if self.provider == CPU else 1,
                                       min_candidates=shard_min_candidates, concurrent_calls=concurrent_calls)
        log.info("ONNX Runtime session: provider=%s (requested %s), kernel=%s, threads=%d, spinning=%s, shards=%d, "
                 "probability-only graph=%s, buckets=%s%s; placement: %s", self.provider, device, self.kernel,
                 self.threads, spinning, self.sharder.shards, self.probability_session is not None,
                 list(buckets) or "off", ", CUDA graphs" if cuda_graphs else "", self.placement.summary())

    def _open(self, path: Path, providers: ProviderList) -> tuple[Any, Placement]:
        """A session on `path` that runs where it was asked to, and its placement; StartupError otherwise."""
        import onnxruntime as ort

        names = [name for name, _ in providers]
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        # Spinning pool threads busy-wait for the next parallel section and keep spinning after a run:
        # on a few shared cores that CPU is taken from the event loop, Redis and the next request.
        # Blocking workers cost a wake-up (microseconds) per section instead.
        flag = "1" if self.spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", flag)
        options.add_session_config_entry("session.inter_op.allow_spinning", flag)
        options.add_session_config_entry(RECORD_ASSIGNMENT, "1")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.accelerator is not None:  # one profiled run tells which nodes produce float data (placement)
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix()
        self.kernel_registered = register_kernel(options, names) or self.kernel_registered
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=names,
                                           provider_options=[opts for _, opts in providers])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise StartupError(f"{path}: ONNX Runtime cannot open the model: {exc}") from exc
        if self.accelerator is not None and session.get_providers()[:1] != [self.accelerator]:
            raise _AcceleratorUnusable(
                f"device={self.requested} was requested but ONNX Runtime runs {path.name} on "
                f"{session.get_providers()} (the {self.accelerator} failed to initialise: no usable device or driver; "
                "see the ONNX Runtime log)")
        profile = profiled_run(session, probe_feed(session)) if self.accelerator is not None else None
        where = placement(session, accelerator=self.accelerator, profile=profile)
        if where.fallbacks:
            shown = ", ".join(where.fallbacks[:10]) + (f" and {len(where.fallbacks) - 10} more"
                                                       if len(where.fallbacks) > 10 else "")
            raise _AcceleratorUnusable(
                f"device={self.requested}: {len(where.fallbacks)} compute node(s) of {path.name} would run on the CPU "
                f"instead of {self.accelerator}, copying their data across at every call: {shown}. Serve with "
                "--device cpu, or use an ONNX Runtime build with kernels for these ops")
        return session, where

    @property
    def shards(self) -> int:
        return self.sharder.shards

    def run(self, inputs: dict[str, np.ndarray], *, attention: bool = True) -> dict[str, np.ndarray]:
        session = self.session if attention or self.probability_session is None else self.probability_session
        return self.sharder.run(partial(self._run_whole, session=session, attention=attention), inputs)

    def _run_whole(self, inputs: dict[str, np.ndarray], *, session: Any = None, attention: bool = True
                   ) -> dict[str, np.ndarray]:
        session = self.session if session is None else session
        bound = self.bound.get(id(session))
        if bound is not None and bound.accepts(inputs):
            out = bound.run(inputs)
        else:
            full = attention and session is self.session and ATTENTION_NAME in self.output_names
            names = [OUTPUT_NAME, ATTENTION_NAME] if full else [OUTPUT_NAME]
            out = dict(zip(names, session.run(names, inputs), strict=True))
        result = {"probs": np.asarray(out[OUTPUT_NAME], dtype=np.float32).reshape(-1)}
        if attention and ATTENTION_NAME in out:
            result["attention"] = np.asarray(out[ATTENTION_NAME], dtype=np.float32)
        return result


def default_buckets(largest: int, *, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from `smallest` up to and including `largest`."""
    sizes = []
    size = smallest
    while size < largest:
        sizes.append(size)
        size *= 2
    return (*sizes, largest)


Outputs = dict[str, np.ndarray]


class CandidateShards:
    """Runs a scoring function over a call's candidates as up to `shards` independent calls at once
    (`split_candidates`), each at least `min_candidates` long; the caller's thread runs the first, a pool
    the others, off the caller's core. Any backend whose `run` scores candidates independently can use it."""

    def __init__(self, *, shards: int, min_candidates: int, concurrent_calls: int) -> None:
        self.shards = max(1, shards)
        self.min_candidates = max(1, min_candidates)
        # Enough threads that the shards of `concurrent_calls` calls never wait for one another.
        self._pool = (ThreadPoolExecutor(max_workers=(self.shards - 1) * max(1, concurrent_calls),
                                         thread_name_prefix="polarity-shard") if self.shards > 1 else None)

    def run(self, fn: Callable[[dict[str, np.ndarray]], Outputs], inputs: dict[str, np.ndarray]) -> Outputs:
        parts = min(self.shards, len(inputs["cand_user"]) // self.min_candidates)
        if parts <= 1 or self._pool is None:
            return fn(inputs)
        first, *rest = split_candidates(inputs, parts)
        here = current_cpu()
        futures = [self._pool.submit(self.run_elsewhere, fn, feed, here) for feed in rest]
        results = [fn(first)] + [f.result() for f in futures]
        return {key: np.concatenate([r[key] for r in results]) for key in results[0]}

    @staticmethod
    def run_elsewhere(fn: Callable[[dict[str, np.ndarray]], Outputs], inputs: dict[str, np.ndarray],
                      avoid: int | None) -> Outputs:
        """`fn(inputs)` on a core other than `avoid` (the caller's, which runs the first shard). A pool thread
        woken after an idle spell may otherwise start on the caller's core and share it until the kernel
        moves it: measured (BENCHMARKS.md "Inference time after idle gaps") up to twice a shard's time."""
        others = _CPUS - {avoid} if avoid is not None else set()
        try:
            if others:
                os.sched_setaffinity(0, others)
        except OSError:  # the allowed cores changed under the process (cpuset update): run where we are
            others = set()
        try:
            return fn(inputs)
        finally:
            if others:
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(0, _CPUS)


_CPUS: set[int] = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()


def _libc_sched_getcpu() -> Callable[[], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sched_getcpu
    except (AttributeError, OSError):  # not glibc/Linux
        return None
    fn.restype = ctypes.c_int
    return cast(Callable[[], int], fn)


_SCHED_GETCPU = _libc_sched_getcpu() if len(_CPUS) > 1 else None


def available_cores(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (`cpu.max`, e.g. a
    Kubernetes CPU limit), which `os.cpu_count()` ignores: it reports the whole node's cores."""
    cores = len(_CPUS) or (os.cpu_count() or 1)
    try:
        quota, period = (cgroup_root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 limit visible: the affinity stands
    return cores


def current_cpu() -> int | None:
    """The core this thread runs on (Linux), else None."""
    if _SCHED_GETCPU is None:
        return None
    cpu = _SCHED_GETCPU()
    return cpu if cpu >= 0 else None


def split_candidates(inputs: dict[str, np.ndarray], parts: int) -> list[dict[str, np.ndarray]]:
    """Model inputs of N candidates -> `parts` inputs over consecutive candidate ranges (sizes differ by at
    most one), each with only the users its candidates read and `cand_user` renumbered into them.
    Every candidate's score depends only on its own user's sequence, so concatenating the shards'
    outputs gives the whole call's outputs."""
    cand_user = inputs["cand_user"]
    bounds = np.linspace(0, len(cand_user), parts + 1).astype(np.int64)
    out = []
    for lo, hi in itertools.pairwise(bounds):
        users, local = np.unique(cand_user[lo:hi], return_inverse=True)
        feed = {name: (value[users] if name in USER_INPUTS else value[lo:hi]) for name, value in inputs.items()}
        feed["cand_user"] = local.astype(np.int64).reshape(-1)
        out.append(feed)
    return out


def onnx_backend_factory(manifest: Manifest, settings: Settings) -> InferenceBackend:
    """The default `backend_factory` of `create_app`."""
    threads = intra_op_threads(settings)
    buckets = None if settings.inference_buckets is None else tuple(settings.inference_buckets)
    return OnnxBackend(manifest, device=settings.device, intra_op_threads=threads,
                       spinning=settings.inference_spinning, shards=inference_shards(settings, threads),
                       shard_min_candidates=settings.inference_shard_min_candidates,
                       concurrent_calls=inference_workers(settings), tf32=settings.cuda_tf32, buckets=buckets,
                       cuda_graphs=settings.cuda_graphs, max_candidates=settings.max_candidates)


def inference_shards(settings: Settings, threads: int) -> int:
    """settings.inference_shards, else as many shards as the cores hold at `threads` threads each."""
    if settings.inference_shards:
        return settings.inference_shards
    return max(1, available_cores() // threads)


def inference_workers(settings: Settings) -> int:
    """settings.inference_workers, else one concurrent inference call per core."""
    return settings.inference_workers or available_cores()


def intra_op_threads(settings: Settings) -> int:
    """settings.inference_threads, else the cores shared out over the inference workers (no oversubscription)."""
    if settings.inference_threads:
        return settings.inference_threads
    return max(1, available_cores() // inference_workers(settings))
