"""Typed errors raised by the SDK, one class per gRPC status code.

Every error carries the status `code` (a grpc.StatusCode name) and, where the failure belongs to a
submitted request, its `request_id`. Only UNAVAILABLE is retried by the SDK itself.
"""

from __future__ import annotations

from typing import Optional

import grpc


class StillroomError(Exception):
    """Base class of every error the SDK raises."""

    code: str = "UNKNOWN"

    def __init__(self, message: str, *, code: Optional[str] = None,
                 request_id: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.request_id = request_id

    def __str__(self) -> str:
        suffix = f" (request {self.request_id})" if self.request_id else ""
        return f"{self.code}: {self.message}{suffix}"


APIError = StillroomError


class BadRequestError(StillroomError):
    code = "INVALID_ARGUMENT"


class AuthenticationError(StillroomError):
    code = "UNAUTHENTICATED"


class PermissionDeniedError(StillroomError):
    code = "PERMISSION_DENIED"


class NotFoundError(StillroomError):
    code = "NOT_FOUND"


class ConflictError(StillroomError):
    code = "ALREADY_EXISTS"


class FailedPreconditionError(StillroomError):
    code = "FAILED_PRECONDITION"


class RateLimitError(StillroomError):
    code = "RESOURCE_EXHAUSTED"


class APIConnectionError(StillroomError):
    """The server could not be reached (UNAVAILABLE), after the SDK's retries."""

    code = "UNAVAILABLE"


class APITimeoutError(StillroomError):
    code = "DEADLINE_EXCEEDED"


class InternalServerError(StillroomError):
    code = "INTERNAL"


_BY_CODE: dict[str, type[StillroomError]] = {
    cls.code: cls
    for cls in (BadRequestError, AuthenticationError, PermissionDeniedError, NotFoundError,
                ConflictError, FailedPreconditionError, RateLimitError, APIConnectionError,
                APITimeoutError, InternalServerError)
}


def error_for(code: str, message: str, request_id: Optional[str] = None) -> StillroomError:
    cls = _BY_CODE.get(code, StillroomError)
    return cls(message, code=code, request_id=request_id)


def from_rpc_error(error: grpc.RpcError, request_id: Optional[str] = None) -> StillroomError:
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    return error_for(code.name, details or code.name, request_id)
