"""Calibration sample sets: read a user's `.npz` safely, match it to the model, split off a holdout.

A sample is one complete feed for ONNX Runtime (`{input name: array}`). Static INT8 calibrates on
`SampleSet.calibration`; the accuracy check compares variants on `SampleSet.holdout`, which never
contains a calibration sample, so a variant is not judged on the data it was tuned on.

The `.npz` holds one array per model input, in one of two layouts (chosen per input):
- `arr.ndim == rank + 1`: `arr[i]` is the feed for sample i (any batch size the model accepts);
- `arr.ndim == rank`: axis 0 is the batch axis; it is split into batch-1 samples (or into chunks of
  the static batch size when the model fixes it).

Dtype policy (what a cast may do to the user's numbers):
- same dtype: used as is;
- float -> float (e.g. float64 -> float32, numpy's default dtype): cast, with a note; refused if a
  finite value overflows the model's dtype;
- integer -> integer (e.g. int32 -> int64): cast when every value fits the model's dtype, with a note;
- anything else (float <-> int, bool, strings) is refused: that conversion is the model's
  preprocessing (scaling, tokenizing), which we cannot guess.
NaN and Inf are refused in float inputs: one NaN poisons every min/max range calibration computes.
"""

from __future__ import annotations

import io
import math
import time
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from numpy.lib import format as npy_format
from onnx import TensorProto, helper

from optimizer.errors import CalibrationError, OptimizerError

DEFAULT_MAX_BYTES = 2 * 1024**3  # declared array bytes in one .npz, checked before anything is loaded
#: Held-back samples from which an accuracy check is meaningful: under it, the report's accuracy notes say how little a
#: cosine on so few samples proves (optimizer.pipeline.accuracy_notes), and the errors below name the set size it takes.
MEANINGFUL_HOLDOUT = 20
#: Most samples calibrated on; the rest of a larger set is left out (held-back samples are not capped). WHY: a range or
#: a histogram settles within a few hundred samples (ORT's calibrators are fed ~100 in its examples), while time and
#: memory grow with every sample: PP-OCR's cls with 11,200 calibration samples spent 58 s calibrating of a 60 s
#: budget and peaked at 4.9 GB; Entropy/Percentile keep 14-256 MB per sample on real CNNs.
MAX_CALIBRATION_SAMPLES = 256
#: Most samples a set may hold; a larger one is refused from its .npy headers, before any array is read. WHY: a set is
#: calibrated on MAX_CALIBRATION_SAMPLES and 20% of it is held back (20,000 of 100,000: far more than an accuracy check
#: needs), while reading it costs time and memory per sample: a 125 KB .npz of 4M rows of 8 zeros (122 MiB declared,
#: well under DEFAULT_MAX_BYTES) took 1.7 GiB and 109 s of the API process when every row became a Python object.
MAX_SAMPLES = 100_000

Feed = dict[str, np.ndarray]
#: A user's sample set: an .npz file (path or bytes), or its arrays in memory ({input name: array}).
Samples = str | Path | bytes | Mapping[str, np.ndarray]
Dim = int | str | None  # static size, named dynamic dim, or unnamed dynamic dim


@dataclass
class SampleSet:
    """Feeds to calibrate on and disjoint feeds to check accuracy on."""

    calibration: list[Feed]
    holdout: list[Feed]
    synthetic: bool
    source: str
    notes: list[str] = field(default_factory=list)
    offered: int | None = None  # samples the set had to calibrate on, before MAX_CALIBRATION_SAMPLES (None: all used)


@dataclass(frozen=True)
class _InputSpec:
    name: str
    dtype: np.dtype
    dims: list[Dim] | None  # None: the model declares no shape (rank unknown)

    def describe(self) -> str:
        """The declared dims, dynamic ones by name ("batch, 3, 32, 32"); "?" for an unnamed one."""
        if self.dims is None:
            return "unknown rank"
        return ", ".join("?" if d is None else str(d) for d in self.dims)


