"""`polarity replay`: offline replay evaluation of a bundle through the running service.

An event log is cut in time: everything before the replay window is bulk-loaded into the service's
history store through `/v1/events` (the write path every event takes); then the window's
impressions are replayed in time order — for each one `/v1/score` is called for its user and item
with `request_time` = the impression's timestamp, and then its real outcome is posted to
`/v1/events`. The online scores give online AUC / GAUC / logloss and latencies.

The same bundle is also evaluated offline on the same impressions, by the trainer's path:
`model.data.samples` (`encode_events`, `history_table`, `sample_source`, i.e. `build_sequences` over the
whole log) with the bundle's vocabulary and feature spec, scored by the bundle's ONNX model (or
the run's torch model with `run_dir`). Both paths see the same events under the same rule, so the
AUCs must agree within `tolerance` (0.001); a larger gap is a training/serving skew failure,
reported with the first diverging samples (user, offline tokens vs online tokens).

Tie semantics. Offline, a sample at time t sees its user's events with timestamp < t, ordered by
(timestamp, file row). The replay reproduces both halves: it sends events in (timestamp, file row)
order, so the store's per-user arrival counter orders equal timestamps like the file does, and
`request_time` = t with the service's strict cut-off hides every event at t — including outcomes
of earlier impressions at the same instant that were already posted. Users are independent, so
they are replayed concurrently (sharded by user; each shard strictly in order).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from loadtest.latency_histogram import LatencyHistogram
from model.data.events import EventTable
from model.data.loaders import load_events
from model.data.samples import SampleSource, encode_events, history_table, sample_source
from model.features.sequence import SequenceBatch
from model.features.spec import FIRST_ID_INDEX, OOV_INDEX, FeatureSpec
from model.features.vocab import Vocabulary
from model.progress import progress_bar
from model.training.metrics import summarize

SKEW_INJECTIONS = ("inclusive-cutoff",)
DEGRADED_RETRIES = 3
HistoryReader = Callable[[list[str]], Awaitable[list[Any]]]  # user ids -> service.history_store.UserHistory


class ReplayError(RuntimeError):
    """The service answered something the replay cannot use (message says what)."""


@dataclass(frozen=True, kw_only=True)
class ReplayConfig:
    data: Path  # event log (or a KuaiRec/KuaiRand directory)
    bundle: Path  # the bundle the service serves (offline evaluation uses it too)
    source: str = "auto"
    start_time: float | None = None  # replay window = events at or after it
    test_fraction: float = 0.2  # else the last share of events by (timestamp, file row), as the temporal split
    run_dir: Path | None = None  # score offline with this run's torch model instead of the bundle's ONNX
    concurrency: int = 8  # user shards replayed in parallel
    load_batch: int = 1000  # events per /v1/events request
    user_prefix: str = ""  # prepended to every user id sent (isolates a replay from other data)
    tolerance: float = 1e-3  # max |online AUC - offline AUC|
    score_tolerance: float = 1e-4  # a sample whose scores differ by more is "diverging"
    max_impressions: int = 0  # replay only the first K window impressions (0 = all)
    max_users: int = 0  # replay only the impressions of this many users drawn at random (0 = all)
    seed: int = 0  # for max_users
    show_diverging: int = 5
    inject_skew: str | None = None  # test hook: "inclusive-cutoff" (outcome posted first, cut-off <= t)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.start_time is None and not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.concurrency < 1 or self.load_batch < 1:
            raise ValueError("concurrency and load_batch must be >= 1")
        if self.inject_skew is not None and self.inject_skew not in SKEW_INJECTIONS:
            raise ValueError(f"inject_skew must be one of {SKEW_INJECTIONS}")


# ------------------------------------------------------------------------------------ the log


def time_order(table: EventTable) -> np.ndarray:
    """Row indices of the table in (timestamp, file row) order: the order events happened in."""
    order: np.ndarray = np.lexsort((table.source_row, table.timestamp))
    return order


def replay_window(table: EventTable, *, start_time: float | None, test_fraction: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(prefix rows, window rows), both in time order.

    Without start_time the window is the last `test_fraction` of events by (timestamp, file row),
    the same cut as the trainer's temporal split (`model.data.split.split_events`).
    """
    order = time_order(table)
    if start_time is not None:
        in_window = table.timestamp[order] >= start_time
        return order[~in_window], order[in_window]
    cut = round(len(order) * (1 - test_fraction))
    return order[:cut], order[cut:]


