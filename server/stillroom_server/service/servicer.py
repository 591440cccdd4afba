"""The Stillroom gRPC servicer: each method converts, validates, delegates and converts back.

Model work is queued on the scheduler and answered with a future id at once; cheap calls answer
directly. Every field is checked before a request is accepted, so a rejected request changes
nothing. Owners are taken from the caller's metadata (one local owner until keys exist).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from stillroom._proto import stillroom_pb2 as pb
from stillroom._proto import stillroom_pb2_grpc as pb_grpc
from stillroom_server import __version__
from stillroom_server.engine import checkpoints
from stillroom_server.engine.engine import Engine, LoraSpec, Sampler, known_losses
from stillroom_server.engine.errors import FailedPrecondition, InvalidInput, NotFound
from stillroom_server.engine.scheduler import Job, Scheduler
from stillroom_server.engine.types import OptimWork
from stillroom_server.service import auth, convert
from stillroom_server.service.archives import ArchiveServer
from stillroom_server.service.errors import ResourceExhausted, rpc
from stillroom_server.service.futures import FutureHub, new_request_id
from stillroom_server.store import Store
from stillroom_server.store.repo import utcnow

logger = logging.getLogger("stillroom.service")
MAX_LORA_RANK = 512
DEFAULT_LIST_LIMIT = 20
MAX_LIST_LIMIT = 1000
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600


@dataclasses.dataclass(frozen=True)
class Limits:
    max_live_runs_per_owner: int = 32
    max_tokens_per_request: int = 4_000_000


class StillroomServicer(pb_grpc.StillroomServicer):
    def __init__(self, engine: Engine, scheduler: Scheduler, store: Store, hub: FutureHub,
                 archives: ArchiveServer | None = None, require_keys: bool = False,
                 limits: Limits = Limits()) -> None:
        self.archives = archives
        self.require_keys = require_keys
        self.limits = limits
        self.run_owners: dict[str, str] = {}  # runs live in this process, by owner
        self.engine = engine
        self.scheduler = scheduler
        self.store = store
        self.hub = hub
        self.sessions: dict[str, Sampler] = {}
        self.session_owners: dict[str, str] = {}

    def authenticate(self, context) -> str:
        return auth.authenticate(self.store, context.invocation_metadata(), self.require_keys)

    def owner(self, context) -> str:
        """The owner of the call in progress (set by `authenticate` before the method runs)."""
        return auth.CURRENT_OWNER.get()

    async def on_worker(self, fn: Callable[[], Any], kind: str) -> Any:
        """Run `fn` on the engine's worker thread, in queue order, and await its result."""
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future = loop.create_future()

        def done(result, error):
            def settle():
                if not outcome.cancelled():
                    outcome.set_exception(error) if error else outcome.set_result(result)
            loop.call_soon_threadsafe(settle)

        self.scheduler.submit(Job(kind=kind, run=fn, done=done, lane="admin"))
        return await outcome

    # ---------------------------------------------------------------- capabilities

    @rpc
    async def GetServerCapabilities(self, request, context):
        models = []
        for name in self.engine.models.known_models():
            facts = self.engine.models.describe(name)
            models.append(pb.SupportedModel(
                model_name=name, max_context_length=facts["max_context"],
                vocab_size=facts["vocab_size"], trainable=True, sampleable=True,
                source="preset" if name.startswith("stillroom/") else "local"))
        return pb.ServerCapabilities(supported_models=models, loss_fns=known_losses(),
                                     max_num_samples=self.engine.max_num_samples,
                                     server_version=__version__)

    @rpc
    async def GetTokenizer(self, request, context):
        base = await self.on_worker(lambda: self.engine.models.get(request.base_model), "load_model")
        return pb.TokenizerFiles(base_model=base.name, files=base.tokenizer_files())

    # ---------------------------------------------------------------- training runs

    @rpc
    async def CreateTrainingRun(self, request, context):
        owner = self.owner(context)
        self.engine.models.resolve(request.base_model)
        lora = None
        if request.HasField("lora"):
            if not 1 <= request.lora.rank <= MAX_LORA_RANK:
                raise InvalidInput(f"lora.rank: must be between 1 and {MAX_LORA_RANK}, got {request.lora.rank}")
            lora = LoraSpec(request.lora.rank, request.lora.train_mlp, request.lora.train_attn,
                            request.lora.train_unembed)
        seed = request.seed if request.HasField("seed") else None
        run_id = self._reserve_run(owner)
        run = await self._create_on_worker(
            run_id, lambda: self.engine.create_run(run_id, request.base_model, lora, seed))
        config = {"lora": vars(lora) if lora else None, "seed": seed}
        self.store.create_run(run_id, owner, request.base_model, run.is_lora, run.lora_rank, config,
                              dict(request.user_metadata), run.num_trainable_params())
        return self._run_info(run_id, owner)

    def _reserve_run(self, owner: str) -> str:
        """A new run id for `owner`, counted against their live runs before any work starts."""
        live = sum(1 for o in self.run_owners.values() if o == owner)
        if live >= self.limits.max_live_runs_per_owner:
            raise ResourceExhausted(f"training runs: {live} live runs is the limit of "
                                    f"{self.limits.max_live_runs_per_owner} per owner")
        run_id = "run-" + uuid.uuid4().hex[:16]
        self.run_owners[run_id] = owner
        return run_id

    async def _create_on_worker(self, run_id: str, create: Callable[[], Any]):
        try:
            return await self.on_worker(create, "create_run")
        except BaseException:
            self.run_owners.pop(run_id, None)
            raise

    @rpc
    async def GetTrainingRun(self, request, context):
        return self._run_info(request.training_run_id, self.owner(context))

    def _own_run(self, run_id: str, owner: str):
        row = self.store.get_run(run_id)
        if row is None or row.owner != owner:
            raise NotFound(f"training_run_id: run '{run_id[:80]}' does not exist")
        return row

    def _run_info(self, run_id: str, owner: str) -> pb.TrainingRunInfo:
        row = self._own_run(run_id, owner)
        facts = self.engine.models.describe(row.base_model)
        return pb.TrainingRunInfo(
            training_run_id=row.id, base_model=row.base_model, is_lora=row.is_lora,
            lora_rank=row.lora_rank, last_request_seq=row.last_seq,
            num_trainable_params=row.num_trainable_params, max_context_length=facts["max_context"],
            user_metadata=json.loads(row.user_metadata_json), created_at=row.created_at.isoformat())

    async def _sequenced(self, request, context, kind: str, validate: Callable[[], Callable[[], Any]],
                         to_pb: Callable[[Any], pb.FutureResult]) -> pb.FutureRef:
        """Accept request `seq` of a run: dedupe repeats, validate, record, queue in order."""
        owner = self.owner(context)
        self._own_run(request.training_run_id, owner)
        if request.seq < 1:
            raise InvalidInput(f"seq: request numbers start at 1, got {request.seq}")
        earlier = self.store.find_sequenced(request.training_run_id, request.seq)
        if earlier is not None:  # a retry: the first request's future answers it
            return pb.FutureRef(request_id=earlier)
        work = validate()
        request_id, is_new = self.store.accept_sequenced(new_request_id(), owner, kind,
                                                         request.training_run_id, request.seq)
        if is_new:
            self.hub.watch(request_id)
            self.scheduler.submit(Job(
                kind=kind, run=lambda: to_pb(work()), lane=request.training_run_id,
                done=lambda result, error: self.hub.complete(request_id, result, error)))
        return pb.FutureRef(request_id=request_id)

    @rpc
    async def ForwardBackward(self, request, context):
        def validate():
            work = convert.forward_backward_from_pb(request)
            tokens = sum(d.tokens_T.numel() for d in work.data)
            if tokens > self.limits.max_tokens_per_request:
                raise InvalidInput(f"data: {tokens} tokens is over the limit of "
                                   f"{self.limits.max_tokens_per_request} per request (the SDK splits "
                                   "larger calls into parts; lower TrainingClient.max_chunk_bytes)")
            teacher = work.loss_fn_config_strings.get("teacher", "")
            if teacher.startswith(checkpoints.SCHEME):
                self._owned_checkpoint(teacher, self.owner(context), "loss_fn_config.teacher")
            self.engine.validate_forward_backward(request.training_run_id, work)
            return lambda: self.engine.forward_backward(request.training_run_id, work)

        return await self._sequenced(
            request, context, "forward" if request.forward_only else "forward_backward", validate,
            lambda result: pb.FutureResult(forward_backward=convert.forward_backward_to_pb(result)))

    @rpc
    async def OptimStep(self, request, context):
        def validate():
            adam = convert.adam_from_pb(request.adam_params)
            self.engine.get_run(request.training_run_id)
            return lambda: self.engine.optim_step(request.training_run_id,
                                                  OptimWork(adam))

        return await self._sequenced(
            request, context, "optim_step", validate,
            lambda result: pb.FutureResult(optim_step=pb.OptimStepResult(metrics=result.metrics)))

    @rpc
    async def SaveWeightsForSampler(self, request, context):
        return await self._save_checkpoint(request, context, "sampler_weights", "auto",
                                           self.engine.save_sampler_weights)

    async def _save_checkpoint(self, request, context, kind: str, prefix: str,
                               write: Callable[[str, str], tuple[str, int]]) -> pb.FutureRef:
        """A numbered request that writes checkpoint `kind` with `write(run_id, name)` and records
        its row; a taken name is refused before anything is written."""
        owner = self.owner(context)
        run_id = request.training_run_id
        name = request.name or f"{prefix}-{request.seq:06d}-{uuid.uuid4().hex[:6]}"

        def validate():
            path = checkpoints.CheckpointPath(run_id, kind, checkpoints.check_name(name))
            run = self.engine.get_run(run_id)
            if self.store.get_checkpoint(path.uri) is not None or self.engine.files.exists(path):
                raise checkpoints.AlreadyExists(f"name: checkpoint {path.uri} already exists")

            def save():
                uri, size = write(run_id, name)
                self.store.add_checkpoint(owner, run_id, kind, name, uri, run.base.name, run.is_lora, size)
                return uri

            return save

        return await self._sequenced(
            request, context, f"save_{kind}", validate,
            lambda uri: pb.FutureResult(save_weights=pb.SaveWeightsResult(path=uri)))

    # ---------------------------------------------------------------- sampling

    @rpc
    async def CreateSamplingSession(self, request, context):
        owner = self.owner(context)
        source = request.WhichOneof("source")
        if source == "model_path":
            path, _ = self._owned_checkpoint(request.model_path, owner, "model_path")
            opened = await self.on_worker(lambda: self.engine.open_sampler(model_path=path.uri),
                                          "open_sampler")
        elif source == "base_model":
            self.engine.models.resolve(request.base_model)
            opened = await self.on_worker(lambda: self.engine.open_sampler(base_model=request.base_model),
                                          "open_sampler")
        else:
            raise InvalidInput("source: give base_model or model_path")
        session_id = "samp-" + uuid.uuid4().hex[:16]
        self.sessions[session_id] = opened
        self.session_owners[session_id] = owner
        return pb.SamplingSessionInfo(
            sampling_session_id=session_id, base_model=opened.base.name,
            model_path=request.model_path if source == "model_path" else "",
            max_context_length=opened.max_context, vocab_size=opened.vocab_size)

    def _session(self, session_id: str, owner: str) -> Sampler:
        opened = self.sessions.get(session_id)
        if opened is None or self.session_owners.get(session_id) != owner:
            raise NotFound(f"sampling_session_id: session '{session_id[:80]}' does not exist "
                           "(sessions do not survive a server restart; make a new sampling client)")
        return opened

    def _queue_batched(self, context, kind: str, opened: Sampler, work: Any,
                       to_pb: Callable[[Any], pb.FutureResult]) -> pb.FutureRef:
        request_id, owner = new_request_id(), self.owner(context)
        self.store.create_future(request_id, owner, kind)
        self.hub.watch(request_id)
        self.scheduler.submit(Job(
            kind=kind, run=None, lane=f"sampling:{owner}", batch_key=opened.key, payload=(opened, work),
            done=lambda result, error: self.hub.complete(
                request_id, None if error else to_pb(result), error)))
        return pb.FutureRef(request_id=request_id)

    @rpc
    async def Sample(self, request, context):
        opened = self._session(request.sampling_session_id, self.owner(context))
        work = convert.sample_from_pb(request)
        self.engine.validate_sample(opened, work)
        return self._queue_batched(context, "sample", opened, work,
                                   lambda r: pb.FutureResult(sample=convert.sample_to_pb(r)))

    @rpc
    async def ComputeLogprobs(self, request, context):
        opened = self._session(request.sampling_session_id, self.owner(context))
        work = convert.logprobs_from_pb(request)
        self.engine.validate_logprobs(opened, work)
        return self._queue_batched(
            context, "compute_logprobs", opened, work,
            lambda r: pb.FutureResult(compute_logprobs=convert.logprobs_to_pb(r)))

    # ---------------------------------------------------------------- futures

    @rpc
    async def RetrieveFuture(self, request, context):
        record = await self.hub.wait(request.request_id, self.owner(context), request.timeout_seconds)
        if record is None:
            raise NotFound(f"request_id: request '{request.request_id[:80]}' does not exist")
        return self.hub.to_pb(record)


    # ---------------------------------------------------------------- training state

    @rpc
    async def SaveState(self, request, context):
        return await self._save_checkpoint(request, context, "weights", "state", self.engine.save_state)

    @rpc
    async def LoadState(self, request, context):
        owner = self.owner(context)
        run_id = request.training_run_id

        def validate():
            path, _ = self._owned_checkpoint(request.path, owner)
            self.engine.validate_load_state(run_id, path.uri)

            def load():
                self.engine.load_state(run_id, path.uri, request.with_optimizer)
                return path.uri

            return load

        return await self._sequenced(
            request, context, "load_state", validate,
            lambda uri: pb.FutureResult(save_weights=pb.SaveWeightsResult(path=uri)))

    @rpc
    async def CreateTrainingRunFromState(self, request, context):
        owner = self.owner(context)
        path, _ = self._owned_checkpoint(request.path, owner)
        meta = self.engine.state_meta(path.uri)
        self.engine.models.resolve(meta["base_model"])
        run_id = self._reserve_run(owner)
        run = await self._create_on_worker(
            run_id, lambda: self.engine.create_run_from_state(run_id, path.uri, request.with_optimizer))
        config = {"lora": meta["lora"], "seed": None, "from_state": path.uri,
                  "with_optimizer": request.with_optimizer}
        self.store.create_run(run_id, owner, meta["base_model"], run.is_lora, run.lora_rank, config,
                              dict(request.user_metadata), run.num_trainable_params())
        return self._run_info(run_id, owner)

    # ---------------------------------------------------------------- checkpoint management

    def _owned_checkpoint(self, uri: str, owner: str, field: str = "path"):
        """The parsed path and store row of the caller's checkpoint; malformed paths touch nothing."""
        path = checkpoints.parse(uri, field)
        row = self.store.get_checkpoint(path.uri)
        if row is None or row.owner != owner:
            raise NotFound(f"{field}: checkpoint {path.uri} does not exist")
        return path, row

    def _run_summary(self, run_id: str, owner: str) -> pb.TrainingRunInfo:
        info = self._run_info(run_id, owner)
        for row in self.store.list_checkpoints(run_id):
            target = info.last_checkpoint if row.kind == "weights" else info.last_sampler_checkpoint
            target.CopyFrom(checkpoint_to_pb(row))
        return info

    @rpc
    async def ListTrainingRuns(self, request, context):
        owner = self.owner(context)
        limit = request.limit or DEFAULT_LIST_LIMIT
        if not 1 <= limit <= MAX_LIST_LIMIT or request.offset < 0:
            raise InvalidInput(f"limit: must be between 1 and {MAX_LIST_LIMIT} and offset >= 0, "
                               f"got limit {request.limit}, offset {request.offset}")
        rows = self.store.list_runs(owner, limit, request.offset)
        return pb.ListTrainingRunsResponse(training_runs=[self._run_summary(r.id, owner) for r in rows],
                                           total_count=self.store.count_runs(owner))

    @rpc
    async def ListCheckpoints(self, request, context):
        owner = self.owner(context)
        if request.training_run_id:
            self._own_run(request.training_run_id, owner)
            rows = self.store.list_checkpoints(request.training_run_id)
        else:
            rows = self.store.list_user_checkpoints(owner)
        return pb.ListCheckpointsResponse(checkpoints=[checkpoint_to_pb(r) for r in rows])

    @rpc
    async def DeleteCheckpoint(self, request, context):
        path, row = self._owned_checkpoint(request.path, self.owner(context))
        await self.delete_checkpoint(path.uri)
        return checkpoint_to_pb(row)

    async def delete_checkpoint(self, uri: str) -> None:
        """Forget the row, unload the weights (on the worker, after queued work) and remove the files."""
        self.store.delete_checkpoint(uri)
        for session_id, opened in list(self.sessions.items()):
            if opened.key == f"path:{uri}":
                del self.sessions[session_id]
                self.session_owners.pop(session_id, None)
        await self.on_worker(lambda: self.engine.delete_checkpoint(uri), "delete_checkpoint")
        logger.info("deleted checkpoint %s", uri)

    async def sweep_expired_checkpoints(self) -> int:
        """Delete every checkpoint whose TTL has passed; return how many."""
        expired = self.store.expired_checkpoints()
        for row in expired:
            await self.delete_checkpoint(row.path)
        return len(expired)

    @rpc
    async def SetCheckpointTtl(self, request, context):
        path, _ = self._owned_checkpoint(request.path, self.owner(context))
        expires_at = None
        if request.HasField("ttl_seconds"):
            if not 1 <= request.ttl_seconds <= MAX_TTL_SECONDS:
                raise InvalidInput(f"ttl_seconds: must be between 1 and {MAX_TTL_SECONDS} (or unset: "
                                   f"never expires), got {request.ttl_seconds}")
            expires_at = utcnow() + timedelta(seconds=request.ttl_seconds)
        return checkpoint_to_pb(self.store.set_checkpoint_expiry(path.uri, expires_at))

    @rpc
    async def GetCheckpointArchiveUrl(self, request, context):
        path, row = self._owned_checkpoint(request.path, self.owner(context))
        if self.archives is None:
            raise FailedPrecondition("path: this server does not serve checkpoint downloads "
                                     "(it runs without its HTTP port)")
        self.engine.files.files_of(path)  # NOT_FOUND if the files are gone
        token, expires_at = self.archives.issue(path)
        url_path = f"/archives/{token}"
        return pb.CheckpointArchiveUrl(url=self.archives.base_url + url_path,
                                       http_port=self.archives.port, url_path=url_path,
                                       expires_at=iso(expires_at), size_bytes=row.size_bytes)

def batch_runners(engine: Engine) -> dict[str, Callable[[str, list], list]]:
    """How the scheduler runs a batch of sampling or logprob jobs that share their weights."""
    return {
        "sample": lambda key, payloads: engine.sample(payloads[0][0], [w for _, w in payloads]),
        "compute_logprobs": lambda key, payloads: engine.compute_logprobs(payloads[0][0],
                                                                          [w for _, w in payloads]),
    }


def iso(moment: datetime | None) -> str:
    """ISO 8601 in UTC ('' for None); SQLite hands back naive datetimes that are UTC."""
    if moment is None:
        return ""
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).isoformat()


def checkpoint_to_pb(row) -> pb.CheckpointInfo:
    return pb.CheckpointInfo(path=row.path, training_run_id=row.run_id, kind=row.kind, name=row.name,
                             base_model=row.base_model, is_lora=row.is_lora,
                             size_bytes=row.size_bytes, created_at=iso(row.created_at),
                             expires_at=iso(row.expires_at))
