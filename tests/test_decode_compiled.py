"""The compiled decode step of small models (decode_step.py, STILLROOM_COMPILE_DECODE=1): the same
tokens as the eager step and logprobs within 1e-5 (the same ops; inductor fuses the elementwise
ones and may reorder a norm's sum: a few ulps of logprobs of size ~5), with rows joining and
leaving (the batch shrinks to one row) and the cache growing, without recompiling per step.
Compiling costs 10-30 s, so the whole module is in the slow lane; the fast lane checks only that
nothing compiles unless asked. No timing is asserted."""

from __future__ import annotations

import pytest
import torch

from stillroom_server.engine.engine import Engine
from stillroom_server.engine.runtime.scheduler import Job
from stillroom_server.engine.sampling import batching, decode_step
from stillroom_server.engine.types import SampleWork, SamplingConfig

from conftest import TINY


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine(tmp_path_factory.mktemp("decode-compiled"))


def job(opened, prompt: list[int], num_samples: int, max_tokens: int, seed: int, **params) -> Job:
    work = SampleWork(torch.tensor(prompt), num_samples,
                      SamplingConfig(max_tokens=max_tokens, seed=seed, **params))
    return Job(kind="sample", run=None, done=lambda r, e: None, payload=(opened, work))


def decode(engine, plan: dict[int, list[Job]]) -> list:
    stream, done, step, order = batching.DecodeStream(engine), {}, 0, [j for js in plan.values() for j in js]
    while plan or stream.busy():
        stream.add(plan.pop(step, []))
        for finished, result, error in stream.step():
            assert error is None
            done[id(finished)] = result.sequences
        step += 1
    return [done[id(j)] for j in order]


def test_nothing_compiles_unless_asked(engine, monkeypatch):
    monkeypatch.setattr(decode_step, "_compiled", False)
    monkeypatch.setattr(decode_step, "_compiled_fn", None)
    opened = engine.open_sampler(base_model=TINY)
    decode(engine, {0: [job(opened, [1, 40, 41], 2, 4, seed=0)]})
    assert decode_step._compiled_fn is None


@pytest.mark.slow
@pytest.mark.skipif(decode_step._ISA_PINNED, reason="ATEN_CPU_CAPABILITY set: the compiled step is off")
def test_the_compiled_step_samples_what_the_eager_step_does(engine):
    from torch._dynamo.utils import counters

    opened = engine.open_sampler(base_model=TINY)

    def plan():
        return {0: [job(opened, [1, 40, 41, 42], 3, 24, seed=1)],
                3: [job(opened, [1, 50, 51], 2, 6, seed=2, temperature=0.7, top_p=0.9)],   # joins, leaves
                7: [job(opened, [1] + list(range(30, 50)), 1, 40, seed=3)]}   # a longer prompt, last alone
    out = []
    for on in (True, False, True):
        before = decode_step.set_compiled(on)
        try:
            if on and not out:
                counters.clear()
            out.append(decode(engine, plan()))
        finally:
            decode_step.set_compiled(before)
    compiled, eager, again = out
    for got, want in zip(compiled, eager, strict=True):
        for a, b in zip(got, want, strict=True):
            assert a.tokens == b.tokens
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    # the second compiled pass (rows 6 -> 1, the cache 3 -> 60 positions) made no new graph
    assert [[s.tokens for s in r] for r in again] == [[s.tokens for s in r] for r in compiled]
    frames = counters["stats"]["unique_graphs"]
    assert 1 <= frames <= 3, f"{frames} graphs for one model's steps"
