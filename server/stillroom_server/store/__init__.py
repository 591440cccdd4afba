"""Persistence: SQLAlchemy models and the repository functions over them. Knows nothing of torch."""

from stillroom_server.store.repo import SequenceConflict, Store

__all__ = ["SequenceConflict", "Store"]
