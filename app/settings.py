"""The service's one settings object, read from ONNXFORGE_* environment variables.

The defaults are an embedded single-machine service: SQLite and artifacts under ./data, a worker
process started by the API, CPU or CUDA chosen by what really works here.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from annotated_types import Ge, Gt, Le
from pydantic import Field, SecretStr, ValidationError, ValidationInfo, ValidatorFunctionWrapHandler, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


class Settings(BaseSettings):
    # allow_inf_nan False: a float setting of inf or nan is refused (by `_in_range`, naming the range)
    model_config = SettingsConfigDict(env_prefix="ONNXFORGE_", extra="ignore", allow_inf_nan=False)

    # Where things live.
    data_dir: Path = Path("data")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default sqlite:///<data_dir>/onnxforge.db"
    )

    storage_url: str | None = Field(
        default=None, description="artifact store; default: the folder <data_dir>/artifacts (a shared volume "
                                  "when scaled out); s3://bucket/prefix for an S3-compatible bucket (s3 extra)",
    )

    # Serving.
    host: str = Field(default="127.0.0.1", description="`onnxforge serve` binds here (0.0.0.0 in a container)")
    port: int = Field(default=8000, ge=0, le=65535)
    providers: str = Field(default="auto", description="auto | cpu | cuda: the provider sessions are created on")
    intra_op_threads: int = Field(
        default=0, ge=0, le=1024, description="threads per session; 0 = sized from the CPUs this process may use (its "
                                     "affinity and cgroup CPU quota, e.g. a container's cpus limit), not the host's",
    )
    inter_op_threads: int = Field(default=1, ge=0, le=1024)
    intra_op_spinning: bool = Field(
        default=False, description="let idle intra-op threads spin (lower latency alone, but they steal the "
                                   "event loop's core under load)",
    )
    workers: int = Field(
        default=1, ge=1, le=256, description="API processes `onnxforge serve` runs on its port (app/prefork.py), each "
                                     "with its own event loop, sessions and batcher; one optimizer worker for all",
    )
    # 2, not more: each session already uses every core through intra-op threads, so more threads
    # running session.run at once only oversubscribe the cores (4 x 2 threads on 2 cores measured worse).
    predict_threads: int = Field(
        default=2, ge=1, le=256,
        description="threads running session.run off the event loop; one model holds at most this "
                    "many at once, and one more thread is kept for the other models",
    )
    predict_time_limit_s: float = Field(
        default=30.0, ge=0, le=3600, description="a predict's session.run is stopped past this and answered 504 "
                                                 "(0: no limit)"
    )
    batch_max_size: int = Field(
        default=32, ge=1, le=1024, description="dynamic batching: most rows per session.run (1 turns batching off); a "
                                      "model uploaded without its own batch_max_size is batched only where a "
                                      "probe at load shows batching pays (app/runtime/batching.py)",
    )
    batch_max_running: int = Field(
        default=2, ge=1, le=256,
        description="dynamic batching: batches of one model version running at once (more than "
                    "predict_threads only queue for a thread)",
    )
    batch_max_delay_ms: float = Field(
        default=0.0, ge=0, le=1000,
        description="dynamic batching: how long an idle model waits for more requests (0: none; requests that "
                    "arrive while a batch runs are batched anyway)",
    )
    session_cache_size: int = Field(default=8, ge=1, le=1024,
                                    description="loaded sessions kept, least recently used out")
    registry_cache_ttl_s: float = Field(
        default=1.0, ge=0, le=3600,
        description="how long predict trusts its view of which version serves (0: always ask)",
    )

    # Limits.
    max_model_bytes: int = Field(default=2048 * MiB, ge=1)
    max_calibration_bytes: int = Field(default=1024 * MiB, ge=1)
    max_input_elements: int = Field(default=1 << 24, ge=1, description="per predict input")
    max_predict_body_bytes: int = Field(default=64 * MiB, ge=1, description="one /predict or /infer request body")
    job_memory_limit_mb: int = Field(
        default=8192, ge=0, description="address-space limit (RLIMIT_AS) of the optimizer process; 0 = none"
    )
    max_concurrent_jobs: int = Field(
        default=0, ge=0, description="optimizations running at once across ALL workers sharing the database "
                                     "(checked when a job is claimed); 0 = no global cap, each worker runs up to "
                                     "worker_concurrency",
    )
    session_cache_max_mb: int = Field(
        default=4096, ge=0, description="estimated memory of loaded sessions (1.5x each model file), least "
                                        "recently used out; a model over it still loads, alone; 0 = count only",
    )
    # Validating an upload loads it in the API process (protobuf, checker, an ONNX Runtime session): peak RSS
    # measured ~2x the file (3x when loading rewrites it; bench/loading_memory.py), so a burst of large uploads
    # is bounded here; an upload that finds no slot in time gets 503 + Retry-After.
    max_concurrent_validations: int = Field(
        default=2, ge=1, description="uploads validated at once in one API process; others wait"
    )
    validation_wait_s: float = Field(
        default=5.0, ge=0, le=600,
        description="how long an upload waits for a validation slot before a 503 + Retry-After",
    )

    # Retention.
    keep_versions: int = Field(
        default=0, ge=0, le=1_000_000,
        description="versions of a model kept: at each upload (and at start) older ones are deleted, files and "
                    "report, except the version serving and the one pinned; 0 = keep every version",
    )

    # Access control (app/security.py).
    api_keys: SecretStr = Field(
        default=SecretStr(""), description="`read:<key>` / `admin:<key>` entries, comma-separated; empty = open"
    )
    api_keys_file: Path | None = Field(default=None, description="a file of such entries, one a line")
    cors_origins: str = Field(default="", description="comma-separated origins allowed by CORS; empty = CORS off")

    # Jobs and the worker.
    run_worker: bool = Field(default=True, description="start a worker process with the API (embedded default)")
    worker_poll_s: float = Field(
        default=1.0, ge=0.05, le=60, description="how often an idle worker looks for a queued job"
    )
    # 1 by default: one optimization already uses every core (intra-op threads) and up to
    # job_memory_limit_mb, so a second at once on the same machine mostly shares them. Each child gets its
    # own job_memory_limit_mb: a worker may take worker_concurrency times that.
    worker_concurrency: int = Field(default=1, ge=1, le=64,
                                    description="optimizer processes one worker runs at once")
    job_time_limit_s: float = Field(default=3600.0, gt=0, le=7 * 86400,
                                    description="wall-clock limit of one optimization")
    job_lease_s: float = Field(
        default=30.0, ge=3, le=3600, description="a running job whose worker is silent this long is lost; its "
                                        "worker beats every third of it",
    )
    job_max_attempts: int = Field(default=2, ge=1, le=100,
                                  description="runs of a job whose worker died before giving up")
    optimize_time_budget_s: float = Field(default=300.0, gt=0, le=7 * 86400,
                                          description="the optimizer's own time budget")

    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="debug | info | warning | error; debug also logs every request"
    )

    @property
    def access_log(self) -> bool:
        """uvicorn's line per request, at debug only: it costs ~38 us of event loop a request (more than the
        whole fast infer path), /metrics counts every request at any level, and a proxy in front logs them."""
        return self.log_level == "debug"

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: object) -> object:
        """WARNING works as warning: logging's own names are upper case."""
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("*", mode="wrap")
    @classmethod
    def _in_range(cls, value: object, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> object:
        """A number out of its field's range (or inf, nan, not a number) is one message giving the range: pydantic's
        own says only the bound it broke, and took inf as a predict time limit (a hung predict never answered)."""
        try:
            return handler(value)
        except ValidationError:
            allowed = allowed_range(info.field_name)
            if allowed is None:
                raise
            raise ValueError(f"must be {allowed}{_WHY.get(info.field_name, '')}") from None

    @field_validator("providers")
    @classmethod
    def _known_provider(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in ("auto", "cpu", "cuda"):
            raise ValueError("ONNXFORGE_PROVIDERS must be auto, cpu or cuda")
        return value

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'onnxforge.db').resolve()}"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def uploads_dir(self) -> Path:
        """Uploads land here first; on the artifacts' filesystem so that storing them is a rename."""
        return self.data_dir / "tmp" / "uploads"

    @property
    def work_dir(self) -> Path:
        """The worker's scratch space for one job's optimizer output."""
        return self.data_dir / "tmp" / "work"


