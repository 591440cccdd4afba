"""Typed errors raised by the SDK, one class per gRPC status code.

Every error carries the status `code` (a grpc.StatusCode name) and, where the failure belongs to a
submitted request, its `request_id`. The classes and their bases are Tinker's (TinkerError >
APIError > APIStatusError > BadRequestError, ...), so `except tinker.X` code ports. Only
UNAVAILABLE is retried by the SDK itself.
"""

from __future__ import annotations

import grpc


class TinkerError(Exception):
    """Base class of every error the SDK raises (Tinker's name; `StillroomError` is the same)."""

    code: str = "UNKNOWN"
    status_code: int | None = None

    def __init__(self, message: str, *, code: str | None = None,
                 request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.request_id = request_id
        self.body: object | None = None

    def __str__(self) -> str:
        suffix = f" (request {self.request_id})" if self.request_id else ""
        return f"{self.code}: {self.message}{suffix}"


StillroomError = TinkerError


class APIError(TinkerError):
    """An error from the server or the connection to it."""


class APIStatusError(APIError):
    """The server answered with an error status; `status_code` is its HTTP equivalent."""

    status_code: int | None = 500


class APIResponseValidationError(APIError):
    """The server's answer did not have the expected shape."""


class RequestFailedError(TinkerError):
    """A request the server accepted finished in a failed state (Tinker's name; Stillroom raises
    the typed errors below, which carry the request id)."""

    def __init__(self, message: str, request_id: str | None = None, category: str = "unknown") -> None:
        super().__init__(message, code="FAILED", request_id=request_id)
        self.category = category


class BadRequestError(APIStatusError):
    code = "INVALID_ARGUMENT"
    status_code = 400


class AuthenticationError(APIStatusError):
    code = "UNAUTHENTICATED"
    status_code = 401


class BillingError(APIStatusError):
    """Never raised by Stillroom (no billing); here so code written for Tinker imports."""

    code = "BILLING"
    status_code = 402


class PermissionDeniedError(APIStatusError):
    code = "PERMISSION_DENIED"
    status_code = 403


class NotFoundError(APIStatusError):
    code = "NOT_FOUND"
    status_code = 404


class ConflictError(APIStatusError):
    code = "ALREADY_EXISTS"
    status_code = 409


class UnprocessableEntityError(APIStatusError):
    code = "UNPROCESSABLE"
    status_code = 422


class FailedPreconditionError(APIStatusError):
    """Stillroom's addition: the thing is in the wrong state (e.g. a run whose weights were lost)."""

    code = "FAILED_PRECONDITION"
    status_code = 400


class RateLimitError(APIStatusError):
    code = "RESOURCE_EXHAUSTED"
    status_code = 429


class InternalServerError(APIStatusError):
    code = "INTERNAL"
    status_code = 500


class APIConnectionError(APIError):
    """The server could not be reached (UNAVAILABLE), after the SDK's retries."""

    code = "UNAVAILABLE"


class APITimeoutError(APIConnectionError):
    code = "DEADLINE_EXCEEDED"


_BY_CODE: dict[str, type[StillroomError]] = {
    cls.code: cls
    for cls in (BadRequestError, AuthenticationError, PermissionDeniedError, NotFoundError,
                ConflictError, FailedPreconditionError, RateLimitError, APIConnectionError,
                APITimeoutError, InternalServerError)
}


def error_for(code: str, message: str, request_id: str | None = None) -> StillroomError:
    cls = _BY_CODE.get(code, StillroomError)
    return cls(message, code=code, request_id=request_id)


def from_rpc_error(error: grpc.RpcError, request_id: str | None = None) -> StillroomError:
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    return error_for(code.name, details or code.name, request_id)
