"""Alembic migrations for the store; installed as the package `stillroom_server.migrations`."""
