"""The server's side of a worker group: start W worker processes, talk to rank 0, watch them all.

`WorkerGroup.call(method, *args)` sends one command to rank 0 and waits for its answer while
checking that every worker process is alive; if one has died, the rest are stopped (a group
missing a rank cannot run a collective) and `WorkersDied` names the rank and how it ended. Knows
processes and sockets, not what the commands mean.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection, Listener
from typing import Any

from stillroom_server.engine.errors import FailedPrecondition

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
    def __init__(self, workers: int, settings: dict[str, Any]) -> None:
        self.workers = workers
        authkey = secrets.token_bytes(32)
        self._listener = Listener(("127.0.0.1", 0), authkey=authkey)
        address = "%s:%d" % self._listener.address  # noqa: UP031 - a (host, port) tuple
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
               "WORLD_SIZE": str(workers), "STILLROOM_WORKER_ADDRESS": address,
               "STILLROOM_WORKER_AUTHKEY": authkey.hex(), "STILLROOM_WORKER_SETTINGS": json.dumps(settings)}
        self.processes = [
            subprocess.Popen([sys.executable, "-m", "stillroom_server.engine.sharded.worker"],
                             env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)})
            for rank in range(workers)]
        self._lock = threading.Lock()
        self.death: str | None = None
        self._connection = self._accept()
        logger.info("%d workers joined (pids %s)", workers, [p.pid for p in self.processes])

    def _accept(self) -> Connection:
        """Rank 0's connection, failing (not waiting forever) if a worker dies while starting."""
        accepted: list[Connection] = []
        thread = threading.Thread(target=lambda: accepted.append(self._listener.accept()), daemon=True)
        thread.start()
        deadline = time.monotonic() + START_SECONDS
        while not accepted:
            thread.join(0.2)
            if (dead := self._dead()) is not None or time.monotonic() > deadline:
                self.stop()
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
                self._connection.send_bytes(pickle.dumps((method, args)))  # tensors copied, not shared
                while not self._connection.poll(0.2):
                    if (dead := self._dead()) is not None:
                        raise WorkersDied(dead)
                status, value = pickle.loads(self._connection.recv_bytes())
            except (EOFError, OSError, WorkersDied) as error:
                self.death = str(error) if isinstance(error, WorkersDied) else \
                    (self._dead() or f"rank 0's connection broke ({error})")
                logger.error("sharded workers lost: %s; stopping the rest", self.death)
                self.stop(timeout=0.0)
                raise WorkersDied(f"workers: {self.death}") from None
        if status == "error":
            raise value
        return value

    @property
    def alive(self) -> bool:
        return self.death is None

    def stop(self, timeout: float = 10.0) -> None:
        """Ask rank 0 to stop the group; kill what has not ended by `timeout`."""
        try:
            if self.death is None:
                self._connection.send_bytes(pickle.dumps(("stop", ())))
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
