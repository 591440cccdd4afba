"""Hostile bodies over both wires, one class each: every one is a 4xx naming the field, changes
nothing, and leaves the server serving. The classes are those a hostile round found (a sparse tensor
that segfaulted the server, 5xx for wrong JSON shapes, NaN, infinity, huge integers and deep
nesting, a truncated token id, unbounded tags, a reused request number answered with another
request's result, the data dir in a 401)."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch

import stillroom
from stillroom import types
from stillroom_server.http_api._proto import tinker_wire_pb2 as tw
from stillroom_server.store import keys

from conftest import TINY

PROTO = {"Content-Type": "application/x-protobuf"}


class Http:
    """Raw calls to Tinker's HTTP API with one owner's key."""

    def __init__(self, server, key: str) -> None:
        self.url, self.key = server.http_url + "/api/v1", {"X-API-Key": key}

    def post(self, path: str, body=None, content: bytes | None = None, headers=None) -> httpx.Response:
        return httpx.post(self.url + path, json=body, content=content, timeout=60,
                          headers={**self.key, **(headers or {})})

    def result(self, answer: httpx.Response) -> dict:
        assert answer.status_code == 200, answer.text
        while True:
            done = self.post("/retrieve_future", {"request_id": answer.json()["request_id"]}).json()
            if done.get("type") != "try_again":
                return done


@pytest.fixture(scope="module")
def http(server):
    return Http(server, server.local_api_key)


@pytest.fixture(scope="module")
def run(http):
    """A LoRA run of the local owner, made over HTTP as the tinker SDK makes one."""
    session = http.post("/create_session", {"tags": []}).json()["session_id"]
    answer = http.post("/create_model", {"session_id": session, "model_seq_id": 0, "base_model": TINY,
                                         "lora_config": {"rank": 4, "seed": 3}})
    return http.result(answer)["model_id"], session


def fwd_body(run_id: str, seq: int, weights: tw.Tensor, tokens=(1, 40, 41, 42)) -> bytes:
    request = tw.ForwardBackwardRequest(model_id=run_id, seq_id=seq, loss_fn="cross_entropy",
                                        forward_only=True)
    datum = request.data.add()
    datum.model_input.add().encoded_text.tokens = np.asarray(tokens, "<i4").tobytes()
    targets = datum.loss_fn_inputs["target_tokens"]
    targets.dtype, targets.dense = tw.DTYPE_INT64, np.asarray([*tokens[1:], 2], "<i8").tobytes()
    targets.shape.append(len(tokens))
    datum.loss_fn_inputs["weights"].CopyFrom(weights)
    return request.SerializeToString()


def csr(shape, crow, col, values) -> tw.Tensor:
    tensor = tw.Tensor(dtype=tw.DTYPE_FLOAT32, shape=shape)
    tensor.sparse_csr.crow_indices = np.asarray(crow, "<i8").tobytes()
    tensor.sparse_csr.col_indices = np.asarray(col, "<i8").tobytes()
    tensor.sparse_csr.values = np.asarray(values, "<f4").tobytes()
    return tensor


def next_seq(server, run_id: str) -> int:
    return server.store.get_run(run_id).last_seq + 1


def healthy(http: Http) -> None:
    assert httpx.get(http.url + "/healthz", timeout=10).json()["status"] == "ok"


@pytest.mark.parametrize("case, tensor, field", [
    ("row pointers that run backwards", csr([4, 1], [5, 0, 0, 0, 0], [], []), "crow_indices"),
    ("a negative row pointer", csr([4, 1], [-5, 1, 1, 1, 1], [0], [1.0]), "crow_indices"),
    ("a column outside the shape", csr([4, 1], [0, 1, 1, 1, 1], [7], [1.0]), "col_indices"),
    ("a column repeated in a row", csr([4, 2], [0, 2, 2, 2, 2], [1, 1], [1.0, 1.0]), "col_indices"),
    ("pointers that miss the value count", csr([4, 1], [0, 1, 1, 1, 3], [0], [1.0]), "crow_indices"),
    ("a shape of 10^18 values", csr([4, 10**18], [0, 0, 0, 0, 0], [], []), "values in all"),
    ("a 3-D sparse shape", csr([4, 1, 1], [0, 0, 0, 0, 0], [], []), "dimensions"),
    ("a first dimension that is not the input's", csr([9, 1], [0] * 10, [], []), "model_input length"),
])
def test_sparse_tensors_are_checked_before_torch_sees_them(server, http, run, case, tensor, field):
    """The crash of the hardening round: CSR row pointers that run backwards segfaulted the server
    (torch's constructor trusts them); now each broken invariant is a 400 naming it."""
    run_id, _ = run
    answer = http.post("/forward", content=fwd_body(run_id, next_seq(server, run_id), tensor), headers=PROTO)
    assert answer.status_code == 400, (case, answer.text)
    assert field in answer.json()["error"] and "weights" in answer.json()["error"], answer.text
    healthy(http)


def test_a_valid_sparse_tensor_decodes_as_its_dense_twin():
    """The SDK's CSR encoding of a [4, 2] tensor (unlisted cells are 0), decoded by numpy."""
    from stillroom_server.http_api import wire

    sparse = csr([4, 2], [0, 0, 2, 2, 3], [0, 1, 1], [1.0, 2.5, -3.0])
    assert wire.tensor_from_proto(sparse, "weights", rows=4).tolist() == \
        [[0.0, 0.0], [1.0, 2.5], [0.0, 0.0], [0.0, -3.0]]


@pytest.mark.parametrize("case, tensor, field", [
    ("a dense tensor whose bytes miss its shape", tw.Tensor(dtype=tw.DTYPE_FLOAT32, shape=[4],
                                                            dense=b"\0" * 12), "do not fill"),
    ("70 dimensions", tw.Tensor(dtype=tw.DTYPE_FLOAT32, shape=[4] + [1] * 69, dense=b"\0" * 16),
     "dimensions"),
    ("an unknown dtype", tw.Tensor(dtype=77, shape=[4], dense=b"\0" * 16),  # pyright: ignore[reportArgumentType]
     "dtype"),
])
def test_dense_tensors_are_checked_too(server, http, run, case, tensor, field):
    run_id, _ = run
    answer = http.post("/forward", content=fwd_body(run_id, next_seq(server, run_id), tensor), headers=PROTO)
    assert answer.status_code == 400 and field in answer.json()["error"], (case, answer.text)


def test_the_owner_is_checked_before_a_body_is_decoded(server, http, run):
    """Another owner's run id with a broken tensor: 404 (nothing of the body was decoded)."""
    run_id, _ = run
    _, other_key = keys.create_key(server.store, "hostile-other", "hostile test")
    other = Http(server, other_key)
    answer = other.post("/forward_backward", content=fwd_body(run_id, 1, csr([4, 1], [5, 0], [], [])),
                        headers=PROTO)
    assert answer.status_code == 404 and run_id in answer.json()["error"]


@pytest.mark.parametrize("case, raw, field", [
    ("prompt as a list", {"prompt": [1, 2, 3]}, "prompt"),
    ("sampling_params as a string", {"sampling_params": "greedy"}, "sampling_params"),
    ("tokens as strings", {"prompt": {"chunks": [{"tokens": ["1", "2"]}]}}, "tokens"),
    ("a token id of 1.5", {"prompt": {"chunks": [{"tokens": [1, 1.5]}]}}, "prompt.chunks.0.tokens.1"),
    ("a token id of 1e400", '{"prompt": {"chunks": [{"tokens": [1, 1e400]}]}}', "range of a 64-bit float"),
    ("NaN as max_tokens", '{"sampling_params": {"max_tokens": NaN}}', "NaN"),
    ("Infinity as num_samples", '{"num_samples": Infinity}', "Infinity"),
    ("a seed past int64", {"sampling_params": {"seed": 2**64}}, "sampling_params.seed"),
    ("a seed far past int64", {"sampling_params": {"seed": 10**30}}, "sampling_params.seed"),
    ("a token id past int64", {"prompt": {"chunks": [{"tokens": [2**63]}]}}, "tokens"),
    ("a token outside the vocabulary", {"prompt": {"chunks": [{"tokens": [1, 10**9]}]}}, "vocabulary"),
    ("a stop list of mixed kinds", {"sampling_params": {"stop": ["a", 2]}}, "sampling_params.stop"),
    ("a negative num_samples", {"num_samples": -1}, "num_samples"),
    ("an object 100,000 deep", "[" * 100_000 + "]" * 100_000, "nested deeper"),
    ("an object 40 deep", {"user_metadata": json.loads('{"a":' * 40 + "1" + "}" * 40)}, "nested deeper"),
    ("an integer of 5,000 digits", '{"num_samples": 1' + "0" * 5000 + "}", "body"),
])
def test_sampling_bodies_of_the_wrong_shape_are_a_400_naming_the_field(server, http, case, raw, field):
    session = http.post("/create_session", {}).json()["session_id"]
    sampler = http.post("/create_sampling_session", {"session_id": session, "base_model": TINY}).json()
    body = {"sampling_session_id": sampler["sampling_session_id"], "num_samples": 1,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 40]}]},
            "sampling_params": {"max_tokens": 2, "temperature": 0.0}}
    if isinstance(raw, dict):
        content = json.dumps({**body, **raw}).encode()
    else:
        content = raw.encode() if raw.startswith("[") else \
            (json.dumps(body)[:-1] + ", " + raw[1:]).encode()
    answer = http.post("/asample", content=content, headers={"Content-Type": "application/json"})
    assert answer.status_code in (400, 200), (case, answer.status_code, answer.text)
    message = answer.json().get("error") or http.result(answer).get("error")
    assert message and field in message, (case, message)
    healthy(http)