def event_payload(table: EventTable, row: int, *, event_id_prefix: str = "row", user_prefix: str = ""
                  ) -> dict[str, Any]:
    """Row `row` of the log as one event of a `POST /v1/events` body (event id: prefix + the row in the file)."""
    cat = int(table.category[row])
    return {
        "event_id": f"{event_id_prefix}-{int(table.source_row[row])}",
        "user_id": user_prefix + str(table.user_keys[table.user[row]]),
        "item_id": str(table.item_keys[table.item[row]]),
        "timestamp": float(table.timestamp[row]),
        "event": table.event_types[int(table.event[row])],
        "label": int(table.label[row]),  # the label decides the polarity, as offline
        "category": None if cat < 0 else str(table.category_keys[cat]),
    }


# ------------------------------------------------------------------------------------ offline

ONNX_OFFLINE_BATCH = 128  # samples (= users) per ONNX Runtime call when scoring offline with the bundle


@dataclass(frozen=True, kw_only=True)
class Offline:
    source: SampleSource  # one sample per window impression, in replay order
    probs: np.ndarray  # (Q,) float32
    vocab: Vocabulary
    spec: FeatureSpec


def offline_scores(table: EventTable, rows: np.ndarray, *, bundle: Path, run_dir: Path | None = None,
                   batch_size: int = 2048) -> Offline:
    """The trainer's path on `rows`: the bundle's vocab and spec, the whole log as history."""
    from export.bundle import load_manifest

    manifest = load_manifest(bundle)
    vocab, spec = manifest.load_vocabulary(), manifest.feature_spec
    events = encode_events(table, vocab)
    source = sample_source(events, history_table(events), rows=rows, spec=spec.sequence, n_items=vocab.n_items)
    if run_dir is not None:
        from model.training.checkpoint import load_checkpoint
        from model.training.evaluate import predict

        probs = predict(load_checkpoint(run_dir).model, source, batch_size=batch_size)
    else:
        from service.inference import OnnxBackend

        backend = OnnxBackend(manifest, device="cpu")
        probs = np.empty(len(source), dtype=np.float32)
        # Every sample is its own user (U = N): the serving graph is built for few users per call (one
        # request, or a small micro-batch) and its OneTrans attention costs O(N * U * L), so batch small.
        step = min(batch_size, ONNX_OFFLINE_BATCH)
        for lo in range(0, len(source), step):
            idx = np.arange(lo, min(lo + step, len(source)))
            probs[idx] = backend.run(source.inputs(idx).as_dict())["probs"]
    return Offline(source=source, probs=probs, vocab=vocab, spec=spec)


# ------------------------------------------------------------------------------------- online


@dataclass
class _Online:
    probs: np.ndarray
    request_time: np.ndarray
    score_latency: LatencyHistogram
    event_latency: LatencyHistogram  # window posts
    load_event_latency: LatencyHistogram  # bulk history batches
    loaded: int = 0
    degraded_retries: int = 0
    load_seconds: float = 0.0
    replay_seconds: float = 0.0


def _shards(table: EventTable, rows: np.ndarray, n: int) -> list[np.ndarray]:
    """Positions into `rows`, split by user into n shards, each keeping `rows`' order."""
    shard_of = table.user[rows] % n
    return [np.flatnonzero(shard_of == k) for k in range(n) if (shard_of == k).any()]


