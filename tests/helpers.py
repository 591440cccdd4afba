"""Small builders shared by the tests: token lines, and datums made with the cookbook's own
builders (so the tests send what the recipes send)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from stillroom import types
from stillroom_cookbook.rollouts import Rollout, completion_datum, importance_datum


def encode_line(tokenizer, text: str) -> list[int]:
    return [tokenizer.bos_token_id, *tokenizer.encode(text), tokenizer.eos_token_id]


def sft_datum(tokens: list[int], prompt_len: int = 0) -> types.Datum:
    """Next-token prediction over `tokens`, with the first `prompt_len` targets weighted 0."""
    split = max(prompt_len, 1)
    return completion_datum(tokens[:split], tokens[split:])


def is_datum(prompt: list[int], completion: list[int], sampler_logprobs: list[float],
             advantage: float) -> types.Datum:
    """An importance_sampling datum that scores `completion` after `prompt`."""
    rollout = Rollout(prompt, completion, list(sampler_logprobs))
    return importance_datum(rollout, [advantage] * len(completion))


def checkpoint_tensors(server, path: str) -> dict:
    """The tensors of a saved checkpoint, read straight from the server's data directory."""
    from safetensors.torch import load_file

    run_id, kind, name = path.removeprefix("stillroom://").split("/")
    directory = server.config.data_dir / "checkpoints" / run_id / kind / name
    weights = directory / "model.safetensors"
    return load_file(weights if weights.exists() else directory / "adapter_model.safetensors")


def load_local_model(server, name: str):
    """The base model `name` as the server stored it, loaded here in fp32 for reference maths."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(server.config.data_dir / "models" / name).float()


def train_steps(trainer, data: list[types.Datum], steps: int, learning_rate: float) -> list[float]:
    """`steps` rounds of cross_entropy forward_backward + optim_step; the loss:sum of each."""
    losses = []
    for _ in range(steps):
        forward = trainer.forward_backward(data, "cross_entropy")
        trainer.optim_step(types.AdamParams(learning_rate=learning_rate))
        losses.append(forward.result().metrics["loss:sum"])
    return losses


def official_cli(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the official `tinker` command (an idempotent one: publish, download, export-trace). The
    tinker 0.38 CLI sometimes aborts at interpreter shutdown after its work is done: SIGABRT,
    "Fatal Python error: Aborted" with no Python frame, in 2 of 30 runs of `checkpoint publish` here
    (torch, which it imports, tearing down). That is its process, not the server: such a run is
    repeated, up to three times; any other failure is returned as it is."""
    cli = [str(Path(sys.executable).parent / "tinker"), *args]
    for _ in range(3):
        done = subprocess.run(cli, env=env | {"PYTHONFAULTHANDLER": "1"}, capture_output=True, text=True,
                              timeout=timeout)
        if done.returncode != -signal.SIGABRT or "<no Python frame>" not in done.stderr:
            return done
    return done
