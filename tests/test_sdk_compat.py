"""Stillroom's SDK called as Tinker 0.38's is: client futures that are also clients, awaiting
twins, optim_step's two spellings, saves with ttl/overwrite/user_metadata, a RestClient built on
its own, tinker:// paths, and the sampling additions (sequence ids, top-k sample logprobs,
prompt_logprobs_last_n), all against a real server."""

from __future__ import annotations

import asyncio
import math

import pytest

import stillroom
from stillroom import types

from conftest import TINY
from helpers import encode_line, sft_datum

GREEDY = types.SamplingParams(max_tokens=6, temperature=0.0)


@pytest.fixture(scope="module")
def trained(service, tokenizer):
    trainer = service.create_lora_training_client(TINY, rank=4, seed=0)
    trainer.forward_backward([sft_datum(encode_line(tokenizer, "compat\n"))], "cross_entropy")
    trainer.optim_step(adam_params=types.AdamParams(learning_rate=1e-2)).result()
    return trainer


def test_create_calls_are_clients_and_futures_of_them(service):
    trainer = service.create_lora_training_client(TINY, rank=4, seed=0)
    assert isinstance(trainer, stillroom.TrainingClient) and isinstance(trainer, stillroom.APIFuture)
    assert isinstance(trainer.result(), stillroom.TrainingClient)
    assert trainer.model_id == trainer.result().model_id  # attributes read through the future
    sampler = service.create_sampling_client(base_model=TINY)
    assert isinstance(sampler.result(timeout=60), stillroom.SamplingClient)
    assert sampler.get_base_model() == TINY

    async def awaited():
        return await service.create_sampling_client(base_model=TINY)

    assert isinstance(asyncio.run(awaited()), stillroom.SamplingClient)
    with pytest.raises(stillroom.NotFoundError):  # errors surface at the call, as before
        service.create_lora_training_client("no-such-model")


def test_optim_step_takes_tinkers_two_spellings(trained):
    adam = types.AdamParams(learning_rate=1e-3)
    assert "grad_norm:value" in trained.optim_step(adam).result().metrics
    assert "grad_norm:value" in trained.optim_step(adam_params=adam).result().metrics
    with pytest.raises(ValueError, match="exactly one"):
        trained.optim_step()


def test_get_info_has_tinkers_fields(trained):
    info = trained.get_info()
    assert info.model_id == trained.model_id and info.model_data.model_name == TINY
    assert info.model_data.tokenizer_id == TINY and info.is_lora and info.lora_rank == 4


def test_sequence_ids_and_topk_sample_logprobs(trained, tokenizer):
    sampler = trained.save_weights_and_get_sampling_client("compat-topk")
    prompt = types.ModelInput.from_ints(encode_line(tokenizer, "ab")[:2])
    future = sampler.sample(prompt, 3, GREEDY, topk_sample_logprobs=4)
    first, again = future.result(), sampler.sample(prompt, 1, GREEDY).result()
    ids = [s.sequence_id for s in [*first.sequences, *again.sequences]]
    assert all(ids) and len(set(ids)) == len(ids)
    # named after the request, as the Tinker HTTP API names them in its sample_sequence_ids
    assert ids[:3] == [f"{future.request_id}:{i}" for i in range(3)]
    for sequence in first.sequences:
        assert len(sequence.topk_logprobs) == len(sequence.tokens)
        for token, logprob, top in zip(sequence.tokens, sequence.logprobs, sequence.topk_logprobs):
            assert len(top) == 4 and [v for _, v in top] == sorted((v for _, v in top), reverse=True)
            # greedy; the top-k values come from the same logits (1e-5: 20 ulps of slack)
            assert top[0][0] == token and top[0][1] == pytest.approx(logprob, abs=1e-5)
    assert again.sequences[0].topk_logprobs is None


