"""The classes of mishandled request that issue 25 lists and the wire fuzzer found (tests/wire_fuzz.py),
each kept as a plain, deterministic request against a real `stillroom serve` (a child process: one
of them once crashed the process). Each is refused with a 4xx (INVALID_ARGUMENT on gRPC) whose
message names the field, and the server stays up."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stillroom._proto import stillroom_pb2 as pb
from stillroom_server.http_api._proto import tinker_wire_pb2 as tw
from wire_fuzz import Fuzzer, FuzzServer, tw_datum, tw_dense

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fz(tmp_path_factory):
    server = FuzzServer(tmp_path_factory.mktemp("fuzz-regressions"))
    fuzzer = Fuzzer(server)
    try:
        fuzzer.setup()
        yield fuzzer
        assert server.alive(), server.log_tail()
        assert not fuzzer.final_problems()
    finally:
        fuzzer.close()
        server.stop()


def post_text(fz: Fuzzer, path: str, text: str):
    return fz.http.post(
        path,
        content=text.encode("utf-8", errors="surrogatepass"),
        headers={**fz._headers("a"), "content-type": "application/json"},
    )


def refused(answer, *fields: str, status: int = 400) -> str:
    """A refusal with `status` whose message names one of `fields`; nothing of the server's inside."""
    assert answer.status_code == status, answer.text[:500]
    message = answer.json()["error"]
    assert any(field in message for field in fields), message
    assert "Traceback" not in message and "/tmp/" not in message, message
    return message


def sample(fz: Fuzzer, **fields) -> dict:
    body = {
        "sampling_session_id": fz.world.a_sampler,
        "num_samples": 1,
        "type": "sample",
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 40, 41]}]},
        "sampling_params": {"max_tokens": 2, "temperature": 1.0},
    }
    for key, value in fields.items():
        if key in ("max_tokens", "seed", "top_k", "top_p", "stop", "temperature"):
            body["sampling_params"][key] = value
        else:
            body[key] = value
    return body


def tokens(*values) -> dict:
    return {"chunks": [{"type": "encoded_text", "tokens": list(values)}]}


# ---------------------------------------------------------------- sampling bodies of the wrong JSON shape

WRONG_SHAPES = [
    ({"prompt": 5}, "prompt"),
    ({"prompt": {"chunks": "abc"}}, "chunks"),
    ({"prompt": {"chunks": [1, 1]}}, "chunks"),  # was a 500 (int has no .get)
    ({"prompt": {"chunks": [{"type": "encoded_text", "tokens": {"a": 1}}]}}, "tokens"),
    ({"prompt": {"chunks": [{"type": "encoded_text", "tokens": [[1, 2]]}]}}, "tokens"),
    ({"prompt": []}, "prompt"),
    ({"sampling_params": [1]}, "sampling_params"),
    ({"sampling_params": "greedy"}, "sampling_params"),
    ({"stop": {"a": 1}}, "stop"),
    ({"stop": [1, "x"]}, "stop"),
    ({"num_samples": "2"}, "num_samples"),
    ({"num_samples": [2]}, "num_samples"),
]


@pytest.mark.parametrize("fields, field", WRONG_SHAPES, ids=[f"{k}" for k, _ in WRONG_SHAPES])
def test_a_sampling_body_of_the_wrong_json_shape_is_refused_naming_the_field(fz, fields, field):
    refused(fz.post("/api/v1/asample", sample(fz, **fields)), field)


def test_a_body_that_is_not_an_object_is_refused(fz):
    for path in ("/api/v1/asample", "/api/v1/create_session", "/api/v1/optim_step"):
        refused(post_text(fz, path, "[1, 2]"), "body")
        refused(post_text(fz, path, '"text"'), "body")


# ---------------------------------------------------------------- NaN, infinities, fractions and huge numbers


