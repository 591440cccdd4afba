"""The Stillroom gRPC servicer: each method decodes its message, names the owner, calls the core
service and encodes the answer. No state and no rules live here (they are core/service.py's)."""

from __future__ import annotations

import json
from datetime import datetime, timezone

from stillroom._proto import stillroom_pb2 as pb
from stillroom._proto import stillroom_pb2_grpc as pb_grpc
from stillroom_server import __version__
from stillroom_server.core.archives import Archives
from stillroom_server.core.auth import Authenticator
from stillroom_server.core.errors import FailedPrecondition, InvalidInput, code_for
from stillroom_server.core.futures import FutureHub
from stillroom_server.core.service import RunInfo, SamplerInfo, SaveOptions, Service, request_digest
from stillroom_server.core.sessions import ClientSession
from stillroom_server.engine.types import LoraSpec
from stillroom_server.grpc_api import convert
from stillroom_server.grpc_api.status import retry_after_ms, rpc, rpc_stream


class StillroomServicer(pb_grpc.StillroomServicer):
    def __init__(self, service: Service, auth: Authenticator, archives: Archives | None = None) -> None:
        self.service = service
        self.auth = auth
        self.archives = archives

    # ---------------------------------------------------------------- capabilities

    @rpc
    async def GetServerCapabilities(self, request, context, owner):
        models = [pb.SupportedModel(trainable=True, sampleable=True, **facts)
                  for facts in self.service.supported_models()]
        return pb.ServerCapabilities(supported_models=models, loss_fns=self.service.loss_fns(),
                                     max_num_samples=self.service.engine.max_num_samples,
                                     server_version=__version__)

    @rpc
    async def GetTokenizer(self, request, context, owner):
        name, files = await self.service.tokenizer_files(request.base_model)
        return pb.TokenizerFiles(base_model=name, files=files)

    # ---------------------------------------------------------------- training runs

    @rpc
    async def CreateTrainingRun(self, request, context, owner):
        lora = None
        if request.HasField("lora"):
            lora = LoraSpec(request.lora.rank, request.lora.train_mlp, request.lora.train_attn,
                            request.lora.train_unembed)
        seed = request.seed if request.HasField("seed") else None
        info = await self.service.create_run(owner, request.base_model, lora, seed,
                                             dict(request.user_metadata))
        return run_to_pb(info)

    @rpc
    async def GetTrainingRun(self, request, context, owner):
        return run_to_pb(self.service.run_info(owner, request.training_run_id))

    @rpc
    async def CloseTrainingRun(self, request, context, owner):
        return run_to_pb(await self.service.close_run(owner, request.training_run_id))

    @rpc
    async def ForwardBackward(self, request, context, owner):
        return pb.FutureRef(request_id=self._forward_backward(owner, request))

    def _forward_backward(self, owner: str, request: pb.ForwardBackwardRequest) -> str:
        self.service.own_run(owner, request.training_run_id)  # the owner before the tensors are decoded
        work = convert.forward_backward_from_pb(request)
        return self.service.forward_backward(owner, request.training_run_id, request.seq, work,
                                             digest=digest("forward_backward", request))

    @rpc
    async def OptimStep(self, request, context, owner):
        return pb.FutureRef(request_id=self._optim_step(owner, request))

    def _optim_step(self, owner: str, request: pb.OptimStepRequest) -> str:
        return self.service.optim_step(owner, request.training_run_id, request.seq,
                                       convert.adam_from_pb(request.adam_params),
                                       digest=digest("optim_step", request))

    @rpc
    async def SaveWeightsForSampler(self, request, context, owner):
        return pb.FutureRef(request_id=self.service.save_sampler_weights(
            owner, request.training_run_id, request.seq, request.name, save_options(request),
            digest=digest("save_sampler_weights", request)))

    @rpc
    async def SaveState(self, request, context, owner):
        return pb.FutureRef(request_id=self.service.save_state(
            owner, request.training_run_id, request.seq, request.name, save_options(request),
            digest=digest("save_state", request)))

    @rpc
    async def LoadState(self, request, context, owner):
        return pb.FutureRef(request_id=self.service.load_state(
            owner, request.training_run_id, request.seq, request.path, request.with_optimizer,
            digest=digest("load_state", request)))

    @rpc
    async def CreateTrainingRunFromState(self, request, context, owner):
        info = await self.service.create_run_from_state(owner, request.path, request.with_optimizer,
                                                        dict(request.user_metadata))
        return run_to_pb(info)

    # ---------------------------------------------------------------- sampling

    @rpc
    async def CreateSamplingSession(self, request, context, owner):
        source = request.WhichOneof("source")
        info = await self.service.open_sampler(
            owner, base_model=request.base_model if source == "base_model" else None,
            model_path=request.model_path if source == "model_path" else None)
        return sampler_to_pb(info, request.model_path if source == "model_path" else "")

    @rpc
    async def Sample(self, request, context, owner):
        return pb.FutureRef(request_id=self._sample(owner, request))

    def _sample(self, owner: str, request: pb.SampleRequest) -> str:
        self.service.sampler_info(owner, request.sampling_session_id)  # the owner before the prompt
        return self.service.sample(owner, request.sampling_session_id, convert.sample_from_pb(request))

    @rpc
    async def ComputeLogprobs(self, request, context, owner):
        return pb.FutureRef(request_id=self._compute_logprobs(owner, request))

    def _compute_logprobs(self, owner: str, request: pb.ComputeLogprobsRequest) -> str:
        return self.service.compute_logprobs(owner, request.sampling_session_id,
                                             convert.logprobs_from_pb(request))

    # ---------------------------------------------------------------- futures

    @rpc
    async def RetrieveFuture(self, request, context, owner):
        record = await self.service.wait(owner, request.request_id, request.timeout_seconds)
        return FutureHub.to_pb(record)

    @rpc_stream
    async def Submit(self, request, context, owner):
        with self.service.hub.batched():  # one transaction for every item's pending row
            accepted = [self._accept(owner, item) for item in request.items]
        yield pb.SubmitEvent(accepted=accepted)
        async for record in self.service.hub.settled([a.request_id for a in accepted if a.request_id],
                                                     owner):
            yield pb.SubmitEvent(result=FutureHub.to_pb(record))

    def _accept(self, owner: str, item: pb.SubmitItem) -> pb.SubmitAccepted:
        """One item of a Submit, as its unary call would take it; a refusal is its answer alone."""
        call = item.WhichOneof("call")
        try:
            if call == "sample":
                request_id = self._sample(owner, item.sample)
            elif call == "compute_logprobs":
                request_id = self._compute_logprobs(owner, item.compute_logprobs)
            elif call == "forward_backward":
                request_id = self._forward_backward(owner, item.forward_backward)
            elif call == "optim_step":
                request_id = self._optim_step(owner, item.optim_step)
            else:
                raise InvalidInput("items: each item needs a call (sample, compute_logprobs, "
                                   "forward_backward or optim_step)")
        except Exception as error:  # noqa: BLE001 - answered as this item's refusal
            code, message = code_for(error)
            return pb.SubmitAccepted(refused=pb.FutureError(code=code, message=message),
                                     retry_after_ms=retry_after_ms(error))
        return pb.SubmitAccepted(request_id=request_id)

    # ---------------------------------------------------------------- checkpoint management

    @rpc
    async def ListTrainingRuns(self, request, context, owner):
        runs, total = self.service.list_runs(owner, request.limit, request.offset)
        return pb.ListTrainingRunsResponse(training_runs=[run_to_pb(r) for r in runs],
                                           total_count=total)

    @rpc
    async def ListCheckpoints(self, request, context, owner):
        rows = self.service.list_checkpoints(owner, request.training_run_id or None)
        return pb.ListCheckpointsResponse(checkpoints=[checkpoint_to_pb(r) for r in rows])

    @rpc
    async def DeleteCheckpoint(self, request, context, owner):
        return checkpoint_to_pb(await self.service.delete_checkpoint(owner, request.path))

    @rpc
    async def SetCheckpointTtl(self, request, context, owner):
        ttl = request.ttl_seconds if request.HasField("ttl_seconds") else None
        return checkpoint_to_pb(self.service.set_checkpoint_ttl(owner, request.path, ttl))

    @rpc
    async def PublishCheckpoint(self, request, context, owner):
        return checkpoint_to_pb(self.service.set_published(owner, request.path, True))

    @rpc
    async def UnpublishCheckpoint(self, request, context, owner):
        return checkpoint_to_pb(self.service.set_published(owner, request.path, False))

    @rpc
    async def GetWeightsInfo(self, request, context, owner):
        info = self.service.checkpoint_run_info(owner, request.path, "path")
        lora = (info.config or {}).get("lora") or {}
        return pb.WeightsInfo(base_model=info.base_model, is_lora=info.is_lora,
                              lora_rank=info.lora_rank if info.is_lora else 0,
                              train_mlp=bool(lora.get("train_mlp")), train_attn=bool(lora.get("train_attn")),
                              train_unembed=bool(lora.get("train_unembed")))

    @rpc
    async def GetCheckpointArchiveUrl(self, request, context, owner):
        if self.archives is None:
            raise FailedPrecondition("path: this server does not serve checkpoint downloads "
                                     "(it runs without its HTTP port)")
        path, row = self.service.checkpoint_files(owner, request.path)
        token, expires_at = self.archives.issue(path)
        url_path = self.archives.url_path(token)
        return pb.CheckpointArchiveUrl(url=self.archives.base_url + url_path,
                                       http_port=self.archives.port, url_path=url_path,
                                       expires_at=iso(expires_at), size_bytes=row.size_bytes)

    # ---------------------------------------------------------------- client sessions (Tinker's)

    @rpc
    async def ListClientSessions(self, request, context, owner):
        sessions = self.service.list_client_sessions(owner)
        return pb.ListClientSessionsResponse(
            sessions=[self._session_to_pb(s) for s in sessions],
            session_timeout_seconds=self.service.sessions.timeout)

    @rpc
    async def EndClientSession(self, request, context, owner):
        session = await self.service.end_client_session(owner, request.session_id)
        return self._session_to_pb(session)

    def _session_to_pb(self, session: ClientSession) -> pb.ClientSessionInfo:
        def at(seconds: float | None) -> str:
            return iso(datetime.fromtimestamp(seconds, timezone.utc)) if seconds is not None else ""

        return pb.ClientSessionInfo(
            session_id=session.id, state=session.state, end_reason=session.finished or "",
            created_at=at(session.created_at), last_heartbeat_at=at(session.last_heartbeat_at),
            ended_at=at(session.ended_at), training_run_ids=session.run_ids,
            live_runs=self.service.live_runs_of(session),
            sampler_ids=self.service.session_samplers(session.id), tags=session.tags,
            user_metadata=session.user_metadata)


