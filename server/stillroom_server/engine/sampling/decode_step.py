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
import os
import weakref
from typing import Any

import torch
import torch.nn.functional as F

from stillroom_server.engine.kernels import batch_invariant, packed_linear
from stillroom_server.engine.sampling import kv_cache

SUPPORTED = ("llama", "qwen3")
_enabled = True
_fuse = True
_compiled = os.environ.get("STILLROOM_COMPILE_DECODE", "") == "1"   # small models' step as one graph


def set_enabled(on: bool, fuse: bool = True) -> None:
    """Turn the fast step on or off, and its joined q/k/v and gate/up linears (benchmarks and tests
    compare them)."""
    global _enabled, _fuse
    _enabled, _fuse = on, fuse


def set_compiled(on: bool) -> bool:
    """Turn the compiled step of small models on or off (STILLROOM_COMPILE_DECODE=1 starts it on);
    returns the previous setting."""
    global _compiled
    before, _compiled = _compiled, on
    return before


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
        self.silu = getattr(config, "hidden_act", None) == "silu"
        eps = {m.variance_epsilon for m in (self.norm, *(n for layer in self.layers for n in layer.modules()
                                                           if "RMSNorm" in type(n).__name__))}
        self.eps = eps.pop() if len(eps) == 1 else None

    def logits(self, tokens_B: torch.Tensor, position_B: torch.Tensor, mask_B_L: torch.Tensor,
               cache: Any) -> torch.Tensor:
        """float32 logits [B, V] of the next token after `tokens_B` at `position_B`, the cache's
        layers extended by this position (`mask_B_L` covers the cache with this position included)."""
        compiled = self._compiled_logits(tokens_B, position_B, mask_B_L, cache)
        if compiled is not None:
            return compiled
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

    # ------------------------------------------------------------------ compiled (small models)

    def _compiled_logits(self, tokens_B: torch.Tensor, position_B: torch.Tensor, mask_B_L: torch.Tensor,
                         cache: Any) -> torch.Tensor | None:
        """The step as one `torch.compile`d graph (`_graph_step`) where that is on (`set_compiled`,
        STILLROOM_COMPILE_DECODE=1), the model is small enough not to be packed, its linears are plain
        (base rows or a full snapshot, not LoRA-wrapped), its MLP is SiLU-gated and every layer's
        cache is still concatenated per step (kv_cache.CONTIGUOUS_BYTES); else None."""
        if (not (_compiled and self.silu and self.eps is not None) or not torch.is_inference_mode_enabled()
                or _ISA_PINNED
                or not _small_cache(cache, tokens_B.shape[0])):
            return None   # (the streams decode in inference mode: one kind of tensor, one graph)
        weights = self._graph_weights()
        if weights is None:
            return None
        hidden = self.embed(tokens_B)                                   # [B, D]
        cos, sin = self.rotary(hidden, position_B[:, None])            # [B, 1, hd]
        layers = cache.layers
        for layer in layers:   # rows left or joined (outside inference mode, or a slice): one copy now
            if not (layer.keys.is_inference() and layer.keys.is_contiguous()):
                layer.keys = layer.keys.contiguous().clone()
            if not (layer.values.is_inference() and layer.values.is_contiguous()):
                layer.values = layer.values.contiguous().clone()
        logits, keys, values = _compiled_step()(
            hidden, cos, sin, mask_B_L, weights, [layer.keys for layer in layers],
            [layer.values for layer in layers], self.eps, self.heads, self.kv_heads, self.head_dim,
            self.mlp_width, self.scaling, self.qk_norm)
        for layer, k, v in zip(layers, keys, values):
            layer.keys, layer.values = k, v   # adopted by GrowingLayer.update if a later step is eager
        return logits

    def _graph_weights(self) -> list[torch.Tensor] | None:
        """Per layer: input norm, joined q/k/v transposed, q norm and k norm (qk_norm models), o
        transposed, post-attention norm, joined gate/up transposed, down transposed; then the final
        norm and the head transposed (`packed_linear.transposed`: None where it does not apply)."""
        weights: list[torch.Tensor] = []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            joined = (packed_linear.transposed((attn.q_proj, attn.k_proj, attn.v_proj)),
                      packed_linear.transposed((attn.o_proj,)),
                      packed_linear.transposed((mlp.gate_proj, mlp.up_proj)),
                      packed_linear.transposed((mlp.down_proj,)))
            if any(w is None for w in joined):
                return None
            qkv, o, gate_up, down = joined
            weights += [layer.input_layernorm.weight, qkv]
            if self.qk_norm:
                weights += [attn.q_norm.weight, attn.k_norm.weight]
            weights += [o, layer.post_attention_layernorm.weight, gate_up, down]
        head = packed_linear.transposed((self.head,))
        if head is None:
            return None
        return weights + [self.norm.weight, head]


