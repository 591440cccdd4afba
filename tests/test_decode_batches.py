"""The decode loop's fast paths give the samples of the plain ones: a KV cache grown in place (with
rows joining and leaving) samples what a concatenated one does, and rows of LoRA snapshots in
uneven groups, beside base rows and with prompts of different lengths, see only their own adapter
(and rows joining in any order are kept one block per adapter, read as a slice of the batch, or
with one torch thread through the segmented C kernel);
a small request decoding in the express batch beside a large one samples what it would alone.
Engine-level, real weights; no timing is asserted."""

from __future__ import annotations

import contextlib

import pytest
import torch

from stillroom_server.engine.engine import Engine, LoraSpec
from stillroom_server.engine.kernels import segment_kernel
from stillroom_server.engine.runtime.scheduler import Job
from stillroom_server.engine.sampling import batching, compute, kv_cache, sampler
from stillroom_server.engine.types import (
    AdamConfig,
    ForwardBackwardWork,
    OptimWork,
    SampleWork,
    SamplingConfig,
    TrainDatum,
)

from conftest import TINY


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine(tmp_path_factory.mktemp("decode-batches"))


def job(opened, prompt: list[int], num_samples: int, max_tokens: int, seed: int) -> Job:
    work = SampleWork(torch.tensor(prompt), num_samples,
                      SamplingConfig(max_tokens=max_tokens, temperature=1.0, seed=seed))
    return Job(kind="sample", run=None, done=lambda r, e: None, payload=(opened, work))


def decode(engine, plan: dict[int, list[Job]]) -> dict[int, list]:
    """Step one stream, adding `plan[step]`'s jobs at that step; each job's sequences."""
    stream, done, step = batching.DecodeStream(engine), {}, 0
    while plan or stream.busy():
        stream.add(plan.pop(step, []))
        for finished, result, error in stream.step():
            assert error is None
            done[id(finished)] = result.sequences
        step += 1
    return done


def test_a_cache_grown_in_place_samples_what_a_concatenated_one_does(engine, monkeypatch):
    opened = engine.open_sampler(base_model=TINY)

    def jobs() -> dict[int, list[Job]]:
        return {0: [job(opened, [1, 40, 41, 42], 3, 30, seed=1)],
                3: [job(opened, [1, 50, 51], 2, 6, seed=2)],          # joins, leaves early
                7: [job(opened, [1] + list(range(30, 50)), 1, 12, seed=3)]}   # a longer prompt

    def sequences(plan: dict[int, list[Job]]) -> list:
        order = [j for step in sorted(plan) for j in plan[step]]
        done = decode(engine, plan)
        return [done[id(j)] for j in order]

    concatenated = sequences(jobs())
    # (the KV cache in other buffers: attention over other shapes, a few ulps apart; 1e-5 is 20 ulps)
    monkeypatch.setattr(kv_cache, "CONTIGUOUS_BYTES", 0)   # every layer in buffers from the start
    monkeypatch.setattr(kv_cache, "GROW", 2)               # and out of room every few steps
    grown = sequences(jobs())
    for expected_request, got_request in zip(concatenated, grown, strict=True):
        for expected, got in zip(expected_request, got_request, strict=True):
            assert got.tokens == expected.tokens
            assert got.logprobs == pytest.approx(expected.logprobs, abs=1e-5)


@pytest.mark.slow
def test_a_small_request_decoding_beside_a_large_batch_samples_what_it_does_alone(engine):
    opened = engine.open_sampler(base_model=TINY)
    large = job(opened, [1, 40, 41, 42], 16, 60, seed=1)
    small = job(opened, [1, 50, 51], 1, 8, seed=2)             # 1 row beside 16: the express batch
    stream, done, step, beside = batching.DecodeStream(engine), {}, 0, 0
    stream.add([large])
    while stream.busy():
        stream.add([small] if step == batching.EXPRESS_AFTER + 2 else [])
        for finished, result, error in stream.step():
            assert error is None
            done[id(finished)] = result.sequences
        beside += stream.express is not None and len(stream.express.rows) > 0
        owners = {id(row.owner) for row in stream.batch.rows} if stream.batch is not None else set()
        assert not {id(large), id(small)} <= owners    # the small rows never rode the large batch
        step += 1
    assert beside > 0
    for request in (large, small):
        alone = decode(engine, {0: [job(opened, request.payload[1].prompt_T.tolist(),
                                        request.payload[1].num_samples,
                                        request.payload[1].params.max_tokens,
                                        request.payload[1].params.seed)]})
        expected = next(iter(alone.values()))
        for got, want in zip(done[id(request)], expected, strict=True):
            assert got.tokens == want.tokens   # (the logprobs: other batches, a few ulps apart; 1e-5 is 20)
            assert got.logprobs == pytest.approx(want.logprobs, abs=1e-5)


