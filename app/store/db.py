"""Engine and transactions for SQLite and PostgreSQL through one SQLAlchemy code path.

SQLite needs two things to be safe with an API process and worker processes writing at once: WAL
(readers never block writers) and `BEGIN IMMEDIATE` for write transactions, so that a transaction
that reads then writes takes the write lock up front and waits for it (busy_timeout) instead of
failing with "database is locked" halfway through.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Connection, create_engine, event, inspect, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from app.store.tables import ADDED_COLUMNS, Base

_SQLITE_BUSY_TIMEOUT_MS = 30_000
_SCHEMA_LOCK_KEY = 0x6F6E6E78  # "onnx": any fixed number the app alone uses


_CONNECT_TIMEOUT_S = 5


def _sqlite_engine(url: str) -> Engine:
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": _SQLITE_BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # noqa: ANN001 - DB-API connection
        # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin (see _on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:  # noqa: ANN001
        mode = connection.get_execution_options().get("sqlite_begin", "")
        connection.exec_driver_sql(f"BEGIN {mode}".strip())

    return engine


def normalize_url(url: str) -> str:
    """`postgresql://` means psycopg 3 (the `postgres` extra), not SQLAlchemy's default psycopg2.

    Users copy URLs from their PostgreSQL provider as `postgresql://...` (or the older `postgres://`);
    SQLAlchemy would load psycopg2 for those, which we do not install.
    """
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme):]
    return url


class Database:
    """Owns the engine; hands out short read and write transactions."""

    def __init__(self, url: str) -> None:
        url = normalize_url(url)
        self.url = url
        self.is_sqlite = make_url(url).get_backend_name() == "sqlite"
        if self.is_sqlite:
            self.engine = _sqlite_engine(url)
            write_engine = self.engine.execution_options(sqlite_begin="IMMEDIATE")
        else:
            # WHY a connect timeout: a network split makes connecting hang (not fail) for the OS's timeout, minutes,
            # and /readyz, uploads and a first lookup with it; a URL's own connect_timeout still wins.
            parsed = make_url(url)
            timeout = {} if parsed.get_backend_name() != "postgresql" or "connect_timeout" in parsed.query \
                else {"connect_timeout": _CONNECT_TIMEOUT_S}
            self.engine = create_engine(url, pool_pre_ping=True, connect_args=timeout)
            write_engine = self.engine
        self._write_engine = write_engine
        self._reader = sessionmaker(self.engine, expire_on_commit=False)
        self._writer = sessionmaker(write_engine, expire_on_commit=False)

    def create_schema(self) -> None:
        """Create missing tables. On PostgreSQL, replicas and workers starting at once would race on
        CREATE TABLE (one fails on a duplicate type), so they take turns under an advisory lock.
        A database made by an older release gets the columns added since (ADDED_COLUMNS).

        On SQLite the transaction takes the write lock up front (BEGIN IMMEDIATE): an API and a worker started
        together on an older (or new) database both read the schema, then both write it; the second one's deferred
        transaction cannot take the lock over a stale read and failed at once with "database is locked" (no busy
        wait), so one of them died at start-up. Queued behind the lock, it reads the schema the first one wrote."""
        with self._write_engine.begin() as connection:
            if not self.is_sqlite:
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
            Base.metadata.create_all(connection)
            _add_missing_columns(connection)

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reads; objects stay usable after it closes."""
        with self._reader() as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A session in one transaction, committed on exit, rolled back on an exception."""
        with self._writer() as session, session.begin():
            yield session

    def ping(self) -> None:
        """Raise if the database does not answer (readiness)."""
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()


def _add_missing_columns(connection: Connection) -> None:
    """ALTER TABLE ... ADD COLUMN for each added column an older database lacks (nullable: no backfill)."""
    inspector = inspect(connection)
    for table_name, column_name in ADDED_COLUMNS:
        if column_name in {c["name"] for c in inspector.get_columns(table_name)}:
            continue
        column = Base.metadata.tables[table_name].c[column_name]
        kind = column.type.compile(dialect=connection.dialect)
        connection.execute(text(f'ALTER TABLE {table_name} ADD COLUMN "{column_name}" {kind}'))
