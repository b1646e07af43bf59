"""The CLI's summary says when the provider asked for was not the one that measured: the fallback warning is a log
line that `--quiet` hides (GPU review, 2026-11-28)."""

from __future__ import annotations

from pathlib import Path

import pytest

from optimizer.pipeline import OptimizeConfig, optimize
from optimizer.report_table import summary
from optimizer.runtime import cuda_is_usable
from tests import models


@pytest.mark.skipif(cuda_is_usable(), reason="CUDA works here: nothing falls back")
def test_cuda_asked_on_a_machine_without_it_is_named_in_the_summary(tmp_path: Path) -> None:
    config = OptimizeConfig(precision="fp32", provider="cuda", benchmark_seconds=0.1, batch_sizes=(1,))
    report = optimize(models.mlp().SerializeToString(), out_dir=tmp_path, config=config).report
    assert report["provider"] == "cpu"
    assert "provider: cpu (cuda was asked for and is not usable here)" in summary(report)
    auto = optimize(models.mlp().SerializeToString(), out_dir=tmp_path / "auto",
                    config=OptimizeConfig(precision="fp32", benchmark_seconds=0.1, batch_sizes=(1,))).report
    assert "provider: cpu   " in summary(auto)
