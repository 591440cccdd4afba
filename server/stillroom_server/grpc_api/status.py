"""The one place where core error codes become gRPC status codes, and the wrapper every RPC wears:
it names the caller's owner from `authorization: Bearer <key>` and answers errors with their codes.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from stillroom_server.core.errors import ResourceExhausted, code_for


def secret_from(context) -> str | None:
    header = dict(context.invocation_metadata() or ()).get("authorization", "")
    return header[len("Bearer "):].strip() if header.startswith("Bearer ") else None


def rpc(method: Callable[[Any, Any, Any, str], Awaitable[Any]]):
    """Wrap a servicer method `(self, request, context, owner)`: authenticate the caller, then
    answer any error it raises with its status code."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            owner = self.auth.owner(secret_from(context))
            return await method(self, request, context, owner)
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # noqa: BLE001 - mapped to a status code here, once
            code, message = code_for(error)
            hint = ()
            if isinstance(error, ResourceExhausted) and error.retryable:  # the SDK waits, then retries
                hint = (("retry-after-ms", str(int(error.retry_after_seconds * 1000))),)
            await context.abort(getattr(grpc.StatusCode, code), message, trailing_metadata=hint)

    return wrapper
