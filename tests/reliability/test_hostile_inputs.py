"""Hand-written hostile requests against a live service: nothing a client sends may cause a 5xx.

Each case names the answers it allows: the exact status where the contract fixes one (413 for
oversized bodies and batches, 422 for schema violations), else "any 2xx/4xx". Every 4xx must carry
`{"error": ..., "message": <non-empty>}`. Afterwards the service must still be alive and ready.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from bundle_factory import BuiltBundle
from live_service import LiveService
from redis_contents import RedisContents
from redis_process import RedisProcess

pytestmark = [pytest.mark.redis]

OK_OR_4XX = frozenset(range(200, 300)) | frozenset(range(400, 500))
ANY_4XX = frozenset(range(400, 500))
PREFIX = "hostile"


@dataclass(frozen=True, kw_only=True)
class Hostile:
    name: str
    path: str
    allowed: frozenset[int]
    json_body: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    method: str = "POST"
    stream: bool = False  # send a 5 MB body in chunks, with no Content-Length


def nested(depth: int, leaf: Any = 1) -> str:
    """A JSON text nested `depth` objects deep (built as text: json.dumps would recurse)."""
    return '{"a":' * depth + json.dumps(leaf) + "}" * depth


def score(**over: Any) -> dict[str, Any]:
    return {"user_id": "u-hostile", "candidates": [{"item_id": "1"}, {"item_id": "2"}], **over}


def event(**over: Any) -> dict[str, Any]:
    return {"events": [{"user_id": "u-hostile", "item_id": "1", "timestamp": 1_700_000_000.0, "event": "click",
                        **over}]}


def raw(obj_text: str) -> bytes:
    return obj_text.encode()


JSON = {"Content-Type": "application/json"}

CASES: list[Hostile] = [
    # --- size
    Hostile(name="5 MB body", path="/v1/score", allowed=frozenset({413}),
            json_body=score(context={"pad": "x" * 5_000_000})),
    Hostile(name="5 MB body, chunked (no Content-Length)", path="/v1/events", allowed=frozenset({413}),
            stream=True, headers=JSON),
    Hostile(name="objects nested 100k deep", path="/v1/score", allowed=ANY_4XX,
            content=raw('{"user_id":"u","candidates":[{"item_id":"1"}],"context":' + nested(100_000) + "}"),
            headers=JSON),
    Hostile(name="arrays nested 100k deep", path="/v1/events", allowed=ANY_4XX,
            content=raw('{"events":' + "[" * 100_000 + "]" * 100_000 + "}"), headers=JSON),
    Hostile(name="context nested 30 deep (legal)", path="/v1/score", allowed=frozenset({200}),
            content=raw('{"user_id":"u","candidates":[{"item_id":"1"}],"context":' + nested(30) + "}"),
            headers=JSON),
    Hostile(name="10k candidates", path="/v1/score", allowed=frozenset({413}),
            json_body=score(candidates=[{"item_id": str(i % 300)} for i in range(10_000)])),
    Hostile(name="max candidates (2000)", path="/v1/score", allowed=frozenset({200}),
            json_body=score(candidates=[{"item_id": str(i % 300)} for i in range(2000)])),
    Hostile(name="10k events", path="/v1/events", allowed=frozenset({413}),
            json_body={"events": [{"user_id": "u-many", "item_id": str(i), "timestamp": float(i), "event": "click"}
                                  for i in range(10_000)]}),
    # --- ids
    Hostile(name="unicode ids", path="/v1/events", allowed=frozenset({200}),
            json_body=event(user_id="用户-🙂-\u202e-ユーザー", item_id="項目-🎵", category="カテゴリ-\u0301",
                            event_id="ev-🙂-1")),
    Hostile(name="unicode user scored", path="/v1/score", allowed=frozenset({200}),
            json_body=score(user_id="用户-🙂-\u202e-ユーザー", candidates=[{"item_id": "項目-🎵", "category": "x"}])),
    Hostile(name="NUL and control characters in ids", path="/v1/events", allowed=OK_OR_4XX,
            json_body=event(user_id="u\x00\x01\x1b[31m", item_id="i\x00", event_id="e\x00")),
    Hostile(name="lone surrogate in user_id", path="/v1/events", allowed=OK_OR_4XX,
            content=raw('{"events":[{"user_id":"\\ud800","item_id":"1","timestamp":1.0,"event":"click"}]}'),
            headers=JSON),
    Hostile(name="lone surrogate scored", path="/v1/score", allowed=OK_OR_4XX,
            content=raw('{"user_id":"\\udfff","candidates":[{"item_id":"\\ud800"}]}'), headers=JSON),
    Hostile(name="256-char ids (limit)", path="/v1/events", allowed=frozenset({200}),
            json_body=event(user_id="u" * 256, item_id="i" * 256, event_id="e" * 256)),
    Hostile(name="257-char user_id", path="/v1/score", allowed=frozenset({422}), json_body=score(user_id="u" * 257)),
    Hostile(name="100k-char item_id", path="/v1/events", allowed=frozenset({422}),
            json_body=event(item_id="i" * 100_000)),
    Hostile(name="empty user_id", path="/v1/score", allowed=frozenset({422}), json_body=score(user_id="")),
    Hostile(name="numeric user_id", path="/v1/score", allowed=ANY_4XX, json_body=score(user_id=12345)),
    # --- timestamps
    Hostile(name="NaN timestamp", path="/v1/events", allowed=frozenset({422}),
            content=raw('{"events":[{"user_id":"u","item_id":"1","timestamp":NaN,"event":"click"}]}'), headers=JSON),
    Hostile(name="Infinity timestamp", path="/v1/events", allowed=frozenset({422}),
            content=raw('{"events":[{"user_id":"u","item_id":"1","timestamp":Infinity,"event":"click"}]}'),
            headers=JSON),
    Hostile(name="-Infinity request_time", path="/v1/score", allowed=frozenset({422}),
            content=raw('{"user_id":"u","candidates":[{"item_id":"1"}],"request_time":-Infinity}'), headers=JSON),
    Hostile(name="1e999 timestamp (overflows to inf)", path="/v1/events", allowed=frozenset({422}),
            content=raw('{"events":[{"user_id":"u","item_id":"1","timestamp":1e999,"event":"click"}]}'),
            headers=JSON),
    Hostile(name="negative timestamp", path="/v1/events", allowed=OK_OR_4XX, json_body=event(timestamp=-1e9)),
    Hostile(name="far-future timestamp", path="/v1/events", allowed=OK_OR_4XX, json_body=event(timestamp=1e300)),
    Hostile(name="far-future request_time", path="/v1/score", allowed=frozenset({422}),
            json_body=score(user_id="u-hostile", request_time=1e300)),
    Hostile(name="negative request_time", path="/v1/score", allowed=OK_OR_4XX, json_body=score(request_time=-1e300)),
    Hostile(name="timestamp as huge integer", path="/v1/events", allowed=OK_OR_4XX,
            content=raw('{"events":[{"user_id":"u","item_id":"1","timestamp":' + "9" * 5000 + ',"event":"click"}]}'),
            headers=JSON),
    Hostile(name="timestamp as string", path="/v1/events", allowed=OK_OR_4XX, json_body=event(timestamp="soon")),
    # --- duplicates and empties
    Hostile(name="duplicate candidates", path="/v1/score", allowed=frozenset({200}),
            json_body=score(candidates=[{"item_id": "7"}] * 50)),
    Hostile(name="same event twice in one request", path="/v1/events", allowed=frozenset({200}),
            json_body={"events": [event(event_id="dup-1")["events"][0]] * 2}),
    Hostile(name="empty candidates", path="/v1/score", allowed=frozenset({422}), json_body=score(candidates=[])),
    Hostile(name="empty events", path="/v1/events", allowed=frozenset({422}), json_body={"events": []}),
    Hostile(name="empty object", path="/v1/score", allowed=frozenset({422}), json_body={}),
    Hostile(name="unknown field", path="/v1/score", allowed=frozenset({422}), json_body=score(admin=True)),
    Hostile(name="label 2", path="/v1/events", allowed=frozenset({422}), json_body=event(label=2)),
    Hostile(name="unknown event type", path="/v1/events", allowed=OK_OR_4XX, json_body=event(event="teleport")),
    Hostile(name="neither event nor label", path="/v1/events", allowed=OK_OR_4XX, json_body=event(event=None)),
    Hostile(name="JSON null", path="/v1/score", allowed=ANY_4XX, content=b"null", headers=JSON),
    Hostile(name="JSON array", path="/v1/events", allowed=ANY_4XX, content=b"[1,2,3]", headers=JSON),
    Hostile(name="candidates is a string", path="/v1/score", allowed=frozenset({422}), json_body=score(candidates="1")),
    # --- wrong encodings and content types
    Hostile(name="truncated JSON", path="/v1/score", allowed=ANY_4XX, content=b'{"user_id": "u", "cand', headers=JSON),
    Hostile(name="invalid UTF-8", path="/v1/score", allowed=ANY_4XX, content=b'{"user_id": "\xff\xfe"}', headers=JSON),
    Hostile(name="UTF-16 body", path="/v1/score", allowed=OK_OR_4XX,
            content=json.dumps(score()).encode("utf-16"), headers=JSON),
    Hostile(name="text/plain", path="/v1/score", allowed=OK_OR_4XX, content=json.dumps(score()).encode(),
            headers={"Content-Type": "text/plain"}),
    Hostile(name="form-encoded", path="/v1/events", allowed=ANY_4XX, content=b"user_id=u&item_id=1",
            headers={"Content-Type": "application/x-www-form-urlencoded"}),
    Hostile(name="multipart", path="/v1/score", allowed=ANY_4XX,
            content=b"--b\r\nContent-Disposition: form-data; name=\"user_id\"\r\n\r\nu\r\n--b--\r\n",
            headers={"Content-Type": "multipart/form-data; boundary=b"}),
    Hostile(name="no content type", path="/v1/events", allowed=OK_OR_4XX, content=json.dumps(event()).encode()),
    Hostile(name="empty body", path="/v1/score", allowed=ANY_4XX, content=b"", headers=JSON),
    Hostile(name="binary garbage", path="/v1/events", allowed=ANY_4XX, content=bytes(range(256)) * 64, headers=JSON),
    Hostile(name="reload with a number", path="/v1/admin/reload", allowed=ANY_4XX, json_body={"bundle": 5}),
    Hostile(name="reload with NUL in path", path="/v1/admin/reload", allowed=ANY_4XX,
            json_body={"bundle": "v1\x00x"}),
    Hostile(name="reload with a 100k path", path="/v1/admin/reload", allowed=ANY_4XX,
            json_body={"bundle": "a/" * 50_000}),
    # --- methods and paths
    Hostile(name="GET on a POST route", path="/v1/score", allowed=frozenset({405}), method="GET"),
    Hostile(name="DELETE on a route", path="/v1/events", allowed=frozenset({405}), method="DELETE"),
    Hostile(name="unknown path", path="/v1/../../etc/passwd", allowed=frozenset({404}), method="GET"),
]


def _chunks() -> Iterator[bytes]:
    yield b'{"events": ['
    for _ in range(5_000):
        yield b'{"user_id": "u", "item_id": "1", "timestamp": 1.0, "event": "click", "category": "' + b"x" * 990
        yield b'"},'
    yield b"]}"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: BuiltBundle) -> Iterator[LiveService]:
    redis = RedisProcess().start()
    log = Path(tmp_path_factory.mktemp("hostile")) / "service.log"
    svc = LiveService(bundle=tiny_bundle.bundle, redis_url=redis.url, log_path=log, settings={"key_prefix": PREFIX})
    try:
        yield svc.start()
    finally:
        svc.stop()
        redis.close()


def send(client: httpx.Client, case: Hostile) -> httpx.Response:
    if case.stream:
        return client.request(case.method, case.path, content=_chunks(), headers=case.headers)
    if case.content is not None:
        return client.request(case.method, case.path, content=case.content, headers=case.headers)
    if case.json_body is not None:
        return client.request(case.method, case.path, json=case.json_body, headers=case.headers)
    return client.request(case.method, case.path, headers=case.headers)


def has_message(r: httpx.Response) -> bool:
    try:
        body = r.json()
    except ValueError:
        return False
    return isinstance(body, dict) and isinstance(body.get("error"), str) and \
        isinstance(body.get("message"), str) and bool(body["message"].strip())


def test_hostile_inputs(service: LiveService, record_figure: Any) -> None:
    failures: list[str] = []
    rows: list[str] = []
    with httpx.Client(base_url=service.url, timeout=60) as client:
        for case in CASES:
            t0 = time.monotonic()
            try:
                r = send(client, case)
            except httpx.HTTPError as exc:
                failures.append(f"{case.name}: no answer ({type(exc).__name__}: {exc})")
                rows.append(f"| {case.name} | no answer | |")
                continue
            ms = (time.monotonic() - t0) * 1000
            rows.append(f"| {case.name} | {r.status_code} | {ms:.0f} |")
            if r.status_code not in case.allowed:
                failures.append(f"{case.name}: {r.status_code} not in {sorted(case.allowed)[:6]}: {r.text[:300]}")
            if 400 <= r.status_code < 500 and not has_message(r):
                failures.append(f"{case.name}: {r.status_code} without an error message: {r.text[:300]}")
            if case.name == "duplicate candidates" and r.status_code == 200:
                scores = r.json()["scores"]
                if len(scores) != 50 or len(set(scores)) != 1:
                    failures.append(f"duplicate candidates: scores {scores[:5]}... should be 50 equal numbers")
            if case.name == "same event twice in one request" and r.status_code == 200:
                body = r.json()
                if (body["accepted"], body["duplicates"]) != (1, 1):
                    failures.append(f"same event twice: {body}, expected 1 accepted and 1 duplicate")
        ready = client.get("/readyz")
    five = sum(1 for row in rows if row.split("|")[2].strip().startswith("5"))
    record_figure(f"hostile inputs ({len(CASES)} hand-written requests)",
                  f"{len(CASES)} requests, {five} answered 5xx, {len(failures)} unexpected answers.\n\n"
                  "| case | status | ms |\n|---|---|---|\n" + "\n".join(rows) + "\n")
    assert service.alive(), service.log_tail()
    assert ready.status_code == 200, ready.text
    assert not failures, "\n".join(failures)


def test_unicode_ids_round_trip(service: LiveService) -> None:
    """A unicode user's events land under that exact user and count in their score."""
    user = "ユーザー-🙂-\u202e-round-trip"
    evs = [{"event_id": f"rt-{i}", "user_id": user, "item_id": f"項目-{i}", "timestamp": 1_700_000_000.0 + i,
            "event": "click" if i % 2 else "skip", "category": "🎵"} for i in range(6)]
    r = httpx.post(service.url + "/v1/events", json={"events": evs}, timeout=10)
    assert r.status_code == 200 and r.json()["accepted"] == 6, r.text
    contents = RedisContents(service.redis_url, key_prefix=PREFIX)
    try:
        hist = contents.history(user)
    finally:
        contents.close()
    assert [h[0] for h in hist["pos"]] == ["項目-1", "項目-3", "項目-5"]
    assert [h[0] for h in hist["neg"]] == ["項目-0", "項目-2", "項目-4"]
    r = httpx.post(service.url + "/v1/score", json={"user_id": user, "candidates": [{"item_id": "1"}]}, timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["history"] == {"positives": 3, "negatives": 3}
