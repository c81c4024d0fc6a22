"""Schema fuzzing: schemathesis cases from the service's own OpenAPI document, sent to a live service.

Every operation the service documents gets positive (schema-valid) and negative (schema-breaking)
cases; the properties checked on every answer are the house rules: no 5xx from any input, and
every 4xx carries a JSON `{"error": ..., "message": <non-empty>}` body.

The CI run sends a few hundred cases (derandomised, so a CI failure reproduces); `make reliability`
sends at least 1000 with fresh randomness.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

pytestmark = [pytest.mark.redis]

API_KEY = "fuzz-key-9f1c2e"


@dataclass
class FuzzTally:
    cases: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    by_operation: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0


def _check_answer(tally: FuzzTally, label: str, status: int, content: bytes, sent: str) -> None:
    tally.cases += 1
    tally.by_status[status] += 1
    tally.by_operation[label] += 1
    if status >= 500:
        tally.failures.append(f"{label}: {status} for {sent[:300]} -> {content[:300]!r}")
    elif 400 <= status < 500:
        try:
            body = json.loads(content)
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        if not (isinstance(body, dict) and isinstance(body.get("message"), str) and body["message"].strip()
                and isinstance(body.get("error"), str)):
            tally.failures.append(f"{label}: {status} without an error message for {sent[:300]} -> {content[:300]!r}")


def _fuzz_operation(strategy: Any, examples: int, derandomize: bool, send: Callable[[Any], None]) -> None:
    @settings(max_examples=examples, deadline=None, database=None, derandomize=derandomize,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    @given(case=strategy)
    def run(case: Any) -> None:
        send(case)

    run()


def _send(case: Any, label: str, base_url: str, session: requests.Session, headers: dict[str, str],
          tally: FuzzTally) -> None:
    resp = case.call(base_url=base_url, session=session, headers=headers, timeout=30)
    sent = repr(case.body)[:300] if case.body is not None else repr(case.query)
    _check_answer(tally, label, resp.status_code, resp.content, sent)


def fuzz(base_url: str, *, cases: int, derandomize: bool, headers: dict[str, str]) -> FuzzTally:
    """Send at least `cases` schemathesis cases spread over every documented operation."""
    doc = httpx.get(base_url + "/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(doc)
    operations = [res.ok() for res in schema.get_all_operations()]
    assert operations, "the OpenAPI document lists no operation"
    tally = FuzzTally()
    session = requests.Session()
    modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    # Operations without inputs (GET /livez) exhaust after one case; the rest of the budget goes to
    # the others, round after round, until `cases` answers were checked.
    for _round in range(20):
        missing = cases - tally.cases
        if missing <= 0:
            break
        per = max(1, math.ceil(missing / (len(operations) * len(modes))))
        for op in operations:
            label = f"{op.method.upper()} {op.path}"
            for mode in modes:

                # Unsatisfiable: nothing schema-breaking can be built for an operation without inputs.
                with contextlib.suppress(Unsatisfiable):
                    _fuzz_operation(op.as_strategy(generation_mode=mode), per, derandomize,
                                    lambda case, label=label: _send(case, label, base_url, session, headers, tally))
    return tally


def _run(start_service: Any, private_redis: Any, model_dir: Any, cases: int, derandomize: bool) -> FuzzTally:
    svc = start_service(bundle=model_dir / "v1", redis_url=private_redis.url, model_dir=model_dir, api_key=API_KEY,
                        key_prefix="fuzz")
    t0 = time.monotonic()
    tally = fuzz(svc.url, cases=cases, derandomize=derandomize, headers={"X-API-Key": API_KEY})
    tally.elapsed_s = time.monotonic() - t0
    assert svc.alive(), svc.log_tail()
    # The model still answers after the fuzzing (no poisoned state).
    r = httpx.post(svc.url + "/v1/score", json={"user_id": "after-fuzz", "candidates": [{"item_id": "1"}]}, timeout=10)
    assert r.status_code == 200, r.text
    return tally


def _figure(tally: FuzzTally) -> str:
    five = sum(n for s, n in tally.by_status.items() if s >= 500)
    statuses = ", ".join(f"{s}: {n}" for s, n in sorted(tally.by_status.items()))
    ops = ", ".join(f"`{k}` {v}" for k, v in sorted(tally.by_operation.items()))
    no_message = sum("without an error message" in f for f in tally.failures)
    return (f"| cases | 5xx | 4xx without a message | seconds |\n|---|---|---|---|\n"
            f"| {tally.cases} | {five} | {no_message} | {tally.elapsed_s:.0f} |\n\n"
            f"Statuses: {statuses}.\n\nCases per operation: {ops}.\n")


def test_fuzz_schema_ci(start_service: Any, private_redis: Any, model_dir: Any, record_figure: Any) -> None:
    """CI subset: 300 derandomised cases over every operation."""
    tally = _run(start_service, private_redis, model_dir, cases=300, derandomize=True)
    record_figure("schemathesis fuzzing, CI subset (300 derandomised cases)", _figure(tally))
    assert tally.cases >= 300
    assert len(tally.by_operation) >= 5, tally.by_operation
    assert not tally.failures, "\n".join(tally.failures[:20])


@pytest.mark.reliability
@pytest.mark.slow
def test_fuzz_schema_full(start_service: Any, private_redis: Any, model_dir: Any, record_figure: Any) -> None:
    """At least 1000 random cases across all routes: zero 5xx, every 4xx has a message."""
    tally = _run(start_service, private_redis, model_dir, cases=1000, derandomize=False)
    record_figure("schemathesis fuzzing (>= 1000 cases, all routes)", _figure(tally))
    assert tally.cases >= 1000
    assert not tally.failures, "\n".join(tally.failures[:20])
