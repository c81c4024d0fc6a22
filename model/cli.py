"""`polarity` — one command over every package.

Each package owns its subcommands in its `commands.py` (`register(subparsers)`): `model` has synth, train and
evaluate; `export` has export and experiment (which exports and times every run's bundle); `service` has serve
and ingest; `loadtest` has replay, loadtest, bench, demo, skip-response and served-log. This dispatcher finds
them through the `polarity.commands` entry points in pyproject.toml, so it imports no package above `model`.
Subcommands import their heavy dependencies when they run: `polarity serve` never loads torch or pyarrow.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, entry_points, version
from typing import Any, cast

from model.progress import DEFAULT_INTERVAL_S, configure_progress

COMMAND_GROUP = "polarity.commands"
# What the `train` extra brings (pyproject.toml): a command that needs one on a serving install says so.
TRAIN_EXTRA_MODULES = frozenset({"torch", "pyarrow", "onnx", "onnxscript", "onnx_ir", "matplotlib", "tqdm"})
# Help lists the packages' subcommands bottom layer first.
LAYER_ORDER = ("model", "export", "service", "loadtest")

Handler = Callable[[argparse.Namespace], int]
Register = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


def _version() -> str:
    try:
        return version("polarity")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _registrars() -> list[Register]:
    found = sorted(entry_points(group=COMMAND_GROUP),
                   key=lambda ep: (LAYER_ORDER.index(ep.name) if ep.name in LAYER_ORDER else len(LAYER_ORDER), ep.name))
    if not found:
        raise SystemExit("polarity: no subcommands are registered; install the package (`make setup`, "
                         "or `pip install -e .`) so its `polarity.commands` entry points exist")
    registrars = []
    for ep in found:
        try:
            registrars.append(ep.load())
        except ModuleNotFoundError as exc:
            # A slim install ships only some packages (the serving image has service/, export/ and
            # model/features/): the commands of a package that is not there are simply not offered.
            if exc.name is None or not ep.module.startswith(exc.name):
                raise
            logging.getLogger(__name__).debug("no %s commands: %s is not installed", ep.name, exc.name)
    return registrars


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the option is required, takes no value of its own
    (--help, --version) or its help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (not action.option_strings or action.required or action.default is argparse.SUPPRESS
                or "default" in text.lower()):
            return action.help
        if action.default is None:
            return f"{text} (default: none)".lstrip()
        if isinstance(action.default, bool) and action.nargs == 0 and not isinstance(
                action, argparse.BooleanOptionalAction):
            return f"{text} (default: {'on' if action.default else 'off'})".lstrip()
        return f"{text} (default: %(default)s)".lstrip()


class PolarityParser(argparse.ArgumentParser):
    """One help style for every command, whichever package registered it: subcommand parsers (at any depth)
    are of the class of the parser that made them, so they all show their defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["formatter_class"] = DefaultsHelpFormatter
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = PolarityParser(prog="polarity", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars or progress lines (errors and results still print)")
    parser.add_argument("--progress-every", type=float, default=DEFAULT_INTERVAL_S, metavar="SECONDS",
                        help="when stderr is not a terminal, one progress line per this many seconds "
                             "(on a terminal: a live bar)")
    parser.add_argument("--version", action="version", version=f"polarity {_version()}")
    # The registrars take the plain type; the parsers they add are PolarityParsers all the same.
    sub = cast("argparse._SubParsersAction[argparse.ArgumentParser]",
               parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    for register in _registrars():
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.progress_every <= 0:
        parser.error("--progress-every must be > 0")
    configure_progress(enabled=not args.quiet, interval_s=args.progress_every)
    handler: Handler = args.handler
    try:
        return handler(args)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in TRAIN_EXTRA_MODULES:
            raise
        # A serving install (`pip install polarity`) has no training stack: say which extra brings it.
        print(f"polarity {args.command}: error: {exc.name} is not installed; this command needs "
              f"`pip install 'polarity[train]'`", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as exc:
        # Bad input is the user's to fix (EventLogError, SpecError, BundleError are ValueErrors): say what is
        # wrong, no stack trace.
        print(f"polarity {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
