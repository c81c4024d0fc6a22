"""Progress of long loops (training, evaluation, replay): a live bar on a terminal, a plain line every few
seconds otherwise (a CI log or `> file` gets readable lines, not carriage-return noise), nothing with
`polarity --quiet`.

    bar = progress_bar(total=len(rows), desc="evaluate test", unit="sample")
    for chunk in chunks:
        ...
        bar.update(len(chunk))
    bar.close()

`polarity` sets the process-wide style once from its flags (`configure_progress`); library callers that
pass `enabled=False` get no output whatever the style.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Protocol, TextIO

DEFAULT_INTERVAL_S = 10.0


class Progress(Protocol):
    def update(self, n: int = 1) -> Any: ...
    def set_postfix(self, **values: Any) -> Any: ...
    def set_description(self, desc: str) -> Any: ...
    def close(self) -> Any: ...


@dataclass(frozen=True, kw_only=True)
class ProgressStyle:
    enabled: bool = True
    interval_s: float = DEFAULT_INTERVAL_S


_style = ProgressStyle()


def configure_progress(*, enabled: bool, interval_s: float = DEFAULT_INTERVAL_S) -> None:
    """The style every later `progress_bar` uses (`polarity --quiet`, `--progress-every`)."""
    global _style
    if interval_s <= 0:
        raise ValueError(f"the progress interval must be > 0 s, got {interval_s}")
    _style = ProgressStyle(enabled=enabled, interval_s=interval_s)


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values: Any) -> None:
        pass

    def set_description(self, desc: str) -> None:
        pass

    def close(self) -> None:
        pass


class LineProgress:
    """`desc: 12,345/100,000 samples (12%), 4,321 samples/s, loss=0.52`, at most one line per `interval_s`,
    and a last line on close."""

    def __init__(self, *, total: int | None, desc: str, unit: str, interval_s: float, stream: TextIO) -> None:
        self.total, self.desc, self.unit, self.interval_s, self.stream = total, desc, unit, interval_s, stream
        self.done = 0
        self.postfix: dict[str, Any] = {}
        self.start = self.last = time.monotonic()
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            self.last = now
            self._write(now)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._write(time.monotonic(), final=True)

    def line(self, now: float, *, final: bool = False) -> str:
        elapsed = max(now - self.start, 1e-9)
        of = f"/{self.total:,}" if self.total else ""
        share = f" ({self.done / self.total:.0%})" if self.total else ""
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        end = f" in {elapsed:.1f}s" if final else ""
        rate = f"{self.done / elapsed:,.0f} {self.unit}s/s"
        return f"{self.desc}: {self.done:,}{of} {self.unit}s{share}, {rate}{extra}{end}"

    def _write(self, now: float, *, final: bool = False) -> None:
        print(self.line(now, final=final), file=self.stream, flush=True)


def progress_bar(*, total: int | None, desc: str, unit: str = "it", enabled: bool = True,
                 stream: TextIO | None = None) -> Progress:
    """A tqdm bar when `stream` (default stderr) is a terminal, else a `LineProgress`; silent when `enabled`
    is False or `polarity --quiet` ran."""
    out = stream if stream is not None else sys.stderr
    if not (enabled and _style.enabled):
        return _Silent()
    if out.isatty():
        from tqdm import tqdm  # the `train` extra; only terminals draw bars

        bar: Progress = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=out)
        return bar
    return LineProgress(total=total, desc=desc, unit=unit, interval_s=_style.interval_s, stream=out)