@pytest.mark.parametrize("case, body, field", [
    ("a list offset of 10^30", None, "offset"),
    ("100,000 tags", {"tags": ["t"] * 100_000}, "tags"),
    ("a 1 MB tag", {"tags": ["t" * 1_000_000]}, "tags"),
    ("a LoRA seed past int64", {"session_id": "s", "model_seq_id": 0, "base_model": TINY,
                                "lora_config": {"seed": 2**63}}, "lora_config.seed"),
    ("a model_seq_id of 1.0", {"session_id": "s", "model_seq_id": 1.0, "base_model": TINY}, "model_seq_id"),
])
def test_numbers_and_lists_are_bounded(server, http, case, body, field):
    if body is None:
        answer = httpx.get(http.url + "/training_runs", params={"offset": str(10**30)}, headers=http.key)
    elif "tags" in body:
        answer = http.post("/create_session", body)
    else:
        answer = http.post("/create_model", body)
    assert answer.status_code == 400 and field in answer.json()["error"], (case, answer.text)
    assert len(answer.text) < 1000  # the reply quotes the field and the limit, not the value


def test_a_body_past_the_route_limit_is_refused_before_it_is_read(http):
    answer = http.post("/create_session", content=b"{" + b" " * (33 << 20) + b"}",
                       headers={"Content-Type": "application/json"})
    assert answer.status_code == 400 and "limit" in answer.json()["error"]


