"""FSDP2 pieces for the workers: sharded modules built from a Hugging Face directory, full runs over
them, and a LoRA host over one sharded base.

A module is built on the meta device, sharded with `fully_shard` (each decoder layer, then the
root) and filled from rank 0's safetensors through torch.distributed.checkpoint's state-dict
helpers, so no rank ever holds a second full copy. Each rank runs its share of a batch and the
gradients are summed (split.py), so results equal the single-process engine's. Knows no requests
or wire.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from stillroom_server.engine.adapters.lora import LoraHost, draw_adapter
from stillroom_server.engine.models import BaseModel
from stillroom_server.engine.sharded.split import SplitBatch
from stillroom_server.engine.training import FullRun, TrainingRun

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
FULL_FROM_RANK0 = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)


def is_rank0() -> bool:
    return dist.get_rank() == 0


def build_sharded(directory: Path, dtype: torch.dtype, device: torch.device,
                  weights: Path | None = None) -> Any:
    """The model in `directory`, sharded over the group, its weights read by rank 0 from
    `weights` (default: the directory's model.safetensors) and broadcast."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        module: Any = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for layer in decoder_layers(module):
        fully_shard(layer)
    fully_shard(module)
    module.to_empty(device=device)
    _remake_rotary(module, device)
    source = weights or directory / "model.safetensors"
    state: dict[str, Any] = load_file(str(source), device="cpu") if is_rank0() else {}
    set_model_state_dict(module, state, options=FULL_FROM_RANK0)
    return module


def decoder_layers(module: Any) -> list[torch.nn.Module]:
    layers = getattr(getattr(module, "model", None), "layers", None)
    assert layers is not None, f"{type(module).__name__}: no model.layers to shard"
    return list(layers)


def _remake_rotary(module: Any, device: torch.device) -> None:
    """Rotary embeddings keep computed (non-persistent) buffers, which `to_empty` left empty."""
    for name, child in list(module.named_modules()):
        if name.endswith("rotary_emb"):
            parent = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
            with torch.device(device):
                setattr(parent, name.rsplit(".", 1)[-1], type(child)(config=module.config))


def full_state(module: torch.nn.Module) -> dict[str, Any]:
    """The module's whole state on rank 0 (gathered; empty on the other ranks)."""
    return get_model_state_dict(module, options=FULL)


class ShardedFullRun(SplitBatch, FullRun):
    """Full fine-tuning over a sharded module: each rank holds a shard of the weights, of their
    gradients and of AdamW's moments, and runs its share of each batch (split.py)."""

    def __init__(self, run_id: str, base: BaseModel, device: torch.device,
                 weights: Path | None = None) -> None:
        TrainingRun.__init__(self, run_id, base, device)  # not FullRun's: no full copy is made
        self._weights = weights
        self.rebuild()

    def _make_model(self) -> Any:
        model = build_sharded(self.base.directory, self.base.module.dtype, self.device, self._weights)
        model.requires_grad_(True)
        return model

    def rebuild(self) -> None:
        self.model = self._make_model()
        self._params = list(self.model.parameters())

    def _gradients(self, loss: torch.Tensor) -> list[torch.Tensor | None]:
        """This micro-batch's gradient alone, summed over the ranks (FSDP reduce-scatters the mean
        into `.grad`, hence the loss times W; the run's accumulated gradient is set aside and put
        back). A custom divide factor would do it, but gloo has no PREMUL_SUM."""
        held = [p.grad for p in self._params]
        for param in self._params:
            param.grad = None
        try:
            (loss * dist.get_world_size()).backward()
            return [p.grad for p in self._params]
        finally:
            for param, grad in zip(self._params, held):
                param.grad = grad

    def save_sampler_weights(self, directory: Path) -> None:
        state = full_state(self.model)
        if getattr(self.model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # the embedding itself: saved once, as in-process
        if is_rank0():
            self.model.save_pretrained(directory, state_dict=state, safe_serialization=True)

    def optimizer_state(self) -> dict:
        """AdamW's whole state by parameter name, on rank 0 (gathered)."""
        assert self.optimizer is not None
        return get_optimizer_state_dict(self.model, self.optimizer, options=FULL)

    def set_optimizer_state(self, state: dict) -> None:
        self.optimizer = torch.optim.AdamW(self._params, lr=1e-3)
        set_optimizer_state_dict(self.model, self.optimizer, state,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))

    def load_weights(self, directory: Path) -> None:
        state: dict[str, Any] = load_file(str(directory / "model.safetensors"), device="cpu") \
            if is_rank0() else {}
        with torch.no_grad():
            set_model_state_dict(self.model, state, options=FULL_FROM_RANK0)


def grad_norm(grads: list[torch.Tensor]) -> float:
    total = torch.nn.utils.get_total_norm(grads)
    return float(total.full_tensor() if isinstance(total, DTensor) else total)


class ShardedLoraHost(LoraHost):
    """PEFT adapters injected into the sharded base module itself (one sharded copy per base).
    Adapter weights are small and kept whole on every rank; their gradients are all-reduced
    (split.py), so every rank applies the same update."""

    def add_adapter(self, name: str, config: LoraConfig, seed: int | None) -> None:
        with torch.random.fork_rng(devices=[]):  # PEFT's own draws leave the global state as it was
            if self.model is None:
                self.model = get_peft_model(self.base.module, config, adapter_name=name)
                self.model.eval()
            else:
                self.model.add_adapter(name, config)
        draw_adapter(self.model, name, seed)  # the same adapter as LoraHost's for the same seed

    def run_rows(self, names: list[str], **inputs):
        if len(set(names)) > 1:
            return self.peft(**inputs, adapter_names=names)
        if names[0] == "__base__":
            with self.peft.disable_adapter():
                return self.peft(**inputs)
        self.peft.set_adapter(names[0])
        return self.peft(**inputs)

    def remove_adapter(self, name: str) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*was active which is now deleted")
            self.peft.delete_adapter(name)
