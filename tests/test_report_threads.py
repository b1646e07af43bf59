"""The report says how many intra-op threads its timings ran with: `threads` 0 alone does not say it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from optimizer.pipeline import OptimizeConfig, optimize
from optimizer.runtime import cpu_limit
from tests import models


@pytest.mark.parametrize("threads", [1, 0])
def test_the_report_names_the_threads_its_timings_ran_with(tmp_path: Path, threads: int) -> None:
    config = OptimizeConfig(precision="fp32", min_top1=0.7, benchmark_seconds=0.2, batch_sizes=(1,), threads=threads)
    optimize(models.mlp().SerializeToString(), out_dir=tmp_path, config=config)
    recorded = json.loads((tmp_path / "report.json").read_text())["threads"]
    assert recorded["cpus_usable"] == cpu_limit() >= 1
    if threads:
        assert (recorded["intra_op_threads"], recorded["rule"]) == (1, "as configured")
    elif cpu_limit() < (os.cpu_count() or 0):
        assert recorded["intra_op_threads"] == cpu_limit()
    else:
        assert recorded["intra_op_threads"] is None and "physical core" in recorded["rule"]
