"""The segmented LoRA matmul of segment_matmul.c: built on first use with the machine's C compiler into a
cache folder (STILLROOM_KERNEL_CACHE, default ~/.cache/stillroom/kernels; one file per source, compiler
and CPU) and called through ctypes. `available()` is False where there is no compiler, the build fails
or STILLROOM_LORA_KERNEL=0, and callers then use torch's batched matmuls. CPU, fp32, one thread; knows
nothing of adapters or batches (mixed_lora.py decides when it serves).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("segment_matmul.c")
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC")
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Segments:
    """Row ranges [begin, end) of a batch, each multiplied by the stack entry `group`."""

    begin: tuple[int, ...]
    end: tuple[int, ...]
    group: tuple[int, ...]

    @functools.cached_property
    def _arrays(self) -> tuple[ctypes.Array, ctypes.Array, ctypes.Array]:
        count = len(self.begin)
        return ((ctypes.c_long * count)(*self.begin), (ctypes.c_long * count)(*self.end),
                (ctypes.c_long * count)(*self.group))

    @functools.cached_property
    def longest(self) -> int:
        return max((e - b for b, e in zip(self.begin, self.end)), default=0)

    @functools.cached_property
    def bounds(self) -> tuple[int, int]:
        """(rows the segments reach, stack entries they use): what `matmul` checks on every call."""
        return max(self.end, default=0), max(self.group, default=-1) + 1


def available() -> bool:
    return _library() is not None


def matmul(x: torch.Tensor, stack: torch.Tensor, segments: Segments, out: torch.Tensor,
           accumulate: bool) -> None:
    """out[rows] = x[rows] @ stack[group] (or +=) for each segment. x [N, K] and out [N, M]: fp32 CPU
    rows with unit column stride (any row stride); stack [G, K, M] contiguous fp32."""
    library = _library()
    assert library is not None, "segment_kernel.matmul called where available() is False"
    groups, k, m = stack.shape
    rows, used = segments.bounds
    if not (x.dtype == stack.dtype == out.dtype == torch.float32 and stack.is_contiguous()
            and x.stride(-1) == 1 and out.stride(-1) == 1 and x.shape[-1] == k and out.shape[-1] == m
            and x.shape[0] == out.shape[0] >= rows and used <= groups):
        raise ValueError(f"segment_kernel.matmul: x {tuple(x.shape)} {x.dtype}, stack {tuple(stack.shape)} "
                         f"{stack.dtype}, out {tuple(out.shape)} {out.dtype} do not fit")
    begin, end, group = segments._arrays
    library.segment_matmul(x.data_ptr(), x.stride(0), stack.data_ptr(), k, m, begin, end, group,
                           len(segments.begin), out.data_ptr(), out.stride(0), int(accumulate))


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("STILLROOM_LORA_KERNEL", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler found: mixed-adapter batches use torch's batched matmuls")
        return None
    try:
        path = _build(compiler)
        library = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as error:
        log.warning("the segmented LoRA kernel did not build (%s): mixed-adapter batches use torch's "
                    "batched matmuls", error)
        return None
    library.segment_matmul.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_long,
                                       ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                       ctypes.c_long, ctypes.c_void_p, ctypes.c_long, ctypes.c_int]
    library.segment_matmul.restype = None
    return library


def _build(compiler: str) -> Path:
    """The compiled library, from the cache or compiled now (to a temporary name, then renamed, so
    servers starting together never load a half-written file)."""
    source = SOURCE.read_bytes()
    machine = " ".join([compiler, *FLAGS, platform.machine(), _cpu_flags()])
    key = hashlib.sha256(source + machine.encode()).hexdigest()[:16]
    default = Path.home() / ".cache" / "stillroom" / "kernels"
    folder = Path(os.environ.get("STILLROOM_KERNEL_CACHE") or default)
    target = folder / f"segment_matmul-{key}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    descriptor, staging = tempfile.mkstemp(dir=folder, suffix=".so")
    os.close(descriptor)
    try:
        done = subprocess.run([compiler, *FLAGS, "-o", staging, str(SOURCE)], capture_output=True, text=True,
                              timeout=120)
        if done.returncode:
            raise subprocess.SubprocessError(f"{compiler} exited {done.returncode}: "
                                             f"{done.stderr.strip()[:500]}")
        os.replace(staging, target)
    finally:
        Path(staging).unlink(missing_ok=True)
    log.info("built the segmented LoRA kernel: %s", target)
    return target


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux), so a cache folder shared by different machines keeps a build
    per instruction set (-march=native)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()
