"""The `onnxforge` command (console entry point `app.cli:main`): the outermost layer, nothing imports it.

Subcommands: `serve` (the API, with its worker unless --no-worker) and `worker` (a worker alone).
Each subcommand is a `_add_<name>(subparsers)` that registers its arguments and its handler; the
handlers import what they need, so `onnxforge --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _settings(args: argparse.Namespace, **extra: Any):  # noqa: ANN202, ANN401 - app.settings.Settings
    """Settings from the environment (ONNXFORGE_*), overridden by the options given on the command line."""
    from app.settings import Settings

    overrides = {key: getattr(args, key) for key in ("data_dir", "database_url", "log_level", "providers")
                 if getattr(args, key, None) is not None}
    overrides.update({k: v for k, v in extra.items() if v is not None})
    return Settings(**overrides)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, help="artifacts and the SQLite database (ONNXFORGE_DATA_DIR; ./data)")
    parser.add_argument("--database-url", help="SQLAlchemy URL (ONNXFORGE_DATABASE_URL; SQLite in the data dir)")
    parser.add_argument("--providers", choices=["auto", "cpu", "cuda"], help="execution provider (ONNXFORGE_PROVIDERS)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


# -- serve ----------------------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from app.main import create_app

    settings = _settings(args, host=args.host, port=args.port, run_worker=False if args.no_worker else None)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        proxy_headers=True,
        timeout_graceful_shutdown=30,  # finish in-flight requests on SIGTERM before the lifespan shuts down
    )
    return 0


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="run the service (API and, by default, its worker)",
                                   description="Run the HTTP service: /v1 API, /docs, /healthz, /readyz, /metrics.")
    parser.add_argument("--host", help="address to bind (ONNXFORGE_HOST; 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (ONNXFORGE_PORT; 8000)")
    parser.add_argument("--no-worker", action="store_true",
                        help="do not start a worker process (run `onnxforge worker` elsewhere)")
    _add_common(parser)
    parser.set_defaults(handler=_serve)


# -- worker ---------------------------------------------------------------------------------------------


def _worker(args: argparse.Namespace) -> int:
    from app.worker.loop import run_worker

    run_worker(_settings(args))
    return 0


def _add_worker(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("worker", help="run a worker alone (claims optimization jobs from the database)",
                                   description="Run one worker process against the service's database and storage.")
    _add_common(parser)
    parser.set_defaults(handler=_worker)


# -- entry point ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnxforge", description="Optimize ONNX models and serve them.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(subparsers)
    _add_worker(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
