"""The service: every call either wire can make, with owners, numbering, dedupe and validation.

Transports decode their messages into engine types, name the caller's owner and call these
methods; they never touch the engine or store themselves. Model work goes to the engine client as
commands (engine/protocol.py) and is answered with a request id at once; cheap calls answer
directly. Every field is checked before a request is accepted, so a refused request changes
nothing. This module knows no wire format: results are stored by core/results.py, errors carry
core/errors.py's codes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from stillroom._proto import stillroom_pb2 as pb
from stillroom_server.core import results, validate
from stillroom_server.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidInput,
    NotFound,
    RequestConflict,
    ResourceExhausted,
    SequenceConflict,
    StoredFailure,
)
from stillroom_server.core.futures import MAX_POLL_SECONDS, FutureHub, new_request_id, result_of
from stillroom_server.core.sessions import LAPSED, ClientSession, ClientSessions
from stillroom_server.core.telemetry import Telemetry, TraceLabel
from stillroom_server.engine import checkpoints
from stillroom_server.engine.checkpoints import exports
from stillroom_server.engine.protocol import (
    CloseRun,
    ComputeLogprobs,
    CreateRun,
    CreateRunFromState,
    DeleteCheckpoint,
    EngineClient,
    ForwardBackward,
    LoadModel,
    LoadState,
    OpenSampler,
    OptimStep,
    Sample,
    SaveCheckpoint,
    loss_names,
)
from stillroom_server.engine.types import (
    AdamConfig,
    ForwardBackwardWork,
    LogprobsWork,
    LoraSpec,
    OptimWork,
    SampleWork,
)
from stillroom_server.store import Store
from stillroom_server.store.models import CheckpointRow
from stillroom_server.store.repo import FutureRecord, utcnow

logger = logging.getLogger("stillroom.core")
CLIENT_ERRORS = (InvalidInput, NotFound, AlreadyExists, FailedPrecondition)


@dataclass(frozen=True)
class RunInfo:
    training_run_id: str
    base_model: str
    is_lora: bool
    lora_rank: int
    last_request_seq: int
    num_trainable_params: int
    max_context_length: int
    user_metadata: dict[str, str]
    created_at: datetime
    last_request_time: datetime
    config: dict
    last_checkpoint: CheckpointRow | None = None
    last_sampler_checkpoint: CheckpointRow | None = None


@dataclass(frozen=True)
class SamplerInfo:
    sampling_session_id: str
    base_model: str
    model_path: str            # stillroom:// path, '' for a base model
    max_context_length: int
    vocab_size: int


@dataclass
class _OpenSampler:
    owner: str
    sampler: Any               # the engine client's view: .key, .base, .vocab_size, .max_context
    info: SamplerInfo
    client_session: str | None = None
    borrowed: bool = False  # on another owner's published checkpoint: checked again on every call


@dataclass(frozen=True)
class SaveOptions:
    ttl_seconds: int | None = None
    overwrite: bool = False
    user_metadata: dict[str, str] = field(default_factory=dict)


def request_digest(kind: str, body: bytes) -> str:
    """What tells a retry of a numbered request from another request reusing its number: a hash
    of its kind and its body as the transport canonicalized it (deterministic protobuf bytes, or
    JSON with sorted keys)."""
    return hashlib.sha256(kind.encode() + b"\0" + body).hexdigest()


def sample_sequence_ids(request_id: str, num_samples: int) -> list[str]:
    """The names of a sample request's sequences (SampledSequence.sequence_id): unique per server."""
    return [f"{request_id}:{i}" for i in range(num_samples)]


def relay(record: FutureRecord) -> pb.FutureResult:
    """Another request's outcome as this one's: its stored result, or its failure re-raised."""
    if record.status == "failed":
        raise StoredFailure(record.error_code or "INTERNAL", record.error_message or "")
    return result_of(record)


