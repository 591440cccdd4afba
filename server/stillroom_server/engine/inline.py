"""`InlineEngine`: the engine and its scheduler in the server's own process (`--engines 0`).

The simplest shape, kept for debugging, white-box tests and as the baseline the process boundary
is measured against (scripts/bench_core.py): no process boundary, so a crash in torch is a crash of
the server. The same `EngineClient` as the engine processes' (protocol.py): the core cannot tell.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

from stillroom_server.engine import protocol
from stillroom_server.engine.engine import Engine
from stillroom_server.engine.protocol import FinishedJob, SamplerFacts
from stillroom_server.engine.runtime.scheduler import Job, Scheduler


class InlineEngine:
    def __init__(self, engine: Engine, name: str = "inline") -> None:
        self.engine = engine
        self.name = name
        self.scheduler = Scheduler(engine.streams())
        self.models, self.files, self.stats = engine.models, engine.files, engine.stats
        self.max_num_samples = engine.max_num_samples
        self.run_memory_bytes = engine.run_memory_bytes
        self.max_outstanding = self.scheduler.max_outstanding
        self.observer: Callable[[FinishedJob, float], None] | None = None   # hears of every job as it ends
        self.scheduler.observer = self._observe

    def _observe(self, job: Job, finished: float) -> None:
        if self.observer is not None:
            self.observer(job, finished)

    @property
    def outstanding(self) -> int:
        return self.scheduler.outstanding

    def queued_by_kind(self) -> collections.Counter[str]:
        return self.scheduler.queued_by_kind()

    def facts(self) -> dict[str, int]:
        return self.engine.facts()

    def engines(self) -> list[dict[str, Any]]:
        return [{"engine": self.name, "state": "up", "pid": None, "restarts": 0,
                 "models": sorted(self.engine.models.loaded())}]

    def submit(self, command: Any, kind: str, lane: str, done: protocol.Done, trace: Any = None) -> None:
        self.scheduler.submit(protocol.engine_job(self.engine, command, kind, lane, done, trace))

    def get_run(self, run_id: str) -> Any:
        return self.engine.get_run(run_id)

    def sampler(self, facts: SamplerFacts) -> Any:
        return self.engine.sampler_by_key(facts.key)

    def state_meta(self, uri: str, field: str = "path") -> dict:
        return self.engine.state_meta(uri, field)

    def validate_forward_backward(self, run_id: str, work: Any) -> None:
        self.engine.validate_forward_backward(run_id, work)

    def validate_load_state(self, run_id: str, uri: str) -> None:
        self.engine.validate_load_state(run_id, uri)

    def validate_sample(self, opened: Any, work: Any) -> None:
        self.engine.validate_sample(opened, work)

    def validate_logprobs(self, opened: Any, work: Any) -> None:
        self.engine.validate_logprobs(opened, work)

    def wait_ready(self) -> None:
        """Ready at once: the engine was built in this process."""

    def stop(self) -> None:
        self.scheduler.stop()
        self.engine.shutdown()
