"""Sessions that lapse: a Tinker client that vanishes without finishing its session (no `close()`,
a killed process) stops heartbeating, and after `--session-timeout` its session ends as a finish
would. Its runs leave memory and stop counting against the owner's limits, so a new session of
the same owner can create runs again; its checkpoints stay; its next call says it lapsed.

Driven over Tinker's HTTP wire (the calls and bodies the tinker SDK sends) against a real
`stillroom serve` process, with a 2 s timeout and a limit of 2 live runs per owner; the sessions
are listed and ended with the `stillroom sessions` command, over gRPC."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

import stillroom

BASE = "stillroom/char-1m"
TIMEOUT = 2
pytestmark = pytest.mark.slow


class Tinker:
    """Tinker's HTTP calls, as the SDK makes them (tests/test_tinker_sdk.py drives the SDK itself)."""

    def __init__(self, url: str, key: str) -> None:
        self.http = httpx.Client(base_url=url + "/api/v1", headers={"X-API-Key": key}, timeout=60)

    def post(self, endpoint: str, /, **body) -> httpx.Response:
        return self.http.post(endpoint, json=body)

    def create_session(self) -> str:
        return self.post("/create_session", tags=[], user_metadata={}).json()["session_id"]

    def heartbeat(self, session: str) -> httpx.Response:
        return self.post("/session_heartbeat", session_id=session, type="session_heartbeat")

    def result(self, answer: httpx.Response) -> dict:
        """The outcome of a call answered with a future: its result or its failure."""
        assert answer.status_code == 200, answer.text
        while True:
            outcome = self.post("/retrieve_future", request_id=answer.json()["request_id"]).json()
            if outcome.get("type") != "try_again":
                return outcome

    def create_model(self, session: str, n: int) -> httpx.Response:
        return self.post("/create_model", session_id=session, model_seq_id=n, base_model=BASE,
                         lora_config={"rank": 4}, type="create_model")


def keep_beating(url: str, key: str, session: str) -> threading.Event:
    """Heartbeat `session` every 0.3 s from a thread, as a live client does, until the server answers
    410 or the returned event is set."""
    stop, client = threading.Event(), Tinker(url, key)

    def beat() -> None:
        while not stop.wait(0.3) and client.heartbeat(session).status_code != 410:
            pass

    threading.Thread(target=beat, daemon=True).start()
    return stop


def start_server(tmp_path, *flags: str) -> tuple[subprocess.Popen, str, str, str]:
    ready, log = tmp_path / "ready", open(tmp_path / "server.log", "w")
    env = {k: v for k, v in os.environ.items() if k != "STILLROOM_API_KEY"}
    process = subprocess.Popen(
        [sys.executable, "-m", "stillroom.cli", "serve", "--port", "0", "--data-dir", str(tmp_path / "data"),
         "--ready-file", str(ready), *flags], stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert process.poll() is None, (tmp_path / "server.log").read_text()
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.1)
    address, http_url = ready.read_text().split()
    return process, address, http_url, (tmp_path / "data" / "local_api_key").read_text().strip()


