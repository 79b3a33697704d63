"""One table from domain errors to gRPC status codes, applied in one place.

Servicer methods are wrapped with `@grpc_errors`. A `ServiceError` becomes its mapped status with
its own message, plus a machine-readable `error-reason` trailer that clients (our trainer) use to
tell, say, "delta base missing" from other FAILED_PRECONDITION answers. Anything else is a bug:
logged with its traceback, reported as INTERNAL with a generic message, never a stack trace.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import grpc

from shared.errors import (
    ConflictError,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    PushRejectedError,
    ResourceLimitError,
    ServiceError,
    UnavailableError,
    UnsupportedError,
)

logger = logging.getLogger(__name__)

REASON_KEY = "error-reason"

STATUS_BY_ERROR: dict[type[ServiceError], grpc.StatusCode] = {
    InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    PushRejectedError: grpc.StatusCode.FAILED_PRECONDITION,
    ConflictError: grpc.StatusCode.ABORTED,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    ResourceLimitError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UnsupportedError: grpc.StatusCode.UNIMPLEMENTED,
}


def status_for(error: ServiceError) -> grpc.StatusCode:
    """The status code for `error`, found along its class hierarchy (most specific first)."""
    for cls in type(error).__mro__:
        code = STATUS_BY_ERROR.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.UNKNOWN


def reason_for(error: ServiceError) -> str:
    """A stable kebab-case name of the error class, sent as the `error-reason` trailer."""
    name = type(error).__name__.removesuffix("Error")
    return "".join(f"-{c.lower()}" if c.isupper() else c for c in name).lstrip("-")


def abort(context: grpc.ServicerContext, error: ServiceError) -> NoReturn:
    context.set_trailing_metadata(((REASON_KEY, reason_for(error)),))
    context.abort(status_for(error), str(error))
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


H = TypeVar("H", bound=Callable[..., Any])


def grpc_errors(handler: H) -> H:
    """Wrap a servicer method (`self, request_or_iterator, context`) with the error table."""

    @functools.wraps(handler)
    def wrapper(self: object, request: object, context: grpc.ServicerContext) -> Any:
        try:
            return handler(self, request, context)
        except ServiceError as error:
            logger.info(
                "%s%s -> %s: %s", handler.__qualname__, _id(request), status_for(error).name, error
            )
            abort(context, error)
        except Exception:
            if context.code() is not None:  # the handler aborted on purpose
                raise
            logger.exception("unhandled error in %s%s", handler.__qualname__, _id(request))
            context.abort(grpc.StatusCode.INTERNAL, "internal server error; see the server log")

    return wrapper  # type: ignore[return-value]


def grpc_errors_async(handler: H) -> H:
    """`grpc_errors` for the coroutine methods of a grpc.aio servicer."""

    @functools.wraps(handler)
    async def wrapper(self: object, request: object, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except ServiceError as error:
            logger.info(
                "%s%s -> %s: %s", handler.__qualname__, _id(request), status_for(error).name, error
            )
            context.set_trailing_metadata(((REASON_KEY, reason_for(error)),))
            await context.abort(status_for(error), str(error))
        except grpc.aio.AbortError:  # the handler aborted on purpose
            raise
        except Exception:
            logger.exception("unhandled error in %s%s", handler.__qualname__, _id(request))
            await context.abort(
                grpc.StatusCode.INTERNAL, "internal server error; see the server log"
            )

    return wrapper  # type: ignore[return-value]


def _id(request: object) -> str:
    """` (request id '...')` for requests that carry a client-chosen id (OIP's `id`), else ''."""
    request_id = getattr(request, "id", "")
    return f" (request id {request_id!r})" if isinstance(request_id, str) and request_id else ""


def error_reason(error: grpc.RpcError) -> str | None:
    """The `error-reason` trailer of a failed call, if the server sent one."""
    trailers: Any = getattr(error, "trailing_metadata", lambda: None)()
    for key, value in trailers or ():
        if key == REASON_KEY:
            return str(value)
    return None
