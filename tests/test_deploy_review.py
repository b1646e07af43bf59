"""The deploy files reviewed as a deployment runs them, without a Docker engine: the build context .dockerignore
leaves, the pinned versions, the environment compose passes, nginx's limits and timeouts against the service's, the
image's health check run as the process Docker runs, two API replicas and a worker on one PostgreSQL and one data
folder, and SIGTERM to onnxforge as PID 1 of its own PID namespace (what `docker stop` faces), with and without the
init compose gives it (`init: true`: Docker's tini; Debian's `tini` here)."""

from __future__ import annotations

import io
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from app.prefork import UVICORN_OPTIONS
from app.services.validation_child import VALIDATION_TIME_LIMIT_S
from app.settings import OTHER_VARIABLES, MiB, Settings
from tests import models
from tests.service import free_port
from tests.test_robust_shutdown import calibration, slow_loop

httpx = pytest.importorskip("httpx")
yaml = pytest.importorskip("yaml", reason="PyYAML (dev extra) parses the compose files")

ROOT = Path(__file__).resolve().parent.parent
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.path.exists(p)),
                                      None)
TINI = shutil.which("tini")
# Read by docker compose only (interpolated into docker-compose.yml), never by the service.
COMPOSE_ONLY = {"ONNXFORGE_API_CPUS", "ONNXFORGE_API_MEMORY", "ONNXFORGE_WORKER_MEMORY"}


def _compose(name: str = "docker-compose.yml") -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's `${VAR:-default}`: the variable when set and not empty, else the default."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m.group(1)) or m.group(2), value)


# -- the build context ---------------------------------------------------------------------------------------


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """One .dockerignore pattern as Docker matches it (Go's filepath.Match, plus `**` for any folders)."""
    pattern = pattern.strip("/")
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + "$")


