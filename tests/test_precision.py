"""`--dtype` on the CPU, engine by engine on the same preset: `bf16-train` computes training passes
under bf16 autocast, as `bf16` does, while sampling and compute_logprobs stay in fp32 and agree
exactly with an fp32 engine (so decoding does not depend on how requests are batched)."""

from __future__ import annotations

import pytest
import torch

from stillroom_server.engine.engine import Engine, LoraSpec
from stillroom_server.engine.types import ForwardBackwardWork, LogprobsWork, TrainDatum

from conftest import TINY

TOKENS = list(range(3, 43))


def scored(engine: Engine) -> torch.Tensor:
    opened = engine.open_sampler(base_model=TINY)
    return engine.compute_logprobs(opened, [LogprobsWork(torch.tensor(TOKENS))])[0].logprobs_T[1:]


def training_loss(engine: Engine, dtype: str) -> float:
    engine.create_run(f"precision-{dtype}", TINY, LoraSpec(rank=2), seed=0)
    tokens = torch.tensor(TOKENS)
    datum = TrainDatum(tokens[:-1], {"target_tokens": tokens[1:], "weights": torch.ones(len(TOKENS) - 1)})
    result = engine.forward_backward(f"precision-{dtype}", ForwardBackwardWork([datum], "cross_entropy", {}))
    return result.metrics["loss:sum"]


@pytest.mark.slow
def test_bf16_train_autocasts_training_only_and_scores_in_fp32(tmp_path):
    engines = {dtype: Engine(tmp_path / dtype, dtype=dtype) for dtype in ("fp32", "bf16", "bf16-train")}
    logprobs = {dtype: scored(engine) for dtype, engine in engines.items()}
    assert torch.equal(logprobs["bf16-train"], logprobs["fp32"])
    # bf16 keeps 8 significant bits (2^-8 = 4e-3 relative): its logprobs are ~1e-2 off, far above 1e-4
    assert not torch.allclose(logprobs["bf16"], logprobs["fp32"], atol=1e-4)   # bf16 does round

    losses = {dtype: training_loss(engine, dtype) for dtype, engine in engines.items()}
    assert losses["bf16-train"] == pytest.approx(losses["bf16"], abs=1e-6)   # the same autocast: bit-equal
    assert losses["bf16-train"] != pytest.approx(losses["fp32"], abs=1e-4)
