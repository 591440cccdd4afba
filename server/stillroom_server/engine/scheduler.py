"""The scheduler: one worker thread that runs all model work, off the event loop, fairly.

Every job belongs to a lane (a training run, or one owner's sampling). Within a lane jobs run
first-in first-out, so a run's requests, queued in their sequence order, run in that order; across
lanes the worker takes turns, so one lane's long queue (a sampling storm, a big training loop)
delays another lane by at most one job per turn. When the worker takes a sampling or logprob job it
also takes every queued job of the same kind for the same weights, from any lane, and runs them as
one batch. Each job's `done` callback receives the result or the exception. The scheduler knows
nothing of what the jobs mean to clients.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("stillroom.scheduler")

Done = Callable[[Any, BaseException | None], None]


@dataclasses.dataclass
class Job:
    kind: str                              # e.g. "forward_backward", "sample"
    run: Callable[[], Any] | None          # a single job's work; None for batchable jobs
    done: Done
    lane: str = ""                         # jobs of one lane run in order; lanes take turns
    batch_key: str | None = None           # jobs with the same (kind, batch_key) run together
    payload: Any = None                    # a batchable job's input
    enqueued_at: float = dataclasses.field(default_factory=time.monotonic)


class Scheduler:
    def __init__(self, batch_runners: dict[str, Callable[[str, list[Any]], list[Any]]],
                 max_batch: int = 64) -> None:
        self._batch_runners = batch_runners
        self._max_batch = max_batch
        self._lanes: collections.OrderedDict[str, collections.deque[Job]] = collections.OrderedDict()
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="stillroom-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._wakeup:
            if self._stopping:
                raise RuntimeError("the scheduler is shutting down")
            self._lanes.setdefault(job.lane, collections.deque()).append(job)
            self._wakeup.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the queued jobs, then stop the worker."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        self._thread.join(timeout)

    def _take(self) -> list[Job] | None:
        with self._wakeup:
            while not self._lanes:
                if self._stopping:
                    return None
                self._wakeup.wait()
            lane, queue = next(iter(self._lanes.items()))
            first = queue.popleft()
            self._lanes.move_to_end(lane)  # the next turn goes to the next lane
            batch = [first]
            if first.batch_key is not None:
                for other in self._lanes.values():
                    for job in [j for j in other if j.kind == first.kind and j.batch_key == first.batch_key]:
                        if len(batch) == self._max_batch:
                            break
                        other.remove(job)
                        batch.append(job)
            for name in [name for name, jobs in self._lanes.items() if not jobs]:
                del self._lanes[name]
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