def train(engine, run_id: str, tokens: list[int], steps: int) -> None:
    seq = torch.tensor(tokens)
    datum = TrainDatum(seq[:-1], {"target_tokens": seq[1:], "weights": torch.ones(len(tokens) - 1)})
    adam = AdamConfig(learning_rate=5e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0,
                      grad_clip_norm=0.0)
    for _ in range(steps):
        engine.forward_backward(run_id, ForwardBackwardWork([datum], "cross_entropy", {}))
        engine.optim_step(run_id, OptimWork(adam))


@pytest.mark.slow
def test_adapter_rows_in_uneven_groups_see_only_their_own_weights(engine):
    engine.create_run("decode-a", TINY, LoraSpec(rank=4), seed=0)
    engine.create_run("decode-b", TINY, LoraSpec(rank=2, train_mlp=False), seed=1)  # other rank, layers
    train(engine, "decode-a", [1, *range(30, 60), 2], 3)
    train(engine, "decode-b", [1, *range(60, 30, -1), 2], 3)
    paths = [engine.save_sampler_weights(run, "snap")[0] for run in ("decode-a", "decode-b")]
    train(engine, "decode-a", [1, *range(40, 70), 2], 3)
    paths.append(engine.save_sampler_weights("decode-a", "later")[0])
    snapshots = [engine.open_sampler(model_path=path) for path in paths]
    base = engine.open_sampler(base_model=TINY)
    decode(engine, {0: [job(s, [1, 30], 1, 1, seed=0) for s in snapshots]})   # all three seen lately
    jobs = [job(snapshots[0], [1, 30, 31], 3, 16, seed=4),   # outlives the others: alone at the end
            job(base, [1, 30, 31, 32, 33], 2, 6, seed=5),
            job(snapshots[1], [1, 30], 1, 6, seed=6),        # the third snapshot is absent: an empty group
            job(snapshots[0], [1, 44, 45, 46, 47, 48], 1, 6, seed=7)]   # joins the running batch
    done = decode(engine, {0: jobs[:3], 2: jobs[3:]})
    assert_own_adapter_logprobs(engine, jobs, done)


@pytest.mark.slow
def test_adapter_rows_through_the_segmented_kernel_see_only_their_own_weights(engine, monkeypatch):
    """With one torch thread, decode steps of rows in uneven groups (one block per adapter) go
    through the segmented kernel, and every logprob is still its own adapter's alone."""
    if not segment_kernel.available():
        pytest.skip("no C compiler built the segmented kernel")
    engine.create_run("kernel-a", TINY, LoraSpec(rank=4), seed=4)
    engine.create_run("kernel-b", TINY, LoraSpec(rank=3), seed=5)
    train(engine, "kernel-a", [1, *range(35, 65), 2], 2)
    train(engine, "kernel-b", [1, *range(65, 35, -1), 2], 2)
    snapshots = [engine.open_sampler(model_path=engine.save_sampler_weights(run, "kernel")[0])
                 for run in ("kernel-a", "kernel-b")]
    base = engine.open_sampler(base_model=TINY)
    calls = []
    original = segment_kernel.matmul

    def counted(*args, **kwargs):
        calls.append(args[2])
        return original(*args, **kwargs)

    monkeypatch.setattr(segment_kernel, "matmul", counted)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        jobs = [job(snapshots[0], [1, 30, 31], 3, 14, seed=21),
                job(base, [1, 33, 34], 2, 8, seed=22),
                job(snapshots[1], [1, 40], 2, 10, seed=23),
                job(snapshots[1], [1, 50, 51, 52], 1, 6, seed=24)]   # joins: groups of 3 and 3
        done = decode(engine, {0: jobs[:3], 2: jobs[3:]})
    finally:
        torch.set_num_threads(threads)
    assert_own_adapter_logprobs(engine, jobs, done)
    assert any(len(set(e - b for b, e in zip(s.begin, s.end))) > 1 for s in calls), \
        "no decode step sent uneven groups through the kernel"


