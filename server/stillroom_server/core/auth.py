"""Who is calling: an API key names its owner; with auth off (loopback servers only) every caller is
the one local owner.

Transports only extract the secret (gRPC `authorization: Bearer <key>`, HTTP `X-API-Key`); this
module turns it into an owner, the same way for both, so one key works on either wire.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from stillroom_server.core.errors import Unauthenticated
from stillroom_server.store import Store, keys

LOCAL_OWNER = "local"
LOCAL_KEY_FILE = "local_api_key"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Authenticator:
    """`owner(secret)` for every call; `data_dir` is only named in the refusal's hint."""

    def __init__(self, store: Store, require_keys: bool, data_dir: Path | None = None) -> None:
        self.store = store
        self.require_keys = require_keys
        self.data_dir = data_dir

    def owner(self, secret: str | None) -> str:
        if not self.require_keys:
            return LOCAL_OWNER
        owner = keys.owner_of(self.store, secret.strip()) if secret else None
        if owner is None:
            # the file's name only: where the data dir is is not for unauthenticated callers
            where = (f"; the server's local key is in {LOCAL_KEY_FILE} in its data dir"
                     if self.data_dir is not None else "")
            raise Unauthenticated(
                "missing, unknown or revoked API key: pass api_key= to ServiceClient or set "
                f"STILLROOM_API_KEY (TINKER_API_KEY for the tinker SDK){where}; a server admin "
                "makes keys with `stillroom keys create --name NAME`")
        return owner
