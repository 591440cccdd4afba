"""End to end through a real server: train with the SDK, sample it back, and the contracts of
futures, ordering, snapshots and logprob agreement."""

from __future__ import annotations

import asyncio

import pytest
import torch

import stillroom
from stillroom import _wire, types
from stillroom._proto import stillroom_pb2 as pb

from conftest import TINY
from helpers import checkpoint_tensors, encode_line, is_datum, sft_datum, train_steps

LINE = "Stillroom trains models.\n"
GREEDY = types.SamplingParams(max_tokens=40, temperature=0.0)


def test_capabilities_list_the_presets(service):
    caps = service.get_server_capabilities()
    names = {m.model_name: m for m in caps.supported_models}
    assert {"stillroom/char-1m", "stillroom/char-10m"} <= set(names)
    assert names[TINY].trainable and names[TINY].sampleable and names[TINY].vocab_size == 100
    assert {"cross_entropy", "importance_sampling"} <= set(caps.loss_fns)


@pytest.mark.slow
def test_train_a_line_then_sample_it_back_while_the_base_is_unchanged(service, tokenizer):
    tokens = encode_line(tokenizer, LINE)
    prompt = types.ModelInput.from_ints(tokens[:4])
    base = service.create_sampling_client(base_model=TINY)
    base_before = base.sample(prompt, 1, GREEDY).result().sequences[0].tokens

    trainer = service.create_full_training_client(TINY, seed=0)
    losses = train_steps(trainer, [sft_datum(tokens)], 80, learning_rate=3e-3)
    assert losses[-1] < losses[0] / 10, losses

    sampler = trainer.save_weights_and_get_sampling_client("line")
    sampled = sampler.sample(prompt, 1, GREEDY).result().sequences[0]
    assert tokenizer.decode(tokens[:4] + sampled.tokens, skip_special_tokens=True) == LINE
    assert sampled.stop_reason == "stop" and sampled.tokens[-1] == tokenizer.eos_token_id

    # Training on after the snapshot changes neither the snapshot nor the base model.
    other = encode_line(tokenizer, "Something else entirely.\n")
    for _ in range(5):
        trainer.forward_backward([sft_datum(other)], "cross_entropy")
        trainer.optim_step(types.AdamParams(learning_rate=3e-3))
    assert sampler.sample(prompt, 1, GREEDY).result().sequences[0].tokens == sampled.tokens
    assert base.sample(prompt, 1, GREEDY).result().sequences[0].tokens == base_before


def test_importance_sampling_moves_logprobs_with_the_sign_of_the_advantage(service, tokenizer):
    trainer = service.create_full_training_client(TINY, seed=0)
    prompt = encode_line(tokenizer, "Q:")[:-1]
    good, bad = tokenizer.encode(" yes"), tokenizer.encode(" no!")

    def completion_logprobs(sampler, completion):
        logprobs = sampler.compute_logprobs(types.ModelInput.from_ints(prompt + completion)).result()
        return logprobs[len(prompt):]

    scorer = trainer.save_weights_and_get_sampling_client("is-before")
    lp_good, lp_bad = completion_logprobs(scorer, good), completion_logprobs(scorer, bad)
    before = {"good": sum(lp_good), "bad": sum(lp_bad)}
    data = [is_datum(prompt, good, lp_good, +1.0), is_datum(prompt, bad, lp_bad, -1.0)]
    out = trainer.forward_backward(data, "importance_sampling").result()
    # ratios are 1: exp of the trainer's minus the scorer's logprobs, a few ulps apart (~1e-6 each, over
    # ~20 tokens: ~2e-5); 1e-3 leaves room
    assert out.metrics["loss:sum"] == pytest.approx(-(len(good) - len(bad)), abs=1e-3)
    trainer.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    scorer = trainer.save_weights_and_get_sampling_client("is-after")
    after = {"good": sum(completion_logprobs(scorer, good)), "bad": sum(completion_logprobs(scorer, bad))}
    assert after["good"] > before["good"] and after["bad"] < before["bad"]


