"""Fewer intra-op threads as a variant: a small model at batch 1 can run faster on one thread than on every core.

WHY: ONNX Runtime's pool hands each kernel's work to its threads and joins them again; on a model whose kernels take
microseconds that hand-off costs more than the threads share. Measured on an AMD EPYC (2 cores, ORT 1.32, batch 1,
interleaved, spinning off): PP-OCR cls 2.0 ms on one thread vs 3.1 ms on two, Silero VAD 0.26-0.42 vs 0.33-0.48 ms;
PP-OCR det, MiniLM and the detectors are 1.3-1.9x slower on one. Which side a model is on is measured, not guessed.
The count travels in the variant's own file (`runtime.THREADS_KEY` metadata), so the session that serves it, and
every timing and accuracy check of it, runs it as measured (`runtime.create_session`); a user who downloads it can
read it there. ONNX Runtime's own "load config from model" needs a process-wide environment variable and
overrides every session option, so it is not used.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import onnx

from optimizer.accuracy import Tolerance
from optimizer.calibration import SampleSet
from optimizer.errors import first_line
from optimizer.latency import BenchmarkError, measure_batches, paired_ratio
from optimizer.runtime import THREADS_KEY, SessionSettings, default_threads
from optimizer.variants import Built, VariantReport, describe, evaluate

#: One intra-op thread: the count that wins on small models (two cores here; on more cores a count in between may
#: win too, not tried: each count is one more session in every timing).
FEWER = 1
#: Speed-up one thread must show over the default in the probe before twins are built and timed (each twin is one
#: more session in the final timing, which then gets fewer rounds per variant).
MIN_PROBE_GAIN = 1.03
#: Passing variants given a one-thread twin besides the original: the fastest by their probe p50.
MAX_TWINS = 3
SUFFIX = f"-{FEWER}thread"


def with_threads(model: onnx.ModelProto, threads: int) -> onnx.ModelProto:
    """A copy of `model` that asks for `threads` intra-op threads (THREADS_KEY metadata)."""
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    kept = [p for p in twin.metadata_props if p.key != THREADS_KEY]
    del twin.metadata_props[:]
    twin.metadata_props.extend(kept)
    twin.metadata_props.add(key=THREADS_KEY, value=str(threads))
    return twin


def add_fewer_thread_twins(built: dict[str, Built], *, baseline: str, samples: SampleSet, settings: SessionSettings,
                           reference: list[dict], tolerance: Tolerance, batch: int, probe_seconds: float,
                           deadline: float, note: Callable[[str], None]) -> None:
    """Probe the original on FEWER threads against itself on the default count; when it is faster, add a FEWER-thread
    twin of the original and of the fastest passing variants to `built` (judged like any variant: the final timing
    decides whether one serves). `note` records what was decided and why."""
    threads = settings.intra_op_threads or default_threads()
    if threads <= FEWER:
        note(f"fewer intra-op threads not tried: sessions already run on {threads}")
        return
    if time.monotonic() >= deadline:
        note("fewer intra-op threads not tried: the time budget ran out")
        return
    original = built[baseline].model
    assert original is not None
    probe = {baseline: original.SerializeToString(), "fewer": with_threads(original, FEWER).SerializeToString()}
    try:
        stats = measure_batches(probe, samples.holdout[0], settings, batch_sizes=(batch,), min_runs=10,
                                target_seconds=probe_seconds, deadline=deadline)
    except BenchmarkError as exc:
        note(f"fewer intra-op threads not tried: the probe timing failed ({first_line(exc)})")
        return
    at_batch = stats[min(stats)]
    gain = paired_ratio(at_batch[baseline], at_batch["fewer"]).median
    measured = (f"the original on {FEWER} intra-op thread measured {gain:.2f}x its speed on {threads} "
                f"(p50 {at_batch['fewer'].p50_ms:.3f} vs {at_batch[baseline].p50_ms:.3f} ms, batch {min(stats)})")
    if gain < MIN_PROBE_GAIN:
        note(f"{measured}: fewer threads not worth timing")
        return
    passing = [(name, b) for name, b in built.items()
               if name != baseline and b.model is not None and b.row.status == "ok" and THREADS_KEY not in
               {p.key for p in b.model.metadata_props}]
    passing.sort(key=lambda item: (item[1].row.probe_latency_ms or {}).get("p50", float("inf")))
    parents = [(baseline, built[baseline]), *passing[:MAX_TWINS]]
    note(f"{measured}: {FEWER}-thread twins of {', '.join(name for name, _ in parents)} judged and timed")
    for name, parent in parents:
        if time.monotonic() >= deadline:
            note(f"no time left for {FEWER}-thread twins after {name}")
            break
        assert parent.model is not None
        twin = with_threads(parent.model, FEWER)
        row = VariantReport(name=f"{name}{SUFFIX}", precision=parent.row.precision,
                            settings={**parent.row.settings, "intra_op_threads": FEWER, "same_model_as": name},
                            changes=dict(parent.row.changes))
        row.notes.append(f"the model of {name}, run on {FEWER} intra-op thread instead of {threads}: the file says so "
                         f"in its metadata ({THREADS_KEY}), and the service's session for it is made so; plain ONNX "
                         f"Runtime ignores that metadata: set SessionOptions.intra_op_num_threads = {FEWER} to get "
                         "this speed from the downloaded file")
        describe(twin, row)
        evaluate(twin, reference, samples, settings, tolerance, row)
        built[row.name] = Built(row, twin)
