"""The server's side of a worker group: start W worker processes, talk to rank 0, watch them all.

`WorkerGroup.call(method, *args)` sends one command to rank 0 and waits for its answer while
checking that every worker process is alive; if one has died, the rest are stopped (a group
missing a rank cannot run a collective) and `WorkersDied` names the rank and how it ended. Knows
processes and sockets, not what the commands mean.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Listener
from typing import Any

from stillroom_server.engine.errors import FailedPrecondition
from stillroom_server.engine.sharded import wire

logger = logging.getLogger("stillroom.workers")
START_SECONDS = 600.0   # loading torch and joining the group, on a busy machine


class WorkersDied(FailedPrecondition):
    """A worker process ended; the group and everything it held in memory are gone."""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _how(code: int | None) -> str:
    if code is None:
        return "is running"
    if code < 0:
        return f"was killed by signal {signal.Signals(-code).name}"
    return f"exited with status {code}"


class WorkerGroup:
    """W local worker processes (`listen` None), or a group launched elsewhere (torchrun on other
    machines) whose rank 0 connects to `listen` ("HOST:PORT") with the STILLROOM_WORKER_AUTHKEY
    secret; such a group is watched through rank 0's connection only."""

    def __init__(self, workers: int, settings: dict[str, Any], listen: str | None = None) -> None:
        self.workers = workers
        if listen is None:
            authkey, host, port = secrets.token_bytes(32), "127.0.0.1", 0
        else:
            authkey = bytes.fromhex(os.environ["STILLROOM_WORKER_AUTHKEY"])
            host, port = listen.rsplit(":", 1)[0], int(listen.rsplit(":", 1)[1])
        self._listener = Listener((host, port), authkey=authkey)
        self.processes = [] if listen is not None else self._spawn(authkey)
        self._lock = threading.Lock()
        self.death: str | None = None
        self._connection = self._accept()
        world = wire.decode(self._connection.recv_bytes())
        if world != workers:
            self.stop(timeout=0.0)
            raise WorkersDied(f"workers: a group of {world} connected, {workers} were expected (--workers)")
        self._connection.send_bytes(wire.encode(settings))
        logger.info("%d workers joined%s", workers,
                    f" (pids {[p.pid for p in self.processes]})" if self.processes else f" on {listen}")

    def _spawn(self, authkey: bytes) -> list[subprocess.Popen]:
        address = "%s:%d" % self._listener.address  # noqa: UP031 - a (host, port) tuple
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
               "WORLD_SIZE": str(self.workers), "STILLROOM_WORKER_ADDRESS": address,
               "STILLROOM_WORKER_AUTHKEY": authkey.hex()}
        return [subprocess.Popen([sys.executable, "-m", "stillroom_server.engine.sharded.worker"],
                                 env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)})
                for rank in range(self.workers)]

    def _accept(self) -> Any:
        """Rank 0's connection, failing (not waiting forever) if a worker dies while starting."""
        accepted: list[Any] = []
        thread = threading.Thread(target=lambda: accepted.append(self._listener.accept()), daemon=True)
        thread.start()
        deadline = time.monotonic() + START_SECONDS
        while not accepted:
            thread.join(0.2)
            if (dead := self._dead()) is not None or time.monotonic() > deadline:
                self.stop(timeout=0.0)
                raise WorkersDied(f"workers: {dead or 'rank 0 did not connect'} while starting")
        return accepted[0]

    def _dead(self) -> str | None:
        for rank, process in enumerate(self.processes):
            if process.poll() is not None:
                return f"worker rank {rank} (pid {process.pid}) {_how(process.returncode)}"
        return None

    def call(self, method: str, *args: Any) -> Any:
        """Run `method(*args)` on every rank; rank 0's result, or its error raised here."""
        with self._lock:
            if self.death is not None:
                raise WorkersDied(f"workers: {self.death}")
            try:
                self._connection.send_bytes(wire.encode((method, args)))
                while not self._connection.poll(0.2):
                    if (dead := self._dead()) is not None:
                        raise WorkersDied(dead)
                status, value = wire.decode(self._connection.recv_bytes())
            except (EOFError, OSError, WorkersDied) as error:
                self.death = str(error) if isinstance(error, WorkersDied) else self._why_broken(error)
                logger.error("sharded workers lost: %s; stopping the rest", self.death)
                self.stop(timeout=0.0)
                raise WorkersDied(f"workers: {self.death}") from None
        if status == "error":
            raise value
        return value

    def _why_broken(self, error: BaseException) -> str:
        """Rank 0's connection broke: the worker that died, once its exit shows (or the error)."""
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and self.processes:
            if (dead := self._dead()) is not None:
                return dead
            time.sleep(0.05)
        return f"rank 0's connection broke ({type(error).__name__}: {error})"

    @property
    def alive(self) -> bool:
        return self.death is None

    def stop(self, timeout: float = 10.0) -> None:
        """Ask rank 0 to stop the group; kill what has not ended by `timeout`."""
        try:
            if self.death is None and timeout > 0:
                self._connection.send_bytes(wire.encode(("stop", ())))
        except (AttributeError, OSError):
            pass
        deadline = time.monotonic() + timeout
        for process in self.processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._listener.close()
