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
    """Replace section `name` of the markdown file at `path` (append it when new)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\nWritten by `make bench` (`polarity bench`).\n"
    block = f"<!-- bench:{name} -->\n{body.rstrip()}\n<!-- /bench:{name} -->"
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
