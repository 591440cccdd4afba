"""The built-in losses against the same formulas written here in plain torch, `forward` leaving
gradients alone, custom losses through `forward_backward_custom`, and bad loss configs."""

from __future__ import annotations

import pytest
import torch

import stillroom
from stillroom import types
from stillroom_cookbook.rollouts import completion_datum

from conftest import TINY
from helpers import checkpoint_tensors, encode_line, load_local_model, sft_datum

TEXTS = ("a short one\n", "a rather longer line, to pad the first\n")
RL_LOSSES = ("importance_sampling", "ppo", "cispo", "dro")
# With lr == eps, AdamW's first step moves each weight by lr * g / (|g| + eps): a map of the
# gradient itself that the test can recompute locally.
PROBE_ADAM = types.AdamParams(learning_rate=1.0, eps=1.0)


def probe_atol(step: torch.Tensor, weights: torch.Tensor) -> float:
    """The absolute part of a probe step's tolerance: the server's gradient and the local one sum their
    terms in other orders (a batch vs a datum at a time), which differ by up to L K u (char-1m's 6 layers
    of sums of at most 384 terms, fp32) of the terms' size, for which the tensor's largest step stands;
    a component whose sum cancels keeps that absolute error (measured on AVX2: 2.6e-6 on a 9e-4 step,
    beyond the 1e-6 this used to be; 1/36 of this). And the weights' own rounding, u of their size."""
    u = torch.finfo(torch.float32).eps
    return 6 * 384 * u * step.abs().max().item() + u * weights.abs().max().item()


@pytest.fixture(scope="module")
def reference(server, service):
    service.create_sampling_client(base_model=TINY)  # the server writes the preset to its data dir
    return load_local_model(server, TINY)


def local_logprobs(model, data: list[types.Datum]) -> list[torch.Tensor]:
    """Each datum's target-token logprobs, one unpadded forward pass per datum."""
    out = []
    for datum in data:
        tokens = torch.tensor([datum.model_input.to_ints()])
        targets = datum.loss_fn_inputs["target_tokens"].to_torch()
        logits = model(input_ids=tokens).logits[0].float()
        out.append(torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1))
    return out


def local_loss(name: str, logp: torch.Tensor, inputs: dict[str, torch.Tensor], config: dict) -> torch.Tensor:
    """The loss of one datum, written from TINKER_PARITY.md's table."""
    if name == "cross_entropy":
        return -(logp * inputs["weights"]).sum()
    q, adv = inputs["logprobs"], inputs["advantages"]
    ratio = torch.exp(logp - q)
    low, high = config.get("clip_low_threshold", 0.8), config.get("clip_high_threshold", 1.2)
    if name == "importance_sampling":
        return -(ratio * adv).sum()
    if name == "ppo":
        return -torch.minimum(ratio * adv, torch.clamp(ratio, low, high) * adv).sum()
    if name == "cispo":
        return -(torch.clamp(ratio, low, high).detach() * logp * adv).sum()
    if name == "dro":
        beta = config.get("beta", 0.05)
        return -(logp * adv - beta / 2 * (logp - q) ** 2).sum()
    raise AssertionError(name)


def make_data(tokenizer, model, loss: str) -> list[types.Datum]:
    """Two datums of different lengths. RL sampler logprobs are the learner's own shifted by up to
    +-0.5, so ratios run from about 0.6 to 1.6 and ppo/cispo clip some of them."""
    data = [sft_datum(encode_line(tokenizer, text), prompt_len=3) for text in TEXTS]
    if loss == "cross_entropy":
        return data
    generator = torch.Generator().manual_seed(len(loss))
    with torch.no_grad():
        learner = local_logprobs(model, data)
    rl_data = []
    for datum, logp in zip(data, learner):
        offset = torch.rand(logp.shape, generator=generator) - 0.5
        advantages = torch.randn(logp.shape, generator=generator)
        rl_data.append(types.Datum(model_input=datum.model_input, loss_fn_inputs={
            "target_tokens": datum.loss_fn_inputs["target_tokens"],
            "logprobs": (logp + offset).tolist(), "advantages": advantages.tolist()}))
    return rl_data


