"""Quickstart: start a server, teach a preset model one line of text, and sample it back.

    python -m stillroom_cookbook.recipes.quickstart [--data-dir .stillroom] [--steps 60]

Everything runs through the SDK against a real server started as a child process; the base
model's sampler is asked too, to show that snapshots leave the base untouched.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

import stillroom
from stillroom import types
from stillroom_cookbook.local_server import LocalServer

LINE = "Stillroom: post-training on your own machines.\n"


def teach_line(trainer: stillroom.TrainingClient, tokens: list[int], steps: int, lr: float) -> list[float]:
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})
    losses = []
    with tqdm(range(steps), desc="training", unit="step") as bar:
        for _ in bar:
            forward = trainer.forward_backward([datum], "cross_entropy")
            trainer.optim_step(types.AdamParams(learning_rate=lr))
            losses.append(forward.result().metrics["loss:sum"] / len(datum.model_input.to_ints()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path(".stillroom"))
    parser.add_argument("--model", default="stillroom/char-10m")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()

    with LocalServer(args.data_dir) as server:
        print(f"server on {server.address} (log: {server.log_file})")
        service = stillroom.ServiceClient(base_url=server.address, api_key=server.local_api_key)
        trainer = service.create_full_training_client(args.model, seed=0)
        tokenizer = trainer.get_tokenizer()
        tokens = [tokenizer.bos_token_id, *tokenizer.encode(LINE), tokenizer.eos_token_id]
        losses = teach_line(trainer, tokens, args.steps, args.lr)

        prompt = types.ModelInput.from_ints(tokens[:1])
        greedy = types.SamplingParams(max_tokens=len(tokens) + 10, temperature=0.0)
        trained = trainer.save_weights_and_get_sampling_client("quickstart")
        base = service.create_sampling_client(base_model=args.model)
        after = trained.sample(prompt, 1, greedy).result().sequences[0]
        before = base.sample(prompt, 1, greedy).result().sequences[0]
        print(f"\nloss per token: {losses[0]:.3f} -> {losses[-1]:.3f} ({losses[0] / losses[-1]:.0f}x lower)")
        print(f"target line  : {LINE!r}")
        print(f"trained model: {tokenizer.decode(after.tokens, skip_special_tokens=True)!r}")
        print(f"base model   : {tokenizer.decode(before.tokens, skip_special_tokens=True)!r}")
        print(f"snapshot     : {trained.model_path}")
        service.close()


if __name__ == "__main__":
    main()
