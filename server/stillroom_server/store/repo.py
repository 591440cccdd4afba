"""The repository over the store: every read and write the server makes, each in one transaction.

`Store(url)` opens SQLite (the embedded default) or PostgreSQL; `upgrade()` runs the alembic
migrations to head. Methods take and return plain values or detached rows; callers never hold a
session. The store knows nothing of torch or gRPC.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast

from sqlalchemy import (
    CursorResult,
    Table,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.orm import Session, sessionmaker

from stillroom_server.store.models import CheckpointRow, FutureRow, TrainingRunRow

FUTURE_TTL = timedelta(days=7)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class SequenceConflict(Exception):
    """A request number that is neither a repeat nor the next one in its run."""


@dataclass(frozen=True)
class FutureRecord:
    id: str
    owner: str
    kind: str
    status: str
    result: bytes | None
    error_code: str | None
    error_message: str | None


@dataclass(frozen=True)
class FutureOutcome:
    """How a request ended, as `settle_futures` records it."""
    id: str
    status: str                 # "done" | "failed"
    result: bytes | None
    error_code: str | None
    error_message: str | None


_FUTURES = cast(Table, FutureRow.__table__)


class Store:
    def __init__(self, url: str) -> None:
        self.url = url
        connect_args = {"check_same_thread": False, "timeout": 30} if url.startswith("sqlite") else {}
        self.engine = create_engine(url, connect_args=connect_args)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def upgrade(self) -> None:
        """Bring the schema to the newest migration (alembic `upgrade head`)."""
        import logging

        logging.getLogger("alembic").setLevel(logging.WARNING)  # before the import, which logs its plugins
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(migrations_dir()))
        with self.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def close(self) -> None:
        self.engine.dispose()

    def session(self) -> Session:
        return self._sessions()

    # ---------------------------------------------------------------- training runs

    def create_run(self, run_id: str, owner: str, base_model: str, is_lora: bool, lora_rank: int,
                   config: dict, user_metadata: dict[str, str], num_trainable_params: int) -> TrainingRunRow:
        now = utcnow()
        row = TrainingRunRow(id=run_id, owner=owner, base_model=base_model, is_lora=is_lora,
                             lora_rank=lora_rank, config_json=json.dumps(config),
                             user_metadata_json=json.dumps(user_metadata), last_seq=0,
                             num_trainable_params=num_trainable_params, created_at=now, updated_at=now)
        with self.session() as session, session.begin():
            session.add(row)
        return row

    def get_run(self, run_id: str) -> TrainingRunRow | None:
        with self.session() as session:
            return session.get(TrainingRunRow, run_id)

    def list_runs(self, owner: str, limit: int = 20, offset: int = 0) -> list[TrainingRunRow]:
        with self.session() as session:
            query = (select(TrainingRunRow).where(TrainingRunRow.owner == owner)
                     .order_by(TrainingRunRow.created_at.desc()).limit(limit).offset(offset))
            return list(session.scalars(query))

    # ---------------------------------------------------------------- futures

    def accept_sequenced(self, future_id: str, owner: str, kind: str, run_id: str,
                         seq: int, digest: str | None = None) -> tuple[str, bool]:
        """Record request `seq` of `run_id` (whose kind and body hash to `digest`) as a pending future.

        Returns (future id, True) for the next number in the run, or the earlier future's id and
        False for a number seen before. Any other number raises SequenceConflict.
        """
        with self.session() as session, session.begin():
            run = session.get(TrainingRunRow, run_id, with_for_update=True)
            assert run is not None, f"the service accepts requests for existing runs only, not {run_id}"
            if seq <= run.last_seq:
                earlier = session.scalar(select(FutureRow.id).where(FutureRow.run_id == run_id,
                                                                   FutureRow.seq == seq))
                if earlier is None:
                    raise SequenceConflict(f"seq: request {seq} of run {run_id} is unknown "
                                           f"(numbers start at 1; the last accepted is {run.last_seq})")
                return earlier, False
            if seq != run.last_seq + 1:
                raise SequenceConflict(f"seq: run {run_id} expects request {run.last_seq + 1} next, "
                                       f"got {seq}")
            run.last_seq = seq
            run.updated_at = utcnow()
            future = self._new_future(future_id, owner, kind, run_id, seq)
            future.digest = digest
            session.add(future)
        return future_id, True

    def find_sequenced(self, run_id: str, seq: int) -> tuple[str, str | None] | None:
        """Request `seq` of `run_id`, as its future's id and digest (None if never accepted)."""
        with self.session() as session:
            row = session.execute(select(FutureRow.id, FutureRow.digest).where(
                FutureRow.run_id == run_id, FutureRow.seq == seq)).first()
            return None if row is None else (row[0], row[1])

    def create_future(self, future_id: str, owner: str, kind: str) -> None:
        self.create_futures([(future_id, owner, kind)])

    def create_futures(self, futures: list[tuple[str, str, str]]) -> None:
        """Record pending requests (id, owner, kind) in one transaction."""
        if not futures:
            return
        now = utcnow()
        with self.engine.begin() as connection:  # Core, not the ORM: this runs once per request
            connection.execute(insert(_FUTURES), [
                {"id": future_id, "owner": owner, "kind": kind, "run_id": None, "seq": None,
                 "status": "pending", "created_at": now, "expires_at": now + FUTURE_TTL}
                for future_id, owner, kind in futures])

    @staticmethod
    def _new_future(future_id, owner, kind, run_id, seq) -> FutureRow:
        now = utcnow()
        return FutureRow(id=future_id, owner=owner, kind=kind, run_id=run_id, seq=seq,
                         status="pending", created_at=now, expires_at=now + FUTURE_TTL)

    def finish_future(self, future_id: str, result: bytes) -> None:
        self.settle_futures([FutureOutcome(future_id, "done", result, None, None)])

    def fail_future(self, future_id: str, code: str, message: str) -> None:
        self.settle_futures([FutureOutcome(future_id, "failed", None, code, message)])

    def settle_futures(self, outcomes: list[FutureOutcome]) -> None:
        """Record many requests' outcomes in one transaction (one commit for a whole batch)."""
        if not outcomes:
            return
        now = utcnow()
        statement = (update(_FUTURES).where(_FUTURES.c.id == bindparam("future_id"))
                     .values(status=bindparam("new_status"), result=bindparam("new_result"),
                             error_code=bindparam("code"), error_message=bindparam("message"),
                             finished_at=bindparam("at")))
        with self.engine.begin() as connection:
            connection.execute(statement, [
                {"future_id": o.id, "new_status": o.status, "new_result": o.result, "code": o.error_code,
                 "message": o.error_message, "at": now} for o in outcomes])

    def get_future(self, future_id: str) -> FutureRecord | None:
        columns = (_FUTURES.c.id, _FUTURES.c.owner, _FUTURES.c.kind, _FUTURES.c.status,
                   _FUTURES.c.result, _FUTURES.c.error_code, _FUTURES.c.error_message)
        with self.engine.connect() as connection:
            row = connection.execute(select(*columns).where(_FUTURES.c.id == future_id)).first()
        return None if row is None else FutureRecord(*row)

    def delete_expired_futures(self, now: datetime | None = None) -> int:
        """Remove finished futures whose results have expired; pending ones are never removed."""
        with self.session() as session, session.begin():
            result = session.execute(delete(FutureRow).where(
                FutureRow.expires_at < (now or utcnow()), FutureRow.status != "pending"))
            return _rowcount(result)

    def fail_pending_futures(self, message: str) -> int:
        """Mark every pending future failed (used at start-up: their work died with the process)."""
        with self.session() as session, session.begin():
            result = session.execute(update(FutureRow).where(FutureRow.status == "pending")
                                     .values(status="failed", error_code="UNAVAILABLE",
                                             error_message=message, finished_at=utcnow()))
            return _rowcount(result)

    # ---------------------------------------------------------------- checkpoints

    def add_checkpoint(self, owner: str, run_id: str, kind: str, name: str, path: str,
                       base_model: str, is_lora: bool, size_bytes: int,
                       expires_at: datetime | None = None,
                       user_metadata: dict[str, str] | None = None) -> None:
        with self.session() as session, session.begin():
            session.add(CheckpointRow(owner=owner, run_id=run_id, kind=kind, name=name, path=path,
                                      base_model=base_model, is_lora=is_lora, size_bytes=size_bytes,
                                      created_at=utcnow(), expires_at=expires_at,
                                      user_metadata_json=json.dumps(user_metadata or {})))

    def get_checkpoint(self, path: str) -> CheckpointRow | None:
        with self.session() as session:
            return session.scalar(select(CheckpointRow).where(CheckpointRow.path == path))

    def list_checkpoints(self, run_id: str) -> list[CheckpointRow]:
        with self.session() as session:
            query = (select(CheckpointRow).where(CheckpointRow.run_id == run_id)
                     .order_by(CheckpointRow.created_at))
            return list(session.scalars(query))


    def list_user_checkpoints(self, owner: str) -> list[CheckpointRow]:
        with self.session() as session:
            query = (select(CheckpointRow).where(CheckpointRow.owner == owner)
                     .order_by(CheckpointRow.created_at.desc(), CheckpointRow.id.desc()))
            return list(session.scalars(query))

    def delete_checkpoint(self, path: str) -> bool:
        with self.session() as session, session.begin():
            return _rowcount(session.execute(delete(CheckpointRow).where(CheckpointRow.path == path))) > 0

    def set_checkpoint_expiry(self, path: str, expires_at: datetime | None) -> CheckpointRow | None:
        with self.session() as session, session.begin():
            row = session.scalar(select(CheckpointRow).where(CheckpointRow.path == path))
            if row is not None:
                row.expires_at = expires_at
            return row

    def set_checkpoint_published(self, path: str, published: bool) -> CheckpointRow | None:
        """Publish or unpublish a checkpoint; its row as it now is (None if it is gone)."""
        with self.session() as session, session.begin():
            row = session.scalar(select(CheckpointRow).where(CheckpointRow.path == path))
            if row is not None:
                row.published = published
            return row

    def expired_checkpoints(self, now: datetime | None = None) -> list[CheckpointRow]:
        with self.session() as session:
            query = select(CheckpointRow).where(CheckpointRow.expires_at.is_not(None),
                                                CheckpointRow.expires_at <= (now or utcnow()))
            return list(session.scalars(query))

    def count_runs(self, owner: str) -> int:
        with self.session() as session:
            return session.scalar(select(func.count()).select_from(TrainingRunRow)
                                  .where(TrainingRunRow.owner == owner)) or 0


def _rowcount(result: Any) -> int:
    """Rows an UPDATE or DELETE touched (`execute` is typed as returning a plain Result)."""
    return cast(CursorResult, result).rowcount


def migrations_dir() -> Path:
    """The alembic/ folder: installed as stillroom_server/migrations in a wheel, or read from the
    source checkout (alembic/ has no __init__.py, so it never shadows the alembic package)."""
    packaged = Path(__file__).resolve().parent.parent / "migrations"
    if (packaged / "env.py").exists():
        return packaged
    return Path(__file__).resolve().parents[3] / "alembic"


def _sqlite_pragmas(connection, _record) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
