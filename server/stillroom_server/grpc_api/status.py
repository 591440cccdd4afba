"""The one place where core error codes become gRPC status codes, and the wrapper every RPC wears:
it names the caller's owner from `authorization: Bearer <key>` and answers errors with their codes.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from stillroom_server.core.errors import ResourceExhausted, code_for


def secret_from(context) -> str | None:
    header = dict(context.invocation_metadata() or ()).get("authorization", "")
    return header[len("Bearer "):].strip() if header.startswith("Bearer ") else None


def retry_after_ms(error: BaseException) -> int:
    """How long to wait before sending again, for a refusal that waiting clears (a full queue)."""
    if isinstance(error, ResourceExhausted) and error.retryable:
        return int(error.retry_after_seconds * 1000)
    return 0


def retry_hint(error: BaseException) -> tuple[tuple[str, str], ...]:
    """Trailing metadata telling the SDK to wait and send again, for a refusal that waiting clears."""
    wait_ms = retry_after_ms(error)
    return (("retry-after-ms", str(wait_ms)),) if wait_ms else ()


def rpc(method: Callable[[Any, Any, Any, str], Awaitable[Any]]):
    """Wrap a servicer method `(self, request, context, owner)`: authenticate the caller, then
    answer any error it raises with its status code."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        began, code = time.monotonic(), "OK"
        try:
            owner = self.auth.owner(secret_from(context))
            return await method(self, request, context, owner)
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # noqa: BLE001 - mapped to a status code here, once
            code, message = code_for(error)
            await context.abort(getattr(grpc.StatusCode, code), message, trailing_metadata=retry_hint(error))
        finally:
            self.service.telemetry.observe_request("grpc", method.__name__, code, time.monotonic() - began)

    return wrapper


def rpc_stream(method: Callable[[Any, Any, Any, str], AsyncIterator[Any]]):
    """`rpc` for a server-streaming method (an async generator `(self, request, context, owner)`)."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        began, code = time.monotonic(), "OK"
        try:
            owner = self.auth.owner(secret_from(context))
            async for message in method(self, request, context, owner):
                yield message
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # noqa: BLE001 - mapped to a status code here, once
            code, message = code_for(error)
            await context.abort(getattr(grpc.StatusCode, code), message, trailing_metadata=retry_hint(error))
        finally:  # a stream's time is until its last message
            self.service.telemetry.observe_request("grpc", method.__name__, code, time.monotonic() - began)

    return wrapper
