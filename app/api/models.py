"""/v1/models: upload, list, describe, delete, report, artifact download and predict (JSON)."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import parse_qsl, quote

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from app.api.deps import services_of
from app.api.multipart import receive_form
from app.api.schemas import (
    ErrorOut,
    ModelOut,
    ModelSummary,
    PredictIn,
    PredictOut,
    ServingOut,
    ServingPinIn,
    TensorOut,
    UploadAccepted,
    VersionOut,
)
from app.errors import BadRequestError, MalformedRequestError, NotFoundError
from app.protocol.json_tokens import loads_with_nan_tokens
from app.services.container import Services
from app.services.registry import pick_serving, pinned_version, serving_variant
from app.services.uploads import validate_upload
from optimizer import threads as fewer_threads

router = APIRouter(prefix="/v1/models", tags=["models"])
# One info line per change an operator may be asked about (uploads, deletes, pins): request lines are debug only
# (app/settings.py, access_log), so without these ~250 uploads and a 16-version delete left nothing in the log.
log = logging.getLogger("onnxforge.api")

_ERRORS = {code: {"model": ErrorOut} for code in (400, 404, 409, 413, 415, 422, 503)}
_BATCH_FIELDS = {"batch_max_size": (int, 1, 1024), "batch_max_delay_ms": (float, 0.0, 1000.0)}
_TEXT_FIELDS = {"name", "precision", "int8_mode", "calibration_method", "min_cosine", "min_top1", "metrics",
                *_BATCH_FIELDS}
_UPLOAD_FORM = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {
        "type": "object",
        "required": ["file"],
        "properties": {
            "file": {"type": "string", "format": "binary", "description": "the ONNX model (.onnx)"},
            "calibration": {"type": "string", "format": "binary",
                            "description": ".npz with one array per model input (samples along axis 0)"},
            "name": {"type": "string", "description": "default: from the file name"},
            "precision": {"type": "string", "enum": ["auto", "fp32", "fp16", "int8"], "default": "auto"},
            "int8_mode": {"type": "string", "enum": ["static", "dynamic"],
                          "description": "default: static with a calibration set, else dynamic"},
            "calibration_method": {"type": "string", "enum": ["minmax", "entropy", "percentile"],
                                   "default": "minmax"},
            "min_cosine": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.99,
                           "description": "accuracy tolerance: least cosine similarity of every output"},
            "min_top1": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.99,
                         "description": "accuracy tolerance: least top-1 agreement of classifier outputs"},
            "metrics": {"type": "string", "description": 'JSON object: output name -> the metric that gates it '
                                                         '("default" | "cosine" | "top1" | "exact" | '
                                                         '"mask:<threshold>"), '
                                                         'e.g. {"maps": "mask:0.3"}; "cosine" turns off the top-1 '
                                                         'gate guessed for a [batch, N] output that is not class '
                                                         'scores; other outputs keep the default'},
            "batch_max_size": {"type": "integer", "minimum": 1, "maximum": 1024,
                               "description": "dynamic batching for this model: most rows per run, 1 = off "
                                              "(default ONNXFORGE_BATCH_MAX_SIZE)"},
            "batch_max_delay_ms": {"type": "number", "minimum": 0, "maximum": 1000,
                                   "description": "dynamic batching for this model: how long an idle model waits "
                                                  "for more requests (default ONNXFORGE_BATCH_MAX_DELAY_MS)"},
        },
    }}},
}


def _batching(fields: dict[str, str]) -> dict[str, int | float]:
    """The upload's own batching settings (only those given), checked before anything is stored."""
    settings: dict[str, int | float] = {}
    for key, (kind, low, high) in _BATCH_FIELDS.items():
        text = fields.get(key, "").strip()
        if not text:
            continue
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:  # NaN fails both comparisons
            raise BadRequestError(f"{key} must be {'an integer' if kind is int else 'a number'} from {low:g} to "
                                  f"{high:g}, got {text!r}")
        settings[key] = value
    return settings


def _version_number(text: str, name: str) -> int:
    # ASCII digits only ('¹'.isdigit() is True, int('¹') fails) and a size the database can hold.
    if not (text.isascii() and text.isdigit() and len(text) <= 18):
        raise NotFoundError(f"model {name!r} has no version {text!r}: versions are numbers")
    return int(text)


# -- upload and registry ------------------------------------------------------------------------------


