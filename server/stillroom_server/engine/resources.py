"""What the machine gives the engine: CPU threads for torch, and the memory it may fill.

`choose_threads` times a training-sized matmul with one thread and with every core and keeps the
faster (on a busy machine torch's default of every core was several times slower than one
thread). `memory_budget` reads the machine's memory; it knows nothing of what uses it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

MEMORY_FRACTION = 0.5   # of the memory available at start, for training runs kept in memory


def _matmul_seconds(threads: int, repeats: int = 3) -> float:
    """Best time of a [1024, 256] x [256, 512] matmul (a small model's layer on a micro-batch)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 256), torch.randn(256, 512)
    _ = a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        _ = a @ b
        best = min(best, time.perf_counter() - start)
    return best


def choose_threads(requested: int | None) -> tuple[int, str]:
    """Set torch's thread count: `requested`, else the faster of 1 and every core. Returns the
    count and how it was chosen (for the start-up log line)."""
    if requested is not None:
        torch.set_num_threads(requested)
        return requested, "as configured"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cores == 1 or torch.cuda.is_available():
        torch.set_num_threads(cores)
        return cores, "every core"
    one, every = _matmul_seconds(1), _matmul_seconds(cores)
    chosen = 1 if one <= every else cores
    torch.set_num_threads(chosen)
    return chosen, (f"measured: a matmul took {one * 1000:.1f} ms on 1 thread, "
                    f"{every * 1000:.1f} ms on {cores}")


def memory_budget() -> tuple[int, int]:
    """(total, available) bytes of the machine's memory (0, 0 where /proc/meminfo is missing)."""
    info = Path("/proc/meminfo")
    if not info.exists():
        return 0, 0
    fields = {}
    for line in info.read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = int(value.split()[0]) * 1024
    return fields.get("MemTotal", 0), fields.get("MemAvailable", 0)
