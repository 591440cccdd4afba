"""What the server is doing, for operators and for each session's owner: Prometheus metrics and
per-session request traces.

Metrics (`render`, served at /metrics) say how the server as a whole is doing: requests and their
latency by transport and route, queue depth and wait and compute time by kind of work, decode
batch rows, tokens sampled, trained and scored, memory, loaded adapters, runs in memory and on
disk. They carry no owner's data: no owner, key, run, session, checkpoint or model name is a label.

Traces record each request of a client session as it ends: when it was accepted, when the engine
took it and when it finished. `trace_json` gives them in the Chrome trace format that Perfetto
opens (one complete event per request; queue wait and compute in its args). A session keeps its
last MAX_SPANS requests in memory; traces do not survive a restart.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from stillroom_server.engine.protocol import EngineClient, FinishedJob

MAX_SPANS = 10_000                 # requests a session's trace keeps (the oldest go first)
MAX_TRACED_SESSIONS = 1_000        # sessions with a trace in memory (the least recent go first)
TRACE_URL_SECONDS = 600            # how long a trace download link works
SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


@dataclasses.dataclass(frozen=True)
class Span:
    request_id: str
    kind: str
    enqueued: float        # wall-clock seconds
    started: float
    finished: float


@dataclasses.dataclass(frozen=True)
class TraceLabel:
    """What a job carries (Job.trace) so its end can be recorded: its request and session."""

    request_id: str
    session_id: str | None


class Telemetry:
    def __init__(self, engine: EngineClient, live_runs: Callable[[], int] = lambda: 0) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("stillroom_requests", "Requests answered, by transport, route and code",
                                ["transport", "route", "code"], registry=self.registry)
        self.latency = Histogram("stillroom_request_seconds", "Time to answer a request (not its future)",
                                 ["transport", "route"], buckets=SECONDS, registry=self.registry)
        self.queue_wait = Histogram("stillroom_queue_wait_seconds", "From accepted to taken by the engine",
                                    ["kind"], buckets=SECONDS, registry=self.registry)
        self.compute = Histogram("stillroom_compute_seconds", "From taken by the engine to finished",
                                 ["kind"], buckets=SECONDS, registry=self.registry)
        self.registry.register(_EngineCollector(engine, live_runs))
        self._traces: collections.OrderedDict[str, collections.deque[Span]] = collections.OrderedDict()
        self._trace_urls: dict[str, tuple[str, str, float]] = {}  # token -> (owner, session, expiry)
        self._lock = threading.Lock()
        engine.observer = self.job_done

    # ---------------------------------------------------------------- metrics

    def observe_request(self, transport: str, route: str, code: str, seconds: float) -> None:
        """One answered request; `route` is the route's template or RPC name, never a raw path."""
        self.requests.labels(transport, route, code).inc()
        self.latency.labels(transport, route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def job_done(self, job: FinishedJob, finished: float) -> None:
        """The scheduler's observer: a job ended (on the engine's thread)."""
        started = job.started_at if job.started_at is not None else finished
        self.queue_wait.labels(job.kind).observe(started - job.enqueued_at)
        self.compute.labels(job.kind).observe(finished - started)
        label = job.trace
        if isinstance(label, TraceLabel) and label.session_id is not None:
            offset = time.time() - time.monotonic()
            self._record(label.session_id, Span(label.request_id, job.kind, job.enqueued_at + offset,
                                                started + offset, finished + offset))

    # ---------------------------------------------------------------- traces

    def _record(self, session_id: str, span: Span) -> None:
        with self._lock:
            spans = self._traces.pop(session_id, None) or collections.deque(maxlen=MAX_SPANS)
            spans.append(span)
            self._traces[session_id] = spans
            while len(self._traces) > MAX_TRACED_SESSIONS:
                self._traces.popitem(last=False)

    def spans(self, session_id: str) -> list[Span]:
        with self._lock:
            return list(self._traces.get(session_id, ()))

    def trace_json(self, session_id: str) -> dict[str, Any]:
        """The session's requests as a Chrome/Perfetto trace: one complete ("X") event per request,
        on one track per kind of request, timestamps in microseconds since the epoch."""
        spans = self.spans(session_id)
        kinds = sorted({s.kind for s in spans})
        events: list[dict[str, Any]] = [
            {"name": "process_name", "ph": "M", "pid": 1, "args": {"name": f"session {session_id}"}}]
        events += [{"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": kind}}
                   for tid, kind in enumerate(kinds, start=1)]
        for span in spans:
            events.append({
                "name": span.kind, "cat": "request", "ph": "X", "pid": 1, "tid": kinds.index(span.kind) + 1,
                "ts": round(span.enqueued * 1e6), "dur": round((span.finished - span.enqueued) * 1e6),
                "args": {"request_id": span.request_id,
                         "queue_wait_ms": round((span.started - span.enqueued) * 1e3, 3),
                         "compute_ms": round((span.finished - span.started) * 1e3, 3)}})
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def trace_url_token(self, owner: str, session_id: str) -> str:
        """A token for a link that downloads the session's trace without a key, for a while."""
        token = secrets.token_urlsafe(24)
        now = time.monotonic()
        with self._lock:
            self._trace_urls = {t: v for t, v in self._trace_urls.items() if v[2] > now}
            self._trace_urls[token] = (owner, session_id, now + TRACE_URL_SECONDS)
        return token

    def trace_for_token(self, token: str) -> tuple[str, str] | None:
        """(owner, session) of a live download token, else None."""
        with self._lock:
            entry = self._trace_urls.get(token)
        if entry is None or entry[2] <= time.monotonic():
            return None
        return entry[0], entry[1]


