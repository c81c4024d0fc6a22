"""`polarity` — one command, one subcommand per job.

Subcommands import their heavy dependencies lazily: `polarity serve` must never load torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from model.data.events import EventLogError
from model.feature_spec import SpecError
from model.metrics import print_metrics_table


def _cmd_synth(args: argparse.Namespace) -> int:
    from model.data.events import write_event_log
    from model.data.synthetic import SyntheticWorldConfig, generate

    cfg = SyntheticWorldConfig(users=args.users, items=args.items, events=args.events, seed=args.seed,
                               positive_rate=args.positive_rate, categories=args.categories,
                               mean_stretch=args.mean_stretch)
    t0 = time.perf_counter()
    columns = generate(cfg)
    path = write_event_log(columns, args.out)
    elapsed = time.perf_counter() - t0
    rate = float(columns["label"].mean())
    print(f"wrote {len(columns['label']):,} events ({rate:.1%} positive) to {path} in {elapsed:.1f}s")
    return 0


def _train_config(args: argparse.Namespace) -> object:
    from model.train import TrainConfig

    overrides = json.loads(args.model_overrides) if args.model_overrides else {}
    return TrainConfig(
        data=str(args.data), source=args.source, arch=args.arch, seq=args.seq, seq_mode=args.seq_mode,
        seq_len=args.seq_len, pos_ratio=args.pos_ratio, fill_budget=args.fill_budget, split=args.split,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, d_model=args.d_model, seed=args.seed,
        threads=args.threads, max_train_samples=args.max_train_samples, model_overrides=overrides,
        stream_chunk_rows=args.stream_chunk_rows,
    )


def _cmd_train(args: argparse.Namespace) -> int:
    from model.train import train

    metrics = train(_train_config(args), out=args.out, resume=True if args.resume else None)  # type: ignore[arg-type]
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports for everyone
        print_metrics_table(metrics)
        print(f"run written to {args.out}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from model.train import evaluate_run

    metrics = evaluate_run(args.run_dir, data=args.data, source=args.source)
    print_metrics_table(metrics)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from export.onnx_export import export_bundle

    out = export_bundle(args.run_dir, args.out, optimize=args.optimize, check=args.check, tol=args.tol,
                        name=args.name, version=args.model_version, fuse_pooling=args.fuse_pooling)
    print(f"bundle written to {out}" + (" (parity checked)" if args.check else ""))
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    from model.experiments import run_experiment

    path = run_experiment(args.name, data=args.data, out=Path(args.out), seeds=args.seeds,
                          archs=args.archs.split(","), train_overrides=json.loads(args.train_overrides or "{}"),
                          jobs=args.jobs)
    print(path.read_text())
    print(f"tables and plots in {args.out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from model.demo import run_demo

    return run_demo(out=Path(args.out), events=args.events, seed=args.seed)


def _cmd_bench(args: argparse.Namespace) -> int:
    from model.bench import BENCHES, run_bench

    return run_bench(out=Path(args.out), only=args.only.split(",") if args.only else list(BENCHES))


def _service_settings(args: argparse.Namespace, names: Sequence[str]) -> object:
    """Settings from POLARITY_* env vars, overridden by the flags given on the command line."""
    from service.settings import Settings

    given = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    return Settings(**given)


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from export.bundle import load_manifest
    from service.app import create_app
    from service.errors import StartupError
    from service.inference import choose_providers
    from service.settings import Settings

    settings = _service_settings(args, ("bundle", "redis_url", "host", "port", "device", "model_dir",
                                        "metrics_port", "inference_threads"))
    assert isinstance(settings, Settings)
    if settings.bundle is None:
        raise ValueError("no model bundle: pass --bundle DIR or set POLARITY_BUNDLE")
    try:
        choose_providers(settings.device)  # a requested GPU that is not there: say so before binding a port
    except StartupError as exc:
        raise ValueError(str(exc)) from None
    load_manifest(settings.bundle)  # BundleError (a ValueError) names the file and the problem
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                access_log=False, lifespan="on")
    return 0


def _cmd_ingest(args: argparse.Namespace) -> int:
    import asyncio
    import socket

    from service.ingest import run_ingester

    settings = _service_settings(args, ("redis_url", "metrics_port", "host"))
    consumer = args.consumer or f"{socket.gethostname()}-{os.getpid()}"
    applied = asyncio.run(run_ingester(settings, stream=args.stream, group=args.group, consumer=consumer,
                                       batch_size=args.batch_size, block_ms=args.block_ms,
                                       claim_idle_ms=args.claim_idle_ms, until_idle=args.until_idle))
    print(f"ingested {applied:,} stream entries from {args.stream} (group {args.group}, consumer {consumer})")
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
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


def _cmd_loadtest(args: argparse.Namespace) -> int:
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
    return 0


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="event log (.csv/.parquet) or a KuaiRec/KuaiRand directory")
    p.add_argument("--source", default="auto", choices=("auto", "generic", "kuairec", "kuairand"))
    p.add_argument("--arch", default="onetrans", help="din | transformer | onetrans | dual_stream")
    p.add_argument("--seq", default="mix-tapf", choices=("pos", "mix-pbe", "mix-tapf", "pos-tapf"))
    p.add_argument("--seq-mode", default=None,
                   choices=("grouped", "random_history", "random_polarity", "random_universe"),
                   help="data-side ablation of the mixed sequence")
    p.add_argument("--seq-len", type=int, default=100, help="L, tokens per sequence")
    p.add_argument("--pos-ratio", type=float, default=0.5, help="r, share of positive slots")
    p.add_argument("--fill-budget", action="store_true", help="let one polarity use the other's empty slots")
    p.add_argument("--split", default="temporal", choices=("temporal", "user"))
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    p.add_argument("--max-train-samples", type=int, default=0, help="cap on training samples (0 = all)")
    p.add_argument("--stream-chunk-rows", type=int, default=0,
                   help="stream a Parquet log sorted by user in chunks of about N rows (bounded memory for "
                        "100M-event logs; temporal split); 0 = load it in memory")
    p.add_argument("--model-overrides", default="", help='JSON of extra model config, e.g. \'{"n_layers": 3}\'')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polarity", description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands: dict[str, Callable[[argparse.Namespace], int]] = {}

    p = sub.add_parser("synth", help="write a synthetic event log where skips carry information")
    p.add_argument("--out", required=True, type=Path, help="output .csv or .parquet")
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--categories", type=int, default=50)
    p.add_argument("--positive-rate", type=float, default=0.15)
    p.add_argument("--mean-stretch", type=float, default=20.0,
                   help="mean exposures an interest stays active (shorter: positives go stale sooner)")
    p.add_argument("--seed", type=int, default=0)
    commands["synth"] = _cmd_synth

    p = sub.add_parser("train", help="train a CTR model on an event log")
    _add_train_args(p)
    p.add_argument("--out", required=True, type=Path, help="run directory")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt (model, optimizer, epoch); under torchrun a restarted "
                        "worker resumes by itself")
    commands["train"] = _cmd_train

    p = sub.add_parser("evaluate", help="evaluate a trained run (on its own data or another log)")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--data", default=None, help="another log to evaluate on (default: the run's test part)")
    p.add_argument("--source", default="auto")
    commands["evaluate"] = _cmd_evaluate

    p = sub.add_parser("export", help="export a trained run to an ONNX bundle (model.onnx + manifest.json)")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", required=True, type=Path, help="bundle directory")
    p.add_argument("--optimize", action="store_true", help="also save an ONNX Runtime-optimised model.opt.onnx")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="refuse the bundle unless ONNX Runtime matches torch within --tol (default: on)")
    p.add_argument("--tol", type=float, default=1e-5, help="max abs probability difference for --check")
    p.add_argument("--name", default=None, help="model name in the manifest (default: run directory name)")
    p.add_argument("--model-version", default=None, help="model version in the manifest (default: sha256 prefix)")
    p.add_argument("--fuse-pooling", action="store_true",
                   help="export each TAPF gate fused with the attention that pools it, one TAPFGateDotPool / "
                        "TAPFGateMLPPool node, instead of the plain TAPFGate node (same outputs)")
    commands["export"] = _cmd_export

    p = sub.add_parser("experiment", help="paper experiments: rq1, length, ratio, ablation")
    p.add_argument("name", choices=("rq1", "length", "ratio", "ablation"))
    p.add_argument("--data", required=True)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--archs", default="din,transformer,onetrans")
    p.add_argument("--train-overrides", default="", help="JSON of TrainConfig fields for every run")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once in worker processes (give each a thread budget via --train-overrides)")
    p.add_argument("--out", required=True)
    commands["experiment"] = _cmd_experiment

    p = sub.add_parser("demo", help="the main job end to end on synthetic data")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--events", type=int, default=300_000)
    p.add_argument("--seed", type=int, default=0)
    commands["demo"] = _cmd_demo

    p = sub.add_parser("bench", help="measure and rewrite the matching sections of BENCHMARKS.md")
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("--only", default="", help="comma-separated bench names (default: all)")
    commands["bench"] = _cmd_bench

    p = sub.add_parser("serve", help="run the scoring service (HTTP; each flag also POLARITY_<NAME>)")
    p.add_argument("--bundle", type=Path, default=None, help="exported bundle directory (POLARITY_BUNDLE)")
    p.add_argument("--redis-url", default=None, help="history store, e.g. redis://127.0.0.1:6379/0")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    p.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"),
                   help="auto: CUDA when available else CPU; cuda: fail unless CUDA runs the model")
    p.add_argument("--model-dir", type=Path, default=None, help="bundles for /v1/admin/reload must lie under it")
    p.add_argument("--metrics-port", type=int, default=None, help="serve /metrics on this port instead")
    p.add_argument("--inference-threads", type=int, default=None, help="ONNX Runtime intra-op threads (0 = cores)")
    commands["serve"] = _cmd_serve

    p = sub.add_parser("ingest", help="apply events from a Redis stream (consumer group) to the histories")
    p.add_argument("--redis-url", default=None, help="Redis holding the stream and the histories")
    p.add_argument("--stream", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--consumer", default=None, help="consumer name (default: host-pid)")
    p.add_argument("--metrics-port", type=int, default=None, help="expose Prometheus metrics on this port")
    p.add_argument("--host", default=None, help="bind address of the metrics port (default 127.0.0.1)")
    # 500: a stream drained ~10% faster than with 256 (1000: no faster again).
    p.add_argument("--batch-size", type=int, default=500, help="entries per XREADGROUP")
    p.add_argument("--block-ms", type=int, default=1000, help="XREADGROUP BLOCK")
    p.add_argument("--claim-idle-ms", type=int, default=30_000, help="claim others' entries pending this long")
    p.add_argument("--until-idle", action="store_true", help="exit once the group has nothing left to read")
    commands["ingest"] = _cmd_ingest

    p = sub.add_parser("replay", help="replay a log through the service: online vs offline AUC (skew check)")
    p.add_argument("--data", required=True, help="event log (.csv/.parquet) or a KuaiRec/KuaiRand directory")
    p.add_argument("--source", default="auto")
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
    commands["replay"] = _cmd_replay

    p = sub.add_parser("loadtest", help="open-loop (Poisson) load test of /v1/score, with an optional events mix")
    p.add_argument("--url", required=True, help="service base URL")
    p.add_argument("--rate", type=float, required=True, help="mean arrivals per second")
    p.add_argument("--duration", type=float, required=True, help="seconds of arrivals")
    p.add_argument("--candidates", type=int, default=500, help="N candidates per /v1/score request")
    p.add_argument("--users", type=int, default=1000, help="user pool size")
    p.add_argument("--events-mix", type=float, default=0.0, help="share of arrivals posting /v1/events instead")
    p.add_argument("--events-per-post", type=int, default=10)
    p.add_argument("--items", type=int, default=20_000, help="candidate item ids drawn from 0..items-1")
    p.add_argument("--warm-history", type=int, default=0, help="events per user posted before the clock starts")
    p.add_argument("--connections", type=int, default=64, help="HTTP connection pool bound")
    p.add_argument("--timeout", type=float, default=10.0, help="per-request timeout (s)")
    p.add_argument("--metrics-url", default=None, help="Prometheus endpoint (default: URL/metrics)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON report")
    commands["loadtest"] = _cmd_loadtest

    parser.set_defaults(_commands=commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args._commands[args.command](args)
    except (EventLogError, SpecError, ValueError, FileNotFoundError) as exc:
        # Bad input is the user's to fix: say what is wrong, no stack trace.
        print(f"polarity {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
