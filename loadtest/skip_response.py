"""`polarity skip-response`: does the served model answer recent skips (and clicks) as the product promises?

The promise (README, first paragraph): a recent skip of a similar item pushes the score down. This measures it
through the live service, end to end: real HTTP, real Redis, the bundle's ONNX model.

For each of `users` users drawn from a log (seeded):

1. the user's history (their last `history_events` events of the log) is posted through `POST /v1/events`;
2. category c is the category of the user's last click; the candidates are `candidates` items of category c
   and `candidates` items of other categories, none of them in the user's history;
3. `POST /v1/score` at `request_time` = the user's last event + `gap_s` gives the scores *before*;
4. k recent events of k other category-c items (not candidates, not in the history) are posted, timestamped
   between the last event and `request_time`: skips (`event: skip`, label 0) in the *skip* condition, clicks in
   the *click* condition;
5. the same request gives the scores *after*; Δ = after − before per candidate (click probability).

Per user, diff = mean Δ over the category-c candidates − mean Δ over the other candidates: what the new events
did to the similar items beyond what they did to every item (history length, time since the last event). The
two conditions use the same users and candidates on separate fresh states (their own user-id prefix), so each
condition starts from the same history.

Reported per condition: mean ± std of diff over users, the share of users whose diff has the expected sign
(< 0 after skips, > 0 after clicks; a tie counts as not), and the mean Δ of each candidate group. The bar
(issue 19): for both conditions, ≥ 80% of users and the mean on the expected side.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.data.events import NO_CATEGORY, EventTable

CONDITIONS = ("skip", "click")
EXPECTED_SIGN = {"skip": -1, "click": 1}
BAR_SHARE = 0.8


@dataclass(frozen=True, kw_only=True)
class SkipResponseConfig:
    users: int = 100  # users measured (fewer when the log has fewer eligible users)
    k: int = 5  # skips (or clicks) posted per user
    candidates: int = 10  # candidates per group: category c, and other categories
    history_events: int = 600  # the user's last events of the log, posted before scoring
    min_events: int = 10  # a user needs this many events (and one click with a category) to be drawn
    min_item_events: int = 5  # candidates and posted items: items seen this often in the log (the model knows them)
    gap_s: float = 3600.0  # request_time = the user's last event + gap_s; the k events fall in between
    seed: int = 0
    user_prefix: str = ""  # prepended to every user id sent (a fresh one per run when empty)
    batch: int = 1000  # events per /v1/events request

    def __post_init__(self) -> None:
        for name in ("users", "k", "candidates", "history_events", "min_events", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.gap_s > self.k:
            raise ValueError(f"gap_s must exceed k (one second per posted event), got {self.gap_s}")


@dataclass(frozen=True, kw_only=True)
class Probe:
    """One measured user: the history rows posted, the category, the candidates and the k items posted."""

    user: str  # the log's user id (sent with the condition's prefix)
    rows: np.ndarray  # (H,) rows of the table posted as the history, in time order
    category: str  # c: the category of the user's last click
    same: list[str]  # candidate items of category c
    other: list[str]  # candidate items of other categories
    other_categories: list[str]  # their categories, in the same order
    posted: list[str]  # the k category-c items skipped (or clicked)
    last_time: float  # the user's last event in the log
    prior_skips: int  # skips of category c in the history after the last click (c already fading when > 0)
    request_time: float


def _item_categories(table: EventTable) -> tuple[np.ndarray, np.ndarray]:
    """Per item code: its category code (the last one the log gives it, NO_CATEGORY when none) and its count."""
    cat = np.full(len(table.item_keys), NO_CATEGORY, dtype=np.int64)
    known = table.category != NO_CATEGORY
    cat[table.item[known]] = table.category[known]
    return cat, np.bincount(table.item, minlength=len(table.item_keys))


def plan_probes(table: EventTable, cfg: SkipResponseConfig) -> list[Probe]:
    """The measured users, their categories, candidates and posted items (deterministic per cfg.seed)."""
    if len(table) == 0:
        raise ValueError("the log has no events")
    if not (table.category != NO_CATEGORY).any():
        raise ValueError("the log has no categories: skip response is measured per category")
    rng = np.random.default_rng(cfg.seed)
    item_cat, item_count = _item_categories(table)
    known_items = np.flatnonzero((item_cat != NO_CATEGORY) & (item_count >= cfg.min_item_events))
    by_cat: dict[int, np.ndarray] = {int(c): known_items[item_cat[known_items] == c]
                                     for c in np.unique(item_cat[known_items])}
    starts = np.flatnonzero(np.r_[True, table.user[1:] != table.user[:-1]])
    ends = np.r_[starts[1:], len(table)]
    clicked = (table.label == 1) & (table.category != NO_CATEGORY)
    has_click = np.add.reduceat(clicked.astype(np.int64), starts) > 0
    eligible = np.flatnonzero(has_click & (ends - starts >= cfg.min_events))
    probes: list[Probe] = []
    for u in rng.permutation(eligible):
        lo, hi = int(starts[u]), int(ends[u])
        last_click = lo + int(np.flatnonzero(clicked[lo:hi])[-1])
        c = int(table.category[last_click])
        seen = table.item[lo:hi]
        same_cat = by_cat.get(c, np.zeros(0, dtype=np.int64))
        pool_same = same_cat[~np.isin(same_cat, seen)]
        pool_other = known_items[(item_cat[known_items] != c) & ~np.isin(known_items, seen)]
        if len(pool_same) < cfg.candidates + cfg.k or len(pool_other) < cfg.candidates:
            continue
        same_and_posted = rng.choice(pool_same, size=cfg.candidates + cfg.k, replace=False)
        other = rng.choice(pool_other, size=cfg.candidates, replace=False)
        last = float(table.timestamp[hi - 1])
        probes.append(Probe(
            user=str(table.user_keys[table.user[lo]]), rows=np.arange(max(lo, hi - cfg.history_events), hi),
            category=str(table.category_keys[c]),
            same=[str(table.item_keys[i]) for i in same_and_posted[:cfg.candidates]],
            other=[str(table.item_keys[i]) for i in other],
            other_categories=[str(table.category_keys[item_cat[i]]) for i in other],
            posted=[str(table.item_keys[i]) for i in same_and_posted[cfg.candidates:]],
            last_time=last, request_time=last + cfg.gap_s,
            prior_skips=int(((table.label[last_click + 1:hi] == 0) & (table.category[last_click + 1:hi] == c)).sum())))
        if len(probes) == cfg.users:
            break
    if not probes:
        raise ValueError("no user of the log has enough events, a click with a category and enough unseen items of "
                         "that category to measure")
    return probes


def world_response(table: EventTable, *, k: int = 5) -> dict[str, Any]:
    """What the log itself says, model-free: the click rate of an exposure whose category c is that of the user's
    last click, by how many skips of c came since that click (0 … k, k meaning k or more), next to the click rate
    of other-category exposures in the same situation. A model that learnt the log should move its scores the
    same way; when these rates do not move, no model can be asked to."""
    n = len(table)
    y, cat = table.label.astype(np.int64), table.category
    start = np.r_[True, table.user[1:] != table.user[:-1]]
    first = np.maximum.accumulate(np.where(start, np.arange(n), 0))  # (E,) the user's first row
    click_row = np.where(y == 1, np.arange(n), -1)
    last_click = np.maximum.accumulate(click_row)  # the last click at or before each row ...
    last_click = np.r_[-1, last_click[:-1]]  # ... strictly before it
    last_click = np.where(last_click >= first, last_click, -1)  # and of the same user
    lc_cat = np.where(last_click >= 0, cat[np.maximum(last_click, 0)], NO_CATEGORY)
    counted = ((y == 0) & (cat == lc_cat) & (lc_cat != NO_CATEGORY)).astype(np.int64)
    total = np.cumsum(counted)
    since = np.where(last_click >= 0, total - counted - total[np.maximum(last_click, 0)], 0)  # rows in between
    capped = np.minimum(since, k)
    known = (lc_cat != NO_CATEGORY) & (cat != NO_CATEGORY)
    rows = []
    for j in range(k + 1):
        same, other = known & (capped == j) & (cat == lc_cat), known & (capped == j) & (cat != lc_cat)
        rows.append({"skips": j, "same_rate": float(y[same].mean()) if same.any() else None, "same_n": int(same.sum()),
                     "other_rate": float(y[other].mean()) if other.any() else None, "other_n": int(other.sum())})
    return {"k": k, "rows": rows}


def format_world_response(world: dict[str, Any]) -> str:
    lines = ["| skips of c since the last click (in c) | click rate of the next c exposure | n "
             "| click rate of other exposures | n |", "|---|---|---|---|---|"]
    for r in world["rows"]:
        def rate(x: float | None) -> str:
            return "—" if x is None else f"{x:.3f}"

        lines.append(f"| {r['skips']}{'+' if r['skips'] == world['k'] else ''} | {rate(r['same_rate'])} "
                     f"| {r['same_n']:,} | {rate(r['other_rate'])} | {r['other_n']:,} |")
    return "\n".join(lines) + "\n"


def _history_event(table: EventTable, row: int, *, user_id: str, run_id: str) -> dict[str, Any]:
    cat = int(table.category[row])
    return {"event_id": f"{run_id}-{int(table.source_row[row])}", "user_id": user_id,
            "item_id": str(table.item_keys[table.item[row]]), "timestamp": float(table.timestamp[row]),
            "event": table.event_types[int(table.event[row])] or None, "label": int(table.label[row]),
            "category": None if cat == NO_CATEGORY else str(table.category_keys[cat])}


def posted_events(probe: Probe, condition: str, *, user_id: str, run_id: str, gap_s: float) -> list[dict[str, Any]]:
    """The k skips (or clicks) of the probe's category-c items, spread over the gap before request_time."""
    label = 0 if condition == "skip" else 1
    k = len(probe.posted)
    step = gap_s / (k + 1)
    return [{"event_id": f"{run_id}-{condition}-{j}", "user_id": user_id, "item_id": item,
             "timestamp": probe.last_time + step * (j + 1),
             "event": condition, "label": label, "category": probe.category} for j, item in enumerate(probe.posted)]