@pytest.mark.parametrize("field", ["num_samples", "max_tokens", "top_k", "seed", "topk_prompt_logprobs"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_nan_or_infinity_in_an_integer_field_is_refused(fz, field, value):
    text = json.dumps(sample(fz, **{field: 1234567}))
    refused(post_text(fz, "/api/v1/asample", text.replace("1234567", value)), field, value, "body")


@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "NaN", "1e400", str(10**30), "-1", "1.5", '"7"'])
def test_a_token_id_that_is_not_a_token_is_refused_not_truncated(fz, value):
    text = json.dumps(sample(fz, prompt=tokens(1, 1234567, 41))).replace("1234567", value)
    refused(post_text(fz, "/api/v1/asample", text), "tokens", "token", "body")


@pytest.mark.parametrize("seed", [2**63, 2**64, 10**30, -(2**63) - 1])
def test_a_seed_out_of_int64_range_is_refused(fz, seed):
    refused(fz.post("/api/v1/asample", sample(fz, seed=seed)), "seed")
    create = {
        "session_id": fz.world.a_session,
        "model_seq_id": 50,
        "base_model": "stillroom/char-1m",
        "lora_config": {"rank": 4, "seed": seed},
    }
    refused(fz.post("/api/v1/create_model", create), "seed")


def test_deeply_nested_json_is_refused(fz):
    deep = "[" * 100_000 + "]" * 100_000
    for path in (
        "/api/v1/asample",
        "/api/v1/create_session",
        "/api/v1/optim_step",
        "/api/v1/session_heartbeat",
    ):
        refused(post_text(fz, path, '{"prompt": ' + deep + "}"), "body", "nest", "prompt")
        refused(post_text(fz, path, deep), "body", "nest")


@pytest.mark.parametrize("route", ["/api/v1/training_runs", "/api/v1/checkpoints"])
@pytest.mark.parametrize(
    "name, value",
    [
        ("offset", str(10**30)),
        ("offset", str(2**63)),
        ("limit", str(10**30)),
        ("offset", "-1"),
        ("offset", "1e30"),
        ("limit", "NaN"),
    ],
)
def test_a_list_window_out_of_range_is_refused(fz, route, name, value):
    answer = fz.http.get(route, params={name: value}, headers=fz._headers("a"))
    refused(answer, name, "limit/offset")


def test_a_grpc_list_offset_at_the_int64_limit_is_not_a_server_error(fz):
    for offset in (2**63 - 1, -(2**63)):
        code, answer = fz.grpc("ListTrainingRuns", pb.ListTrainingRunsRequest(limit=5, offset=offset))
        assert code in ("OK", "INVALID_ARGUMENT"), (code, answer)
        if code == "INVALID_ARGUMENT":
            assert "offset" in answer


# ---------------------------------------------------------------- strings


def test_session_tags_have_a_limit(fz):
    refused(fz.post("/api/v1/create_session", {"tags": ["t"] * 10_000}), "tags")
    refused(fz.post("/api/v1/create_session", {"tags": ["x" * 100_000]}), "tags")
    assert fz.post("/api/v1/create_session", {"tags": ["fine"] * 3}).status_code == 200


