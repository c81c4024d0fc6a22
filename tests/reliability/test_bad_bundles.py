"""Bad bundles offered to a running service: each reload is refused with a clear error, the old
model keeps serving (same version, same scores), and the failure is counted in /metrics."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = [pytest.mark.redis]

API_KEY = "bad-bundle-key-77"
PROBE = {"user_id": "probe", "candidates": [{"item_id": str(i)} for i in range(1, 20)], "request_time": 1.76e9}


def _rehash(bundle: Path, rel: str) -> None:
    """Make the manifest's sha256/bytes of `rel` match the (modified) file again."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    data = (bundle / rel).read_bytes()
    manifest["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))


def missing_file(b: Path) -> None:
    (b / "model.onnx").unlink()


def missing_vocab(b: Path) -> None:
    (b / "vocab" / "items.json").unlink()


def tampered_sha256(b: Path) -> None:
    data = bytearray((b / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    (b / "model.onnx").write_bytes(bytes(data))


def tampered_manifest_sha(b: Path) -> None:
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["files"]["vocab/items.json"]["sha256"] = "0" * 64
    (b / "manifest.json").write_text(json.dumps(manifest))


def other_feature_spec(b: Path) -> None:
    """Manifest and feature_spec.json (consistently, re-hashed) for a spec with 5 more items than the vocab."""
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["feature_spec"]["n_items"] += 5
    (b / "manifest.json").write_text(json.dumps(manifest, indent=2))
    spec = json.loads((b / "feature_spec.json").read_text())
    spec["n_items"] += 5
    (b / "feature_spec.json").write_text(json.dumps(spec))
    _rehash(b, "feature_spec.json")


def other_seq_len(b: Path) -> None:
    """A manifest that claims another sequence length than its feature_spec.json."""
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["feature_spec"]["sequence"]["seq_len"] = 50
    manifest["model"]["seq_len"] = 50
    (b / "manifest.json").write_text(json.dumps(manifest, indent=2))


def onnx_fails_to_load(b: Path) -> None:
    """Not an ONNX graph, but the manifest's sha256 matches: only ONNX Runtime can refuse it."""
    (b / "model.onnx").write_bytes(b"\x08\x07this is not an onnx protobuf" * 100)
    _rehash(b, "model.onnx")


def onnx_truncated(b: Path) -> None:
    data = (b / "model.onnx").read_bytes()
    (b / "model.onnx").write_bytes(data[: len(data) // 3])
    _rehash(b, "model.onnx")


def no_manifest(b: Path) -> None:
    (b / "manifest.json").unlink()


def manifest_not_json(b: Path) -> None:
    (b / "manifest.json").write_text("{ this is not json")


def manifest_wrong_schema(b: Path) -> None:
    manifest = json.loads((b / "manifest.json").read_text())
    del manifest["inputs"]
    (b / "manifest.json").write_text(json.dumps(manifest))


# (name, how to break a copy of the good bundle, words the error message must contain)
BREAKAGES: list[tuple[str, Callable[[Path], None], tuple[str, ...]]] = [
    ("missing model.onnx", missing_file, ("model.onnx",)),
    ("missing vocabulary file", missing_vocab, ("items.json",)),
    ("tampered model.onnx (sha256)", tampered_sha256, ("sha256", "model.onnx")),
    ("manifest sha256 wrong", tampered_manifest_sha, ("sha256", "items.json")),
    ("manifest for a different feature spec", other_feature_spec, ("feature spec", "n_items")),
    ("manifest seq_len differs from feature_spec.json", other_seq_len, ("seq_len",)),
    ("ONNX file that fails to load", onnx_fails_to_load, ("ONNX", "model.onnx")),
    ("truncated ONNX file", onnx_truncated, ("ONNX",)),
    ("no manifest.json", no_manifest, ("manifest",)),
    ("manifest.json not JSON", manifest_not_json, ("manifest", "JSON")),
    ("manifest missing a required field", manifest_wrong_schema, ("inputs",)),
]


def reloads_counted(svc_url: str, outcome: str) -> float:
    text = httpx.get(svc_url + "/metrics", timeout=10).text
    m = re.search(rf'^polarity_model_reloads_total\{{outcome="{outcome}"\}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_bad_bundles_refused_old_model_serves(start_service: Any, private_redis: Any, model_dir: Path,
                                             record_figure: Any) -> None:
    for name, breaker, _ in BREAKAGES:
        target = model_dir / re.sub(r"\W+", "-", name)
        shutil.copytree(model_dir / "v1", target)
        breaker(target)
    svc = start_service(bundle=model_dir / "v1", redis_url=private_redis.url, model_dir=model_dir, api_key=API_KEY,
                        key_prefix="badb")
    failures: list[str] = []
    rows: list[str] = []
    with httpx.Client(base_url=svc.url, timeout=30) as client:
        before = client.post("/v1/score", json=PROBE).json()
        for name, _, words in BREAKAGES:
            r = client.post("/v1/admin/reload", json={"bundle": re.sub(r"\W+", "-", name)},
                            headers={"X-API-Key": API_KEY})
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
            message = str(body.get("message", ""))
            after = client.post("/v1/score", json=PROBE)
            served = client.get("/v1/model").json()["serving"]["version"]
            still = after.status_code == 200 and after.json() == before and served == before["model_version"]
            shown = message.replace(str(model_dir.resolve()), "<model_dir>").replace("|", "/")
            rows.append(f"| {name} | {r.status_code} | {shown[:220]} | {'yes' if still else 'NO'} |")
            if r.status_code != 422 or body.get("error") != "bundle_rejected":
                failures.append(f"{name}: {r.status_code} {r.text[:300]}")
            missing = [w for w in words if w.lower() not in message.lower()]
            if missing:
                failures.append(f"{name}: message lacks {missing}: {message}")
            if not still:
                failures.append(f"{name}: the old model stopped serving ({after.status_code}, {served})")
        n_fail = reloads_counted(svc.url, "failure")
        # The good bundle still loads: the refusals left nothing half-swapped behind.
        ok = client.post("/v1/admin/reload", json={"bundle": "v1"}, headers={"X-API-Key": API_KEY})
    record_figure(
        f"bad bundles refused ({len(BREAKAGES)} kinds)",
        "Each broken copy of the served bundle offered to `POST /v1/admin/reload`; after each, the same probe "
        "request must get the same answer from the old model.\n\n"
        "| bundle | status | error message | old model still serving |\n|---|---|---|---|\n"
        + "\n".join(rows) + f"\n\n`polarity_model_reloads_total{{outcome=\"failure\"}}` = {n_fail:.0f}.\n")
    assert svc.alive(), svc.log_tail()
    assert not failures, "\n".join(failures)
    assert n_fail == len(BREAKAGES)
    assert ok.status_code == 200, ok.text
