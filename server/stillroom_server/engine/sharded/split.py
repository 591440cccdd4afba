"""Data parallelism for sharded runs: each rank runs its share of a forward_backward's datums.

Rank r takes datums r, r + W, r + 2W, ... in micro-batches; every rank runs as many micro-batches
as the busiest one (a rank with fewer runs its first datum again with its loss times zero), since
FSDP's collectives need every rank in every forward and backward. Gradients are summed over ranks
(FSDP's reduce-scatter with divide factor 1 for sharded weights; an all-reduce for LoRA adapters,
which every rank keeps whole), so they equal the whole batch's gradient; outputs and metrics are
gathered to every rank in datum order. Knows runs and collectives, not requests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from stillroom._metrics import merge_metrics
from stillroom_server.engine.adapters.lora import LoraRun
from stillroom_server.engine.training import MICROBATCH_TOKENS, TrainingRun, microbatches
from stillroom_server.engine.training.losses import get_loss
from stillroom_server.engine.types import ForwardBackwardResult, ForwardBackwardWork


def _add(a: list[torch.Tensor | None] | None, b: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    if a is None:
        return b
    return [y if x is None else (x if y is None else x.add_(y)) for x, y in zip(a, b)]


class SplitBatch(TrainingRun):
    """A mixin over a TrainingRun whose gradients are summed over the group (see the module)."""

    def forward_backward(self, work: ForwardBackwardWork,
                         teacher: Callable[[], torch.nn.Module] | None = None) -> ForwardBackwardResult:
        rank, world = dist.get_rank(), dist.get_world_size()
        loss_spec = get_loss(work.loss_fn)
        config = loss_spec.resolve_config(work.loss_fn_config)
        mine = list(range(rank, len(work.data), world))
        groups = microbatches([work.data[i] for i in mine], MICROBATCH_TOKENS) if mine else []
        steps = torch.tensor([len(groups)])
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)
        grads, outputs, parts = None, [], []
        for step in range(int(steps)):
            idle = step >= len(groups)
            batch = [work.data[0]] if idle else groups[step]
            loss, metrics, logprobs = self._batch_loss(self.activate(), batch, loss_spec, config, teacher,
                                                       work.forward_only)
            if not work.forward_only:
                grads = _add(grads, self._gradients(loss * 0 if idle else loss))
            if not idle:
                outputs.extend(logprobs)
                tokens = sum(r.shape[0] for r in logprobs)
                parts.append(({"loss:sum": float(loss.detach()), **metrics}, tokens))
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, (mine, outputs, parts))
        by_datum = {i: row for indices, rows, _ in everyone for i, row in zip(indices, rows)}
        all_parts = [part for _, _, rank_parts in everyone for part in rank_parts]
        if not work.forward_only:
            assert grads is not None  # validation refuses empty data
            self._collect(grads, sum(n for _, n in all_parts), work.part, work.num_parts)
        return ForwardBackwardResult([{"logprobs": by_datum[i]} for i in range(len(work.data))],
                                     merge_metrics(all_parts))


class ShardedLoraRun(SplitBatch, LoraRun):
    """A LoRA run whose adapter every rank keeps whole: its gradient is all-reduced (summed)."""

    def _gradients(self, loss: torch.Tensor) -> list[torch.Tensor | None]:
        grads = super()._gradients(loss)
        for grad in grads:
            if grad is not None:
                dist.all_reduce(grad)
        return grads