def local_loss_and_grads(model, data, loss: str, config: dict):
    model.zero_grad(set_to_none=True)
    losses = [local_loss(loss, logp, {k: v.to_torch() for k, v in d.loss_fn_inputs.items()}, config)
              for d, logp in zip(data, local_logprobs(model, data))]
    total = torch.stack(losses).sum()
    total.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return float(total.detach()), grads


@pytest.mark.parametrize("loss,config", [
    ("cross_entropy", {}),
    ("importance_sampling", {}),
    ("ppo", {}),
    ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
    ("cispo", {}),
    ("dro", {"beta": 0.5}),
])
def test_builtin_losses_match_plain_torch_in_value_and_gradient(service, server, tokenizer, reference,
                                                                 loss, config):
    data = make_data(tokenizer, reference, loss)
    expected_loss, grads = local_loss_and_grads(reference, data, loss, config)
    expected_norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])))

    trainer = service.create_full_training_client(TINY, seed=0)
    out = trainer.forward_backward(data, loss, config).result()
    # The server's batch vs a local pass a datum at a time: other summation orders. Logprobs, and so
    # the loss, a few ulps apart (1e-5 is ~80; abs for losses near 0). The gradient norm: its large
    # components sum without cancelling, ~L sqrt(K) u = 1.4e-5 apart at most; 1e-4. The probe step
    # (lr 1, eps 1: g / (|g| + 1), about g) has g's relative error, up to L K u = 2.7e-4 where a sum
    # cancels: rtol 1e-3, and an atol for the components that cancel (probe_atol).
    assert out.metrics["loss:sum"] == pytest.approx(expected_loss, rel=1e-5, abs=1e-6)
    if loss in ("ppo", "cispo"):
        assert 0 < out.metrics["clip_fraction:mean"] < 1  # the clipping is exercised
    step = trainer.optim_step(PROBE_ADAM).result()
    assert step.metrics["grad_norm:value"] == pytest.approx(expected_norm, rel=1e-4)

    after = checkpoint_tensors(server, trainer.save_weights_for_sampler(f"probe-{loss}").result().path)
    before = reference.state_dict()
    for name, grad in grads.items():
        moved = after[name] - before[name]
        expected = -PROBE_ADAM.learning_rate * grad / (grad.abs() + PROBE_ADAM.eps)
        atol = probe_atol(expected, before[name])
        torch.testing.assert_close(moved, expected, rtol=1e-3, atol=atol, msg=name)


def test_forward_changes_neither_weights_nor_gradients(service, server, tokenizer):
    data = [sft_datum(encode_line(tokenizer, text)) for text in TEXTS]
    adam = types.AdamParams(learning_rate=1e-2)

    idle = service.create_full_training_client(TINY, seed=0)
    first = idle.forward(data, "cross_entropy").result()
    assert idle.optim_step(adam).result().metrics["grad_norm:value"] == 0.0
    again = idle.forward(data, "cross_entropy").result()
    assert ([o["logprobs"].data for o in again.loss_fn_outputs]
            == [o["logprobs"].data for o in first.loss_fn_outputs])

    plain = service.create_full_training_client(TINY, seed=0)
    plain.forward_backward(data[:1], "cross_entropy")
    plain_norm = plain.optim_step(adam).result().metrics["grad_norm:value"]
    mixed = service.create_full_training_client(TINY, seed=0)
    mixed.forward_backward(data[:1], "cross_entropy")
    mixed.forward(data[1:], "cross_entropy")
    mixed_norm = mixed.optim_step(adam).result().metrics["grad_norm:value"]
    assert mixed_norm == plain_norm > 0
    a = checkpoint_tensors(server, plain.save_weights_for_sampler("plain").result().path)
    b = checkpoint_tensors(server, mixed.save_weights_for_sampler("mixed").result().path)
    assert all(torch.equal(a[k], b[k]) for k in a)


def cross_entropy_loss(data, logprobs_list):
    loss = sum(-(logp * d.loss_fn_inputs["weights"].to_torch()).sum()
               for d, logp in zip(data, logprobs_list))
    return loss, {"tokens:sum": float(sum(len(lp) for lp in logprobs_list))}


