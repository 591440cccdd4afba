"""tinker-cookbook 0.6.1's soft-target code, unmodified, against a real server over Tinker's HTTP
API: off-policy top-k distillation (`distillation.train_off_policy`), self-distillation's forward
KL over the teacher's top-K (`sdft.build_topk_distillation_datums` -> cross_entropy with [N, K]
targets) and its reverse KL (`sdft.build_reverse_kl_datums` -> `forward_backward_custom`), and
the decisions recipe (`sample_decision` via target_prompt_logprobs, its cross_entropy datums and
its probability loss through `forward_backward_custom`). Each step's loss is checked against the
same formula computed here in torch on the same weights (a fresh adapter computes what the base
model does), within 1e-5 (fp32, sums of a few dozen terms of size ~5)."""

from __future__ import annotations

import asyncio
import os

import pytest
import torch

from conftest import TINY
from helpers import load_local_model

tinker = pytest.importorskip("tinker", reason="the official tinker SDK is a test dependency")
pytest.importorskip("tinker_cookbook", reason="tinker-cookbook is a test dependency (--no-deps)")
os.environ.setdefault("TINKER_TELEMETRY", "0")
pytestmark = pytest.mark.slow
T = tinker.types


@pytest.fixture(scope="module")
def model(server):
    server.service.engine.models.resolve(TINY)
    return load_local_model(server, TINY)


def logprobs_of(model, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), V]: log p(next token | tokens[:i + 1]) at every position."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([tokens])).logits[0].float(), dim=-1)


def ce_loss(model, datum) -> float:
    """-sum(w * log p(target)) of a datum with [N] or [N, K] targets."""
    lp = logprobs_of(model, datum.model_input.to_ints())
    targets = datum.loss_fn_inputs["target_tokens"].to_torch()
    weights = datum.loss_fn_inputs["weights"].to_torch()
    if targets.dim() == 1:
        targets, weights = targets[:, None], weights[:, None]
    return float(-(weights * lp.gather(-1, targets)).sum())


def test_off_policy_top_k_distillation(tinker_client, model):
    from tinker_cookbook.distillation import train_off_policy

    teacher = tinker_client.create_sampling_client(base_model=TINY)
    tokens = [1, *range(40, 52)]
    sft = T.Datum(model_input=T.ModelInput.from_ints(tokens[:-1]),
                  loss_fn_inputs={"target_tokens": T.TensorData.from_torch(torch.tensor(tokens[1:])),
                                  "weights": T.TensorData.from_torch(torch.tensor([0.0] * 5 + [1.0] * 7))})
    datum = asyncio.run(train_off_policy._collect_topk_for_datum(teacher, sft, 5))
    assert list(datum.loss_fn_inputs["target_tokens"].to_torch().shape) == [len(tokens) - 1, 5]
    trainer = tinker_client.create_lora_training_client(TINY, rank=4, seed=0)
    loss = trainer.forward_backward([datum], "cross_entropy").result().metrics["loss:sum"]
    assert loss == pytest.approx(ce_loss(model, datum), abs=1e-5)
    assert trainer.optim_step(T.AdamParams(learning_rate=1e-3)).result().metrics["grad_norm:value"] > 0


def rollout_datum(prompt: list[int], completion: list[int]):
    """A datum as the RL rollout makes it: left-shifted input, targets, a completion mask."""
    full = prompt + completion
    mask = [0.0] * (len(prompt) - 1) + [1.0] * len(completion)
    return T.Datum(model_input=T.ModelInput.from_ints(full[:-1]),
                   loss_fn_inputs={"target_tokens": T.TensorData.from_torch(torch.tensor(full[1:])),
                                   "mask": T.TensorData.from_torch(torch.tensor(mask))})