def stillroom_cli(address: str, data_dir, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "stillroom.cli", "sessions", *args, "--base-url", address,
                           "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_vanished_clients_session_lapses_and_releases_its_runs(tmp_path):
    process, address, http_url, key = start_server(
        tmp_path, "--session-timeout", str(TIMEOUT), "--max-live-runs-per-owner", "2")
    try:
        client = Tinker(http_url, key)
        gone = client.create_session()   # the client that will vanish
        alive = keep_beating(http_url, key, gone)
        runs = [client.result(client.create_model(gone, n))["model_id"] for n in range(2)]
        saved = client.result(client.post("/save_weights", model_id=runs[0], seq_id=1, path="kept",
                                          type="save_weights"))["path"]
        sampler = client.post("/create_sampling_session", session_id=gone, sampling_session_seq_id=0,
                              base_model=BASE, type="create_sampling_session").json()["sampling_session_id"]
        refused = client.result(client.create_model(gone, 2))
        assert "2 live runs is the limit of 2 per owner" in refused["error"], refused
        assert "sessions end" in refused["error"] and f"{TIMEOUT} s ends by itself" in refused["error"]
        alive.set()
        vanished_at = time.monotonic()   # the client is gone: no heartbeat, no finish

        # A new session of the same owner, heartbeating as the SDK does, waits for the lapse.
        fresh = client.create_session()
        beating = keep_beating(http_url, key, fresh)
        with stillroom.ServiceClient(base_url=address, api_key=key) as service:
            rest = service.create_rest_client()
            while True:
                listed = {s.session_id: s for s in rest.list_client_sessions().result().sessions}
                if listed[gone].state == "lapsed":
                    lapsed_after = time.monotonic() - vanished_at
                    break
                assert time.monotonic() - vanished_at < TIMEOUT + 30, "the session never lapsed"
                time.sleep(0.2)
        assert listed[gone].live_runs == 0 and listed[gone].training_run_ids == runs
        assert listed[fresh].state == "live"
        assert TIMEOUT <= lapsed_after < TIMEOUT + 10, lapsed_after
        print(f"the vanished session lapsed {lapsed_after:.2f} s after its last heartbeat (timeout "
              f"{TIMEOUT} s)")

        # Its runs no longer count: the new session makes runs up to the limit again.
        new_runs = [client.result(client.create_model(fresh, n))["model_id"] for n in range(2)]
        assert all(run.startswith(fresh) for run in new_runs)

        # The vanished session's next calls say it lapsed; the heartbeat's 410 stops the SDK's loop.
        lapse = f"session {gone} lapsed after {TIMEOUT} s without a heartbeat"
        beat = client.heartbeat(gone)
        assert beat.status_code == 410 and lapse in beat.json()["error"], beat.text
        answer = client.create_model(gone, 3)
        assert answer.status_code == 400 and lapse in answer.json()["error"], answer.text
        step = client.result(client.post("/optim_step", model_id=runs[0], seq_id=2,
                                         adam_params={"learning_rate": 1e-3}, type="optim_step"))
        assert lapse in step["error"] and saved.split("://")[1] in step["error"], step
        answer = client.post("/create_sampling_session", session_id=gone, sampling_session_seq_id=1,
                             base_model=BASE, type="create_sampling_session")
        assert answer.status_code == 400 and lapse in answer.json()["error"], answer.text
        answer = client.post("/asample", sampling_session_id=sampler, seq_id=1, num_samples=1,
                             prompt={"chunks": [{"type": "encoded_text", "tokens": [40, 41]}]},
                             sampling_params={"max_tokens": 2}, type="sample")
        assert answer.status_code == 400, answer.text
        assert f"sampler {sampler} was closed: {lapse}" in answer.json()["error"]

        # Its checkpoints stay.
        kept = client.http.get(f"/training_runs/{runs[0]}/checkpoints").json()["checkpoints"]
        assert [c["tinker_path"] for c in kept] == [saved]

        # `stillroom sessions list` and `end`: ending the live session frees its runs at once.
        listing = stillroom_cli(address, tmp_path / "data", "list")
        assert f"{gone:<18} lapsed" in listing and f"{fresh:<18} live" in listing, listing
        assert "0 live / 2" in listing and "2 live / 2" in listing, listing
        assert f"no heartbeat for {TIMEOUT:g} s lapses" in listing, listing
        assert gone not in stillroom_cli(address, tmp_path / "data", "list", "--live")
        ended = stillroom_cli(address, tmp_path / "data", "end", fresh)
        beating.set()
        assert f"{fresh}: finished (ended by its owner)" in ended, ended
        beat = client.heartbeat(fresh)
        assert beat.status_code == 410 and "was finished (ended by its owner)" in beat.json()["error"]
        third = client.create_session()
        assert "model_id" in client.result(client.create_model(third, 0))
        print(listing)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    log = (tmp_path / "server.log").read_text()
    logged = f"session {gone} of owner 'local' lapsed: no heartbeat for {TIMEOUT} s; 2 training runs"
    assert logged in log, log
    assert "a timeout under 30 s can end sessions whose client is alive" in log  # 2 s: the test's own


DOOMED = """
import sys, time, tinker
client = tinker.ServiceClient(base_url=sys.argv[1], api_key=sys.argv[2])
print(client.create_lora_training_client(sys.argv[3], rank=4).result().model_id, flush=True)
time.sleep(3600)
"""


def test_the_official_sdk_keeps_its_session_alive_and_a_killed_ones_lapses(tmp_path):
    """With a timeout above the SDK's 10 s heartbeat, a live official-SDK client outlives it on
    heartbeats alone, while the session of one whose process is killed lapses and frees its run."""
    tinker = pytest.importorskip("tinker", reason="the official tinker SDK is a test dependency")
    timeout = 15
    process, address, http_url, key = start_server(
        tmp_path, "--session-timeout", str(timeout), "--max-live-runs-per-owner", "1")
    env = {**os.environ, "TINKER_TELEMETRY": "0"}
    doomed = subprocess.Popen([sys.executable, "-c", DOOMED, http_url, key, BASE], stdout=subprocess.PIPE,
                              text=True, env=env)
    live = None
    try:
        assert doomed.stdout is not None
        run = doomed.stdout.readline().strip()
        gone = run.split(":train:")[0]
        live = tinker.ServiceClient(base_url=http_url, api_key=key)
        with pytest.raises(tinker.RequestFailedError, match="1 live runs is the limit of 1"):
            live.create_lora_training_client(BASE, rank=4).result()
        doomed.kill()    # no close(), no finish: its heartbeats stop
        killed_at = time.monotonic()
        with stillroom.ServiceClient(base_url=address, api_key=key) as service:
            rest = service.create_rest_client()
            while (listed := {s.session_id: s for s in rest.list_client_sessions().result().sessions})[
                    gone].state == "live":
                assert time.monotonic() - killed_at < timeout + 30, "the killed client's session never lapsed"
                time.sleep(0.5)
        lapsed_after = time.monotonic() - killed_at
        print(f"the killed client's session lapsed {lapsed_after:.1f} s after the kill (timeout {timeout} s)")
        assert timeout - 10 <= lapsed_after < timeout + 10 and listed[gone].live_runs == 0
        # The live client made no call since its refused one: its heartbeats alone kept it alive.
        live_session = next(s for s in listed.values() if s.session_id != gone)
        assert live_session.state == "live", live_session
        trainer = live.create_lora_training_client(BASE, rank=4).result()
        assert trainer.model_id.startswith(live_session.session_id)
    finally:
        doomed.kill()
        if live is not None:
            live.close("success").result()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
