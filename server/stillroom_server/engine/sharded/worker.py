"""A worker process of the sharded back end: `python -m stillroom_server.engine.sharded.worker`.

Rendezvous is torch.distributed's own (`env://`: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, as
torchrun sets them), so the same code runs under a torchrun-style launch on several machines.
Rank 0 connects to the server (STILLROOM_WORKER_ADDRESS, STILLROOM_WORKER_AUTHKEY), receives the
server's settings and then each command (wire.py: JSON and safetensors, no pickles), broadcasts
them to every rank (on gloo), and every rank runs the command on its `WorkerEngine`, in the same
order; rank 0 sends back the result. Knows nothing of owners, request numbers or the wire.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import sys
import time
from datetime import timedelta
from multiprocessing.connection import Client
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from peft import LoraConfig

from stillroom_server.engine import checkpoints
from stillroom_server.engine.adapters.lora import LoraHost, LoraRun, lora_config
from stillroom_server.engine.checkpoints import state
from stillroom_server.engine.engine import Engine, LoraSpec, Sampler, _AdapterView
from stillroom_server.engine.errors import InvalidInput
from stillroom_server.engine.models import BaseModel, ModelHost
from stillroom_server.engine.sampling.sampler import BASE_ADAPTER
from stillroom_server.engine.sharded import fsdp, wire
from stillroom_server.engine.sharded.split import ShardedLoraRun
from stillroom_server.engine.sharded.wire import RunFacts
from stillroom_server.engine.training import TrainingRun
from stillroom_server.engine.types import LogprobsResult, LogprobsWork, SampleResult, SampleWork

logger = logging.getLogger("stillroom.worker")
COLLECTIVE_TIMEOUT_SECONDS = 600  # a rank stuck this long in a collective gives up (and exits)
CONNECT_SECONDS = 60.0            # rank 0 waits this long for the server to listen
# commands that hold whole (unsharded) tensors for a while: the heap is trimmed after them
WHOLE_TENSORS = frozenset({"create_run", "create_run_from_state", "load_state", "write_state",
                           "write_sampler_weights"})
PING_SECONDS = 30.0               # rank 0 wakes the others this often while idle (under the timeout)


class ShardedModelHost(ModelHost):
    """Base models built sharded over the group (no rank holds a whole copy)."""

    def _load(self, name: str) -> BaseModel:
        from transformers import AutoTokenizer

        directory = self.resolve(name)
        module = fsdp.build_sharded(directory, self.dtype, self.device)
        module.eval()
        module.requires_grad_(False)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        return BaseModel.of(name, directory, module, tokenizer, int(module.config.vocab_size))


class WorkerEngine(Engine):
    """The in-process engine's code over sharded modules: full runs shard their weights, gradients
    and AdamW moments; LoRA runs are adapters on one sharded base. Never moves runs to disk."""

    def __init__(self, data_dir: Path, device: str, local_models: dict[str, Path], dtype: str) -> None:
        super().__init__(data_dir, device, max_num_samples=1 << 30, local_models=local_models,
                         dtype=dtype, run_memory_bytes=1 << 62)
        self.models = ShardedModelHost(data_dir, self.models.device, self.models.dtype, local_models)

    def _lora_host(self, base: BaseModel) -> LoraHost:
        if base.name not in self._lora_hosts:
            self._lora_hosts[base.name] = fsdp.ShardedLoraHost(base)
        return self._lora_hosts[base.name]

    def create_run(self, run_id: str, base_model: str, lora: LoraSpec | None,  # type: ignore[override]
                   seed: int | None) -> RunFacts:
        base = self.models.get(base_model)
        if lora is None:
            run: TrainingRun = fsdp.ShardedFullRun(run_id, base, self.device)
        else:
            config = lora_config(base, lora.rank, lora.train_mlp, lora.train_attn, lora.train_unembed)
            run = ShardedLoraRun(run_id, base, self._lora_host(base), config, self.device, seed)
        self.runs[run_id] = run
        return facts(run)

    def create_run_from_state(self, run_id: str, uri: str,  # type: ignore[override]
                              with_optimizer: bool) -> RunFacts:
        meta = self.state_meta(uri)
        directory = self.files.directory(checkpoints.parse(uri))
        base = self.models.get(meta["base_model"])
        if meta["is_lora"]:
            config: Any = LoraConfig.from_pretrained(str(directory))
            lora = ShardedLoraRun(run_id, base, self._lora_host(base), config, self.device, None)
            try:
                state.restore(lora, directory, with_optimizer)
            except BaseException:
                lora.host.remove_adapter(lora.adapter)
                raise
            self.runs[run_id] = lora
            return facts(lora)
        run = fsdp.ShardedFullRun(run_id, base, self.device, weights=directory / "model.safetensors")
        if with_optimizer:
            restore_optimizer(run, directory)
        self.runs[run_id] = run
        return facts(run)

    def load_state(self, run_id: str, uri: str, with_optimizer: bool) -> None:
        run = self.get_run(run_id)
        if not isinstance(run, fsdp.ShardedFullRun):
            return super().load_state(run_id, uri, with_optimizer)
        directory = self.files.directory(checkpoints.parse(uri))
        run.load_weights(directory)
        run.optimizer = None
        if with_optimizer:
            restore_optimizer(run, directory)
        for param in run.trainable_parameters():
            param.grad = None
        run.accumulated_tokens, run._staged = 0, None

    def write_state(self, run_id: str, directory: str) -> None:
        """Write the run's training state into the server's staging `directory` (rank 0 writes)."""
        run = self.get_run(run_id)
        if isinstance(run, fsdp.ShardedFullRun):
            run.save_sampler_weights(Path(directory))
            save_optimizer(run, Path(directory))
        elif fsdp.is_rank0():
            state.save_state(run, Path(directory))

    def write_sampler_weights(self, run_id: str, directory: str) -> None:
        run = self.get_run(run_id)
        if isinstance(run, fsdp.ShardedFullRun) or fsdp.is_rank0():
            run.save_sampler_weights(Path(directory))

    def _open(self, key: str) -> Sampler:
        kind, _, name = key.partition(":")
        return self.open_sampler(base_model=name) if kind == "base" else self.open_sampler(model_path=name)

    def sample_key(self, key: str, works: list[SampleWork]) -> list[SampleResult]:
        return self.sample(self._open(key), works)

    def logprobs_key(self, key: str, works: list[LogprobsWork]) -> list[LogprobsResult]:
        return self.compute_logprobs(self._open(key), works)

    def _module_for(self, opened: Sampler) -> torch.nn.Module:
        module = super()._module_for(opened)
        return self._without_adapters(opened.base, module)

    def batch_model(self, opened: Sampler, lora: bool) -> torch.nn.Module:
        return self._without_adapters(opened.base, super().batch_model(opened, lora))

    def _without_adapters(self, base: BaseModel, module: torch.nn.Module) -> torch.nn.Module:
        """The base module itself carries the LoRA host's adapters: base rows run with them off."""
        host = self._lora_hosts.get(base.name)
        if module is base.module and host is not None and host.model is not None:
            module = _AdapterView(host, BASE_ADAPTER)  # pyright: ignore[reportAssignmentType]
        return _Ordinary(module)  # pyright: ignore[reportReturnType]

    def _load_full_snapshot(self, opened: Sampler) -> torch.nn.Module:
        directory = self.files.directory(checkpoints.parse(opened.key[len("path:"):]))
        module = fsdp.build_sharded(opened.base.directory, opened.base.module.dtype, self.device,
                                    weights=directory / "model.safetensors")
        return module.eval().requires_grad_(False)

    @staticmethod
    def ping() -> None:
        """Nothing: keeps the ranks' collectives within their timeout while the server is idle."""


