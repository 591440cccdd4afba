"""The SDK's one connection to a server: a gRPC channel driven by a background event loop.

All clients made from one ServiceClient share it. It sends calls (retrying UNAVAILABLE with
backoff, which is safe because every model call is idempotent by its request number, and a
RESOURCE_EXHAUSTED refusal that carries `retry-after-ms` after that wait), long-polls
futures, and turns gRPC failures into typed errors. It knows nothing of training or sampling.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import grpc

from stillroom import errors
from stillroom._proto import stillroom_pb2 as pb
from stillroom._proto import stillroom_pb2_grpc as pb_grpc
from stillroom._submit import Submitter
from stillroom.futures import APIFuture

T = TypeVar("T")
Accepted = tuple[str, Awaitable[pb.FutureResult]]   # a Submit call's request id and result
logger = logging.getLogger("stillroom")

MAX_MESSAGE_BYTES = 1 << 30
POLL_SECONDS = 20.0
MAX_CALLS_IN_FLIGHT = 64   # requests sent at once; more wait here (thousands at once came back CANCELLED)
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
]


TLS_SCHEMES = ("grpcs://", "https://")
DEFAULT_BASE_URL = "localhost:50051"


def connection_settings(base_url: str | None, api_key: str | None) -> tuple[str, str | None]:
    """The server address and key: the arguments, else STILLROOM_BASE_URL / STILLROOM_API_KEY."""
    import os

    return (base_url or os.environ.get("STILLROOM_BASE_URL") or DEFAULT_BASE_URL,
            api_key or os.environ.get("STILLROOM_API_KEY"))


def normalize_target(base_url: str) -> str:
    for scheme in ("grpc://", "http://", "stillroom://", *TLS_SCHEMES):
        if base_url.startswith(scheme):
            base_url = base_url[len(scheme):]
    return base_url.rstrip("/")


def retry_after_ms(error: grpc.aio.AioRpcError) -> float | None:
    """The wait a RESOURCE_EXHAUSTED refusal asks for (trailing `retry-after-ms`), if it says that
    waiting helps; None for every other error."""
    if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    for key, value in error.trailing_metadata() or ():
        if key == "retry-after-ms":
            return float(value)
    return None


def is_http1(error: grpc.aio.AioRpcError) -> bool:
    """The address answered HTTP/1.1: a web server, such as a Stillroom server's HTTP port."""
    details = error.details() or ""
    return "http1.x server" in details or "Failed parsing HTTP/2" in details


def unreachable_reason(error: grpc.aio.AioRpcError) -> str | None:
    """Why no connection was made (nothing listens, no such host), if that is what failed."""
    details = error.details() or ""
    if "failed to connect" not in details.lower() and "DNS resolution failed" not in details:
        return None
    return details.rsplit(": ", 1)[-1]   # "Connection refused", "Domain name not found", ...


def http1_message(target: str) -> str:
    host, _, port = target.rpartition(":")
    grpc_port = f" ({host}:{int(port) - 1}?)" if port.isdigit() else ""
    return (f"{target} answers HTTP/1.1, not gRPC: it looks like a Stillroom server's HTTP port (for the "
            "official tinker SDK and downloads). Stillroom's SDK and `stillroom` commands take its gRPC "
            f"port, by default the HTTP port - 1{grpc_port}; `stillroom serve` prints both at start")


def no_server_message(target: str, reason: str) -> str:
    return (f"no Stillroom server answers at {target} ({reason}). Is one running? `stillroom serve` starts "
            "one and prints its gRPC address: give that as base_url= or STILLROOM_BASE_URL (--base-url "
            "for `stillroom` commands)")


