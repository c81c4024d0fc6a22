"""Security properties of a live service: API key on write/admin routes (compared in constant time),
no key or history content in logs, reload paths confined to the model directory, a request body
limit (413), and /metrics on its own port."""

from __future__ import annotations

import ast
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_client
from bundle_factory import BuiltBundle
from live_service import Ingester, LiveService
from redis_process import RedisProcess, free_port

pytestmark = [pytest.mark.redis]

API_KEY = "sk-polarity-" + uuid.uuid4().hex
SERVICE_DIR = Path(__file__).resolve().parents[2] / "service"
MAX_BODY = 4096


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: BuiltBundle) -> Iterator[dict[str, Any]]:
    """One service with an API key, a model directory, a small body limit and /metrics on its own port."""
    root = tmp_path_factory.mktemp("security")
    models = root / "models"
    models.mkdir()
    shutil.copytree(tiny_bundle.bundle, models / "v1")
    shutil.copytree(tiny_bundle.bundle, models / "v1-copy")
    outside = root / "outside"
    shutil.copytree(tiny_bundle.bundle, outside / "evil")  # a valid bundle, but not under the model dir
    (models / "escape").symlink_to(outside / "evil", target_is_directory=True)
    (models / "alias").symlink_to(models / "v1-copy", target_is_directory=True)
    server = RedisProcess().start()
    metrics_port = free_port()
    svc = LiveService(bundle=models / "v1", redis_url=server.url, log_path=root / "service.log",
                      settings={"api_key": API_KEY, "model_dir": models, "max_body_bytes": MAX_BODY,
                                "metrics_port": metrics_port, "key_prefix": "sec"})
    try:
        svc.start()
        yield {"svc": svc, "models": models, "outside": outside, "metrics_port": metrics_port}
    finally:
        svc.stop()
        server.close()


def event_body(tag: str) -> dict[str, Any]:
    return {"events": [{"event_id": f"sec-{tag}-{uuid.uuid4().hex[:8]}", "user_id": "sec-user", "item_id": "1",
                        "timestamp": 1_700_000_000.0, "event": "click"}]}


# ------------------------------------------------------------------------------------------ API key

def test_api_key_required_on_write_and_admin_routes(secured: dict[str, Any], record_figure: Any) -> None:
    url = secured["svc"].url
    wrong_same_length = API_KEY[:-1] + ("x" if API_KEY[-1] != "x" else "y")
    attempts: dict[str, dict[str, Any]] = {
        "no key": {},
        "wrong key": {"X-API-Key": "nope"},
        "wrong key, same length": {"X-API-Key": wrong_same_length},
        "key prefix": {"X-API-Key": API_KEY[:-4]},
        "key + suffix": {"X-API-Key": API_KEY + "0"},
        "upper-cased key": {"X-API-Key": API_KEY.upper()},
        "non-ASCII key": {"X-API-Key": "ключ-🔑".encode()},
        "Bearer wrong": {"Authorization": "Bearer nope"},
        "Basic scheme": {"Authorization": f"Basic {API_KEY}"},
        "Bearer, no token": {"Authorization": "Bearer"},
    }
    refused = 0
    with httpx.Client(base_url=url, timeout=10) as client:
        for name, headers in attempts.items():
            for path, body in (("/v1/events", event_body("deny")), ("/v1/admin/reload", {"bundle": "v1"})):
                r = client.post(path, json=body, headers=headers)
                assert r.status_code == 401, f"{name} on {path}: {r.status_code} {r.text}"
                refused += 1
                assert r.json()["error"] == "unauthorized" and r.json()["message"], r.text
                assert API_KEY not in r.text
        for headers in ({"X-API-Key": API_KEY}, {"Authorization": f"Bearer {API_KEY}"}):
            r = client.post("/v1/events", json=event_body("allow"), headers=headers)
            assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
            r = client.post("/v1/admin/reload", json={"bundle": "v1"}, headers=headers)
            assert r.status_code == 200, r.text
        # Reads stay open: scoring, health and the model card need no key.
        read = {"user_id": "sec-user", "candidates": [{"item_id": "1"}]}
        assert client.post("/v1/score", json=read).status_code == 200
        assert client.get("/v1/model").status_code == 200
        assert client.get("/readyz").status_code == 200
    record_figure("API key on write and admin routes",
                  f"{refused} requests to `/v1/events` and `/v1/admin/reload` with a missing, wrong, same-length, "
                  f"prefix, suffixed, upper-cased, non-ASCII or wrongly-schemed key: {refused} answered 401. "
                  "The right key in `X-API-Key` or `Authorization: Bearer`: 200 on both routes. `/v1/score`, "
                  "`/v1/model`, `/readyz` without a key: 200.\n")


