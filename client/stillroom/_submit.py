"""Model calls sent together: calls made at about the same moment travel in one `Submit` message,
and their results come back on its stream as each finishes (one RPC for many calls, instead of a
send and a long poll for each). A call made while nothing is being sent goes at once, alone.

If a stream is lost after its calls were accepted, their results are long-polled by id, as the
unary calls' are. Runs on the connection's event loop; knows the Submit messages and the retry
rules, not what the calls mean.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from stillroom import errors
from stillroom._proto import stillroom_pb2 as pb

if TYPE_CHECKING:
    from stillroom._connection import Connection

logger = logging.getLogger("stillroom")
MAX_ITEMS = 256     # calls in one Submit
MAX_OPENING = 2     # Submits sent and not yet answered; calls made meanwhile wait and go together
UNARY = {"sample": "Sample", "compute_logprobs": "ComputeLogprobs", "forward_backward": "ForwardBackward",
         "optim_step": "OptimStep"}  # each call's own RPC, for a server that has no Submit


@dataclass
class _Call:
    item: pb.SubmitItem
    accepted: asyncio.Future[str]
    result: asyncio.Future[pb.FutureResult]


def _settle(future: asyncio.Future, result: pb.FutureResult) -> None:
    if future.done():
        return
    if result.status == pb.DONE:
        future.set_result(result)
    else:
        future.set_exception(errors.error_for(result.error.code, result.error.message, result.request_id))


def _fail(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


class Submitter:
    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._queue: list[_Call] = []
        self._opening = 0
        self._launch_queued = False
        self._tasks: set[asyncio.Task] = set()
        self.unary = False  # the server has no Submit (older than it): every call goes on its own

    async def send(self, item: pb.SubmitItem) -> tuple[str, asyncio.Future[pb.FutureResult]]:
        """Send one call (with whatever else is being sent now); return its request id once the
        server accepted it, and a future of its finished result (raising the typed error of a
        failed request). A refusal raises here, as the unary call's would."""
        loop = asyncio.get_running_loop()
        call = _Call(item, loop.create_future(), loop.create_future())
        if self.unary:
            self._spawn(self._unary(call))
            return await call.accepted, call.result
        self._queue.append(call)
        if not self._launch_queued:  # calls made in this turn of the loop go together
            self._launch_queued = True
            loop.call_soon(self._launch)
        return await call.accepted, call.result

    def _launch(self) -> None:
        self._launch_queued = False
        while self._queue and self._opening < MAX_OPENING:
            batch, self._queue = self._queue[:MAX_ITEMS], self._queue[MAX_ITEMS:]
            self._opening += 1
            self._spawn(self._run(batch))

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _answered(self) -> None:
        self._opening -= 1
        self._launch()

    async def _run(self, batch: list[_Call]) -> None:
        try:
            stream, accepted = await self._open(batch)
        except BaseException as error:
            self._answered()
            if isinstance(error, errors.StillroomError) and error.code == "UNIMPLEMENTED":
                self.unary = True  # an older server: send these (and every later call) on their own
                await asyncio.gather(*(self._unary(call) for call in batch))
                return
            for call in batch:
                _fail(call.accepted, error)
            if not isinstance(error, Exception):
                raise
            return
        self._answered()
        waiting: dict[str, _Call] = {}
        for call, answer in zip(batch, accepted):
            if answer.request_id:
                waiting[answer.request_id] = call
                call.accepted.set_result(answer.request_id)
            elif answer.retry_after_ms > 0:  # a full queue: wait as told, then send it again
                self._later(call, answer.retry_after_ms)
            else:
                _fail(call.accepted, errors.error_for(answer.refused.code, answer.refused.message))
        try:
            while waiting and isinstance(event := await stream.read(), pb.SubmitEvent):  # else EOF
                call = waiting.pop(event.result.request_id, None)
                if call is not None:
                    _settle(call.result, event.result)
        except Exception:  # noqa: BLE001 - the stream was lost: poll what it did not answer
            logger.debug("a Submit stream ended early; polling %d results", len(waiting), exc_info=True)
        await asyncio.gather(*(self._poll(request_id, call) for request_id, call in waiting.items()))

    async def _open(self, batch: list[_Call]):
        """Send the batch; return its stream and the per-item answers (retrying as `call` does)."""
        request = pb.SubmitRequest(items=[call.item for call in batch])

        async def once():
            stream = self._connection.stub.Submit(request, metadata=self._connection.metadata)
            first = await stream.read()
            if not isinstance(first, pb.SubmitEvent):  # EOF
                raise errors.APIConnectionError("Submit: the server ended the stream before answering")
            return stream, first.accepted

        return await self._connection.with_retries("Submit", once)

    def _later(self, call: _Call, wait_ms: float) -> None:
        async def again() -> None:
            await asyncio.sleep(max(wait_ms, 50.0) / 1000 * (0.5 + random.random()))
            self._queue.append(call)
            self._launch()

        self._spawn(again())

    async def _unary(self, call: _Call) -> None:
        """The call on its own RPC, its result long-polled (as before Submit existed)."""
        field = call.item.WhichOneof("call")
        assert field is not None, "a Submit item names its call"
        try:
            ref = await self._connection.call(UNARY[field], getattr(call.item, field))
        except Exception as error:  # noqa: BLE001 - the call's own refusal
            _fail(call.accepted, error)
            return
        call.accepted.set_result(ref.request_id)
        await self._poll(ref.request_id, call)

    async def _poll(self, request_id: str, call: _Call) -> None:
        try:
            _settle(call.result, await self._connection.wait_for(request_id))
        except Exception as error:  # noqa: BLE001 - the call's own outcome
            _fail(call.result, error)
