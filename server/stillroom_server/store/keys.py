"""API keys in the store: made with a random secret shown once, kept only as a SHA-256 hash.

The secrets are 256 random bits, so a plain SHA-256 (not a slow password hash) is enough to
keep a stolen database from yielding usable keys.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import or_, select

from stillroom_server.store.models import ApiKeyRow
from stillroom_server.store.repo import Store, utcnow

# The tinker SDK refuses keys that do not start with "tml-" before sending anything, so keys are
# made in that form. Keys made before (`sr-...`) also work written as `tml-sr-...`.
KEY_PREFIX = "tml-"


@dataclass(frozen=True)
class ApiKeyInfo:
    id: str
    owner: str
    name: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _info(row: ApiKeyRow) -> ApiKeyInfo:
    return ApiKeyInfo(row.id, row.owner, row.name, row.prefix, row.created_at, row.revoked_at)


def create_key(store: Store, owner: str, name: str) -> tuple[ApiKeyInfo, str]:
    """A new key for `owner`: its record and the secret, which is never stored or shown again."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKeyRow(id="key-" + secrets.token_hex(6), owner=owner, name=name, key_hash=_hash(secret),
                    prefix=secret[:10], created_at=utcnow())
    with store.session() as session, session.begin():
        session.add(row)
    return _info(row), secret


def owner_of(store: Store, secret: str) -> str | None:
    """The owner of a valid, unrevoked key, or None."""
    candidates = [_hash(secret)]
    if secret.startswith(KEY_PREFIX + "sr-"):
        candidates.append(_hash(secret[len(KEY_PREFIX):]))
    with store.engine.connect() as connection:  # Core, not the ORM: this runs on every call
        row = connection.execute(select(ApiKeyRow.owner).where(
            ApiKeyRow.key_hash.in_(candidates), ApiKeyRow.revoked_at.is_(None))).first()
    return None if row is None else row.owner


def revoke_key(store: Store, key: str) -> ApiKeyInfo | None:
    """Revoke the live key with this id, secret or 10-character prefix; None if there is none."""
    with store.session() as session, session.begin():
        row = session.scalar(select(ApiKeyRow).where(
            or_(ApiKeyRow.id == key, ApiKeyRow.key_hash == _hash(key), ApiKeyRow.prefix == key),
            ApiKeyRow.revoked_at.is_(None)))
        if row is None:
            return None
        row.revoked_at = utcnow()
    return _info(row)


def list_keys(store: Store) -> list[ApiKeyInfo]:
    with store.session() as session:
        return [_info(r) for r in session.scalars(select(ApiKeyRow).order_by(ApiKeyRow.created_at))]