@router.post("", status_code=202, response_model=UploadAccepted, responses={**_ERRORS, 504: {"model": ErrorOut}},
             openapi_extra={"requestBody": _UPLOAD_FORM})
async def upload_model(request: Request, services: Services = Depends(services_of)) -> JSONResponse:
    """Upload a model (and optionally calibration samples); it is validated now and optimized in the background.

    A validation that runs past the service's time limit is stopped: 504.

    Uploading an existing name adds a version; the current one keeps serving until the new one is ready.
    """
    settings = services.settings
    form = await receive_form(
        request.headers, request.stream(), settings.uploads_dir,
        {"file": (settings.max_model_bytes, "ONNXFORGE_MAX_MODEL_BYTES"),
         "calibration": (settings.max_calibration_bytes, "ONNXFORGE_MAX_CALIBRATION_BYTES")},
        _TEXT_FIELDS,
    )
    try:
        model = form.files.get("file")
        if model is None:
            raise MalformedRequestError("the form has no `file` field: send the model as e.g. -F file=@model.onnx")
        calibration = form.files.get("calibration")
        if calibration is not None and calibration.size == 0 and not calibration.filename:
            calibration = None  # a form's empty file input
        batching = _batching(form.fields)
        validated = await run_in_threadpool(
            validate_upload, model.path, model.filename, calibration.path if calibration else None, form.fields,
            services.validations, settings.max_input_elements,
        )
        accepted = await run_in_threadpool(services.registry.accept, validated, batching)
        removed = await run_in_threadpool(_retire_old, services, accepted.name)
        log.info("upload accepted: model %r version %d, %d bytes, %s, precision %s; job %s", accepted.name,
                 accepted.version, validated.size_bytes,
                 f"calibration {calibration.size} bytes" if calibration else "no calibration",
                 validated.options.precision, accepted.job_id)
    finally:
        form.cleanup()
    services.predict.invalidate(accepted.name)
    status_url = f"{request.scope.get('root_path', '')}/v1/jobs/{accepted.job_id}"
    body = UploadAccepted(name=accepted.name, version=accepted.version, job_id=accepted.job_id, status_url=status_url,
                          warnings=accepted.warnings, removed_versions=removed)
    return JSONResponse(body.model_dump(), status_code=202, headers={"Location": status_url})


def _retire_old(services: Services, name: str) -> list[int]:
    """Apply ONNXFORGE_KEEP_VERSIONS to `name` after an upload; the version numbers deleted. The upload is accepted
    whatever happens here: a database failure now leaves the old versions to the next upload (or worker start)."""
    try:
        retired = services.registry.retire_old(name, services.settings.keep_versions)
    except SQLAlchemyError as exc:
        log.warning("model %r: old versions not deleted (ONNXFORGE_KEEP_VERSIONS) as the database failed: %s", name,
                    str(exc).splitlines()[0])
        return []
    if retired:
        services.predict.forget([row_id for row_id, _ in retired])
        log.info("model %r: deleted versions %s (ONNXFORGE_KEEP_VERSIONS=%d)", name,
                 ", ".join(str(number) for _, number in retired), services.settings.keep_versions)
    return [number for _, number in retired]


LIST_CAP = 1000  # models in one answer of GET /v1/models; more: follow its Link rel="next"


@router.get("", response_model=list[ModelSummary], responses={400: {"model": ErrorOut}})
def list_models(request: Request, response: Response, limit: int | None = None, after: str | None = None,
                services: Services = Depends(services_of)) -> list[ModelSummary]:
    """Models in name order, at most `limit` (1 to 1000, default 1000) after the name `after`. When more follow,
    the answer's `Link` header has the URL of the next page (rel="next"), as its `X-Next-After` header the name to
    pass as `after`."""
    if limit is None:
        limit = LIST_CAP  # (read here, not as the parameter's default, so a test can make pages small)
    if not 1 <= limit <= LIST_CAP:
        raise BadRequestError(f"limit must be from 1 to {LIST_CAP}, got {limit}")
    summaries = []
    models, more = services.registry.names(after, limit)
    if more:
        last = next(reversed(models))
        following = request.url.include_query_params(after=last, limit=limit)
        response.headers["Link"] = f'<{following.path}?{following.query}>; rel="next"'
        response.headers["X-Next-After"] = quote(last, safe="")
    jobs = services.registry.jobs_of([versions[-1].id for versions in models.values()])
    for name, versions in models.items():
        serving, latest = pick_serving(versions), versions[-1]
        job = jobs.get(latest.id)
        queued = latest.status == "optimizing" and job is not None and job.status == "queued"
        summaries.append(ModelSummary(
            name=name, serving_version=serving.version if serving else None, pinned_version=pinned_version(versions),
            serving_variant=serving_variant(serving, None) if serving else None,
            latest_version=latest.version, latest_status="queued" if queued else latest.status,
            versions=len(versions),
        ))
    return summaries


