"""The official `tinker` SDK (0.38) against a real `stillroom serve`, over Tinker's HTTP API.

One training program written for Tinker runs three ways: the official SDK over HTTP, Stillroom's
own SDK over gRPC, and Stillroom's SDK imported as `tinker`. All three must run it, and give the
same numbers (logprobs within 1e-5 on the same seeds): the HTTP API and the gRPC API are two
transports over one core, and `import stillroom as tinker` ports a loop.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys

import pytest

tinker_sdk = pytest.importorskip("tinker", reason="the official tinker SDK is a test dependency")

os.environ.setdefault("TINKER_TELEMETRY", "0")
BASE = "stillroom/char-1m"
pytestmark = pytest.mark.slow


def tinker_datum(tinker, tokens: list[int], **inputs):
    return tinker.types.Datum(model_input=tinker.types.ModelInput.from_ints(tokens[:-1]),
                              loss_fn_inputs=inputs)


def rl_inputs(n: int) -> dict:
    return {"target_tokens": None, "logprobs": [-1.0 - 0.1 * i for i in range(n)],
            "advantages": [(-1.0) ** i * 0.5 for i in range(n)]}


def run_program(tinker, service) -> dict:
    """The Tinker training program: every call a Tinker loop makes, recording the numbers."""
    T = tinker.types
    out: dict = {}
    trainer = service.create_lora_training_client(BASE, rank=8, seed=3).result()
    tokenizer = trainer.get_tokenizer()
    tokens = tokenizer.encode("the cat sat on the mat.\n", add_special_tokens=False)
    n = len(tokens) - 1
    ce = tinker_datum(tinker, tokens, target_tokens=tokens[1:], weights=[1.0] * n)
    out["forward"] = trainer.forward([ce], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()

    for loss in ("importance_sampling", "ppo", "cispo", "dro", "gspo", "stable_reinforce"):
        inputs = rl_inputs(n) | {"target_tokens": tokens[1:]}
        config = {"beta": 0.1} if loss == "dro" else None
        result = trainer.forward_backward([tinker_datum(tinker, tokens, **inputs)], loss, config).result()
        out[f"loss:{loss}"] = result.metrics["loss:sum"]

    def custom(data, logprobs_list):
        import torch
        loss = torch.stack([-(lp * torch.linspace(0, 1, len(lp))).sum() for lp in logprobs_list]).sum()
        return loss, {"custom:sum": float(loss.detach())}

    out["custom"] = trainer.forward_backward_custom([ce], custom).result().metrics["loss:sum"]
    fb = trainer.forward_backward([ce], "cross_entropy")
    step = trainer.optim_step(T.AdamParams(learning_rate=1e-2))
    out["ce"] = fb.result().metrics["loss:sum"]
    out["grad_norm"] = step.result().metrics["grad_norm:value"]

    state = trainer.save_state("state-1", ttl_seconds=3600, user_metadata={"step": "1"}).result().path
    assert state.startswith("tinker://" if tinker is tinker_sdk else ("tinker://", "stillroom://"))
    sampler_path = trainer.save_weights_for_sampler("sampler-1").result().path
    sampler = trainer.save_weights_and_get_sampling_client().result()
    params = T.SamplingParams(max_tokens=6, temperature=1.0, seed=11, top_k=20, top_p=0.95)
    sampled = sampler.sample(T.ModelInput.from_ints(tokens[:4]), num_samples=2, sampling_params=params,
                             include_prompt_logprobs=True).result()
    out["samples"] = [list(s.tokens) for s in sampled.sequences]
    out["sample_logprobs"] = [list(s.logprobs) for s in sampled.sequences]
    out["prompt_logprobs"] = sampled.prompt_logprobs
    out["logprobs"] = sampler.compute_logprobs(T.ModelInput.from_ints(tokens)).result()
    named = service.create_sampling_client(model_path=sampler_path)
    out["named_logprobs"] = named.compute_logprobs(T.ModelInput.from_ints(tokens)).result()

    trainer.forward_backward([ce], "cross_entropy").result()
    trainer.optim_step(T.AdamParams(learning_rate=1e-2)).result()
    trainer.load_state_with_optimizer(state).result()
    out["after_load"] = trainer.forward([ce], "cross_entropy").result().metrics["loss:sum"]
    trainer.load_state(state).result()
    resumed = service.create_training_client_from_state_with_optimizer(state).result()
    out["resumed"] = resumed.forward([ce], "cross_entropy").result().metrics["loss:sum"]
    fresh = service.create_training_client_from_state(state).result()
    out["fresh_info"] = fresh.get_info().model_data.model_name

    async def async_twins():
        fb = await trainer.forward_backward_async([ce], "cross_entropy")
        step = await trainer.optim_step_async(T.AdamParams(learning_rate=1e-3))
        result = await fb
        await step
        sample = await sampler.sample_async(T.ModelInput.from_ints(tokens[:4]), num_samples=1,
                                            sampling_params=params)
        return result.metrics["loss:sum"], list(sample.sequences[0].tokens)

    out["async"] = asyncio.run(async_twins())
    out["run"] = trainer.get_info().model_id
    out["state"] = state
    return out


def rest_program(tinker, rest, run_id: str, state: str) -> None:
    runs = rest.list_training_runs(limit=50).result()
    assert run_id in [r.training_run_id for r in runs.training_runs]
    run = rest.get_training_run(run_id).result()
    assert run.is_lora and run.lora_rank == 8 and run.last_checkpoint is not None
    checkpoints = rest.list_checkpoints(run_id).result().checkpoints
    assert {"weights/state-1", "sampler_weights/sampler-1"} <= {c.checkpoint_id for c in checkpoints}
    saved = next(c for c in checkpoints if c.checkpoint_id == "weights/state-1")
    assert saved.expires_at is not None and saved.user_metadata == {"step": "1"}
    rest.set_checkpoint_ttl_from_tinker_path(saved.tinker_path, None).result()
    again = next(c for c in rest.list_checkpoints(run_id).result().checkpoints
                 if c.checkpoint_id == "weights/state-1")
    assert again.expires_at is None
    assert rest.get_training_run_by_tinker_path(state).result().training_run_id == run_id
    rest.delete_checkpoint(run_id, "sampler_weights/sampler-1").result()
    assert "sampler_weights/sampler-1" not in {
        c.checkpoint_id for c in rest.list_checkpoints(run_id).result().checkpoints}


def assert_same(a: dict, b: dict) -> None:
    """The two wires reach the same engine with the same requests: equal numbers (1e-5 is slack)."""
    for key in ("forward", "logprobs", "named_logprobs", "prompt_logprobs"):
        for x, y in zip(a[key], b[key], strict=True):
            assert (x is None and y is None) or (x is not None and y is not None
                                                 and math.isclose(x, y, abs_tol=1e-5)), key
    for key in ("loss:importance_sampling", "loss:ppo", "loss:cispo", "loss:dro", "loss:gspo",
                "loss:stable_reinforce", "custom", "ce",
                "grad_norm", "after_load", "resumed"):
        assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-5), (key, a[key], b[key])
    assert a["samples"] == b["samples"]
    for x, y in zip(sum(a["sample_logprobs"], []), sum(b["sample_logprobs"], []), strict=True):
        assert math.isclose(x, y, abs_tol=1e-5)
    assert a["async"][1] == b["async"][1]


@pytest.fixture(scope="module")
def stillroom_as_tinker():
    """`import stillroom as tinker`, as a ported loop does it."""
    import stillroom

    saved = sys.modules["tinker"]  # the official SDK, imported above
    sys.modules["tinker"] = stillroom
    try:
        yield stillroom
    finally:
        sys.modules["tinker"] = saved


@pytest.fixture(scope="module")
def over_http(server):
    official = tinker_sdk.ServiceClient(base_url=server.http_url, api_key=server.local_api_key)
    numbers = run_program(tinker_sdk, official)
    official.close("success").result()
    return numbers


def test_the_official_sdk_runs_a_training_program_over_http(server, over_http):
    rest = tinker_sdk.RestClient(base_url=server.http_url, api_key=server.local_api_key)
    rest_program(tinker_sdk, rest, over_http["run"], over_http["state"])
    assert over_http["fresh_info"] == BASE
    assert all(math.isfinite(x) for x in over_http["forward"])
    assert over_http["logprobs"][0] is None and len(over_http["samples"]) == 2


def test_stillroom_imported_as_tinker_gives_the_same_numbers_over_grpc(server, over_http,
                                                                       stillroom_as_tinker):
    ported = stillroom_as_tinker.ServiceClient(base_url=server.address, api_key=server.local_api_key)
    over_grpc = run_program(stillroom_as_tinker, ported)
    rest_program(stillroom_as_tinker, ported.create_rest_client(), over_grpc["run"], over_grpc["state"])
    assert_same(over_http, over_grpc)
    ported.close("success").result()


def test_http_refuses_bad_keys_foreign_models_and_malformed_bodies(server):
    import httpx

    from stillroom_server.store import keys

    url = server.http_url + "/api/v1"
    key = {"X-API-Key": server.local_api_key}
    with pytest.raises(tinker_sdk.AuthenticationError):
        tinker_sdk.RestClient(base_url=server.http_url, api_key="tml-not-a-key").list_training_runs().result()
    for headers in ({}, {"X-API-Key": "tml-wrong"}):
        answer = httpx.post(url + "/create_session", json={}, headers=headers)
        assert answer.status_code == 401 and "API key" in answer.json()["error"]
    session = httpx.post(url + "/create_session", json={}, headers=key).json()["session_id"]
    _, other_key = keys.create_key(server.store, "someone-else", "isolation test")
    other = tinker_sdk.ServiceClient(base_url=server.http_url, api_key=other_key)
    foreign = other.create_lora_training_client(BASE, rank=4).result().model_id
    answer = httpx.post(url + "/get_info", json={"model_id": foreign}, headers=key)
    assert answer.status_code == 404 and foreign in answer.json()["error"]
    with pytest.raises(tinker_sdk.NotFoundError):
        tinker_sdk.RestClient(base_url=server.http_url, api_key=server.local_api_key) \
            .get_training_run(foreign).result()
    other.close("success").result()
    answer = httpx.post(url + "/create_model", content=b"{not json", headers=key)
    assert answer.status_code == 400 and "body" in answer.json()["error"]
    answer = httpx.post(url + "/create_model", json={"session_id": session, "base_model": BASE}, headers=key)
    assert answer.status_code == 400 and "model_seq_id" in answer.json()["error"]
    answer = httpx.post(url + "/forward_backward", content=b"\xff\x00garbage",
                        headers=key | {"Content-Type": "application/x-protobuf"})
    assert answer.status_code == 400 and "ForwardBackwardRequest" in answer.json()["error"]
    answer = httpx.post(url + "/create_model", json={"session_id": session, "model_seq_id": 0,
                                                     "base_model": "no/such-model"}, headers=key)
    assert answer.status_code == 200  # a future: the failure comes back through retrieve_future
    failed = httpx.post(url + "/retrieve_future", json={"request_id": answer.json()["request_id"]},
                        headers=key).json()
    assert failed["category"] == "user" and "no/such-model" in failed["error"]
    assert httpx.get(url + "/healthz").json()["status"] == "ok"


def test_refused_http_requests_change_nothing(server):
    """A refused request leaves the run's numbering and weights as they were; the server serves on."""
    import httpx

    T = tinker_sdk.types
    client = tinker_sdk.ServiceClient(base_url=server.http_url, api_key=server.local_api_key)
    trainer = client.create_lora_training_client(BASE, rank=4, seed=5).result()
    run = trainer.model_id
    datum = T.Datum(model_input=T.ModelInput.from_ints([1, 40, 41, 42]),
                    loss_fn_inputs={"target_tokens": [40, 41, 42, 2], "weights": [1.0] * 4})
    before = trainer.forward([datum], "cross_entropy").result().metrics["loss:sum"]
    last_seq = server.store.get_run(run).last_seq
    url, key = server.http_url + "/api/v1", {"X-API-Key": server.local_api_key}
    # Numbered requests that fail validation use up their number (the SDK counts every call) and
    # fail at once through their future, naming the field; nothing runs.
    numbered = [
        ("/optim_step", {"adam_params": {"learning_rate": -1.0}}, "adam_params.learning_rate"),
        ("/save_weights", {"path": "../escape"}, "name"),
        ("/save_weights", {"path": "ok", "ttl_seconds": 0}, "ttl_seconds"),
        ("/load_weights", {"path": "tinker://nope/weights/x", "optimizer": False}, "path"),
    ]
    for offset, (path, body, field) in enumerate(numbered, start=1):
        body = body | {"model_id": run, "seq_id": last_seq + offset}
        answer = httpx.post(url + path, json=body, headers=key)
        assert answer.status_code == 200, answer.text
        failed = httpx.post(url + "/retrieve_future", json={"request_id": answer.json()["request_id"]},
                            headers=key).json()
        assert failed["category"] == "user" and field in failed["error"], (path, failed)
    unnumbered = [
        ("/optim_step", {"model_id": run, "seq_id": "x"}, "seq_id"),
        ("/asample", {"sampling_session_id": "samp-nope", "prompt": {"chunks": []},
                      "sampling_params": {}}, "sampling_session_id"),
    ]
    for path, body, field in unnumbered:
        answer = httpx.post(url + path, json=body, headers=key)
        assert answer.status_code in (400, 404) and field in answer.json()["error"], (path, answer.text)
    assert server.store.get_run(run).last_seq == last_seq + len(numbered)
    client.close("success").result()
    client = tinker_sdk.ServiceClient(base_url=server.http_url, api_key=server.local_api_key)
    trainer = client.create_lora_training_client(BASE, rank=4, seed=5).result()
    before = trainer.forward([datum], "cross_entropy").result().metrics["loss:sum"]
    bad_tokens = T.Datum(model_input=T.ModelInput.from_ints([1, 10**6]),
                         loss_fn_inputs={"target_tokens": [40, 2], "weights": [1.0, 1.0]})
    with pytest.raises(tinker_sdk.RequestFailedError, match="model_input"):
        trainer.forward_backward([bad_tokens], "cross_entropy").result()
    after = trainer.forward([datum], "cross_entropy").result().metrics["loss:sum"]
    assert after == before
    client.close("success").result()


