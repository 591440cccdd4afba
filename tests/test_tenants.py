"""The engine under many tenants: rows joining and leaving a running decode, rows of different
LoRA snapshots in one forward, training interleaved at micro-batches with sampling and another
run, idempotent retries, idle runs moved to disk and back, and backpressure. Real weights and a
real server; no timing is asserted."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch

from stillroom import _wire, types
from stillroom._proto import stillroom_pb2 as pb
from stillroom_server.engine import training
from stillroom_server.engine.engine import Engine, LoraSpec
from stillroom_server.engine.runtime.scheduler import Job
from stillroom_server.engine.sampling import batching, compute
from stillroom_server.engine.types import (
    ForwardBackwardWork,
    LogprobsWork,
    OptimWork,
    SampleWork,
    SamplingConfig,
    TrainDatum,
)

from conftest import SMALL, TINY, inline_fixtures
from helpers import checkpoint_tensors, encode_line, sft_datum

# reads the engine's memory or patches its constants: the engine runs in the test process
server, service, tokenizer = inline_fixtures()

ADAM = dict(learning_rate=5e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, grad_clip_norm=0.0)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine(tmp_path_factory.mktemp("tenants-engine"))


def sample_job(opened, prompt: list[int], num_samples: int, max_tokens: int, seed: int) -> Job:
    work = SampleWork(torch.tensor(prompt), num_samples,
                      SamplingConfig(max_tokens=max_tokens, temperature=1.0, seed=seed))
    return Job(kind="sample", run=None, done=lambda r, e: None, payload=(opened, work))


def scored(engine, opened, prompt: list[int], tokens: list[int]) -> list[float]:
    """compute_logprobs of prompt + tokens, for the sampled positions: the sampler alone."""
    work = LogprobsWork(torch.tensor(prompt + tokens))
    return engine.compute_logprobs(opened, [work])[0].logprobs_T[len(prompt):].tolist()


def train_lora(engine, run_id: str, text_tokens: list[int], steps: int) -> None:
    tokens = torch.tensor(text_tokens)
    datum = TrainDatum(tokens[:-1], {"target_tokens": tokens[1:], "weights": torch.ones(len(tokens) - 1)})
    for _ in range(steps):
        engine.forward_backward(run_id, ForwardBackwardWork([datum], "cross_entropy", {}))
        engine.optim_step(run_id, OptimWork(types_adam()))


def types_adam():
    from stillroom_server.engine.types import AdamConfig

    return AdamConfig(**{"learning_rate": ADAM["learning_rate"], "beta1": ADAM["beta1"],
                         "beta2": ADAM["beta2"], "eps": ADAM["eps"],
                         "weight_decay": ADAM["weight_decay"], "grad_clip_norm": ADAM["grad_clip_norm"]})


@pytest.mark.slow
def test_rows_joining_and_leaving_a_running_decode_keep_their_tokens_and_logprobs(engine):
    opened = engine.open_sampler(base_model=TINY)
    long = sample_job(opened, [1, 40, 41, 42], 3, 40, seed=1)
    shorts = [sample_job(opened, [1, 50 + i] * (i + 1), 1, 4, seed=10 + i) for i in range(3)]
    stream = batching.DecodeStream(engine)
    outcomes, sizes = {}, []
    plan = {2: shorts[:1], 5: shorts[1:]}  # they join a decode that is already running
    stream.add([long])
    step = 0
    while stream.busy():
        stream.add(plan.pop(step, []))
        outcomes.update({id(job): (result, error) for job, result, error in stream.step()})
        sizes.append(len(stream.batch.rows) if stream.batch is not None else 0)
        step += 1
    assert max(sizes) > 3, sizes  # the short rows shared the long request's batch
    assert min(s for s in sizes[5:] if s) <= 3, sizes  # ... and left it before the long one ended
    for job in [long, *shorts]:
        result, error = outcomes[id(job)]
        assert error is None
        opened_, work = job.payload
        alone = engine.sample(opened_, [work])[0]
        for got, expected in zip(result.sequences, alone.sequences):
            assert got.tokens == expected.tokens  # the same seed gives the same sample in any batch
            prompt = work.prompt_T.tolist()
            # token-by-token decoding with a KV cache vs one forward over the whole sequence: other
            # kernels and summation orders in every layer (L sqrt(K) u ~1.4e-5 of |logprob| <= 7): 1e-4
            assert got.logprobs == pytest.approx(scored(engine, opened_, prompt, got.tokens), abs=1e-4)


@pytest.mark.slow
def test_rows_of_different_lora_snapshots_share_a_forward_and_see_only_their_own_weights(engine):
    engine.create_run("tenants-lora", TINY, LoraSpec(rank=4), seed=0)
    line = [1, *range(30, 60), 2]
    train_lora(engine, "tenants-lora", line, 3)
    first, _ = engine.save_sampler_weights("tenants-lora", "first")
    train_lora(engine, "tenants-lora", line[::-1], 3)
    second, _ = engine.save_sampler_weights("tenants-lora", "second")
    samplers = [engine.open_sampler(base_model=TINY), engine.open_sampler(model_path=first),
                engine.open_sampler(model_path=second)]
    assert len({engine.batch_group(s) for s in samplers}) == 1  # one stream, one forward per step
    prompt = [1, 30, 31, 32]
    jobs = [sample_job(s, prompt, 2, 12, seed=3) for s in samplers]
    done = batching.run_to_end(batching.DecodeStream(engine), jobs)
    host = engine._lora_hosts[TINY]
    sequences = []
    for opened, job in zip(samplers, jobs):
        result, error = done[id(job)][1:]
        assert error is None
        for sequence in result.sequences:
            tokens = torch.tensor(prompt + sequence.tokens)
            if opened.adapter is None:   # reference: the plain base model
                reference = compute.sequence_logprobs(opened.base.module, [tokens], engine.device)
            else:                        # reference: PEFT with only this adapter active
                with _active(host, opened.adapter):
                    reference = compute.sequence_logprobs(host.model, [tokens], engine.device)
            expected = reference[0][0][len(prompt):].tolist()
            # decoding with a KV cache and mixed adapters vs PEFT's whole-sequence forward: 1e-4 as above;
            # another adapter's weights would move the logprobs by > 1e-3 (asserted below)
            assert sequence.logprobs == pytest.approx(expected, abs=1e-4)
            sequences.append(tokens)
    # the three weights differ, so a row that saw another's adapter would have failed above
    scores = [scored(engine, s, prompt, sequences[0][len(prompt):].tolist()) for s in samplers]
    assert max(abs(a - b) for a, b in zip(scores[1], scores[2])) > 1e-3
    assert max(abs(a - b) for a, b in zip(scores[0], scores[1])) > 1e-3


class _active:
    """Make one adapter the live one for the duration (the engine never does this for sampling)."""

    def __init__(self, host, adapter: str) -> None:
        self.host, self.adapter = host, adapter

    def __enter__(self):
        self.host.model.set_adapter(self.adapter)

    def __exit__(self, *exc):
        return False


@pytest.mark.slow
def test_snapshots_beyond_the_limit_are_unloaded_and_reload_from_their_files(engine, monkeypatch):
    from stillroom_server.engine import engine as engine_module

    monkeypatch.setattr(engine_module, "MAX_LOADED_ADAPTERS", 2)
    engine.create_run("tenants-lru", TINY, LoraSpec(rank=2), seed=1)
    paths = []
    for i in range(4):
        train_lora(engine, "tenants-lru", [1, 40 + i, 41 + i, 2], 1)
        paths.append(engine.save_sampler_weights("tenants-lru", f"lru-{i}")[0])
    prompt_tokens = [1, 40, 41, 42, 43]
    before = {}
    for path in paths:
        opened = engine.open_sampler(model_path=path)
        before[path] = scored(engine, opened, prompt_tokens[:1], prompt_tokens[1:])
    loaded = [n for n in engine._adapters if n.startswith("snap-")]
    assert len(loaded) <= 2
    for path in paths:  # the unloaded ones come back from their files, unchanged
        opened = engine.open_sampler(model_path=path)
        assert scored(engine, opened, prompt_tokens[:1], prompt_tokens[1:]) == before[path]


@pytest.mark.slow
def test_an_unloaded_snapshot_leaves_its_own_base_models_host(engine, monkeypatch):
    """Snapshots of two base models share the limit: loading one of the second base's evicts the
    first base's least recently used, from the first base's host, and both still sample."""
    from stillroom_server.engine import engine as engine_module

    monkeypatch.setattr(engine_module, "MAX_LOADED_ADAPTERS", 1)
    paths = {}
    for base, run in ((TINY, "tenants-two-a"), (SMALL, "tenants-two-b")):
        engine.create_run(run, base, LoraSpec(rank=2), seed=3)
        train_lora(engine, run, [1, 50, 51, 2], 1)
        paths[base] = engine.save_sampler_weights(run, "two-bases")[0]
    prompt_tokens = [1, 50, 51, 52]
    before = {base: scored(engine, engine.open_sampler(model_path=path), prompt_tokens[:1], prompt_tokens[1:])
              for base, path in paths.items()}   # the second one's load unloads the first
    first = engine.open_sampler(model_path=paths[TINY])
    assert first.adapter not in engine._adapters
    assert first.adapter not in engine._lora_hosts[TINY].model.peft_config
    for base, path in paths.items():   # each back from its files, unchanged, in turn
        assert scored(engine, engine.open_sampler(model_path=path), prompt_tokens[:1],
                      prompt_tokens[1:]) == before[base]


@pytest.mark.slow
def test_the_last_adapter_gone_a_new_runs_snapshot_still_samples(tmp_path):
    """A run closed and its loaded snapshot deleted leave the host with no adapter; a new run's
    snapshot, sampled before the run ever trains, works (PEFT kept the deleted one active)."""
    engine = Engine(tmp_path)
    engine.create_run("last-a", TINY, LoraSpec(rank=2), seed=0)
    train_lora(engine, "last-a", [1, 40, 41, 2], 1)
    uri = engine.save_sampler_weights("last-a", "only")[0]
    scored(engine, engine.open_sampler(model_path=uri), [1, 40], [41])
    engine.close_run("last-a")
    engine.delete_checkpoint(uri)
    engine.create_run("last-b", TINY, LoraSpec(rank=2), seed=1)
    snapshot = engine.open_sampler(model_path=engine.save_sampler_weights("last-b", "first")[0])
    base = engine.open_sampler(base_model=TINY)
    jobs = [sample_job(snapshot, [1, 40], 2, 3, seed=1), sample_job(base, [1, 41], 1, 3, seed=2)]
    done = {}
    stream = batching.DecodeStream(engine)
    stream.add(jobs)
    while stream.busy():
        for job, result, error in stream.step():
            assert error is None, error
            done[id(job)] = result
    assert len(done) == 2
    train_lora(engine, "last-b", [1, 40, 41, 2], 1)   # and the run trains after it


# ------------------------------------------------------------------------------------ through a server

@pytest.mark.slow
def test_interleaved_training_keeps_each_runs_order_and_retries_apply_once(server, service, tokenizer,
                                                                           monkeypatch):
    monkeypatch.setattr(training, "MICROBATCH_TOKENS", 48)  # several micro-batches per call
    data = [sft_datum(encode_line(tokenizer, f"line {i} of the tenants test\n")) for i in range(6)]
    adam = types.AdamParams(learning_rate=1e-2)

    def steps(trainer) -> list[float]:
        futures = []
        for _ in range(3):  # pipelined: every request sent before any is awaited
            futures.append(trainer.forward_backward(data, "cross_entropy"))
            futures.append(trainer.optim_step(adam))
        return [f.result().metrics["loss:sum"] for f in futures[::2]]

    reference = steps(service.create_lora_training_client(TINY, rank=4, seed=5))
    a, b = (service.create_lora_training_client(TINY, rank=4, seed=5) for _ in range(2))
    sampler = service.create_sampling_client(base_model=TINY)
    results: dict[str, list[float]] = {}
    threads = [threading.Thread(target=lambda n=n, t=t: results.__setitem__(n, steps(t)))
               for n, t in (("a", a), ("b", b))]
    for thread in threads:
        thread.start()
    for i in range(4):  # short requests run between the runs' micro-batches
        sampler.compute_logprobs(types.ModelInput.from_ints([1, 40 + i, 41])).result()
    for thread in threads:
        thread.join()
    # the same micro-batches in the same order, other requests between them: bit-equal losses (1e-5 is
    # below one ulp of these sums of ~100 logprobs)
    assert results["a"] == pytest.approx(reference, abs=1e-5)
    assert results["b"] == pytest.approx(reference, abs=1e-5)

    # a retried request number answers with the first request and changes nothing
    connection = a._connection
    fb = pb.ForwardBackwardRequest(training_run_id=a.training_run_id, seq=a._next_seq,
                                   data=[_wire.datum_to_pb(data[0])], loss_fn="cross_entropy")
    first = connection.run(connection.call("ForwardBackward", fb))
    again = connection.run(connection.call("ForwardBackward", fb))
    assert first.request_id == again.request_id


def test_an_idle_run_moved_to_disk_comes_back_to_the_same_logprobs(server, service, tokenizer):
    data = [sft_datum(encode_line(tokenizer, "moved to disk and back\n"))]
    adam = types.AdamParams(learning_rate=1e-2)

    def two_steps(trainer) -> None:
        for _ in range(2):
            trainer.forward_backward(data, "cross_entropy")
            trainer.optim_step(adam).result()

    kept = service.create_lora_training_client(TINY, rank=4, seed=9)
    two_steps(kept)
    budget = server.engine.run_memory_bytes
    server.engine.run_memory_bytes = 1  # every idle run but the one in use moves to disk
    try:
        moved = service.create_lora_training_client(TINY, rank=4, seed=9)
        two_steps(moved)
        other = service.create_lora_training_client(TINY, rank=4, seed=3)
        two_steps(other)  # `moved` is idle and least recently used: it goes to disk
        assert moved.training_run_id in server.engine._spilled
        two_steps(moved)  # comes back, with its AdamW moments
        two_steps(kept)
    finally:
        server.engine.run_memory_bytes = budget
    expected = kept.forward(data, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
    got = moved.forward(data, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
    # to disk and back is exact (safetensors of the fp32 weights and moments), so are the same steps after
    # it: bit-equal; 1e-6 is two ulps of slack
    assert got == pytest.approx(expected, abs=1e-6)
    a = checkpoint_tensors(server, moved.save_weights_for_sampler("after-disk").result().path)
    b = checkpoint_tensors(server, kept.save_weights_for_sampler("never-moved").result().path)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_burst_beyond_the_queue_is_refused_then_retried_by_the_sdk(server, service):
    sampler = service.create_sampling_client(base_model=TINY)
    limit = server.engines.max_outstanding
    server.engines.max_outstanding = 4
    try:
        futures = [sampler.sample(types.ModelInput.from_ints([1, 40]), 1,
                                  types.SamplingParams(max_tokens=2, seed=i)) for i in range(24)]
        results = [f.result() for f in futures]  # none failed: refusals were waited out and retried
    finally:
        server.engines.max_outstanding = limit
    assert all(len(r.sequences) == 1 for r in results)
    connection = sampler._connection
    server.engines.max_outstanding = 0  # a full queue: the refusal names the limit and says when
    try:
        stub_call = connection.stub.Sample
        request = pb.SampleRequest(sampling_session_id=sampler.sampling_session_id, num_samples=1,
                                   prompt=_wire.model_input_to_pb(types.ModelInput.from_ints([1, 40])),
                                   sampling_params=_wire.sampling_params_to_pb(types.SamplingParams(max_tokens=2)))
        async def once():
            return await stub_call(request, metadata=connection._metadata)

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            connection.run(once())
    finally:
        server.engines.max_outstanding = limit
    error = refused.value
    assert error.code().name == "RESOURCE_EXHAUSTED" and "queue" in str(error.details())
    assert dict(error.trailing_metadata())["retry-after-ms"] == "500"