@router.get("/{name}", response_model=ModelOut, responses=_ERRORS)
def describe_model(name: str, services: Services = Depends(services_of)) -> ModelOut:
    """Versions with their status and jobs, which one serves, its inputs and outputs, and the provider."""
    versions = services.registry.versions(name)
    jobs = services.registry.jobs_of([v.id for v in versions])
    serving = pick_serving(versions)
    variant = serving_variant(serving, None) if serving else None
    described = serving or versions[-1]
    loaded = services.sessions.peek((serving.id, variant)) if serving else None
    return ModelOut(
        name=name, serving_version=serving.version if serving else None, serving_variant=variant,
        pinned_version=pinned_version(versions), provider=loaded.provider if loaded else services.provider,
        batching_note=services.predict.batching_note(serving.id, variant) if serving else None,
        inputs=[TensorOut(**t) for t in _loaded_or_declared(loaded, described.inputs, "inputs")],
        outputs=[TensorOut(**t) for t in _loaded_or_declared(loaded, described.outputs, "outputs")],
        versions=[_version_out(services, v, jobs.get(v.id)) for v in versions],
    )


def _loaded_or_declared(loaded, declared: list[dict[str, Any]], which: str) -> list[dict[str, Any]]:  # noqa: ANN001
    """What the loaded session says (authoritative) or else what the uploaded file declares."""
    if loaded is None:
        return declared
    return [spec.describe() for spec in getattr(loaded, which)]


@router.get("/{name}/versions/{version}", response_model=VersionOut, responses=_ERRORS)
def describe_version(name: str, version: str, services: Services = Depends(services_of)) -> VersionOut:
    row = services.registry.resolve(name, _version_number(version, name))
    return _version_out(services, row, services.registry.jobs_of([row.id]).get(row.id))


def _version_out(services: Services, row, job) -> VersionOut:  # noqa: ANN001 - ORM rows
    """The version view, its job saying whether its worker was lost, as GET /v1/jobs/{id} does."""
    return VersionOut.of(row, job, services.jobs.lost_worker(job) if job is not None else None)


@router.delete("/{name}", responses=_ERRORS)
def delete_model(name: str, services: Services = Depends(services_of)) -> dict[str, Any]:
    """Delete every version (a running optimization is stopped)."""
    ids = services.registry.delete(name)
    services.predict.invalidate(name)
    services.predict.forget(ids)
    log.info("deleted model %r: all its versions (%d)", name, len(ids))
    return {"deleted": name, "versions": len(ids)}


@router.delete("/{name}/versions/{version}", responses=_ERRORS)
def delete_version(name: str, version: str, services: Services = Depends(services_of)) -> dict[str, Any]:
    number = _version_number(version, name)
    ids = services.registry.delete(name, number)
    services.predict.invalidate(name)
    services.predict.forget(ids)
    log.info("deleted model %r version %d", name, number)
    return {"deleted": name, "version": number}


@router.put("/{name}/serving", response_model=ServingOut, responses=_ERRORS)
def pin_serving(name: str, pin: ServingPinIn, services: Services = Depends(services_of)) -> ServingOut:
    """Pin a version to serve the name whatever is newer (rollback); every replica follows within its cache's
    second. A ready version, or a failed one (its validated original serves); 404 for a missing version, 409 for
    one still optimizing."""
    return _serving_after(services, name, pin.version)


@router.delete("/{name}/serving", response_model=ServingOut, responses=_ERRORS)
def unpin_serving(name: str, services: Services = Depends(services_of)) -> ServingOut:
    """Unpin: the newest ready version serves again (nothing to unpin is not an error)."""
    return _serving_after(services, name, None)


def _serving_after(services: Services, name: str, version: int | None) -> ServingOut:
    versions = services.registry.pin(name, version)
    services.predict.invalidate(name)
    serving = pick_serving(versions)
    log.info("model %r %s; version %s serves", name, f"pinned to version {version}" if version is not None
             else "unpinned", serving.version if serving else "none")
    return ServingOut(name=name, serving_version=serving.version if serving else None,
                      pinned_version=pinned_version(versions))


