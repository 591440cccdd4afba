"""The scheduler decides, the executor executes (the split of vLLM's engine core).

`Policy` is pure (no threads): it holds queued jobs by lane and the streams of batchable jobs, and
`next_batch()` says what runs next: start a lane's next job, resume a job parked between two of
its steps (a training micro-batch), or step a stream (one continuous-batching step of sampling,
or one logprob forward). Lanes and streams take turns one step each, so a short request waits for
at most one step of each busy lane, never for a whole long job. A lane's jobs run one at a time in
submission order, and a parked job is resumed before its lane's next job starts, so a training
run's requests run in order and nothing of the run runs between its micro-batches.

`Scheduler` is the executor: one thread that runs what the policy returns. A job runs on a fiber
(a thread that works only while the executor waits for it), so it can park itself at `pause()`.
Only one thread does model work at any moment. Knows nothing of what jobs mean to clients.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

logger = logging.getLogger("stillroom.scheduler")

Done = Callable[[Any, BaseException | None], None]
Outcome = tuple["Job", Any, BaseException | None]


@dataclasses.dataclass
class Job:
    kind: str                              # e.g. "forward_backward", "sample"
    run: Callable[[], Any] | None          # a single job's work; None for batchable jobs
    done: Done
    lane: str = ""                         # jobs of one lane run in order; lanes take turns
    batch_key: str | None = None           # batchable jobs with the same stream key run together
    payload: Any = None                    # a batchable job's input
    trace: Any = None                      # the caller's label for it, handed back to the observer
    enqueued_at: float = dataclasses.field(default_factory=time.monotonic)
    started_at: float | None = None        # when the executor first worked on it


class Stream(Protocol):
    """Batchable jobs worked on a step at a time (rows join and leave between steps)."""

    def add(self, jobs: list[Job]) -> None: ...
    def step(self) -> list[Outcome]: ...     # the jobs that finished in this step
    def busy(self) -> bool: ...
    def drain(self) -> list[Job]: ...        # every unfinished job, taken out


class Streams(Protocol):
    def key(self, job: Job) -> str: ...      # jobs with one key share a stream
    def make(self, key: str) -> Stream: ...


@dataclasses.dataclass
class Decision:
    action: str                            # "start" | "resume" | "step"
    lane: str                              # a job lane, or a stream's key
    job: Job | None = None                 # start: the job
    joining: list[Job] = dataclasses.field(default_factory=list)  # step: jobs that join the stream


STREAM = "stream:"


class Policy:
    """What runs next. Call `submit`, then `next_batch()`; report back with `parked(lane)` or
    `finished(lane)` after a start or resume, and `stepped(key, busy)` after a step."""

    def __init__(self, stream_key: Callable[[Job], str]) -> None:
        self._stream_key = stream_key
        self._queues: dict[str, collections.deque[Job]] = {}
        self._joining: dict[str, list[Job]] = {}
        self._busy: set[str] = set()       # streams with work in flight
        self._parked: set[str] = set()     # lanes whose job waits to be resumed
        self._turns: collections.OrderedDict[str, None] = collections.OrderedDict()

    def submit(self, job: Job) -> None:
        if job.run is None:
            name = STREAM + self._stream_key(job)
            self._joining.setdefault(name, []).append(job)
        else:
            name = job.lane
            self._queues.setdefault(name, collections.deque()).append(job)
        self._turns.setdefault(name, None)

    def next_batch(self) -> Decision | None:
        for name in list(self._turns):
            decision = self._decide(name)
            if decision is not None:
                self._turns.move_to_end(name)  # the next turn goes to the next lane
                return decision
            del self._turns[name]              # nothing to do: it rejoins the turns on submit
        return None

    def _decide(self, name: str) -> Decision | None:
        if name.startswith(STREAM):
            joining = self._joining.pop(name, [])
            if joining or name in self._busy:
                return Decision("step", name[len(STREAM):], joining=joining)
            return None
        if name in self._parked:
            self._parked.discard(name)
            return Decision("resume", name)
        queue = self._queues.get(name)
        if queue:
            return Decision("start", name, job=queue.popleft())
        self._queues.pop(name, None)
        return None

    def parked(self, lane: str) -> None:
        self._parked.add(lane)
        self._turns.setdefault(lane, None)

    def finished(self, lane: str) -> None:
        """The lane's running job is done (nothing to record: its next job may start)."""

    def stepped(self, key: str, busy: bool) -> None:
        name = STREAM + key
        if busy:
            self._busy.add(name)
            self._turns.setdefault(name, None)
        else:
            self._busy.discard(name)

    def queued_by_kind(self) -> collections.Counter[str]:
        """Jobs waiting to start or to join a stream, by kind."""
        waiting = [job for queue in self._queues.values() for job in queue]
        waiting += [job for jobs in self._joining.values() for job in jobs]
        return collections.Counter(job.kind for job in waiting)

    def queued(self) -> int:
        return sum(len(q) for q in self._queues.values()) + sum(len(j) for j in self._joining.values())

    def idle(self) -> bool:
        return not (self._turns or self._parked or self._busy)


