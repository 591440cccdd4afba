"""How the metrics of a call's parts combine into the call's metrics, by the suffix of each name: a
`:sum` metric adds up, a `:mean` one is averaged weighted by each part's tokens, any other keeps the
last part's value. Pure Python, imported by the SDK (a split forward_backward) and by the server's
engine (micro-batches); it knows nothing of what the metrics measure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def merge_metrics(parts: Sequence[tuple[Mapping[str, float], int]]) -> dict[str, float]:
    """`parts` are (metrics, tokens) pairs in order; the names are the last part's."""
    total = max(sum(n for _, n in parts), 1)
    merged = {}
    for key in parts[-1][0]:
        values = [(metrics[key], n) for metrics, n in parts]
        if key.endswith(":sum"):
            merged[key] = sum(v for v, _ in values)
        elif key.endswith(":mean"):
            merged[key] = sum(v * n for v, n in values) / total
        else:
            merged[key] = values[-1][0]
    return merged
