"""The engine protocol: every command the core gives an engine, and the facts it gets back.

A command is a plain, frozen dataclass of the engine's own types (ids, names, `types.*Work`), so
the same command runs on an engine in this process (`inline.InlineEngine`) or crosses to an engine
process (`process/`), where `process/link.py` encodes it without pickles. `execute` is the one
place a command meets the engine's methods. `EngineClient` is what the core holds: it submits
commands and reads model and run facts, and never learns where the engine runs.

Knows no wire, owners or request numbers. Bump `VERSION` when a command or result changes shape:
an engine process of another version is refused at its handshake.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from stillroom_server.engine.types import (
    ForwardBackwardWork,
    LogprobsWork,
    OptimWork,
    RunFacts,
    SamplerFacts,
    SampleWork,
)

if TYPE_CHECKING:
    from stillroom_server.engine.checkpoints import CheckpointFiles
    from stillroom_server.engine.engine import Engine, LoraSpec
    from stillroom_server.engine.models import ModelHost
    from stillroom_server.engine.runtime.scheduler import Job
    from stillroom_server.engine.runtime.stats import EngineStats

VERSION = 1


# ------------------------------------------------------------------------------ commands

@dataclasses.dataclass(frozen=True)
class CreateRun:
    run_id: str
    base_model: str
    lora: LoraSpec | None
    seed: int | None


@dataclasses.dataclass(frozen=True)
class CreateRunFromState:
    run_id: str
    uri: str
    with_optimizer: bool


@dataclasses.dataclass(frozen=True)
class RestoreRun:
    """Bring back a run an engine lost (a crash) from a state folder: its spilled state, or its
    last saved training state (weights and AdamW moments)."""
    run_id: str
    directory: str


@dataclasses.dataclass(frozen=True)
class CloseRun:
    run_id: str


@dataclasses.dataclass(frozen=True)
class ForwardBackward:
    run_id: str
    work: ForwardBackwardWork


@dataclasses.dataclass(frozen=True)
class OptimStep:
    run_id: str
    work: OptimWork


@dataclasses.dataclass(frozen=True)
class SaveCheckpoint:
    """Write a run's training state ("weights"), sampler weights, or external files; `replace`
    deletes a checkpoint of that name first. Answers (uri, bytes)."""
    run_id: str
    kind: str
    name: str
    replace: bool = False
    age_recipients: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class LoadState:
    run_id: str
    uri: str
    with_optimizer: bool


@dataclasses.dataclass(frozen=True)
class OpenSampler:
    base_model: str | None = None
    model_path: str | None = None


@dataclasses.dataclass(frozen=True)
class DeleteCheckpoint:
    uri: str


@dataclasses.dataclass(frozen=True)
class LoadModel:
    """Load a base model's weights (before its tokenizer is handed out, or to warm up)."""
    base_model: str


@dataclasses.dataclass(frozen=True)
class Sample:
    """Batchable: rows of one sampler's requests decode together (continuous batching)."""
    sampler_key: str
    work: SampleWork


@dataclasses.dataclass(frozen=True)
class ComputeLogprobs:
    sampler_key: str
    work: LogprobsWork


COMMANDS: tuple[type, ...] = (CreateRun, CreateRunFromState, RestoreRun, CloseRun, ForwardBackward,
                              OptimStep, SaveCheckpoint, LoadState, OpenSampler, DeleteCheckpoint,
                              LoadModel, Sample, ComputeLogprobs)
BATCHED = (Sample, ComputeLogprobs)
MUTATES_RUN = (OptimStep, LoadState)  # after these a run's state differs from what was saved


def loss_names() -> list[str]:
    """The built-in losses a forward_backward may name."""
    from stillroom_server.engine.training.losses import LOSSES

    return list(LOSSES)


class FinishedJob(Protocol):
    """What an observer hears of a job as it ends (the scheduler's Job has it)."""
    kind: str
    trace: Any
    enqueued_at: float
    started_at: float | None


def run_facts(engine: Engine, run: Any) -> RunFacts:
    memory = run.memory_bytes() if hasattr(run, "memory_bytes") else 0
    return RunFacts(run.is_lora, run.lora_rank, run.num_trainable_params(), engine.lora_meta(run), memory)


def sampler_facts(opened: Any) -> SamplerFacts:
    return SamplerFacts(opened.key, opened.base.name, opened.adapter)


