"""Scores of one set of weights in the personalization experiment: the held-out question score
(knowledge of the documents) and the instruction-following score, both greedy and graded by code.

Knows the SDK's sampling client, a renderer and the two question sets; every prompt's request is
in flight before any is awaited, so the server decodes them as one batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import stillroom
from stillroom import types
from stillroom_cookbook.instruction_following import Instruction, follows
from stillroom_cookbook.personalization_data import Question, grade_answer
from stillroom_cookbook.renderers import Renderer


@dataclasses.dataclass(frozen=True)
class Scores:
    questions: float            # fraction of held-out questions answered right
    instructions: float         # fraction of instruction prompts whose constraint holds
    sampled_tokens: int         # tokens the evaluation generated (its compute)
    examples: tuple[str, ...]   # a few replies to instruction prompts, for the write-up


def greedy_replies(sampler: stillroom.SamplingClient, renderer: Renderer, prompts: Sequence[str],
                   max_tokens: int) -> tuple[list[str], int]:
    params = types.SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=renderer.stop_tokens)
    futures = [sampler.sample(types.ModelInput.from_ints(renderer.prompt_tokens(p)), 1, params)
               for p in prompts]
    sequences = [f.result().sequences[0] for f in futures]
    return [renderer.decode(s.tokens) for s in sequences], sum(len(s.tokens) for s in sequences)


def score(sampler: stillroom.SamplingClient, renderer: Renderer, questions: Sequence[Question],
          instructions: Sequence[Instruction], question_tokens: int, instruction_tokens: int) -> Scores:
    answers, n_answer = greedy_replies(sampler, renderer, [q.prompt for q in questions], question_tokens)
    replies, n_reply = greedy_replies(sampler, renderer, [i.prompt for i in instructions], instruction_tokens)
    return Scores(questions=sum(grade_answer(q, a) for q, a in zip(questions, answers)) / len(questions),
                  instructions=sum(follows(i, r) for i, r in zip(instructions, replies)) / len(instructions),
                  sampled_tokens=n_answer + n_reply, examples=tuple(replies[:3]))
