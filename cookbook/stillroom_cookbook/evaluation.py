"""Evaluate a sampler on a task: greedy completions of problems, graded; and when a training loop
evaluates (`maybe_eval`).

Knows the SDK's clients, a renderer and a task; it submits every problem's request before waiting on
any (the server batches concurrent calls on the same weights). It does not know how the weights were
trained.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Protocol

import stillroom
from stillroom import types
from stillroom_cookbook.metrics import MetricsLog
from stillroom_cookbook.renderers import Renderer
from stillroom_cookbook.tasks import Problem, Task

Evaluator = Callable[[stillroom.SamplingClient], dict[str, float]]


class EvalSchedule(Protocol):
    """What `maybe_eval` reads of a loop's config."""

    @property
    def eval_every(self) -> int: ...

    @property
    def name(self) -> str: ...


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


def maybe_eval(trainer: stillroom.TrainingClient, evaluator: Evaluator | None, config: EvalSchedule,
               step: int, log: MetricsLog, force: bool = False,
               sampler: stillroom.SamplingClient | None = None) -> dict[str, float]:
    """Evaluate a snapshot after `step` steps when it is due (every `config.eval_every`) or forced."""
    due = force or (config.eval_every > 0 and step % config.eval_every == 0)
    if evaluator is None or not due:
        return {}
    sampler = sampler or trainer.save_weights_and_get_sampling_client(f"{config.name}-eval-{step}")
    metrics = evaluator(sampler)
    log.log(step, **metrics)
    return metrics
