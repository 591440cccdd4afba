"""Forward passes that turn token sequences into per-token logprobs.

Sequences of different lengths are right-padded into one batch: with causal attention, padding
after a sequence cannot change its logits, so no attention mask is needed. Shared by training,
`compute_logprobs` and prompt logprobs so the three agree exactly.
"""

from __future__ import annotations

import torch


def pad_right(sequences: list[torch.Tensor], value: float = 0) -> torch.Tensor:
    """Stack 1-D tensors of different lengths into [B, max_T], filling the tail with `value`."""
    longest = max(seq.shape[0] for seq in sequences)
    out = sequences[0].new_full((len(sequences), longest), value)
    for row, seq in enumerate(sequences):
        out[row, : seq.shape[0]] = seq
    return out


def lengths_mask(lengths: list[int], device: torch.device) -> torch.Tensor:
    """float32 [B, max_T]: 1 at real positions, 0 at padding."""
    lengths_B = torch.tensor(lengths, device=device)
    positions_T = torch.arange(max(lengths), device=device)
    return (positions_T[None, :] < lengths_B[:, None]).float()


def logits_for(model: torch.nn.Module, tokens_B_T: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens_B_T, use_cache=False).logits.float()


@torch.no_grad()
def sequence_logprobs(model: torch.nn.Module, sequences: list[torch.Tensor], device: torch.device,
                      topk: int = 0) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
    """For each sequence: logprob of every token given those before it (entry 0 NaN), and
    optionally the top-k tokens and logprobs at each position (row 0 padding)."""
    tokens_B_T = pad_right([s.to(device) for s in sequences])
    logprobs_B_T_V = torch.log_softmax(logits_for(model, tokens_B_T), dim=-1)
    results = []
    for row, seq in enumerate(sequences):
        n = seq.shape[0]
        scores_T_V = logprobs_B_T_V[row, : n - 1]
        logprobs_T = torch.full((n,), float("nan"))
        logprobs_T[1:] = scores_T_V.gather(-1, tokens_B_T[row, 1:n, None]).squeeze(-1).cpu()
        topk_ids = topk_values = None
        if topk > 0:
            values, ids = scores_T_V.topk(min(topk, scores_T_V.shape[-1]), dim=-1)
            topk_ids = (torch.cat([torch.zeros_like(ids[:1]), ids]).cpu() if n > 1
                        else torch.zeros(1, topk, dtype=torch.long))
            topk_values = (torch.cat([torch.full_like(values[:1], float("nan")), values]).cpu()
                           if n > 1 else torch.full((1, topk), float("nan")))
        results.append((logprobs_T, topk_ids, topk_values))
    return results
