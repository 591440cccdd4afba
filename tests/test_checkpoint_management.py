"""The RestClient: runs and checkpoints are listed, expire on their TTL, are deleted with their
files and loaded weights, refuse malformed paths without touching a file, and survive a restart."""

from __future__ import annotations

import asyncio
import time

import pytest

import stillroom
from stillroom import types
from stillroom_server.app import StillroomServer
from stillroom_server.config import ServerConfig

from conftest import TINY
from helpers import encode_line, sft_datum, train_steps

PARAMS = types.SamplingParams(max_tokens=8, temperature=1.0, seed=3)
BAD_PATHS = [
    "stillroom://../../etc/weights/passwd",
    "stillroom://run-x/weights/../../../outside",
    "stillroom://run-x/sampler_weights/..",
    "stillroom://run-x/other/name",
    "stillroom://run-x/weights/a/b",
    "/etc/passwd",
    "",
]


def _checkpoint_dir(server, path: str):
    run_id, kind, name = path.removeprefix("stillroom://").split("/")
    return server.config.data_dir / "checkpoints" / run_id / kind / name


def test_runs_and_checkpoints_are_listed(service, tokenizer):
    rest = service.create_rest_client()
    trainer = service.create_lora_training_client(TINY, rank=4, seed=0, user_metadata={"who": "rest"})
    train_steps(trainer, [sft_datum(encode_line(tokenizer, "listing"))], 1, 1e-2)
    state = trainer.save_state("listed-state").result().path
    sampler = trainer.save_weights_for_sampler("listed-sampler").result().path

    listed = rest.list_checkpoints(trainer.training_run_id).checkpoints
    assert [(c.path, c.checkpoint_type, c.checkpoint_id) for c in listed] == [
        (state, "training", "weights/listed-state"), (sampler, "sampler", "sampler_weights/listed-sampler")]
    assert all(c.size_bytes > 0 and c.expires_at is None and c.is_lora for c in listed)
    assert {state, sampler} <= {c.path for c in rest.list_user_checkpoints().checkpoints}

    run = rest.get_training_run(trainer.training_run_id).result()  # an APIFuture, as in Tinker
    assert isinstance(run, stillroom.TrainingRun)
    assert (run.base_model, run.is_lora, run.lora_rank) == (TINY, True, 4)
    assert run.last_checkpoint is not None and run.last_sampler_checkpoint is not None
    assert run.last_checkpoint.path == state and run.last_sampler_checkpoint.path == sampler
    assert run.user_metadata == {"who": "rest"}

    page = rest.list_training_runs(limit=1000)
    assert trainer.training_run_id in [r.training_run_id for r in page.training_runs]
    assert page.cursor.total_count >= len(page.training_runs)
    newest = rest.list_training_runs(limit=1, offset=0).training_runs
    assert len(newest) == 1
    async_page = asyncio.run(rest.list_training_runs_async(limit=2, offset=1))
    assert [r.training_run_id for r in async_page.training_runs] == \
        [r.training_run_id for r in page.training_runs[1:3]]
    with pytest.raises(stillroom.NotFoundError):
        rest.get_training_run("run-does-not-exist")
    with pytest.raises(stillroom.BadRequestError, match="limit"):
        rest.list_training_runs(limit=-1)


