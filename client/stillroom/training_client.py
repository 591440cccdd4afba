"""TrainingClient: forward/backward passes, optimizer steps and weight saves for one training run.

Every call returns an APIFuture at once. Requests are numbered in the order they are made and sent
in that order over the shared connection; the server runs them in that order and applies a
repeated number once, so a retried send never applies an update twice.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from stillroom import _wire, types
from stillroom._metrics import merge_metrics
from stillroom._proto import stillroom_pb2 as pb
from stillroom.futures import APIFuture, ClientFuture, forwarding
from stillroom.sampling_client import SamplingClient, SamplingClientFuture

if TYPE_CHECKING:
    from stillroom.service_client import ServiceClient


CustomLossFn = Callable[[list[types.Datum], list[Any]], tuple[Any, dict[str, float]]]
LossConfig = dict[str, "float | str"]
MAX_CHUNK_BYTES = 32 << 20


def _split_by_size(data: list[pb.Datum], limit: int) -> list[list[pb.Datum]]:
    parts: list[list[pb.Datum]] = [[]]
    size = 0
    for datum in data:
        n = datum.ByteSize()
        if parts[-1] and size + n > limit:
            parts.append([])
            size = 0
        parts[-1].append(datum)
        size += n
    return parts


def _merge_outputs(outputs: list[types.ForwardBackwardOutput]) -> types.ForwardBackwardOutput:
    """One call's output from its parts': outputs in order, metrics merged (see _metrics.py)."""
    tokens = [sum(len(o["logprobs"].data) for o in out.loss_fn_outputs) for out in outputs]
    metrics = merge_metrics([(out.metrics, n) for out, n in zip(outputs, tokens)])
    return types.ForwardBackwardOutput(
        loss_fn_outputs=[o for out in outputs for o in out.loss_fn_outputs], metrics=metrics)


def _check_kind(kind: str) -> None:
    if kind != "snapshot":
        raise ValueError(f"kind: Stillroom's sampling clients are snapshots of saved weights; got {kind!r}")


def _as_data(data: Sequence[types.Datum | dict]) -> list[types.Datum]:
    return [types.Datum.model_validate(d) if isinstance(d, dict) else d for d in data]


def _with_inputs(datum: types.Datum, **inputs: list) -> types.Datum:
    return types.Datum.model_validate({"model_input": datum.model_input, "loss_fn_inputs": inputs})


def _custom_loss_weights(data: list[types.Datum], forward: types.ForwardBackwardOutput,
                         loss_fn: CustomLossFn) -> tuple[list[list[float]], float, dict[str, float]]:
    """Evaluate the user's loss on the forward's logprobs; return minus its gradient per datum."""
    import torch  # only here: `import stillroom` must not import torch

    logprobs_list = [torch.tensor(out["logprobs"].data, dtype=torch.float32).requires_grad_(True)
                     for out in forward.loss_fn_outputs]
    loss, metrics = loss_fn(data, logprobs_list)
    if not (isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.requires_grad):
        raise ValueError("forward_backward_custom: loss_fn must return a scalar torch tensor that "
                         "depends on the logprobs it was given")
    grads = torch.autograd.grad(loss, logprobs_list, allow_unused=True)
    weights = []
    for i, (logprobs, grad) in enumerate(zip(logprobs_list, grads)):
        grad = torch.zeros_like(logprobs) if grad is None else grad
        if not bool(torch.isfinite(grad).all()):
            raise ValueError(f"forward_backward_custom: the loss's gradient for data[{i}] is not "
                             "finite (NaN or inf)")
        weights.append((-grad).tolist())
    value = float(loss.detach())
    if not math.isfinite(value):
        raise ValueError(f"forward_backward_custom: the loss is not finite ({value})")
    metrics = {key: float(v.detach() if isinstance(v, torch.Tensor) else v)
               for key, v in (metrics or {}).items()}
    return weights, value, metrics


SUBMITTED = {"ForwardBackward": "forward_backward", "OptimStep": "optim_step"}  # sent through Submit


class TrainingClient:
    def __init__(self, service: ServiceClient, info: pb.TrainingRunInfo) -> None:
        self._service = service
        self._connection = service._connection
        self._info = info
        self.training_run_id = info.training_run_id
        self.model_id = info.training_run_id
        self._next_seq = info.last_request_seq + 1
        self._send_lock: asyncio.Lock | None = None  # created on the connection's loop
        self.max_chunk_bytes = MAX_CHUNK_BYTES

    # ---------------------------------------------------------------- numbering and sending

    def _lock(self) -> asyncio.Lock:
        """The lock that keeps numbering and sending in call order (on the connection's loop)."""
        if self._send_lock is None:
            self._send_lock = asyncio.Lock()
        return self._send_lock

    async def _send_next(self, build: Callable[[int], Any], method: str) -> pb.FutureRef:
        """Send the request numbered `_next_seq`; the caller holds `_lock()`."""
        ref = await self._connection.call(method, build(self._next_seq))
        self._next_seq += 1
        return ref

    def _numbered(self, build: Callable[[int], Any], method: str) -> Callable[[], Awaitable[Any]]:
        """A sender that takes the next request number and sends in call order (forward_backward
        and optim_step through `Submit`, their results coming back on its stream)."""
        field = SUBMITTED.get(method)

        async def send() -> Any:
            async with self._lock():
                if field is None:
                    return await self._send_next(build, method)
                item = pb.SubmitItem(**{field: build(self._next_seq)})
                accepted = await self._connection.submitter().send(item)
                self._next_seq += 1
                return accepted

        return send

    def _submit(self, build: Callable[[int], Any], method: str,
                parse: Callable[[pb.FutureResult], Any]) -> APIFuture:
        return self._connection.submit(self._numbered(build, method), parse)

    async def _submit_async(self, build: Callable[[int], Any], method: str,
                            parse: Callable[[pb.FutureResult], Any]) -> APIFuture:
        return await self._connection.submit_async(self._numbered(build, method), parse)

    # ---------------------------------------------------------------- forward / backward

    def _forward_request(self, data: Sequence[types.Datum], loss_fn: str,
                         loss_fn_config: LossConfig | None, forward_only: bool):
        return self._forward_parts(data, loss_fn, loss_fn_config, forward_only, chunk=False)[0]

    def _forward_parts(self, data: Sequence[types.Datum], loss_fn: str,
                       loss_fn_config: LossConfig | None, forward_only: bool,
                       chunk: bool = True) -> list[Callable[[int], pb.ForwardBackwardRequest]]:
        """Request builders for a forward(_backward) call: one, or one per part of a call too
        large for one message (parts of at most `max_chunk_bytes` of data, in order)."""
        numbers = {k: float(v) for k, v in (loss_fn_config or {}).items() if not isinstance(v, str)}
        strings = {k: v for k, v in (loss_fn_config or {}).items() if isinstance(v, str)}
        data_pb = [_wire.datum_to_pb(datum) for datum in _as_data(data)]
        parts = _split_by_size(data_pb, self.max_chunk_bytes) if chunk else [data_pb]

        def builder(part_data: list[pb.Datum], part: int):
            def build(seq: int) -> pb.ForwardBackwardRequest:
                return pb.ForwardBackwardRequest(
                    training_run_id=self.training_run_id, seq=seq, data=part_data, loss_fn=loss_fn,
                    loss_fn_config=numbers, loss_fn_config_strings=strings,
                    forward_only=forward_only, part=part if len(parts) > 1 else 0,
                    num_parts=len(parts) if len(parts) > 1 else 0)
            return build

        return [builder(part_data, i) for i, part_data in enumerate(parts)]

    @staticmethod
    def _parse_forward(result: pb.FutureResult) -> types.ForwardBackwardOutput:
        return _wire.forward_backward_from_pb(result.forward_backward)

    def _forward_call(self, data, loss_fn, loss_fn_config,
                      forward_only) -> APIFuture[types.ForwardBackwardOutput]:
        builds = self._forward_parts(data, loss_fn, loss_fn_config, forward_only)
        if len(builds) == 1:
            return self._submit(builds[0], "ForwardBackward", self._parse_forward)
        submitted: concurrent.futures.Future[str] = concurrent.futures.Future()
        return APIFuture(self._connection.spawn(self._send_parts(builds, submitted)), submitted)

    async def _send_parts(self, builds,
                          submitted: concurrent.futures.Future[str]) -> types.ForwardBackwardOutput:
        """Send a chunked call's parts back to back, then merge their outputs in order."""
        try:
            async with self._lock():
                refs = [await self._send_next(build, "ForwardBackward") for build in builds]
        except BaseException as error:
            submitted.set_exception(error)
            raise
        submitted.set_result(refs[-1].request_id)
        outputs = [self._parse_forward(await self._connection.wait_for(ref.request_id)) for ref in refs]
        return _merge_outputs(outputs)

    async def _forward_call_async(self, data, loss_fn, loss_fn_config, forward_only):
        future = self._forward_call(data, loss_fn, loss_fn_config, forward_only)
        await asyncio.wrap_future(future._submitted)
        return future

    def forward(self, data: Sequence[types.Datum], loss_fn: str,
                loss_fn_config: LossConfig | None = None) -> APIFuture[types.ForwardBackwardOutput]:
        """The loss and its outputs without computing gradients."""
        return self._forward_call(data, loss_fn, loss_fn_config, forward_only=True)

    async def forward_async(self, data: Sequence[types.Datum], loss_fn: str,
                            loss_fn_config: LossConfig | None = None,
                            ) -> APIFuture[types.ForwardBackwardOutput]:
        return await self._forward_call_async(data, loss_fn, loss_fn_config, forward_only=True)

    def forward_backward(self, data: Sequence[types.Datum], loss_fn: str,
                         loss_fn_config: LossConfig | None = None) -> APIFuture[types.ForwardBackwardOutput]:
        """Compute the loss and add its gradients to the run's accumulated gradients.

        Data larger than `max_chunk_bytes` travels as several numbered parts whose outputs are
        merged back in order; the server adds the parts' gradients only once all have succeeded.
        """
        return self._forward_call(data, loss_fn, loss_fn_config, forward_only=False)

    async def forward_backward_async(self, data: Sequence[types.Datum], loss_fn: str,
                                     loss_fn_config: LossConfig | None = None,
                                     ) -> APIFuture[types.ForwardBackwardOutput]:
        return await self._forward_call_async(data, loss_fn, loss_fn_config, forward_only=False)

    # ---------------------------------------------------------------- custom losses

    def forward_backward_custom(self, data: Sequence[types.Datum], loss_fn: CustomLossFn, *,
                                loss_type_input: str | None = None) -> APIFuture[types.ForwardBackwardOutput]:
        """Train on any differentiable function of the target tokens' logprobs.

        `loss_fn(data, logprobs_list) -> (loss, metrics)` gets one 1-D float32 torch tensor per
        datum (requires_grad) and runs here, on the client. The SDK sends a `forward` for those
        logprobs, then a `forward_backward` with `cross_entropy` weights equal to minus the
        gradient of `loss` with respect to them, so the model's gradient is the loss's gradient.
        The two requests go out back to back: a call made after this one is numbered after
        both. Metrics are the user's, with `loss:sum` set to the value of `loss`.
        `loss_type_input` is Tinker's deprecated argument: only "logprobs" (or None) is accepted.
        """
        if loss_type_input not in (None, "logprobs"):
            raise ValueError(f"loss_type_input: only 'logprobs' is supported, got {loss_type_input!r}")
        data = _as_data(data)
        for i, datum in enumerate(data):
            if "target_tokens" not in datum.loss_fn_inputs:
                raise ValueError(f"data[{i}].loss_fn_inputs: forward_backward_custom needs target_tokens")
        submitted: concurrent.futures.Future[str] = concurrent.futures.Future()
        done = self._connection.spawn(self._forward_backward_custom(data, loss_fn, submitted))
        return APIFuture(done, submitted)

    async def forward_backward_custom_async(
            self, data: Sequence[types.Datum], loss_fn: CustomLossFn, *,
            loss_type_input: str | None = None) -> APIFuture[types.ForwardBackwardOutput]:
        """Like `forward_backward_custom`; returns once the gradient request has been accepted."""
        future = self.forward_backward_custom(data, loss_fn, loss_type_input=loss_type_input)
        await asyncio.wrap_future(future._submitted)
        return future

    async def _forward_backward_custom(self, data: list[types.Datum], loss_fn: CustomLossFn,
                                       submitted: concurrent.futures.Future[str],
                                       ) -> types.ForwardBackwardOutput:
        try:
            async with self._lock():  # nothing else is numbered between the two requests
                probe = [_with_inputs(d, target_tokens=d.loss_fn_inputs["target_tokens"].data,
                                      weights=[0.0] * d.model_input.length) for d in data]
                forward_ref = await self._send_next(
                    self._forward_request(probe, "cross_entropy", None, forward_only=True),
                    "ForwardBackward")
                forward = self._parse_forward(await self._connection.wait_for(forward_ref.request_id))
                loop = asyncio.get_running_loop()
                weights, loss, metrics = await loop.run_in_executor(
                    None, _custom_loss_weights, data, forward, loss_fn)
                linear = [_with_inputs(d, target_tokens=d.loss_fn_inputs["target_tokens"].data,
                                       weights=w) for d, w in zip(data, weights)]
                ref = await self._send_next(
                    self._forward_request(linear, "cross_entropy", None, forward_only=False),
                    "ForwardBackward")
        except BaseException as error:
            submitted.set_exception(error)
            raise
        submitted.set_result(ref.request_id)
        result = self._parse_forward(await self._connection.wait_for(ref.request_id))
        return types.ForwardBackwardOutput(loss_fn_outputs=result.loss_fn_outputs,
                                           metrics={**metrics, "loss:sum": loss})

    # ---------------------------------------------------------------- optimizer

    def _optim_request(self, optim_params: types.AdamParams | None,
                       adam_params: types.AdamParams | None):
        if (optim_params is None) == (adam_params is None):
            raise ValueError("optim_step needs exactly one of optim_params or adam_params")
        params = optim_params if optim_params is not None else adam_params
        if not isinstance(params, types.AdamParams):
            raise ValueError(f"optim_step: Stillroom trains with AdamW only; got {type(params).__name__}")
        params_pb = _wire.adam_params_to_pb(params)
        return lambda seq: pb.OptimStepRequest(training_run_id=self.training_run_id, seq=seq,
                                               adam_params=params_pb)

    @staticmethod
    def _parse_optim(result: pb.FutureResult) -> types.OptimStepResponse:
        return types.OptimStepResponse(metrics=dict(result.optim_step.metrics))

    def optim_step(self, optim_params: types.AdamParams | None = None, *,
                   adam_params: types.AdamParams | None = None) -> APIFuture[types.OptimStepResponse]:
        """Apply the accumulated gradients with AdamW, then clear them."""
        return self._submit(self._optim_request(optim_params, adam_params), "OptimStep",
                            self._parse_optim)

    async def optim_step_async(
            self, optim_params: types.AdamParams | None = None, *,
            adam_params: types.AdamParams | None = None) -> APIFuture[types.OptimStepResponse]:
        return await self._submit_async(self._optim_request(optim_params, adam_params), "OptimStep",
                                        self._parse_optim)

    # ---------------------------------------------------------------- saving weights

    def _save_request(self, name: str | None, ttl_seconds: int | None = None,
                      user_metadata: dict[str, str] | None = None, overwrite: bool = False):
        def build(seq: int) -> pb.SaveWeightsRequest:
            request = pb.SaveWeightsRequest(training_run_id=self.training_run_id, seq=seq,
                                            name=name or "", user_metadata=user_metadata or {},
                                            overwrite=overwrite)
            if ttl_seconds is not None:
                request.ttl_seconds = ttl_seconds
            return request
        return build

    @staticmethod
    def _parse_save(result: pb.FutureResult) -> types.SaveWeightsForSamplerResponse:
        return types.SaveWeightsForSamplerResponse(path=result.save_weights.path)

    def save_weights_for_sampler(self, name: str | None, ttl_seconds: int | None = None,
                                 user_metadata: dict[str, str] | None = None,
                                 ) -> APIFuture[types.SaveWeightsForSamplerResponse]:
        """Snapshot the current weights for sampling as stillroom://<run>/sampler_weights/<name>;
        the server deletes it `ttl_seconds` later (None: kept until deleted)."""
        return self._submit(self._save_request(name, ttl_seconds, user_metadata),
                            "SaveWeightsForSampler", self._parse_save)

    async def save_weights_for_sampler_async(self, name: str | None, ttl_seconds: int | None = None,
                                             user_metadata: dict[str, str] | None = None,
                                             ) -> APIFuture[types.SaveWeightsForSamplerResponse]:
        return await self._submit_async(self._save_request(name, ttl_seconds, user_metadata),
                                        "SaveWeightsForSampler", self._parse_save)

    def save_weights_and_get_sampling_client(
            self, name: str | None = None, retry_config: Any = None,
            record_stability_info: bool = False, kind: str = "snapshot") -> SamplingClientFuture:
        """Save sampler weights (a server-chosen name when `name` is None) and a sampling client
        on them: usable at once as the client, or through `.result()` / `await`."""
        _check_kind(kind)
        path = self._submit(self._save_request(name), "SaveWeightsForSampler", self._parse_save)

        async def create():
            saved = await path
            return await self._service._create_sampling_client(
                saved.path, None, record_stability_info=record_stability_info)

        future = SamplingClientFuture(self._connection.spawn(create()))
        future.result()  # errors surface here, at the call
        return future

    async def save_weights_and_get_sampling_client_async(
            self, name: str | None = None, retry_config: Any = None,
            record_stability_info: bool = False, kind: str = "snapshot") -> SamplingClient:
        _check_kind(kind)
        saved = await (await self._submit_async(self._save_request(name), "SaveWeightsForSampler",
                                                self._parse_save))
        return await self._service.create_sampling_client_async(
            model_path=saved.path, record_stability_info=record_stability_info)

    def create_sampling_client(self, model_path: str, retry_config: Any = None,
                               record_stability_info: bool = False) -> SamplingClientFuture:
        """A sampling client on saved sampler weights (as ServiceClient.create_sampling_client)."""
        return self._service.create_sampling_client(model_path=model_path,
                                                    record_stability_info=record_stability_info)

    async def create_sampling_client_async(self, model_path: str, retry_config: Any = None,
                                           record_stability_info: bool = False) -> SamplingClient:
        return await self._service.create_sampling_client_async(
            model_path=model_path, record_stability_info=record_stability_info)

    # ---------------------------------------------------------------- training state

    @staticmethod
    def _parse_save_state(result: pb.FutureResult) -> types.SaveWeightsResponse:
        return types.SaveWeightsResponse(path=result.save_weights.path)

    def save_state(self, name: str | None, ttl_seconds: int | None = None, overwrite: bool = False,
                   user_metadata: dict[str, str] | None = None) -> APIFuture[types.SaveWeightsResponse]:
        """Save weights and optimizer state as stillroom://<run>/weights/<name>, in request order
        (name None: the server picks one). `overwrite` replaces a state of that name (else the
        save fails with ConflictError); the server deletes it `ttl_seconds` later."""
        return self._submit(self._save_request(name, ttl_seconds, user_metadata, overwrite),
                            "SaveState", self._parse_save_state)

    async def save_state_async(self, name: str | None, ttl_seconds: int | None = None,
                               overwrite: bool = False, user_metadata: dict[str, str] | None = None,
                               ) -> APIFuture[types.SaveWeightsResponse]:
        return await self._submit_async(self._save_request(name, ttl_seconds, user_metadata, overwrite),
                                        "SaveState", self._parse_save_state)

    def _load_state_request(self, path: str, with_optimizer: bool):
        path = _wire.checkpoint_path(path)
        return lambda seq: pb.LoadStateRequest(training_run_id=self.training_run_id, seq=seq,
                                               path=path, with_optimizer=with_optimizer)

    @staticmethod
    def _parse_load_state(result: pb.FutureResult) -> types.LoadWeightsResponse:
        return types.LoadWeightsResponse(path=result.save_weights.path, type="load_weights")

    def load_state(self, path: str,
                   weights_access_token: str | None = None) -> APIFuture[types.LoadWeightsResponse]:
        """Replace this run's weights with a saved state's; the optimizer starts afresh."""
        return self._submit(self._load_state_request(path, False), "LoadState", self._parse_load_state)

    async def load_state_async(
            self, path: str, weights_access_token: str | None = None) -> APIFuture[types.LoadWeightsResponse]:
        return await self._submit_async(self._load_state_request(path, False), "LoadState",
                                        self._parse_load_state)

    def load_state_with_optimizer(self, path: str,
                                  weights_access_token: str | None = None,
                                  ) -> APIFuture[types.LoadWeightsResponse]:
        """Replace this run's weights and optimizer state (moments, step counts) with a saved state's."""
        return self._submit(self._load_state_request(path, True), "LoadState", self._parse_load_state)

    async def load_state_with_optimizer_async(
            self, path: str, weights_access_token: str | None = None) -> APIFuture[types.LoadWeightsResponse]:
        return await self._submit_async(self._load_state_request(path, True), "LoadState",
                                        self._parse_load_state)

    # ---------------------------------------------------------------- information

    def get_info(self) -> types.GetInfoResponse:
        return self._connection.run(self._get_info())

    async def get_info_async(self) -> types.GetInfoResponse:
        return await self._connection.run_async(self._get_info())

    async def _get_info(self) -> types.GetInfoResponse:
        info = await self._connection.call(
            "GetTrainingRun", pb.GetTrainingRunRequest(training_run_id=self.training_run_id))
        return types.GetInfoResponse(
            model_id=info.training_run_id, type="get_info",
            model_data=types.ModelData(model_name=info.base_model, tokenizer_id=info.base_model),
            training_run_id=info.training_run_id, model_name=info.base_model, is_lora=info.is_lora,
            lora_rank=info.lora_rank if info.is_lora else None,
            num_trainable_params=info.num_trainable_params,
            max_context_length=info.max_context_length, user_metadata=dict(info.user_metadata),
            created_at=info.created_at or None)

    # ---------------------------------------------------------------- ending

    def unload(self) -> None:
        """Free this run's memory on the server once its queued requests are done (Tinker's
        UnloadModelRequest). Its checkpoints stay; `create_training_client_from_state` resumes it.
        Later calls on this client are refused, naming the run's last saved state."""
        self._connection.run(self._unload())

    async def unload_async(self) -> None:
        await self._connection.run_async(self._unload())

    async def _unload(self) -> None:
        async with self._lock():  # after every call made before it has been accepted
            await self._connection.call(
                "CloseTrainingRun", pb.GetTrainingRunRequest(training_run_id=self.training_run_id))

    def get_tokenizer(self) -> Any:
        """The base model's Hugging Face tokenizer (needs transformers on the client)."""
        return self._service._load_tokenizer(self._info.base_model)

    def get_telemetry(self) -> None:
        """Tinker's client telemetry; Stillroom sends none."""
        return None

    def __repr__(self) -> str:
        return f"<TrainingClient {self.training_run_id} on {self._info.base_model}>"


@forwarding(TrainingClient)
class BackcompatTrainingClientFuture(ClientFuture[TrainingClient], TrainingClient):
    """What `create_*training_client*` return: the client, usable at once, and a future of it
    (`.result()`, `await`), as Tinker's."""


TrainingClientFuture = BackcompatTrainingClientFuture
