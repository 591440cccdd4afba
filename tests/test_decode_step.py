"""The decode step without Hugging Face's glue (engine/sampling/decode_step.py) samples what the model's own
forward does: base rows and LoRA rows of two snapshots, rows joining and leaving a running batch,
prompts of different lengths (a left-padded cache); the packed linears joined (q/k/v, gate/up) give
each linear's own outputs; the batch-invariant mode and autocast keep the model's forward.
Engine-level, real weights; no timing is asserted. Tolerances: the two paths run the same ops in the
same order on the same tensors (bitwise equal where measured); 1e-5 leaves room for another kernel
choice between a 2-D and a 3-D input (a few ulps of logprobs of size ~5)."""

from __future__ import annotations

import pytest
import torch

from stillroom_server.engine.engine import Engine, LoraSpec
from stillroom_server.engine.kernels import batch_invariant, packed_linear
from stillroom_server.engine.runtime.scheduler import Job
from stillroom_server.engine.sampling import batching, decode_step
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
    return Engine(tmp_path_factory.mktemp("decode-step"))


def job(opened, prompt: list[int], num_samples: int, max_tokens: int, seed: int) -> Job:
    work = SampleWork(torch.tensor(prompt), num_samples,
                      SamplingConfig(max_tokens=max_tokens, temperature=1.0, seed=seed))
    return Job(kind="sample", run=None, done=lambda r, e: None, payload=(opened, work))


def decode(engine, plan: dict[int, list[Job]]) -> list:
    """Step one stream, adding `plan[step]`'s jobs at that step; every job's sequences, in order."""
    stream, done, step, order = batching.DecodeStream(engine), {}, 0, [j for js in plan.values() for j in js]
    while plan or stream.busy():
        stream.add(plan.pop(step, []))
        for finished, result, error in stream.step():
            assert error is None
            done[id(finished)] = result.sequences
        step += 1
    return [done[id(j)] for j in order]


def assert_same(fast: list, slow: list) -> None:
    for got, want in zip(fast, slow, strict=True):
        for a, b in zip(got, want, strict=True):
            assert a.tokens == b.tokens
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def both(engine, plan) -> tuple[list, list]:
    out = []
    for on in (True, False):
        decode_step.set_enabled(on)
        try:
            out.append(decode(engine, plan()))
        finally:
            decode_step.set_enabled(True)
    return out[0], out[1]


def test_base_rows_joining_and_leaving_sample_what_the_models_forward_does(engine):
    opened = engine.open_sampler(base_model=TINY)
    assert decode_step.plan(engine.batch_model(opened, lora=False), ["__base__"]) is not None

    def plan():
        return {0: [job(opened, [1, 40, 41, 42], 3, 24, seed=1)],
                3: [job(opened, [1, 50, 51], 2, 6, seed=2)],                  # joins, leaves early
                7: [job(opened, [1] + list(range(30, 50)), 1, 12, seed=3)]}   # a longer prompt
    assert_same(*both(engine, plan))


def test_lora_rows_of_two_snapshots_beside_base_rows_sample_what_the_hosts_forward_does(engine):
    seq = torch.tensor([1, *range(30, 60), 2])
    datum = TrainDatum(seq[:-1], {"target_tokens": seq[1:], "weights": torch.ones(len(seq) - 1)})
    adam = AdamConfig(5e-2, 0.9, 0.95, 1e-8, 0.0, 0.0)
    paths = []
    for run, rank in (("step-a", 4), ("step-b", 2)):
        engine.create_run(run, TINY, LoraSpec(rank=rank), seed=rank)
        for _ in range(2):
            engine.forward_backward(run, ForwardBackwardWork([datum], "cross_entropy", {}))
            engine.optim_step(run, OptimWork(adam))
        paths.append(engine.save_sampler_weights(run, "snap")[0])
    a, b = (engine.open_sampler(model_path=p) for p in paths)
    base = engine.open_sampler(base_model=TINY)
    lora_model = engine.batch_model(a, lora=True)
    assert decode_step.plan(lora_model, ["__base__", a.adapter]) is not None

    def plan():
        return {0: [job(a, [1, 30, 31], 3, 16, seed=4), job(base, [1, 30, 31, 32, 33], 2, 6, seed=5)],
                2: [job(b, [1, 44, 45, 46, 47, 48], 2, 8, seed=7)]}
    assert_same(*both(engine, plan))


def test_the_batch_invariant_mode_and_autocast_keep_the_models_forward(engine):
    module = engine.batch_model(engine.open_sampler(base_model=TINY), lora=False)
    assert decode_step.plan(module, ["__base__"]) is not None
    with batch_invariant.BatchInvariant():
        assert decode_step.plan(module, ["__base__"]) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert decode_step.plan(module, ["__base__"]) is None


@pytest.mark.skipif(not packed_linear.AVAILABLE, reason="no oneDNN linear ops in this torch")
def test_joined_packed_linears_give_each_linears_own_outputs():
    torch.manual_seed(0)
    linears = tuple(torch.nn.Linear(96, width, bias=False).requires_grad_(False) for width in (96, 32, 32))
    for linear in linears:
        linear.__class__ = packed_linear.PackedLinear
    x = torch.randn(8, 1, 96)
    with torch.inference_mode():
        joined = packed_linear.fused(linears, x)
        assert joined is not None
        for got, linear in zip(joined.split([96, 32, 32], dim=-1), linears):
            # the same dot products; oneDNN may block them differently: fp32 rounding of 96 terms
            torch.testing.assert_close(got, torch.nn.functional.linear(x, linear.weight),
                                       rtol=1e-5, atol=1e-6)
        linears[1].weight.add_(1.0)   # a weight changed in place: the joined copy is remade
        again = packed_linear.fused(linears, x)
        assert again is not None
        torch.testing.assert_close(again[..., 96:128], torch.nn.functional.linear(x, linears[1].weight),
                                   rtol=1e-5, atol=1e-5)
    assert packed_linear.fused(linears, x) is None   # outside inference mode (grad enabled): no packed path
