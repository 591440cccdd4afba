"""The per-request path: calls sent together in one `Submit` keep every contract of the unary calls
(each gets its own result, a refusal is one item's alone, a run's numbered calls keep their order,
a resent Submit applies nothing twice, results outlive a lost stream); live runs count their bytes
against the owner's budget; finishing a session waits for its runs' work. Real server, no timing."""

from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import replace

import pytest

import stillroom
from stillroom import _wire, types
from stillroom._proto import stillroom_pb2 as pb
from stillroom_server.engine import training
from stillroom_server.engine.engine import LoraSpec

from conftest import TINY, inline_fixtures
from helpers import encode_line, sft_datum

# reads the engine's memory or patches its constants: the engine runs in the test process
server, service, tokenizer = inline_fixtures()

PROMPT = types.ModelInput.from_ints([1, 40, 41, 42])


def submit(connection, items: list[pb.SubmitItem]) -> tuple[list[pb.SubmitAccepted],
                                                           dict[str, pb.FutureResult]]:
    """Send one raw Submit; return its answers and every result its stream brought back."""

    async def run():
        stream = connection.stub.Submit(pb.SubmitRequest(items=items), metadata=connection.metadata)
        events = [event async for event in stream]
        return list(events[0].accepted), {e.result.request_id: e.result for e in events[1:]}

    return connection.run(run(), timeout=120)


def on_loop(server, coroutine):
    """Run a core call on the server's own event loop (where the transports call it)."""
    return asyncio.run_coroutine_threadsafe(coroutine, server._loop).result(120)


def test_calls_sent_together_each_get_their_own_result(service):
    sampler = service.create_sampling_client(base_model=TINY)
    requests = [(i % 3 + 1, types.SamplingParams(max_tokens=4 + i % 5, temperature=1.0, seed=100 + i))
                for i in range(24)]
    alone = [sampler.sample(PROMPT, n, p).result() for n, p in requests]
    futures = [sampler.sample(PROMPT, n, p) for n, p in requests]  # sent at once: a few Submits
    logprobs = [sampler.compute_logprobs(types.ModelInput.from_ints([1, 40 + i, 41])) for i in range(8)]
    together = [f.result() for f in futures]
    for a, b in zip(alone, together):
        assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
        assert len({s.sequence_id for s in b.sequences}) == len(b.sequences)
    # batched with others: other summation orders, a few ulps (~5e-7 at |logprob| ~5) apart; 1e-5 is 20
    for i, future in enumerate(logprobs):
        alone_logprobs = sampler.compute_logprobs(types.ModelInput.from_ints([1, 40 + i, 41])).result()
        assert future.result()[1:] == pytest.approx(alone_logprobs[1:], abs=1e-5)


def test_a_refused_item_is_refused_alone(service):
    sampler = service.create_sampling_client(base_model=TINY)
    good = pb.SampleRequest(sampling_session_id=sampler.sampling_session_id, num_samples=2,
                            prompt=_wire.model_input_to_pb(PROMPT),
                            sampling_params=_wire.sampling_params_to_pb(types.SamplingParams(max_tokens=3)))
    unknown = pb.SampleRequest()
    unknown.CopyFrom(good)
    unknown.sampling_session_id = "samp-nope"
    too_many = pb.SampleRequest()
    too_many.CopyFrom(good)
    too_many.num_samples = 10**6
    score = pb.ComputeLogprobsRequest(sampling_session_id=sampler.sampling_session_id,
                                      prompt=_wire.model_input_to_pb(PROMPT))
    accepted, results = submit(sampler._connection, [
        pb.SubmitItem(sample=good), pb.SubmitItem(sample=unknown), pb.SubmitItem(sample=too_many),
        pb.SubmitItem(compute_logprobs=score), pb.SubmitItem()])
    assert [bool(a.request_id) for a in accepted] == [True, False, False, True, False]
    assert accepted[1].refused.code == "NOT_FOUND" and "samp-nope" in accepted[1].refused.message
    assert accepted[2].refused.code == "INVALID_ARGUMENT" and "num_samples" in accepted[2].refused.message
    assert accepted[4].refused.code == "INVALID_ARGUMENT" and "items" in accepted[4].refused.message
    assert set(results) == {accepted[0].request_id, accepted[3].request_id}
    assert all(r.status == pb.DONE for r in results.values())
    assert len(results[accepted[0].request_id].sample.sequences) == 2


