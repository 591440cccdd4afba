"""What --batch-invariant costs, and what it buys: decoding and scoring with it off and on.

Engine-level, on the char presets, one torch thread (as the demo runs). For each model it times, in
alternating rounds (best and range of --rounds): the demo's evaluation (100 greedy prompts of
IteratedMapTask, 25 tokens each, submitted together), 128 seeded temperature-1 samples, and
compute_logprobs of 128 sequences of 40 tokens, in CPU-seconds of this process (one thread: what a
shared machine's load changes least); then counts the samples (of the first --alone) whose tokens
or logprobs differ bitwise between among all 128 and alone, with the mode off and on. A benchmark,
not a test: numbers move with the machine, the ratios are the point.

    python scripts/bench_batch_invariance.py [--models stillroom/char-1m stillroom/char-10m] [--rounds 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["stillroom/char-1m", "stillroom/char-10m"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--alone", type=int, default=32, help="samples also decoded alone (default 32)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from stillroom_cookbook.tasks import IteratedMapTask
    from stillroom_server.engine.engine import Engine

    engine = Engine(Path(tempfile.mkdtemp()))
    task = IteratedMapTask(steps=6)
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; best (range) of {args.rounds} alternating rounds")
    print("| model | work | off (CPU-s) | on (CPU-s) | on / off |\n|---|---|---|---|---|")
    for model in args.models:
        bench_model(engine, model, task, args.rounds, args.alone)


def bench_model(engine, model: str, task, rounds: int, alone: int) -> None:
    from stillroom_server.engine.types import LogprobsWork, SampleWork, SamplingConfig

    opened = engine.open_sampler(base_model=model)
    tokenizer = opened.base.tokenizer
    prompts = [torch.tensor([tokenizer.bos_token_id, *tokenizer.encode(p.prompt)])
               for p in task.problems(100, seed=2)]
    greedy = [SampleWork(p, 1, SamplingConfig(max_tokens=25, temperature=0.0)) for p in prompts]
    sampled = [SampleWork(prompts[i % 100], 1, SamplingConfig(max_tokens=25, seed=i)) for i in range(128)]
    scored = [LogprobsWork(torch.cat([p, p, p])[:40]) for p in prompts[:64] * 2]
    work: dict[str, Callable[[], object]] = {
        "100 greedy prompts x 25 tokens (the demo's evaluation)": partial(engine.sample, opened, greedy),
        "128 seeded samples x 25 tokens": partial(engine.sample, opened, sampled),
        "compute_logprobs, 128 x 40 tokens": partial(engine.compute_logprobs, opened, scored),
    }
    for name, run in work.items():
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(rounds):
            for invariant in (False, True):
                engine.batch_invariant = invariant
                started = time.process_time()
                run()
                times[invariant].append(time.process_time() - started)
        off, on = times[False], times[True]
        ratios = sorted(b / a for a, b in zip(off, on))
        print(f"| {model} | {name} | {min(off):.2f} ({min(off):.2f}-{max(off):.2f}) | "
              f"{min(on):.2f} ({min(on):.2f}-{max(on):.2f}) | {min(on) / min(off):.2f}x "
              f"(rounds {ratios[0]:.2f}-{ratios[-1]:.2f}) |", flush=True)
    for invariant in (False, True):   # the first `alone` of the 128, each also decoded by itself
        engine.batch_invariant = invariant
        together = [fingerprint(r) for r in engine.sample(opened, sampled)][:alone]
        apart = [fingerprint(engine.sample(opened, [w])[0]) for w in sampled[:alone]]
        tokens = sum(a[0] != b[0] for a, b in zip(together, apart))
        bits = sum(a != b for a, b in zip(together, apart))
        print(f"{model}, batch-invariant {'on' if invariant else 'off'}: of {alone} seeded samples, "
              f"{tokens} have other tokens and {bits} other tokens or logprobs (bitwise) among 128 "
              "than alone", flush=True)


def fingerprint(result) -> tuple[list[int], list[float]]:
    sequence = result.sequences[0]
    return list(sequence.tokens), list(sequence.logprobs)


if __name__ == "__main__":
    main()