# ------------------------------------------------------------------------------------ fibers

_current = threading.local()


def pause() -> None:
    """Called by a job between its steps: let the executor run other work, then go on. A no-op
    outside the scheduler (a direct call into the engine runs straight through)."""
    fiber = getattr(_current, "fiber", None)
    if fiber is not None:
        fiber.pause()


class _Fiber:
    """A reusable thread that runs one job at a time, handing control back and forth with the
    executor, so exactly one of the two runs at any moment."""

    def __init__(self) -> None:
        self._go = threading.Semaphore(0)
        self._back = threading.Semaphore(0)
        self.job: Job | None = None
        self.outcome: tuple[Any, BaseException | None] | None = None
        threading.Thread(target=self._main, name="stillroom-job", daemon=True).start()

    def _main(self) -> None:
        _current.fiber = self
        while True:
            self._go.acquire()
            job = self.job
            assert job is not None and job.run is not None
            try:
                self.outcome = (job.run(), None)
            except BaseException as error:  # noqa: BLE001 - handed to the job's callback
                self.outcome = (None, error)    # (the executor must get the baton back, always)
            self._back.release()

    def start(self, job: Job) -> None:
        self.job, self.outcome = job, None
        self.resume()

    def pause(self) -> None:               # on the fiber's own thread
        self._back.release()
        self._go.acquire()

    def resume(self) -> None:              # on the executor's thread: run until it parks or ends
        self._go.release()
        self._back.acquire()


# ------------------------------------------------------------------------------------ executor

class BatchStream:
    """A stream for a plain batch runner `runner(batch_key, payloads) -> results`: each step runs
    every job it holds as one batch (one by one if the batch fails, so one bad request does not
    fail its neighbours)."""

    def __init__(self, runner: Callable[[str | None, list[Any]], list[Any]]) -> None:
        self._runner = runner
        self._jobs: list[Job] = []

    def add(self, jobs: list[Job]) -> None:
        self._jobs.extend(jobs)

    def busy(self) -> bool:
        return bool(self._jobs)

    def drain(self) -> list[Job]:
        jobs, self._jobs = self._jobs, []
        return jobs

    def step(self) -> list[Outcome]:
        jobs = self.drain()
        try:
            results = self._runner(jobs[0].batch_key, [job.payload for job in jobs])
            return [(job, result, None) for job, result in zip(jobs, results)]
        except Exception as error:  # noqa: BLE001
            if len(jobs) == 1:
                return [(jobs[0], None, error)]
        outcomes = []
        for job in jobs:
            try:
                outcomes.append((job, self._runner(job.batch_key, [job.payload])[0], None))
            except Exception as error:  # noqa: BLE001
                outcomes.append((job, None, error))
        return outcomes


class RunnerStreams:
    """Streams from batch runners by job kind: jobs of one kind and batch key batch together."""

    def __init__(self, runners: dict[str, Callable[[str | None, list[Any]], list[Any]]]) -> None:
        self._runners = runners

    def key(self, job: Job) -> str:
        return f"{job.kind}:{job.batch_key}"

    def make(self, key: str) -> Stream:
        return BatchStream(self._runners[key.split(":", 1)[0]])


