"""What a report's figures were measured with: library versions, the execution provider and the CPU.

WHY in every report: the winner and its speed-up depend on all of them (INT8 pays with VNNI, FP16 is tried only on a
CPU with FP16 arithmetic, kernels change between ONNX Runtime versions), so a report compared across CI runners or
releases must say where it came from.
"""

from __future__ import annotations

import os
import re
from importlib import metadata
from pathlib import Path
from typing import Any

import onnxruntime as ort

from optimizer.candidates import U8S8_SIMD_FLAGS, VNNI_FLAGS, cpu_flags
from optimizer.runtime import CPU, CUDA

#: CPU flags that change what is built or how fast it runs (INT8 kernels, FP16 and BF16 arithmetic).
RELEVANT_FLAGS = VNNI_FLAGS | U8S8_SIMD_FLAGS | frozenset(
    {"avx", "fma", "f16c", "avx512f", "avx512_fp16", "avx512_bf16", "amx_bf16", "amx_tile", "asimd", "asimdhp",
     "asimddp", "i8mm", "bf16", "sve"})


def version(distribution: str) -> str | None:
    """The installed version of `distribution`, None when it is not installed as a package (e.g. run from a tree)."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def cpu_model(cpuinfo: str | None = None) -> str | None:
    """The CPU's name from /proc/cpuinfo ("model name" on x86, "Model"/"Hardware" on ARM); None when unreadable."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    for key in ("model name", "Model", "Hardware"):
        for line in cpuinfo.splitlines():
            name, _, value = line.partition(":")
            if name.strip() == key and value.strip():
                return value.strip()
    return None


def ort_packages() -> dict[str, str]:
    """The ONNX Runtime wheels installed, name -> version: both install the same `onnxruntime` module, so with both
    the module imported is whichever was installed last and the two versions may differ (pitfalls)."""
    found = {name: version(name) for name in ("onnxruntime", "onnxruntime-gpu")}
    return {name: v for name, v in found.items() if v is not None}


def gpu_info(driver: Path = Path("/proc/driver/nvidia")) -> dict[str, Any] | None:
    """The NVIDIA GPUs and driver the kernel module reports (what a CUDA figure was measured on); None without one.

    Read from /proc/driver/nvidia (the NVIDIA Container Toolkit mounts it into containers) because ONNX Runtime names
    no device, and a report's GPU speed-ups mean nothing without the GPU's name.
    """
    models = []
    for information in sorted(driver.glob("gpus/*/information")):
        try:
            text = information.read_text()
        except OSError:
            continue
        models += [line.partition(":")[2].strip() for line in text.splitlines() if line.startswith("Model:")]
    try:
        found = re.search(r"Kernel Module\s+(\S+)", (driver / "version").read_text())
    except OSError:
        found = None
    if not models and found is None:
        return None
    return {"models": models, "driver": found[1] if found else None,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def environment(provider: str, *, driver: Path = Path("/proc/driver/nvidia")) -> dict[str, Any]:
    """The versions, execution provider (`provider` as resolved: "cpu" or "cuda") and CPU (and GPU) a report was
    made on. `onnxruntime` is the version of the module really imported, not of a package's metadata: with both
    wheels installed those differ."""
    flags = cpu_flags()
    packages = ort_packages()
    return {
        "onnxforge": version("onnxforge"), "onnxruntime": ort.__version__,
        "onnxruntime_packages": packages,
        "onnxruntime_warning": ("onnxruntime and onnxruntime-gpu are both installed: they install the same module, so "
                                "which one runs is whichever was installed last; uninstall both and install one")
        if len(packages) > 1 else None,
        "onnx": version("onnx"), "execution_provider": CUDA if provider == "cuda" else CPU,
        "cpu": {"model": cpu_model(), "flags": sorted(flags & RELEVANT_FLAGS),
                "vnni": bool(flags & VNNI_FLAGS)},
        "gpu": gpu_info(driver) if provider == "cuda" else None,
    }
