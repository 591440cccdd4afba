"""`EngineProcesses`: the core's engine client when the engines run in their own processes.

In the server process it keeps what the core asks of an engine without touching weights — model
facts (config and tokenizer; modules on the meta device), checkpoint files, run and sampler facts,
validation — and sends every command to the engine holding the model it names. Engines are named
slots: "0", "1", ... started here (one process each), and any named with `remote` that connect
from another machine (`stillroom engine --connect`). `place` maps base models to slots; a model
placed nowhere lives on the first slot.

When an engine process dies, its requests in flight fail with UNAVAILABLE naming the cause, a
slot started here is started again (backing off when crashes repeat), and each of its runs comes
back in the new process from the state it had spilled to disk (exactly as it was) or else from its
last saved training state; a run whose progress since that save was lost says so on its next
call, once, naming the state it resumed from. Other engines' work is untouched. Knows no wire,
owners or request numbers.
"""

from __future__ import annotations

import collections
import dataclasses
import hmac
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stillroom_server.engine import checkpoints, protocol
from stillroom_server.engine.engine import Sampler
from stillroom_server.engine.errors import EngineUnavailable, FailedPrecondition
from stillroom_server.engine.models import FactsHost
from stillroom_server.engine.process import link as links
from stillroom_server.engine.process.child import TOKEN_VARIABLE
from stillroom_server.engine.protocol import FinishedJob, SamplerFacts
from stillroom_server.engine.runtime.scheduler import Job
from stillroom_server.engine.runtime.stats import EngineStats
from stillroom_server.engine.validation import RunView, Validation

logger = logging.getLogger("stillroom.engines")
START_SECONDS = 300.0          # how long a local engine may take to start and say it is ready
HANDSHAKE_SECONDS = 30.0
MAX_BACKOFF_SECONDS = 30.0     # the longest wait before starting a crashed engine again
CRASH_WINDOW_SECONDS = 300.0   # crashes within this long of each other back off
SILENT_SECONDS = 60.0          # an engine says something every second: this long silent, it is hung


@dataclasses.dataclass
class RunHandle(RunView):
    """A run an engine holds, and how to bring it back if that engine dies."""
    slot: str = ""
    changed: bool = False              # its state differs from its last saved training state
    restoring: bool = False            # lost with its engine; its state is being brought back
    notice: str | None = None          # said once, on its next call: what a crash cost it
    lost: str | None = None            # it could not be brought back: why


@dataclasses.dataclass
class _Pending:
    slot: str
    command: Any
    kind: str
    done: protocol.Done
    trace: Any
    enqueued_at: float


@dataclasses.dataclass
class Slot:
    """One engine: its link while it is up, the process behind it if it runs here."""
    name: str
    remote: bool
    state: str = "starting"            # starting | up | down
    link: links.Link | None = None
    process: subprocess.Popen | None = None
    pid: int | None = None
    host: str = ""
    restarts: int = 0
    crashes: collections.deque = dataclasses.field(default_factory=collections.deque)
    cause: str = ""                    # why it is down
    facts: dict = dataclasses.field(default_factory=dict)
    stats: dict = dataclasses.field(default_factory=dict)
    queued: dict = dataclasses.field(default_factory=dict)
    run_memory_bytes: int = 0
    ready: threading.Event = dataclasses.field(default_factory=threading.Event)