class Scheduler:
    def __init__(self, streams: Streams | dict[str, Callable[[str | None, list[Any]], list[Any]]],
                 max_outstanding: int = 2048,
                 observer: Callable[[Job, float], None] | None = None) -> None:
        """`observer(job, finished_at)` hears of every job as it ends (before its `done`), with
        `enqueued_at` and `started_at` set: queue wait and compute, for metrics and traces."""
        self.observer = observer
        self._streams_factory = RunnerStreams(streams) if isinstance(streams, dict) else streams
        self._policy = Policy(self._streams_factory.key)
        self._streams: dict[str, Stream] = {}
        self._fibers: dict[str, _Fiber] = {}   # a lane's parked job
        self._idle_fibers: list[_Fiber] = []
        self._wakeup = threading.Condition()
        self._stopping = False
        self.outstanding = 0                   # jobs submitted and not yet done
        self.max_outstanding = max_outstanding  # callers refuse new batchable work beyond this
        self._thread = threading.Thread(target=self._work, name="stillroom-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._wakeup:
            if self._stopping:
                raise RuntimeError("the scheduler is shutting down")
            self._policy.submit(job)
            self.outstanding += 1
            self._wakeup.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the queued jobs, then stop the executor."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        self._thread.join(timeout)

    def _next(self) -> Decision | None:
        with self._wakeup:
            while (decision := self._policy.next_batch()) is None:
                if self._stopping and self._policy.idle():
                    return None
                self._wakeup.wait()
            return decision

    def queued_by_kind(self) -> collections.Counter[str]:
        with self._wakeup:
            return self._policy.queued_by_kind()

    def _report(self, update: Callable[[Policy], None], outcomes: list[Outcome]) -> None:
        with self._wakeup:
            update(self._policy)
            self.outstanding -= len(outcomes)
        finished = time.monotonic()
        for job, result, error in outcomes:
            if self.observer is not None:
                try:
                    self.observer(job, finished)
                except Exception:  # an observer must not stop the executor
                    logger.exception("the observer failed on a %s job", job.kind)
            try:
                job.done(result, error)
            except Exception:  # a failing callback must not stop the executor
                logger.exception("completion callback for a %s job failed", job.kind)

    def _work(self) -> None:
        while (decision := self._next()) is not None:
            if decision.action == "step":
                self._step(decision.lane, decision.joining)
            else:
                self._run_fiber(decision)

    def _run_fiber(self, decision: Decision) -> None:
        lane = decision.lane
        if decision.action == "start":
            fiber = self._idle_fibers.pop() if self._idle_fibers else _Fiber()
            assert decision.job is not None
            decision.job.started_at = time.monotonic()
            fiber.start(decision.job)
        else:
            fiber = self._fibers.pop(lane)
            fiber.resume()
        if fiber.outcome is None:             # parked between two of its steps
            self._fibers[lane] = fiber
            self._report(lambda policy: policy.parked(lane), [])
            return
        job, (result, error) = fiber.job, fiber.outcome
        assert job is not None
        self._idle_fibers.append(fiber)
        self._report(lambda policy: policy.finished(lane), [(job, result, error)])

    def _step(self, key: str, joining: list[Job]) -> None:
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = self._streams_factory.make(key)
        joined_at = time.monotonic()
        for job in joining:
            job.started_at = joined_at
        try:
            stream.add(joining)
            outcomes = stream.step()
            busy = stream.busy()
        except Exception as error:  # noqa: BLE001 - a broken stream fails its jobs, not the server
            logger.exception("a %s step failed", key)
            unfinished = {id(job): job for job in [*stream.drain(), *joining]}
            outcomes: list[Outcome] = [(job, None, error) for job in unfinished.values()]
            busy = False
        if not busy:
            del self._streams[key]
        self._report(lambda policy: policy.stepped(key, busy), outcomes)
