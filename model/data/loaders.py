"""One entry point for every event source: `load_events(path, source=...)`."""

from __future__ import annotations

from pathlib import Path

from model.data import SOURCES
from model.data.events import EventLogError, EventTable, read_event_log
from model.data.kuairand import load_kuairand
from model.data.kuairec import MATRIX_FILES, load_kuairec


def detect_source(path: Path) -> str:
    if path.is_dir():
        if any((path / n).exists() or (path / "data" / n).exists() for n in MATRIX_FILES):
            return "kuairec"
        if any(path.glob("**/log_standard_*.csv")):
            return "kuairand"
        raise EventLogError(f"{path}: a directory, but neither a KuaiRec nor a KuaiRand dataset")
    if path.name in MATRIX_FILES:
        return "kuairec"
    if path.name.startswith("log_standard_"):
        return "kuairand"
    return "generic"


def load_events(path: Path | str, *, source: str = "auto") -> EventTable:
    """Load any supported log into a sorted EventTable."""
    path = Path(path)
    if source not in SOURCES:
        raise EventLogError(f"unknown source {source!r}; choose from {SOURCES}")
    if not path.exists():
        raise EventLogError(f"{path}: no such file or directory")
    kind = detect_source(path) if source == "auto" else source
    if kind == "kuairec":
        return load_kuairec(path)
    if kind == "kuairand":
        return load_kuairand(path)
    return read_event_log(path)
