"""A forward_backward too large for one message travels as numbered parts: the result equals the
unchunked call's, and a call whose later part is refused applies nothing."""

from __future__ import annotations

import pytest
import torch

import stillroom
from stillroom import types

from conftest import TINY, inline_fixtures
from helpers import checkpoint_tensors, encode_line, sft_datum

# reads the engine's memory or patches its constants: the engine runs in the test process
server, service, tokenizer = inline_fixtures()

TEXTS = ["first line\n", "a somewhat longer second line\n", "3\n", "the fourth and last one\n"]


def test_chunked_forward_backward_equals_the_unchunked_call(service, server, tokenizer):
    data = [sft_datum(encode_line(tokenizer, text)) for text in TEXTS]
    results, paths = [], []
    for chunk_bytes in (1 << 20, 300):  # one message; then about one datum per part
        trainer = service.create_full_training_client(TINY, seed=0)
        trainer.max_chunk_bytes = chunk_bytes
        results.append(trainer.forward_backward(data, "cross_entropy").result())
        trainer.optim_step(types.AdamParams(learning_rate=1e-2))
        paths.append(trainer.save_weights_for_sampler(f"chunks-{chunk_bytes}").result().path)
    whole, chunked = results
    assert trainer._next_seq > 4  # the second client really sent several parts
    # The parts run as other batches (other summation orders): each logprob is a few ulps (~1e-7
    # relative) off, and so is their sum; 1e-5 is ~80 ulps. One Adam step moves a weight by LR g/|g|
    # (m/sqrt(v) is +-1 at the first step) whatever g's rounding: the weights agree to their own ulps.
    assert chunked.metrics["loss:sum"] == pytest.approx(whole.metrics["loss:sum"], rel=1e-5)
    assert len(chunked.loss_fn_outputs) == len(data)
    for a, b in zip(whole.loss_fn_outputs, chunked.loss_fn_outputs):
        assert a["logprobs"].data == pytest.approx(b["logprobs"].data, abs=1e-5)
    a, b = (checkpoint_tensors(server, p) for p in paths)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_refused_later_part_leaves_no_partial_gradient(service, tokenizer):
    trainer = service.create_full_training_client(TINY, seed=0)
    trainer.max_chunk_bytes = 300
    bad = types.Datum(model_input=types.ModelInput.from_ints([5, 6, 999]),
                      loss_fn_inputs={"target_tokens": [6, 7, 8], "weights": [1.0, 1.0, 1.0]})
    data = [sft_datum(encode_line(tokenizer, TEXTS[0])), sft_datum(encode_line(tokenizer, TEXTS[1])), bad]
    with pytest.raises(stillroom.BadRequestError, match="token id 999"):
        trainer.forward_backward(data, "cross_entropy").result()
    step = trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    assert step.metrics["grad_norm:value"] == 0.0 and step.metrics["accumulated_tokens:sum"] == 0.0


def test_chunked_forward_merges_mean_metrics_by_tokens(service, tokenizer):
    trainer = service.create_full_training_client(TINY, seed=0)
    prompt = encode_line(tokenizer, "Q")[:-1]
    data = []
    for text in TEXTS:
        completion = tokenizer.encode(text)
        tokens = prompt + completion
        data.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={
            "target_tokens": tokens[1:], "logprobs": [-1.0] * (len(tokens) - 1),
            "advantages": [1.0] * (len(tokens) - 1)}))
    whole = trainer.forward(data, "importance_sampling").result()
    trainer.max_chunk_bytes = 300
    chunked = trainer.forward(data, "importance_sampling").result()
    for key in ("loss:sum", "importance_ratio:mean"):   # other batches: a few ulps apart (see above)
        assert chunked.metrics[key] == pytest.approx(whole.metrics[key], rel=1e-5)


def test_micro_batches_inside_one_call_give_the_same_result(service, tokenizer, monkeypatch):
    from stillroom_server.engine import training

    data = [sft_datum(encode_line(tokenizer, text)) for text in TEXTS]
    trainer = service.create_full_training_client(TINY, seed=0)
    whole = trainer.forward_backward(data, "cross_entropy").result()
    whole_step = trainer.optim_step(types.AdamParams(learning_rate=0.0)).result()
    monkeypatch.setattr(training, "MICROBATCH_TOKENS", 40)  # about one datum per pass
    split = trainer.forward_backward(data, "cross_entropy").result()
    split_step = trainer.optim_step(types.AdamParams(learning_rate=0.0)).result()
    # other batches: a few ulps apart (see above); the gradient norm sums 1e6 squares whose few-ulp
    # errors are independent, so its relative error is no larger than theirs
    assert split.metrics["loss:sum"] == pytest.approx(whole.metrics["loss:sum"], rel=1e-5)
    assert split_step.metrics["grad_norm:value"] == pytest.approx(whole_step.metrics["grad_norm:value"],
                                                                  rel=1e-5)
    for a, b in zip(split.loss_fn_outputs, whole.loss_fn_outputs):
        assert a["logprobs"].data == pytest.approx(b["logprobs"].data, abs=1e-5)
