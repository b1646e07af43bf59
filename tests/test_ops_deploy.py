"""`docker compose up --scale api=N` shares the host's cores out by default: each API replica has a CPU limit
(ONNXFORGE_API_CPUS, default 2) and sizes its ONNX Runtime threads from it, so N replicas run about N x 2 threads,
not N x every host core. No Docker engine here: the compose file is read, and the cgroup a limit creates is read
by the service's own code (optimizer/runtime.py cpu_limit)."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest

from app.settings import Settings
from optimizer.runtime import cpu_limit

yaml = pytest.importorskip("yaml", reason="PyYAML (dev extra) parses the compose files")

ROOT = Path(__file__).resolve().parent.parent


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's `${VAR:-default}`: the variable when set and not empty, else the default."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m.group(1)) or m.group(2), value)


def _services() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def _cgroup_v2(tmp: Path, cpus: float) -> tuple[Path, Path]:
    """The cgroup v2 files Docker writes for `--cpus` (compose's deploy.resources.limits.cpus): quota/period."""
    (tmp / "docker" / "c1").mkdir(parents=True)
    (tmp / "docker" / "c1" / "cpu.max").write_text(f"{round(cpus * 100000)} 100000\n")
    (tmp / "proc_cgroup").write_text("0::/docker/c1\n")
    return tmp, tmp / "proc_cgroup"


def test_each_api_replica_has_a_cpu_limit_by_default_that_the_shell_can_change() -> None:
    api = _services()["api"]
    limit = api["deploy"]["resources"]["limits"]["cpus"]
    assert limit == "${ONNXFORGE_API_CPUS:-2}"
    assert float(_interpolate(limit, {})) == 2.0
    assert float(_interpolate(limit, {"ONNXFORGE_API_CPUS": "16"})) == 16.0
    assert float(_interpolate(limit, {"ONNXFORGE_API_CPUS": ""})) == 2.0  # set but empty: the default, as compose
    # Threads still follow the limit unless set explicitly: the environment passes 0 through by default.
    assert _interpolate(api["environment"]["ONNXFORGE_INTRA_OP_THREADS"], {}) == "0"


@pytest.mark.parametrize("cpus", [2.0, 1.0, 0.5])
def test_a_replica_sizes_its_threads_from_the_limit(tmp_path: Path, cpus: float) -> None:
    # What cpu_limit reads for a replica limited to `cpus` (2: the compose default): threads = the limit rounded
    # up, never more than the CPUs this process may run on. With 4 replicas: 4 x 2 threads, not 4 x host cores.
    affinity = len(os.sched_getaffinity(0))
    assert cpu_limit(*_cgroup_v2(tmp_path, cpus)) == min(affinity, math.ceil(cpus))


def test_single_process_use_keeps_every_cpu_and_the_worker_keeps_the_hosts() -> None:
    # `onnxforge serve` / `docker run` outside compose: no limit of ours, threads from the CPUs the process may use.
    assert Settings().intra_op_threads == 0
    # The worker's CPUs are not limited: one optimization times its candidates on the host's cores (its memory is).
    assert "cpus" not in _services()["worker"]["deploy"].get("resources", {}).get("limits", {})
