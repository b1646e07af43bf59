"""The `onnxforge` command (console entry point `app.cli:main`): the outermost layer, nothing imports it.

Subcommands: `optimize`, `inspect` and `bench` drive the optimizer library on files; `serve` (the API,
with its worker unless --no-worker) and `worker` (a worker alone) run the service.
Each subcommand is a `_add_<name>(subparsers)` that registers its arguments and its handler; the
handlers import what they need, so `onnxforge --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from optimizer import __version__


def _overrides(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:  # noqa: ANN401
    """The settings given on the command line (the common options and `extra`), over the environment's."""
    overrides = {key: getattr(args, key) for key in ("data_dir", "database_url", "log_level", "providers")
                 if getattr(args, key, None) is not None}
    overrides.update({k: v for k, v in extra.items() if v is not None})
    return overrides


class StartupError(Exception):
    """A setting the service cannot start with: `main` prints it as one `error:` line (exit 2), not a traceback."""


def _setting_name(field: str, given: dict[str, Any]) -> str:
    """How the user set `field`: the command-line option when one was given, else the environment variable."""
    return f"--{field.replace('_', '-')}" if field in given else f"ONNXFORGE_{field.upper()}"


def _service_settings(args: argparse.Namespace, *, api: bool, **extra: Any):  # noqa: ANN202, ANN401 - Settings
    """Settings from the environment (ONNXFORGE_*), overridden by the command line's options, checked before
    anything starts: values out of range, API keys, the database URL, its driver and the database answering, the
    artifact store, and (`api`) the host and port to listen on.
    Each would otherwise surface as a traceback (or, with --workers N, as N API processes dying over and over)."""
    from pydantic import ValidationError
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    from app.settings import Settings
    from app.storage import open_store
    from app.storage.s3 import StorageConfigError
    from app.store import Database
    from optimizer.errors import first_line

    given = _overrides(args, **extra)
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "settings"
            shown = "" if field == "api_keys" else f" (got {error.get('input')!r})"  # never echo a key
            message = error["msg"].removeprefix("Value error, ")  # pydantic's prefix for our validators' words
            problems.append(f"{_setting_name(field, given)}: {message}{shown}")
        raise StartupError("; ".join(problems)) from None
    if settings.providers == "cuda":  # asked for by name: CUDA or nothing, as Triton does (auto falls back to CPU)
        from optimizer.runtime import cuda_unavailable_reason

        reason = cuda_unavailable_reason()
        if reason is not None:
            raise StartupError(f"{_setting_name('providers', given)}=cuda cannot be met: {reason}; or set it to auto "
                               "(CUDA where it works, else CPU) or cpu")
    if api:
        from app.security import ApiKeyConfigError, load_api_keys

        try:
            load_api_keys(settings.api_keys.get_secret_value(), settings.api_keys_file)
        except ApiKeyConfigError as exc:
            raise StartupError(str(exc)) from None
    try:
        open_store(settings)  # the local folder is created here, as the service would
        database = Database(settings.resolved_database_url)  # parses the URL, loads its driver
    except StorageConfigError as exc:
        raise StartupError(str(exc)) from None
    except (ArgumentError, ImportError) as exc:
        raise StartupError(f"{_setting_name('database_url', given)}: cannot use this database URL "
                           f"({type(exc).__name__}: {exc}); e.g. postgresql://user:password@host:5432/db (the "
                           "postgres extra) or sqlite:///path/onnxforge.db") from None
    except OSError as exc:
        raise StartupError(f"{_setting_name('data_dir', given)}: cannot create {exc.filename} "
                           f"({exc.strerror})") from None
    try:
        database.ping()  # a wrong host, user or password: said now, not as a traceback from the lifespan
    except SQLAlchemyError as exc:
        raise StartupError(f"{_setting_name('database_url', given)}: cannot reach the database "
                           f"{database.engine.url.render_as_string(hide_password=True)}: {first_line(exc)}") from None
    finally:
        database.dispose()
    problem = _unbindable(settings.host, settings.port, given) if api else None  # last: the other checks need no port
    if problem is not None:
        raise StartupError(problem)
    return settings, given


