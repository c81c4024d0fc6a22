"""The `loadtest` package's subcommands: replay, loadtest, bench, demo, skip-response and served-log (registered
by `model.cli`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from model.data import SOURCES
from service.commands import setting_help


def _replay(args: argparse.Namespace) -> int:
    import uuid

    from loadtest.replay import ReplayConfig, format_report, replay_in_process, replay_url

    if (args.url is None) == (args.redis_url is None):
        raise ValueError("give either --url (a running service) or --redis-url (start the service in-process)")
    user_prefix = args.user_prefix
    if user_prefix is None:  # against a shared service, keep this replay's users apart from everybody's
        user_prefix = "" if args.url is None else f"replay-{uuid.uuid4().hex[:10]}/"
    cfg = ReplayConfig(data=Path(args.data), bundle=args.bundle, source=args.source, start_time=args.start_time,
                       test_fraction=args.test_fraction, run_dir=args.run_dir, concurrency=args.concurrency,
                       user_prefix=user_prefix, tolerance=args.tolerance, max_impressions=args.max_impressions,
                       max_users=args.max_users)
    if args.url is not None:
        report = replay_url(cfg, args.url, redis_url=args.service_redis_url, key_prefix=args.key_prefix,
                            api_key=args.api_key)
    else:
        report = replay_in_process(cfg, redis_url=args.redis_url)
    print(format_report(report))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"report written to {args.out}")
    return 1 if report["skew"]["failed"] else 0


def _loadtest(args: argparse.Namespace) -> int:
    from loadtest.open_loop import LoadConfig, format_report, run_load_sync

    cfg = LoadConfig(url=args.url, rate=args.rate, duration_s=args.duration, candidates=args.candidates,
                     users=args.users, events_mix=args.events_mix, events_per_post=args.events_per_post,
                     items=args.items, warm_history=args.warm_history, max_connections=args.connections,
                     timeout_s=args.timeout, metrics_url=args.metrics_url, api_key=args.api_key, seed=args.seed)
    report = run_load_sync(cfg)
    print(format_report(report))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"report written to {args.out}")
    failed = load_failure(report, max_error_share=args.max_error_share)
    if failed:
        print(f"polarity loadtest: {failed}", file=sys.stderr)
        return 1
    return 0


def load_failure(report: dict[str, object], *, max_error_share: float) -> str | None:
    """Why a load test failed (every request failed, or more than `max_error_share` of them), else None."""
    ok, errors = int(str(report["completed_ok"])), int(str(report["error_count"]))
    if ok + errors == 0:
        return "no request was sent"
    if ok == 0:
        return f"every request failed ({errors:,}: {report['errors']})"
    share = errors / (ok + errors)
    if share > max_error_share:
        return (f"{share:.1%} of requests failed ({errors:,} of {ok + errors:,}), "
                f"over --max-error-share {max_error_share}")
    return None


def _bench(args: argparse.Namespace) -> int:
    from loadtest.bench.registry import BENCHES, run_bench

    return run_bench(out=Path(args.out), only=args.only.split(",") if args.only else list(BENCHES))


def _demo(args: argparse.Namespace) -> int:
    from loadtest.demo import run_demo

    return run_demo(out=Path(args.out), events=args.events, seed=args.seed, force=args.force)


def _skip_response(args: argparse.Namespace) -> int:
    from loadtest.skip_response import (
        SkipResponseConfig,
        bar_met,
        format_example,
        format_report,
        measure_in_process,
        measure_url,
    )
    from model.data.loaders import load_events

    if args.out is not None and args.out.exists() and not args.force:
        raise ValueError(f"{args.out} exists; pass --force to overwrite it or --out another file")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one log line per request would drown the table
    table = load_events(args.data, source=args.source)
    cfg = SkipResponseConfig(users=args.users, k=args.k, candidates=args.candidates, seed=args.seed,
                             user_prefix=args.user_prefix or "")
    if args.url is not None:
        report = measure_url(table, args.url, cfg, api_key=args.api_key)
    else:
        if args.bundle is None:
            raise ValueError("give --bundle (served in-process) or --url (a running service)")
        report = measure_in_process(table, args.bundle, cfg, redis_url=args.redis_url)
    print(format_report(report))
    print(format_example(report))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"report written to {args.out}")
    return 0 if bar_met(report) or not args.require_bar else 1


def _served_log_export(args: argparse.Namespace) -> int:
    import asyncio

    from loadtest.served_log_export import export_training_log
    from service.settings import Settings
    from service.startup import open_store

    if args.out.exists() and not args.force:
        raise ValueError(f"{args.out} exists; pass --force to overwrite it or --out another file")
    settings = Settings(**{name: getattr(args, name) for name in ("redis_url", "key_prefix", "served_log_stream")
                           if getattr(args, name) is not None})

    async def run() -> dict[str, int]:
        store = open_store(settings)
        try:
            return await export_training_log(store, stream=settings.served_log_stream, out=args.out)
        finally:
            await store.redis.aclose()

    counts = asyncio.run(run())
    print(f"wrote {counts['rows']:,} rows ({counts['labelled']:,} labelled by a later click or skip) from "
          f"{counts['calls']:,} served calls of {settings.served_log_stream} to {args.out}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add replay, loadtest, bench, demo, skip-response and served-log to `polarity`."""
    p = sub.add_parser("replay", help="replay a log through the service: online vs offline AUC (skew check)")
    p.add_argument("--data", required=True, help="event log (.csv/.parquet) or a KuaiRec/KuaiRand directory")
    p.add_argument("--source", default="auto", choices=SOURCES, help="how to read --data")
    p.add_argument("--bundle", required=True, type=Path,
                   help="the bundle the service serves (also scored offline by the trainer's path)")
    p.add_argument("--url", default=None, help="a running service, e.g. http://127.0.0.1:8000")
    p.add_argument("--redis-url", default=None, help="start the service in-process against this Redis instead")
    p.add_argument("--start-time", type=float, default=None, help="replay events at or after this timestamp")
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="else replay the last share of events (the trainer's temporal test split)")
    p.add_argument("--run-dir", type=Path, default=None, help="score offline with this run's torch model")
    p.add_argument("--concurrency", type=int, default=8, help="users replayed in parallel")
    p.add_argument("--max-impressions", type=int, default=0, help="replay only the first K impressions (0 = all)")
    p.add_argument("--max-users", type=int, default=0, help="replay only this many users, drawn at random (0 = all)")
    p.add_argument("--user-prefix", default=None,
                   help="prepended to user ids sent (default: a fresh one with --url, none in-process)")
    p.add_argument("--tolerance", type=float, default=1e-3, help="max |online AUC - offline AUC|")
    p.add_argument("--service-redis-url", default=None,
                   help="with --url: the service's Redis, to show online tokens of diverging samples")
    p.add_argument("--key-prefix", default=None, help="with --service-redis-url: the service's key prefix")
    p.add_argument("--api-key", default=None, help="X-API-Key for /v1/events when the service requires one")
    p.add_argument("--out", type=Path, default=None, help="JSON report")
    p.set_defaults(handler=_replay)

    p = sub.add_parser("loadtest", help="open-loop (Poisson) load test of /v1/score, with an optional events mix")
    p.add_argument("--url", required=True, help="service base URL")
    p.add_argument("--rate", type=float, required=True, help="mean arrivals per second")
    p.add_argument("--duration", type=float, required=True, help="seconds of arrivals")
    p.add_argument("--candidates", type=int, default=500, help="N candidates per /v1/score request")
    p.add_argument("--users", type=int, default=1000, help="user pool size")
    p.add_argument("--events-mix", type=float, default=0.0, help="share of arrivals posting /v1/events instead")
    p.add_argument("--events-per-post", type=int, default=10, help="events in each /v1/events request")
    p.add_argument("--items", type=int, default=20_000, help="candidate item ids drawn from 0..items-1")
    p.add_argument("--warm-history", type=int, default=0, help="events per user posted before the clock starts")
    p.add_argument("--connections", type=int, default=64, help="HTTP connection pool bound")
    p.add_argument("--timeout", type=float, default=10.0, help="per-request timeout (s)")
    p.add_argument("--metrics-url", default=None, help="Prometheus endpoint (default: URL/metrics)")
    p.add_argument("--api-key", default=None, help="X-API-Key for /v1/events when the service requires one")
    p.add_argument("--seed", type=int, default=0, help="random seed of arrivals, users and candidates")
    p.add_argument("--out", type=Path, default=None, help="JSON report")
    p.add_argument("--max-error-share", type=float, default=0.01,
                   help="exit 1 when more than this share of requests failed (and whenever every request failed)")
    p.set_defaults(handler=_loadtest)

    p = sub.add_parser("bench", help="measure and rewrite the matching sections of BENCHMARKS.md")
    p.add_argument("--out", default="BENCHMARKS.md", help="markdown file whose sections are rewritten")
    p.add_argument("--only", default="", help="comma-separated bench names (default: all)")
    p.set_defaults(handler=_bench)

    p = sub.add_parser("demo", help="the main job end to end on synthetic data")
    p.add_argument("--out", default="runs/demo", help="folder for the log, run, bundle and reports")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty --out (replaces the demo's own files there, deletes nothing else)")
    p.add_argument("--events", type=int, default=300_000, help="impressions in the synthetic log")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.set_defaults(handler=_demo)

    p = sub.add_parser("skip-response", help="does the served model answer k recent skips (and clicks) of a "
                                             "category? measured through the live service")
    p.add_argument("--data", required=True, help="event log with categories (the users, items and histories)")
    p.add_argument("--source", default="auto", choices=SOURCES, help="how to read --data")
    p.add_argument("--bundle", type=Path, default=None, help="serve this bundle in-process (real HTTP on loopback)")
    p.add_argument("--redis-url", default=None,
                   help="with --bundle: the Redis to use (under a fresh key prefix, deleted afterwards); default: a "
                        "private redis-server")
    p.add_argument("--url", default=None, help="measure a running service instead (its users get --user-prefix)")
    p.add_argument("--api-key", default=None, help="X-API-Key for /v1/events when the service requires one")
    p.add_argument("--users", type=int, default=100, help="users measured")
    p.add_argument("--k", type=int, default=5, help="skips (or clicks) posted per user")
    p.add_argument("--candidates", type=int, default=10, help="candidates of the category and of other categories")
    p.add_argument("--seed", type=int, default=0, help="which users, candidates and posted items")
    p.add_argument("--user-prefix", default=None, help="prepended to user ids sent (default: a fresh one)")
    p.add_argument("--out", type=Path, default=None, help="JSON report")
    p.add_argument("--force", action="store_true", help="overwrite --out when it exists")
    p.add_argument("--require-bar", action="store_true",
                   help="exit 1 unless the bar is met (>= 80%% of users on the expected side in both conditions)")
    p.set_defaults(handler=_skip_response)

    p = sub.add_parser("served-log", help="the served-feature log (POLARITY_SERVED_LOG_SHARE of /v1/score calls)")
    log_commands = p.add_subparsers(dest="served_log_command", required=True, metavar="ACTION")
    p = log_commands.add_parser("export", help="join the served features with later click/skip events into a "
                                               "Parquet training log (one row per served candidate)")
    p.add_argument("--redis-url", default=None, help=setting_help("Redis holding the stream and the histories",
                                                                   "redis_url"))
    p.add_argument("--key-prefix", default=None, help=setting_help("the service's history key prefix", "key_prefix"))
    p.add_argument("--served-log-stream", default=None, help=setting_help("the served-feature stream",
                                                                           "served_log_stream"))
    p.add_argument("--out", type=Path, required=True, help="Parquet file to write")
    p.add_argument("--force", action="store_true", help="overwrite --out when it exists")
    p.set_defaults(handler=_served_log_export)
