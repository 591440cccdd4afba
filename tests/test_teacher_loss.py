"""`teacher_reverse_kl`: the exact per-position reverse KL between the student's and the teacher's
next-token distributions, computed on the server, checked against plain torch."""

from __future__ import annotations

import pytest
import torch

import stillroom
from stillroom import types
from stillroom_cookbook.rollouts import completion_datum

from conftest import SMALL, TINY
from helpers import encode_line, load_local_model


def reference_kl(student, teacher, data: list[types.Datum], topk: int = 0):
    """Loss and grad norm computed here in plain torch, datum by datum."""
    student.zero_grad()
    total = torch.zeros(())
    for datum in data:
        tokens = torch.tensor([datum.model_input.to_ints()])
        weights = torch.tensor(datum.loss_fn_inputs["weights"].data)
        s = torch.log_softmax(student(tokens).logits[0].float(), -1)
        with torch.no_grad():
            t = torch.log_softmax(teacher(tokens).logits[0].float(), -1)
        if topk:
            index = s.detach().topk(topk, -1).indices
            s, t = torch.log_softmax(s.gather(-1, index), -1), torch.log_softmax(t.gather(-1, index), -1)
        total = total + ((s.exp() * (s - t)).sum(-1) * weights).sum()
    total.backward()
    squares = [(p.grad ** 2).sum() for p in student.parameters() if p.grad is not None]
    grad_norm = torch.stack(squares).sum().sqrt()
    return float(total.detach()), float(grad_norm)


@pytest.mark.parametrize("topk", [0, 5])
def test_matches_plain_torch_on_the_same_weights(service, server, tokenizer, topk):
    prompt = encode_line(tokenizer, "2+2=")[:-1]
    data = [completion_datum(prompt, tokenizer.encode("4\n")),
            completion_datum(prompt, tokenizer.encode("five, surely\n"))]
    trainer = service.create_full_training_client(TINY, seed=0)
    config = {"teacher": SMALL, "topk": topk}
    out = trainer.forward_backward(data, "teacher_reverse_kl", config).result()
    step = trainer.optim_step(types.AdamParams(learning_rate=0.0)).result()
    student = load_local_model(server, TINY)
    teacher = load_local_model(server, SMALL)
    loss, grad_norm = reference_kl(student, teacher, data, topk)
    # the server's batch vs plain torch a datum at a time: tolerances as test_losses.py derives them
    assert out.metrics["loss:sum"] == pytest.approx(loss, rel=1e-5)
    assert step.metrics["grad_norm:value"] == pytest.approx(grad_norm, rel=1e-4)
    assert out.metrics["teacher_kl:mean"] > 0
    assert len(out.loss_fn_outputs[1]["logprobs"].data) == len(data[1].model_input.to_ints())


def test_training_on_it_moves_the_student_towards_the_teacher(service, tokenizer):
    teacher_trainer = service.create_full_training_client(TINY, seed=0)
    line = encode_line(tokenizer, "teach me\n")
    for _ in range(15):
        teacher_trainer.forward_backward([completion_datum(line[:2], line[2:])], "cross_entropy")
        teacher_trainer.optim_step(types.AdamParams(learning_rate=3e-3))
    teacher_path = teacher_trainer.save_weights_for_sampler("teacher").result().path
    student = service.create_full_training_client(TINY, seed=0)
    datum = completion_datum(line[:2], line[2:])
    kls = []
    for _ in range(8):
        out = student.forward_backward([datum], "teacher_reverse_kl", {"teacher": teacher_path})
        student.optim_step(types.AdamParams(learning_rate=3e-3))
        kls.append(out.result().metrics["loss:sum"])
    assert kls[-1] < 0.6 * kls[0], kls


def test_a_teacher_with_another_vocabulary_is_refused(service, server, tmp_path, tokenizer):
    other = load_local_model(server, TINY)
    other.resize_token_embeddings(128)
    other.save_pretrained(tmp_path / "wide")
    tokenizer.save_pretrained(tmp_path / "wide")
    trainer = service.create_full_training_client(TINY, seed=0)
    data = [completion_datum([1, 40], [41, 42])]
    with pytest.raises(stillroom.BadRequestError, match="loss_fn_config.teacher: .* does not share the "
                                                        "student's tokenizer .*128.* 100"):
        trainer.forward_backward(data, "teacher_reverse_kl", {"teacher": str(tmp_path / "wide")}).result()
    with pytest.raises(stillroom.BadRequestError, match="loss_fn_config.teacher: name the teacher"):
        trainer.forward_backward(data, "teacher_reverse_kl").result()
    with pytest.raises(stillroom.NotFoundError, match="loss_fn_config.teacher"):
        trainer.forward_backward(data, "teacher_reverse_kl",
                                 {"teacher": "stillroom://run-x/sampler_weights/none"}).result()