def test_a_request_number_reused_by_a_different_body_is_a_conflict_over_http(server, http, run):
    """A retry (the same body) is answered by the first request's future; another request under
    the same number is refused with 409 naming the number, and does not run."""
    run_id, _ = run
    seq = next_seq(server, run_id)
    step = lambda lr: {"model_id": run_id, "seq_id": seq, "adam_params": {"learning_rate": lr}}  # noqa: E731
    first, retry = http.post("/optim_step", step(0.0)), http.post("/optim_step", step(0.0))
    assert first.json()["request_id"] == retry.json()["request_id"]
    other = http.post("/optim_step", step(0.5))
    assert other.status_code == 409 and other.headers["x-should-retry"] == "false"
    assert f"request {seq} of run {run_id}" in other.json()["error"]
    other_kind = http.post("/save_weights", {"model_id": run_id, "seq_id": seq, "path": "not-saved"})
    assert other_kind.status_code == 409
    http.result(first)
    assert server.store.get_run(run_id).last_seq == seq
    assert server.store.get_checkpoint(f"stillroom://{run_id}/weights/not-saved") is None


def test_a_request_number_reused_by_a_different_body_is_a_conflict_over_grpc(service):
    trainer = service.create_lora_training_client(TINY, rank=4, seed=5)
    connection, run_id = trainer._connection, trainer.training_run_id
    from stillroom._proto import stillroom_pb2 as pb

    step = lambda lr: pb.OptimStepRequest(training_run_id=run_id, seq=1,  # noqa: E731
                                          adam_params=pb.AdamParams(learning_rate=lr, beta1=0.9,
                                                                    beta2=0.95, eps=1e-8))
    first = connection.run(connection.call("OptimStep", step(0.0), retry=False))
    again = connection.run(connection.call("OptimStep", step(0.0), retry=False))
    assert first.request_id == again.request_id
    with pytest.raises(stillroom.ConflictError, match=f"request 1 of run {run_id}"):
        connection.run(connection.call("OptimStep", step(0.5), retry=False))


def test_a_seeded_run_leaves_the_process_wide_generator_alone(server, service):
    """Seeds never touch torch's global generator (every owner shares it), and a seed is a seed:
    two runs made with it start from the same adapter."""
    before = torch.random.get_rng_state()
    a = service.create_lora_training_client(TINY, rank=4, seed=2**63 - 1)
    b = service.create_lora_training_client(TINY, rank=4, seed=2**63 - 1)
    assert torch.equal(before, torch.random.get_rng_state())
    datum = types.Datum(model_input=types.ModelInput.from_ints([1, 40, 41]),
                        loss_fn_inputs={"target_tokens": [40, 41, 2], "weights": [1.0, 1.0, 1.0]})
    losses = [t.forward([datum], "cross_entropy").result().metrics["loss:sum"] for t in (a, b)]
    assert losses[0] == losses[1]


def test_a_401_does_not_say_where_the_data_dir_is(server, http):
    answer = httpx.post(http.url + "/create_session", json={}, headers={"X-API-Key": "tml-wrong"})
    assert answer.status_code == 401 and "local_api_key" in answer.json()["error"]
    assert str(server.config.data_dir) not in answer.text


def test_a_huge_model_name_is_refused_by_its_length_over_both_wires(server, http, service):
    """A 100 kB base_model is refused naming the limit, not echoed back in a NOT_FOUND."""
    session = http.post("/create_session", {}).json()["session_id"]
    answer = http.post("/create_sampling_session", {"session_id": session, "base_model": "m" * 100_000})
    assert answer.status_code == 400 and len(answer.text) < 500, answer.text[:300]
    with pytest.raises(stillroom.BadRequestError, match="at most 512 characters") as raised:
        service.create_lora_training_client("m" * 100_000, rank=4).result()
    assert len(str(raised.value)) < 500