def test_delete_removes_files_row_and_loaded_weights(service, server, tokenizer):
    rest = service.create_rest_client()
    trainer = service.create_lora_training_client(TINY, rank=4, seed=0)
    sampler = trainer.save_weights_and_get_sampling_client("doomed")
    prompt = types.ModelInput.from_ints(encode_line(tokenizer, "ab")[:2])
    sampler.sample(prompt, 1, PARAMS).result()  # loaded into the engine
    path = sampler.model_path
    assert _checkpoint_dir(server, path).exists()

    deleted = rest.delete_checkpoint(path)
    assert deleted.path == path
    assert not _checkpoint_dir(server, path).exists()
    assert path not in {c.path for c in rest.list_checkpoints(trainer.training_run_id).checkpoints}
    with pytest.raises(stillroom.NotFoundError):
        sampler.sample(prompt, 1, PARAMS).result()
    with pytest.raises(stillroom.NotFoundError):
        service.create_sampling_client(model_path=path)
    with pytest.raises(stillroom.NotFoundError):
        rest.delete_checkpoint(path)
    assert f"path:{path}" not in server.engines.samplers   # the engine unloaded it too (a broadcast)

    state = trainer.save_state("doomed-state").result().path
    asyncio.run(rest.delete_checkpoint_async(state))
    with pytest.raises(stillroom.NotFoundError):
        service.create_training_client_from_state(state)
    # the name is free again, and the run still trains
    trainer.save_weights_for_sampler("doomed").result()
    train_steps(trainer, [sft_datum(encode_line(tokenizer, "still here"))], 1, 1e-2)


def test_expired_checkpoints_are_deleted_by_the_server(service, server):
    rest = service.create_rest_client()
    trainer = service.create_full_training_client(TINY, seed=0)
    keep = trainer.save_weights_for_sampler("keep").result().path
    short = trainer.save_weights_for_sampler("short").result().path
    sampler = service.create_sampling_client(model_path=short)

    assert rest.set_checkpoint_ttl(keep, 3600).expires_at is not None
    assert rest.set_checkpoint_ttl(keep, None).expires_at is None
    with pytest.raises(stillroom.BadRequestError, match="ttl_seconds"):
        rest.set_checkpoint_ttl(keep, 0)
    expiring = asyncio.run(rest.set_checkpoint_ttl_async(short, 1))
    assert expiring.expires_at is not None

    deadline = time.monotonic() + 10
    while _checkpoint_dir(server, short).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _checkpoint_dir(server, short).exists()
    assert [c.path for c in rest.list_checkpoints(trainer.training_run_id).checkpoints] == [keep]
    with pytest.raises(stillroom.NotFoundError):
        sampler.sample(types.ModelInput.from_ints([1, 40]), 1, PARAMS).result()
    assert _checkpoint_dir(server, keep).exists()


