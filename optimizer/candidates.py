"""Which variants to build for a request: one recipe for an explicit precision, a short list for auto.

A candidate is a name, a precision, JSON-ready settings for the report and a `build` function
from (fused fp32 model, sample set) to a PassResult. Candidates never decide which one wins:
the pipeline measures them all the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx
from onnxruntime.quantization.registry import IntegerOpsRegistry

from optimizer.calibration import SampleSet
from optimizer.errors import PassError
from optimizer.passes import conv_matmul, equalize, fp16, int8_dynamic, int8_static, smooth
from optimizer.passes.base import PassResult

Build = Callable[[onnx.ModelProto, SampleSet], PassResult]

#: The op types whose integer kernels pay; quantizing only these keeps softmax, mask adds and outputs in float.
HEAVY_OPS = ("Conv", "MatMul", "Gemm")
#: Ops dynamic INT8 quantizes on their own (Gemm through MatMul); Transpose only passes on an input already quantized.
DYNAMIC_ANCHORS = frozenset({*IntegerOpsRegistry, "Gemm"} - {"Transpose"})
#: SmoothQuant's alpha for the "-sq" dynamic candidate (MiniLM: 0.5 and 0.75 passed with 2 FFN-output MatMuls in
#: float, 0.5 with more slice margin; bench/smooth.py).
SMOOTH_ALPHA = 0.5
#: The "-eq" static candidate's equalization (bench/equalize.py: PP-OCR det's QDQ U8S8 heavy worst cosine 0.919 ->
#: 0.992, PicoDet layout's 0.45 -> 0.97; Conv inputs alone or outputs alone gained far less).
EQUALIZE = equalize.EqualizeConfig(alpha=0.5, min_spread=4.0, output_spread=2.0)


@dataclass
class Candidate:
    name: str
    precision: str  # fp32 | fp16 | int8
    settings: dict[str, Any]
    build: Build


@dataclass
class Plan:
    candidates: list[Candidate] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {name, reason}: not tried, and why
    notes: list[str] = field(default_factory=list)  # why the grid is what it is on this CPU (the report's decisions)
    # skipped for this CPU (listed in `skipped`), built only when a request names them (AutoSearch.only)
    held_back: list[Candidate] = field(default_factory=list)


def fp16_candidate(provider: str) -> Candidate:
    config = fp16.Fp16Config(provider=provider)
    return Candidate("fp16", "fp16", {"keep_io_types": True, "provider": provider},
                     lambda m, s: fp16.run(m, config, s.holdout[0]))


def _excluding(name: str, settings: dict[str, Any], exclude: tuple[str, ...], suffix: str) -> str:
    """Record a mixed-precision exclusion list in the settings and the name."""
    if exclude:
        settings["exclude_nodes"] = list(exclude)
        return f"{name}-{suffix}" if suffix else name
    return name


def dynamic_candidate(weight_type: str = "int8", per_channel: bool = True, exclude: tuple[str, ...] = (),
                      suffix: str = "", prepared: int8_dynamic.Preprocessed | None = None,
                      smooth_alpha: float | None = None, smoothed: smooth.Smoothed | None = None,
                      reduce_range: bool = False) -> Candidate:
    """Dynamic INT8; `exclude` names nodes of the source model to keep in float (a repair).

    `reduce_range`: 7-bit weights ("-rr"), for x86 CPUs without VNNI (`u8s8_saturates`).

    `prepared`: the search's cache of pre-processed sources, so its builds pre-process once, not once each.
    `smooth_alpha`: smooth LayerNorm outputs first (optimizer/passes/smooth.py, on the calibration samples),
    with the search's cache of smoothed sources `smoothed`.
    """
    config = int8_dynamic.Int8DynamicConfig(weight_type=weight_type, per_channel=per_channel,
                                            nodes_to_exclude=exclude, reduce_range=reduce_range)
    wt = "s8" if weight_type == "int8" else "u8"
    settings: dict[str, Any] = {"mode": "dynamic", "weight_type": weight_type, "per_channel": per_channel}
    name = f"int8-dynamic-{wt}{'-pc' if per_channel else ''}"
    if reduce_range:
        settings["reduce_range"] = True
        name += "-rr"
    if smooth_alpha is None:
        return Candidate(_excluding(name, settings, exclude, suffix), "int8", settings,
                         lambda m, s: int8_dynamic.run(m, config, s.holdout[0], prepared))
    smoothing = smooth_config(smooth_alpha)
    settings["smooth"] = {"alpha": smooth_alpha, "scope": smoothing.scope}
    cache = smoothed or smooth.Smoothed()

    def build(model: onnx.ModelProto, samples: SampleSet) -> PassResult:
        smoothed_source = cache.get(model, smoothing, samples.calibration, samples.holdout[0])
        result = int8_dynamic.run(smoothed_source.model, config, samples.holdout[0], prepared)
        result.changes["smooth"] = smoothed_source.changes
        result.notes[:0] = smoothed_source.notes
        return result

    return Candidate(_excluding(f"{name}-sq", settings, exclude, suffix), "int8", settings, build)


def conv_matmul_candidate(exclude: tuple[str, ...] = (), suffix: str = "",
                           prepared: int8_dynamic.Preprocessed | None = None, reduce_range: bool = False) -> Candidate:
    """Dynamic S8 per-channel INT8 of the model with its 1-D Convs rewritten as im2col + MatMul ("-c2m",
    optimizer/passes/conv_matmul.py): a range per run and a float output, on the fast MatMul kernels.

    Only MatMul/Gemm are quantized: the Convs left (2-D) would become ConvInteger, 0.25-0.7x FP32 here.
    Magika (bench/int8_levers.py, this AMX Xeon): every static recipe flips 6-7 of 268 top-1 decisions; this one
    2 of 800 with its Dense layers in float (1.3-1.6x FP32 under load 8-11).
    `reduce_range`: 7-bit weights ("-rr"), for x86 CPUs without VNNI (`u8s8_saturates`): on an AVX2 EPYC the 8-bit
    recipe's small 1-D CNN (tests/test_conv_matmul.py) kept 98.0% of 300 top-1 decisions, where VNNI kept 100%.
    """
    config = int8_dynamic.Int8DynamicConfig(weight_type="int8", per_channel=True, op_types=("MatMul", "Gemm"),
                                            nodes_to_exclude=exclude, reduce_range=reduce_range)
    settings: dict[str, Any] = {"mode": "dynamic", "weight_type": "int8", "per_channel": True,
                                "op_types": ["MatMul", "Gemm"], "conv_as_matmul": True}
    name = "int8-dynamic-s8-pc-c2m"
    if reduce_range:
        settings["reduce_range"] = True
        name += "-rr"

    def build(model: onnx.ModelProto, samples: SampleSet) -> PassResult:
        rewritten = conv_matmul.run(model, samples.holdout[0])
        if not rewritten.changes["convs_as_matmul"]:
            raise PassError(f"{conv_matmul.PASS_NAME}: {rewritten.notes[0]}")
        result = int8_dynamic.run(rewritten.model, config, samples.holdout[0], prepared)
        result.changes["convs_as_matmul"] = rewritten.changes["convs_as_matmul"]
        result.notes[:0] = rewritten.notes
        return result

    return Candidate(_excluding(name, settings, exclude, suffix), "int8", settings, build)


def smooth_config(alpha: float) -> smooth.SmoothConfig:
    """The smoothing of a "-sq" candidate: LayerNorm outputs, a Mul where a residual also reads them (post-LN
    BERT: every one; the 12 Muls cost nothing measurable on MiniLM: 27.05 vs 27.29 ms side by side, at load 15)."""
    return smooth.SmoothConfig(alpha=alpha, scope="norm", insert_mul=True)


def static_candidate(method: str = "minmax", quant_format: str = "qdq", activation_type: str = "int8",
                     op_types: tuple[str, ...] | None = None, exclude: tuple[str, ...] = (),
                     suffix: str = "", shared: int8_static.SharedCalibration | None = None,
                     equalizing: equalize.EqualizeConfig | None = None,
                     equalized: equalize.Equalized | None = None, reduce_range: bool = False) -> Candidate:
    """Static INT8 (per-channel S8 weights); `exclude` names nodes to keep in float (a repair).

    `reduce_range`: 7-bit weights ("-rr"), for x86 CPUs without VNNI (`u8s8_saturates`).

    `shared`: the search's calibration cache, so its builds calibrate once per method, not once each.
    `equalizing`: equalize Conv channel ranges first (optimizer/passes/equalize.py, on the calibration
    samples), with the search's cache of equalized sources `equalized`.
    """
    config = int8_static.Int8StaticConfig(method=method, quant_format=quant_format, activation_type=activation_type,
                                          op_types=op_types, nodes_to_exclude=exclude, reduce_range=reduce_range)
    settings: dict[str, Any] = {"mode": "static", "method": method, "format": quant_format,
                                "activation_type": activation_type, "weight_type": "int8", "per_channel": True,
                                "op_types": list(op_types) if op_types else "all"}
    if reduce_range:
        settings["reduce_range"] = True
    name = static_name(method, quant_format, activation_type, op_types, equalized=equalizing is not None,
                       reduce_range=reduce_range)
    if equalizing is None:
        return Candidate(_excluding(name, settings, exclude, suffix), "int8", settings,
                         lambda m, s: int8_static.run(m, config, s.calibration, s.holdout[0], shared))
    settings["equalize"] = asdict(equalizing)
    cache = equalized or equalize.Equalized()

    def build(model: onnx.ModelProto, samples: SampleSet) -> PassResult:
        source = cache.get(model, equalizing, samples.calibration, samples.holdout[0])
        result = int8_static.run(source.model, config, samples.calibration, samples.holdout[0], shared)
        result.changes["equalize"] = source.changes
        result.notes[:0] = source.notes
        return result

    return Candidate(_excluding(name, settings, exclude, suffix), "int8", settings, build)


def static_name(method: str, quant_format: str, activation_type: str, op_types: tuple[str, ...] | None,
                equalized: bool = False, reduce_range: bool = False) -> str:
    act = "s8" if activation_type == "int8" else "u8"
    return (f"int8-static-{method}-{quant_format}-{act}s8-{'heavy' if op_types else 'all'}{'-eq' if equalized else ''}"
            f"{'-rr' if reduce_range else ''}")


def static_twin(settings: dict[str, Any], *, method: str | None = None, quant_format: str | None = None,
                exclude: tuple[str, ...] = (), suffix: str = "",
                shared: int8_static.SharedCalibration | None = None,
                equalized: equalize.Equalized | None = None) -> Candidate:
    """The static candidate with the same settings as a report row, one of them changed (equalization and
    reduce_range kept)."""
    op_types = None if settings["op_types"] == "all" else tuple(settings["op_types"])
    equalizing = equalize.EqualizeConfig(**settings["equalize"]) if settings.get("equalize") else None
    return static_candidate(method or settings["method"], quant_format or settings["format"],
                            settings["activation_type"], op_types, exclude=exclude, suffix=suffix, shared=shared,
                            equalizing=equalizing, equalized=equalized,
                            reduce_range=bool(settings.get("reduce_range")))


def plan(precision: str, *, provider: str, int8_mode: str | None, method: str, has_calibration: bool,
         fp16_on_cpu: bool | None = None) -> Plan:
    """The candidates for a request. `int8_mode` is already resolved when precision is int8."""
    result = Plan()
    if precision == "fp32":
        return result
    if precision == "fp16":
        result.candidates.append(fp16_candidate(provider))
    elif precision == "int8":
        if int8_mode == "dynamic":
            result.candidates.append(dynamic_candidate())
        else:
            result.candidates.append(static_candidate(method))
    else:  # auto
        result = auto_plan(provider=provider, method=method, has_calibration=has_calibration,
                           fp16_on_cpu=fp16_on_cpu)
    return result


#: Why S8S8 static recipes are not built on x86 without VNNI (`u8s8_saturates`).
S8S8_WITHOUT_VNNI = ("skipped: this x86 CPU has no VNNI, and there S8S8 measured slower than FP32 and than its U8S8 "
                     "twin on every real model tried (AMD EPYC AVX2, ONNX Runtime 1.32, PP-OCR det/cls, MiniLM, "
                     "text orientation: QOperator S8S8 0.23-0.52x FP32, QDQ S8S8 0.35-0.91x, their U8S8 twins "
                     "0.73-1.83x; bench/auto_avx2_kernels.py), though it kept accuracy best (no int16 pairs); name "
                     "it in the candidate list to build it anyway")
#: x86 flags (Linux's names) of an 8-bit dot product that sums u8*s8 products straight into int32.
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
#: x86 flags of the SIMD levels whose U8S8 kernels (MLAS) use vpmaddubsw: one of them marks an x86 CPU.
U8S8_SIMD_FLAGS = frozenset({"sse4_1", "avx2", "avx512bw"})


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags (x86 "flags", ARM "Features") from `cpuinfo` text, by default /proc/cpuinfo's;
    empty when it cannot be read (then no CPU-specific candidate is planned or skipped)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_has_fp16_arithmetic(flags: frozenset[str] | None = None) -> bool:
    """True when the CPU computes in FP16 natively (x86 AVX512-FP16, ARM FP16 SIMD)."""
    flags = cpu_flags() if flags is None else flags
    return "avx512_fp16" in flags or "asimdhp" in flags


def u8s8_saturates(flags: frozenset[str] | None = None) -> bool:
    """True on an x86 CPU without VNNI: ONNX Runtime's U8S8 kernels there multiply with vpmaddubsw, which sums
    each pair of u8*s8 products into int16 and saturates (255 * 127 * 2 > 32767), so full-range 8-bit weights
    can lose accuracy that a VNNI CPU keeps; 7-bit weights (reduce_range) cannot overflow a pair. Measured on an
    AVX2 EPYC (bench/auto_avx2_kernels.py --no-timing): PP-OCR cls static U8S8 cosine 0.86-0.89 -> 0.983-0.986
    with 7-bit weights, PP-OCR det 0.916-0.931 -> 0.920-0.941; but MiniLM dynamic S8 0.982 -> 0.865 (one bit
    less of weight precision costs more there than saturation did), so each twin is judged, never assumed."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & U8S8_SIMD_FLAGS) and not flags & VNNI_FLAGS


