"""Speed of SmolLM2-135M-Instruct through a real server on this CPU, fp32 against bf16 autocast:
LoRA training (forward_backward + optim_step) tokens/s, full fine-tuning tokens/s, sampling tokens/s,
and how far bf16 logprobs lie from fp32 ones. Prints a table; asserts nothing about time.

    bash scripts/setup_real_model.sh && python scripts/bench_real_model.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import importlib
import os
import tempfile
import time
from pathlib import Path
from typing import Literal

import stillroom
from stillroom import types

NAME = "smollm2-135m-instruct"
TEXT = ("The Stillroom service hosts models next to the accelerators, and researchers drive "
        "sampling, logprobs and training steps from short loops on their own laptops. ")


def start_server(data_dir: Path, model_dir: Path, dtype: Literal["auto", "fp32", "bf16"]):
    from stillroom_server.config import ServerConfig

    for module in ("stillroom_server.app", "stillroom_server.service.app"):
        try:
            app = importlib.import_module(module)
            break
        except ModuleNotFoundError:
            continue
    config = ServerConfig(data_dir=data_dir, host="127.0.0.1", port=0, auth="off", dtype=dtype,
                          local_models={NAME: model_dir})
    return app.StillroomServer(config)


def datums(tokenizer, batch: int, length: int) -> list[types.Datum]:
    ids = (tokenizer.encode(TEXT) * 40)[:length + 1]
    return [types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                        loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * length})
            for _ in range(batch)]


def time_training(trainer, data, rounds: int) -> float:
    """Best tokens/s over `rounds` forward_backward + optim_step pairs (after one warm-up)."""
    tokens = sum(d.model_input.length for d in data)
    best = 0.0
    for i in range(rounds + 1):
        start = time.perf_counter()
        trainer.forward_backward(data, "cross_entropy").result()
        trainer.optim_step(types.AdamParams(learning_rate=1e-5)).result()
        if i:
            best = max(best, tokens / (time.perf_counter() - start))
    return best


def time_sampling(sampler, prompt, rounds: int, num_samples: int, max_tokens: int) -> float:
    """Best returned tokens/s over `rounds` sample calls (after one warm-up)."""
    params = types.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=0)
    best = 0.0
    for i in range(rounds + 1):
        start = time.perf_counter()
        result = sampler.sample(prompt, num_samples=num_samples, sampling_params=params).result()
        returned = sum(len(s.tokens) for s in result.sequences)
        if i:
            best = max(best, returned / (time.perf_counter() - start))
    return best


def measure(model_dir: Path, dtype: Literal["auto", "fp32", "bf16"], rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as data_dir, start_server(Path(data_dir), model_dir, dtype) as server:
        service = stillroom.ServiceClient(base_url=server.address)
        trainer = service.create_lora_training_client(NAME, rank=32, seed=0)
        tokenizer = trainer.get_tokenizer()
        data = datums(tokenizer, 4, 128)
        lora = time_training(trainer, data, rounds)
        full = time_training(service.create_full_training_client(NAME, seed=0), data[:1], rounds)
        sampler = service.create_sampling_client(base_model=NAME)
        chat = tokenizer.apply_chat_template([{"role": "user", "content": "Write a long story about a cat."}],
                                             add_generation_prompt=True, tokenize=False)
        prompt = types.ModelInput.from_ints(tokenizer.encode(chat, add_special_tokens=False))
        sampling = time_sampling(sampler, prompt, rounds, num_samples=16, max_tokens=32)
        probe = data[0].model_input.to_ints() + [data[0].loss_fn_inputs["target_tokens"].tolist()[-1]]
        logprobs = sampler.compute_logprobs(types.ModelInput.from_ints(probe)).result()
        service.close()
    return {"lora": lora, "full": full, "sampling": sampling, "logprobs": logprobs[1:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path(os.environ.get(
        "STILLROOM_MODELS_CACHE", ".stillroom/imported")) / NAME)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    fp32 = measure(args.model_dir.resolve(), "fp32", args.rounds)
    bf16 = measure(args.model_dir.resolve(), "bf16", args.rounds)
    print(f"threads {os.environ.get('OMP_NUM_THREADS', 'default')}, best of {args.rounds}")
    print("| measure | fp32 | bf16 autocast | bf16 / fp32 |\n|---|---|---|---|")
    for key, label in [("lora", "LoRA r32 train, 4x128 tokens (tokens/s)"),
                       ("full", "full fine-tune, 1x128 tokens (tokens/s)"),
                       ("sampling", "sampling, 16 x 32 tokens (tokens/s)")]:
        print(f"| {label} | {fp32[key]:.0f} | {bf16[key]:.0f} | {bf16[key] / fp32[key]:.2f} |")
    diffs = [abs(a - b) for a, b in zip(fp32["logprobs"], bf16["logprobs"])]
    print(f"bf16 vs fp32 compute_logprobs over {len(diffs)} tokens: max |diff| {max(diffs):.4f}, "
          f"mean {sum(diffs) / len(diffs):.4f} nats")


if __name__ == "__main__":
    main()