def _absolute_paths(text: str) -> list[str]:
    import re

    return re.findall(r"(?<![\w.:/])/(?:[\w.\-]+/)+[\w.\-]*", text)


def test_history_contents_and_host_paths_are_not_public(secured: dict[str, Any], tiny_bundle: BuiltBundle,
                                                        start_service: Any, record_figure: Any) -> None:
    """`explain` (another user's item ids, click/skip types, timestamps) needs the key; /v1/model and /readyz name no
    absolute path (bundle dir, training log, kernel library); scoring can require the key; /docs, /openapi.json and
    /metrics can be switched off."""
    svc: LiveService = secured["svc"]
    key = {"X-API-Key": API_KEY}
    victim = {"events": [{"user_id": "victim", "item_id": "1", "timestamp": time.time() - 60, "event": "click"}]}
    explain = {"user_id": "victim", "candidates": [{"item_id": "1"}], "explain": True}
    with httpx.Client(base_url=svc.url, timeout=30) as c:
        assert c.post("/v1/events", json=victim, headers=key).status_code == 200
        anonymous = c.post("/v1/score", json=explain)
        batch = c.post("/v1/score:batch", json={"requests": [explain]})
        assert c.post("/v1/score", json=explain, headers=key).json()["explanations"][0]["top_history"]
        assert c.post("/v1/score", json={**explain, "explain": False}).status_code == 200  # plain scores stay open
        model, ready = c.get("/v1/model"), c.get("/readyz")
    assert anonymous.status_code == 401 and "explain" in anonymous.json()["message"], anonymous.text
    assert batch.status_code == 401 and "victim" not in batch.text
    assert model.status_code == 200 and ready.status_code == 200
    leaks = {"/v1/model": _absolute_paths(model.text), "/readyz": _absolute_paths(ready.text)}
    assert leaks == {"/v1/model": [], "/readyz": []}
    assert model.json()["serving"]["path"] == "v1"  # relative to the model directory
    assert str(secured["models"]) not in model.text + ready.text

    locked = start_service(bundle=tiny_bundle.bundle, redis_url=secured["svc"].redis_url, api_key=API_KEY,
                           require_api_key_for_scoring=True, serve_docs=False, serve_metrics=False,
                           key_prefix="sec-locked")
    plain = {"user_id": "victim", "candidates": [{"item_id": "1"}]}
    with httpx.Client(base_url=locked.url, timeout=30) as c:
        codes = {"score, no key": c.post("/v1/score", json=plain).status_code,
                 "batch, no key": c.post("/v1/score:batch", json={"requests": [plain]}).status_code,
                 "score, key": c.post("/v1/score", json=plain, headers=key).status_code,
                 "/docs": c.get("/docs").status_code, "/openapi.json": c.get("/openapi.json").status_code,
                 "/metrics": c.get("/metrics").status_code, "/readyz": c.get("/readyz").status_code}
    assert codes == {"score, no key": 401, "batch, no key": 401, "score, key": 200, "/docs": 404,
                     "/openapi.json": 404, "/metrics": 404, "/readyz": 200}
    record_figure("history contents, host paths, docs and metrics",
                  f"With `POLARITY_API_KEY` set: `explain: true` without the key {anonymous.status_code} "
                  f"(`/v1/score`), {batch.status_code} (`/v1/score:batch`); absolute paths in `/v1/model` and "
                  f"`/readyz`: {sum(map(len, leaks.values()))}. With `POLARITY_REQUIRE_API_KEY_FOR_SCORING=true`, "
                  "`POLARITY_SERVE_DOCS=false`, `POLARITY_SERVE_METRICS=false`: "
                  + ", ".join(f"{k} {v}" for k, v in codes.items()) + ".\n")