async def _post_events(client: httpx.AsyncClient, events: list[dict[str, Any]], hist: LatencyHistogram) -> None:
    t0 = time.perf_counter()
    r = await client.post("/v1/events", json={"events": events})
    hist.record(time.perf_counter() - t0)
    if r.status_code != 200:
        raise ReplayError(f"/v1/events answered {r.status_code}: {r.text[:300]}")
    body = r.json()
    if body.get("rejected"):
        bad = next(x for x in body["results"] if x["status"] == "rejected")
        raise ReplayError(f"/v1/events rejected event {events[bad['index']]}: {bad.get('reason')}")


async def replay_online(client: httpx.AsyncClient, table: EventTable, prefix: np.ndarray, window: np.ndarray,
                        cfg: ReplayConfig, *, run_id: str) -> _Online:
    """Bulk-load `prefix`, then score-then-post every impression of `window` (both in time order)."""
    out = _Online(probs=np.full(len(window), np.nan, dtype=np.float32),
                  request_time=table.timestamp[window].astype(np.float64),
                  score_latency=LatencyHistogram(), event_latency=LatencyHistogram(),
                  load_event_latency=LatencyHistogram())
    def payload(row: int) -> dict[str, Any]:
        return event_payload(table, int(row), event_id_prefix=run_id, user_prefix=cfg.user_prefix)


    t0 = time.perf_counter()
    bar = progress_bar(total=len(prefix) + len(window), unit="event", enabled=cfg.progress,
                       desc="replay: load history")

    async def load(positions: np.ndarray) -> None:
        for lo in range(0, len(positions), cfg.load_batch):
            chunk = prefix[positions[lo : lo + cfg.load_batch]]
            await _post_events(client, [payload(r) for r in chunk], out.load_event_latency)
            bar.update(len(chunk))

    await asyncio.gather(*(load(p) for p in _shards(table, prefix, cfg.concurrency)))
    out.loaded = len(prefix)
    out.load_seconds = time.perf_counter() - t0

    leak = cfg.inject_skew == "inclusive-cutoff"
    if leak:  # the injected bug: a cut-off that includes the impression's own instant (<= t)
        out.request_time = np.nextafter(out.request_time, np.inf)
    bar.set_description("replay: score + post")
    t1 = time.perf_counter()

    async def replay(positions: np.ndarray) -> None:
        for pos in positions.tolist():
            row = int(window[pos])
            event = payload(row)
            if leak:
                await _post_events(client, [event], out.event_latency)
            request = {"user_id": event["user_id"],
                       "candidates": [{"item_id": event["item_id"], "category": event["category"]}],
                       "request_time": float(out.request_time[pos])}
            for attempt in range(DEGRADED_RETRIES + 1):
                ts = time.perf_counter()
                r = await client.post("/v1/score", json=request)
                out.score_latency.record(time.perf_counter() - ts)
                if r.status_code != 200:
                    raise ReplayError(f"/v1/score answered {r.status_code}: {r.text[:300]}")
                body = r.json()
                if not body.get("degraded"):
                    break
                # Scored without history (Redis slower than the service's budget): not comparable, ask again.
                out.degraded_retries += 1
                if attempt == DEGRADED_RETRIES:
                    raise ReplayError(f"/v1/score stayed degraded ({body.get('degraded_reason')}) after "
                                      f"{DEGRADED_RETRIES} retries: the history store is not answering in time")
                await asyncio.sleep(0.05 * (attempt + 1))
            out.probs[pos] = body["scores"][0]
            if not leak:
                await _post_events(client, [event], out.event_latency)
            bar.update(1)

    await asyncio.gather(*(replay(p) for p in _shards(table, window, cfg.concurrency)))
    out.replay_seconds = time.perf_counter() - t1
    bar.close()
    return out


# ---------------------------------------------------------------------------------- diagnosis


def _tokens(seqs: SequenceBatch, k: int, vocab: Vocabulary) -> list[str]:
    """Real tokens of sequence k as 'item+event@t' (oldest first); '<oov>' for unseen items."""
    out = []
    for j in np.flatnonzero(seqs.mask[k]):
        idx = int(seqs.item[k, j])
        item = vocab.items[idx - FIRST_ID_INDEX] if idx >= FIRST_ID_INDEX else "<oov>" if idx == OOV_INDEX else "<pad>"
        sign = "+" if seqs.polarity[k, j] > 0 else "-"
        out.append(f"{item}{sign}{vocab.event_types[int(seqs.event[k, j])]}@{float(seqs.timestamp[k, j]):.6g}")
    return out


