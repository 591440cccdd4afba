"""Checkpoint downloads: one-time tokens and the route that streams a checkpoint as a tar.

A download URL is `/archives/<token>` on the HTTP port: the token is random, issued by the core's
owner-checked `GetCheckpointArchiveUrl` (gRPC), names one checkpoint and expires after a few
minutes. This module knows tokens and streaming; what a checkpoint holds is checkpoints.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import secrets
import threading
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import BinaryIO, cast

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse

from stillroom_server.engine.checkpoints import CheckpointFiles, CheckpointPath
from stillroom_server.engine.errors import NotFound

logger = logging.getLogger("stillroom.archives")
TOKEN_SECONDS = 300.0
PREFIX = "/archives/"
_CHUNK = 1 << 20


class Archives:
    """Download tokens, and their route. `base_url` and `port` are set once the HTTP server listens."""

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
        with self._lock:
            entry = self._tokens.get(token)
        if entry is None or entry[1] <= time.monotonic():
            return None
        return entry[0]

    async def download(self, request: Request) -> Response:
        token = request.path_params["token"]
        path = self.lookup(token) if "/" not in token else None
        if path is None:
            return PlainTextResponse("unknown or expired download token", status_code=404)
        try:
            files = self.files.files_of(path)
        except NotFound:
            return PlainTextResponse("the checkpoint no longer exists", status_code=404)
        headers = {"Content-Disposition": f'attachment; filename="{path.name}.tar"',
                   "X-Stillroom-Path": path.uri,
                   "X-Stillroom-Files-Size": str(sum(f.stat().st_size for f in files))}
        return StreamingResponse(self._stream(path), media_type="application/x-tar", headers=headers)

    async def _stream(self, path: CheckpointPath) -> AsyncIterator[bytes]:
        """The tar, written by a thread into a small bounded queue and sent as it is written."""
        chunks: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=8)
        stop = threading.Event()

        def put(item: bytes | BaseException | None) -> None:
            """Queue `item` unless the client has gone (then the writer stops)."""
            while not stop.is_set():
                try:
                    chunks.put(item, timeout=0.5)
                    return
                except queue.Full:
                    continue
            raise BrokenPipeError("download stopped by the client")

        class _Writer:
            def write(self, data: bytes) -> int:
                for start in range(0, len(data), _CHUNK):
                    put(bytes(data[start:start + _CHUNK]))
                return len(data)

        def produce() -> None:
            try:
                self.files.write_archive(path, cast(BinaryIO, _Writer()))
                put(None)
            except BrokenPipeError:
                logger.info("download of %s stopped by the client", path.uri)
            except BaseException as error:  # noqa: BLE001 - handed to the response
                with contextlib.suppress(BrokenPipeError):
                    put(error)

        threading.Thread(target=produce, name="stillroom-archive", daemon=True).start()
        loop = asyncio.get_running_loop()
        try:
            while (item := await loop.run_in_executor(None, chunks.get)) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            logger.debug("download of %s ended", path.uri)