def auto_plan(*, provider: str, method: str, has_calibration: bool, fp16_on_cpu: bool | None = None,
              matmul_heavy: bool = False, shared: int8_static.SharedCalibration | None = None,
              prepared: int8_dynamic.Preprocessed | None = None, smoothed: smooth.Smoothed | None = None,
              equalized: equalize.Equalized | None = None, source: onnx.ModelProto | None = None,
              cpu: frozenset[str] | None = None) -> Plan:
    """The probe grid for auto: every recipe that is cheap to build, each built, judged and timed once.

    Static candidates are calibrated with MinMax here whatever `method` says: latency does not
    depend on the calibration method, so the auto search only calibrates again with Percentile and
    Entropy the format/type/scope combinations that measured faster than FP32 and failed accuracy.
    The order is what most likely pays first, so a budget that runs out cuts the least promising:
    dynamic first for MatMul-heavy models (transformers, RNNs), static U8S8 first otherwise (measured
    fastest here), QOperator S8S8 last (ONNX Runtime itself warns it is slow on x64). A search's
    cache of equalized sources (`equalized`) adds QDQ U8S8 heavy with Conv channel ranges equalized
    ("-eq", after its plain twin) for CNNs; without one it is not planned (each build would equalize again).
    With the `source` model, a candidate that cannot apply to it (`cannot_apply`) is listed as skipped, not
    built: its build would only fail at once, and the table would show a failure that is none. A `source` with
    1-D Convs that one MatMul can express (`conv_matmul.qualifying`) adds "-c2m": dynamic INT8 of them as
    MatMuls (Magika: strict pass at 1.44x where every static recipe flipped top-1 decisions).
    `cpu`: the serving CPU's flags (`cpu_flags`; None: this machine's). On x86 without VNNI (`u8s8_saturates`)
    each recipe with U8 activations and S8 weights gets a twin with 7-bit weights right after it ("-rr": same
    kernels, so the same speed; it trades a bit of weight precision for no int16 saturation), and the S8S8
    recipes are held back (`Plan.held_back`: skipped, built only when a request names them): on such a CPU
    they measured slower than FP32 and than their U8S8 twins on every real model tried
    (bench/auto_avx2_kernels.py).
    """
    del method  # the probe always uses MinMax (see above); other methods are a later, pruned step
    cpu = cpu_flags() if cpu is None else cpu
    saturates = u8s8_saturates(cpu)
    result = Plan()
    if provider == "cuda":
        result.candidates.append(fp16_candidate(provider))
        result.skipped.append({"name": "int8", "reason": "ONNX Runtime's CUDA provider runs INT8 QDQ/QLinear "
                               "ops without acceleration (they fall back to CPU kernels); FP16 is the GPU win"})
        return result
    dynamic = [dynamic_candidate("int8", per_channel=True, prepared=prepared),
               dynamic_candidate("uint8", per_channel=True, prepared=prepared)]
    if saturates:  # dynamic S8 weights run U8S8 (activations quantized to u8); U8 weights run U8U8, no pairs
        dynamic.insert(1, dynamic_candidate("int8", per_channel=True, prepared=prepared, reduce_range=True))
    if source is not None and conv_matmul.qualifying(source):
        # 1-D Convs as MatMuls: dynamic INT8's accuracy at MatMul speed (Magika: static flips 6-7 of 268 decisions);
        # first of the dynamic ones, which run such Convs as ConvInteger (Magika 0.28-0.47x)
        dynamic.insert(0, conv_matmul_candidate(prepared=prepared))
        if saturates:
            dynamic.insert(1, conv_matmul_candidate(prepared=prepared, reduce_range=True))
    if matmul_heavy and has_calibration:
        # LayerNorm outputs' outlier channels made MiniLM's repair keep 8 nodes in float (1.51x); smoothed, 2 (1.90x)
        dynamic.append(dynamic_candidate("int8", per_channel=True, prepared=prepared, smooth_alpha=SMOOTH_ALPHA,
                                         smoothed=smoothed))
    static: list[Candidate] = []
    if has_calibration:
        for quant_format, activation_type in (("qoperator", "uint8"), ("qdq", "uint8"), ("qdq", "int8"),
                                              ("qoperator", "int8")):
            for op_types in (None, HEAVY_OPS):
                static.append(static_candidate("minmax", quant_format, activation_type, op_types, shared=shared))
                if saturates and activation_type == "uint8":  # same kernels, same speed: built right after
                    static.append(static_candidate("minmax", quant_format, activation_type, op_types,
                                                   shared=shared, reduce_range=True))
        if not matmul_heavy and equalized is not None:
            # Conv channel ranges equalized first: only QDQ U8S8 on Conv/MatMul/Gemm gained on real CNNs
            # (bench/equalize.py; QOperator and all-op scopes quantize the float ops the scales must pass through)
            plain = next(i for i, c in enumerate(static) if c.name == static_name("minmax", "qdq", "uint8", HEAVY_OPS))
            static.insert(plain + 1, static_candidate("minmax", "qdq", "uint8", HEAVY_OPS, shared=shared,
                                                      equalizing=EQUALIZE, equalized=equalized))
        if saturates:
            s8s8 = [c for c in static if c.settings["activation_type"] == "int8"]
            static = [c for c in static if c not in s8s8]
            result.skipped += [{"name": c.name, "reason": S8S8_WITHOUT_VNNI} for c in s8s8]
            result.held_back += s8s8
    if matmul_heavy:
        result.candidates += dynamic + static
    elif saturates:
        result.candidates += static + dynamic
    else:
        result.candidates += static[:-2] + dynamic + static[-2:]  # dynamic before QOperator S8S8
    if source is not None:
        for candidate in list(result.candidates):
            reason = cannot_apply(candidate, source)
            if reason:
                result.candidates.remove(candidate)
                result.skipped.append({"name": candidate.name, "reason": reason})
    if saturates:
        result.notes.append("this CPU has no VNNI (no avx512_vnni/avx_vnni/amx_int8): ONNX Runtime's U8S8 kernels sum "
                            "u8*s8 products in pairs into int16 (vpmaddubsw), which saturates with 8-bit weights; "
                            "each U8S8 recipe also gets a twin with 7-bit weights (reduce_range, \"-rr\")")
    elif cpu & U8S8_SIMD_FLAGS:
        result.skipped.append({"name": "int8 reduce_range (-rr)", "reason": "this CPU has VNNI: U8S8 products are "
                               "summed in int32 without saturation, so 7-bit weights would only lose precision"})
    if not has_calibration:
        result.skipped.append({"name": "int8-static", "reason": "no calibration set was given: static INT8 needs "
                               "real inputs to calibrate activation ranges on"})
    if fp16_on_cpu if fp16_on_cpu is not None else cpu_has_fp16_arithmetic(cpu):
        result.candidates.append(fp16_candidate(provider))
    else:
        result.skipped.append({"name": "fp16", "reason": "this CPU has no FP16 arithmetic (no avx512_fp16/asimdhp): "
                               "ONNX Runtime's CPU kernels would run FP16 through Casts (measured 0.94-1.06x of "
                               "FP32 on such CPUs); set fp16_on_cpu to try it anyway"})
    return result


