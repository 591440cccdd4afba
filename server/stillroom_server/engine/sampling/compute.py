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

from stillroom_server.engine.kernels import batch_invariant

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
    split = _decoder_and_head(model)
    if split is not None:   # the head per chunk of positions: no [B, K, V] logits at all
        decoder, head = split
        hidden_B_T_D = decoder(input_ids=tokens_B_T, use_cache=False).last_hidden_state
        lo = 0

        def scores(row: int, start: int, stop: int) -> torch.Tensor:
            return torch.log_softmax(head(hidden_B_T_D[row, start - 1: stop - 1]).float(), dim=-1)
        vocab = head.out_features
    else:
        keep_K = None if lo == 0 else torch.arange(lo, hi, device=device)
        logits_B_K_V = logits_for(model, tokens_B_T, keep_K)

        def scores(row: int, start: int, stop: int) -> torch.Tensor:
            return torch.log_softmax(logits_B_K_V[row, start - 1 - lo: stop - 1 - lo], dim=-1)
        vocab = logits_B_K_V.shape[-1]
    k = min(topk, vocab)
    results = []
    for row, (n, first) in enumerate(zip(lengths, firsts)):
        logprobs_T = torch.full((n,), float("nan"))
        topk_ids = topk_values = None
        if topk > 0:
            topk_ids, topk_values = torch.zeros(n, k, dtype=torch.long), torch.full((n, k), float("nan"))
        # the log-softmax SOFTMAX_POSITIONS positions at a time: the same bits (it is row by row) at half
        # the CPU time of one [B, K, V] output (1.6 GB at 32 x 256 x 49k, page-faulted in afresh per call);
        # where the model splits into decoder and head, the head runs per chunk too (no [B, K, V] logits)
        for start in range(first, n, SOFTMAX_POSITIONS):
            stop = min(start + SOFTMAX_POSITIONS, n)
            scores_T_V = scores(row, start, stop)
            picked_T = scores_T_V.gather(-1, tokens_B_T[row, start:stop, None]).squeeze(-1)
            logprobs_T[start:stop] = picked_T.cpu()
            if topk_ids is not None and topk_values is not None:
                values, ids = scores_T_V.topk(k, dim=-1)
                topk_ids[start:stop], topk_values[start:stop] = ids.cpu(), values.cpu()
        results.append((logprobs_T, topk_ids, topk_values))
    return results


SPLIT_MODELS = ("llama", "qwen2", "qwen3", "mistral")   # logits = lm_head(decoder's last hidden state)


def _decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """A plain Hugging Face causal LM's decoder (its body, final norm included) and output head,
    where its forward is exactly `lm_head(decoder(...).last_hidden_state)` (no logit scaling or
    soft-capping: the model types above); None for anything else (LoRA views, PEFT models, other
    architectures), which keeps the whole forward. Where the head is a `PackedLinear` (SmolLM2) its
    64-position chunks take the packed path, as decode steps do: logprobs move by rounding (3e-5 at
    most on 32 x 256 SmolLM2 tokens, inside the 1e-4 contract)."""
    from transformers import PreTrainedModel

    if (not isinstance(model, PreTrainedModel) or not _split or batch_invariant.active()
            or torch.is_autocast_enabled(model.device.type)):
        return None   # the batch-invariant mode and autocast keep the model's forward
    if getattr(model.config, "model_type", None) not in SPLIT_MODELS:
        return None
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if decoder is model or not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return None
    return decoder, head


_split = True


def set_split(on: bool) -> bool:
    """Turn scoring's head-per-chunk path on or off (benchmarks compare them); returns the previous
    setting."""
    global _split
    before, _split = _split, on
    return before