def test_malformed_paths_are_refused_everywhere_and_touch_nothing(service, server, tmp_path):
    rest = service.create_rest_client()
    trainer = service.create_lora_training_client(TINY, rank=4, seed=0)
    sentinel = server.config.data_dir / "outside"
    sentinel.mkdir(exist_ok=True)
    (sentinel / "keep.txt").write_text("untouched")
    before = sorted(p.relative_to(server.config.data_dir) for p in server.config.data_dir.rglob("*")
                    if "checkpoints" not in p.parts)
    calls = [
        rest.delete_checkpoint, lambda p: rest.set_checkpoint_ttl(p, 10),
        rest.get_checkpoint_archive_url, lambda p: rest.download_checkpoint_archive(p, tmp_path),
        service.create_training_client_from_state,
        service.create_training_client_from_state_with_optimizer,
        lambda p: trainer.load_state(p).result(), lambda p: trainer.load_state_with_optimizer(p).result(),
        lambda p: service.create_sampling_client(model_path=p),
        lambda p: asyncio.run(rest.delete_checkpoint_async(p)),
    ]
    for bad in BAD_PATHS:
        for call in calls:
            with pytest.raises(stillroom.BadRequestError):
                call(bad)
    after = sorted(p.relative_to(server.config.data_dir) for p in server.config.data_dir.rglob("*")
                   if "checkpoints" not in p.parts)
    assert after == before and (sentinel / "keep.txt").read_text() == "untouched"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_everything_saved_is_listed_loads_and_samples_the_same_after_a_restart(tmp_path, tokenizer):
    # One thread count for both servers: it decides the order of float sums, so the same weights
    # give bit-equal logprobs only under the same count (by default it is measured at start).
    config = ServerConfig(data_dir=tmp_path, host="127.0.0.1", port=0, threads=1)
    data = [sft_datum(encode_line(tokenizer, "restart me"))]
    prompt = types.ModelInput.from_ints(encode_line(tokenizer, "re")[:2])
    with StillroomServer(config) as server, \
            stillroom.ServiceClient(base_url=server.address, api_key=server.local_api_key) as client:
        expected = {}
        for trainer in (client.create_lora_training_client(TINY, rank=4, seed=0),
                        client.create_full_training_client(TINY, seed=0)):
            train_steps(trainer, data, 2, 1e-2)
            state = trainer.save_state("state").result().path
            sampler = trainer.save_weights_and_get_sampling_client("sampler")
            trainer.forward_backward(data, "cross_entropy")
            trainer.optim_step(types.AdamParams(learning_rate=1e-2))
            after_step = trainer.forward(data, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data
            expected[state] = after_step
            expected[sampler.model_path] = (sampler.sample(prompt, 2, PARAMS).result(),
                                            sampler.compute_logprobs(prompt).result())
        listed = {c.path for c in
                  client.create_rest_client().list_user_checkpoints(limit=1000).result().checkpoints}

    with StillroomServer(config) as server, \
            stillroom.ServiceClient(base_url=server.address, api_key=server.local_api_key) as client:
        checkpoints = client.create_rest_client().list_user_checkpoints(limit=1000).result().checkpoints
        assert {c.path for c in checkpoints} == listed
        assert set(expected) == listed
        for path, want in expected.items():
            if "/sampler_weights/" in path:
                sampler = client.create_sampling_client(model_path=path)
                got = sampler.sample(prompt, 2, PARAMS).result()  # the same samples; new sequence ids
                assert [(q.tokens, q.logprobs, q.stop_reason) for q in got.sequences] == \
                    [(q.tokens, q.logprobs, q.stop_reason) for q in want[0].sequences]
                assert sampler.compute_logprobs(prompt).result() == want[1]
            else:
                trainer = client.create_training_client_from_state_with_optimizer(path)
                trainer.forward_backward(data, "cross_entropy")
                trainer.optim_step(types.AdamParams(learning_rate=1e-2))
                got = trainer.forward(data, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data
                # one thread, the same weights, moments and batch: bit-equal; 1e-6 is two ulps of slack
                assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-6


def test_another_owners_runs_and_checkpoints_are_not_found(service, server, monkeypatch):
    rest = service.create_rest_client()
    trainer = service.create_lora_training_client(TINY, rank=4, seed=0)
    state = trainer.save_state("private").result().path
    monkeypatch.setattr(server.servicer.auth, "owner", lambda secret: "someone-else")
    runs = rest.list_training_runs(limit=1000).training_runs
    assert trainer.training_run_id not in {r.training_run_id for r in runs}
    assert state not in {c.path for c in rest.list_user_checkpoints().checkpoints}
    for call in (rest.delete_checkpoint, lambda p: rest.set_checkpoint_ttl(p, 5),
                 rest.get_checkpoint_archive_url, service.create_training_client_from_state):
        with pytest.raises(stillroom.NotFoundError):
            call(state)
    with pytest.raises(stillroom.NotFoundError):
        rest.list_checkpoints(trainer.training_run_id)
    monkeypatch.undo()
    assert _checkpoint_dir(server, state).exists()
    assert state in {c.path for c in rest.list_user_checkpoints().checkpoints}


def test_samples_queued_when_their_weights_are_deleted_finish_or_say_not_found(service, tokenizer):
    trainer = service.create_lora_training_client(TINY, rank=4, seed=0)
    sampler = trainer.save_weights_and_get_sampling_client("racing")
    prompt = types.ModelInput.from_ints(encode_line(tokenizer, "ab")[:2])
    futures = [sampler.sample(prompt, 2, PARAMS) for _ in range(6)]
    service.create_rest_client().delete_checkpoint(sampler.model_path)
    for future in futures:  # never INTERNAL: either sampled before the delete, or NOT_FOUND
        try:
            assert len(future.result().sequences) == 2
        except stillroom.NotFoundError:
            pass
    with pytest.raises(stillroom.NotFoundError):
        sampler.sample(prompt, 1, PARAMS).result()
