"""Counts of the engine's own work: decode steps and the rows they carried, tokens prefilled,
trained and scored. Plain integers bumped on the engine's one working thread; a reader on another
thread sees values at most one step old. Whoever reports them (core/telemetry.py) turns them into
metrics; this module knows nothing of clients, owners or Prometheus.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class EngineStats:
    decode_steps: int = 0       # continuous-batching steps of sampling
    decode_rows: int = 0        # rows over all those steps: one sampled token each
    last_batch_rows: int = 0    # rows in the most recent decode step
    prefill_tokens: int = 0     # prompt tokens of rows joining a decode batch
    trained_tokens: int = 0     # tokens of forward and forward_backward passes
    scored_tokens: int = 0      # tokens of compute_logprobs passes
