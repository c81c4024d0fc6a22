"""What an export starts from and is checked against: a trained run loaded with clear errors, whether the
bundle can represent it, valid random inputs, and the trained model's own outputs (the parity reference)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.bundle import ATTENTION_NAME, OUTPUT_NAME
from model.features.inputs import InputArrays
from model.features.spec import FIRST_ID_INDEX, OOV_INDEX, FeatureSpec, SpecError
from model.models.config import ARCHS, ModelConfig
from model.models.ctr_model import SequenceCTRModel
from model.modules.polarity_gate import TAPFGate
from model.training.batches import to_tensors
from model.training.checkpoint import CHECKPOINT, LoadedRun, load_checkpoint


class ExportError(ValueError):
    """A run that cannot be exported as asked; the message says why and what to do."""

def load_run(run_dir: Path | str) -> LoadedRun:
    """`model.training.checkpoint.load_checkpoint` with clear errors; returns its LoadedRun."""

    run_dir = Path(run_dir)
    if not (run_dir / CHECKPOINT).is_file():
        raise ExportError(f"{run_dir}: no {CHECKPOINT}; is this a `polarity train` run directory?")
    try:
        return load_checkpoint(run_dir)
    except (SpecError, KeyError, TypeError) as exc:
        raise ExportError(f"{run_dir}: checkpoint cannot be rebuilt: {exc}") from exc
    except RuntimeError as exc:  # state-dict shape/key mismatches
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{run_dir}: checkpoint does not match its model config: {first}") from exc
    except Exception as exc:  # unpickling, truncated files
        raise ExportError(f"{run_dir}: cannot read {CHECKPOINT}: {type(exc).__name__}: {exc}") from exc

def check_representable(model: nn.Module, config: ModelConfig, spec: FeatureSpec) -> int:
    """Raise ExportError for anything the bundle cannot represent faithfully; returns the number of TAPF gates."""
    if config.arch not in ARCHS:
        raise ExportError(f"arch {config.arch!r} has no export path (known: {ARCHS})")
    if not isinstance(model, SequenceCTRModel):
        raise ExportError(f"{type(model).__name__} is not a SequenceCTRModel; the exporter cannot serve it")
    bad_dtype = sorted({str(t.dtype) for t in model.state_dict().values()
                        if t.is_floating_point() and t.dtype != torch.float32})
    if bad_dtype:
        raise ExportError(f"the bundle is float32 but the checkpoint holds {bad_dtype} weights; "
                          "convert the run to float32 first")
    non_finite = [name for name, t in model.state_dict().items() if t.is_floating_point() and
                  not bool(torch.isfinite(t).all())]
    if non_finite:
        raise ExportError(f"checkpoint has non-finite weights in {non_finite[:5]} (diverged training?); "
                          "it cannot be served")
    gates = [m for m in model.modules() if isinstance(m, TAPFGate)]
    if config.uses_tapf and not gates:
        raise ExportError(f"seq_variant {config.seq_variant!r} needs a TAPF gate but the model has none")
    if not config.uses_tapf and gates:
        raise ExportError(f"seq_variant {config.seq_variant!r} has no TAPF gate but the model has {len(gates)}")
    for gate in gates:
        if gate.d_model != config.d_model:
            raise ExportError(f"TAPF gate width {gate.d_model} != d_model {config.d_model}")
    if spec.n_stats != 4:
        raise ExportError(f"feature spec has n_stats={spec.n_stats}; the sequence builder produces 4")
    return len(gates)

def random_inputs(spec: FeatureSpec, *, n_users: int, n_candidates: int, seed: int = 0,
                  empty_users: int = 0, oov_share: float = 0.1) -> InputArrays:
    """Valid random model inputs: left-padded histories of random length (the first `empty_users`
    users have none), polarity consistent with the event types, OOV items and categories mixed in,
    candidates spread over the users with an arbitrary `cand_user`."""
    rng = np.random.default_rng(seed)
    length = spec.sequence.seq_len
    u, n = n_users, n_candidates
    n_real = rng.integers(0, length + 1, size=u)
    n_real[:empty_users] = 0
    if u > empty_users:
        n_real[empty_users] = length  # at least one full history
    mask = np.arange(length)[None, :] >= (length - n_real)[:, None]
    items = _known_ids(rng, spec.n_items, (u, length))
    items[rng.random((u, length)) < oov_share] = OOV_INDEX
    cats = _known_ids(rng, spec.n_categories, (u, length))
    cats[rng.random((u, length)) < oov_share] = OOV_INDEX
    polarity = np.where(rng.random((u, length)) < spec.sequence.pos_ratio, 1, -1)
    event_pol = np.asarray(spec.event_polarity, dtype=np.int64)
    events = np.zeros((u, length), dtype=np.int64)
    for sign in (1, -1):
        choices = np.flatnonzero(event_pol == sign)
        if choices.size == 0:
            choices = np.arange(1, max(len(event_pol), 2))
        sel = polarity == sign
        events[sel] = rng.choice(choices, size=int(sel.sum()))
    n_pos = (mask & (polarity > 0)).sum(1)
    n_neg = (mask & (polarity < 0)).sum(1)
    stats = np.stack([np.log1p(n_pos), np.log1p(n_neg), n_pos / np.maximum(n_pos + n_neg, 1),
                      np.log1p(rng.exponential(3600.0, size=u))], axis=1).astype(np.float32)
    cand_item = _known_ids(rng, spec.n_items, (n,))
    cand_item[rng.random(n) < oov_share] = OOV_INDEX
    cand_cat = _known_ids(rng, spec.n_categories, (n,))
    cand_user = rng.integers(0, u, size=n)
    cand_user[: min(u, n)] = rng.permutation(u)[: min(u, n)]  # every user has a candidate when N >= U
    zero = np.int64(0)
    return InputArrays(
        seq_item=np.where(mask, items, zero).astype(np.int64),
        seq_category=np.where(mask, cats, zero).astype(np.int64),
        seq_polarity=np.where(mask, polarity, zero).astype(np.int64),
        seq_event=np.where(mask, events, zero).astype(np.int64),
        seq_mask=mask,
        user_stats=stats,
        cand_item=cand_item.astype(np.int64),
        cand_category=cand_cat.astype(np.int64),
        cand_user=cand_user.astype(np.int64),
    )

def _known_ids(rng: np.random.Generator, vocab_size: int, shape: tuple[int, ...]) -> np.ndarray:
    """Random in-vocabulary ids [FIRST_ID_INDEX, vocab_size); all OOV_INDEX when the vocabulary has no id of its
    own (a log without the optional `category` column: only PAD and OOV)."""
    if vocab_size <= FIRST_ID_INDEX:
        return np.full(shape, OOV_INDEX, dtype=np.int64)
    return rng.integers(FIRST_ID_INDEX, vocab_size, size=shape)


def reference_outputs(model: nn.Module, inputs: InputArrays) -> dict[str, np.ndarray]:
    """What a bundle must reproduce, from the trained torch model's own API (unfolded gates, not the
    export wrapper): {"probability": sigmoid(model(...)) (N,), "attention": model.attention(...) (N, L)},
    float64."""
    if not isinstance(model, SequenceCTRModel):
        raise ExportError(f"{type(model).__name__} is not a SequenceCTRModel")
    x = to_tensors(inputs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            probs = torch.sigmoid(model(**x))
            attention = model.attention(**x)
    finally:
        model.train(was_training)
    return {OUTPUT_NAME: probs.numpy().astype(np.float64), ATTENTION_NAME: attention.numpy().astype(np.float64)}
