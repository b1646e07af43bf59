"""Does a variant still compute what the FP32 original computes? Compare their outputs on held-back samples.

Whole-tensor numbers alone are not enough: a detector's single output often holds boxes (0-320) and
class scores (0-1) side by side, and the whole-tensor cosine stays at 0.999 while every score is
wrong (INT8 gives the tensor one scale and the scores round to 0). So besides max/mean absolute
difference, cosine similarity and top-1 agreement, every output of rank >= 3 is also cut into slices
along its channel axis, and each slice is judged against its *own* range.

The rules, in one place:
- Cosine similarity and the absolute differences are taken over all samples at once (flattened).
- Relative error is ||candidate - reference||_2 / ||reference||_2.
- NaN or Inf in the candidate where the reference is finite fails the output. Positions where the
  reference itself is not finite are left out of every metric.
- Top-1 agreement is measured where an output looks like class scores: a float output of rank 2
  ([batch, classes], classes >= 2) unless its name says it is an embedding/hidden state/feature
  vector, or a float output of rank >= 3 whose name says logits or probabilities (argmax over the
  last axis). A row agrees when the candidate's argmax is a maximum of the reference row (ties in the
  reference count as agreement). The graph comes before the name when the pipeline reads it
  (`output_roles`): an output computed by an L2 normalization (LpNormalization, or a Div by ReduceL2
  or Sqrt(ReduceSumSquare)) is an embedding, and a rank-2 one computed by Softmax, LogSoftmax or
  Sigmoid is class scores, whatever their names. `Tolerance.class_outputs` overrides the guess, and
  so does a metric named for the output. A top-1 gate guessed (not named logits/probabilities, nor
  declared) says so in every reason that blames it, with how to turn it off (`guess_hint`). WHY:
  GE2E's speaker embedding renamed "output" was gated on top-1, which 12 held-back rows cannot prove,
  so INT8 (1.53x at cosine 0.9994) was never tried. Top-1 is reported with the rows it rests on and a
  one-sided 95% lower bound (Wilson) over its independent units: one per row of a [batch, classes]
  output, one per sequence of a rank >= 3 output (a line's CTC steps agree or drift together).
- Top-1 gates on that bound: an output whose top-1 gates it (by default or as its declared metric)
  passes only when the bound reaches `min_top1`. When the measured figure reaches it but the bound
  does not, the output fails as *unproven*, and the reason says how many units agreeing as these do
  would prove it and which `min_top1` these units do prove. WHY: Magika passed at 100% on 8
  held-back rows (bound 74.7%) and agreed 96.3% on 300 fresh inputs, under its 99% gate; few rows
  prove little, and a variant that is not shown to be as accurate as asked is not served. A variant
  that reproduces the original up to float32 rounding (relative error <= `FLOAT_ROUNDING`: a fused
  FP32 graph) needs no proof: it is not less accurate, and any top-1 it changes is a near-tie. A
  mask gates on its worst held-back sample (below), not on a bound: its positions are not independent.
- Slice check (channel axis): rank 3 -> the last axis when it is <= 1024 (detector heads
  [N, boxes, 4+classes]), else axis 1 when that is <= 1024 ([N, 4+classes, boxes]); rank >= 4 ->
  axis 1 (ONNX's NCHW channels); rank <= 2 -> none (classifier columns over a few samples are noise;
  top-1 and cosine judge those). `Tolerance.channel_axis` overrides the guess for checked outputs.
  Per slice: normalized max error = max|a-b| / (max(ref slice) - min(ref slice)) and cosine
  similarity; the worst slice of each is reported. A slice whose reference is constant is normalized
  by the whole tensor's range instead, and a slice whose reference is all zero has no cosine.
- A user may name the metric that gates an output (`Tolerance.metrics`), the one its real
  post-processing uses: "cosine" (cosine, slices and max_abs, no top-1: an output that is not class
  scores, whatever its shape and name say), "top1" (argmax agreement over the last axis >= min_top1, e.g. a CTC
  recogniser's per-time-step classes) or "mask:<t>" (e.g. a text detector's saturated probability
  map thresholded at 0.3): the region `x > t` of each held-back sample must overlap the original's
  with IoU >= min_top1, the worst sample deciding (a sample where neither has a position above `t`
  counts 1). WHY IoU per sample, not the share of agreeing positions: text covers ~10% of a page, so
  99.1% of pixels agreeing was a text IoU of 0.917, and the served PP-OCR det INT8 changed the boxes
  on 42 of 80 fresh pages; pooled over samples, one bad page hides among good ones. The share of
  agreeing positions is still reported (`mask_agreement`). Every other
  metric is still measured and reported for that output but does not gate it; outputs not named
  keep the strict default ("default").
- Outputs that are not numbers (strings, bools: a scikit-learn classifier's `label` exported with
  zipmap=False) have no cosine nor argmax: they gate on "exact", the share of values equal to the
  original's, and so may a numeric output whose user names that metric (an int64 label). It is
  reported in the top-1 fields (`top1` = the share, its rows and units: one unit per row of the
  first axis) and gates as top-1 does, on its 95% lower bound reaching `min_top1`, not on 100%.
  WHY that and not 1.0: a label is the argmax of the scores beside it, whose top-1 gate already
  allows `min_top1`; asking the label for 1.0 would refuse what the scores' gate allows, and 1.0 on
  a few held-back rows proves no more than top-1 on them does. A variant whose numeric outputs all
  reproduce the original's up to float rounding (a fused FP32 graph) needs no proof here either:
  any label it changes is a near-tie, as in `_unproven`.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from optimizer.errors import OptimizerError

#: Relative L2 error under which a variant computes the same function as the original up to float32 rounding
#: (fused FP32 graphs: ~1e-7; FP16: ~1e-3; INT8: ~1e-2): its top-1 needs no statistical proof.
FLOAT_ROUNDING = 1e-4
SLICE_AXIS_MAX = 1024  # more slices than this are positions, not channels
_EMBEDDING_NAME = re.compile(r"embed|hidden|pool|feature|encod|token|vector", re.IGNORECASE)
_LOGITS_NAME = re.compile(r"logit|prob", re.IGNORECASE)


class ToleranceError(OptimizerError, ValueError):
    """The accuracy tolerance a user gave is impossible or names outputs the model does not have."""


@dataclass
class Tolerance:
    """When a variant's outputs count as the same as the original's. Defaults are the strict gate.

    `outputs` names the outputs that matter (None: all); the others are still measured and reported
    but cannot fail the variant. Set `min_slice_cosine` and `max_slice_error` to None to skip the
    slice check.
    """

    min_cosine: float = 0.99
    min_top1: float = 0.99
    max_abs: float | None = None
    outputs: list[str] | None = None
    channel_axis: int | None = None  # None: the rule in the module docstring
    # Measured here: dynamic INT8 transformers keep slice cosine >= 0.9997 and err by <= 2% of a slice's
    # range. Broken slices (scores rounded to 0 or 2 levels, or scrambled) sit at cosine <= 0.8 or err by
    # >= 60% of their range. The error limit is the backstop for slices whose offset flatters cosine.
    min_slice_cosine: float | None = 0.98
    max_slice_error: float | None = 0.25
    class_outputs: list[str] | None = None  # outputs to judge on top-1 (None: guess from graph, shape and name)
    # output name -> "default" | "cosine" | "top1" | "exact" | "mask:<threshold>": the metric that gates it
    # (module docstring); a string or bool output gates on "exact" unless named otherwise
    metrics: dict[str, str] | None = None
    # output name -> (role, what in the graph says so), from `output_roles` of the model; read before the name rule
    graph_roles: dict[str, tuple[str, str]] | None = None

    def __post_init__(self) -> None:
        for name in ("min_cosine", "min_slice_cosine"):
            value = getattr(self, name)
            if value is not None and not -1.0 <= value <= 1.0:
                raise ToleranceError(f"{name} must lie between -1 and 1 (cosine similarity), got {value}")
        if not 0.0 <= self.min_top1 <= 1.0:
            raise ToleranceError(f"min_top1 is a fraction of agreeing rows between 0 and 1, got {self.min_top1}")
        for name in ("max_abs", "max_slice_error"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ToleranceError(f"{name} must be >= 0 or unset, got {value}")
        for output, metric in (self.metrics or {}).items():
            parse_metric(metric, output)


METRICS = ("default", "cosine", "top1", "exact", "mask:<threshold>")


def parse_metric(metric: str, output: str = "?") -> tuple[str, float | None]:
    """("default" | "cosine" | "top1" | "exact" | "mask", threshold or None) for a metric name; ToleranceError
    otherwise."""
    if metric in ("default", "cosine", "top1", "exact"):
        return metric, None
    if isinstance(metric, str) and metric.startswith("mask:"):
        try:
            threshold = float(metric.removeprefix("mask:"))
        except ValueError:
            threshold = math.nan
        if math.isfinite(threshold):
            return "mask", threshold
    raise ToleranceError(f"unknown metric {metric!r} for output {output!r}: use one of {', '.join(METRICS)} "
                         "(e.g. mask:0.3)")


@dataclass
class SliceResult:
    """The worst slice of one output along its channel axis, for each slice metric."""

    axis: int
    count: int
    worst_error_index: int
    worst_error: float  # max|a-b| / range of the reference slice
    worst_cosine_index: int | None  # None when no slice has a non-zero reference
    worst_cosine: float | None


@dataclass
class OutputAccuracy:
    """Every metric for one output over all held-back samples, and whether it passed."""

    name: str
    checked: bool  # False: measured but not one of Tolerance.outputs, so it cannot fail the variant
    shape: list[int] | None  # of the first sample's reference
    elements: int = 0
    max_abs: float | None = None
    mean_abs: float | None = None
    relative_error: float | None = None
    cosine: float | None = None
    top1: float | None = None  # None: not class scores; metric "exact": the share of values equal to the original's
    top1_rows: int | None = None  # how many argmax decisions top1 was measured on
    # how many of them are independent: one per row of a rank-2 output, one per sequence of a rank >= 3 output
    top1_units: int | None = None
    top1_lower_95: float | None = None  # what top1 can be said to be at least, at 95% confidence (on top1_units)
    # failed only because top1_lower_95 < min_top1 while top1 >= min_top1: more samples may prove it
    unproven: bool = False
    # held-back samples like these, agreeing at this top1, that would prove min_top1 (None: no number would)
    samples_to_prove: int | None = None
    # why top-1 gates this output when nobody said so (the graph or the shape-and-name guess); None: not guessed
    top1_guess: str | None = None
    metric: str = "default"  # what gates this output (Tolerance.metrics; "exact" for a string or bool output)
    mask_agreement: float | None = None  # share of positions on the same side of the mask threshold (reported)
    mask_iou: float | None = None  # the worst held-back sample's IoU of the regions x > threshold (gates)
    mask_iou_sample: int | None = None  # which held-back sample that was
    # the worst held-back sample's own cosine (reported, not gated: the gate's cosine pools all samples)
    worst_sample_cosine: float | None = None
    nonfinite: int = 0  # candidate NaN/Inf where the reference is finite
    slices: SliceResult | None = None
    passed: bool = True
    reason: str | None = None


@dataclass
class AccuracyReport:
    passed: bool
    reason: str | None
    samples: int
    unproven: bool = False  # failed, and every failing checked output failed only as unproven (see OutputAccuracy)
    outputs: dict[str, OutputAccuracy] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: plain Python types only, NaN/Inf as None."""
        return _json_safe(asdict(self))


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def run_outputs(session: ort.InferenceSession, feeds: Sequence[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Run `session` once per feed and return each run's outputs by name (the input `compare` takes)."""
    names = [o.name for o in session.get_outputs()]
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # a failing run raises with ORT's message; its own [E:onnxruntime] line is noise
    return [dict(zip(names, session.run(names, feed, quiet), strict=True)) for feed in feeds]


def is_class_scores(name: str, array: np.ndarray) -> bool:
    """The top-1 rule from the module docstring, for one output's reference array."""
    if not np.issubdtype(array.dtype, np.floating) or array.ndim < 2 or array.shape[-1] < 2:
        return False
    if array.ndim == 2:
        return not _EMBEDDING_NAME.search(name)
    return bool(_LOGITS_NAME.search(name))


EMBEDDING, SCORES = "embedding", "class scores"
_PASS_THROUGH = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast"}  # same values, other shape/type
_SCORE_OPS = {"Softmax", "LogSoftmax", "Sigmoid"}
# between a norm and the Div by it: F.normalize's eps clamp (Clip/Max), broadcasting (Expand), an eps Add
_NORM_GUARDS = _PASS_THROUGH | {"Expand", "Clip", "Max", "Add"}


def output_roles(model: onnx.ModelProto) -> dict[str, tuple[str, str]]:
    """Output name -> (EMBEDDING or SCORES, the op that says so), for the outputs whose computing op tells.

    WHY: the shape-and-name rule (`is_class_scores`) takes any [batch, N] float output not named like an embedding
    for class scores; the op computing it knows better. An L2 normalization makes an embedding; Softmax, LogSoftmax
    or Sigmoid make scores (used for rank-2 outputs only: a Sigmoid map [N, 1, H, W] has no classes on its last axis).
    """
    producers = {out: node for node in model.graph.node for out in node.output}

    def source(tensor: str, through: set[str]) -> onnx.NodeProto | None:
        node = producers.get(tensor)
        while node is not None and node.op_type in through and node.input:
            node = producers.get(node.input[0])
        return node

    def is_l2_norm(tensor: str, depth: int = 0) -> bool:
        node = producers.get(tensor)
        if node is None or depth > 6:
            return False
        if node.op_type == "ReduceL2":
            return True
        if node.op_type == "Sqrt":
            inner = source(node.input[0], _PASS_THROUGH)
            return inner is not None and inner.op_type == "ReduceSumSquare"
        if node.op_type in _NORM_GUARDS:
            return any(is_l2_norm(i, depth + 1) for i in node.input if i)
        return False

    roles: dict[str, tuple[str, str]] = {}
    for output in model.graph.output:
        node = source(output.name, _PASS_THROUGH)
        if node is None:
            continue
        p = next((a.i for a in node.attribute if a.name == "p"), 2)
        if node.op_type == "LpNormalization" and p == 2:
            roles[output.name] = (EMBEDDING, "LpNormalization (p=2)")
        elif node.op_type == "Div" and len(node.input) > 1 and is_l2_norm(node.input[1]):
            roles[output.name] = (EMBEDDING, "a Div by its L2 norm")
        elif node.op_type in _SCORE_OPS:
            roles[output.name] = (SCORES, node.op_type)
    return roles


def top1_guess(name: str, array: np.ndarray,
               roles: dict[str, tuple[str, str]] | None = None) -> tuple[bool, str | None]:
    """(whether top-1 gates an output nobody declared a metric for, why when that is a guess): what the graph says
    (`output_roles`), else the shape-and-name rule (`is_class_scores`). A name that says logits or probabilities
    is no guess: it says what the output is."""
    role, op = (roles or {}).get(name, (None, ""))
    if role == EMBEDDING:
        return False, None
    named = bool(_LOGITS_NAME.search(name))
    rank2 = np.issubdtype(array.dtype, np.floating) and array.ndim == 2 and array.shape[-1] >= 2
    if role == SCORES and rank2:
        return True, None if named else f"{name!r} is computed by {op}, so it looks like class scores"
    if not is_class_scores(name, array):
        return False, None
    if named:
        return True, None
    return True, f"{name!r} looks like class scores ([batch, {array.shape[-1]}] float, name not an embedding's)"


def guess_hint(name: str, guess: str) -> str:
    """The words every reason that blames a guessed top-1 gate ends with: the guess, and how to turn it off.

    In JSON, which the upload's `metrics` field and the command line's --metrics read (a Python dict's repr was
    refused there), and as the flag to paste, quoted for a shell; a Python caller reads the same JSON as a dict."""
    value = json.dumps({name: "cosine"})
    return (f"the top-1 gate is a guess: {guess}; if it is not class scores, say so: metrics {value} "
            f"(on the command line: --metrics {shlex.quote(value)})")


def default_channel_axis(shape: Sequence[int]) -> int | None:
    """The slice-check axis rule from the module docstring."""
    if len(shape) == 3:
        if shape[2] <= SLICE_AXIS_MAX:
            return 2
        return 1 if shape[1] <= SLICE_AXIS_MAX else None
    if len(shape) >= 4:
        return 1
    return None


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks; 1 when both are empty (nothing detected, as the original)."""
    union = int(np.count_nonzero(a | b))
    return float(np.count_nonzero(a & b)) / union if union else 1.0


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


Z_95 = 1.645  # one-sided 95%


def agreement_lower_bound(agree: float, total: int, z: float = Z_95) -> float:
    """One-sided 95% lower bound of an agreement rate seen as `agree` of `total` (Wilson score interval).

    WHY: held-back sets are small; 5 of 5 rows agreeing says little about the 99% the gate asks for
    (the bound is 0.65), and a report should say how much its top-1 figure can be trusted.
    """
    if total <= 0:
        return 0.0
    p, z2 = agree / total, z * z
    center = p + z2 / (2 * total)
    spread = z * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total))
    return max(0.0, (center - spread) / (1 + z2 / total))


def rows_to_prove(rate: float, observed: float = 1.0, z: float = Z_95) -> int | None:
    """The fewest rows that, agreeing at the `observed` rate, put `agreement_lower_bound` at `rate` or above.

    None when no number of rows does: `observed` is not above `rate` (no bound reaches 100%).
    """
    if observed <= rate:
        return None
    if observed >= 1.0:
        return math.ceil(rate * z * z / (1 - rate))
    # the bound rises with the row count at a fixed rate: double, then bisect
    high = 1
    while agreement_lower_bound(observed * high, high, z) < rate:
        high *= 2
    low = high // 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if agreement_lower_bound(observed * mid, mid, z) < rate else (low, mid)
    return high


def _set_top1(result: OutputAccuracy, ref: list[np.ndarray], cand: list[np.ndarray]) -> None:
    agree, total = _top1_counts(ref, cand)
    result.top1 = agree / total if total else 1.0
    result.top1_rows = total
    # The bound counts independent units: rows of a [batch, classes] output, but one per sequence of a rank >= 3
    # output ([batch, steps, classes]: a sentence's tokens or a line's CTC steps rise and fall together).
    units = sum(int(np.prod(r.shape[:-2])) if r.ndim >= 3 else int(np.prod(r.shape[:-1])) for r in ref)
    result.top1_units = units
    result.top1_lower_95 = agreement_lower_bound(result.top1 * units, units) if total and units else None


def _top1_counts(ref: list[np.ndarray], cand: list[np.ndarray]) -> tuple[int, int]:
    """(rows whose argmax agrees, rows): over every row of the last axis in every sample."""
    agree = total = 0
    for r, c in zip(ref, cand, strict=True):
        r2 = r.reshape(-1, r.shape[-1]).astype(np.float64)
        c2 = c.reshape(-1, c.shape[-1]).astype(np.float64)
        picked = np.take_along_axis(r2, np.nanargmax(np.where(np.isfinite(c2), c2, -np.inf), axis=1)[:, None], 1)
        agree += int(np.sum(picked[:, 0] >= np.nanmax(r2, axis=1)))
        total += r2.shape[0]
    return agree, total


def _slices(ref: list[np.ndarray], cand: list[np.ndarray], axis: int) -> SliceResult:
    """Per-slice normalized max error and cosine along `axis`, pooled over all samples."""
    r = np.concatenate([np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis]) for x in ref]).astype(np.float64)
    c = np.concatenate([np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis]) for x in cand]).astype(np.float64)
    valid = np.isfinite(r) & np.isfinite(c)
    r, c = np.where(valid, r, 0.0), np.where(valid, c, 0.0)
    lo = np.where(valid, r, np.inf).min(axis=0)
    hi = np.where(valid, r, -np.inf).max(axis=0)
    span = np.where(np.isfinite(hi - lo), hi - lo, 0.0)
    seen = np.isfinite(hi)
    tensor_span = float(hi[seen].max() - lo[seen].min()) if seen.any() else 0.0
    tensor_span = max(tensor_span, 1e-12)
    # A constant reference slice has no range of its own: judge it against the whole tensor's range.
    denom = np.where(span > 1e-6 * tensor_span, span, tensor_span)
    errors = np.abs(r - c).max(axis=0) / denom
    ref_norm, cand_norm = np.linalg.norm(r, axis=0), np.linalg.norm(c, axis=0)
    peak = np.abs(r).max(axis=0)
    has_signal = peak > 1e-6 * max(float(peak.max(initial=0.0)), 1e-30)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosines = np.where(cand_norm > 0, (r * c).sum(axis=0) / (ref_norm * cand_norm), 0.0)
    worst_err = int(np.argmax(errors))
    if has_signal.any():
        judged = np.where(has_signal, cosines, np.inf)
        worst_cos: int | None = int(np.argmin(judged))
        worst_cos_value: float | None = float(cosines[worst_cos])
    else:
        worst_cos, worst_cos_value = None, None
    return SliceResult(axis=axis, count=r.shape[1], worst_error_index=worst_err, worst_error=float(errors[worst_err]),
                       worst_cosine_index=worst_cos, worst_cosine=worst_cos_value)


def is_numeric(array: np.ndarray) -> bool:
    """Whether differences, cosine and argmax mean anything for an output: numbers, not strings nor bools."""
    return bool(np.issubdtype(array.dtype, np.number))


def _set_exact(result: OutputAccuracy, ref: list[np.ndarray], cand: list[np.ndarray]) -> None:
    """Metric "exact" in the top-1 fields: the share of values equal to the original's, over one unit per row."""
    equal = sum(int(np.count_nonzero(np.asarray(r == c))) for r, c in zip(ref, cand, strict=True))
    total = sum(int(r.size) for r in ref)
    result.top1 = equal / total if total else 1.0
    result.top1_rows = total
    result.top1_units = units = sum(int(r.shape[0]) if r.ndim else 1 for r in ref)
    result.top1_lower_95 = agreement_lower_bound(result.top1 * units, units) if total and units else None


def _reproduces(out: OutputAccuracy) -> bool:
    """A numeric output the variant computes as the original does, up to float32 rounding."""
    return out.max_abs == 0.0 or (out.relative_error is not None and out.relative_error <= FLOAT_ROUNDING)


def _compare_output(name: str, ref: list[np.ndarray], cand: list[np.ndarray | None], tol: Tolerance,
                    checked: bool, same_function: bool = False) -> OutputAccuracy:
    """`same_function`: every numeric output of the variant reproduces the original's (`_reproduces`), so an exact
    output needs no proof (module docstring)."""
    result = OutputAccuracy(name=name, checked=checked, shape=[int(d) for d in ref[0].shape])

    def fail(reason: str) -> OutputAccuracy:
        result.passed, result.reason = False, f"output {name!r}: {reason}"
        return result

    for i, (r, c) in enumerate(zip(ref, cand, strict=True)):
        if c is None:
            return fail(f"missing from the variant's outputs (sample {i})")
        if r.shape != c.shape:
            return fail(f"shape {list(c.shape)} differs from the original's {list(r.shape)} (sample {i})")
    cands: list[np.ndarray] = [c for c in cand if c is not None]
    result.metric = (tol.metrics or {}).get(name, "default" if is_numeric(ref[0]) else "exact")
    kind, threshold = parse_metric(result.metric, name)

    def exact() -> OutputAccuracy:
        _set_exact(result, ref, cands)
        if result.top1 < tol.min_top1:
            return fail(f"{result.top1:.2%} of its values equal the original's < limit {tol.min_top1:.2%} "
                        "(metric exact)")
        unproven = None if same_function else _unproven(result, tol, len(ref))
        return fail(unproven) if unproven else result

    if not is_numeric(ref[0]):  # strings, bools: no number to take a difference of (compare allows only exact)
        result.elements = sum(int(r.size) for r in ref)
        return exact()
    a = np.concatenate([x.ravel() for x in ref]).astype(np.float64)
    b = np.concatenate([x.ravel() for x in cands]).astype(np.float64)
    ref_finite = np.isfinite(a)
    result.elements = int(a.size)
    result.nonfinite = int(np.sum(ref_finite & ~np.isfinite(b)))
    a, b = a[ref_finite], b[ref_finite]
    if result.nonfinite:
        return fail(f"{result.nonfinite} NaN/Inf values where the original is finite")

    if a.size:
        diff = np.abs(a - b)
        result.max_abs, result.mean_abs = float(diff.max()), float(diff.mean())
        ref_norm = float(np.linalg.norm(a))
        result.relative_error = float(np.linalg.norm(a - b) / ref_norm) if ref_norm > 0 else None
        result.cosine = _cosine(a, b)
        per_sample = [_cosine(r.ravel().astype(np.float64), c.ravel().astype(np.float64))
                      for r, c in zip(ref, cands, strict=True) if r.size and np.isfinite(r).all()]
        result.worst_sample_cosine = min(per_sample, default=result.cosine)
    if kind in ("cosine", "exact"):  # the user says it is not class scores
        is_scores = False
    elif tol.class_outputs is not None:
        is_scores = name in tol.class_outputs
    else:
        is_scores, guess = top1_guess(name, ref[0], tol.graph_roles)
        result.top1_guess = guess if kind == "default" else None  # a declared top1 or a mask is no guess
    if is_scores and ref[0].ndim >= 1 and ref[0].shape[-1] >= 2:
        _set_top1(result, ref, cands)
    explicit = tol.channel_axis is not None and checked  # a user's axis applies to the outputs that matter
    axis = tol.channel_axis if explicit else default_channel_axis(ref[0].shape)
    slice_check = tol.min_slice_cosine is not None or tol.max_slice_error is not None
    if axis is not None and slice_check and a.size:
        if not -ref[0].ndim <= axis < ref[0].ndim:
            raise ToleranceError(f"channel_axis {axis} does not exist in output {name!r} of shape "
                                 f"{list(ref[0].shape)}: name the outputs it applies to, or leave it unset")
        axis %= ref[0].ndim
        if len({x.shape[axis] for x in ref}) == 1:
            result.slices = _slices(ref, cands, axis)

    if tol.max_abs is not None and result.max_abs is not None and result.max_abs > tol.max_abs:
        return fail(f"max absolute difference {result.max_abs:.4g} > limit {tol.max_abs:.4g}")
    if kind == "exact":  # declared for a numeric output (an int64 label): cosine and slices above are reported
        return exact()
    if kind == "top1":  # the declared task metric gates alone; cosine and slices above are reported
        if result.top1 is None:
            _set_top1(result, ref, cands)
        if result.top1 < tol.min_top1:
            return fail(f"top-1 agreement {result.top1:.2%} < limit {tol.min_top1:.2%} (metric top1)")
        unproven = _unproven(result, tol, len(ref))
        return fail(unproven) if unproven else result
    if kind == "mask":
        result.mask_agreement = float(np.mean((a > threshold) == (b > threshold))) if a.size else 1.0
        ious = [_mask_iou(r > threshold, c > threshold) for r, c in zip(ref, cands, strict=True)]
        result.mask_iou_sample = int(np.argmin(ious))
        result.mask_iou = ious[result.mask_iou_sample]
        if result.mask_iou < tol.min_top1:
            return fail(f"held-back sample {result.mask_iou_sample}'s region x > {threshold:g} overlaps the "
                        f"original's with IoU {result.mask_iou:.2%} < limit {tol.min_top1:.2%} (metric "
                        f"{result.metric}; {result.mask_agreement:.2%} of all positions agree)")
        return result
    if result.cosine is not None and result.cosine < tol.min_cosine:
        return fail(f"cosine similarity {result.cosine:.4f} < limit {tol.min_cosine:.4f}")
    if result.top1 is not None and result.top1 < tol.min_top1:
        hint = f" ({guess_hint(name, result.top1_guess)})" if result.top1_guess else ""
        return fail(f"top-1 agreement {result.top1:.2%} < limit {tol.min_top1:.2%}{hint}")
    s = result.slices
    if s is not None:
        where = f"slice {{}} of {s.count} along axis {s.axis}"
        if tol.min_slice_cosine is not None and s.worst_cosine is not None and s.worst_cosine < tol.min_slice_cosine:
            return fail(f"{where.format(s.worst_cosine_index)} has cosine similarity {s.worst_cosine:.4f} < limit "
                        f"{tol.min_slice_cosine:.4f} (whole-tensor cosine {result.cosine:.4f})")
        if tol.max_slice_error is not None and s.worst_error > tol.max_slice_error:
            return fail(f"{where.format(s.worst_error_index)} is off by {s.worst_error:.1%} of its own range > "
                        f"limit {tol.max_slice_error:.1%} (whole-tensor cosine {result.cosine:.4f})")
    unproven = _unproven(result, tol, len(ref))  # last: a variant that fails outright is not "unproven"
    return fail(unproven) if unproven else result


def _unproven(result: OutputAccuracy, tol: Tolerance, samples: int) -> str | None:
    """Why a top-1 that reaches `min_top1` as measured is not proven by the units it rests on, with what would
    prove it; None when its bound reaches `min_top1` (or there is no top-1). Marks `result` unproven."""
    bound, units = result.top1_lower_95, result.top1_units
    if result.top1 is None or bound is None or not units or bound >= tol.min_top1:
        return None
    if result.relative_error is not None and result.relative_error <= FLOAT_ROUNDING:
        # the same function up to float rounding (a fused FP32 graph): a top-1 it changes is a near-tie that the
        # original's own rounding decides as arbitrarily; nothing is less accurate, so there is nothing to prove
        return None
    what = "rows" if units == result.top1_rows or result.metric == "exact" else "sequences"
    measure = "exact agreement" if result.metric == "exact" else "top-1 agreement"
    needed = rows_to_prove(tol.min_top1, result.top1)
    result.unproven = True
    if needed is None:
        need = f"no number of {what} proves {tol.min_top1:.1%}"
    else:
        result.samples_to_prove = math.ceil(needed * samples / units)
        agreeing = "all agreeing" if result.top1 >= 1.0 else f"agreeing {result.top1:.1%} of the time as these do"
        need = (f"{needed} {what} {agreeing} prove it ({result.samples_to_prove} held-back samples like these, not "
                f"{samples})")
    proven = math.floor(bound * 1000) / 1000
    hint = f"; {guess_hint(result.name, result.top1_guess)}" if result.top1_guess else ""
    return (f"unproven: {measure} {result.top1:.1%} reaches the {tol.min_top1:.1%} asked for on {units} "
            f"{what}, but so few prove only {bound:.1%} (95% lower bound); {need}, or min_top1 {proven:g} is what "
            f"these prove{hint}")


def compare(reference: Sequence[dict[str, np.ndarray]], candidate: Sequence[dict[str, np.ndarray]],
            tolerance: Tolerance | None = None) -> AccuracyReport:
    """Judge a variant's outputs against the original's: one dict of outputs per held-back sample, same order.

    Never raises for a bad variant (that is a failed report); raises ToleranceError when the
    tolerance names an output the original does not have, ValueError when the two lists differ in length.
    """
    tol = tolerance or Tolerance()
    if not reference:
        raise ValueError("compare needs at least one sample's outputs")
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference runs but {len(candidate)} candidate runs: pass one per sample")
    names = list(reference[0])
    for listed in (tol.outputs or []) + (tol.class_outputs or []) + list(tol.metrics or {}):
        if listed not in names:
            raise ToleranceError(f"the tolerance names output {listed!r}, but the model's outputs are {names}")
    for listed, metric in (tol.metrics or {}).items():
        shape = np.shape(reference[0][listed])
        kind = parse_metric(metric, listed)[0]
        if kind not in ("default", "exact") and not is_numeric(np.asarray(reference[0][listed])):
            raise ToleranceError(f"output {listed!r} holds {np.asarray(reference[0][listed]).dtype} values, not "
                                 f"numbers: it can only be compared exactly (metric exact), not by {metric}")
        if parse_metric(metric, listed)[0] == "top1" and (len(shape) < 1 or shape[-1] < 2):
            raise ToleranceError(f"metric top1 needs classes on the last axis of output {listed!r}, whose shape "
                                 f"is {list(shape)}")
    checked = set(tol.outputs) if tol.outputs is not None else set(names)

    report = AccuracyReport(passed=True, reason=None, samples=len(reference))
    numeric = [name for name in names if is_numeric(np.asarray(reference[0][name]))]
    results = {}
    for name in numeric + [name for name in names if name not in numeric]:  # numeric first: they say same_function
        same_function = bool(numeric) and all(_reproduces(results[n]) for n in numeric if n in results)
        results[name] = _compare_output(name, [run[name] for run in reference], [run.get(name) for run in candidate],
                                        tol, name in checked, same_function and name not in numeric)
    report.outputs = {name: results[name] for name in names}
    failed = [out for out in report.outputs.values() if not out.passed and out.checked]
    if failed:
        report.passed, report.reason = False, "; ".join(out.reason for out in failed if out.reason)
        report.unproven = all(out.unproven for out in failed)
    return report