def _in_context(relative: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = relative.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for exception, regex in rules:
        if any(regex.match(candidate) for candidate in candidates):
            included = exception
    return included


def build_context() -> list[str]:
    """The files `docker build .` sends, by the repository's .dockerignore."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rules.append((line.startswith("!"), _dockerignore_regex(line.lstrip("!"))))
    files = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d != ".git"] if folder == str(ROOT) else dirs
        for name in names:
            relative = (Path(folder) / name).relative_to(ROOT).as_posix()
            if _in_context(relative, rules):
                files.append(relative)
    return sorted(files)


def test_the_build_context_holds_what_the_dockerfile_copies_and_nothing_private() -> None:
    context = build_context()
    copied = [src for line in (ROOT / "Dockerfile").read_text().splitlines()
              if line.startswith("COPY ") and "--from=" not in line for src in line.split()[1:-1]]
    assert "deploy/constraints.txt" in copied
    for source in copied:
        assert any(f == source or f.startswith(source.rstrip("/") + "/") for f in context), source
    assert "app/web/index.html" in context and "optimizer/pipeline.py" in context
    leaked = [f for f in context if f.split("/")[0] in (".git", ".env", ".venv", "data", "tests", "bench", "deploy")
              and f != "deploy/constraints.txt" or "__pycache__" in f or f.endswith(".pyc")]
    assert leaked == []


def test_the_package_builds_from_the_build_context_alone(tmp_path: Path) -> None:
    """What the image's `pip install .` does, on a copy of the context only (a file the build needs but the context
    leaves out fails here, not in `docker build`). pip builds it in an isolated environment with the build backend
    pyproject.toml names, as in the image."""
    context = tmp_path / "context"
    for relative in build_context():
        (context / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, context / relative)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
                             "-w", str(tmp_path / "out"), str(context)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (wheel,) = (tmp_path / "out").glob("onnxforge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("app/web/index.html", "app/web/dashboard.js", "app/cli.py", "optimizer/pipeline.py"):
        assert needed in names, needed
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "onnxforge = app.cli:main" in entry_points


# -- versions ------------------------------------------------------------------------------------------------


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_image_installs_pinned_versions_of_every_runtime_dependency() -> None:
    import tomllib

    pins = {}
    for line in (ROOT / "deploy" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert re.fullmatch(r"[A-Za-z0-9_.\-]+", name) and re.fullmatch(r"\d[\w.]*", version), line
            pins[_normalized(name)] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["postgres"] + \
        project["optional-dependencies"]["s3"]
    for requirement in declared:
        name = _normalized(re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0))
        assert name in pins, f"{name} is not pinned in deploy/constraints.txt"
    assert "psycopg-binary" in pins and "pydantic-core" in pins and "starlette" in pins  # transitive ones too
    # ONNX Runtime is pinned by the Dockerfile (CPU and GPU are two packages), not by the constraints.
    assert not {"onnxruntime", "onnxruntime-gpu", "onnxforge"} & set(pins)
    dockerfile = (ROOT / "Dockerfile").read_text()
    installs = re.findall(r'pip install -c deploy/constraints\.txt "\.\[(cpu|gpu),postgres,s3\]" "(\S+)"', dockerfile)
    assert installs == [("cpu", "onnxruntime==${ORT_VERSION}"), ("gpu", "onnxruntime-gpu==${ORT_GPU_VERSION}")]
    assert len(re.findall(r"pip install (?!-c deploy/constraints\.txt |--no-deps \.)", dockerfile)) == 0
    for image in ("python:3.12-slim-bookworm", "nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04"):
        assert image in dockerfile
    services = _compose()["services"]
    assert services["postgres"]["image"] == "postgres:16-alpine" and services["nginx"]["image"] == "nginx:1.28-alpine"


# -- compose ---------------------------------------------------------------------------------------------------


def test_every_onnxforge_variable_in_the_deploy_files_is_read_by_someone() -> None:
    """A misspelt variable in compose is silently ignored by the container (a warning in its log at most)."""
    settings = {"ONNXFORGE_" + name.upper() for name in Settings.model_fields}
    for name in ("Dockerfile", "docker-compose.yml", "deploy/compose.gpu.yml", "deploy/nginx.conf"):
        for variable in set(re.findall(r"ONNXFORGE_[A-Z0-9_]+", (ROOT / name).read_text())):
            assert variable in settings | COMPOSE_ONLY | OTHER_VARIABLES, f"{name}: {variable}"
    # What the containers get is a setting, and valid: the image's ENV plus compose's environment, as shipped.
    environment = dict(re.findall(r"(ONNXFORGE_\w+)=(\S+)", (ROOT / "Dockerfile").read_text()))
    for source in ("docker-compose.yml", "deploy/compose.gpu.yml"):
        for service in ("api", "worker"):
            environment |= _compose(source)["services"][service].get("environment", {})
    assert set(environment) <= settings, set(environment) - settings
    given = {k.removeprefix("ONNXFORGE_").lower(): _interpolate(v, {}) for k, v in environment.items()}
    resolved = Settings(**{k: v for k, v in given.items() if v != ""})
    assert resolved.host == "0.0.0.0" and resolved.port == 8000 and resolved.providers == "cuda"
    assert resolved.database_url.startswith("postgresql://") and str(resolved.data_dir) == "/data"


def test_compose_runs_onnxforge_under_an_init() -> None:
    """`init: true`: see test_sigterm_to_serve_as_pid_1 for what PID 1 does without one."""
    services = _compose()["services"]
    for name in ("api", "worker"):
        assert services[name]["init"] is True, name
        assert services[name]["stop_grace_period"] == "40s"
    assert UVICORN_OPTIONS["timeout_graceful_shutdown"] < 40


# -- nginx -----------------------------------------------------------------------------------------------------


def _seconds(conf: str, directive: str) -> float:
    value = re.search(rf"^\s*{directive} (\d+)(s|m)?;", conf, re.M)
    assert value is not None, directive
    return float(value.group(1)) * (60 if value.group(2) == "m" else 1)


def test_nginx_timeouts_fit_the_service() -> None:
    import uvicorn

    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    upstream = conf.split("upstream onnxforge_api {", 1)[1].split("}", 1)[0]
    replica_keep_alive = UVICORN_OPTIONS.get("timeout_keep_alive", uvicorn.Config(app=None).timeout_keep_alive)
    # nginx drops an idle upstream connection before the replica does (else a POST on it can get a 502).
    assert _seconds(upstream, "keepalive_timeout") < replica_keep_alive
    # An upload is answered after its validation: nginx waits longer than the service may take.
    assert _seconds(conf, "proxy_read_timeout") >= VALIDATION_TIME_LIMIT_S + Settings().validation_wait_s
    predict = conf.split("location ~ ^/(v1/models/.+/predict|v2/models/.+/infer)$ {", 1)[1].split("}", 1)[0]
    limit = re.search(r"client_max_body_size (\d+)m;", predict)
    assert limit is not None
    assert Settings().max_predict_body_bytes <= int(limit.group(1)) * MiB <= Settings().max_predict_body_bytes + 2 * MiB
    # A predict is not left waiting (and then replayed: non_idempotent) for the uploads' 960 s.
    assert Settings().predict_time_limit_s < _seconds(predict, "proxy_read_timeout") <= 300


def _nginx(tmp: Path, upstream_port: int) -> tuple[str, subprocess.Popen]:
    """deploy/nginx.conf with its upstream on 127.0.0.1:`upstream_port` (nothing listens there), as
    tests/test_scale_out.py runs it."""
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    conf = re.sub(r"^\s*server api:8000 [^;]*;$", f"        server 127.0.0.1:{upstream_port};", conf, flags=re.M)
    conf = re.sub(r"^\s*resolver [^;]*;\n", "", conf, flags=re.M)
    port = free_port()
    conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{port};")
    run = tmp / "nginx"
    run.mkdir()
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = conf.replace("pid /tmp/nginx.pid;", f"{user}daemon off;\npid {run}/nginx.pid;\nerror_log {run}/error.log;")
    temp = "".join(f"    {kind}_temp_path {run}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                         "scgi"))
    conf = conf.replace("http {\n", f"http {{\n    access_log off;\n{temp}", 1)
    (run / "nginx.conf").write_text(conf)
    process = subprocess.Popen([NGINX, "-p", str(run), "-c", str(run / "nginx.conf"), "-e", str(run / "error.log")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    for _ in range(200):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return f"127.0.0.1:{port}", process
        assert process.poll() is None, (run / "error.log").read_text()
        time.sleep(0.05)
    raise AssertionError("nginx did not listen")


def _head_only(address: str, path: str, length: int) -> bytes:
    """A POST whose head announces `length` bytes and sends none of them: what nginx answers from the head alone."""
    host, port = address.split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {length}\r\n\r\n".encode())
        conn.settimeout(3)
        try:
            return conn.recv(65536)
        except TimeoutError:
            return b""  # nginx waits for the body: it accepted the size


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx; .ci/run does)")
def test_nginx_refuses_an_oversized_predict_from_its_head_with_the_services_error_shape(tmp_path: Path) -> None:
    address, process = _nginx(tmp_path, free_port())
    try:
        too_large = 80 * MiB
        answer = _head_only(address, "/v1/models/m/predict", too_large)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413"), answer[:300]
        assert b"application/json" in head
        assert "ONNXFORGE_MAX_PREDICT_BODY_BYTES" in json.loads(body)["error"]
        assert _head_only(address, "/v2/models/m/infer", too_large).startswith(b"HTTP/1.1 413")
        # An upload of that size is within the upload limit: nginx takes it (it waits for the body).
        assert not _head_only(address, "/v1/models", too_large).startswith(b"HTTP/1.1 413")
    finally:
        process.send_signal(signal.SIGQUIT)
        process.wait(15)


# -- two replicas, one worker, one PostgreSQL, one data folder ---------------------------------------------------


def _healthcheck_command() -> list[str]:
    """The CMD of the image's HEALTHCHECK (both targets have the same)."""
    commands = set(re.findall(r"^\s*CMD (\[.*\])$", (ROOT / "Dockerfile").read_text(), re.M)) - {'["serve"]'}
    (command,) = commands
    return json.loads(command)


