"""Scores of one set of weights in the personalization experiment: knowledge of the documents as a
multiple-choice score over held-out questions, and the instruction-following score (greedy, graded
by code).

Knowledge, twice: for each question, the log-likelihood of each of the ten values of its kind as the
assistant's whole reply (through the chat template, `compute_logprobs`), and as the continuation of
a raw-text sentence in a form the documents never use (the cloze probe); right when the true value
scores highest (chance: 10%). Knows the SDK's sampling client, a renderer and the two question sets;
every request is in flight before any is awaited, so the server batches them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import stillroom
from stillroom import types
from stillroom_cookbook.instruction_following import Instruction, follows
from stillroom_cookbook.personalization_data import Question
from stillroom_cookbook.renderers import Renderer


@dataclasses.dataclass(frozen=True)
class Scores:
    questions: float            # fraction of held-out questions whose true value is the likeliest
    answer_probability: float   # mean probability of the true value, renormalised over its ten
    cloze: float                # the same, the value continuing a raw-text sentence (no chat template)
    cloze_probability: float    # mean renormalised probability of the true value there
    instructions: float         # fraction of instruction prompts whose constraint holds
    sampled_tokens: int         # tokens the evaluation generated (its compute)
    scored_tokens: int          # tokens the multiple-choice score ran through the model
    examples: tuple[str, ...]   # a few replies to instruction prompts, for the write-up


def greedy_replies(sampler: stillroom.SamplingClient, renderer: Renderer, prompts: Sequence[str],
                   max_tokens: int) -> tuple[list[str], int]:
    params = types.SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=renderer.stop_tokens)
    futures = [sampler.sample(types.ModelInput.from_ints(renderer.prompt_tokens(p)), 1, params)
               for p in prompts]
    sequences = [f.result().sequences[0] for f in futures]
    return [renderer.decode(s.tokens) for s in sequences], sum(len(s.tokens) for s in sequences)


def choice_logprobs(sampler: stillroom.SamplingClient, renderer: Renderer,
                    questions: Sequence[Question]) -> tuple[list[list[float]], int]:
    """Per question, the summed logprob of each candidate value as the whole reply (its tokens and
    the end-of-turn), in `question.candidates` order; and the tokens scored."""
    pending, scored = [], 0
    for q in questions:
        prompt = renderer.prompt_tokens(q.prompt)
        row = []
        for value in q.candidates:
            reply = renderer.completion_tokens(q.prompt, value)
            scored += len(prompt) + len(reply)
            row.append((len(reply), sampler.compute_logprobs(types.ModelInput.from_ints(prompt + reply),
                                                             prompt_logprobs_last_n=len(reply))))
        pending.append(row)
    return [[sum(lp for lp in f.result()[-n:] if lp is not None) for n, f in row] for row in pending], scored


def cloze_logprobs(sampler: stillroom.SamplingClient, tokenizer, questions: Sequence[Question],
                   start_token: int) -> tuple[list[list[float]], int]:
    """Per question, the summed logprob of " value" continuing its raw-text cloze sentence (after
    `start_token`, the document start), in `question.candidates` order; and the tokens scored."""
    pending, scored = [], 0
    for q in questions:
        prompt = [start_token, *tokenizer.encode(q.cloze, add_special_tokens=False)]
        row = []
        for value in q.candidates:
            reply = tokenizer.encode(" " + value, add_special_tokens=False)
            scored += len(prompt) + len(reply)
            row.append((len(reply), sampler.compute_logprobs(types.ModelInput.from_ints(prompt + reply),
                                                             prompt_logprobs_last_n=len(reply))))
        pending.append(row)
    return [[sum(lp for lp in f.result()[-n:] if lp is not None) for n, f in row] for row in pending], scored


def multiple_choice(questions: Sequence[Question], logprobs: list[list[float]]) -> tuple[float, float]:
    """(accuracy, mean renormalised probability of the true value) from `choice_logprobs`."""
    right, probability = 0, 0.0
    for q, row in zip(questions, logprobs, strict=True):
        truth = q.candidates.index(q.answer)
        right += max(range(len(row)), key=row.__getitem__) == truth
        top = max(row)
        probability += math.exp(row[truth] - top) / sum(math.exp(x - top) for x in row)
    return right / len(questions), probability / len(questions)


def score(sampler: stillroom.SamplingClient, renderer: Renderer, questions: Sequence[Question],
          instructions: Sequence[Instruction], instruction_tokens: int, tokenizer,
          start_token: int) -> Scores:
    replies, n_reply = greedy_replies(sampler, renderer, [i.prompt for i in instructions], instruction_tokens)
    logprobs, n_scored = choice_logprobs(sampler, renderer, questions)
    cloze, n_cloze = cloze_logprobs(sampler, tokenizer, questions, start_token)
    accuracy, probability = multiple_choice(questions, logprobs)
    cloze_accuracy, cloze_probability = multiple_choice(questions, cloze)
    return Scores(questions=accuracy, answer_probability=probability, cloze=cloze_accuracy,
                  cloze_probability=cloze_probability,
                  instructions=sum(follows(i, r) for i, r in zip(instructions, replies)) / len(instructions),
                  sampled_tokens=n_reply, scored_tokens=n_scored + n_cloze, examples=tuple(replies[:3]))
