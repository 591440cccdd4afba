"""Keys and tenants: every call but health needs a live key, and another owner's runs,
checkpoints, samplers and futures are NOT_FOUND to them and unchanged by them."""

from __future__ import annotations

import pytest

import stillroom
from stillroom import _wire, types
from stillroom._proto import stillroom_pb2 as pb
from stillroom.cli import main as cli
from stillroom_server.store import keys

from conftest import TINY
from helpers import encode_line, sft_datum


@pytest.fixture(scope="module")
def bob(server):
    _, secret = keys.create_key(server.store, "bob", "bob's laptop")
    client = stillroom.ServiceClient(base_url=server.address, api_key=secret)
    yield client
    client.close()


@pytest.fixture(scope="module")
def alices(service, tokenizer):
    """Things the fixture's owner made: a run, a checkpoint, a sampling session and a future."""
    trainer = service.create_lora_training_client(TINY, rank=4, seed=0)
    datum = sft_datum(encode_line(tokenizer, "mine\n"))
    future = trainer.forward_backward([datum], "cross_entropy")
    future.result()
    sampler = trainer.save_weights_and_get_sampling_client("alices")
    return trainer, sampler, future.request_id, datum


def call(client, method, request):
    connection = client._connection
    return connection.run(connection.call(method, request))


def test_another_owners_things_are_not_found_and_unchanged(bob, alices):
    trainer, sampler, request_id, datum = alices
    probe = types.ModelInput.from_ints(datum.model_input.to_ints())
    before = sampler.compute_logprobs(probe).result()
    run_id, path = trainer.training_run_id, sampler.model_path
    attempts = [
        ("GetTrainingRun", pb.GetTrainingRunRequest(training_run_id=run_id)),
        ("ForwardBackward", pb.ForwardBackwardRequest(training_run_id=run_id, seq=2, loss_fn="cross_entropy",
                                                     data=[_wire.datum_to_pb(datum)])),
        ("OptimStep", pb.OptimStepRequest(training_run_id=run_id, seq=2,
                                          adam_params=_wire.adam_params_to_pb(types.AdamParams(learning_rate=1.0)))),
        ("SaveWeightsForSampler", pb.SaveWeightsRequest(training_run_id=run_id, seq=2, name="stolen")),
        ("CreateSamplingSession", pb.CreateSamplingSessionRequest(model_path=path)),
        ("Sample", pb.SampleRequest(sampling_session_id=sampler.sampling_session_id, num_samples=1,
                                    prompt=_wire.model_input_to_pb(probe),
                                    sampling_params=pb.SamplingParams(max_tokens=2, top_k=-1, top_p=1))),
        ("ComputeLogprobs", pb.ComputeLogprobsRequest(sampling_session_id=sampler.sampling_session_id,
                                                      prompt=_wire.model_input_to_pb(probe))),
        ("RetrieveFuture", pb.RetrieveFutureRequest(request_id=request_id)),
    ]
    for method, request in attempts:
        with pytest.raises(stillroom.NotFoundError):
            call(bob, method, request)
    rest = bob.create_rest_client()
    for attempt in (lambda: rest.get_training_run(run_id), lambda: rest.list_checkpoints(run_id),
                    lambda: rest.delete_checkpoint(path), lambda: rest.set_checkpoint_ttl(path, 1)):
        with pytest.raises(stillroom.NotFoundError):
            attempt()
    assert run_id not in [r.training_run_id for r in rest.list_training_runs(limit=1000).training_runs]
    assert path not in [c.path for c in rest.list_user_checkpoints().checkpoints]
    teacher = bob.create_full_training_client(TINY, seed=0)
    with pytest.raises(stillroom.NotFoundError, match="loss_fn_config.teacher"):
        teacher.forward_backward([datum], "teacher_reverse_kl", {"teacher": path}).result()
    # nothing of the owner's changed: the weights sample the same, the run goes on where it was
    assert sampler.compute_logprobs(probe).result() == before
    assert trainer.get_info().training_run_id == run_id
    assert trainer.optim_step(types.AdamParams(learning_rate=0.0)).result().metrics["grad_norm:value"] > 0


def test_calls_without_a_live_key_are_unauthenticated(server):
    for key in (None, "sr-not-a-real-key"):
        with stillroom.ServiceClient(base_url=server.address, api_key=key) as client:
            client._connection._metadata = (("authorization", f"Bearer {key}"),) if key else ()
            with pytest.raises(stillroom.AuthenticationError, match="API key"):
                client.get_server_capabilities()
    info, secret = keys.create_key(server.store, "carol", "short-lived")
    with stillroom.ServiceClient(base_url=server.address, api_key=secret) as client:
        assert client.get_server_capabilities().supported_models
        keys.revoke_key(server.store, info.id)
        with pytest.raises(stillroom.AuthenticationError):
            client.get_server_capabilities()


def test_the_keys_command_makes_lists_and_revokes_keys(tmp_path, capsys):
    store_args = ["--data-dir", str(tmp_path)]
    cli(["keys", "create", "--name", "ci", "--owner", "lab", *store_args])
    created = capsys.readouterr().out
    secret = created.strip().splitlines()[-1]
    assert secret.startswith("tml-") and "owner 'lab'" in created
    cli(["keys", "list", *store_args])
    listed = capsys.readouterr().out
    assert secret[:10] in listed and secret not in listed and "live" in listed
    cli(["keys", "revoke", secret[:10], *store_args])
    assert "revoked" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no live key"):
        cli(["keys", "revoke", secret[:10], *store_args])


def test_auth_off_is_refused_on_a_public_address(tmp_path):
    from stillroom_server.config import ServerConfig

    with pytest.raises(ValueError, match="auth 'off' is refused on the non-loopback address 0.0.0.0"):
        ServerConfig(data_dir=tmp_path, host="0.0.0.0", auth="off")
    assert ServerConfig(data_dir=tmp_path, host="127.0.0.1", auth="off").auth == "off"


def test_limits_name_themselves(server, service, tokenizer):
    from dataclasses import replace

    live = sum(1 for owner in server.service.run_owners.values() if owner == "local")
    saved = server.service.limits
    server.service.limits = replace(saved, max_live_runs_per_owner=live + 1, max_tokens_per_request=10)
    try:
        trainer = service.create_full_training_client(TINY, seed=0)
        limit = f"{live + 1} live runs is the limit of {live + 1} per owner"
        with pytest.raises(stillroom.RateLimitError, match=limit):
            service.create_full_training_client(TINY, seed=0)
        with pytest.raises(stillroom.BadRequestError,
                           match="data: 11 tokens is over the limit of 10 per request"):
            trainer.forward_backward([sft_datum(list(range(3, 15)))], "cross_entropy").result()
    finally:
        server.service.limits = saved