# -- report and artifact ------------------------------------------------------------------------------


def _no_version_query(version: str | None, name: str, what: str) -> None:
    """BadRequestError when a model-level route gets `?version=`: it answered for the serving version instead (a
    download of `?version=2` was version 1's file, with a 200)."""
    if version is not None:
        raise BadRequestError(f"{what} takes no 'version' query parameter: ask "
                              f"/v1/models/{name}/versions/{version}/{what} for one version (without it: the serving "
                              "version's)")


@router.get("/{name}/report", responses=_ERRORS)
def model_report(name: str, version: str | None = None, services: Services = Depends(services_of)) -> dict[str, Any]:
    """The optimizer's report for the serving version: variants, sizes, latency, accuracy, speedup, provider."""
    _no_version_query(version, name, "report")
    row, report = services.registry.report(name)
    return {"model": row.name, "version": row.version, "selected": row.selected, "report": report}


@router.get("/{name}/versions/{version}/report", responses=_ERRORS)
def version_report(name: str, version: str, services: Services = Depends(services_of)) -> dict[str, Any]:
    row, report = services.registry.report(name, _version_number(version, name))
    return {"model": row.name, "version": row.version, "selected": row.selected, "report": report}


def _artifact(services: Services, name: str, version: int | None, variant: str | None) -> FileResponse:
    if variant not in (None, "optimized", "original"):
        raise BadRequestError(f"variant must be optimized or original, not {variant!r}")
    row, chosen, path = services.registry.artifact(name, version, variant)
    filename = f"{row.name}-v{row.version}-{chosen}.onnx"
    headers = {}
    if chosen == "optimized" and (row.selected or "").endswith(fewer_threads.SUFFIX):
        # its speed was measured on this many intra-op threads; the file's metadata says so too, but plain ONNX
        # Runtime ignores it (a downloaded one-thread winner ran 1.01x on its default threads, 1.27x on one)
        headers["X-Onnxforge-Intra-Op-Threads"] = str(fewer_threads.FEWER)
    return FileResponse(path, media_type="application/octet-stream", filename=filename, headers=headers)


@router.get("/{name}/artifact", response_class=FileResponse, responses=_ERRORS)
def model_artifact(name: str, variant: str | None = None, version: str | None = None,
                   services: Services = Depends(services_of)) -> FileResponse:
    """Download the serving version's ONNX file: `variant` optimized or original (default: the one that serves)."""
    _no_version_query(version, name, "artifact")
    return _artifact(services, name, None, variant)


@router.get("/{name}/versions/{version}/artifact", response_class=FileResponse, responses=_ERRORS)
def version_artifact(name: str, version: str, variant: str | None = None,
                     services: Services = Depends(services_of)) -> FileResponse:
    return _artifact(services, name, _version_number(version, name), variant)


# -- predict (JSON) -----------------------------------------------------------------------------------


