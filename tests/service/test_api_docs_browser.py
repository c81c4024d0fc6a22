"""/docs works offline: the page and its Swagger UI assets come from this process, and a real headless Chromium
(Debian's `chromium` package) whose name resolution fails for every host but 127.0.0.1 renders the page, runs
Swagger UI and shows the score route and the Authorize button."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from loadtest.harness.live_server import serve_in_thread
from service.app import create_app

pytestmark = [pytest.mark.redis, pytest.mark.slow]
OFFLINE = "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


def _headless(chromium: str, *args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--no-first-run", f"--user-data-dir={profile}", OFFLINE, "--virtual-time-budget=20000",
                           *args], capture_output=True, text=True, timeout=180)


def test_docs_page_and_assets_are_local(make_settings: Any) -> None:
    with serve_in_thread(create_app(make_settings())) as url:
        page = httpx.get(f"{url}/docs", timeout=10)
        assert page.status_code == 200
        sources = re.findall(r"""(?:src|href)=["']([^"']+)""", page.text) + re.findall(r"url: ?'([^']+)'", page.text)
        assert sources and all(s.startswith("/") for s in sources), sources  # nothing from another host
        for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
            r = httpx.get(f"{url}/docs/assets/{asset}", timeout=10)
            assert r.status_code == 200 and len(r.content) > 100_000, asset
        assert httpx.get(f"{url}/redoc", timeout=10).status_code == 404  # ReDoc would need its CDN


def test_headless_chromium_renders_docs_offline(make_settings: Any, tmp_path: Path) -> None:
    chromium = _chromium()
    with serve_in_thread(create_app(make_settings())) as url:
        dom = _headless(chromium, "--dump-dom", f"{url}/docs", profile=tmp_path / "profile-dom")
        shot = _headless(chromium, "--window-size=1280,1800", f"--screenshot={tmp_path / 'docs.png'}",
                         f"{url}/docs", profile=tmp_path / "profile-shot")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    # Swagger UI ran (the operations are drawn by its JavaScript from /openapi.json, not in the served HTML).
    paths = re.findall(r'class="opblock-summary-path"[^>]*>.*?<span>([^<]+)</span>', html, flags=re.S)
    paths += re.findall(r'data-path="([^"]+)"', html)
    assert "/v1/score" in paths and "/v1/score:batch" in paths, paths[:20]
    assert "Authorize" in html  # the API-key security scheme
    assert "Failed to load API definition" not in html
    assert shot.returncode == 0 and (tmp_path / "docs.png").stat().st_size > 20_000, shot.stderr[-2000:]
