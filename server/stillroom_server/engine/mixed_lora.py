"""Rows of one batch on different LoRA adapters of one PEFT host, in one forward pass.

PEFT's own `adapter_names=` does the same, but loops over adapters in every layer and walks the
whole module tree on every call: on a decode step of 8 snapshots it was 6x slower than the base
model alone. Here every LoRA linear layer adds, to each row, its own adapter's update for all the
adapters in the batch at once: x @ A_cat^T (every adapter's A stacked), masked to the row's own
block, then @ B_cat^T (scaled B's side by side): three extra ops per layer whatever the number
of adapters (a loop over runs of rows measured slower on small models). The stacks are built once
per set of adapters and kept until an adapter is added or removed. Rows named `__base__` get no
update. Knows PEFT's LoRA `Linear` layers only; a host with other LoRA layer kinds (embeddings,
DoRA) uses PEFT's path.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer

BASE = "__base__"


class MixedAdapters:
    """Installed once on a PEFT host; `rows(names)` makes calls within it mixed-adapter calls."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._rows: tuple[tuple[str, ...], torch.Tensor] | None = None   # adapters, row -> index
        self._stacks: dict[tuple[int, tuple[str, ...]], tuple] = {}
        self._owners: dict[tuple, torch.Tensor] = {}   # one tensor per layout of rank columns
        self._masks: dict[int, torch.Tensor] = {}      # this call's row masks, by owner tensor
        self.fast = True
        self.refresh()

    def refresh(self) -> None:
        """After adapters were added or removed: forget the stacks, cover new layers."""
        self._stacks.clear()
        self._owners.clear()
        for module in self.model.modules():
            if isinstance(module, LoraLayer) and not isinstance(module, LoraLinear):
                self.fast = False
            elif isinstance(module, LoraLinear) and "forward" not in module.__dict__:
                module.forward = functools.partial(_forward, self, module)
            if isinstance(module, LoraLinear) and any(module.use_dora.values()):
                self.fast = False

    @contextlib.contextmanager
    def rows(self, names: list[str]):
        adapters = tuple(sorted(set(names) - {BASE}))
        index = {name: i for i, name in enumerate(adapters)}
        device = next(self.model.parameters()).device
        rows_B = torch.tensor([index.get(name, -1) for name in names], device=device)
        self._rows = (adapters, rows_B)
        try:
            yield
        finally:
            self._rows = None
            self._masks.clear()

    def mask(self, owner_R: torch.Tensor) -> torch.Tensor:
        """[B, R]: 1 where the rank column belongs to the row's adapter (once per call and layout)."""
        if id(owner_R) not in self._masks:
            assert self._rows is not None
            self._masks[id(owner_R)] = (owner_R[None, :] == self._rows[1][:, None]).float()
        return self._masks[id(owner_R)]

    def stacks(self, layer: LoraLinear, adapters: tuple[str, ...]):
        """(A_cat [R, in], B_cat [out, R] scaled, owner_R: the adapter index of each rank column)."""
        key = (id(layer), adapters)
        if key not in self._stacks:
            present = [(i, name) for i, name in enumerate(adapters) if name in layer.lora_A]
            if not present:
                self._stacks[key] = (None, None, None)
            else:
                a_cat = torch.cat([_weight(layer.lora_A[name]) for _, name in present]).detach()
                b_cat = torch.cat([_weight(layer.lora_B[name]) * layer.scaling[name]
                                   for _, name in present], dim=1).detach()
                layout = tuple((i, int(_weight(layer.lora_A[name]).shape[0])) for i, name in present)
                if layout not in self._owners:
                    self._owners[layout] = torch.cat([torch.full((rank,), i, device=a_cat.device)
                                                      for i, rank in layout])
                self._stacks[key] = (a_cat, b_cat, self._owners[layout])
        return self._stacks[key]


def _weight(module: torch.nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _forward(mixed: MixedAdapters, layer: LoraLinear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if mixed._rows is None or not mixed.fast:
        return type(layer).forward(layer, x, *args, **kwargs)
    adapters = mixed._rows[0]
    result = layer.base_layer(x, *args, **kwargs)
    a_cat, b_cat, owner_R = mixed.stacks(layer, adapters)
    if a_cat is None:
        return result
    mask_B_R = mixed.mask(owner_R)
    if x.dtype != a_cat.dtype:
        x = x.to(a_cat.dtype)
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (mask_B_R.shape[-1],)
    low = (x @ a_cat.T).mul_(mask_B_R.view(shape))
    if result.dtype != b_cat.dtype:
        return result + (low @ b_cat.T).to(result.dtype)
    return result.view(-1, result.shape[-1]).addmm_(low.view(-1, low.shape[-1]), b_cat.T).view(result.shape)

