"""The one place where errors become gRPC status codes.

Engine errors and store conflicts map to their codes with their own messages; anything else is a
bug: it is logged with its traceback and answered INTERNAL.
"""

from __future__ import annotations

import functools
import logging

import grpc

from stillroom_server.engine.errors import AlreadyExists, FailedPrecondition, InvalidInput, NotFound
from stillroom_server.service.auth import CURRENT_OWNER, Unauthenticated
from stillroom_server.store import SequenceConflict

logger = logging.getLogger("stillroom.service")


class ResourceExhausted(Exception):
    """A configured limit was reached; the message names the limit."""


_CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (SequenceConflict, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
]


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    for cls, code in _CODES:
        if isinstance(error, cls):
            return code, str(error)
    if isinstance(error, MemoryError) or "out of memory" in str(error).lower():
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"out of memory: {error}"
    logger.error("internal error", exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"


def rpc(method):
    """Wrap a servicer method: authenticate the caller, then answer any error it raises with
    its status code."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            CURRENT_OWNER.set(self.authenticate(context))
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # noqa: BLE001 - mapped to a status code here, once
            code, message = status_for(error)
            await context.abort(code, message)

    return wrapper
