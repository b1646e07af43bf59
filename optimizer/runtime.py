"""The one place that creates ONNX Runtime sessions and chooses the execution provider.

The benchmark, the accuracy check and the service's predict path all call `create_session`, so the
latency a report shows is measured with the same provider and threading that serve.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import math
import os
import re
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
PROVIDER_NAMES = {"cpu": CPU, "cuda": CUDA}

_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class SessionSettings:
    """How a session runs. The defaults are the serving defaults."""

    provider: str = "cpu"  # "cpu" or "cuda"; see resolve_provider
    intra_op_threads: int = 0  # 0 lets ONNX Runtime use one thread per physical core
    inter_op_threads: int = 1
    # Idle spinning threads steal time from a second session timed on the same cores (an identical
    # model measured 1.38x "faster"); A/B benchmarks turn it off on both sides.
    allow_spinning: bool = True
    optimization_level: str = "all"
    # Bytes all sessions made with a cap share for their runs' tensors (`shared_arena`); 0: each session its own
    # unbounded arena, ONNX Runtime's default. The service sets it, the optimizer's benchmark leaves it.
    arena_max_bytes: int = 0


def _tiny_model(ir_version: int, opset: int = 13) -> bytes:
    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model.SerializeToString()


@functools.cache
def max_supported_ir_version() -> int:
    """The highest ONNX IR version the installed ONNX Runtime loads.

    No ONNX Runtime API reports it, so probe with a one-node model, newest first.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 4
    for ir_version in range(onnx.IR_VERSION, 3, -1):
        try:
            ort.InferenceSession(_tiny_model(ir_version), options, providers=[CPU])
            return ir_version
        except Exception:  # noqa: BLE001 - refusal is the answer we probe for
            continue
    return 3


def cuda_is_usable(available: Sequence[str] | None = None) -> bool:
    """True only when onnxruntime-gpu is installed *and* a session really gets the CUDA provider and runs on it.

    onnxruntime-gpu lists CUDAExecutionProvider even without a GPU and silently falls back to
    CPU at session creation, so the list alone proves nothing.
    """
    available = ort.get_available_providers() if available is None else available
    if CUDA not in available:
        return False
    return cuda_probe().works


@dataclass(frozen=True)
class ProviderProbe:
    """What one trial session on a provider showed: `works` only when the session got that provider first and a
    kernel run on it gave the right numbers; `detail` is ONNX Runtime's own words when it did not."""

    works: bool
    providers: tuple[str, ...] = ()  # what the trial session got (session.get_providers()), not what was asked
    detail: str | None = None


#: Run in a child process by `probe_provider`: a session asking for argv[1] (then CPU) on the model read from stdin,
#: one run of it, and a JSON line with what it got. Its stderr is ONNX Runtime's log, read for the reason.
_PROBE_CHILD = """
import json, sys
import numpy as np
import onnxruntime as ort
result = {"providers": [], "ran": False, "error": None}
try:
    session = ort.InferenceSession(sys.stdin.buffer.read(), providers=[sys.argv[1], "CPUExecutionProvider"])
    result["providers"] = session.get_providers()
    x = np.arange(1, 9, dtype=np.float32)
    result["ran"] = bool(np.array_equal(session.run(None, {"x": x})[0], x + x))
except Exception as exc:
    result["error"] = f"{type(exc).__name__}: {exc}"
print("\\n" + json.dumps(result))
"""
PROBE_TIMEOUT_S = 120.0
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LIBRARY_FAILED = re.compile(r"Failed to load library (\S+) with error: (.*)")


