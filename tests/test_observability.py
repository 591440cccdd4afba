"""What an operator and a session's owner can watch: /metrics in Prometheus' text format (parsed by
prometheus_client's own parser, holding no owner's data), and a session's requests exported as a
Perfetto-readable trace through the official SDK's RestClient and the official `tinker` CLI."""

from __future__ import annotations

import json
import os

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import stillroom
from stillroom_server.store import keys

from conftest import TINY
from helpers import official_cli

tinker = pytest.importorskip("tinker", reason="the official tinker SDK is a test dependency")
os.environ.setdefault("TINKER_TELEMETRY", "0")
T = tinker.types


@pytest.fixture(scope="module")
def session_work(server):
    """One tinker session's work: 2 training steps and 2 samples; the session id and its run."""
    client = tinker.ServiceClient(base_url=server.http_url, api_key=server.local_api_key)
    trainer = client.create_lora_training_client(TINY, rank=4, seed=0)
    datum = T.Datum(model_input=T.ModelInput.from_ints([1, 40, 41, 42]),
                    loss_fn_inputs={"target_tokens": [40, 41, 42, 2]})  # weights: Tinker's default
    for _ in range(2):
        trainer.forward_backward([datum], "cross_entropy").result()
        trainer.optim_step(T.AdamParams(learning_rate=1e-3)).result()
    sampler = client.create_sampling_client(base_model=TINY)
    for seed in range(2):
        sampler.sample(T.ModelInput.from_ints([1, 40]), num_samples=2,
                       sampling_params=T.SamplingParams(max_tokens=8, seed=seed)).result()
    session_id = client.holder.get_session_id()
    yield session_id, trainer.model_id
    client.close("success").result()


def test_metrics_parse_as_prometheus_text_and_name_no_owner(server, session_work, service):
    session_id, run_id = session_work
    service.create_sampling_client(base_model=TINY).compute_logprobs(
        stillroom.types.ModelInput.from_ints([1, 40, 41])).result()  # a gRPC request too
    text = httpx.get(server.http_url + "/metrics", timeout=30).text  # no key: nothing private in it
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}

    def total(name: str, **labels) -> float:
        return sum(v for (n, ls), v in samples.items()
                   if n == name and all(dict(ls).get(k) == want for k, want in labels.items()))

    assert total("stillroom_requests_total", transport="http", route="forward_backward", code="200") >= 2
    assert total("stillroom_requests_total", transport="grpc", route="Submit", code="OK") >= 1
    assert total("stillroom_request_seconds_count", transport="http", route="asample") >= 2
    assert total("stillroom_queue_wait_seconds_count", kind="forward_backward") >= 2
    assert total("stillroom_compute_seconds_count", kind="sample") >= 2
    assert total("stillroom_decode_rows_total") >= 2 * 2 and total("stillroom_decode_steps_total") >= 1
    assert total("stillroom_trained_tokens_total") >= 8
    for gauge in ("stillroom_queue_depth", "stillroom_runs_in_memory", "stillroom_runs_on_disk",
                  "stillroom_loaded_adapters", "stillroom_resident_memory_bytes",
                  "stillroom_run_memory_bytes_budget", "stillroom_live_runs"):
        assert gauge in families or gauge == "stillroom_queue_depth", gauge
    assert total("stillroom_resident_memory_bytes") > 0
    for private in (session_id, run_id, "local", server.local_api_key, str(server.config.data_dir), TINY):
        assert private not in text, private


def test_a_sessions_trace_exports_one_event_per_request(server, session_work):
    session_id, _ = session_work
    rest = tinker.ServiceClient(base_url=server.http_url, api_key=server.local_api_key).create_rest_client()
    url = rest.export_session_trace(session_id).result()
    trace = httpx.get(url, timeout=30).json()  # the link works without a key, as Tinker's does
    requests = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    kinds = sorted(e["name"] for e in requests)
    assert kinds == ["forward_backward"] * 2 + ["optim_step"] * 2 + ["sample"] * 2, kinds
    for event in requests:
        assert event["dur"] >= 0 and event["ts"] > 1.7e15  # microseconds since the epoch
        args = event["args"]
        assert args["queue_wait_ms"] >= 0 and args["compute_ms"] >= 0 and args["request_id"]
        assert args["queue_wait_ms"] + args["compute_ms"] == pytest.approx(event["dur"] / 1e3, abs=0.01)


def test_the_official_cli_downloads_the_trace(server, session_work, tmp_path):
    session_id, _ = session_work
    out = tmp_path / "session.pftrace"
    env = {**os.environ, "TINKER_BASE_URL": server.http_url, "TINKER_API_KEY": server.local_api_key}
    done = official_cli(["session", "export-trace", session_id, "--output", str(out)], env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len([e for e in json.loads(out.read_text())["traceEvents"] if e["ph"] == "X"]) == 6


def test_another_owner_cannot_export_a_session(server, session_work):
    session_id, _ = session_work
    _, other_key = keys.create_key(server.store, "trace-other", "trace test")
    answer = httpx.get(f"{server.http_url}/api/v1/sessions/{session_id}/trace_export",
                       headers={"X-API-Key": other_key}, timeout=30)
    assert answer.status_code == 404
    assert httpx.get(server.http_url + "/traces/not-a-token", timeout=30).status_code == 404
