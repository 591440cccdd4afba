"""The head every on-policy loop shares (RL, distillation): a config, and a step generator that
snapshots the trainer's weights, evaluates when due, samples `group_size` completions of each prompt
in the next batch and works out the step's learning rate.

Knows the SDK, a renderer and prompts; it does not know how a group turns into an update (rewards in
rl.py, a teacher in distillation.py): the caller sends that for each step it is handed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

from tqdm import tqdm

import stillroom
from stillroom_cookbook.evaluation import Evaluator, maybe_eval
from stillroom_cookbook.metrics import MetricsLog
from stillroom_cookbook.renderers import Renderer
from stillroom_cookbook.rollouts import Rollout, sample_groups
from stillroom_cookbook.schedules import cycle_batches, linear_lr

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class OnPolicyConfig:
    steps: int
    learning_rate: float
    max_tokens: int                 # per sampled completion
    groups_per_batch: int = 16      # prompts per step
    group_size: int = 4             # completions per prompt
    warmup_steps: int = 0
    final_lr_fraction: float = 1.0  # constant learning rate unless lowered
    eval_every: int = 0             # 0: evaluate before the first step and after the last only
    seed: int = 0
    name: str = "on-policy"

    def __post_init__(self) -> None:
        if (self.steps < 0 or self.groups_per_batch < 1 or self.group_size < 1 or self.learning_rate <= 0
                or self.max_tokens < 1 or self.eval_every < 0):
            raise ValueError(f"{type(self).__name__}: need steps >= 0, groups_per_batch >= 1, "
                             f"group_size >= 1, learning_rate > 0, max_tokens >= 1, eval_every >= 0; "
                             f"got {self}")


@dataclasses.dataclass(frozen=True)
class OnPolicyStep(Generic[T]):
    step: int
    batch: list[T]                  # the batch's items, in the order of `groups`
    groups: list[list[Rollout]]     # `group_size` rollouts of each item's prompt
    lr: float
    bar: tqdm                       # the progress bar, for a caller's postfix

    @property
    def rollouts(self) -> list[Rollout]:
        return [r for group in self.groups for r in group]


def on_policy_steps(trainer: stillroom.TrainingClient, renderer: Renderer, items: Sequence[T],
                    prompt_of: Callable[[T], str], config: OnPolicyConfig, log: MetricsLog,
                    evaluator: Evaluator | None = None, progress: bool = True,
                    temperature: float = 1.0) -> Iterator[OnPolicyStep[T]]:
    """One OnPolicyStep per `config.steps`, sampled from the trainer's latest weights; the last
    evaluation runs once the caller has used every step."""
    batches = cycle_batches(items, config.groups_per_batch, config.seed)
    bar = tqdm(range(config.steps), desc=config.name, unit="step", disable=not progress)
    for step in bar:
        sampler = trainer.save_weights_and_get_sampling_client(f"{config.name}-{step}")
        maybe_eval(trainer, evaluator, config, step, log, force=step == 0, sampler=sampler)
        batch = next(batches)
        groups = sample_groups(sampler, renderer, [prompt_of(item) for item in batch], config.group_size,
                               config.max_tokens, temperature, seed=(config.seed * 1000 + step) * 1000)
        lr = linear_lr(config.learning_rate, step, config.steps, config.warmup_steps,
                       config.final_lr_fraction)
        yield OnPolicyStep(step, batch, groups, lr, bar)
    maybe_eval(trainer, evaluator, config, config.steps, log, force=True)
