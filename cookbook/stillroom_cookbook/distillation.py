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
from collections.abc import Callable, Sequence
from typing import Literal

import stillroom
from stillroom import types
from stillroom_cookbook.evaluation import Evaluator
from stillroom_cookbook.metrics import MetricsLog
from stillroom_cookbook.on_policy import OnPolicyConfig, on_policy_steps
from stillroom_cookbook.renderers import Renderer
from stillroom_cookbook.rollouts import Rollout, completion_datum, importance_datum


@dataclasses.dataclass(frozen=True)
class DistillationConfig(OnPolicyConfig):
    kl_coef: float = 1.0
    loss: Literal["sampled", "teacher_reverse_kl"] = "sampled"
    temperature: float = 1.0        # the student's sampling temperature; the exact loss only (it picks
                                    # the positions there, while the sampled estimate needs T=1 draws)
    name: str = "distill"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss not in ("sampled", "teacher_reverse_kl"):
            raise ValueError(f"DistillationConfig.loss: 'sampled' or 'teacher_reverse_kl', got {self.loss!r}")
        if self.temperature <= 0 or (self.loss == "sampled" and self.temperature != 1.0):
            raise ValueError(f"DistillationConfig.temperature: > 0, and 1.0 with the sampled estimate (its "
                             f"advantage is the student's own logprob of a draw), got {self.temperature}")


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
    # only a sequence's first token has no logprob; a dropped one would fail the strict zip below
    teacher_T = [[lp for lp in s.result()[len(r.prompt_tokens):] if lp is not None]
                 for r, s in zip(rollouts, scores)]
    data = [importance_datum(r, reverse_kl_advantages(r.logprobs, t, config.kl_coef))
            for r, t in zip(rollouts, teacher_T)]
    kl = sum(s - t for r, ts in zip(rollouts, teacher_T) for s, t in zip(r.logprobs, ts))
    return trainer.forward_backward(data, "importance_sampling"), kl


def distill(trainer: stillroom.TrainingClient, teacher: stillroom.SamplingClient, renderer: Renderer,
            prompts: Sequence[str], config: DistillationConfig, log: MetricsLog,
            evaluator: Evaluator | None = None, progress: bool = True,
            before_optim: Callable[[int], None] | None = None) -> MetricsLog:
    """The student samples at `config.temperature` (1 unless the exact loss asks otherwise: the
    sampled estimate assumes its own distribution). `before_optim(step)`, if given, runs after the
    step's distillation forward_backward and before its optim_step: more forward_backward calls
    there add their gradients to the same update (e.g. replayed data)."""
    for s in on_policy_steps(trainer, renderer, prompts, lambda p: p, config, log, evaluator, progress,
                             config.temperature):
        rollouts = s.rollouts
        forward, kl = teacher_step(trainer, teacher, rollouts, config)
        if before_optim is not None:
            before_optim(s.step)
        trainer.optim_step(types.AdamParams(learning_rate=s.lr))
        loss = forward.result().metrics["loss:sum"]
        tokens = sum(len(r.tokens) for r in rollouts)
        teacher_kl = (kl if kl is not None else loss) / tokens
        log.log(s.step, teacher_kl=teacher_kl, lr=s.lr, sampled_tokens=tokens,
                train_tokens=sum(len(r.all_tokens) - 1 for r in rollouts),
                teacher_tokens=sum(len(r.all_tokens) for r in rollouts))
        s.bar.set_postfix(teacher_kl=f"{teacher_kl:.3f}")
    return log
