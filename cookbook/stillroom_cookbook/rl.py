"""Reinforcement learning with a reward function: groups of samples per prompt, advantages
centred within each group, one `importance_sampling` update per step on the sampler's logprobs.

Knows a TrainingClient, a renderer and a reward function over (problem, completion text); it does
not know what the reward means. Groups whose samples all score the same carry no signal and are
left out of the update.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import stillroom
from stillroom import types
from stillroom_cookbook.evaluation import Evaluator
from stillroom_cookbook.metrics import MetricsLog
from stillroom_cookbook.on_policy import OnPolicyConfig, on_policy_steps
from stillroom_cookbook.renderers import Renderer
from stillroom_cookbook.rollouts import importance_datum
from stillroom_cookbook.tasks import Problem

RewardFn = Callable[[Problem, str], float]


@dataclasses.dataclass(frozen=True)
class RLConfig(OnPolicyConfig):
    temperature: float = 1.0
    name: str = "rl"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_size < 2:
            raise ValueError(f"RLConfig.group_size: need >= 2 (advantages are relative to the group), "
                             f"got {self.group_size}")


def group_advantages(rewards: Sequence[float]) -> list[float]:
    """Each sample's reward minus its group's mean reward."""
    mean = sum(rewards) / len(rewards)
    return [r - mean for r in rewards]


def train_rl(trainer: stillroom.TrainingClient, renderer: Renderer, problems: Sequence[Problem],
             reward_fn: RewardFn, config: RLConfig, log: MetricsLog,
             evaluator: Evaluator | None = None, progress: bool = True) -> MetricsLog:
    for s in on_policy_steps(trainer, renderer, problems, lambda p: p.prompt, config, log, evaluator,
                             progress, temperature=config.temperature):
        data, rewards = [], []
        for problem, group in zip(s.batch, s.groups):
            group_rewards = [reward_fn(problem, renderer.decode(r.tokens)) for r in group]
            rewards += group_rewards
            data += [importance_datum(r, [a] * len(r.tokens))
                     for r, a in zip(group, group_advantages(group_rewards)) if a != 0.0]
        if data:
            trainer.forward_backward(data, "importance_sampling")
            trainer.optim_step(types.AdamParams(learning_rate=s.lr)).result()
        log.log(s.step, reward=sum(rewards) / len(rewards), lr=s.lr, trained_sequences=len(data),
                train_tokens=sum(d.model_input.length for d in data),
                sampled_tokens=sum(len(r.tokens) for r in s.rollouts))
    return log
