"""Batch-invariant inference on the CPU: a row's logits do not depend on the rows beside it.

Two things make a row's fp32 logits depend on its batch (measured on the 2-core VM, MKL, 1 and 2 torch
threads): torch's matmul picks its kernel, and so the order of each dot product's additions, by the
number of rows (one class at 1 row, another at 2-5 or 2-15, another above; with 2 threads more classes
up to 128 rows), and SDPA's reductions over the keys change with the padded length of the KV cache,
which depends on the longest row in the batch. While `BatchInvariant` is entered (the engine's
sampling and scoring passes, with `--batch-invariant`), a torch function mode replaces both:

- `linear` / `matmul` / `bmm` with a 2-D right-hand side run in calls of exactly ROWS rows (the last
  one padded): every call has one shape, so every row gets the same kernel whatever else is in it;
- `scaled_dot_product_attention` becomes attention in fixed order: each query's keys are laid out
  from its first visible key (a canonical index that does not move with the padding before it), the
  dot products and both sums over keys are pairwise trees of elementwise adds over a power-of-two
  length, zero-padded past the row's keys (adding the exact zeros changes nothing), so no reduction
  order depends on the batch.

Everything else in a decoder (norms, rotary embeddings, activations, softmax over the vocabulary) is
already row by row. Training passes are not affected. Knows torch functions, not models or requests.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# Rows in every matmul call. A call's shape fixes MKL's kernel, but a row's bits can still depend on
# its place in the call: MKL computes rows in micro-tiles, and a row in a partial last tile takes
# another path. Measured (1 thread, scripts/bench_batch_invariance.py's shapes): with MKL's AVX2
# kernels (MKL_ENABLE_INSTRUCTIONS=AVX2) tiles are 6 rows, so in 32-row calls rows 30-31 differed
# from the rest; with AVX-512 every place agreed at 16, 24, 32 and 48. 48 is a multiple of 6, 8 and
# 16: every row in a full tile on both.
ROWS = 48
ATTENTION_ELEMENTS = 1 << 24   # the largest [.., queries, keys, head_dim] product formed at once

_state = threading.local()


def active() -> bool:
    """Whether this thread is inside `BatchInvariant` (mixed_lora then skips its segmented kernel,
    whose path depends on group sizes)."""
    return getattr(_state, "depth", 0) > 0


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` in calls of exactly ROWS rows."""
    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[0]
    padded = -(-n // ROWS) * ROWS
    if padded != n:
        rows = torch.cat([rows, rows.new_zeros(padded - n, rows.shape[1])])
    out = torch.cat([F.linear(rows[i:i + ROWS], weight, bias) for i in range(0, padded, ROWS)])
    return out[:n].reshape(*x.shape[:-1], out.shape[-1])


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[G, N, K] @ [G, K, M], each group's rows in calls of exactly ROWS rows."""
    return torch.stack([linear(a[g], b[g].T) for g in range(a.shape[0])])


def tree_sum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The sum over `dim` as a pairwise tree of elementwise adds (first half + second half), the
    length zero-padded to a power of two: the same additions in the same order for a row's values
    whatever the length beyond them."""
    dim = dim % x.dim()
    n = x.shape[dim]
    width = 1 << max(n - 1, 0).bit_length()
    if width != n:
        pad = [0, 0] * (x.dim() - 1 - dim) + [0, width - n]
        x = F.pad(x, pad)
    while x.shape[dim] > 1:
        half = x.shape[dim] // 2
        x = x.narrow(dim, 0, half) + x.narrow(dim, half, half)
    return x.squeeze(dim)


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
              scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """`F.scaled_dot_product_attention` (inference: no dropout) in an order that does not depend on
    the batch: see the module docstring."""
    B, H, Q, D = query.shape
    L = key.shape[-2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    allowed = torch.ones(1, 1, Q, L, dtype=torch.bool, device=query.device)
    if is_causal:
        allowed = allowed.tril()
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            bias = attn_mask.expand(*attn_mask.shape[:-2], Q, L)
            allowed = allowed & (attn_mask > torch.finfo(attn_mask.dtype).min / 2)
    while allowed.dim() < 4:
        allowed = allowed[None]
    per_head = allowed.shape[1] != 1 or bias is not None and bias.dim() == 4 and bias.shape[1] != 1
    if per_head or H % key.shape[1]:
        raise NotImplementedError("batch-invariant attention: a per-head mask or uneven head groups")
    allowed = allowed.expand(B, 1, Q, L)
    Hk = key.shape[1]
    rep = H // Hk
    # each query's keys from its first visible one: index c is key first + c
    first = allowed.to(torch.uint8).argmax(-1)                       # [B, 1, Q]
    span = int((L - first).max()) if L else 0
    P = max(32, 1 << max(span - 1, 0).bit_length())
    c_P = torch.arange(P, device=query.device)
    index = first[..., None] + c_P                                  # [B, 1, Q, P]
    inside = index < L
    index = index.clamp(max=max(L - 1, 0))
    visible = allowed.gather(-1, index) & inside                     # [B, 1, Q, P]
    bias_P = None if bias is None else bias.expand(B, 1, Q, L).gather(-1, index)
    q = query.reshape(B, Hk, rep, Q, D)
    b_ar = torch.arange(B, device=query.device)[:, None, None, None]
    h_ar = torch.arange(Hk, device=query.device)[None, :, None, None]
    out = query.new_empty(B, Hk, rep, Q, D)
    step = max(1, ATTENTION_ELEMENTS // max(1, B * H * max(P, L) * D))
    for q0 in range(0, Q, step):
        q1 = min(Q, q0 + step)
        # each score is a tree over head_dim wherever it lies: made in the cache's layout [B, Hk, rep, q, L],
        # then moved to the canonical one
        natural = tree_sum(q[:, :, :, q0:q1, None, :] * key[:, :, None, None], -1) * scale
        idx = index[:, :, q0:q1].expand(B, Hk, q1 - q0, P)
        scores = natural.gather(-1, idx[:, :, None].expand(B, Hk, rep, q1 - q0, P))   # [B, Hk, rep, q, P]
        values = value[b_ar, h_ar, idx]                              # [B, Hk, q, P, D]
        if bias_P is not None:
            scores = scores + bias_P[:, :, None, q0:q1]
        seen = visible[:, :, None, q0:q1]
        scores = scores.masked_fill(~seen, float("-inf"))
        top = scores.amax(-1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        weights = torch.exp(scores - top)
        total = tree_sum(weights, -1)[..., None]
        weights = torch.where(total > 0, weights / total, torch.zeros_like(weights))
        out[:, :, :, q0:q1] = tree_sum(weights[..., None] * values[:, :, None], -2)
    return out.reshape(B, H, Q, D)


_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__}
_BMMS = {torch.bmm, torch.Tensor.bmm}


class BatchInvariant(TorchFunctionMode):
    """Within it, matmuls with a 2-D weight and SDPA compute each row as they would alone."""

    def __enter__(self):
        _state.depth = getattr(_state, "depth", 0) + 1
        return super().__enter__()

    def __exit__(self, *exc):
        _state.depth -= 1
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return linear(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            return attention(*args, **kwargs)
        if func in _MATMULS and not kwargs and len(args) == 2:
            a, b = args
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() >= 2 and b.dim() == 2:
                return linear(a, b.T)
        if func in _BMMS and not kwargs and len(args) == 2:
            return bmm(*args)
        return func(*args, **kwargs)
