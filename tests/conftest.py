"""Shared fixtures: a real Stillroom server on a real port (port 0), with a real data directory
and SQLite file, driven through the SDK; and an empty PostgreSQL database for the tests marked
`postgres` when STILLROOM_TEST_DATABASE_URL names one (`bash scripts/postgres.sh start` prints it)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

TINY = "stillroom/char-1m"
SMALL = "stillroom/char-10m"


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    from stillroom_server.app import StillroomServer
    from stillroom_server.config import ServerConfig

    data_dir = tmp_path_factory.mktemp("stillroom-data")
    config = ServerConfig(data_dir=data_dir, host="127.0.0.1", port=0,
                          checkpoint_sweep_seconds=0.2,  # TTL tests wait on the sweep
                          max_live_runs_per_owner=1000)  # the suite makes many runs
    with StillroomServer(config) as running:
        yield running


@pytest.fixture(scope="session")
def inline_server(tmp_path_factory):
    """A server whose engine runs in the test process (`engines` 0): for the white-box tests that
    read the engine's memory or patch its module constants. Every other test drives `server`, whose
    engine is a process of its own, as in production."""
    from stillroom_server.app import StillroomServer
    from stillroom_server.config import ServerConfig

    config = ServerConfig(data_dir=tmp_path_factory.mktemp("stillroom-inline"), host="127.0.0.1", port=0,
                          checkpoint_sweep_seconds=0.2, max_live_runs_per_owner=1000, engines=0)
    with StillroomServer(config) as running:
        yield running


def inline_fixtures():
    """`server`, `service` and `tokenizer` fixtures on the inline server, for a module to take
    in place of the session ones: `server, service, tokenizer = inline_fixtures()`."""

    @pytest.fixture(scope="module")
    def server(inline_server):
        return inline_server

    @pytest.fixture(scope="module")
    def service(server):
        import stillroom

        client = stillroom.ServiceClient(base_url=server.address, api_key=server.local_api_key)
        yield client
        client.close()

    @pytest.fixture(scope="module")
    def tokenizer(service):
        return service._load_tokenizer(TINY)

    return server, service, tokenizer


@pytest.fixture(scope="session")
def service(server):
    import stillroom

    client = stillroom.ServiceClient(base_url=server.address, api_key=server.local_api_key)
    yield client
    client.close()


@pytest.fixture(scope="session")
def tokenizer(service):
    return service._load_tokenizer(TINY)


@pytest.fixture(scope="module")
def tinker_client(server):
    """An official `tinker` SDK client of the session server's HTTP API, for one test module."""
    tinker = pytest.importorskip("tinker", reason="the official tinker SDK is a test dependency")
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    client = tinker.ServiceClient(base_url=server.http_url, api_key=server.local_api_key)
    yield client
    client.close("success").result()


@pytest.fixture
def postgres_url():
    """STILLROOM_TEST_DATABASE_URL with its public schema dropped and made again: an empty database."""
    url = os.environ.get("STILLROOM_TEST_DATABASE_URL")
    if not url:
        pytest.skip("STILLROOM_TEST_DATABASE_URL is not set (bash scripts/postgres.sh start prints one)")
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE"))
        connection.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    return url


# Lines a test asks to show at the end of the run, whatever pytest's -q/-s (the wire fuzzer's counts).
SUMMARY_LINES: list[str] = []


def pytest_terminal_summary(terminalreporter):
    if SUMMARY_LINES:
        terminalreporter.section("stillroom")
        for line in SUMMARY_LINES:
            terminalreporter.write_line(line)
