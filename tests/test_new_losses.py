"""Tinker 0.38's `gspo` and `stable_reinforce` losses against the same formulas in plain torch:
the server's loss value and gradient (through AdamW's probe step) match a local computation."""

from __future__ import annotations

import pytest
import torch

import stillroom
from stillroom import types
from test_losses import PROBE_ADAM, local_logprobs, make_data, probe_atol

from conftest import TINY
from helpers import checkpoint_tensors, encode_line, load_local_model


@pytest.fixture(scope="module")
def reference(server, service):
    service.create_sampling_client(base_model=TINY)  # the server writes the preset to its data dir
    return load_local_model(server, TINY)


def gspo_loss(logp, inputs, config):
    """GSPO-token, from Tinker's loss page: the sequence ratio over the masked tokens as every
    token's value, each token's own gradient, then PPO's clipped objective."""
    q, adv = inputs["logprobs"], inputs["advantages"]
    mask = inputs.get("sequence_ratio_mask", torch.ones_like(q)) != 0
    log_ratio = (logp.detach() - q)[mask].mean()
    ratio = torch.exp(log_ratio + logp - logp.detach())
    low, high = config.get("clip_low_threshold", 0.8), config.get("clip_high_threshold", 1.2)
    return -torch.minimum(ratio * adv, torch.clamp(ratio, low, high) * adv).sum()


def stable_reinforce_loss(logp, inputs, config):
    ratio = torch.exp(logp - inputs["logprobs"])
    weight = torch.clamp(ratio, max=config.get("clip_high_threshold", 2.0)).detach()
    return -(weight * logp * inputs["advantages"]).sum()


LOCAL = {"gspo": gspo_loss, "stable_reinforce": stable_reinforce_loss}


def with_ratio_mask(data: list[types.Datum]) -> list[types.Datum]:
    """The first datum marks its last half for the sequence ratio; the second sends no mask."""
    datum = data[0]
    n = datum.model_input.length
    mask = [0.0] * (n - n // 2) + [1.0] * (n // 2)
    first = types.Datum(model_input=datum.model_input, loss_fn_inputs={
        **datum.loss_fn_inputs, "sequence_ratio_mask": types.TensorData(data=mask, dtype="float32")})
    return [first, *data[1:]]


@pytest.mark.parametrize("loss,config,masked", [
    ("gspo", {}, False),
    ("gspo", {"clip_low_threshold": 0.95, "clip_high_threshold": 1.05}, True),
    ("stable_reinforce", {}, False),
    ("stable_reinforce", {"clip_high_threshold": 1.1}, False),
])
def test_new_losses_match_plain_torch_in_value_and_gradient(service, server, tokenizer, reference,
                                                            loss, config, masked):
    data = make_data(tokenizer, reference, loss)
    if masked:
        data = with_ratio_mask(data)
    reference.zero_grad(set_to_none=True)
    expected = torch.stack([LOCAL[loss](logp, {k: v.to_torch() for k, v in d.loss_fn_inputs.items()}, config)
                            for d, logp in zip(data, local_logprobs(reference, data))]).sum()
    expected.backward()
    grads = {name: p.grad.clone() for name, p in reference.named_parameters() if p.grad is not None}
    reference.zero_grad(set_to_none=True)

    trainer = service.create_full_training_client(TINY, seed=0)
    out = trainer.forward_backward(data, loss, config).result()
    # the server's batch vs a local pass a datum at a time: tolerances as test_losses.py derives them
    assert out.metrics["loss:sum"] == pytest.approx(float(expected.detach()), rel=1e-5, abs=1e-6)
    assert "importance_ratio:mean" in out.metrics
    trainer.optim_step(PROBE_ADAM).result()

    saved = trainer.save_weights_for_sampler(f"probe-{loss}-{masked}").result()
    after = checkpoint_tensors(server, saved.path)
    before = reference.state_dict()
    for name, grad in grads.items():
        moved = after[name] - before[name]
        wanted = -PROBE_ADAM.learning_rate * grad / (grad.abs() + PROBE_ADAM.eps)
        torch.testing.assert_close(moved, wanted, rtol=1e-3, atol=probe_atol(wanted, before[name]), msg=name)


def test_gspo_clips_whole_sequences(service, tokenizer, reference):
    """With a tight clip range every token of a sequence is clipped or none is (for one sign of
    advantage), since they all carry the sequence's ratio."""
    data = make_data(tokenizer, reference, "gspo")
    data = [types.Datum(model_input=d.model_input, loss_fn_inputs={
        **d.loss_fn_inputs,
        "advantages": types.TensorData(data=[1.0] * d.model_input.length, dtype="float32")}) for d in data]
    trainer = service.create_full_training_client(TINY, seed=0)
    out = trainer.forward(data, "gspo", {"clip_low_threshold": 0.999, "clip_high_threshold": 1.001}).result()
    lengths = [d.model_input.length for d in data]
    fraction = out.metrics["clip_fraction:mean"]   # a ratio of token counts, rounded once or twice
    assert any(abs(fraction - k / sum(lengths)) < 1e-6 for k in (0, lengths[0], lengths[1], sum(lengths)))


@pytest.mark.parametrize("loss,config,extra,message", [
    ("stable_reinforce", {"clip_high_threshold": 0.5}, {}, "clip_high_threshold"),
    ("stable_reinforce", {}, {"sequence_ratio_mask": [1.0]}, "unexpected.*sequence_ratio_mask"),
    ("gspo", {"beta": 1.0}, {}, "unknown key.*beta"),
])
def test_bad_configs_name_the_field(service, tokenizer, loss, config, extra, message):
    trainer = service.create_full_training_client(TINY, seed=0)
    tokens = encode_line(tokenizer, "x")
    n = len(tokens) - 1
    inputs = {"target_tokens": tokens[1:], "logprobs": [-1.0] * n, "advantages": [1.0] * n}
    inputs.update({key: value * n for key, value in extra.items()})
    datum = types.Datum.model_validate({"model_input": types.ModelInput.from_ints(tokens[:-1]),
                                        "loss_fn_inputs": inputs})
    with pytest.raises(stillroom.BadRequestError, match=message):
        trainer.forward_backward([datum], loss, config).result()
