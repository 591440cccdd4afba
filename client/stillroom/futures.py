"""APIFuture: the handle every model call returns at once; and the client futures that
`create_*` calls return, usable both as a future and as the client itself (as Tinker's
Backcompat*Future are).

The work behind a future runs on the SDK's background event loop; it can be waited on from any
thread with `.result(timeout)` or from any event loop with `await`. It knows nothing of what the
result means.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def _done(value: Any) -> concurrent.futures.Future[Any]:
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()
    future.set_result(value)
    return future


class APIFuture(Generic[T]):
    def __init__(self, future: concurrent.futures.Future[T],
                 submitted: concurrent.futures.Future[str] | None = None) -> None:
        self._future = future
        self._submitted = submitted if submitted is not None else _done("")

    @property
    def request_id(self) -> str | None:
        """The server's id for this request, once it has been accepted."""
        if self._submitted.done() and not self._submitted.exception():
            return self._submitted.result() or None
        return None

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> T:
        """Block until the result is ready; raise TimeoutError after `timeout` seconds."""
        return self._future.result(timeout)

    async def result_async(self, timeout: float | None = None) -> T:
        return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._future)), timeout)

    def future(self) -> concurrent.futures.Future[T]:
        """The underlying concurrent.futures.Future."""
        return self._future

    async def coroutine(self) -> T:
        return await self.result_async()

    def __await__(self):
        return self.result_async().__await__()

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"<APIFuture {self.request_id or '(submitting)'} {state}>"


class ValueFuture(APIFuture[T]):
    """A finished future that also reads as its value (`rest.list_checkpoints(run).checkpoints`
    and `rest.list_checkpoints(run).result().checkpoints` both work)."""

    def __init__(self, value: T) -> None:
        super().__init__(_done(value))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._future.result(), name)

    def __iter__(self):
        value: Any = self._future.result()
        return iter(value)

    def __eq__(self, other: object) -> bool:
        return self._future.result() == other

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<ValueFuture {self._future.result()!r}>"


class ClientFuture(APIFuture[T]):
    """A future of a client that can also be used directly as the client: its methods and
    attributes are the finished client's (waiting for it first)."""

    def __init__(self, future: concurrent.futures.Future[T]) -> None:
        object.__setattr__(self, "_future", future)
        object.__setattr__(self, "_submitted", _done(""))

    def _client(self) -> T:
        return self._future.result()

    async def _client_async(self) -> T:
        return await asyncio.wrap_future(self._future)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_future", "_submitted"):
            raise AttributeError(name)
        return getattr(self._client(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._client(), name, value)

    def __repr__(self) -> str:
        if not self._future.done():
            return f"<{type(self).__name__}: pending>"
        error = self._future.exception()
        return f"<{type(self).__name__}: {'failed: ' + repr(error) if error else repr(self._client())}>"


def _forwarder(name: str, method: Any) -> Any:
    if inspect.iscoroutinefunction(method):
        async def forward_async(self, *args: Any, **kwargs: Any) -> Any:
            return await getattr(await self._client_async(), name)(*args, **kwargs)
        forward_async.__name__ = forward_async.__qualname__ = name
        forward_async.__doc__ = method.__doc__
        return forward_async

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self._client(), name)(*args, **kwargs)
    forward.__name__ = forward.__qualname__ = name
    forward.__doc__ = method.__doc__
    return forward


C = TypeVar("C", bound=type)


def forwarding(client_cls: type) -> Callable[[C], C]:
    """Class decorator for a ClientFuture subclass that also derives from `client_cls` (for
    isinstance checks): every public method of `client_cls` is forwarded to the finished client."""

    def decorate(cls: C) -> C:
        for attr, value in vars(client_cls).items():
            if callable(value) and not attr.startswith("_"):
                setattr(cls, attr, _forwarder(attr, value))
        return cls

    return decorate
