"""One full fine-tuning run on W=1 (in-process) and W=2 (FSDP2 workers): speed and memory per process.

    python scripts/bench_sharded.py                       # stillroom/char-10m, 6 steps of 8 x 128
    python scripts/bench_sharded.py --steps 3 --model stillroom/char-1m

Starts `stillroom serve` in a child process (STILLROOM_WORKERS=1, then 2; one torch thread per
process), drives one full run through the SDK and prints, per setting: training tokens/s, the
time of a tiny forward (the per-request hop: server -> rank 0 -> broadcast), the time of a
save_state (gathering the sharded weights and AdamW moments to rank 0), and each process's RSS
before the run and at its peak (VmHWM). On CPU the W=2 workers share the machine's cores, so speed
is not the point; the run's memory per process is. Informational: always exits 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import psutil

import stillroom
from stillroom import types
from stillroom_cookbook.local_server import LocalServer
from stillroom_cookbook.rollouts import completion_datum


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", default="stillroom/char-10m")
    parser.add_argument("--steps", type=int, default=6, help="timed forward_backward + optim_step rounds")
    parser.add_argument("--batch", type=int, default=8, help="sequences per forward_backward")
    parser.add_argument("--length", type=int, default=128, help="tokens per sequence")
    return parser.parse_args()


def _datum(tokens: list[int]) -> types.Datum:
    return completion_datum(tokens[:1], tokens[1:])  # next-token loss on every token after the first


def _processes(server: LocalServer) -> list[tuple[str, psutil.Process]]:
    root = psutil.Process(server.pid)
    workers = [p for p in root.children(recursive=True) if "sharded.worker" in " ".join(p.cmdline())]
    return [("server", root)] + [(f"rank {i}", p) for i, p in enumerate(workers)]


def _mib(process: psutil.Process, field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of a process, in MiB."""
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def measure(workers: int, args: argparse.Namespace) -> dict:
    os.environ["STILLROOM_WORKERS"] = str(workers)
    os.environ.setdefault("STILLROOM_THREADS", "1")
    data = [_datum([1, *[4 + (i * 7 + j * 13) % 90 for j in range(args.length)], 2])
            for i in range(args.batch)]
    tiny = [_datum([1, 40, 41, 42, 43, 44, 45, 2])]
    with tempfile.TemporaryDirectory() as directory, LocalServer(Path(directory)) as server:
        client = stillroom.ServiceClient(base_url=server.address, api_key=server.local_api_key)
        before = {name: _mib(p, "VmRSS") for name, p in _processes(server)}
        trainer = client.create_full_training_client(args.model, seed=0)
        adam = types.AdamParams(learning_rate=1e-4)
        trainer.forward_backward(data, "cross_entropy").result()   # warm: first-call costs
        trainer.optim_step(adam).result()
        began = time.perf_counter()
        for _ in range(args.steps):
            trainer.forward_backward(data, "cross_entropy")
            trainer.optim_step(adam).result()
        seconds = time.perf_counter() - began
        hops = []
        for _ in range(10):
            start = time.perf_counter()
            trainer.forward(tiny, "cross_entropy").result()
            hops.append(time.perf_counter() - start)
        start = time.perf_counter()
        trainer.save_state("bench").result()
        save_seconds = time.perf_counter() - start
        memory = [(name, before[name], _mib(p, "VmHWM")) for name, p in _processes(server)]
        client.close()
    return {"tokens_per_s": args.steps * args.batch * args.length / seconds,
            "tiny_ms": 1000 * statistics.median(hops), "save_s": save_seconds, "memory": memory}


def main() -> None:
    args = parse_args()
    results = {w: measure(w, args) for w in (1, 2)}
    print(f"\n{args.model}, full fine-tuning, {args.batch} x {args.length} tokens per step, "
          f"{args.steps} timed steps, {os.cpu_count()} CPU cores\n")
    print(f"{'W':>2} | {'tokens/s':>9} | {'tiny forward':>12} | {'save_state':>10} | process: RSS before run "
          "-> peak RSS (MiB)")
    for workers, result in results.items():
        memory = ", ".join(f"{name} {start:.0f} -> {peak:.0f}" for name, start, peak in result["memory"])
        print(f"{workers:>2} | {result['tokens_per_s']:>9.0f} | {result['tiny_ms']:>9.1f} ms | "
              f"{result['save_s']:>8.2f} s | {memory}")
    one, two = results[1], results[2]
    grown_one = max(peak - start for _, start, peak in one["memory"])
    grown_two = max(peak - start for name, start, peak in two["memory"] if name != "server")
    print(f"\nW=2 / W=1: tokens/s {two['tokens_per_s'] / one['tokens_per_s']:.2f}x; per-request hop "
          f"+{two['tiny_ms'] - one['tiny_ms']:.1f} ms; the run's memory in its largest process "
          f"{grown_two:.0f} / {grown_one:.0f} MiB = {grown_two / grown_one:.2f}x")


if __name__ == "__main__":
    main()