def _graph_step(hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask_B_L: torch.Tensor,
                weights: list[torch.Tensor], keys: list[torch.Tensor], values: list[torch.Tensor],
                eps: float, heads: int, kv_heads: int, hd: int, width: int, scaling: float,
                qk_norm: bool) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """`Step.logits`' arithmetic as a pure function for `torch.compile`: hidden [B, D] (the tokens'
    embeddings), cos/sin [B, 1, hd] (the model's rotary embedding), the mask [B, L] with this
    position, `Step._graph_weights`, each layer's cache [B, Hkv, L - 1, hd]; returns float32
    logits [B, V] and each layer's cache with this position concatenated. Linears are `torch.mm`
    on transposed weights; norms, rotary, residuals and the SiLU gate fuse into a few loops."""
    B = hidden.shape[0]
    cos, sin = cos[:, None], sin[:, None]                          # [B, 1, 1, hd]
    mask = mask_B_L.bool()[:, None, None, :]
    rep = heads // kv_heads
    q_end, k_end = heads * hd, (heads + kv_heads) * hd
    new_keys, new_values = [], []
    at = 0
    for index in range(len(keys)):
        norm_in, qkv_T = weights[at], weights[at + 1]
        at += 2
        qkv = torch.mm(F.rms_norm(hidden, (hidden.shape[-1],), norm_in, eps), qkv_T)
        q = qkv[:, :q_end].reshape(B, heads, 1, hd)
        k = qkv[:, q_end:k_end].reshape(B, kv_heads, 1, hd)
        v = qkv[:, k_end:].reshape(B, kv_heads, 1, hd)
        if qk_norm:
            q = F.rms_norm(q, (hd,), weights[at], eps)
            k = F.rms_norm(k, (hd,), weights[at + 1], eps)
            at += 2
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        all_k = torch.cat([keys[index], k], dim=2)
        all_v = torch.cat([values[index], v], dim=2)
        new_keys.append(all_k)
        new_values.append(all_v)
        out = F.scaled_dot_product_attention(q.reshape(B, kv_heads, rep, hd), all_k, all_v, attn_mask=mask,
                                             scale=scaling)
        o_T, norm_post, gate_up_T, down_T = weights[at:at + 4]
        at += 4
        hidden = hidden + torch.mm(out.reshape(B, heads * hd), o_T)
        gate_up = torch.mm(F.rms_norm(hidden, (hidden.shape[-1],), norm_post, eps), gate_up_T)
        hidden = hidden + torch.mm(F.silu(gate_up[:, :width]) * gate_up[:, width:], down_T)
    norm, head_T = weights[at], weights[at + 1]
    return torch.mm(F.rms_norm(hidden, (hidden.shape[-1],), norm, eps), head_T), new_keys, new_values


_compiled_fn: Any = None
# Under ATEN_CPU_CAPABILITY=avx2 with inductor's on-disk cache filled by a default (AVX-512) process, the
# compiled step sampled wrong tokens (a repeated id; with a fresh cache directory it was right): not
# understood, so a process with the ISA pinned keeps the eager step.
_ISA_PINNED = bool(os.environ.get("ATEN_CPU_CAPABILITY"))


def _compiled_step() -> Any:
    global _compiled_fn
    if _compiled_fn is None:
        # dynamic: rows and the cache's length change every step; one graph for every model of one shape
        _compiled_fn = torch.compile(_graph_step, dynamic=True)
    return _compiled_fn


def _small_cache(cache: Any, rows: int) -> bool:
    """Whether every layer's cache is initialized and small enough that GrowingLayer would still
    concatenate it (the graph concatenates; larger caches grow in place, eagerly)."""
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if keys is None or keys.dim() != 4 or keys.shape[0] != rows:
            return False
        if keys[:, :, :1].nbytes * (keys.shape[-2] + 1) >= kv_cache.CONTIGUOUS_BYTES:
            return False
    return True


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
    inner: Any = getattr(causal_lm, "model", None)
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
