"""Futures: pending work recorded in the store, completed from the engine's worker thread, and
long-polled by clients. A result is stored as a serialized Stillroom `FutureResult` message: that
is the store's format for results (core/results.py writes it); each transport re-encodes it."""

from __future__ import annotations

import asyncio
import uuid

from stillroom._proto import stillroom_pb2 as pb
from stillroom_server.core.errors import code_for
from stillroom_server.store import Store
from stillroom_server.store.repo import FutureRecord

MAX_POLL_SECONDS = 30.0


def new_request_id() -> str:
    return "req-" + uuid.uuid4().hex


def result_of(record: FutureRecord) -> pb.FutureResult:
    """A finished request's stored result."""
    assert record.status == "done" and record.result is not None, record.status
    return pb.FutureResult.FromString(record.result)


class FutureHub:
    def __init__(self, store: Store, loop: asyncio.AbstractEventLoop) -> None:
        self.store = store
        self.loop = loop
        self._waiters: dict[str, asyncio.Event] = {}

    def watch(self, request_id: str) -> None:
        """Called on the event loop when a future is created, before its job is queued."""
        self._waiters.setdefault(request_id, asyncio.Event())

    def complete(self, request_id: str, result: pb.FutureResult | None,
                 error: BaseException | None) -> None:
        """Called from the worker thread: store the outcome, then wake the pollers."""
        if error is None:
            assert result is not None, "a finished request has a result"
            result.request_id, result.status = request_id, pb.DONE
            self.store.finish_future(request_id, result.SerializeToString())
        else:
            code, message = code_for(error)
            self.store.fail_future(request_id, code, message)
        self.loop.call_soon_threadsafe(self._wake, request_id)

    def _wake(self, request_id: str) -> None:
        event = self._waiters.pop(request_id, None)
        if event is not None:
            event.set()

    async def wait(self, request_id: str, owner: str, timeout: float) -> FutureRecord | None:
        record = self.store.get_future(request_id)
        if record is None or record.owner != owner:
            return None
        if record.status == "pending":
            event = self._waiters.setdefault(request_id, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), min(max(timeout, 0.0), MAX_POLL_SECONDS))
            except asyncio.TimeoutError:
                return record
            record = self.store.get_future(request_id)
        return record

    @staticmethod
    def to_pb(record: FutureRecord) -> pb.FutureResult:
        if record.status == "done":
            return result_of(record)
        if record.status == "failed":
            return pb.FutureResult(request_id=record.id, status=pb.FAILED,
                                   error=pb.FutureError(code=record.error_code,
                                                        message=record.error_message or ""))
        return pb.FutureResult(request_id=record.id, status=pb.PENDING)
