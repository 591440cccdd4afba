"""Published checkpoints, over both wires: owner A publishes a teacher; owner B samples it, distills
from it (teacher_reverse_kl) and loads it, read-only; A unpublishes and B's next call is refused.
Only A deletes, sets the TTL of, publishes or unpublishes A's checkpoints."""

from __future__ import annotations

import math
import os

import pytest

import stillroom
from stillroom import types
from stillroom_server.store import keys

from conftest import TINY
from helpers import encode_line, official_cli, sft_datum, train_steps

os.environ.setdefault("TINKER_TELEMETRY", "0")


@pytest.fixture(scope="module")
def teacher(service, tokenizer):
    """Owner A's trained LoRA run: its sampler weights and its training state."""
    trainer = service.create_lora_training_client(TINY, rank=4, seed=1)
    train_steps(trainer, [sft_datum(encode_line(tokenizer, "the teacher knows this line"))], 2, 2e-2)
    sampler_path = trainer.save_weights_for_sampler("published-teacher").result().path
    state_path = trainer.save_state("published-state").result().path
    return sampler_path, state_path


@pytest.fixture(scope="module")
def bob(server):
    _, secret = keys.create_key(server.store, "published-bob", "published checkpoints test")
    return secret


def _student_datum(tokenizer) -> types.Datum:
    return sft_datum(encode_line(tokenizer, "the student learns"))


def test_a_published_checkpoint_is_read_only_for_other_owners_over_grpc(service, server, tokenizer,
                                                                       teacher, bob):
    sampler_path, state_path = teacher
    rest = service.create_rest_client()
    probe = types.ModelInput.from_ints(encode_line(tokenizer, "a probe"))
    expected = service.create_sampling_client(model_path=sampler_path).compute_logprobs(probe).result()
    with stillroom.ServiceClient(base_url=server.address, api_key=bob) as other:
        student = other.create_lora_training_client(TINY, rank=4, seed=2)
        datum = _student_datum(tokenizer)
        with pytest.raises(stillroom.NotFoundError, match="loss_fn_config.teacher"):  # private so far
            student.forward_backward([datum], "teacher_reverse_kl", {"teacher": sampler_path}).result()
        with pytest.raises(stillroom.NotFoundError):
            other.create_sampling_client(model_path=sampler_path)

        assert rest.publish_checkpoint_from_tinker_path(sampler_path).result().public
        assert rest.publish_checkpoint_from_tinker_path(state_path).result().public
        listed = {c.path: c.public for c in rest.list_user_checkpoints(limit=1000).checkpoints}
        assert listed[sampler_path] and listed[state_path]
        assert rest.publish_checkpoint_from_tinker_path(sampler_path).result().public  # idempotent

        # B reads it: samples it (the same numbers as A), distills from it, loads it into a run of B's
        borrowed = other.create_sampling_client(model_path=sampler_path)
        assert borrowed.compute_logprobs(probe).result() == expected
        result = student.forward_backward([datum], "teacher_reverse_kl", {"teacher": sampler_path}).result()
        assert math.isfinite(result.metrics["loss:sum"]) and result.metrics["loss:sum"] > 0
        copy = other.create_training_client_from_state(state_path)
        info = other.create_rest_client().get_weights_info_by_tinker_path(state_path).result()
        assert (info.base_model, info.is_lora, info.lora_rank) == (TINY, True, 4)
        assert copy.get_info().training_run_id != state_path.split("/")[2]

        # ... and nothing more: A's checkpoints are not B's to change, nor listed as B's
        other_rest = other.create_rest_client()
        for change in (lambda: other_rest.delete_checkpoint(sampler_path),
                       lambda: other_rest.set_checkpoint_ttl(sampler_path, 3600),
                       lambda: other_rest.unpublish_checkpoint_from_tinker_path(sampler_path),
                       lambda: other_rest.publish_checkpoint_from_tinker_path(state_path)):
            with pytest.raises(stillroom.NotFoundError):
                change().result()
        assert sampler_path not in [c.path for c in other_rest.list_user_checkpoints().result().checkpoints]

        # A unpublishes: B's next calls are refused at once, on the open sampler too
        assert not rest.unpublish_checkpoint_from_tinker_path(sampler_path).result().public
        assert not rest.unpublish_checkpoint_from_tinker_path(state_path).result().public
        with pytest.raises(stillroom.NotFoundError, match="loss_fn_config.teacher"):
            student.forward_backward([datum], "teacher_reverse_kl", {"teacher": sampler_path}).result()
        with pytest.raises(stillroom.NotFoundError, match="no longer published"):
            borrowed.compute_logprobs(probe).result()
        with pytest.raises(stillroom.NotFoundError):
            other.create_sampling_client(model_path=sampler_path)
        with pytest.raises(stillroom.NotFoundError):
            other.create_training_client_from_state(state_path)
        with pytest.raises(stillroom.NotFoundError):
            other.create_rest_client().get_weights_info_by_tinker_path(state_path).result()
        assert not rest.unpublish_checkpoint_from_tinker_path(sampler_path).result().public
    # A's own uses never depended on publishing
    own = service.create_sampling_client(model_path=sampler_path)
    assert own.compute_logprobs(probe).result() == expected


