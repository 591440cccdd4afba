"""Training state: save_state writes weights and AdamW state; a run restored with its optimizer
continues exactly as the original would have, and one restored without it restarts its moments."""

from __future__ import annotations

import asyncio
import json

import pytest

import stillroom
from stillroom import types

from conftest import TINY
from helpers import encode_line, sft_datum, train_steps

LR = 1e-2
TEXTS = ["the quick brown fox", "jumps over the lazy dog", "Stillroom keeps its state."]


def _data(tokenizer) -> list[types.Datum]:
    return [sft_datum(encode_line(tokenizer, text)) for text in TEXTS]


def _make(service, kind: str):
    if kind == "lora":
        return service.create_lora_training_client(TINY, rank=4, seed=0)
    return service.create_full_training_client(TINY, seed=0)


def _steps_logprobs(trainer, data, steps: int = 3) -> list[list[float]]:
    """Each step's forward_backward logprobs (all data, flattened), stepping AdamW after each."""
    recorded = []
    for _ in range(steps):
        forward = trainer.forward_backward(data, "cross_entropy")
        trainer.optim_step(types.AdamParams(learning_rate=LR))
        recorded.append([v for out in forward.result().loss_fn_outputs for v in out["logprobs"].data])
    return recorded


def _max_gap(a: list[list[float]], b: list[list[float]]) -> list[float]:
    return [max(abs(x - y) for x, y in zip(row_a, row_b)) for row_a, row_b in zip(a, b)]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_state_with_optimizer_continues_exactly_and_without_restarts_moments(service, tokenizer,
                                                                              server, kind):
    data = _data(tokenizer)
    trainer = _make(service, kind)
    train_steps(trainer, data, steps=3, learning_rate=LR)
    path = trainer.save_state(f"{kind}-after-3").result().path
    assert path == f"stillroom://{trainer.training_run_id}/weights/{kind}-after-3"
    reference = _steps_logprobs(trainer, data)

    # The resumed run does the same sums as the original, in the same process and batch: its logprobs are
    # bit-equal (1e-6 is two ulps of slack at |logprob| ~5); fresh moments move a weight by LR (not by
    # m/sqrt(v) of the old moments) and its logprobs by far more than 1e-3.
    resumed = service.create_training_client_from_state_with_optimizer(path)
    assert resumed.training_run_id != trainer.training_run_id
    assert resumed.get_info().is_lora == (kind == "lora")
    assert max(_max_gap(reference, _steps_logprobs(resumed, data))) <= 1e-6

    fresh = service.create_training_client_from_state(path)
    gaps = _max_gap(reference, _steps_logprobs(fresh, data))
    assert gaps[0] <= 1e-6          # the same weights score the same before the first step
    assert gaps[2] > 1e-3           # fresh moments take different steps afterwards

    # the files: safetensors + JSON, never a pickle
    run_dir = server.config.data_dir / "checkpoints" / trainer.training_run_id
    directory = run_dir / "weights" / f"{kind}-after-3"
    names = {f.name for f in directory.iterdir()}
    assert {"optimizer.safetensors", "optimizer.json", "stillroom_checkpoint.json"} <= names
    assert not [n for n in names if n.endswith((".pt", ".bin", ".pkl", ".pth"))]
    meta = json.loads((directory / "stillroom_checkpoint.json").read_text())
    assert meta["base_model"] == TINY and meta["is_lora"] == (kind == "lora")
    assert (meta["lora"] is not None) == (kind == "lora")


def test_load_state_into_a_running_client_in_request_order(service, tokenizer):
    data = _data(tokenizer)
    trainer = _make(service, "lora")
    train_steps(trainer, data, steps=2, learning_rate=LR)
    path = trainer.save_state("two").result().path
    reference = _steps_logprobs(trainer, data, steps=2)

    other = _make(service, "lora")
    train_steps(other, data[:1], steps=2, learning_rate=LR)  # different weights and moments

    async def reload():
        future = await other.load_state_with_optimizer_async(path)
        return (await future).path

    # loaded before the next forward_backward because requests run in order (the same sums as the
    # saver's: bit-equal, 1e-6 two ulps of slack)
    assert asyncio.run(reload()) == path
    assert max(_max_gap(reference, _steps_logprobs(other, data, steps=2))) <= 1e-6

    other.load_state(path).result()  # weights only: the first step again scores as saved
    assert _max_gap(reference[:1], _steps_logprobs(other, data, steps=1))[0] <= 1e-6


def test_async_twins_and_auto_names(service, tokenizer):
    async def flow():
        trainer = await service.create_lora_training_client_async(TINY, rank=4, seed=1)
        saved = await (await trainer.save_state_async(None))  # None: the server names it
        restored = await service.create_training_client_from_state_async(saved.path)
        again = await service.create_training_client_from_state_with_optimizer_async(saved.path)
        return saved.path, restored, again

    path, restored, again = asyncio.run(flow())
    assert "/weights/state-" in path
    assert restored.get_info().lora_rank == 4 and again.get_info().lora_rank == 4


def test_states_that_do_not_fit_are_refused(service, tokenizer):
    lora = service.create_lora_training_client(TINY, rank=4, seed=0)
    full = service.create_full_training_client(TINY, seed=0)
    other_rank = service.create_lora_training_client(TINY, rank=8, seed=0)
    lora_state = lora.save_state("fit-check").result().path
    sampler_path = lora.save_weights_for_sampler("fit-check-sampler").result().path

    with pytest.raises(stillroom.BadRequestError, match="lora"):
        full.load_state(lora_state).result()
    with pytest.raises(stillroom.BadRequestError, match="LoRA settings"):
        other_rank.load_state_with_optimizer(lora_state).result()
    with pytest.raises(stillroom.BadRequestError, match="sampler weights"):
        service.create_training_client_from_state(sampler_path)
    with pytest.raises(stillroom.BadRequestError, match="training state"):
        service.create_sampling_client(model_path=lora_state)
    with pytest.raises(stillroom.ConflictError):
        lora.save_state("fit-check").result()
    # a refused request changed nothing: the run still trains
    train_steps(full, _data(tokenizer)[:1], steps=1, learning_rate=LR)
