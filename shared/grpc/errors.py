"""One table from domain errors to what a client is told: status code, reason, message.

A `ServiceError` ends a call with the status code and the `error-reason` trailer (shared/
protocol.py) of the table's entry for its class, found along the class hierarchy (most specific
first), and with its own message. Anything else is a bug: logged with its traceback, reported as
INTERNAL with a generic message, never a stack trace. `failure()` is that mapping, used by every
place a call can fail: the sync servicer and the aio data plane through `@grpc_errors` and
`@grpc_errors_async`, and the sync relay's push link, whose answers the relay process sends on
with `abort()`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc

from shared import protocol
from shared.errors import (
    BaseVersionMismatchError,
    BufferNotFoundError,
    ConflictError,
    DeadlineExceededError,
    FencedError,
    InferenceOnlyModelError,
    InvalidArgumentError,
    InvalidInputError,
    MalformedBatchError,
    MalformedPushError,
    ModelNotFoundError,
    NotFoundError,
    OutOfRangeError,
    PushBrokenError,
    PushRejectedError,
    PushStalledError,
    RegionNotFoundError,
    ResourceLimitError,
    ResumeMismatchError,
    SeedVersionMismatchError,
    ServiceError,
    StoredVersionDamagedError,
    UnavailableError,
    UnknownEpochError,
    UnsupportedError,
    VersionNotServedError,
)

logger = logging.getLogger(__name__)

Code = grpc.StatusCode

ERRORS: dict[type[ServiceError], tuple[grpc.StatusCode, str]] = {
    ServiceError: (Code.UNKNOWN, protocol.SERVICE),
    InvalidArgumentError: (Code.INVALID_ARGUMENT, protocol.INVALID_ARGUMENT),
    InvalidInputError: (Code.INVALID_ARGUMENT, protocol.INVALID_INPUT),
    MalformedPushError: (Code.INVALID_ARGUMENT, protocol.MALFORMED_PUSH),
    PushBrokenError: (Code.INVALID_ARGUMENT, protocol.PUSH_BROKEN),
    MalformedBatchError: (Code.INVALID_ARGUMENT, protocol.MALFORMED_BATCH),
    OutOfRangeError: (Code.INVALID_ARGUMENT, protocol.OUT_OF_RANGE),
    NotFoundError: (Code.NOT_FOUND, protocol.NOT_FOUND),
    ModelNotFoundError: (Code.NOT_FOUND, protocol.MODEL_NOT_FOUND),
    VersionNotServedError: (Code.NOT_FOUND, protocol.VERSION_NOT_SERVED),
    RegionNotFoundError: (Code.NOT_FOUND, protocol.REGION_NOT_FOUND),
    BufferNotFoundError: (Code.NOT_FOUND, protocol.BUFFER_NOT_FOUND),
    PushRejectedError: (Code.FAILED_PRECONDITION, protocol.PUSH_REJECTED),
    InferenceOnlyModelError: (Code.FAILED_PRECONDITION, protocol.INFERENCE_ONLY_MODEL),
    BaseVersionMismatchError: (Code.FAILED_PRECONDITION, protocol.BASE_VERSION_MISMATCH),
    SeedVersionMismatchError: (Code.FAILED_PRECONDITION, protocol.SEED_VERSION_MISMATCH),
    ResumeMismatchError: (Code.FAILED_PRECONDITION, protocol.RESUME_MISMATCH),
    ConflictError: (Code.ABORTED, protocol.CONFLICT),
    FencedError: (Code.ABORTED, protocol.FENCED),
    UnknownEpochError: (Code.ABORTED, protocol.UNKNOWN_EPOCH),
    DeadlineExceededError: (Code.DEADLINE_EXCEEDED, protocol.DEADLINE_EXCEEDED),
    PushStalledError: (Code.DEADLINE_EXCEEDED, protocol.PUSH_STALLED),
    UnavailableError: (Code.UNAVAILABLE, protocol.UNAVAILABLE),
    ResourceLimitError: (Code.RESOURCE_EXHAUSTED, protocol.RESOURCE_LIMIT),
    UnsupportedError: (Code.UNIMPLEMENTED, protocol.UNSUPPORTED),
    StoredVersionDamagedError: (Code.DATA_LOSS, protocol.STORED_VERSION_DAMAGED),
}


@dataclass(frozen=True)
class Status:
    """How a failed call ends: its code, its `error-reason` ("": none sent) and its message."""

    code: grpc.StatusCode
    reason: str
    message: str


INTERNAL = Status(Code.INTERNAL, "", "internal server error; see the server log")
# The most UTF-8 bytes of a status message. It travels as the grpc-message trailer,
# percent-encoded (up to 3x longer), and clients refuse trailers past 16 KiB (past 8 KiB at
# random): a longer message would turn the refusal into RESOURCE_EXHAUSTED with no message.
# Messages echo what the client sent (a model, buffer or parameter name), so they are cut.
MAX_MESSAGE_BYTES = 2048


def status_of(error: ServiceError) -> Status:
    """The table's status for `error`, found along its class hierarchy, with its message (cut
    to MAX_MESSAGE_BYTES)."""
    for cls in type(error).__mro__:
        entry = ERRORS.get(cls)
        if entry is not None:
            return Status(*entry, bounded(str(error)))
    raise AssertionError("unreachable: ServiceError itself is in the table")  # pragma: no cover


def bounded(message: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """`message`, cut to at most `limit` UTF-8 bytes, saying how much was cut."""
    data = message.encode()
    if len(data) <= limit:
        return message
    kept = data[: limit - 40].decode(errors="ignore")
    return f"{kept}... ({len(data) - len(kept.encode())} bytes cut)"


def status_for(error: ServiceError) -> grpc.StatusCode:
    """The status code for `error` (as `status_of`)."""
    return status_of(error).code


def failure(error: Exception, where: str) -> Status:
    """The status a call that raised `error` in `where` ends with, logged: a domain error with
    its message, anything else (a bug) with its traceback, answered INTERNAL."""
    if isinstance(error, ServiceError):
        status = status_of(error)
        logger.info("%s -> %s: %s", bounded(where), status.code.name, status.message)
        return status
    logger.error("unhandled error in %s", where, exc_info=error)
    return INTERNAL


def _trailers(status: Status) -> tuple[tuple[str, str], ...]:
    return ((protocol.REASON_KEY, status.reason),) if status.reason else ()


def abort(context: grpc.ServicerContext, status: Status) -> NoReturn:
    """End the call with `status` (its reason as the `error-reason` trailer)."""
    trailers = _trailers(status)
    if trailers:
        context.set_trailing_metadata(trailers)
    context.abort(status.code, status.message)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


H = TypeVar("H", bound=Callable[..., Any])


def grpc_errors(handler: H) -> H:
    """Wrap a servicer method (`self, request_or_iterator, context`) with the error table."""

    @functools.wraps(handler)
    def wrapper(self: object, request: object, context: grpc.ServicerContext) -> Any:
        try:
            return handler(self, request, context)
        except Exception as error:
            if not isinstance(error, ServiceError) and context.code() is not None:
                raise  # the handler aborted on purpose
            abort(context, failure(error, handler.__qualname__ + _id(request)))

    return wrapper  # type: ignore[return-value]


def grpc_errors_async(handler: H) -> H:
    """`grpc_errors` for the coroutine methods of a grpc.aio servicer."""

    @functools.wraps(handler)
    async def wrapper(self: object, request: object, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:  # the handler aborted on purpose
            raise
        except Exception as error:
            status = failure(error, handler.__qualname__ + _id(request))
            trailers = _trailers(status)
            if trailers:
                context.set_trailing_metadata(trailers)
            await context.abort(status.code, status.message)

    return wrapper  # type: ignore[return-value]


def _id(request: object) -> str:
    """` (request id '...')` for requests that carry a client-chosen id (OIP's `id`), else ''."""
    request_id = getattr(request, "id", "")
    return f" (request id {request_id!r})" if isinstance(request_id, str) and request_id else ""


def error_reason(error: grpc.RpcError) -> str | None:
    """The `error-reason` trailer of a failed call, if the server sent one."""
    trailers: Any = getattr(error, "trailing_metadata", lambda: None)()
    for key, value in trailers or ():
        if key == protocol.REASON_KEY:
            return str(value)
    return None


def error_details(error: grpc.RpcError, service: str) -> str:
    """The message of a failed call to `service`, saying so where the peer serves no such
    service: grpcio answers a method it has no handler for with UNIMPLEMENTED and no
    `error-reason` (every UNIMPLEMENTED of this project's own carries one), which is what a
    client dialling the wrong port of a service (the data plane's for the sync plane's, say)
    gets back."""
    details = (error.details() if hasattr(error, "details") else str(error)) or ""
    code = error.code() if hasattr(error, "code") else None
    if code == Code.UNIMPLEMENTED and error_reason(error) is None:
        return (
            f"{details} (the address serves no {service}: is it another port of the service, "
            "its data plane's say, or another server's?)"
        )
    return details
