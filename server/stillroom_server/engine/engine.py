"""The engine facade: training runs and samplers over the hosted base models.

Every method that touches a model is called from the scheduler's one worker thread; `validate_*`
methods are cheap, touch no weights and may be called from anywhere, before work is accepted.
The engine knows nothing of gRPC, SQL, owners or request numbering.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import shutil
import threading
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from peft import LoraConfig

from stillroom_server.engine import checkpoints
from stillroom_server.engine.adapters.lora import LoraHost, LoraRun, lora_config
from stillroom_server.engine.checkpoints import exports, state
from stillroom_server.engine.errors import FailedPrecondition, InvalidInput, NotFound
from stillroom_server.engine.kernels.batch_invariant import BatchInvariant
from stillroom_server.engine.models import BaseModel, ModelHost
from stillroom_server.engine.runtime import resources
from stillroom_server.engine.runtime.scheduler import Job
from stillroom_server.engine.runtime.stats import EngineStats
from stillroom_server.engine.sampling import batching, compute, sampler
from stillroom_server.engine.training import FullRun, TrainingRun
from stillroom_server.engine.training.losses import LOSSES, get_loss
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
from stillroom_server.engine.types import LoraSpec as LoraSpec  # where callers have found it
from stillroom_server.engine.validation import Validation, other_tokenizer, teacher_name

logger = logging.getLogger("stillroom.engine")
MAX_LOADED_FULL_SNAPSHOTS = 4
MAX_LOADED_ADAPTERS = 16   # LoRA snapshots kept loaded; the least recently used unpinned go first


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


class Engine(Validation):
    def __init__(self, data_dir: Path, device: str = "cpu", max_num_samples: int = 128,
                 local_models: dict[str, Path] | None = None, dtype: str = "auto",
                 run_memory_bytes: int | None = None, batch_invariant: bool = False,
                 spill_dir: Path | None = None, adopt_spill: bool = False,
                 owns_data_dir: bool = True) -> None:
        """`spill_dir` holds idle runs moved to disk (default <data_dir>/spill); it is emptied at
        start unless `adopt_spill` (an engine process restarted after a crash: the server brings
        the runs spilled there back with `restore_run`). `owns_data_dir`: this engine alone writes
        the data directory, so half-written checkpoints left there are its own crash's to remove
        (an engine process shares it with others: the server removes them once, at its start)."""
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
        if owns_data_dir and (removed := self.files.remove_partial()):
            logger.warning("removed %d half-written checkpoint folders left by a crash", removed)
        self.max_num_samples = max_num_samples
        self.runs: collections.OrderedDict[str, TrainingRun] = collections.OrderedDict()  # least recent first
        # training runs' weights and moments kept in memory; idle runs beyond it wait on disk
        self.run_memory_bytes = run_memory_bytes if run_memory_bytes is not None else \
            int(resources.MEMORY_FRACTION * resources.memory_budget()[1]) or 1 << 34
        self._spill_dir = spill_dir or data_dir / "spill"
        if not adopt_spill:
            shutil.rmtree(self._spill_dir, ignore_errors=True)  # a restart forgets the runs held there
        else:  # a spill cut short by the crash was never complete: it holds no run
            for partial in self._spill_dir.glob(".*"):
                shutil.rmtree(partial, ignore_errors=True)
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
        directory = self.spill_directory(run_id)
        staging = directory.with_name("." + directory.name)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        state.save_state(run, staging)  # a complete training state, meta included: restore_run reads it
        (staging / checkpoints.META_FILE).write_text(json.dumps(self.checkpoint_meta(run, "spill", True)))
        shutil.rmtree(directory, ignore_errors=True)
        staging.rename(directory)
        with warnings.catch_warnings():  # PEFT warns when the live adapter goes
            warnings.simplefilter("ignore", UserWarning)
            run.release()
        self._spilled[run_id] = directory
        logger.info("moved idle run %s to disk", run_id)

    def spill_directory(self, run_id: str) -> Path:
        return checkpoints.spill_folder(self._spill_dir, run_id)

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
        name = teacher_name(strings)
        if checkpoints.is_path(name):
            teacher = self.open_sampler(model_path=name)
        else:
            teacher = self.open_sampler(base_model=name)
        student, base = run.base, teacher.base
        if student.name != base.name and (base.vocab_size != student.vocab_size
                                          or base.tokenizer.get_vocab() != student.tokenizer.get_vocab()):
            raise other_tokenizer(name, base.vocab_size, student.vocab_size)
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

    def open_sampler_if_known(self, key: str) -> Sampler | None:
        """The open sampler of `key`, if this engine has it open (from any thread)."""
        with self._lock:
            return self._samplers.get(key)

    def sampler_by_key(self, key: str) -> Sampler:
        """The sampler of `key` ("base:<model>" or "path:<uri>"), opened if it is not yet."""
        kind, _, name = key.partition(":")
        if kind == "base":
            return self.open_sampler(base_model=name)
        if kind == "path":
            return self.open_sampler(model_path=name)
        raise InvalidInput(f"sampler: {key[:80]} names no base model or checkpoint")

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

    def save_checkpoint(self, run_id: str, kind: str, name: str, replace: bool = False,
                        age_recipients: list[str] | None = None) -> tuple[str, int]:
        """Write checkpoint `kind` of the run (a training state, sampler weights, or external files
        encrypted to `age_recipients` if any), deleting one of that name first if `replace`."""
        path = checkpoints.CheckpointPath(run_id, kind, checkpoints.check_name(name))
        if replace:
            self.delete_checkpoint(path.uri)
        if kind == "weights":
            return self.save_state(run_id, name)
        if kind == "sampler_weights":
            return self.save_sampler_weights(run_id, name)
        if kind == checkpoints.EXTERNAL:
            return self.export_weights(run_id, name, exports.recipients(age_recipients))
        raise InvalidInput(f"kind: {kind} is not a checkpoint kind")

    def export_weights(self, run_id: str, name: str, encrypt_to: list) -> tuple[str, int]:
        """The run's weights as Hugging Face / PEFT files (exports.py): its sampler snapshot, written
        under a temporary name, rewritten as the export and removed."""
        temporary = f"export-{uuid.uuid4().hex[:12]}"
        snapshot = checkpoints.parse(self.save_sampler_weights(run_id, temporary)[0])
        try:
            source = self.files.directory(snapshot)
            meta = self.files.read_meta(snapshot) | {"name": name, "format": "external",
                                                     "encrypted": bool(encrypt_to)}
            path = checkpoints.CheckpointPath(run_id, checkpoints.EXTERNAL, name)
            size = self.files.write(path, meta, lambda staging: exports.fill(
                source, staging, meta["base_model"], encrypt_to))
        finally:
            self.files.delete(snapshot)
        return path.uri, size

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
        run = self._run_from_folder(run_id, directory, meta, with_optimizer)
        logger.info("created %s run %s from %s", meta["kind"], run_id, uri)
        return run

    def restore_run(self, run_id: str, source: str) -> TrainingRun:
        """Bring back a run lost with a crashed engine process, as the run `run_id`: from its
        spilled state (a folder of this engine's spill directory, exactly as it was) or from a
        saved training state (a checkpoint path), with its AdamW moments either way."""
        if checkpoints.is_path(source):
            return self.create_run_from_state(run_id, source, with_optimizer=True)
        directory = Path(source)
        if directory.parent != self._spill_dir or not directory.is_dir():
            raise InvalidInput(f"source: {source} is not a spilled run of this engine")
        meta = json.loads((directory / checkpoints.META_FILE).read_text())
        run = self._run_from_folder(run_id, directory, meta, with_optimizer=True)
        shutil.rmtree(directory, ignore_errors=True)
        logger.info("brought run %s back from the state it had spilled before a crash", run_id)
        return run

    def _run_from_folder(self, run_id: str, directory: Path, meta: dict, with_optimizer: bool) -> TrainingRun:
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


def _lora_meta(run: TrainingRun) -> dict | None:
    if not isinstance(run, LoraRun):
        return None
    config: Any = run.config
    return {"rank": config.r, "lora_alpha": config.lora_alpha,
            "target_modules": sorted(config.target_modules)}


def known_losses() -> list[str]:
    return list(LOSSES)
