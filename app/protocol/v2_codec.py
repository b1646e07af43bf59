"""Open Inference Protocol (KServe v2) tensors on the wire <-> numpy, JSON and binary extension alike.

Only encoding lives here: which model runs and how inputs are checked is app/services/predict.py.
Binary tensors go straight into numpy (`np.frombuffer`, no Python lists); JSON goes through orjson.
The binary extension: the body is a JSON header whose byte length is in the
`Inference-Header-Content-Length` header, followed by each tensor with `parameters.binary_data_size`
in the order of the header's `inputs` (row-major, little-endian; BYTES as 4-byte length + bytes).
"""

from __future__ import annotations

import math
import struct
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from app.errors import BadRequestError
from app.protocol.json_tokens import loads_with_nan_tokens

HEADER_LENGTH = "inference-header-content-length"
SHARED_MEMORY = ("shared memory is not supported (no region can be registered): send tensors in the request body; "
                 "binary_data=True (the binary tensor extension) is the fast way")

DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8), "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
_NAMES = {dtype: name for name, dtype in DATATYPES.items()}
_WIRE = {name: dtype.newbyteorder("<") for name, dtype in DATATYPES.items()}  # the wire is little-endian
_LITTLE = sys.byteorder == "little"


def datatype_of(dtype: np.dtype | None) -> str | None:
    """The v2 datatype string of a numpy dtype (strings -> BYTES); None if v2 has none."""
    if dtype is None:
        return None
    name = _NAMES.get(dtype)  # a native dtype: one dict lookup, no dtype built per call (the hot path)
    if name is not None:
        return name
    if dtype.kind in "USO":
        return "BYTES"
    return _NAMES.get(np.dtype(dtype).newbyteorder("="))


@dataclass
class InferRequest:
    inputs: dict[str, np.ndarray]
    id: str | None = None
    outputs: list[str] | None = None  # None: all of the model's outputs
    binary_outputs: set[str] = field(default_factory=set)
    binary_default: bool = False  # `binary_data_output`: outputs not named in `outputs` come as binary
    classification: dict[str, int] = field(default_factory=dict)  # output -> class count (Triton's extension)


# -- decoding ----------------------------------------------------------------------------------------


def _bytes_elements(raw: memoryview, name: str) -> list[bytes]:
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise BadRequestError(f"input {name!r}: BYTES data is cut off (a 4-byte length prefix is incomplete)")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise BadRequestError(f"input {name!r}: BYTES element of {length} bytes runs past the tensor's data")
        items.append(bytes(raw[offset:offset + length]))
        offset += length
    return items


def _strings(items: list[bytes]) -> np.ndarray:
    """ONNX Runtime's string tensors want str: decode UTF-8, refusing what is not."""
    try:
        return np.array([b.decode("utf-8") for b in items], dtype=object)
    except UnicodeDecodeError:
        raise BadRequestError("BYTES input holds data that is not UTF-8 text: ONNX string inputs need text") from None


def _shape(spec: dict, name: str) -> tuple[int, ...]:
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                               for d in shape):
        raise BadRequestError(f"input {name!r}: `shape` must be a list of non-negative integers, got {shape!r}")
    return tuple(shape)


def _decode_binary(name: str, datatype: str, shape: tuple[int, ...], raw: memoryview) -> np.ndarray:
    count = math.prod(shape)  # Python ints: no int64 overflow, and ~10x cheaper than np.prod on a short tuple
    if datatype == "BYTES":
        items = _bytes_elements(raw, name)
        if len(items) != count:
            raise BadRequestError(f"input {name!r}: shape {list(shape)} needs {count} elements, got {len(items)}")
        return _strings(items).reshape(shape)
    dtype = DATATYPES[datatype]
    if len(raw) != count * dtype.itemsize:
        raise BadRequestError(
            f"input {name!r}: {datatype} shape {list(shape)} needs {count * dtype.itemsize} bytes, "
            f"binary_data_size is {len(raw)}"
        )
    return np.frombuffer(raw, dtype=_WIRE[datatype]).reshape(shape)