def test_custom_cross_entropy_trains_exactly_like_the_builtin(service, server, tokenizer):
    data = [sft_datum(encode_line(tokenizer, text), prompt_len=3) for text in TEXTS]
    adam = types.AdamParams(learning_rate=1e-2)

    builtin = service.create_full_training_client(TINY, seed=0)
    expected = builtin.forward_backward(data, "cross_entropy").result()
    builtin.optim_step(adam).result()

    custom = service.create_full_training_client(TINY, seed=0)
    out = custom.forward_backward_custom(data, cross_entropy_loss)
    step = custom.optim_step(adam)  # pipelined: must still be numbered after both custom requests
    out = out.result()
    # the same logprobs (bit-equal, below) summed here in another order: n same-sign terms, pairwise,
    # about log2(n) u = 7e-7 apart at most
    assert out.metrics["loss:sum"] == pytest.approx(expected.metrics["loss:sum"], rel=1e-6)
    assert out.metrics["tokens:sum"] == sum(d.model_input.length for d in data)
    assert [o["logprobs"].data for o in out.loss_fn_outputs] == \
        [o["logprobs"].data for o in expected.loss_fn_outputs]
    step.result()

    a = checkpoint_tensors(server, builtin.save_weights_for_sampler("ce-builtin").result().path)
    b = checkpoint_tensors(server, custom.save_weights_for_sampler("ce-custom").result().path)
    for name in a:   # one step from the same gradient (LR g/|g| at the first): equal to the weights' ulps
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


def test_a_dpo_style_pairwise_loss_lowers_itself(service, tokenizer):
    prompt = encode_line(tokenizer, "Q: sky?")[:-1]
    chosen, rejected = tokenizer.encode(" blue"), tokenizer.encode(" green")

    def dpo_loss(data, logprobs_list):
        import torch.nn.functional as F

        chosen_lp, rejected_lp = (
            (logp * d.loss_fn_inputs["weights"].to_torch()).sum() for d, logp in zip(data, logprobs_list))
        margin = chosen_lp - rejected_lp
        return -F.logsigmoid(0.5 * margin), {"margin:mean": float(margin.detach())}

    trainer = service.create_full_training_client(TINY, seed=0)
    data = [completion_datum(prompt, chosen), completion_datum(prompt, rejected)]
    losses, margins = [], []
    for _ in range(4):
        out = trainer.forward_backward_custom(data, dpo_loss)
        trainer.optim_step(types.AdamParams(learning_rate=1e-3))
        losses.append(out.result().metrics["loss:sum"])
        margins.append(out.result().metrics["margin:mean"])
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0], losses
    assert margins[-1] > margins[0]


def test_custom_loss_async_and_a_failing_loss_changes_nothing(service, tokenizer):
    import asyncio

    data = [sft_datum(encode_line(tokenizer, TEXTS[0]))]
    trainer = service.create_full_training_client(TINY, seed=0)

    def broken(data, logprobs_list):
        raise RuntimeError("user bug")

    with pytest.raises(RuntimeError, match="user bug"):
        trainer.forward_backward_custom(data, broken).result()
    assert trainer.optim_step(types.AdamParams()).result().metrics["grad_norm:value"] == 0.0

    async def main():
        future = await trainer.forward_backward_custom_async(data, cross_entropy_loss)
        assert future.request_id
        return await future

    out = asyncio.run(main())
    assert out.metrics["loss:sum"] > 0
    assert trainer.optim_step(types.AdamParams()).result().metrics["grad_norm:value"] > 0


@pytest.mark.parametrize("loss,config,drop,message", [
    ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 0.8}, None, "clip_low_threshold"),
    ("ppo", {"clip_lo": 0.9}, None, "unknown key.*clip_lo"),
    ("dro", {"beta": -1.0}, None, "beta"),
    ("ppo", {}, "advantages", "missing.*advantages"),
    ("cispo", {}, "logprobs", "missing.*logprobs"),
])
def test_bad_loss_configs_and_inputs_name_the_field(service, tokenizer, loss, config, drop, message):
    trainer = service.create_full_training_client(TINY, seed=0)
    tokens = encode_line(tokenizer, "x")
    inputs = {"target_tokens": tokens[1:], "logprobs": [-1.0] * (len(tokens) - 1),
              "advantages": [1.0] * (len(tokens) - 1)}
    inputs.pop(drop, None)
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)
    with pytest.raises(stillroom.BadRequestError, match=message):
        trainer.forward_backward([datum], loss, config).result()
