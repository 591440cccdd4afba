"""Futures: pending work recorded in the store, completed from any thread, long-polled by clients.

A result is stored as a serialized Stillroom `FutureResult` message: that is the store's format for
results (core/results.py writes it); each transport re-encodes it. Outcomes are handed over from
the engine's worker without touching the store there: the event loop encodes them and records a
whole batch in one transaction, and only then wakes the pollers, so a result is never reported
before it is stored. Recent outcomes and this process's pending requests are answered from memory;
anything else (an older result, another process's) is read from the store.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from stillroom._proto import stillroom_pb2 as pb
from stillroom_server.core.errors import code_for
from stillroom_server.store import Store
from stillroom_server.store.repo import FutureOutcome, FutureRecord

MAX_POLL_SECONDS = 30.0
KEEP_RESULTS = 4096             # recent outcomes answered from memory (older ones from the store)
KEEP_RESULT_BYTES = 64 << 20
logger = logging.getLogger("stillroom.futures")

Encode = Callable[[Any], pb.FutureResult]


def new_request_id() -> str:
    return "req-" + uuid.uuid4().hex


def result_of(record: FutureRecord) -> pb.FutureResult:
    """A finished request's stored result."""
    assert record.status == "done" and record.result is not None, record.status
    return pb.FutureResult.FromString(record.result)


@dataclass
class _Pending:
    owner: str
    kind: str
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    listeners: list[asyncio.Queue[FutureRecord]] = field(default_factory=list)


class FutureHub:
    def __init__(self, store: Store, loop: asyncio.AbstractEventLoop) -> None:
        self.store = store
        self.loop = loop
        self._pending: dict[str, _Pending] = {}          # this process's unfinished requests
        self._recent: collections.OrderedDict[str, FutureRecord] = collections.OrderedDict()
        self._recent_bytes = 0
        self._arrived: list[tuple[str, Any, BaseException | None, Encode | None]] = []
        self._lock = threading.Lock()                    # guards _arrived and _flush_queued
        self._flush_queued = False
        self._batch: list[tuple[str, str, str]] | None = None  # rows to create together

    # ---------------------------------------------------------------- on the event loop

    def create(self, request_id: str, owner: str, kind: str) -> None:
        """Record a new pending request (in the store before its id is answered: it survives a
        crash as pending). Inside `batched()`, the rows are written together when it ends."""
        if self._batch is not None:
            self._batch.append((request_id, owner, kind))
        else:
            self.store.create_future(request_id, owner, kind)
        self.watch(request_id, owner, kind)

    @contextlib.contextmanager
    def batched(self) -> Iterator[None]:
        """Write the pending rows of every request created inside in one transaction at the end.
        The caller must not await inside: outcomes are recorded on this loop, so none can be
        recorded before its pending row is."""
        assert self._batch is None, "batches do not nest"
        self._batch = []
        try:
            yield
        finally:
            rows, self._batch = self._batch, None
            self.store.create_futures(rows)

    def watch(self, request_id: str, owner: str, kind: str) -> None:
        """Follow a request the store already holds as pending, before its job is queued."""
        self._pending.setdefault(request_id, _Pending(owner, kind))

    async def wait(self, request_id: str, owner: str, timeout: float) -> FutureRecord | None:
        """The request's record once it is finished, or still pending after `timeout` seconds;
        None if it does not exist or is someone else's."""
        record = self._known(request_id)
        if record is None:
            return None
        if record.owner != owner:
            return None
        if record.status != "pending":
            return record
        pending = self._pending.get(request_id)
        if pending is None:  # pending in the store only (no job of this process): look again later
            await asyncio.sleep(min(max(timeout, 0.0), 1.0))
            return self._known(request_id)
        try:
            await asyncio.wait_for(pending.settled.wait(), min(max(timeout, 0.0), MAX_POLL_SECONDS))
        except asyncio.TimeoutError:
            return record
        return self._known(request_id)

    async def settled(self, request_ids: list[str], owner: str) -> AsyncIterator[FutureRecord]:
        """Each of the owner's requests' records as it finishes, in the order they finish. A request
        this process is not running and the store holds as pending is left out (poll it)."""
        queue: asyncio.Queue[FutureRecord] = asyncio.Queue()
        expected = 0
        for request_id in request_ids:
            record = self._known(request_id)
            if record is None or record.owner != owner:
                continue
            if record.status != "pending":
                queue.put_nowait(record)
            elif (pending := self._pending.get(request_id)) is not None:
                pending.listeners.append(queue)
            else:
                continue
            expected += 1
        for _ in range(expected):
            yield await queue.get()

    def _known(self, request_id: str) -> FutureRecord | None:
        if (record := self._recent.get(request_id)) is not None:
            return record
        if (pending := self._pending.get(request_id)) is not None:
            return FutureRecord(request_id, pending.owner, pending.kind, "pending", None, None, None)
        return self.store.get_future(request_id)

    # ---------------------------------------------------------------- from any thread

    def complete(self, request_id: str, result: Any, error: BaseException | None,
                 encode: Encode | None = None) -> None:
        """Hand over a request's outcome: `result` is a FutureResult, or what `encode` makes one
        of (encoded on the event loop, not on the caller's thread). Cheap: no store access here."""
        with self._lock:
            self._arrived.append((request_id, result, error, encode))
            if self._flush_queued:
                return
            self._flush_queued = True
        self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        """Record every outcome handed over since the last flush in one transaction, then wake."""
        with self._lock:
            arrived, self._arrived, self._flush_queued = self._arrived, [], False
        outcomes = [self._outcome(*item) for item in arrived]
        try:
            self.store.settle_futures(outcomes)
        except Exception:  # noqa: BLE001 - the store is down: pollers see them pending, as before
            logger.exception("could not record %d finished requests", len(outcomes))
            return
        for outcome in outcomes:
            pending = self._pending.pop(outcome.id, None)
            if pending is None:
                continue
            record = FutureRecord(outcome.id, pending.owner, pending.kind, outcome.status,
                                  outcome.result, outcome.error_code, outcome.error_message)
            self._remember(record)
            pending.settled.set()
            for queue in pending.listeners:
                queue.put_nowait(record)

    @staticmethod
    def _outcome(request_id: str, result: Any, error: BaseException | None,
                 encode: Encode | None) -> FutureOutcome:
        if error is None:
            try:
                message = encode(result) if encode is not None else result
                assert isinstance(message, pb.FutureResult), "a finished request has a result"
                message.request_id, message.status = request_id, pb.DONE
                return FutureOutcome(request_id, "done", message.SerializeToString(), None, None)
            except Exception as failure:  # noqa: BLE001 - a result we cannot encode fails the request
                logger.exception("could not encode the result of %s", request_id)
                error = failure
        code, text = code_for(error)
        return FutureOutcome(request_id, "failed", None, code, text)

    def _remember(self, record: FutureRecord) -> None:
        self._recent[record.id] = record
        self._recent_bytes += len(record.result or b"")
        while len(self._recent) > KEEP_RESULTS or self._recent_bytes > KEEP_RESULT_BYTES:
            _, old = self._recent.popitem(last=False)
            self._recent_bytes -= len(old.result or b"")

    # ---------------------------------------------------------------- encoding

    @staticmethod
    def to_pb(record: FutureRecord) -> pb.FutureResult:
        if record.status == "done":
            return result_of(record)
        if record.status == "failed":
            return pb.FutureResult(request_id=record.id, status=pb.FAILED,
                                   error=pb.FutureError(code=record.error_code,
                                                        message=record.error_message or ""))
        return pb.FutureResult(request_id=record.id, status=pb.PENDING)
