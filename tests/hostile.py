"""A corpus of hostile and broken uploads, built by code (no binary blobs in the repository).

Each builder returns the bytes a malicious or careless user could send: a model file (`model_*`)
or a calibration .npz (`npz_*`). tests/test_hardening_hostile.py sends each one and states the
answer it must get.
"""

from __future__ import annotations

import io
import struct
import zipfile

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests import models

IR_VERSION = 8
OPSET = 17


def _model(nodes: list, inputs: list, outputs: list, initializers: list | None = None,
           opsets: list | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "hostile", inputs, outputs, initializer=initializers or [])
    return helper.make_model(graph, ir_version=IR_VERSION,
                             opset_imports=opsets or [helper.make_opsetid("", OPSET)])


def random_bytes(size: int = 4096, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).bytes(size)


def truncated_model() -> bytes:
    """A real model cut mid-tensor: protobuf that ends inside a field."""
    data = models.mlp().SerializeToString()
    return data[: len(data) * 2 // 3]


def model_external_data(location: str) -> bytes:
    """A weight whose bytes "live" in an external file at `location` (e.g. /etc/passwd, ../../x)."""
    weight = TensorProto()
    weight.name, weight.data_type = "w", TensorProto.FLOAT
    weight.dims.extend([4, 4])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "64")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    return _model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight]).SerializeToString()


def model_with_cycle() -> bytes:
    """a = Add(x, b); b = Relu(a): no topological order exists."""
    return _model([helper.make_node("Add", ["x", "b"], ["a"]), helper.make_node("Relu", ["a"], ["b"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                  [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 4])]).SerializeToString()


def model_absurd_input_dims() -> bytes:
    """An input declared as 1e6 x 1e6 floats (4 TB): running it as declared can only fail."""
    return _model([helper.make_node("Relu", ["x"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1_000_000, 1_000_000])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1_000_000, 1_000_000])]).SerializeToString()


def model_absurd_initializer() -> bytes:
    """An initializer that declares 1e12 elements and carries 16 bytes."""
    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1_000_000, 1_000_000], raw_data=b"\0" * 16)
    return _model([helper.make_node("Add", ["x", "w"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1_000_000, 1_000_000])],
                  [weight]).SerializeToString()


def model_custom_op() -> bytes:
    """A node of a custom domain that ONNX Runtime has no kernel for."""
    return _model([helper.make_node("Frobnicate", ["x"], ["y"], domain="com.evil")],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                  opsets=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.evil", 1)]).SerializeToString()


def model_memory_hog(elements: int) -> onnx.ModelProto:
    """A valid, small file whose run materialises `elements` floats (Expand to a constant shape).

    Loads fine; only running it costs memory, so it passes upload validation and trips the job's
    memory limit in the optimizer process.
    """
    shape = numpy_helper.from_array(np.array([elements, 1], np.int64), "shape")
    nodes = [helper.make_node("Expand", ["x", "shape"], ["big"]),
             helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0)]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])], [shape])


def model_that_hangs() -> onnx.ModelProto:
    """A Loop with an astronomic trip count and a body that always continues: its run never ends."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["acc_in", "one"], ["acc_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [1, 1])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [1, 1])],
        [numpy_helper.from_array(np.ones((1, 1), np.float32), "one")],
    )
    trips = numpy_helper.from_array(np.array(2**62, np.int64), "trips")
    keep_going = numpy_helper.from_array(np.array(True), "keep_going")
    return _model([helper.make_node("Loop", ["trips", "keep_going", "x"], ["y"], body=body)],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])], [trips, keep_going])


# -- calibration sets ------------------------------------------------------------------------------


def _npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    """A .npy v1 header declaring `shape`, padded as numpy writes it."""
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape!r}, }}"
    pad = 64 - (10 + len(text) + 1) % 64
    text = text + " " * pad + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin-1")


def npz_declared_huge(name: str = "features") -> bytes:
    """An .npz whose array header declares 1e12 x 64 floats behind a few bytes of data."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(f"{name}.npy", _npy_header((1_000_000_000_000, 64)) + b"\0" * 256)
    return buffer.getvalue()


def npz_zip_bomb(name: str = "features", rows: int = 9 << 20) -> bytes:
    """A deflated .npz of zeros: ~10 MB sent, `rows` x 64 floats (2.25 GiB at the default) once inflated.

    `rows` is rounded down to a multiple of 4096. Slow to build (seconds): for slow tests.
    """
    rows -= rows % 4096
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive, \
            archive.open(f"{name}.npy", "w", force_zip64=True) as member:
        member.write(_npy_header((rows, 64)))
        chunk = b"\0" * (64 * 4 * 4096)
        for _ in range(rows // 4096):
            member.write(chunk)
    return buffer.getvalue()


def npz_with_pickle(name: str = "features") -> bytes:
    """An object array: np.save pickles it, and loading it would run the pickle."""
    buffer = io.BytesIO()
    values = np.empty(2, dtype=object)
    values[0], values[1] = {"evil": 1}, [1, 2]
    np.savez(buffer, **{name: values})
    return buffer.getvalue()


def npz_with_traversal(name: str = "features") -> bytes:
    """A zip member named ../../<name>.npy next to a proper one (an extractor would write outside)."""
    buffer = io.BytesIO()
    array = io.BytesIO()
    np.save(array, np.zeros((8, 64), np.float32))
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(f"../../{name}.npy", array.getvalue())
    return buffer.getvalue()
