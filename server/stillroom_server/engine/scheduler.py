"""The scheduler: one worker thread that runs all model work, in order, off the event loop.

Jobs run first-in first-out, so a run's requests, queued in their sequence order, run in that
order. When the worker takes a sampling or logprob job it also takes every queued job of the same
kind for the same weights and runs them as one batch. Each job's `done` callback receives the
result or the exception. The scheduler knows nothing of what the jobs mean to clients.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Optional

logger = logging.getLogger("stillroom.scheduler")

Done = Callable[[Any, Optional[BaseException]], None]


@dataclasses.dataclass
class Job:
    kind: str                              # e.g. "forward_backward", "sample"
    run: Callable[[], Any] | None          # a single job's work; None for batchable jobs
    done: Done
    batch_key: str | None = None           # jobs with the same (kind, batch_key) run together
    payload: Any = None                    # a batchable job's input
    enqueued_at: float = dataclasses.field(default_factory=time.monotonic)


class Scheduler:
    def __init__(self, batch_runners: dict[str, Callable[[str, list[Any]], list[Any]]],
                 max_batch: int = 64) -> None:
        self._batch_runners = batch_runners
        self._max_batch = max_batch
        self._queue: collections.deque[Job] = collections.deque()
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="stillroom-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._wakeup:
            if self._stopping:
                raise RuntimeError("the scheduler is shutting down")
            self._queue.append(job)
            self._wakeup.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the queued jobs, then stop the worker."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        self._thread.join(timeout)

    def _take(self) -> list[Job] | None:
        with self._wakeup:
            while not self._queue:
                if self._stopping:
                    return None
                self._wakeup.wait()
            first = self._queue.popleft()
            if first.batch_key is None:
                return [first]
            batch, rest = [first], collections.deque()
            while self._queue:
                job = self._queue.popleft()
                same = job.kind == first.kind and job.batch_key == first.batch_key
                (batch if same and len(batch) < self._max_batch else rest).append(job)
            self._queue = rest
            return batch

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            try:
                if batch[0].run is not None:
                    outcomes = [self._attempt(batch[0].run)]
                else:
                    runner = self._batch_runners[batch[0].kind]
                    outcomes = self._attempt_batch(runner, batch)
            except BaseException as error:  # noqa: BLE001 - reported to every job
                outcomes = [(None, error)] * len(batch)
            for job, (result, error) in zip(batch, outcomes):
                try:
                    job.done(result, error)
                except Exception:  # a failing callback must not stop the worker
                    logger.exception("completion callback for a %s job failed", job.kind)

    @staticmethod
    def _attempt(run: Callable[[], Any]) -> tuple[Any, BaseException | None]:
        try:
            return run(), None
        except Exception as error:  # noqa: BLE001 - handed to the job's callback
            return None, error

    def _attempt_batch(self, runner, batch: list[Job]) -> list[tuple[Any, BaseException | None]]:
        try:
            results = runner(batch[0].batch_key, [job.payload for job in batch])
            return [(result, None) for result in results]
        except Exception as error:  # noqa: BLE001
            if len(batch) == 1:
                return [(None, error)]
            # one bad request must not fail its neighbours: run them one by one
            return [self._attempt(lambda job=job: runner(job.batch_key, [job.payload])[0]) for job in batch]
