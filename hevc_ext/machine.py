"""What machine a figure was measured on: processor model, CPU count, operating system.

Benchmarks record it beside their results and ``hevc-nlf info`` prints it, so that a figure (or a bug
report) says where it came from. ``platform.processor()`` is empty on most Linux systems; the model
name is read from ``/proc/cpuinfo`` there.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

__all__ = ["cpu_model", "describe", "summary"]


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The processor's model name ("Intel(R) Xeon(R) Platinum 8480+"), else what ``platform`` knows."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() in ("model name", "Model", "cpu model", "Hardware") and value.strip():
                return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown processor"


def describe() -> dict[str, object]:
    """``{"cpu": model, "cpus": logical CPUs usable by this process, "arch": ..., "os": ...}``."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        usable = os.cpu_count() or 1
    return {"cpu": cpu_model(), "cpus": usable, "arch": platform.machine(), "os": platform.platform()}


def summary() -> str:
    """One line: ``"Intel(R) Xeon(R) Processor, 2 CPUs, x86_64, Linux-6.1-..."``."""
    d = describe()
    return f"{d['cpu']}, {d['cpus']} CPUs, {d['arch']}, {d['os']}"