def _probe_model() -> bytes:
    """x + x: an elementwise kernel that really launches on the device (an Identity is a bare copy, so a GPU whose
    architecture the wheel has no kernels for, e.g. one CUDA 13 dropped, would pass with it and fail every run)."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # every ONNX Runtime of the two extras loads it (the GPU wheel may be older: pitfalls)
    return model.SerializeToString()


def probe_provider(provider: str, timeout_s: float = PROBE_TIMEOUT_S) -> ProviderProbe:
    """Try `provider` for real: a session asking for it runs x + x, in a child process.

    WHY a child: ONNX Runtime writes its reasons (the CUDA library that did not load, the CUDA error) straight to the
    process's stderr, where they came before the service's one `error:` line, and only there; a broken driver can
    hang or crash the process that initializes CUDA. The child's stderr is read for the reason instead.
    """
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE_CHILD, provider], input=_probe_model(),
                              capture_output=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return ProviderProbe(False, detail=f"a trial session on {provider} did not finish within {timeout_s:g} s")
    except OSError as exc:
        return ProviderProbe(False, detail=f"the trial process did not start: {exc}")
    return probe_verdict(provider, done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace"),
                         done.returncode)


def probe_verdict(provider: str, stdout: str, stderr: str, returncode: int = 0) -> ProviderProbe:
    """Read a probe child's output: works only if the session got `provider` first and its run was right."""
    try:
        result = json.loads(stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        said = _ort_error(stderr) or stderr.strip()[-300:] or "no output"
        return ProviderProbe(False, detail=f"the trial process ended with code {returncode}: {said}")
    providers = tuple(result.get("providers") or ())
    if result.get("error"):
        return ProviderProbe(False, providers, _ort_error(stderr) or _clean(result["error"]))
    if not providers or providers[0] != provider:
        return ProviderProbe(False, providers, _ort_error(stderr) or f"the session fell back to {', '.join(providers)}")
    if not result.get("ran"):
        return ProviderProbe(False, providers, f"a session got {provider} but x + x computed on it was wrong")
    return ProviderProbe(True, providers)


def _clean(text: str) -> str:
    return " ".join(_ANSI.sub("", text).split())[:400]


def _ort_error(stderr: str) -> str | None:
    """ONNX Runtime's first logged error (an "[E:onnxruntime" line), e.g. "Failed to load library
    .../libonnxruntime_providers_cuda.so with error: libcublasLt.so.13: cannot open shared object file"."""
    for line in _ANSI.sub("", stderr).splitlines():
        if "[E:onnxruntime" in line:
            message = line.split(" : FAIL : ", 1)[1] if " : FAIL : " in line else line.rsplit("] ", 1)[-1]
            library = _LIBRARY_FAILED.search(message)
            return _clean(f"{Path(library[1]).name} did not load: {library[2]}" if library else message)
    return None


@functools.cache
def cuda_probe() -> ProviderProbe:
    """The CUDA probe, once per process (a few seconds with a GPU: CUDA initializes in the child)."""
    return probe_provider(CUDA)


def cuda_unavailable_reason(available: Sequence[str] | None = None, *, session_works: bool | None = None,
                            dev: Path = Path("/dev"), detail: str | None = None) -> str | None:
    """Why CUDA cannot run sessions here, in words an operator can act on; None when it can.

    The service refuses to start on an explicit `cuda` that cannot be met (as Triton refuses to load), so the
    reason must say which of the three it is: the CPU wheel installed, no GPU visible, or CUDA's libraries missing;
    with ONNX Runtime's own words (`detail`, by default the probe's) naming the library or the CUDA error.
    """
    available = ort.get_available_providers() if available is None else available
    if CUDA not in available:
        wheel = "onnxruntime-gpu" if _installed("onnxruntime-gpu") else "onnxruntime (the CPU build)"
        return (f"CUDAExecutionProvider is not available: the installed ONNX Runtime is {wheel} {ort.__version__}, "
                f"offering {', '.join(available)}; install onnxruntime-gpu (the gpu extra) in place of onnxruntime")
    if session_works is None:
        probe = cuda_probe()
        session_works, detail = probe.works, detail or probe.detail
    if session_works:
        return None
    said = f" (ONNX Runtime: {detail})" if detail else ""
    if not any(dev.glob("nvidia[0-9]*")) and not (dev / "dxg").exists():  # dxg: the GPU of WSL2
        return ("onnxruntime-gpu is installed but no NVIDIA GPU is visible here (no /dev/nvidia*): in a container, "
                f"run it with the GPU (docker --gpus all, the NVIDIA Container Toolkit){said}")
    return ("onnxruntime-gpu is installed and a GPU is visible, but a trial session on CUDA failed or fell back to "
            f"CPU: the CUDA or cuDNN libraries it needs did not load, or the GPU refused the work{said}")


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def resolve_provider(requested: str = "auto", *, cuda_usable: bool | None = None,
                     available: Sequence[str] | None = None) -> str:
    """Turn "auto" | "cpu" | "cuda" into the provider that will really serve ("cpu" or "cuda").

    "auto" picks CUDA only when it really works here; where onnxruntime-gpu is installed (someone meant a GPU) and
    it does not, the CPU is chosen with a warning saying why. The library, asked for "cuda" where it does not work,
    falls back to "cpu" with a warning saying why (the report says what was used); the service refuses to start
    instead (app/cli.py, with cuda_unavailable_reason).
    """
    requested = (requested or "auto").lower()
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown provider {requested!r}: use auto, cpu or cuda")
    if requested == "cpu":
        return "cpu"
    available = ort.get_available_providers() if available is None else available
    usable = cuda_is_usable(available) if cuda_usable is None else cuda_usable
    if usable:
        return "cuda"
    if requested == "cuda":
        log.warning("CUDA was requested but is not usable here (%s); using CPU", cuda_unavailable_reason(available))
    elif CUDA in available:
        log.warning("provider auto chose CPU: %s", cuda_unavailable_reason(available))
    return "cpu"


def create_session(model: bytes | str | Path, settings: SessionSettings | None = None, *,
                   save_optimized_to: Path | None = None,
                   disabled_optimizers: list[str] | None = None) -> ort.InferenceSession:
    """Create an ONNX Runtime session with the given settings (the only place sessions are made).

    `save_optimized_to` makes ONNX Runtime write the graph it optimized at the settings' level
    (offline optimization); `disabled_optimizers` turns named graph transformers off.
    """
    settings = settings or SessionSettings()
    options = ort.SessionOptions()
    options.graph_optimization_level = _LEVELS[settings.optimization_level]
    options.intra_op_num_threads = settings.intra_op_threads or _threads_within_limit()
    options.inter_op_num_threads = settings.inter_op_threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.allow_spinning else "0")
    if settings.arena_max_bytes:
        shared_arena(settings.arena_max_bytes)
        options.add_session_config_entry("session.use_env_allocators", "1")
    if save_optimized_to is not None:
        options.optimized_model_filepath = str(save_optimized_to)
    providers = [CUDA, CPU] if settings.provider == "cuda" else [CPU]
    source = str(model) if isinstance(model, Path) else model
    extra = {"disabled_optimizers": disabled_optimizers} if disabled_optimizers else {}
    session = ort.InferenceSession(source, options, providers=providers, **extra)
    fewer = threads_hint(session)
    if fewer and fewer < (options.intra_op_num_threads or default_threads()):
        # The model asks for fewer intra-op threads than these settings give (auto measured it faster so: see
        # THREADS_KEY). ONNX Runtime sizes its pool at creation, so the session is made again; only such models pay.
        options.intra_op_num_threads = fewer
        session = ort.InferenceSession(source, options, providers=providers, **extra)
    if settings.provider == "cuda" and session.get_providers()[0] != CUDA:
        # ONNX Runtime falls back to CPU when the CUDA provider cannot be made for this session (its "EP Error ...
        # Falling back" on stdout, or nothing): callers read session_provider, and the log says it happened
        log.warning("a session asked for CUDA got %s: it runs on the CPU", ", ".join(session.get_providers()))
    return session


