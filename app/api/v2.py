"""/v2: the Open Inference Protocol (KServe v2, as Triton speaks it over HTTP), beside our /v1.

So that tritonclient, KServe's clients and curl scripts written for Triton work unchanged. Thin:
tensors are decoded by app/protocol/v2_codec.py and answered by the same predict service as /v1.
Errors keep the service's one shape, `{"error": "..."}`, which is also what v2 specifies.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.routing import BaseRoute
from starlette.types import Receive, Scope, Send

from app.api.deps import services_of
from app.api.schemas import ErrorOut
from app.errors import (
    BadRequestError,
    ConflictError,
    ModelLoadError,
    NotFoundError,
    NotReadyError,
    PayloadTooLargeError,
)
from app.protocol.v2_codec import HEADER_LENGTH, SHARED_MEMORY, datatype_of, decode_request, encode_response
from app.runtime.batching import unbatchable_reason
from app.runtime.signature import TensorSpec
from app.security import body_limit_message
from app.services.container import Services
from app.services.predict import batch_policy
from optimizer import __version__
from optimizer.errors import first_line

router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"])

_ERRORS = {code: {"model": ErrorOut} for code in (400, 404, 409, 503)}
_HEADER_LENGTH = HEADER_LENGTH.encode()
_HEADER_ROOM = 64 * 1024  # bytes of a binary request's body kept for its JSON header by `most_rows`
# Extensions as Triton names them, only those served: clients check this list before using one.
_SERVER = {"name": "onnxforge", "version": __version__, "extensions": ["binary_tensor_data", "classification",
                                                                   "model_repository"]}
_ONNX_ONLY = {"tensor(bfloat16)": "BF16"}  # ONNX types v2 names that datatype_of cannot give (numpy has no dtype)


def _version(text: str | None, name: str) -> int | None:
    if text is None:
        return None
    if not (text.isascii() and text.isdigit() and len(text) <= 18):  # '¹'.isdigit(); the database's int64
        raise NotFoundError(f"model {name!r} has no version {text!r}: versions are numbers")
    return int(text)


def _tensor(spec: TensorSpec) -> dict[str, Any]:
    shape = [-1] if spec.shape is None else [d if isinstance(d, int) else -1 for d in spec.shape]
    return {"name": spec.name, "datatype": datatype_of(spec.dtype) or _ONNX_ONLY.get(spec.type, spec.type),
            "shape": shape}


# -- server ------------------------------------------------------------------------------------------


@router.get("")
async def server_metadata() -> dict[str, Any]:  # async: no thread-pool trip for a constant
    return _SERVER


@router.get("/health/live")
async def live() -> dict[str, Any]:
    return {"live": True}


def _storage_problems(services: Services) -> str | None:
    """The artifact store's problem, if any. WHY not the database: as /readyz (app/api/health.py), a shared
    database's outage must not pull every replica; predict serves cached models through it."""
    try:
        services.store.check()
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        return first_line(exc)
    return None


@router.get("/health/ready", responses={503: {"model": ErrorOut}})
async def ready(services: Services = Depends(services_of)) -> dict[str, Any]:
    problem = await run_in_threadpool(_storage_problems, services)
    if problem:
        raise NotReadyError(f"not ready: {problem}")
    return {"ready": True}


# -- Triton's other extensions ------------------------------------------------------------------------
# The model repository's index and load are served. The others are answered, not left to the catch-all 404 (which
# reads like a typo, and read GET /v2/models/stats as a model named "stats"): a 400 in the one error shape that
# tritonclient reads, saying what onnxforge does instead; shared memory's status and unregister answer "none".
# Declared before /models/{name} so that "stats" is not taken for a model's name.

_STATISTICS = ("the statistics extension is not supported: per-model request counts and latencies are on "
               "GET /metrics (onnxforge_predict_requests_total, onnxforge_predict_latency_seconds)")


@router.get("/models/stats", responses=_ERRORS, include_in_schema=False)
@router.get("/models/{name}/stats", responses=_ERRORS, include_in_schema=False)
@router.get("/models/{name}/versions/{version}/stats", responses=_ERRORS, include_in_schema=False)
async def statistics() -> None:
    raise BadRequestError(_STATISTICS)


