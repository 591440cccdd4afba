"""The engine facade: training runs and samplers over the hosted base models.

Every method that touches a model is called from the scheduler's one worker thread; `validate_*`
methods are cheap, touch no weights and may be called from anywhere, before work is accepted.
The engine knows nothing of gRPC, SQL, owners or request numbering.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import math
import shutil
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from peft import LoraConfig

from stillroom_server.engine import batching, checkpoints, compute, resources, sampler, state
from stillroom_server.engine.batch_invariant import BatchInvariant
from stillroom_server.engine.errors import FailedPrecondition, InvalidInput, NotFound
from stillroom_server.engine.lora import LoraHost, LoraRun, lora_config
from stillroom_server.engine.losses import LOSSES, get_loss
from stillroom_server.engine.models import BaseModel, ModelHost
from stillroom_server.engine.scheduler import Job
from stillroom_server.engine.stats import EngineStats
from stillroom_server.engine.training import FullRun, TrainingRun
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

logger = logging.getLogger("stillroom.engine")
MAX_LOADED_FULL_SNAPSHOTS = 4
MAX_LOADED_ADAPTERS = 16   # LoRA snapshots kept loaded; the least recently used unpinned go first
MAX_TARGETS = 1024         # token ids scored at one prompt position (target_prompt_logprobs)


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True


@dataclass
class Sampler:
    key: str
    base: BaseModel
    adapter: str | None = None              # a LoRA snapshot in the base's host
    module: torch.nn.Module | None = None   # a full snapshot's own weights
    deleted: bool = False                   # its checkpoint was deleted: unusable

    @property
    def vocab_size(self) -> int:
        return self.base.vocab_size

    @property
    def max_context(self) -> int:
        return self.base.max_context


class Engine:
    def __init__(self, data_dir: Path, device: str = "cpu", max_num_samples: int = 128,
                 local_models: dict[str, Path] | None = None, dtype: str = "auto",
                 run_memory_bytes: int | None = None, batch_invariant: bool = False) -> None:
        self.device = torch.device(device)
        # sampling and scoring compute each row as it would alone (batch_invariant.py; fp32 on the CPU),
        # and training runs split calls into micro-batches by tokens alone, not by the time they take
        self.batch_invariant = batch_invariant
        # weights: bf16 on cuda unless fp32 is asked; on cpu fp32, computed under bf16 autocast if asked:
        # everywhere (bf16) or in training passes only (bf16-train: bf16 logits round differently with
        # the batch's make-up, so bf16 decoding depends on which requests share a batch; fp32 does not)
        bf16_weights = self.device.type == "cuda" and dtype != "fp32"
        self.autocast_bf16_training = self.device.type == "cpu" and dtype in ("bf16", "bf16-train")
        self.autocast_bf16_inference = self.device.type == "cpu" and dtype == "bf16"
        weights_dtype = torch.bfloat16 if bf16_weights else torch.float32
        self.models = ModelHost(data_dir, self.device, weights_dtype, local_models)
        self.files = checkpoints.CheckpointFiles(data_dir)
        if removed := self.files.remove_partial():
            logger.warning("removed %d half-written checkpoint folders left by a crash", removed)
        self.max_num_samples = max_num_samples
        self.runs: collections.OrderedDict[str, TrainingRun] = collections.OrderedDict()  # least recent first
        # training runs' weights and moments kept in memory; idle runs beyond it wait on disk
        self.run_memory_bytes = run_memory_bytes if run_memory_bytes is not None else \
            int(resources.MEMORY_FRACTION * resources.memory_budget()[1]) or 1 << 34
        self._spill_dir = data_dir / "spill"
        shutil.rmtree(self._spill_dir, ignore_errors=True)  # a restart forgets the runs held there
        self._spilled: dict[str, Path] = {}
        self._lora_hosts: dict[str, LoraHost] = {}
        self._samplers: dict[str, Sampler] = {}
        self._full_snapshots: collections.OrderedDict[str, torch.nn.Module] = collections.OrderedDict()
        self._adapters: collections.OrderedDict[str, Sampler] = collections.OrderedDict()  # loaded, LRU
        self._pins: collections.Counter[str] = collections.Counter()  # adapters with rows in flight
        self._lock = threading.Lock()
        self.stats = EngineStats()

    def facts(self) -> dict[str, int]:
        """What the engine holds now, as counts and bytes (for metrics; read from any thread)."""
        runs = list(self.runs.items())
        spilled = set(self._spilled)
        return {"runs_in_memory": sum(1 for i, _ in runs if i not in spilled), "runs_on_disk": len(spilled),
                "run_memory_bytes_used": sum(r.memory_bytes() for i, r in runs if i not in spilled),
                "run_memory_bytes_budget": self.run_memory_bytes,
                "loaded_adapters": len(self._adapters), "open_samplers": len(self._samplers),
                "loaded_full_snapshots": len(self._full_snapshots)}

    def spilled_runs(self) -> set[str]:
        """The runs whose state waits on disk to make room (read from any thread)."""
        return set(self._spilled)

    # ---------------------------------------------------------------- runs

    def create_run(self, run_id: str, base_model: str, lora: LoraSpec | None,
                   seed: int | None) -> TrainingRun:
        base = self.models.get(base_model)
        if lora is None:
            run: TrainingRun = FullRun(run_id, base, self.device)
        else:
            config = lora_config(base, lora.rank, lora.train_mlp, lora.train_attn, lora.train_unembed)
            run = LoraRun(run_id, base, self._lora_host(base), config, self.device, seed)
        run.fixed_microbatches = self.batch_invariant   # a split by time would follow the load
        self.runs[run_id] = run
        self._make_room(run_id)
        logger.info("created %s run %s on %s (%d trainable parameters)",
                    "LoRA" if lora else "full", run_id, base_model, run.num_trainable_params())
        return run

    def close_run(self, run_id: str) -> None:
        """Drop a run's weights, gradients and optimizer state from memory (its checkpoints stay;
        a LoRA run's adapter leaves the shared host)."""
        run = self.runs.pop(run_id, None)
        spilled = self._spilled.pop(run_id, None)
        if spilled is not None:
            shutil.rmtree(spilled, ignore_errors=True)
        elif isinstance(run, LoraRun):
            run.host.remove_adapter(run.adapter)
        if run is not None:
            logger.info("closed run %s", run_id)

    def get_run(self, run_id: str) -> TrainingRun:
        run = self.runs.get(run_id)
        if run is None:
            saved = self.files.latest(run_id, "weights")
            resume = (f"its last saved state is {saved.uri}: continue from it with "
                      "create_training_client_from_state_with_optimizer" if saved else
                      "it saved no training state (save_state) to continue from")
            raise FailedPrecondition(f"training_run_id: run {run_id} has no weights in this server's "
                                     f"memory (it was unloaded, its session finished, or the server "
                                     f"restarted since it was created); {resume}")
        return run

    def _resident(self, run_id: str) -> TrainingRun:
        """The run with its weights in memory (brought back from disk if it was moved there);
        on the worker thread only. Idle runs used least recently move to disk if over budget."""
        run = self.get_run(run_id)
        directory = self._spilled.get(run_id)
        if directory is not None:
            run.rebuild()
            try:
                state.restore(run, directory, with_optimizer=True)
            except BaseException:
                run.release()  # still on disk: never a run with fresh weights under its name
                raise
            del self._spilled[run_id]
            shutil.rmtree(directory, ignore_errors=True)
            logger.info("brought run %s back from disk", run_id)
        self.runs.move_to_end(run_id)
        self._make_room(run_id)
        return run

    def _make_room(self, keep: str) -> None:
        """Move idle runs, least recently used first, to disk until the rest fit the budget."""
        held = sum(r.memory_bytes() for i, r in self.runs.items() if i not in self._spilled)
        for run_id, run in list(self.runs.items()):
            if held <= self.run_memory_bytes:
                return
            if run_id == keep or run_id in self._spilled or not run.is_idle():
                continue
            held -= run.memory_bytes()
            self.spill(run_id)

    def spill(self, run_id: str) -> None:
        """Write an idle run's weights and optimizer state to disk and free their memory; its next
        call brings it back as it was."""
        run = self.runs[run_id]
        assert run.is_idle(), run_id
        directory = self._spill_dir / hashlib.sha1(run_id.encode()).hexdigest()
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        state.save_state(run, directory)
        with warnings.catch_warnings():  # PEFT warns when the live adapter goes
            warnings.simplefilter("ignore", UserWarning)
            run.release()
        self._spilled[run_id] = directory
        logger.info("moved idle run %s to disk", run_id)

    def _lora_host(self, base: BaseModel) -> LoraHost:
        if base.name not in self._lora_hosts:
            self._lora_hosts[base.name] = LoraHost(base)
        return self._lora_hosts[base.name]

    def forward_backward(self, run_id: str, work: ForwardBackwardWork) -> ForwardBackwardResult:
        run = self._resident(run_id)
        self.stats.trained_tokens += sum(d.tokens_T.shape[0] for d in work.data)
        if not get_loss(work.loss_fn).needs_teacher:
            with self.precision(training=True):
                return run.forward_backward(work, None)
        opened = self._open_teacher(run, work.loss_fn_config_strings)
        self.pin(opened)  # other work runs between micro-batches: the teacher must stay loaded
        try:
            with self.precision(training=True):
                return run.forward_backward(work, lambda: self._module_for(opened))
        finally:
            self.unpin(opened)

    def precision(self, training: bool = False) -> contextlib.AbstractContextManager:
        """The autocast of a training pass (`training`) or of sampling and scoring, and for the
        latter the batch-invariant mode where the server runs in it."""
        enabled = self.autocast_bf16_training if training else self.autocast_bf16_inference
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)
        if training or not self.batch_invariant:
            return autocast
        stack = contextlib.ExitStack()
        stack.enter_context(autocast)
        stack.enter_context(BatchInvariant())
        return stack

    def _open_teacher(self, run: TrainingRun, strings: dict[str, str]) -> Sampler:
        """The sampler named by loss_fn_config.teacher, after checking it shares the tokenizer."""
        name = _teacher_name(strings)
        if checkpoints.is_path(name):
            teacher = self.open_sampler(model_path=name)
        else:
            teacher = self.open_sampler(base_model=name)
        student, base = run.base, teacher.base
        if student.name != base.name and (base.vocab_size != student.vocab_size
                                          or base.tokenizer.get_vocab() != student.tokenizer.get_vocab()):
            raise _other_tokenizer(name, base.vocab_size, student.vocab_size)
        return teacher

    def optim_step(self, run_id: str, work: OptimWork) -> OptimResult:
        return self._resident(run_id).optim_step(work.adam)

    def save_sampler_weights(self, run_id: str, name: str) -> tuple[str, int]:
        """Snapshot the run's weights for sampling; return the checkpoint path and its size."""
        run = self._resident(run_id)
        path = checkpoints.CheckpointPath(run_id, "sampler_weights", checkpoints.check_name(name))
        size = self.files.write(path, self.checkpoint_meta(run, name), run.save_sampler_weights)
        return path.uri, size

    # ---------------------------------------------------------------- samplers

    def open_sampler(self, base_model: str | None = None, model_path: str | None = None) -> Sampler:
        """A sampler on a base model or on saved sampler weights, loading them once."""
        key = f"base:{base_model}" if base_model is not None else f"path:{model_path}"
        with self._lock:
            if key in self._samplers:
                return self._samplers[key]
        if base_model is not None:
            opened = Sampler(key, self.models.get(base_model))
        else:
            assert model_path is not None, "a sampler needs a base model or a path"
            opened = self._open_snapshot(key, checkpoints.parse(model_path))
        with self._lock:
            return self._samplers.setdefault(key, opened)

    def _open_snapshot(self, key: str, path: checkpoints.CheckpointPath) -> Sampler:
        if path.kind != "sampler_weights":
            raise InvalidInput(f"model_path: {path.uri} is a training state, not sampler weights")
        meta = self.files.read_meta(path)
        base = self.models.get(meta["base_model"])
        if meta["kind"] == "lora":
            adapter = "snap-" + hashlib.sha1(path.uri.encode()).hexdigest()[:16]
            opened = Sampler(key, base, adapter=adapter)
            self._load_adapter(opened)
            return opened
        return Sampler(key, base)

    def _load_adapter(self, opened: Sampler) -> LoraHost:
        """Make a LoRA snapshot's adapter loaded (from its files if it was unloaded) and the most
        recently used; unload the least recently used beyond MAX_LOADED_ADAPTERS that no row uses."""
        if opened.deleted:
            raise NotFound(f"model_path: checkpoint {opened.key[len('path:'):]} was deleted")
        host = self._lora_host(opened.base)
        assert opened.adapter is not None
        if opened.adapter not in self._adapters:
            path = checkpoints.parse(opened.key[len("path:"):])
            host.load_adapter(opened.adapter, self.files.directory(path))
            self._adapters[opened.adapter] = opened
            idle = [name for name in self._adapters if not self._pins[name] and name != opened.adapter]
            for name in idle[:max(0, len(self._adapters) - MAX_LOADED_ADAPTERS)]:
                evicted = self._adapters.pop(name)   # maybe a snapshot of another base model
                self._remove_adapter(self._lora_host(evicted.base), name)
        self._adapters.move_to_end(opened.adapter)
        return host

    @staticmethod
    def _remove_adapter(host: LoraHost, name: str) -> None:
        with warnings.catch_warnings():  # PEFT warns when the live adapter goes; we set it per call
            warnings.simplefilter("ignore", UserWarning)
            host.remove_adapter(name)

    # ---------------------------------------------------------------- batches the scheduler streams

    def streams(self) -> batching.EngineStreams:
        """How the scheduler runs sample and logprob jobs: continuous batches over shared weights."""
        return batching.EngineStreams(self)

    def shutdown(self) -> None:
        """Nothing to stop: every model lives in this process (the sharded back end stops workers)."""

    def batch_group(self, opened: Sampler) -> str:
        """Samplers whose rows can share one forward: a base model and its LoRA snapshots (each row
        on its own adapter), or a full snapshot alone."""
        if opened.adapter is None and opened.key.startswith("path:"):
            return opened.key
        return f"base:{opened.base.name}"

    def batch_model(self, opened: Sampler, lora: bool) -> torch.nn.Module:
        """The module a batch of `opened`'s group runs on: the base itself unless a row needs an
        adapter, then the base's PEFT host (rows name their adapters)."""
        if opened.adapter is None and opened.key.startswith("path:"):
            return self._module_for(opened)
        if lora:  # called like a module, with adapter_names=
            return cast(torch.nn.Module, _RowsView(self._lora_host(opened.base)))
        return opened.base.module

    def pin(self, opened: Sampler) -> str:
        """Keep a sampler's weights loaded while its rows decode; return the rows' adapter name."""
        if opened.deleted:
            raise NotFound(f"model_path: checkpoint {opened.key[len('path:'):]} was deleted")
        if opened.adapter is None:
            return sampler.BASE_ADAPTER
        self._load_adapter(opened)
        self._pins[opened.adapter] += 1
        return opened.adapter

    def unpin(self, opened: Sampler) -> None:
        if opened.adapter is not None and self._pins[opened.adapter] > 0:
            self._pins[opened.adapter] -= 1

    def _module_for(self, opened: Sampler) -> torch.nn.Module:
        if opened.deleted:
            raise NotFound(f"model_path: checkpoint {opened.key[len('path:'):]} was deleted")
        if opened.adapter is not None:
            return cast(torch.nn.Module, _AdapterView(self._load_adapter(opened), opened.adapter))
        if not opened.key.startswith("path:"):
            return opened.base.module
        if opened.key not in self._full_snapshots:
            self._full_snapshots[opened.key] = self._load_full_snapshot(opened)
            while len(self._full_snapshots) > MAX_LOADED_FULL_SNAPSHOTS:
                self._full_snapshots.popitem(last=False)
        self._full_snapshots.move_to_end(opened.key)
        return self._full_snapshots[opened.key]

    def _load_full_snapshot(self, opened: Sampler) -> torch.nn.Module:
        from safetensors.torch import load_file

        directory = self.files.directory(checkpoints.parse(opened.key[len("path:"):]))
        module = opened.base.owned_copy(requires_grad=False)
        state = load_file(str(directory / "model.safetensors"), device=str(self.device))
        missing, unexpected = module.load_state_dict(state, strict=False)
        assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
        module.tie_weights()
        return module.eval()

    def sample(self, opened: Sampler, works: list[SampleWork]) -> list[SampleResult]:
        """Sample `works` to the end as one batch (outside the scheduler: tests, direct use)."""
        jobs = [Job(kind="sample", run=None, done=lambda r, e: None, payload=(opened, w)) for w in works]
        done = batching.run_to_end(batching.DecodeStream(self), jobs)
        for job in jobs:
            if (error := done[id(job)][2]) is not None:
                raise error
        return [done[id(job)][1] for job in jobs]

    def prompt_logprobs(self, opened: Sampler, work: SampleWork, result: SampleResult) -> None:
        """Fill `result`'s prompt logprobs (and top-k) as `work` asks."""
        with self.precision():
            logprobs_T, ids, values = compute.sequence_logprobs(
                self._module_for(opened), [work.prompt_T], self.device, work.topk_prompt_logprobs,
                [work.prompt_logprobs_last_n])[0]
        k = work.topk_prompt_logprobs
        result.prompt_logprobs_T = logprobs_T if work.include_prompt_logprobs else None
        if k:
            assert ids is not None and values is not None
            result.topk_ids_T_K, result.topk_logprobs_T_K = ids[:, :k], values[:, :k]

    def target_prompt_logprobs(self, opened: Sampler, work: SampleWork, result: SampleResult) -> None:
        """Fill `result`'s logprobs of the token ids `work.target_prompt_ids_T_K` names."""
        assert work.target_prompt_ids_T_K is not None
        with self.precision():
            result.target_logprobs_T_K = compute.target_logprobs(
                self._module_for(opened), work.prompt_T, work.target_prompt_ids_T_K, self.device)

    def compute_logprobs(self, opened: Sampler, works: list[LogprobsWork]) -> list[LogprobsResult]:
        module = self._module_for(opened)
        self.stats.scored_tokens += sum(w.tokens_T.shape[0] for w in works)
        with self.precision():
            scored = compute.sequence_logprobs(module, [w.tokens_T for w in works], self.device,
                                               last_n=[w.last_n for w in works])
        return [LogprobsResult(logprobs_T) for logprobs_T, _, _ in scored]

    # ---------------------------------------------------------------- training state and checkpoint files

    def save_state(self, run_id: str, name: str) -> tuple[str, int]:
        """Write the run's weights and optimizer state; return the checkpoint path and its size."""
        run = self._resident(run_id)
        path = checkpoints.CheckpointPath(run_id, "weights", checkpoints.check_name(name))
        meta = self.checkpoint_meta(run, name, training_state=True)
        size = self.files.write(path, meta, lambda directory: state.save_state(run, directory))
        return path.uri, size

    def state_meta(self, uri: str, field: str = "path") -> dict:
        """The meta of a saved training state; cheap (reads one JSON file)."""
        path = checkpoints.parse(uri, field)
        if path.kind != "weights":
            raise InvalidInput(f"{field}: {path.uri} is sampler weights, not a training state "
                               f"({checkpoints.SCHEME}<run_id>/weights/<name>, from save_state)")
        return self.files.read_meta(path)

    def validate_load_state(self, run_id: str, uri: str) -> None:
        run, meta = self.get_run(run_id), self.state_meta(uri)
        if meta["base_model"] != run.base.name or meta["is_lora"] != run.is_lora:
            raise InvalidInput(f"path: {uri} is a {meta['kind']} state of {meta['base_model']}; this run "
                               f"is a {'lora' if run.is_lora else 'full'} run of {run.base.name}")
        settings = self.lora_meta(run)
        if run.is_lora and meta["lora"] != settings:
            raise InvalidInput(f"path: {uri} has LoRA settings {meta['lora']}, this run {settings}")

    def checkpoint_meta(self, run: Any, name: str, training_state: bool = False) -> dict:
        """What a checkpoint's meta.json says of the run that wrote it (a training state also
        records its LoRA settings, which a load must match)."""
        meta = {"base_model": run.base.name, "kind": "lora" if run.is_lora else "full",
                "run_id": run.run_id, "name": name}
        if training_state:
            meta |= {"is_lora": run.is_lora, "lora": self.lora_meta(run)}
        return meta

    def lora_meta(self, run: Any) -> dict | None:
        """A run's LoRA settings as checkpoints record them (None for full fine-tuning)."""
        return _lora_meta(run)

    def load_state(self, run_id: str, uri: str, with_optimizer: bool) -> None:
        self.validate_load_state(run_id, uri)
        run = self._resident(run_id)
        state.restore(run, self.files.directory(checkpoints.parse(uri)), with_optimizer)

    def create_run_from_state(self, run_id: str, uri: str, with_optimizer: bool) -> TrainingRun:
        """A new run holding a saved state's weights (and optimizer moments, if asked)."""
        meta = self.state_meta(uri)
        directory = self.files.directory(checkpoints.parse(uri))
        base = self.models.get(meta["base_model"])
        if meta["is_lora"]:
            config: Any = LoraConfig.from_pretrained(str(directory))
            run: TrainingRun = LoraRun(run_id, base, self._lora_host(base), config, self.device, None)
        else:
            run = FullRun(run_id, base, self.device)
        run.fixed_microbatches = self.batch_invariant
        try:
            state.restore(run, directory, with_optimizer)
        except BaseException:
            if isinstance(run, LoraRun):
                run.host.remove_adapter(run.adapter)
            raise
        self.runs[run_id] = run
        self._make_room(run_id)
        logger.info("created %s run %s from %s", meta["kind"], run_id, uri)
        return run

    def unload_checkpoint(self, uri: str) -> None:
        """Forget a checkpoint's loaded weights (before its files are deleted)."""
        key = f"path:{uri}"
        with self._lock:
            opened = self._samplers.pop(key, None)
        self._full_snapshots.pop(key, None)
        if opened is not None:
            opened.deleted = True
        if opened is not None and self._adapters.pop(opened.adapter or "", None) is not None:
            self._remove_adapter(self._lora_host(opened.base), opened.adapter or "")

    def delete_checkpoint(self, uri: str) -> None:
        self.unload_checkpoint(uri)
        self.files.delete(checkpoints.parse(uri))

    # ---------------------------------------------------------------- validation

    def validate_forward_backward(self, run_id: str, work: ForwardBackwardWork) -> None:
        run = self.get_run(run_id)
        spec = get_loss(work.loss_fn)
        spec.resolve_config(work.loss_fn_config)
        self._validate_strings(spec, run, work.loss_fn_config_strings)
        unsplit = work.num_parts == 0 and work.part == 0
        if work.num_parts < 0 or not (unsplit or 0 <= work.part < work.num_parts):
            raise InvalidInput(f"part: need 0 <= part < num_parts, got part {work.part} of {work.num_parts}")
        if not work.data:
            raise InvalidInput("data: at least one datum is needed")
        required = {"target_tokens", *spec.inputs}
        allowed = required | set(spec.optional_inputs)
        first_k: tuple[int, ...] = ()
        for i, datum in enumerate(work.data):
            field = f"data[{i}]"
            self._check_tokens(datum.tokens_T, f"{field}.model_input", run.base)
            missing = sorted(required - set(datum.inputs))
            if missing:
                raise InvalidInput(f"{field}.loss_fn_inputs: missing {missing} for loss '{work.loss_fn}'")
            extra = sorted(set(datum.inputs) - allowed)
            if extra:
                raise InvalidInput(f"{field}.loss_fn_inputs: unexpected {extra} for loss "
                                   f"'{work.loss_fn}' (expected {sorted(allowed)})")
            length = datum.tokens_T.shape[0]
            shape = _inputs_shape(spec, datum.inputs["target_tokens"], f"{field}.loss_fn_inputs", length)
            first_k = shape[1:] if i == 0 else first_k
            if shape[1:] != first_k:
                raise InvalidInput(f"{field}.loss_fn_inputs.target_tokens: {shape[1:]} targets per position, "
                                   f"data[0] has {first_k}: every datum of a call has the same K")
            for key, tensor in sorted(datum.inputs.items()):
                if tuple(tensor.shape) != shape:
                    raise InvalidInput(f"{field}.loss_fn_inputs.{key}: shape {list(tensor.shape)} does "
                                       f"not match model_input length {length}"
                                       + (f" and K {shape[1]}" if len(shape) == 2 else ""))
                if key == "target_tokens" and tensor.dim() == 2:
                    self._check_tokens(tensor.flatten(), f"{field}.loss_fn_inputs.target_tokens", run.base,
                                       limit=tensor.numel())
                elif key == "target_tokens":
                    self._check_tokens(tensor, f"{field}.loss_fn_inputs.target_tokens", run.base)
                elif tensor.is_floating_point():
                    if not torch.isfinite(tensor).all():
                        raise InvalidInput(f"{field}.loss_fn_inputs.{key}: values must be finite "
                                           "(found NaN or inf)")
                else:
                    raise InvalidInput(f"{field}.loss_fn_inputs.{key}: dtype must be float32")

    def _validate_strings(self, spec, run: TrainingRun, strings: dict[str, str]) -> None:
        allowed = {"teacher"} if spec.needs_teacher else set()
        unknown = sorted(set(strings) - allowed)
        if unknown:
            raise InvalidInput(f"loss_fn_config: unknown key(s) {unknown} for loss '{spec.name}'")
        if not spec.needs_teacher:
            return
        name = _teacher_name(strings)
        if checkpoints.is_path(name):
            path = checkpoints.parse(name, "loss_fn_config.teacher")
            meta = self.files.read_meta(path)
            teacher_vocab = self.models.describe(meta["base_model"])["vocab_size"]
        else:
            teacher_vocab = self.models.describe(name)["vocab_size"]
        if teacher_vocab != run.base.vocab_size:  # the full vocabularies are compared when it runs
            raise _other_tokenizer(name, teacher_vocab, run.base.vocab_size)

    def validate_sample(self, opened: Sampler, work: SampleWork) -> None:
        self._check_tokens(work.prompt_T, "prompt", opened.base, allow_full=False)
        params = work.params
        if not 1 <= work.num_samples <= self.max_num_samples:
            raise InvalidInput(f"num_samples: must be between 1 and {self.max_num_samples}, "
                               f"got {work.num_samples}")
        if params.max_tokens < -1 or params.max_tokens == 0:
            raise InvalidInput(f"sampling_params.max_tokens: must be >= 1 (or unset), "
                               f"got {params.max_tokens}")
        if not (math.isfinite(params.temperature) and params.temperature >= 0):
            raise InvalidInput(f"sampling_params.temperature: must be >= 0, got {params.temperature}")
        if not (0 < params.top_p <= 1):
            raise InvalidInput(f"sampling_params.top_p: must be in (0, 1], got {params.top_p}")
        if params.top_k == 0 or params.top_k < -1:
            raise InvalidInput(f"sampling_params.top_k: must be -1 (no limit) or >= 1, got {params.top_k}")
        for token in params.stop_tokens:
            if not 0 <= token < opened.vocab_size:
                raise InvalidInput(f"sampling_params.stop: token {token} is outside the vocabulary "
                                   f"[0, {opened.vocab_size})")
        if any(not text for text in params.stop_texts):
            raise InvalidInput("sampling_params.stop: stop strings must not be empty")
        if not 0 <= work.topk_prompt_logprobs <= 100:
            raise InvalidInput(f"topk_prompt_logprobs: must be between 0 and 100, "
                               f"got {work.topk_prompt_logprobs}")
        if not 0 <= work.topk_sample_logprobs <= 100:
            raise InvalidInput(f"topk_sample_logprobs: must be between 0 and 100, "
                               f"got {work.topk_sample_logprobs}")
        if work.target_prompt_ids_T_K is not None:
            self._check_targets(work.target_prompt_ids_T_K, work.prompt_T, opened.vocab_size)
        if work.prompt_logprobs_last_n is not None:
            if not (work.include_prompt_logprobs or work.topk_prompt_logprobs):
                raise InvalidInput("prompt_logprobs_last_n: needs include_prompt_logprobs or "
                                   "topk_prompt_logprobs")
            _check_last_n(work.prompt_logprobs_last_n, work.prompt_T, "prompt_logprobs_last_n")

    def validate_logprobs(self, opened: Sampler, work: LogprobsWork) -> None:
        self._check_tokens(work.tokens_T, "prompt", opened.base)
        if work.last_n is not None:
            _check_last_n(work.last_n, work.tokens_T, "prompt_logprobs_last_n")

    @staticmethod
    def _check_targets(ids_T_K: torch.Tensor, prompt_T: torch.Tensor, vocab_size: int) -> None:
        field = "target_prompt_logprobs"
        want = [prompt_T.shape[0] - 1, ids_T_K.shape[-1] if ids_T_K.dim() == 2 else 0]
        if ids_T_K.dtype != torch.long or list(ids_T_K.shape) != want or not 1 <= want[1] <= MAX_TARGETS:
            raise InvalidInput(f"{field}: must be int64 of shape [len(prompt) - 1, K] with 1 <= K <= "
                               f"{MAX_TARGETS}, got {str(ids_T_K.dtype).removeprefix('torch.')} "
                               f"{list(ids_T_K.shape)} for a prompt of {prompt_T.shape[0]} tokens")
        if ids_T_K.numel() and (int(ids_T_K.min()) < -1 or int(ids_T_K.max()) >= vocab_size):
            raise InvalidInput(f"{field}: ids must be -1 (nothing) or in the vocabulary [0, {vocab_size})")

    @staticmethod
    def _check_tokens(tokens_T: torch.Tensor, field: str, base: BaseModel, allow_full: bool = True,
                      limit: int | None = None) -> None:
        """Token ids: int64, 1-D, 1 to `limit` of them (the context), each in the vocabulary."""
        if tokens_T.dtype != torch.long or tokens_T.dim() != 1:
            raise InvalidInput(f"{field}: tokens must be a 1-D int64 tensor")
        length = tokens_T.shape[0]
        if length == 0:
            raise InvalidInput(f"{field}: must hold at least one token")
        if limit is None:
            limit = base.max_context if allow_full else base.max_context - 1
        if length > limit:
            raise InvalidInput(f"{field}: {length} tokens is over the model's limit of {limit} "
                               f"(context length {base.max_context})")
        low, high = int(tokens_T.min()), int(tokens_T.max())
        if low < 0 or high >= base.vocab_size:
            bad = low if low < 0 else high
            raise InvalidInput(f"{field}: token id {bad} is outside the vocabulary [0, {base.vocab_size})")


