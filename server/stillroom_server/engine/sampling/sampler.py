"""Batched autoregressive sampling with a KV cache, one step at a time (continuous batching).

Every sample of every request is one row with its own sampling settings, random generator, token
budget, stop conditions and LoRA adapter. A `DecodeBatch` is the running batch: rows are
left-padded into one KV cache; new rows are prefilled on their own and merged in (the shorter
cache is left-padded, masked), and a row leaves the batch as soon as it stops. Logprobs returned
are the model's own (temperature 1, no truncation), so they agree with `compute_logprobs` and the
trainer. Knows nothing of requests' origins or scheduling; stop strings are matched on text
decoded with the model's tokenizer.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any

import torch
from transformers import DynamicCache

from stillroom_server.engine.sampling import decode_step
from stillroom_server.engine.sampling.kv_cache import GrowingCache
from stillroom_server.engine.types import SampledSequence, SampleWork, SamplingConfig, new_sequence_id

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch


def _cache_argument() -> str:
    """The KV cache's keyword in a model's forward: `cache` where transformers has renamed it (its
    `past_key_values` warns there and goes in 5.40), `past_key_values` in the 5.x releases before."""
    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


CACHE_ARGUMENT = _cache_argument()


@dataclasses.dataclass
class _Row:
    prompt_T: torch.Tensor
    params: SamplingConfig
    budget: int                      # most tokens this row may add
    generator: torch.Generator
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    stop_reason: str | None = None
    topk: int = 0                    # top-k logprobs wanted at each sampled position
    sequence_id: str = dataclasses.field(default_factory=new_sequence_id)
    topk_ids: list[list[int]] = dataclasses.field(default_factory=list)
    topk_logprobs: list[list[float]] = dataclasses.field(default_factory=list)
    adapter: str = BASE_ADAPTER      # the PEFT adapter this row samples from
    owner: object = None             # whatever the caller ties the row to (a request)

    def sequence(self) -> SampledSequence:
        return SampledSequence(self.tokens, self.logprobs, self.stop_reason or "length",
                               topk_ids=self.topk_ids if self.topk else None,
                               topk_logprobs=self.topk_logprobs if self.topk else None,
                               sequence_id=self.sequence_id)


def _row_seed(seed: int | None, index: int) -> int:
    if seed is None:
        return int.from_bytes(os.urandom(8), "little") >> 1
    return (seed * 1_000_003 + index * 7_919) % (2**63 - 1)


def make_rows(works: list[SampleWork], max_context: int, adapter: str = BASE_ADAPTER,
              owner: object = None) -> list[_Row]:
    rows = []
    for work in works:
        room = max_context - work.prompt_T.shape[0]
        budget = room if work.params.max_tokens < 0 else min(work.params.max_tokens, room)
        for index in range(work.num_samples):
            generator = torch.Generator().manual_seed(_row_seed(work.params.seed, index))
            row = _Row(work.prompt_T, work.params, budget, generator, topk=work.topk_sample_logprobs,
                       adapter=adapter, owner=owner)
            if work.sequence_ids:
                row.sequence_id = work.sequence_ids[index]
            rows.append(row)
    return rows


@dataclasses.dataclass(frozen=True)
class _Settings:
    """The rows' sampling settings as tensors, made once per batch composition (not every step);
    None where every row has the neutral value, so that step is skipped."""

    temperature_B: torch.Tensor | None    # None: every row at temperature 1
    greedy_B: torch.Tensor | None         # None: no row at temperature 0
    top_k_B: torch.Tensor | None          # None: no row truncates by rank
    top_p_B: torch.Tensor | None          # None: no row truncates by mass
    truncates_B: torch.Tensor | None      # the rows that truncate (None: none or all of them)

    @classmethod
    def of(cls, rows: list[_Row], vocab: int, device: torch.device) -> _Settings:
        temperatures = [r.params.temperature for r in rows]
        temperature_B = torch.tensor(temperatures, device=device)
        top_ks = [r.params.top_k if r.params.top_k > 0 else vocab for r in rows]
        truncates = [k < vocab or r.params.top_p < 1.0 for k, r in zip(top_ks, rows)]
        return cls(None if all(t == 1.0 for t in temperatures) else temperature_B.clamp(min=1e-6),
                   temperature_B == 0 if 0 in temperatures else None,
                   None if all(k >= vocab for k in top_ks) else torch.tensor(top_ks, device=device),
                   None if all(r.params.top_p >= 1.0 for r in rows)
                   else torch.tensor([r.params.top_p for r in rows], device=device),
                   None if all(truncates) or not any(truncates) else torch.tensor(truncates, device=device))


def choose_tokens(logits_B_V: torch.Tensor, rows: list[_Row],
                  settings: _Settings | None = None) -> torch.Tensor:
    """One token per row under that row's temperature, top_k and top_p (greedy at temperature 0).
    Only a batch where some row truncates sorts the vocabulary (a quarter of a decode step at a
    49k vocabulary), and only those rows read their uniform draw off the sorted CDF; the others read
    theirs off their CDF in vocabulary order, as they do in a batch where no row truncates (a seeded
    row samples the same tokens whatever shares its batch)."""
    device, vocab = logits_B_V.device, logits_B_V.shape[-1]
    if settings is None:
        settings = _Settings.of(rows, vocab, device)
    scaled_B_V = logits_B_V
    if settings.temperature_B is not None:
        scaled_B_V = logits_B_V / settings.temperature_B[:, None]
    truncated = settings.top_k_B is not None or settings.top_p_B is not None
    order_B_V = None
    if truncated:  # by rank or by mass: the vocabulary in order of probability (a sort per row)
        scaled_B_V, order_B_V = torch.sort(scaled_B_V, dim=-1, descending=True)
    if settings.top_k_B is not None:
        rank_V = torch.arange(vocab, device=device)
        scaled_B_V = scaled_B_V.masked_fill(rank_V[None, :] >= settings.top_k_B[:, None], float("-inf"))
    probs_B_V = torch.softmax(scaled_B_V, dim=-1)
    if settings.top_p_B is not None:
        mass_before_B_V = probs_B_V.cumsum(-1) - probs_B_V
        probs_B_V = probs_B_V.masked_fill(mass_before_B_V >= settings.top_p_B[:, None], 0.0)
    uniform_B = torch.stack([torch.rand((), generator=r.generator) for r in rows]).to(device)
    sampled_B = _draw(probs_B_V, uniform_B)
    if order_B_V is not None:
        sampled_B = order_B_V.gather(-1, sampled_B[:, None]).squeeze(-1)
    if settings.truncates_B is not None:   # the rows that do not truncate: vocabulary order
        whole_B = _draw(torch.softmax(logits_B_V if settings.temperature_B is None else
                                      logits_B_V / settings.temperature_B[:, None], dim=-1), uniform_B)
        sampled_B = torch.where(settings.truncates_B, sampled_B, whole_B)
    if settings.greedy_B is None:
        return sampled_B
    return torch.where(settings.greedy_B, logits_B_V.argmax(-1), sampled_B)


def _draw(probs_B_V: torch.Tensor, uniform_B: torch.Tensor) -> torch.Tensor:
    """Each row's index where its uniform draw falls on its CDF."""
    cdf_B_V = probs_B_V.cumsum(-1)
    picked_B = torch.searchsorted(cdf_B_V, (uniform_B * cdf_B_V[:, -1])[:, None]).squeeze(-1)
    return picked_B.clamp(max=probs_B_V.shape[-1] - 1)


