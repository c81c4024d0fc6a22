"""A synthetic world where skips carry information, as much as the `skip_signal` knob says.

The generative story, per event (all of it vectorised; one seed fixes every draw):

1. Items have a category, a latent vector near their category's centroid, a quality and a popularity.
2. Every user has an activity level (how many of the events are theirs, log-normal with spread
   `activity_sigma`) and `interests_per_user` sub-interests, each tied to a distinct category.
3. One interest is *active* for a geometric stretch of exposures (mean `mean_stretch`), then the user
   switches to another.
4. Each exposure comes from the active interest's category (`active_share`), another of the user's
   interests (`interest_share`), the popular items (`popular_share`) or the whole catalogue.
5. The click probability is sigmoid(affinity to the *active* interest, quality, minus fatigue (the same
   item again, a stretch wearing on), plus a bias calibrated to `positive_rate`); every other exposure is
   a skip (a few of them explicit dislikes; a few clicks are likes).

So at S = 1 the recent skips say which interests are inactive *now*, something the positive history, which
still shows the old interest until the first click of the new one, cannot say.

The skip-signal knob S (`skip_signal`) changes only what the skips say, never the clicks:

- S in [0, 1): each skip keeps its item with probability S; otherwise the skipped item is replaced by a
  random exposure (a popular or a uniform item, independent of the user), so at S = 0 skips are random
  exposures skipped at the base rate: the skip history carries no information about the user's preference
  beyond what the positives carry;
- S = 1: the world above;
- S > 1: the active interest switches S times as often (mean stretch `mean_stretch / S`): the positive
  history goes stale sooner and the recent skips of the newly inactive interests say more.

`PRESETS["kuairec-like"]` follows the statistics of the paper's KuaiRec (Table 1): 7,176 users, 10,728
items, a 7.4% positive rate and about 1,740 impressions per user (KuaiRec: 12.5M interactions), with a
narrow activity spread so that nearly every user has the 50 positives and 50 skips of a mixed L=100 sequence
(r = 0.5) and the median user over 100 positives.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.features.spec import from_dict_strict


@dataclass(frozen=True, kw_only=True)
class SyntheticWorldConfig:
    users: int = 10_000
    items: int = 20_000
    events: int = 1_000_000
    categories: int = 50
    latent_dim: int = 16
    interests_per_user: int = 3
    mean_stretch: float = 20.0  # mean exposures while one interest stays active
    active_share: float = 0.25  # exposures drawn from the active interest's category
    interest_share: float = 0.40  # exposures drawn from the user's other (inactive) interests
    popular_share: float = 0.20  # the rest is uniformly random
    positive_rate: float = 0.15  # target share of clicks (8-30% is realistic)
    affinity_weight: float = 5.0
    quality_weight: float = 0.7
    fatigue_weight: float = 1.5
    item_spread: float = 0.15  # per-dimension noise of an item's latent vector around its category
    interest_spread: float = 0.10  # per-dimension noise of a sub-interest around its category
    activity_sigma: float = 0.8  # log-normal spread of events per user
    skip_signal: float = 1.0  # S: 0 = skips independent of preference, 1 = the world above, > 1 skips say more
    days: float = 60.0
    start_time: int = 1_700_000_000
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("users", "items", "events", "categories", "latent_dim", "interests_per_user"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.interests_per_user > self.categories:
            raise ValueError("interests_per_user cannot exceed categories")
        if not 0.0 < self.positive_rate < 1.0:
            raise ValueError("positive_rate must be in (0, 1)")
        if self.active_share + self.interest_share + self.popular_share > 1.0 + 1e-9:
            raise ValueError("active_share + interest_share + popular_share must be <= 1")
        if self.skip_signal < 0:
            raise ValueError(f"skip_signal must be >= 0, got {self.skip_signal}")
        if self.activity_sigma < 0 or not self.mean_stretch > 0:
            raise ValueError("activity_sigma must be >= 0 and mean_stretch > 0")

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> SyntheticWorldConfig:
        cfg: SyntheticWorldConfig = from_dict_strict(cls, data)
        return cfg


# Named worlds: SyntheticWorldConfig fields that `polarity synth --preset NAME` starts from (flags override them).
KUAIREC_EVENTS_PER_USER = 1_742  # KuaiRec: 12.5M interactions over 7,176 users
PRESETS: dict[str, dict[str, float | int]] = {
    "kuairec-like": {"users": 7_176, "items": 10_728, "events": 7_176 * KUAIREC_EVENTS_PER_USER,
                     "positive_rate": 0.074, "activity_sigma": 0.3},
}


def preset_config(name: str, **overrides: object) -> SyntheticWorldConfig:
    """A preset world with some fields overridden; `users` alone keeps the preset's events per user."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
    values: dict[str, object] = dict(PRESETS[name])
    if "users" in overrides and "events" not in overrides:
        per_user = int(values["events"]) // int(values["users"])  # type: ignore[call-overload]
        values["events"] = per_user * int(overrides["users"])  # type: ignore[call-overload]
    return SyntheticWorldConfig.from_dict({**values, **overrides})


