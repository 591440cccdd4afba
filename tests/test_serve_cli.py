"""`stillroom serve` as a user runs it: a separate process on port 0, the standard health service,
a SQLite file in the data dir, and a clean exit on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import stillroom


def wait_for_file(path, process, seconds=60.0) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists():
            return path.read_text().splitlines()[0]
        assert process.poll() is None, process.communicate()
        time.sleep(0.1)
    raise TimeoutError("server did not start")


@pytest.mark.slow
def test_serve_answers_health_and_stops_cleanly_on_sigterm(tmp_path, monkeypatch):
    monkeypatch.delenv("STILLROOM_API_KEY", raising=False)
    ready = tmp_path / "ready"
    env = {**os.environ, "STILLROOM_LOG_LEVEL": "INFO"}
    process = subprocess.Popen(
        [sys.executable, "-m", "stillroom.cli", "serve", "--port", "0", "--data-dir",
         str(tmp_path / "data"), "--ready-file", str(ready)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        address = wait_for_file(ready, process)
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(  # pyright: ignore[reportAttributeAccessIssue] (the stubs are untyped)
                health_pb2.HealthCheckRequest(service="stillroom.v1.Stillroom"), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with stillroom.ServiceClient(base_url=address) as client:
            with pytest.raises(stillroom.AuthenticationError, match="API key"):
                client.get_server_capabilities()
        key_file = tmp_path / "data" / "local_api_key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        with stillroom.ServiceClient(base_url=address, api_key=key_file.read_text().strip()) as client:
            assert client.get_server_capabilities().supported_models
        assert (tmp_path / "data" / "stillroom.db").exists()
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert "serving on" in output and "stopped" in output
    assert key_file.read_text().strip() in output  # the first start prints the key it made


def test_serve_takes_settings_from_stillroom_variables(tmp_path):
    from stillroom_server.config import ServerConfig

    env = {"STILLROOM_PORT": "6123", "STILLROOM_DEVICE": "cpu", "STILLROOM_DATA_DIR": str(tmp_path)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        config = ServerConfig.from_sources(port=None, host="0.0.0.0")
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    assert (config.port, config.host, config.data_dir) == (6123, "0.0.0.0", tmp_path.resolve())
    assert config.resolved_database_url == f"sqlite:///{tmp_path.resolve() / 'stillroom.db'}"
