"""Rows of one batch on different LoRA adapters of one PEFT host, in one forward pass.

PEFT's own `adapter_names=` loops over adapters in every layer and walks the module tree on every
call (8 snapshots decoded at 0.15x the base). Here the rows are grouped by adapter once per batch
composition, and each LoRA linear layer adds x[rows] @ A_g^T @ B_g^T with two batched matmuls over
the adapters' stacked weights: a row pays for its own adapter's rank only. When the rows already lie
one block per adapter in the stacks' order (the sampler keeps a batch sorted by adapter name), the
groups are a slice of the batch and nothing is gathered or scattered; in a decode step on CPU with one
torch thread, such blocks of any sizes go through a segmented C kernel (segment_kernel.py) that adds
each block's update in place, with no padding. Layers reading one input
(q/k/v, gate/up) share the gather and the A product. Stacks are built per set of adapters (all
adapters seen lately while the batch uses most of them, so the set holds as requests come and go)
and kept until an adapter is added or removed; a call with every row on one adapter (a request's
prefill) uses that adapter's own weights and builds no stack. `__base__` rows get no update.
Knows PEFT's LoRA `Linear` layers only; a host with other LoRA layer kinds (embeddings, DoRA) uses
PEFT's path.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer

from stillroom_server.engine.kernels import batch_invariant, segment_kernel
from stillroom_server.engine.kernels.segment_kernel import Segments

BASE = "__base__"
KEPT_SETS = 2   # sets of adapters whose stacks stay built: the adapters seen lately, and one other
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))   # layers called on one input
KERNEL_ROWS = 64  # the segmented kernel serves decode steps with at most this many rows per adapter
                  # (measured: faster than torch's bmm up to 32 rows, about even at 64-128)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """One batch composition: the rows on adapters, grouped by adapter and padded to `size` each."""

    adapters: tuple[str, ...]        # one group per adapter, in this order
    size: int                        # rows per group (the largest group; shorter ones padded)
    index_G: torch.Tensor | None     # batch row of each group slot; None: the groups are a slice
    keep_G: torch.Tensor | None      # [G * size]: 0 at padding slots; None: no padding
    start: int = 0                   # with index_G None: the groups are rows start.. of the batch
    whole: bool = True               # with index_G None: the groups are the whole batch
    rows: int = 0                    # rows in the batch
    segments: Segments | None = None   # each group's rows, where they lie one block per adapter

    @property
    def single(self) -> bool:
        """Every row on one adapter (a request's prefill): its own weights serve, no stacks."""
        return len(self.adapters) == 1 and self.index_G is None and self.whole


@dataclasses.dataclass(frozen=True)
class _Siblings:
    """LoRA layers of one module that read the same input (q/k/v, gate/up): one gather and one
    batched matmul by their A's side by side serve them all; a layer alone is a group of one."""

    layers: tuple[LoraLinear, ...]


class MixedAdapters:
    """Installed once on a PEFT host; `rows(names)` makes calls within it mixed-adapter calls."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.plan: _Plan | None = None                       # the call in progress
        self._last: tuple[tuple[str, ...], _Plan] | None = None
        self._seen: dict[str, None] = {}   # adapters named in rows since the last refresh, in order
        self._siblings: dict[int, _Siblings] = {}            # id(layer) -> its group
        # per set of adapters, per group: (A [G, in, R], B [G, R, out] scaled) or None (no adapter has it)
        self._stacks: collections.OrderedDict[tuple[str, ...], dict[int, tuple | None]] = \
            collections.OrderedDict()
        self._current: dict[int, tuple | None] = {}          # this call's set of adapters
        # siblings -> [x, x @ A's, calls still to come, whether through the segmented kernel]
        self._pending: dict[int, list] = {}
        self.fast = True
        self.refresh()

    def refresh(self) -> None:
        """After adapters were added or removed: forget the stacks, cover new layers."""
        self._stacks.clear()
        self._last = None
        self._seen.clear()
        layers: dict[str, LoraLinear] = {}
        for name, module in self.model.named_modules():
            if isinstance(module, LoraLayer) and not isinstance(module, LoraLinear):
                self.fast = False
            elif isinstance(module, LoraLinear) and "forward" not in module.__dict__:
                module.forward = functools.partial(_forward, self, module)
            if isinstance(module, LoraLinear):
                layers[name] = module
                if any(module.use_dora.values()):
                    self.fast = False
        self._siblings = _group_siblings(layers)

    @contextlib.contextmanager
    def rows(self, names: list[str]):
        key = tuple(names)
        if self._last is None or self._last[0] != key:   # the composition changed since the last call
            self._seen.update(dict.fromkeys(sorted(set(key) - {BASE})))
            self._last = (key, _make_plan(key, tuple(sorted(self._seen)),
                                          next(self.model.parameters()).device))
        self.plan = plan = self._last[1]
        self._current = {} if plan.single else self._stacks_of(plan.adapters)
        try:
            yield
        finally:
            self.plan = None
            self._pending.clear()

    def _stacks_of(self, adapters: tuple[str, ...]) -> dict[int, tuple | None]:
        if adapters in self._stacks:
            self._stacks.move_to_end(adapters)
            return self._stacks[adapters]
        self._stacks[adapters] = {}
        while len(self._stacks) > KEPT_SETS:
            self._stacks.popitem(last=False)
        return self._stacks[adapters]

    def add_update(self, plan: _Plan, layer: LoraLinear, x: torch.Tensor, result: torch.Tensor) -> None:
        """Add this layer's LoRA update of every row on an adapter to `result` (its base output);
        nothing when no adapter of the batch adapts the layer. Siblings called on the same x share
        its gather and the A product."""
        siblings = self._siblings[id(layer)]
        key = id(siblings)
        if key not in self._current:
            self._current[key] = _stack(siblings, plan.adapters)
        stacks = self._current[key]
        if stacks is None:
            return
        a_G_in_R, bs = stacks
        pending = self._pending.get(key)
        if pending is None or pending[0] is not x:   # the first sibling on this x: the A product
            segmented = _segmented(plan, x, a_G_in_R, result)
            low = _segment_low_rank(plan, x, a_G_in_R) if segmented else _low_rank(plan, x, a_G_in_R)
            pending = [x, low, len(siblings.layers), segmented]
            self._pending[key] = pending
        _, low_G_N_R, _, segmented = pending
        pending[2] -= 1
        if not pending[2]:
            del self._pending[key]
        if (b_entry := bs.get(id(layer))) is None:
            return
        start, stop, b_G_r_out = b_entry
        if segmented:   # low [rows, R]: each segment's B product added to its rows of result in place
            assert plan.segments is not None
            segment_kernel.matmul(low_G_N_R[:, start:stop], b_G_r_out, plan.segments,
                                  result.view(plan.rows, -1), accumulate=True)
            return
        # bmm then add: a fused baddbmm_ gained nothing measurable and changed the float order
        update = torch.bmm(low_G_N_R[..., start:stop], b_G_r_out).to(result.dtype)
        update = update.view((len(plan.adapters) * plan.size,) + x.shape[1:-1] + (b_G_r_out.shape[-1],))
        if plan.index_G is None:
            result[plan.start:plan.start + update.shape[0]].add_(update)
        else:
            result.index_add_(0, plan.index_G, update)


def _group_siblings(layers: dict[str, LoraLinear]) -> dict[int, _Siblings]:
    """Each LoRA layer's group: its siblings in SIBLINGS under the same parent, else itself."""
    groups: dict[int, _Siblings] = {}
    for name, layer in layers.items():
        if id(layer) in groups:
            continue
        parent, _, leaf = name.rpartition(".")
        family = next((f for f in SIBLINGS if leaf in f), (leaf,))
        members = [layers[f"{parent}.{m}" if parent else m] for m in family
                   if (f"{parent}.{m}" if parent else m) in layers]
        if len({_features(m)[0] for m in members}) != 1:
            members = [layer]
        group = _Siblings(tuple(members))
        groups.update({id(member): group for member in members})
    return groups


def _make_plan(names: tuple[str, ...], seen: tuple[str, ...], device: torch.device) -> _Plan:
    """Group the rows by adapter. While the batch uses at least half the adapters seen lately, the
    groups are all of those (absent ones empty): the set, and so its stacks, stays the same as
    requests come and go; otherwise only the batch's own adapters, stacked for this set."""
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(names):
        if name != BASE:
            groups.setdefault(name, []).append(row)
    adapters = seen if 2 * len(groups) >= len(seen) else tuple(sorted(groups))
    size = max((len(rows) for rows in groups.values()), default=0)
    index, keep = [], []
    for name in adapters:
        rows = groups.get(name, [])
        index += rows + [rows[0] if rows else 0] * (size - len(rows))
        keep += [1.0] * len(rows) + [0.0] * (size - len(rows))
    start = index[0] if index else 0
    segments = _segments_of(groups, adapters)
    if all(keep) and index == list(range(start, start + len(index))):   # the groups are a slice
        return _Plan(adapters, size, None, None, start, len(index) == len(names), len(names), segments)
    return _Plan(adapters, size, torch.tensor(index, device=device),
                 None if all(keep) else torch.tensor(keep, device=device), rows=len(names), segments=segments)


def _segments_of(groups: dict[str, list[int]], adapters: tuple[str, ...]) -> Segments | None:
    """Each group's rows as one range (groups of any size), or None where a group's rows are not
    contiguous."""
    ranges = []
    for g, name in enumerate(adapters):
        rows = groups.get(name)
        if rows:
            if rows != list(range(rows[0], rows[0] + len(rows))):
                return None
            ranges.append((rows[0], rows[0] + len(rows), g))
    return Segments(*(tuple(column) for column in zip(*ranges))) if ranges else None


def _segmented(plan: _Plan, x: torch.Tensor, a_G_in_R: torch.Tensor, result: torch.Tensor) -> bool:
    """Whether this layer's update goes through the segmented kernel: a decode step (one position
    per row) of fp32 rows lying one block per adapter, a few rows each, on CPU with one torch thread
    (the kernel is single-threaded), where the kernel built."""
    return (plan.segments is not None and plan.segments.longest <= KERNEL_ROWS
            and x.numel() == plan.rows * x.shape[-1] and x.device.type == "cpu"
            and x.dtype == a_G_in_R.dtype == result.dtype == torch.float32 and result.is_contiguous()
            and torch.get_num_threads() == 1 and segment_kernel.available())


def _segment_low_rank(plan: _Plan, x: torch.Tensor, a_G_in_R: torch.Tensor) -> torch.Tensor:
    """x @ A of each segment's adapter, [rows, R] (rows outside every segment left unset)."""
    assert plan.segments is not None
    rows_K = x.reshape(plan.rows, x.shape[-1])
    low = rows_K.new_empty(plan.rows, a_G_in_R.shape[-1])
    segment_kernel.matmul(rows_K, a_G_in_R, plan.segments, low, accumulate=False)
    return low


def _stack(siblings: _Siblings, adapters: tuple[str, ...]) -> tuple | None:
    """A [G, in, R]: the siblings' A's of `adapters` side by side (ranks padded with zeros), and
    for each sibling adapted by one of them, its rank columns in R and its B [G, r, out] scaled."""
    blocks = []   # (layer, adapters present in it, their largest rank)
    for layer in siblings.layers:
        present = [name for name in adapters if name in layer.lora_A]
        rank = max((_weight(layer.lora_A[name]).shape[0] for name in present), default=0)
        blocks.append((layer, present, rank))
    total = sum(rank for _, _, rank in blocks)
    if not total:
        return None
    weight = next(_weight(layer.lora_A[p[0]]) for layer, p, _ in blocks if p)
    a_G_in_R = weight.new_zeros(len(adapters), _features(siblings.layers[0])[0], total)
    bs: dict[int, tuple[int, int, torch.Tensor]] = {}
    offset = 0
    for layer, present, rank in blocks:
        if not present:
            continue
        b_G_r_out = weight.new_zeros(len(adapters), rank, _features(layer)[1])
        for g, name in enumerate(adapters):
            if name in present:
                a, b = _weight(layer.lora_A[name]).detach(), _weight(layer.lora_B[name]).detach()
                a_G_in_R[g, :, offset:offset + a.shape[0]] = a.T
                b_G_r_out[g, :a.shape[0]] = (b * layer.scaling[name]).T
        bs[id(layer)] = (offset, offset + rank, b_G_r_out)
        offset += rank
    return a_G_in_R, bs


def _low_rank(plan: _Plan, x: torch.Tensor, a_G_in_R: torch.Tensor) -> torch.Tensor:
    """x's rows gathered into the plan's groups, times each group's A's: [G, size * ..., R]."""
    if x.dtype != a_G_in_R.dtype:
        x = x.to(a_G_in_R.dtype)
    groups = len(plan.adapters)
    if plan.index_G is None:
        x_G = x[plan.start:plan.start + groups * plan.size].reshape(groups, -1, x.shape[-1])
    else:
        x_G = x.index_select(0, plan.index_G)
        if plan.keep_G is not None:
            x_G = x_G.mul_(plan.keep_G.view((-1,) + (1,) * (x.dim() - 1)))
        x_G = x_G.view(groups, -1, x.shape[-1])
    return torch.bmm(x_G, a_G_in_R)


def _features(layer: LoraLinear) -> tuple[int, int]:
    """(in, out) of a LoRA layer's base linear."""
    out_features, in_features = _weight(layer.get_base_layer()).shape
    return in_features, out_features


def _weight(module: torch.nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _own_update(layer: LoraLinear, name: str, x: torch.Tensor) -> torch.Tensor | None:
    """One adapter's update of every row, from the layer's own A and B (None if it has none)."""
    if name not in layer.lora_A:
        return None
    a, b = _weight(layer.lora_A[name]), _weight(layer.lora_B[name])
    return ((x.to(a.dtype) @ a.T) * layer.scaling[name]) @ b.T


def _forward(mixed: MixedAdapters, layer: LoraLinear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    plan = mixed.plan
    if plan is None or not mixed.fast:
        return type(layer).forward(layer, x, *args, **kwargs)
    result = layer.base_layer(x, *args, **kwargs)
    if plan.single:
        update = _own_update(layer, plan.adapters[0], x)
        if update is not None:
            result.add_(update.to(result.dtype))
    elif plan.adapters and batch_invariant.active():
        _add_own_updates(plan, layer, x, result)
    elif plan.adapters:
        mixed.add_update(plan, layer, x, result)
    return result


def _add_own_updates(plan: _Plan, layer: LoraLinear, x: torch.Tensor, result: torch.Tensor) -> None:
    """Each adapter's rows get the update a single-adapter call gives them (`_own_update`), whatever
    adapters share the batch: the batch-invariant mode's path (the stacks pad ranks and group sizes)."""
    for g, name in enumerate(plan.adapters):
        if plan.index_G is None:
            rows = torch.arange(plan.start + g * plan.size, plan.start + (g + 1) * plan.size,
                                device=x.device)
        else:
            rows = plan.index_G[g * plan.size:(g + 1) * plan.size]
            if plan.keep_G is not None:
                rows = rows[plan.keep_G[g * plan.size:(g + 1) * plan.size] > 0]
        if rows.numel() and (update := _own_update(layer, name, x.index_select(0, rows))) is not None:
            result.index_add_(0, rows, update.to(result.dtype))
