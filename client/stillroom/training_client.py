"""TrainingClient: forward/backward passes, optimizer steps and weight saves for one training run.

Every call returns an APIFuture at once. Requests are numbered in the order they are made and sent
in that order over the shared connection; the server runs them in that order and applies a
repeated number once, so a retried send never applies an update twice.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Optional, Sequence

from stillroom import _wire, types
from stillroom._proto import stillroom_pb2 as pb
from stillroom.futures import APIFuture

if TYPE_CHECKING:
    from stillroom.sampling_client import SamplingClient
    from stillroom.service_client import ServiceClient


class TrainingClient:
    def __init__(self, service: "ServiceClient", info: pb.TrainingRunInfo) -> None:
        self._service = service
        self._connection = service._connection
        self._info = info
        self.training_run_id = info.training_run_id
        self.model_id = info.training_run_id
        self._next_seq = info.last_request_seq + 1
        self._send_lock: Optional[asyncio.Lock] = None  # created on the connection's loop

    # ---------------------------------------------------------------- numbering and sending

    def _numbered(self, build: Callable[[int], Any], method: str) -> Callable[[], Awaitable[pb.FutureRef]]:
        """A sender that takes the next request number and sends in call order."""

        async def send() -> pb.FutureRef:
            if self._send_lock is None:
                self._send_lock = asyncio.Lock()
            async with self._send_lock:
                request = build(self._next_seq)
                ref = await self._connection.call(method, request)
                self._next_seq += 1
                return ref

        return send

    def _submit(self, build: Callable[[int], Any], method: str,
                parse: Callable[[pb.FutureResult], Any]) -> APIFuture:
        return self._connection.submit(self._numbered(build, method), parse)

    async def _submit_async(self, build: Callable[[int], Any], method: str,
                            parse: Callable[[pb.FutureResult], Any]) -> APIFuture:
        return await self._connection.submit_async(self._numbered(build, method), parse)

    # ---------------------------------------------------------------- forward / backward

    def _forward_request(self, data: Sequence[types.Datum], loss_fn: str,
                         loss_fn_config: Optional[dict[str, float]], forward_only: bool):
        data_pb = [_wire.datum_to_pb(types.Datum.model_validate(d) if isinstance(d, dict) else d)
                   for d in data]

        def build(seq: int) -> pb.ForwardBackwardRequest:
            return pb.ForwardBackwardRequest(
                training_run_id=self.training_run_id, seq=seq, data=data_pb, loss_fn=loss_fn,
                loss_fn_config=loss_fn_config or {}, forward_only=forward_only)

        return build

    @staticmethod
    def _parse_forward(result: pb.FutureResult) -> types.ForwardBackwardOutput:
        return _wire.forward_backward_from_pb(result.forward_backward)

    def forward(self, data: Sequence[types.Datum], loss_fn: str,
                loss_fn_config: Optional[dict[str, float]] = None) -> APIFuture[types.ForwardBackwardOutput]:
        """The loss and its outputs without computing gradients."""
        build = self._forward_request(data, loss_fn, loss_fn_config, forward_only=True)
        return self._submit(build, "ForwardBackward", self._parse_forward)

    async def forward_async(self, data: Sequence[types.Datum], loss_fn: str,
                            loss_fn_config: Optional[dict[str, float]] = None) -> APIFuture[types.ForwardBackwardOutput]:
        build = self._forward_request(data, loss_fn, loss_fn_config, forward_only=True)
        return await self._submit_async(build, "ForwardBackward", self._parse_forward)

    def forward_backward(self, data: Sequence[types.Datum], loss_fn: str,
                         loss_fn_config: Optional[dict[str, float]] = None) -> APIFuture[types.ForwardBackwardOutput]:
        """Compute the loss and add its gradients to the run's accumulated gradients."""
        build = self._forward_request(data, loss_fn, loss_fn_config, forward_only=False)
        return self._submit(build, "ForwardBackward", self._parse_forward)

    async def forward_backward_async(self, data: Sequence[types.Datum], loss_fn: str,
                                     loss_fn_config: Optional[dict[str, float]] = None) -> APIFuture[types.ForwardBackwardOutput]:
        build = self._forward_request(data, loss_fn, loss_fn_config, forward_only=False)
        return await self._submit_async(build, "ForwardBackward", self._parse_forward)

    # ---------------------------------------------------------------- optimizer

    def _optim_request(self, adam_params: types.AdamParams):
        params_pb = _wire.adam_params_to_pb(adam_params)
        return lambda seq: pb.OptimStepRequest(training_run_id=self.training_run_id, seq=seq,
                                               adam_params=params_pb)

    @staticmethod
    def _parse_optim(result: pb.FutureResult) -> types.OptimStepResponse:
        return types.OptimStepResponse(metrics=dict(result.optim_step.metrics))

    def optim_step(self, adam_params: types.AdamParams) -> APIFuture[types.OptimStepResponse]:
        """Apply the accumulated gradients with AdamW, then clear them."""
        return self._submit(self._optim_request(adam_params), "OptimStep", self._parse_optim)

    async def optim_step_async(self, adam_params: types.AdamParams) -> APIFuture[types.OptimStepResponse]:
        return await self._submit_async(self._optim_request(adam_params), "OptimStep", self._parse_optim)

    # ---------------------------------------------------------------- saving weights

    def _save_request(self, name: Optional[str]):
        return lambda seq: pb.SaveWeightsRequest(training_run_id=self.training_run_id, seq=seq,
                                                 name=name or "")

    @staticmethod
    def _parse_save(result: pb.FutureResult) -> types.SaveWeightsForSamplerResponse:
        return types.SaveWeightsForSamplerResponse(path=result.save_weights.path)

    def save_weights_for_sampler(self, name: str) -> APIFuture[types.SaveWeightsForSamplerResponse]:
        """Snapshot the current weights for sampling as stillroom://<run>/sampler_weights/<name>."""
        return self._submit(self._save_request(name), "SaveWeightsForSampler", self._parse_save)

    async def save_weights_for_sampler_async(self, name: str) -> APIFuture[types.SaveWeightsForSamplerResponse]:
        return await self._submit_async(self._save_request(name), "SaveWeightsForSampler",
                                        self._parse_save)

    def save_weights_and_get_sampling_client(self, name: Optional[str] = None) -> "SamplingClient":
        path = self._submit(self._save_request(name), "SaveWeightsForSampler", self._parse_save)
        return self._service.create_sampling_client(model_path=path.result().path)

    async def save_weights_and_get_sampling_client_async(self, name: Optional[str] = None) -> "SamplingClient":
        future = await self._submit_async(self._save_request(name), "SaveWeightsForSampler",
                                          self._parse_save)
        return await self._service.create_sampling_client_async(model_path=(await future).path)

    # ---------------------------------------------------------------- information

    def get_info(self) -> types.GetInfoResponse:
        return self._connection.run(self._get_info())

    async def get_info_async(self) -> types.GetInfoResponse:
        return await self._connection.run_async(self._get_info())

    async def _get_info(self) -> types.GetInfoResponse:
        info = await self._connection.call(
            "GetTrainingRun", pb.GetTrainingRunRequest(training_run_id=self.training_run_id))
        return types.GetInfoResponse(
            training_run_id=info.training_run_id, model_name=info.base_model, is_lora=info.is_lora,
            lora_rank=info.lora_rank if info.is_lora else None,
            num_trainable_params=info.num_trainable_params,
            max_context_length=info.max_context_length, user_metadata=dict(info.user_metadata),
            created_at=info.created_at or None)

    def get_tokenizer(self) -> Any:
        """The base model's Hugging Face tokenizer (needs transformers on the client)."""
        return self._service._load_tokenizer(self._info.base_model)

    def __repr__(self) -> str:
        return f"<TrainingClient {self.training_run_id} on {self._info.base_model}>"
