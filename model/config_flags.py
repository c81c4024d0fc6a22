"""Command-line flags read from a config dataclass, so a flag's name, type, default and choices have one
source: the dataclass field (`config_field` adds the help text and choices).

    @dataclass(frozen=True, kw_only=True)
    class TrainConfig:
        lr: float = config_field(1e-3, help="Adam learning rate")

    add_config_flags(parser, TrainConfig)          # --lr (default: 0.001)
    cfg = config_from_flags(TrainConfig, args)     # TrainConfig(lr=args.lr, ...)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

ConfigT = TypeVar("ConfigT", bound="DataclassInstance")
_NO_DEFAULT: Any = dataclasses.MISSING


def config_field(default: Any = _NO_DEFAULT, *, help: str, choices: Sequence[Any] | None = None,
                 factory: Any = _NO_DEFAULT, flag: bool = True) -> Any:
    """A dataclass field with its command-line help (and choices); `flag=False` keeps it off the command line."""
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None, "flag": flag}
    if factory is not _NO_DEFAULT:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation: Any) -> Any:
    """The non-None type of a resolved annotation (`int | None` -> int)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else str
    return annotation


def json_object(text: str) -> dict[str, Any]:
    """argparse type: a JSON object (an empty string is {})."""
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def add_config_flags(parser: argparse.ArgumentParser, cls: type[DataclassInstance], *, exclude: Collection[str] = (),
                     required: Collection[str] = ()) -> None:
    """One flag per field of dataclass `cls` that has `config_field` help, default shown in --help."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if f.name in exclude or "help" not in meta or not meta.get("flag", True):
            continue
        kind = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        kwargs: dict[str, Any] = {"help": meta["help"] + (" (default: %(default)s)" if f.name not in required else ""),
                                  "dest": f.name}
        if kind is bool:
            kwargs.update(action=argparse.BooleanOptionalAction, default=default)
        elif typing.get_origin(kind) is dict or kind is dict:
            kwargs.update(type=json_object, default=default, metavar="JSON")
        else:
            kwargs.update(type=kind if kind in (int, float, str) else str, default=default)
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
        if f.name in required:
            kwargs.pop("default", None)
            kwargs["required"] = True
        parser.add_argument(_flag(f.name), **kwargs)


def config_from_flags(cls: type[ConfigT], args: argparse.Namespace, **given: Any) -> ConfigT:
    """Build `cls` from the parsed flags (fields without a flag keep their defaults), plus `given`."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
              if hasattr(args, f.name) and f.metadata.get("flag", True)}
    return cls(**{**values, **given})
