"""Measure the link between the server and an engine process (engine/process/link.py).

    python scripts/bench_link.py [--calls 2000] [--megabytes 64]

An echo process answers each message; this process times, for each transport:
1. the round trip of a small message (a submit of a 128-token forward and its `done`), median µs;
2. a message holding one large tensor (forward_backward data of --megabytes), one way and back,
   through the socket itself and through /dev/shm (the link's `local` mode), in ms and GB/s.
Transports: TCP on loopback (what remote engines use, and local ones by default), a Unix socket
pair. The numbers chose the design recorded in docs/DESIGN.md; this prints, it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch

from stillroom_server.engine import protocol
from stillroom_server.engine.process.link import Link, LinkClosed
from stillroom_server.engine.types import ForwardBackwardWork, TrainDatum


def echo(sock: socket.socket, local: bool) -> None:
    link = Link(sock, local=local)
    try:
        while True:
            link.send(link.recv())
    except LinkClosed:
        os._exit(0)


def pair(kind: str) -> tuple[socket.socket, socket.socket]:
    if kind == "unix":
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    return client, server


def work(tokens: int) -> protocol.ForwardBackward:
    datum = TrainDatum(torch.arange(tokens), {"target_tokens": torch.arange(tokens),
                                               "weights": torch.ones(tokens)})
    return protocol.ForwardBackward("run-bench", ForwardBackwardWork([datum], "cross_entropy", {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--megabytes", type=int, default=64)
    args = parser.parse_args()
    small = {"op": "submit", "job": 1, "kind": "forward", "lane": "run-bench", "command": work(128)}
    large_tokens = args.megabytes * 2**20 // 24   # int64 tokens and targets, fp32 weights
    large = {"op": "submit", "job": 2, "kind": "forward_backward", "lane": "run-bench",
             "command": work(large_tokens)}
    print(f"{'transport':<24} {'small round trip µs (p50)':>26} {'large ms there and back':>24} {'GB/s':>6}")
    for kind in ("tcp", "unix"):
        for local in (False, True):
            mine, theirs = pair(kind)
            child = os.fork()
            if child == 0:
                mine.close()
                echo(theirs, local)
            theirs.close()
            link = Link(mine, local=local)
            times = []
            for i in range(args.calls + 50):
                start = time.perf_counter()
                link.send(small)
                link.recv()
                if i >= 50:
                    times.append(time.perf_counter() - start)
            rounds = []
            for _ in range(3):
                start = time.perf_counter()
                link.send(large)
                back = link.recv()
                rounds.append(time.perf_counter() - start)
                del back
            link.close()
            os.waitpid(child, 0)
            best = min(rounds)
            print(f"{kind + (' + /dev/shm' if local else ''):<24} {1e6 * statistics.median(times):>26.0f} "
                  f"{1e3 * best:>24.1f} {2 * args.megabytes * 2**20 / best / 1e9:>6.2f}")


if __name__ == "__main__":
    main()
