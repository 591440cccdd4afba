"""What the machine gives the engine: CPU threads for torch, and the memory it may fill.

`choose_threads` sets torch's thread count by a fixed rule: one thread on a machine of up to
SMALL_MACHINE cores, every core above. It used to time a matmul on one thread and on every core and
keep the faster, but that choice followed the machine's load at the moment (a busy start of the
2-core VM chose 1, a quiet one 2), and the thread count changes the float order of matmuls, so a
restart could change every result. `memory_budget` reads the machine's memory; it knows nothing of
what uses it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

MEMORY_FRACTION = 0.5   # of the memory available at start, for training runs kept in memory
# Up to this many cores, one thread: on the 2-core VM, shared with other jobs, every core was often
# several times slower than one thread (the reason the server used to measure both).
SMALL_MACHINE = 4


def choose_threads(requested: int | None) -> tuple[int, str]:
    """Set torch's thread count: `requested`, else 1 up to SMALL_MACHINE cores, else every core (the
    same on every start of one machine, whatever its load). Returns the count and how it was chosen
    (for the start-up log line)."""
    if requested is not None:
        torch.set_num_threads(requested)
        return requested, "as configured"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    chosen = cores if cores > SMALL_MACHINE or torch.cuda.is_available() else 1
    torch.set_num_threads(chosen)
    return chosen, (f"{cores} cores: " + ("every core" if chosen == cores and cores > 1 else "one thread")
                    + f" by default (up to {SMALL_MACHINE} cores one; --threads sets it)")


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
