"""Supervised fine-tuning: prompt/completion pairs, loss on the completion only, through the SDK.

Knows a TrainingClient, a renderer and text pairs; batches them, schedules the learning rate,
keeps one step in flight while the next batch is built, and calls an evaluator on sampler
snapshots. It does not know where the pairs came from (a task's worked answers, a teacher's samples).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from tqdm import tqdm

import stillroom
from stillroom import types
from stillroom_cookbook.evaluation import Evaluator, maybe_eval
from stillroom_cookbook.metrics import MetricsLog
from stillroom_cookbook.renderers import Renderer
from stillroom_cookbook.rollouts import completion_datum
from stillroom_cookbook.schedules import cycle_batches, linear_lr


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    steps: int
    learning_rate: float
    batch_size: int = 32
    warmup_steps: int = 0
    final_lr_fraction: float = 0.1
    eval_every: int = 0          # 0: evaluate before the first step and after the last only
    stop_at_accuracy: float | None = None   # end early at the first evaluation at or above it
    seed: int = 0
    name: str = "sft"

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.learning_rate <= 0 or self.eval_every < 0:
            raise ValueError(f"SFTConfig: need steps >= 0, batch_size >= 1, learning_rate > 0, "
                             f"eval_every >= 0; got {self}")


def sft_datum(renderer: Renderer, prompt: str, completion: str) -> types.Datum:
    return completion_datum(renderer.prompt_tokens(prompt), renderer.completion_tokens(prompt, completion))


def train_sft(trainer: stillroom.TrainingClient, renderer: Renderer,
              examples: Sequence[tuple[str, str]], config: SFTConfig, log: MetricsLog,
              evaluator: Evaluator | None = None, progress: bool = True) -> MetricsLog:
    """`config.steps` steps of cross_entropy on the completions of `examples` (prompt, completion),
    or fewer when an evaluation reaches `config.stop_at_accuracy`."""
    batches = cycle_batches(examples, config.batch_size, config.seed)
    maybe_eval(trainer, evaluator, config, 0, log, force=True)
    pending = None
    bar = tqdm(total=config.steps, desc=config.name, unit="step", disable=not progress)
    for step in range(config.steps):
        data = [sft_datum(renderer, prompt, completion) for prompt, completion in next(batches)]
        lr = linear_lr(config.learning_rate, step, config.steps, config.warmup_steps,
                       config.final_lr_fraction)
        forward = trainer.forward_backward(data, "cross_entropy")
        trainer.optim_step(types.AdamParams(learning_rate=lr))
        if pending is not None:
            _log_step(log, bar, *pending)
        pending = (step, forward, lr, sum(sum(d.loss_fn_inputs["weights"].data) for d in data),
                   sum(d.model_input.length for d in data))
        metrics = maybe_eval(trainer, evaluator, config, step + 1, log, force=step + 1 == config.steps)
        bar.update(1)
        accuracy = metrics.get("eval/accuracy", -1.0)
        if config.stop_at_accuracy is not None and accuracy >= config.stop_at_accuracy:
            bar.set_description(f"{config.name}: {accuracy:.0%} right after step {step + 1}, target "
                                f"{config.stop_at_accuracy:.0%} reached, stopped")
            break
    if pending is not None:
        _log_step(log, bar, *pending)
    bar.close()
    return log


def _log_step(log: MetricsLog, bar, step: int, forward, lr: float, completion_tokens: float,
              train_tokens: int) -> None:
    loss = forward.result().metrics["loss:sum"] / completion_tokens
    log.log(step, loss=loss, lr=lr, train_tokens=train_tokens)
    bar.set_postfix(loss=f"{loss:.3f}")

