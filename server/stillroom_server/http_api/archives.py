"""The HTTP route that redeems a checkpoint download token: it streams the checkpoint as a tar.

A download URL is `/archives/<token>` on the HTTP port. The tokens are the core's
(`core/archives.py`), issued after an owner check by gRPC's `GetCheckpointArchiveUrl` or the web
console; this module knows only requests and streaming. What a checkpoint holds is checkpoints.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator
from typing import BinaryIO, cast

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from stillroom_server.core.archives import PREFIX, Archives
from stillroom_server.engine.checkpoints import CheckpointFiles, CheckpointPath
from stillroom_server.engine.errors import NotFound

logger = logging.getLogger("stillroom.archives")
_CHUNK = 1 << 20


def route(archives: Archives) -> Route:
    """`GET /archives/{token}`: the tar of the checkpoint that `token` names, or 404."""

    async def download(request: Request) -> Response:
        token = request.path_params["token"]
        path = archives.lookup(token)
        if path is None:
            return PlainTextResponse("unknown or expired download token", status_code=404)
        try:
            files = archives.files.files_of(path)
        except NotFound:
            return PlainTextResponse("the checkpoint no longer exists", status_code=404)
        headers = {"Content-Disposition": f'attachment; filename="{path.name}.tar"',
                   "X-Stillroom-Path": path.uri,
                   "X-Stillroom-Files-Size": str(sum(f.stat().st_size for f in files))}
        return StreamingResponse(_stream(archives.files, path), media_type="application/x-tar",
                                 headers=headers)

    return Route(PREFIX + "{token}", download, methods=["GET"])


async def _stream(checkpoint_files: CheckpointFiles, path: CheckpointPath) -> AsyncIterator[bytes]:
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
            checkpoint_files.write_archive(path, cast(BinaryIO, _Writer()))
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