def _unbindable(host: str, port: int, given: dict[str, Any]) -> str | None:
    """Why `serve` could not listen on host:port, None when it can: bound once here as uvicorn binds it (its family
    from the host, SO_REUSEADDR) and closed. WHY: uvicorn fails after the app started, in five log lines and exit 3
    (ONNXFORGE_HOST=999.1.1.1 was "[Errno -2] Name or service not known")."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except (socket.gaierror, UnicodeError) as exc:
        return (f"{_setting_name('host', given)}={host!r} is not an IP address nor a name that resolves here "
                f"({getattr(exc, 'strerror', None) or exc}); e.g. 127.0.0.1, 0.0.0.0 (every interface) or localhost")
    except OSError as exc:
        if exc.errno == errno.EADDRNOTAVAIL:
            return (f"{_setting_name('host', given)}={host!r} is not an address of this machine ({exc.strerror}); "
                    "e.g. 127.0.0.1, 0.0.0.0 (every interface) or one of its own addresses")
        if exc.errno == errno.EADDRINUSE:
            return (f"{_setting_name('port', given)}={port}: the port is already in use on {host} (another server?); "
                    "stop it or choose another port")
        return f"cannot listen on {host}:{port} ({exc.strerror}); check {_setting_name('host', given)} and " \
               f"{_setting_name('port', given)}"
    return None


def _start_logging(settings) -> None:  # noqa: ANN001 - app.settings.Settings, imported late
    """The service's log format and level, then one warning per ONNXFORGE_* variable no setting reads (a misspelt
    one was silently ignored). Here, in the command's own process: API processes and the worker it starts do not
    warn again."""
    import logging
    import os

    from app.settings import unknown_variables

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for warning in unknown_variables(os.environ):
        logging.getLogger("onnxforge").warning("%s", warning)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, help="artifacts and the SQLite database (ONNXFORGE_DATA_DIR; ./data)")
    parser.add_argument("--database-url", help="SQLAlchemy URL (ONNXFORGE_DATABASE_URL; SQLite in the data dir)")
    parser.add_argument("--providers", choices=["auto", "cpu", "cuda"], help="execution provider (ONNXFORGE_PROVIDERS)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


# -- serve ----------------------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.prefork import UVICORN_OPTIONS

    settings, overrides = _service_settings(args, api=True, host=args.host, port=args.port,
                                            run_worker=False if args.no_worker else None, workers=args.workers)
    _start_logging(settings)
    if settings.workers > 1:
        from app.prefork import serve_processes

        return serve_processes(settings, overrides)
    from app.main import create_app

    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        **UVICORN_OPTIONS,
    )
    return 0


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="run the service (API and, by default, its worker)",
                                   description="Run the HTTP service: /v1 API, /docs, /healthz, /readyz, /metrics.")
    parser.add_argument("--host", help="address to bind (ONNXFORGE_HOST; 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (ONNXFORGE_PORT; 8000)")
    parser.add_argument("--no-worker", action="store_true",
                        help="do not start a worker process (run `onnxforge worker` elsewhere)")
    parser.add_argument("--workers", type=int,
                        help="API processes on the one port (ONNXFORGE_WORKERS; 1), each with its own sessions "
                             "and batcher; the optimizer worker stays one")
    _add_common(parser)
    parser.set_defaults(handler=_serve)


# -- worker ---------------------------------------------------------------------------------------------


def _worker(args: argparse.Namespace) -> int:
    from app.worker.loop import run_worker

    settings = _service_settings(args, api=False)[0]
    _start_logging(settings)
    run_worker(settings)
    return 0


def _add_worker(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("worker", help="run a worker alone (claims optimization jobs from the database)",
                                   description="Run one worker process against the service's database and storage.")
    _add_common(parser)
    parser.set_defaults(handler=_worker)


# -- optimize / inspect / bench: the optimizer library from the shell ------------------------------------


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _number(kind: type, ok: Callable[[float], bool], what: str):  # noqa: ANN202 - an argparse `type`
    """An argparse `type` that refuses what `ok` rejects (NaN fails every comparison) with a usage error
    naming the option (exit 2), not a traceback from deep inside the library."""
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    return parse


_POSITIVE_INT = _number(int, lambda v: v >= 1, "a whole number >= 1")
_COUNT = _number(int, lambda v: v >= 0, "a whole number >= 0")
_SECONDS = _number(float, lambda v: 0 < v < float("inf"), "a number of seconds > 0")


@contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """Only errors from the libraries' logging while the command runs (ONNX Runtime's quantization advice is
    routed away in any case: optimizer.quiet)."""
    import logging

    root = logging.getLogger()
    before = root.level
    if enabled:
        root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(before)


def _upload_options(args: argparse.Namespace) -> dict[str, Any]:
    """The --int8-mode, --min-cosine, --min-top1 and --metrics given, read by the HTTP upload's own parser (same
    rules and messages); the ones not given keep the optimizer's defaults. ValueError names the option to fix.
    So static --int8-mode without --calibration is refused, as the upload refuses it, whatever the precision
    (auto used to ignore it silently)."""
    from app.errors import BadRequestError
    from app.services.uploads import parse_options

    chosen = {}
    for key in ("int8_mode", "min_cosine", "min_top1", "metrics"):
        text = getattr(args, key)
        if text is None:
            continue
        try:
            value = getattr(parse_options({key: text}, has_calibration=args.calibration is not None), key)
        except BadRequestError as exc:
            raise ValueError(f"--{key.replace('_', '-')}: {exc}") from None
        if value is not None:
            chosen[key] = value
    return chosen


def _missing_folders(path: Path) -> list[Path]:
    """The folders `path.mkdir(parents=True)` would create, deepest first."""
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    return missing


def _write_input_bytes(model: Path, written: Path, loaded) -> None:  # noqa: ANN001 - optimizer.LoadedModel
    """When the original was kept, out/model.onnx is the input file's own bytes, as the service serves the uploaded
    file: the optimizer writes the model it loaded (shapes inference added), a different file than the one given.
    Not when loading had to change it (IR version lowered) or its weights lie in external data files (the written
    file holds them, the input's bytes would point at files that are not in --out)."""
    if loaded.ir_version == loaded.original_ir_version and not loaded.external_bytes:
        tmp = written.with_name(f".{written.name}.tmp")
        tmp.write_bytes(model.read_bytes())
        tmp.replace(written)


def _optimize(args: argparse.Namespace) -> int:
    import json

    from optimizer import load_model
    from optimizer.pipeline import BASELINE, OptimizeConfig, optimize
    from optimizer.quiet import route_ort_warnings
    from optimizer.report_table import summary

    route_ort_warnings()  # ORT's quantization advice ("WARNING:root:Please use QuantFormat.QDQ ...") is not ours

    try:
        options = _upload_options(args)
    except ValueError as exc:
        return _fail(str(exc))
    created = _missing_folders(args.out)
    try:
        args.out.mkdir(parents=True, exist_ok=True)  # here, before minutes of work, not after
    except OSError as exc:
        return _fail(f"--out {args.out}: cannot make the output folder there ({exc.strerror}); name a folder")
    config = OptimizeConfig(precision=args.precision, calibration_method=args.calibration_method,
                            provider=args.provider, time_budget_s=args.time_budget, **options)
    done = False
    try:
        with _quiet(args.quiet):
            loaded = load_model(args.model)
            result = optimize(loaded, out_dir=args.out, config=config, calibration=args.calibration,
                              progress=None if args.quiet else lambda stage, f: print(f"[{f:4.0%}] {stage}",
                                                                                        file=sys.stderr))
            if result.selected == BASELINE:
                _write_input_bytes(args.model, result.model_path, loaded)
        done = True
    finally:
        if not done:  # a refused model or samples, or Ctrl-C: no empty folder of ours stays behind
            for folder in created:
                try:
                    folder.rmdir()  # empty folders only: never one that existed, nor one holding anything
                except OSError:
                    break
    if args.json:
        print(json.dumps(result.report, indent=2))
    else:
        # One fact once: the variant table (every variant's numbers and why it lost) and, for auto, what the
        # search did besides; auto's own candidate table would repeat every row.
        print(summary(result.report))
        if "auto" in result.report:
            from optimizer.auto import search_notes

            print("\n" + "\n".join(search_notes(result.report["auto"])))
        print(f"\nwrote {result.model_path} and {Path(args.out) / 'report.json'}")
    return 0


def _add_optimize(subparsers: argparse._SubParsersAction) -> None:
    from optimizer.pipeline import CALIBRATION_METHODS, INT8_MODES, PRECISIONS

    parser = subparsers.add_parser("optimize", help="optimize a model file and write model.onnx + report.json",
                                   description="Fuse, quantize, check accuracy and time every variant; write the "
                                               "one to serve as DIR/model.onnx and the evidence as DIR/report.json.")
    parser.add_argument("model", type=Path, help="the .onnx file")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--calibration", type=Path, help=".npz with one array per model input")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument("--int8-mode", choices=INT8_MODES, help="default: static with --calibration, else dynamic")
    parser.add_argument("--calibration-method", choices=CALIBRATION_METHODS, default="minmax")
    parser.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--time-budget", type=_SECONDS, default=300.0,
                        help="seconds the optimizer aims at (default 300): building and searching variants stop at "
                             "70%% of it, the final side-by-side timing of the variants that passed fills the rest "
                             "but runs at least 20 times each, so a large model can take longer in all")
    parser.add_argument("--min-cosine", metavar="X",
                        help="accuracy tolerance: lowest cosine similarity to the original's outputs on held-back "
                             "samples, 0-1 (default 0.99)")
    parser.add_argument("--min-top1", metavar="X",
                        help="accuracy tolerance: lowest top-1 agreement with the original, 0-1 (default 0.99)")
    parser.add_argument("--metrics", metavar="JSON",
                        help='the metric that gates an output, as JSON: output name -> "default" | "cosine" | '
                             '"top1" | "exact" (string/bool outputs) | "mask:<threshold>", e.g. '
                             '\'{"maps": "mask:0.3"}\'; "cosine" turns off the top-1 gate guessed for a [batch, N] '
                             'output that is not class scores')
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument("--quiet", action="store_true", help="no progress lines or library warnings on stderr "
                                                            "(errors still)")
    parser.set_defaults(handler=_optimize)


