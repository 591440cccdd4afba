"""Alembic environment: runs the migrations on the connection the server hands over, or on the URL
from alembic.ini / STILLROOM_DATABASE_URL when run from the command line."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine

from stillroom_server.store.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


def main() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run_migrations(connection)
        return
    url = os.environ.get("STILLROOM_DATABASE_URL") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("alembic: set STILLROOM_DATABASE_URL (or sqlalchemy.url in alembic.ini)")
    with create_engine(url).connect() as connection:
        run_migrations(connection)
        connection.commit()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    main()
