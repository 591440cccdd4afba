"""The engine back-end interface: what the core and the scheduler call on an engine.

Two back ends implement it: the in-process `engine.Engine` (every model in the server process) and
`sharded.remote.ShardedEngine` (runs sharded over worker processes with FSDP2). Model work is
called on the scheduler's one worker thread; `validate_*`, `get_run`, `state_meta`, `models` and
`files` are cheap and touch no weights. This module names the calls; it implements none of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from stillroom_server.engine.checkpoints import CheckpointFiles
from stillroom_server.engine.models import ModelHost
from stillroom_server.engine.runtime.scheduler import Streams
from stillroom_server.engine.runtime.stats import EngineStats
from stillroom_server.engine.types import (
    ForwardBackwardResult,
    ForwardBackwardWork,
    LogprobsResult,
    LogprobsWork,
    OptimResult,
    OptimWork,
    SampleResult,
    SampleWork,
)

if TYPE_CHECKING:
    from stillroom_server.engine.engine import Engine


class EngineBackend(Protocol):
    models: ModelHost              # model facts: known_models, describe, resolve, get
    files: CheckpointFiles         # checkpoint paths <-> directories, written atomically
    run_memory_bytes: int
    stats: EngineStats             # counts of decode steps and tokens, for metrics

    def facts(self) -> dict[str, int]: ...   # runs in memory and on disk, bytes, loaded adapters

    # runs (the returned run has .base, .is_lora, .lora_rank, .num_trainable_params())
    def create_run(self, run_id: str, base_model: str, lora: Any, seed: int | None) -> Any: ...
    def create_run_from_state(self, run_id: str, uri: str, with_optimizer: bool) -> Any: ...
    def get_run(self, run_id: str) -> Any: ...
    def close_run(self, run_id: str) -> None: ...

    # a run's numbered requests
    def forward_backward(self, run_id: str, work: ForwardBackwardWork) -> ForwardBackwardResult: ...
    def optim_step(self, run_id: str, work: OptimWork) -> OptimResult: ...
    def save_state(self, run_id: str, name: str) -> tuple[str, int]: ...
    def save_sampler_weights(self, run_id: str, name: str) -> tuple[str, int]: ...
    def load_state(self, run_id: str, uri: str, with_optimizer: bool) -> None: ...
    def state_meta(self, uri: str, field: str = "path") -> dict: ...

    # samplers and their batches
    def open_sampler(self, base_model: str | None = None, model_path: str | None = None) -> Any: ...
    def sample(self, opened: Any, works: list[SampleWork]) -> list[SampleResult]: ...
    def compute_logprobs(self, opened: Any, works: list[LogprobsWork]) -> list[LogprobsResult]: ...
    def streams(self) -> Streams | dict[str, Any]: ...   # how the scheduler runs sample/logprob jobs

    # checkpoints
    def unload_checkpoint(self, uri: str) -> None: ...
    def delete_checkpoint(self, uri: str) -> None: ...

    # validation, before a request is accepted
    def validate_forward_backward(self, run_id: str, work: ForwardBackwardWork) -> None: ...
    def validate_load_state(self, run_id: str, uri: str) -> None: ...
    def validate_sample(self, opened: Any, work: SampleWork) -> None: ...
    def validate_logprobs(self, opened: Any, work: LogprobsWork) -> None: ...

    def shutdown(self) -> None: ...


def make_engine(data_dir: Path, workers: int, device: str, max_num_samples: int,
                local_models: dict[str, Path], dtype: str, threads: int | None,
                log_level: str, worker_listen: str | None = None, batch_invariant: bool = False,
                **options: Any) -> Engine:
    """The in-process engine for one worker, else the sharded back end over `workers` processes
    (started here, or launched elsewhere and connecting to `worker_listen`). `options` go to the
    in-process engine (its spill folder, memory budget, whether it owns the data directory)."""
    if workers <= 1:
        from stillroom_server.engine.engine import Engine

        return Engine(data_dir, device, max_num_samples, local_models, dtype=dtype,
                      batch_invariant=batch_invariant, **options)
    from stillroom_server.engine.sharded.remote import ShardedEngine

    return ShardedEngine(data_dir, workers, device, max_num_samples, local_models, dtype, threads, log_level,
                         worker_listen)