def test_stillroom_extras_through_the_official_sdk(server):
    """Stillroom's teacher loss, the newer RL losses and the sampling options, sent by the SDK."""
    T = tinker_sdk.types
    client = tinker_sdk.ServiceClient(base_url=server.http_url, api_key=server.local_api_key)
    trainer = client.create_lora_training_client(BASE, rank=4, seed=1).result()
    tokens = trainer.get_tokenizer().encode("a b c d e f\n", add_special_tokens=False)
    n = len(tokens) - 1
    teacher = trainer.save_weights_for_sampler("teacher").result().path
    kl = T.Datum(model_input=T.ModelInput.from_ints(tokens[:-1]),
                 loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * n})
    result = trainer.forward_backward([kl], "teacher_reverse_kl", {"teacher": teacher}).result()
    # the student is its own teacher here: logprobs a few ulps apart, a KL of ~1e-7 a token
    assert abs(result.metrics["teacher_kl:mean"]) < 1e-5
    for loss in ("gspo", "stable_reinforce"):
        datum = T.Datum(model_input=T.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs=rl_inputs(n) | {"target_tokens": tokens[1:]})
        assert math.isfinite(trainer.forward_backward([datum], loss).result().metrics["loss:sum"])
    sampler = client.create_sampling_client(base_model=BASE)
    params = T.SamplingParams(max_tokens=5, temperature=1.0, seed=2)
    response = sampler.sample(T.ModelInput.from_ints(tokens), num_samples=2, sampling_params=params,
                              include_prompt_logprobs=True, topk_prompt_logprobs=3,
                              topk_sample_logprobs=2, prompt_logprobs_last_n=3).result()
    assert [p is None for p in response.prompt_logprobs] == [True] * (len(tokens) - 3) + [False] * 3
    for sequence in response.sequences:
        assert sequence.sequence_id and len(sequence.topk_logprobs) == len(sequence.tokens)
        assert all(len(row) == 2 for row in sequence.topk_logprobs)
    with pytest.raises(tinker_sdk.RequestFailedError, match="no/such-model"):
        trainer.forward_backward([kl], "teacher_reverse_kl", {"teacher": "no/such-model"}).result()
    client.close("success").result()