def _inputs_shape(spec, targets: torch.Tensor, field: str, length: int) -> tuple[int, ...]:
    """The shape every loss input of a datum must have: [T], or [T, K] where a loss that takes
    soft targets gets K of them at each position."""
    if targets.dim() != 2:
        return (length,)
    if not spec.soft_targets:
        raise InvalidInput(f"{field}.target_tokens: shape {list(targets.shape)}: loss '{spec.name}' takes "
                           "one target per position ([T]); [T, K] targets are cross_entropy's")
    if not 1 <= targets.shape[1] <= MAX_TARGETS:
        raise InvalidInput(f"{field}.target_tokens: K must be between 1 and {MAX_TARGETS}, "
                           f"got shape {list(targets.shape)}")
    return (length, targets.shape[1])


class _AdapterView:
    """A LoRA host called with every row on one adapter, whichever adapter is active (so a
    training run's activation between two steps never changes what a sampler or teacher sees)."""

    def __init__(self, host: LoraHost, adapter: str) -> None:
        self.host, self.adapter = host, adapter

    def __call__(self, **inputs):
        return self.host.run_rows([self.adapter] * inputs["input_ids"].shape[0], **inputs)


class _RowsView:
    """A LoRA host whose rows name their adapters (`adapter_names=`, one per row)."""

    takes_adapter_names = True

    def __init__(self, host: LoraHost) -> None:
        self.host = host

    def __call__(self, adapter_names: list[str], **inputs):
        return self.host.run_rows(adapter_names, **inputs)


