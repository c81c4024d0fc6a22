"""Parity: the exported bundle under ONNX Runtime (CPU) against the trained torch model.

`check_parity` runs both on
- real sequences built from the run's own event log with the run's vocabulary (when the log is
  still where training read it): single requests (U=1) and one micro-batch of requests (U>1);
- synthetic edge cases: N=1, an arbitrary `cand_user` mapping, large N, empty histories,
  all-padding sequences and OOV items/categories;
on every model file of the bundle (`model.onnx`, `model.probability.onnx` and `model.opt.onnx` when present),
through the
ONNX-function fallback and, when the library is built, through the fused custom kernel. It reports
the max absolute difference per case of the probabilities and, for bundles that output it, of the
attention weights (N, L); both must be within the tolerance.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export.bundle import ATTENTION_NAME, MODEL_FILE, OPTIMIZED_MODEL_FILE, OUTPUT_NAME, load_manifest
from export.custom_kernel import kernel_library_path, register_kernel
from export.reference import ExportError, load_run, random_inputs, reference_outputs
from model.features.inputs import InputArrays, inputs_from_sequences
from model.features.spec import FeatureSpec

log = logging.getLogger(__name__)

DEFAULT_TOL = 1e-5
# The largest request the service takes by default (`Settings.max_candidates`): one case scores that many
# candidates, spread over a micro-batch of users, so every kernel task split and buffer size is exercised.
LARGE_N = 2000


class ParityError(ExportError):
    """ONNX Runtime and torch disagree by more than the tolerance."""


@dataclass(frozen=True, kw_only=True)
class ParityCase:
    name: str
    model_file: str
    path: str  # "function" (stock kernels, inlined ONNX function) or "kernel" (fused custom op)
    n_users: int
    n_candidates: int
    max_abs_diff: float  # probabilities
    attention_max_abs_diff: float | None = None  # None: the bundle has no attention output

    @property
    def worst_diff(self) -> float:
        return max(self.max_abs_diff, self.attention_max_abs_diff or 0.0)


@dataclass(frozen=True, kw_only=True)
class ParityReport:
    tol: float
    cases: list[ParityCase] = field(default_factory=list)
    data: str = "unavailable"  # where the real sequences came from

    @property
    def max_abs_diff(self) -> float:
        """Worst probability difference."""
        return max((c.max_abs_diff for c in self.cases), default=0.0)

    @property
    def attention_max_abs_diff(self) -> float | None:
        """Worst attention-weight difference; None when the bundle has no attention output."""
        diffs = [c.attention_max_abs_diff for c in self.cases if c.attention_max_abs_diff is not None]
        return max(diffs) if diffs else None

    @property
    def passed(self) -> bool:
        return bool(self.cases) and all(c.worst_diff <= self.tol for c in self.cases)

    def worst(self) -> ParityCase | None:
        return max(self.cases, key=lambda c: c.worst_diff, default=None)

    def to_dict(self) -> dict[str, Any]:
        paths = sorted({c.path for c in self.cases})
        return {"tol": self.tol, "max_abs_diff": self.max_abs_diff,
                "attention_max_abs_diff": self.attention_max_abs_diff, "passed": self.passed, "data": self.data,
                "paths": paths, "cases": [asdict(c) for c in self.cases]}

    def summary(self) -> str:
        worst = self.worst()
        where = f" (worst: {worst.name}, {worst.model_file}, {worst.path} path)" if worst else ""
        verdict = "ok" if self.passed else "FAILED"
        att = self.attention_max_abs_diff
        att_part = f", max |attention diff| = {att:.3g}" if att is not None else ""
        return (f"parity {verdict}: max |p_onnx - p_torch| = {self.max_abs_diff:.3g}{att_part} over "
                f"{len(self.cases)} case(s), tolerance {self.tol:g}{where}")


def _sub_batch(inputs: InputArrays, users: np.ndarray) -> InputArrays:
    """The sequences of `users` only (candidates are set by the caller)."""
    d = inputs.as_dict()
    return InputArrays(**{k: (v[users] if k.startswith("seq_") or k == "user_stats" else v) for k, v in d.items()})


def _with_candidates(seqs: InputArrays, cand_item: np.ndarray, cand_category: np.ndarray,
                     cand_user: np.ndarray) -> InputArrays:
    d = seqs.as_dict()
    d.update(cand_item=cand_item.astype(np.int64), cand_category=cand_category.astype(np.int64),
             cand_user=cand_user.astype(np.int64))
    return InputArrays(**d)


def data_cases(run: Any, *, n_requests: int, max_candidates: int, seed: int) -> tuple[list[tuple[str, InputArrays]],
                                                                                        str]:
    """Requests built from the run's own log (real sequences, the run's vocabulary)."""
    from model.data.loaders import load_events
    from model.data.samples import encode_events, history_table, sample_source

    cfg = run.train_config
    if not cfg.data or not Path(cfg.data).exists():
        return [], "unavailable"
    try:
        table = load_events(cfg.data, source=cfg.source)
    except Exception as exc:  # a log that moved or changed format: fall back to synthetic cases
        log.warning("parity: cannot read the run's log %s (%s); synthetic inputs only", cfg.data, exc)
        return [], "unavailable"
    events = encode_events(table, run.vocab)
    history = history_table(events)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(table.label), size=min(n_requests, len(table.label)), replace=False))
    source = sample_source(events, history, rows=rows, spec=run.spec.sequence, n_items=run.vocab.n_items)
    seqs = source.sequences(np.arange(len(rows)))
    base = inputs_from_sequences(seqs, cand_item=source.item, cand_category=source.category,
                                 cand_user=np.arange(len(rows)))
    item_cat = run.vocab.item_category

    def candidates(n: int, u: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        items = rng.integers(1, run.vocab.n_items, size=n)  # includes OOV (1)
        return items, item_cat[items], rng.integers(0, u, size=n)

    cases = []
    for i in range(len(rows)):  # one request each: U=1, its impression plus random catalogue items
        n = int(rng.integers(1, max_candidates + 1)) if i else 1
        items, cats, _ = candidates(n, 1)
        items[0], cats[0] = source.item[i], source.category[i]
        cases.append((f"data request {i} (U=1, N={n})",
                      _with_candidates(_sub_batch(base, np.array([i])), items, cats, np.zeros(n, dtype=np.int64))))
    u = len(rows)
    items, cats, users = candidates(max_candidates, u)
    cases.append((f"data micro-batch (U={u}, N={max_candidates})", _with_candidates(base, items, cats, users)))
    return cases, str(cfg.data)


def synthetic_cases(spec: FeatureSpec, *, max_candidates: int, seed: int) -> list[tuple[str, InputArrays]]:
    """Edge cases on random valid inputs."""
    cases = [
        ("U=1 N=1", random_inputs(spec, n_users=1, n_candidates=1, seed=seed)),
        ("U=1 N=7", random_inputs(spec, n_users=1, n_candidates=7, seed=seed + 1)),
        ("U=3 N=11 arbitrary cand_user", random_inputs(spec, n_users=3, n_candidates=11, seed=seed + 2)),
        (f"U=4 N={max_candidates} with an empty history",
         random_inputs(spec, n_users=4, n_candidates=max_candidates, seed=seed + 3, empty_users=1)),
        ("U=1 N=5 empty history", random_inputs(spec, n_users=1, n_candidates=5, seed=seed + 4, empty_users=1)),
        ("U=2 N=6 all OOV", random_inputs(spec, n_users=2, n_candidates=6, seed=seed + 5, oov_share=1.0)),
        (f"U=3 N={LARGE_N} large request", random_inputs(spec, n_users=3, n_candidates=LARGE_N, seed=seed + 8)),
    ]
    # Every user all-padding (no real token anywhere in the batch).
    pad = random_inputs(spec, n_users=2, n_candidates=4, seed=seed + 6, empty_users=2)
    cases.append(("U=2 N=4 all padding", pad))
    # Candidates listed out of user order, some users with several, one user without any.
    x = random_inputs(spec, n_users=5, n_candidates=9, seed=seed + 7)
    cases.append(("U=5 N=9 unordered cand_user, unused user",
                  _with_candidates(x, x.cand_item, x.cand_category, np.array([4, 0, 4, 2, 0, 0, 4, 2, 0]))))
    return cases


def _session(model_path: Path, *, kernel: bool) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if kernel and not register_kernel(opts, providers):
        raise ExportError(f"the TAPF kernel library {kernel_library_path()} could not be registered")
    return ort.InferenceSession(str(model_path), sess_options=opts, providers=providers)


def check_parity(run_dir: Path | str, bundle_dir: Path | str, *, n_requests: int = 6, max_candidates: int = 256,
                 tol: float = DEFAULT_TOL, seed: int = 0, use_data: bool = True, kernel: bool | None = None,
                 verify: bool = True) -> ParityReport:
    """Max |p_onnx - p_torch| over real and synthetic requests, for every model file and path.

    kernel: None = test the fused-kernel path too when the library is built; False = function
    fallback only; True = require the library. Does not raise on a mismatch: see `report.passed`
    (and `assert_parity`).
    """
    run = load_run(run_dir)
    manifest = load_manifest(bundle_dir, verify=verify)
    model = run.model.eval()
    cases = synthetic_cases(run.spec, max_candidates=max_candidates, seed=seed)
    data = "unavailable"
    if use_data:
        real, data = data_cases(run, n_requests=n_requests, max_candidates=max_candidates, seed=seed)
        cases = real + cases
    files = [manifest.model_path]
    for extra in (manifest.probability_model_path, manifest.optimized_model_path):
        if extra is not None:
            files.append(extra)
    use_kernel = kernel if kernel is not None else (kernel_library_path() is not None and manifest.tapf_gates > 0)
    paths = ["function", *(["kernel"] if use_kernel else [])]

    expected = [reference_outputs(model, inputs) for _, inputs in cases]
    if OUTPUT_NAME not in manifest.output_names:
        raise ParityError(f"{manifest.root}: the graph has no {OUTPUT_NAME!r} output ({list(manifest.output_names)})")
    results: list[ParityCase] = []
    for path_kind in paths:
        for model_file in files:
            # The optimised copy has the function inlined already: the kernel path is model.onnx only.
            if path_kind == "kernel" and model_file.name == OPTIMIZED_MODEL_FILE:
                continue
            session = _session(model_file, kernel=path_kind == "kernel")
            outputs = [o.name for o in session.get_outputs()]
            for (name, inputs), want in zip(cases, expected, strict=True):
                got = dict(zip(outputs, session.run(list(outputs), inputs.as_dict()), strict=True))
                diffs = {key: _max_abs_diff(got[key], want[key], f"{model_file.name} {key} ({name})")
                         for key in (OUTPUT_NAME, ATTENTION_NAME) if key in got}
                results.append(ParityCase(name=name, model_file=model_file.name, path=path_kind,
                                          n_users=inputs.n_users, n_candidates=inputs.n_candidates,
                                          max_abs_diff=diffs[OUTPUT_NAME],
                                          attention_max_abs_diff=diffs.get(ATTENTION_NAME)))
    return ParityReport(tol=tol, cases=results, data=data)


def _max_abs_diff(got: np.ndarray, want: np.ndarray, what: str) -> float:
    if got.shape != want.shape:
        raise ParityError(f"{what}: output shape {got.shape} != torch {want.shape}")
    if not np.isfinite(got).all():
        return float("inf")
    return float(np.max(np.abs(got.astype(np.float64) - want))) if want.size else 0.0


def assert_parity(report: ParityReport) -> None:
    if not report.passed:
        raise ParityError(report.summary())


__all__ = ["DEFAULT_TOL", "MODEL_FILE", "ParityCase", "ParityError", "ParityReport", "assert_parity", "check_parity"]