def user_diff(before: list[float], after: list[float], n_same: int) -> tuple[float, float, float]:
    """(mean Δ of the first n_same candidates, mean Δ of the rest, their difference)."""
    delta = np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64)
    same, other = float(delta[:n_same].mean()), float(delta[n_same:].mean())
    return same, other, same - other


def summarize_condition(diffs: list[float], same: list[float], other: list[float], condition: str
                        ) -> dict[str, Any]:
    """Mean ± std of the per-user diffs, the share of users on the expected side (ties are not), group means."""
    d = np.asarray(diffs, dtype=np.float64)
    sign = EXPECTED_SIGN[condition]
    return {"users": len(d), "mean_diff": float(d.mean()), "std_diff": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
            "share_expected": float((np.sign(d) == sign).mean()), "share_tied": float((d == 0).mean()),
            "mean_delta_same": float(np.mean(same)), "mean_delta_other": float(np.mean(other)),
            "expected": "same-category drops more" if sign < 0 else "same-category rises more"}


def bar_met(report: dict[str, Any], *, share: float = BAR_SHARE) -> bool:
    """The issue's bar: in both conditions ≥ `share` of users on the expected side and the mean there too."""
    return all(report["conditions"][c]["share_expected"] >= share
               and np.sign(report["conditions"][c]["mean_diff"]) == EXPECTED_SIGN[c] for c in CONDITIONS)


