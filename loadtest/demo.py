"""`polarity demo`: the main job end to end on synthetic data.

synth -> train (OneTrans, mixed-polarity sequence with TAPF) -> evaluate -> export (ONNX bundle,
parity-checked) -> serve (`polarity serve` in a subprocess, torch-free, on a free loopback port) ->
ingest (the log's events through `POST /v1/events`) -> score (skip response: 100 users' same-category
candidates against others, before and after 5 skips, and 5 clicks) -> replay -> where the metrics are.

Redis: POLARITY_REDIS_URL when it answers, else a private `redis-server` on a free port (the one on PATH,
else the embedded one: `loadtest.harness.redis_server.find_redis`); the demo says which.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.harness.live_server import stop_process, wait_ready
from loadtest.harness.redis_server import RedisProcess, free_port
from loadtest.replay import event_payload
from model.data.events import EventTable, read_event_log, write_event_log
from model.data.synthetic import SyntheticWorldConfig, generate
from model.training.config import TrainConfig
from model.training.evaluate import evaluate_run
from model.training.loop import train
from model.training.metrics import print_metrics_table

ROOT = Path(__file__).resolve().parents[1]
STEPS = 9


class DemoOutputNotEmpty(ValueError):
    """--out holds files and --force was not given: the demo would overwrite them."""


def run_demo(*, out: Path, events: int, seed: int, max_train_samples: int = 100_000,
             serve: bool = True, ingest_batch: int = 1000, ingest_limit: int = 60_000, force: bool = False) -> int:
    """ingest_limit: post only the most recent events of the log (the ones the scored requests see).

    A non-empty `out` is refused unless `force`: the demo writes events.parquet, run/, bundle/ and its reports
    there, over whatever has those names (it deletes nothing else)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise DemoOutputNotEmpty(f"{out} is not an empty folder; pass --force to write the demo's files into it "
                                 "(events.parquet, run/, bundle/, the reports are replaced), or --out another folder")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log_path = write_event_log(generate(SyntheticWorldConfig(users=max(events // 100, 100), items=5_000,
                                                             events=events, seed=seed)), out / "events.parquet")
    print(f"[1/{STEPS}] synth: {events:,} events -> {log_path} ({time.perf_counter() - t0:.1f}s)")

    run_dir = out / "run"
    # A demo-sized model (L=20, d=32, small batches) learns in seconds on 2 cores; the paper's shape
    # (L=100, d=64, batch 2048) is `polarity train`'s default.
    cfg = TrainConfig(data=str(log_path), arch="onetrans", seq="mix-tapf", seed=seed, seq_len=20, d_model=32,
                      batch_size=256, lr=2e-3, max_train_samples=max_train_samples)
    metrics = train(cfg, out=run_dir)
    print(f"[2/{STEPS}] train: OneTrans + TAPF on {metrics['train']['samples']:,} samples "
          f"({metrics['train']['samples_per_s']:,.0f} samples/s) -> {run_dir}")

    evaluated = evaluate_run(run_dir)
    print(f"[3/{STEPS}] evaluate (reloaded from the checkpoint alone):")
    print_metrics_table({part: evaluated[part] for part in ("valid", "test") if part in evaluated})
    (out / "demo_metrics.json").write_text(json.dumps(evaluated, indent=2))

    from export.pipeline import export_bundle

    t0 = time.perf_counter()
    bundle = export_bundle(run_dir, out / "bundle", check=True, name="demo", overwrite=True)  # the demo owns --out
    print(f"[4/{STEPS}] export: ONNX bundle, parity-checked against torch -> {bundle} "
          f"({time.perf_counter() - t0:.1f}s)")
    if not serve:
        return 0
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one log line per request would drown the output
    with redis_for_demo(out) as (redis_url, redis_origin), serving(bundle, redis_url, out) as base:
        print(f"[5/{STEPS}] serve: polarity serve on {base} (Redis {redis_url}: {redis_origin})")
        table = read_event_log(log_path)
        ingest_log(base, table, batch=ingest_batch, limit=ingest_limit)
        skip_response_step(base, table, seed=seed, out=out)
        # [8/9] replay: the held-out part of the log through the live service (/v1/events + /v1/score with
        # request_time), against the trainer's offline evaluation of the same bundle (loadtest/replay.py).
        import uuid

        from loadtest.replay import ReplayConfig, format_report, replay_url

        t_replay = time.perf_counter()
        replay = replay_url(ReplayConfig(data=log_path, bundle=bundle, max_users=100, seed=seed,
                                         user_prefix=f"replay-{uuid.uuid4().hex[:8]}/"), base,
                            api_key=os.environ.get("POLARITY_API_KEY"))
        (out / "replay.json").write_text(json.dumps(replay, indent=2))
        print(f"[8/{STEPS}] replay: test-window impressions of 100 users, online vs offline "
              f"({time.perf_counter() - t_replay:.1f}s) -> {out / 'replay.json'}")
        print("\n".join("    " + line for line in format_report(replay).splitlines()))
        skew = bool(replay["skew"]["failed"])
        if not skew:
            print(f"[9/{STEPS}] metrics: {base}/metrics  (readiness {base}/readyz, API docs {base}/docs)")
            text = _get(f"{base}/metrics")
            for line in text.splitlines():
                if line.startswith(("polarity_events_total{", "polarity_http_requests_total{", "polarity_model_info{")):
                    print("   ", line)
    # The URLs above belonged to the demo's own server, which has stopped with it.
    print(f"demo: its server on {base} has stopped; serve the bundle again with\n"
          f"    polarity serve --bundle {bundle} --redis-url URL   (API docs then at http://127.0.0.1:8000/docs)")
    if skew:
        print("demo: the replay found training/serving skew (see above)", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------- plumbing


def _redis_answers(url: str) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        ok = bool(client.ping())
        client.close()
        return ok
    except (redis.RedisError, OSError, ValueError):
        return False


@contextmanager
def redis_for_demo(out: Path) -> Iterator[tuple[str, str]]:
    """(URL, where it comes from): POLARITY_REDIS_URL when it answers, else a private redis-server (no
    persistence) for the demo, the one on PATH or the embedded one."""
    given = os.environ.get("POLARITY_REDIS_URL")
    if given and _redis_answers(given):
        yield given, "POLARITY_REDIS_URL"
        return
    server = RedisProcess().start()
    try:
        yield server.url, "private " + server.binaries.describe()
    finally:
        server.close()


@contextmanager
def serving(bundle: Path, redis_url: str, out: Path) -> Iterator[str]:
    """`polarity serve` as its own (torch-free) process; yields its base URL once /readyz answers 200."""

    port = free_port()
    env = {**os.environ, "POLARITY_KEY_PREFIX": f"demo-{port}",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    log_file = (out / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "model.cli", "serve", "--bundle", str(bundle), "--redis-url",
                             redis_url, "--port", str(port)], cwd=ROOT, env=env, stdout=log_file,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc, log_path=out / "serve.log", timeout_s=120)
        yield base
    finally:
        stop_process(proc, timeout_s=30)
        log_file.close()
        _delete_prefix(redis_url, f"demo-{port}")


def _delete_prefix(url: str, prefix: str) -> None:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=5)
        for batch in _chunks(list(client.scan_iter(match=f"{prefix}:*", count=1000)), 1000):
            client.delete(*batch)
        client.close()
    except redis.RedisError:
        pass


def _chunks(items: list[Any], n: int) -> Iterator[list[Any]]:
    for lo in range(0, len(items), n):
        yield items[lo:lo + n]


def _get(url: str) -> str:
    import httpx

    return httpx.get(url, timeout=10).text


def ingest_log(base: str, table: EventTable, *, batch: int, limit: int) -> None:
    """The log's `limit` most recent events, in file order, through POST /v1/events (label + event +
    category, one event_id per row)."""
    import httpx

    recent = np.argsort(-table.timestamp, kind="stable")[:limit]
    order = recent[np.argsort(table.source_row[recent], kind="stable")]
    t0 = time.perf_counter()
    accepted = duplicates = rejected = 0
    with httpx.Client(base_url=base, timeout=60) as client:
        for lo in range(0, len(order), batch):
            body = {"events": [event_payload(table, int(k)) for k in order[lo:lo + batch]]}
            r = client.post("/v1/events", json=body)
            r.raise_for_status()
            res = r.json()
            accepted, duplicates, rejected = (accepted + res["accepted"], duplicates + res["duplicates"],
                                              rejected + res["rejected"])
    elapsed = time.perf_counter() - t0
    print(f"[6/{STEPS}] ingest: the {len(order):,} most recent of {len(table):,} events via POST /v1/events "
          f"in batches of {batch} -> "
          f"{accepted:,} accepted, {duplicates:,} duplicates, {rejected:,} rejected "
          f"({len(order) / elapsed:,.0f} events/s)")


def skip_response_step(base: str, table: EventTable, *, seed: int, out: Path) -> None:
    """The product's promise through the live service: 100 users' histories, then 5 skips (on a fresh state: 5
    clicks) of unseen items of the category of each user's last click; same-category candidates against others
    (`loadtest.skip_response`). Prints the table, one user's before/after rows and an explanation."""
    import httpx

    from loadtest.skip_response import SkipResponseConfig, format_example, format_report, measure_url

    t0 = time.perf_counter()
    cfg = SkipResponseConfig(users=100, k=5, seed=seed)
    report = measure_url(table, base, cfg)
    (out / "skip_response.json").write_text(json.dumps(report, indent=2))
    print(f"[7/{STEPS}] score: skip response of {report['conditions']['skip']['users']} users, before and after "
          f"{cfg.k} recent skips (or clicks) of their last click's category (model {report['model_version']}, "
          f"{time.perf_counter() - t0:.1f}s) -> {out / 'skip_response.json'}")
    print("\n".join("    " + line for line in format_report(report).splitlines()))
    print("\n".join("    " + line for line in format_example(report, per_group=4).splitlines()))
    ex = report["example"]
    user_id = f"{report['config']['user_prefix']}skip/{ex['user']}"
    body = {"user_id": user_id, "candidates": [{"item_id": ex["items"][0], "category": ex["category"]}],
            "request_time": ex["request_time"], "explain": True}
    r = httpx.post(f"{base}/v1/score", json=body, timeout=30)
    r.raise_for_status()
    explained = r.json()["explanations"][0]
    item = ex["items"][0]
    if explained["method"] == "attention" and explained["positive_share"] is not None:
        print(f"    explain {item} after the skips: attention {explained['positive_share']:.0%} on positive, "
              f"{explained['negative_share']:.0%} on negative history tokens")
    elif explained.get("note"):
        print(f"    explain {item}: {explained['note']}")
    tokens = ", ".join(f"{t['item_id']}({t['polarity'][:3]})" for t in explained["top_history"])
    print(f"    explain {item}: top history ({explained['method']}): {tokens}")
