"""Load a user's model and prove it is usable before anything else touches it.

Checks, in order: it parses as ONNX, its external data (if any) is present and stays inside the
model's folder, its IR version is one the installed ONNX Runtime accepts (lowered when the opsets
allow), the ONNX checker accepts it, ONNX Runtime can create a session, and shape inference runs
(its result, with the inferred shapes, is the model handed on).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper, helper

from optimizer.calibration import model_inputs
from optimizer.errors import (
    CalibrationError,
    ExternalDataError,
    InvalidModelError,
    UnsupportedModelError,
    first_line,
    ort_reason,
)
from optimizer.runtime import SessionSettings, create_session, max_supported_ir_version


@dataclass
class LoadedModel:
    """A validated model, its weights in memory, and what loading had to change."""

    proto: onnx.ModelProto
    sha256: str
    size_bytes: int  # the .onnx file given
    original_ir_version: int
    notes: list[str] = field(default_factory=list)
    external_bytes: int = 0  # the size of its external data files (0: every tensor inside the file)

    @property
    def ir_version(self) -> int:
        return self.proto.ir_version

    def to_bytes(self) -> bytes:
        return self.proto.SerializeToString()


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of a graph and its subgraphs (If/Loop/Scan bodies) that may hold external data."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _all_tensors(sub)


def _external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in _all_tensors(model.graph) if external_data_helper.uses_external_data(t)]


def _check_external_location(tensor: onnx.TensorProto, base_dir: Path | None) -> None:
    info = external_data_helper.ExternalDataInfo(tensor)
    location = info.location
    if base_dir is None:
        raise ExternalDataError(
            f"tensor {tensor.name!r} keeps its data in an external file ({location!r}) that did not come "
            "with the model: upload the model with its data files, or save it with all tensors inside "
            "(onnx.save_model(model, path, save_as_external_data=False))"
        )
    if not location or os.path.isabs(location) or location.startswith(("/", "\\")):
        raise ExternalDataError(
            f"tensor {tensor.name!r} points at external data {location!r}: only relative paths inside "
            "the model's folder are allowed"
        )
    root = base_dir.resolve()
    target = (root / location).resolve()
    if not target.is_relative_to(root):
        raise ExternalDataError(
            f"tensor {tensor.name!r} points at external data {location!r}, which lies outside the model's "
            "folder: refusing to read it"
        )
    if not target.is_file():
        raise ExternalDataError(
            f"tensor {tensor.name!r} needs the external data file {location!r}, which is missing from the "
            "model's folder"
        )


def _parse(data: bytes) -> onnx.ModelProto:
    if not data:
        raise InvalidModelError("the file is empty: expected an ONNX model (.onnx)")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise InvalidModelError(
            f"the file is not a valid ONNX model (protobuf parse failed: {exc}); it may be truncated or "
            "not an .onnx file at all"
        ) from None
    if not model.HasField("graph") or not model.opset_import:
        raise InvalidModelError(
            "the file parsed but holds no ONNX graph or opset: it is not an ONNX model (was it "
            "truncated, or saved by another tool?)"
        )
    return model


def _lower_ir_version(model: onnx.ModelProto, notes: list[str]) -> None:
    """Lower a too-new IR version to what ONNX Runtime accepts when the opsets allow it."""
    supported = max_supported_ir_version()
    if model.ir_version <= supported:
        return
    opsets = [(o.domain or "ai.onnx", o.version) for o in model.opset_import]
    try:
        needed = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    except Exception:  # noqa: BLE001 - unknown domain versions: assume the opsets need nothing newer
        needed = 3
    if needed > supported:
        raise UnsupportedModelError(
            f"the model's opsets {opsets} need ONNX IR version {needed}, but the installed ONNX Runtime "
            f"supports at most {supported}: upgrade onnxruntime or export with an older opset"
        )
    notes.append(
        f"IR version lowered from {model.ir_version} to {supported}: the installed ONNX Runtime accepts "
        f"at most {supported} and the model's opsets {opsets} allow it"
    )
    model.ir_version = supported


def is_anonymous_dim_name(name: str) -> bool:
    """A dimension name without a letter or digit ('?'): an exporter's "unknown", not one shared size
    (`_clear_anonymous_dim_names`). The service's input checks read a session's names by the same rule."""
    return not any(c.isalnum() for c in name)


def _clear_anonymous_dim_names(model: onnx.ModelProto, notes: list[str]) -> None:
    """Turn dimension names without a letter or digit ('?') into plain unknown dimensions.

    Paddle2ONNX writes '?' for every unknown dimension (PP-OCR's classifier input is [-1, 3, '?', '?']).
    ONNX reads one name as one size, so a 48x192 crop broke the rule that a named dimension has the same
    size everywhere, and calibration refused the real inputs. An unnamed dimension says what was meant.
    """
    graph = model.graph
    cleared: dict[str, set[str]] = {}
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and is_anonymous_dim_name(dim.dim_param):
                cleared.setdefault(dim.dim_param, set()).add(value.name)
                dim.ClearField("dim_param")
    for name, values in cleared.items():
        shown = ", ".join(sorted(values)[:3]) + (" ..." if len(values) > 3 else "")
        notes.append(f"dimension name {name!r} (on {shown}) read as 'unknown', not as one shared size: "
                     "exporters such as Paddle2ONNX write it for every dynamic dimension")


#: The session loading makes to prove the model loads: no graph optimization, the quickest to create.
CHECK_SESSION = SessionSettings(optimization_level="disabled")


class LoadMemoryError(UnsupportedModelError):
    """ONNX Runtime ran out of memory creating the model's session: most often a constant the graph computes at load
    time (constant folding, e.g. a ConstantOfShape or Expand of a constant shape) too large for the memory there is."""


def load_model(source: str | Path | bytes | onnx.ModelProto, *, base_dir: str | Path | None = None,
               session: SessionSettings = CHECK_SESSION) -> LoadedModel:
    """Load and validate a model from a path, bytes or a ModelProto (validated as its bytes would be).

    `base_dir` is the folder that external data files must lie in; for a path it defaults to the
    model's folder, for bytes there is none (external data is then refused). `session` is how the proving session
    is made: a caller about to serve the model passes its serving settings, so that what ONNX Runtime computes at
    load (constant folding, at the optimization levels above "disabled") is computed here first, where the caller
    can bound the memory; LoadMemoryError when that ran out.
    Raises an OptimizerError subclass that says what is wrong; never a bare library error.

    Memory: the checker, ONNX Runtime and shape inference each parse a copy of their own. They read
    the model from a file (the user's own when loading changed nothing, else a temporary copy) while
    this process holds no other copy, so the peak is about 2x the file; handing each of them bytes
    while holding the bytes and the proto took 6x (bench/loading_memory.py).
    """
    if isinstance(source, onnx.ModelProto):
        source = source.SerializeToString()
    if isinstance(source, (str, Path)):
        path: Path | None = Path(source)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InvalidModelError(f"cannot read the model file {path}: {exc.strerror}") from None
        base = Path(base_dir) if base_dir is not None else path.parent
    else:
        path, data = None, bytes(source)
        base = Path(base_dir) if base_dir is not None else None
    sha256, size_bytes = hashlib.sha256(data).hexdigest(), len(data)
    model = _parse(data)
    del data

    notes: list[str] = []  # every change made to the model below adds a note
    original_ir = model.ir_version

    external = _external_tensors(model)
    external_bytes = 0
    for tensor in external:
        _check_external_location(tensor, base)
    if external:
        assert base is not None  # _check_external_location refused otherwise
        # the data files' sizes, not the loaded tensors' (reading raw_data copies each tensor)
        locations = {external_data_helper.ExternalDataInfo(tensor).location for tensor in external}
        external_bytes = sum((base / location).stat().st_size for location in locations)
        external_data_helper.load_external_data_for_model(model, str(base))
        notes.append(f"{len(external)} tensors loaded from external data files")

    _lower_ir_version(model, notes)
    _clear_anonymous_dim_names(model, notes)

    with tempfile.TemporaryDirectory(prefix="onnxforge-load-") as scratch:
        if notes:  # the checks read what was changed, not the user's file
            path = Path(scratch) / "model.onnx"
            path.write_bytes(model.SerializeToString())
        elif path is None:
            path = Path(scratch) / "model.onnx"
            path.write_bytes(source)  # type: ignore[arg-type] - bytes: the path case set `path`
        del model
        _check(path)
        _try_session(path, session)
        proto = _infer_shapes(path, Path(scratch) / "inferred.onnx")
    return LoadedModel(proto=proto, sha256=sha256, size_bytes=size_bytes, original_ir_version=original_ir,
                       notes=notes, external_bytes=external_bytes)


def _check(path: Path) -> None:
    try:
        onnx.checker.check_model(path, full_check=True)
    except Exception as exc:  # noqa: BLE001 - ValidationError, and shape inference errors as various types
        said = first_line(exc) if isinstance(exc, onnx.checker.ValidationError) else str(exc)
        hint = _old_opset_hint(path)
        raise InvalidModelError(f"the ONNX checker refuses the model: {said}" + (f"; {hint}" if hint else "")) from None


#: The oldest ai.onnx opset every ONNX Runtime release runs (its compatibility docs: "opset version 7 and higher").
OLDEST_OPSET = 7
#: The opset the hint converts to: one that every ONNX Runtime since 1.14 runs and onnx's converter reaches.
CONVERT_TO = 17


def _old_opset_hint(path: Path) -> str | None:
    """How to bring an ai.onnx opset older than ONNX Runtime runs up to date; None when it is not that old.

    WHY: an opset-1 model fails in the checker (an attribute later opsets dropped) or in ONNX Runtime ("Could not find
    an implementation for Relu(1)"), and neither says that onnx's own converter fixes it."""
    version = _opsets(path).get("ai.onnx", OLDEST_OPSET)
    if version >= OLDEST_OPSET:
        return None
    return (f"the model uses ai.onnx opset {version}, older than ONNX Runtime runs ({OLDEST_OPSET} and newer): convert "
            f"it with onnx's version converter and upload the result (model = onnx.version_converter.convert_version("
            f"onnx.load(path), {CONVERT_TO}); onnx.save(model, path))")


def _opsets(path: Path) -> dict[str, int]:
    return {o.domain or "ai.onnx": o.version for o in onnx.load_model(path, load_external_data=False).opset_import}


def _opset_hint(path: Path) -> str:
    """What to change when the model's standard opset is newer or older than this ONNX Runtime runs."""
    newest = onnx.defs.onnx_opset_version()
    version = _opsets(path).get("ai.onnx", 0)
    if version > newest:
        return f"the model uses ai.onnx opset {version}: export it again with opset {newest} or lower"
    return _old_opset_hint(path) or ("check that every op is a standard ONNX op (or one ONNX Runtime implements) "
                                     "and that the opset is supported")


def require_tensor_outputs(model: onnx.ModelProto) -> None:
    """UnsupportedModelError naming the outputs that are not tensors (sequences, maps: scikit-learn's ZipMap
    probabilities). WHY: the accuracy check compares arrays and both predict APIs answer with arrays; such a
    model was accepted, answered every predict with a 500 and failed its job inside the accuracy check."""
    others = [output.name for output in model.graph.output if not output.type.HasField("tensor_type")]
    if others:
        raise UnsupportedModelError(
            f"output(s) {', '.join(map(repr, others))} are not tensors (a sequence or map, e.g. the ZipMap "
            "probabilities of a scikit-learn classifier): onnxforge serves tensor outputs only; export the model "
            "without them (skl2onnx: the zipmap=False option)"
        )


def fixed_input_shapes(model: onnx.ModelProto) -> dict[str, list[int]] | None:
    """Every input's shape when none has a dynamic dimension and each is a float or bool tensor; else None.

    WHY no integer inputs: their generated values (0-9) may be outside what the model takes (an index into a table
    of 5 rows, a one-hot depth), so a failure on them proves nothing about the model; for float and bool inputs
    the shape is what can be wrong, and a model failing on its own declared shapes cannot run for any request.
    """
    try:
        specs = model_inputs(model)
    except CalibrationError:  # a non-tensor input or a dtype numpy lacks: nothing can be generated for it
        return None
    if any(spec.dims is None or spec.dtype.kind not in "bf" or not all(isinstance(d, int) for d in spec.dims)
           for spec in specs):
        return None
    return {spec.name: list(spec.dims) for spec in specs}  # type: ignore[arg-type] - all ints, checked above


def _try_session(path: Path, settings: SessionSettings) -> None:
    """ONNX Runtime can create a session (dropped again: validation only proves that it loads)."""
    try:
        create_session(path, settings)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        # Under an address-space limit ORT fails folding cleanly: "Exception during initialization: std::bad_alloc".
        if isinstance(exc, MemoryError) or "bad_alloc" in str(exc):
            raise LoadMemoryError(
                "ONNX Runtime ran out of memory creating a session of the model: a constant the graph computes at "
                "load time (e.g. a ConstantOfShape or Expand of a constant shape) is too large; compute it from the "
                "inputs at run time or make it smaller") from None
        raise UnsupportedModelError(
            f"ONNX Runtime cannot load the model: {ort_reason(exc)}; {_opset_hint(path)}"
        ) from None


def _infer_shapes(path: Path, inferred: Path) -> onnx.ModelProto:
    """The model with the shapes inference adds (value_info). File to file: no copy held meanwhile."""
    try:
        onnx.shape_inference.infer_shapes_path(path, inferred, check_type=True)
    except Exception as exc:  # noqa: BLE001
        raise InvalidModelError(f"ONNX shape inference fails on the model: {exc}") from None
    return onnx.load_model(inferred, load_external_data=False)