def _big_integers(name: str, datatype: str, array: np.ndarray, data: Any) -> np.ndarray:  # noqa: ANN401
    """`data` as the integer dtype when every value is an integer: numpy reads integers past int64's range as float64
    (or objects past uint64's), which refused UINT64 values over 2**63 as "numbers with a fraction" and would round
    those over 2**53. Else `array` unchanged, for the usual checks and messages."""
    flat = np.asarray(data, dtype=object).reshape(-1)
    if not all(type(v) is int for v in flat):
        return array
    try:
        return np.array(flat.tolist(), dtype=DATATYPES[datatype]).reshape(array.shape)
    except OverflowError:
        raise BadRequestError(f"input {name!r}: values outside the range of {datatype}") from None


def _decode_json(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> np.ndarray:  # noqa: ANN401
    if data is None:
        raise BadRequestError(f"input {name!r} has no `data` and no `parameters.binary_data_size`")
    if datatype == "BYTES":
        flat = np.asarray(data, dtype=object).reshape(-1)
        if not all(isinstance(v, str) for v in flat):
            raise BadRequestError(f"input {name!r}: BYTES data in JSON must be strings")
        array = flat
    else:
        try:
            array = np.asarray(data)
        except (ValueError, TypeError):
            raise BadRequestError(f"input {name!r}: `data` is not a flat or rectangular list of values") from None
        want = DATATYPES[datatype]
        if want.kind in "iu" and array.dtype.kind in "fO" and array.size:
            array = _big_integers(name, datatype, array, data)
        elif want.kind == "f" and array.dtype.kind == "O" and all(v is None or type(v) in (int, float)
                                                                   for v in array.reshape(-1)):
            # null is NaN, as KServe's client (orjson) writes NaN and Inf, as these answers write them (_json_data)
            array = array.astype(np.float64)
        if array.dtype.kind not in "biuf":
            raise BadRequestError(f"input {name!r}: {datatype} data must be numbers (or booleans for BOOL)")
        # `data: []` parses as float64: an empty tensor of any datatype, not a value of the wrong kind
        if want.kind == "b" and array.dtype.kind != "b" and array.size:
            raise BadRequestError(f"input {name!r}: BOOL data must be true/false")
        if want.kind in "iub" and array.dtype.kind == "f" and array.size:
            raise BadRequestError(f"input {name!r}: {datatype} data must be integers, got numbers with a fraction")
        with np.errstate(over="ignore", invalid="ignore"):
            converted = array.astype(want)
        if want.kind in "iu" and array.size and (converted != array).any():
            raise BadRequestError(f"input {name!r}: values outside the range of {datatype}")
        array = converted
    count = math.prod(shape)
    if array.size != count:
        raise BadRequestError(f"input {name!r}: shape {list(shape)} needs {count} elements, `data` has {array.size}")
    return array.reshape(shape)


def _parameters(owner: dict, where: str) -> dict:
    """An object's `parameters` ({} when absent); a 400 when it is not an object."""
    params = owner.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise BadRequestError(f"{where}: `parameters` must be an object, got {type(params).__name__}")
    return params


@dataclass(frozen=True, slots=True)
class _Plan:
    """What a binary request's JSON header says, once parsed and checked: each input's (name, wire dtype,
    shape, offset after the header), the bytes they take in all, and what the answer should look like."""

    inputs: tuple[tuple[str, tuple[int, ...], np.dtype, int], ...]  # name, shape, dtype, offset after the header
    binary_size: int
    id: str | None
    outputs: tuple[str, ...] | None
    binary_outputs: frozenset[str]
    binary_default: bool
    classification: tuple[tuple[str, int], ...]

    def request(self, body: bytes, split: int) -> InferRequest:
        # np.ndarray over the body: what np.frombuffer(...).reshape(...) gives (read-only, no copy), at less than half
        # its cost; the sizes were checked when the plan was made and the body's length is checked before this
        inputs = {name: np.ndarray(shape, dtype, body, split + offset) for name, shape, dtype, offset in self.inputs}
        return InferRequest(inputs, self.id, None if self.outputs is None else list(self.outputs),
                            set(self.binary_outputs), self.binary_default,
                            dict(self.classification) if self.classification else {})  # {}: ~80 ns less a request


# JSON header bytes -> its plan. WHY: a client sends the same header again and again (same inputs, shapes and
# outputs: tritonclient, a load test, any fixed-size model), and parsing and checking it is most of decoding a
# binary request (~3 us of the event loop's ~30 us a request on a tiny MLP, measured in-process). Only headers
# whose every input is binary, not BYTES, and at most _PLAN_KEY_MAX bytes; cleared when full (a client whose
# every request has its own `id` only refills it).
_PLANS: dict[bytes, _Plan] = {}
_PLANS_MAX = 1024
_PLAN_KEY_MAX = 4096


def _plan_of(request: InferRequest, header: dict, binary_size: int) -> _Plan | None:
    """The reusable plan of a request just decoded the long way, or None when it cannot be replayed."""
    inputs, offset = [], 0
    for spec in header["inputs"]:
        size = (spec.get("parameters") or {}).get("binary_data_size")
        datatype = spec["datatype"]
        if size is None or datatype == "BYTES":
            return None
        array = request.inputs[spec["name"]]
        # the native dtype where it is the wire's (equal, but np.ndarray is slower with the byte-order-marked one)
        inputs.append((spec["name"], array.shape, DATATYPES[datatype] if _LITTLE else _WIRE[datatype], offset))
        offset += size
    return _Plan(tuple(inputs), binary_size, request.id, None if request.outputs is None else tuple(request.outputs),
                 frozenset(request.binary_outputs), request.binary_default, tuple(request.classification.items()))


def decode_request(body: bytes, header_length: str | None) -> InferRequest:
    """Parse an infer request body (JSON, or JSON + binary tensors); BadRequestError says what is wrong."""
    if header_length is not None and header_length.isascii() and header_length.isdigit():  # a header seen before?
        split = int(header_length)
        if 0 < split <= _PLAN_KEY_MAX:
            key = body[:split]
            plan = _PLANS.get(key)
            if plan is not None and plan.binary_size == len(body) - split:
                return plan.request(body, split)
            request = _decode(body, header_length)
            if plan is None and (header := orjson.loads(key)) is not None:
                plan = _plan_of(request, header, len(body) - split)
                if plan is not None:
                    if len(_PLANS) >= _PLANS_MAX:
                        _PLANS.clear()
                    _PLANS[key] = plan
            return request
    return _decode(body, header_length)


def _decode(body: bytes, header_length: str | None) -> InferRequest:
    """decode_request the long way: every check, every message."""
    if header_length is not None:
        try:
            split = int(header_length)
        except ValueError:
            raise BadRequestError(f"Inference-Header-Content-Length must be a number, got {header_length!r}") from None
        if not 0 < split <= len(body):
            raise BadRequestError(f"Inference-Header-Content-Length {split} is outside the body's {len(body)} bytes")
    else:
        split = len(body)
    try:
        header = orjson.loads(body[:split])
    except orjson.JSONDecodeError as exc:
        header = loads_with_nan_tokens(body[:split])  # (tritonclient writes NaN/Infinity in JSON tensors)
        if header is None:
            raise BadRequestError(f"the request's JSON does not parse: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise BadRequestError("an infer request is a JSON object with an `inputs` list")
    binary = memoryview(body)[split:]
    offset = 0
    inputs: dict[str, np.ndarray] = {}
    for spec in header["inputs"]:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise BadRequestError("each input needs a `name`, `shape`, `datatype` and `data` (or binary data)")
        name = spec["name"]
        if name in inputs:
            raise BadRequestError(f"input {name!r} is given twice: name each input once")
        datatype = spec.get("datatype")
        if datatype == "BF16":
            raise BadRequestError(f"input {name!r}: BF16 tensors are not supported (ONNX Runtime's Python API takes "
                                  "no bfloat16 arrays): serve a float32 or float16 version of the model")
        if not isinstance(datatype, str) or datatype not in DATATYPES:
            raise BadRequestError(f"input {name!r}: datatype {datatype!r} is not one of {', '.join(DATATYPES)}")
        shape = _shape(spec, name)
        params = _parameters(spec, f"input {name!r}")
        if "shared_memory_region" in params:
            raise BadRequestError(f"input {name!r}: {SHARED_MEMORY}")
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise BadRequestError(
                    f"input {name!r}: binary_data_size {size!r} runs past the {len(binary)} bytes after the JSON header"
                )
            inputs[name] = _decode_binary(name, datatype, shape, binary[offset:offset + size])
            offset += size
        else:
            inputs[name] = _decode_json(name, datatype, shape, spec.get("data"))
    if offset != len(binary):
        raise BadRequestError(f"{len(binary) - offset} bytes after the JSON header belong to no input")
    request = InferRequest(inputs, id=header.get("id"))
    params = _parameters(header, "the request")
    request.binary_default = bool(params.get("binary_data_output", False))
    outputs = header.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                    for o in outputs):
            raise BadRequestError("`outputs` must be a list of objects with a `name`")
        request.outputs = [o["name"] for o in outputs]
        for o in outputs:
            params = _parameters(o, f"output {o['name']!r}")
            if "shared_memory_region" in params:  # ignored, the answer would be in the body and the region unwritten
                raise BadRequestError(f"output {o['name']!r}: {SHARED_MEMORY}")
            count = params.get("classification")  # tritonclient's InferRequestedOutput(class_count=k)
            if count is not None:
                if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                    raise BadRequestError(f"output {o['name']!r}: parameters.classification must be a class count "
                                          f"(a non-negative integer), got {count!r}")
                if count:  # 0: the tensor itself, as Triton reads it
                    request.classification[o["name"]] = count
            wants = params.get("binary_data")
            if wants or (wants is None and request.binary_default):
                request.binary_outputs.add(o["name"])
    return request


# -- encoding ----------------------------------------------------------------------------------------


def top_classes(name: str, array: np.ndarray, count: int) -> np.ndarray:
    """Triton's classification extension: the `count` highest values of an output as BYTES "<value>:<index>",
    highest first, per row ([batch, count]) when the output has a batch axis (rank 2 or more; the rest of a row
    is flattened), else over the whole tensor ([count]). Values are written as C's %f (Triton's std::to_string),
    integers as integers. Ties go to the lower index; NaN ranks last. No labels: ONNX files carry none.
    WHY: tritonclient's InferRequestedOutput(name, class_count=k) is how Triton apps read classifiers."""
    if array.dtype.kind not in "iuf":
        raise BadRequestError(f"output {name!r}: classification (class_count) needs a numeric output, it is "
                              f"{datatype_of(array.dtype) or array.dtype}")
    rows = array.reshape(array.shape[0], math.prod(array.shape[1:])) if array.ndim >= 2 else array.reshape(1, -1)
    count = min(count, rows.shape[1])
    keys = np.where(np.isnan(rows), -np.inf, rows) if rows.dtype.kind == "f" else rows
    # descending, ties to the lower index: a stable ascending sort of the reversed row, read backwards
    order = rows.shape[1] - 1 - np.argsort(keys[:, ::-1], axis=1, kind="stable")[:, ::-1][:, :count]
    picked = np.take_along_axis(rows, order, axis=1)
    text = "{:f}:{}" if rows.dtype.kind == "f" else "{}:{}"
    values = [[text.format(value, index) for value, index in zip(row.tolist(), indices.tolist(), strict=True)]
              for row, indices in zip(picked, order, strict=True)]
    result = np.array(values, dtype=object).reshape(rows.shape[0], count)
    return result if array.ndim >= 2 else result.reshape(count)


def _binary(array: np.ndarray) -> bytes:
    if array.dtype.kind in "USO":
        parts = []
        for value in array.reshape(-1):
            data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
            parts.append(struct.pack("<I", len(data)))
            parts.append(data)
        return b"".join(parts)
    if _LITTLE and array.dtype.isnative:
        return array.tobytes()  # row-major, as the wire wants
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def _json_data(array: np.ndarray) -> list | np.ndarray:
    flat = array.reshape(-1)
    if flat.dtype.kind in "USO":
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat]
    if flat.dtype == np.float16:
        flat = flat.astype(np.float32)  # orjson has no float16; float32 holds every float16 exactly
    # orjson serializes numpy arrays itself (OPT_SERIALIZE_NUMPY), NaN and +-Inf as null (JSON has none), as /v1
    # answers them and KServe's server (orjson too) does. Triton writes the non-JSON tokens NaN and Infinity, which
    # JSON.parse and strict parsers refuse; tritonclient reads null in a float output as NaN.
    return np.ascontiguousarray(flat)