async def diverging_samples(table: EventTable, window: np.ndarray, offline: Offline, online: _Online,
                            cfg: ReplayConfig, *, read_histories: HistoryReader | None) -> list[dict[str, Any]]:
    """The first (in replay order) samples whose online and offline scores differ, with both token lists."""
    diff = np.abs(online.probs.astype(np.float64) - offline.probs.astype(np.float64))
    positions = np.flatnonzero(~(diff <= cfg.score_tolerance))[: cfg.show_diverging]  # NaN counts as diverging
    if positions.size == 0:
        return []
    off_seqs = offline.source.sequences(positions)
    on_seqs = None
    if read_histories is not None:
        from service.assembly import assemble_sequences

        users = [cfg.user_prefix + str(table.user_keys[table.user[window[p]]]) for p in positions.tolist()]
        histories = await read_histories(users)
        on_seqs = assemble_sequences(histories, cutoff=online.request_time[positions], vocab=offline.vocab,
                                     spec=offline.spec.sequence)
    out = []
    for k, pos in enumerate(positions.tolist()):
        row = int(window[pos])
        off_tok = _tokens(off_seqs, k, offline.vocab)
        on_tok = _tokens(on_seqs, k, offline.vocab) if on_seqs is not None else None
        first = None
        if on_tok is not None:
            first = next((i for i, (a, b) in enumerate(zip(off_tok, on_tok, strict=False)) if a != b),
                         None if len(off_tok) == len(on_tok) else min(len(off_tok), len(on_tok)))
        out.append({
            "position": pos, "user": str(table.user_keys[table.user[row]]),
            "item": str(table.item_keys[table.item[row]]), "timestamp": float(table.timestamp[row]),
            "request_time": float(online.request_time[pos]), "label": int(table.label[row]),
            "offline_score": float(offline.probs[pos]), "online_score": float(online.probs[pos]),
            "offline_tokens": off_tok, "online_tokens": on_tok, "first_token_difference": first,
        })
    return out


# ------------------------------------------------------------------------------------ the run


