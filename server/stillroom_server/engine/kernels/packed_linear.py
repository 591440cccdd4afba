"""Inference linears on prepacked weights: oneDNN's blocked layout, made once per frozen weight.

A decode step of a small model is its linears (76% of a SmolLM2-135M step at 8 rows, docs/DESIGN.md),
and at a few rows torch's `F.linear` (MKL sgemm) repacks every weight at every call: on the 2-core VM,
one thread, the 211 linears of a SmolLM2 step took 112 ms at 8 rows where oneDNN on weights reordered
once takes 70 ms (64 rows: 180 -> 159 ms; 1 row: 44 -> 54 ms, so one row keeps `F.linear`). The
packed copy is a cache beside the weight (the same fp32 values in another layout, as much memory
again), made at a weight's first inference call and remade if the weight changes in place.

`install` turns a large model's `nn.Linear`s into `PackedLinear`s (still `nn.Linear`: PEFT wraps them, state
dicts and copies are unchanged). A call takes the packed path only when nothing could notice: no
gradient is recorded, the weight is frozen fp32 on the CPU, no autocast, not inside the
batch-invariant mode (whose torch function mode must see every `F.linear`), and 2..MAX_ROWS rows.
Results differ from `F.linear`'s by rounding (another kernel's order of additions, ~1e-6 relative),
as `F.linear`'s own kernel choice already differs between row counts.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from stillroom_server.engine.kernels import batch_invariant

MIN_ROWS = 2         # one row: sgemv streams the weight at memory bandwidth; oneDNN is slower there
MAX_ROWS = 512       # decode steps; prefills and scoring passes of more rows keep MKL's F.linear
# a model whose linears are smaller stays in cache from step to step, where MKL's cheaper call wins (char-10m,
# 40 MB: 11.3 -> 13.3 ms per 8-row step packed; SmolLM2, 538 MB: 140 -> 102 ms)
MIN_MODEL_BYTES = 1 << 26
BATCH_HINT = 8       # the row count the layout is chosen for (8 and 64 give the same speeds at 8-64 rows)

_enabled = threading.local()
_packed = WeakIdKeyDictionary()   # weight -> (its _version when packed, the packed copy)
_fused = WeakIdKeyDictionary()    # first weight -> (the weights' _versions, ids, their joined packed copy)
_transposed = WeakIdKeyDictionary()   # first weight -> (_versions, ids, joined transposed copy)
_lock = threading.Lock()
AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def enabled() -> bool:
    return getattr(_enabled, "on", True)


def set_enabled(on: bool) -> None:
    """Turn the packed path on or off in this thread (benchmarks compare the two)."""
    _enabled.on = on


class PackedLinear(torch.nn.Linear):
    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Linear's name
        packed = _packed_for(self.weight, input)
        if packed is None:
            return F.linear(input, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(input.contiguous(), packed, self.bias, "none", [], "")


def install(module: torch.nn.Module) -> None:
    """Make every plain `nn.Linear` in `module` a `PackedLinear` (in place; no tensor is copied) if
    their weights come to MIN_MODEL_BYTES or more."""
    linears = [child for child in module.modules() if type(child) is torch.nn.Linear]
    if not AVAILABLE or sum(child.weight.nbytes for child in linears) < MIN_MODEL_BYTES:
        return
    for child in linears:
        child.__class__ = PackedLinear


def fused(linears: tuple[torch.nn.Linear, ...], input: torch.Tensor) -> torch.Tensor | None:  # noqa: A002
    """The outputs of `linears` (PackedLinears without biases reading one input: q/k/v, gate/up)
    side by side from one call on their weights packed together, or None where the packed path
    does not apply (then call each). One call on the joined weight is 10% less time than the
    separate calls at 8 rows of SmolLM2 (63 against 70 ms for a step's linears; 64 rows: 160 against
    167): bigger blocks for oneDNN, fewer calls. Each output is the same dot product as alone."""
    first = linears[0]
    if any(type(m) is not PackedLinear or m.bias is not None for m in linears):
        return None
    if _packed_for(first.weight, input, pack=False) is None:
        return None
    versions = tuple(m.weight._version for m in linears)
    weights = tuple(id(m.weight) for m in linears)
    entry = _fused.get(first.weight)
    if entry is None or entry[0] != versions or entry[1] != weights:
        with _lock:
            joined = torch.cat([m.weight.detach() for m in linears])
            entry = (versions, weights, torch.ops.mkldnn._reorder_linear_weight(joined, BATCH_HINT))
            _fused[first.weight] = entry
    return torch.ops.mkldnn._linear_pointwise(input.contiguous(), entry[2], None, "none", [], "")


def _packed_for(weight: torch.Tensor, input: torch.Tensor, pack: bool = True) -> torch.Tensor | None:  # noqa: A002
    if (torch.is_grad_enabled() or weight.requires_grad or weight.dtype != torch.float32
            or input.dtype != torch.float32 or weight.device.type != "cpu" or not enabled()
            or torch.is_autocast_enabled("cpu") or batch_invariant.active()):
        return None
    rows = input.numel() // max(input.shape[-1], 1)
    if not MIN_ROWS <= rows <= MAX_ROWS:
        return None
    if not pack:
        return weight
    entry = _packed.get(weight)
    if entry is None or entry[0] != weight._version:
        with _lock:
            entry = (weight._version, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), BATCH_HINT))
            _packed[weight] = entry
    return entry[1]


def transposed(linears: tuple[torch.nn.Linear, ...]) -> torch.Tensor | None:
    """The weights of plain `nn.Linear`s without biases (a small model's, which `install` leaves
    unpacked) joined along their outputs and transposed, contiguous [in, sum(out)], made once (remade
    if any changes in place); None where the inference path does not apply (gradients, autocast,
    the batch-invariant mode, not fp32 CPU, wrapped or packed linears: then call each).

    `torch.mm(x, joined)` gives each linear's outputs side by side. At a few rows MKL's sgemm on a
    [in, out] row-major operand is faster than `F.linear`'s transposed one, and one call replaces
    several: a char-10m step's linears at 8 rows took 2.4-2.6 ms against 3.2-3.3 for `F.linear`
    per linear (one thread; 1-2 rows the same, 64 rows 9.4 against 10.9)."""
    first = linears[0]
    weight = first.weight
    if (any(type(m) is not torch.nn.Linear or m.bias is not None for m in linears)
            or torch.is_grad_enabled() or weight.requires_grad or weight.dtype != torch.float32
            or weight.device.type != "cpu" or not enabled() or torch.is_autocast_enabled("cpu")
            or batch_invariant.active()):
        return None
    versions = tuple(m.weight._version for m in linears)
    weights = tuple(id(m.weight) for m in linears)
    entry = _transposed.get(weight)
    if entry is None or entry[0] != versions or entry[1] != weights:
        with _lock:
            joined = torch.cat([m.weight.detach() for m in linears]).t().contiguous()
            entry = (versions, weights, joined)
            _transposed[weight] = entry
    return entry[2]
