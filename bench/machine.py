"""One line that says which machine a benchmark ran on: every table prints it, so ratios can be traced."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import onnxruntime as ort


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe() -> str:
    """CPU model, cores this process may use, onnxruntime and Python versions."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{cpu_model()}, {cores} cores usable, onnxruntime {ort.__version__}, "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")