def cannot_apply(candidate: Candidate, source: onnx.ModelProto) -> str | None:
    """Why `candidate` would change nothing in `source` (read from the graph alone), or None when it may apply.

    Smoothing with `smooth_config`'s scope needs a LayerNorm output read by a constant-weight MatMul: Magika and
    GE2E have none, and their "-sq" builds failed at once, shown as failures. A recipe whose op-type scope
    meets no node of the graph quantizes nothing (the quantizer's "quantized no op").
    """
    settings = candidate.settings
    ops = _op_types(source.graph)
    if settings.get("smooth"):
        producers = {out: n.op_type for n in source.graph.node for out in n.output}
        # smooth.NORMS: the producers smoothing's "norm" scope folds into (smooth.run filters by the same)
        if not any(producers.get(tensor) in smooth.NORMS for tensor in smooth.candidates(source)):
            return ("skipped: nothing to smooth (no LayerNormalization output feeds a MatMul/Gemm/Attention with "
                    "a constant weight)")
    if settings.get("mode") == "dynamic" and not ops & DYNAMIC_ANCHORS:
        return f"skipped: nothing to quantize (dynamic INT8 rewrites {'/'.join(sorted(DYNAMIC_ANCHORS))}; none here)"
    if settings.get("mode") == "static" and settings.get("op_types") != "all" and not ops & set(settings["op_types"]):
        return f"skipped: nothing to quantize (no {'/'.join(settings['op_types'])} node)"
    return None


def _op_types(graph: onnx.GraphProto) -> set[str]:
    """Every op type in `graph` and its subgraphs: Silero VAD's Convs and LSTM live inside If branches, which
    ONNX Runtime's quantizer also quantizes."""
    ops = set()
    for node in graph.node:
        ops.add(node.op_type)
        for attribute in node.attribute:
            for subgraph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                ops |= _op_types(subgraph)
    return ops
