"""A new user's first hour, each rough edge once seen on a fresh clone: the commands answer in a
sentence that names the port, folder or command to use next instead of a traceback, a silent
empty store or a hang."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

import stillroom
from stillroom.cli import _runs_list, server_install_hint
from stillroom.cli import main as cli

from conftest import TINY

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_runs_list_columns_fit_tinker_style_run_ids(capsys):
    def run(run_id: str, base: str) -> SimpleNamespace:
        return SimpleNamespace(training_run_id=run_id, base_model=base, is_lora=True, lora_rank=8,
                               created_at=datetime(2026, 1, 2, 3, 4, 5), last_checkpoint=None,
                               last_sampler_checkpoint=None)

    runs = [run("sess-abcdef123456:train:0", TINY),
            run("run-0123456789abcdef", "/srv/models/a-long-model-name")]
    response = SimpleNamespace(training_runs=runs, cursor=SimpleNamespace(total_count=2))
    rest = SimpleNamespace(list_training_runs=lambda **_: SimpleNamespace(result=lambda: response))
    _runs_list(rest, SimpleNamespace(limit=20, offset=0))
    header, *lines, footer = capsys.readouterr().out.splitlines()
    for title, values in (("BASE MODEL", [TINY, "/srv/models"]), ("KIND", ["lora r8"] * 2),
                          ("CREATED", ["2026-01-02"] * 2)):
        assert [line.index(value) for line, value in zip(lines, values)] == [header.index(title)] * 2
    assert footer == "(2 of 2 runs from offset 0)"


def test_the_server_install_hint_is_a_command_that_works_here():
    # stillroom is not on the package index: the hint installs the extra from this very clone
    assert f"pip install '{ROOT}[server]'" in server_install_hint()


def test_keys_list_without_a_store_says_where_it_looked_and_makes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("STILLROOM_DATA_DIR", raising=False)
    monkeypatch.delenv("STILLROOM_DATABASE_URL", raising=False)
    with pytest.raises(SystemExit, match=f"no server store in {tmp_path / '.stillroom'}.*--data-dir"):
        cli(["keys", "list"])
    assert list(tmp_path.iterdir()) == []


def test_keys_list_counts_the_keys_of_the_store_it_read(server, capsys):
    cli(["keys", "list", "--data-dir", str(server.config.data_dir)])
    store = re.escape(f"sqlite:///{server.config.data_dir / 'stillroom.db'}")
    assert re.search(rf"\n\(\d+ keys? in {store}\)\n$", capsys.readouterr().out)


def test_no_server_at_the_address_names_it_and_stillroom_serve():
    address = f"127.0.0.1:{free_port()}"
    with stillroom.ServiceClient(base_url=address, api_key="tml-x") as client:
        client._connection.max_retries = 1
        with pytest.raises(stillroom.APIConnectionError, match=f"no Stillroom server answers at {address} "
                           r"\(Connection refused\)\. Is one running\? `stillroom serve`"):
            client.get_server_capabilities()
    started = time.monotonic()
    with pytest.raises(SystemExit, match=f"stillroom runs: .*no Stillroom server answers at {address}"):
        cli(["runs", "list", "--base-url", address, "--api-key", "tml-x"])
    assert time.monotonic() - started < 5   # the command does not wait out the SDK's ~8 s of retries


def test_the_cli_pointed_at_the_http_port_says_which_port_it_wants(server):
    address = f"127.0.0.1:{server.http_port}"
    with pytest.raises(SystemExit, match=f"{address} answers HTTP/1.1, not gRPC: .*HTTP port.*gRPC port"):
        cli(["runs", "list", "--base-url", address, "--api-key", server.local_api_key])


def serve(tmp_path: Path, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "STILLROOM_LOG_LEVEL": "INFO"}
    command = [sys.executable, "-m", "stillroom.cli", "serve", "--data-dir", str(tmp_path / "data"), *flags]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


@pytest.mark.slow
def test_serve_with_a_port_in_use_names_the_port_and_what_it_is_for(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flags, wire in ((["--port", str(port), "--http-port", "0"], "the gRPC port"),
                            (["--port", "0", "--http-port", str(port)], "the HTTP port")):
            # ~40 s each under a load average of 13 (a server's imports before it refuses): 3x and more
            output, _ = serve(tmp_path, *flags).communicate(timeout=150)
            assert f"stillroom serve: cannot listen on 127.0.0.1:{port} ({wire}" in output, output
            assert "Traceback" not in output and "--port and --http-port" in output, output
    assert not (tmp_path / "data").exists()   # refused before anything was made


@pytest.mark.slow
def test_a_start_logs_no_library_noise_and_says_which_port_is_which(tmp_path):
    ready = tmp_path / "ready"
    process = serve(tmp_path, "--port", "0", "--ready-file", str(ready))
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.1)
        address = ready.read_text().splitlines()[0]
        key = (tmp_path / "data" / "local_api_key").read_text().strip()
        with stillroom.ServiceClient(base_url=address, api_key=key) as client:
            sampler = client.create_sampling_client(base_model=TINY)
            params = stillroom.types.SamplingParams(max_tokens=4, temperature=1.0, seed=0)
            sampler.sample(stillroom.types.ModelInput.from_ints([1, 40]), 2, params).result()
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert "(gRPC: for Stillroom's SDK and `stillroom` commands" in output, output
    assert "(HTTP: for the official tinker SDK, TINKER_BASE_URL" in output, output
    assert "alembic" not in output and "past_key_values" not in output and "Warning" not in output, output


@pytest.mark.slow
def test_the_quickstart_runs_with_a_key_for_another_server_exported(tmp_path):
    env = {**os.environ, "STILLROOM_API_KEY": "tml-a-key-of-another-server", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "stillroom_cookbook.recipes.quickstart", "--data-dir",
                           str(tmp_path), "--steps", "2"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "snapshot     : stillroom://" in done.stdout