# WHY some bounds are what they are, said with the range when a value is refused.
_WHY = {
    "job_lease_s": ": shorter requeues jobs whose workers are alive (they renew it every third of it), longer leaves "
                   "a dead worker's job waiting that long",
    "worker_poll_s": ": shorter queries the database for nothing, longer leaves an upload waiting that long for its "
                     "worker",
    "predict_time_limit_s": " (0: no limit)",
    "job_memory_limit_mb": " (0: no limit)",
    "keep_versions": " (0: keep every version)",
    "intra_op_threads": " (0: sized from the CPUs this process may use)",
    "inter_op_threads": " (0: ONNX Runtime's default)",
}


def allowed_range(field: str) -> str | None:
    """The values a numeric setting takes, in words ("from 0 to 3600 seconds"), from its Field's bounds; None for a
    setting that is not a number."""
    info = Settings.model_fields[field]
    if info.annotation not in (int, float):
        return None
    low = next((m.ge for m in info.metadata if isinstance(m, Ge)), None)
    above = next((m.gt for m in info.metadata if isinstance(m, Gt)), None)
    high = next((m.le for m in info.metadata if isinstance(m, Le)), None)
    unit = next((u for suffix, u in _UNITS.items() if field.endswith(suffix)), "")
    kind = "a whole number " if info.annotation is int else ""
    if low is not None and high is not None:
        return f"{kind}from {low:g} to {high:g}{unit}"
    if above is not None and high is not None:
        return f"{kind}over {above:g} and at most {high:g}{unit}"
    if low is not None:
        return f"{kind}at least {low:g}{unit}"
    if above is not None:
        return f"{kind}over {above:g}{unit}"
    return f"{kind}".strip() or "a number"


