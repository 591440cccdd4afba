"""The engine behind a process boundary (engine/process/): a crash costs the requests in flight on
that engine, not the service; several engines serve behind one endpoint; an engine on another
machine connects with the server's token. Real servers on real ports, real engine processes
killed with real signals, driven through the SDK by several owners."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import stillroom
from stillroom import types
from stillroom_server.app import StillroomServer
from stillroom_server.config import ServerConfig
from stillroom_server.engine.process.engines import EngineProcesses
from stillroom_server.store import keys

from conftest import SMALL, TINY
from helpers import sft_datum

pytestmark = pytest.mark.slow   # each test starts engine processes and waits for restarts
RESTART_SECONDS = 120   # a restarted engine is up in ~5 s on a quiet machine (a fresh python + torch)


def start(tmp_path, **settings) -> StillroomServer:
    config = ServerConfig(data_dir=tmp_path / "data", host="127.0.0.1", port=0, **settings)
    return StillroomServer(config).start()


def client_of(server: StillroomServer, owner: str) -> stillroom.ServiceClient:
    _, secret = keys.create_key(server.store, owner, f"{owner}'s key")
    return stillroom.ServiceClient(base_url=server.address, api_key=secret)


def engine(server: StillroomServer, name: str) -> dict:
    return next(e for e in server.engines.engines() if e["engine"] == name)


def wait_up(server: StillroomServer, name: str, old_pid: int | None = None) -> dict:
    deadline = time.monotonic() + RESTART_SECONDS
    while time.monotonic() < deadline:
        state = engine(server, name)
        if state["state"] == "up" and state["pid"] != old_pid:
            return state
        time.sleep(0.1)
    raise AssertionError(f"engine {name} not back in {RESTART_SECONDS} s: {engine(server, name)}")


def steps(trainer, data, n: int) -> None:
    for _ in range(n):
        trainer.forward_backward(data, "cross_entropy")
        trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()


def logprobs(trainer, data) -> list[float]:
    return trainer.forward(data, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()


DATA = [sft_datum([1, *range(10, 40)], prompt_len=4)]


@pytest.fixture(scope="module")
def two_engines(tmp_path_factory):
    server = start(tmp_path_factory.mktemp("two-engines"), engines=2, place={TINY: "0", SMALL: "1"},
                   max_live_runs_per_owner=50)
    yield server
    server.stop()


def test_a_segfaulting_engine_costs_its_requests_in_flight_and_nothing_else(two_engines):
    server = two_engines
    sampler_owner, saver, trainer_owner = (client_of(server, o) for o in ("bea", "sam", "tom"))
    # sam: a run on engine 0 saved where it stands, and one that trained on after its save
    kept = saver.create_lora_training_client(base_model=TINY, rank=4, seed=1)
    steps(kept, DATA, 2)
    kept_state = kept.save_state("kept").result().path
    kept_before = logprobs(kept, DATA)
    moved_on = saver.create_lora_training_client(base_model=TINY, rank=4, seed=2)
    steps(moved_on, DATA, 2)
    saved_state = moved_on.save_state("before").result().path
    saved_logprobs = logprobs(moved_on, DATA)
    steps(moved_on, DATA, 1)   # progress a crash will cost
    # tom: training on engine 1 while engine 0 dies
    other = trainer_owner.create_lora_training_client(base_model=SMALL, rank=4, seed=3)
    other_steps = threading.Thread(target=steps, args=(other, DATA, 3))
    # bea: a long sample on engine 0, in flight when it dies
    sampler = sampler_owner.create_sampling_client(base_model=TINY)
    prompt = types.ModelInput.from_ints([1, *range(10, 30)])
    long_sample = sampler.sample(prompt, 64, types.SamplingParams(max_tokens=480, seed=5))
    victim = engine(server, "0")["pid"]
    time.sleep(0.3)
    other_steps.start()
    os.kill(victim, signal.SIGSEGV)

    with pytest.raises(stillroom.TinkerError) as failed:
        long_sample.result(timeout=120)
    assert failed.value.code == "UNAVAILABLE"
    assert "engine 0" in str(failed.value) and "SIGSEGV" in str(failed.value)
    assert "submit it again" in str(failed.value)

    other_steps.join(timeout=300)   # engine 1's work went on meanwhile
    assert not other_steps.is_alive()
    assert logprobs(other, DATA)

    back = wait_up(server, "0", old_pid=victim)
    assert back["restarts"] == 1
    out = sampler.sample(prompt, 2, types.SamplingParams(max_tokens=8, seed=5)).result(timeout=120)
    assert [len(s.tokens) for s in out.sequences] == [8, 8]

    # saved where it stood: it goes on as if nothing happened, from the same weights and moments
    assert logprobs(kept, DATA) == pytest.approx(kept_before, abs=1e-6)
    steps(kept, DATA, 1)
    # trained on after its save: its next call says so, once, naming the state it resumed from
    with pytest.raises(stillroom.TinkerError) as lost:
        moved_on.forward(DATA, "cross_entropy").result()
    assert lost.value.code == "FAILED_PRECONDITION"
    assert saved_state in str(lost.value) and "SIGSEGV" in str(lost.value)
    assert "progress since then was lost" in str(lost.value)
    assert logprobs(moved_on, DATA) == pytest.approx(saved_logprobs, abs=1e-6)
    assert kept_state  # (both runs' saved states are still listed and loadable)

    metrics = httpx.get(server.http_url + "/metrics", timeout=30).text
    restarts = _samples(metrics, "stillroom_engine_restarts")
    assert restarts[(("engine", "0"),)] == 1 and restarts[(("engine", "1"),)] == 0
    for client in (sampler_owner, saver, trainer_owner):
        client.close()


def test_a_run_that_waited_on_disk_comes_back_exactly_and_an_unsaved_one_says_so(tmp_path):
    # room for one small LoRA run's weights and moments (~0.7 MB): the idle one moves to disk
    server = start(tmp_path, engines=1, run_memory_bytes=1_000_000)
    try:
        ann, ben = client_of(server, "ann"), client_of(server, "ben")
        idle = ann.create_lora_training_client(base_model=TINY, rank=4, seed=1)
        steps(idle, DATA, 2)
        before = logprobs(idle, DATA)
        busy = ben.create_lora_training_client(base_model=TINY, rank=4, seed=2)
        steps(busy, DATA, 1)   # makes room for itself: the idle run is written to disk
        victim = engine(server, "0")["pid"]
        os.kill(victim, signal.SIGKILL)
        wait_up(server, "0", old_pid=victim)
        assert logprobs(idle, DATA) == pytest.approx(before, abs=1e-6)   # as it was: no notice either
        with pytest.raises(stillroom.TinkerError) as lost:
            busy.forward(DATA, "cross_entropy").result()
        assert lost.value.code == "FAILED_PRECONDITION"
        assert "SIGKILL" in str(lost.value) and "saved no training state" in str(lost.value)
        ann.close()
        ben.close()
    finally:
        server.stop()


def test_a_hung_engine_is_killed_and_started_again(tmp_path, monkeypatch):
    from stillroom_server.engine.process import engines

    monkeypatch.setattr(engines, "SILENT_SECONDS", 8.0)   # its facts come every second
    server = start(tmp_path, engines=1)
    try:
        client = client_of(server, "hugo")
        trainer = client.create_lora_training_client(base_model=TINY, rank=4, seed=1)
        steps(trainer, DATA, 1)
        trainer.save_state("saved").result()
        saved = logprobs(trainer, DATA)
        victim = engine(server, "0")["pid"]
        os.kill(victim, signal.SIGSTOP)   # alive, and silent
        with pytest.raises(stillroom.TinkerError) as failed:
            trainer.forward(DATA, "cross_entropy").result(timeout=120)
        assert failed.value.code == "UNAVAILABLE"
        assert "stopped answering for 8 s and was killed" in str(failed.value)
        wait_up(server, "0", old_pid=victim)
        assert logprobs(trainer, DATA) == pytest.approx(saved, abs=1e-6)
        client.close()
    finally:
        server.stop()


def test_two_engines_serve_two_models_behind_one_endpoint(two_engines):
    server = two_engines
    client = client_of(server, "una")
    small = client.create_lora_training_client(base_model=SMALL, rank=4, seed=7)
    tiny = client.create_lora_training_client(base_model=TINY, rank=4, seed=7)
    for trainer in (small, tiny):
        steps(trainer, DATA, 1)
        sampler = trainer.save_weights_and_get_sampling_client("one-step")
        out = sampler.sample(types.ModelInput.from_ints([1, 10]), 1,
                             types.SamplingParams(max_tokens=4, seed=1)).result()
        assert len(out.sequences[0].tokens) == 4
    pids = {e["engine"]: e["pid"] for e in server.engines.engines()}
    assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()
    placed = _samples(httpx.get(server.http_url + "/metrics", timeout=30).text, "stillroom_model_engine")
    assert placed[(("engine", "0"), ("model", TINY))] == 1
    assert placed[(("engine", "1"), ("model", SMALL))] == 1
    status = client.get_server_capabilities()
    assert {m.model_name for m in status.supported_models} >= {TINY, SMALL}
    client.close()


def test_an_engine_on_another_machine_connects_with_the_token_and_serves(tmp_path):
    server = start(tmp_path, engines=0, remote_engines=["far"], engine_listen="127.0.0.1:0")
    token_file = server.config.engine_token_file
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not the token\n")
    refused = subprocess.run(_engine_command(server, wrong), capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "wrong engine token" in refused.stderr
    assert engine(server, "far")["state"] != "up"

    assert isinstance(server.engines, EngineProcesses)
    host, _, port = server.engines.address.rpartition(":")
    for hostile in (struct.pack("<Q", 1 << 40), struct.pack("<Q", 20) + b"\x00" * 20,
                    struct.pack("<Q", 4) + b"\xff" * 4):   # a vast frame, garbage, a bad length
        with socket.create_connection((host, int(port)), timeout=30) as peer:
            peer.recv(1 << 16)                       # the challenge
            peer.sendall(hostile)
            assert peer.recv(1 << 16) == b""         # the server hung up, allocating nothing
    assert engine(server, "far")["state"] != "up"
    process = subprocess.Popen(_engine_command(server, token_file))
    try:
        wait_up(server, "far")
        client = client_of(server, "remy")
        trainer = client.create_lora_training_client(base_model=TINY, rank=4, seed=1)
        steps(trainer, DATA, 1)
        assert logprobs(trainer, DATA)
        client.close()
    finally:
        server.stop()
        process.wait(timeout=60)


def _engine_command(server: StillroomServer, token_file) -> list[str]:
    assert isinstance(server.engines, EngineProcesses)
    return [sys.executable, "-m", "stillroom.cli", "engine", "--connect", server.engines.address,
            "--name", "far", "--token-file", str(token_file)]


def _samples(text: str, name: str) -> dict:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (name, name + "_total"):
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found
