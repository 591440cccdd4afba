"""One full fine-tuning run on W=1 (in-process) and W=2 (FSDP2 workers): speed and memory per process.

    python scripts/bench_sharded.py                       # a 58M-parameter model, 4 steps of 2 x 64
    python scripts/bench_sharded.py --model stillroom/char-10m --steps 6

Starts `stillroom serve` in a child process (--workers 1, then 2; one torch thread per process),
drives one full run through the SDK and prints, per setting: training tokens/s, the time of a tiny
forward (the per-request hop: server -> rank 0 -> broadcast), the time of a save_state (gathering
the sharded weights and AdamW moments to rank 0), each process's private memory (RssAnon) before
the run and after its training steps, and its peak RSS (VmHWM) at the end. The default model is
the presets' Qwen3 shape made wider (built here, served with --model): on the 10M preset the
~200 MB every process spends on its first backward hides the run's own state. On CPU the W=2
workers share the same cores, so speed is not the point; memory per process is. Informational:
always exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

import stillroom
from stillroom import types
from stillroom_cookbook.rollouts import completion_datum


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", default=WIDE, help=f"a preset, or {WIDE} (built here)")
    parser.add_argument("--steps", type=int, default=4, help="timed forward_backward + optim_step rounds")
    parser.add_argument("--batch", type=int, default=2, help="sequences per forward_backward")
    parser.add_argument("--length", type=int, default=64, help="tokens per sequence")
    return parser.parse_args()


WIDE = "bench/char-58m"


def build_wide(directory: Path) -> Path:
    """A 58M-parameter Qwen3 model with the presets' character tokenizer, random weights."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from stillroom_server.engine.models.presets import CHARACTERS, SPECIAL_TOKENS, build_char_tokenizer

    config = Qwen3Config(vocab_size=len(SPECIAL_TOKENS) + len(CHARACTERS), hidden_size=1024,
                         intermediate_size=2816, num_hidden_layers=6, num_attention_heads=8,
                         num_key_value_heads=4, head_dim=128, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    target = directory / "wide-model"
    Qwen3ForCausalLM(config).save_pretrained(target)
    build_char_tokenizer().save_pretrained(target)
    return target


class Server:
    """`stillroom serve` in a child process (as cookbook's LocalServer, with --workers and --model)."""

    def __init__(self, data_dir: Path, workers: int, models: list[str]) -> None:
        ready = data_dir / "ready"
        self._log = open(data_dir / "server.log", "w")
        command = [sys.executable, "-m", "stillroom.cli", "serve", "--port", "0", "--data-dir", str(data_dir),
                   "--ready-file", str(ready), "--workers", str(workers), "--threads", "1"]
        for model in models:
            command += ["--model", model]
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        while not ready.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"the server did not start; see {data_dir / 'server.log'}")
            time.sleep(0.1)
        self.address = ready.read_text().splitlines()[0]
        self.api_key = (data_dir / "local_api_key").read_text().strip()
        self.pid = self.process.pid

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)
        self._log.close()


def _datum(tokens: list[int]) -> types.Datum:
    return completion_datum(tokens[:1], tokens[1:])  # next-token loss on every token after the first


def _processes(server: Server) -> list[tuple[str, psutil.Process]]:
    root = psutil.Process(server.pid)
    workers = [p for p in root.children(recursive=True) if "sharded.worker" in " ".join(p.cmdline())]
    return [("server", root)] + [(f"rank {i}", p) for i, p in enumerate(workers)]


def _mib(process: psutil.Process, field: str) -> float:
    """RssAnon (private memory now) or VmHWM (peak resident memory) of a process, in MiB."""
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def measure(workers: int, args: argparse.Namespace, models: list[str]) -> dict:
    data = [_datum([1, *[4 + (i * 7 + j * 13) % 90 for j in range(args.length)], 2])
            for i in range(args.batch)]
    tiny = [_datum([1, 40, 41, 42, 43, 44, 45, 2])]
    with tempfile.TemporaryDirectory() as directory:
        server = Server(Path(directory), workers, models)
        try:
            client = stillroom.ServiceClient(base_url=server.address, api_key=server.api_key)
            before = {name: _mib(p, "RssAnon") for name, p in _processes(server)}
            trainer = client.create_full_training_client(args.model, seed=0)
            adam = types.AdamParams(learning_rate=1e-4)
            trainer.forward_backward(data, "cross_entropy").result()   # warm: first-call costs
            trainer.optim_step(adam).result()
            began = time.perf_counter()
            for _ in range(args.steps):
                trainer.forward_backward(data, "cross_entropy")
                trainer.optim_step(adam).result()
            seconds = time.perf_counter() - began
            trained = {name: _mib(p, "RssAnon") for name, p in _processes(server)}
            hops = []
            for _ in range(10):
                start = time.perf_counter()
                trainer.forward(tiny, "cross_entropy").result()
                hops.append(time.perf_counter() - start)
            start = time.perf_counter()
            trainer.save_state("bench").result()
            save_seconds = time.perf_counter() - start
            memory = [(name, before[name], trained[name], _mib(p, "VmHWM")) for name, p in _processes(server)]
            client.close()
        finally:
            server.stop()
    return {"tokens_per_s": args.steps * args.batch * args.length / seconds,
            "tiny_ms": 1000 * statistics.median(hops), "save_s": save_seconds, "memory": memory}


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as directory:
        models = [f"{WIDE}={build_wide(Path(directory))}"] if args.model == WIDE else []
        results = {w: measure(w, args, models) for w in (1, 2)}
    print(f"\n{args.model}, full fine-tuning, {args.batch} x {args.length} tokens per step, "
          f"{args.steps} timed steps, {os.cpu_count()} CPU cores\n")
    print(f"{'W':>2} | {'tokens/s':>9} | {'tiny forward':>12} | {'save_state':>10} | process: private MiB "
          "before the run -> after its steps (peak RSS MiB, the save's gather included)")
    for workers, result in results.items():
        memory = ", ".join(f"{name} {start:.0f} -> {end:.0f} ({peak:.0f})"
                           for name, start, end, peak in result["memory"])
        print(f"{workers:>2} | {result['tokens_per_s']:>9.0f} | {result['tiny_ms']:>9.1f} ms | "
              f"{result['save_s']:>8.2f} s | {memory}")
    one, two = results[1], results[2]
    grown_one = max(end - start for _, start, end, _ in one["memory"])
    grown_two = max(end - start for name, start, end, _ in two["memory"] if name != "server")
    peak_one = max(peak for *_, peak in one["memory"])
    peak_two = max(peak for name, *_, peak in two["memory"] if name != "server")
    print(f"\nW=2 / W=1: tokens/s {two['tokens_per_s'] / one['tokens_per_s']:.2f}x; per-request hop "
          f"+{two['tiny_ms'] - one['tiny_ms']:.1f} ms; save_state {two['save_s'] / one['save_s']:.1f}x; "
          f"the run's private memory in the largest process {grown_two:.0f} / {grown_one:.0f} MiB = "
          f"{grown_two / grown_one:.2f}x; peak RSS {peak_two:.0f} / {peak_one:.0f} MiB = "
          f"{peak_two / peak_one:.2f}x")


if __name__ == "__main__":
    main()
