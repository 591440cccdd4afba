"""Checkpoint downloads: a small stdlib HTTP server beside gRPC that streams a checkpoint as a tar.

A download URL is `/archives/<token>`: the token is random, issued by the gRPC call
GetCheckpointArchiveUrl (which checks the owner), names one checkpoint and expires after a few
minutes. This module knows tokens and sockets; what a checkpoint holds is checkpoints.py's.
"""

from __future__ import annotations

import logging
import secrets
import ssl
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from stillroom_server.engine.checkpoints import CheckpointFiles, CheckpointPath
from stillroom_server.engine.errors import NotFound

logger = logging.getLogger("stillroom.archives")
TOKEN_SECONDS = 300.0
PREFIX = "/archives/"


class ArchiveServer:
    """Serves tokens issued by `issue` on its own thread until `stop`."""

    def __init__(self, files: CheckpointFiles, host: str, port: int,
                 token_seconds: float = TOKEN_SECONDS, tls: tuple[Path, Path] | None = None) -> None:
        self.files = files
        self.token_seconds = token_seconds
        self._tokens: dict[str, tuple[CheckpointPath, float]] = {}
        self._lock = threading.Lock()
        self._http = ThreadingHTTPServer((host, port), _handler_for(self))
        self._http.daemon_threads = True
        self.port = self._http.server_address[1]
        scheme = "http"
        if tls is not None:  # the same certificate as the gRPC port
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(certfile=tls[0], keyfile=tls[1])
            self._http.socket = context.wrap_socket(self._http.socket, server_side=True)
            scheme = "https"
        self.base_url = f"{scheme}://{host}:{self.port}"
        self._thread = threading.Thread(target=self._http.serve_forever, name="stillroom-archives",
                                        daemon=True)

    def start(self) -> "ArchiveServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()

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


def _handler_for(server: ArchiveServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            token = self.path[len(PREFIX):] if self.path.startswith(PREFIX) else ""
            path = server.lookup(token) if token and "/" not in token else None
            if path is None:
                self.send_error(404, "unknown or expired download token")
                return
            try:
                files = server.files.files_of(path)
            except NotFound:
                self.send_error(404, "the checkpoint no longer exists")
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/x-tar")
            self.send_header("Content-Disposition", f'attachment; filename="{path.name}.tar"')
            self.send_header("X-Stillroom-Path", path.uri)
            self.send_header("X-Stillroom-Files-Size", str(sum(f.stat().st_size for f in files)))
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                server.files.write_archive(path, self.wfile)
            except (BrokenPipeError, ConnectionResetError):
                logger.info("download of %s stopped by the client", path.uri)

        def finish(self) -> None:
            super().finish()
            if isinstance(self.connection, ssl.SSLSocket):  # end TLS cleanly: the body ends at close
                try:
                    self.connection.unwrap()
                except (OSError, ValueError):
                    pass

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - the stdlib's name
            logger.debug("%s " + format, self.address_string(), *args)

    return Handler
