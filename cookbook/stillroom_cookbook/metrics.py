"""Run metrics: one JSON object per line per step in a file per run, read back and plotted.

Knows dicts of numbers and file paths only. Plotting imports matplotlib (the cookbook extra) on
first use and writes PNG files with the Agg back end, so it works without a display.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path


class MetricsLog:
    """Appends `{"step": ..., "time_s": ..., **metrics}` lines to `path` (created if missing)."""

    def __init__(self, path: Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self.records: list[dict] = []
        self._start = time.monotonic()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def log(self, step: int, **metrics: float) -> dict:
        record = {"step": step, "time_s": round(time.monotonic() - self._start, 3), **metrics}
        self.records.append(record)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        return record

    def last(self, key: str) -> float | None:
        """The latest value logged under `key`, or None if it was never logged."""
        return next((r[key] for r in reversed(self.records) if key in r), None)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_curves(curves: Mapping[str, Iterable[tuple[float, float]]], path: Path, *, title: str,
                xlabel: str, ylabel: str, hlines: Mapping[str, float] | None = None,
                logx: bool = False) -> Path:
    """One line per label through its (x, y) points, dashed horizontal references, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, points in curves.items():
        xs, ys = zip(*points) if points else ((), ())
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    for i, (label, y) in enumerate((hlines or {}).items()):
        ax.axhline(y, linestyle="--", color=f"C{len(curves) + i}", label=label)
    if logx:
        ax.set_xscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
