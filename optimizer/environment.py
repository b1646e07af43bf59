"""What a report's figures were measured with: library versions, the execution provider and the CPU.

WHY in every report: the winner and its speed-up depend on all of them (INT8 pays with VNNI, FP16 is tried only on a
CPU with FP16 arithmetic, kernels change between ONNX Runtime versions), so a report compared across CI runners or
releases must say where it came from.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any

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


def environment(provider: str) -> dict[str, Any]:
    """The versions, execution provider (`provider` as resolved: "cpu" or "cuda") and CPU a report was made on."""
    flags = cpu_flags()
    return {
        "onnxforge": version("onnxforge"), "onnxruntime": version("onnxruntime") or version("onnxruntime-gpu"),
        "onnx": version("onnx"), "execution_provider": CUDA if provider == "cuda" else CPU,
        "cpu": {"model": cpu_model(), "flags": sorted(flags & RELEVANT_FLAGS),
                "vnni": bool(flags & VNNI_FLAGS)},
    }
