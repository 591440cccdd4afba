"""The store's tables: API keys, training runs, checkpoints and futures.

The schema is built by the alembic migrations in alembic/versions, never by create_all in the
server. A future's result is the serialized protobuf the client will receive: opaque bytes here.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class TrainingRunRow(Base):
    __tablename__ = "training_runs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    base_model: Mapped[str] = mapped_column(String(512))
    is_lora: Mapped[bool] = mapped_column(Boolean)
    lora_rank: Mapped[int] = mapped_column(Integer, default=0)
    config_json: Mapped[str] = mapped_column(Text, default="{}")
    user_metadata_json: Mapped[str] = mapped_column(Text, default="{}")
    last_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    num_trainable_params: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class CheckpointRow(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("run_id", "kind", "name", name="uq_checkpoint_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("training_runs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(32))          # "sampler_weights" | "weights"
    name: Mapped[str] = mapped_column(String(128))
    path: Mapped[str] = mapped_column(String(512), unique=True)
    base_model: Mapped[str] = mapped_column(String(512))
    is_lora: Mapped[bool] = mapped_column(Boolean)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    user_metadata_json: Mapped[str] = mapped_column(Text, default="{}", server_default="{}")
    # published: every owner may sample, distill from and load it; only its owner changes it
    published: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class FutureRow(Base):
    __tablename__ = "futures"
    __table_args__ = (
        UniqueConstraint("run_id", "seq", name="uq_future_run_seq"),
        Index("ix_futures_status", "status"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # a numbered request's kind and body hashed by its transport: a retry repeats it
    digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    status: Mapped[str] = mapped_column(String(16))        # "pending" | "done" | "failed"
    result: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(32), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ApiKeyRow(Base):
    """An API key: only its SHA-256 is stored; `prefix` (the first characters) identifies it."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(128))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