def execute(engine: Engine, command: Any) -> Any:
    """Run one (unbatched) command on `engine`, on its worker thread."""
    match command:
        case CreateRun(run_id, base_model, lora, seed):
            return run_facts(engine, engine.create_run(run_id, base_model, lora, seed))
        case CreateRunFromState(run_id, uri, with_optimizer):
            return run_facts(engine, engine.create_run_from_state(run_id, uri, with_optimizer))
        case RestoreRun(run_id, directory):
            return run_facts(engine, engine.restore_run(run_id, directory))
        case CloseRun(run_id):
            return engine.close_run(run_id)
        case ForwardBackward(run_id, work):
            return engine.forward_backward(run_id, work)
        case OptimStep(run_id, work):
            return engine.optim_step(run_id, work)
        case SaveCheckpoint(run_id, kind, name, replace, recipients):
            return engine.save_checkpoint(run_id, kind, name, replace, list(recipients))
        case LoadState(run_id, uri, with_optimizer):
            engine.load_state(run_id, uri, with_optimizer)
            return uri
        case OpenSampler(base_model, model_path):
            return sampler_facts(engine.open_sampler(base_model=base_model, model_path=model_path))
        case DeleteCheckpoint(uri):
            return engine.delete_checkpoint(uri)
        case LoadModel(base_model):
            return engine.models.get(base_model).name
        case Sample(key, work):  # one alone (its sampler was not open here): a batch of one
            return engine.sample(engine.sampler_by_key(key), [work])[0]
        case ComputeLogprobs(key, work):
            return engine.compute_logprobs(engine.sampler_by_key(key), [work])[0]
    raise TypeError(f"{type(command).__name__} is not an engine command")


def engine_job(engine: Engine, command: Any, kind: str, lane: str,
               done: Callable[[Any, BaseException | None], None], trace: Any = None) -> Job:
    """The scheduler job that runs `command` on `engine`: a batchable job joins its sampler's
    stream; one whose sampler is not open on this engine (a restarted one) runs alone and opens it."""
    from stillroom_server.engine.runtime.scheduler import Job

    if isinstance(command, BATCHED):
        opened = engine.open_sampler_if_known(command.sampler_key)
        if opened is not None:
            return Job(kind=kind, run=None, done=done, lane=lane, batch_key=opened.key,
                       payload=(opened, command.work), trace=trace)
        lane = f"open:{command.sampler_key}"
    return Job(kind=kind, run=lambda: execute(engine, command), done=done, lane=lane, trace=trace)


# ------------------------------------------------------------------------------ the core's handle

Done = Callable[[Any, BaseException | None], None]


class EngineClient(Protocol):
    """The engine(s) as the core sees them: model and run facts and validation, answered here and
    cheaply, and commands, answered later through `done` (on another thread)."""

    models: ModelHost              # model facts: known_models, describe, resolve, get
    files: CheckpointFiles         # checkpoint paths <-> folders on the shared data directory
    max_num_samples: int
    run_memory_bytes: int          # training-run memory stated at start; 0: none stated
    max_outstanding: int
    observer: Callable[[FinishedJob, float], None] | None   # hears of every job as it ends

    @property
    def stats(self) -> EngineStats: ...          # counts of decode steps and tokens, for metrics
    @property
    def outstanding(self) -> int: ...
    def queued_by_kind(self) -> collections.Counter[str]: ...
    def facts(self) -> dict[str, int]: ...
    def engines(self) -> list[dict[str, Any]]: ...  # where each model lives, and each engine's state

    def submit(self, command: Any, kind: str, lane: str, done: Done, trace: Any = None) -> None: ...
    def get_run(self, run_id: str) -> Any: ...     # .base, .is_lora, .lora_rank, .num_trainable_params()
    def sampler(self, facts: SamplerFacts) -> Any:  ...  # .key, .base, .vocab_size, .max_context
    def state_meta(self, uri: str, field: str = "path") -> dict: ...
    def validate_forward_backward(self, run_id: str, work: ForwardBackwardWork) -> None: ...
    def validate_load_state(self, run_id: str, uri: str) -> None: ...
    def validate_sample(self, opened: Any, work: SampleWork) -> None: ...
    def validate_logprobs(self, opened: Any, work: LogprobsWork) -> None: ...
    def wait_ready(self) -> None: ...               # blocks until the engines started here are up
    def stop(self) -> None: ...
