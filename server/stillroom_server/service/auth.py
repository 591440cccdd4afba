"""Who is calling: the API key in a call's `authorization: Bearer <key>` metadata names its owner.

The owner found for the call in progress is held in a context variable that servicer methods read;
with auth off (loopback servers only) every caller is the one local owner.
"""

from __future__ import annotations

import contextvars
import ipaddress

from stillroom_server.store import Store
from stillroom_server.store import keys

LOCAL_OWNER = "local"
CURRENT_OWNER: contextvars.ContextVar[str] = contextvars.ContextVar("stillroom_owner", default=LOCAL_OWNER)


class Unauthenticated(Exception):
    pass


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def authenticate(store: Store, metadata, require_keys: bool) -> str:
    if not require_keys:
        return LOCAL_OWNER
    header = dict(metadata or ()).get("authorization", "")
    secret = header[len("Bearer "):].strip() if header.startswith("Bearer ") else ""
    owner = keys.owner_of(store, secret) if secret else None
    if owner is None:
        raise Unauthenticated("missing, unknown or revoked API key: pass api_key= to ServiceClient or "
                              "set STILLROOM_API_KEY (a server admin makes keys with "
                              "`stillroom keys create --name NAME`)")
    return owner
