"""Evaluate a sampler on a task: greedy completions of problems, graded.

Knows the SDK's SamplingClient, a renderer and a task; it submits every problem's request before
waiting on any (the server batches concurrent calls on the same weights). It does not know how the
weights were trained.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import stillroom
from stillroom import types

from stillroom_cookbook.renderers import Renderer
from stillroom_cookbook.tasks import Problem, Task


@dataclasses.dataclass(frozen=True)
class EvalResult:
    accuracy: float
    mean_length: float       # completion tokens, stop token included
    completions: list[str]   # decoded, in problem order

    def as_metrics(self, prefix: str = "eval") -> dict[str, float]:
        return {f"{prefix}/accuracy": self.accuracy, f"{prefix}/mean_length": self.mean_length}


def evaluate(sampler: stillroom.SamplingClient, renderer: Renderer, task: Task,
             problems: Sequence[Problem], max_tokens: int) -> EvalResult:
    """Greedy (temperature 0) accuracy and mean completion length over `problems`."""
    params = types.SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=renderer.stop_tokens)
    futures = [sampler.sample(types.ModelInput.from_ints(renderer.prompt_tokens(p.prompt)), 1, params)
               for p in problems]
    sequences = [future.result().sequences[0] for future in futures]
    completions = [renderer.decode(seq.tokens) for seq in sequences]
    correct = [task.grade(p, text) for p, text in zip(problems, completions)]
    return EvalResult(accuracy=sum(correct) / len(problems),
                      mean_length=sum(len(s.tokens) for s in sequences) / len(problems),
                      completions=completions)


@dataclasses.dataclass(frozen=True)
class TaskEvaluator:
    """What the training loops call every `eval_every` steps: sampler -> metrics."""

    renderer: Renderer
    task: Task
    problems: Sequence[Problem]
    max_tokens: int
    prefix: str = "eval"

    def __call__(self, sampler: stillroom.SamplingClient) -> dict[str, float]:
        result = evaluate(sampler, self.renderer, self.task, self.problems, self.max_tokens)
        return result.as_metrics(self.prefix)
