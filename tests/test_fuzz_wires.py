"""The wire fuzzer's bounded run (issue 25; scripts/fuzz_wires.py runs it for longer): hypothesis
generates requests from the wires' own schemas, most fields valid and some hostile, and sends them as
owner A to one real `stillroom serve` over HTTP and gRPC (tests/wire_fuzz.py). No answer may be a 5xx
(INTERNAL or UNKNOWN), drop the connection, show the data dir or a traceback, or show owner B's
things; afterwards the server is healthy on both wires and B's weights, checkpoints and sequence
numbers are as they were. The counts of requests sent are printed in the run's summary."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings

from stillroom._proto import stillroom_pb2 as pb
from wire_fuzz import Fuzzer, FuzzServer, Generators, stillroom_path, tinker_path

from conftest import SUMMARY_LINES

pytestmark = pytest.mark.slow
EXAMPLES = 300  # per wire: about 25 s for both on 2 idle cores
SEED = 25  # a fixed seed (no example database): the same requests in every run
BOUNDED = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    phases=[Phase.generate],
    suppress_health_check=list(HealthCheck),  # pyright: ignore[reportArgumentType]
)


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory):
    server = FuzzServer(tmp_path_factory.mktemp("fuzz-wires"))
    fuzzer = Fuzzer(server)
    try:
        fuzzer.setup()
        yield fuzzer
    finally:
        fuzzer.close()
        server.stop()


def report(fuzzer: Fuzzer, wire: str, started: float, problems: list[str]) -> None:
    SUMMARY_LINES.append(
        f"wire fuzzer ({wire}, {time.monotonic() - started:.0f} s): {fuzzer.summary()}; "
        f"{len(problems)} problems"
    )
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:20])


def test_fuzzed_http_requests_are_answered_without_server_errors(fuzzer):
    started, before = time.monotonic(), len(fuzzer.problems)

    @seed(SEED)
    @BOUNDED
    @given(case=Generators(fuzzer.world).http_cases())
    def send(case):
        fuzzer.send_http(case)

    send()
    assert fuzzer.counts["http"] >= EXAMPLES * 0.9, fuzzer.counts
    report(fuzzer, "HTTP", started, fuzzer.problems[before:])


def test_fuzzed_grpc_calls_are_answered_without_server_errors(fuzzer):
    started, before = time.monotonic(), len(fuzzer.problems)

    @seed(SEED)
    @BOUNDED
    @given(call=Generators(fuzzer.world).grpc_calls())
    def send(call):
        fuzzer.send_grpc(*call)

    send()
    assert fuzzer.counts["grpc"] >= EXAMPLES * 0.9, fuzzer.counts
    report(fuzzer, "gRPC", started, fuzzer.problems[before:])


def test_after_fuzzing_the_server_is_healthy_and_owner_b_untouched(fuzzer):
    problems = fuzzer.final_problems()
    assert not problems, "\n".join(problems)


def test_owner_a_naming_owner_b_things_finds_nothing(fuzzer):
    """Every id of B's in every place an id goes, sent as A: not found, on both wires."""
    w = fuzzer.world
    b_state = next(p for p in w.b_paths if "/weights/" in p)
    b_sampler_path = next(p for p in w.b_paths if "/sampler_weights/" in p)
    a_next = fuzzer.last_seq(w.a_run) + 1
    prompt = {"chunks": [{"type": "encoded_text", "tokens": [1, 40]}]}
    run, kind, name = stillroom_path(b_sampler_path).removeprefix("stillroom://").split("/")
    http = [
        ("GET", f"/api/v1/training_runs/{w.b_run}", None),
        ("GET", f"/api/v1/training_runs/{w.b_run}/checkpoints", None),
        ("GET", f"/api/v1/samplers/{w.b_sampler}", None),
        ("GET", f"/api/v1/sessions/{w.b_session}", None),
        ("POST", "/api/v1/get_info", {"model_id": w.b_run}),
        ("POST", "/api/v1/unload_model", {"model_id": w.b_run}),
        ("POST", "/api/v1/retrieve_future", {"request_id": w.b_futures[0]}),
        ("POST", "/api/v1/weights_info", {"tinker_path": tinker_path(b_state)}),
        (
            "POST",
            "/api/v1/create_sampling_session",
            {"session_id": w.a_session, "model_path": b_sampler_path},
        ),
        (
            "POST",
            "/api/v1/create_sampling_session",
            {"session_id": w.b_session, "base_model": "stillroom/char-1m"},
        ),
        (
            "POST",
            "/api/v1/create_model",
            {"session_id": w.b_session, "model_seq_id": 7, "base_model": "stillroom/char-1m"},
        ),
        (
            "POST",
            "/api/v1/asample",
            {"sampling_session_id": w.b_sampler, "prompt": prompt, "sampling_params": {"max_tokens": 1}},
        ),
        ("POST", "/api/v1/optim_step", {"model_id": w.b_run, "seq_id": 99, "adam_params": {}}),
        ("POST", "/api/v1/save_weights", {"model_id": w.b_run, "seq_id": 99, "path": "stolen"}),
        ("POST", f"/api/v1/sessions/{w.b_session}/finish", {"reason": {"type": "success"}}),
        ("DELETE", f"/api/v1/training_runs/{run}/checkpoints/{kind}/{name}", None),
        ("PUT", f"/api/v1/training_runs/{run}/checkpoints/{kind}/{name}/ttl", {"ttl_seconds": 1}),
    ]
    wrong = []
    for method, path, body in http:
        answer = fuzzer.http.request(method, path, json=body, headers=fuzzer._headers("a"))
        if answer.status_code != 404:
            wrong.append(f"HTTP {method} {path} {body}: {answer.status_code} {answer.text[:200]}")
    # loads of B's state (into A's run; as a new run of A's): refused now, or failed (not found) as a future
    for body in (
        {"model_id": w.a_run, "seq_id": a_next, "path": b_state},
        {"session_id": w.a_session, "model_seq_id": 9, "path": b_state},
    ):
        answer = fuzzer.http.post("/api/v1/load_weights", json=body, headers=fuzzer._headers("a"))
        if answer.status_code == 200:
            answer = fuzzer.wait_http(answer.json()["request_id"])
            if "NOT_FOUND" not in answer.text:
                wrong.append(f"HTTP load_weights {body}: {answer.text[:200]}")
        elif answer.status_code != 404:
            wrong.append(f"HTTP load_weights {body}: {answer.status_code} {answer.text[:200]}")
    fb = pb.ForwardBackwardRequest(training_run_id=w.b_grpc_run, seq=99, loss_fn="cross_entropy")
    grpc = [
        ("GetTrainingRun", pb.GetTrainingRunRequest(training_run_id=w.b_grpc_run)),
        ("CloseTrainingRun", pb.GetTrainingRunRequest(training_run_id=w.b_run)),
        ("ForwardBackward", fb),
        ("OptimStep", pb.OptimStepRequest(training_run_id=w.b_grpc_run, seq=99)),
        ("SaveState", pb.SaveWeightsRequest(training_run_id=w.b_run, seq=99, name="stolen")),
        ("RetrieveFuture", pb.RetrieveFutureRequest(request_id=w.b_futures[-1])),
        ("CreateSamplingSession", pb.CreateSamplingSessionRequest(model_path=stillroom_path(b_sampler_path))),
        ("CreateTrainingRunFromState", pb.CreateTrainingRunFromStateRequest(path=stillroom_path(b_state))),
        ("ComputeLogprobs", pb.ComputeLogprobsRequest(sampling_session_id=w.b_grpc_sampler)),
        ("DeleteCheckpoint", pb.CheckpointPathRequest(path=stillroom_path(b_sampler_path))),
        ("SetCheckpointTtl", pb.SetCheckpointTtlRequest(path=stillroom_path(b_state), ttl_seconds=1)),
        ("GetCheckpointArchiveUrl", pb.CheckpointPathRequest(path=stillroom_path(b_state))),
        ("ListCheckpoints", pb.ListCheckpointsRequest(training_run_id=w.b_grpc_run)),
    ]
    for method, request in grpc:
        code, answer = fuzzer.grpc(method, request)
        if code != "NOT_FOUND":
            wrong.append(f"gRPC {method} {request}: {code} {answer!s:.200}")
    assert not wrong, "\n".join(wrong)
    assert not fuzzer.final_problems()
