"""Measure forward_backward throughput by micro-batch size, to choose training.MICROBATCH_TOKENS.

    python scripts/bench_microbatch.py                       # stillroom/char-10m, 64 x 512 tokens
    python scripts/bench_microbatch.py --threads 1 --sizes 1024,2048,4096,16384

Runs the engine in this process (no server): one LoRA run, the same 64 x 512-token
forward_backward at each micro-batch size, alternating sizes round by round (best of --rounds),
and prints tokens/s and the seconds one micro-batch takes (how long other work may wait behind
it). Informational: always exits 0.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from stillroom_server.engine import training
from stillroom_server.engine.engine import Engine, LoraSpec
from stillroom_server.engine.types import ForwardBackwardWork, TrainDatum


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", default="stillroom/char-10m")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sizes", default="1024,2048,4096,8192,16384")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine(Path(tempfile.mkdtemp(prefix="stillroom-microbatch-")))
    engine.create_run("run", args.model, LoraSpec(rank=16), seed=0)
    rng = random.Random(0)
    data = []
    for _ in range(args.batch):
        seq = torch.tensor([rng.randrange(4, 100) for _ in range(args.seq_len + 1)])
        data.append(TrainDatum(seq[:-1], {"target_tokens": seq[1:], "weights": torch.ones(args.seq_len)}))
    work = ForwardBackwardWork(data, "cross_entropy", {})
    sizes = [int(s) for s in args.sizes.split(",")]
    training.STEP_SECONDS = float("inf")  # sizes by tokens alone here
    best = {size: float("inf") for size in sizes}
    engine.forward_backward("run", ForwardBackwardWork(data[:2], "cross_entropy", {}))  # warm-up
    for _ in range(args.rounds):
        for size in sizes:
            training.MICROBATCH_TOKENS = size
            start = time.perf_counter()
            engine.forward_backward("run", work)
            best[size] = min(best[size], time.perf_counter() - start)
    tokens = args.batch * args.seq_len
    print(f"{args.model}, {args.batch}x{args.seq_len}, {args.threads} threads, best of {args.rounds}")
    print("micro-batch tokens | tokens/s | s per micro-batch")
    for size in sizes:
        passes = len(training.microbatches(data, size))
        print(f"{size:>18} | {tokens / best[size]:>8.0f} | {best[size] / passes:.3f}")


if __name__ == "__main__":
    main()
