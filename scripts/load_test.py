"""Load test: many concurrent SDK clients mixing training and sampling against one server.

    python scripts/load_test.py                       # 32 clients for 120 s on stillroom/char-1m
    python scripts/load_test.py --clients 48 --seconds 300

Starts `stillroom serve` as a child process on a loopback port (127.0.0.1 only), runs a bounded
number of clients for a bounded time, and prints per-call latency percentiles, call counts and
failures. Every client has its own ServiceClient (its own connection); trainers run LoRA
forward_backward + optim_step, samplers alternate sample and compute_logprobs. Not a test: its
numbers go in the docs.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import tempfile
import threading
import time
from pathlib import Path

import stillroom
from stillroom import types
from stillroom_cookbook.local_server import LocalServer

MODEL = "stillroom/char-1m"


class Recorder:
    def __init__(self) -> None:
        self.latencies: dict[str, list[float]] = collections.defaultdict(list)
        self.failures: dict[str, list[str]] = collections.defaultdict(list)
        self._lock = threading.Lock()

    def time(self, name: str, call) -> None:
        start = time.perf_counter()
        try:
            call()
        except Exception as error:  # noqa: BLE001 - every failure is reported
            with self._lock:
                self.failures[name].append(f"{type(error).__name__}: {error}")
            return
        with self._lock:
            self.latencies[name].append((time.perf_counter() - start) * 1000)


def trainer_loop(address: str, index: int, deadline: float, record: Recorder) -> None:
    with stillroom.ServiceClient(base_url=address) as service:
        trainer = service.create_lora_training_client(MODEL, rank=8, seed=index)
        tokens = [1] + [4 + (index * 7 + i) % 90 for i in range(64)] + [2]
        datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                            loss_fn_inputs={"target_tokens": tokens[1:],
                                            "weights": [1.0] * (len(tokens) - 1)})
        while time.monotonic() < deadline:
            record.time("forward_backward",
                        lambda: trainer.forward_backward([datum] * 4, "cross_entropy").result())
            record.time("optim_step",
                        lambda: trainer.optim_step(types.AdamParams(learning_rate=1e-4)).result())
            record.time("get_info", trainer.get_info)


def sampler_loop(address: str, index: int, deadline: float, record: Recorder) -> None:
    with stillroom.ServiceClient(base_url=address) as service:
        sampler = service.create_sampling_client(base_model=MODEL)
        prompt = types.ModelInput.from_ints([1] + [4 + (index + i) % 90 for i in range(16)])
        params = types.SamplingParams(max_tokens=32, temperature=1.0)
        while time.monotonic() < deadline:
            record.time("sample", lambda: sampler.sample(prompt, 4, params).result())
            record.time("compute_logprobs", lambda: sampler.compute_logprobs(prompt).result())


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--trainers", type=int, default=8, help="how many of the clients train")
    parser.add_argument("--seconds", type=float, default=120.0)
    args = parser.parse_args()
    record = Recorder()
    with tempfile.TemporaryDirectory() as data_dir, LocalServer(Path(data_dir)) as server:
        deadline = time.monotonic() + args.seconds
        threads = [threading.Thread(target=trainer_loop if i < args.trainers else sampler_loop,
                                    args=(server.address, i, deadline, record)) for i in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=args.seconds + 600)
    print(f"{args.clients} clients ({args.trainers} training, {args.clients - args.trainers} sampling), "
          f"{args.seconds:.0f} s, {MODEL}")
    print(f"{'call':18} {'count':>6} {'failed':>6} {'p50 ms':>9} {'p99 ms':>9}")
    for name in sorted(set(record.latencies) | set(record.failures)):
        values = record.latencies[name]
        p50, p99 = (percentile(values, 50), percentile(values, 99)) if values else (float("nan"),) * 2
        print(f"{name:18} {len(values):6d} {len(record.failures[name]):6d} {p50:9.1f} {p99:9.1f}")
    for name, errors in record.failures.items():
        if errors:
            print(f"{name} failures, first: {errors[0]}")


if __name__ == "__main__":
    main()
