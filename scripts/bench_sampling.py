"""Sampling at the speed on-policy distillation needs (issue 24): one run prints every target.

    bash scripts/setup_real_model.sh && python scripts/bench_sampling.py [--rounds 3]

In this process, on one torch thread (the engine's own samplers, as the server's scheduler steps
them: `Engine.sample` -> `DecodeStream`), each measure interleaved with its baseline round by round
(baseline, before, after, baseline, ...), so drifting load from other jobs on the machine hits all
alike. Time is the process's CPU time (`time.process_time`, one thread); wall time is printed
beside it. Ranges are min-max over the rounds; ratios are taken within a round, then min-max.

1. memory bandwidth (a 1 GiB fp32 sum) and fp32 matmul throughput, and from them the bound of an
   SmolLM2 decode step: its linears read every weight once per step (538 MB in fp32);
2. SmolLM2-135M-Instruct, 8 x 64 and 64 x 64 from a chat prompt, and stillroom/char-10m 8 x 64:
   returned tokens/s of Stillroom after (decode_step.py's step, joined q/k/v and gate/up) and before
   (the model's own forward per step; prepacked linears in both), and of Hugging Face `generate`
   (do_sample, temperature 1, exactly 64 new tokens) on the same weights; for char-10m also
   `generate` stopping at EOS as Stillroom's rows do (a random-weight model samples EOS often);
3. teacher `compute_logprobs` over 64 x 256 tokens on SmolLM2 (the LogprobStream's batching),
   against a bare forward of the same sequences in the same 8192-token chunks;
4. an on-policy distillation step: a SmolLM2 LoRA student samples 64 x 64 from its snapshot, the
   SmolLM2 teacher scores them (compute_logprobs), the student trains on them
   (importance_sampling with the teacher's logprobs as advantages, then optim_step): before and
   after (decode_step off / on), with each part's share.

Prints numbers and PASS/BELOW per target; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from stillroom_server.engine.engine import Engine, LoraSpec
from stillroom_server.engine.kernels import packed_linear
from stillroom_server.engine.runtime.scheduler import Job
from stillroom_server.engine.sampling import decode_step
from stillroom_server.engine.sampling.batching import LogprobStream, run_to_end
from stillroom_server.engine.types import (
    AdamConfig,
    ForwardBackwardWork,
    LogprobsWork,
    OptimWork,
    SampleWork,
    SamplingConfig,
    TrainDatum,
)

NAME = "smollm2-135m-instruct"
CHAR = "stillroom/char-10m"
CHAT = "Write a long story about a cat who learns to sail."


@dataclasses.dataclass
class Timing:
    cpu: float
    wall: float
    tokens: int = 0      # returned tokens
    positions: int = 0   # rows x decode steps (the longest row's tokens): the work a batch did

    @property
    def rate(self) -> float:
        return self.tokens / self.cpu


def measured(fn: Callable[[], int | tuple[int, int]]) -> Timing:
    cpu, wall = time.process_time(), time.perf_counter()
    counts = fn()
    tokens, positions = counts if isinstance(counts, tuple) else (counts, counts)
    return Timing(time.process_time() - cpu, time.perf_counter() - wall, tokens, positions)


def span(values: list[float], fmt: str = ".1f") -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def verdict(value: float, target: float) -> str:
    return "PASS" if value >= target else "BELOW"


# ------------------------------------------------------------------------------------ bounds

def bounds() -> tuple[float, float]:
    """(bytes/s of a 1 GiB fp32 sum, fp32 FLOP/s of a 1024-cubed matmul), best of 5 by CPU time."""
    x = torch.ones(1 << 28)
    sums = [measured(lambda: int(x.sum() > 0)).cpu for _ in range(5)]
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    mms = [measured(lambda: int((a @ b).shape[0])).cpu for _ in range(5)]
    return x.nbytes / min(sums), 2 * 1024**3 / min(mms)


# ------------------------------------------------------------------------------------ sampling

def chat_prompt(tokenizer) -> list[int]:
    ids: Any = tokenizer.apply_chat_template([{"role": "user", "content": CHAT}], add_generation_prompt=True,
                                             tokenize=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])


def stillroom_sampler(engine: Engine, opened, prompt: list[int], rows: int, tokens: int, fast: bool,
                      compiled: bool = False):
    """`fast`: the decode step of decode_step.py with joined q/k/v and gate/up (round 2); else the
    model's own forward per step (packed linears on in both). `compiled`: that step as one
    `torch.compile`d graph where it applies (small models, round 3; STILLROOM_COMPILE_DECODE=1)."""
    seeds = iter(range(10**6))

    def run() -> tuple[int, int]:
        decode_step.set_enabled(fast)
        before = decode_step.set_compiled(compiled)
        try:
            work = SampleWork(torch.tensor(prompt), rows, SamplingConfig(max_tokens=tokens, seed=next(seeds)))
            lengths = [len(s.tokens) for s in engine.sample(opened, [work])[0].sequences]
            return sum(lengths), rows * max(lengths)
        finally:
            decode_step.set_enabled(True)
            decode_step.set_compiled(before)
    return run


def hf_sampler(directory: Path, prompt: list[int], rows: int, tokens: int, pad: int,
               eos: tuple[int, ...] | None = None):
    """HF `generate`, do_sample at temperature 1 over the whole vocabulary. `eos` None: exactly
    `tokens` new tokens per row (min_new_tokens: EOS suppressed, every row returns `tokens`); else
    rows stop at these ids as Stillroom's do, and a row returns its tokens up to its first EOS
    (generate keeps decoding a finished row, padded, until every row is done)."""
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    input_ids = torch.tensor([prompt]).repeat(rows, 1)
    kwargs: dict[str, Any] = dict(attention_mask=torch.ones_like(input_ids), do_sample=True, temperature=1.0,
                                  top_k=0, top_p=1.0, max_new_tokens=tokens, pad_token_id=pad)
    if eos is None:
        kwargs["min_new_tokens"] = tokens
    else:
        kwargs["eos_token_id"] = list(eos)

    def run() -> tuple[int, int]:
        new = model.generate(input_ids, **kwargs)[:, input_ids.shape[1]:]
        if eos is None:
            return int(new.numel()), int(new.numel())
        returned = 0
        for row in new.tolist():
            ends = [i for i, token in enumerate(row) if token in eos]
            returned += ends[0] + 1 if ends else len(row)
        return returned, int(new.numel())
    return run


def compare_sampling(label: str, runs: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[Timing]]:
    for name, run in runs.items():   # warm-up (weights packed, allocator, HF's first call, compiling)
        warm = measured(run)
        for _ in range(2 if name.startswith("Stillroom") else 0):   # compiling: rows down to one (the
            # same count for every Stillroom run, so round r samples with the same seed in each)
            warm.cpu += measured(run).cpu
        if "compiled" in name:
            print(f"  {name}: warm-up with compiling {warm.cpu:.1f} cpu-s ({warm.wall:.1f} s wall), "
                  "once per process (inductor's cache on disk makes a later process's shorter)")
    timings: dict[str, list[Timing]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            timings[name].append(measured(run))
    hf = timings["HF generate"]
    like = timings.get("HF generate, stops at EOS")
    print(f"\n{label}: returned tokens per CPU-second (wall tokens/s), median (min-max) of {rounds}")
    for name, values in timings.items():
        print(f"  {name:28s} {span([t.rate for t in values])} tokens/cpu-s   "
              f"wall {span([t.tokens / t.wall for t in values])} tokens/s   "
              f"returned {span([t.tokens / t.positions for t in values], '.0%')} of rows x steps")
    for name in [name for name in timings if name.startswith("Stillroom")]:
        ratios = [s.rate / h.rate for s, h in zip(timings[name], hf)]
        wall = [(s.tokens / s.wall) / (h.tokens / h.wall) for s, h in zip(timings[name], hf)]
        positions = [(s.positions / s.cpu) / (h.positions / h.cpu) for s, h in zip(timings[name], hf)]
        print(f"  {name} / HF generate: {span(ratios, '.2f')} by CPU time, {span(wall, '.2f')} by wall; "
              f"rows x steps per CPU-second: {span(positions, '.2f')}")
        if like is not None:
            print(f"  {name} / HF generate stopping at EOS (the same samples' distribution): "
                  f"{span([s.rate / h.rate for s, h in zip(timings[name], like)], '.2f')} by CPU time")
    return timings


def ratios(timings: dict[str, list[Timing]], baseline: str = "HF generate",
           name: str = "Stillroom after") -> list[float]:
    return [s.rate / h.rate for s, h in zip(timings[name], timings[baseline])]


# ------------------------------------------------------------------------------------ scoring

def scoring(engine: Engine, opened, rows: int, length: int, rounds: int) -> list[float]:
    generator = torch.Generator().manual_seed(0)
    vocab = opened.base.vocab_size
    sequences = [torch.randint(0, vocab, (length,), generator=generator) for _ in range(rows)]
    module = opened.base.module
    chunk = max(1, 8192 // length)   # the LogprobStream's batches (LOGPROB_TOKENS)

    def stillroom() -> int:
        jobs = [Job(kind="compute_logprobs", run=None, done=lambda r, e: None,
                    payload=(opened, LogprobsWork(seq))) for seq in sequences]
        done = run_to_end(LogprobStream(engine), jobs)
        assert all(outcome[2] is None for outcome in done.values())
        return rows * length

    def bare() -> int:
        with torch.inference_mode():
            for start in range(0, rows, chunk):
                module(input_ids=torch.stack(sequences[start:start + chunk]), use_cache=False)
        return rows * length

    ratios = []
    for _ in range(rounds):
        base, ours = measured(bare), measured(stillroom)
        ratios.append(base.cpu / ours.cpu)
        print(f"  round: bare forward {base.cpu:.1f} cpu-s ({base.wall:.1f} wall), "
              f"compute_logprobs {ours.cpu:.1f} cpu-s ({ours.wall:.1f} wall)")
    return ratios


# ------------------------------------------------------------------------------------ OPD step

def opd_step(engine: Engine, run_id: str, prompt: list[int], rows: int, tokens: int, step: int,
             packed: bool) -> dict[str, Timing]:
    """`packed` (kept name): after = this round's decode step on; before = the model's forward."""
    decode_step.set_enabled(packed)
    try:
        parts: dict[str, Timing] = {}
        uri, _ = engine.save_sampler_weights(run_id, f"opd-{step}-{int(packed)}")
        student = engine.open_sampler(model_path=uri)
        teacher = engine.open_sampler(base_model=NAME)
        sequences: list = []

        def sample() -> int:
            work = SampleWork(torch.tensor(prompt), rows, SamplingConfig(max_tokens=tokens, seed=step,
                                                                         temperature=0.7))
            sequences.extend(engine.sample(student, [work])[0].sequences)
            return sum(len(s.tokens) for s in sequences)

        scored: list[torch.Tensor] = []

        def score() -> int:
            works = [LogprobsWork(torch.tensor(prompt + s.tokens), last_n=len(s.tokens)) for s in sequences]
            jobs = [Job(kind="compute_logprobs", run=None, done=lambda r, e: None, payload=(teacher, work))
                    for work in works]
            done = run_to_end(LogprobStream(engine), jobs)
            scored.extend(done[id(job)][1].logprobs_T for job in jobs)
            return sum(len(s.tokens) for s in sequences)

        def train() -> int:
            data = []
            for seq, teacher_T in zip(sequences, scored):
                tokens_T = torch.tensor(prompt + seq.tokens)
                n, p = tokens_T.shape[0] - 1, len(prompt) - 1
                logprobs, advantages = torch.zeros(n), torch.zeros(n)
                logprobs[p:] = torch.tensor(seq.logprobs)
                advantages[p:] = teacher_T[p + 1:] - logprobs[p:]   # the reverse KL's per-token reward
                data.append(TrainDatum(tokens_T[:-1], {"target_tokens": tokens_T[1:], "logprobs": logprobs,
                                                       "advantages": advantages}))
            engine.forward_backward(run_id, ForwardBackwardWork(data, "importance_sampling", {}))
            engine.optim_step(run_id, OptimWork(AdamConfig(1e-5, 0.9, 0.95, 1e-8, 0.0, 0.0)))
            return sum(d.tokens_T.shape[0] for d in data)

        parts["sampling"] = measured(sample)
        parts["teacher scoring"] = measured(score)
        parts["training"] = measured(train)
        return parts
    finally:
        decode_step.set_enabled(True)


# ------------------------------------------------------------------------------------ main

def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path(os.environ.get(
        "STILLROOM_MODELS_CACHE", ".stillroom/imported")) / NAME)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--score-rows", type=int, default=64)
    parser.add_argument("--score-length", type=int, default=256)
    parser.add_argument("--opd-steps", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["sampling", "smol8", "smol64", "char", "scoring", "opd"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, {os.cpu_count()} cores, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}, "
          f"packed linears available: {packed_linear.AVAILABLE}")
    engine = Engine(Path(tempfile.mkdtemp()), local_models={NAME: args.model_dir.resolve()})
    smol = engine.open_sampler(base_model=NAME)
    module = smol.base.module
    linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    weight_bytes = sum(m.weight.nbytes for m in linears)
    params_per_token = sum(m.weight.numel() for m in linears)
    bandwidth, flops = bounds()
    print(f"\nbandwidth (1 GiB fp32 sum, 1 thread, best of 5 by CPU time): {bandwidth / 1e9:.1f} GB/s; "
          f"fp32 matmul 1024^3: {flops / 1e9:.0f} GFLOP/s")
    print(f"SmolLM2 decode step: {len(linears)} linears, "
          f"{weight_bytes / 1e6:.0f} MB of fp32 weights read per step, "
          f"{2 * params_per_token / 1e6:.0f} MFLOP per row")

    def bound(rows: int) -> tuple[float, float]:
        """tokens/s bounds of an fp32 SmolLM2 step of `rows` rows: weights streamed once at the
        measured bandwidth, and the linears' FLOPs at the measured matmul rate."""
        return rows * bandwidth / weight_bytes, flops / (2 * params_per_token)

    prompt = chat_prompt(smol.base.tokenizer)
    pad = int(smol.base.tokenizer.pad_token_id or 0)  # pyright: ignore[reportArgumentType]
    results = {}
    if "sampling" not in args.skip:
        for rows in [rows for rows in (8, 64) if f"smol{rows}" not in args.skip]:
            runs = {"HF generate": hf_sampler(args.model_dir, prompt, rows, args.tokens, pad),
                    "Stillroom before": stillroom_sampler(engine, smol, prompt, rows, args.tokens, False),
                    "Stillroom after": stillroom_sampler(engine, smol, prompt, rows, args.tokens, True)}
            timings = compare_sampling(f"SmolLM2 {rows} x {args.tokens}, chat prompt of {len(prompt)} tokens",
                                       runs, args.rounds)
            memory, compute = bound(rows)
            after = [t.rate for t in timings["Stillroom after"]]
            print(f"  bound: {memory:.0f} tokens/s by bandwidth, {compute:.0f} by fp32 matmul FLOPs; after = "
                  f"{span([r / memory for r in after], '.2f')} of the bandwidth bound, "
                  f"{span([r / min(memory, compute) for r in after], '.2f')} of the lower of the two")
            results[f"smol{rows}"] = ratios(timings)
    if "char" not in args.skip:
        char = engine.open_sampler(base_model=CHAR)
        char_prompt = char.base.tokenizer.encode("Once upon a time, ")
        runs = {"HF generate": hf_sampler(engine.models.resolve(CHAR), char_prompt, 8, args.tokens, 0),
                "HF generate, stops at EOS": hf_sampler(engine.models.resolve(CHAR), char_prompt, 8,
                                                        args.tokens, 0, char.base.eos_token_ids),
                "Stillroom before": stillroom_sampler(engine, char, char_prompt, 8, args.tokens, False),
                "Stillroom after": stillroom_sampler(engine, char, char_prompt, 8, args.tokens, True),
                "Stillroom after, compiled": stillroom_sampler(engine, char, char_prompt, 8, args.tokens,
                                                               True, compiled=True)}
        timings = compare_sampling(f"char-10m 8 x {args.tokens}", runs, args.rounds)
        results["char8"] = ratios(timings)
        results["char8eos"] = ratios(timings, "HF generate, stops at EOS")
        results["char8eos_compiled"] = ratios(timings, "HF generate, stops at EOS",
                                              "Stillroom after, compiled")
        print(f"  compiled / eager step (returned tokens per CPU-second): "
              f"{span(ratios(timings, 'Stillroom after', 'Stillroom after, compiled'), '.2f')}")
    if "scoring" not in args.skip:
        print(f"\nteacher compute_logprobs over {args.score_rows} x {args.score_length} on SmolLM2, "
              "x a bare forward (CPU time; same 8192-token chunks)")
        results["scoring"] = scoring(engine, smol, args.score_rows, args.score_length,
                                     max(1, args.rounds - 1))
    if "opd" not in args.skip:
        print(f"\nOPD step: SmolLM2 LoRA r32 student samples {args.score_rows} x {args.tokens} "
              "(temperature 0.7), "
              "the SmolLM2 teacher scores them, the student trains (importance_sampling + optim_step)")
        engine.create_run("opd", NAME, LoraSpec(rank=32), seed=0)
        steps: dict[bool, list[dict[str, Timing]]] = {False: [], True: []}
        opd_step(engine, "opd", prompt, 8, 8, 0, True)   # warm-up
        for step in range(args.opd_steps):
            for packed in (False, True):
                steps[packed].append(opd_step(engine, "opd", prompt, args.score_rows, args.tokens,
                                              step + 1, packed))
        for packed in (False, True):
            totals = [sum(t.cpu for t in parts.values()) for parts in steps[packed]]
            shares = "  ".join(
                f"{name} {span([p[name].cpu / total for p, total in zip(steps[packed], totals)], '.0%')}"
                f" ({span([p[name].cpu for p in steps[packed]])} s)" for name in steps[packed][0])
            print(f"  {'after ' if packed else 'before'}: {span(totals)} cpu-s per step; {shares}")
        results["opd"] = [b / a for b, a in zip([sum(t.cpu for t in p.values()) for p in steps[False]],
                                                [sum(t.cpu for t in p.values()) for p in steps[True]])]
        print(f"  step speed-up after / before: {span(results['opd'], '.2f')}")
    print("\n| target | measured (median, min-max) | verdict |\n|---|---|---|")
    for key, label, target in [("smol8", "SmolLM2 8 x 64, x HF generate", 1.5),
                               ("smol64", "SmolLM2 64 x 64, x HF generate", 1.5),
                               ("char8", "char-10m 8 x 64, x HF generate (EOS suppressed)", 1.5),
                               ("char8eos", "char-10m 8 x 64, x HF generate stopping at EOS", 1.5),
                               ("char8eos_compiled", "char-10m 8 x 64 compiled step, x HF generate stopping "
                                                     "at EOS", 1.5),
                               ("scoring", "compute_logprobs 64 x 256, x bare forward", 0.95)]:
        if key in results:
            print(f"| {label} >= {target} | {span(results[key], '.2f')} | "
                  f"{verdict(statistics.median(results[key]), target)} |")


if __name__ == "__main__":
    main()