def _inspect(args: argparse.Namespace) -> int:
    import json

    from optimizer import load_model
    from optimizer.graph_inspect import inspect

    report = inspect(load_model(args.model).proto).to_dict()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.model}: {report['node_count']} nodes, {report['parameter_count']:,} parameters "
          f"({report['parameter_bytes'] / 1024:.1f} KiB), IR {report['ir_version']}, opsets {report['opsets']}")
    for kind in ("inputs", "outputs"):
        for t in report[kind]:
            print(f"  {kind[:-1]:6} {t['name']}: {t['dtype']} {t['shape']}")
    print("ops: " + ", ".join(f"{op} {n}" for op, n in report["op_histogram"].items()))
    if report["fused"]:
        print("already fused: " + ", ".join(f"{op} {n}" for op, n in report["fused"].items()))
    for chain in report["fusable"]:
        print(f"fusable: {chain['pattern']} x{chain['count']}")
    for finding in report["redundant"]:
        print(f"redundant: {finding['op']} {', '.join(finding['nodes'])}: {finding['reason']}")
    return 0


def _add_inspect(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("inspect", help="what a model holds: ops, parameters, redundant nodes, fusions",
                                   description="Validate a model and print what one would look for in Netron.")
    parser.add_argument("model", type=Path)
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=_inspect)


