"""Upgrading keeps what an older release stored: its database (the schema of the release of 2026-11-27 00:31, 7c542db:
no serving, pinned_at or unrunnable column, no workers table), its rows and old-format reports, its artifact folders
and the job it left queued. The data are written here as that release wrote them (DDL, rows and report captured from
a run of it: notes/upgrade), not built from today's code, so a change to the tables or the report cannot hide a break.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from sqlalchemy import create_engine, event, inspect, text

from app.settings import Settings
from app.store.db import Database
from app.worker.loop import Worker
from tests import models
from tests.conftest import TEST_SETTINGS, npz

# The tables as 7c542db's create_all wrote them (sqlite3 .schema and pg_dump of its databases).
OLD_SQLITE_DDL = (
    """CREATE TABLE model_versions (
	id VARCHAR(32) NOT NULL, name VARCHAR(64) NOT NULL, version INTEGER NOT NULL, status VARCHAR(16) NOT NULL,
	created_at DATETIME NOT NULL, ready_at DATETIME, deleted_at DATETIME, filename VARCHAR(255) NOT NULL,
	sha256 VARCHAR(64) NOT NULL, size_bytes INTEGER NOT NULL, has_calibration BOOLEAN NOT NULL, options JSON NOT NULL,
	inputs JSON NOT NULL, outputs JSON NOT NULL, notes JSON NOT NULL, selected VARCHAR(64), provider VARCHAR(16),
	report JSON, error TEXT, PRIMARY KEY (id), CONSTRAINT uq_model_version UNIQUE (name, version))""",
    "CREATE INDEX ix_model_versions_name ON model_versions (name)",
    """CREATE TABLE jobs (
	id VARCHAR(32) NOT NULL, version_id VARCHAR(32) NOT NULL, name VARCHAR(64) NOT NULL, version INTEGER NOT NULL,
	status VARCHAR(16) NOT NULL, stage VARCHAR(32), progress FLOAT NOT NULL, error TEXT, attempts INTEGER NOT NULL,
	worker_id VARCHAR(128), runner_pid INTEGER, created_at DATETIME NOT NULL, started_at DATETIME,
	finished_at DATETIME, lease_expires_at DATETIME, PRIMARY KEY (id),
	FOREIGN KEY(version_id) REFERENCES model_versions (id))""",
    "CREATE INDEX ix_jobs_status_created ON jobs (status, created_at)",
    "CREATE INDEX ix_jobs_version_id ON jobs (version_id)",
)
OLD_POSTGRES_DDL = (
    """CREATE TABLE model_versions (
    id character varying(32) NOT NULL, name character varying(64) NOT NULL, version integer NOT NULL,
    status character varying(16) NOT NULL, created_at timestamp without time zone NOT NULL,
    ready_at timestamp without time zone, deleted_at timestamp without time zone,
    filename character varying(255) NOT NULL, sha256 character varying(64) NOT NULL, size_bytes integer NOT NULL,
    has_calibration boolean NOT NULL, options json NOT NULL, inputs json NOT NULL, outputs json NOT NULL,
    notes json NOT NULL, selected character varying(64), provider character varying(16), report json, error text,
    CONSTRAINT model_versions_pkey PRIMARY KEY (id), CONSTRAINT uq_model_version UNIQUE (name, version))""",
    "CREATE INDEX ix_model_versions_name ON model_versions USING btree (name)",
    """CREATE TABLE jobs (
    id character varying(32) NOT NULL, version_id character varying(32) NOT NULL, name character varying(64) NOT NULL,
    version integer NOT NULL, status character varying(16) NOT NULL, stage character varying(32),
    progress double precision NOT NULL, error text, attempts integer NOT NULL, worker_id character varying(128),
    runner_pid integer, created_at timestamp without time zone NOT NULL, started_at timestamp without time zone,
    finished_at timestamp without time zone, lease_expires_at timestamp without time zone,
    CONSTRAINT jobs_pkey PRIMARY KEY (id),
    CONSTRAINT jobs_version_id_fkey FOREIGN KEY (version_id) REFERENCES model_versions(id))""",
    "CREATE INDEX ix_jobs_status_created ON jobs USING btree (status, created_at)",
    "CREATE INDEX ix_jobs_version_id ON jobs USING btree (version_id)",
)

# mlp v1's report as 7c542db's worker wrote it (no environment, tolerance, noise, confirmation, speedup_paired or
# speedup_served; variants named by recipe), cut to three variants, one batch size and two auto candidates.
OLD_REPORT: dict[str, Any] = json.loads(
    '{"source":{"sha256":"33cd99b69bb26ca8c4ee3a447ede653dec447ae1c58319d142cee614419d5895","size_bytes":105011,"ir'
    '_version":8,"original_ir_version":8,"notes":[],"opsets":{"ai.onnx":17}},"provider":"cpu","config":{"precision"'
    ':"auto","int8_mode":null,"calibration_method":"minmax","provider":"cpu","threads":1,"holdout_fraction":0.2,"mi'
    'n_cosine":0.99,"min_top1":0.99,"outputs":null,"time_budget_s":8.0,"benchmark_seconds":2.0,"batch_sizes":[1,8],'
    '"auto_candidates":null,"auto_prune_by_latency":true,"fp16_on_cpu":null},"graph":{"before":{"node_count":8,"op_'
    'histogram":{"Add":3,"MatMul":3,"Relu":2},"parameter_count":26122,"parameter_bytes":104488,"inputs":[{"name":"f'
    'eatures","dtype":"float32","shape":["batch",64]}],"outputs":[{"name":"logits","dtype":"float32","shape":["batc'
    'h",10]}],"opsets":{"ai.onnx":17},"ir_version":8,"redundant":[],"fusable":[{"pattern":"MatMul+Add","fuses_to":"'
    'Gemm when 2-D, else a bias fused into the next op (Attention, SkipLayerNormalization, BiasGelu, FusedMatMul)",'
    '"count":3,"nodes":[["MatMul_3","Add_6"],["MatMul_11","Add_14"],["MatMul_19","Add_22"]]}],"fused":{}},"after":{'
    '"node_count":5,"op_histogram":{"Gemm":3,"Relu":2},"parameter_count":26122,"parameter_bytes":104488,"inputs":[{'
    '"name":"features","dtype":"float32","shape":["batch",64]}],"outputs":[{"name":"logits","dtype":"float32","shap'
    'e":["batch",10]}],"opsets":{"ai.onnx":17},"ir_version":8,"redundant":[],"fusable":[],"fused":{"Gemm (with bias'
    ')":3}}},"calibration":{"synthetic":false,"source":"calibration.npz","method":"minmax","samples":19,"holdout_sa'
    'mples":5,"notes":[]},"variants":[{"name":"original","precision":"fp32","settings":{"source":"the uploaded mode'
    'l"},"status":"ok","reason":null,"size_bytes":105242,"node_count":8,"build_s":null,"latency_ms":{"p50":0.0198,"'
    'p90":0.0461,"p99":0.1154,"mean":0.0369},"throughput_per_s":50538.23,"latency_by_batch":{"1":{"batch":1,"runs":'
    '500,"session_create_ms":1.493492,"warmup_runs":5,"p50_ms":0.019787,"p90_ms":0.046101,"p99_ms":0.11539223999999'
    '998,"mean_ms":0.036851944000000005,"throughput_per_s":50538.23217263861,"provider":"cpu","deadline_hit":false}'
    '},"accuracy":null,"changes":{},"notes":[],"probe_latency_ms":{"p50":0.0175,"p90":0.0412}},{"name":"fused","pre'
    'cision":"fp32","settings":{"pass":"cleanup","level":"basic"},"status":"ok","reason":null,"size_bytes":105436,"'
    'node_count":5,"build_s":0.061,"latency_ms":{"p50":0.0182,"p90":0.04,"p99":0.0822,"mean":0.0489},"throughput_pe'
    'r_s":54841.1,"latency_by_batch":{"1":{"batch":1,"runs":500,"session_create_ms":0.829045,"warmup_runs":5,"p50_m'
    's":0.0182345,"p90_ms":0.039986,"p99_ms":0.08218884999999988,"mean_ms":0.048935124,"throughput_per_s":54841.097'
    '91878033,"provider":"cpu","deadline_hit":false}},"accuracy":{"passed":true,"reason":null,"samples":5,"outputs"'
    ':{"logits":{"name":"logits","checked":true,"shape":[1,10],"elements":50,"max_abs":0.0,"mean_abs":0.0,"relative'
    '_error":0.0,"cosine":1.0000000000000002,"top1":1.0,"nonfinite":0,"slices":null,"passed":true,"reason":null}}},'
    '"changes":{"level":"basic","provider":"any","nodes_before":8,"nodes_after":5,"removed":{"Add":3,"MatMul":3},"f'
    'usions":{"Gemm":3},"redundant_removed":{},"removed_before_onnxruntime":{},"redundant_left":[],"transformer_fus'
    'ion":{"used":false,"reason":"no attention or LayerNorm in the graph"},"max_abs_diff":{"logits":0.0}},"notes":['
    '],"probe_latency_ms":{"p50":0.0167,"p90":0.0366}},{"name":"int8-dynamic-s8-pc","precision":"int8","settings":{'
    '"mode":"dynamic","weight_type":"int8","per_channel":true},"status":"rejected","reason":"slower than the '
    'baseline: p50 0.023 ms vs 0.020 ms","size_bytes":31585,"node_count":20,"build_s":0.711,"latency_ms":{"p50":0.0'
    '234,"p90":0.0505,"p99":0.207,"mean":0.081},"throughput_per_s":42655.75,"latency_by_batch":{"1":{"batch":1,"run'
    's":500,"session_create_ms":1.532976,"warmup_runs":5,"p50_ms":0.0234435,"p90_ms":0.050491,"p99_ms":0.2069905499'
    '9996386,"mean_ms":0.081000414,"throughput_per_s":42655.74679548702,"provider":"cpu","deadline_hit":false}},"ac'
    'curacy":{"passed":true,"reason":null,"samples":5,"outputs":{"logits":{"name":"logits","checked":true,"shape":['
    '1,10],"elements":50,"max_abs":0.4328997731208801,"mean_abs":0.10309202674776316,"relative_error":0.09818201818'
    '51653,"cosine":0.9953406219482507,"top1":1.0,"nonfinite":0,"slices":null,"passed":true,"reason":null}}},"chang'
    'es":{"quantized_ops":{"DynamicQuantizeLinear":3,"MatMulInteger":3},"weight_type":"int8","per_channel":true,"no'
    'des_before":5,"nodes_after":20},"notes":["quant_pre_process: symbolic shape inference with auto_merge"],"probe'
    '_latency_ms":{"p50":0.0203,"p90":0.0456}}],"skipped_candidates":[{"name":"fp16","reason":"this CPU has no FP16'
    " arithmetic (no avx512_fp16/asimdhp): ONNX Runtime's CPU kernels would run FP16 through Casts (measured "
    '0.94-1.06x of FP32 on such CPUs); set fp16_on_cpu to try it '
    'anyway"}],"baseline":"original","selected":"fused","selection_reason":"fused is the fastest variant within '
    "tolerance: 1.09x the original's p50 "
    'latency","speedup_p50":1.088,"size_ratio":1.0018,"duration_s":2.88,"auto":{"rule":"the fastest variant by p50 '
    'latency at batch 1 that passes the accuracy guard on held-back samples and beats the original; when none does,'
    ' the original model is served","selected":"fused","selection_reason":"fused is the fastest variant within '
    'tolerance: 1.09x the original\'s p50 latency","excluded_nodes":[],"fp32_reference":"fused","candidates":[{"name'
    '":"original","precision":"fp32","settings":{"source":"the uploaded model"},"accuracy":null,"latency_ms":{"p50"'
    ':0.0198,"p90":0.0461,"timing":"final"},"size_bytes":105242,"status":"ok","reason":null,"build_s":null},{"name"'
    ':"fused","precision":"fp32","settings":{"pass":"cleanup","level":"basic"},"accuracy":{"passed":true,"outputs":'
    '{"logits":{"passed":true,"cosine":1.0000000000000002,"top1":1.0,"worst_slice_cosine":null,"worst_slice_error":'
    'null}}},"latency_ms":{"p50":0.0182,"p90":0.04,"timing":"final"},"size_bytes":105436,"status":"ok","reason":nul'
    'l,"build_s":0.061}],"steps_s":{"validate_and_fuse":0.137,"benchmark":0.806,"probe_build":1.559,"probe_benchmar'
    'k":0.362,"repair":0.0,"calibration_methods":0.0,"deferred_probe":0.0}}}'
)
OPTIONS = {"precision": "auto", "int8_mode": None, "calibration_method": "minmax", "min_cosine": None, "min_top1": None}
IO = ([{"name": "features", "dtype": "float32", "shape": ["batch", 64]}],
      [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}])
QUEUED_JOB = "ee53429f9730478db6b7324b9c65ea91"
# (version, seed of models.mlp, status, selected): two ready versions and one whose job was left queued
VERSIONS = ((1, 0, "ready", "fused"), (2, 1, "ready", "fused"), (3, 2, "optimizing", None))
FILES_AGE_S = 30 * 86400  # written a month ago: the orphan sweep's age rule would apply to them


def write_old_data(data_dir: Path, url: str, ddl: tuple[str, ...]) -> dict[int, bytes]:
    """The database and artifact folder 7c542db left for model `mlp`; returns each version's model bytes."""
    engine = create_engine(url)
    with engine.begin() as connection:
        for statement in ddl:
            connection.execute(text(statement))
    written: dict[int, bytes] = {}
    samples = npz(features=np.random.default_rng(0).normal(size=(24, 64)).astype(np.float32))
    with engine.begin() as connection:
        for number, seed, status, selected in VERSIONS:
            model = models.mlp(seed=seed).SerializeToString()
            written[number] = model
            version_id = f"{number:032x}"
            ready = status == "ready"
            connection.execute(text(
                "INSERT INTO model_versions (id, name, version, status, created_at, ready_at, deleted_at, filename, "
                "sha256, size_bytes, has_calibration, options, inputs, outputs, notes, selected, provider, report, "
                "error) VALUES (:id, 'mlp', :version, :status, :created, :ready_at, NULL, :filename, :sha, :size, "
                ":cal, :options, :inputs, :outputs, '[]', :selected, :provider, :report, NULL)"),
                {"id": version_id, "version": number, "status": status, "created": f"2026-11-27 00:0{number}:00.103353",
                 "ready_at": f"2026-11-27 00:0{number}:09.465670" if ready else None, "filename": f"mlp{number}.onnx",
                 "sha": hashlib.sha256(model).hexdigest(), "size": len(model), "cal": True,
                 "options": json.dumps(OPTIONS), "inputs": json.dumps(IO[0]), "outputs": json.dumps(IO[1]),
                 "selected": selected, "provider": "cpu" if ready else None,
                 "report": json.dumps(OLD_REPORT) if ready else None})
            connection.execute(text(
                "INSERT INTO jobs (id, version_id, name, version, status, stage, progress, error, attempts, worker_id, "
                "runner_pid, created_at, started_at, finished_at, lease_expires_at) VALUES (:id, :vid, 'mlp', "
                ":version, :status, :stage, :progress, NULL, :attempts, :worker, :pid, :created, :started, :finished, "
                "NULL)"),
                {"id": QUEUED_JOB if not ready else f"{number:031x}j", "vid": version_id, "version": number,
                 "status": "succeeded" if ready else "queued", "stage": "benchmark" if ready else None,
                 "progress": 1.0 if ready else 0.0, "attempts": 1 if ready else 0,
                 "worker": "vm:8598:3f6f9bec" if ready else None, "pid": 8679 if ready else None,
                 "created": f"2026-11-27 00:0{number}:00.104477",
                 "started": f"2026-11-27 00:0{number}:01.360736" if ready else None,
                 "finished": f"2026-11-27 00:0{number}:09.465670" if ready else None})
            folder = data_dir / "artifacts" / "models" / "mlp" / str(number)
            folder.mkdir(parents=True)
            (folder / "original.onnx").write_bytes(model)
            (folder / "calibration.npz").write_bytes(samples)
            if ready:  # the old worker stored its fused model and the report beside the original
                (folder / "optimized.onnx").write_bytes(model)
                (folder / "report.json").write_text(json.dumps(OLD_REPORT, indent=2))
    engine.dispose()
    old = time.time() - FILES_AGE_S
    for path in (data_dir / "artifacts").rglob("*"):
        os.utime(path, (old, old))
    return written


