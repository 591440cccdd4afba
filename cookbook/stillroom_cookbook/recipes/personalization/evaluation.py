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
import re
from collections import Counter
from collections.abc import Sequence

import stillroom
from stillroom import types
from stillroom_cookbook.instruction_following import Instruction, follows
from stillroom_cookbook.recipes.personalization.data import Question
from stillroom_cookbook.renderers import Renderer


@dataclasses.dataclass(frozen=True)
class Scores:
    questions: float | None     # fraction of held-out questions whose true value is the likeliest as
                                # the chat reply (None: not measured)
    answer_probability: float | None   # mean probability of the true value there, renormalised over its ten
    cloze: float                # the same, the value continuing a raw-text sentence (no chat template)
    cloze_probability: float    # mean renormalised probability of the true value there
    instructions: float         # fraction of instruction prompts whose constraint holds
    instruction_kinds: dict[str, float]   # the same per constraint kind
    looping: float              # fraction of those replies that loop (a word 3-gram three times or more)
    instructions_sampled: float | None  # the instruction score of replies sampled at temperature 1 (the
                                 # distribution on-policy distillation trains), SAMPLED_REPLIES a prompt
                                 # (None: not measured)
    sampled_tokens: int         # tokens the evaluation generated (its compute)
    scored_tokens: int          # tokens the multiple-choice score ran through the model
    examples: tuple[str, ...]   # a few replies to instruction prompts, for the write-up


SAMPLED_REPLIES = 1


def sampled_replies(sampler: stillroom.SamplingClient, renderer: Renderer, prompts: Sequence[str],
                    max_tokens: int, samples: int = SAMPLED_REPLIES) -> list[list[str]]:
    """`samples` replies to each prompt at temperature 1, seeded (the same draws for the same weights)."""
    futures = [sampler.sample(types.ModelInput.from_ints(renderer.prompt_tokens(p)), samples,
                              types.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=7919 + i,
                                                   stop=renderer.stop_tokens))
               for i, p in enumerate(prompts)]
    return [[renderer.decode(s.tokens) for s in f.result().sequences] for f in futures]


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


def loops(reply: str) -> bool:
    """Whether a reply repeats itself: some sequence of three words occurs three times or more."""
    words = re.findall(r"[a-z0-9']+", reply.lower())
    return any(count >= 3 for count in Counter(zip(words, words[1:], words[2:])).values())


def score(sampler: stillroom.SamplingClient, renderer: Renderer, questions: Sequence[Question],
          instructions: Sequence[Instruction], instruction_tokens: int, tokenizer,
          start_token: int, chat_questions: bool = True, sampled: bool = True) -> Scores:
    """Every score of `sampler`'s weights; the chat questions only with `chat_questions`, the
    temperature-1 instruction replies only with `sampled` (each as dear as the greedy replies)."""
    prompts = [i.prompt for i in instructions]
    replies, n_reply = greedy_replies(sampler, renderer, prompts, instruction_tokens)
    drawn = sampled_replies(sampler, renderer, prompts, instruction_tokens) if sampled else None
    accuracy = probability = None
    n_scored = 0
    if chat_questions:
        logprobs, n_scored = choice_logprobs(sampler, renderer, questions)
        accuracy, probability = multiple_choice(questions, logprobs)
    cloze, n_cloze = cloze_logprobs(sampler, tokenizer, questions, start_token)
    cloze_accuracy, cloze_probability = multiple_choice(questions, cloze)
    held = [(i.kind, follows(i, r)) for i, r in zip(instructions, replies)]
    kinds = {kind: [ok for k, ok in held if k == kind] for kind, _ in held}
    return Scores(questions=accuracy, answer_probability=probability, cloze=cloze_accuracy,
                  cloze_probability=cloze_probability, instructions=sum(ok for _, ok in held) / len(held),
                  instruction_kinds={kind: sum(oks) / len(oks) for kind, oks in kinds.items()},
                  looping=sum(map(loops, replies)) / len(replies),
                  instructions_sampled=None if drawn is None else (
                      sum(follows(i, r) for i, group in zip(instructions, drawn) for r in group)
                      / sum(map(len, drawn))),
                  sampled_tokens=n_reply, scored_tokens=n_scored + n_cloze, examples=tuple(replies[:3]))
