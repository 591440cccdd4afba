"""Rollouts for on-policy loops: groups of sampled completions per prompt, and the
importance-sampling data that train on them.

Knows the SDK's clients and types and a renderer; it does not know where advantages come from
(rewards in rl.py, a teacher in distillation.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import stillroom
from stillroom import types
from stillroom_cookbook.renderers import Renderer


@dataclasses.dataclass(frozen=True)
class Rollout:
    prompt_tokens: list[int]
    tokens: list[int]        # the sampled completion, stop token included
    logprobs: list[float]    # the sampler's logprob of each completion token

    @property
    def all_tokens(self) -> list[int]:
        return self.prompt_tokens + self.tokens


def sample_groups(sampler: stillroom.SamplingClient, renderer: Renderer, prompts: Sequence[str],
                  group_size: int, max_tokens: int, temperature: float = 1.0,
                  seed: int | None = None) -> list[list[Rollout]]:
    """`group_size` completions of each prompt; every prompt's request is in flight at once.
    With a `seed`, prompt i samples with seed + i (reproducible, and not the same draws for all)."""
    def params(i: int) -> types.SamplingParams:
        return types.SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                    seed=None if seed is None else seed + i, stop=renderer.stop_tokens)

    prompt_tokens = [renderer.prompt_tokens(p) for p in prompts]
    futures = [sampler.sample(types.ModelInput.from_ints(t), group_size, params(i))
               for i, t in enumerate(prompt_tokens)]
    return [[_rollout(tokens_T, seq) for seq in f.result().sequences]
            for tokens_T, f in zip(prompt_tokens, futures)]


def _rollout(prompt_tokens: list[int], seq: types.SampledSequence) -> Rollout:
    if seq.logprobs is None:
        raise ValueError("sample: the server returned a sequence without logprobs, which on-policy "
                         "training needs")
    return Rollout(prompt_tokens, list(seq.tokens), list(seq.logprobs))


def importance_datum(rollout: Rollout, advantages_T: Sequence[float]) -> types.Datum:
    """An `importance_sampling` datum: the completion's tokens scored with per-token advantages."""
    assert len(advantages_T) == len(rollout.tokens)
    tokens = rollout.all_tokens
    n_prompt = len(rollout.prompt_tokens) - 1  # targets that are still prompt
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:],
                        "logprobs": [0.0] * n_prompt + rollout.logprobs,
                        "advantages": [0.0] * n_prompt + list(advantages_T)})


def completion_datum(prompt_tokens: Sequence[int], completion_tokens: Sequence[int],
                     weight: float = 1.0) -> types.Datum:
    """Next-token targets over prompt + completion, `weights` `weight` on the completion and 0 on
    the prompt: what `cross_entropy` (SFT) and `teacher_reverse_kl` read."""
    tokens = [*prompt_tokens, *completion_tokens]
    n_prompt = len(prompt_tokens) - 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:],
                        "weights": [0.0] * n_prompt + [weight] * len(completion_tokens)})