def _record_topk(rows: list[_Row], logprobs_B_V: torch.Tensor) -> None:
    """Each live row that asked for top-k logprobs gets this step's k likeliest (id, logprob)."""
    k_max = max((r.topk for r in rows if r.stop_reason is None), default=0)
    if not k_max:
        return
    top = logprobs_B_V.topk(min(k_max, logprobs_B_V.shape[-1]), dim=-1)
    ids_B_K, values_B_K = top.indices.tolist(), top.values.tolist()
    for row, ids, values in zip(rows, ids_B_K, values_B_K):
        if row.topk and row.stop_reason is None:
            row.topk_ids.append(ids[:row.topk])
            row.topk_logprobs.append(values[:row.topk])


def _append(row: _Row, token: int, logprob: float, eos_ids: tuple[int, ...], tokenizer) -> None:
    row.tokens.append(token)
    row.logprobs.append(logprob)
    if _stopped(row, token, eos_ids, tokenizer):
        row.stop_reason = "stop"
    elif len(row.tokens) >= row.budget:
        row.stop_reason = "length"


def _stopped(row: _Row, token: int, eos_ids: tuple[int, ...], tokenizer) -> bool:
    if token in row.params.stop_tokens or token in eos_ids:
        return True
    if row.params.stop_texts:
        longest = max(len(s) for s in row.params.stop_texts)
        tail = tokenizer.decode(row.tokens[-(longest + 4):], skip_special_tokens=False)
        return any(stop in tail for stop in row.params.stop_texts)
    return False


