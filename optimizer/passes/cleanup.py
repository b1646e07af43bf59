"""Cleanup/fuse pass: drop no-op nodes, fold constants and fuse ops with ONNX Runtime's own optimizers.

Steps, in order:
1. Remove the redundant nodes ONNX Runtime's basic level leaves alone (see `_remove_noop_reshapes`).
2. ONNX Runtime's offline graph optimization at the *basic* level: constant folding, Identity / Dropout /
   same-type Cast / cancelling Transpose elimination, Conv+BatchNormalization folding, MatMul+Add -> Gemm.
   Basic only emits standard ONNX ops, so the artifact runs on any provider: it is the default.
3. For transformer graphs, `onnxruntime.transformers.optimizer.optimize_model` (Attention,
   SkipLayerNormalization, BiasGelu ...) with the heads and hidden size detected or given. It writes
   LayerNormalization in the standard domain, which exists from opset 17: an older model is converted to
   opset 17 first (checked to give the same outputs), or LayerNorm is left unfused when that fails.
   An `If` whose condition is constant (or folds to one) is inlined by ONNX Runtime's constant folding in
   step 2, so compute kept in the taken branch becomes visible to the quantizer.
4. The *extended* level only when asked, for the provider that will serve: its fused contrib ops
   (FusedConv, FusedGemm, ...) are chosen for that provider and the CPU features of this machine.
The result must load, run, keep the model's inputs and outputs, and match the input model's outputs.
Models over 2 GB are out of scope (protobuf cannot serialise them in one piece).
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import helper, version_converter

from optimizer.errors import PassError, first_line
from optimizer.graph_inspect import ATTENTION, GraphReport, guess_attention_shape, inspect, is_transformer
from optimizer.passes.base import PassResult, verify_runs
from optimizer.runtime import SessionSettings, create_session, cuda_is_usable

log = logging.getLogger(__name__)

PASS_NAME = "cleanup"
MAX_MODEL_BYTES = 2**31 - 1

# optimize_model disables ConstantSharing before its Python fusions (shared scalars change the
# patterns they match); do the same when ONNX Runtime runs in front of them.
_DISABLED_BEFORE_FUSION = ["ConstantSharing"]


@dataclass
class CleanupConfig:
    """What to fuse and for whom. The defaults give the portable artifact."""

    level: Literal["basic", "extended"] = "basic"
    provider: str = "cpu"  # the provider that serves; matters only for level="extended"
    transformer: Literal["auto", "off", "on"] = "auto"  # auto: when attention or LayerNorm is present
    model_type: str = "bert"  # onnxruntime.transformers model type
    num_heads: int | None = None  # None: detected from the graph (0 lets ONNX Runtime try)
    hidden_size: int | None = None
    atol: float = 1e-4  # outputs must stay within atol + rtol * |original| of the input model's
    rtol: float = 1e-4


# --- step 1: what ONNX Runtime's basic level does not remove --------------------------------------

def _remove_noop_reshapes(model: onnx.ModelProto, report: GraphReport) -> Counter[str]:
    """Bypass Reshapes to the shape their input already has; return the ops removed.

    Measured on ONNX Runtime 1.32: its basic level removes Identity, inference Dropout, same-type
    Cast and cancelling Transpose pairs, but keeps Reshape(x[batch,16], [-1,16]) because it cannot
    prove the -1 without shapes. inspect() proves it from the target shape, so we remove those here
    and leave the rest to ONNX Runtime. A Reshape whose output is a graph output stays (its name is
    the model's interface).
    """
    targets = {name for f in report.redundant if f.kind == "reshape_same_shape" for name in f.nodes}
    graph_outputs = {o.name for o in model.graph.output}
    removed: Counter[str] = Counter()
    renames: dict[str, str] = {}
    keep = []
    for index, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}#{index}"
        if name in targets and node.output[0] not in graph_outputs:
            renames[node.output[0]] = renames.get(node.input[0], node.input[0])
            removed[node.op_type] += 1
        else:
            keep.append(node)
    if not removed:
        return removed
    for node in keep:
        for i, tensor in enumerate(node.input):
            if tensor in renames:
                node.input[i] = renames[tensor]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return removed


# --- steps 2 and 4: ONNX Runtime's offline optimizer ----------------------------------------------

def _ort_offline(model: onnx.ModelProto, level: str, provider: str,
                 disabled_optimizers: list[str] | None = None) -> onnx.ModelProto:
    """Let ONNX Runtime optimize the graph at `level` and give back the graph it would run.

    (onnxruntime.transformers.optimizer.optimize_by_onnxruntime does the same but imports torch.)
    """
    settings = SessionSettings(provider=provider, optimization_level=level)
    with tempfile.TemporaryDirectory(prefix="onnxforge-cleanup-") as tmp:
        path = Path(tmp) / "optimized.onnx"
        try:
            create_session(model.SerializeToString(), settings, save_optimized_to=path,
                           disabled_optimizers=disabled_optimizers)
            return onnx.load(str(path))
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise PassError(f"{PASS_NAME}: ONNX Runtime's {level} graph optimization failed: "
                            f"{first_line(exc)}") from None


def _prune_opset_imports(model: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """Drop the opset imports ONNX Runtime adds for every domain it knows (ai.onnx.ml 5, training, ...):
    keep the model's own and the ones its nodes use, so the IR version check stays honest."""
    used = {node.domain or "" for node in model.graph.node}
    wanted = {o.domain or "" for o in original.opset_import} | used
    kept = [o for o in model.opset_import if (o.domain or "") in wanted]
    del model.opset_import[:]
    model.opset_import.extend(kept)


# --- step 3: transformer fusion ---------------------------------------------------------------

#: The opset that introduced LayerNormalization, which the transformer optimizer writes in the standard domain.
LAYER_NORM_OPSET = 17


def default_opset(model: onnx.ModelProto) -> int:
    """The model's version of the standard (ai.onnx) domain."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _opset_for_fusion(model: onnx.ModelProto, feed: dict[str, np.ndarray],
                      config: CleanupConfig) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Give the transformer optimizer a model whose opset has LayerNormalization, or say it must not fuse it.

    Found on PP-OCRv4 recognition (opset 12): the fused LayerNormalization made the whole artifact invalid
    ("No Op registered for LayerNormalization with domain_version of 12"). ONNX's version converter is the
    correct way up (Squeeze/Split/Reduce* attributes become inputs on the way); its result must load and
    give the same outputs, else LayerNorm stays unfused and the opset stays.
    """
    version = default_opset(model)
    if version >= LAYER_NORM_OPSET:
        return model, {"layer_norm": True}
    try:
        converted = version_converter.convert_version(model, LAYER_NORM_OPSET)
        converted.ir_version = max(converted.ir_version, model.ir_version, 8)  # opset 17 needs IR 8
        onnx.checker.check_model(converted)
        compare_outputs(model, converted, feed, config.atol, config.rtol)
    except Exception as exc:  # noqa: BLE001 - the converter and the checks raise many types
        return model, {"layer_norm": False, "opset": version,
                       "reason": f"opset {version} has no LayerNormalization and converting to opset "
                                 f"{LAYER_NORM_OPSET} failed ({first_line(exc)}): LayerNorm left unfused"}
    return converted, {"layer_norm": True, "opset_raised": {"from": version, "to": LAYER_NORM_OPSET}}

def _transformer_fusion(model: onnx.ModelProto, config: CleanupConfig,
                        layer_norm: bool = True) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Run ONNX Runtime's transformer optimizer (its Python fusions only: ONNX Runtime already ran).

    `layer_norm=False` keeps LayerNorm (and SkipLayerNorm, which builds on it) unfused, for opsets
    without LayerNormalization.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    guessed_heads, guessed_hidden = guess_attention_shape(model)
    heads = config.num_heads or guessed_heads or 0
    hidden = config.hidden_size or guessed_hidden or 0
    options = FusionOptions(config.model_type)
    # The "bert" default turns the 2-D mask into a sequence length, which is only right for
    # right-padded batches; the raw mask is right for every mask a client may send.
    options.use_raw_attention_mask(True)
    if not layer_norm:
        options.enable_layer_norm = False
        options.enable_skip_layer_norm = False
        options.enable_bias_skip_layer_norm = False
    # It warns "Model producer not matched" for any model not exported by PyTorch: noise for our users.
    logging.getLogger("onnxruntime.transformers.optimizer").setLevel(logging.ERROR)
    try:
        # opt_level=0: no ONNX Runtime pass inside (ours already ran, and its own needs torch).
        fused = optimize_model(model, model_type=config.model_type, num_heads=heads, hidden_size=hidden,
                               optimization_options=options, opt_level=0, only_onnxruntime=False)
    except Exception as exc:  # noqa: BLE001 - the tool raises anything from AssertionError to KeyError
        raise PassError(f"{PASS_NAME}: ONNX Runtime's transformer optimizer failed ({type(exc).__name__}: "
                        f"{first_line(exc)}); run again with transformer='off' to skip it") from None
    stats = {op: n for op, n in fused.get_fused_operator_statistics().items() if n}
    detail = {
        "model_type": config.model_type,
        "num_heads": heads or None,
        "hidden_size": hidden or None,
        "heads_source": "given" if config.num_heads else ("graph" if guessed_heads else "onnxruntime"),
        "operators": stats,
    }
    return fused.model, detail


def _transformer_notes(operators: dict[str, int]) -> list[str]:
    """What the transformer optimizer added, named: the note said "(Attention, SkipLayerNormalization, ...)" whatever
    it fused, so a torch export whose attention stayed unfused read as if it had been fused."""
    if not operators:
        return ["ONNX Runtime's transformer optimizer matched nothing in this graph"]
    ops = ", ".join(f"{op} x{n}" for op, n in sorted(operators.items()))
    return [f"transformer fusion added {ops}: com.microsoft contrib ops that ONNX Runtime's CPU and CUDA providers "
            "implement; other runtimes may not"]


def _attention_left_note(left: int) -> str:
    """WHY: inspect lists MatMul -> Softmax -> MatMul as fusable into Attention, but ONNX Runtime's optimizer only
    matches the attention subgraphs it knows (Hugging Face BERT-style exports); torch 2.13's exports of
    nn.TransformerEncoderLayer and F.scaled_dot_product_attention (dynamo=True and dynamo=False alike) kept all 4."""
    return (f"{left} attention pattern(s) (MatMul -> Softmax -> MatMul) were left unfused: ONNX Runtime's transformer "
            "optimizer did not recognise this export's attention (it matches BERT-style exports, not torch's "
            "nn.MultiheadAttention or F.scaled_dot_product_attention); they run as separate MatMul and Softmax ops")


# --- checks -----------------------------------------------------------------------------------


def synthetic_feed(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """One input per graph input for the equivalence check: floats ~ N(0,1), integers and bools all 1
    (a valid token id and an all-ones mask). Unknown dims: 1 on axis 0 (batch), 8 elsewhere."""
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    feed = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dims = [d.dim_value if d.dim_value > 0 else (1 if axis == 0 else 8)
                for axis, d in enumerate(tensor_type.shape.dim)]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        if dtype.kind == "f":
            feed[value.name] = rng.normal(0, 1, size=dims).astype(dtype)
        else:
            feed[value.name] = np.ones(dims, dtype)
    return feed


def _signature(model: onnx.ModelProto) -> list[tuple[str, int]]:
    initializers = {t.name for t in model.graph.initializer}
    values = [v for v in model.graph.input if v.name not in initializers] + list(model.graph.output)
    return [(v.name, v.type.tensor_type.elem_type) for v in values]


def compare_outputs(original: onnx.ModelProto, optimized: onnx.ModelProto, feed: dict[str, np.ndarray],
                    atol: float, rtol: float) -> dict[str, float]:
    """Max absolute difference per output between the two models on `feed`; PassError beyond tolerance.

    The reference runs with ONNX Runtime's optimizations disabled, so it is the model as written.
    """
    try:
        reference = create_session(original.SerializeToString(), SessionSettings(optimization_level="disabled"))
        expected = reference.run(None, feed)
    except Exception as exc:  # noqa: BLE001
        raise PassError(f"{PASS_NAME}: the input model does not run on the check inputs ({first_line(exc)}); "
                        "pass a feed that fits the model") from None
    session = create_session(optimized.SerializeToString(), SessionSettings(optimization_level="disabled"))
    got = session.run(None, feed)
    diffs: dict[str, float] = {}
    for meta, want, have in zip(reference.get_outputs(), expected, got, strict=True):
        want, have = np.asarray(want), np.asarray(have)
        if want.shape != have.shape:
            raise PassError(f"{PASS_NAME} changed the shape of output {meta.name!r} from {list(want.shape)} "
                            f"to {list(have.shape)}")
        if want.dtype.kind not in "fc":
            equal = np.array_equal(want, have)
            diffs[meta.name] = 0.0 if equal else float("inf")
        else:
            want64, have64 = want.astype(np.float64), have.astype(np.float64)
            both_nan = np.isnan(want64) & np.isnan(have64)
            delta = np.where(both_nan, 0.0, np.abs(want64 - have64))
            diffs[meta.name] = float(np.nan_to_num(delta.max(initial=0.0), nan=np.inf))
            equal = bool(np.all(delta <= atol + rtol * np.abs(np.nan_to_num(want64))))
        if not equal:
            raise PassError(f"{PASS_NAME} changed output {meta.name!r}: max abs difference {diffs[meta.name]:.3g} "
                            f"exceeds atol={atol} + rtol={rtol} * |original|; run again with "
                            "transformer='off' or level='basic' to find the fusion at fault")
    return diffs


def _histogram(model: onnx.ModelProto) -> Counter[str]:
    return Counter(node.op_type for node in model.graph.node)


# --- the pass ---------------------------------------------------------------------------------

def run(model: onnx.ModelProto, config: CleanupConfig | None = None,
        feed: dict[str, np.ndarray] | None = None) -> PassResult:
    """Clean up and fuse `model` (left unchanged); `feed` is the input for the checks (default synthetic).

    Raises PassError when a tool fails or the result does not run or does not match the input model.
    """
    config = config or CleanupConfig()
    if config.level not in ("basic", "extended"):
        raise PassError(f"{PASS_NAME}: unknown level {config.level!r}: use 'basic' or 'extended'")
    if config.transformer not in ("auto", "off", "on"):
        raise PassError(f"{PASS_NAME}: unknown transformer setting {config.transformer!r}: use auto, off or on")
    if model.ByteSize() > MAX_MODEL_BYTES:
        raise PassError(f"{PASS_NAME}: the model is over 2 GB, which this pass does not handle (protobuf cannot "
                        "serialise it); optimize it with external data by hand")
    provider = config.provider
    if config.level == "extended" and provider == "cuda" and not cuda_is_usable():
        raise PassError(f"{PASS_NAME}: the extended level for CUDA must run where CUDA works, and it does not "
                        "here; use level='basic' (portable) or run on a GPU machine")
    feed = feed if feed is not None else synthetic_feed(model)
    notes: list[str] = []

    before = inspect(model)
    work = onnx.ModelProto()
    work.CopyFrom(model)
    removed_by_us = _remove_noop_reshapes(work, before)

    if config.transformer == "on":
        use_transformer, reason = True, "requested"
    elif config.transformer == "off":
        use_transformer, reason = False, "turned off"
    elif is_transformer(before):
        use_transformer, reason = True, "attention or LayerNorm found in the graph"
    else:
        use_transformer, reason = False, "no attention or LayerNorm in the graph"

    disabled = _DISABLED_BEFORE_FUSION if use_transformer else None
    transformer_detail: dict[str, Any] = {"used": use_transformer, "reason": reason}
    opset_detail: dict[str, Any] = {}
    if use_transformer:
        work, opset_detail = _opset_for_fusion(work, feed, config)
        if "opset_raised" in opset_detail:
            raised = opset_detail["opset_raised"]
            notes.append(f"opset raised from {raised['from']} to {raised['to']} (ONNX's version converter, same "
                         "outputs) so that the fused LayerNormalization is a valid op")
        elif "reason" in opset_detail:
            notes.append(opset_detail["reason"])
    result = _ort_offline(work, "basic", "cpu", disabled)  # basic emits standard ops: any provider runs it
    if use_transformer:
        result, detail = _transformer_fusion(result, config, layer_norm=opset_detail.get("layer_norm", True))
        transformer_detail.update(detail)
        transformer_detail.update({k: v for k, v in opset_detail.items() if k != "layer_norm"})
        notes.extend(_transformer_notes(transformer_detail.get("operators", {})))
    if config.level == "extended":
        result = _ort_offline(result, "extended", provider)
        notes.append(f"extended level: fused ops chosen for the {provider} provider on this machine; keep the "
                     "basic artifact as the portable source of truth")
    _prune_opset_imports(result, model)

    verify_runs(result, feed, PASS_NAME)
    if _signature(result) != _signature(model):
        raise PassError(f"{PASS_NAME} changed the model's inputs or outputs ({_signature(model)} -> "
                        f"{_signature(result)}): clients would break")
    diffs = compare_outputs(model, result, feed, config.atol, config.rtol)

    after = inspect(result)
    if use_transformer:
        left = after.fusable_count(ATTENTION)
        transformer_detail["attention_left"] = left
        if left:
            notes.append(_attention_left_note(left))
    hist_before, hist_after = _histogram(model), _histogram(result)
    removed = dict(sorted((hist_before - hist_after).items()))
    added = dict(sorted((hist_after - hist_before).items()))
    fusions = dict(added)
    for op, count in transformer_detail.get("operators", {}).items():
        fusions[op] = max(fusions.get(op, 0), count)
    left = {n for f in after.redundant for n in f.nodes}
    redundant_removed = Counter(f.op for f in before.redundant for _ in f.nodes if not set(f.nodes) & left)
    changes = {
        "level": config.level,
        "provider": provider if config.level == "extended" else "any",
        "nodes_before": before.node_count,
        "nodes_after": after.node_count,
        "removed": removed,
        "fusions": dict(sorted(fusions.items())),
        "redundant_removed": dict(sorted(redundant_removed.items())),
        "removed_before_onnxruntime": dict(removed_by_us),
        "redundant_left": [f.__dict__ for f in after.redundant],
        "transformer_fusion": transformer_detail,
        "max_abs_diff": diffs,
    }
    return PassResult(model=result, changes=changes, notes=notes)
