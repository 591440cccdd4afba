"""SIGKILL during a session driven over Tinker's HTTP API by the official `tinker` SDK: after each
restart every checkpoint the SDK was told is saved is listed and loads, and the run whose weights
were lost answers with an error that says so instead of training fresh weights."""

from __future__ import annotations

import gc
import math
import os
import random
import threading
import time

import pytest

from test_crash_safety import ServerProcess

from conftest import TINY

tinker = pytest.importorskip("tinker", reason="the official tinker SDK is a test dependency")
os.environ.setdefault("TINKER_TELEMETRY", "0")
pytestmark = pytest.mark.slow
KILLS = 3


def beating_clients() -> set[int]:
    """The tinker clients (their holders) in this process whose session heartbeat still runs."""
    from tinker.lib.internal_client_holder import InternalClientHolder

    return {id(h) for h in gc.get_objects() if isinstance(h, InternalClientHolder)
            and h._session_heartbeat_task is not None and not h._session_heartbeat_task.done()}


@pytest.fixture(autouse=True)
def no_heartbeat_outlives_its_server():
    """Every server here is killed by the end of the test: a client still beating then would log
    "Session heartbeat failed ... Tinker is down" two minutes later, in some other test."""
    before = beating_clients()
    yield
    time.sleep(0.5)   # a dropped client's heartbeat is cancelled on its own loop
    assert not beating_clients() - before, "a tinker client outlived its killed server"


def train_over_http(server: ServerProcess, cycle: int, saved: dict, stop: threading.Event,
                    runs: list) -> None:
    """Train and checkpoint through the official SDK until the server dies under it."""
    T = tinker.types
    client = tinker.ServiceClient(base_url=server.http_url, api_key=server.key)
    datum = T.Datum(model_input=T.ModelInput.from_ints([1, 40, 41, 42, 43]),
                    loss_fn_inputs={"target_tokens": [40, 41, 42, 43, 2], "weights": [1.0] * 5})
    step = 0
    try:
        trainer = client.create_lora_training_client(TINY, rank=4, seed=cycle).result(timeout=60)
        runs.append(trainer.model_id)
        while not stop.is_set():
            futures = [trainer.forward_backward([datum], "cross_entropy"),
                       trainer.optim_step(T.AdamParams(learning_rate=1e-3)),
                       trainer.save_weights_for_sampler(f"c{cycle}-s{step}")]
            if step % 2 == 0:
                futures.append(trainer.save_state(f"c{cycle}-t{step}"))
            for future in futures:
                result = future.result(timeout=10)
                if getattr(result, "path", None):
                    saved[result.path] = trainer.model_id
            step += 1
    except Exception:  # noqa: BLE001 - the server was killed under us: any SDK error or a timeout
        return
    finally:
        drop(client)


def drop(client) -> None:
    """Stop a client whose server was killed: its heartbeat thread, which would otherwise log "Session
    heartbeat failed ... Tinker is down" two minutes later, in whatever test runs then. Not `close()`,
    whose finish request retries against the dead server for five minutes (tinker 0.38)."""
    holder = client._session_holder
    if holder is not None:
        holder.close()


def check_recovered(server: ServerProcess, saved: dict, runs: list) -> None:
    rest = tinker.RestClient(base_url=server.http_url, api_key=server.key)
    listed = {c.tinker_path for c in rest.list_user_checkpoints(limit=1000).result().checkpoints}
    assert set(saved) <= listed, set(saved) - listed
    client = tinker.ServiceClient(base_url=server.http_url, api_key=server.key)
    probe = tinker.types.ModelInput.from_ints([1, 40, 41, 42])
    samplers = sorted(p for p in saved if "/sampler_weights/" in p)
    for path in random.sample(samplers, k=min(1, len(samplers))):
        logprobs = client.create_sampling_client(model_path=path).compute_logprobs(probe).result()
        assert all(math.isfinite(v) for v in logprobs[1:])
    for run_id in runs:
        assert rest.get_training_run(run_id).result().training_run_id == run_id
    states = sorted(p for p in saved if "/weights/" in p)
    if states:
        resumed = client.create_training_client_from_state_with_optimizer(states[-1]).result()
        assert resumed.get_info().model_data.model_name == TINY
    client.close("success").result()


@pytest.mark.timeout(600)   # measured 175 s under a load average of 13 (server starts): three times that
def test_sigkill_during_an_http_session_loses_nothing_reported_saved(tmp_path):
    rng = random.Random(99)
    saved: dict[str, str] = {}
    runs: list[str] = []
    for cycle in range(KILLS):
        server = ServerProcess(tmp_path)
        stop = threading.Event()
        worker = None
        try:
            check_recovered(server, saved, runs)
            worker = threading.Thread(target=train_over_http, args=(server, cycle, saved, stop, runs))
            worker.start()
            time.sleep(rng.uniform(3.0, 6.0))
        finally:
            server.kill()  # SIGKILL, also when a check above failed: no server outlives the test
            stop.set()
        if worker is not None:
            worker.join(timeout=60)
            assert not worker.is_alive()
    server = ServerProcess(tmp_path)
    try:
        check_recovered(server, saved, runs)
        assert_lost_run_says_so(server, tmp_path, runs[-1])
    finally:
        server.kill()
    assert saved, "no checkpoint was saved before the kills: the test proved nothing"


def assert_lost_run_says_so(server: ServerProcess, data_dir, run_id: str) -> None:
    """The next request of a run whose weights died with the server fails, naming why (over HTTP a
    refused numbered request uses up its number and fails through its future)."""
    import httpx

    from stillroom_server.store import Store

    store = Store(f"sqlite:///{data_dir / 'stillroom.db'}")
    row = store.get_run(run_id)
    store.close()
    assert row is not None
    next_seq = row.last_seq + 1
    answer = httpx.post(server.http_url + "/api/v1/optim_step", headers={"X-API-Key": server.key},
                        json={"model_id": run_id, "seq_id": next_seq, "adam_params": {}})
    assert answer.status_code == 200, answer.text
    failed = httpx.post(server.http_url + "/api/v1/retrieve_future", headers={"X-API-Key": server.key},
                        json={"request_id": answer.json()["request_id"]}, timeout=60).json()
    assert failed["category"] == "user" and "restart" in failed["error"], failed