def test_a_forward_backward_the_sdk_sends_in_parts(server):
    """Over 1024 datums the SDK sends one forward_backward as several numbered parts (in the order
    the server's client config asks for): every datum's output comes back, in order, and the loss
    is the one the same datums give in calls under the limit."""
    T = tinker_sdk.types
    client = tinker_sdk.ServiceClient(base_url=server.http_url, api_key=server.local_api_key)
    trainer = client.create_lora_training_client(BASE, rank=4, seed=5).result()
    lines = [[10 + (i * 7 + j) % 90 for j in range(2 + i % 3)] for i in range(1030)]
    data = [T.Datum(model_input=T.ModelInput.from_ints(line[:-1]),
                    loss_fn_inputs={"target_tokens": line[1:], "weights": [1.0] * (len(line) - 1)})
            for line in lines]
    whole = trainer.forward_backward(data, "cross_entropy").result()
    assert [len(out["logprobs"].tolist()) for out in whole.loss_fn_outputs] == [len(x) - 1 for x in lines]
    halves = [trainer.forward(data[:515], "cross_entropy"), trainer.forward(data[515:], "cross_entropy")]
    by_halves = sum(half.result().metrics["loss:sum"] for half in halves)   # other batches: a few ulps
    assert math.isclose(whole.metrics["loss:sum"], by_halves, rel_tol=1e-5)
    assert trainer.optim_step(T.AdamParams(learning_rate=1e-3)).result().metrics["grad_norm:value"] > 0
    client.close("success").result()