def test_pipelined_calls_give_the_same_weights_as_awaited_ones(service, server, tokenizer):
    data = [sft_datum(encode_line(tokenizer, "pipelines keep order\n")),
            sft_datum(encode_line(tokenizer, "one two three\n"))]
    adam = types.AdamParams(learning_rate=1e-3)

    pipelined = service.create_full_training_client(TINY, seed=0)
    futures = [pipelined.forward_backward(data[:1], "cross_entropy"), pipelined.optim_step(adam),
               pipelined.forward_backward(data[1:], "cross_entropy"), pipelined.optim_step(adam),
               pipelined.save_weights_for_sampler("pipelined")]
    path_a = futures[-1].result().path
    assert all(f.done() for f in futures)

    stepwise = service.create_full_training_client(TINY, seed=0)
    stepwise.forward_backward(data[:1], "cross_entropy").result()
    stepwise.optim_step(adam).result()
    stepwise.forward_backward(data[1:], "cross_entropy").result()
    stepwise.optim_step(adam).result()
    path_b = stepwise.save_weights_for_sampler("stepwise").result().path

    a, b = checkpoint_tensors(server, path_a), checkpoint_tensors(server, path_b)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_repeated_request_number_is_applied_once(service, server, tokenizer):
    trainer = service.create_full_training_client(TINY, seed=0)
    connection = trainer._connection
    datum_pb = _wire.datum_to_pb(sft_datum(encode_line(tokenizer, "only once\n")))

    def send(method, request):
        return connection.run(connection.call(method, request))

    fb = pb.ForwardBackwardRequest(training_run_id=trainer.training_run_id, seq=1, data=[datum_pb],
                                   loss_fn="cross_entropy")
    first, again = send("ForwardBackward", fb), send("ForwardBackward", fb)
    assert first.request_id == again.request_id
    step = pb.OptimStepRequest(training_run_id=trainer.training_run_id, seq=2,
                               adam_params=_wire.adam_params_to_pb(types.AdamParams(learning_rate=1e-2)))
    assert send("OptimStep", step).request_id == send("OptimStep", step).request_id
    trainer._next_seq = 3
    once = trainer.save_weights_for_sampler("once").result().path

    reference = service.create_full_training_client(TINY, seed=0)
    reference.forward_backward([sft_datum(encode_line(tokenizer, "only once\n"))], "cross_entropy")
    reference.optim_step(types.AdamParams(learning_rate=1e-2))
    expected = reference.save_weights_for_sampler("reference").result().path
    a, b = checkpoint_tensors(server, once), checkpoint_tensors(server, expected)
    assert all(torch.equal(a[k], b[k]) for k in a)

    gap = pb.OptimStepRequest(training_run_id=trainer.training_run_id, seq=10,
                              adam_params=step.adam_params)
    with pytest.raises(stillroom.BadRequestError, match="expects request 4"):
        send("OptimStep", gap)


def test_sampled_logprobs_agree_with_compute_logprobs_and_the_trainer(service, tokenizer):
    trainer = service.create_full_training_client(TINY, seed=0)
    sampler = trainer.save_weights_and_get_sampling_client("agree")
    prompt = encode_line(tokenizer, "Hello")[:-1]
    result = sampler.sample(types.ModelInput.from_ints(prompt), 4,
                            types.SamplingParams(max_tokens=30, temperature=1.0, seed=3)).result()
    for seq in result.sequences:
        full = prompt + seq.tokens
        scored = sampler.compute_logprobs(types.ModelInput.from_ints(full)).result()
        assert scored[0] is None
        # decoding with a KV cache vs one forward vs the trainer's pass: the same weights, other kernels
        # and orders in every layer (L sqrt(K) u ~1.4e-5 of |logprob| <= 7): 1e-4
        assert max(abs(a - b) for a, b in zip(scored[len(prompt):], seq.logprobs)) < 1e-4
        trained = trainer.forward([sft_datum(full)], "cross_entropy").result()
        trainer_logprobs = trained.loss_fn_outputs[0]["logprobs"].data
        assert max(abs(a - b) for a, b in zip(trainer_logprobs[len(prompt) - 1:], seq.logprobs)) < 1e-4


