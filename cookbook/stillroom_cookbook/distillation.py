"""On-policy distillation, as Tinker's cookbook does it: the student samples, the teacher grades
every token of what the student wrote, and the student moves toward the teacher's distribution.

Per step: `group_size` completions per prompt from the student's latest weights (temperature 1);
the teacher's `compute_logprobs` on each sampled sequence; per completion token the reverse-KL
estimate `student logprob - teacher logprob`, advantage `-kl_coef` times it; one
`importance_sampling` update. With `loss="teacher_reverse_kl"` the server instead computes the
exact reverse KL over the full vocabulary at the sampled positions (the server must offer it).
Knows the SDK and a renderer; it needs no reward and no answer key.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

from tqdm import tqdm

import stillroom
from stillroom import types

from stillroom_cookbook.metrics import MetricsLog
from stillroom_cookbook.renderers import Renderer
from stillroom_cookbook.rollouts import Rollout, completion_datum, importance_datum, sample_groups
from stillroom_cookbook.schedules import cycle_batches, linear_lr
from stillroom_cookbook.supervised import Evaluator, maybe_eval


@dataclasses.dataclass(frozen=True)
class DistillationConfig:
    steps: int
    learning_rate: float
    max_tokens: int
    groups_per_batch: int = 16
    group_size: int = 4
    kl_coef: float = 1.0
    loss: Literal["sampled", "teacher_reverse_kl"] = "sampled"
    warmup_steps: int = 0          # after SFT, Adam's moments lag the larger distillation gradients
    final_lr_fraction: float = 1.0
    eval_every: int = 0
    seed: int = 0
    name: str = "distill"

    def __post_init__(self) -> None:
        if self.loss not in ("sampled", "teacher_reverse_kl"):
            raise ValueError(f"DistillationConfig.loss: 'sampled' or 'teacher_reverse_kl', got {self.loss!r}")
        if self.steps < 0 or self.groups_per_batch < 1 or self.group_size < 1 or self.learning_rate <= 0:
            raise ValueError(f"DistillationConfig: need steps >= 0, groups_per_batch >= 1, "
                             f"group_size >= 1, learning_rate > 0; got {self}")


def reverse_kl_advantages(student_logprobs_T: Sequence[float], teacher_logprobs_T: Sequence[float],
                          kl_coef: float) -> list[float]:
    """Per token, -kl_coef * (student logprob - teacher logprob): push up where the teacher agrees."""
    return [-kl_coef * (s - t) for s, t in zip(student_logprobs_T, teacher_logprobs_T, strict=True)]


def teacher_step(trainer: stillroom.TrainingClient, teacher: stillroom.SamplingClient,
                 rollouts: list[Rollout], config: DistillationConfig):
    """Score the rollouts with the teacher and send the update; returns (forward future, teacher_kl)."""
    if config.loss == "teacher_reverse_kl":
        teacher_name = teacher.model_path or teacher.get_base_model()
        data = [completion_datum(r.prompt_tokens, r.tokens) for r in rollouts]
        return trainer.forward_backward(data, "teacher_reverse_kl", {"teacher": teacher_name}), None
    scores = [teacher.compute_logprobs(types.ModelInput.from_ints(r.all_tokens)) for r in rollouts]
    teacher_T = [s.result()[len(r.prompt_tokens):] for r, s in zip(rollouts, scores)]
    data = [importance_datum(r, reverse_kl_advantages(r.logprobs, t, config.kl_coef))
            for r, t in zip(rollouts, teacher_T)]
    kl = sum(s - t for r, ts in zip(rollouts, teacher_T) for s, t in zip(r.logprobs, ts))
    return trainer.forward_backward(data, "importance_sampling"), kl


def distill(trainer: stillroom.TrainingClient, teacher: stillroom.SamplingClient, renderer: Renderer,
            prompts: Sequence[str], config: DistillationConfig, log: MetricsLog,
            evaluator: Evaluator | None = None, progress: bool = True) -> MetricsLog:
    batches = cycle_batches(prompts, config.groups_per_batch, config.seed)
    bar = tqdm(range(config.steps), desc=config.name, unit="step", disable=not progress)
    for step in bar:
        student = trainer.save_weights_and_get_sampling_client(f"{config.name}-{step}")
        maybe_eval(trainer, evaluator, config, step, log, force=step == 0, sampler=student)
        groups = sample_groups(student, renderer, next(batches), config.group_size, config.max_tokens,
                               temperature=1.0, seed=(config.seed * 1000 + step) * 1000)
        rollouts = [r for group in groups for r in group]
        forward, kl = teacher_step(trainer, teacher, rollouts, config)
        lr = linear_lr(config.learning_rate, step, config.steps, config.warmup_steps,
                       config.final_lr_fraction)
        trainer.optim_step(types.AdamParams(learning_rate=lr))
        loss = forward.result().metrics["loss:sum"]
        tokens = sum(len(r.tokens) for r in rollouts)
        teacher_kl = (kl if kl is not None else loss) / tokens
        log.log(step, teacher_kl=teacher_kl, lr=lr, sampled_tokens=tokens,
                train_tokens=sum(len(r.all_tokens) - 1 for r in rollouts),
                teacher_tokens=sum(len(r.all_tokens) for r in rollouts))
        bar.set_postfix(teacher_kl=f"{teacher_kl:.3f}")
    maybe_eval(trainer, evaluator, config, config.steps, log, force=True)
    return log
