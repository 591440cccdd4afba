"""Start a Stillroom server as a child process for a recipe or demo, and stop it afterwards.

It runs the `stillroom serve` command (the server extra must be installed) on a free port and
waits for it to say it is ready; it never imports the server's code. It reads the local API key
the server made in its data dir (`local_api_key`) and sets STILLROOM_API_KEY to it for this process:
a key exported for another server (README's "Using it") is not one this server knows.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class LocalServer:
    def __init__(self, data_dir: Path, device: str = "cpu", log_file: Path | None = None,
                 threads: int | None = None, batch_invariant: bool = False) -> None:
        """`threads` and `batch_invariant` are the server's --threads and --batch-invariant (unset: its
        defaults, or STILLROOM_THREADS / STILLROOM_BATCH_INVARIANT)."""
        self.data_dir = Path(data_dir)
        self.device = device
        self.threads, self.batch_invariant = threads, batch_invariant
        self.log_file = log_file or self.data_dir / "server.log"
        self.address: str | None = None
        self.local_api_key: str | None = None
        self._process: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ready = Path(tempfile.mkdtemp()) / "ready"
        self._log = open(self.log_file, "a")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "stillroom.cli", "serve", "--port", "0", "--data-dir",
             str(self.data_dir), "--device", self.device, "--ready-file", str(ready),
             *(["--threads", str(self.threads)] if self.threads else []),
             *(["--batch-invariant"] if self.batch_invariant else [])],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ})
        deadline = time.monotonic() + timeout
        try:
            while not ready.exists():
                if self._process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start; see {self.log_file}")
                time.sleep(0.1)
        except BaseException:   # not started, or interrupted while waiting (Ctrl-C, SIGTERM): no orphan
            self.stop()
            raise
        self.address = ready.read_text().splitlines()[0]
        key_file = self.data_dir / "local_api_key"  # made by the server at its first start
        self.local_api_key = key_file.read_text().strip() if key_file.exists() else None
        if self.local_api_key:  # for SDK clients in this process, over a key exported for another server
            os.environ["STILLROOM_API_KEY"] = self.local_api_key
        return self.address

    @property
    def pid(self) -> int:
        """The server process's id (while it runs)."""
        assert self._process is not None, "the server is not running"
        return self._process.pid

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
        if self._process is not None:
            self._log.close()
        self._process = None

    def __enter__(self) -> LocalServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