def test_a_lone_surrogate_in_a_json_string_is_refused_and_nothing_stored_breaks_a_listing(fz):
    """Valid JSON (an escaped lone surrogate) that is no valid UTF-8 once decoded. Taken into the
    store it was a 500 (UnicodeEncodeError); kept in a session or a checkpoint's metadata it made
    every later listing of them a 500 (GET /sessions/{id}, GET /checkpoints, ListClientSessions)."""
    w = fz.world
    seq = fz.last_seq(w.a_run) + 1
    for path, body in [
        ("/api/v1/save_weights", {"model_id": "\ud800", "seq_id": 1, "path": "x"}),
        ("/api/v1/create_session", {"tags": ["\ud800"]}),
        ("/api/v1/create_session", {"user_metadata": {"k\udc00": "v"}}),
        ("/api/v1/create_session", {"user_metadata": {"k": "\ud800"}}),
        (
            "/api/v1/create_model",
            {
                "session_id": w.a_session,
                "model_seq_id": 60,
                "base_model": "stillroom/char-1m",
                "user_metadata": {"a": "\ud800"},
            },
        ),
        (
            "/api/v1/save_weights",
            {"model_id": w.a_run, "seq_id": seq, "path": "surrogate", "user_metadata": {"a": "\ud800"}},
        ),
    ]:
        answer = post_text(fz, path, json.dumps(body))
        refused(answer, *body, "body")
    for listing in ("/api/v1/sessions", "/api/v1/checkpoints", "/api/v1/training_runs"):
        assert fz.http.get(listing, headers=fz._headers("a")).status_code == 200
    for session in fz.http.get("/api/v1/sessions", headers=fz._headers("a")).json()["sessions"]:
        answer = fz.http.get(f"/api/v1/sessions/{session}", headers=fz._headers("a"))
        assert answer.status_code == 200, answer.text[:300]
    assert fz.grpc("ListClientSessions", pb.ListClientSessionsRequest())[0] == "OK"  # pyright: ignore[reportAttributeAccessIssue]


def test_an_authentication_failure_does_not_show_the_data_dir(fz):
    answer = fz.http.post("/api/v1/client/config", json={}, headers={"X-API-Key": "sr-wrong"})
    assert answer.status_code == 401
    assert str(fz.server.data_dir) not in answer.text, answer.text


# ---------------------------------------------------------------- sequence numbers


def test_a_seq_id_replayed_with_a_different_body_is_refused_not_answered_with_the_first(fz):
    run = fz.world.a_run
    seq = fz.last_seq(run) + 1
    first = fz.post(
        "/api/v1/optim_step", {"model_id": run, "seq_id": seq, "adam_params": {"learning_rate": 1e-3}}
    )
    assert first.status_code == 200, first.text
    again = fz.post(
        "/api/v1/optim_step", {"model_id": run, "seq_id": seq, "adam_params": {"learning_rate": 1e-3}}
    )
    assert again.json()["request_id"] == first.json()["request_id"]  # a retry: the same future
    other = fz.post(
        "/api/v1/optim_step", {"model_id": run, "seq_id": seq, "adam_params": {"learning_rate": 0.5}}
    )
    assert 400 <= other.status_code < 500, other.text
    assert "seq" in other.json()["error"], other.text
    fb = tw.ForwardBackwardRequest(
        model_id=run, seq_id=seq, loss_fn="cross_entropy", data=[tw_datum([1, 40, 41])]
    )
    answer = fz.http.post(
        "/api/v1/forward_backward",
        content=fb.SerializeToString(),
        headers={**fz._headers("a"), "content-type": "application/x-protobuf"},
    )
    assert 400 <= answer.status_code < 500 and "seq" in answer.json()["error"], answer.text


def test_a_grpc_seq_replayed_with_a_different_body_is_refused(fz):
    run = fz.world.a_grpc_run
    seq = fz.last_seq(run) + 1
    adam = {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8}
    first = fz.grpc_ok(
        "OptimStep",
        pb.OptimStepRequest(training_run_id=run, seq=seq, adam_params=pb.AdamParams(**adam)),
        pb.FutureRef,
    )
    again = fz.grpc_ok(
        "OptimStep",
        pb.OptimStepRequest(training_run_id=run, seq=seq, adam_params=pb.AdamParams(**adam)),
        pb.FutureRef,
    )
    assert again.request_id == first.request_id
    code, message = fz.grpc(
        "OptimStep",
        pb.OptimStepRequest(
            training_run_id=run, seq=seq, adam_params=pb.AdamParams(**{**adam, "learning_rate": 0.5})
        ),
    )
    assert code not in ("OK", "INTERNAL", "UNKNOWN") and "seq" in message, (code, message)


# ---------------------------------------------------------------- tensors


