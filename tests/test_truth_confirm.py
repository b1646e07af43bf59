"""The confirmation timing that decides what serves runs its CONFIRM_MIN_ROUNDS rounds even when the search used up
the job's time budget.

WHY: a real upload (resemblyzer's speaker encoder, ONNXFORGE_OPTIMIZE_TIME_BUDGET_S=60, a loaded 2-core EPYC) served
its dynamic INT8 variant on a confirmation of 9 rounds: the budget had passed, so `_confirm` stopped the timing
benchmark_seconds (2 s) after it began, before its minimum. Under MIN_BLOCKS * MIN_BLOCKS rounds every round is its
own block of `latency.paired_ratio`, the very case its docstring calls too narrow; with a model slow enough to
open, the run could end after one round, an interval of one ratio.
"""

from __future__ import annotations

import inspect
import time

from optimizer.calibration import SampleSet
from optimizer.pipeline import BASELINE, CONFIRM_MIN_ROUNDS, OptimizeConfig, _confirm
from optimizer.runtime import SessionSettings
from optimizer.variants import Built, VariantReport
from tests import models


def test_the_confirmation_runs_its_minimum_rounds_after_the_budget_ran_out() -> None:
    model = models.cnn(seed=3, channels=(16, 32), image=32)
    feed = models.random_feed(model, batch=1)
    built = {BASELINE: Built(VariantReport(name=BASELINE, precision="fp32"), model),
             "candidate": Built(VariantReport(name="candidate", precision="fp32"), model)}
    samples = SampleSet(calibration=[feed], holdout=[feed], synthetic=False, source="test")
    # a benchmark time far shorter than CONFIRM_MIN_ROUNDS rounds of three sessions take, and a job deadline already
    # past: what a search that used its whole budget leaves the confirmation
    config = OptimizeConfig(benchmark_seconds=0.001)
    past = {"deadline": time.monotonic() - 10} if "deadline" in inspect.signature(_confirm).parameters else {}
    noise = _confirm(built, "candidate", samples, SessionSettings(intra_op_threads=1), config, batch=1, **past)
    assert noise.ratios["candidate"].rounds >= CONFIRM_MIN_ROUNDS
    assert noise.aa.rounds >= CONFIRM_MIN_ROUNDS
