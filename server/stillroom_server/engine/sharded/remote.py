"""`ShardedEngine`: the engine's interface in the server process, its model work done by a worker group.

It keeps what the core asks of an engine without touching weights — model facts (config and
tokenizer only, the module on the meta device), checkpoint files, run facts, validation — and sends
every model call to the workers. Sampling and logprobs run as whole batches (no continuous
batching across steps). If a worker dies, the calls in flight fail with `WorkersDied`, the runs
answer FAILED_PRECONDITION naming their last saved state (as after a restart), and the next call
that needs workers starts a fresh group. Knows no wire, owners or request numbers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import secrets
from pathlib import Path
from typing import Any, cast

from stillroom_server.engine import checkpoints
from stillroom_server.engine.engine import Engine, LoraSpec, Sampler
from stillroom_server.engine.errors import FailedPrecondition, InvalidInput, NotFound
from stillroom_server.engine.models import FactsHost
from stillroom_server.engine.sharded.group import WorkerGroup, WorkersDied
from stillroom_server.engine.sharded.wire import RunFacts
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
from stillroom_server.engine.validation import RunView

logger = logging.getLogger("stillroom.engine")


class RunHandle(RunView):
    """A run held by the workers (sharded: no budget in this process counts its bytes)."""


class ShardedEngine(Engine):
    def __init__(self, data_dir: Path, workers: int, device: str = "cpu", max_num_samples: int = 128,
                 local_models: dict[str, Path] | None = None, dtype: str = "auto",
                 threads: int | None = None, log_level: str = "INFO", listen: str | None = None) -> None:
        super().__init__(data_dir, device, max_num_samples, local_models, dtype, run_memory_bytes=0)
        self.models = FactsHost(data_dir, self.models.device, self.models.dtype, local_models)
        self.workers = workers
        self._settings = {"data_dir": str(data_dir), "device": device, "dtype": dtype,
                          "local_models": {k: str(v) for k, v in (local_models or {}).items()},
                          "threads": threads, "log_level": log_level}
        self._lost: dict[str, str] = {}     # runs that were on a group that died -> how it ended
        self.listen = listen
        self.group = WorkerGroup(workers, self._settings, listen)
        logger.info("training runs are sharded over %d workers (FSDP2 on %s); sampling runs as whole "
                    "batches on them; runs are never moved to disk", workers,
                    "NCCL" if device == "cuda" else "gloo")

    def _call(self, method: str, *args: Any) -> Any:
        if not self.group.alive:
            logger.info("starting a fresh group of %d workers", self.workers)
            self.group = WorkerGroup(self.workers, self._settings, self.listen)
        try:
            return self.group.call(method, *args)
        except WorkersDied as error:
            for run_id in list(self.runs):
                self._lost[run_id] = str(error)
            self.runs.clear()
            raise

    def _run_call(self, run_id: str, method: str, *args: Any) -> Any:
        """A call on one run's weights; if the workers die under it, the error names what to resume."""
        self.get_run(run_id)
        try:
            return self._call(method, run_id, *args)
        except WorkersDied:
            self.get_run(run_id)  # raises: names the death and the run's last saved state
            raise

    def shutdown(self) -> None:
        self.group.stop()

    # ---------------------------------------------------------------- runs

    def get_run(self, run_id: str) -> Any:
        if run_id in self._lost and run_id not in self.runs:
            saved = self.files.latest(run_id, "weights")
            resume = (f"its last saved state is {saved.uri}: continue from it with "
                      "create_training_client_from_state_with_optimizer" if saved else
                      "it saved no training state (save_state) to continue from")
            raise FailedPrecondition(f"training_run_id: run {run_id} has no weights in memory (its "
                                     f"{self._lost[run_id].removeprefix('workers: ')}); {resume}")
        return super().get_run(run_id)

    def _add(self, run_id: str, base_name: str, facts: RunFacts) -> Any:
        handle = RunHandle(run_id, self.models.get(base_name), facts)
        self.runs[run_id] = cast(Any, handle)
        self._lost.pop(run_id, None)
        return handle

    def create_run(self, run_id: str, base_model: str, lora: LoraSpec | None, seed: int | None) -> Any:
        self.models.get(base_model)
        if lora is not None and seed is None:  # every rank must draw the same initial adapter
            seed = secrets.randbits(62)
        return self._add(run_id, base_model, self._call("create_run", run_id, base_model, lora, seed))

    def create_run_from_state(self, run_id: str, uri: str, with_optimizer: bool) -> Any:
        meta = self.state_meta(uri)
        facts = self._call("create_run_from_state", run_id, uri, with_optimizer)
        return self._add(run_id, meta["base_model"], facts)

    def close_run(self, run_id: str) -> None:
        if self.runs.pop(run_id, None) is not None and self.group.alive:
            self._call("close_run", run_id)
        self._lost.pop(run_id, None)

    def forward_backward(self, run_id: str, work: ForwardBackwardWork) -> ForwardBackwardResult:
        return self._run_call(run_id, "forward_backward", work)

    def optim_step(self, run_id: str, work: OptimWork) -> OptimResult:
        return self._run_call(run_id, "optim_step", work)

    def save_sampler_weights(self, run_id: str, name: str) -> tuple[str, int]:
        run = self.get_run(run_id)
        path = checkpoints.CheckpointPath(run_id, "sampler_weights", checkpoints.check_name(name))
        size = self.files.write(path, self.checkpoint_meta(run, name),
                                lambda d: self._run_call(run_id, "write_sampler_weights", str(d)))
        return path.uri, size

    def save_state(self, run_id: str, name: str) -> tuple[str, int]:
        run = self.get_run(run_id)
        path = checkpoints.CheckpointPath(run_id, "weights", checkpoints.check_name(name))
        size = self.files.write(path, self.checkpoint_meta(run, name, training_state=True),
                                lambda d: self._run_call(run_id, "write_state", str(d)))
        return path.uri, size

    def lora_meta(self, run: Any) -> dict | None:
        return run.facts.lora_meta  # the workers hold the run; its facts carry the settings

    def load_state(self, run_id: str, uri: str, with_optimizer: bool) -> None:
        self.validate_load_state(run_id, uri)
        self._run_call(run_id, "load_state", uri, with_optimizer)

    # ---------------------------------------------------------------- samplers

    def _open_snapshot(self, key: str, path: checkpoints.CheckpointPath) -> Sampler:
        if path.kind != "sampler_weights":
            raise InvalidInput(f"model_path: {path.uri} is a training state, not sampler weights")
        meta = self.files.read_meta(path)
        lora = meta["kind"] == "lora"
        adapter = "snap-" + hashlib.sha1(path.uri.encode()).hexdigest()[:16] if lora else None
        return Sampler(key, self.models.get(meta["base_model"]), adapter=adapter)

    def _weights_of(self, opened: Sampler) -> str:
        if opened.deleted:
            raise NotFound(f"model_path: checkpoint {opened.key[len('path:'):]} was deleted")
        return opened.key

    def sample(self, opened: Sampler, works: list[SampleWork]) -> list[SampleResult]:
        seeded = [dataclasses.replace(w, params=dataclasses.replace(w.params, seed=secrets.randbits(62)))
                  if w.params.seed is None else w for w in works]  # every rank draws the same tokens
        return self._call("sample_key", self._weights_of(opened), seeded)

    def compute_logprobs(self, opened: Sampler, works: list[LogprobsWork]) -> list[LogprobsResult]:
        return self._call("logprobs_key", self._weights_of(opened), works)

    def unload_checkpoint(self, uri: str) -> None:
        super().unload_checkpoint(uri)
        if self.group.alive:
            self._call("unload_checkpoint", uri)

    def streams(self) -> dict[str, Any]:  # type: ignore[override]
        """The scheduler's runners: each batch of one sampler's requests is one call to the workers."""
        return {"sample": lambda _key, items: self.sample(items[0][0], [w for _, w in items]),
                "compute_logprobs": lambda _key, items: self.compute_logprobs(items[0][0],
                                                                              [w for _, w in items])}