def _short_names(paths: Sequence[Path]) -> list[str]:
    """Each model's file name, with as many parent folders as it takes to tell the models apart (ocr_det.onnx;
    fp32/model.onnx and int8/model.onnx): cutting full paths to a width left "ache/onnxforge-bench/models/ocr_d"."""
    def tail(path: Path, depth: int) -> tuple[str, ...]:
        return path.parts[-depth:]

    names = []
    for i, path in enumerate(paths):
        others = [p for j, p in enumerate(paths) if j != i]
        depth = next((d for d in range(1, len(path.parts) + 1) if all(tail(p, d) != tail(path, d) for p in others)),
                     None)
        names.append(str(Path(*tail(path, depth))) if depth else f"{path} ({i + 1})")  # None: given twice
    return names


def _bench(args: argparse.Namespace) -> int:

    from optimizer import load_model
    from optimizer.calibration import read_samples, synthetic_samples
    from optimizer.latency import AA_CONTROL, measure_batches, paired_ratio
    from optimizer.runtime import SessionSettings, resolve_provider

    first = load_model(args.models[0]).proto
    # one sample is all the timing needs: nothing is held back, there is no accuracy check here
    samples = read_samples(args.inputs, first) if args.inputs else synthetic_samples(first, count=1)
    feed = (samples.calibration or samples.holdout)[0]
    settings = SessionSettings(provider=resolve_provider(args.provider), intra_op_threads=args.threads)
    models = {name: path for name, path in zip(_short_names(args.models), args.models, strict=True)}
    first_name = next(iter(models))
    results = measure_batches(models, feed, settings, batch_sizes=tuple(args.batch), target_seconds=args.seconds,
                              aa_control=True)
    width = max(40, *map(len, models))
    # One speed-up per pair, the paired one below each batch's rows: a ratio of the two p50s printed beside it
    # ("vs first") was a second, different figure for the same pair (0.98x next to 1.00x [1.00-1.01]).
    print(f"{'model':{width}} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'per s':>9}")
    for batch, stats in results.items():
        control = stats.pop(AA_CONTROL)
        for name, s in stats.items():
            print(f"{name:{width}} {batch:5d} {s.p50_ms:9.3f} {s.p90_ms:9.3f} {s.p99_ms:9.3f} "
                  f"{s.throughput_per_s:9.1f}")
        # the noise of this very run: the first model timed again as a second session; ratios round by round
        first_stats = stats[first_name]
        paired = [(name, paired_ratio(first_stats, s)) for name, s in [(AA_CONTROL, control), *list(stats.items())[1:]]]
        print(f"batch {batch} round-by-round speed-up over the first model, median [95%]: "
              + "; ".join(f"{name} {r.median:.2f}x [{r.low:.2f}-{r.high:.2f}]" for name, r in paired)
              + " (A/A control: the first model again, as a second session; a gain inside its spread is noise)")
    print(f"provider {next(iter(next(iter(results.values())).values())).provider}; models timed interleaved, "
          "spinning off; speed-up = the first model's time / this model's, in the same round")
    return 0


