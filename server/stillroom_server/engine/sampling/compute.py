"""Forward passes that turn token sequences into per-token logprobs.

Sequences of different lengths are right-padded into one batch: with causal attention, padding
after a sequence cannot change its logits, so no attention mask is needed. Shared by training,
`compute_logprobs` and prompt logprobs so the three agree. Where only each sequence's last tokens
are scored, the output head runs only over the span of positions some sequence scores
(`logits_to_keep`, which Hugging Face causal LMs take), since the head and the full-vocabulary
softmax cost a third of a small model's forward.
"""

from __future__ import annotations

import torch

SOFTMAX_POSITIONS = 64   # 12.6 MB of log-softmax at a 49k vocabulary: under glibc's 32 MB mmap threshold


def pad_right(sequences: list[torch.Tensor], value: float = 0) -> torch.Tensor:
    """Stack tensors [T, ...] of different lengths T (and the same trailing shape) into
    [B, max_T, ...], filling the tail with `value`."""
    longest = max(seq.shape[0] for seq in sequences)
    out = sequences[0].new_full((len(sequences), longest, *sequences[0].shape[1:]), value)
    for row, seq in enumerate(sequences):
        out[row, : seq.shape[0]] = seq
    return out


def lengths_mask(lengths: list[int], device: torch.device) -> torch.Tensor:
    """float32 [B, max_T]: 1 at real positions, 0 at padding."""
    lengths_B = torch.tensor(lengths, device=device)
    positions_T = torch.arange(max(lengths), device=device)
    return (positions_T[None, :] < lengths_B[:, None]).float()


def logits_for(model: torch.nn.Module, tokens_B_T: torch.Tensor,
               keep_K: torch.Tensor | None = None) -> torch.Tensor:
    """float32 logits [B, T, V], or [B, K, V] at the positions `keep_K` only."""
    if keep_K is None:
        return model(input_ids=tokens_B_T, use_cache=False).logits.float()
    return model(input_ids=tokens_B_T, use_cache=False, logits_to_keep=keep_K).logits.float()


@torch.no_grad()
def target_logprobs(model: torch.nn.Module, tokens_T: torch.Tensor, ids_T_K: torch.Tensor,
                    device: torch.device) -> torch.Tensor:
    """float32 [T - 1, K]: the logprob of token `ids_T_K[i, j]` at position i + 1 given the tokens
    before it (Tinker's target_prompt_logprobs); 0.0 where the id is -1 (nothing asked)."""
    logprobs_T_V = torch.log_softmax(logits_for(model, tokens_T[None, :-1].to(device))[0], dim=-1)
    ids = ids_T_K.to(device)
    scored_T_K = logprobs_T_V.gather(-1, ids.clamp(min=0))
    return torch.where(ids >= 0, scored_T_K, torch.zeros_like(scored_T_K)).cpu()


@torch.no_grad()
def sequence_logprobs(model: torch.nn.Module, sequences: list[torch.Tensor], device: torch.device,
                      topk: int = 0, last_n: list[int | None] | None = None,
                      ) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
    """For each sequence: logprob of every token given those before it (entry 0 NaN), and
    optionally the top-k tokens and logprobs at each position (row 0 padding). Where `last_n[i]` is
    given, only sequence i's last that many tokens are scored; earlier entries are NaN (top-k: id 0)."""
    tokens_B_T = pad_right([s.to(device) for s in sequences])
    lengths = [seq.shape[0] for seq in sequences]
    # the first token each sequence scores; its logits come from the position before it
    firsts = [1 if keep is None else n - keep for n, keep in zip(lengths, last_n or [None] * len(lengths))]
    lo, hi = min(firsts) - 1, max(lengths) - 1
    keep_K = None if lo == 0 else torch.arange(lo, hi, device=device)
    logits_B_K_V = logits_for(model, tokens_B_T, keep_K)
    k = min(topk, logits_B_K_V.shape[-1])
    results = []
    for row, (n, first) in enumerate(zip(lengths, firsts)):
        logprobs_T = torch.full((n,), float("nan"))
        topk_ids = topk_values = None
        if topk > 0:
            topk_ids, topk_values = torch.zeros(n, k, dtype=torch.long), torch.full((n, k), float("nan"))
        # the log-softmax SOFTMAX_POSITIONS positions at a time: the same bits (it is row by row) at half
        # the CPU time of one [B, K, V] output (1.6 GB at 32 x 256 x 49k, page-faulted in afresh per call)
        for start in range(first, n, SOFTMAX_POSITIONS):
            stop = min(start + SOFTMAX_POSITIONS, n)
            scores_T_V = torch.log_softmax(logits_B_K_V[row, start - 1 - lo: stop - 1 - lo], dim=-1)
            picked_T = scores_T_V.gather(-1, tokens_B_T[row, start:stop, None]).squeeze(-1)
            logprobs_T[start:stop] = picked_T.cpu()
            if topk_ids is not None and topk_values is not None:
                values, ids = scores_T_V.topk(k, dim=-1)
                topk_ids[start:stop], topk_values[start:stop] = ids.cpu(), values.cpu()
        results.append((logprobs_T, topk_ids, topk_values))
    return results
