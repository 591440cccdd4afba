"""Send one forward_backward far larger than a single message and check it against the same call
sent unsplit, at a size that fits one message.

    python scripts/big_forward_backward.py              # 100 MB of data on stillroom/char-1m
    python scripts/big_forward_backward.py --megabytes 10 --chunk-mb 1   # 10 parts, a few minutes

The SDK splits the call into parts of at most 32 MB; the server holds the parts' gradients aside
and adds them when the last part succeeds, and runs each part in micro-batches. Prints the parts,
the wall time and the loss; then compares a 0.5 MB call split into 16 KB parts with the unsplit call.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import stillroom
from stillroom import _wire, types
from stillroom_server.app import StillroomServer
from stillroom_server.config import ServerConfig

MODEL = "stillroom/char-1m"


def make_data(megabytes: float, seed: int = 0) -> list[types.Datum]:
    rng = random.Random(seed)
    data, size = [], 0
    while size < megabytes * 1e6:
        tokens = [rng.randrange(3, 100) for _ in range(rng.randrange(256, 513))]
        datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                            loss_fn_inputs={"target_tokens": tokens[1:],
                                            "weights": [1.0] * (len(tokens) - 1)})
        data.append(datum)
        size += _wire.datum_to_pb(datum).ByteSize()
    return data


def timed_call(trainer: stillroom.TrainingClient, data: list[types.Datum],
               chunk_bytes: int) -> tuple[types.ForwardBackwardOutput, float, int, float]:
    """The call's output, the step's grad norm, the parts it went in, and its seconds."""
    trainer.max_chunk_bytes = chunk_bytes
    first_seq = trainer._next_seq
    start = time.perf_counter()
    out = trainer.forward_backward(data, "cross_entropy").result()
    step = trainer.optim_step(types.AdamParams(learning_rate=0.0)).result()
    assert step.metrics is not None
    parts = trainer._next_seq - first_seq - 1
    return out, step.metrics["grad_norm:value"], parts, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=100.0)
    parser.add_argument("--chunk-mb", type=float, default=32.0, help="the SDK's part size (default 32 MB)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data_dir:
        server = StillroomServer(ServerConfig(data_dir=Path(data_dir), port=0)).start()
        service = stillroom.ServiceClient(base_url=server.address, api_key=server.local_api_key)
        try:
            trainer = service.create_full_training_client(MODEL, seed=0)
            data = make_data(args.megabytes)
            tokens = sum(d.model_input.length for d in data)
            out, grad_norm, parts, seconds = timed_call(trainer, data, int(args.chunk_mb * (1 << 20)))
            print(f"{args.megabytes:g} MB, {len(data)} datums, {tokens} tokens: {parts} parts, "
                  f"{seconds:.1f} s ({tokens / seconds:.0f} tokens/s), loss:sum "
                  f"{out.metrics['loss:sum']:.1f}, grad norm {grad_norm:.3f}")
            small = make_data(0.5, seed=1)
            whole, whole_norm, _, _ = timed_call(trainer, small, 1 << 30)
            split, split_norm, parts, _ = timed_call(trainer, small, 16 << 10)
            print(f"0.5 MB in {parts} parts vs one message: loss:sum {split.metrics['loss:sum']:.4f} vs "
                  f"{whole.metrics['loss:sum']:.4f}, grad norm {split_norm:.6f} vs {whole_norm:.6f}")
        finally:
            service.close()
            server.stop()


if __name__ == "__main__":
    main()