def test_numbered_requests_that_arrive_early_wait_for_their_turn(server, monkeypatch):
    """A part sent before the one it follows is answered at once and runs after it; a gap that never
    fills fails the held request, naming the missing number."""
    import httpx

    from stillroom_server.http_api import app as http_app

    client = tinker_sdk.ServiceClient(base_url=server.http_url, api_key=server.local_api_key)
    run = client.create_lora_training_client(BASE, rank=4, seed=9).result().model_id
    url, key = server.http_url + "/api/v1", {"X-API-Key": server.local_api_key}
    last = server.store.get_run(run).last_seq
    poll = lambda answer: httpx.post(url + "/retrieve_future", headers=key, timeout=60,  # noqa: E731
                                     json={"request_id": answer.json()["request_id"]}).json()
    early = httpx.post(url + "/optim_step", headers=key, timeout=10,  # answered without waiting
                       json={"model_id": run, "seq_id": last + 2, "adam_params": {}})
    assert early.status_code == 200 and server.store.get_run(run).last_seq == last
    first = httpx.post(url + "/save_weights", headers=key,
                       json={"model_id": run, "seq_id": last + 1, "path": "before-step"})
    assert poll(first)["path"].endswith("/weights/before-step")
    assert "grad_norm:value" in poll(early)["metrics"]
    monkeypatch.setattr(http_app, "HOLD_OUT_OF_ORDER_SECONDS", 0.5)
    gap = httpx.post(url + "/optim_step", headers=key,
                     json={"model_id": run, "seq_id": last + 4, "adam_params": {}})
    failed = poll(gap)
    while failed.get("type") == "try_again":
        failed = poll(gap)
    assert failed["category"] == "user" and f"request {last + 3}" in failed["error"]
    client.close("success").result()