def stored_files(data_dir: Path) -> set[str]:
    root = data_dir / "artifacts"
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def expected_logits(model: bytes, feed: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return session.run(None, {"features": feed})[0]


@pytest.fixture
def old_sqlite(data_dir: Path) -> dict[int, bytes]:
    data_dir.mkdir(parents=True)
    return write_old_data(data_dir, f"sqlite:///{data_dir / 'onnxforge.db'}", OLD_SQLITE_DDL)


def test_an_api_and_a_worker_starting_together_both_upgrade_the_old_database(old_sqlite, data_dir: Path) -> None:  # noqa: ANN001
    """`onnxforge serve --no-worker` and `onnxforge worker` started at once on the old SQLite database: both add the
    missing table and columns. Was: the second one's read-then-write transaction failed at once with "database is
    locked" (SQLite does not wait for a lock over a stale read), so one of the two processes died at start-up.

    The interleaving is forced: the worker's schema change starts (and has a chance to commit) between the API's read
    of the old schema and its first write."""
    url = f"sqlite:///{data_dir / 'onnxforge.db'}"
    api_db, worker_db = Database(url), Database(url)
    errors: list[BaseException] = []

    def worker_start() -> None:
        try:
            worker_db.create_schema()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    worker = threading.Thread(target=worker_start)

    @event.listens_for(api_db.engine, "before_cursor_execute")
    def _between_read_and_write(_conn, _cursor, statement: str, *_args: Any) -> None:  # noqa: ANN001, ANN401
        if statement.lstrip().upper().startswith(("CREATE TABLE", "ALTER TABLE")) and not worker.is_alive() \
                and worker.ident is None:
            worker.start()
            worker.join(2.0)  # done at once when nothing holds it back; else it waits for this transaction

    try:
        api_db.create_schema()
    except BaseException as exc:  # noqa: BLE001
        errors.append(exc)
    worker.join()
    assert worker.ident is not None, "the old database needed no change: the test no longer tests the upgrade"
    assert [str(e).splitlines()[0] for e in errors] == []
    columns = {c["name"] for c in inspect(api_db.engine).get_columns("model_versions")}
    assert {"serving", "pinned_at", "unrunnable"} <= columns
    assert "workers" in inspect(api_db.engine).get_table_names()
    with api_db.engine.connect() as connection:
        rows = connection.execute(text("SELECT version, status, selected FROM model_versions ORDER BY version")).all()
    assert [tuple(r) for r in rows] == [(1, "ready", "fused"), (2, "ready", "fused"), (3, "optimizing", None)]
    api_db.dispose()
    worker_db.dispose()


def check_old_data_serves(api, written: dict[int, bytes], data_dir: Path) -> None:  # noqa: ANN001 - conftest.Api
    """The current app on the old data: lists, serves each version's own model, returns the old reports as stored."""
    listed = api.client.get("/v1/models")
    assert listed.status_code == 200, listed.text
    assert [(m["name"], m["serving_version"], m["serving_variant"], m["latest_version"], m["latest_status"],
             m["versions"], m["pinned_version"]) for m in listed.json()] == [("mlp", 2, "optimized", 3, "queued", 3,
                                                                              None)]
    described = api.client.get("/v1/models/mlp").json()
    assert [(v["version"], v["status"], v["selected"], v["sha256"]) for v in described["versions"]] == [
        (n, "ready" if n < 3 else "optimizing", "fused" if n < 3 else None, hashlib.sha256(written[n]).hexdigest())
        for n in (1, 2, 3)]
    feed = np.random.default_rng(1).normal(size=(2, 64)).astype(np.float32)
    answer = api.predict("mlp", {"features": feed})
    assert answer.status_code == 200, answer.text
    assert (answer.json()["version"], answer.json()["variant"]) == (2, "optimized")
    np.testing.assert_allclose(answer.json()["outputs"]["logits"], expected_logits(written[2], feed), rtol=1e-5,
                               atol=1e-5)
    for number, variant in ((1, "optimized"), (2, "optimized"), (3, "original")):
        answer = api.predict("mlp", {"features": feed}, version=number)
        assert (answer.status_code, answer.json()["version"], answer.json()["variant"]) == (200, number, variant)
        np.testing.assert_allclose(answer.json()["outputs"]["logits"], expected_logits(written[number], feed),
                                   rtol=1e-5, atol=1e-5)
    for path in ("/v1/models/mlp/report", "/v1/models/mlp/versions/1/report"):
        report = api.client.get(path)
        assert report.status_code == 200, report.text
        assert report.json()["selected"] == "fused"
        assert report.json()["report"] == OLD_REPORT  # as stored: the dashboard reads the old fields it knows
    queued = api.client.get("/v1/models/mlp/versions/3/report")
    assert (queued.status_code, queued.json()["error"]) == (
        409, "model 'mlp' version 3 has no report yet: its optimization is queued")
    assert api.job(QUEUED_JOB)["status"] == "queued"
    artifact = api.client.get("/v1/models/mlp/versions/1/artifact", params={"variant": "optimized"})
    assert (artifact.status_code, artifact.content) == (200, written[1])


def test_the_current_release_serves_the_old_data_runs_its_queued_job_and_keeps_its_files(
        old_sqlite, data_dir: Path, serve: Callable[..., Any]) -> None:
    written = old_sqlite
    before = stored_files(data_dir)
    with serve(run_worker=False) as api:
        check_old_data_serves(api, written, data_dir)
        # a starting worker's orphan sweep: every old folder belongs to a live version and stays, a month old or not
        worker = Worker(Settings(**{**TEST_SETTINGS, "data_dir": data_dir, "run_worker": False}),
                        db=api.services.db, store=api.services.store)
        assert worker.sweep_orphaned_artifacts() == []
        assert stored_files(data_dir) == before
        # rollback works on rows written before pins existed
        assert api.client.put("/v1/models/mlp/serving", json={"version": 1}).json()["serving_version"] == 1
        assert api.predict("mlp", {"features": np.zeros((1, 64), np.float32)}).json()["version"] == 1
        assert api.client.delete("/v1/models/mlp/serving").status_code == 200

    with serve(run_worker=True) as api:  # the job the old release left queued runs now
        job = api.wait(QUEUED_JOB)
        assert (job["status"], job["error"]) == ("succeeded", None), job
        assert api.client.get("/v1/models/mlp").json()["serving_version"] == 3
        assert api.client.get("/v1/models/mlp/versions/1/report").json()["report"] == OLD_REPORT

    # ONNXFORGE_KEEP_VERSIONS set after the upgrade: the old versions beyond it go, files and all; the rest stays
    with serve(run_worker=False, keep_versions=2) as api:
        settings = Settings(**{**TEST_SETTINGS, "data_dir": data_dir, "run_worker": False, "keep_versions": 2})
        worker = Worker(settings, db=api.services.db, store=api.services.store)
        assert {name: [n for _, n in gone] for name, gone in worker.retire_old_versions().items()} == {"mlp": [1]}
        assert worker.sweep_orphaned_artifacts() == []
        assert not any(f.startswith("models/mlp/1/") for f in stored_files(data_dir))
        assert {f for f in before if not f.startswith("models/mlp/1/")} <= stored_files(data_dir)
        assert [v["version"] for v in api.client.get("/v1/models/mlp").json()["versions"]] == [2, 3]
        assert api.client.get("/v1/models/mlp/versions/2/report").json()["report"] == OLD_REPORT


@pytest.fixture
def old_postgres(data_dir: Path, new_database: Callable[[], str]) -> Iterator[tuple[str, dict[int, bytes]]]:
    url = new_database()
    data_dir.mkdir(parents=True)
    yield url, write_old_data(data_dir, url.replace("postgresql://", "postgresql+psycopg://", 1), OLD_POSTGRES_DDL)


def test_the_old_postgresql_database_is_upgraded_by_replicas_starting_together(
        old_postgres, data_dir: Path, serve: Callable[..., Any]) -> None:
    url, written = old_postgres
    databases = [Database(url) for _ in range(3)]
    errors: list[BaseException] = []

    def start(db: Database) -> None:
        try:
            db.create_schema()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(db,)) for db in databases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [str(e).splitlines()[0] for e in errors] == []
    for db in databases:
        db.dispose()
    before = stored_files(data_dir)
    with serve(run_worker=False, database_url=url) as api:
        check_old_data_serves(api, written, data_dir)
        worker = Worker(Settings(**{**TEST_SETTINGS, "data_dir": data_dir, "run_worker": False, "database_url": url}),
                        db=api.services.db, store=api.services.store)
        assert worker.sweep_orphaned_artifacts() == []
        assert stored_files(data_dir) == before