def model_inputs(model: onnx.ModelProto) -> list[_InputSpec]:
    """The inputs a caller must feed: graph inputs that are not initializers (old IR lists both)."""
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if not value.type.HasField("tensor_type"):
            raise CalibrationError(
                f"input {value.name!r} is not a tensor (sequence, map or optional): calibration sample sets "
                "support tensor inputs only"
            )
        tensor_type = value.type.tensor_type
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        except Exception:  # noqa: BLE001 - onnx raises KeyError/ValueError for types numpy lacks
            raise CalibrationError(
                f"input {value.name!r} has element type {TensorProto.DataType.Name(tensor_type.elem_type)}, "
                "which numpy cannot hold: calibration sample sets are not supported for this model"
            ) from None
        dims: list[Dim] | None = None
        if tensor_type.HasField("shape"):
            dims = []
            for d in tensor_type.shape.dim:
                # Old exporters (Paddle) write dim_value -1 for a dynamic dim; ONNX Runtime treats
                # any value <= 0 as dynamic, and so do we.
                if d.HasField("dim_value") and d.dim_value > 0:
                    dims.append(int(d.dim_value))
                else:
                    dims.append(d.dim_param or None)
        specs.append(_InputSpec(value.name, dtype, dims))
    return specs


# ---------------------------------------------------------------------------------------------------
# Reading the .npz without trusting it


def _open_zip(path_or_bytes: str | Path | bytes) -> tuple[zipfile.ZipFile, str]:
    if isinstance(path_or_bytes, bytes | bytearray | memoryview):
        raw = bytes(path_or_bytes)
        source, handle = f"uploaded .npz ({len(raw)} bytes)", io.BytesIO(raw)
    else:
        path = Path(path_or_bytes)
        if path.is_dir():
            raise CalibrationError(f"calibration file {str(path)!r} is a folder: name the .npz file in it")
        if not path.is_file():
            raise CalibrationError(f"calibration file {str(path)!r} does not exist")
        source, handle = path.name, path
    try:
        return zipfile.ZipFile(handle), source
    except (zipfile.BadZipFile, OSError, ValueError):
        raise CalibrationError(
            f"{source} is not a .npz file (not a zip archive): save the samples with "
            "numpy.savez(path, **{input_name: array})"
        ) from None


