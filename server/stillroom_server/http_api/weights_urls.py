"""Signed download URLs for external weights (Tinker's `external_weights_urls`), and their route.

A URL names one file of one export and carries its expiry and an HMAC-SHA256 signature over the
export's owner, path, file and expiry, under a key made when the server starts (a restart
invalidates every URL; clients sign again, as Tinker's CLI does before a URL expires). Like a
signed cloud-storage URL it works without an API key, so downloaders fetch it with plain HTTP;
a request that does carry a key must be the owner's. The export must still exist and still be
the same owner's when the file is fetched. Anything malformed, tampered with or expired is refused
before a file is touched.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import time
from datetime import datetime, timezone
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response

from stillroom_server.core.auth import Authenticator
from stillroom_server.engine import checkpoints
from stillroom_server.engine.checkpoints import exports
from stillroom_server.engine.errors import InvalidInput
from stillroom_server.store import Store

logger = logging.getLogger("stillroom.weights_urls")
URL_SECONDS = 900          # Tinker's CLI signs again 5 minutes before a URL expires
PREFIX = "/external_weights"
FILE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
SIGNATURE_PATTERN = re.compile(r"^[0-9a-f]{64}$")


class SignedUrls:
    def __init__(self, store: Store, files: checkpoints.CheckpointFiles, auth: Authenticator,
                 seconds: float = URL_SECONDS) -> None:
        self.store = store
        self.files = files
        self.auth = auth
        self.seconds = seconds
        self._key = secrets.token_bytes(32)

    def _signature(self, owner: str, uri: str, file: str, expires: int) -> str:
        message = "\n".join((owner, uri, file, str(expires))).encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def sign(self, base_url: str, owner: str, path: checkpoints.CheckpointPath,
             names: list[str]) -> tuple[dict[str, str], datetime]:
        """One URL per file of the owner's export `path`, all expiring together."""
        expires = int(time.time() + self.seconds)
        base = f"{base_url.rstrip('/')}{PREFIX}/{quote(path.run_id, safe='')}/{quote(path.name, safe='')}"
        urls = {name: f"{base}/{quote(name, safe='')}?expires={expires}"
                      f"&signature={self._signature(owner, path.uri, name, expires)}" for name in names}
        return urls, datetime.fromtimestamp(expires, timezone.utc)

    async def download(self, request: Request) -> Response:
        params, query = request.path_params, request.query_params
        run_id, name, file = params["run_id"], params["name"], params["file"]
        expires, signature = query.get("expires", ""), query.get("signature", "")
        if not (checkpoints.RUN_ID_PATTERN.match(run_id) and checkpoints.NAME_PATTERN.match(name)
                and ".." not in name and FILE_PATTERN.match(file) and ".." not in file
                and expires.isdigit() and len(expires) <= 12 and SIGNATURE_PATTERN.match(signature)):
            return _refuse(403, "not a valid signed URL")
        if int(expires) <= time.time():
            return _refuse(403, "this signed URL has expired; ask for new ones (external_weights_urls)")
        path = checkpoints.CheckpointPath(run_id, checkpoints.EXTERNAL, name)
        row = self.store.get_checkpoint(path.uri)
        if row is None or not hmac.compare_digest(signature, self._signature(row.owner, path.uri, file,
                                                                              int(expires))):
            return _refuse(403, "not a valid signed URL (or its export was deleted)")
        if _has_key(request):
            try:
                caller = self.auth.owner(_key_of(request))
            except Exception:  # noqa: BLE001 - a bad key is refused like another owner's
                caller = None
            if caller != row.owner:
                return _refuse(403, "this URL was signed for another owner")
        try:
            directory = self.files.directory(path)
            match = [f for f in exports.files(directory) if f.name == file] if self.files.exists(path) else []
        except (OSError, InvalidInput):
            match = []
        if not match:
            return _refuse(404, "no such file in this export")
        return FileResponse(match[0], media_type="application/octet-stream", filename=file)


def _has_key(request: Request) -> bool:
    return "x-api-key" in request.headers or request.headers.get("authorization", "").startswith("Bearer ")


def _key_of(request: Request) -> str | None:
    secret = request.headers.get("x-api-key")
    bearer = request.headers.get("authorization", "")
    if not secret and bearer.startswith("Bearer "):
        secret = bearer[len("Bearer "):]
    return secret


def _refuse(status: int, message: str) -> Response:
    return PlainTextResponse(message, status_code=status)