def test_prompt_logprobs_last_n(trained, tokenizer):
    sampler = trained.create_sampling_client(
        trained.save_weights_for_sampler("compat-last-n").result().path).result()
    tokens = encode_line(tokenizer, "the last few")
    prompt = types.ModelInput.from_ints(tokens)
    full = sampler.sample(prompt, 1, GREEDY, include_prompt_logprobs=True, topk_prompt_logprobs=2).result()
    tail = sampler.sample(prompt, 1, GREEDY, include_prompt_logprobs=True, topk_prompt_logprobs=2,
                          prompt_logprobs_last_n=3).result()
    n = len(tokens)   # the head over fewer rows (another GEMM shape): a few ulps apart; 1e-5 is 20 ulps
    assert tail.prompt_logprobs[:n - 3] == [None] * (n - 3)
    assert tail.prompt_logprobs[n - 3:] == pytest.approx(full.prompt_logprobs[n - 3:], abs=1e-5)
    assert tail.topk_prompt_logprobs[:n - 3] == [None] * (n - 3)
    assert [[t for t, _ in row] for row in tail.topk_prompt_logprobs[n - 3:]] == \
        [[t for t, _ in row] for row in full.topk_prompt_logprobs[n - 3:]]
    scored = sampler.compute_logprobs(prompt, prompt_logprobs_last_n=2).result()
    assert scored[:n - 2] == [None] * (n - 2) and all(not math.isnan(v) for v in scored[n - 2:])
    assert asyncio.run(sampler.compute_logprobs_async(prompt)) == sampler.compute_logprobs(prompt).result()

    for bad in (0, n):
        with pytest.raises(stillroom.BadRequestError, match="prompt_logprobs_last_n"):
            sampler.sample(prompt, 1, GREEDY, include_prompt_logprobs=True,
                           prompt_logprobs_last_n=bad).result()
    with pytest.raises(stillroom.BadRequestError, match="prompt_logprobs_last_n"):
        sampler.sample(prompt, 1, GREEDY, prompt_logprobs_last_n=2).result()


def test_saves_with_ttl_metadata_and_overwrite(service, trained):
    state = trained.save_state("compat-state", ttl_seconds=3600, user_metadata={"step": "7"}).result()
    rest = service.create_rest_client()
    listed = {c.tinker_path: c for c in rest.list_checkpoints(trained.training_run_id).result().checkpoints}
    checkpoint = listed[state.path]
    assert checkpoint.expires_at is not None and checkpoint.user_metadata == {"step": "7"}
    assert checkpoint.checkpoint_id == "weights/compat-state"
    with pytest.raises(stillroom.ConflictError, match="overwrite"):
        trained.save_state("compat-state").result()
    again = trained.save_state("compat-state", overwrite=True).result()
    assert again.path == state.path
    replaced = {c.tinker_path: c for c in rest.list_checkpoints(trained.training_run_id).checkpoints}
    assert replaced[state.path].expires_at is None
    sampler_path = trained.save_weights_for_sampler("compat-ttl", ttl_seconds=60).result().path
    assert rest.get_training_run_by_tinker_path(sampler_path).result().training_run_id == trained.model_id


def test_a_rest_client_built_as_tinker_builds_it(server, trained):
    rest = stillroom.RestClient(base_url=server.address, api_key=server.local_api_key)
    try:
        path = trained.save_weights_for_sampler("compat-rest").result().path
        tinker_path = path.replace("stillroom://", "tinker://")
        run = rest.get_training_run_by_tinker_path(tinker_path).result()
        assert run.training_run_id == trained.model_id
        page = rest.list_user_checkpoints(limit=1, offset=0).result()
        assert len(page.checkpoints) == 1 and page.cursor is not None and page.cursor.total_count >= 1
        parsed = types.ParsedCheckpointTinkerPath.from_tinker_path(tinker_path)
        assert parsed.checkpoint_type == "sampler" and parsed.checkpoint_id == "sampler_weights/compat-rest"
        rest.delete_checkpoint(parsed.training_run_id, parsed.checkpoint_id).result()
        with pytest.raises(stillroom.NotFoundError):
            rest.delete_checkpoint_from_tinker_path(tinker_path)
        other = trained.save_weights_for_sampler("compat-rest-2").result().path
        assert asyncio.run(rest.delete_checkpoint_from_tinker_path_async(other)).tinker_path == other
    finally:
        rest.close()


def test_errors_have_tinkers_hierarchy():
    assert issubclass(stillroom.BadRequestError, stillroom.APIStatusError)
    assert issubclass(stillroom.APIStatusError, stillroom.APIError)
    assert issubclass(stillroom.APIError, stillroom.TinkerError)
    assert issubclass(stillroom.APITimeoutError, stillroom.APIConnectionError)
    assert issubclass(stillroom.RequestFailedError, stillroom.TinkerError)
    assert stillroom.NotFoundError("x").status_code == 404
    assert stillroom.StillroomError is stillroom.TinkerError


def test_close_takes_a_status_and_returns_a_future(server):
    client = stillroom.ServiceClient(base_url=server.address, api_key=server.local_api_key)
    assert client.get_server_capabilities().supported_models
    assert client.close("success", detail="done").result() is None
    client.close()  # twice is harmless