def generate(cfg: SyntheticWorldConfig) -> dict[str, np.ndarray]:
    """Columns of a generic event log, sorted by (user, timestamp)."""
    rng = np.random.default_rng(cfg.seed)
    U, I, C, k, M, E = cfg.users, cfg.items, cfg.categories, cfg.latent_dim, cfg.interests_per_user, cfg.events

    # Items: category, latent vector near the category centroid, quality, popularity.
    centroid = _unit(rng.standard_normal((C, k)).astype(np.float32))
    item_cat = rng.integers(0, C, size=I)
    item_vec = _unit(centroid[item_cat] + cfg.item_spread * rng.standard_normal((I, k)).astype(np.float32))
    quality = rng.standard_normal(I).astype(np.float32)
    pop_weight = 1.0 / (np.arange(I) + 20.0) ** 1.1
    pop_cdf = np.cumsum(pop_weight[rng.permutation(I)])
    pop_cdf /= pop_cdf[-1]
    by_cat = np.argsort(item_cat, kind="stable")
    cat_ptr = np.zeros(C + 1, dtype=np.int64)
    np.cumsum(np.bincount(item_cat, minlength=C), out=cat_ptr[1:])

    # Users: activity (events per user) and M distinct interest categories each.
    activity = rng.lognormal(0.0, cfg.activity_sigma, size=U)
    counts = rng.multinomial(E, activity / activity.sum())
    interest_cat = np.argsort(rng.random((U, C)), axis=1)[:, :M]  # (U, M) distinct categories
    noise = rng.standard_normal((U, M, k)).astype(np.float32)
    interest_vec = _unit(centroid[interest_cat] + cfg.interest_spread * noise)

    user = np.repeat(np.arange(U), counts)  # (E,) sorted by user
    first = np.zeros(U + 1, dtype=np.int64)
    np.cumsum(counts, out=first[1:])
    pos_in_user = np.arange(E) - first[user]

    # Timestamps: integer seconds spread over the period, increasing within a user (ties happen).
    offset = rng.random(E) * cfg.days * 86400.0
    order = np.lexsort((offset, user))
    timestamp = cfg.start_time + np.floor(offset[order]).astype(np.int64)

    # The active interest switches after geometric stretches; never to the same interest.
    mean_stretch = cfg.mean_stretch / max(cfg.skip_signal, 1.0)  # S > 1: interests go stale sooner
    switch = (rng.random(E) < 1.0 / mean_stretch) & (pos_in_user > 0)
    step = np.where(switch, rng.integers(1, max(M, 2), size=E), 0)
    active = (rng.integers(0, M, size=U)[user] + _cumsum_within(step, user, first)) % M
    stretch_id = _cumsum_within(switch.astype(np.int64), user, first)
    stretch_start = _segment_starts(user * (E + 1) + stretch_id)
    pos_in_stretch = np.arange(E) - stretch_start

    # Exposure source: the active interest, another interest, popular or random items.
    source = rng.random(E)
    other = (active + rng.integers(1, max(M, 2), size=E)) % M if M > 1 else active
    chosen_interest = np.where(source < cfg.active_share, active, other)
    from_interest = source < cfg.active_share + cfg.interest_share
    from_popular = ~from_interest & (source < cfg.active_share + cfg.interest_share + cfg.popular_share)
    cat = interest_cat[user, chosen_interest]
    size = cat_ptr[cat + 1] - cat_ptr[cat]
    # An empty category (few items) would index past the end; its rows take another source below.
    in_cat = by_cat[np.minimum(cat_ptr[cat] + np.floor(rng.random(E) * np.maximum(size, 1)).astype(np.int64), I - 1)]
    popular = np.minimum(np.searchsorted(pop_cdf, rng.random(E)), I - 1)
    uniform = rng.integers(0, I, size=E)
    item = np.where(from_interest & (size > 0), in_cat, np.where(from_popular, popular, uniform))

    # Fatigue: how often this user saw this item before, and how long the stretch has lasted.
    repeat = _rank_within_groups(user, item, pos_in_user)
    fatigue = np.log1p(repeat) + pos_in_stretch / (2.0 * mean_stretch)

    # Affinity to the active interest (chunked to bound memory at 10M+ events).
    affinity = np.empty(E, dtype=np.float32)
    for lo in range(0, E, 1 << 20):
        hi = min(E, lo + (1 << 20))
        iv = interest_vec[user[lo:hi], active[lo:hi]]  # (chunk, k)
        affinity[lo:hi] = np.einsum("ij,ij->i", item_vec[item[lo:hi]], iv)
    score = cfg.affinity_weight * affinity + cfg.quality_weight * quality[item] - cfg.fatigue_weight * fatigue
    bias = _calibrate_bias(score, cfg.positive_rate, rng)
    label = (rng.random(E) < _sigmoid(score + bias)).astype(np.int8)

    # Typed behaviours: some clicks are likes, a few skips are explicit dislikes.
    kind = rng.random(E)
    event = np.where(label == 1, np.where(kind < 0.15, "like", "click"), np.where(kind < 0.03, "dislike", "skip"))

    if cfg.skip_signal < 1.0:
        # S < 1: a share 1 - S of the skips show a random exposure instead (drawn last, so the clicks and
        # every draw before are the same world whatever S is, and S = 1 draws nothing more).
        random_item = np.where(rng.random(E) < cfg.popular_share / max(1.0 - cfg.active_share - cfg.interest_share,
                                                                       1e-9),
                               np.minimum(np.searchsorted(pop_cdf, rng.random(E)), I - 1), rng.integers(0, I, size=E))
        replace = (label == 0) & (rng.random(E) >= cfg.skip_signal)
        item = np.where(replace, random_item, item)
    return {
        "user_id": user.astype(np.int64),
        "item_id": item.astype(np.int64),
        "timestamp": timestamp,
        "label": label,
        "event": event.astype(object),
        "category": item_cat[item].astype(np.int64),
    }


