"""The SDK rides out a server that is briefly unreachable for calls that are safe to repeat, and
says so at once for a call that is not."""

from __future__ import annotations

import socket
import threading

import pytest

import stillroom
from stillroom_server.app import StillroomServer
from stillroom_server.config import ServerConfig

from conftest import TINY


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow   # waits out a server start with its engine process
def test_safe_calls_are_retried_until_the_server_is_back_and_creates_are_not(tmp_path):
    port = free_port()
    config = ServerConfig(data_dir=tmp_path, host="127.0.0.1", port=port, auth="off")
    with stillroom.ServiceClient(base_url=f"127.0.0.1:{port}") as client:
        with pytest.raises(stillroom.APIConnectionError, match="CreateTrainingRun: .* not retried"):
            client.create_full_training_client(TINY)
        holder = {}
        starter = threading.Timer(1.0, lambda: holder.setdefault("server", StillroomServer(config).start()))
        starter.start()
        try:
            down_when_called = "server" not in holder  # the server starts a second later
            caps = client.get_server_capabilities()  # UNAVAILABLE at first, then answered
            assert down_when_called and caps.supported_models
        finally:
            starter.join()
            holder["server"].stop()
