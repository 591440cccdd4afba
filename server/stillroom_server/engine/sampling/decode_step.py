"""One decode step of a Llama- or Qwen3-style model without Hugging Face's per-call machinery.

A decode step adds one position to every row. Hugging Face's `forward` does the same arithmetic,
but around it builds a 4D mask through its masking utilities, wraps outputs in dataclasses, checks
kwargs, dispatches attention through a registry and walks generic hooks in every layer: on
char-10m (6 layers, 40 MB) that was about half of an 8-row step, and it is the same few
milliseconds on SmolLM2 (docs/DESIGN.md, issue 24). Here the step calls the model's own modules
(its norms, its linears — packed or LoRA-wrapped, so `mixed_lora`'s per-row adapters and
`packed_linear` apply unchanged — its rotary embedding and the cache's `update`) in the order the
model's forward does, with the ops that forward uses (RMSNorm in fp32, rotate-half rotary, SDPA
with one query packed per key/value head); only the glue is cut: the mask is made once per step
and shared by every layer, outputs stay bare tensors.

Used only where it is the same computation: `model_type` llama or qwen3 with SDPA attention, full
attention in every layer, no attention or MLP biases, a plain CausalLM or a LoRA host whose
mixed-adapter path is on; not under autocast or the batch-invariant mode (whose paths are
Hugging Face's own forward). Anything else decodes through `model(...)` as before.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

import torch
import torch.nn.functional as F

from stillroom_server.engine.kernels import batch_invariant, packed_linear

SUPPORTED = ("llama", "qwen3")
_enabled = True
_fuse = True


def set_enabled(on: bool, fuse: bool = True) -> None:
    """Turn the fast step on or off, and its joined q/k/v and gate/up linears (benchmarks and tests
    compare them)."""
    global _enabled, _fuse
    _enabled, _fuse = on, fuse


class Step:
    """The pieces of one causal LM a decode step calls, found once per module."""

    def __init__(self, causal_lm: Any) -> None:
        inner = causal_lm.model
        config = causal_lm.config
        self.embed = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.rotary = inner.rotary_emb
        self.head = causal_lm.lm_head
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scaling = self.head_dim ** -0.5
        self.qk_norm = hasattr(self.layers[0].self_attn, "q_norm")
        self.qkv_widths = [self.heads * self.head_dim, self.kv_heads * self.head_dim,
                           self.kv_heads * self.head_dim]
        self.mlp_width = config.intermediate_size

    def logits(self, tokens_B: torch.Tensor, position_B: torch.Tensor, mask_B_L: torch.Tensor,
               cache: Any) -> torch.Tensor:
        """float32 logits [B, V] of the next token after `tokens_B` at `position_B`, the cache's
        layers extended by this position (`mask_B_L` covers the cache with this position included)."""
        B = tokens_B.shape[0]
        hidden = self.embed(tokens_B[:, None])                          # [B, 1, D]
        cos, sin = self.rotary(hidden, position_B[:, None])            # [B, 1, hd]
        cos, sin = cos[:, None], sin[:, None]                          # [B, 1, 1, hd]
        # one query per head, packed as n_rep queries per key/value head: [B, Hkv, n_rep, hd]; the mask
        # [B, 1, 1, L] broadcasts over heads and queries (transformers' sdpa path for one query)
        mask = mask_B_L.bool()[:, None, None, :]
        rep = self.heads // self.kv_heads
        hd = self.head_dim
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = _rms(layer.input_layernorm, hidden)
            qkv = packed_linear.fused((attn.q_proj, attn.k_proj, attn.v_proj), x) if _fuse else None
            if qkv is None:
                q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            else:
                q, k, v = qkv.split(self.qkv_widths, dim=-1)
            q = q.view(B, 1, self.heads, hd)
            k = k.view(B, 1, self.kv_heads, hd)
            v = v.view(B, 1, self.kv_heads, hd)
            if self.qk_norm:
                q, k = _rms(attn.q_norm, q), _rms(attn.k_norm, k)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # [B, H, 1, hd]
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys, values = cache.layers[index].update(k, v)
            if rep > 1:
                q = q.reshape(B, self.kv_heads, rep, hd)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling)
            out = out.reshape(B, self.heads, 1, hd).transpose(1, 2).reshape(B, 1, self.heads * hd)
            hidden = hidden + attn.o_proj(out)
            mlp = layer.mlp
            x = _rms(layer.post_attention_layernorm, hidden)
            gate_up = packed_linear.fused((mlp.gate_proj, mlp.up_proj), x) if _fuse else None
            if gate_up is None:
                gate, up = mlp.gate_proj(x), mlp.up_proj(x)
            else:
                gate, up = gate_up.split(self.mlp_width, dim=-1)
            hidden = hidden + mlp.down_proj(mlp.act_fn(gate) * up)
        return self.head(_rms(self.norm, hidden)[:, -1]).float()


def _rms(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm (`weight * (x * rsqrt(mean(x^2) + eps))` in fp32) as torch's one op: the
    same bits (checked against Llama's and Qwen3's modules) at 18 instead of 30 us a call."""
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


_steps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # causal LM -> its Step (None: unsupported)


def _step_of(causal_lm: Any) -> Step | None:
    if causal_lm not in _steps:
        _steps[causal_lm] = Step(causal_lm) if _supported(causal_lm) else None
    return _steps[causal_lm]


def _supported(causal_lm: Any) -> bool:
    config = getattr(causal_lm, "config", None)
    if config is None or getattr(config, "model_type", None) not in SUPPORTED:
        return False
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return False
    if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or [])):
        return False
    if getattr(config, "use_sliding_window", False):
        return False
    if any(type(p).__name__ == "DTensor" for p in causal_lm.parameters()):
        return False   # sharded (FSDP2) weights: only the model's own forward gathers them
    inner = getattr(causal_lm, "model", None)
    if not (all(hasattr(inner, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb"))
            and hasattr(causal_lm, "lm_head")):
        return False
    norms = [inner.norm, *(m for layer in inner.layers for m in layer.modules()
                           if "RMSNorm" in type(m).__name__)]
    return all(type(m).__name__ in ("LlamaRMSNorm", "Qwen3RMSNorm") and m.weight.dtype == torch.float32
               for m in norms)


def plan(model: Any, adapters: list[str]) -> tuple[Step, contextlib.AbstractContextManager] | None:
    """The fast step for a decode forward of `model` (the sampler's module: a causal LM, or a LoRA
    host's rows view), and the context its call runs in; None where `model(...)` must run."""
    if not _enabled or batch_invariant.active() or torch.is_autocast_enabled("cpu"):
        return None
    host = getattr(model, "host", None)
    if host is None:
        step = _step_of(model)
        return None if step is None else (step, contextlib.nullcontext())
    if not getattr(model, "takes_adapter_names", False):
        return None
    mixed = getattr(host, "mixed", None)
    peft = getattr(host, "peft", None)
    if mixed is None or not mixed.fast or peft is None:
        return None
    step = _step_of(peft.base_model.model)
    return None if step is None else (step, mixed.rows(adapters))