def _add_bench(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="time models side by side (interleaved, same inputs)",
                                   description="Time several models on the same inputs, interleaved so that the "
                                               "ratios hold on a noisy machine.")
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--inputs", type=Path, help=".npz with one array per input (default: generated inputs)")
    parser.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=_COUNT, default=0, help="intra-op threads (0: ONNX Runtime's default)")
    parser.add_argument("--batch", type=_POSITIVE_INT, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    parser.add_argument("--seconds", type=_SECONDS, default=2.0, help="timing per batch size")
    parser.set_defaults(handler=_bench)


# -- entry point ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnxforge", description="Optimize ONNX models and serve them.")
    parser.add_argument("--version", action="version", version=f"onnxforge {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_optimize(subparsers)
    _add_inspect(subparsers)
    _add_bench(subparsers)
    _add_serve(subparsers)
    _add_worker(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a subcommand. The one place its failures become an `error:` line (exit 2): the user's model or samples
    refused (OptimizerError), or ONNX Runtime failing on them, explained as for a job (optimizer.errors.explain);
    a setting `serve` or `worker` cannot start with (StartupError); anything else is a bug and keeps its traceback."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except StartupError as exc:
        return _fail(str(exc))
    except Exception as exc:
        from optimizer.errors import explain

        option = "--calibration" if args.command == "optimize" else "--inputs"
        message = explain(exc, generated_inputs=getattr(args, option[2:], None) is None,
                          how_to_calibrate=f"pass real inputs with {option} samples.npz (one array per model input)")
        if message is None:
            raise
        return _fail(message)


if __name__ == "__main__":
    sys.exit(main())
