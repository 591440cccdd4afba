"""Sampling options end to end: seeds, greedy and top_k, stop strings, prompt logprobs against a
local forward pass of the same weights, and the context-length limit."""

from __future__ import annotations

import pytest
import torch

from stillroom import types
from stillroom_server.engine.sampling import compute

from conftest import TINY
from helpers import encode_line, load_local_model

CONTEXT = 512


@pytest.fixture(scope="module")
def sampler(service):
    return service.create_sampling_client(base_model=TINY)


@pytest.fixture(scope="module")
def reference(server, sampler):
    return load_local_model(server, TINY)


def prompt_of(tokenizer, text: str) -> types.ModelInput:
    return types.ModelInput.from_ints(encode_line(tokenizer, text)[:-1])


def tokens_of(sampler, prompt, n=1, **params) -> list[list[int]]:
    result = sampler.sample(prompt, n, types.SamplingParams(**params)).result()
    return [s.tokens for s in result.sequences]


def test_the_same_seed_gives_the_same_tokens(sampler, tokenizer):
    prompt = prompt_of(tokenizer, "seeded")
    first = tokens_of(sampler, prompt, 3, max_tokens=20, seed=5)
    assert tokens_of(sampler, prompt, 3, max_tokens=20, seed=5) == first
    assert len({tuple(t) for t in first}) > 1  # each sample of a request draws its own stream
    assert tokens_of(sampler, prompt, 3, max_tokens=20, seed=6) != first


def test_top_k_1_is_greedy(sampler, tokenizer):
    prompt = prompt_of(tokenizer, "greedy")
    greedy = tokens_of(sampler, prompt, 1, max_tokens=20, temperature=0.0)
    assert tokens_of(sampler, prompt, 2, max_tokens=20, top_k=1, seed=1) == greedy * 2
    assert tokens_of(sampler, prompt, 1, max_tokens=20, top_p=1e-6, seed=2) == greedy


def test_a_stop_string_ends_the_sequence_and_is_kept(sampler, tokenizer):
    prompt = prompt_of(tokenizer, "stop here")
    params = types.SamplingParams(max_tokens=40, temperature=1.0, seed=3)  # a seeded row: same stream
    free = sampler.sample(prompt, 1, params).result().sequences[0]
    text = tokenizer.decode(free.tokens, skip_special_tokens=True)
    assert len(set(text[:12])) > 3, text  # varied enough that the stop string means something
    stop = text[6:8]
    expected = text[:text.index(stop) + len(stop)]
    stopped = sampler.sample(prompt, 1, params.model_copy(update={"stop": [stop, "never-seen"]}))
    seq = stopped.result().sequences[0]
    assert seq.stop_reason == "stop"
    assert tokenizer.decode(seq.tokens, skip_special_tokens=True) == expected
    assert seq.tokens == free.tokens[:len(seq.tokens)]
    assert seq.logprobs == free.logprobs[:len(seq.tokens)]


def test_prompt_logprobs_match_compute_logprobs_and_a_local_forward(sampler, tokenizer, reference):
    tokens = encode_line(tokenizer, "prompt logprobs, please")[:-1]
    k = 5
    result = sampler.sample(types.ModelInput.from_ints(tokens), 1,
                            types.SamplingParams(max_tokens=3, seed=0),
                            include_prompt_logprobs=True, topk_prompt_logprobs=k).result()
    scored = sampler.compute_logprobs(types.ModelInput.from_ints(tokens)).result()
    assert result.prompt_logprobs[0] is None and scored[0] is None
    # here and below: the same weights in other batches and passes (other summation orders), a few
    # ulps apart (~5e-7 each at |logprob| ~5); 1e-5 is 20 ulps
    assert max(abs(a - b) for a, b in zip(result.prompt_logprobs[1:], scored[1:])) < 1e-5

    with torch.no_grad():
        local_B_T_V = torch.log_softmax(reference(input_ids=torch.tensor([tokens])).logits.float(), -1)
    local = local_B_T_V[0, :-1].gather(-1, torch.tensor(tokens[1:])[:, None]).squeeze(-1)
    assert max(abs(a - b) for a, b in zip(result.prompt_logprobs[1:], local.tolist())) < 1e-5

    assert len(result.topk_prompt_logprobs) == len(tokens) and result.topk_prompt_logprobs[0] is None
    values, ids = local_B_T_V[0, :-1].topk(k, dim=-1)
    for position, row in enumerate(result.topk_prompt_logprobs[1:]):
        assert len(row) == k
        assert [i for i, _ in row] == ids[position].tolist()
        assert max(abs(v - e) for (_, v), e in zip(row, values[position].tolist())) < 1e-5


def test_scoring_only_the_last_tokens_of_many_sequences_at_once_matches_a_local_forward(
        sampler, tokenizer, reference):
    """Requests in flight together share one forward whose output head runs only where some request
    scores; each still gets its own last tokens' logprobs, NaN (None) before them."""
    lines = ["a short one", "a somewhat longer line to score at the end", "middle length here", "x y"]
    sequences = [encode_line(tokenizer, line) for line in lines]
    last = [2, None, 5, 1]
    futures = [sampler.compute_logprobs(types.ModelInput.from_ints(tokens), prompt_logprobs_last_n=n)
               for tokens, n in zip(sequences, last)]
    for tokens, n, future in zip(sequences, last, futures):
        scored = future.result()
        with torch.no_grad():
            local_T_V = torch.log_softmax(reference(input_ids=torch.tensor([tokens])).logits.float(), -1)[0]
        local = local_T_V[:-1].gather(-1, torch.tensor(tokens[1:])[:, None]).squeeze(-1).tolist()
        first = 1 if n is None else len(tokens) - n
        assert scored[:first] == [None] * first   # (then: other batches, a few ulps apart; 1e-5 is 20)
        assert max(abs(a - b) for a, b in zip(scored[first:], local[first - 1:])) < 1e-5

    # the same batch through the engine's forward directly: the head over positions 2.. only
    rows = [torch.tensor(tokens) for tokens in sequences]
    full = compute.sequence_logprobs(reference, rows, torch.device("cpu"), topk=3)
    tail_lengths = [2, 7, 5, 1]
    tails = compute.sequence_logprobs(reference, rows, torch.device("cpu"), topk=3, last_n=list(tail_lengths))
    for (logprobs_T, ids_T_K, _), (tail_T, tail_ids_T_K, tail_values_T_K), n in zip(
            full, tails, tail_lengths):
        assert ids_T_K is not None and tail_ids_T_K is not None and tail_values_T_K is not None
        assert torch.isnan(tail_T[:-n]).all() and torch.isnan(tail_values_T_K[:-n]).all()
        # the head over fewer rows (another GEMM shape): allclose's rtol 1e-5 (~80 ulps) + atol 1e-6
        assert torch.allclose(tail_T[-n:], logprobs_T[-n:], atol=1e-6)
        assert torch.equal(tail_ids_T_K[-n:], ids_T_K[-n:])


@pytest.mark.parametrize("prompt_len,max_tokens", [(CONTEXT - 3, 50), (CONTEXT - 1, 50), (CONTEXT - 6, None)])
def test_sampling_stops_at_the_context_length(sampler, prompt_len, max_tokens):
    prompt = types.ModelInput.from_ints([5 + i % 90 for i in range(prompt_len)])
    result = sampler.sample(prompt, 2, types.SamplingParams(max_tokens=max_tokens, temperature=0.0)).result()
    for seq in result.sequences:  # greedy on this prompt never says eos
        assert seq.stop_reason == "length"
        assert prompt_len + len(seq.tokens) == CONTEXT