_UNITS = {"_s": " seconds", "_ms": " ms", "_mb": " MiB", "_bytes": " bytes"}


# ONNXFORGE_* variables that are not settings but are read elsewhere: by docker compose (API_CPUS), between our own
# processes (SERVE_OVERRIDES, WORKER_SETTINGS), by the benchmarks and the tests.
OTHER_VARIABLES = frozenset({"ONNXFORGE_API_CPUS", "ONNXFORGE_API_MEMORY", "ONNXFORGE_WORKER_MEMORY",
                             "ONNXFORGE_SERVE_OVERRIDES", "ONNXFORGE_WORKER_SETTINGS",
                             "ONNXFORGE_BENCH_CACHE", "ONNXFORGE_TEST_POSTGRES_URL"})


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One warning per ONNXFORGE_* variable that no setting reads, naming the closest known one.

    WHY: pydantic-settings ignores them, so ONNXFORGE_MAXMODELBYTES=10 left the 2 GiB default in force, silently.
    """
    prefix = Settings.model_config["env_prefix"]
    known = {prefix + name.upper() for name in Settings.model_fields} | OTHER_VARIABLES
    warnings = []
    for variable in sorted(environ):
        if not variable.upper().startswith(prefix) or variable.upper() in known:
            continue
        # compared without the shared prefix, which would make any two names look alike
        close = difflib.get_close_matches(variable.upper().removeprefix(prefix),
                                          sorted(name.removeprefix(prefix) for name in known), n=1, cutoff=0.6)
        close = [prefix + name for name in close]
        hint = f"; did you mean {close[0]}?" if close else "; see the settings in README.md (Configuration)"
        warnings.append(f"{variable} is not a setting and is ignored{hint}")
    return warnings