def _forward(model: torch.nn.Module, rows: list[_Row], **inputs) -> torch.Tensor:
    """The last position's logits of one forward; rows name their adapters when the model is a
    LoRA host (a mixed-adapter batch: each row sees only its own adapter's weights)."""
    if getattr(model, "takes_adapter_names", False):
        inputs["adapter_names"] = [row.adapter for row in rows]
    return model(**inputs, use_cache=True, logits_to_keep=1).logits[:, -1].float()


class DecodeBatch:
    """Rows decoding together over one KV cache. `prefill` makes a batch of new rows (each gets
    its first token), `merge` joins two batches, `decode` adds one token to every row, and
    finished rows leave at once."""

    def __init__(self, rows: list[_Row], cache: DynamicCache, mask_B_L: torch.Tensor,
                 position_B: torch.Tensor, tokens_B: torch.Tensor) -> None:
        self.rows, self.cache, self.mask_B_L = rows, cache, mask_B_L
        self.position_B, self.tokens_B = position_B, tokens_B
        self._settings: _Settings | None = None   # made at the first step after the rows change

    @classmethod
    def prefill(cls, model: torch.nn.Module, rows: list[_Row], device: torch.device,
                eos_ids: tuple[int, ...], tokenizer) -> DecodeBatch:
        """Run the new rows' prompts (each distinct prompt on each adapter once; the others copy
        its KV cache) and choose their first tokens. The batch keeps its rows grouped by adapter."""
        rows = sorted(rows, key=_adapter_order)
        prompts: dict[tuple, int] = {}   # (adapter, prompt) -> its row in the prefill batch
        keys = [(row.adapter, tuple(row.prompt_T.tolist())) for row in rows]
        unique = []
        for row, key in zip(rows, keys):
            if key not in prompts:
                prompts[key] = len(unique)
                unique.append(row)
        width = max(r.prompt_T.shape[0] for r in unique)
        input_U_T = torch.zeros(len(unique), width, dtype=torch.long)
        mask_U_T = torch.zeros(len(unique), width, dtype=torch.long)
        for i, row in enumerate(unique):
            n = row.prompt_T.shape[0]
            input_U_T[i, width - n:], mask_U_T[i, width - n:] = row.prompt_T, 1
        input_U_T, mask_U_T = input_U_T.to(device), mask_U_T.to(device)
        position_U_T = (mask_U_T.cumsum(-1) - 1).clamp(min=0)
        cache = GrowingCache()
        logits_U_V = _forward(model, unique, input_ids=input_U_T, attention_mask=mask_U_T,
                              position_ids=position_U_T, **{CACHE_ARGUMENT: cache})
        index_B = torch.tensor([prompts[key] for key in keys], device=device)
        if len(unique) != len(rows):
            cache.batch_select_indices(index_B)
        batch = cls(rows, cache, mask_U_T[index_B], position_U_T[index_B, -1], index_B)
        batch._choose(logits_U_V[index_B], eos_ids, tokenizer)
        return batch

    def decode(self, model: torch.nn.Module, eos_ids: tuple[int, ...], tokenizer) -> None:
        """One more token for every row."""
        self.mask_B_L = torch.cat([self.mask_B_L, self.mask_B_L.new_ones(len(self.rows), 1)], dim=1)
        self.position_B = self.position_B + 1
        fast = decode_step.plan(model, [row.adapter for row in self.rows])
        if fast is not None:   # the same arithmetic without Hugging Face's per-call glue (decode_step.py)
            step, context = fast
            with context:
                logits_B_V = step.logits(self.tokens_B, self.position_B, self.mask_B_L, self.cache)
        else:
            logits_B_V = _forward(model, self.rows, input_ids=self.tokens_B[:, None],
                                  attention_mask=self.mask_B_L, position_ids=self.position_B[:, None],
                                  **{CACHE_ARGUMENT: self.cache})
        self._choose(logits_B_V, eos_ids, tokenizer)

    def _choose(self, logits_B_V: torch.Tensor, eos_ids: tuple[int, ...], tokenizer) -> None:
        if self._settings is None:
            self._settings = _Settings.of(self.rows, logits_B_V.shape[-1], logits_B_V.device)
        tokens_B = choose_tokens(logits_B_V, self.rows, self._settings)
        logprobs_B_V = torch.log_softmax(logits_B_V, -1)
        logprobs_B = logprobs_B_V.gather(-1, tokens_B[:, None]).squeeze(-1)
        _record_topk(self.rows, logprobs_B_V)
        for row, token, logprob in zip(self.rows, tokens_B.tolist(), logprobs_B.tolist()):
            _append(row, token, logprob, eos_ids, tokenizer)
        self.tokens_B = tokens_B

    def take_finished(self) -> list[_Row]:
        """Remove the rows that have stopped from the batch (and its cache); return them."""
        done = [r for r in self.rows if r.stop_reason is not None]
        if done:
            self.keep([b for b, r in enumerate(self.rows) if r.stop_reason is None])
        return done

    def keep(self, live: list[int]) -> None:
        """Keep only the rows at batch positions `live` (and drop cache columns no row needs)."""
        keep = torch.tensor(live, dtype=torch.long, device=self.tokens_B.device)
        self.rows, self._settings = [self.rows[b] for b in live], None
        self.mask_B_L, self.position_B, self.tokens_B = (self.mask_B_L[keep], self.position_B[keep],
                                                         self.tokens_B[keep])
        self.cache.batch_select_indices(keep)
        if self.rows:
            start = int(self.mask_B_L.any(0).long().argmax())  # leading columns that are all padding
            if start:
                self.mask_B_L = self.mask_B_L[:, start:]
                for layer in _kv_layers(self.cache):
                    layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]

    def merge(self, other: DecodeBatch) -> None:
        """Add `other`'s rows where they sort among this batch's (one block per adapter), copying every
        tensor once; the shorter cache is left-padded (masked out)."""
        width = max(self.mask_B_L.shape[1], other.mask_B_L.shape[1])
        runs = _merge_runs([_adapter_order(r) for r in self.rows], [_adapter_order(r) for r in other.rows])
        for mine, theirs in zip(_kv_layers(self.cache), _kv_layers(other.cache)):
            mine.keys = _interleave(_pad_left(mine.keys, width), _pad_left(theirs.keys, width), runs)
            mine.values = _interleave(_pad_left(mine.values, width), _pad_left(theirs.values, width), runs)
        self.mask_B_L = _interleave(_pad_left(self.mask_B_L, width), _pad_left(other.mask_B_L, width), runs)
        self.position_B = _interleave(self.position_B, other.position_B, runs)
        self.tokens_B = _interleave(self.tokens_B, other.tokens_B, runs)
        self.rows = [row for source, start, stop in runs
                     for row in (self.rows, other.rows)[source][start:stop]]
        self._settings = None