def measure_url(table: EventTable, url: str, cfg: SkipResponseConfig, *, api_key: str | None = None,
                timeout_s: float = 60.0) -> dict[str, Any]:
    """Run the measurement against the service at `url` (its Redis gets the users under cfg.user_prefix)."""
    import httpx

    probes = plan_probes(table, cfg)
    prefix = cfg.user_prefix or f"skipresp-{uuid.uuid4().hex[:8]}/"
    headers = {"x-api-key": api_key} if api_key else {}
    t0 = time.perf_counter()
    per_condition: dict[str, dict[str, list[float]]] = {c: {"diff": [], "same": [], "other": []} for c in CONDITIONS}
    example: dict[str, Any] = {}
    model_version = None
    with httpx.Client(base_url=url, timeout=timeout_s, headers=headers) as client:
        def post_events(events: list[dict[str, Any]]) -> None:
            for lo in range(0, len(events), cfg.batch):
                r = client.post("/v1/events", json={"events": events[lo:lo + cfg.batch]})
                r.raise_for_status()
                if r.json()["rejected"]:
                    raise RuntimeError(f"the service rejected events: {r.json()['results'][:3]}")

        def score(user_id: str, probe: Probe) -> list[float]:
            cands = [{"item_id": i, "category": probe.category} for i in probe.same] + [
                {"item_id": i, "category": c} for i, c in zip(probe.other, probe.other_categories, strict=True)]
            r = client.post("/v1/score", json={"user_id": user_id, "candidates": cands,
                                               "request_time": probe.request_time})
            r.raise_for_status()
            body = r.json()
            if body["degraded"]:
                raise RuntimeError(f"the service scored {user_id} without its history: {body['degraded_reason']}")
            nonlocal model_version
            model_version = body["model_version"]
            scores: list[float] = body["scores"]
            return scores

        for n, probe in enumerate(probes):
            for condition in CONDITIONS:
                user_id = f"{prefix}{condition}/{probe.user}"
                run_id = f"{prefix}{condition}/{n}"
                post_events([_history_event(table, int(r), user_id=user_id, run_id=run_id) for r in probe.rows])
                before = score(user_id, probe)
                post_events(posted_events(probe, condition, user_id=user_id, run_id=run_id, gap_s=cfg.gap_s))
                after = score(user_id, probe)
                same, other, diff = user_diff(before, after, len(probe.same))
                for key, value in (("diff", diff), ("same", same), ("other", other),
                                   ("before_same", float(np.mean(before[:len(probe.same)]))),
                                   ("before_other", float(np.mean(before[len(probe.same):])))):
                    per_condition[condition].setdefault(key, []).append(value)
                if n == 0:
                    example[condition] = {"before": before, "after": after}
    first = probes[0]
    return {
        "config": {**asdict(cfg), "user_prefix": prefix},
        "model_version": model_version,
        "seconds": time.perf_counter() - t0,
        "conditions": {c: summarize_condition(v["diff"], v["same"], v["other"], c) for c, v in per_condition.items()},
        # The same, split by how many skips of c the history already holds after the last click: a model that
        # has already lowered a fading category has less left to lower (the log's own rates flatten too).
        "by_prior_skips": {c: {group: summarize_condition([v["diff"][i] for i in idx], [v["same"][i] for i in idx],
                                                          [v["other"][i] for i in idx], c)
                               for group, idx in _prior_groups(probes).items() if idx}
                           for c, v in per_condition.items()},
        "diffs": {c: v["diff"] for c, v in per_condition.items()},
        # per user, in the order of `users`: mean score of each group before, and its mean Δ
        "users": [p.user for p in probes],
        "per_user": {c: {k: v[k] for k in ("before_same", "before_other", "same", "other")}
                     for c, v in per_condition.items()},
        "example": {"user": first.user, "category": first.category, "posted": first.posted,
                    "request_time": first.request_time,
                    "items": first.same + first.other,
                    "categories": [first.category] * len(first.same) + first.other_categories, **example},
    }


