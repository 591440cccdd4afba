"""The engine's streams: continuous batching of sample and compute_logprobs jobs for the scheduler.

Jobs whose weights share one forward pass share a stream: a base model's own samplers and every
LoRA snapshot on it (each row names its adapter: PEFT's mixed-adapter batches), or one full
snapshot. A sampling step admits waiting requests within a prefill token budget (each distinct
prompt runs once, then its KV cache is copied to its samples), adds one token to every running
row, and lets finished rows go at once; a logprob step runs one forward over waiting sequences
within a token budget.

A small request that arrives while a much larger batch has been decoding for a while (at most
1/EXPRESS_SHARE of its rows, no rows joined it for EXPRESS_AFTER steps) decodes in a second,
express batch instead of riding the large one: the two take turns by time (each gets about half of
the stream's time while both run), so the small request moves at nearly its idle speed and the
large batch keeps at least half of its own. Requests arriving together (a burst, a rollout) still
share one batch. Knows the engine's samplers, not the scheduler's policy or the wire.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch

from stillroom_server.engine.errors import NotFound
from stillroom_server.engine.runtime.scheduler import Job, Outcome
from stillroom_server.engine.runtime.stats import EngineStats
from stillroom_server.engine.sampling import sampler
from stillroom_server.engine.types import LogprobsResult, SampleResult


class Engine(Protocol):
    """What a decode or logprob stream needs of the engine (engine.py's facade has it): the weights
    a batch runs on, pinning a snapshot while its rows decode, precision, counters, and scoring."""

    device: torch.device
    stats: EngineStats

    def batch_group(self, opened: Any) -> str: ...
    def batch_model(self, opened: Any, lora: bool) -> torch.nn.Module: ...
    def pin(self, opened: Any) -> str: ...
    def unpin(self, opened: Any) -> None: ...
    def precision(self, training: bool = False) -> contextlib.AbstractContextManager: ...
    def prompt_logprobs(self, opened: Any, work: Any, result: SampleResult) -> None: ...
    def target_prompt_logprobs(self, opened: Any, work: Any, result: SampleResult) -> None: ...
    def compute_logprobs(self, opened: Any, works: list[Any]) -> list[LogprobsResult]: ...

PREFILL_TOKENS = 4096      # prompt tokens admitted into a running decode per step
MAX_ROWS = 256             # rows decoding together
LOGPROB_TOKENS = 8192      # padded tokens in one compute_logprobs forward
EXPRESS_SHARE = 8          # a request with at most 1/8 of the running rows decodes beside them
EXPRESS_AFTER = 8          # ... once they have decoded this many steps with no rows joining


@dataclasses.dataclass
class _Request:
    job: Job
    opened: Any                             # the engine's Sampler
    rows: list[sampler._Row]
    left: int                               # rows still decoding
    result: SampleResult                    # prompt logprobs now, sequences when done


class DecodeStream:
    """Sample requests decoding together, joining and leaving between steps."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.waiting: collections.deque[Job] = collections.deque()
        self.batch: sampler.DecodeBatch | None = None     # the main batch
        self.express: sampler.DecodeBatch | None = None   # small requests beside a large batch
        self.requests: dict[int, _Request] = {}   # id(job) -> its rows
        self._express_seconds = 0.0   # the express batch's time since the main batch's last step
        self._main_seconds = 0.0      # the main batch's last step
        self._main_age = 0            # the main batch's steps since rows last joined it

    def add(self, jobs: list[Job]) -> None:
        self.waiting.extend(jobs)

    def busy(self) -> bool:
        return bool(self.waiting or self.requests)

    def drain(self) -> list[Job]:
        jobs = [*self.waiting, *(r.job for r in self.requests.values())]
        for request in self.requests.values():
            self.engine.unpin(request.opened)
        self.waiting.clear()
        self.requests.clear()
        self.batch = self.express = None
        return jobs

    def step(self) -> list[Outcome]:
        outcomes = self._drop_deleted()
        joining, failed = self._admit()
        outcomes += failed
        main_rows = _rows(self.batch)
        express = bool(joining) and main_rows > 0 and self._main_age >= EXPRESS_AFTER and \
            (_rows(self.express) + len(joining)) * EXPRESS_SHARE <= main_rows
        with self.engine.precision(), torch.inference_mode():  # 4% faster steps than no_grad
            if _rows(self.express) and self._express_seconds < self._main_seconds:
                self._express_seconds += _timed(lambda: self._decode(self.express))
            elif main_rows:
                self._main_seconds = _timed(lambda: self._decode(self.batch))
                self._express_seconds = 0.0
                self._main_age += 1
            if joining:
                self.engine.stats.prefill_tokens += sum(row.prompt_T.shape[0] for row in joining)
                started = time.perf_counter()
                fresh = sampler.DecodeBatch.prefill(self._model(joining), joining, self.engine.device,
                                                    *self._stops())
                if express:
                    self.express = _merged(self.express, fresh)
                    self._express_seconds += time.perf_counter() - started
                else:
                    self.batch = _merged(self.batch, fresh)
                    self._main_age = 0
        for batch in (self.batch, self.express):
            if batch is not None:
                outcomes += self._finish(batch.take_finished())
        if not _rows(self.batch) and _rows(self.express):  # the large batch ended: no more turns
            self.batch, self.express, self._main_age = self.express, None, 0
        return outcomes

    def _decode(self, batch: sampler.DecodeBatch | None) -> None:
        assert batch is not None
        stats = self.engine.stats
        stats.decode_steps, stats.decode_rows = stats.decode_steps + 1, stats.decode_rows + len(batch.rows)
        stats.last_batch_rows = len(batch.rows)
        batch.decode(self._model(batch.rows), *self._stops())

    def _stops(self) -> tuple[tuple[int, ...], Any]:
        base = self._any_sampler().base
        return base.eos_token_ids, base.tokenizer

    def _any_sampler(self):
        if self.requests:
            return next(iter(self.requests.values())).opened
        return self.waiting[0].payload[0]

    def _model(self, rows: list[sampler._Row]) -> torch.nn.Module:
        opened = self._any_sampler()
        return self.engine.batch_model(opened, lora=any(r.adapter != sampler.BASE_ADAPTER for r in rows))

    def _admit(self) -> tuple[list[sampler._Row], list[Outcome]]:
        """Waiting requests that fit this step's prefill budget and the row limit become rows."""
        rows: list[sampler._Row] = []
        failed: list[Outcome] = []
        tokens, running = 0, _rows(self.batch) + _rows(self.express)
        while self.waiting:
            job = self.waiting[0]
            opened, work = job.payload
            if (rows or running) and (tokens + work.prompt_T.shape[0] > PREFILL_TOKENS
                                      or running + len(rows) + work.num_samples > MAX_ROWS):
                break
            self.waiting.popleft()
            try:
                adapter = self.engine.pin(opened)
            except Exception as error:  # noqa: BLE001 - deleted weights, unreadable files
                failed.append((job, None, error))
                continue
            try:
                result = self._prompt_logprobs(opened, work)
            except Exception as error:  # noqa: BLE001
                self.engine.unpin(opened)
                failed.append((job, None, error))
                continue
            new = sampler.make_rows([work], opened.max_context, adapter, owner=job)
            self.requests[id(job)] = _Request(job, opened, new, len(new), result)
            rows.extend(new)
            tokens += work.prompt_T.shape[0]
        return rows, failed

    def _prompt_logprobs(self, opened, work) -> SampleResult:
        result = SampleResult([])
        if work.include_prompt_logprobs or work.topk_prompt_logprobs:
            self.engine.prompt_logprobs(opened, work, result)
        if work.target_prompt_ids_T_K is not None:
            self.engine.target_prompt_logprobs(opened, work, result)
        return result

    def _finish(self, rows: list[sampler._Row]) -> list[Outcome]:
        outcomes = []
        for row in rows:
            request = self.requests[id(row.owner)]
            request.left -= 1
            if request.left == 0:
                del self.requests[id(row.owner)]
                self.engine.unpin(request.opened)
                request.result.sequences = [r.sequence() for r in request.rows]
                outcomes.append((request.job, request.result, None))
        return outcomes

    def _drop_deleted(self) -> list[Outcome]:
        """Requests whose checkpoint was deleted since they were queued answer NOT_FOUND."""
        outcomes = []
        for job in [j for j in self.waiting if j.payload[0].deleted]:
            self.waiting.remove(job)
            outcomes.append((job, None, _deleted(job.payload[0])))
        gone = [r for r in self.requests.values() if r.opened.deleted]
        dead = {id(row) for r in gone for row in r.rows}
        for batch in (self.batch, self.express):
            if dead and batch is not None:
                batch.keep([b for b, row in enumerate(batch.rows) if id(row) not in dead])
        for request in gone:
            del self.requests[id(request.job)]
            self.engine.unpin(request.opened)
            outcomes.append((request.job, None, _deleted(request.opened)))
        return outcomes


class LogprobStream:
    """compute_logprobs requests: each step scores the waiting sequences that fit one forward."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.waiting: collections.deque[Job] = collections.deque()

    def add(self, jobs: list[Job]) -> None:
        self.waiting.extend(jobs)

    def busy(self) -> bool:
        return bool(self.waiting)

    def drain(self) -> list[Job]:
        jobs = list(self.waiting)
        self.waiting.clear()
        return jobs

    def step(self) -> list[Outcome]:
        batch, longest = [], 0
        while self.waiting:
            n = self.waiting[0].payload[1].tokens_T.shape[0]
            if batch and (len(batch) + 1) * max(longest, n) > LOGPROB_TOKENS:
                break
            batch.append(self.waiting.popleft())
            longest = max(longest, n)
        outcomes, by_sampler = [], collections.defaultdict(list)
        for job in batch:
            by_sampler[job.payload[0].key].append(job)
        for jobs in by_sampler.values():
            outcomes += self._score(jobs)
        return outcomes

    def _score(self, jobs: list[Job]) -> list[Outcome]:
        opened = jobs[0].payload[0]
        try:
            results = self.engine.compute_logprobs(opened, [job.payload[1] for job in jobs])
        except Exception as error:  # noqa: BLE001 - one sampler's failure is its jobs' alone
            return [(job, None, error) for job in jobs]
        return [(job, result, None) for job, result in zip(jobs, results)]


def _rows(batch: sampler.DecodeBatch | None) -> int:
    return len(batch.rows) if batch is not None else 0


def _merged(batch: sampler.DecodeBatch | None, fresh: sampler.DecodeBatch) -> sampler.DecodeBatch:
    if batch is None or not batch.rows:
        return fresh
    batch.merge(fresh)
    return batch


def _timed(work: Callable[[], None]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def _deleted(opened) -> NotFound:
    return NotFound(f"model_path: checkpoint {opened.key[len('path:'):]} was deleted")


class EngineStreams:
    """The scheduler's streams over an engine: sampling and logprobs, by the weights they share."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def key(self, job: Job) -> str:
        return f"{job.kind}:{self.engine.batch_group(job.payload[0])}"

    def make(self, key: str) -> DecodeStream | LogprobStream:
        return DecodeStream(self.engine) if key.startswith("sample:") else LogprobStream(self.engine)


def run_to_end(stream: DecodeStream | LogprobStream, jobs: list[Job]) -> dict[int, Outcome]:
    """Step a stream until the given jobs are done (the engine's direct, unscheduled calls)."""
    stream.add(jobs)
    done: dict[int, Outcome] = {}
    while stream.busy():
        for outcome in stream.step():
            done[id(outcome[0])] = outcome
    return done


__all__ = ["DecodeStream", "EngineStreams", "LogprobStream", "LogprobsResult", "run_to_end"]