def test_unload_model_frees_a_run_that_its_checkpoint_resumes(server):
    """Tinker's unload_model (a type the SDK ships, sent here as the wire says): the run leaves
    memory after its queued work, a later call names its last save, and the save resumes it."""
    import httpx

    T = tinker_sdk.types
    client = tinker_sdk.ServiceClient(base_url=server.http_url, api_key=server.local_api_key)
    trainer = client.create_lora_training_client(BASE, rank=4, seed=4).result()
    run = trainer.model_id
    datum = tinker_datum(tinker_sdk, [1, 40, 41, 42, 43], target_tokens=[40, 41, 42, 43], weights=[1.0] * 4)
    trainer.forward_backward([datum], "cross_entropy")
    trainer.optim_step(T.AdamParams(learning_rate=1e-2))
    state = trainer.save_state("before-unload").result().path
    before = trainer.forward([datum], "cross_entropy").result().metrics["loss:sum"]
    url, key = server.http_url + "/api/v1", {"X-API-Key": server.local_api_key}
    answer = httpx.post(url + "/unload_model", headers=key, json={"model_id": run, "type": "unload_model"})
    done = httpx.post(url + "/retrieve_future", headers=key, timeout=60,
                      json={"request_id": answer.json()["request_id"]}).json()
    assert done["model_id"] == run and not server.service.is_live(run)
    with pytest.raises(tinker_sdk.RequestFailedError, match="before-unload"):
        trainer.forward([datum], "cross_entropy").result()
    resumed = client.create_training_client_from_state_with_optimizer(state).result()
    after = resumed.forward([datum], "cross_entropy").result().metrics["loss:sum"]
    assert after == pytest.approx(before, abs=1e-6)   # the same weights and batch: bit-equal
    unknown = httpx.post(url + "/unload_model", headers=key, json={"model_id": "no-such-run"})
    assert unknown.status_code == 404 and "no-such-run" in unknown.text
    client.close("success").result()


def test_a_long_poll_that_ends_without_a_result_is_retried_quietly(server, monkeypatch, caplog):
    """A poll that ends pending answers 408 try_again with x-should-retry false, which tinker 0.38
    polls again at once without logging; a 200 try_again logged a WARNING on every poll."""
    import logging

    from stillroom_server.http_api import app as http_app

    monkeypatch.setattr(http_app, "MAX_POLL_SECONDS", 0.05)
    client = tinker_sdk.ServiceClient(base_url=server.http_url, api_key=server.local_api_key)
    sampler = client.create_sampling_client(base_model=BASE)
    params = tinker_sdk.types.SamplingParams(max_tokens=200, temperature=1.0, seed=1)
    with caplog.at_level(logging.INFO):
        result = sampler.sample(tinker_sdk.types.ModelInput.from_ints([1, 40]), num_samples=8,
                                sampling_params=params).result()
    assert len(result.sequences) == 8
    polls = [r for r in caplog.records if "try_again" in r.getMessage()]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("tinker")], \
        [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not polls
    client.close("success").result()