def _unit(x: np.ndarray) -> np.ndarray:
    unit: np.ndarray = x / np.linalg.norm(x, axis=-1, keepdims=True)
    return unit


def _sigmoid(x: np.ndarray) -> np.ndarray:
    prob: np.ndarray = 1.0 / (1.0 + np.exp(-x))
    return prob


def _cumsum_within(values: np.ndarray, user: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Inclusive cumulative sum restarted at each user's first event (events sorted by user)."""
    total = np.cumsum(values)
    before = np.concatenate([[0], total])[first[:-1]]  # sum before each user's first event
    within: np.ndarray = total - before[user]
    return within


def _segment_starts(key: np.ndarray) -> np.ndarray:
    """Index of the first element of each run of equal consecutive keys, per element."""
    starts = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]]))
    run = np.cumsum(np.concatenate([[True], key[1:] != key[:-1]])) - 1
    first: np.ndarray = starts[run]
    return first


def _rank_within_groups(user: np.ndarray, item: np.ndarray, position: np.ndarray) -> np.ndarray:
    """How many earlier events of the same (user, item) pair each event has."""
    order = np.lexsort((position, item, user))
    u, it = user[order], item[order]
    new = np.concatenate([[True], (u[1:] != u[:-1]) | (it[1:] != it[:-1])])
    group_start = np.maximum.accumulate(np.where(new, np.arange(len(order)), 0))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order)) - group_start
    return rank


def _calibrate_bias(score: np.ndarray, rate: float, rng: np.random.Generator) -> float:
    """The bias that makes the mean click probability equal `rate` (bisection on a sample)."""
    sample = score[rng.integers(0, len(score), size=min(len(score), 200_000))].astype(np.float64)
    lo, hi = -30.0, 30.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if _sigmoid(sample + mid).mean() < rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def write_large(cfg: SyntheticWorldConfig, path: str | Path, *, block_events: int = 2_000_000) -> Path:
    """Write a synthetic log of `cfg.events` events to Parquet in user blocks, with bounded memory.

    Block b is an independent world of the same shape (seed `cfg.seed * 1000 + b`, the block's
    share of users, ids offset so that blocks never share a user) written as its own row groups, so
    peak memory is that of one `generate` call of `block_events` events. The file stays sorted by
    (user_id, timestamp), the order the streaming reader (`model.data.stream`) needs. Items keep the
    same id range in every block but not the same latent vectors: fine for throughput and memory
    benchmarks, not a single coherent world (use `generate` for that).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_blocks = max(1, -(-cfg.events // block_events))
    users_per_block = max(1, cfg.users // n_blocks)
    tmp = path.with_name(path.name + ".partial")
    writer: pq.ParquetWriter | None = None
    try:
        for b in range(n_blocks):
            events = min(block_events, cfg.events - b * block_events)
            block = dataclasses.replace(cfg, events=events, users=users_per_block, seed=cfg.seed * 1000 + b)
            cols = generate(block)
            cols["user_id"] = cols["user_id"] + b * users_per_block
            table = pa.table({k: pa.array(v) for k, v in cols.items()})
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
            writer.write_table(table, row_group_size=1 << 20)
            del cols, table
    finally:
        if writer is not None:
            writer.close()
    tmp.replace(path)
    return path