def _read_header(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype an .npy member declares, read from its header only (no array data)."""
    with archive.open(member) as fp:
        version = npy_format.read_magic(fp)
        if version == (1, 0):
            shape, _, dtype = npy_format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, _, dtype = npy_format.read_array_header_2_0(fp)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    return tuple(int(s) for s in shape), np.dtype(dtype)


def _check_dtype(source: str, name: str, dtype: np.dtype) -> None:
    if dtype.hasobject:
        raise CalibrationError(
            f"{source}: array {name!r} holds Python objects (a pickle), which are never loaded: save plain "
            "numeric arrays"
        )
    if dtype.kind not in "biuf":
        raise CalibrationError(
            f"{source}: array {name!r} has dtype {dtype}, not a number type: save numeric arrays"
        )


Declared = dict[str, tuple[tuple[int, ...], np.dtype]]  # array name -> (shape, dtype), from the .npy headers


def _declared_arrays(archive: zipfile.ZipFile, source: str, max_bytes: int) -> Declared:
    """Check every member's header before loading: numeric dtype, no pickle, total size under max_bytes.

    np.load reads exactly the bytes a header declares, so bounding the declared sizes bounds memory
    even when the zip's own size fields lie (a zip bomb).
    """
    declared: Declared = {}
    total = 0
    for member in archive.infolist():
        if member.is_dir():
            continue
        if not member.filename.endswith(".npy"):
            raise CalibrationError(
                f"{source} contains {member.filename!r}, which is not a numpy array (.npy): a calibration file "
                "holds only arrays, one per model input"
            )
        name = member.filename[: -len(".npy")]
        try:
            shape, dtype = _read_header(archive, member)
        except Exception as exc:  # noqa: BLE001 - corrupt headers raise ValueError, zlib.error, EOFError...
            raise CalibrationError(f"{source}: array {name!r} is corrupt ({exc}); re-create the file") from None
        _check_dtype(source, name, dtype)
        total += math.prod(shape) * dtype.itemsize
        if total > max_bytes:
            raise CalibrationError(
                f"{source} declares more than {max_bytes} bytes of arrays (limit reached at {name!r}): send "
                "fewer samples"
            )
        declared[name] = shape, dtype
    if not declared:
        raise CalibrationError(f"{source} contains no arrays: save one array per model input")
    return declared


def _load_arrays(raw: str | Path | bytes, source: str, names: Sequence[str]) -> dict[str, np.ndarray]:
    handle = io.BytesIO(bytes(raw)) if isinstance(raw, bytes | bytearray | memoryview) else raw
    arrays = {}
    try:
        with np.load(handle, allow_pickle=False) as npz:
            for name in names:
                arrays[name] = np.ascontiguousarray(npz[name])
    except Exception as exc:  # noqa: BLE001 - truncated data: zlib.error, EOFError, ValueError, BadZipFile
        raise CalibrationError(f"{source} is corrupt: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    return arrays


# ---------------------------------------------------------------------------------------------------
# Matching arrays to the model


def _cast(array: np.ndarray, spec: _InputSpec, notes: list[str]) -> np.ndarray:
    """Apply the dtype policy in the module docstring."""
    given, wanted = array.dtype, spec.dtype
    if given == wanted:
        result = array
    elif given.kind == "f" and wanted.kind == "f":
        with np.errstate(over="ignore"):
            result = array.astype(wanted)
        if np.count_nonzero(~np.isfinite(result)) > np.count_nonzero(~np.isfinite(array)):
            raise CalibrationError(
                f"input {spec.name!r}: values of the {given} array overflow {wanted}, the model's input type: "
                "scale the data the way the model's preprocessing does"
            )
        notes.append(f"input {spec.name!r}: cast {given} to {wanted}")
    elif given.kind in "iu" and wanted.kind in "iu":
        info = np.iinfo(wanted)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise CalibrationError(
                f"input {spec.name!r}: the {given} array has values outside the range of {wanted}, the model's "
                "input type"
            )
        result = array.astype(wanted)
        notes.append(f"input {spec.name!r}: cast {given} to {wanted}")
    else:
        raise CalibrationError(
            f"input {spec.name!r} expects {wanted} but the array is {given}: convert it the way the model's "
            f"preprocessing does (e.g. arr.astype(np.{wanted}) after scaling) and save it again"
        )
    if result.dtype.kind == "f" and not np.all(np.isfinite(result)):
        raise CalibrationError(f"input {spec.name!r} contains NaN or Inf values: remove those samples")
    return result


def _shape_mismatch(spec: _InputSpec, given: tuple[int, ...], detail: str) -> CalibrationError:
    dims = spec.describe()
    return CalibrationError(
        f"input {spec.name!r}: expected an array of shape [{dims}] (samples along the batch axis) or "
        f"[samples, {dims}] (one complete feed per entry), got {list(given)}: {detail}"
    )


def _check_dims(spec: _InputSpec, sample_shape: tuple[int, ...], full_shape: tuple[int, ...]) -> None:
    assert spec.dims is not None
    for axis, (want, got) in enumerate(zip(spec.dims, sample_shape, strict=True)):
        if isinstance(want, int) and want != got:
            raise _shape_mismatch(spec, full_shape, f"axis {axis} of a sample must be {want}, not {got}")
        if got == 0:
            raise _shape_mismatch(spec, full_shape, f"axis {axis} of a sample is empty")


def _layout(spec: _InputSpec, shape: tuple[int, ...]) -> int | None:
    """How axis 0 of an array of `shape` holds the samples: None for one complete feed per entry, or the size of the
    batch-axis chunk each sample takes. Decided and checked from the shape alone, so from an .npy header, before any
    data is read."""
    if spec.dims is None:  # rank unknown: only the stacked layout is unambiguous
        if len(shape) < 1 or shape[0] == 0:
            raise CalibrationError(f"input {spec.name!r}: expected [samples, ...], got {list(shape)}")
        return None
    rank = len(spec.dims)
    if len(shape) == rank + 1:
        if shape[0] == 0:
            raise _shape_mismatch(spec, shape, "the array holds no samples")
        _check_dims(spec, shape[1:], shape)
        return None
    if len(shape) == rank and rank >= 1:
        # Axis 0 is the batch axis: batch-1 samples, or chunks of the batch size the model fixes.
        step = spec.dims[0] if isinstance(spec.dims[0], int) else 1
        if shape[0] == 0 or shape[0] % step:
            raise _shape_mismatch(spec, shape, f"axis 0 must be a non-zero multiple of the batch size {step}")
        _check_dims(spec, (step, *shape[1:]), shape)
        return step
    raise _shape_mismatch(spec, shape, f"rank {len(shape)} fits neither layout")


@dataclass(frozen=True)
class _Rows:
    """A set's samples as one array per input whose axis 0 is the sample index: a sample is only made into a feed
    when it is picked (WHY: a dict and a view per sample for a million-row set cost ~400 bytes per row and minutes)."""

    arrays: dict[str, np.ndarray]

    @classmethod
    def of(cls, arrays: Mapping[str, np.ndarray], steps: Mapping[str, int | None]) -> _Rows:
        return cls({name: array if steps[name] is None else array.reshape(-1, steps[name], *array.shape[1:])
                    for name, array in arrays.items()})

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def feeds(self, indices: Sequence[int] | np.ndarray, copy: bool) -> list[Feed]:
        """The samples at `indices`, in that order. `copy`: gathered into new arrays, so the arrays of the samples
        left out are freed rather than held for the whole job. np.asarray, not the entry itself: for a rank-0 input
        (Silero's `sr`) an entry is a numpy scalar, which ONNX Runtime refuses ("Unable to handle object of type
        numpy.int64")."""
        picked = {name: array[np.asarray(indices, dtype=np.intp)] if copy else array
                  for name, array in self.arrays.items()}
        positions = range(len(indices)) if copy else indices
        return [{name: np.asarray(array[int(i)]) for name, array in picked.items()} for i in positions]


def _check_shared_dims(specs: list[_InputSpec], sample: Feed) -> None:
    """A named dynamic dim ('seq', 'batch') must have one size across all inputs of a sample."""
    seen: dict[str, tuple[str, int]] = {}
    for spec in specs:
        for want, got in zip(spec.dims or [], sample[spec.name].shape, strict=False):
            if not isinstance(want, str):
                continue
            if want in seen and seen[want][1] != got:
                other, size = seen[want]
                raise CalibrationError(
                    f"input {spec.name!r} has {want}={got} but input {other!r} has {want}={size}: a dimension "
                    f"named {want!r} must have the same size in every input of a sample"
                )
            seen.setdefault(want, (spec.name, got))


def holdout_size(n: int, holdout_fraction: float, min_holdout: int) -> int:
    """How many of `n` samples are held back: the fraction, at least `min_holdout`, at most half."""
    return min(max(math.ceil(n * holdout_fraction), min_holdout), n // 2)


def how_many_samples(holdout_fraction: float, min_holdout: int) -> str:
    """What a set's size does to its accuracy numbers (README, calibration sample sets): with fewer than
    `min_holdout` held back the notes call them rough; from MEANINGFUL_HOLDOUT held back they are meaningful."""
    def smallest(held: int) -> int:
        return next(n for n in range(2, 1_000_000) if holdout_size(n, holdout_fraction, min_holdout) >= held)

    return (f"with fewer than {smallest(min_holdout)} (fewer than {min_holdout} held back) the accuracy numbers are "
            f"rough, and {smallest(MEANINGFUL_HOLDOUT)} or more ({MEANINGFUL_HOLDOUT} or more held back) give "
            "meaningful ones")


def holdout_indices(n: int, holdout_fraction: float, min_holdout: int, seed: int,
                    notes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint sorted (calibration, holdout) indices into `n` samples; the holdout never exceeds half of them."""
    if n < 2:
        raise CalibrationError(
            f"the calibration set has {n} sample(s); at least 2 are needed (one to calibrate on, one held back "
            f"for the accuracy check); {how_many_samples(holdout_fraction, min_holdout)}"
        )
    n_holdout = holdout_size(n, holdout_fraction, min_holdout)
    if n_holdout < min_holdout:
        notes.append(
            f"only {n} samples: held back {n_holdout} for the accuracy check (fewer than {min_holdout}) and "
            f"calibrated on {n - n_holdout}; accuracy numbers are rough"
        )
    held = np.zeros(n, dtype=bool)
    held[np.random.default_rng(seed).permutation(n)[:n_holdout]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def split_holdout(samples: list[Feed], holdout_fraction: float, min_holdout: int, seed: int,
                  notes: list[str]) -> tuple[list[Feed], list[Feed]]:
    """Disjoint (calibration, holdout) lists of `samples`, as `holdout_indices` picks them."""
    calibration, holdout = holdout_indices(len(samples), holdout_fraction, min_holdout, seed, notes)
    return [samples[i] for i in calibration], [samples[i] for i in holdout]


def _spread(calibration: np.ndarray, held_back: int, cap: int, notes: list[str]) -> np.ndarray:
    """At most `cap` of the calibration indices, evenly spread over the set's order (a set sorted by class or by
    source keeps each part), with a note saying how many of how many."""
    n = len(calibration)
    if n <= cap:
        return calibration
    notes.append(f"calibrated on {cap} of the {n} samples not held back (evenly spread over the set; "
                 f"{held_back} held back for the accuracy check): calibration ranges settle within a few hundred "
                 "samples, and each one more costs time and memory")
    return calibration[[i * n // cap for i in range(cap)]]


def _read(path_or_bytes: Samples, model: onnx.ModelProto, max_bytes: int) -> tuple[_Rows, str, list[str]]:
    """A user's `.npz` (or a dict of arrays in the same layout) checked against the model's inputs: names, layouts and
    sample counts from the .npy headers before any array is read, then dtypes and values (`read_samples`)."""
    specs = model_inputs(model)
    given: dict[str, np.ndarray] | None = None
    if isinstance(path_or_bytes, Mapping):  # arrays in memory: nothing to distrust but their dtypes
        source = "the calibration dict"
        given = {str(name): np.ascontiguousarray(array) for name, array in path_or_bytes.items()}
        for name, array in given.items():
            _check_dtype(source, name, array.dtype)
        if not given:
            raise CalibrationError(f"{source} holds no arrays: give one array per model input")
        declared = {name: (array.shape, array.dtype) for name, array in given.items()}
    elif isinstance(path_or_bytes, str | Path | bytes | bytearray | memoryview):
        archive, source = _open_zip(path_or_bytes)
        with archive:
            declared = _declared_arrays(archive, source, max_bytes)
    else:
        raise CalibrationError(
            f"calibration must be an .npz file (its path or bytes) or a dict {{input name: array}}, one array per "
            f"model input; got a {type(path_or_bytes).__name__}"
        )
    expected = [s.name for s in specs]
    missing = [n for n in expected if n not in declared]
    unknown = [n for n in declared if n not in expected]
    if missing or unknown:
        problems = []
        if missing:
            problems.append(f"no array for input(s) {missing}")
        if unknown:
            problems.append(f"array(s) {unknown} match no model input")
        raise CalibrationError(
            f"{source}: {'; '.join(problems)}. The model's inputs are {expected}; the file has {list(declared)}. "
            "Save one array per input, named exactly like the input"
        )
    steps = {spec.name: _layout(spec, declared[spec.name][0]) for spec in specs}
    counts = {name: declared[name][0][0] // (step or 1) for name, step in steps.items()}
    if len(set(counts.values())) > 1:
        raise CalibrationError(
            f"{source}: the inputs give different numbers of samples {counts}; every input needs one entry per "
            "sample"
        )
    count = next(iter(counts.values()))
    if count > MAX_SAMPLES:
        raise CalibrationError(
            f"{source} holds {count} samples; at most {MAX_SAMPLES} are read (at most {MAX_CALIBRATION_SAMPLES} are "
            f"calibrated on, and 20% of {MAX_SAMPLES} held back is plenty for the accuracy check): send a random "
            f"subset of at most {MAX_SAMPLES}"
        )

    arrays = given if given is not None else _load_arrays(path_or_bytes, source, expected)
    notes: list[str] = []
    rows = _Rows.of({spec.name: _cast(arrays[spec.name], spec, notes) for spec in specs}, steps)
    _check_shared_dims(specs, rows.feeds([0], copy=False)[0])  # every sample of an input has the same shape
    return rows, source, notes


def read_samples(path_or_bytes: Samples, model: onnx.ModelProto,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> SampleSet:
    """Read a user's `.npz` (or a dict of arrays in the same layout) and validate it against the model's inputs:
    every sample in `holdout`, none held back from it (`bench` times one; no accuracy check, so one sample is enough).

    Raises CalibrationError for anything the user must fix (names, dtypes, shapes, a pickle, a
    corrupt or oversized file, more than MAX_SAMPLES samples, empty arrays), with the input's name and the expected
    and given shapes.
    """
    rows, source, notes = _read(path_or_bytes, model, max_bytes)
    return SampleSet([], rows.feeds(range(len(rows)), copy=False), synthetic=False, source=source, notes=notes)


def load_samples(path_or_bytes: Samples, model: onnx.ModelProto, holdout_fraction: float = 0.2,
                 min_holdout: int = 4, seed: int = 0, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_calibration: int = MAX_CALIBRATION_SAMPLES) -> SampleSet:
    """Read a user's `.npz`, validate it against the model's inputs (as `read_samples`), split off the holdout
    (`holdout_indices`) and keep at most `max_calibration` of the rest to calibrate on (`_spread`). The split is
    decided on indices: only the picked samples are made into feeds."""
    if not 0 < holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    rows, source, notes = _read(path_or_bytes, model, max_bytes)
    if len(rows) < 2:
        given = ", ".join(f"{name}: {list(a.shape)}" for name, a in rows.feeds([0], copy=False)[0].items())
        raise CalibrationError(
            f"{source} holds {len(rows)} sample ({given}); at least 2 are needed, one to calibrate on and one "
            f"held back for the accuracy check; {how_many_samples(holdout_fraction, min_holdout)}. Stack samples "
            "along a new first axis or along the batch axis"
        )
    calibration, holdout = holdout_indices(len(rows), holdout_fraction, min_holdout, seed, notes)
    offered = len(calibration)
    calibration = _spread(calibration, len(holdout), max_calibration, notes)
    copy = len(calibration) + len(holdout) < len(rows)  # some samples left out: gather the rest, free the file's arrays
    return SampleSet(rows.feeds(calibration, copy), rows.feeds(holdout, copy), synthetic=False, source=source,
                     notes=notes, offered=offered if offered > len(calibration) else None)


class CalibrationTimeout(OptimizerError):
    """The time budget ran out while a pass was reading calibration samples (`TimedFeeds`)."""


class TimedFeeds(Sequence[Feed]):
    """Calibration samples that run out at a deadline: iterating past it raises CalibrationTimeout, so a calibrator
    fed in chunks stops before its next chunk and within one sample of the deadline, and `stopped_at` says where.

    WHY a sequence rather than a check in each pass: every pass that reads calibration samples (static INT8's
    chunked collect_data, equalization, smoothing, bias correction) takes a Sequence and iterates or slices it, so one
    wrapper bounds them all; before, a 14,000-sample set calibrated for minutes past a 60 s budget.
    """

    def __init__(self, feeds: Sequence[Feed], deadline: float, *, _start: int = 0,
                 _stopped: list[int] | None = None) -> None:
        self._feeds, self.deadline, self._start = feeds, deadline, _start
        self._stopped = _stopped if _stopped is not None else []  # shared by the slices of one sequence

    @property
    def stopped_at(self) -> int | None:
        """How many samples had been read when the deadline stopped the reading (None: it never did)."""
        return self._stopped[0] if self._stopped else None

    def __len__(self) -> int:
        return len(self._feeds)

    def __getitem__(self, index):  # noqa: ANN001, ANN204 - int -> Feed, slice -> TimedFeeds (Sequence's protocol)
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self._feeds))
            if step != 1:
                return [self._feeds[i] for i in range(start, stop, step)]
            return TimedFeeds(self._feeds[start:stop], self.deadline, _start=self._start + start,
                              _stopped=self._stopped)
        return self._feeds[index]

    def __iter__(self) -> Iterator[Feed]:
        for i, feed in enumerate(self._feeds):
            if time.monotonic() >= self.deadline:
                if not self._stopped:
                    self._stopped.append(self._start + i)
                raise CalibrationTimeout(f"the time budget ran out after {self._start + i} calibration samples")
            yield feed


# ---------------------------------------------------------------------------------------------------
# Generated inputs and batching


def _is_batch_dim(spec: _InputSpec, axis: int) -> bool:
    """A dynamic dim named like a batch, or dynamic axis 0 when no dim of the input is named so."""
    dims = spec.dims or []
    dim = dims[axis]
    if isinstance(dim, int):
        return False
    named = [i for i, d in enumerate(dims) if isinstance(d, str) and "batch" in d.lower()]
    return axis in named if named else axis == 0


def batch_axes(model: onnx.ModelProto) -> dict[str, int] | None:
    """The dynamic batch axis of each input, or None when some input has none (no batching possible)."""
    axes = {}
    for spec in model_inputs(model):
        found = [axis for axis in range(len(spec.dims or [])) if _is_batch_dim(spec, axis)]
        if not found:
            return None
        axes[spec.name] = found[0]
    return axes


def _is_state_batch_dim(spec: _InputSpec, axis: int) -> bool:
    """The unnamed dynamic middle dim of a rank-3 input with static ends: a recurrent state's batch, laid out like
    ONNX LSTM/GRU/RNN's initial_h [directions * layers, batch, hidden] (Silero VAD's state [2, ?, 128])."""
    dims = spec.dims or []
    return (len(dims) == 3 and axis == 1 and dims[1] is None and isinstance(dims[0], int)
            and isinstance(dims[2], int))


def synthetic_samples(model: onnx.ModelProto, count: int = 8, batch: int = 1, dynamic_dim: int = 8,
                      spatial_dim: int = 64, seed: int = 0, states_batched: bool = False) -> SampleSet:
    """Generated feeds for the accuracy check when the user sent no samples (holdout only).

    Plausible values rather than uniform noise: normal floats, ones for masks, zeros for token
    type ids, small non-negative integers elsewhere (ids below any realistic vocabulary size).
    Dynamic batch dims get `batch`, the other dynamic dims of an image-like input (rank 4 or more)
    `spatial_dim`, the rest `dynamic_dim`. 64, not 8, for images: detectors and segmenters (DBNet,
    YOLO, U-Nets) add feature maps of strides up to 32 back together, so an 8x8 image fails inside
    the model and the whole job with it. `states_batched`: a recurrent state's unnamed batch dim
    (`_is_state_batch_dim`) gets `batch` too; off by default, as a transformer's [1, ?, hidden] has the
    same layout and its ? is a sequence (the pipeline's second try on generated inputs turns it on).
    """
    rng = np.random.default_rng(seed)
    specs = model_inputs(model)
    samples = []
    for _ in range(count):
        feed = {}
        for spec in specs:
            dims = spec.dims if spec.dims is not None else [batch]
            other = spatial_dim if len(dims) >= 4 else dynamic_dim
            shape = [d if isinstance(d, int) else
                     (batch if _is_batch_dim(spec, i) or (states_batched and _is_state_batch_dim(spec, i)) else other)
                     for i, d in enumerate(dims)]
            lowered = spec.name.lower()
            if "mask" in lowered:
                feed[spec.name] = np.ones(shape, spec.dtype)
            elif spec.dtype.kind == "f":
                feed[spec.name] = rng.normal(0, 1, size=shape).astype(spec.dtype)
            elif "token_type" in lowered or "segment" in lowered:
                feed[spec.name] = np.zeros(shape, spec.dtype)
            elif spec.dtype.kind == "b":
                feed[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
            else:
                feed[spec.name] = rng.integers(0, 10, size=shape).astype(spec.dtype)
        samples.append(feed)
    note = (f"no calibration set: {count} generated samples (normal floats, ones for masks, small integers "
            "elsewhere); accuracy on them says little about real inputs")
    return SampleSet(calibration=[], holdout=samples, synthetic=True, source="synthetic", notes=[note])


def batch_feeds(feeds: Sequence[Feed], batch: int, axes: dict[str, int] | None = None) -> list[Feed]:
    """Concatenate consecutive samples into feeds of `batch` samples (for batched latency).

    `axes` maps input name to its batch axis (see `batch_axes`; default 0). Only full batches are
    returned so every timed run has the same shape; with fewer samples than `batch`, samples are
    repeated to fill one batch.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if not feeds:
        return []
    pool = list(feeds)
    if len(pool) < batch:
        pool = [pool[i % len(pool)] for i in range(batch)]
    axes = axes or {}
    batched = []
    for start in range(0, len(pool) - batch + 1, batch):
        group = pool[start : start + batch]
        batched.append({name: np.concatenate([f[name] for f in group], axis=axes.get(name, 0))
                        for name in group[0]})
    return batched