def test_self_distillation_in_both_directions(tinker_client, model):
    """SDFT: the teacher is the base model given a demonstration before the question; forward KL
    over its top-K by cross_entropy on [N, K] soft targets, reverse KL by the cookbook's custom loss
    over the student's logprobs at those [N, K] tokens."""
    from tinker_cookbook.distillation import sdft

    teacher = tinker_client.create_sampling_client(base_model=TINY)
    prompt, completion = [1, 40, 41, 42], [43, 44, 45, 46, 47, 48]
    data = [rollout_datum(prompt, completion), rollout_datum(prompt, completion[:4])]
    teacher_prompts = [T.ModelInput.from_ints([1, 60, 61, 62, 10, 40, 41, 42])]
    metadata = [{"group_idx": 0}, {"group_idx": 0}]
    forward, metrics = asyncio.run(sdft.build_topk_distillation_datums(
        data, metadata, teacher, teacher_prompts, topk=4, max_context_length=512, skip_first_n_tokens=1))
    assert metrics["sdft/topk"] == 4
    trainer = tinker_client.create_lora_training_client(TINY, rank=4, seed=0)
    loss = trainer.forward_backward(forward, "cross_entropy").result().metrics["loss:sum"]
    assert loss == pytest.approx(sum(ce_loss(model, d) for d in forward), abs=1e-5)
    reverse, _ = asyncio.run(sdft.build_reverse_kl_datums(
        data, metadata, teacher, teacher_prompts, topk=4, max_context_length=512, skip_first_n_tokens=1))
    result = trainer.forward_backward_custom(reverse, sdft.reverse_kl_custom_loss).result()
    logprobs = [logprobs_of(model, d.model_input.to_ints()).gather(
        -1, d.loss_fn_inputs["target_tokens"].to_torch()) for d in reverse]
    expected, _ = sdft.reverse_kl_custom_loss(reverse, logprobs)
    assert result.metrics["sdft/reverse_kl_loss"] == pytest.approx(float(expected), abs=1e-5)
    assert trainer.optim_step(T.AdamParams(learning_rate=1e-3)).result().metrics["grad_norm:value"] > 0


def test_the_decisions_recipe(tinker_client, model, server):
    from tinker_cookbook import renderers
    from tinker_cookbook.recipes.decisions import decision as decisions
    from tinker_cookbook.recipes.decisions import train as decision_train
    from tinker_cookbook.tokenizer_utils import get_tokenizer

    tokenizer = get_tokenizer(str(server.config.data_dir / "models" / TINY))
    renderer = decisions.DecisionRenderer(renderers.get_renderer("role_colon", tokenizer))
    question = decisions.Decision(text="Is 2 + 2 = 4?", choices=[("A", "yes"), ("B", "no")])
    rendering = renderer.render(question)
    sampler = tinker_client.create_sampling_client(base_model=TINY)
    probabilities = asyncio.run(decisions.sample_decision(sampler, rendering))
    lp = logprobs_of(model, rendering.tokens)[rendering.choice_pos - 1]
    expected = torch.softmax(lp[[rendering.label_tokens[label] for label in rendering.labels]], dim=0)
    assert [probabilities[label] for label in rendering.labels] == pytest.approx(expected.tolist(), abs=1e-5)
    trainer = tinker_client.create_lora_training_client(TINY, rank=4, seed=0)
    choice = decision_train.decision_choice_datums(renderer, [(question, "A")])
    loss = trainer.forward_backward(choice, "cross_entropy").result().metrics["loss:sum"]
    assert loss == pytest.approx(ce_loss(model, choice[0]), abs=1e-5)
    dist = decision_train.decision_dist_datums(renderer, [(question, {"A": 0.75, "B": 0.25})])
    custom = decision_train.probability_loss(lambda probs, target: ((probs - target) ** 2).sum())
    result = trainer.forward_backward_custom(dist, custom).result()
    choice_lp = logprobs_of(model, dist[0].model_input.to_ints())[-1][
        [rendering.label_tokens[label] for label in rendering.labels]]
    want = ((torch.softmax(choice_lp, 0) - torch.tensor([0.75, 0.25])) ** 2).sum()
    assert result.metrics["loss"] == pytest.approx(float(want), abs=1e-5)
    assert trainer.optim_step(T.AdamParams(learning_rate=1e-3)).result().metrics["grad_norm:value"] > 0