_OPTIONS_MAX = 64 * 1024  # bytes of a repository request's body: options only, and no body limit is in front


async def _options(request: Request) -> dict[str, Any]:
    """A repository request's JSON body ({} when empty, as tritonclient sends it without options)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > _OPTIONS_MAX:
            raise PayloadTooLargeError(f"the body of {request.url.path} is over {_OPTIONS_MAX} bytes: it holds options")
    try:
        options = orjson.loads(body) if body.strip() else {}
    except orjson.JSONDecodeError:
        options = None
    if not isinstance(options, dict):
        raise BadRequestError(f"the body of {request.url.path} is a JSON object or empty")
    return options


@router.post("/repository/index", responses=_ERRORS)
async def repository_index(request: Request, services: Services = Depends(services_of)) -> list[dict[str, Any]]:
    """Every live version of every model (Triton's model repository extension): READY when it can serve (its
    session loads at its first request or readiness check), UNAVAILABLE with the reason when ONNX Runtime cannot
    run it. Body `{"ready": true}`: the READY ones only."""
    options = await _options(request)
    models, _ = await run_in_threadpool(services.registry.names)
    index: list[dict[str, Any]] = []
    for row in (row for rows in models.values() for row in rows):
        if not row.unrunnable:
            index.append({"name": row.name, "version": str(row.version), "state": "READY"})
        elif options.get("ready") is not True:
            index.append({"name": row.name, "version": str(row.version), "state": "UNAVAILABLE",
                          "reason": f"ONNX Runtime cannot run it: {row.error}"})
    return index


@router.post("/repository/models/{name}/load", responses=_ERRORS)
async def load(name: str, request: Request, services: Services = Depends(services_of)) -> JSONResponse:
    """Loads the serving version's session now, so that the first request does not pay for it. Models come in by
    upload (POST /v1/models), not from a repository folder: a config or files in the body are refused."""
    if (await _options(request)).get("parameters"):
        raise BadRequestError("load parameters (config, files) are not supported: upload a model or a new version "
                              "with POST /v1/models")
    try:
        await services.predict.serving(name)
    except (ConflictError, ModelLoadError) as exc:
        raise BadRequestError(f"failed to load {name!r}: {exc}") from None
    return JSONResponse({})


@router.post("/repository/models/{name}/unload", responses=_ERRORS)
async def unload(name: str) -> None:
    raise BadRequestError(f"unloading on request is not supported: {name!r} serves until it is deleted "
                          f"(DELETE /v1/models/{name}); the session cache drops the least recently used "
                          "sessions when full (ONNXFORGE_SESSION_CACHE_SIZE, ONNXFORGE_SESSION_CACHE_MAX_MB)")


@router.get("/systemsharedmemory/status", include_in_schema=False)
@router.get("/cudasharedmemory/status", include_in_schema=False)
async def shared_memory_status() -> list:
    return []  # none registered: register is refused


@router.post("/systemsharedmemory/unregister", include_in_schema=False)
@router.post("/systemsharedmemory/region/{region}/unregister", include_in_schema=False)
@router.post("/cudasharedmemory/unregister", include_in_schema=False)
@router.post("/cudasharedmemory/region/{region}/unregister", include_in_schema=False)
async def shared_memory_unregister() -> JSONResponse:
    return JSONResponse({})  # nothing is registered: nothing to undo (what Triton answers with none registered)


@router.post("/systemsharedmemory/region/{region}/register", responses=_ERRORS, include_in_schema=False)
@router.post("/cudasharedmemory/region/{region}/register", responses=_ERRORS, include_in_schema=False)
@router.get("/systemsharedmemory/region/{region}/status", responses=_ERRORS, include_in_schema=False)
@router.get("/cudasharedmemory/region/{region}/status", responses=_ERRORS, include_in_schema=False)
async def shared_memory_region() -> None:
    raise BadRequestError(SHARED_MEMORY)


@router.api_route("/trace/setting", methods=["GET", "POST"], include_in_schema=False)
@router.api_route("/models/{name}/trace/setting", methods=["GET", "POST"], include_in_schema=False)
async def trace_settings() -> None:
    raise BadRequestError("the trace extension is not supported: request counts and latencies are on GET /metrics")


@router.api_route("/logging", methods=["GET", "POST"], include_in_schema=False)
async def log_settings() -> None:
    raise BadRequestError("log settings cannot be changed at run time: set ONNXFORGE_LOG_LEVEL and restart")


# -- models ------------------------------------------------------------------------------------------


async def _metadata(services: Services, name: str, version: str | None) -> dict[str, Any]:
    model = await services.predict.serving(name, _version(version, name))
    rows = await run_in_threadpool(services.registry.versions, name)
    return {
        "name": model.row.name,
        "versions": [str(v.version) for v in rows],  # a failed one still serves its original
        "platform": "onnxruntime_onnx",
        "inputs": [_tensor(s) for s in model.loaded.inputs],
        "outputs": [_tensor(s) for s in model.loaded.outputs],
    }


@router.get("/models/{name}", responses=_ERRORS)
async def model_metadata(name: str, services: Services = Depends(services_of)) -> dict[str, Any]:
    """Name, versions, platform, and inputs/outputs of the serving version (-1 for dynamic dims)."""
    return await _metadata(services, name, None)


@router.get("/models/{name}/versions/{version}", responses=_ERRORS)
async def version_metadata(name: str, version: str, services: Services = Depends(services_of)) -> dict[str, Any]:
    return await _metadata(services, name, version)


def _config_tensor(spec: TensorSpec, batched: bool) -> dict[str, Any]:
    tensor = _tensor(spec)
    datatype = tensor["datatype"]
    return {"name": spec.name, "data_type": "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}",
            "dims": tensor["shape"][1:] if batched else tensor["shape"]}


def most_rows(inputs: list[TensorSpec], max_elements: int, max_body_bytes: int) -> int:
    """The most rows one request may carry: each input's elements within ONNXFORGE_MAX_INPUT_ELEMENTS (predict
    refuses more with a 400) and their bytes, sent as binary data, within ONNXFORGE_MAX_PREDICT_BODY_BYTES (a 413)
    less 64 KiB for the JSON header.
    A dynamic dimension besides the batch axis counts as 1, so a request of longer rows fits fewer."""
    most, row_bytes = max_elements, 0
    for spec in inputs:
        per_row = 1
        for dim in (spec.shape or ())[1:]:
            per_row *= dim if isinstance(dim, int) and dim > 0 else 1
        most = min(most, max_elements // per_row)
        if spec.dtype is not None and spec.dtype != np.dtype(object):  # strings: no fixed size
            row_bytes += per_row * spec.dtype.itemsize
    if row_bytes:  # what is left of the body once its JSON header (names, shapes, parameters) is in
        most = min(most, (max_body_bytes - min(_HEADER_ROOM, max_body_bytes // 2)) // row_bytes)
    return max(most, 1)


async def _config(services: Services, name: str, version: str | None) -> dict[str, Any]:
    """A minimal Triton model configuration, for clients that read one (perf_analyzer, some tritonclient code).

    max_batch_size, as Triton means it, the most rows one request may carry (Triton refuses more): for a version
    whose inputs and outputs all have a batch axis first, the limit the server applies (`most_rows`), and dims then
    leave that axis out; else 0, and dims are whole shapes. It is not the batcher's size: a request of more rows than
    that runs whole, in one session.run (the config said 32 while 64-row requests were served). dynamic_batching
    says the server combines requests: up to ONNXFORGE_BATCH_MAX_SIZE rows (or the model's own batch_max_size) per
    run, waiting at most ONNXFORGE_BATCH_MAX_DELAY_MS for company; absent when it does not (batch size 1). A probe
    at the first request may still find that combining does not pay for the model (app/runtime/batching.py)."""
    model = await services.predict.serving(name, _version(version, name))
    inputs, outputs = model.loaded.inputs, model.loaded.outputs
    settings = services.settings
    batched = unbatchable_reason(inputs, outputs) is None
    config: dict[str, Any] = {
        "name": model.row.name, "platform": "onnxruntime_onnx",
        "max_batch_size": most_rows(inputs, settings.max_input_elements, settings.max_predict_body_bytes)
        if batched else 0,
        "input": [_config_tensor(s, batched) for s in inputs],
        "output": [_config_tensor(s, batched) for s in outputs],
    }
    policy, _ = batch_policy(model.row, services.predict.batcher.default)
    if batched and policy.max_batch_size > 1:
        config["dynamic_batching"] = {"preferred_batch_size": [policy.max_batch_size],
                                      "max_queue_delay_microseconds": round(policy.max_delay_s * 1e6)}
    return config


@router.get("/models/{name}/config", responses=_ERRORS)
async def model_config(name: str, services: Services = Depends(services_of)) -> dict[str, Any]:
    """A minimal Triton-style model configuration of the serving version: name, platform, max_batch_size, input
    and output (data_type TYPE_FP32 etc., dims with -1 for dynamic ones)."""
    return await _config(services, name, None)


@router.get("/models/{name}/versions/{version}/config", responses=_ERRORS)
async def version_config(name: str, version: str, services: Services = Depends(services_of)) -> dict[str, Any]:
    return await _config(services, name, version)


async def _ready(services: Services, name: str, version: str | None) -> JSONResponse:
    try:
        await services.predict.serving(name, _version(version, name))  # loads the session if needed
    except (ConflictError, ModelLoadError) as exc:
        raise NotReadyError(str(exc)) from None
    return JSONResponse({"name": name, "ready": True})


@router.get("/models/{name}/ready", responses=_ERRORS)
async def model_ready(name: str, services: Services = Depends(services_of)) -> JSONResponse:
    """200 when the model can answer now (its session is loaded); 503 when it cannot, 404 if unknown."""
    return await _ready(services, name, None)


@router.get("/models/{name}/versions/{version}/ready", responses=_ERRORS)
async def version_ready(name: str, version: str, services: Services = Depends(services_of)) -> JSONResponse:
    return await _ready(services, name, version)


# -- infer -------------------------------------------------------------------------------------------


def _decompressed(body: bytes, encoding: str | None, limit: int | None) -> bytes:
    """tritonclient can gzip or deflate the request. Inflated piece by piece, never past `limit` bytes (None: no
    limit): a 1 MB gzip body of zeros unpacks to 1 GiB, which the body limit (checked on the wire's bytes) misses."""
    if not encoding or encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise BadRequestError(f"Content-Encoding {encoding!r} is not supported: send gzip, deflate or none")
    room = -1 if limit is None else limit + 1  # max_length: -1 unbounded; one byte past the limit tells it is over
    parts, data = [], body
    try:
        while True:  # gzip: one member after another, as gzip.decompress reads them
            inflater = zlib.decompressobj(31 if encoding == "gzip" else 15)
            part = inflater.decompress(data, max(room, 0))
            parts.append(part)
            if limit is not None:
                room -= len(part)
                if room <= 0:
                    raise PayloadTooLargeError(
                        f"the request body unpacks ({encoding}) to more than the predict limit of {limit} bytes "
                        "(ONNXFORGE_MAX_PREDICT_BODY_BYTES): send fewer rows per request")
            if not inflater.eof:
                raise zlib.error("cut off")
            data = inflater.unused_data
            if not data or encoding != "gzip":
                break
    except zlib.error:
        raise BadRequestError(f"the body is not valid {encoding} data") from None
    return parts[0] if len(parts) == 1 else b"".join(parts)


INFER = "/v2/models/{name}/infer"
VERSION_INFER = "/v2/models/{name}/versions/{version}/infer"


async def infer(services: Services, name: str, version: str | None, body: bytes, header_length: str | None,
                encoding: str | None, limit: int | None) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """One infer request, from its raw body (and the headers that say how to read it) to the answer's body
    and headers; `limit`: the predict body limit, for the body once unpacked. Raises the service's errors.
    The route below and the fast path (app/fastpath.py) call it."""
    if encoding and encoding != "identity":  # in a thread: up to the body limit of inflating, off the event loop
        body = await run_in_threadpool(_decompressed, body, encoding, limit)
    request = decode_request(body, header_length)
    prediction = await services.predict.predict(name, request.inputs, version=_version(version, name), cast=False,
                                                output_names=request.outputs)
    encode = (prediction.model, prediction.version, request, prediction.outputs)
    if prediction.large:  # off the event loop (Prediction.large)
        content, length = await run_in_threadpool(encode_response, *encode)
    else:
        content, length = encode_response(*encode)
    if length is None:
        return content, [(b"content-length", str(len(content)).encode()), (b"content-type", b"application/json")]
    return content, [(b"content-length", str(len(content)).encode()), (b"content-type", b"application/octet-stream"),
                     (_HEADER_LENGTH, str(length).encode())]


class _InferEndpoint:
    """POST /v2/models/{name}[/versions/{version}]/infer as a raw ASGI route: JSON tensors or binary ones.

    Most infer requests never get here: app/fastpath.py answers them in front of the whole stack. This
    route serves the rest (with CORS configured, under a root path) and documents the path in the app.
    Errors are raised, not answered here: the app's exception handlers give them the service's one
    shape, and the middlewares in front (API keys, body limit, metrics) apply as to any route.
    """

    def __init__(self) -> None:
        self.route: BaseRoute | None = None  # set once added; /metrics labels requests by its template

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = self.route  # Starlette records no template for plain routes
        services = scope["app"].state.services
        if services is None:
            raise NotReadyError("the service is starting or stopping")
        encoding = header_length = None
        for key, value in scope["headers"]:
            if key == _HEADER_LENGTH:
                header_length = value.decode("latin-1")
            elif key == b"content-encoding":
                encoding = value.decode("latin-1").strip().lower()
        params = scope["path_params"]
        content, headers = await infer(services, params["name"], params.get("version"), await read_body(receive),
                                       header_length, encoding, scope["app"].state.settings.max_predict_body_bytes)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": content})


async def read_body(receive: Receive, limit: int | None = None) -> bytes:
    """The whole request body; PayloadTooLargeError as soon as it passes `limit` bytes (None: no limit)."""
    chunks, seen = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequestError("the client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        if limit is not None:
            seen += len(chunk)
            if seen > limit:
                raise PayloadTooLargeError(body_limit_message(limit))
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


_TENSOR = {"type": "object", "required": ["name", "shape", "datatype"], "properties": {
    "name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}},
    "datatype": {"type": "string", "example": "FP32"},
    "data": {"type": "array", "items": {}, "description": "row-major values; absent with binary_data_size"},
    "parameters": {"type": "object", "description": "binary_data_size: bytes of this tensor after the JSON header"},
}}
_INFER_DOC: dict[str, Any] = {
    "requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {
            "id": {"type": "string"}, "inputs": {"type": "array", "items": _TENSOR},
            "outputs": {"type": "array", "items": {"type": "object", "properties": {
                "name": {"type": "string"}, "parameters": {"type": "object"}}}},
            "parameters": {"type": "object", "description": "binary_data_output: answer every output in binary"},
        }}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary", "description": (
            "binary tensor extension: the JSON request, then each tensor's bytes; the JSON's length in the "
            "Inference-Header-Content-Length header")}},
    }},
    "responses": {"200": {"description": "model_name, model_version, outputs (JSON or binary tensors, as asked)"}},
}