class _EngineCollector:
    """Gauges and counters read at scrape time from the engine, the scheduler and the process."""

    def __init__(self, engine: EngineClient, live_runs: Callable[[], int]) -> None:
        self.engine, self.live_runs = engine, live_runs

    def collect(self) -> Iterator[Metric]:
        queued = GaugeMetricFamily("stillroom_queue_depth", "Jobs waiting for the engine, by kind",
                                   labels=["kind"])
        for kind, count in sorted(self.engine.queued_by_kind().items()):
            queued.add_metric([kind], count)
        yield queued
        yield GaugeMetricFamily("stillroom_outstanding_jobs", "Jobs accepted and not yet done",
                                value=self.engine.outstanding)
        stats = self.engine.stats
        for name, value, text in [
                ("decode_steps", stats.decode_steps, "Continuous-batching decode steps"),
                ("decode_rows", stats.decode_rows, "Rows over all decode steps (one sampled token each)"),
                ("prefill_tokens", stats.prefill_tokens, "Prompt tokens of rows joining a decode batch"),
                ("trained_tokens", stats.trained_tokens, "Tokens of forward and forward_backward passes"),
                ("scored_tokens", stats.scored_tokens, "Tokens of compute_logprobs passes")]:
            yield CounterMetricFamily(f"stillroom_{name}", text, value=value)
        yield GaugeMetricFamily("stillroom_decode_batch_rows", "Rows in the latest decode step",
                                value=stats.last_batch_rows)
        facts = self.engine.facts()
        for name, text in [("runs_in_memory", "Training runs whose state is in memory"),
                           ("runs_on_disk", "Idle training runs moved to disk to make room"),
                           ("run_memory_bytes_used", "Bytes of training state in memory"),
                           ("run_memory_bytes_budget", "Bytes of training state memory may hold"),
                           ("loaded_adapters", "LoRA sampler snapshots loaded"),
                           ("open_samplers", "Samplers open (base models and snapshots)")]:
            yield GaugeMetricFamily(f"stillroom_{name}", text, value=facts.get(name, 0))
        up = GaugeMetricFamily("stillroom_engine_up", "1 while an engine serves, 0 while it is down or "
                               "restarting", labels=["engine"])
        restarts = CounterMetricFamily("stillroom_engine_restarts", "Engine processes started again after "
                                       "one died", labels=["engine"])
        placed = GaugeMetricFamily("stillroom_model_engine", "1 for the engine each base model is placed on",
                                   labels=["model", "engine"])
        for engine in self.engine.engines():
            up.add_metric([engine["engine"]], 1 if engine["state"] == "up" else 0)
            restarts.add_metric([engine["engine"]], engine["restarts"])
            for model in engine["models"]:
                placed.add_metric([model, engine["engine"]], 1)
        yield from (up, restarts, placed)
        yield GaugeMetricFamily("stillroom_live_runs", "Training runs live (owned by a client)",
                                value=self.live_runs())
        yield GaugeMetricFamily("stillroom_resident_memory_bytes", "The server process's resident memory",
                                value=_resident_bytes())
        try:
            import torch

            if torch.cuda.is_available():
                yield GaugeMetricFamily("stillroom_gpu_memory_allocated_bytes", "torch's CUDA allocations",
                                        value=torch.cuda.memory_allocated())
        except ImportError:  # pragma: no cover - the server always has torch
            pass


def _resident_bytes() -> int:
    statm = Path("/proc/self/statm")
    if not statm.exists():
        return 0
    return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