#: Metadata key of a model that runs faster with fewer intra-op threads than the cores it may use (a small model at
#: batch 1: waking and joining the pool's threads costs more than they share; PP-OCR cls 2.0 ms on one thread vs
#: 3.1 ms on two, AMD EPYC 2 cores). `precision=auto` writes it on a variant it measured so (optimizer.threads);
#: `create_session` honours it everywhere (timing, accuracy, serving), never to raise the thread count.
THREADS_KEY = "onnxforge.intra_op_threads"


def threads_hint(session: ort.InferenceSession) -> int:
    """The intra-op thread count the session's model asks for (THREADS_KEY), 0 when it asks for none."""
    value = session.get_modelmeta().custom_metadata_map.get(THREADS_KEY, "")
    return int(value) if value.isdigit() else 0


_arena_lock = threading.Lock()
_arena_bytes: list[int] = []  # the cap of the process's shared arena, once registered


def shared_arena(max_bytes: int) -> int:
    """Register the process's shared CPU arena of at most `max_bytes` (once; ONNX Runtime keeps one per process) and
    return its cap: a later call with another cap gets the first one, with a warning.

    WHY: a session's own arena grows to whatever a run asks for and keeps it: a run of a ~300-byte model that expands
    one row to 2^28 floats took 4.4 s and 1.1 GiB, kept after it. With the cap, an allocation past it fails that run
    at once (0.00 s, nothing allocated) with ONNX Runtime's "Available memory of N is smaller than requested bytes of
    M" (`arena_refusal`), and the other sessions run on. Measured with ORT 1.32 (notes/memguard): the same outputs
    and no latency change above the noise for the test cnn/mlp/transformer. Weights are not placed in it (three
    sessions of a 128 MiB model loaded under a 64 MiB cap), so it bounds the runs' tensors only. It does not bound
    constant folding at session creation, which ONNX Runtime runs outside the arena (ConstantOfShape([2^28]) folded
    at 2.1 GiB peak under a 256 MiB cap).
    """
    with _arena_lock:
        if not _arena_bytes:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(max_bytes, -1, -1, -1))
            _arena_bytes.append(max_bytes)
        elif _arena_bytes[0] != max_bytes:
            log.warning("the shared ONNX Runtime arena is already capped at %d bytes in this process; %d asked for "
                        "later is not applied", _arena_bytes[0], max_bytes)
        return _arena_bytes[0]


