"""precision=auto on an x86 CPU without VNNI: 7-bit weight (reduce_range) twins of the U8S8 recipes.

The CPU's flags are handed to the plan as text or a set (the same parsing as /proc/cpuinfo), so what the
grid is does not depend on the machine the tests run on. Builds are real ONNX Runtime quantizations.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from optimizer.accuracy import Tolerance, compare, run_outputs
from optimizer.candidates import (
    auto_plan,
    cpu_flags,
    cpu_has_fp16_arithmetic,
    dynamic_candidate,
    static_candidate,
    u8s8_saturates,
)
from optimizer.passes.equalize import Equalized
from optimizer.runtime import SessionSettings, create_session
from tests import models
from tests.test_auto import search_on
from tests.test_auto_targets import _failing, _search

EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2
"""
XEON = EPYC.replace("avx2 bmi2", "avx2 bmi2 avx512f avx512bw avx512_vnni amx_tile amx_int8 avx512_fp16")
GRAVITON = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32 asimdhp asimddp\nCPU implementer\t: 0x41\n"
AVX2 = cpu_flags(EPYC)
VNNI = cpu_flags(XEON)
U8S8_RR = [f"int8-static-minmax-{fmt}-u8s8-{scope}-rr" for fmt in ("qoperator", "qdq") for scope in ("all", "heavy")]


def test_cpu_flags_are_read_from_the_cpuinfo_text_and_only_x86_without_vnni_saturates() -> None:
    assert {"avx2", "sse4_1"} <= AVX2 and "avx512_vnni" not in AVX2
    assert u8s8_saturates(AVX2) is True
    assert u8s8_saturates(VNNI) is False
    assert u8s8_saturates(cpu_flags(XEON.replace("avx512_vnni amx_tile amx_int8", "avx_vnni"))) is False
    assert u8s8_saturates(cpu_flags(GRAVITON)) is False  # ARM: no vpmaddubsw
    assert u8s8_saturates(cpu_flags("")) is False  # unreadable: nothing assumed
    assert cpu_has_fp16_arithmetic(VNNI) and cpu_has_fp16_arithmetic(cpu_flags(GRAVITON))
    assert not cpu_has_fp16_arithmetic(AVX2)


def _names(cpu: frozenset[str], matmul_heavy: bool = False) -> tuple[list[str], dict[str, str], list[str]]:
    plan = auto_plan(provider="cpu", method="minmax", has_calibration=True, fp16_on_cpu=False,
                     matmul_heavy=matmul_heavy, cpu=cpu, equalized=Equalized())
    return [c.name for c in plan.candidates], {s["name"]: s["reason"] for s in plan.skipped}, plan.notes


def test_without_vnni_the_grid_adds_reduce_range_twins_of_the_u8s8_recipes_and_says_why() -> None:
    names, skipped, notes = _names(AVX2)
    assert [n for n in names if n.endswith("-rr")] == [*U8S8_RR, "int8-dynamic-s8-pc-rr"]
    for twin in U8S8_RR:  # right after its plain recipe (same kernels, same speed), the "-eq" one in between
        plain = twin.removesuffix("-rr")
        assert names.index(twin) == names.index(plain) + (2 if plain + "-eq" in names else 1)
    assert "no VNNI" in notes[0] and "vpmaddubsw" in notes[0]
    transformer, _, _ = _names(AVX2, matmul_heavy=True)
    assert transformer[:3] == ["int8-dynamic-s8-pc", "int8-dynamic-s8-pc-rr", "int8-dynamic-u8-pc"]
    # S8S8 measured slower than FP32 and than U8S8 on such a CPU: not built, and the table says why
    assert not [n for n in names + transformer if "s8s8" in n]
    assert len([n for n in skipped if "-s8s8-" in n]) == 4
    assert all("no VNNI" in r and "measured slower" in r for n, r in skipped.items() if "-s8s8-" in n)


def test_with_vnni_the_grid_has_no_reduce_range_twin_and_keeps_s8s8() -> None:
    names, skipped, notes = _names(VNNI)
    assert not [n for n in names if n.endswith("-rr")] and notes == []
    assert "has VNNI" in skipped["int8 reduce_range (-rr)"]
    assert len([n for n in names if "-s8s8-" in n]) == 4


