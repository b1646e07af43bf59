"""The CUDA path reviewed on a machine without a GPU: CUDA is chosen only when a session really gets it and runs on
it; everywhere else the optimizer and the service run on the CPU and say so, and why.

What the CPU suite cannot show was run by hand with onnxruntime-gpu 1.31.1 and no GPU (notes in the commit): its
probe output is quoted below as ONNX Runtime wrote it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from optimizer.candidates import auto_plan
from optimizer.environment import environment, gpu_info
from optimizer.passes import fp16
from optimizer.pipeline import OptimizeConfig, optimize
from optimizer.runtime import (
    CPU,
    CUDA,
    SessionSettings,
    create_session,
    cuda_is_usable,
    cuda_unavailable_reason,
    probe_provider,
    probe_verdict,
    resolve_provider,
)
from tests import models

# What onnxruntime-gpu 1.31.1 wrote to stderr for a session asking for CUDA on a machine without CUDA's libraries.
ORT_GPU_WITHOUT_CUDA = (
    "\x1b[1;31m2026-11-28 03:23:13.029904871 [E:onnxruntime:Default, provider_bridge_ort.cc:2458 operator()] "
    "/onnxruntime_src/onnxruntime/core/session/provider_bridge_ort.cc:2043 onnxruntime::Provider& "
    "onnxruntime::ProviderLibrary::Get() [ONNXRuntimeError] : 1 : FAIL : Failed to load library "
    "/venv/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime_providers_cuda.so with error: "
    "libcublasLt.so.13: cannot open shared object file: No such file or directory\n\x1b[m\n"
    "\x1b[0;93m2026-11-28 03:23:13.029945638 [W:onnxruntime:Default, onnxruntime_pybind_state.cc:1295 "
    "CreateExecutionProviderFactoryInstance] Failed to create CUDAExecutionProvider. Require cuDNN 9.* and CUDA 13.*."
    "\x1b[m\n"
)
CUDA_HERE = cuda_is_usable()


def test_the_probe_runs_a_session_in_a_child_and_reads_back_what_it_got() -> None:
    """The CPU provider passes the probe (the session got it, x + x came out right); CUDA, here, does not."""
    cpu = probe_provider(CPU)
    assert cpu.works and cpu.providers == (CPU,) and cpu.detail is None
    if not CUDA_HERE:
        cuda = probe_provider(CUDA)
        assert not cuda.works and CUDA not in cuda.providers[:1]
        assert cuda.detail  # ONNX Runtime's words, or what the session fell back to


def test_the_probe_reads_onnxruntimes_reason_and_trusts_only_what_ran() -> None:
    got = probe_verdict(CUDA, "\n" + json.dumps({"providers": [CPU], "ran": True, "error": None}),
                        ORT_GPU_WITHOUT_CUDA)
    assert not got.works and got.providers == (CPU,)
    assert got.detail == ("libonnxruntime_providers_cuda.so did not load: libcublasLt.so.13: cannot open shared "
                          "object file: No such file or directory")
    # the session got CUDA but the kernel failed (a GPU the wheel has no kernels for): not usable
    failed = probe_verdict(CUDA, json.dumps({"providers": [CUDA, CPU], "ran": False, "error": "RuntimeError: CUDA "
                                             "error cudaErrorNoKernelImageForDevice: no kernel image is available"}),
                           "")
    assert not failed.works and "no kernel image" in failed.detail
    wrong = probe_verdict(CUDA, json.dumps({"providers": [CUDA, CPU], "ran": False, "error": None}), "")
    assert not wrong.works and "wrong" in wrong.detail
    crashed = probe_verdict(CUDA, "", "Segmentation fault", returncode=-11)
    assert not crashed.works and "code -11" in crashed.detail
    assert probe_verdict(CUDA, json.dumps({"providers": [CUDA, CPU], "ran": True, "error": None}), "").works


def test_the_reason_names_what_is_missing_in_onnxruntimes_words(tmp_path: Path) -> None:
    said = "libonnxruntime_providers_cuda.so did not load: libcublasLt.so.13: cannot open shared object file"
    reason = cuda_unavailable_reason([CUDA, CPU], session_works=False, dev=tmp_path, detail=said)
    assert "no NVIDIA GPU is visible" in reason and said in reason
    (tmp_path / "dxg").touch()  # WSL2's GPU has no /dev/nvidia*
    reason = cuda_unavailable_reason([CUDA, CPU], session_works=False, dev=tmp_path, detail=said)
    assert "a GPU is visible" in reason and said in reason


def test_auto_says_why_it_serves_on_cpu_where_onnxruntime_gpu_cannot_run(caplog: pytest.LogCaptureFixture) -> None:
    """onnxruntime-gpu installed (CUDA listed) means someone meant a GPU: auto falling back to CPU is logged with
    the reason; the CPU wheel (CUDA not listed) choosing CPU is the expected case and says nothing."""
    with caplog.at_level(logging.WARNING, logger="optimizer.runtime"):
        assert resolve_provider("auto", cuda_usable=False, available=[CUDA, CPU]) == "cpu"
    assert [r.getMessage() for r in caplog.records if "auto chose CPU" in r.getMessage()], caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="optimizer.runtime"):
        assert resolve_provider("auto", cuda_usable=False, available=[CPU]) == "cpu"
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="optimizer.runtime"):
        assert resolve_provider("cuda", cuda_usable=False, available=[CPU]) == "cpu"
    assert "install onnxruntime-gpu" in caplog.text


def test_gpu_and_driver_are_read_for_a_cuda_report(tmp_path: Path) -> None:
    (tmp_path / "gpus" / "0000:01:00.0").mkdir(parents=True)
    (tmp_path / "gpus" / "0000:01:00.0" / "information").write_text(
        "Model: \t\t NVIDIA L4\nIRQ:   \t\t 123\nGPU UUID: \t GPU-0\n")
    (tmp_path / "version").write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.65.06  Sun Jul 27 "
                                      "07:09:11 UTC 2025\nGCC version:  gcc version 12.2.0\n")
    info = gpu_info(tmp_path)
    assert info is not None and info["models"] == ["NVIDIA L4"] and info["driver"] == "580.65.06"
    assert environment("cuda", driver=tmp_path)["gpu"]["models"] == ["NVIDIA L4"]
    assert environment("cuda", driver=tmp_path)["execution_provider"] == CUDA
    assert environment("cpu", driver=tmp_path)["gpu"] is None  # a CPU figure is not the GPU's
    assert gpu_info(tmp_path / "absent") is None


def test_the_report_names_the_onnxruntime_really_imported() -> None:
    env = environment("cpu")
    assert env["onnxruntime"] == ort.__version__ and env["execution_provider"] == CPU
    assert ort.__version__ in env["onnxruntime_packages"].values()
    assert env["onnxruntime_warning"] is None  # one wheel here


def test_fp16_for_cuda_keeps_float32_inputs_and_outputs() -> None:
    plan = auto_plan(provider="cuda", method="minmax", has_calibration=True)
    assert [c.name for c in plan.candidates] == ["fp16"] and plan.candidates[0].settings["keep_io_types"] is True
    assert [s["name"] for s in plan.skipped] == ["int8"] and "CUDA" in plan.skipped[0]["reason"]
    model = models.cnn()
    feed = models.random_feed(model)
    converted = fp16.run(model, fp16.Fp16Config(provider="cuda"), feed).model
    for value in [*converted.graph.input, *converted.graph.output]:
        assert value.type.tensor_type.elem_type == TensorProto.FLOAT, value.name
    assert sum(t.data_type == TensorProto.FLOAT16 for t in converted.graph.initializer) > 0
    # clients send and get float32: the same feed runs both, and the answers agree to float16's precision
    ours = create_session(converted.SerializeToString()).run(None, feed)[0]
    theirs = create_session(model.SerializeToString()).run(None, feed)[0]
    assert ours.dtype == np.float32 and np.allclose(ours, theirs, atol=1e-2)


@pytest.mark.skipif(CUDA_HERE, reason="CUDA works here: a cuda request is met")
def test_a_cuda_request_without_cuda_is_optimized_timed_and_reported_on_cpu(tmp_path: Path) -> None:
    model = models.cnn()
    config = OptimizeConfig(provider="cuda", threads=1, time_budget_s=4.0, benchmark_seconds=0.2, batch_sizes=(1,))
    report = optimize(model.SerializeToString(), out_dir=tmp_path, config=config).report
    assert report["config"]["provider"] == "cuda"  # what was asked, beside what served
    assert report["provider"] == "cpu" and report["environment"]["execution_provider"] == CPU
    assert report["environment"]["gpu"] is None
    timed = [row["latency_by_batch"]["1"] for row in report["variants"] if row.get("latency_by_batch")]
    assert timed and {t["provider"] for t in timed} == {"cpu"}  # read back from every timed session
    # the CPU plan ran, not CUDA's FP16-only one (its "int8" skip would name the CUDA provider)
    assert not any("CUDA provider" in s["reason"] for s in report["skipped_candidates"])
    assert create_session(onnx.load(tmp_path / "model.onnx").SerializeToString(),
                          SessionSettings(provider=report["provider"])).get_providers()[0] == CPU


@pytest.mark.skipif(CUDA_HERE, reason="CUDA works here: a cuda session gets it")
def test_a_session_asked_for_cuda_that_gets_cpu_says_so(caplog: pytest.LogCaptureFixture) -> None:
    """Whoever builds SessionSettings(provider="cuda") without resolve_provider (or a session ONNX Runtime falls
    back for on a GPU machine) gets a CPU session: read back, and logged, never taken for CUDA."""
    with caplog.at_level(logging.WARNING, logger="optimizer.runtime"):
        session = create_session(models.mlp().SerializeToString(), SessionSettings(provider="cuda"))
    assert session.get_providers()[0] == CPU
    assert "a session asked for CUDA got CPUExecutionProvider" in caplog.text