def _compare_nodes_on_key(tree: ast.AST) -> list[int]:
    """Line numbers of ==/!= comparisons whose operands mention the API key."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(isinstance(op, ast.Eq | ast.NotEq) for op in node.ops):
            names = {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)} | \
                    {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            if names & {"api_key", "get_secret_value", "presented_key", "key", "expected", "token"}:
                lines.append(node.lineno)
    return lines


def test_api_key_compared_in_constant_time(record_figure: Any) -> None:
    """The key check goes through hmac.compare_digest, and no service module compares a key with ==."""
    uses_compare_digest = False
    offenders = []
    for path in sorted(SERVICE_DIR.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr == "compare_digest" and isinstance(node.func.value, ast.Name) and \
                    node.func.value.id in ("hmac", "secrets"):
                uses_compare_digest = True
        offenders += [f"{path.name}:{line}" for line in _compare_nodes_on_key(tree)]
    n_modules = len(list(SERVICE_DIR.rglob("*.py")))
    record_figure("API key compared in constant time (source check)",
                  f"`hmac.compare_digest` used in service/: {'yes' if uses_compare_digest else 'NO'}; ==/!= "
                  f"comparisons on a key in {n_modules} service modules: {len(offenders)}.\n")
    assert uses_compare_digest, "no hmac.compare_digest / secrets.compare_digest in service/"
    assert not offenders, f"key compared with ==/!= (timing leak): {offenders}"


# ------------------------------------------------------------------------------------- confinement

def test_reload_paths_confined_to_model_dir(secured: dict[str, Any], record_figure: Any) -> None:
    svc: LiveService = secured["svc"]
    models: Path = secured["models"]
    outside: Path = secured["outside"]
    refused = {
        "../ traversal": "../outside/evil",
        "../ inside a path": "v1/../../outside/evil",
        "absolute path elsewhere": str(outside / "evil"),
        "symlink escaping the model dir": "escape",
        "absolute path through the symlink": str(models / "escape"),
        "/etc": "/etc",
        "filesystem root": "/",
        "home": "~",
        "encoded traversal (taken literally)": "..%2Foutside%2Fevil",
    }
    rows = []
    headers = {"X-API-Key": API_KEY}
    with httpx.Client(base_url=svc.url, timeout=30, headers=headers) as client:
        serving = client.get("/v1/model").json()["serving"]["path"]
        for name, raw in refused.items():
            r = client.post("/v1/admin/reload", json={"bundle": raw})
            rows.append(f"| {name} | `{raw.replace(str(outside), '<outside>').replace(str(models), '<model_dir>')}` "
                        f"| {r.status_code} |")
            assert r.status_code in (403, 422), f"{name}: {r.status_code} {r.text}"
            assert r.json()["message"], r.text
            assert client.get("/v1/model").json()["serving"]["path"] == serving, f"{name} changed the model"
        # Positive controls: a directory under the model dir, and a symlink that stays inside it.
        for raw in ("v1-copy", "alias", str(models / "v1")):
            r = client.post("/v1/admin/reload", json={"bundle": raw})
            rows.append(f"| allowed: `{raw.replace(str(models), '<model_dir>')}` | | {r.status_code} |")
            assert r.status_code == 200, f"{raw}: {r.text}"
    record_figure("reload paths confined to the model directory",
                  "| attempt | bundle | status |\n|---|---|---|\n" + "\n".join(rows) + "\n")


# ---------------------------------------------------------------------------------------- body size

def test_request_body_limit(secured: dict[str, Any], record_figure: Any) -> None:
    url = secured["svc"].url
    headers = {"X-API-Key": API_KEY, "Content-Type": "application/json"}
    small = {"user_id": "sec-user", "candidates": [{"item_id": "1"}], "context": {"pad": "x" * 100}}
    big = {"user_id": "sec-user", "candidates": [{"item_id": "1"}], "context": {"pad": "x" * MAX_BODY}}

    def chunks(n: int) -> Iterator[bytes]:
        yield b'{"user_id": "sec-user", "candidates": [{"item_id": "1"}], "context": {"pad": "'
        for _ in range(n // 100):
            yield b"x" * 100
        yield b'"}}'

    rows = []
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.post("/v1/score", json=small, headers=headers).status_code == 200
        for path in ("/v1/score", "/v1/events", "/v1/admin/reload"):
            r = client.post(path, json=big, headers=headers)
            chunked = client.post(path, content=chunks(MAX_BODY * 4), headers=headers)  # no Content-Length
            rows.append(f"| `{path}` | {r.status_code} | {chunked.status_code} |")
            assert r.status_code == 413, f"{path}: {r.status_code}"
            assert r.json()["error"] == "body_too_large" and r.json()["message"]
            assert chunked.status_code == 413, f"{path} chunked: {chunked.status_code}"
        # A Content-Length that lies low cannot smuggle a bigger body past the limit.
        raw = b'{"user_id":"u","candidates":[{"item_id":"1"}],"context":{"p":"' + b"x" * (MAX_BODY * 2) + b'"}}'
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10) as s:
            s.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n" + raw)
            reply = s.recv(4096)
        assert not reply.startswith(b"HTTP/1.1 5"), reply[:200]
        assert client.get("/readyz").status_code == 200
    status_line = reply.split(b"\r\n", 1)[0].decode(errors="replace")
    record_figure(f"request body limit ({MAX_BODY} bytes)",
                  f"`POLARITY_MAX_BODY_BYTES={MAX_BODY}`; a body of {MAX_BODY + 100}+ bytes with Content-Length, and "
                  f"{MAX_BODY * 4} bytes chunked (no Content-Length):\n\n| route | with Content-Length | chunked |\n"
                  "|---|---|---|\n" + "\n".join(rows) + "\n\nA Content-Length lying low (100 for 8 KiB): "
                  f"`{status_line}`, service still ready.\n")


# ------------------------------------------------------------------------------------- metrics port

def test_metrics_on_separate_port(secured: dict[str, Any], record_figure: Any) -> None:
    svc: LiveService = secured["svc"]
    main = httpx.get(svc.url + "/metrics", timeout=10)
    r = httpx.get(f"http://127.0.0.1:{secured['metrics_port']}/metrics", timeout=10)
    record_figure("/metrics on its own port",
                  f"`POLARITY_METRICS_PORT` set: `GET /metrics` on the service port {main.status_code}, on the metrics "
                  f"port {r.status_code} ({r.text.count('polarity_')} `polarity_` lines).\n")
    assert main.status_code == 404
    assert r.status_code == 200
    assert "polarity_http_requests_total" in r.text and "polarity_model_info" in r.text
    # The metrics listener binds the service host (loopback here), not every interface.
    with socket.socket() as s:
        s.settimeout(2)
        assert s.connect_ex(("127.0.0.1", secured["metrics_port"])) == 0


# ---------------------------------------------------------------------------------------------- logs

def test_no_key_or_history_content_in_logs(start_service: Any, tmp_path: Path, tiny_bundle: BuiltBundle,
                                           record_figure: Any) -> None:
    """Drive every path that could log (auth failures, validation errors, refused reloads, Redis outage,
    poison stream entries) with marked secrets; the captured logs must contain none of them."""
    secret = uuid.uuid4().hex[:10]
    marks = {"key": f"KEY{secret}", "wrong key": f"WRONGKEY{secret}", "user": f"USER{secret}",
             "item": f"ITEM{secret}", "category": f"CAT{secret}", "event id": f"EVID{secret}"}
    server = RedisProcess().start()
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(tiny_bundle.bundle, models / "v1")
    try:
        svc: LiveService = start_service(bundle=models / "v1", redis_url=server.url, api_key=marks["key"],
                                         model_dir=models, key_prefix="logs", log_level="debug")
        ok = {"X-API-Key": marks["key"]}
        events = {"events": [{"event_id": marks["event id"], "user_id": marks["user"], "item_id": marks["item"],
                              "timestamp": 1_700_000_000.0, "event": "click", "category": marks["category"]}]}
        with httpx.Client(base_url=svc.url, timeout=30) as c:
            assert c.post("/v1/events", json=events, headers=ok).status_code == 200
            assert c.post("/v1/events", json=events, headers={"X-API-Key": marks["wrong key"]}).status_code == 401
            assert c.post("/v1/events", json=events,
                          headers={"Authorization": f"Bearer {marks['wrong key']}"}).status_code == 401
            score = {"user_id": marks["user"], "explain": True,
                     "candidates": [{"item_id": marks["item"], "category": marks["category"]}]}
            assert c.post("/v1/score", json=score).status_code == 401  # explain shows history: key needed
            assert c.post("/v1/score", json=score, headers=ok).status_code == 200
            bad = {"events": [dict(events["events"][0], label=7)]}
            r = c.post("/v1/events", json=bad, headers=ok)
            assert r.status_code == 422
            assert marks["item"] not in r.text and marks["user"] not in r.text, "a 422 must not echo the input"
            assert c.post("/v1/admin/reload", json={"bundle": f"../{marks['item']}"}, headers=ok).status_code == 403
            # A refused reload is logged with its path and reason (issue 20, item 18): an operator's path, not user
            # content, so a plain name here.
            assert c.post("/v1/admin/reload", json={"bundle": "no-such-bundle"}, headers=ok).status_code == 422
            assert c.post("/v1/score", content=b'{"user_id": "' + marks["user"].encode() + b'", "cand',
                          headers={"Content-Type": "application/json"}).status_code == 422
            server.stop()  # Redis errors are logged too: with what?
            assert c.post("/v1/events", json=events, headers=ok).status_code == 503
            assert c.post("/v1/score", json=score, headers=ok).json()["degraded"] is True
            server.start()
            time.sleep(0.5)
            assert c.post("/v1/events", json=events, headers=ok).status_code == 200
        svc.stop()  # SIGTERM: shutdown logs too
        # The stream consumer, with a poison entry carrying the same secrets.
        client = redis_client.Redis.from_url(server.url)
        client.xadd("sec-events", {"user_id": marks["user"], "item_id": marks["item"], "timestamp": "NaN",
                                   "event": "click", "category": marks["category"]})
        client.xadd("sec-events", {"user_id": marks["user"], "item_id": marks["item"], "timestamp": "1.0",
                                   "event": "click", "bogus": marks["category"]})
        client.close()
        ing = Ingester(redis_url=server.url, stream="sec-events", group="g", consumer="c1",
                       settings={"key_prefix": "logs", "log_level": "debug"}, log_path=tmp_path / "ingest.log",
                       extra_args=("--until-idle", "--block-ms", "100")).start()
        assert ing.proc is not None
        ing.proc.wait(timeout=60)
        logs = {"service": svc.log_text(), "ingest": ing.log_path.read_text(errors="replace")}
    finally:
        server.close()
    found = [(what, where) for what, mark in marks.items() for where, text in logs.items() if mark in text]
    record_figure("no API key or history content in logs",
                  f"Service (log level debug) and stream consumer driven through auth failures, validation errors, "
                  f"refused reloads, a Redis outage and poison stream entries, each carrying marked secrets "
                  f"({', '.join(marks)}); {sum(len(t) for t in logs.values()):,} bytes of log captured.\n\n"
                  f"Secrets found in the logs: {len(found)}"
                  + (f" ({found})" if found else "") + ".\n")
    assert all(len(t) > 0 for t in logs.values()), "no log captured"
    assert not found, f"secrets in logs: {found}\n" + "\n".join(
        line for t in logs.values() for line in t.splitlines() if any(m in line for m in marks.values()))[:3000]
    assert os.environ.get("POLARITY_API_KEY") is None  # the key reached the service through its env only
