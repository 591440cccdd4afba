"""The Tinker-compatible HTTP API: Tinker's endpoints (../shared/TINKER_WIRE.md) as thin handlers
over the core service, plus checkpoint downloads. A Starlette app, served by uvicorn beside gRPC.

Each handler authenticates (`X-API-Key`), decodes its body, calls the core and encodes the answer;
errors become Tinker's statuses here, once. What a self-hosted server does not offer (billing,
audit, projects, copying weights) answers 404 naming it, which the SDK tolerates. External weights
are fetched through signed URLs (weights_urls.py).
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from stillroom_server import __version__
from stillroom_server.core import validate
from stillroom_server.core.archives import Archives
from stillroom_server.core.auth import Authenticator
from stillroom_server.core.errors import (
    CLIENT_CODES,
    InvalidInput,
    RequestConflict,
    ResourceExhausted,
    code_for,
)
from stillroom_server.core.futures import result_of
from stillroom_server.core.service import SaveOptions, Service, relay, request_digest, sample_sequence_ids
from stillroom_server.http_api import schemas, views, wire
from stillroom_server.http_api.weights_urls import SignedUrls

logger = logging.getLogger("stillroom.http")
PROTO = "application/x-protobuf"
HOLD_OUT_OF_ORDER_SECONDS = 30.0  # how long a numbered request waits for the one before it
MAX_POLL_SECONDS = 30.0           # the SDK's own poll timeout is 45 s
MAX_CHAINED = 4096                # unnamed sampler saves remembered for retries
MAX_JSON_BYTES = 32 << 20         # a JSON body (the largest is a prompt of ~1M tokens)
MAX_PROTO_BYTES = 256 << 20       # a protobuf body (the SDK sends forward_backward in ~5 MB parts)
MAX_JSON_DEPTH = 32               # the deepest body the SDK sends is 5 levels
STATUS = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "ALREADY_EXISTS": 400,
          "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404,
          "RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503, "INTERNAL": 500}
# The client config this server hands the SDK: every field is the SDK's default except where noted.
# parallel_fwdbwd_chunks: the SDK's default. Both orders work (a part that arrives early is
# answered at once and held until its turn, `Service.in_turn`); in parallel measured 10-20% faster
# (scripts/measure_fwdbwd_chunks.py, docs/tinker_compat.md).
CLIENT_CONFIG = {"pjwt_auth_enabled": False, "parallel_fwdbwd_chunks": True,
                 "proto_compress_fwdbwd": False, "sample_use_retrieve_futures": False,
                 "custom_loss_server_side": False, "sample_join_sampling_session": False}
NOT_OFFERED = {
    "billing": "billing (a self-hosted server meters nothing)",
    "audit": "the audit log",
    "projects": "projects",
    "custom_loss": "server-side custom losses (forward_backward_custom runs on the client)",
    "copy_weights": "copying weights between projects",
}


def error_response(error: BaseException) -> Response:
    code, message = code_for(error)
    headers = {}
    status = STATUS.get(code, 500)
    if isinstance(error, RequestConflict):  # Tinker's conflict status; retrying cannot help
        status, headers["x-should-retry"] = 409, "false"
    if isinstance(error, ResourceExhausted):
        headers["x-should-retry"] = "true" if error.retryable else "false"
        if error.retry_after_seconds:
            headers["retry-after-ms"] = str(int(error.retry_after_seconds * 1000))
    return JSONResponse({"error": message, "code": code}, status_code=status, headers=headers)


def not_offered(what: str) -> Callable[[Request], Awaitable[Response]]:
    async def handler(request: Request) -> Response:
        return JSONResponse({"error": f"not offered by this self-hosted server: {NOT_OFFERED[what]}",
                             "code": "NOT_FOUND"}, status_code=404)
    return handler


class TinkerApi:
    def __init__(self, service: Service, auth: Authenticator, archives: Archives) -> None:
        self.service = service
        self.auth = auth
        self.archives = archives
        self.weights_urls = SignedUrls(service.store, service.engine.files, auth)
        # An unnamed sampler save's request -> its opener's, for the SDK's retries of that save;
        # the oldest are forgotten (a retry comes within minutes, not thousands of saves later).
        self._chained: collections.OrderedDict[str, str] = collections.OrderedDict()

    # ---------------------------------------------------------------- plumbing

    def owner(self, request: Request) -> str:
        secret = request.headers.get("x-api-key")
        bearer = request.headers.get("authorization", "")
        if not secret and bearer.startswith("Bearer "):
            secret = bearer[len("Bearer "):]
        return self.auth.owner(secret)

    @staticmethod
    async def json_body(request: Request) -> Any:
        return parse_json(await read_body(request, MAX_JSON_BYTES))

    def numbered(self, owner: str, run_id: str, seq: int, kind: str, submit, digest: str) -> str:
        """Submit a run's numbered request in its turn (held, answered at once, if it came early);
        `digest` tells a retry (the same body) from a different request reusing its number."""
        return self.service.in_turn(owner, run_id, seq, kind, submit, HOLD_OUT_OF_ORDER_SECONDS,
                                    digest=digest)

    @staticmethod
    def future(request_id: str, **extra: Any) -> JSONResponse:
        return JSONResponse({"request_id": request_id, **extra})

    # ---------------------------------------------------------------- session and service

    async def client_config(self, request: Request, owner: str) -> Response:
        return JSONResponse(CLIENT_CONFIG)

    async def dynamic_config(self, request: Request, owner: str) -> Response:
        return JSONResponse({})

    async def create_session(self, request: Request, owner: str) -> Response:
        body = schemas.parse(schemas.CreateSession, await self.json_body(request))
        metadata = {k: str(v) for k, v in (body.user_metadata or {}).items()}
        session_id = self.service.create_client_session(owner, body.tags, metadata)
        return JSONResponse({"session_id": session_id})

    async def heartbeat(self, request: Request, owner: str) -> Response:
        body = schemas.parse(schemas.SessionRef, await self.json_body(request))
        try:
            self.service.heartbeat(owner, body.session_id)
        except Exception as error:  # noqa: BLE001 - a finished or unknown session: 410 stops the beat
            code, message = code_for(error)
            return JSONResponse({"error": message, "code": code}, status_code=410)
        return JSONResponse({"type": "session_heartbeat"})

    async def finish_session(self, request: Request, owner: str) -> Response:
        body = schemas.parse(schemas.FinishSession, await self.json_body(request))
        reason = (body.reason or {}).get("type", "success")
        await self.service.finish_client_session(owner, request.path_params["session_id"], reason)
        return JSONResponse({"status": "finished"})

    async def telemetry(self, request: Request, owner: str) -> Response:
        return JSONResponse({"status": "accepted"})  # accepted and dropped: nothing leaves the lab

    async def capabilities(self, request: Request, owner: str) -> Response:
        return JSONResponse({"supported_models": [
            {"model_name": m["model_name"], "max_context_length": m["max_context_length"],
             "trainable": True, "sampleable": True} for m in self.service.supported_models()]})

    async def metrics(self, request: Request) -> Response:
        """Prometheus' text format, without a key: it holds no owner's data (core/telemetry.py)."""
        return Response(self.service.telemetry.render(), media_type=CONTENT_TYPE_LATEST)

    async def trace_export(self, request: Request, owner: str) -> Response:
        """Tinker's trace export: a link to the session's requests as a Perfetto-readable trace
        (Chrome trace JSON), which works without a key for TRACE_URL_SECONDS."""
        session = self.service.sessions.get(owner, validate.text(request.path_params["session_id"],
                                                                 "session_id"), live=False)
        token = self.service.telemetry.trace_url_token(owner, session.id)
        return JSONResponse({"status": "ready", "url": f"{str(request.base_url).rstrip('/')}/traces/{token}"})

    async def trace_download(self, request: Request) -> Response:
        found = self.service.telemetry.trace_for_token(request.path_params["token"])
        if found is None:
            return JSONResponse({"error": "trace link: unknown or expired (export the trace again)",
                                 "code": "NOT_FOUND"}, status_code=404)
        _, session_id = found
        return JSONResponse(self.service.telemetry.trace_json(session_id), headers={
            "content-disposition": f'attachment; filename="{session_id}.trace.json"'})

    async def healthz(self, request: Request) -> Response:
        """200 while the server answers; "degraded" while an engine is down or restarting."""
        engines = self.service.engine_health()
        status = "ok" if all(e["state"] == "up" for e in engines) else "degraded"
        return JSONResponse({"status": status, "server_version": __version__, "engines": engines})

    # ---------------------------------------------------------------- training

    async def create_model(self, request: Request, owner: str) -> Response:
        body = schemas.parse(schemas.CreateModel, await self.json_body(request))
        views.check_optimizer(body.optimizer_config)
        run_id = views.model_id(body.session_id, body.model_seq_id)
        lora = views.lora_spec(body.lora_config)
        seed = body.lora_config.seed if body.lora_config else None
        metadata = {k: str(v) for k, v in (body.user_metadata or {}).items()}
        self.service.sessions.get(owner, body.session_id)

        async def create():
            return await self.service.create_run(owner, body.base_model, lora, seed, metadata,
                                                 run_id=run_id, client_session=body.session_id)

        request_id = self.service.submit_async(owner, "create_model", create, views.run_result)
        return self.future(request_id, model_id=run_id)

    async def get_info(self, request: Request, owner: str) -> Response:
        body = schemas.parse(schemas.ModelRef, await self.json_body(request))
        info = self.service.run_info(owner, body.model_id)
        return JSONResponse(views.get_info(info, self.service.tokenizer_dir(info.base_model)))

    async def unload_model(self, request: Request, owner: str) -> Response:
        """Tinker's UnloadModelRequest: the run leaves memory after its queued requests."""
        body = schemas.parse(schemas.ModelRef, await self.json_body(request))
        self.service.own_run(owner, body.model_id)   # an unknown run is refused now, not as a future

        async def close():
            return await self.service.close_run(owner, body.model_id)

        request_id = self.service.submit_async(owner, "unload_model", close, views.run_result)
        return self.future(request_id, model_id=body.model_id)

    async def forward_backward(self, request: Request, owner: str) -> Response:
        if PROTO not in request.headers.get("content-type", ""):
            raise InvalidInput("content-type: forward_backward takes the Tinker protobuf body "
                               f"({PROTO})")
        if request.headers.get("content-encoding", "identity") not in ("identity", ""):
            raise InvalidInput("content-encoding: this server does not ask for compressed bodies")
        message = wire.parse_forward_backward(await read_body(request, MAX_PROTO_BYTES))
        self.service.own_run(owner, message.model_id)  # the owner before the tensors are decoded
        work = wire.forward_backward_work(message)
        digest = digest_of("forward_backward", message.SerializeToString(deterministic=True))
        request_id = self.numbered(owner, message.model_id, message.seq_id, "forward_backward",
                                   lambda: self.service.forward_backward(
                                       owner, message.model_id, message.seq_id, work,
                                       refusal_takes_number=True, digest=digest), digest)
        return self.future(request_id, model_id=message.model_id)

    async def optim_step(self, request: Request, owner: str) -> Response:
        raw = await self.json_body(request)
        body = schemas.parse(schemas.OptimStep, raw)
        digest = digest_of("optim_step", raw)
        if body.adam_params is None:
            raise InvalidInput("adam_params: this server runs AdamW (optimizer_params for other "
                               "optimizers are not offered)")
        adam = views.adam(body.adam_params)
        request_id = self.numbered(owner, body.model_id, body.seq_id, "optim_step",
                                   lambda: self.service.optim_step(owner, body.model_id, body.seq_id,
                                                                   adam, refusal_takes_number=True,
                                                                   digest=digest), digest)
        return self.future(request_id, model_id=body.model_id)

    async def save_weights(self, request: Request, owner: str) -> Response:
        raw = await self.json_body(request)
        body = schemas.parse(schemas.SaveWeights, raw)
        digest = digest_of("save_weights", raw)
        options = SaveOptions(body.ttl_seconds, body.overwrite, body.user_metadata or {})
        request_id = self.numbered(owner, body.model_id, body.seq_id, "save_weights",
                                   lambda: self.service.save_state(owner, body.model_id, body.seq_id,
                                                                   body.path or "", options,
                                                                   refusal_takes_number=True,
                                                                   digest=digest), digest)
        return self.future(request_id, model_id=body.model_id)

    async def save_weights_for_sampler(self, request: Request, owner: str) -> Response:
        raw = await self.json_body(request)
        body = schemas.parse(schemas.SaveWeightsForSampler, raw)
        digest = digest_of("save_weights_for_sampler", raw)
        options = SaveOptions(body.ttl_seconds, False, body.user_metadata or {})
        request_id = self.numbered(owner, body.model_id, body.seq_id, "save_sampler_weights",
                                   lambda: self.service.save_sampler_weights(
                                       owner, body.model_id, body.seq_id, body.path or "", options,
                                       refusal_takes_number=True, digest=digest), digest)
        if body.path:
            return self.future(request_id, model_id=body.model_id)
        # Unnamed (save_weights_and_get_sampling_client): the answer is a sampler on the snapshot.
        if request_id not in self._chained:
            session_id = self.service.run_client_session(owner, body.model_id)
            self._chained[request_id] = self.service.submit_async(
                owner, "open_sampler", lambda: self._open_saved(owner, request_id, session_id),
                views.sampler_result)
            while len(self._chained) > MAX_CHAINED:
                self._chained.popitem(last=False)
        return self.future(self._chained[request_id], model_id=body.model_id)

    async def _open_saved(self, owner: str, save_request_id: str, session_id: str | None):
        record = await self.service.wait_done(owner, save_request_id)
        saved = relay(record)  # a failed save fails the opener with the save's own error
        return await self.service.open_sampler(owner, model_path=saved.save_weights.path,
                                               client_session=session_id)

    async def load_weights(self, request: Request, owner: str) -> Response:
        raw = await self.json_body(request)
        body = schemas.parse(schemas.LoadWeights, raw)
        if body.weights_access_token:
            raise InvalidInput("weights_access_token: not offered; another owner's checkpoint loads "
                               "without one once its owner publishes it")
        if body.session_id is not None:  # create a training client from a state
            run_id = views.model_id(body.session_id, body.model_seq_id or 0)
            self.service.sessions.get(owner, body.session_id)
            metadata = {k: str(v) for k, v in (body.user_metadata or {}).items()}

            async def create():
                return await self.service.create_run_from_state(
                    owner, body.path, body.optimizer, metadata, run_id=run_id,
                    client_session=body.session_id)

            request_id = self.service.submit_async(owner, "create_model", create, views.run_result)
            return self.future(request_id, model_id=run_id)
        if body.model_id is None or body.seq_id is None:
            raise InvalidInput("model_id: give model_id and seq_id, or session_id and model_seq_id")
        digest = digest_of("load_weights", raw)
        request_id = self.numbered(owner, body.model_id, body.seq_id, "load_state",
                                   lambda: self.service.load_state(owner, body.model_id, body.seq_id,
                                                                   body.path, body.optimizer,
                                                                   refusal_takes_number=True,
                                                                   digest=digest), digest)
        return self.future(request_id, model_id=body.model_id)

    # ---------------------------------------------------------------- sampling

    async def create_sampling_session(self, request: Request, owner: str) -> Response:
        body = schemas.parse(schemas.CreateSamplingSession, await self.json_body(request))
        self.service.sessions.get(owner, body.session_id)
        info = await self.service.open_sampler(owner, base_model=body.base_model,
                                               model_path=body.model_path,
                                               client_session=body.session_id)
        return JSONResponse({"sampling_session_id": info.sampling_session_id})

    async def get_sampler(self, request: Request, owner: str) -> Response:
        info = self.service.sampler_info(owner, request.path_params["sampler_id"])
        return JSONResponse(views.sampler(info))

    async def asample(self, request: Request, owner: str) -> Response:
        body = schemas.parse(schemas.Sample, await self.json_body(request))
        session_id = body.sampling_session_id
        if session_id is None:
            raise InvalidInput("sampling_session_id: make a sampling session first "
                               "(create_sampling_session) and name it here")
        self.service.sampler_info(owner, session_id)  # the owner before the prompt is decoded
        work = wire.sample_from_json(body)
        request_id = self.service.sample(owner, session_id, work)
        return self.future(request_id, sample_sequence_ids=sample_sequence_ids(request_id, work.num_samples))

    # ---------------------------------------------------------------- futures

    async def retrieve_future(self, request: Request, owner: str) -> Response:
        body = schemas.parse(schemas.RetrieveFuture, await self.json_body(request))
        record = await self.service.wait(owner, body.request_id, MAX_POLL_SECONDS)
        if record.status == "pending":  # 408 + no-retry: the SDK polls again at once, quietly (a
            # 200 try_again is logged as a warning on every poll by tinker 0.38)
            return JSONResponse({"type": "try_again", "request_id": record.id, "queue_state": "active"},
                                status_code=408, headers={"x-should-retry": "false"})
        if record.status == "failed":
            category = "user" if record.error_code in CLIENT_CODES else "server"
            return JSONResponse({"error": record.error_message or record.error_code,
                                 "category": category, "code": record.error_code})
        return views.result_response(result_of(record))

    # ---------------------------------------------------------------- REST

    async def list_training_runs(self, request: Request, owner: str) -> Response:
        limit, offset = views.window(request)
        runs, total = self.service.list_runs(owner, limit, offset)
        return JSONResponse({"training_runs": [views.training_run(r, owner) for r in runs],
                             "cursor": {"offset": offset, "limit": limit, "total_count": total}})

    async def get_training_run(self, request: Request, owner: str) -> Response:
        info = self.service.run_info(owner, request.path_params["run_id"], with_checkpoints=True)
        return JSONResponse(views.training_run(info, owner))

    async def list_checkpoints(self, request: Request, owner: str) -> Response:
        rows = self.service.list_checkpoints(owner, request.path_params.get("run_id"))
        if "run_id" not in request.path_params:
            limit, offset = views.window(request)
            total, rows = len(rows), rows[offset:offset + limit]
            return JSONResponse({"checkpoints": [views.checkpoint(r) for r in rows],
                                 "cursor": {"offset": offset, "limit": limit, "total_count": total}})
        return JSONResponse({"checkpoints": [views.checkpoint(r) for r in rows]})

    async def delete_checkpoint(self, request: Request, owner: str) -> Response:
        path = views.checkpoint_path(request)
        await self.service.delete_checkpoint(owner, path)
        return JSONResponse({})

    async def set_checkpoint_ttl(self, request: Request, owner: str) -> Response:
        body = schemas.parse(schemas.SetTtl, await self.json_body(request))
        row = self.service.set_checkpoint_ttl(owner, views.checkpoint_path(request), body.ttl_seconds)
        return JSONResponse(views.checkpoint(row))

    async def weights_info(self, request: Request, owner: str) -> Response:
        body = schemas.parse(schemas.WeightsInfo, await self.json_body(request))
        return JSONResponse(views.weights_info(self.service.checkpoint_run_info(owner, body.tinker_path)))

    async def publish_checkpoint(self, request: Request, owner: str) -> Response:
        """POST publishes the owner's checkpoint to every owner of this server, DELETE unpublishes it."""
        self.service.set_published(owner, views.checkpoint_path(request), request.method == "POST")
        return JSONResponse({})

    async def save_weights_external(self, request: Request, owner: str) -> Response:
        raw = await self.json_body(request)
        body = schemas.parse(schemas.SaveWeightsExternal, raw)
        digest = digest_of("save_weights_external", raw)
        options = SaveOptions(body.ttl_seconds, False, {})
        request_id = self.numbered(owner, body.model_id, body.seq_id, "save_external_weights",
                                   lambda: self.service.save_external_weights(
                                       owner, body.model_id, body.seq_id, body.path, options,
                                       body.age_encryption_recipients, refusal_takes_number=True,
                                       digest=digest), digest)
        return self.future(request_id, model_id=body.model_id)

    async def external_weights_urls(self, request: Request, owner: str) -> Response:
        """Signed URLs, one per file, for the owner's external weights (they expire together)."""
        path, row, files = self.service.external_files(owner, views.checkpoint_path(request))
        urls, expires = self.weights_urls.sign(str(request.base_url), row.owner, path,
                                               [f.name for f in files])
        return JSONResponse({"urls": urls, "expires": expires.isoformat()})

    async def list_sessions(self, request: Request, owner: str) -> Response:
        return JSONResponse({"sessions": [s.id for s in self.service.sessions.list(owner)]})

    async def get_session(self, request: Request, owner: str) -> Response:
        session = self.service.sessions.get(owner, request.path_params["session_id"], live=False)
        return JSONResponse({"training_run_ids": session.run_ids,
                             "sampler_ids": self.service.session_samplers(session.id),
                             "user_metadata": session.user_metadata or None})


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused once it passes `limit` bytes (before the rest is read)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise InvalidInput(f"body: {int(declared)} bytes is over this route's limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InvalidInput(f"body: over this route's limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _refuse_constant(name: str) -> Any:
    raise InvalidInput(f"body: {name} is not a number JSON allows (values must be finite)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InvalidInput(f"body: {text[:40]} is outside the range of a 64-bit float")
    return value


def parse_json(raw: bytes) -> Any:
    """A JSON body as Python values: finite numbers only (no NaN, Infinity or 1e400), integers of
    at most 4,300 digits (Python's own bound), nesting at most MAX_JSON_DEPTH deep."""
    if not raw:
        return {}
    try:
        value = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise InvalidInput(f"body: nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidInput(f"body: not valid JSON ({error})") from None
    except ValueError as error:  # an integer past Python's digit limit
        raise InvalidInput(f"body: not valid JSON ({str(error)[:80]})") from None
    _check_tree(value)
    return value


def _check_tree(value: Any) -> None:
    """Refuse nesting past MAX_JSON_DEPTH, and strings that are not text: JSON's \\u escapes can
    spell a lone UTF-16 surrogate, which Python keeps in a str that no store, log or reply can
    encode. Iterative, so a body cannot exhaust the stack."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _text(item)
        elif isinstance(item, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise InvalidInput(f"body: nested deeper than {MAX_JSON_DEPTH} levels")
            if isinstance(item, dict):
                for key in item:
                    _text(key)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))


def _text(string: str) -> None:
    try:
        string.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput("body: a string holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape "
                           "without its pair), which is not text") from None


def digest_of(kind: str, body: Any) -> str:
    """A numbered request's digest (core.service.request_digest) from its protobuf bytes, serialized
    deterministically, or its JSON values with sorted keys."""
    data = body if isinstance(body, bytes) else json.dumps(body, sort_keys=True).encode()
    return request_digest(kind, data)


def endpoint(api: TinkerApi, handler: Callable[[Request, str], Awaitable[Response]]):
    """Authenticate, run, and answer any error with its status and a JSON body naming it."""

    @functools.wraps(handler)
    async def run(request: Request) -> Response:
        began = time.monotonic()
        try:
            response = await handler(request, api.owner(request))
        except Exception as error:  # noqa: BLE001 - mapped to a status here, once
            response = error_response(error)
        api.service.telemetry.observe_request("http", handler.__name__, str(response.status_code),
                                              time.monotonic() - began)
        return response

    return run