async def _documented_infer(name: str) -> None:
    """Run the serving version of a model (Open Inference Protocol, JSON or binary tensors)."""
    # Never called: the raw route ahead of it (or app/fastpath.py) answers every POST to this path. FastAPI's
    # OpenAPI document lists only its own routes, so this one exists for /docs and /openapi.json alone.
    raise AssertionError("the raw /v2 infer route answers this path")


async def _documented_version_infer(name: str, version: str) -> None:
    """Run one version of a model (Open Inference Protocol, JSON or binary tensors)."""
    raise AssertionError("the raw /v2 infer route answers this path")  # never called: see _documented_infer


def _add_infer_routes() -> None:
    """Infer routes first in the router: FastAPI matches a path against each route in turn (twice per
    request), so the hot path should not pay for the metadata routes ahead of it. Each is followed by a
    documented twin that only /openapi.json sees (the raw route matches first)."""
    for template, documented in ((VERSION_INFER, _documented_version_infer), (INFER, _documented_infer)):
        router.add_api_route(template.removeprefix(router.prefix), documented, methods=["POST"], responses=_ERRORS,
                             openapi_extra=_INFER_DOC, status_code=200)
        endpoint = _InferEndpoint()
        # add_route does not prepend the router's prefix, hence the full paths.
        router.add_route(template, endpoint, methods=["POST"])
        endpoint.route = router.routes.pop()
        router.routes[0:0] = [endpoint.route, router.routes.pop()]


_add_infer_routes()