class Replicas:
    """Processes started as compose starts the stack (api: `serve --no-worker`, worker: `worker`), on 127.0.0.1."""

    def __init__(self, tmp: Path, database_url: str) -> None:
        self.tmp = tmp
        self.env = {**os.environ, "ONNXFORGE_DATABASE_URL": database_url, "ONNXFORGE_DATA_DIR": str(tmp / "data"),
                    "ONNXFORGE_PROVIDERS": "cpu", "ONNXFORGE_INTRA_OP_THREADS": "1", "ONNXFORGE_WORKER_POLL_S": "0.1",
                    "ONNXFORGE_OPTIMIZE_TIME_BUDGET_S": "4", "ONNXFORGE_LOG_LEVEL": "warning",
                    "ONNXFORGE_HOST": "127.0.0.1"}
        self.processes: dict[str, subprocess.Popen] = {}
        self.urls: dict[str, str] = {}

    def start(self, name: str, *args: str, port: int | None = None) -> None:
        env = {**self.env, "ONNXFORGE_PORT": str(port or 0)}
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process's life
        self.processes[name] = subprocess.Popen([sys.executable, "-m", "app.cli", *args], cwd=ROOT, env=env,
                                                stdout=log, stderr=subprocess.STDOUT)
        if port:
            self.urls[name] = f"http://127.0.0.1:{port}"

    def wait_ready(self, name: str) -> None:
        for _ in range(600):
            assert self.processes[name].poll() is None, self.log(name)
            try:
                if httpx.get(f"{self.urls[name]}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"{name} not ready: {self.log(name)}")

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


@pytest.fixture(scope="module")
def replicas(new_database: Callable[[], str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    stack = Replicas(tmp_path_factory.mktemp("replicas"), new_database())
    try:
        stack.start("a", "serve", "--no-worker", port=free_port())
        stack.start("b", "serve", "--no-worker", port=free_port())
        stack.start("worker", "worker")
        stack.wait_ready("a")
        stack.wait_ready("b")
        yield stack
    finally:
        stack.stop()


FEED = {name: value.tolist() for name, value in models.random_feed(models.mlp()).items()}


def _upload_and_wait(url: str, seed: int) -> int:
    data = models.mlp(seed=seed).SerializeToString()
    answer = httpx.post(f"{url}/v1/models", files={"file": ("m.onnx", io.BytesIO(data))}, data={"name": "shared"},
                        timeout=60)
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["job_id"]
    for _ in range(1200):
        job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
        if job["status"] in ("succeeded", "failed"):
            assert job["status"] == "succeeded", job
            return answer.json()["version"]
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish")


def _served_by(url: str, version: int) -> dict:
    """Predict on `url` until it answers from `version` (each replica trusts its view of the serving version for
    ONNXFORGE_REGISTRY_CACHE_TTL_S, 1 s); bounded, no timing asserted."""
    for _ in range(300):
        answer = httpx.post(f"{url}/v1/models/shared/predict", json={"inputs": FEED}, timeout=30)
        assert answer.status_code == 200, answer.text
        if answer.json()["version"] == version:
            return answer.json()
        time.sleep(0.1)
    raise AssertionError(f"{url} never served version {version}: {answer.json()['version']}")


def test_upload_on_one_replica_predict_and_pin_seen_on_the_other(replicas: Replicas) -> None:
    a, b = replicas.urls["a"], replicas.urls["b"]
    assert _upload_and_wait(a, seed=1) == 1
    on_b, on_a = _served_by(b, 1), _served_by(a, 1)
    assert on_b["outputs"] == on_a["outputs"] and on_b["variant"] == on_a["variant"]
    assert _upload_and_wait(a, seed=2) == 2
    assert _served_by(b, 2)["outputs"] != on_b["outputs"]  # another model: other numbers
    pinned = httpx.put(f"{a}/v1/models/shared/serving", json={"version": 1}, timeout=10)
    assert pinned.status_code == 200, pinned.text
    assert _served_by(b, 1)["outputs"] == on_b["outputs"]
    assert httpx.get(f"{b}/v1/models/shared", timeout=10).json()["pinned_version"] == 1
    assert httpx.delete(f"{b}/v1/models/shared/serving", timeout=10).status_code == 200  # unpinned through B
    _served_by(a, 2)


def test_the_images_healthcheck_command_checks_a_real_endpoint(replicas: Replicas) -> None:
    command = _healthcheck_command()
    assert command[0] == "python"
    run = [sys.executable, *command[1:]]
    port = replicas.urls["a"].rsplit(":", 1)[1]
    alive = subprocess.run(run, env={**os.environ, "ONNXFORGE_PORT": port}, capture_output=True, timeout=30)
    assert alive.returncode == 0, alive.stderr
    dead = subprocess.run(run, env={**os.environ, "ONNXFORGE_PORT": str(free_port())}, capture_output=True, timeout=30)
    assert dead.returncode != 0 and b"Connection refused" in dead.stderr


# -- SIGTERM to PID 1 ----------------------------------------------------------------------------------------------


def _pid_namespaces_work() -> bool:
    try:
        return subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_pid_namespace = pytest.mark.skipif(not _pid_namespaces_work(),
                                         reason="unshare --pid is not permitted here (root, or a user namespace)")



def _wait_for_200(url: str) -> None:
    """Until `url` answers 200 (at most ~60 s of refused connections)."""
    for _ in range(600):
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)

def _as_pid_1(command: list[str], env: dict[str, str], log: Path, init: bool) -> tuple[subprocess.Popen, int]:
    """`command` as PID 1 of a new PID namespace, or under tini as PID 1 (compose's `init: true`); returns the
    unshare process and the host pid of PID 1, which is where `docker stop` sends SIGTERM."""
    prefix = [TINI, "--"] if init else []
    process = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", *prefix, *command],
                               env=env, cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    for _ in range(200):
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        if children:
            return process, int(children[0])
        time.sleep(0.01)
    raise AssertionError("unshare started nothing")


def _children_of(pid: int) -> list[int]:
    return [int(child) for task in os.listdir(f"/proc/{pid}/task")
            for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]


@needs_pid_namespace
@pytest.mark.parametrize("init", [False, True], ids=["onnxforge-as-pid-1", "under-tini"])
def test_sigterm_to_serve_as_pid_1_drains_an_in_flight_predict(tmp_path: Path, init: bool) -> None:
    if init and TINI is None:
        pytest.skip("tini is not installed (apt-get install tini): Docker's init, which `init: true` runs")
    port = free_port()
    env = {**os.environ, "ONNXFORGE_DATA_DIR": str(tmp_path / "data"), "ONNXFORGE_PORT": str(port),
           "ONNXFORGE_HOST": "127.0.0.1", "ONNXFORGE_PROVIDERS": "cpu", "ONNXFORGE_INTRA_OP_THREADS": "1"}
    process, pid1 = _as_pid_1([sys.executable, "-m", "app.cli", "serve", "--no-worker"], env, tmp_path / "log", init)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_for_200(f"{url}/healthz")
        files = {"file": ("slow.onnx", slow_loop().SerializeToString()), "calibration": ("s.npz", calibration())}
        assert httpx.post(f"{url}/v1/models", files=files, data={"name": "slow"}, timeout=60).status_code == 202
        # A predict of ~300,000 Loop trips (seconds): sent whole, then the signal while it runs.
        body = json.dumps({"inputs": {"trips": [300_000], "x": [[0.1] * 64]}}).encode()
        conn = socket.create_connection(("127.0.0.1", port), timeout=60)
        conn.sendall(b"POST /v1/models/slow/predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json"
                     b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(0.3)  # read by the server (not an assertion: only when the signal goes)
        assert select.select([conn], [], [], 0)[0] == [], "the predict answered before the signal: not in flight"
        os.kill(pid1, signal.SIGTERM)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
        conn.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["model"] == "slow"
        code = process.wait(60)
        # Without an init the kernel drops the SIGTERM uvicorn raises again to end itself (PID 1 has no default
        # action): the status says 0, not "stopped by SIGTERM". Under tini, 128 + 15, as README says.
        assert code == (128 + signal.SIGTERM if init else 0), (code, (tmp_path / "log").read_text()[-2000:])
    finally:
        if process.poll() is None:
            os.kill(pid1, signal.SIGKILL)
            process.wait(10)


@needs_pid_namespace
def test_worker_container_stopped_mid_job_puts_the_job_back_for_the_next_worker(tmp_path: Path) -> None:
    if TINI is None:
        pytest.skip("tini is not installed (apt-get install tini): Docker's init, which `init: true` runs")
    port = free_port()
    env = {**os.environ, "ONNXFORGE_DATA_DIR": str(tmp_path / "data"), "ONNXFORGE_PORT": str(port),
           "ONNXFORGE_HOST": "127.0.0.1", "ONNXFORGE_PROVIDERS": "cpu", "ONNXFORGE_INTRA_OP_THREADS": "1",
           "ONNXFORGE_WORKER_POLL_S": "0.1", "ONNXFORGE_OPTIMIZE_TIME_BUDGET_S": "4"}
    api = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--no-worker"], cwd=ROOT, env=env,
                           stdout=open(tmp_path / "api.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    worker, pid1 = _as_pid_1([sys.executable, "-m", "app.cli", "worker"], env, tmp_path / "worker.log", init=True)
    second = None
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_for_200(f"{url}/readyz")
        data = models.mlp().SerializeToString()
        answer = httpx.post(f"{url}/v1/models", files={"file": ("m.onnx", io.BytesIO(data))}, data={"name": "m"},
                            timeout=60)
        job_id = answer.json()["job_id"]
        (onnxforge,) = _children_of(pid1)  # tini's child: the worker
        for _ in range(3000):  # the optimizer child, once it runs the runner (stopped before its exec, it would
            runners = [pid for pid in _children_of(onnxforge)  # hold the worker's Popen: not what docker does)
                       if b"app.worker.runner" in Path(f"/proc/{pid}/cmdline").read_bytes()]
            if runners:
                break
            time.sleep(0.005)
        else:
            raise AssertionError((tmp_path / "worker.log").read_text())
        os.kill(runners[0], signal.SIGSTOP)  # the optimizer child: the job cannot finish before the stop
        os.kill(pid1, signal.SIGTERM)  # docker stop
        # Within the 40 s compose gives it; the worker handles SIGTERM itself and ends normally (status 0).
        assert worker.wait(40) == 0, (tmp_path / "worker.log").read_text()
        assert "put back in the queue" in (tmp_path / "worker.log").read_text()
        job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
        assert (job["status"], job["attempts"]) == ("queued", 0), job
        assert job["error"] == "interrupted by a worker shutdown; queued again"
        second = subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], cwd=ROOT, env=env,
                                  stdout=open(tmp_path / "worker2.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
        for _ in range(1200):
            job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
            if job["status"] in ("succeeded", "failed"):
                break
            time.sleep(0.1)
        assert (job["status"], job["attempts"]) == ("succeeded", 1), job
    finally:
        for process in (second, api):
            if process is not None:
                process.terminate()
                process.wait(30)
        if worker.poll() is None:
            os.kill(pid1, signal.SIGKILL)
            worker.wait(10)


def test_compose_only_variables_get_no_unknown_setting_warning() -> None:
    """A shell that exports compose's own variables (the memory limits) got "not a setting" warnings from serve."""
    from app.settings import unknown_variables

    assert unknown_variables({name: "1" for name in COMPOSE_ONLY}) == []