def _merge_runs(mine: list, theirs: list) -> list[tuple[int, int, int]]:
    """How two sorted lists of keys merge (ties: `mine` first), as runs (0 for mine or 1 for theirs,
    start, stop) of consecutive items of one list."""
    runs: list[tuple[int, int, int]] = []
    i = j = 0
    while i < len(mine) or j < len(theirs):
        if j == len(theirs) or (i < len(mine) and mine[i] <= theirs[j]):
            source, start = 0, i
            while i < len(mine) and (j == len(theirs) or mine[i] <= theirs[j]):
                i += 1
            runs.append((source, start, i))
        else:
            start = j
            while j < len(theirs) and (i == len(mine) or theirs[j] < mine[i]):
                j += 1
            runs.append((1, start, j))
    return runs


def _interleave(mine: torch.Tensor, theirs: torch.Tensor, runs: list[tuple[int, int, int]]) -> torch.Tensor:
    """The rows (dim 0) of `mine` and `theirs` in the order of `runs`, in one copy."""
    sources = (mine, theirs)
    return torch.cat([sources[source][start:stop] for source, start, stop in runs])


def _adapter_order(row: _Row) -> tuple[bool, str]:
    """Rows sort into one block per adapter, base rows first: a mixed-adapter forward then reads
    each adapter's rows as one slice of the batch (mixed_lora.py) instead of gathering them."""
    return row.adapter != BASE_ADAPTER, row.adapter


def _kv_layers(cache: DynamicCache) -> list[Any]:
    """The cache's layers, each holding `keys` and `values` [B, H, L, D] (full attention)."""
    return list(cache.layers)


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros before the sequence axis (dim 1 of a mask [B, L], dim 2 of a cache [B, H, L, D])."""
    axis = 1 if tensor.dim() == 2 else 2
    missing = width - tensor.shape[axis]
    if not missing:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=axis)


@torch.no_grad()
def sample(model: torch.nn.Module, works: list[SampleWork], *, max_context: int,
           eos_ids: tuple[int, ...], tokenizer, device: torch.device,
           adapter: str = BASE_ADAPTER) -> list[list[SampledSequence]]:
    """Sample every request in `works` as one batch, to the end; return each request's sequences."""
    rows = make_rows(works, max_context, adapter)
    batch = DecodeBatch.prefill(model, rows, device, eos_ids, tokenizer)
    while batch.take_finished() is not None and batch.rows:
        batch.decode(model, eos_ids, tokenizer)
    sequences = [r.sequence() for r in rows]
    out, start = [], 0
    for work in works:
        out.append(sequences[start:start + work.num_samples])
        start += work.num_samples
    return out