def csr_datum(crow, col, values, shape) -> tw.Datum:
    datum = tw_datum([1, 40, 41])
    datum.loss_fn_inputs["weights"].CopyFrom(
        tw.Tensor(
            sparse_csr=tw.SparseCsr(
                values=np.asarray(values, "<f4").tobytes(),
                crow_indices=np.asarray(crow, "<i8").tobytes(),
                col_indices=np.asarray(col, "<i8").tobytes(),
            ),
            dtype=tw.DTYPE_FLOAT32,
            shape=shape,
        )
    )
    return datum


@pytest.mark.parametrize(
    "crow, col, values, shape",
    [
        ([0, 2, 1], [0, 1], [1.0, 1.0], [2, 3]),  # row pointers that run backwards: once a segfault
        ([0, 3, 0], [0, 1, 2], [1.0] * 3, [2, 3]),
        ([0, 1, 2], [0, 7], [1.0, 1.0], [2, 3]),  # a column past the end
        ([0, 1, 2], [0, -1], [1.0, 1.0], [2, 3]),
        ([0, 1, 10**6], [0, 1], [1.0, 1.0], [2, 3]),  # more values promised than sent
        ([0, 1, 2**62], [0, 1], [1.0, 1.0], [2, 3]),
        ([5, 1, 2], [0, 1], [1.0, 1.0], [2, 3]),
    ],
    ids=[
        "backwards",
        "backwards-to-0",
        "col-past-end",
        "col-negative",
        "crow-end-past-nnz",
        "crow-huge",
        "crow-not-from-0",
    ],
)
def test_a_bad_sparse_csr_tensor_is_refused_and_the_server_lives(fz, crow, col, values, shape):
    seq = fz.last_seq(fz.world.a_run) + 1
    fb = tw.ForwardBackwardRequest(
        model_id=fz.world.a_run,
        seq_id=seq,
        loss_fn="cross_entropy",
        data=[csr_datum(crow, col, values, shape)],
    )
    answer = fz.http.post(
        "/api/v1/forward_backward",
        content=fb.SerializeToString(),
        headers={**fz._headers("a"), "content-type": "application/x-protobuf"},
    )
    assert fz.server.alive(), fz.server.log_tail()
    refused(answer, "weights")


def test_truncated_protobuf_is_refused_on_both_wires(fz):
    fb = tw.ForwardBackwardRequest(
        model_id=fz.world.a_run, seq_id=1, loss_fn="cross_entropy", data=[tw_datum([1, 40, 41])]
    ).SerializeToString()
    answer = fz.http.post(
        "/api/v1/forward_backward",
        content=fb[:-5],
        headers={**fz._headers("a"), "content-type": "application/x-protobuf"},
    )
    refused(answer, "body")
    for method in ("ForwardBackward", "GetTrainingRun", "Submit", "ListTrainingRuns"):
        code, message = fz.grpc(method, b"\xff\n\x80")  # was UNKNOWN (the deserializer raised)
        assert code == "INVALID_ARGUMENT" and "request" in message, (method, code, message)


def test_an_unknown_dtype_or_mismatched_shape_is_refused(fz):
    for tensor, field in [
        (tw_dense([1.0, 1.0, 1.0], tw.DTYPE_FLOAT32, shape=[2, 2]), "weights"),
        (tw.Tensor(dense=b"\0" * 12, dtype=9, shape=[3]), "weights"),  # pyright: ignore[reportArgumentType]
        (tw_dense([1.0, 1.0, 1.0], tw.DTYPE_FLOAT32, shape=[2**62, 2**62]), "weights"),
    ]:
        datum = tw_datum([1, 40, 41])
        datum.loss_fn_inputs["weights"].CopyFrom(tensor)
        fb = tw.ForwardBackwardRequest(
            model_id=fz.world.a_run,
            seq_id=fz.last_seq(fz.world.a_run) + 1,
            loss_fn="cross_entropy",
            data=[datum],
        )
        answer = fz.http.post(
            "/api/v1/forward_backward",
            content=fb.SerializeToString(),
            headers={**fz._headers("a"), "content-type": "application/x-protobuf"},
        )
        refused(answer, field)
