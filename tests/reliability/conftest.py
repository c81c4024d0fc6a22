"""Fixtures of the reliability suite: live services, a second bundle, a model directory, figures.

Figures: a test calls `record_figure(title, body)`; when POLARITY_RELIABILITY_REPORT names a file
(`make reliability` sets it to BENCHMARKS.md) the figure is written there as the section
`reliability-<test>` with the command, machine, date, load average and the test's outcome.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from bundle_factory import BuiltBundle, build_bundle
from live_service import LiveService


@pytest.fixture(scope="session")
def v2_bundle(tmp_path_factory: pytest.TempPathFactory) -> BuiltBundle:
    """A second real bundle: same world and feature spec as `tiny_bundle`, other weights, version "v2"."""
    return build_bundle(tmp_path_factory.mktemp("v2_bundle"), version="v2", max_train_samples=2000)


@pytest.fixture()
def model_dir(tmp_path: Path, tiny_bundle: BuiltBundle) -> Path:
    """A model directory holding a copy of the tiny bundle as `v1` (what a service under test serves)."""
    root = tmp_path / "models"
    root.mkdir()
    shutil.copytree(tiny_bundle.bundle, root / "v1")
    return root


@pytest.fixture()
def start_service(tmp_path: Path) -> Iterator[Callable[..., LiveService]]:
    """`start_service(bundle=..., redis_url=..., **settings)` -> a started LiveService, stopped at teardown."""
    started: list[LiveService] = []

    def start(*, bundle: Path, redis_url: str, ready: bool = True, **settings: Any) -> LiveService:
        svc = LiveService(bundle=bundle, redis_url=redis_url, settings=settings,
                          log_path=tmp_path / f"service-{len(started)}.log")
        started.append(svc)
        return svc.start(ready=ready)

    yield start
    for svc in started:
        svc.stop()


_OUTCOME = pytest.StashKey[str]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[_OUTCOME] = report.outcome
    return report


@pytest.fixture()
def record_figure(request: pytest.FixtureRequest) -> Iterator[Callable[[str, str], None]]:
    """record(title, markdown_body): the test's figure for BENCHMARKS.md (written after the test)."""
    figures: list[tuple[str, str]] = []
    yield lambda title, body: figures.append((title, body))
    out = os.environ.get("POLARITY_RELIABILITY_REPORT")
    if not out or not figures:
        return
    from loadtest.bench.report import update_section
    from model.machine import describe_machine as machine

    outcome = request.node.stash.get(_OUTCOME, "error")
    name = "reliability-" + request.node.name.removeprefix("test_").replace("[", "-").rstrip("]").replace("_", "-")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    title, body = figures[-1]
    text = (f"### Reliability: {title}\n\n- command: `make reliability` (`pytest {request.node.nodeid}`)\n"
            f"- machine: {machine()}; load average at the end {load}\n"
            f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}\n- test outcome: {outcome}\n\n"
            f"{body.rstrip()}\n")
    update_section(Path(out), name, text)