def assert_own_adapter_logprobs(engine, jobs: list[Job], done: dict[int, list]) -> None:
    """Every sampled sequence's logprobs are those of its own adapter alone (PEFT's forward)."""
    host = engine._lora_hosts[TINY]
    assert host.model is not None
    for request in jobs:
        opened, work = request.payload
        prompt = work.prompt_T.tolist()
        for sequence in done[id(request)]:
            tokens = torch.tensor(prompt + sequence.tokens)
            if opened.adapter is None:
                reference = compute.sequence_logprobs(opened.base.module, [tokens], engine.device)
            else:   # PEFT's own forward with only this adapter live
                host.model.set_adapter(opened.adapter)
                reference = compute.sequence_logprobs(host.model, [tokens], engine.device)
            # decoding with a KV cache and the segmented kernel vs PEFT's whole-sequence forward: other
            # kernels and orders in every layer (L sqrt(K) u ~1.4e-5 of |logprob| <= 7): 1e-4
            assert sequence.logprobs == pytest.approx(reference[0][0][len(prompt):].tolist(), abs=1e-4)


@pytest.mark.slow
def test_rows_joining_in_any_order_are_grouped_by_adapter_and_read_as_one_slice(engine):
    """Requests join a running batch in an order unlike the adapters'; the batch keeps one block
    per adapter after the base rows, so the LoRA layers read the groups as a slice of the batch."""
    for run, seed in (("slice-a", 2), ("slice-b", 3)):
        engine.create_run(run, TINY, LoraSpec(rank=4), seed=seed)
        train(engine, run, [1, *range(30 + seed, 60 + seed), 2], 2)
    snapshots = [engine.open_sampler(model_path=engine.save_sampler_weights(run, "slice")[0])
                 for run in ("slice-b", "slice-a")]   # adapter names sort the other way round
    base = engine.open_sampler(base_model=TINY)
    decode(engine, {0: [job(s, [1, 30], 1, 1, seed=0) for s in snapshots]})   # both seen lately
    jobs = [job(snapshots[0], [1, 30, 31], 2, 12, seed=8),
            job(base, [1, 33], 2, 12, seed=9),
            job(snapshots[1], [1, 40, 41, 42], 2, 12, seed=10),
            job(snapshots[0], [1, 50], 1, 12, seed=11),     # joins later: groups of 3 and 2, padded
            job(snapshots[1], [1, 52, 53], 1, 12, seed=12)]  # ... then 3 and 3: a slice again
    host = engine._lora_hosts[TINY]
    plans = []   # (the rows' adapters, the plan their LoRA layers used), per forward
    original = host.mixed.rows

    @contextlib.contextmanager
    def recording(names):
        with original(names):
            plans.append((list(names), host.mixed.plan))
            yield

    host.mixed.rows = recording
    try:
        done = decode(engine, {0: jobs[:3], 2: jobs[3:4], 3: jobs[4:]})
    finally:
        del host.mixed.rows
    assert_own_adapter_logprobs(engine, jobs, done)
    for names, _ in plans:   # base rows first, then one block per adapter in name order
        assert names == sorted(names, key=lambda n: (n != "__base__", n))
    assert any(plan.index_G is None and plan.start > 0 and len(plan.adapters) == 2
               for names, plan in plans), "no step read base rows and two equal groups as a slice"


def test_two_sorted_batches_merge_in_runs_of_one_batch_each():
    runs = sampler._merge_runs(["a", "b", "b", "d"], ["b", "c", "c", "e"])
    assert runs == [(0, 0, 3), (1, 0, 3), (0, 3, 4), (1, 3, 4)]   # ties: the running batch's rows first
    mine, theirs = torch.tensor([0, 1, 2, 3]), torch.tensor([10, 11, 12, 13])
    assert sampler._interleave(mine, theirs, runs).tolist() == [0, 1, 2, 10, 11, 12, 3, 13]
    assert sampler._merge_runs([], ["x"]) == [(1, 0, 1)]
