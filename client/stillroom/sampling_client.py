"""SamplingClient: samples and log-probabilities from one immutable set of weights.

A sampling client made from a saved path always samples from those weights, whatever its training
run does next. Calls return APIFutures; concurrent calls on the same weights are batched on the
server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from stillroom import _wire, types
from stillroom._proto import stillroom_pb2 as pb
from stillroom.futures import APIFuture

if TYPE_CHECKING:
    from stillroom.service_client import ServiceClient


class SamplingClient:
    def __init__(self, service: "ServiceClient", info: pb.SamplingSessionInfo) -> None:
        self._service = service
        self._connection = service._connection
        self._info = info
        self.sampling_session_id = info.sampling_session_id
        self.model_path = info.model_path or None

    # ---------------------------------------------------------------- sample

    def _sample_sender(self, prompt: types.ModelInput, num_samples: int,
                       sampling_params: types.SamplingParams, include_prompt_logprobs: bool,
                       topk_prompt_logprobs: int):
        request = pb.SampleRequest(
            sampling_session_id=self.sampling_session_id, prompt=_wire.model_input_to_pb(prompt),
            num_samples=num_samples, sampling_params=_wire.sampling_params_to_pb(sampling_params),
            include_prompt_logprobs=include_prompt_logprobs,
            topk_prompt_logprobs=topk_prompt_logprobs)
        return lambda: self._connection.call("Sample", request)

    @staticmethod
    def _parse_sample(result: pb.FutureResult) -> types.SampleResponse:
        return _wire.sample_from_pb(result.sample)

    def sample(self, prompt: types.ModelInput, num_samples: int,
               sampling_params: types.SamplingParams, include_prompt_logprobs: bool = False,
               topk_prompt_logprobs: int = 0) -> APIFuture[types.SampleResponse]:
        send = self._sample_sender(prompt, num_samples, sampling_params, include_prompt_logprobs,
                                   topk_prompt_logprobs)
        return self._connection.submit(send, self._parse_sample)

    async def sample_async(self, prompt: types.ModelInput, num_samples: int,
                           sampling_params: types.SamplingParams,
                           include_prompt_logprobs: bool = False,
                           topk_prompt_logprobs: int = 0) -> APIFuture[types.SampleResponse]:
        send = self._sample_sender(prompt, num_samples, sampling_params, include_prompt_logprobs,
                                   topk_prompt_logprobs)
        return await self._connection.submit_async(send, self._parse_sample)

    # ---------------------------------------------------------------- logprobs

    def _logprobs_sender(self, prompt: types.ModelInput):
        request = pb.ComputeLogprobsRequest(sampling_session_id=self.sampling_session_id,
                                            prompt=_wire.model_input_to_pb(prompt))
        return lambda: self._connection.call("ComputeLogprobs", request)

    @staticmethod
    def _parse_logprobs(result: pb.FutureResult) -> list[Optional[float]]:
        return _wire.logprobs_from_pb(result.compute_logprobs)

    def compute_logprobs(self, prompt: types.ModelInput) -> APIFuture[list[Optional[float]]]:
        """Each token's logprob given the tokens before it; the first entry is None."""
        return self._connection.submit(self._logprobs_sender(prompt), self._parse_logprobs)

    async def compute_logprobs_async(self, prompt: types.ModelInput) -> APIFuture[list[Optional[float]]]:
        return await self._connection.submit_async(self._logprobs_sender(prompt), self._parse_logprobs)

    # ---------------------------------------------------------------- information

    def get_base_model(self) -> str:
        return self._info.base_model

    def get_tokenizer(self) -> Any:
        return self._service._load_tokenizer(self._info.base_model)

    def __repr__(self) -> str:
        return f"<SamplingClient {self.model_path or self._info.base_model}>"
