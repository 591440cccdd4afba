"""Rows of one batch on different LoRA adapters of one PEFT host, in one forward pass.

PEFT's own `adapter_names=` does the same, but loops over adapters in every layer and walks the
whole module tree on every call: on a decode step of 8 snapshots it was 6x slower than the base
model alone. Here a batch's rows are grouped by adapter once per batch composition (a gather index,
groups padded to one size), and every LoRA linear layer adds each group's update with two batched
matmuls over the adapters' stacked weights: x[rows] @ A_g^T @ B_g^T, added back at the rows.
Each row pays for its own adapter's rank only (stacking every adapter's A and masking, as before,
paid for all of them: 8x the work with 8 snapshots). Stacks are built once per set of adapters and
kept until an adapter is added or removed. Rows named `__base__` get no update. Knows PEFT's LoRA
`Linear` layers only; a host with other LoRA layer kinds (embeddings, DoRA) uses PEFT's path.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer

BASE = "__base__"
KEPT_SETS = 4   # sets of adapters whose stacks stay built (a decode's set changes as requests come and go)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """One batch composition: the rows on adapters, grouped by adapter and padded to `size` each."""

    adapters: tuple[str, ...]        # one group per adapter, in this order
    size: int                        # rows per group (the largest group; shorter ones padded)
    index_G: torch.Tensor | None     # batch row of each group slot; None: the batch is the groups
    keep_G: torch.Tensor | None      # [G * size]: 0 at padding slots; None: no padding


class MixedAdapters:
    """Installed once on a PEFT host; `rows(names)` makes calls within it mixed-adapter calls."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.plan: _Plan | None = None                       # the call in progress
        self._last: tuple[tuple[str, ...], _Plan] | None = None
        # per set of adapters, per layer: (A [G, in, r], B [G, r, out] scaled) or None (no adapter has it)
        self._stacks: collections.OrderedDict[tuple[str, ...], dict[int, tuple | None]] = \
            collections.OrderedDict()
        self.fast = True
        self.refresh()

    def refresh(self) -> None:
        """After adapters were added or removed: forget the stacks, cover new layers."""
        self._stacks.clear()
        self._last = None
        for module in self.model.modules():
            if isinstance(module, LoraLayer) and not isinstance(module, LoraLinear):
                self.fast = False
            elif isinstance(module, LoraLinear) and "forward" not in module.__dict__:
                module.forward = functools.partial(_forward, self, module)
            if isinstance(module, LoraLinear) and any(module.use_dora.values()):
                self.fast = False

    @contextlib.contextmanager
    def rows(self, names: list[str]):
        key = tuple(names)
        if self._last is None or self._last[0] != key:   # the composition changed since the last call
            self._last = (key, _make_plan(key, next(self.model.parameters()).device))
        self.plan = self._last[1]
        try:
            yield
        finally:
            self.plan = None

    def stacks(self, layer: LoraLinear, adapters: tuple[str, ...]) -> tuple | None:
        """(A [G, in, r], B [G, r, out] scaled) of `adapters` in `layer` (ranks padded with zeros)."""
        per_layer = self._stacks.get(adapters)
        if per_layer is None:
            per_layer = self._stacks[adapters] = {}
            while len(self._stacks) > KEPT_SETS:
                self._stacks.popitem(last=False)
        else:
            self._stacks.move_to_end(adapters)
        if id(layer) not in per_layer:
            per_layer[id(layer)] = _stack(layer, adapters)
        return per_layer[id(layer)]


def _make_plan(names: tuple[str, ...], device: torch.device) -> _Plan:
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(names):
        if name != BASE:
            groups.setdefault(name, []).append(row)
    adapters = tuple(sorted(groups))
    size = max((len(rows) for rows in groups.values()), default=0)
    index, keep = [], []
    for name in adapters:
        rows = groups[name]
        index += rows + [rows[0]] * (size - len(rows))
        keep += [1.0] * len(rows) + [0.0] * (size - len(rows))
    identity = index == list(range(len(names)))
    return _Plan(adapters, size,
                 None if identity else torch.tensor(index, device=device),
                 None if all(keep) else torch.tensor(keep, device=device))


def _stack(layer: LoraLinear, adapters: tuple[str, ...]) -> tuple | None:
    present = [name for name in adapters if name in layer.lora_A]
    if not present:
        return None
    weight = _weight(layer.lora_A[present[0]])
    rank = max(_weight(layer.lora_A[name]).shape[0] for name in present)
    a_G_in_r = weight.new_zeros(len(adapters), layer.in_features, rank)
    b_G_r_out = weight.new_zeros(len(adapters), rank, layer.out_features)
    for g, name in enumerate(adapters):
        if name in present:
            a, b = _weight(layer.lora_A[name]), _weight(layer.lora_B[name])
            a_G_in_r[g, :, :a.shape[0]] = a.detach().T
            b_G_r_out[g, :a.shape[0], :] = (b.detach() * layer.scaling[name]).T
    return a_G_in_r, b_G_r_out


def _weight(module: torch.nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _forward(mixed: MixedAdapters, layer: LoraLinear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    plan = mixed.plan
    if plan is None or not mixed.fast:
        return type(layer).forward(layer, x, *args, **kwargs)
    result = layer.base_layer(x, *args, **kwargs)
    stacks = mixed.stacks(layer, plan.adapters) if plan.adapters else None
    if stacks is None:
        return result
    a_G_in_r, b_G_r_out = stacks
    if x.dtype != a_G_in_r.dtype:
        x = x.to(a_G_in_r.dtype)
    groups = len(plan.adapters)
    if plan.index_G is None:
        x_G = x.reshape(groups, -1, x.shape[-1])
    else:
        x_G = x.index_select(0, plan.index_G)
        if plan.keep_G is not None:
            x_G = x_G.mul_(plan.keep_G.view((-1,) + (1,) * (x.dim() - 1)))
        x_G = x_G.view(groups, -1, x.shape[-1])
    update = torch.bmm(torch.bmm(x_G, a_G_in_r), b_G_r_out).to(result.dtype)
    if plan.index_G is None:
        return result.add_(update.view(result.shape))
    return result.index_add_(0, plan.index_G, update.view((-1,) + result.shape[1:]))
