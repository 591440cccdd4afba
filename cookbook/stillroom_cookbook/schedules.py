"""What a training loop uses at each step: the next batch of items and the learning rate.

Knows lists and numbers only: no tokens, models or server.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


def cycle_batches(items: Sequence[T], batch_size: int, seed: int) -> Iterator[list[T]]:
    """Endless batches of `batch_size` items: each pass over `items` in a fresh shuffled order."""
    if not 1 <= batch_size <= len(items):
        raise ValueError(f"batch_size must be between 1 and the {len(items)} items, got {batch_size}")
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            fresh = list(range(len(items)))
            rng.shuffle(fresh)
            order.extend(fresh)
        batch, order = order[:batch_size], order[batch_size:]
        yield [items[i] for i in batch]


def linear_lr(base_lr: float, step: int, steps: int, warmup_steps: int = 0,
              final_fraction: float = 0.0) -> float:
    """Linear warm-up over `warmup_steps`, then linear decay to `final_fraction * base_lr`."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return base_lr * (1.0 - (1.0 - final_fraction) * progress)
