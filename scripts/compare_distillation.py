"""Reproduce the on-policy distillation paper's comparison at CPU scale and write it into docs/.

    python scripts/compare_distillation.py [--data-dir .stillroom] [--seeds 0 1 2] [--steps 60]
        [--lr rl=1e-4 ...] [--methods rl] [--docs-dir /tmp/sweep]   # a sweep point: one method, one rate

Starts a server, reuses (or trains) the demo's teacher, then runs SFT on teacher samples, RL with a
correctness reward, on-policy distillation and (when the server offers it) the exact
`teacher_reverse_kl` from the same student start, for every seed; writes
docs/distillation_comparison.md and its two plots. See stillroom_cookbook.recipes.comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

import stillroom
from stillroom_cookbook.local_server import LocalServer
from stillroom_cookbook.recipes.comparison import METHODS, ComparisonConfig, run_comparison

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    defaults = ComparisonConfig()
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path(".stillroom"))
    parser.add_argument("--docs-dir", type=Path, default=ROOT / "docs")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(defaults.seeds))
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(defaults.methods))
    parser.add_argument("--lr", nargs="+", default=[], metavar="METHOD=LR",
                        help="a method's own learning rate, e.g. rl=3e-4 (others: the demo's 1e-3)")
    args = parser.parse_args()
    rates = []
    for item in args.lr:
        method, sep, value = item.partition("=")
        if not sep or method not in METHODS:
            parser.error(f"--lr expects METHOD=LR with METHOD one of {sorted(METHODS)}, got {item!r}")
        rates.append((method, float(value)))
    config = dataclasses.replace(defaults, seeds=tuple(args.seeds), steps=args.steps,
                                 eval_every=args.eval_every, methods=tuple(args.methods),
                                 learning_rates=tuple(rates))
    command = "python scripts/compare_distillation.py " + shlex.join(sys.argv[1:])
    # as the demo: one thread, batch-invariant sampling, so a rerun gives the same table
    with LocalServer(args.data_dir, threads=1, batch_invariant=True) as server:
        with stillroom.ServiceClient(base_url=server.address) as service:
            table = run_comparison(service, config, args.data_dir / "cookbook" / "comparison",
                                   args.data_dir / "cookbook", args.docs_dir, command.strip())
    print(table)


if __name__ == "__main__":
    main()
