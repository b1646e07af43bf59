"""A tiny model whose load constant-folds a huge tensor is refused at upload (400 naming the limit), in the validation
child, instead of taking the API process's memory at its first predict (security review finding 3, a09)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from app.services import fold_guard
from optimizer.errors import UnsupportedModelError
from optimizer.loading import LoadMemoryError, load_model
from optimizer.runtime import SessionSettings
from tests import models


def fold_model(n: int, computed_shape: bool = False) -> onnx.ModelProto:
    """The review's a09 model: ConstantOfShape([n]) -> ReduceSum -> Add; ~200 bytes, n floats folded at load.
    `computed_shape`: the shape is a Concat of two constants [n / 2^14, 2^14] (plain shape inference cannot see it)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"],
                              value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
             helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0), helper.make_node("Add", ["x", "s"], ["y"])]
    constants = [numpy_helper.from_array(np.array([n], np.int64), "shape")]
    if computed_shape:
        nodes.insert(0, helper.make_node("Concat", ["rows", "cols"], ["shape"], axis=0))
        constants = [numpy_helper.from_array(np.array([n >> 14], np.int64), "rows"),
                     numpy_helper.from_array(np.array([1 << 14], np.int64), "cols")]
    graph = helper.make_graph(nodes, "g", [x], [y], constants)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _hwm_mib() -> int:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) // 1024


# 2^28 floats = 1 GiB folded (2.1 GiB peak unbounded). Under 1536 MiB more ORT's fold fails with std::bad_alloc; under
# 256 MiB it is skipped silently (the session loads) and the shapes catch it, also when the shape is computed. All
# must be the same 400.
@pytest.mark.parametrize(("limit_mb", "computed_shape"), [(1536, False), (256, False), (256, True)])
def test_a_huge_folded_constant_is_a_400_at_upload_and_the_api_stays_small(
        serve, monkeypatch, limit_mb: int, computed_shape: bool) -> None:  # noqa: ANN001
    monkeypatch.setattr(fold_guard, "LOAD_MEMORY_MB", limit_mb)
    monkeypatch.setattr(fold_guard, "LOAD_MEMORY_PER_FILE_BYTE", 0)  # the limit is then exactly limit_mb
    with serve(run_worker=False) as api:
        before = _hwm_mib()
        refused = api.upload(fold_model(1 << 28, computed_shape), "fold.onnx", precision="fp32")
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert f"loading this model needs more than {limit_mb:,} MiB" in error, error
        assert "a constant the graph computes at load time is too large" in error, error
        assert api.client.get("/v1/models").json() == []  # nothing kept, so no predict can fold it here
        assert _hwm_mib() - before < 256  # the API process never held the constant (it is 1024 MiB)
        assert api.upload(models.mlp(), "next.onnx").status_code == 202  # the next upload is served as before


def test_ordinary_models_pass_the_default_limit(serve) -> None:  # noqa: ANN001
    with serve(run_worker=False) as api:
        for name, model in [("cnn", models.cnn()), ("mlp", models.mlp()), ("transformer", models.transformer()),
                            ("lstm", models.lstm()), ("small-fold", fold_model(1 << 16))]:
            answer = api.upload(model, f"{name}.onnx")
            assert answer.status_code == 202, (name, answer.text)


def test_largest_folded_constant_sees_constant_subgraphs_only() -> None:
    proto = load_model(fold_model(1 << 28).SerializeToString()).proto
    assert fold_guard.largest_folded_constant(proto) == ("big", 4 << 28)
    computed = load_model(fold_model(1 << 28, computed_shape=True).SerializeToString()).proto
    assert fold_guard.largest_folded_constant(computed) == ("big", 4 << 28)  # [2^14, 2^14] floats
    # the cnn's weights are initializers, its activations depend on the input: nothing is computed from constants
    assert fold_guard.largest_folded_constant(load_model(models.cnn()).proto) is None


_CHILD = """
import resource, sys
from optimizer.errors import UnsupportedModelError
from optimizer.loading import LoadMemoryError, load_model
from optimizer.runtime import SessionSettings
from tests.test_upload_fold_guard import fold_model
with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + (1536 << 20), resource.RLIM_INFINITY))
try:
    load_model(fold_model(1 << 28), session=SessionSettings(intra_op_threads=1))
except LoadMemoryError as exc:
    print("refused:", exc)
else:
    print("loaded")
"""


def test_the_library_names_a_fold_that_ran_out_of_memory() -> None:
    """load_model at the serving level, in a process with an address-space limit: LoadMemoryError, not ORT's words."""
    done = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("refused: ONNX Runtime ran out of memory creating a session"), done.stdout
    assert issubclass(LoadMemoryError, UnsupportedModelError)  # a 400 wherever optimizer errors are answered
    assert resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY  # this process was not limited
    assert SessionSettings().optimization_level == "all"  # the serving level the upload path checks at
