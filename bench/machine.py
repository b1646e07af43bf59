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


# The vector extensions INT8 speed and accuracy hang on: without a VNNI flavour, ORT's u8s8 kernels add byte
# products in saturating int16 pairs (less accurate) and gain less over FP32; AMX adds int8 tile kernels.
INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def int8_isa() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return "+".join(f for f in INT8_FLAGS if f in flags) or "no avx2"
    except OSError:
        pass
    return "isa unknown"


def describe() -> str:
    """CPU model and its INT8-relevant extensions, cores this process may use, onnxruntime and Python versions."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{cpu_model()} ({int8_isa()}), {cores} cores usable, onnxruntime {ort.__version__}, "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")