def _decode(inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """JSON values -> arrays (dtype fixed later against the model). Ragged lists are refused here."""
    arrays = {}
    for name, value in inputs.items():
        try:
            array = np.asarray(value)
        except (ValueError, TypeError, OverflowError):
            raise BadRequestError(
                f"input {name!r} is not a rectangular array of numbers (ragged nested lists?)"
            ) from None
        if array.dtype == object and not all(isinstance(v, str) for v in array.flat):
            raise BadRequestError(f"input {name!r} must hold numbers, booleans or strings (null or objects given)")
        arrays[name] = array
    return arrays


def _encode(array: np.ndarray) -> Any:  # noqa: ANN401 - nested lists
    """Array -> JSON-ready nested lists, for what orjson does not serialize itself (strings, views)."""
    if array.dtype.kind in "fc" and not np.isfinite(array).all():
        return np.where(np.isfinite(array), array, None).tolist()
    if array.dtype.kind == "S":
        return np.char.decode(array, "utf-8", "replace").tolist()
    return array.tolist()


def _fallback(value: Any) -> Any:  # noqa: ANN401 - orjson's `default` hook
    if isinstance(value, np.ndarray):
        return _encode(value)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


_VARIANTS = ("optimized", "original")
_PREDICT_FIELDS = frozenset(PredictIn.model_fields)
# The request body as OpenAPI documents it (the route reads the body itself, see _predict_body).
_PREDICT_BODY = {"required": True, "content": {"application/json": {"schema": PredictIn.model_json_schema()}}}


def _predict_body(body: bytes) -> tuple[dict[str, Any], str | None]:
    """`{"inputs": {...}, "variant": ...}` parsed with orjson: the same checks as the PredictIn model, at a
    fraction of pydantic's cost on large nested lists (422 for a malformed request, as before)."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        parsed = loads_with_nan_tokens(body)  # (Python's json, e.g. requests' json=, writes NaN/Infinity)
        if parsed is None:
            raise MalformedRequestError(f"malformed request: the body is not valid JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise MalformedRequestError('malformed request: the body must be a JSON object {"inputs": {...}}')
    inputs = parsed.get("inputs")
    if not isinstance(inputs, dict):
        problem = "Field required" if inputs is None and "inputs" not in parsed else "Input should be an object"
        raise MalformedRequestError(f"malformed request: inputs: {problem}")
    unknown = sorted(set(parsed) - _PREDICT_FIELDS)
    if unknown:  # WHY: a misspelt "varient" was ignored and the default variant answered, as if it were asked for
        raise BadRequestError(f"unknown field {unknown[0]!r} in the predict body: it takes "
                                    f"{' and '.join(sorted(_PREDICT_FIELDS))} (the model's outputs all come back)")
    variant = parsed.get("variant")
    if variant is not None and variant not in _VARIANTS:
        raise MalformedRequestError(f"malformed request: variant: Input should be 'optimized' or 'original', "
                                    f"got {variant!r}")
    return inputs, variant


PREDICT = "/v1/models/{name}/predict"  # the routes' templates: /metrics counts under them, the fast path too
VERSION_PREDICT = "/v1/models/{name}/versions/{version}/predict"
_JSON = b"application/json"


# Query parameters a client may send to predict meaning what only the body or the path says: refused, not ignored
# (an ignored ?variant=optimized served the default variant without a word).
_MISPLACED = {
    "variant": 'the body\'s field: {"inputs": {...}, "variant": "optimized"}',
    "version": "the path: POST /v1/models/{name}/versions/{version}/predict",
}


def _refuse_misplaced(query: bytes) -> None:
    """BadRequestError (400) when the query string names what predict reads from the body or the path."""
    for key, _ in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if key in _MISPLACED:
            raise BadRequestError(f"predict takes no {key!r} query parameter: {key} goes in {_MISPLACED[key]}")


async def predict_json(services: Services, name: str, version: str | None, body: bytes,
                       query: bytes = b"") -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """One /v1 predict request, from its raw body (and query string) to the answer's body and headers. Raises the
    service's errors. The routes below and the fast path (app/fastpath.py) call it, so both answer alike."""
    if query:
        _refuse_misplaced(query)
    number = None if version is None else _version_number(version, name)
    inputs, variant = _predict_body(body)
    prediction = await services.predict.predict(name, _decode(inputs), version=number, variant=variant)
    answer = {"model": prediction.model, "version": prediction.version, "variant": prediction.variant,
              "outputs": prediction.outputs}
    if prediction.large:  # off the event loop (Prediction.large)
        content = await run_in_threadpool(orjson.dumps, answer, option=orjson.OPT_SERIALIZE_NUMPY, default=_fallback)
    else:
        content = orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY, default=_fallback)
    return content, [(b"content-length", str(len(content)).encode()), (b"content-type", _JSON)]


async def _predict(request: Request, services: Services, name: str, version: str | None) -> Response:
    content, _ = await predict_json(services, name, version, await request.body(), request.scope["query_string"])
    return Response(content, media_type="application/json")


@router.post(PREDICT.removeprefix(router.prefix), response_model=PredictOut, responses=_ERRORS,
             openapi_extra={"requestBody": _PREDICT_BODY})
async def predict(name: str, request: Request, services: Services = Depends(services_of)) -> Response:
    """Run the serving version; inputs are checked against the model's names, dtypes and shapes (400 names one)."""
    return await _predict(request, services, name, None)


@router.post(VERSION_PREDICT.removeprefix(router.prefix), response_model=PredictOut, responses=_ERRORS,
             openapi_extra={"requestBody": _PREDICT_BODY})
async def predict_version(name: str, version: str, request: Request,
                          services: Services = Depends(services_of)) -> Response:
    return await _predict(request, services, name, version)