PRIOR_GROUPS = ("0-1", "2+")


def _prior_groups(probes: list[Probe]) -> dict[str, list[int]]:
    """Probe indices by the skips of c already in the history after the last click: 0-1, 2 or more."""
    return {"0-1": [i for i, p in enumerate(probes) if p.prior_skips <= 1],
            "2+": [i for i, p in enumerate(probes) if p.prior_skips >= 2]}


def measure_in_process(table: EventTable, bundle: Path, cfg: SkipResponseConfig, *, redis_url: str | None = None,
                       **settings: Any) -> dict[str, Any]:
    """Serve `bundle` in this process (real HTTP on loopback) against `redis_url` (a private redis-server when
    None) under a fresh key prefix, measure, stop, delete the keys."""
    from loadtest.harness.live_server import serve_in_thread
    from loadtest.harness.redis_server import given_or_private_redis
    from loadtest.replay import delete_prefix
    from service.app import create_app
    from service.settings import Settings

    with given_or_private_redis(redis_url) as url:
        prefix = f"skipresp-{uuid.uuid4().hex[:10]}"
        settings = {"score_redis_budget_ms": 5000, "redis_timeout_ms": 5000, "access_log": False, **settings}
        app = create_app(Settings(bundle=bundle, redis_url=url, key_prefix=prefix, **settings))
        try:
            with serve_in_thread(app) as base:
                report = measure_url(table, base, cfg)
        finally:
            delete_prefix(url, prefix)
    report["bundle"] = str(bundle)
    return report


