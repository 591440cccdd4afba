"""Fuzz both wires of a real `stillroom serve` for longer than the test lane does (issue 25).

    .venv/bin/python scripts/fuzz_wires.py --examples 2000
    .venv/bin/python scripts/fuzz_wires.py --minutes 30 --seed 7

Starts a server on a throw-away data dir, makes owner B's runs, checkpoints and sampler and owner
A's, then sends hypothesis-generated requests as A over HTTP and gRPC in rounds (tests/wire_fuzz.py
says what is generated and what is checked). After every round: the server alive and healthy, B's
weights, checkpoints and sequence numbers unchanged. Prints each problem with the request that
caused it, the counts of requests sent, and exits 1 if anything broke. The default test lane runs a
bounded version of this (tests/test_fuzz_wires.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import seed as hypothesis_seed  # noqa: E402

from wire_fuzz import Fuzzer, FuzzServer, Generators  # noqa: E402


def fuzz_round(fuzzer: Fuzzer, generators: Generators, examples: int, seed: int) -> None:
    config = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),  # pyright: ignore[reportArgumentType]
    )

    @hypothesis_seed(seed)
    @config
    @given(case=generators.http_cases())
    def http(case) -> None:
        fuzzer.send_http(case)

    @hypothesis_seed(seed)
    @config
    @given(call=generators.grpc_calls())
    def grpc(call) -> None:
        fuzzer.send_grpc(*call)

    http()
    grpc()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=500, help="examples per wire per round (default 500)")
    parser.add_argument(
        "--minutes",
        type=float,
        default=0.0,
        help="keep going in rounds until this many minutes have passed (default: one round)",
    )
    parser.add_argument("--seed", type=int, default=0, help="the first round's seed; each round adds 1")
    parser.add_argument(
        "--routes", action="store_true", help="print the count of answers by route and status"
    )
    parser.add_argument("--data-dir", type=Path, help="the server's data dir (default: a temporary one)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="stillroom-fuzz-") as scratch:
        data_dir = args.data_dir or Path(scratch)
        data_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        server = FuzzServer(data_dir)
        fuzzer = Fuzzer(server)
        try:
            generators = Generators(fuzzer.setup())
            round_seed = args.seed
            while True:
                fuzz_round(fuzzer, generators, args.examples, round_seed)
                final = fuzzer.final_problems()
                fuzzer.problems += final
                print(
                    f"round seed {round_seed}: {fuzzer.summary()}; "
                    f"{len(fuzzer.problems)} problems so far ({time.monotonic() - started:.0f} s)",
                    flush=True,
                )
                round_seed += 1
                if not server.alive() or time.monotonic() - started > args.minutes * 60:
                    break
        finally:
            fuzzer.close()
            server.stop()
        if args.routes:
            for route, count in sorted(fuzzer.routes.items()):
                print(f"{count:6d}  {route}")
        for problem in fuzzer.problems:
            print(problem)
        print(
            f"fuzz_wires: {fuzzer.summary()} in {time.monotonic() - started:.0f} s; "
            f"{len(fuzzer.problems)} problems; server log {server.log_path if args.data_dir else '(removed)'}"
        )
        return 1 if fuzzer.problems else 0


if __name__ == "__main__":
    sys.exit(main())
