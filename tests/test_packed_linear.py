"""Inference linears on prepacked weights (packed_linear.py): taken only where nothing can notice
(no gradient recorded, frozen fp32 weights, 2..MAX_ROWS rows, not in autocast or the batch-invariant
mode), remade when a weight changes in place, and sampling through them gives the tokens of
`F.linear` with logprobs within rounding. Engine-level; no timing is asserted."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stillroom_server.engine.engine import Engine
from stillroom_server.engine.kernels import packed_linear
from stillroom_server.engine.kernels.batch_invariant import BatchInvariant
from stillroom_server.engine.types import SampleWork, SamplingConfig

from conftest import TINY

pytestmark = pytest.mark.skipif(not packed_linear.AVAILABLE, reason="torch without oneDNN")


@pytest.fixture(autouse=True)
def small_models_too(monkeypatch):
    monkeypatch.setattr(packed_linear, "MIN_MODEL_BYTES", 0)   # the tests' models are small


def linear(out_features: int = 48, in_features: int = 32) -> packed_linear.PackedLinear:
    module = torch.nn.Linear(in_features, out_features)
    packed_linear.install(module)
    module.requires_grad_(False)
    assert isinstance(module, packed_linear.PackedLinear)
    return module


def test_a_small_model_keeps_its_linears(monkeypatch):
    monkeypatch.setattr(packed_linear, "MIN_MODEL_BYTES", 1 << 26)
    module = torch.nn.Sequential(torch.nn.Linear(32, 32))
    packed_linear.install(module)
    assert type(module[0]) is torch.nn.Linear


def test_the_packed_path_is_taken_only_where_nothing_can_notice():
    module = linear()
    x = torch.randn(8, 32)
    with torch.inference_mode():
        assert packed_linear._packed_for(module.weight, x) is not None
        assert packed_linear._packed_for(module.weight, x[:1]) is None       # one row: F.linear
        assert packed_linear._packed_for(module.weight, torch.randn(packed_linear.MAX_ROWS + 1, 32)) is None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert packed_linear._packed_for(module.weight, x) is None
        with BatchInvariant():
            assert packed_linear._packed_for(module.weight, x) is None
        packed_linear.set_enabled(False)
        try:
            assert packed_linear._packed_for(module.weight, x) is None
        finally:
            packed_linear.set_enabled(True)
    assert packed_linear._packed_for(module.weight, x) is None               # gradients recorded
    module.weight.requires_grad_(True)
    with torch.no_grad():
        assert packed_linear._packed_for(module.weight, x) is None           # a trained weight


def test_a_packed_linear_computes_f_linear_and_follows_in_place_changes():
    module = linear()
    x = torch.randn(2, 4, 32)
    with torch.inference_mode():
        # (oneDNN adds the 32 products in another order than MKL: a few ulps of outputs of size ~1)
        assert torch.allclose(module(x), F.linear(x, module.weight, module.bias), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        module.weight.mul_(2.0)   # in place: the packed copy is stale and must be remade
    with torch.inference_mode():
        assert torch.allclose(module(x), F.linear(x, module.weight, module.bias), atol=1e-5, rtol=1e-5)


def test_sampling_on_packed_weights_gives_the_tokens_of_f_linear(tmp_path):
    engine = Engine(tmp_path)
    opened = engine.open_sampler(base_model=TINY)
    assert any(isinstance(m, packed_linear.PackedLinear) for m in opened.base.module.modules())
    work = SampleWork(torch.tensor([1, 40, 41, 42]), 6, SamplingConfig(max_tokens=24, seed=3))
    packed = engine.sample(opened, [work])[0].sequences
    packed_linear.set_enabled(False)
    try:
        plain = engine.sample(opened, [work])[0].sequences
    finally:
        packed_linear.set_enabled(True)
    for got, expected in zip(packed, plain, strict=True):
        assert got.tokens == expected.tokens
        # (another kernel's order of additions in every linear, a few ulps per layer; 1e-4 is the
        # sampler-trainer agreement the logprobs promise)
        assert got.logprobs == pytest.approx(expected.logprobs, abs=1e-4)