def test_a_recipe_held_back_for_the_cpu_is_built_when_asked_for_by_name() -> None:
    model = models.mlp()
    search = search_on(model)
    held, planned = "int8-static-minmax-qdq-s8s8-heavy", "int8-static-minmax-qdq-u8s8-heavy-rr"
    search.cpu, search.only = AVX2, (held, planned)
    search.tolerance = Tolerance(metrics={"logits": "cosine"})  # (5 held-back rows cannot prove a top-1 of 99%)
    search._probe()
    assert set(search.built) == {"fused", held, planned}
    assert search.built[held].row.status == "ok", search.built[held].row.reason
    skipped = {s["name"] for s in search.skipped}
    assert held not in skipped and "int8-static-minmax-qdq-s8s8-all" in skipped
    assert any("no VNNI" in d for d in search.decisions)


def _feeds(model: onnx.ModelProto, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    return [models.random_feed(model, batch=1, seed=seed + i) for i in range(count)]


def _int8_weights(model: onnx.ModelProto) -> list[np.ndarray]:
    return [numpy_helper.to_array(t) for t in model.graph.initializer
            if t.data_type == TensorProto.INT8 and len(t.dims) == 2]


def test_reduce_range_builds_hold_7_bit_weights_run_in_ort_and_pass_accuracy_on_an_mlp() -> None:
    model = models.mlp()
    search = search_on(model)
    reference = run_outputs(create_session(model.SerializeToString()), search.samples.holdout)
    for candidate, plain in ((static_candidate("minmax", "qdq", "uint8", reduce_range=True, shared=search.shared),
                              static_candidate("minmax", "qdq", "uint8", shared=search.shared)),
                             (dynamic_candidate("int8", reduce_range=True, prepared=search.prepared),
                              dynamic_candidate("int8", prepared=search.prepared))):
        built = candidate.build(model, search.samples).model
        weights = _int8_weights(built)
        assert weights and all(w.min() >= -64 and w.max() <= 64 for w in weights), candidate.name
        # per-channel 8-bit weights reach +-127 on every channel; the 7-bit twin halves that range
        assert max(int(np.abs(w).max()) for w in _int8_weights(plain.build(model, search.samples).model)) == 127
        report = compare(reference, run_outputs(create_session(built.SerializeToString(), SessionSettings()),
                                                search.samples.holdout),
                         Tolerance(metrics={"logits": "cosine"}))  # (5 held-back rows cannot prove a top-1 of 99%)
        assert report.passed, (candidate.name, report.reason)
        assert candidate.settings["reduce_range"] is True


def test_a_repair_works_on_the_reduce_range_twin_when_it_is_closer_to_passing() -> None:
    plain = _failing("qdq-u8-heavy", "qdq", "uint8", True, cosine=0.95, p50=1.0)  # first by probe time
    twin = _failing("qdq-u8-heavy-rr", "qdq", "uint8", True, cosine=0.985, p50=1.01)
    twin.settings["reduce_range"] = True
    search = _search(models.mlp(), [plain, twin])
    search._repair()  # deadline passed: the target is chosen and recorded, nothing is built
    assert [r["target"] for r in search.repairs] == ["qdq-u8-heavy-rr"]
    skipped = {s["name"]: s["reason"] for s in search.skipped}
    assert "only reduce_range differs" in skipped["qdq-u8-heavy (repair)"]


def test_no_histogram_calibration_for_a_recipe_whose_reduce_range_twin_passes() -> None:
    plain = _failing("int8-static-minmax-qdq-u8s8-heavy", "qdq", "uint8", True, cosine=0.95, p50=1.0)
    twin = _failing("int8-static-minmax-qdq-u8s8-heavy-rr", "qdq", "uint8", True, cosine=0.995, p50=1.0)
    twin.settings["reduce_range"], twin.status, twin.accuracy["passed"] = True, "ok", True
    search = _search(models.mlp(), [plain, twin])
    search.other_methods()
    skipped = {s["name"]: s["reason"] for s in search.skipped}
    for method in ("percentile", "entropy"):
        assert skipped[f"int8-static-{method}-qdq-u8s8-heavy"].startswith(f"{twin.name} runs the same kernels")
        assert "already passes" in skipped[f"int8-static-{method}-qdq-u8s8-heavy-rr"]