class EngineProcesses(Validation):
    def __init__(self, data_dir: Path, settings: dict[str, Any], local: int, remote: list[str] | None = None,
                 place: dict[str, str] | None = None, listen: str | None = None, token: str | None = None,
                 max_outstanding: int = 2048) -> None:
        self.data_dir = data_dir
        self.settings = settings
        self.models = FactsHost(data_dir, _device(settings), _dtype(settings),
                                {k: Path(v) for k, v in settings.get("local_models", {}).items()})
        self.files = checkpoints.CheckpointFiles(data_dir)
        if removed := self.files.remove_partial():
            logger.warning("removed %d half-written checkpoint folders left by a crash", removed)
        self.max_num_samples = settings.get("max_num_samples", 128)
        self.max_outstanding = max_outstanding
        self.observer: Callable[[FinishedJob, float], None] | None = None
        self.token = token or links.new_token()
        self.slots: dict[str, Slot] = {str(i): Slot(str(i), remote=False) for i in range(local)}
        for name in remote or []:
            self.slots[name] = Slot(name, remote=True)
        if not self.slots:
            raise ValueError("engines: at least one engine (started here or connecting)")
        self.place = {self.models.canonical(m): e for m, e in (place or {}).items()}
        for model, engine in self.place.items():
            if engine not in self.slots:
                raise ValueError(f"place: {model} is placed on engine '{engine}', which is not one of "
                                 f"{sorted(self.slots)}")
        self.default_slot = next(iter(self.slots))
        self.runs: dict[str, RunHandle] = {}
        self.samplers: dict[str, Sampler] = {}
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._stopping = False
        family = socket.AF_INET6 if ":" in (listen or "127.0.0.1").rpartition(":")[0] else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        host, _, port = (listen or "127.0.0.1:0").rpartition(":")
        self._listener.bind((host.strip("[]"), int(port)))
        self._listener.listen(16)
        self.address = f"{host}:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, name="stillroom-engine-listener", daemon=True).start()
        for slot in self.slots.values():
            if not slot.remote:
                self._launch(slot)
        # the training-run memory the engines started here state (sharded runs state none)
        each = settings.get("run_memory_bytes") or 0
        self.run_memory_bytes = each * local if settings.get("workers", 1) <= 1 else 0
        for slot in self.slots.values():
            if slot.remote:
                logger.info("engine %s: waiting for `stillroom engine --connect %s --name %s` (token in %s)",
                            slot.name, self.address, slot.name, TOKEN_VARIABLE)

    # ---------------------------------------------------------------- placement

    def slot_of_model(self, base_model: str) -> str:
        return self.place.get(self.models.canonical(base_model), self.default_slot)

    def models_of(self, slot: str) -> list[str]:
        placed = sorted(m for m, e in self.place.items() if e == slot)
        return placed + (["*"] if slot == self.default_slot else [])

    def engines(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"engine": s.name, "state": s.state, "pid": s.pid, "host": s.host,
                     "remote": s.remote, "restarts": s.restarts, "cause": s.cause,
                     "models": self.models_of(s.name),
                     "runs": sum(1 for r in self.runs.values() if r.slot == s.name)}
                    for s in self.slots.values()]

    def _slot_for(self, command: Any) -> str | None:
        """The engine a command goes to (None: to every engine that is up)."""
        match command:
            case protocol.CreateRun(base_model=model) | protocol.LoadModel(base_model=model):
                return self.slot_of_model(model)
            case protocol.CreateRunFromState(uri=uri):
                return self.slot_of_model(self.state_meta(uri)["base_model"])
            case protocol.OpenSampler(base_model=model, model_path=path):
                if path:
                    return self.slot_of_model(self.files.read_meta(checkpoints.parse(path))["base_model"])
                return self.slot_of_model(model or "")
            case protocol.Sample(sampler_key=key) | protocol.ComputeLogprobs(sampler_key=key):
                return self.slot_of_model(self.samplers[key].base.name)
            case protocol.DeleteCheckpoint():
                return None   # a snapshot (a teacher, say) may be loaded on any engine
        run = self.runs.get(getattr(command, "run_id", ""))
        if run is None:
            raise self._not_in_memory(getattr(command, "run_id", ""))
        return run.slot

    # ---------------------------------------------------------------- the core's calls

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    def queued_by_kind(self) -> collections.Counter[str]:
        total: collections.Counter[str] = collections.Counter()
        for slot in self.slots.values():
            if slot.state == "up":
                total.update(slot.queued)
        return total

    def facts(self) -> dict[str, int]:
        total: collections.Counter[str] = collections.Counter()
        for slot in self.slots.values():
            if slot.state == "up":
                total.update(slot.facts)
        return dict(total)

    @property
    def stats(self) -> EngineStats:
        total: collections.Counter[str] = collections.Counter()
        for slot in self.slots.values():   # counters of engines that died are lost with them
            total.update(slot.stats)
        return EngineStats(**{f.name: total.get(f.name, 0) for f in dataclasses.fields(EngineStats)})

    def submit(self, command: Any, kind: str, lane: str, done: protocol.Done, trace: Any = None) -> None:
        if isinstance(command, protocol.CloseRun) and self._closed_while_down(command.run_id):
            done(None, None)
            return
        try:
            target = self._slot_for(command)
        except Exception as error:  # noqa: BLE001 - the request's outcome
            done(None, error)
            return
        if target is None:
            self._broadcast(command, kind, lane, done)
            return
        self._send(target, command, kind, lane, done, trace)

    def _send(self, target: str, command: Any, kind: str, lane: str, done: protocol.Done,
              trace: Any = None) -> None:
        slot = self.slots[target]
        job = next(self._ids)
        with self._lock:
            if slot.state != "up" or slot.link is None:
                error: BaseException | None = self._down(slot)
            else:
                error = None
                self._pending[job] = _Pending(target, command, kind, done, trace, time.monotonic())
        if error is not None:
            done(None, error)
            return
        try:
            assert slot.link is not None
            slot.link.send({"op": "submit", "job": job, "kind": kind, "lane": lane, "command": command})
        except links.LinkClosed:
            pass   # the reader sees the link close and fails every job in flight, this one too

    def _closed_while_down(self, run_id: str) -> bool:
        """A run closed while its engine is down holds no memory anywhere: it is only forgotten (and
        not brought back when the engine returns)."""
        with self._lock:
            run = self.runs.get(run_id)
            if run is None or self.slots[run.slot].state == "up":
                return False
            del self.runs[run_id]
            return True

    def _broadcast(self, command: Any, kind: str, lane: str, done: protocol.Done) -> None:
        targets = [s.name for s in self.slots.values() if s.state == "up"]
        if not targets:
            done(None, self._down(self.slots[self.default_slot]))
            return
        left, errors = [len(targets)], []

        def one(result: Any, error: BaseException | None) -> None:
            with self._lock:
                left[0] -= 1
                if error is not None:
                    errors.append(error)
                last = left[0] == 0
            if last:
                done(None if errors else result, errors[0] if errors else None)

        for target in targets:
            self._send(target, command, kind, lane, one)

    def _down(self, slot: Slot) -> EngineUnavailable:
        if slot.remote and not slot.cause:
            return EngineUnavailable(f"engine {slot.name} has not connected yet (it runs on another machine: "
                                     f"`stillroom engine --connect {self.address} --name {slot.name}`)")
        if slot.remote:
            return EngineUnavailable(f"{slot.cause}; it serves again once it reconnects")
        return EngineUnavailable(f"{slot.cause or f'engine {slot.name} is starting'}; it is being started "
                                 "again: retry in a few seconds")

    def get_run(self, run_id: str) -> RunHandle:
        run = self.runs.get(run_id)
        if run is None:
            raise self._not_in_memory(run_id)
        if run.lost is not None:
            raise FailedPrecondition(run.lost)
        if run.notice is not None:
            notice, run.notice = run.notice, None
            raise FailedPrecondition(notice)
        return run

    def _not_in_memory(self, run_id: str) -> FailedPrecondition:
        return FailedPrecondition(f"training_run_id: run {run_id} has no weights in this server's memory "
                                  f"(it was unloaded, its session finished, or the server restarted since "
                                  f"it was created); {self._resume_hint(run_id)}")

    def _resume_hint(self, run_id: str) -> str:
        saved = self.files.latest(run_id, "weights")
        return (f"its last saved state is {saved.uri}: continue from it with "
                "create_training_client_from_state_with_optimizer" if saved else
                "it saved no training state (save_state) to continue from")

    def lora_meta(self, run: Any) -> dict | None:
        return run.facts.lora_meta

    def sampler(self, facts: SamplerFacts) -> Sampler:
        with self._lock:
            if facts.key not in self.samplers:
                base = self.models.get(facts.base_model)
                self.samplers[facts.key] = Sampler(facts.key, base, facts.adapter)
            return self.samplers[facts.key]

    def stop(self) -> None:
        self._stopping = True
        for slot in self.slots.values():
            if slot.link is not None:
                try:
                    slot.link.send({"op": "stop"})
                except links.LinkClosed:
                    pass
        for slot in self.slots.values():
            if slot.process is not None:
                try:
                    slot.process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    slot.process.kill()
                    slot.process.wait()
            if slot.link is not None:
                slot.link.close()
        self._listener.close()
        links.remove_shared(os.getpid())

    # ---------------------------------------------------------------- results and bookkeeping

    def _read(self, slot: Slot, link: links.Link) -> None:
        """The slot's results, until its link closes (then: the engine is gone)."""
        try:
            while True:
                message = link.recv()
                if message["op"] == "done":
                    if "facts" in message:   # as of this result (a run came, went or moved)
                        slot.facts = message["facts"]
                    if "stats" in message:
                        slot.stats = message["stats"]
                    self._finish(message)
                elif message["op"] == "facts":
                    slot.facts, slot.stats = message["facts"], message["stats"]
                    slot.queued = message["queued"]
        except links.LinkClosed as closed:
            hung = "timed out" in str(closed)
            self._lost(slot, f"stopped answering for {SILENT_SECONDS:.0f} s" if hung else
                       f"closed its link ({closed})", link=link, hung=hung)

    def _finish(self, message: dict[str, Any]) -> None:
        with self._lock:
            pending = self._pending.pop(message["job"], None)
        if pending is None:
            return
        error = message.get("error")
        result = message.get("result")
        if error is None:
            try:
                self._record(pending, result)
            except Exception:  # noqa: BLE001 - bookkeeping must not lose the result
                logger.exception("recording a %s result failed", pending.kind)
        if self.observer is not None:
            finished = time.monotonic()
            started = max(pending.enqueued_at, finished - float(message.get("compute", 0.0)))
            self.observer(Job(kind=pending.kind, run=None, done=pending.done, trace=pending.trace,
                              enqueued_at=pending.enqueued_at, started_at=started), finished)
        pending.done(result, error)

    def _record(self, pending: _Pending, result: Any) -> None:
        command = pending.command
        match command:
            case protocol.CreateRun(run_id=run_id, base_model=model):
                self.runs[run_id] = RunHandle(run_id, self.models.get(model), result, pending.slot)
            case protocol.CreateRunFromState(run_id=run_id, uri=uri):
                base = self.models.get(self.state_meta(uri)["base_model"])
                self.runs[run_id] = RunHandle(run_id, base, result, pending.slot)
            case protocol.RestoreRun(run_id=run_id):
                if run_id in self.runs:
                    self.runs[run_id].restoring = False
            case protocol.CloseRun(run_id=run_id):
                self.runs.pop(run_id, None)
            case protocol.ForwardBackward(run_id=run_id, work=work) if not work.forward_only:
                self._mark(run_id, True)   # gradients a crash would lose
            case protocol.OptimStep(run_id=run_id) | protocol.LoadState(run_id=run_id):
                self._mark(run_id, True)
            case protocol.SaveCheckpoint(run_id=run_id, kind="weights"):
                self._mark(run_id, False)
            case protocol.DeleteCheckpoint(uri=uri):
                with self._lock:
                    self.samplers.pop(f"path:{uri}", None)

    def _mark(self, run_id: str, changed: bool) -> None:
        if (run := self.runs.get(run_id)) is not None:
            run.changed = changed

    # ---------------------------------------------------------------- engines coming and going

    def _accept(self) -> None:
        while not self._stopping:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._greet, args=(sock,), daemon=True,
                             name="stillroom-engine-handshake").start()

    def _greet(self, sock: socket.socket) -> None:
        """An engine dialing in: check its proof and name, hand it its settings, wait for ready."""
        sock.settimeout(HANDSHAKE_SECONDS)
        link = links.Link(sock, trusted=False)   # anyone may dial: small frames until it proves itself
        nonce = links.new_token()
        try:
            link.send({"op": "challenge", "nonce": nonce})
            hello = link.recv()
            refusal = self._check_hello(hello, nonce)
            if refusal:
                logger.warning("refused an engine connection from %s: %s", sock.getpeername()[0], refusal)
                link.send({"op": "refused", "why": refusal})
                link.close()
                return
            link.trusted = True
            slot = self.slots[hello["name"]]
            local = not slot.remote
            settings = self.settings | {"name": slot.name, "local": local,
                                        "spill_dir": str(self._spill_dir(slot)),
                                        "adopt_spill": slot.restarts > 0, "models": self.models_of(slot.name),
                                        "run_memory_bytes": self.settings.get("run_memory_bytes")}
            link.send({"op": "welcome", "settings": settings})
            sock.settimeout(START_SECONDS)
            ready = link.recv()
            sock.settimeout(SILENT_SECONDS)   # its facts come every second: silence this long is a hang
        except Exception as error:  # noqa: BLE001 - a failed handshake ends its connection only
            logger.warning("an engine's handshake failed: %s", error)
            link.close()
            return
        link.local = local and links.SHM.is_dir()
        with self._lock:
            crash, slot.link, slot.state, slot.cause = slot.cause, link, "up", ""
            slot.pid, slot.host = int(hello.get("pid", 0)), str(hello.get("host", ""))
            slot.run_memory_bytes = int(ready.get("run_memory_bytes", 0))
        threading.Thread(target=self._read, args=(slot, link), daemon=True,
                         name=f"stillroom-engine-{slot.name}").start()
        logger.info("engine %s is up (pid %s on %s)%s", slot.name, slot.pid, slot.host or "?",
                    f", after {slot.restarts} restarts" if slot.restarts else "")
        self._restore_runs(slot, crash)
        slot.ready.set()

    def _check_hello(self, hello: dict[str, Any], nonce: str) -> str:
        if hello.get("op") != "hello":
            return "no hello"
        if not hmac.compare_digest(str(hello.get("proof", "")), links.proof(self.token, nonce)):
            return "wrong engine token"
        if hello.get("version") != protocol.VERSION:
            return f"protocol version {hello.get('version')}, this server speaks {protocol.VERSION}"
        name = hello.get("name")
        if name not in self.slots:
            return f"no engine named '{name}' here (engines: {', '.join(sorted(self.slots))})"
        if self.slots[name].state == "up":
            return f"engine '{name}' is already connected"
        return ""

    def _launch(self, slot: Slot) -> None:
        env = os.environ | {TOKEN_VARIABLE: self.token} | self._device_of(slot)
        command = [sys.executable, "-m", "stillroom_server.engine.process.child", "--connect", self.address,
                   "--name", slot.name, "--log-level", self.settings.get("log_level", "INFO")]
        slot.state, slot.ready = "starting", threading.Event()
        slot.process = subprocess.Popen(command, env=env)
        slot.pid = slot.process.pid
        threading.Thread(target=self._watch, args=(slot, slot.process), daemon=True,
                         name=f"stillroom-engine-watch-{slot.name}").start()

    def _device_of(self, slot: Slot) -> dict[str, str]:
        """On CUDA with several engines here (and no sharding), one GPU each: the slot's index in
        CUDA_VISIBLE_DEVICES (or in every GPU), round robin."""
        local = [s.name for s in self.slots.values() if not s.remote]
        if self.settings.get("device") != "cuda" or len(local) < 2 or self.settings.get("workers", 1) > 1:
            return {}
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is None:
            import torch

            visible = ",".join(str(i) for i in range(torch.cuda.device_count()))
        gpus = [g for g in visible.split(",") if g.strip()]
        return {"CUDA_VISIBLE_DEVICES": gpus[local.index(slot.name) % len(gpus)]} if gpus else {}

    def wait_ready(self) -> None:
        """Return once every engine started here is up (the remote ones come when they come)."""
        deadline = time.monotonic() + START_SECONDS
        for slot in [s for s in self.slots.values() if not s.remote]:
            while not slot.ready.wait(0.2):
                if slot.process is not None and slot.process.poll() is not None:
                    raise RuntimeError(f"engine {slot.name} exited while starting "
                                       f"({_exit_cause(slot.process.returncode)}); its log is above")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"engine {slot.name} did not start in {START_SECONDS:.0f} s")

    def _watch(self, slot: Slot, process: subprocess.Popen) -> None:
        """A local engine's process: when it ends on its own, its slot is down."""
        code = process.wait()
        self._lost(slot, _exit_cause(code), process=process)

    def _lost(self, slot: Slot, cause: str, link: links.Link | None = None,
              process: subprocess.Popen | None = None, hung: bool = False) -> None:
        """The engine is gone: fail its requests in flight, take stock of its runs, start it again.
        Called by its link's reader and by its process's watcher, whichever sees it first; `link`
        or `process` says which engine they saw go (an older one's news is old)."""
        with self._lock:
            old_news = (link is not None and link is not slot.link) or \
                (process is not None and process is not slot.process)
            if self._stopping or slot.state == "down" or old_news:
                return
            slot.state, slot.link, slot.cause = "down", None, f"engine {slot.name} {cause}"
            failed = [(j, p) for j, p in self._pending.items() if p.slot == slot.name]
            for job, _ in failed:
                del self._pending[job]
            runs = [r for r in self.runs.values() if r.slot == slot.name]
            for run in runs:
                run.restoring = True
            now = time.monotonic()
            slot.crashes.append(now)
            while slot.crashes and now - slot.crashes[0] > CRASH_WINDOW_SECONDS:
                slot.crashes.popleft()
            dying = slot.process
        if dying is not None and hung:   # alive but stuck: it is killed, and said to have hung
            dying.kill()
            dying.wait()
            cause += " and was killed"
        elif dying is not None:
            try:  # the link may close before the process is reaped: give its exit status a moment
                cause = _exit_cause(dying.wait(timeout=5))
            except subprocess.TimeoutExpired:
                dying.kill()
                cause = "closed its link without exiting, and was killed"
        what = f"engine {slot.name} (pid {slot.pid}{' on ' + slot.host if slot.remote else ''}) {cause}"
        slot.cause = what
        if slot.pid:
            links.remove_shared(slot.pid)
        logger.error("%s: %d requests in flight failed, %d training runs to bring back", what, len(failed),
                     len(runs))
        for _, pending in failed:
            pending.done(None, EngineUnavailable(
                f"{what} while it held this request; its work was lost: submit it again"))
        if slot.remote:
            logger.warning("engine %s is remote: start `stillroom engine --connect %s --name %s` again on "
                           "its machine", slot.name, self.address, slot.name)
            return
        delay = min(MAX_BACKOFF_SECONDS, 2.0 ** (len(slot.crashes) - 1) - 1)
        if delay > 0:
            logger.warning("engine %s crashed %d times in %.0f s: starting it again in %.0f s", slot.name,
                           len(slot.crashes), CRASH_WINDOW_SECONDS, delay)
        timer = threading.Timer(delay, self._relaunch, args=(slot,))
        timer.daemon = True
        timer.start()

    def _relaunch(self, slot: Slot) -> None:
        if self._stopping:
            return
        slot.restarts += 1
        self._launch(slot)

    def _spill_dir(self, slot: Slot) -> Path:
        return self.data_dir / "spill" / f"engine-{slot.name}"

    def _restore_runs(self, slot: Slot, crash: str) -> None:
        """Bring back the runs a crashed engine held, each in its own lane (before its next call)."""
        runs = [r for r in list(self.runs.values()) if r.slot == slot.name and r.restoring]
        for run in runs:
            spilled = checkpoints.spill_folder(self._spill_dir(slot), run.run_id)
            saved = self.files.latest(run.run_id, "weights")
            if spilled.is_dir():
                source, run.notice = str(spilled), None
            elif saved is not None:
                source = saved.uri
                run.notice = (f"training_run_id: run {run.run_id} was on {crash}; it resumed from "
                              f"its last saved state {saved.uri}, and the progress since then was lost "
                              "(repeat the steps after that save)") if run.changed else None
            else:
                run.lost = (f"training_run_id: run {run.run_id} was on {crash}, and it saved no "
                            "training state (save_state) to resume from: make a new run")
                run.restoring = False
                continue
            run.changed = False

            def restored(result: Any, error: BaseException | None, run: RunHandle = run,
                         source: str = source) -> None:
                if error is not None:
                    run.lost = (f"training_run_id: run {run.run_id} was on {crash}, and bringing "
                                f"it back from {source} failed: {error}")
                    logger.error("run %s could not be brought back: %s", run.run_id, error)
                else:
                    logger.info("run %s is back on engine %s, from %s", run.run_id, slot.name,
                                "its spilled state" if source.startswith("/") else source)

            self._send(slot.name, protocol.RestoreRun(run.run_id, source), "restore_run", run.run_id,
                       restored)


def _exit_cause(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _device(settings: dict[str, Any]):
    import torch

    return torch.device(settings.get("device", "cpu"))


def _dtype(settings: dict[str, Any]):
    import torch

    cuda, dtype = settings.get("device") == "cuda", settings.get("dtype", "auto")
    return torch.bfloat16 if cuda and dtype != "fp32" else torch.float32

