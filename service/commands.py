"""The `service` package's subcommands: serve and ingest (registered by `model.cli`). Torch-free."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.settings import Settings


def _settings(args: argparse.Namespace, names: Sequence[str]) -> Settings:
    """Settings from POLARITY_* env vars, overridden by the flags given on the command line."""
    from service.settings import Settings

    given = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    return Settings(**given)


def setting_help(text: str, name: str, *, default: str | None = None) -> str:
    """Help for a flag that overrides setting `name`: its env var and the default the setting has."""
    from service.settings import Settings

    if default is None:
        value = Settings.model_fields[name].get_default(call_default_factory=True)
        default = "none" if value is None else str(value)
    return f"{text} (env POLARITY_{name.upper()}; default: {default})"


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from export.bundle import load_manifest
    from service.app import create_app
    from service.errors import StartupError
    from service.http_protocol import guarded_protocol
    from service.inference import choose_providers
    from service.request_context import configure_service_logging
    from service.startup import connection_limits

    settings = _settings(args, ("bundle", "redis_url", "host", "port", "device", "model_dir", "metrics_port",
                                "inference_threads", "log_format"))
    if settings.bundle is None:
        raise ValueError("no model bundle: pass --bundle DIR or set POLARITY_BUNDLE")
    try:
        choose_providers(settings.device)  # a requested GPU that is not there: say so before binding a port
    except StartupError as exc:
        raise ValueError(str(exc)) from None
    load_manifest(settings.bundle)  # BundleError (a ValueError) names the file and the problem
    configure_service_logging(settings)  # text or JSON lines, each with its request id
    limits = connection_limits(settings)  # raises the open-file limit; warns when it is low
    # log_config=None: uvicorn's own loggers propagate to that handler instead of getting uvicorn's; the access
    # line is the service's (service/request_context.py), with the request id. http: uvicorn's httptools protocol
    # with header size, header/body timeouts and a connection limit (service/http_protocol.py says why).
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                access_log=False, lifespan="on", log_config=None, http=guarded_protocol(limits),
                timeout_keep_alive=settings.keep_alive_timeout_s)
    return 0


def _ingest(args: argparse.Namespace) -> int:
    import asyncio
    import os
    import socket

    from service.ingest import run_ingester

    settings = _settings(args, ("redis_url", "metrics_port", "host"))
    consumer = args.consumer or f"{socket.gethostname()}-{os.getpid()}"
    applied = asyncio.run(run_ingester(settings, stream=args.stream, group=args.group, consumer=consumer,
                                       batch_size=args.batch_size, block_ms=args.block_ms,
                                       claim_idle_ms=args.claim_idle_ms, until_idle=args.until_idle))
    print(f"ingested {applied:,} stream entries from {args.stream} (group {args.group}, consumer {consumer})")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add serve and ingest to `polarity`."""
    p = sub.add_parser("serve", help="run the scoring service (HTTP; each flag also POLARITY_<NAME>)")
    p.add_argument("--bundle", type=Path, default=None, help=setting_help("exported bundle directory", "bundle"))
    p.add_argument("--redis-url", default=None, help=setting_help("history store", "redis_url"))
    p.add_argument("--host", default=None, help=setting_help("bind address", "host"))
    p.add_argument("--port", type=int, default=None, help=setting_help("HTTP port", "port"))
    p.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"),
                   help=setting_help("auto: CUDA when available else CPU; cuda: fail unless CUDA runs the "
                                      "model", "device"))
    p.add_argument("--model-dir", type=Path, default=None,
                   help=setting_help("bundles for /v1/admin/reload must lie under it", "model_dir",
                                      default="the bundle's parent"))
    p.add_argument("--metrics-port", type=int, default=None,
                   help=setting_help("serve /metrics on this port instead", "metrics_port",
                                      default="none: on the API port"))
    p.add_argument("--inference-threads", type=int, default=None,
                   help=setting_help("ONNX Runtime intra-op threads (0 = cores / workers)",
                                      "inference_threads"))
    p.add_argument("--log-format", default=None, choices=("text", "json"),
                   help=setting_help("log lines, each with its request id", "log_format"))
    p.set_defaults(handler=_serve)

    p = sub.add_parser("ingest", help="apply events from a Redis stream (consumer group) to the histories")
    p.add_argument("--redis-url", default=None,
                   help=setting_help("Redis holding the stream and the histories", "redis_url"))
    p.add_argument("--stream", required=True, help="Redis stream to read, e.g. polarity:events")
    p.add_argument("--group", required=True, help="consumer group (created when missing)")
    p.add_argument("--consumer", default=None, help="consumer name (default: host-pid)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help=setting_help("expose Prometheus metrics on this port", "metrics_port",
                                      default="none: no metrics"))
    p.add_argument("--host", default=None, help=setting_help("bind address of the metrics port", "host"))
    # 500: a stream drained ~10% faster than with 256 (1000: no faster again).
    p.add_argument("--batch-size", type=int, default=500, help="entries per XREADGROUP")
    p.add_argument("--block-ms", type=int, default=1000, help="XREADGROUP BLOCK")
    p.add_argument("--claim-idle-ms", type=int, default=30_000, help="claim others' entries pending this long")
    p.add_argument("--until-idle", action="store_true", help="exit once the group has nothing left to read")
    p.set_defaults(handler=_ingest)
