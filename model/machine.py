"""One line that says which machine a measurement ran on (benchmarks and experiment tables carry it)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask), not the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def describe_machine() -> str:
    """E.g. `Intel(R) Xeon(R) Processor, 2 cores (2 usable), Python 3.11.7, Linux x86_64`."""
    return (f"{cpu_model()}, {os.cpu_count()} cores ({usable_cores()} usable), Python {platform.python_version()}, "
            f"{platform.system()} {platform.machine()}")
