"""The documents a new user reads first: the README opens with the data-flow diagram, has a curl example for
every route the service serves, and every relative link of the README, docs/ and BENCHMARKS.md resolves;
BENCHMARKS.md opens with its headline table and a contents list that matches its sections."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from loadtest.bench.report import contents_list, github_anchor, update_section

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_readme_opens_with_the_data_flow_diagram() -> None:
    text = (ROOT / "README.md").read_text()
    title, rest = text.split("\n", 1)
    assert title == "# Polarity"
    first_block = rest.lstrip("\n")
    assert first_block.startswith("```mermaid\nflowchart LR\n"), first_block[:80]
    diagram = first_block.split("\n```\n", 1)[0]
    flow = [("events", "redis"), ("redis", "builder"), ("builder", "ort"), ("ort", "scores"),
            ("trainer", "run"), ("run", "exporter"), ("exporter", "bundle"), ("bundle", "ort")]
    for a, b in flow:
        assert re.search(rf"\b{a}\b.*--.*\b{b}\b", diagram), f"no edge {a} -> {b} in the README's diagram"
    for words in ("Redis histories", "sequence builder", "ONNX Runtime", "scores", "polarity train",
                  "polarity export", "bundle"):
        assert words in diagram, words


def _relative_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+://|mailto:", t)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path) -> None:
    for link in _relative_links(doc):
        target, _, anchor = link.partition("#")
        path = (doc.parent / target) if target else doc
        assert path.exists(), f"{doc.name}: {link} does not exist"
        if anchor and path.suffix == ".md":
            headings = re.findall(r"^#{1,4} (.+)$", path.read_text(), flags=re.M)
            assert anchor in {github_anchor(h) for h in headings}, f"{doc.name}: no #{anchor} in {path.name}"


def test_benchmarks_opens_with_headline_numbers_and_an_up_to_date_contents_list() -> None:
    text = (ROOT / "BENCHMARKS.md").read_text()
    sections = re.findall(r"<!-- bench:([\w.-]+) -->", text)
    assert sections[:2] == ["headline", "contents"]
    headline = text.split("<!-- bench:headline -->", 1)[1].split("<!-- /bench:headline -->", 1)[0]
    rows = [r for r in headline.splitlines() if r.startswith("| ") and not r.startswith("| target")]
    assert len(rows) >= 8
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert cells[2].split(" ")[0] in ("met", "missed"), row
        assert cells[4].startswith("`") and re.match(r"\d{4}-\d{2}-\d{2}", cells[6]), row
    contents = text.split("<!-- bench:contents -->\n", 1)[1].split("\n<!-- /bench:contents -->", 1)[0]
    assert contents == contents_list(text), (
        "BENCHMARKS.md's contents list is stale (a section was edited by hand or merged): run\n"
        "python -c \"from loadtest.bench.report import refresh_contents; refresh_contents('BENCHMARKS.md')\"")


def test_update_section_rewrites_the_contents_list(tmp_path: Path) -> None:
    out = tmp_path / "B.md"
    out.write_text("# Benchmarks\n\n<!-- bench:contents -->\n<!-- /bench:contents -->\n\n"
                   "<!-- bench:a -->\n### First: `x` ≥ 2×\n\n- date: 2026-01-02 03:04 UTC\n<!-- /bench:a -->\n")
    update_section(out, "session-2026-11-23-intel-notes", "### Old notes\n\nnumbers")
    update_section(out, "b", "### First: `x` ≥ 2×\n\n- date: 2026-02-03 04:05 UTC\n")
    text = out.read_text()
    assert "| [First: `x` ≥ 2×](#first-x--2) | 2026-01-02 03:04 UTC | current |" in text
    assert "| [First: `x` ≥ 2×](#first-x--2-1) | 2026-02-03 04:05 UTC | current |" in text  # GitHub's -1 suffix
    assert re.search(r"\| \[Old notes\]\(#old-notes\) \| see the section \| superseded: ", text)
    assert text.index("bench:contents") < text.index("bench:a -->")


def test_the_readme_has_a_curl_example_for_every_route(tiny_bundle: Any) -> None:
    from service.app import create_app
    from service.settings import Settings

    doc = create_app(Settings(bundle=tiny_bundle.bundle)).openapi()
    text = (ROOT / "README.md").read_text()
    curls = " ".join(line for line in text.splitlines() if "curl " in line)
    for path, item in doc["paths"].items():
        concrete = re.sub(r"\{[^}]+\}", "demo", path)
        assert re.search(rf"\$API{re.escape(concrete)}(?=[\s'\"]|$)", curls), f"README: no curl for {path}"
        for method in item:
            if method != "get":
                assert f"-X {method.upper()} $API{concrete} " in curls, f"README: no curl -X {method.upper()} {path}"
