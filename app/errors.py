"""The service's errors. Each class carries its HTTP status; app/api/errors.py maps them in one place.

Services raise these (or optimizer.errors.OptimizerError, which means "the user's model or data is
bad": 400) with a message that says what is wrong and what to do. Routers never build error answers.
"""

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

# What SQLAlchemy raises when the database cannot be reached (refused, restarting, connections blocked or cut, the
# pool exhausted): transient, the service's state rather than its bug or the client's.
DATABASE_UNREACHABLE = (OperationalError, InterfaceError, PoolTimeoutError)
DATABASE_UNREACHABLE_MESSAGE = "the model registry's database is unreachable; retry"


class ServiceError(Exception):
    """A request the service cannot honour, explained in words."""

    status_code = 500
    headers: dict[str, str] | None = None  # extra headers of the answer (e.g. Retry-After on a 503)


class BadRequestError(ServiceError):
    """The request is well-formed but its content is wrong (a bad value, an input that does not fit)."""

    status_code = 400


class NotFoundError(ServiceError):
    """An unknown model, version or job."""

    status_code = 404


class ConflictError(ServiceError):
    """The request is valid but the resource is not in a state that allows it (e.g. still optimizing)."""

    status_code = 409


class PayloadTooLargeError(ServiceError):
    status_code = 413


class UnsupportedMediaTypeError(ServiceError):
    """The body or an uploaded file is of a kind the service does not take."""

    status_code = 415


class MalformedRequestError(ServiceError):
    """The request body itself is broken (a multipart body that does not parse, a required part missing)."""

    status_code = 422


class NotReadyError(ServiceError):
    """The service (database, storage) cannot answer right now."""

    status_code = 503


class ModelLoadError(ServiceError):
    """A stored model that ONNX Runtime will not load here: the service's problem, not the caller's."""

    status_code = 500


class DatabaseUnreachableError(NotReadyError):
    """The database is unreachable and the answer needs it (e.g. a model this process has never resolved; one it
    has keeps serving from its cached resolution). Logged once per outage where the outage is noticed, not per
    request: app/api/errors.py answers it without a log line."""

    headers = {"Retry-After": "2"}


class RunMemoryError(ServiceError):
    """A run that needs more memory than the process's shared run arena has left (optimizer.runtime.shared_arena):
    507 Insufficient Storage, as the server cannot hold what the run needs; the message names the limit, the setting
    and what to send instead."""

    status_code = 507


class StorageError(ServiceError, OSError):
    """The server's disk or artifact store cannot take a write or a removal (full, read-only): 507 Insufficient
    Storage, the server's problem and not the request's, said in words instead of a 500.

    An OSError too (with the original errno), so callers that already handle a store's OSError (the worker storing
    its results) keep doing so.
    """

    status_code = 507

    def __init__(self, message: str, error_number: int | None = None) -> None:
        super().__init__(error_number, message)

    def __str__(self) -> str:
        return self.args[1]