class Service:
    def __init__(self, engine: EngineClient, store: Store, hub: FutureHub,
                 limits: validate.Limits | None = None, session_timeout: float = 0.0) -> None:
        self.engine = engine
        self.store = store
        self.hub = hub
        self.limits = limits or validate.Limits()
        self.sessions = ClientSessions(session_timeout)  # lapse after this long without a heartbeat
        self.run_owners: dict[str, str] = {}  # runs live in this process, by owner
        self.run_bytes: dict[str, int] = {}   # their weights and AdamW moments, as measured at creation
        self._run_sessions: dict[str, ClientSession] = {}  # live runs a client session made
        self._stated_budget = engine.run_memory_bytes  # the training-run memory stated at start
        self._samplers: dict[str, _OpenSampler] = {}
        self._turns: dict[str, asyncio.Event] = {}  # set when a run accepts its next request
        # numbered requests waiting for their turn: (run, seq) -> (request id, digest)
        self._held: dict[tuple[str, int], tuple[str, str]] = {}
        self.telemetry = Telemetry(engine, live_runs=lambda: len(self.run_owners))

    async def on_engine(self, command: Any, kind: str, lane: str = "admin") -> Any:
        """Run an engine command after the work queued in `lane`; await its result."""
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future = loop.create_future()

        def done(result, error):
            def settle():
                if not outcome.cancelled():
                    outcome.set_exception(error) if error else outcome.set_result(result)
            loop.call_soon_threadsafe(settle)

        self.engine.submit(command, kind, lane, done)
        return await outcome

    # ---------------------------------------------------------------- capabilities

    def supported_models(self) -> list[dict]:
        models = []
        for name in self.engine.models.known_models():
            facts = self.engine.models.describe(name)
            models.append({"model_name": name, "max_context_length": facts["max_context"],
                           "vocab_size": facts["vocab_size"],
                           "source": "preset" if name.startswith("stillroom/") else "local"})
        return models

    def engine_health(self) -> list[dict[str, Any]]:
        """Each engine's state (up, starting, down and why) and restarts: no owner's data."""
        return [{k: e[k] for k in ("engine", "state", "restarts", "cause", "models") if k in e}
                for e in self.engine.engines()]

    @staticmethod
    def loss_fns() -> list[str]:
        return loss_names()

    async def tokenizer_files(self, base_model: str) -> tuple[str, dict[str, bytes]]:
        name = await self.on_engine(LoadModel(base_model), "load_model")
        return name, self.engine.models.get(name).tokenizer_files()

    def tokenizer_dir(self, base_model: str) -> str:
        """A local folder holding `base_model`'s tokenizer (for clients on this machine)."""
        return str(self.engine.models.resolve(base_model))

    # ---------------------------------------------------------------- training runs

    async def create_run(self, owner: str, base_model: str, lora: LoraSpec | None, seed: int | None,
                         user_metadata: dict | None = None, run_id: str | None = None,
                         client_session: str | None = None) -> RunInfo:
        self.engine.models.resolve(base_model)
        if lora is not None:
            validate.lora_rank(lora.rank)
        metadata = validate.user_metadata(user_metadata)
        session = self.sessions.get(owner, client_session) if client_session else None
        run_id = self._reserve_run(owner, run_id)
        run = await self._create_on_engine(owner, run_id, CreateRun(run_id, base_model, lora, seed))
        if session is not None:
            await self._join_session(session, run_id)
        config = {"lora": vars(lora) if lora else None, "seed": seed}
        self.store.create_run(run_id, owner, base_model, run.is_lora, run.lora_rank, config, metadata,
                              run.num_trainable_params)
        return self.run_info(owner, run_id)

    async def create_run_from_state(self, owner: str, path: str, with_optimizer: bool,
                                    user_metadata: dict | None = None,
                                    run_id: str | None = None,
                                    client_session: str | None = None) -> RunInfo:
        parsed, _ = self.readable_checkpoint(path, owner)
        meta = self.engine.state_meta(parsed.uri)
        self.engine.models.resolve(meta["base_model"])
        metadata = validate.user_metadata(user_metadata)
        session = self.sessions.get(owner, client_session) if client_session else None
        run_id = self._reserve_run(owner, run_id)
        run = await self._create_on_engine(owner, run_id,
                                           CreateRunFromState(run_id, parsed.uri, with_optimizer))
        if session is not None:
            await self._join_session(session, run_id)
        config = {"lora": meta["lora"], "seed": None, "from_state": parsed.uri,
                  "with_optimizer": with_optimizer}
        self.store.create_run(run_id, owner, meta["base_model"], run.is_lora, run.lora_rank, config,
                              metadata, run.num_trainable_params)
        return self.run_info(owner, run_id)

    async def _join_session(self, session: ClientSession, run_id: str) -> None:
        """Count a new run as its client session's (a call naming the session is a sign of life,
        like a heartbeat). A session that ended while the run was being made takes it out again."""
        if session.finished is not None:
            await self._release(run_id)
            raise FailedPrecondition(f"session_id: {session.why}; make a new ServiceClient")
        session.run_ids.append(run_id)
        self._run_sessions[run_id] = session
        session.touch()

    def _reserve_run(self, owner: str, run_id: str | None) -> str:
        """A new run id for `owner`, counted against their live runs before any work starts."""
        live = sum(1 for o in self.run_owners.values() if o == owner)
        if live >= self.limits.max_live_runs_per_owner:
            lapse = (f"; a session with no heartbeat for {self.sessions.timeout:g} s ends by itself"
                     if self.sessions.timeout > 0 else "")
            raise ResourceExhausted(f"training runs: {live} live runs is the limit of "
                                    f"{self.limits.max_live_runs_per_owner} per owner (finish a "
                                    "session, unload a run or end a session with `stillroom sessions "
                                    f"end` to release runs{lapse})")
        held, budget = self.live_bytes(owner), self.live_bytes_budget()
        if budget is not None and held >= budget:
            raise self._over_budget(held, 0, budget)
        run_id = run_id or "run-" + uuid.uuid4().hex[:16]
        if run_id in self.run_owners or self.store.get_run(run_id) is not None:
            raise AlreadyExists(f"training_run_id: run '{run_id}' already exists")
        self.run_owners[run_id] = owner
        return run_id

    def live_bytes(self, owner: str) -> int:
        """Bytes of weights and AdamW moments the owner's live runs hold (in memory or on disk)."""
        return sum(self.run_bytes.get(r, 0) for r, o in self.run_owners.items() if o == owner)

    def live_bytes_budget(self) -> int | None:
        """The per-owner bytes limit: as configured, else the training-run memory budget the engine
        stated at start (one owner's runs fit in memory at once; beyond it, across owners, idle runs
        wait on disk). None where the engine keeps runs outside this process and states none."""
        configured = self.limits.max_live_bytes_per_owner
        budget = configured if configured is not None else self._stated_budget
        return budget if budget > 0 else None

    @staticmethod
    def _over_budget(held: int, size: int, budget: int) -> ResourceExhausted:
        needs = f"a new run needs {size / 2**20:.1f} MiB and " if size else ""
        return ResourceExhausted(
            f"training runs: {needs}your live runs hold {held / 2**20:.1f} MiB of weights and AdamW "
            f"moments, against a budget of {budget / 2**20:.1f} MiB per owner (the memory this server "
            "keeps for training runs, stated at start); finish a session to release its runs")

    async def _create_on_engine(self, owner: str, run_id: str, create: CreateRun | CreateRunFromState):
        """Make the run on its engine; one that would take its owner past their bytes budget is
        taken out again at once and refused (nothing is recorded for it)."""
        try:
            run = await self.on_engine(create, "create_run")
        except BaseException:
            self.run_owners.pop(run_id, None)
            raise
        size = run.memory_bytes  # 0: the engine states none (sharded runs)
        held, budget = self.live_bytes(owner), self.live_bytes_budget()
        if budget is not None and held + size > budget:
            self.run_owners.pop(run_id, None)
            await self.on_engine(CloseRun(run_id), "close_run")
            raise self._over_budget(held, size, budget)
        self.run_bytes[run_id] = size
        return run

    def submit_async(self, owner: str, kind: str, make: Callable[[], Any],
                     encode: Callable[[Any], pb.FutureResult]) -> str:
        """A request id for a coroutine made by `make`, finished (or failed) when it is: for calls
        that one wire answers at once and the other as a future (Tinker's create_model)."""
        request_id = new_request_id()
        self.hub.create(request_id, owner, kind)

        async def run() -> None:
            try:
                result = encode(await make())
            except Exception as error:  # noqa: BLE001 - stored as the request's outcome
                self.hub.complete(request_id, None, error)
            else:
                self.hub.complete(request_id, result, None)

        asyncio.get_running_loop().create_task(run())
        return request_id

    def own_run(self, owner: str, run_id: str):
        row = self.store.get_run(run_id)
        if row is None or row.owner != owner:
            raise NotFound(f"training_run_id: run '{run_id[:80]}' does not exist")
        return row

    def run_info(self, owner: str, run_id: str, with_checkpoints: bool = False) -> RunInfo:
        row = self.own_run(owner, run_id)
        facts = self.engine.models.describe(row.base_model)
        latest: dict[str, CheckpointRow] = {}
        if with_checkpoints:
            for checkpoint in self.store.list_checkpoints(run_id):
                latest[checkpoint.kind] = checkpoint
        return RunInfo(
            training_run_id=row.id, base_model=row.base_model, is_lora=row.is_lora,
            lora_rank=row.lora_rank, last_request_seq=row.last_seq,
            num_trainable_params=row.num_trainable_params, max_context_length=facts["max_context"],
            user_metadata=json.loads(row.user_metadata_json), created_at=row.created_at,
            last_request_time=row.updated_at, config=json.loads(row.config_json),
            last_checkpoint=latest.get("weights"), last_sampler_checkpoint=latest.get("sampler_weights"))

    def list_runs(self, owner: str, limit: int, offset: int) -> tuple[list[RunInfo], int]:
        limit, offset = validate.list_window(limit, offset)
        rows = self.store.list_runs(owner, limit, offset)
        return ([self.run_info(owner, r.id, with_checkpoints=True) for r in rows],
                self.store.count_runs(owner))

    def is_live(self, run_id: str) -> bool:
        return run_id in self.run_owners

    # ---------------------------------------------------------------- numbered requests of a run

    def _sequenced(self, owner: str, run_id: str, seq: int, kind: str,
                   prepare: Callable[[], Any | tuple[Any, Callable[[Any], Any]]],
                   encode: Callable[[Any], pb.FutureResult], refusal_takes_number: bool,
                   digest: str = "") -> str:
        """Accept request `seq` of a run: dedupe repeats, validate, record, queue in order.

        A request that fails validation changes nothing. By default it is refused outright and its
        number stays free (Stillroom's SDK numbers a call only once it is accepted). With
        `refusal_takes_number` (Tinker's SDK counts every call it makes) the number is used up by
        a request that fails at once with the same error, so the client's next number follows.
        `digest` (the transport's hash of the kind and body) tells a retry, answered by the first
        request's future, from a different request reusing the number, refused as a conflict.
        `prepare()` validates and returns the engine command, or (command, finish) where
        `finish(result)` records what the command did (a checkpoint's row) and returns the result."""
        self.own_run(owner, run_id)
        validate.seq(seq)
        earlier = self.store.find_sequenced(run_id, seq)
        if earlier is not None:  # a retry: the first request's future answers it
            return self._retry_of(run_id, seq, earlier, digest)
        try:
            prepared = prepare()
        except CLIENT_ERRORS as error:
            if not refusal_takes_number:
                raise
            request_id = self._accept(owner, kind, run_id, seq, digest)
            self.hub.complete(request_id, None, error)
            return request_id
        command, finish = prepared if isinstance(prepared, tuple) else (prepared, None)
        request_id = self._accept(owner, kind, run_id, seq, digest)

        def done(result: Any, error: BaseException | None) -> None:
            if error is None and finish is not None:
                try:
                    result = finish(result)
                except Exception as failure:  # noqa: BLE001 - the request's outcome
                    result, error = None, failure
            self.hub.complete(request_id, result, error, encode)

        self.engine.submit(command, kind, run_id, done,
                           TraceLabel(request_id, self.run_client_session(owner, run_id)))
        return request_id

    @staticmethod
    def _retry_of(run_id: str, seq: int, earlier: tuple[str, str | None], digest: str) -> str:
        """The earlier request's id, if this one repeats it (or either side has no digest)."""
        request_id, earlier_digest = earlier
        if digest and earlier_digest and digest != earlier_digest:
            raise RequestConflict(f"seq: request {seq} of run {run_id} was already taken by a different "
                                  "request; a retry must repeat its body, and a new request needs "
                                  "the next number")
        return request_id

    def _accept(self, owner: str, kind: str, run_id: str, seq: int, digest: str = "") -> str:
        request_id, _ = self.store.accept_sequenced(new_request_id(), owner, kind, run_id, seq,
                                                    digest or None)
        if (turn := self._turns.pop(run_id, None)) is not None:
            turn.set()
        self.hub.watch(request_id, owner, kind)
        return request_id

    def in_turn(self, owner: str, run_id: str, seq: int, kind: str, submit: Callable[[], str],
                hold_seconds: float, digest: str = "") -> str:
        """Submit numbered request `seq` with `submit()` now if the run is ready for it; else answer
        at once with a request id and hold the request until `seq - 1` has been accepted (a client
        that sends one call's parts concurrently may deliver them out of order, and may wait for
        the later parts' answers before it sends the first). A gap still open after
        `hold_seconds` fails the held request, naming the number that never came."""
        row = self.own_run(owner, run_id)
        validate.seq(seq)
        if seq <= row.last_seq + 1:
            return submit()
        if (run_id, seq) in self._held:  # the client's retry of a request still held
            return self._retry_of(run_id, seq, self._held[(run_id, seq)], digest)

        async def when_its_turn() -> FutureRecord:
            try:
                await self._wait_for_turn(run_id, seq, hold_seconds)
                last = self.own_run(owner, run_id).last_seq
                if seq > last + 1:
                    raise SequenceConflict(f"seq: request {seq} of run {run_id} waited {hold_seconds:.0f} s "
                                           f"for request {last + 1}, which never came")
                return await self.wait_done(owner, submit())
            finally:
                self._held.pop((run_id, seq), None)

        request_id = self.submit_async(owner, kind, when_its_turn, relay)
        self._held[(run_id, seq)] = (request_id, digest)
        return request_id

    async def _wait_for_turn(self, run_id: str, seq: int, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (remaining := deadline - loop.time()) > 0:
            row = self.store.get_run(run_id)
            if row is None or seq <= row.last_seq + 1:
                return
            turn = self._turns.setdefault(run_id, asyncio.Event())
            try:
                await asyncio.wait_for(turn.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def forward_backward(self, owner: str, run_id: str, seq: int, work: ForwardBackwardWork,
                         refusal_takes_number: bool = False, digest: str = "") -> str:
        def prepare():
            self._refuse_if_session_ended(run_id)
            validate.token_count(work, self.limits)
            teacher = work.loss_fn_config_strings.get("teacher", "")
            if checkpoints.is_path(teacher):
                path, _ = self.readable_checkpoint(teacher, owner, "loss_fn_config.teacher")
                work.loss_fn_config_strings["teacher"] = path.uri
            self.engine.validate_forward_backward(run_id, work)
            return ForwardBackward(run_id, work)

        kind = "forward" if work.forward_only else "forward_backward"
        return self._sequenced(owner, run_id, seq, kind, prepare, results.forward_backward,
                               refusal_takes_number, digest)

    def optim_step(self, owner: str, run_id: str, seq: int, adam: AdamConfig,
                   refusal_takes_number: bool = False, digest: str = "") -> str:
        def prepare():
            self._refuse_if_session_ended(run_id)
            validate.adam(adam)
            self.engine.get_run(run_id)
            return OptimStep(run_id, OptimWork(adam))

        return self._sequenced(owner, run_id, seq, "optim_step", prepare, results.optim_step,
                               refusal_takes_number, digest)

    def save_state(self, owner: str, run_id: str, seq: int, name: str = "",
                   options: SaveOptions = SaveOptions(), refusal_takes_number: bool = False,
                   digest: str = "") -> str:
        return self._save(owner, run_id, seq, "weights", "state", name, options,
                          refusal_takes_number, digest)

    def save_sampler_weights(self, owner: str, run_id: str, seq: int, name: str = "",
                             options: SaveOptions = SaveOptions(),
                             refusal_takes_number: bool = False, digest: str = "") -> str:
        return self._save(owner, run_id, seq, "sampler_weights", "auto", name, options,
                          refusal_takes_number, digest)

    def save_external_weights(self, owner: str, run_id: str, seq: int, name: str,
                              options: SaveOptions = SaveOptions(),
                              age_recipients: list[str] | None = None,
                              refusal_takes_number: bool = False, digest: str = "") -> str:
        """Export the run's weights as Hugging Face / PEFT files (exports.py), encrypted to
        `age_recipients` if any; downloaded through signed URLs (Tinker's save_weights_external)."""
        def check() -> None:  # malformed recipients are refused with the request, before any work
            exports.recipients(age_recipients)

        return self._save(owner, run_id, seq, checkpoints.EXTERNAL, "external", name, options,
                          refusal_takes_number, digest, check, tuple(age_recipients or ()))

    def _save(self, owner: str, run_id: str, seq: int, kind: str, prefix: str, name: str,
              options: SaveOptions, refusal_takes_number: bool, digest: str,
              check: Callable[[], None] | None = None, age_recipients: tuple[str, ...] = ()) -> str:
        """A numbered request that writes checkpoint `kind` and records its row; a taken name is
        refused before anything is written, unless `overwrite`."""
        name = name or f"{prefix}-{seq:06d}-{uuid.uuid4().hex[:6]}"

        def prepare():
            self._refuse_if_session_ended(run_id)
            path = checkpoints.CheckpointPath(run_id, kind, checkpoints.check_name(name))
            ttl = validate.ttl_seconds(options.ttl_seconds)
            metadata = validate.user_metadata(options.user_metadata)
            if check is not None:
                check()
            run = self.engine.get_run(run_id)
            taken = self.store.get_checkpoint(path.uri) is not None or self.engine.files.exists(path)
            if taken and not options.overwrite:
                raise AlreadyExists(f"name: checkpoint {path.uri} already exists (save with "
                                    "overwrite=True to replace it)")

            def record(written: tuple[str, int]) -> str:  # the engine replaced the files of a taken name
                uri, size = written
                if taken:
                    self._forget_checkpoint(uri)
                expires_at = utcnow() + timedelta(seconds=ttl) if ttl else None
                self.store.add_checkpoint(owner, run_id, kind, name, uri, run.base.name, run.is_lora,
                                          size, expires_at, metadata)
                return uri

            return SaveCheckpoint(run_id, kind, name, taken, age_recipients), record

        return self._sequenced(owner, run_id, seq, f"save_{kind}", prepare, results.saved,
                               refusal_takes_number, digest)

    def load_state(self, owner: str, run_id: str, seq: int, path: str, with_optimizer: bool,
                   refusal_takes_number: bool = False, digest: str = "") -> str:
        def prepare():
            self._refuse_if_session_ended(run_id)
            parsed, _ = self.readable_checkpoint(path, owner)
            self.engine.validate_load_state(run_id, parsed.uri)
            return LoadState(run_id, parsed.uri, with_optimizer)

        return self._sequenced(owner, run_id, seq, "load_state", prepare, results.saved,
                               refusal_takes_number, digest)

    # ---------------------------------------------------------------- sampling

    async def open_sampler(self, owner: str, base_model: str | None = None,
                           model_path: str | None = None,
                           client_session: str | None = None) -> SamplerInfo:
        borrowed = False
        if model_path:
            path, row = self.readable_checkpoint(model_path, owner, "model_path")
            borrowed = row.owner != owner
            facts = await self.on_engine(OpenSampler(model_path=path.uri), "open_sampler")
        elif base_model:
            self.engine.models.resolve(base_model)
            facts = await self.on_engine(OpenSampler(base_model=base_model), "open_sampler")
        else:
            raise InvalidInput("source: give base_model or model_path")
        opened = self.engine.sampler(facts)
        info = SamplerInfo(sampling_session_id="samp-" + uuid.uuid4().hex[:16],
                           base_model=opened.base.name,
                           model_path=path.uri if model_path else "",
                           max_context_length=opened.max_context, vocab_size=opened.vocab_size)
        if client_session:  # still live after the load (a call naming it is a sign of life)
            self.sessions.get(owner, client_session).touch()
        self._samplers[info.sampling_session_id] = _OpenSampler(owner, opened, info, client_session, borrowed)
        return info

    def _sampler(self, owner: str, session_id: str) -> Any:
        entry = self._samplers.get(session_id)
        ended = self.sessions.ended_with(session_id) if entry is None else None
        if ended is not None and ended.owner == owner:
            raise FailedPrecondition(f"sampling_session_id: sampler {session_id} was closed: "
                                     f"{ended.why}; make a new ServiceClient and sampling client")
        if entry is None or entry.owner != owner:
            raise NotFound(f"sampling_session_id: session '{session_id[:80]}' does not exist "
                           "(sessions do not survive a server restart; make a new sampling client)")
        if entry.borrowed:  # another owner's checkpoint: unpublishing it ends this use at once
            row = self.store.get_checkpoint(entry.info.model_path)
            if row is None or not row.published:
                raise NotFound(f"model_path: checkpoint {entry.info.model_path} is no longer published "
                               "by its owner")
        return entry.sampler

    def sampler_info(self, owner: str, session_id: str) -> SamplerInfo:
        self._sampler(owner, session_id)
        return self._samplers[session_id].info

    def _queue_batched(self, owner: str, kind: str, command: Sample | ComputeLogprobs,
                       encode: Callable[[Any], pb.FutureResult], session_id: str | None = None) -> str:
        if self.engine.outstanding >= self.engine.max_outstanding:  # refuse, never drop
            raise ResourceExhausted(f"queue: {self.engine.outstanding} requests are waiting, the most "
                                    "this server queues; retry shortly", retryable=True,
                                    retry_after_seconds=0.5)
        request_id = new_request_id()
        if isinstance(command, Sample):  # both transports name a request's samples the same way
            command.work.sequence_ids = tuple(sample_sequence_ids(request_id, command.work.num_samples))
        self.hub.create(request_id, owner, kind)
        self.engine.submit(command, kind, f"sampling:{owner}",
                           lambda result, error: self.hub.complete(request_id, result, error, encode),
                           TraceLabel(request_id, session_id))
        return request_id

    def sample(self, owner: str, session_id: str, work: SampleWork) -> str:
        opened = self._sampler(owner, session_id)
        self.engine.validate_sample(opened, work)
        return self._queue_batched(owner, "sample", Sample(opened.key, work), results.sample,
                                   self._samplers[session_id].client_session)

    def compute_logprobs(self, owner: str, session_id: str, work: LogprobsWork) -> str:
        opened = self._sampler(owner, session_id)
        self.engine.validate_logprobs(opened, work)
        return self._queue_batched(owner, "compute_logprobs", ComputeLogprobs(opened.key, work),
                                   results.compute_logprobs,
                                   self._samplers[session_id].client_session)

    # ---------------------------------------------------------------- futures

    async def wait_done(self, owner: str, request_id: str) -> FutureRecord:
        """The request's record once it has finished or failed, however long that takes."""
        record = await self.wait(owner, request_id, MAX_POLL_SECONDS)
        while record.status == "pending":
            record = await self.wait(owner, request_id, MAX_POLL_SECONDS)
        return record

    async def wait(self, owner: str, request_id: str, timeout: float) -> FutureRecord:
        record = await self.hub.wait(request_id, owner, timeout)
        if record is None:
            raise NotFound(f"request_id: request '{request_id[:80]}' does not exist")
        return record

    # ---------------------------------------------------------------- client sessions (Tinker)

    def create_client_session(self, owner: str, tags: list[str], user_metadata: dict | None) -> str:
        return self.sessions.create(owner, tags, validate.user_metadata(user_metadata)).id

    def heartbeat(self, owner: str, session_id: str) -> None:
        self.sessions.get(owner, session_id).touch()

    async def finish_client_session(self, owner: str, session_id: str, reason: str) -> None:
        """End a client session: its sampling sessions close and its training runs leave memory
        (their saved checkpoints stay; `create_training_client_from_state` resumes one). Finishing
        an ended session changes nothing."""
        await self._end_session(self.sessions.get(owner, session_id, live=False), reason)

    async def end_client_session(self, owner: str, session_id: str) -> ClientSession:
        """End a session for its owner (`stillroom sessions end`), as its client's finish would."""
        session = self.sessions.get(owner, session_id, live=False)
        await self._end_session(session, "ended by its owner")
        return session

    def list_client_sessions(self, owner: str) -> list[ClientSession]:
        """The owner's client sessions, live and ended (as many ended ones as are remembered)."""
        return self.sessions.list(owner)

    async def sweep_lapsed_sessions(self) -> int:
        """End every live session with no heartbeat for the session timeout; return how many."""
        lapsed = self.sessions.lapsed()
        for session in lapsed:
            released = await self._end_session(session, LAPSED)
            logger.warning("session %s of owner '%s' lapsed: no heartbeat for %g s; %d training runs "
                           "left memory (their checkpoints stay)", session.id, session.owner,
                           self.sessions.timeout, released)
        return len(lapsed)

    async def _end_session(self, session: ClientSession, reason: str) -> int:
        """Mark the session ended (at once, so calls made meanwhile are refused), close its samplers
        and take its runs out of memory; return how many runs left memory."""
        first = session.finished is None
        self.sessions.finish(session.owner, session.id, reason)
        samplers = self.session_samplers(session.id)
        for sampler_id in samplers:
            del self._samplers[sampler_id]
        if first:
            self.sessions.remember(session, session.run_ids + samplers)
        # every run stops counting at once (a listing meanwhile says none is live); their memory is
        # freed on their engines after
        released = [run_id for run_id in session.run_ids if self._forget_live(run_id)]
        await asyncio.gather(*(self._close_on_engine(run_id) for run_id in released))
        if first and reason != LAPSED:
            logger.info("session %s finished (%s): released %d runs", session.id, reason, len(released))
        return len(released)

    def live_runs_of(self, session: ClientSession) -> int:
        return sum(1 for run_id in session.run_ids if run_id in self.run_owners)

    def _refuse_if_session_ended(self, run_id: str) -> None:
        """A run that left memory when its client session ended is refused naming how it ended
        (a lapse, a finish) and its last saved state."""
        session = None if run_id in self.run_owners else self.sessions.ended_with(run_id)
        if session is None:
            return  # live, or gone for another reason, which the engine's refusal names
        saved = self.engine.files.latest(run_id, "weights")
        resume = (f"its last saved state is {saved.uri}: continue from it with "
                  "create_training_client_from_state_with_optimizer" if saved else
                  "it saved no training state (save_state) to continue from")
        raise FailedPrecondition(f"training_run_id: run {run_id} is not in memory: {session.why}; "
                                 f"{resume}")

    async def close_run(self, owner: str, run_id: str) -> RunInfo:
        """Take one run out of memory once its queued requests are done (Tinker's unload_model).
        Its checkpoints stay and `create_training_run_from_state` resumes it; a later call on it
        is refused and names its last saved state. Closing a run that is not live changes nothing."""
        self.own_run(owner, run_id)
        if await self._release(run_id):
            logger.info("run %s closed by its owner", run_id)
        return self.run_info(owner, run_id, with_checkpoints=True)

    async def _release(self, run_id: str) -> bool:
        """Free a live run's memory (False if it was not live)."""
        if not self._forget_live(run_id):
            return False
        await self._close_on_engine(run_id)
        return True

    def _forget_live(self, run_id: str) -> bool:
        """Stop counting a run as live (False if it was not)."""
        if self.run_owners.pop(run_id, None) is None:
            return False
        self.run_bytes.pop(run_id, None)
        self._run_sessions.pop(run_id, None)
        return True

    async def _close_on_engine(self, run_id: str) -> None:
        # in the run's own lane: after its queued requests, never between a request's steps
        await self.on_engine(CloseRun(run_id), "close_run", lane=run_id)

    def run_client_session(self, owner: str, run_id: str) -> str | None:
        """The client session that made `run_id`, if one did and is still open (a lookup: every
        numbered request asks, for its trace)."""
        session = self._run_sessions.get(run_id)
        if session is None or session.owner != owner or session.finished is not None:
            return None
        return session.id

    def session_samplers(self, session_id: str) -> list[str]:
        return [k for k, v in self._samplers.items() if v.client_session == session_id]

    # ---------------------------------------------------------------- checkpoints

    def owned_checkpoint(self, uri: str, owner: str, field_name: str = "path"):
        """The parsed path and store row of the caller's checkpoint; malformed paths touch nothing."""
        path = checkpoints.parse(uri, field_name)
        row = self.store.get_checkpoint(path.uri)
        if row is None or row.owner != owner:
            raise NotFound(f"{field_name}: checkpoint {path.uri} does not exist")
        return path, row

    def readable_checkpoint(self, uri: str, owner: str, field_name: str = "path"):
        """The parsed path and row of a checkpoint the caller may read (sample, distill from, load):
        their own, or one its owner published. Everything else about a checkpoint (delete, TTL,
        publishing, downloads) is its owner's alone (`owned_checkpoint`)."""
        path = checkpoints.parse(uri, field_name)
        row = self.store.get_checkpoint(path.uri)
        if row is None or (row.owner != owner and not row.published):
            raise NotFound(f"{field_name}: checkpoint {path.uri} does not exist")
        if path.kind not in checkpoints.MODEL_KINDS:
            raise InvalidInput(f"{field_name}: {path.uri} is external weights, files to download; name "
                               "the training state (weights/) or sampler weights it was exported from")
        return path, row

    def set_published(self, owner: str, uri: str, published: bool) -> CheckpointRow:
        """Publish the owner's checkpoint to every owner of this server, or make it private again
        (at once: the next call on it by anyone else is refused). Either is idempotent: the tinker
        SDK retries a 409 for five minutes, and a retried publish must not fail."""
        path, _ = self.owned_checkpoint(uri, owner)
        if path.kind not in checkpoints.MODEL_KINDS:
            raise InvalidInput(f"path: {path.uri} is external weights, which only its owner downloads; "
                               "publish the training state or sampler weights instead")
        updated = self.store.set_checkpoint_published(path.uri, published)
        if updated is None:  # deleted between the check and the update
            raise NotFound(f"path: checkpoint {path.uri} does not exist")
        logger.info("checkpoint %s %s by its owner", path.uri, "published" if published else "unpublished")
        return updated

    def checkpoint_run_info(self, owner: str, uri: str, field_name: str = "tinker_path") -> RunInfo:
        """The settings of the run that wrote a checkpoint the caller may read (Tinker's
        weights_info, which create_training_client_from_state asks before it loads)."""
        _, row = self.readable_checkpoint(uri, owner, field_name)
        return self.run_info(row.owner, row.run_id)

    def external_files(self, owner: str, uri: str):
        """The path, row and files of the owner's external weights (NOT_FOUND for anything else)."""
        path, row = self.owned_checkpoint(uri, owner)
        if path.kind != checkpoints.EXTERNAL:
            raise InvalidInput(f"path: {path.uri} is not external weights (save them with "
                               "save_weights_external)")
        self.engine.files.files_of(path)
        return path, row, exports.files(self.engine.files.directory(path))

    def list_checkpoints(self, owner: str, run_id: str | None = None) -> list[CheckpointRow]:
        if run_id:
            self.own_run(owner, run_id)
            return self.store.list_checkpoints(run_id)
        return self.store.list_user_checkpoints(owner)

    async def delete_checkpoint(self, owner: str, uri: str) -> CheckpointRow:
        path, row = self.owned_checkpoint(uri, owner)
        await self._delete(path.uri)
        return row

    def _forget_checkpoint(self, uri: str) -> None:
        """Drop the row and close the sampling sessions on it (their weights are unloaded next)."""
        self.store.delete_checkpoint(uri)
        for session_id, entry in list(self._samplers.items()):
            if entry.sampler.key == f"path:{uri}":
                del self._samplers[session_id]

    async def _delete(self, uri: str) -> None:
        """Forget the row, unload the weights (on the worker, after queued work) and remove the files."""
        self._forget_checkpoint(uri)
        await self.on_engine(DeleteCheckpoint(uri), "delete_checkpoint")
        logger.info("deleted checkpoint %s", uri)

    async def sweep_expired_checkpoints(self) -> int:
        """Delete every checkpoint whose TTL has passed; return how many."""
        expired = self.store.expired_checkpoints()
        for row in expired:
            await self._delete(row.path)
        return len(expired)

    def set_checkpoint_ttl(self, owner: str, uri: str, ttl_seconds: int | None) -> CheckpointRow:
        path, _ = self.owned_checkpoint(uri, owner)
        ttl = validate.ttl_seconds(ttl_seconds)
        expires_at = utcnow() + timedelta(seconds=ttl) if ttl else None
        row = self.store.set_checkpoint_expiry(path.uri, expires_at)
        if row is None:  # deleted between the check and the update
            raise NotFound(f"path: checkpoint {path.uri} does not exist")
        return row

    def checkpoint_files(self, owner: str, uri: str):
        """The path and row of a checkpoint whose files exist (NOT_FOUND if they are gone)."""
        path, row = self.owned_checkpoint(uri, owner)
        self.engine.files.files_of(path)
        return path, row