async def run_replay(cfg: ReplayConfig, client: httpx.AsyncClient, *, read_histories: HistoryReader | None = None,
                     model_version: str | None = None) -> dict[str, Any]:
    """Replay against the service behind `client`; returns the JSON-ready report."""
    t0 = time.perf_counter()
    table = load_events(cfg.data, source=cfg.source)
    prefix, window = replay_window(table, start_time=cfg.start_time, test_fraction=cfg.test_fraction)
    if cfg.max_users:
        users_in = np.unique(table.user[window])
        if len(users_in) > cfg.max_users:
            keep = np.random.default_rng(cfg.seed).choice(users_in, size=cfg.max_users, replace=False)
            window = window[np.isin(table.user[window], keep)]
    if cfg.max_impressions and len(window) > cfg.max_impressions:
        window = window[: cfg.max_impressions]
    if len(window) == 0:
        raise ValueError("the replay window holds no impression (check --start-time / --test-fraction)")
    # Histories are per user: only the replayed users' earlier events can matter, so only those are loaded.
    prefix = prefix[np.isin(table.user[prefix], np.unique(table.user[window]))]
    if model_version is not None:
        from export.bundle import load_manifest

        expected = load_manifest(cfg.bundle, verify=False).version
        if model_version != expected:
            raise ValueError(f"the service serves model version {model_version} but {cfg.bundle} is {expected}: "
                             "replay needs the bundle the service serves")
    offline = await asyncio.to_thread(offline_scores, table, window, bundle=cfg.bundle, run_dir=cfg.run_dir)
    run_id = uuid.uuid4().hex[:12]
    online = await replay_online(client, table, prefix, window, cfg, run_id=run_id)

    users, labels = table.user[window], table.label[window].astype(np.float32)
    on = summarize(users, labels, online.probs)
    off = summarize(users, labels, offline.probs)
    gap = None if on["auc"] is None or off["auc"] is None else abs(on["auc"] - off["auc"])
    diff = np.abs(online.probs.astype(np.float64) - offline.probs.astype(np.float64))
    n_div = int((~(diff <= cfg.score_tolerance)).sum())
    failed = gap is None or gap > cfg.tolerance
    samples = await diverging_samples(table, window, offline, online, cfg, read_histories=read_histories) \
        if n_div else []
    return {
        "data": str(cfg.data),
        "bundle": str(cfg.bundle),
        "model_version": model_version,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "window": {"start_time": float(table.timestamp[window[0]]), "end_time": float(table.timestamp[window[-1]]),
                   "impressions": len(window), "users": len(np.unique(users)),
                   "positive_rate": float(labels.mean()), "history_events_loaded": online.loaded},
        "online": on,
        "offline": off | {"scorer": "torch (run)" if cfg.run_dir else "onnx (bundle)"},
        "latency": {"score": online.score_latency.summary(), "events": online.event_latency.summary(),
                    "history_load_batches": online.load_event_latency.summary()},
        "p50_ms": online.score_latency.percentile_ms(50.0),
        "p99_ms": online.score_latency.percentile_ms(99.0),
        "throughput": {"history_load_s": online.load_seconds, "replay_s": online.replay_seconds,
                       "impressions_per_s": len(window) / max(online.replay_seconds, 1e-9),
                       "history_events_per_s": online.loaded / max(online.load_seconds, 1e-9),
                       "degraded_retries": online.degraded_retries},
        "skew": {"auc_gap": gap, "tolerance": cfg.tolerance, "failed": failed,
                 "max_abs_score_diff": float(np.nanmax(diff)) if np.isfinite(diff).any() else None,
                 "score_tolerance": cfg.score_tolerance, "diverging_samples": n_div,
                 "first_diverging": samples, "injected": cfg.inject_skew},
        "elapsed_s": time.perf_counter() - t0,
    }