def _check_last_n(last_n: int, tokens_T: torch.Tensor, field: str) -> None:
    if not 1 <= last_n <= tokens_T.shape[0] - 1:
        raise InvalidInput(f"{field}: must be between 1 and len(prompt) - 1 = {tokens_T.shape[0] - 1}, "
                           f"got {last_n}")



def _lora_meta(run: TrainingRun) -> dict | None:
    if not isinstance(run, LoraRun):
        return None
    config: Any = run.config
    return {"rank": config.r, "lora_alpha": config.lora_alpha,
            "target_modules": sorted(config.target_modules)}


def known_losses() -> list[str]:
    return list(LOSSES)


def _teacher_name(strings: dict[str, str]) -> str:
    name = strings.get("teacher", "")
    if not name:
        raise InvalidInput("loss_fn_config.teacher: name the teacher (a base model or a "
                           "stillroom://.../sampler_weights/... path)")
    return name


def _other_tokenizer(name: str, teacher_vocab: int, student_vocab: int) -> InvalidInput:
    return InvalidInput(
        f"loss_fn_config.teacher: {name} does not share the student's tokenizer (teacher vocabulary "
        f"{teacher_vocab} tokens, student {student_vocab}); teacher_reverse_kl compares next-token "
        "distributions token by token, so both models must use the same tokenizer")
