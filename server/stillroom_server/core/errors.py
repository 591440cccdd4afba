"""The core's error kinds: every error a request can meet, each with one canonical code name.

Transports turn a code into their own status (gRPC status codes, HTTP statuses); this module knows
no transport. Engine errors and store conflicts keep their own messages; anything else is a bug:
it is logged with its traceback and answered INTERNAL.
"""

from __future__ import annotations

import logging

from stillroom_server.engine.errors import (
    AlreadyExists,
    EngineUnavailable,
    FailedPrecondition,
    InvalidInput,
    NotFound,
)
from stillroom_server.store import SequenceConflict

logger = logging.getLogger("stillroom.core")

__all__ = ["AlreadyExists", "FailedPrecondition", "InvalidInput", "NotFound", "RequestConflict",
           "ResourceExhausted", "SequenceConflict", "StoredFailure", "Unauthenticated", "code_for",
           "CLIENT_CODES"]


class Unauthenticated(Exception):
    """No key, or a key the store does not know or has revoked."""


class ResourceExhausted(Exception):
    """A configured limit was reached; the message names the limit. `retryable` says whether
    waiting can help (a full queue) or not (a per-owner cap the caller must free up first)."""

    def __init__(self, message: str, retryable: bool = False, retry_after_seconds: float = 0.0) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after_seconds = retry_after_seconds


class RequestConflict(Exception):
    """A numbered request whose number an earlier, different request already took: not a retry
    (a retry repeats the body), so it is refused and nothing runs."""


class StoredFailure(Exception):
    """A request that failed with `code` and `message`, relayed as the outcome of another."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


_CODES: list[tuple[type[BaseException], str]] = [
    (InvalidInput, "INVALID_ARGUMENT"),
    (SequenceConflict, "INVALID_ARGUMENT"),
    (NotFound, "NOT_FOUND"),
    (AlreadyExists, "ALREADY_EXISTS"),
    (RequestConflict, "ALREADY_EXISTS"),
    (FailedPrecondition, "FAILED_PRECONDITION"),
    (Unauthenticated, "UNAUTHENTICATED"),
    (ResourceExhausted, "RESOURCE_EXHAUSTED"),
    (EngineUnavailable, "UNAVAILABLE"),
]

# Codes that say the caller's request was at fault (Tinker's error category "user").
CLIENT_CODES = frozenset({"INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "FAILED_PRECONDITION",
                          "UNAUTHENTICATED", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED"})


def code_for(error: BaseException) -> tuple[str, str]:
    """The canonical code name and message for `error`."""
    if isinstance(error, StoredFailure):
        return error.code, str(error)
    for cls, code in _CODES:
        if isinstance(error, cls):
            return code, str(error)
    if isinstance(error, MemoryError) or "out of memory" in str(error).lower():
        return "RESOURCE_EXHAUSTED", f"out of memory: {error}"
    logger.error("internal error", exc_info=error)
    return "INTERNAL", f"internal error: {type(error).__name__}: {error}"
