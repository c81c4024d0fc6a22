"""How a benchmark section is written: its header (title, command, machine, date) and its place in
BENCHMARKS.md, between `<!-- bench:NAME -->` / `<!-- /bench:NAME -->` markers, so a number in
BENCHMARKS.md always says where it came from."""

from __future__ import annotations

import datetime as dt
import os
import re
import shlex
import sys
from pathlib import Path

from model.machine import describe_machine


def section_header(title: str, *, load_average: bool = False) -> str:
    """`### title`, then the command that ran, the machine and the date (and the load average when asked)."""
    cmd = "polarity " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "polarity bench"
    text = (f"### {title}\n\n- command: `{cmd}`\n- machine: {describe_machine()}\n"
            f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}\n")
    if load_average:
        load1, load5, _ = os.getloadavg()
        text += f"- load average when measured: {load1:.2f} (1 min), {load5:.2f} (5 min)\n"
    return text


def update_section(path: Path, name: str, body: str) -> None:
    """Replace section `name` of the markdown file at `path` (append it when new), then the contents list."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\nWritten by `make bench` (`polarity bench`).\n"
    text = _replace_section(text, name, body)
    if _section_pattern(CONTENTS).search(text):
        text = _replace_section(text, CONTENTS, contents_list(text))
    path.write_text(text)


def refresh_contents(path: Path | str) -> None:
    """Rewrite the contents list of the markdown file at `path` from its sections (after a hand edit or a merge):
    python -c "from loadtest.bench.report import refresh_contents; refresh_contents('BENCHMARKS.md')"."""
    path = Path(path)
    text = path.read_text()
    path.write_text(_replace_section(text, CONTENTS, contents_list(text)))


CONTENTS = "contents"
# Sections that a later measurement replaced but that are kept, because a note cites them: the contents list
# says so next to them (their own text stays as it was measured).
SUPERSEDED = {
    "session-2026-11-23-intel-notes": "single runs taken while the code changed; the recorded sections replace them",
}


def _section_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"<!-- bench:{re.escape(name)} -->\n(.*?)<!-- /bench:{re.escape(name)} -->", re.S)


def _replace_section(text: str, name: str, body: str) -> str:
    block = f"<!-- bench:{name} -->\n{body.rstrip()}\n<!-- /bench:{name} -->"
    pattern = _section_pattern(name)
    return pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"


def github_anchor(title: str) -> str:
    """The fragment GitHub gives a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def contents_list(text: str) -> str:
    """The contents of a BENCHMARKS.md text: one row per section (its title linked, its date, and whether a
    later measurement superseded it), in file order."""
    rows = ["### Contents", "", "| section | measured | status |", "|---|---|---|"]
    seen: dict[str, int] = {}
    for match in re.finditer(r"<!-- bench:([\w.-]+) -->\n(.*?)<!-- /bench:\1 -->", text, re.S):
        name, body = match.group(1), match.group(2)
        title_line = re.search(r"^#{2,4} (.+)$", body, re.M)
        if name == CONTENTS or title_line is None:
            continue
        title = title_line.group(1).strip()
        anchor = github_anchor(title)
        seen[anchor] = seen.get(anchor, -1) + 1
        if seen[anchor]:
            anchor += f"-{seen[anchor]}"
        date = re.search(r"(?i)\bdate:\s*(\d{4}-\d{2}-\d{2}(?: \d{2}:\d{2}(?:[–-]\d{2}:\d{2})? UTC)?)", body)
        when = date.group(1) if date else "see the section"
        status = f"superseded: {SUPERSEDED[name]}" if name in SUPERSEDED else "current"
        label = title.replace("|", "\\|")
        rows.append(f"| [{label}](#{anchor}) | {when} | {status} |")
    return "\n".join(rows)