def digest(kind: str, request) -> str:
    return request_digest(kind, request.SerializeToString(deterministic=True))


def save_options(request: pb.SaveWeightsRequest) -> SaveOptions:
    ttl = request.ttl_seconds if request.HasField("ttl_seconds") else None
    return SaveOptions(ttl_seconds=ttl, overwrite=request.overwrite,
                       user_metadata=dict(request.user_metadata))


def iso(moment: datetime | None) -> str:
    """ISO 8601 in UTC ('' for None); SQLite hands back naive datetimes that are UTC."""
    if moment is None:
        return ""
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).isoformat()


def run_to_pb(info: RunInfo) -> pb.TrainingRunInfo:
    message = pb.TrainingRunInfo(
        training_run_id=info.training_run_id, base_model=info.base_model, is_lora=info.is_lora,
        lora_rank=info.lora_rank, last_request_seq=info.last_request_seq,
        num_trainable_params=info.num_trainable_params, max_context_length=info.max_context_length,
        user_metadata=info.user_metadata, created_at=iso(info.created_at))
    if info.last_checkpoint is not None:
        message.last_checkpoint.CopyFrom(checkpoint_to_pb(info.last_checkpoint))
    if info.last_sampler_checkpoint is not None:
        message.last_sampler_checkpoint.CopyFrom(checkpoint_to_pb(info.last_sampler_checkpoint))
    return message


def sampler_to_pb(info: SamplerInfo, model_path: str) -> pb.SamplingSessionInfo:
    return pb.SamplingSessionInfo(sampling_session_id=info.sampling_session_id,
                                  base_model=info.base_model, model_path=model_path,
                                  max_context_length=info.max_context_length,
                                  vocab_size=info.vocab_size)


def checkpoint_to_pb(row) -> pb.CheckpointInfo:
    return pb.CheckpointInfo(path=row.path, training_run_id=row.run_id, kind=row.kind, name=row.name,
                             base_model=row.base_model, is_lora=row.is_lora,
                             size_bytes=row.size_bytes, created_at=iso(row.created_at),
                             expires_at=iso(row.expires_at),
                             user_metadata=json.loads(row.user_metadata_json or "{}"),
                             published=bool(row.published))
