"""Check an upload before the service accepts it: the file kinds, the model, the calibration set, the options.

Everything here runs before the 202, so a user learns at once what is wrong with what they sent;
the worker only ever sees models ONNX Runtime can load and sample sets that fit them.

Loading a model to validate it takes about twice its size in memory: that part runs in a child process per upload
(app/services/validation_child.py), so the API process neither holds the model nor the GIL meanwhile; at most
`max_concurrent_validations` children run at once (ValidationLimiter). An upload that finds no free slot
within `validation_wait_s` gets 503 with Retry-After (the server is busy, not the client wrong or
over a quota: hence 503, not 429), and nothing of it is kept.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx

from app.errors import BadRequestError, NotReadyError, UnsupportedMediaTypeError
from app.filenames import clean_filename
from app.services.fold_guard import budget_mb, refuse_large_constants, too_large
from app.services.validation_child import run_checks
from app.storage.base import storage_errors
from optimizer.accuracy import ToleranceError, parse_metric
from optimizer.calibration import load_samples
from optimizer.errors import ExternalDataError
from optimizer.input_ranges import check_index_ranges
from optimizer.loading import LoadedModel, LoadMemoryError, load_model, require_tensor_outputs
from optimizer.pipeline import CALIBRATION_METHODS, INT8_MODES, PRECISIONS
from optimizer.runtime import SessionSettings

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# Leading bytes of files people upload by mistake. A binary ONNX model starts with a protobuf field
# tag (0x08 for ir_version in practice); none of these can start one.
_NOT_ONNX = [
    (b"PK\x03\x04", "a ZIP archive (a PyTorch .pt checkpoint or an .npz?)"),
    (b"\x1f\x8b", "a gzip file"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"%PDF", "a PDF document"),
    (b"\x89HDF", "an HDF5 file (a Keras .h5 model?)"),
    (b"\x80\x02", "a Python pickle (a PyTorch checkpoint?)"),
    (b"\x80\x03", "a Python pickle (a PyTorch checkpoint?)"),
    (b"\x80\x04", "a Python pickle (a PyTorch checkpoint?)"),
    (b"\x80\x05", "a Python pickle (a PyTorch checkpoint?)"),
]


#: The session validation makes: at the serving optimization level (SessionSettings' default, which
#: app/services/container.py keeps), so that what ONNX Runtime folds at load is folded here, in the validation child
#: and under its memory limit (app/services/fold_guard.py), before the API process ever loads it. One thread: folding
#: runs on one, and each of ORT's threads reserves address space.
SERVING_CHECK = SessionSettings(intra_op_threads=1)

RETRY_AFTER_S = 5  # what a refused upload is told to wait; about one validation of a large model


class ValidationBusyError(NotReadyError):
    """503 + Retry-After: every validation slot stayed taken (the server is busy, not the request wrong)."""

    def __init__(self, capacity: int, waited_s: float) -> None:
        super().__init__(
            f"the service is validating {capacity} other upload(s) (ONNXFORGE_MAX_CONCURRENT_VALIDATIONS="
            f"{capacity}) and none finished within {waited_s:g} s: send the upload again in {RETRY_AFTER_S} s")
        self.headers = {"Retry-After": str(RETRY_AFTER_S)}


class ValidationLimiter:
    """At most `capacity` validations at once; the others wait up to `wait_s` for a slot, then ValidationBusyError.

    One per app (open_services keeps it in Services.validations; the upload route passes it in), not a
    module global: two apps in one process each keep their own bound. A threading semaphore, not an
    asyncio one: validations run in worker threads (run_in_threadpool).
    """

    def __init__(self, capacity: int, wait_s: float) -> None:
        self.capacity = capacity
        self.wait_s = wait_s
        self._slots = threading.BoundedSemaphore(capacity)
        self._lock = threading.Lock()
        self.running = 0
        self.peak = 0  # most validations seen running at once (for tests and metrics)
        self.refused = 0

    @contextmanager
    def slot(self) -> Iterator[None]:
        if not self._slots.acquire(timeout=self.wait_s):
            with self._lock:
                self.refused += 1
            raise ValidationBusyError(self.capacity, self.wait_s)
        with self._lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            yield
        finally:
            with self._lock:
                self.running -= 1
            self._slots.release()


@dataclass
class UploadOptions:
    """What the user asks the optimizer for (form fields precision, int8_mode, calibration_method, and the
    accuracy tolerance min_cosine/min_top1; None keeps the optimizer's defaults)."""

    precision: str = "auto"
    int8_mode: str | None = None
    calibration_method: str = "minmax"
    min_cosine: float | None = None
    min_top1: float | None = None
    metrics: dict[str, str] | None = None  # output -> the metric that gates it (optimizer.accuracy.Tolerance.metrics)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ValidatedUpload:
    name: str
    filename: str
    model_path: Path  # the model to store (rewritten if validation had to lower its IR version)
    calibration_path: Path | None
    sha256: str
    size_bytes: int
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    options: UploadOptions
    notes: list[str] = field(default_factory=list)


def _choice(fields: dict[str, str], key: str, choices: tuple[str, ...], default: str | None) -> str | None:
    value = fields.get(key, "").strip().lower()
    if not value:
        return default
    if value not in choices:
        raise BadRequestError(f"{key} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _fraction(fields: dict[str, str], key: str) -> float | None:
    """An optional accuracy limit between 0 and 1 (e.g. min_cosine=0.995)."""
    text = fields.get(key, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise BadRequestError(f"{key} must be a number between 0 and 1 (e.g. 0.99); got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise BadRequestError(f"{key} must be between 0 and 1 (e.g. 0.99); got {value}")
    return value


def _metrics(fields: dict[str, str]) -> dict[str, str] | None:
    """The optional `metrics` field: a JSON object naming the metric that gates an output, e.g.
    {"maps": "mask:0.3", "probs": "top1"}. JSON because ONNX output names may hold ':' and ','."""
    text = fields.get("metrics", "").strip()
    if not text:
        return None
    hint = 'metrics must be a JSON object of output name -> "default" | "cosine" | "top1" | "exact" | ' \
           '"mask:<threshold>", e.g. {"maps": "mask:0.3"}'
    try:
        value = json.loads(text)
    except ValueError:
        raise BadRequestError(f"{hint}; got {text[:200]!r}") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise BadRequestError(f"{hint}; got {text[:200]!r}")
    for output, metric in value.items():
        try:
            parse_metric(metric, output)
        except ToleranceError as exc:
            raise BadRequestError(str(exc)) from None
    return value or None


def parse_options(fields: dict[str, str], has_calibration: bool) -> UploadOptions:
    options = UploadOptions(
        precision=_choice(fields, "precision", PRECISIONS, "auto") or "auto",
        int8_mode=_choice(fields, "int8_mode", INT8_MODES, None),
        calibration_method=_choice(fields, "calibration_method", CALIBRATION_METHODS, "minmax") or "minmax",
        min_cosine=_fraction(fields, "min_cosine"),
        min_top1=_fraction(fields, "min_top1"),
        metrics=_metrics(fields),
    )
    if options.int8_mode == "static" and not has_calibration:  # whatever the precision: auto would ignore it
        raise BadRequestError(
            "int8_mode=static needs a calibration set: pass calibration samples (.npz with samples for every "
            "input: the `calibration` upload field, --calibration on the command line), or use int8_mode=dynamic"
        )
    return options


def model_name(explicit: str | None, filename: str | None) -> str:
    """The name the user gave, or one made from the file name ("My Model.onnx" -> "My-Model")."""
    if explicit:
        if not NAME_PATTERN.match(explicit):
            raise BadRequestError(
                f"invalid model name {explicit!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
                "letter or digit"
            )
        return explicit
    stem = Path(filename or "").stem
    derived = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._")[:64]
    if not derived:
        raise BadRequestError("no model name: give a `name` form field (the file name gives none)")
    return derived


def _head(path: Path, n: int = 16) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(n)


def _refuse_non_onnx(path: Path) -> None:
    head = _head(path, 512)
    for magic, kind in _NOT_ONNX:
        if head.startswith(magic):
            raise UnsupportedMediaTypeError(
                f"the `file` field holds {kind}, not an ONNX model: export the model to ONNX first "
                "(e.g. torch.onnx.export) and upload the .onnx file"
            )
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return
    if text and all(ch.isprintable() or ch in "\r\n\t" for ch in text):
        raise UnsupportedMediaTypeError(
            "the `file` field holds text, not a binary ONNX model: upload the .onnx file itself"
        )


def _refuse_non_npz(path: Path) -> None:
    if not _head(path, 4).startswith((b"PK\x03\x04", b"PK\x05\x06")):
        raise UnsupportedMediaTypeError(
            "the `calibration` field is not an .npz file (not a zip archive): save the samples with "
            "numpy.savez(path, **{input_name: array})"
        )


def _value_infos(values: Any, skip: set[str]) -> list[dict[str, Any]]:  # noqa: ANN401 - protobuf repeated field
    described = []
    for value in values:
        if value.name in skip:
            continue
        tensor = value.type.tensor_type
        dtype = None
        if value.type.HasField("tensor_type"):
            try:
                dtype = ("string" if tensor.elem_type == onnx.TensorProto.STRING
                         else onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name)
            except Exception:  # noqa: BLE001 - types numpy lacks (bfloat16, float8...)
                dtype = onnx.TensorProto.DataType.Name(tensor.elem_type).lower()
        shape = None
        if value.type.HasField("tensor_type") and tensor.HasField("shape"):
            shape = [d.dim_value if d.dim_value > 0 else (d.dim_param or None) for d in tensor.shape.dim]
        described.append({"name": value.name, "dtype": dtype, "shape": shape})
    return described


def _refuse_oversized_inputs(inputs: list[dict[str, Any]], max_input_elements: int | None) -> None:
    """Refuse a model whose declared input is larger than any predict may send (ONNXFORGE_MAX_INPUT_ELEMENTS).

    WHY refuse, not accept with a warning: predict refuses every request over the limit, so such a version could
    never answer one, and its job optimizes on inputs of that size anyway (16M+ elements: one used 6.8 GB and
    failed after 165 s). Dynamic dimensions count as 1: when the fixed ones alone pass the limit, no request fits.
    """
    if max_input_elements is None:
        return
    for spec in inputs:
        shape = spec["shape"]
        if shape is None:
            continue
        count = math.prod(d if isinstance(d, int) else 1 for d in shape)
        if count > max_input_elements:
            dynamic = any(not isinstance(d, int) for d in shape)
            shown = "[" + ", ".join(str(d if d is not None else "?") for d in shape) + "]"
            raise BadRequestError(
                f"input {spec['name']!r} (shape {shown}) has {'at least ' if dynamic else ''}{count} elements, more "
                f"than the {max_input_elements} a predict request may send (setting ONNXFORGE_MAX_INPUT_ELEMENTS): "
                "every predict on this model would be refused. Export the model with a smaller input, or ask the "
                "operator to raise the setting")


def validate_upload(model_path: Path, filename: str | None, calibration_path: Path | None,
                    fields: dict[str, str], limiter: ValidationLimiter,
                    max_input_elements: int | None = None) -> ValidatedUpload:
    """Validate everything about an upload (blocking: run it off the event loop).

    Raises UnsupportedMediaTypeError (415) for files of the wrong kind, BadRequestError or an
    optimizer.errors subclass (400) for a bad model, calibration set or option (an input larger than
    `max_input_elements`, the limit predict applies, included), ValidationBusyError (503) when no
    validation slot frees up in time, ValidationTimeoutError (504) or ValidationCrashedError (500) when the
    child process checking the contents ran out of time or died. The cheap checks come before the slot; the
    model and the samples are read in the child (app/services/validation_child.py), never in this process.
    """
    filename = clean_filename(filename)
    name = model_name(fields.get("name", "").strip() or None, filename)
    options = parse_options(fields, calibration_path is not None)
    _refuse_non_onnx(model_path)
    if calibration_path is not None:
        _refuse_non_npz(calibration_path)
    with limiter.slot():
        facts = run_checks({"model_path": str(model_path),
                            "calibration_path": str(calibration_path) if calibration_path is not None else None,
                            "max_input_elements": max_input_elements, "metrics": options.metrics,
                            "memory_limit_mb": budget_mb(model_path)})
    return ValidatedUpload(name=name, filename=filename or f"{name}.onnx", model_path=model_path,
                           calibration_path=calibration_path, options=options, **facts)


def _external_data_advice(path: Path) -> str | None:
    """What to do with a model whose weights sit in data files beside it, or None for a hostile location.

    WHY: torch.onnx.export(..., dynamo=True) writes model.onnx + model.onnx.data whenever external_data=True (its
    default), even for a 1 MB model. The 400 said the file was "missing from the model's folder", a folder an upload
    does not have, and its fix (save_model(model, ...)) did not say that onnx.load must read the data file first.
    Locations that are absolute or climb out (../) keep loading's own refusal: they are not an exporter's side file.
    """
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - loading already parsed it; any doubt keeps loading's message
        return None
    sizes: dict[str, int] = {}
    count = 0
    for tensor in _tensors_with_external_data(model.graph):
        info = onnx.external_data_helper.ExternalDataInfo(tensor)
        location = info.location or ""
        if not location or Path(location).is_absolute() or ".." in Path(location).parts or "\\" in location:
            return None
        count += 1
        sizes[location] = sizes.get(location, 0) + int(info.length or 0)
    if not sizes:
        return None
    files = ", ".join(repr(name) for name in sorted(sizes))
    total = sum(sizes.values())
    shown = f", {total / 2**20:.1f} MiB" if total else ""
    first = sorted(sizes)[0]
    model_file = first[: -len(".data")] if first.endswith(".onnx.data") else "model.onnx"
    return (f"the model keeps {count} tensors{shown} in the external data file {files} beside it, and an upload "
            "takes one file: the service needs the .onnx file with every tensor inside (possible up to 2 GB). Write "
            f"one with onnx.save_model(onnx.load({model_file!r}), 'model_inline.onnx', save_as_external_data=False) "
            "(onnx.load reads the data file from the same folder), or export again with "
            "torch.onnx.export(..., external_data=False) and upload that file")


def _tensors_with_external_data(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """The tensors of a graph and its subgraphs whose bytes live in an external file."""
    for tensor in graph.initializer:
        if onnx.external_data_helper.uses_external_data(tensor):
            yield tensor
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and onnx.external_data_helper.uses_external_data(attr.t):
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _tensors_with_external_data(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _tensors_with_external_data(sub)


def check_contents(model_path: str, calibration_path: str | None, max_input_elements: int | None,
                   metrics: dict[str, str] | None, memory_limit_mb: int | None = None) -> dict[str, Any]:
    """Load the model and the samples and check them (the memory-hungry part: run in the validation child).

    Returns ValidatedUpload's fields that come from the files (sha256, size_bytes, inputs, outputs, notes), as JSON
    types; rewrites the model in place when loading had to lower its IR version. `memory_limit_mb`: the address space
    the child was allowed (validation_child applies it); a model whose load needs more is a LoadMemoryError (400).
    """
    try:
        return _check_contents(model_path, calibration_path, max_input_elements, metrics, memory_limit_mb)
    except (LoadMemoryError, MemoryError):
        if memory_limit_mb is None:
            raise
        raise too_large(memory_limit_mb) from None


def _check_contents(model_path: str, calibration_path: str | None, max_input_elements: int | None,
                    metrics: dict[str, str] | None, memory_limit_mb: int | None) -> dict[str, Any]:
    path = Path(model_path)
    # load_model reads external data relative to the file's folder; uploads come as one file, and
    # each sits alone under a unique name, so a model pointing at external data is refused.
    try:
        loaded: LoadedModel = load_model(path, base_dir=path.parent / f"{path.name}.external", session=SERVING_CHECK)
    except ExternalDataError as exc:
        raise ExternalDataError(_external_data_advice(path) or (
            f"{exc}. The service takes the model as one .onnx file: save it with every tensor inside "
            "(onnx.save_model(model, path, save_as_external_data=False); possible up to 2 GB)")
        ) from None
    require_tensor_outputs(loaded.proto)  # a 400 now, not a 500 per predict and a failed job
    if memory_limit_mb is not None:  # what ORT skipped folding under the limit would be folded by the serving process
        refuse_large_constants(loaded.proto, memory_limit_mb)
    initializers = {t.name for t in loaded.proto.graph.initializer}
    inputs = _value_infos(loaded.proto.graph.input, initializers)
    _refuse_oversized_inputs(inputs, max_input_elements)  # before the samples: they may be as large
    # What reading the samples noted (too few held back for a meaningful accuracy check, dtypes cast) goes
    # on the version, beside the model's own notes: it was only in the report's calibration section before.
    sample_notes: list[str] = []
    if calibration_path is not None:
        samples = load_samples(calibration_path, loaded.proto)
        # ids past an embedding's rows: a 400 now, not ONNX Runtime's error in a failed job
        check_index_ranges(loaded.proto, [*samples.calibration, *samples.holdout], samples.source)
        sample_notes = samples.notes
    if loaded.ir_version != loaded.original_ir_version:
        with storage_errors("while storing the upload"):
            path.write_bytes(loaded.to_bytes())  # store what ONNX Runtime here can load
    outputs = [o.name for o in loaded.proto.graph.output]
    unknown = sorted(set(metrics or {}) - set(outputs))
    if unknown:
        raise BadRequestError(f"metrics names outputs the model does not have: {', '.join(unknown)}; its outputs are "
                              f"{', '.join(outputs)}")
    return {
        "sha256": loaded.sha256,
        "size_bytes": loaded.size_bytes,
        "inputs": inputs,
        "outputs": _value_infos(loaded.proto.graph.output, set()),
        "notes": [*loaded.notes, *(f"calibration set: {note}" for note in sample_notes)],
    }