_REFUSAL = re.compile(r"Available memory of (\d+) is smaller than requested bytes of (\d+)")


def arena_refusal(exc: BaseException) -> tuple[int, int] | None:
    """(bytes asked, the shared arena's cap) when `exc` is a run the shared arena refused (`shared_arena`), else
    None."""
    found = _REFUSAL.search(str(exc))
    if not found or not _arena_bytes:
        return None
    return int(found[2]), _arena_bytes[0]


@functools.cache
def _threads_within_limit() -> int:
    """0 (ONNX Runtime's own default, one thread per physical core) unless an affinity or CPU quota leaves this
    process fewer CPUs than the machine has: then that many. Read once: the limits of a running process stay."""
    limit = cpu_limit()
    return limit if limit < (os.cpu_count() or limit) else 0


def timing_threads(requested: int) -> dict[str, Any]:
    """The intra-op threads every timing ran with, for the report: `threads` 0 alone does not say it, and a worker
    timing on a big host's cores while API replicas limited to 2 CPUs serve on 2 must be visible there."""
    used = requested or _threads_within_limit()
    rule = ("as configured" if requested else "the CPUs this process may use (affinity or CPU quota)" if used
            else "ONNX Runtime's default: one per physical core of the machine")
    return {"intra_op_threads": used or None, "cpus_usable": cpu_limit(), "rule": rule,
            "note": "a '-1thread' variant runs on one thread whatever this says"}


def session_provider(session: ort.InferenceSession) -> str:
    """What the session really runs on ("cuda" or "cpu"), not what was asked for."""
    return "cuda" if session.get_providers()[0] == CUDA else "cpu"


def default_threads() -> int:
    """Threads per session when the user says nothing: the CPUs this process may really use (cpu_limit)."""
    return cpu_limit()


def cpu_limit(cgroup_root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """The CPUs this process may use: its affinity (taskset, docker --cpuset-cpus), capped by the CPU quota of its
    cgroup or any parent (docker --cpus, compose `cpus:`, Kubernetes limits), rounded up.

    Our own code because ONNX Runtime sizes its default pool from the machine's cores, ignoring both (measured with
    ORT 1.32: the same pool under `taskset -c 0` as on both cores): four API replicas of a 16-core host limited to
    2 CPUs each would each run 16 threads, and the quota would stall them all in turn.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux: no cgroups either
        return os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root, proc_cgroup)
    return max(1, min(cpus, math.ceil(quota))) if quota else cpus


def _cgroup_quota(root: Path, proc_cgroup: Path) -> float | None:
    """The smallest CPU quota (in CPUs) on this process's cgroup path, cgroup v2 (cpu.max) or v1 (cpu.cfs_*);
    None when there is none. The path is walked up to the mount: inside a container the mount is the container's
    own cgroup, while /proc/self/cgroup may name the host's path for it."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy
            mounts, read = [root], _v2_quota
        elif "cpu" in controllers.split(","):
            mounts, read = [root / controllers, root / "cpu", root / "cpu,cpuacct"], _v1_quota
        else:
            continue
        for mount in mounts:
            folder = mount / path.lstrip("/")
            while True:
                quota = read(folder)
                if quota is not None:
                    quotas.append(quota)
                if folder == mount or mount not in folder.parents:
                    break
                folder = folder.parent
    return min(quotas) if quotas else None


def _v2_quota(folder: Path) -> float | None:
    try:
        limit, period = (folder / "cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    return None if limit == "max" else int(limit) / int(period)


def _v1_quota(folder: Path) -> float | None:
    try:
        limit = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if limit <= 0 or period <= 0 else limit / period
