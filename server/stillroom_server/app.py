"""Building, running and stopping a Stillroom server: store, engine, scheduler, the core service
and its two transports (gRPC, and the Tinker-compatible HTTP API with checkpoint downloads).

`StillroomServer` runs on its own event loop thread (used by tests, the demo and benchmarks);
`serve` runs one in the foreground until SIGTERM or SIGINT and shuts it down cleanly. Both
transports run on that one loop, so the core's state is only ever touched from it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading

import grpc
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from stillroom._proto import stillroom_pb2 as pb
from stillroom._proto import stillroom_pb2_grpc as pb_grpc
from stillroom_server.config import ServerConfig
from stillroom_server.core.archives import Archives
from stillroom_server.core.auth import LOCAL_KEY_FILE, LOCAL_OWNER, Authenticator
from stillroom_server.core.futures import FutureHub
from stillroom_server.core.service import Service
from stillroom_server.core.validate import Limits
from stillroom_server.engine.engine import MAX_LOADED_ADAPTERS
from stillroom_server.engine.inline import InlineEngine
from stillroom_server.engine.process.engines import EngineProcesses
from stillroom_server.engine.runtime import resources
from stillroom_server.grpc_api.decoding import UndecodableRequests
from stillroom_server.grpc_api.servicer import StillroomServicer
from stillroom_server.http_api.app import TinkerApi
from stillroom_server.http_api.routes import build_app
from stillroom_server.store import Store, keys

logger = logging.getLogger("stillroom.server")
MAX_MESSAGE_BYTES = 1 << 30
HEARTBEAT_SECONDS = 10  # how often the Tinker SDK (0.38) sends a session heartbeat
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Stillroom"].full_name


class StillroomServer:
    """A running server. `start()` returns once it listens; `port` is the bound port."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.port: int | None = None
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def start(self) -> StillroomServer:
        self._thread = threading.Thread(target=self._loop.run_forever, name="stillroom-server",
                                        daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result()
        return self

    async def _start(self) -> None:
        config = self.config
        # Both ports first: one in use fails at once, named, before anything is loaded or written.
        http_socket = self._bind_http()
        try:
            self.server = self._bind_grpc()
        except PortError:
            http_socket.close()
            raise
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(config.resolved_database_url)
        self.store.upgrade()
        failed = self.store.fail_pending_futures(
            "server restarted before this request finished; its work was lost: submit it again")
        if failed:
            logger.warning("marked %d unfinished requests from an earlier run as failed", failed)
        threads, how = resources.choose_threads(config.threads)
        self.engines = start_engines(config)
        self.engine = getattr(self.engines, "engine", self.engines)  # inline: the engine itself
        total, available = resources.memory_budget()
        runs = (f"training runs keep up to {self.engines.run_memory_bytes / 2**30:.1f} GiB in memory (idle "
                "runs beyond it wait on disk)" if self.engines.run_memory_bytes > 0 else
                f"training runs live in the {config.workers} worker processes, sharded (no bytes budget)")
        logger.info("memory: %.1f GiB total, %.1f GiB available at start; %s, at most %d LoRA snapshots "
                    "stay loaded, at most %d sample/logprob requests queue; torch threads: %d (%s); "
                    "batch-invariant sampling and scoring: %s",
                    total / 2**30, available / 2**30, runs, MAX_LOADED_ADAPTERS,
                    self.engines.max_outstanding, threads, how,
                    "on" if config.batch_invariant else "off (--batch-invariant)")
        self.hub = FutureHub(self.store, asyncio.get_running_loop())
        self.local_api_key = self._ensure_a_key() if config.auth == "keys" else None
        self.service = Service(self.engines, self.store, self.hub,
                               Limits(config.max_live_runs_per_owner, config.max_tokens_per_request),
                               session_timeout=config.session_timeout)
        auth = Authenticator(self.store, require_keys=config.auth == "keys", data_dir=config.data_dir)
        self.archives = Archives(self.engines.files)
        await self._start_http(TinkerApi(self.service, auth, self.archives), http_socket)
        self.servicer = StillroomServicer(self.service, auth, self.archives)
        pb_grpc.add_StillroomServicer_to_server(self.servicer, self.server)
        self.health = health.aio.HealthServicer()  # pyright: ignore[reportAttributeAccessIssue]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        await self.server.start()
        # the engines start meanwhile: calls that need one are answered UNAVAILABLE until it is up
        await asyncio.get_running_loop().run_in_executor(None, self.engines.wait_ready)
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_checkpoints())
        self._lapser = asyncio.get_running_loop().create_task(self._sweep_sessions())
        self._engine_watch = asyncio.get_running_loop().create_task(self._watch_engines())
        logger.info("Stillroom serving on %s (gRPC: for Stillroom's SDK and `stillroom` commands, "
                    "STILLROOM_BASE_URL) and %s (HTTP: for the official tinker SDK, TINKER_BASE_URL, "
                    "and checkpoint downloads) (device %s, data %s, database %s)", self.address,
                    self.http_url, config.device, config.data_dir,
                    config.resolved_database_url.split("@")[-1])

    def _bind_grpc(self) -> grpc.aio.Server:
        """A gRPC server bound to the gRPC port (0: any free one); services are added before start."""
        config = self.config
        server = grpc.aio.server(interceptors=[UndecodableRequests()], options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ])
        address = f"{config.host}:{config.port}"
        try:
            if config.tls_cert is not None and config.tls_key is not None:
                credentials = grpc.ssl_server_credentials(
                    [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())])
                self.port = server.add_secure_port(address, credentials)
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError:   # grpc says only "Failed to bind"; a port in use is the usual cause
            raise PortError(port_message("gRPC", config.host, config.port, "in use, or not an address "
                                         "of this machine")) from None
        return server

    def _bind_http(self) -> socket.socket:
        """A socket bound to the HTTP port (0: any free one), for uvicorn to listen on."""
        config = self.config
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit this: without it a response written as headers then body
        # waits for the client's delayed ACK, 40 ms a call (measured: 44 ms -> 1 ms per call).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind((config.host, config.resolved_http_port))
        except OSError as error:
            sock.close()
            raise PortError(port_message("HTTP", config.host, config.resolved_http_port,
                                         (error.strerror or str(error)).lower())) from None
        return sock

    async def _start_http(self, api: TinkerApi, sock: socket.socket) -> None:
        """Serve the ASGI app with uvicorn on this loop, on the bound HTTP socket."""
        config = self.config
        self.http_port = sock.getsockname()[1]
        tls = config.tls_cert is not None
        self.http = uvicorn.Server(uvicorn.Config(
            build_app(api), lifespan="off", log_level="warning", access_log=False,
            timeout_keep_alive=75, ssl_certfile=str(config.tls_cert) if tls else None,
            ssl_keyfile=str(config.tls_key) if tls else None))
        self._http_task = asyncio.get_running_loop().create_task(self.http.serve(sockets=[sock]))
        while not self.http.started:
            if self._http_task.done():
                self._http_task.result()  # raises what stopped it
            await asyncio.sleep(0.01)
        scheme = "https" if tls else "http"
        self.http_url = f"{scheme}://{config.host}:{self.http_port}"
        self.archives.base_url, self.archives.port = self.http_url, self.http_port

    def _ensure_a_key(self) -> str | None:
        """On a store with no live key, make one for the local owner, print it once and keep it in
        <data_dir>/local_api_key (readable by this user only). Returns that file's key, if any."""
        key_file = self.config.data_dir / LOCAL_KEY_FILE
        if not any(k.revoked_at is None for k in keys.list_keys(self.store)):
            info, secret = keys.create_key(self.store, LOCAL_OWNER, "local (made at first start)")
            descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(secret + "\n")
            logger.warning("no API keys existed: made %s for owner '%s': %s (saved in %s; make more "
                           "with `stillroom keys create --name NAME`)", info.id, LOCAL_OWNER, secret,
                           key_file)
        return key_file.read_text().strip() if key_file.exists() else None

    async def _sweep_checkpoints(self) -> None:
        """Delete checkpoints whose TTL has passed and expired request results, every
        `checkpoint_sweep_seconds`, so the store stays bounded."""
        while True:
            await asyncio.sleep(self.config.checkpoint_sweep_seconds)
            try:
                swept = await self.service.sweep_expired_checkpoints()
                if swept:
                    logger.info("deleted %d expired checkpoints", swept)
                forgotten = self.store.delete_expired_futures()
                if forgotten:
                    logger.info("deleted %d expired request results", forgotten)
            except Exception:  # noqa: BLE001 - the sweep must outlive one failure
                logger.exception("checkpoint sweep failed")

    async def _sweep_sessions(self) -> None:
        """End client sessions with no heartbeat for `session_timeout` seconds, checking a tenth
        as often (at most every 10 s), so a session lapses within 10% of the timeout after it."""
        timeout = self.config.session_timeout
        if timeout <= 0:
            logger.info("client sessions never lapse (--session-timeout 0)")
            return
        if timeout < 3 * HEARTBEAT_SECONDS:
            logger.warning("--session-timeout %g s: the Tinker SDK sends a heartbeat every %d s, so a "
                           "timeout under %d s can end sessions whose client is alive", timeout,
                           HEARTBEAT_SECONDS, 3 * HEARTBEAT_SECONDS)
        while True:
            await asyncio.sleep(min(10.0, max(0.1, timeout / 10)))
            try:
                await self.service.sweep_lapsed_sessions()
            except Exception:  # noqa: BLE001 - the sweep must outlive one failure
                logger.exception("session sweep failed")

    async def _watch_engines(self) -> None:
        """gRPC health: the Stillroom service is NOT_SERVING while an engine is down or restarting
        (the server itself, service "", keeps SERVING: it answers, and other engines serve)."""
        serving = True
        while True:
            await asyncio.sleep(0.5)
            up = all(e["state"] == "up" for e in self.service.engine_health())
            if up != serving:
                serving = up
                await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING if up
                                      else health_pb2.HealthCheckResponse.NOT_SERVING)

    def stop(self, grace: float = 5.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        asyncio.run_coroutine_threadsafe(self._stop(grace), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)

    async def _stop(self, grace: float) -> None:
        logger.info("shutting down: refusing new calls, finishing queued work")
        await self.health.enter_graceful_shutdown()
        self._sweeper.cancel()
        self._lapser.cancel()
        self._engine_watch.cancel()
        self.http.should_exit = True
        await self.server.stop(grace)
        await self._http_task
        await asyncio.get_running_loop().run_in_executor(None, self.engines.stop)
        self.store.close()
        logger.info("stopped")

    def __enter__(self) -> StillroomServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class PortError(RuntimeError):
    """A port the server was told to use could not be bound."""


def port_message(wire: str, host: str, port: int, reason: str) -> str:
    what = ("the gRPC port, for Stillroom's SDK and `stillroom` commands: --port or STILLROOM_PORT"
            if wire == "gRPC" else "the HTTP port, for the tinker SDK and downloads: --http-port or "
            "STILLROOM_HTTP_PORT, default --port + 1")
    return (f"cannot listen on {host}:{port} ({what}): {reason}. Is another Stillroom server running? "
            "Stop it, or give free ports with --port and --http-port (0: any free one)")


def serve(config: ServerConfig, ready_file: str | None = None) -> None:
    """Run a server in the foreground until SIGTERM or SIGINT."""
    try:
        server = StillroomServer(config).start()
    except PortError as error:
        raise SystemExit(f"stillroom serve: {error}") from None
    if ready_file:
        with open(ready_file + ".tmp", "w") as handle:  # line 1: gRPC host:port, line 2: HTTP URL
            handle.write(f"{server.address}\n{server.http_url}\n")
        os.replace(ready_file + ".tmp", ready_file)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    server.stop()


def start_engines(config: ServerConfig) -> InlineEngine | EngineProcesses:
    """The engine(s) the core drives: in this process (`engines` 0 and none remote), else engine
    processes (`engines` of them started here, and the remote ones that connect to
    `engine_listen`), each holding the base models placed on it."""
    from stillroom_server.engine.backend import make_engine

    if config.engines == 0 and not config.remote_engines:
        options = {"run_memory_bytes": config.run_memory_bytes} if config.workers <= 1 else {}
        engine = make_engine(config.data_dir, config.workers, config.device, config.max_num_samples,
                             config.local_models, config.dtype, config.threads, config.log_level,
                             config.worker_listen, config.batch_invariant, **options)
        return InlineEngine(engine)
    threads, _ = resources.choose_threads(config.threads)
    local = max(config.engines, 0)
    _, available = resources.memory_budget()
    settings = {"data_dir": str(config.data_dir), "device": config.device, "dtype": config.dtype,
                "local_models": {k: str(v) for k, v in config.local_models.items()},
                "threads": max(1, threads // max(local, 1)), "log_level": config.log_level,
                "workers": config.workers, "worker_listen": config.worker_listen,
                "batch_invariant": config.batch_invariant, "max_num_samples": config.max_num_samples,
                # the machine's training-run memory, shared by the engines started on it
                "run_memory_bytes": config.run_memory_bytes or
                int(resources.MEMORY_FRACTION * available / max(local, 1)) or None}
    return EngineProcesses(config.data_dir, settings, local, config.remote_engines, config.place,
                           config.engine_listen, engine_token(config) if config.remote_engines else None)


def engine_token(config: ServerConfig) -> str:
    """The engines' shared secret, kept in <data_dir>/engine_token (made once, mode 0600)."""
    path = config.engine_token_file
    if not path.exists():
        from stillroom_server.engine.process.link import new_token

        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(new_token() + "\n")
    return path.read_text().strip()
