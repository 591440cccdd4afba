"""APIFuture: the handle every model call returns at once.

The work behind it (submitting the request, then long-polling its result) runs on the SDK's
background event loop; an APIFuture can be waited on from any thread with `.result(timeout)` or
from any event loop with `await`. It knows nothing of what the result means.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Generic, Optional, TypeVar

T = TypeVar("T")


class APIFuture(Generic[T]):
    def __init__(self, future: "concurrent.futures.Future[T]",
                 submitted: "concurrent.futures.Future[str]") -> None:
        self._future = future
        self._submitted = submitted

    @property
    def request_id(self) -> Optional[str]:
        """The server's id for this request, once it has been accepted."""
        if self._submitted.done() and not self._submitted.exception():
            return self._submitted.result()
        return None

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: Optional[float] = None) -> T:
        """Block until the result is ready; raise TimeoutError after `timeout` seconds."""
        return self._future.result(timeout)

    async def result_async(self, timeout: Optional[float] = None) -> T:
        return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._future)), timeout)

    def __await__(self):
        return self.result_async().__await__()

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"<APIFuture {self.request_id or '(submitting)'} {state}>"
