"""Checkpoint download tokens, which both wires hand out and the HTTP wire redeems.

The core checks the owner (`Service.checkpoint_files`); this module then issues a random token that
names one checkpoint and expires after a few minutes. gRPC's `GetCheckpointArchiveUrl` and the web
console both issue them; the HTTP adaptor (`http_api/archives.py`) serves `url_path(token)` by
streaming the checkpoint's tar. Nothing here knows a wire: no requests, responses or status codes.
"""

from __future__ import annotations

import secrets
import threading
import time
from datetime import datetime, timedelta, timezone

from stillroom_server.engine.checkpoints import CheckpointFiles, CheckpointPath

TOKEN_SECONDS = 300.0
PREFIX = "/archives/"  # where the HTTP port serves a token's download


class Archives:
    """Download tokens for checkpoints. `base_url` and `port` are set once the HTTP server listens."""

    def __init__(self, files: CheckpointFiles, token_seconds: float = TOKEN_SECONDS) -> None:
        self.files = files
        self.token_seconds = token_seconds
        self.base_url = ""
        self.port = 0
        self._tokens: dict[str, tuple[CheckpointPath, float]] = {}
        self._lock = threading.Lock()

    def issue(self, path: CheckpointPath) -> tuple[str, datetime]:
        """A new token for `path`; it may be used until it expires (so a retry can resume)."""
        token = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            self._tokens = {t: v for t, v in self._tokens.items() if v[1] > now}
            self._tokens[token] = (path, now + self.token_seconds)
        return token, datetime.now(timezone.utc) + timedelta(seconds=self.token_seconds)

    def lookup(self, token: str) -> CheckpointPath | None:
        """The checkpoint `token` names, or None if it is unknown or has expired."""
        if "/" in token:
            return None
        with self._lock:
            entry = self._tokens.get(token)
        if entry is None or entry[1] <= time.monotonic():
            return None
        return entry[0]

    @staticmethod
    def url_path(token: str) -> str:
        """The path, on the HTTP port, that downloads `token`'s checkpoint."""
        return PREFIX + token
