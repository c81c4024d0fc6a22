"""Why a request body could not be read as JSON, in words a client can act on (never quoting the body):
not UTF-8 (which byte, where), invalid JSON (what, at which line and column), or nested too deeply."""

from __future__ import annotations

import json

NOT_UTF8 = "the body is not UTF-8"
TOO_DEEP = "the JSON is nested too deeply"


def reason_from_exception(exc: BaseException | None) -> str | None:
    """The reason for a decoding exception (from `json.loads` on bytes), None for any other exception."""
    if isinstance(exc, UnicodeDecodeError):
        bad = exc.object[exc.start:exc.start + 1] if isinstance(exc.object, bytes) else b""
        return f"{NOT_UTF8}: byte 0x{bad.hex() or '??'} at offset {exc.start}"
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
    if isinstance(exc, RecursionError):
        return TOO_DEEP
    return None


def reason_from_parser_message(body: bytes, message: str) -> str:
    """The reason for pydantic's `json_invalid` error `message` on `body` ("Invalid JSON: <what> at line L column
    C"): its own words, except that a non-UTF-8 body or the recursion limit are named as such."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return reason_from_exception(exc) or NOT_UTF8
    what = message.removeprefix("Invalid JSON: ")
    if "recursion limit exceeded" in what:
        return f"{TOO_DEEP} ({what})"
    return f"invalid JSON: {what}"
