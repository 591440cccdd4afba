"""The store, on SQLite and on PostgreSQL (the `postgres` lane): alembic builds the models' exact
schema from empty, and request numbers are accepted in order, deduplicated and never skipped."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from stillroom_server.store import SequenceConflict, Store
from stillroom_server.store.models import Base


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store(request, tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}" if request.param == "sqlite" else request.getfixturevalue(
        "postgres_url")
    store = Store(url)
    assert store.engine.dialect.name == request.param
    store.upgrade()
    yield store
    store.close()


def test_upgrade_from_empty_builds_the_models_schema(store):
    tables = set(inspect(store.engine).get_table_names())
    assert {"training_runs", "checkpoints", "futures", "api_keys", "alembic_version"} <= tables
    with store.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    store.upgrade()  # running it again is a no-op


def test_request_numbers_are_accepted_in_order_and_deduplicated(store):
    store.create_run("run-a", "alice", "stillroom/char-1m", False, 0, {}, {}, 10)
    assert store.accept_sequenced("f1", "alice", "forward_backward", "run-a", 1) == ("f1", True)
    assert store.accept_sequenced("f1-retry", "alice", "forward_backward", "run-a", 1) == ("f1", False)
    with pytest.raises(SequenceConflict, match="expects request 2 next, got 3"):
        store.accept_sequenced("f3", "alice", "optim_step", "run-a", 3)
    assert store.accept_sequenced("f2", "alice", "optim_step", "run-a", 2) == ("f2", True)
    assert store.get_run("run-a").last_seq == 2
    assert store.get_future("f3") is None


def test_pending_futures_fail_after_a_restart(store):
    store.create_future("f9", "alice", "sample")
    store.create_future("f10", "alice", "sample")
    store.finish_future("f10", b"result")
    assert store.fail_pending_futures("server restarted") == 1
    record = store.get_future("f9")
    assert (record.status, record.error_code, record.error_message) == (
        "failed", "UNAVAILABLE", "server restarted")
    assert store.get_future("f10").status == "done"


def test_expired_results_are_deleted_but_pending_ones_kept(store):
    from datetime import timedelta

    from stillroom_server.store.repo import utcnow

    store.create_future("done", "alice", "sample")
    store.finish_future("done", b"x")
    store.create_future("pending", "alice", "sample")
    assert store.delete_expired_futures() == 0  # nothing has expired yet
    assert store.delete_expired_futures(now=utcnow() + timedelta(days=8)) == 1
    assert store.get_future("done") is None
    assert store.get_future("pending").status == "pending"
