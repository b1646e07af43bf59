"""One auto search pre-processes its source once: its static and dynamic INT8 builds share the result of
quant_pre_process (int8_dynamic.Preprocessed, handed to int8_static.SharedCalibration), which on MiniLM costs
about as much as one quantization (2-4 s) and before ran once for the static builds and once for the dynamic ones.
"""

from __future__ import annotations

from optimizer.candidates import static_name
from tests import models
from tests.test_auto import search_on

STATIC = (static_name("minmax", "qoperator", "uint8", ("Conv", "MatMul", "Gemm")),
          static_name("minmax", "qdq", "uint8", None))
DYNAMIC = ("int8-dynamic-s8-pc", "int8-dynamic-u8-pc")


def test_the_static_and_dynamic_builds_of_a_search_pre_process_the_source_once() -> None:
    search = search_on(models.mlp())
    search.only = (*STATIC, *DYNAMIC)
    search._probe()

    built = {name: search.built[name].row for name in (*STATIC, *DYNAMIC)}
    assert all(row.status in ("ok", "rejected") for row in built.values()), {n: r.reason for n, r in built.items()}
    assert search.prepared.reused == 2  # was 1: the second dynamic build; now the static builds too
    assert search.prepared.runs == 1  # was 2: the static builds' quant_pre_process, then the dynamic ones'
    assert search.shared.preprocessed is search.prepared
    # the dynamic builds quantized the very model the static builds were calibrated on
    assert all(row.changes["quantized_ops"] for row in built.values())


def test_a_source_that_needs_an_opset_conversion_for_static_is_pre_processed_once_per_model() -> None:
    """Static pre-processes the opset-13 conversion (per-channel axis), dynamic the source as given: two models,
    two runs, each reused by its own mode's later builds."""
    model = models.mlp()
    model.opset_import[0].version = 11
    search = search_on(model)
    search.only = (*STATIC, *DYNAMIC)
    search._probe()
    assert search.prepared.runs == 2
    assert search.prepared.reused == 1  # the second dynamic build
