"""API key check for write and admin routes, for score requests with `explain` (history contents), and with
`require_api_key_for_scoring` for every score request (all open when `settings.api_key` is None)."""

from __future__ import annotations

import hmac

from fastapi import Depends, Request

from service.errors import Unauthorized
from service.runtime import get_settings
from service.settings import Settings

API_KEY_HEADER = "X-API-Key"


def presented_key(request: Request) -> str | None:
    """The key from `X-API-Key`, else from `Authorization: Bearer <key>`."""
    key = request.headers.get(API_KEY_HEADER)
    if key:
        return key
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


async def require_api_key(request: Request, settings: Settings = Depends(get_settings)) -> None:  # noqa: B008
    check_api_key(request, settings)


async def require_scoring_key(request: Request, settings: Settings = Depends(get_settings)) -> None:  # noqa: B008
    """The key on the score routes, when `require_api_key_for_scoring`."""
    if settings.require_api_key_for_scoring:
        check_api_key(request, settings)


def check_api_key(request: Request, settings: Settings, *, why: str = "this route needs an API key") -> None:
    """Unauthorized unless the request presents `settings.api_key` (nothing to check when none is set)."""
    if settings.api_key is None:
        return
    key = presented_key(request)
    expected = settings.api_key.get_secret_value().encode("utf-8")
    # Constant time in the key's content; compare bytes so non-ASCII input cannot raise.
    if key is None or not hmac.compare_digest(key.encode("utf-8"), expected):
        raise Unauthorized(f"{why} ({API_KEY_HEADER} or Authorization: Bearer)")
