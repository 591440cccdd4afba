"""Reinforcement learning with a reward function: groups of samples per prompt, advantages
centred within each group, one `importance_sampling` update per step on the sampler's logprobs.

Knows a TrainingClient, a renderer and a reward function over (problem, completion text); it does
not know what the reward means. Groups whose samples all score the same carry no signal and are
left out of the update.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from tqdm import tqdm

import stillroom
from stillroom import types

from stillroom_cookbook.metrics import MetricsLog
from stillroom_cookbook.renderers import Renderer
from stillroom_cookbook.rollouts import importance_datum, sample_groups
from stillroom_cookbook.schedules import cycle_batches, linear_lr
from stillroom_cookbook.supervised import Evaluator, maybe_eval
from stillroom_cookbook.tasks import Problem

RewardFn = Callable[[Problem, str], float]


@dataclasses.dataclass(frozen=True)
class RLConfig:
    steps: int
    learning_rate: float
    max_tokens: int
    groups_per_batch: int = 16
    group_size: int = 4
    temperature: float = 1.0
    warmup_steps: int = 0
    final_lr_fraction: float = 1.0   # constant learning rate unless lowered
    eval_every: int = 0
    seed: int = 0
    name: str = "rl"

    def __post_init__(self) -> None:
        if self.steps < 0 or self.groups_per_batch < 1 or self.group_size < 2 or self.learning_rate <= 0:
            raise ValueError(f"RLConfig: need steps >= 0, groups_per_batch >= 1, group_size >= 2, "
                             f"learning_rate > 0; got {self}")


def group_advantages(rewards: Sequence[float]) -> list[float]:
    """Each sample's reward minus its group's mean reward."""
    mean = sum(rewards) / len(rewards)
    return [r - mean for r in rewards]


def train_rl(trainer: stillroom.TrainingClient, renderer: Renderer, problems: Sequence[Problem],
             reward_fn: RewardFn, config: RLConfig, log: MetricsLog,
             evaluator: Evaluator | None = None, progress: bool = True) -> MetricsLog:
    batches = cycle_batches(problems, config.groups_per_batch, config.seed)
    for step in tqdm(range(config.steps), desc=config.name, unit="step", disable=not progress):
        sampler = trainer.save_weights_and_get_sampling_client(f"{config.name}-{step}")
        maybe_eval(trainer, evaluator, config, step, log, force=step == 0, sampler=sampler)
        batch = next(batches)
        groups = sample_groups(sampler, renderer, [p.prompt for p in batch], config.group_size,
                               config.max_tokens, config.temperature,
                               seed=(config.seed * 1000 + step) * 1000)
        data, rewards = [], []
        for problem, group in zip(batch, groups):
            group_rewards = [reward_fn(problem, renderer.decode(r.tokens)) for r in group]
            rewards += group_rewards
            data += [importance_datum(r, [a] * len(r.tokens))
                     for r, a in zip(group, group_advantages(group_rewards)) if a != 0.0]
        lr = linear_lr(config.learning_rate, step, config.steps, config.warmup_steps,
                       config.final_lr_fraction)
        if data:
            trainer.forward_backward(data, "importance_sampling")
            trainer.optim_step(types.AdamParams(learning_rate=lr)).result()
        log.log(step, reward=sum(rewards) / len(rewards), lr=lr, trained_sequences=len(data),
                train_tokens=sum(d.model_input.length for d in data),
                sampled_tokens=sum(len(r.tokens) for g in groups for r in g))
    maybe_eval(trainer, evaluator, config, config.steps, log, force=True)
    return log
