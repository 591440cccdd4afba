"""Measure what LoRA tenancy costs in server memory: many LoRA runs share one base model.

    python scripts/bench_lora_memory.py                  # 10 runs of rank 32 on stillroom/char-10m
    python scripts/bench_lora_memory.py --runs 20 --rank 8

Starts `stillroom serve` in a child process (so the numbers are the server's alone) and reads its
resident memory (VmRSS in /proc/<pid>/status) at three points, after the base model is loaded:

    base    the base model loaded, no run on it yet (after a one-step warm-up on a tiny other
            model, so that one-time process costs are not charged to the first run)
    one     after 1 LoRA run has done one forward_backward + optim_step
    many    after N LoRA runs have each done one step

and prints the increase over `base` for each, and

    ratio = (many - base) / (one - base)

the memory of N runs over the memory of one. Sharing the base makes it small (target < 1.5 for
N = 10: the first run pays for the shared PEFT host and the step's working memory; each further
run adds only its adapter and AdamW moments). For scale it also prints what one *full* run
(a private copy of the model) adds. RSS includes allocator slack, so treat it as approximate.
Informational: always exits 0.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import stillroom
from stillroom import types
from stillroom_cookbook.local_server import LocalServer

MODEL = "stillroom/char-10m"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc status")


def settled_rss(pid: int) -> float:
    time.sleep(0.5)
    return rss_mb(pid)


def one_step(trainer: stillroom.TrainingClient, batch: int, seq_len: int) -> None:
    tokens = [4 + (i * 7) % 90 for i in range(seq_len + 1)]
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * seq_len})
    trainer.forward_backward([datum] * batch, "cross_entropy")
    trainer.optim_step(types.AdamParams(learning_rate=1e-4)).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--warmup-model", default="stillroom/char-1m",
                        help="train one step of a tiny LoRA run on this model before `base`, so "
                             "the process's one-time costs (torch's backward code paged in, thread "
                             "pools) are not charged to the first run; '' to skip")
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="stillroom-bench-memory-"))
    with LocalServer(data_dir) as server, stillroom.ServiceClient(base_url=server.address) as client:
        pid = server.pid
        client._load_tokenizer(MODEL)  # loads the base model into the server
        cold = settled_rss(pid)
        if args.warmup_model:  # page in torch's training code without touching MODEL's memory
            one_step(client.create_lora_training_client(args.warmup_model, rank=4, seed=0), 1, 16)
        base = settled_rss(pid)
        runs = [client.create_lora_training_client(MODEL, rank=args.rank, seed=0)]
        one_step(runs[0], args.batch, args.seq_len)
        one = settled_rss(pid)
        for _ in range(args.runs - 1):
            runs.append(client.create_lora_training_client(MODEL, rank=args.rank, seed=0))
            one_step(runs[-1], args.batch, args.seq_len)
        many = settled_rss(pid)
        adapter_params = runs[0].get_info().num_trainable_params
        full = client.create_full_training_client(MODEL, seed=0)
        one_step(full, args.batch, args.seq_len)
        with_full = settled_rss(pid)
        full_params = full.get_info().num_trainable_params

    one_inc, many_inc = one - base, many - base
    print(f"model {MODEL}, LoRA rank {args.rank} ({adapter_params:,} trainable parameters per run; "
          f"full run {full_params:,}), step {args.batch}x{args.seq_len} tokens")
    print(f"server RSS, base model loaded:          {cold:8.1f} MB")
    print(f"  after a warm-up step on {args.warmup_model or '(none)'}: {base:8.1f} MB  (= base)")
    print(f"after 1 LoRA run + 1 step:              {one:8.1f} MB  (+{one_inc:.1f} MB)")
    print(f"after {args.runs} LoRA runs + 1 step each:     {many:8.1f} MB  (+{many_inc:.1f} MB)")
    print(f"each further LoRA run:                  {(many - one) / max(args.runs - 1, 1):8.2f} MB")
    print(f"  (its adapter + 2 AdamW moments in fp32 alone: {adapter_params * 12 / 2**20:.2f} MB)")
    print(f"then 1 full run + 1 step adds:          {with_full - many:8.1f} MB")
    ratio = many_inc / one_inc if one_inc > 0 else float("nan")
    verdict = "PASS" if ratio < 1.5 else "ABOVE"
    print(f"ratio ({args.runs} LoRA runs / 1 LoRA run, increase over base): {ratio:.2f}  "
          f"(target < 1.5: {verdict})")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