def format_report(report: dict[str, Any], *, title: str | None = None) -> str:
    """A markdown table of both conditions and whether the bar is met."""
    cfg = report["config"]
    lines = [f"{title}\n" if title else "",
             f"{report['conditions']['skip']['users']} users, k={cfg['k']} posted events of the category of the "
             f"user's last click, {cfg['candidates']} candidates of that category and {cfg['candidates']} of others "
             f"(unseen by the user); diff = mean Δ(same category) − mean Δ(other), click probability.\n",
             "| after k recent … | mean diff ± std | users on the expected side | mean Δ same category "
             "| mean Δ other | expected |", "|---|---|---|---|---|---|"]
    for c in CONDITIONS:
        s = report["conditions"][c]
        lines.append(f"| {c}s | {s['mean_diff']:+.4f} ± {s['std_diff']:.4f} | {s['share_expected']:.0%} "
                     f"| {s['mean_delta_same']:+.4f} | {s['mean_delta_other']:+.4f} | {s['expected']} |")
    split = report.get("by_prior_skips", {})
    if split:
        lines.append("\nBy the skips of c the history already holds after the last click (a category the model "
                     "already scores down has less left to lose):\n")
        lines += ["| after k recent … | history's skips of c since the last click | users | mean diff ± std "
                  "| users on the expected side |", "|---|---|---|---|---|"]
        for c in CONDITIONS:
            for group in PRIOR_GROUPS:
                if group in split[c]:
                    s = split[c][group]
                    lines.append(f"| {c}s | {group} | {s['users']} | {s['mean_diff']:+.4f} ± {s['std_diff']:.4f} "
                                 f"| {s['share_expected']:.0%} |")
    verdict = "met" if bar_met(report) else "NOT met"
    lines.append(f"\nBar (≥ {BAR_SHARE:.0%} of users on the expected side and the mean there, both conditions): "
                 f"{verdict}.")
    return "\n".join(line for line in lines if line) + "\n"


def format_example(report: dict[str, Any], *, per_group: int | None = None) -> str:
    """The first user's before/after table in both conditions (`per_group` rows of each candidate group)."""
    ex = report["example"]
    n_same = ex["categories"].count(ex["category"])
    shown = [j for j in range(len(ex["items"])) if per_group is None or (j < n_same and j < per_group)
             or (j >= n_same and j - n_same < per_group)]
    lines = [f"user {ex['user']}: category c = {ex['category']} (of the last click); posted items "
             f"{', '.join(ex['posted'])}",
             "| item | category | before | after k skips | Δ | after k clicks | Δ |", "|---|---|---|---|---|---|---|"]
    for j in shown:
        item, cat = ex["items"][j], ex["categories"][j]
        b, s, c = ex["skip"]["before"][j], ex["skip"]["after"][j], ex["click"]["after"][j]
        bc = ex["click"]["before"][j]
        lines.append(f"| {item} | {cat}{' (c)' if j < n_same else ''} | {b:.4f} | {s:.4f} | {s - b:+.4f} "
                     f"| {c:.4f} | {c - bc:+.4f} |")
    return "\n".join(lines) + "\n"
