"""Session runs through IOBinding into buffers allocated once, with the candidates padded to a few bucket sizes,
optionally replayed as CUDA graphs. Torch-free.

On a GPU a plain `session.run(feed)` allocates every output on the device and copies each input and output
across the bus per call. Bound to pre-allocated buffers, a call copies its inputs into them and its outputs back,
and allocates nothing; with CUDA graphs ONNX Runtime replays the whole captured graph as one launch, which
needs fixed shapes and addresses: hence the buckets. A request of N candidates runs as the smallest bucket
>= N, padded with candidates of user 0 (item 0): its outputs are sliced back to N. Padding costs compute: up to
bucket/N - 1 extra, e.g. with powers of two at most 2x and about 1.4x on average for N spread evenly.

Only U=1 calls (one user's sequence; micro-batching off) and N up to the largest bucket take this path; others run
unbound. Buffers are per thread (a binding is not shared across concurrent calls); CUDA graph replays of a
session are serialised (one capture per bucket, `gpu_graph_id`).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from model.features.inputs import INPUT_NAMES, USER_INPUTS

GRAPH_ID = "gpu_graph_id"


class _Buffers:
    """One bucket's bound inputs and outputs, with host staging for the padded candidate inputs."""

    def __init__(self, session: Any, *, bucket: int, seq_len: int, n_stats: int, outputs: tuple[str, ...],
                 device: str, device_id: int) -> None:
        import onnxruntime as ort

        shapes = {name: ((1, seq_len) if name.startswith("seq_") else (1, n_stats) if name in USER_INPUTS
                         else (bucket,)) for name in INPUT_NAMES}
        dtypes = {name: (np.bool_ if name == "seq_mask" else np.float32 if name == "user_stats" else np.int64)
                  for name in INPUT_NAMES}
        self.staging = {name: np.zeros(shapes[name], dtype=dtypes[name]) for name in INPUT_NAMES
                        if name not in USER_INPUTS}
        self.inputs = {name: ort.OrtValue.ortvalue_from_shape_and_type(shapes[name], dtypes[name], device, device_id)
                       for name in INPUT_NAMES}
        out_shapes = {"probability": (bucket,), "attention": (bucket, seq_len)}
        self.outputs = {name: ort.OrtValue.ortvalue_from_shape_and_type(out_shapes[name], np.float32, device,
                                                                         device_id) for name in outputs}
        self.binding = session.io_binding()
        for name, value in self.inputs.items():
            self.binding.bind_ortvalue_input(name, value)
        for name, value in self.outputs.items():
            self.binding.bind_ortvalue_output(name, value)


class BucketedRuns:
    """`run(feed)` of a session through IOBinding, N padded to `buckets` (see the module docstring)."""

    def __init__(self, session: Any, *, buckets: tuple[int, ...], seq_len: int, n_stats: int, device: str = "cpu",
                 device_id: int = 0, cuda_graphs: bool = False) -> None:
        import onnxruntime as ort

        if not buckets or any(b < 1 for b in buckets):
            raise ValueError(f"buckets must be positive sizes, got {buckets}")
        self.session = session
        self.buckets = tuple(sorted(set(buckets)))
        self.seq_len, self.n_stats = seq_len, n_stats
        self.device, self.device_id = device, device_id
        self.outputs = tuple(o.name for o in session.get_outputs())
        self.cuda_graphs = cuda_graphs
        self._local = threading.local()
        self._graph_lock = threading.Lock()
        self._graph_buffers: dict[int, _Buffers] = {}
        self._run_options = []
        for k in range(len(self.buckets)):
            options = ort.RunOptions()
            if cuda_graphs:
                options.add_run_config_entry(GRAPH_ID, str(k + 1))  # 0 would be the default graph
            self._run_options.append(options)

    def accepts(self, feed: dict[str, np.ndarray]) -> bool:
        return bool(feed["seq_item"].shape[0] == 1 and 0 < feed["cand_user"].shape[0] <= self.buckets[-1])

    def bucket_for(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The session's outputs for `feed` (U=1, N <= the largest bucket), exactly as `session.run` gives them."""
        n = int(feed["cand_user"].shape[0])
        k = self.buckets.index(self.bucket_for(n))
        if self.cuda_graphs:  # a captured graph holds its buffers' addresses: one set per bucket, one call at a time
            with self._graph_lock:
                return self._run(self._shared(k), k, feed, n)
        return self._run(self._per_thread(k), k, feed, n)

    def _run(self, buffers: _Buffers, k: int, feed: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        for name in INPUT_NAMES:
            if name in USER_INPUTS:
                buffers.inputs[name].update_inplace(np.ascontiguousarray(feed[name]))
            else:
                stage = buffers.staging[name]
                stage[:n] = feed[name]
                stage[n:] = 0  # padding candidates: item 0 of user 0
                buffers.inputs[name].update_inplace(stage)
        self.session.run_with_iobinding(buffers.binding, self._run_options[k])
        # A CPU buffer's numpy() is a view of it, which the next call overwrites: the answer is a copy.
        return {name: value.numpy()[:n].copy() for name, value in buffers.outputs.items()}

    def _per_thread(self, k: int) -> _Buffers:
        per_thread: dict[int, _Buffers] | None = getattr(self._local, "buffers", None)
        if per_thread is None:
            per_thread = self._local.buffers = {}
        return self._get(per_thread, k)

    def _shared(self, k: int) -> _Buffers:
        return self._get(self._graph_buffers, k)

    def _get(self, store: dict[int, _Buffers], k: int) -> _Buffers:
        buffers = store.get(k)
        if buffers is None:
            buffers = store[k] = _Buffers(self.session, bucket=self.buckets[k], seq_len=self.seq_len,
                                          n_stats=self.n_stats, outputs=self.outputs, device=self.device,
                                          device_id=self.device_id)
        return buffers