def format_report(report: dict[str, Any]) -> str:
    on, off, skew = report["online"], report["offline"], report["skew"]
    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    lat = report["latency"]["score"]
    w = report["window"]
    lines = [
        f"replayed {w['impressions']:,} impressions of {w['users']:,} users "
        f"(after {w['history_events_loaded']:,} history events) in {report['throughput']['replay_s']:.1f}s",
        "| path    | AUC    | GAUC   | logloss |",
        "|---------|--------|--------|---------|",
        f"| online  | {fmt(on['auc'])} | {fmt(on['gauc'])} | {fmt(on['logloss'])}  |",
        f"| offline | {fmt(off['auc'])} | {fmt(off['gauc'])} | {fmt(off['logloss'])}  |",
        f"/v1/score latency ms: p50={lat['p50_ms']:.2f} p90={lat['p90_ms']:.2f} p99={lat['p99_ms']:.2f} "
        f"max={lat['max_ms']:.2f}",
        f"AUC gap {fmt(skew['auc_gap'])} (tolerance {skew['tolerance']}); max |score diff| "
        f"{skew['max_abs_score_diff'] if skew['max_abs_score_diff'] is not None else 'n/a'}; "
        f"{skew['diverging_samples']} sample(s) differ by more than {skew['score_tolerance']}",
    ]
    if skew["failed"]:
        lines.append("TRAINING/SERVING SKEW: online and offline AUC differ by more than the tolerance")
    if skew["first_diverging"]:
        lines.append("first diverging samples (offline tokens vs online tokens, oldest first):")
        for s in skew["first_diverging"]:
            lines.append(f"- user {s['user']} item {s['item']} t={s['timestamp']:.6g} label={s['label']}: "
                         f"offline {s['offline_score']:.6f} online {s['online_score']:.6f}")
            lines.append(f"    offline ({len(s['offline_tokens'])}): {' '.join(s['offline_tokens'][-8:])}")
            if s["online_tokens"] is None:
                lines.append("    online: not available (give --redis-url and --key-prefix of the service)")
            else:
                lines.append(f"    online  ({len(s['online_tokens'])}): {' '.join(s['online_tokens'][-8:])}")
                lines.append(f"    first token difference at index {s['first_token_difference']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ entry points


async def _model_version(client: httpx.AsyncClient) -> str | None:
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
        r = await client.get("/v1/model")
        if r.status_code == 200:
            version = r.json()["manifest"]["model"]["version"]
            return str(version) if version else None
    return None


@contextlib.contextmanager
def _history_reader(redis_url: str | None, key_prefix: str | None) -> Iterator[Callable[[], Any] | None]:
    """A factory of (store, reader) bound to the running loop, or None without Redis details."""
    if redis_url is None or key_prefix is None:
        yield None
        return

    def make() -> Any:
        from service.history_store import HistoryStore
        from service.redis_client import create_redis

        redis = create_redis(redis_url, connect_timeout_s=2.0, op_timeout_s=5.0, max_connections=4, retries=1)
        return redis, HistoryStore(redis=redis, key_prefix=key_prefix)

    yield make


async def _run_against(cfg: ReplayConfig, url: str, *, redis_url: str | None, key_prefix: str | None,
                       api_key: str | None, timeout_s: float) -> dict[str, Any]:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    headers = {"x-api-key": api_key} if api_key else {}
    limits = httpx.Limits(max_connections=cfg.concurrency * 2, max_keepalive_connections=cfg.concurrency * 2)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits, headers=headers) as client:
        version = await _model_version(client)
        with _history_reader(redis_url, key_prefix) as make:
            if make is None:
                return await run_replay(cfg, client, model_version=version)
            redis, store = make()
            try:
                return await run_replay(cfg, client, read_histories=store.read_many, model_version=version)
            finally:
                await redis.aclose()


def replay_url(cfg: ReplayConfig, url: str, *, redis_url: str | None = None, key_prefix: str | None = None,
               api_key: str | None = None, timeout_s: float = 30.0) -> dict[str, Any]:
    """Replay against a running service. With the service's Redis URL and key prefix, diverging
    samples also show the online tokens."""
    return asyncio.run(_run_against(cfg, url, redis_url=redis_url, key_prefix=key_prefix, api_key=api_key,
                                    timeout_s=timeout_s))


def replay_in_process(cfg: ReplayConfig, *, redis_url: str, key_prefix: str | None = None,
                      keep_keys: bool = False, **settings: Any) -> dict[str, Any]:
    """Start the service in this process (real HTTP on loopback) against a real Redis, replay, stop.

    Histories go under a fresh key prefix (deleted afterwards unless keep_keys), so a replay never
    reads or disturbs anybody else's data.
    """
    from loadtest.harness.live_server import serve_in_thread
    from service.app import create_app
    from service.settings import Settings

    prefix = key_prefix or f"replay-{uuid.uuid4().hex[:10]}"
    # A replay wants every answer scored with its history: give Redis time rather than degrade. Its thousands of
    # requests would each write an access line into the replay's own output: off unless asked.
    settings = {"score_redis_budget_ms": 5000, "redis_timeout_ms": 5000, "access_log": False, **settings}
    app = create_app(Settings(bundle=cfg.bundle, redis_url=redis_url, key_prefix=prefix, **settings))
    try:
        with serve_in_thread(app) as url:
            return replay_url(cfg, url, redis_url=redis_url, key_prefix=prefix)
    finally:
        if not keep_keys:
            delete_prefix(redis_url, prefix)


def delete_prefix(redis_url: str, prefix: str) -> int:
    """Delete every key under `prefix:` (SCAN, never KEYS/FLUSHDB); returns how many."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        n = 0
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                n += int(client.delete(*batch))
                batch.clear()
        if batch:
            n += int(client.delete(*batch))
        return n
    finally:
        client.close()