def test_num_samples_and_concurrent_requests_are_served_together(service, tokenizer):
    sampler = service.create_sampling_client(base_model=TINY)
    prompts = [encode_line(tokenizer, text)[:-1] for text in ("a", "bb", "a much longer prompt")]
    params = types.SamplingParams(max_tokens=12, temperature=0.8, top_k=20, top_p=0.9, seed=11)
    futures = [sampler.sample(types.ModelInput.from_ints(p), 3, params) for p in prompts]
    results = [f.result() for f in futures]
    for p, result in zip(prompts, results):
        assert len(result.sequences) == 3
        alone = sampler.sample(types.ModelInput.from_ints(p), 3, params).result()
        assert [s.tokens for s in alone.sequences] == [s.tokens for s in result.sequences]
        assert all(len(s.tokens) <= 12 for s in result.sequences)


def test_stop_tokens_end_a_sequence(service, tokenizer):
    sampler = service.create_sampling_client(base_model=TINY)
    prompt = types.ModelInput.from_ints(encode_line(tokenizer, "x")[:-1])
    first = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=5, temperature=0.0)).result()
    stop_token = first.sequences[0].tokens[0]
    stopped = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=5, temperature=0.0,
                                                             stop=[stop_token])).result()
    assert stopped.sequences[0].tokens == [stop_token]
    assert stopped.sequences[0].stop_reason == "stop"
    assert first.sequences[0].stop_reason in ("length", "stop")


@pytest.mark.slow
def test_lora_training_lowers_the_loss_and_its_snapshot_samples_the_trained_weights(service, tokenizer):
    trainer = service.create_lora_training_client(TINY, rank=16, seed=1)
    info = trainer.get_info()
    assert info.is_lora and info.lora_rank == 16 and 0 < info.num_trainable_params < 1_194_496
    tokens = encode_line(tokenizer, "low rank\n")
    losses = train_steps(trainer, [sft_datum(tokens)], 20, learning_rate=3e-3)
    assert losses[-1] < losses[0] / 2, losses
    sampler = trainer.save_weights_and_get_sampling_client("lora-line")
    trained = trainer.forward([sft_datum(tokens)], "cross_entropy").result()
    scored = sampler.compute_logprobs(types.ModelInput.from_ints(tokens)).result()   # 1e-4: as above
    assert max(abs(a - b) for a, b in zip(scored[1:], trained.loss_fn_outputs[0]["logprobs"].data)) < 1e-4
    base = service.create_sampling_client(base_model=TINY)
    assert base.compute_logprobs(types.ModelInput.from_ints(tokens)).result()[1:] != scored[1:]


def test_the_async_sdk_drives_the_same_calls(service, tokenizer):
    async def main():
        trainer = await service.create_full_training_client_async(TINY, seed=0)
        tokens = encode_line(tokenizer, "async\n")
        fb = await trainer.forward_backward_async([sft_datum(tokens)], "cross_entropy")
        step = await trainer.optim_step_async(types.AdamParams(learning_rate=1e-3))
        assert fb.request_id and step.request_id
        out, _ = await asyncio.gather(fb, step)
        sampler = await trainer.save_weights_and_get_sampling_client_async("async")
        sample = await sampler.sample_async(types.ModelInput.from_ints(tokens[:2]), 2,
                                            types.SamplingParams(max_tokens=5, seed=1))
        logprobs = await sampler.compute_logprobs_async(types.ModelInput.from_ints(tokens))
        return out, sample, logprobs  # Tinker's sample_async / compute_logprobs_async await to values

    out, sample, logprobs = asyncio.run(main())
    assert out.metrics["loss:sum"] > 0 and len(sample.sequences) == 2
    assert logprobs[0] is None and len(logprobs) == len(encode_line(tokenizer, "async\n"))