# (model, version, request id, each output's (name, dtype, shape)) -> the JSON header of an answer whose every
# output is binary and numeric. WHY: it is the same bytes for every answer of a fixed-size model to one client;
# building and serializing it was ~1.5 us of the ~3.5 us encode_response took on a tiny MLP. Bounded like _PLANS.
_HEADS: dict[tuple, bytes] = {}


def encode_response(model: str, version: int, request: InferRequest,
                    outputs: dict[str, np.ndarray]) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON header's length (for the header)."""
    if outputs and request.outputs is None and request.binary_default and type(request.id) in (str, type(None)):
        key = (model, version, request.id, *[(name, array.dtype, array.shape) for name, array in outputs.items()])
        head = _HEADS.get(key)
        if head is None and all(array.dtype.kind in "biuf" for array in outputs.values()):
            body, length = _encode(model, version, request, outputs)
            if len(_HEADS) >= _PLANS_MAX:
                _HEADS.clear()
            _HEADS[key] = body[:length]
            return body, length
        if head is not None:
            return b"".join([head, *[_binary(array) for array in outputs.values()]]), len(head)
    return _encode(model, version, request, outputs)


def _encode(model: str, version: int, request: InferRequest,
            outputs: dict[str, np.ndarray]) -> tuple[bytes, int | None]:
    """encode_response the long way."""
    described, blobs = [], []
    for name, array in outputs.items():
        if name in request.classification:
            array = top_classes(name, array, request.classification[name])
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(array.dtype), "shape": list(array.shape)}
        binary = name in request.binary_outputs or (request.outputs is None and request.binary_default)
        if binary:
            blob = _binary(array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_data(array)
        described.append(entry)
    header: dict[str, Any] = {"model_name": model, "model_version": str(version), "outputs": described}
    if request.id is not None:
        header["id"] = request.id
    head = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


_HEADER_LENGTH = HEADER_LENGTH.encode()
# (body length, JSON header length) -> the answer's headers. WHY: the same few for every answer of a fixed-size model,
# and building them (two int-to-text conversions, three tuples, a list) is a per-request cost of the event loop.
_RESPONSE_HEADERS: dict[tuple[int, int | None], list[tuple[bytes, bytes]]] = {}


def response_headers(size: int, length: int | None) -> list[tuple[bytes, bytes]]:
    """The HTTP headers of an infer answer of `size` bytes whose JSON header is `length` bytes long (None: all JSON,
    no binary outputs). Shared: callers must not change the list."""
    key = (size, length)
    headers = _RESPONSE_HEADERS.get(key)
    if headers is None:
        if length is None:
            headers = [(b"content-length", str(size).encode()), (b"content-type", b"application/json")]
        else:
            headers = [(b"content-length", str(size).encode()), (b"content-type", b"application/octet-stream"),
                       (_HEADER_LENGTH, str(length).encode())]
        if len(_RESPONSE_HEADERS) >= _PLANS_MAX:
            _RESPONSE_HEADERS.clear()
        _RESPONSE_HEADERS[key] = headers
    return headers