def test_numbered_calls_in_a_submit_run_in_order_and_a_resent_submit_applies_once(service, tokenizer):
    data = [sft_datum(encode_line(tokenizer, "sent together, applied once\n"))]
    adam = types.AdamParams(learning_rate=1e-2)
    reference = service.create_lora_training_client(TINY, rank=4, seed=11)
    reference.forward_backward(data, "cross_entropy")
    reference.optim_step(adam).result()

    trainer = service.create_lora_training_client(TINY, rank=4, seed=11)
    run_id, seq = trainer.training_run_id, trainer._next_seq
    items = [pb.SubmitItem(forward_backward=pb.ForwardBackwardRequest(
                 training_run_id=run_id, seq=seq, data=[_wire.datum_to_pb(d) for d in data],
                 loss_fn="cross_entropy")),
             pb.SubmitItem(optim_step=pb.OptimStepRequest(
                 training_run_id=run_id, seq=seq + 1, adam_params=_wire.adam_params_to_pb(adam)))]
    accepted, results = submit(trainer._connection, items)
    again, results_again = submit(trainer._connection, items)  # a client's retry of the whole Submit
    assert [a.request_id for a in again] == [a.request_id for a in accepted]
    assert results_again == results
    assert [results[a.request_id].status for a in accepted] == [pb.DONE, pb.DONE]
    trainer._next_seq = seq + 2
    assert trainer.get_info().training_run_id == run_id
    expected = reference.forward(data, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
    got = trainer.forward(data, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
    # one step applied, not two (a second would move them by ~1e-2); the same sums: bit-equal, 1e-6 slack
    assert got == pytest.approx(expected, abs=1e-6)


def test_results_outlive_a_lost_stream_and_are_polled_by_id(service):
    sampler = service.create_sampling_client(base_model=TINY)
    connection = sampler._connection
    request = pb.SampleRequest(sampling_session_id=sampler.sampling_session_id, num_samples=4,
                               prompt=_wire.model_input_to_pb(PROMPT),
                               sampling_params=_wire.sampling_params_to_pb(
                                   types.SamplingParams(max_tokens=16, seed=3)))

    async def accept_then_hang_up() -> str:
        stream = connection.stub.Submit(pb.SubmitRequest(items=[pb.SubmitItem(sample=request)]),
                                        metadata=connection.metadata)
        first = await stream.read()
        stream.cancel()
        return first.accepted[0].request_id

    request_id = connection.run(accept_then_hang_up())
    result = connection.run(connection.wait_for(request_id), timeout=120)
    assert result.status == pb.DONE and len(result.sample.sequences) == 4


def test_live_runs_count_their_bytes_against_the_owners_budget(server, service):
    core = server.service
    first = service.create_lora_training_client(TINY, rank=4, seed=1)
    size = core.run_bytes[first.training_run_id]
    assert size > 0
    held = core.live_bytes("local")
    limits = core.limits
    runs = len(server.engine.runs)
    total = service.create_rest_client().list_training_runs().result().cursor.total_count
    try:
        core.limits = replace(limits, max_live_bytes_per_owner=held + size // 2)  # not room for one more
        with pytest.raises(stillroom.RateLimitError, match="budget of .* MiB per owner") as refused:
            service.create_lora_training_client(TINY, rank=4, seed=2)
        assert "a new run needs" in str(refused.value)
        core.limits = replace(limits, max_live_bytes_per_owner=held)  # full: refused before any work
        with pytest.raises(stillroom.RateLimitError, match="stated at start"):
            service.create_lora_training_client(TINY, rank=4, seed=2)
    finally:
        core.limits = limits
    assert len(server.engine.runs) == runs  # the refused runs left nothing behind
    assert service.create_rest_client().list_training_runs().result().cursor.total_count == total
    assert core.live_bytes("local") == held
    first.forward_backward([sft_datum([1, 40, 41, 42])], "cross_entropy").result()  # the first trains on


@pytest.mark.slow
def test_finishing_a_session_waits_for_its_runs_work(server, service, tokenizer, monkeypatch):
    monkeypatch.setattr(training, "MICROBATCH_TOKENS", 48)  # many micro-batches: the call parks often
    core = server.service

    async def make_run():
        session = core.create_client_session("local", [], None)
        info = await core.create_run("local", TINY, LoraSpec(4, True, True, False), 3, client_session=session)
        return session, info.training_run_id

    session, run_id = on_loop(server, make_run())
    info = service._connection.run(service._connection.call(
        "GetTrainingRun", pb.GetTrainingRunRequest(training_run_id=run_id)))
    trainer = stillroom.TrainingClient(service, info)
    data = [sft_datum(encode_line(tokenizer, f"line {i} finishes before its session\n")) for i in range(16)]
    fb = trainer.forward_backward(data, "cross_entropy")
    fb._submitted.result(60)
    on_loop(server, core.finish_client_session("local", session, "done"))
    assert fb.result(60).metrics["loss:sum"] > 0  # it ran to its end before the run was closed
    assert run_id not in server.engine.runs
    with pytest.raises(stillroom.FailedPreconditionError):
        trainer.optim_step(types.AdamParams()).result(60)


@pytest.mark.slow
def test_unload_frees_a_run_after_its_queued_work_and_its_save_resumes_it(server, service, tokenizer):
    core = server.service
    trainer = service.create_lora_training_client(TINY, rank=4, seed=6)
    run_id = trainer.training_run_id
    data = [sft_datum(encode_line(tokenizer, f"line {i} before the unload\n")) for i in range(4)]
    trainer.forward_backward(data, "cross_entropy")
    trainer.optim_step(types.AdamParams(learning_rate=1e-2))
    state = trainer.save_state("before-unload").result(60).path
    held = core.live_bytes("local")
    queued = trainer.forward(data, "cross_entropy")
    trainer.unload()                                      # after the forward queued before it
    assert queued.result(60).metrics["loss:sum"] > 0
    assert not core.is_live(run_id) and run_id not in server.engine.runs
    assert core.live_bytes("local") < held
    with pytest.raises(stillroom.FailedPreconditionError, match="before-unload"):
        trainer.forward(data, "cross_entropy").result(60)
    trainer.unload()                                      # a second unload changes nothing
    resumed = service.create_training_client_from_state(state)   # the same weights and batch: bit-equal
    assert resumed.forward(data, "cross_entropy").result(60).metrics["loss:sum"] == pytest.approx(
        queued.result().metrics["loss:sum"], abs=1e-6)
    with pytest.raises(stillroom.NotFoundError):
        stillroom.TrainingClient(service, pb.TrainingRunInfo(training_run_id="no-such-run")).unload()


def test_a_burst_of_calls_goes_in_a_few_submits(service, monkeypatch):
    from stillroom import _submit

    sent: list[int] = []
    real = _submit.Submitter._open

    async def counting(self, batch):
        sent.append(len(batch))
        return await real(self, batch)

    monkeypatch.setattr(_submit.Submitter, "_open", counting)
    sampler = service.create_sampling_client(base_model=TINY)
    params = types.SamplingParams(max_tokens=2, seed=0)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # made off the connection's loop, as users do
        futures = pool.submit(lambda: [sampler.sample(PROMPT, 1, params) for _ in range(300)]).result()
    assert all(len(f.result(120).sequences) == 1 for f in futures)
    assert sum(sent) == 300 and max(sent) <= _submit.MAX_ITEMS
    assert len(sent) < 300  # not one message per call


def test_against_a_server_without_submit_the_sdk_sends_each_call_on_its_own(server, monkeypatch):
    from stillroom import _submit, errors

    async def unimplemented(self, batch):
        raise errors.error_for("UNIMPLEMENTED", "Method not found!")  # what an older server answers

    monkeypatch.setattr(_submit.Submitter, "_open", unimplemented)
    with stillroom.ServiceClient(base_url=server.address, api_key=server.local_api_key) as client:
        sampler = client.create_sampling_client(base_model=TINY)
        futures = [sampler.sample(PROMPT, 2, types.SamplingParams(max_tokens=3, seed=i)) for i in range(6)]
        assert all(len(f.result(60).sequences) == 2 for f in futures)
        assert client._connection.submitter().unary
        trainer = client.create_lora_training_client(TINY, rank=4, seed=0)
        trainer.forward_backward([sft_datum([1, 40, 41, 42])], "cross_entropy")
        assert trainer.optim_step(types.AdamParams(learning_rate=1e-3)).result(60).metrics
        sampler.sampling_session_id = "samp-nope"  # a refusal still comes back as the call's error
        with pytest.raises(stillroom.NotFoundError, match="samp-nope"):
            sampler.sample(PROMPT, 1, types.SamplingParams(max_tokens=1)).result(60)