class _Ordinary:
    """A sharded module called outside inference mode (the decode loop runs inside it): FSDP's
    gathered weights must stay ordinary tensors, or the next pass cannot write into them."""

    def __init__(self, module: Any) -> None:
        self.module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode(False), torch.no_grad():
            return self.module(*args, **kwargs)


def facts(run: TrainingRun) -> RunFacts:
    meta = None
    if isinstance(run, LoraRun):
        config: Any = run.config
        meta = {"rank": config.r, "lora_alpha": config.lora_alpha,
                "target_modules": sorted(config.target_modules)}
    return RunFacts(run.is_lora, run.lora_rank, run.num_trainable_params(), meta)


def save_optimizer(run: fsdp.ShardedFullRun, directory: Path) -> None:
    """AdamW's state gathered to rank 0 and written in engine/checkpoints/state.py's format."""
    from safetensors.torch import save_file

    full = run.optimizer_state() if run.optimizer is not None else {"state": {}, "param_groups": []}
    if not fsdp.is_rank0():
        return
    tensors, steps = {}, {}
    for name, moments in full["state"].items():
        for key in state.MOMENTS:
            tensors[f"{name}.{key}"] = moments[key].detach().contiguous().cpu()
        steps[name] = float(moments["step"])
    group = full["param_groups"][0] if full["param_groups"] else None
    hyper = ({k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
             if group is not None else None)
    save_file(tensors, str(directory / state.OPTIMIZER_TENSORS), metadata={"format": "pt"})
    (directory / state.OPTIMIZER_JSON).write_text(json.dumps({"steps": steps, "param_group": hyper},
                                                             indent=1))


def restore_optimizer(run: fsdp.ShardedFullRun, directory: Path) -> None:
    """The saved AdamW state (engine/checkpoints/state.py's format), read by rank 0 and scattered
    to shards."""
    saved = json.loads((directory / state.OPTIMIZER_JSON).read_text())
    if saved["param_group"] is None:
        run.optimizer = None
        return
    names = [name for name, _ in run.model.named_parameters()]
    full: dict[str, Any] = {"state": {}, "param_groups": []}
    if fsdp.is_rank0():
        from safetensors.torch import load_file

        tensors = load_file(str(directory / state.OPTIMIZER_TENSORS), device="cpu")
        group = dict(saved["param_group"])
        group["betas"] = tuple(group["betas"])
        full["param_groups"] = [{**group, "params": names}]
        for name in names:
            if name not in saved["steps"]:
                raise InvalidInput(f"path: {directory.name} has no optimizer state for {name}")
            full["state"][name] = {"step": torch.tensor(saved["steps"][name], dtype=torch.float32),
                                   **{key: tensors[f"{name}.{key}"] for key in state.MOMENTS}}
    run.set_optimizer_state(full)


# ------------------------------------------------------------------------------------ the loop

def _broadcast(message: bytes | None) -> bytes:
    """Rank 0's bytes on every rank (two broadcasts on gloo: the length, then the bytes)."""
    size = torch.tensor([len(message) if message is not None else 0], dtype=torch.int64)
    dist.broadcast(size, src=0)
    buffer = (torch.frombuffer(bytearray(message), dtype=torch.uint8) if message is not None
              else torch.empty(int(size), dtype=torch.uint8))
    dist.broadcast(buffer, src=0)
    return buffer.numpy().tobytes()


def serve_commands(engine: WorkerEngine, connection: Any) -> None:
    """Receive (rank 0), broadcast, run and answer commands until the server says stop or goes."""
    while True:
        message = None
        if connection is not None:
            try:
                ready = connection.poll(PING_SECONDS)
                message = connection.recv_bytes() if ready else wire.encode(("ping", ()))
            except (EOFError, OSError):
                message = wire.encode(("stop", ()))
        method, args = wire.decode(_broadcast(message))
        if method == "stop":
            return
        try:
            answer: tuple[str, Any] = ("ok", getattr(engine, method)(*args))
        except Exception as error:  # noqa: BLE001 - sent back as the request's outcome
            logger.debug("%s failed on rank %d", method, dist.get_rank(), exc_info=True)
            answer = ("error", error)
        if connection is not None and method != "ping":
            connection.send_bytes(_encoded(answer))
        if method in WHOLE_TENSORS:
            _trim()


def _encoded(answer: tuple[str, Any]) -> bytes:
    """The answer as bytes, or the error of an answer that cannot be sent."""
    try:
        return wire.encode(answer)
    except (TypeError, AssertionError) as error:  # the server must get an answer, never a dead rank 0
        return wire.encode(("error", RuntimeError(f"the workers' answer cannot be sent: {error}")))


def _trim() -> None:
    """Give the heap's free pages back to the system (glibc keeps them after a whole-model gather
    or broadcast, so a worker would stay at its peak)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _connect() -> Any:
    """Rank 0's connection to the server (which may still be starting: tried for a minute)."""
    host, port = os.environ["STILLROOM_WORKER_ADDRESS"].rsplit(":", 1)
    authkey = bytes.fromhex(os.environ["STILLROOM_WORKER_AUTHKEY"])
    deadline = time.monotonic() + CONNECT_SECONDS
    while True:
        try:
            connection = Client((host, int(port)), authkey=authkey)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    connection.send_bytes(wire.encode(dist.get_world_size()))
    return connection


def main() -> None:
    rank = int(os.environ["RANK"])
    logging.basicConfig(level=os.environ.get("STILLROOM_LOG_LEVEL", "INFO").upper(),
                        format=f"%(asctime)s %(levelname)s rank {rank} %(name)s: %(message)s")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    # commands travel on gloo (CPU tensors); FSDP's collectives on CUDA tensors take NCCL
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo",
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_SECONDS))
    connection = _connect() if rank == 0 else None
    settings: dict[str, Any] = wire.decode(_broadcast(connection.recv_bytes() if connection else None))
    torch.set_num_threads(int(settings.get("threads") or 1))
    engine = WorkerEngine(Path(settings["data_dir"]), settings["device"],
                          {k: Path(v) for k, v in settings["local_models"].items()}, settings["dtype"])
    try:
        serve_commands(engine, connection)
    finally:
        dist.destroy_process_group()
    # A clean stop leaves without the interpreter's teardown: about one stop in twenty, rank 0
    # aborted during it (SIGABRT, "terminate called without an active exception": a C++ thread
    # still joinable when destroyed, most likely gloo's, kept alive by the models' device meshes
    # past destroy_process_group), which torchrun reports as a failed group.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":  # by its package name, so its classes are the ones wire.py registers
    from stillroom_server.engine.sharded import worker

    worker.main()
