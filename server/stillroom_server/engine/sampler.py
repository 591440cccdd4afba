"""Batched autoregressive sampling with a KV cache.

Every sample of every request in a batch is one row: prompts are left-padded, each row keeps its
own sampling settings, random generator, token budget and stop conditions, and the batch decodes
until every row has stopped. Logprobs returned are the model's own (temperature 1, no
truncation), so they agree with `compute_logprobs` and the trainer. Knows nothing of requests'
origins; stop strings are matched on text decoded with the model's tokenizer.
"""

from __future__ import annotations

import dataclasses
import os

import torch
from transformers import DynamicCache

from stillroom_server.engine.types import SampledSequence, SampleWork, SamplingConfig, new_sequence_id


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


def _row_seed(seed: int | None, index: int) -> int:
    if seed is None:
        return int.from_bytes(os.urandom(8), "little") >> 1
    return (seed * 1_000_003 + index * 7_919) % (2**63 - 1)


def make_rows(works: list[SampleWork], max_context: int) -> list[_Row]:
    rows = []
    for work in works:
        room = max_context - work.prompt_T.shape[0]
        budget = room if work.params.max_tokens < 0 else min(work.params.max_tokens, room)
        for index in range(work.num_samples):
            generator = torch.Generator().manual_seed(_row_seed(work.params.seed, index))
            row = _Row(work.prompt_T, work.params, budget, generator, topk=work.topk_sample_logprobs)
            if work.sequence_ids:
                row.sequence_id = work.sequence_ids[index]
            rows.append(row)
    return rows


def choose_tokens(logits_B_V: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
    """One token per row under that row's temperature, top_k and top_p (greedy at temperature 0)."""
    device = logits_B_V.device
    temperature_B = torch.tensor([r.params.temperature for r in rows], device=device)
    greedy_B = temperature_B == 0
    sorted_B_V, order_B_V = torch.sort(logits_B_V / temperature_B.clamp(min=1e-6)[:, None],
                                       dim=-1, descending=True)
    vocab = logits_B_V.shape[-1]
    top_k_B = torch.tensor([r.params.top_k if r.params.top_k > 0 else vocab for r in rows],
                           device=device)
    rank_V = torch.arange(vocab, device=device)
    sorted_B_V = sorted_B_V.masked_fill(rank_V[None, :] >= top_k_B[:, None], float("-inf"))
    probs_B_V = torch.softmax(sorted_B_V, dim=-1)
    top_p_B = torch.tensor([r.params.top_p for r in rows], device=device)
    mass_before_B_V = probs_B_V.cumsum(-1) - probs_B_V
    probs_B_V = probs_B_V.masked_fill(mass_before_B_V >= top_p_B[:, None], 0.0)
    cdf_B_V = probs_B_V.cumsum(-1)
    uniform_B = torch.stack([torch.rand((), generator=r.generator) for r in rows]).to(device)
    picked_B = torch.searchsorted(cdf_B_V, (uniform_B * cdf_B_V[:, -1])[:, None]).squeeze(-1)
    picked_B = picked_B.clamp(max=vocab - 1)
    sampled_B = order_B_V.gather(-1, picked_B[:, None]).squeeze(-1)
    return torch.where(greedy_B, logits_B_V.argmax(-1), sampled_B)


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


@torch.no_grad()
def sample(model: torch.nn.Module, works: list[SampleWork], *, max_context: int,
           eos_ids: tuple[int, ...], tokenizer, device: torch.device) -> list[list[SampledSequence]]:
    """Sample every request in `works` as one batch; return each request's sequences."""
    rows = make_rows(works, max_context)
    lengths = [r.prompt_T.shape[0] for r in rows]
    width = max(lengths)
    input_B_T = torch.zeros(len(rows), width, dtype=torch.long)
    mask_B_T = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        input_B_T[i, width - lengths[i]:] = row.prompt_T
        mask_B_T[i, width - lengths[i]:] = 1
    input_B_T, mask_B_T = input_B_T.to(device), mask_B_T.to(device)
    position_B_T = (mask_B_T.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    logits_B_V = model(input_ids=input_B_T, attention_mask=mask_B_T, position_ids=position_B_T,
                       past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()
    position_B = position_B_T[:, -1]
    in_batch = list(range(len(rows)))          # the row behind each batch position
    while True:
        batch_rows = [rows[i] for i in in_batch]
        tokens_B = choose_tokens(logits_B_V, batch_rows)
        logprobs_B_V = torch.log_softmax(logits_B_V, -1)
        logprobs_B = logprobs_B_V.gather(-1, tokens_B[:, None]).squeeze(-1)
        _record_topk(batch_rows, logprobs_B_V)
        for row, token, logprob in zip(batch_rows, tokens_B.tolist(), logprobs_B.tolist()):
            if row.stop_reason is None:
                _append(row, token, logprob, eos_ids, tokenizer)
        live = [b for b, row in enumerate(batch_rows) if row.stop_reason is None]
        if not live:
            break
        if len(live) <= len(in_batch) // 2:    # drop finished rows from the batch and the cache
            keep = torch.tensor(live, device=device)
            cache.batch_select_indices(keep)
            mask_B_T, position_B, tokens_B = mask_B_T[keep], position_B[keep], tokens_B[keep]
            in_batch = [in_batch[b] for b in live]
        mask_B_T = torch.cat([mask_B_T, mask_B_T.new_ones(len(in_batch), 1)], dim=1)
        position_B = position_B + 1
        logits_B_V = model(input_ids=tokens_B[:, None], attention_mask=mask_B_T,
                           position_ids=position_B[:, None], past_key_values=cache,
                           use_cache=True).logits[:, -1].float()
    sequences = [SampledSequence(r.tokens, r.logprobs, r.stop_reason,
                                 topk_ids=r.topk_ids if r.topk else None,
                                 topk_logprobs=r.topk_logprobs if r.topk else None,
                                 sequence_id=r.sequence_id) for r in rows]
    out, start = [], 0
    for work in works:
        out.append(sequences[start:start + work.num_samples])
        start += work.num_samples
    return out