class Connection:
    def __init__(self, base_url: str, api_key: str | None, max_retries: int = 6,
                 tls_root_cert: str | None = None) -> None:
        self.target = normalize_target(base_url)
        # TLS with a grpcs:// or https:// address, or a root certificate to trust (else the system's)
        self.tls = base_url.startswith(TLS_SCHEMES) or tls_root_cert is not None
        self.tls_root_cert = tls_root_cert
        self.max_retries = max_retries
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._sending: asyncio.Semaphore | None = None   # made on the connection's loop
        self._submitter: Submitter | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="stillroom-connection")
        self._thread.start()
        self._channel: grpc.aio.Channel = self.run(self._open())
        self.stub = pb_grpc.StillroomStub(self._channel)

    async def _open(self) -> grpc.aio.Channel:
        if not self.tls:
            return grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        roots = open(self.tls_root_cert, "rb").read() if self.tls_root_cert else None
        return grpc.aio.secure_channel(self.target, grpc.ssl_channel_credentials(roots),
                                       options=CHANNEL_OPTIONS)

    # ---------------------------------------------------------------- running coroutines

    def spawn(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return self.spawn(coro).result(timeout)

    async def run_async(self, coro: Coroutine[Any, Any, T]) -> T:
        return await asyncio.wrap_future(self.spawn(coro))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self.run(self._channel.close(), timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    # ---------------------------------------------------------------- calls

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    async def call(self, method: str, request: Any, timeout: float | None = 60.0,
                   retry: bool = True) -> Any:
        """One unary call, retried with jittered backoff while the server is UNAVAILABLE.

        Pass retry=False for a call that is not safe to repeat (one that creates something
        without a request number): it fails at once with a clear error instead."""
        rpc = getattr(self.stub, method)

        async def once() -> Any:
            if method == "RetrieveFuture":
                return await rpc(request, metadata=self._metadata, timeout=timeout)
            if self._sending is None:
                self._sending = asyncio.Semaphore(MAX_CALLS_IN_FLIGHT)
            async with self._sending:
                return await rpc(request, metadata=self._metadata, timeout=timeout)

        return await self.with_retries(method, once, retry)

    async def with_retries(self, method: str, once: Callable[[], Awaitable[T]], retry: bool = True) -> T:
        """`once()`, again after a RESOURCE_EXHAUSTED refusal that says to wait, and with jittered
        backoff while the server is UNAVAILABLE (unless `retry` is False); typed errors otherwise."""
        delay = 0.1
        attempt = 0
        started = time.monotonic()
        while True:
            try:
                return await once()
            except grpc.aio.AioRpcError as error:
                wait_ms = retry_after_ms(error)
                if wait_ms is not None:  # a full queue refused it (and changed nothing): wait as told
                    await asyncio.sleep(max(wait_ms, 50.0) / 1000 * (0.5 + random.random()))
                    continue
                attempt += 1
                unavailable = error.code() == grpc.StatusCode.UNAVAILABLE
                unreachable = unreachable_reason(error) if unavailable else None
                if unavailable and is_http1(error):   # waiting will not change what answers there
                    raise errors.APIConnectionError(f"{method}: {http1_message(self.target)}") from None
                if unavailable and not retry:
                    raise errors.APIConnectionError(
                        f"{method}: {no_server_message(self.target, unreachable)}; not retried"
                        if unreachable else
                        f"{method}: server unavailable ({error.details()}); not retried, because "
                        "the server may have acted on it: check with the RestClient, then call again"
                    ) from None
                if unreachable and attempt > self.max_retries:
                    raise errors.APIConnectionError(
                        f"{method}: {no_server_message(self.target, unreachable)} (tried for "
                        f"{time.monotonic() - started:.1f} s)") from None
                if not unavailable or attempt > self.max_retries:
                    raise errors.from_rpc_error(error) from None
                logger.warning("%s: server unavailable at %s (%s); retrying in %.1fs", method, self.target,
                               unreachable or error.details(), delay)
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 5.0)

    async def wait_for(self, request_id: str) -> pb.FutureResult:
        """Long-poll a future until it is done; raise its error if it failed."""
        while True:
            result = await self.call(
                "RetrieveFuture",
                pb.RetrieveFutureRequest(request_id=request_id, timeout_seconds=POLL_SECONDS),
                timeout=POLL_SECONDS + 30,
            )
            if result.status == pb.DONE:
                return result
            if result.status == pb.FAILED:
                raise errors.error_for(result.error.code, result.error.message, request_id)

    def submit(self, send: Callable[[], Awaitable[pb.FutureRef | Accepted]],
               parse: Callable[[pb.FutureResult], T]) -> APIFuture[T]:
        """Send a request with `send` and return an APIFuture for its parsed result. `send` answers
        with a FutureRef (its result is then long-polled) or, for a call sent through `Submit`,
        with its request id and a future of its result."""
        submitted: concurrent.futures.Future[str] = concurrent.futures.Future()

        async def send_then_wait() -> T:
            try:
                ref = await send()
            except BaseException as error:
                submitted.set_exception(error)
                raise
            if isinstance(ref, pb.FutureRef):
                request_id, result = ref.request_id, self.wait_for(ref.request_id)
            else:
                request_id, result = ref
            submitted.set_result(request_id)
            return parse(await result)

        return APIFuture(self.spawn(send_then_wait()), submitted)

    def submit_item(self, item: pb.SubmitItem, parse: Callable[[pb.FutureResult], T]) -> APIFuture[T]:
        """Send one call through `Submit`, together with other calls made at the same moment."""
        return self.submit(lambda: self.submitter().send(item), parse)

    def submitter(self) -> Submitter:
        """The connection's Submit batcher (made on the connection's loop)."""
        if self._submitter is None:
            self._submitter = Submitter(self)
        return self._submitter

    async def submit_async(self, send: Callable[[], Awaitable[pb.FutureRef | Accepted]],
                           parse: Callable[[pb.FutureResult], T]) -> APIFuture[T]:
        """Like `submit`, but return only once the server has accepted the request."""
        future = self.submit(send, parse)
        await asyncio.wrap_future(future._submitted)
        return future
