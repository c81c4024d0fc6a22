"""The range of times the service takes: event timestamps and score `request_time`s, in seconds since the Unix epoch.

From 2000-01-01 up to the server's clock plus `max_clock_skew_s` (POLARITY_MAX_CLOCK_SKEW_S, default 300 s).
Anything later is almost always milliseconds sent as seconds (1.7e12 is the year 55,800), or a client clock
far ahead; stored, such an event would sit at the newest end of the capped history forever and push
correctly-timed events out. Anything earlier is not a Unix time in seconds (a relative offset, a date
typed wrong), and huge magnitudes overflow the model's time-gap feature. Checked per event (a rejected
row with this reason) and on `request_time` (422 naming the field).
"""

from __future__ import annotations

import math

EARLIEST_TIMESTAMP = 946_684_800.0  # 2000-01-01T00:00:00Z


def timestamp_problem(value: float, *, now: float, max_skew_s: float) -> str | None:
    """Why `value` is not a time the service takes (None when it is), e.g. "in the future (milliseconds?): ..."."""
    if not math.isfinite(value):
        return "must be a finite number of seconds"
    if value > now + max_skew_s:
        ahead = value - now
        hint = " (milliseconds?)" if value > 1e11 else ""
        return (f"in the future{hint}: {ahead:.3g} s after the server's clock, more than the allowed "
                f"skew of {max_skew_s:g} s (POLARITY_MAX_CLOCK_SKEW_S); send seconds since the Unix epoch")
    if value < EARLIEST_TIMESTAMP:
        return ("before 2000-01-01: send seconds since the Unix epoch (e.g. 1733443300.0), "
                "not a relative or zero time")
    return None
