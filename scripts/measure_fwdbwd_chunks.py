"""Time one chunked forward_backward through the official `tinker` SDK, its parts sent two ways.

The SDK splits a forward_backward into parts of at most 1024 datums (or 5e6 bytes). With the
server's client config `parallel_fwdbwd_chunks` true it sends parts 2..n at once and part 1 last;
false: one part after another. This starts a server in this process, flips that one field of the
config the server hands out (each new ServiceClient reads it), and times the same call both ways,
alternating, on the char-1m preset. It prints ms per repetition, when the server accepted each part,
medians and their ratio; it knows nothing of why one is faster (see docs/tinker_compat.md).

    python scripts/measure_fwdbwd_chunks.py [--datums 4096] [--tokens 8] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TINKER_TELEMETRY", "0")
BASE = "stillroom/char-1m"


def make_data(tinker, datums: int, tokens: int) -> list:
    data = []
    for i in range(datums):
        line = [10 + (i + j) % 90 for j in range(tokens + 1)]
        data.append(tinker.types.Datum(
            model_input=tinker.types.ModelInput.from_ints(line[:-1]),
            loss_fn_inputs={"target_tokens": line[1:], "weights": [1.0] * tokens}))
    return data


def trainer_for(tinker, server, parallel: bool):
    """A training client of a new session, made while the server hands out `parallel`."""
    from stillroom_server.http_api import app

    app.CLIENT_CONFIG["parallel_fwdbwd_chunks"] = parallel
    service = tinker.ServiceClient(base_url=server.http_url, api_key=server.local_api_key)
    trainer = service.create_lora_training_client(BASE, rank=8, seed=0).result()
    assert service.holder._client_config.parallel_fwdbwd_chunks is parallel  # what the SDK read
    return service, trainer


def record_acceptances(server) -> list[float]:
    """The times at which the server's core accepts a forward_backward part (appended to)."""
    accepted: list[float] = []
    accept = server.service.forward_backward

    def timed(*args, **kwargs):
        request_id = accept(*args, **kwargs)
        accepted.append(time.perf_counter())
        return request_id

    server.service.forward_backward = timed
    return accepted


def time_call(trainer, data, accepted: list[float]) -> tuple[float, float | str, list[float]]:
    """ms for the whole call, its loss (or the failure), ms at which each part was accepted."""
    accepted.clear()
    start = time.perf_counter()
    try:
        loss = trainer.forward_backward(data, "cross_entropy").result(timeout=300).metrics["loss:sum"]
    except Exception as error:  # noqa: BLE001 - a failed way is a result to print
        loss = f"failed: {type(error).__name__}: {str(error)[:200]}"
    return (time.perf_counter() - start) * 1000, loss, [(t - start) * 1000 for t in accepted]


def measure(tinker, data_dir: Path, data: list, reps: int) -> dict[str, list[float]]:
    """ms per repetition for each way, alternating, on a server over `data_dir`."""
    from stillroom_server.app import StillroomServer
    from stillroom_server.config import ServerConfig

    ways = {"parallel": True, "in order": False}
    times: dict[str, list[float]] = {way: [] for way in ways}
    with StillroomServer(ServerConfig(data_dir=data_dir, host="127.0.0.1", port=0)) as server:
        accepted = record_acceptances(server)
        for rep in range(reps):
            for way, parallel in ways.items():  # a fresh session each time: a failed call leaves none behind
                service, trainer = trainer_for(tinker, server, parallel)
                trainer.forward_backward(data[:8], "cross_entropy").result()  # warm-up, one part
                ms, loss, parts = time_call(trainer, data, accepted)
                times[way].append(ms)
                print(f"rep {rep} {way:>8}: {ms:9.1f} ms  loss:sum {loss}  parts accepted at ms: "
                      f"{', '.join(f'{t:.0f}' for t in parts)}", flush=True)
                try:
                    service.close("success").result(timeout=30)
                except Exception as error:  # noqa: BLE001 - after a failed call the session may hang
                    print(f"  close: {type(error).__name__}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--datums", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=8, help="tokens per datum")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=None, help="server data dir (default: a temp dir)")
    args = parser.parse_args()

    import tinker

    data = make_data(tinker, args.datums, args.tokens)
    if args.data_dir is not None:
        times = measure(tinker, args.data_dir, data, args.reps)
    else:
        with tempfile.TemporaryDirectory(prefix="stillroom-chunks-") as data_dir:
            times = measure(tinker, Path(data_dir), data, args.reps)
    medians = {way: statistics.median(values) for way, values in times.items()}
    print(f"{args.datums} datums x {args.tokens} tokens, parts of <= 1024 datums")
    for way, values in times.items():
        print(f"{way:>8}: median {medians[way]:.1f} ms  ({', '.join(f'{v:.0f}' for v in values)})")
    pairs = [p / o for p, o in zip(times["parallel"], times["in order"])]
    print(f"parallel / in order = {medians['parallel'] / medians['in order']:.2f} (medians); "
          f"{statistics.median(pairs):.2f} (median of the {len(pairs)} pairs; parallel faster in "
          f"{sum(r < 1 for r in pairs)})")


if __name__ == "__main__":
    main()
