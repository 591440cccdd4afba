"""The loss and sampling surface tinker-cookbook sends, through the official `tinker` SDK over HTTP:
`(N, K)` cross-entropy targets and weights (top-k and self-distillation's soft targets, possibly
sparse), a cross_entropy datum without weights (Tinker's default: 1), `target_prompt_logprobs`
(the decisions recipe), and `NAME:peft:<context>` model names. Each is checked against a direct
torch computation on the same weights: a fresh LoRA adapter's B is zero, so the run computes what
the base model does."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import TINY
from helpers import load_local_model

tinker = pytest.importorskip("tinker", reason="the official tinker SDK is a test dependency")
os.environ.setdefault("TINKER_TELEMETRY", "0")
T = tinker.types
TOKENS = [1, 40, 41, 42, 43, 44, 45]


@pytest.fixture(scope="module")
def reference(server):
    """log p(token | prefix) at every position of TOKENS, over the whole vocabulary, in fp32."""
    server.service.engine.models.resolve(TINY)  # the preset's folder, made on first use
    model = load_local_model(server, TINY)
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([TOKENS])).logits[0].float(), dim=-1)


def soft_targets() -> tuple[torch.Tensor, torch.Tensor]:
    """[T, K] ids and weights as top-k distillation builds them: prompt rows all zero (sparse)."""
    n, k = len(TOKENS), 3
    ids = torch.zeros(n, k, dtype=torch.long)
    weights = torch.zeros(n, k)
    for t in range(5, n):  # two rows of seven: the SDK sends it sparse
        ids[t] = torch.tensor([40 + t, 50 + t, 60 + t])
        weights[t] = torch.tensor([0.6, 0.3, 0.1])
    return ids, weights


def test_cross_entropy_with_k_targets_per_position_matches_torch(tinker_client, reference):
    """(N, K) targets and weights, sent sparse by the SDK (mostly zero rows): the loss is
    -sum(w * log p) over every (position, target) and the logprobs come back [N, K]. Tolerance:
    the same fp32 forward on the same weights, summed over 6 terms of size ~5: 1e-5."""
    trainer = tinker_client.create_lora_training_client(TINY, rank=4, seed=1)
    ids, weights = soft_targets()
    datum = T.Datum(model_input=T.ModelInput.from_ints(TOKENS),
                    loss_fn_inputs={"target_tokens": T.TensorData.from_torch_sparse(ids),
                                    "weights": T.TensorData.from_torch_sparse(weights)})
    assert datum.loss_fn_inputs["weights"].sparse_crow_indices is not None  # it did go sparse
    out = trainer.forward([datum], "cross_entropy").result()
    expected_N_K = reference.gather(-1, ids)
    logprobs = out.loss_fn_outputs[0]["logprobs"].to_torch()
    assert list(logprobs.shape) == [len(TOKENS), 3]
    assert torch.allclose(logprobs, expected_N_K, atol=1e-5)
    assert out.metrics["loss:sum"] == pytest.approx(float(-(weights * expected_N_K).sum()), abs=1e-5)
    trained = trainer.forward_backward([datum], "cross_entropy").result()
    assert trained.metrics["loss:sum"] == pytest.approx(out.metrics["loss:sum"], abs=1e-6)
    assert trainer.optim_step(T.AdamParams(learning_rate=1e-2)).result().metrics["grad_norm:value"] > 0


def test_k_targets_are_cross_entropys_only_and_share_k(tinker_client):
    trainer = tinker_client.create_lora_training_client(TINY, rank=4, seed=1)
    ids, weights = soft_targets()
    rl = T.Datum(model_input=T.ModelInput.from_ints(TOKENS),
                 loss_fn_inputs={"target_tokens": T.TensorData.from_torch(ids),
                                 "logprobs": T.TensorData.from_torch(weights),
                                 "advantages": T.TensorData.from_torch(weights)})
    with pytest.raises(Exception, match="cross_entropy's"):
        trainer.forward([rl], "importance_sampling").result()
    narrow = T.Datum(model_input=T.ModelInput.from_ints(TOKENS),
                     loss_fn_inputs={"target_tokens": T.TensorData.from_torch(ids[:, :2]),
                                     "weights": T.TensorData.from_torch(weights[:, :2])})
    wide = T.Datum(model_input=T.ModelInput.from_ints(TOKENS),
                   loss_fn_inputs={"target_tokens": T.TensorData.from_torch(ids),
                                   "weights": T.TensorData.from_torch(weights)})
    with pytest.raises(Exception, match="same K"):
        trainer.forward([wide, narrow], "cross_entropy").result()


def test_a_cross_entropy_datum_without_weights_weighs_every_target_once(tinker_client, reference):
    trainer = tinker_client.create_lora_training_client(TINY, rank=4, seed=1)
    targets = [*TOKENS[1:], 2]
    datum = T.Datum(model_input=T.ModelInput.from_ints(TOKENS),
                    loss_fn_inputs={"target_tokens": T.TensorData.from_torch(torch.tensor(targets))})
    loss = trainer.forward([datum], "cross_entropy").result().metrics["loss:sum"]
    expected = -reference.gather(-1, torch.tensor(targets)[:, None]).sum()
    assert loss == pytest.approx(float(expected), abs=1e-5)


def test_target_prompt_logprobs_score_the_ids_asked_for(tinker_client, reference):
    """The decisions recipe's call: [len(prompt) - 1, K] ids, -1 where nothing is asked, sent
    sparse with pad -1; the answer has the same shape, 0.0 where the id was -1."""
    sampler = tinker_client.create_sampling_client(base_model=TINY)
    ids = torch.full((len(TOKENS) - 1, 3), -1, dtype=torch.long)
    ids[4] = torch.tensor([40, 41, 77])
    ids[1, 0] = 50
    response = sampler.sample(prompt=T.ModelInput.from_ints(TOKENS), num_samples=1,
                              sampling_params=T.SamplingParams(max_tokens=1),
                              target_prompt_logprobs=T.TensorData.from_torch_sparse(ids, pad_value=-1)
                              ).result()
    got = response.target_prompt_logprobs.to_torch()
    assert list(got.shape) == [len(TOKENS) - 1, 3]
    expected = torch.where(ids >= 0, reference[:-1].gather(-1, ids.clamp(min=0)), torch.zeros(()))
    assert torch.allclose(got, expected, atol=1e-5)
    bad = torch.full((len(TOKENS), 3), -1, dtype=torch.long)  # one row too many
    with pytest.raises(Exception, match="target_prompt_logprobs"):
        sampler.sample(prompt=T.ModelInput.from_ints(TOKENS), num_samples=1,
                       sampling_params=T.SamplingParams(max_tokens=1),
                       target_prompt_logprobs=T.TensorData.from_torch(bad)).result()


def test_peft_model_names_name_their_base_model(tinker_client, reference):
    """`NAME:peft:<context>` (a cookbook default) is NAME when NAME's context is that long."""
    trainer = tinker_client.create_lora_training_client(f"{TINY}:peft:512", rank=4, seed=1)
    datum = T.Datum(model_input=T.ModelInput.from_ints(TOKENS),
                    loss_fn_inputs={"target_tokens": T.TensorData.from_torch(torch.tensor([*TOKENS[1:], 2])),
                                    "weights": T.TensorData.from_torch(torch.ones(len(TOKENS)))})
    loss = trainer.forward([datum], "cross_entropy").result().metrics["loss:sum"]
    assert loss == pytest.approx(float(-reference.gather(-1, torch.tensor([*TOKENS[1:], 2])[:, None]).sum()),
                                 abs=1e-5)
    sampler = tinker_client.create_sampling_client(base_model=f"{TINY}:peft:256")
    assert sampler.compute_logprobs(T.ModelInput.from_ints(TOKENS)).result()[0] is None
    with pytest.raises(Exception, match="context of 4096 tokens"):  # the SDK raises at first use
        too_long = tinker_client.create_lora_training_client(f"{TINY}:peft:4096", rank=4)
        too_long.forward([datum], "cross_entropy")


def test_target_prompt_logprobs_over_grpc_with_stillrooms_sdk(service, reference):
    from stillroom import types

    ids = torch.full((len(TOKENS) - 1, 2), -1, dtype=torch.long)
    ids[2] = torch.tensor([45, 46])
    sampler = service.create_sampling_client(base_model=TINY)
    response = sampler.sample(types.ModelInput.from_ints(TOKENS), num_samples=1,
                              sampling_params=types.SamplingParams(max_tokens=1),
                              target_prompt_logprobs=types.TensorData.from_torch_sparse(ids, pad_value=-1)
                              ).result()
    assert response.target_prompt_logprobs is not None
    got = torch.tensor(response.target_prompt_logprobs.data).reshape(len(TOKENS) - 1, 2)
    expected = torch.where(ids >= 0, reference[:-1].gather(-1, ids.clamp(min=0)), torch.zeros(()))
    assert torch.allclose(got, expected, atol=1e-5)