def test_owner_b_distills_from_a_published_teacher_over_http(server, tokenizer, teacher, bob):
    tinker = pytest.importorskip("tinker", reason="the official tinker SDK is a test dependency")
    import httpx

    T = tinker.types
    sampler_path, state_path = teacher
    tinker_sampler, tinker_state = (p.replace("stillroom://", "tinker://") for p in teacher)
    rest_a = tinker.RestClient(base_url=server.http_url, api_key=server.local_api_key)
    rest_a.publish_checkpoint_from_tinker_path(tinker_sampler).result()
    env = os.environ | {"TINKER_BASE_URL": server.http_url, "TINKER_API_KEY": server.local_api_key}
    done = official_cli(["checkpoint", "publish", tinker_state], env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    rest_a.publish_checkpoint_from_tinker_path(tinker_sampler).result()  # idempotent (the SDK retries 409s)
    run_a = sampler_path.split("/")[2]
    listed = rest_a.list_checkpoints(run_a).result().checkpoints
    assert {c.tinker_path: c.public for c in listed}[tinker_sampler]
    assert {c.tinker_path: c.public for c in listed}[tinker_state]

    other = tinker.ServiceClient(base_url=server.http_url, api_key=bob)
    student = other.create_lora_training_client(TINY, rank=4, seed=3).result()
    tokens = encode_line(tokenizer, "the student learns")
    datum = T.Datum(model_input=T.ModelInput.from_ints(tokens[:-1]),
                    loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})
    result = student.forward_backward([datum], "teacher_reverse_kl", {"teacher": tinker_sampler}).result()
    assert math.isfinite(result.metrics["loss:sum"])
    sampler = other.create_sampling_client(model_path=tinker_sampler)
    assert len(sampler.compute_logprobs(T.ModelInput.from_ints(tokens)).result()) == len(tokens)
    loaded = other.create_training_client_from_state(tinker_state).result()  # weights_info, then load
    assert loaded.model_id != run_a

    # read-only: B's delete, TTL and unpublish are 404s, as for a checkpoint B cannot see
    url, key_b = f"{server.http_url}/api/v1/training_runs/{run_a}/checkpoints", {"X-API-Key": bob}
    assert httpx.delete(f"{url}/sampler_weights/published-teacher/publish", headers=key_b).status_code == 404
    assert httpx.delete(f"{url}/sampler_weights/published-teacher", headers=key_b).status_code == 404
    assert httpx.put(f"{url}/sampler_weights/published-teacher/ttl", json={"ttl_seconds": 3600},
                     headers=key_b).status_code == 404

    rest_a.unpublish_checkpoint_from_tinker_path(tinker_sampler).result()
    rest_a.unpublish_checkpoint_from_tinker_path(tinker_state).result()
    with pytest.raises(Exception, match="loss_fn_config.teacher"):  # the next call is refused
        student.forward_backward([datum], "teacher_reverse_kl", {"teacher": tinker_sampler}).result()
    with pytest.raises(tinker.NotFoundError):
        sampler.compute_logprobs(T.ModelInput.from_ints(tokens)).result()
    with pytest.raises((tinker.NotFoundError, tinker.RequestFailedError), match="published-state"):
        other.create_training_client_from_state(tinker_state).result()
    other.close("success").result()
