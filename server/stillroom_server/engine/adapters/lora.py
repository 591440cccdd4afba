"""LoRA runs over one shared, frozen copy of a base model, through PEFT.

Each base model gets one `LoraHost`: a PEFT model built over a structural copy of the base whose
weights are the base's own tensors. Every LoRA run and every loaded LoRA snapshot is a named
adapter in that host. Training switches the live adapter with `activate` (before every
micro-batch: other work may run between two); sampling never does: its rows name their adapters
(PEFT's `adapter_names`), so rows of different snapshots share one forward. Adapters are saved
and loaded in PEFT's own format, which is also the export format.
"""

from __future__ import annotations

import math
import secrets
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from stillroom_server.engine.adapters.mixed_lora import MixedAdapters
from stillroom_server.engine.errors import InvalidInput
from stillroom_server.engine.models import BaseModel
from stillroom_server.engine.training import TrainingRun

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def lora_config(base: BaseModel, rank: int, train_mlp: bool, train_attn: bool,
                train_unembed: bool) -> LoraConfig:
    if rank < 1:
        raise InvalidInput(f"lora.rank must be >= 1, got {rank}")
    names = {name.rsplit(".", 1)[-1] for name, _ in base.module.named_modules()}
    targets = [m for m in (ATTENTION_MODULES if train_attn else ()) + (MLP_MODULES if train_mlp else ())
               if m in names]
    # A tied unembedding is the embedding matrix itself: adapting it would make PEFT save the whole
    # embedding with every adapter, so tied models train the unembedding through the other layers.
    if train_unembed and "lm_head" in names and not base.module.config.tie_word_embeddings:
        targets.append("lm_head")
    if not targets:
        raise InvalidInput("lora: train_mlp, train_attn and train_unembed select no module to adapt")
    return LoraConfig(r=rank, lora_alpha=32, lora_dropout=0.0, target_modules=targets,
                      base_model_name_or_path=str(base.directory))


def draw_adapter(model: torch.nn.Module, name: str, seed: int | None) -> None:
    """Draw adapter `name`'s A matrices as PEFT's default init does (Kaiming uniform; B stays zero)
    from a generator of the adapter's own, seeded by `seed` (any int64; None: a random seed), so
    that a client's seed never reaches torch's process-wide generator, which every owner shares."""
    generator = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed % 2**64)
    with torch.no_grad():
        for module in model.modules():
            lora_a = getattr(module, "lora_A", None)
            if isinstance(lora_a, torch.nn.ModuleDict) and name in lora_a:
                weight = lora_a[name].weight
                assert isinstance(weight, torch.Tensor)
                drawn = torch.empty(weight.shape, dtype=weight.dtype)  # the generator's device: CPU
                torch.nn.init.kaiming_uniform_(drawn, a=math.sqrt(5), generator=generator)
                weight.copy_(drawn)


class LoraHost:
    """One PEFT model per base model, holding every LoRA adapter trained or sampled on it."""

    def __init__(self, base: BaseModel) -> None:
        self.base = base
        self.model: PeftModel | None = None   # made with the first adapter (PEFT needs its config)
        self.mixed: MixedAdapters | None = None

    @property
    def peft(self) -> PeftModel:
        assert self.model is not None, "a LoraHost is used only after its first add_adapter"
        return self.model

    def add_adapter(self, name: str, config: LoraConfig, seed: int | None) -> None:
        with torch.random.fork_rng(devices=[]):  # PEFT's own draws leave the global state as it was
            if self.model is None:
                self.model = get_peft_model(self.base.shared_copy(), config, adapter_name=name)
                self.model.eval()  # no dropout; and PEFT's mixed-adapter batches need eval mode
                self.mixed = MixedAdapters(self.model)
            else:
                self.model.add_adapter(name, config)
        draw_adapter(self.model, name, seed)
        self.model.to(self.base.module.device)
        self._keep_active_adapter_live()
        assert self.mixed is not None
        self.mixed.refresh()

    def run_rows(self, names: list[str], **inputs):
        """Call the host with each row on its own adapter (`__base__`: none), whichever adapter is
        active for training."""
        assert self.mixed is not None
        if self.mixed.fast:
            with self.mixed.rows(names):
                return self.peft(**inputs)
        return self.peft(**inputs, adapter_names=names)

    def load_adapter(self, name: str, directory: Path) -> None:
        config = LoraConfig.from_pretrained(str(directory))
        assert isinstance(config, LoraConfig), f"{directory} holds a LoRA adapter's config"
        self.add_adapter(name, config, seed=None)
        state = load_file(str(directory / ADAPTER_WEIGHTS), device=str(self.base.module.device))
        set_peft_model_state_dict(self.peft, state, adapter_name=name)
        for param in self.adapter_parameters(name):
            param.requires_grad_(False)

    def remove_adapter(self, name: str) -> None:
        # PEFT warns when the active adapter goes; every use activates its own adapter first.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*was active which is now deleted")
            self.peft.delete_adapter(name)
        self._keep_active_adapter_live()
        assert self.mixed is not None
        self.mixed.refresh()

    def _keep_active_adapter_live(self) -> None:
        """PEFT leaves a deleted adapter active when it was the last one, and every forward of the
        host looks the active adapter's config up: point it at a live adapter, leaving which
        parameters train as they were (each use activates its own adapter anyway)."""
        peft = self.peft
        active = [peft.active_adapter] if isinstance(peft.active_adapter, str) else peft.active_adapter
        if not peft.peft_config or set(active) <= peft.peft_config.keys():
            return
        trainable = [(p, p.requires_grad) for p in peft.parameters()]
        peft.set_adapter(next(iter(peft.peft_config)))
        for param, flag in trainable:
            param.requires_grad_(flag)

    def activate(self, name: str) -> torch.nn.Module:
        self.peft.set_adapter(name)
        return self.peft

    def adapter_parameters(self, name: str) -> list[torch.nn.Parameter]:
        marker = f".{name}."
        return [p for n, p in self.peft.named_parameters() if marker in n]

    def save_adapter(self, name: str, directory: Path) -> None:
        state = get_peft_model_state_dict(self.peft, adapter_name=name, save_embedding_layers=False)
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()},
                  str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        self.peft.peft_config[name].save_pretrained(str(directory))


class LoraRun(TrainingRun):
    def __init__(self, run_id: str, base: BaseModel, host: LoraHost, config: LoraConfig,
                 device: torch.device, seed: int | None) -> None:
        super().__init__(run_id, base, device)
        self.host = host
        self.adapter = f"run-{run_id}"
        self.config = config
        host.add_adapter(self.adapter, config, seed)
        self._params = host.adapter_parameters(self.adapter)

    @property
    def is_lora(self) -> bool:
        return True

    @property
    def lora_rank(self) -> int:
        return self.config.r

    def activate(self) -> torch.nn.Module:
        model = self.host.activate(self.adapter)
        for param in self._params:
            param.requires_grad_(True)
        return model

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self._params

    def save_sampler_weights(self, directory: Path) -> None:
        self.host.save_adapter(self.adapter, directory)

    def release(self) -> None:
        self.host.remove_adapter(self.adapter)
        self._params, self.optimizer = [], None

    def rebuild(self) -> None:
        self.host.add_adapter(self.adapter, self.config, seed=None)
        self._params = self.host.adapter_parameters(self.adapter)
