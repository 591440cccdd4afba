"""SamplingClient: samples and log-probabilities from one immutable set of weights.

A sampling client made from a saved path always samples from those weights, whatever its training
run does next. Calls return APIFutures; concurrent calls on the same weights are batched on the
server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stillroom import _wire, types
from stillroom._proto import stillroom_pb2 as pb
from stillroom.futures import APIFuture, ClientFuture, forwarding

if TYPE_CHECKING:
    from stillroom.service_client import ServiceClient


class SamplingClient:
    def __init__(self, service: ServiceClient, info: pb.SamplingSessionInfo, *,
                 record_stability_info: bool = False) -> None:
        self._service = service
        self._connection = service._connection
        self._info = info
        self.sampling_session_id = info.sampling_session_id
        self.model_path = info.model_path or None
        self.record_stability_info = record_stability_info  # sequence ids are always given

    # ---------------------------------------------------------------- sample

    def _sample_item(self, prompt: types.ModelInput, num_samples: int,
                       sampling_params: types.SamplingParams, include_prompt_logprobs: bool,
                       topk_prompt_logprobs: int, topk_sample_logprobs: int,
                       target_prompt_logprobs: Any, prompt_alt_tokens_k: int,
                       prompt_logprobs_last_n: int | None):
        if prompt_alt_tokens_k:
            raise ValueError("sample: prompt_alt_tokens_k is not offered by Stillroom")
        request = pb.SampleRequest(
            sampling_session_id=self.sampling_session_id, prompt=_wire.model_input_to_pb(prompt),
            num_samples=num_samples, sampling_params=_wire.sampling_params_to_pb(sampling_params),
            include_prompt_logprobs=include_prompt_logprobs,
            topk_prompt_logprobs=topk_prompt_logprobs, topk_sample_logprobs=topk_sample_logprobs)
        if prompt_logprobs_last_n is not None:
            request.prompt_logprobs_last_n = prompt_logprobs_last_n
        if target_prompt_logprobs is not None:  # ids [len(prompt) - 1, K]; unlisted sparse cells: -1
            request.target_prompt_logprobs.CopyFrom(_wire.tensor_to_pb(target_prompt_logprobs.dense(-1)))
        return pb.SubmitItem(sample=request)

    @staticmethod
    def _parse_sample(result: pb.FutureResult) -> types.SampleResponse:
        return _wire.sample_from_pb(result.sample)

    def sample(self, prompt: types.ModelInput, num_samples: int,
               sampling_params: types.SamplingParams, include_prompt_logprobs: bool = False,
               topk_prompt_logprobs: int = 0, topk_sample_logprobs: int = 0,
               target_prompt_logprobs: Any = None, prompt_alt_tokens_k: int = 0,
               prompt_logprobs_last_n: int | None = None) -> APIFuture[types.SampleResponse]:
        """`num_samples` continuations of `prompt`. Each sequence has a `sequence_id`; with
        `topk_sample_logprobs` k > 0, its `topk_logprobs` lists the k likeliest (token, logprob)
        at each sampled position; `prompt_logprobs_last_n` scores only the prompt's last n tokens
        (for prompt logprobs and top-k prompt logprobs; earlier entries are None);
        `target_prompt_logprobs`, int64 token ids [len(prompt) - 1, K] (-1: none; sparse CSR lists
        only the cells asked for), gets their logprobs back in the same shape (0.0 where -1)."""
        item = self._sample_item(prompt, num_samples, sampling_params, include_prompt_logprobs,
                                   topk_prompt_logprobs, topk_sample_logprobs,
                                   target_prompt_logprobs, prompt_alt_tokens_k, prompt_logprobs_last_n)
        return self._connection.submit_item(item, self._parse_sample)

    async def sample_async(self, prompt: types.ModelInput, num_samples: int,
                           sampling_params: types.SamplingParams,
                           include_prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0,
                           topk_sample_logprobs: int = 0, target_prompt_logprobs: Any = None,
                           prompt_alt_tokens_k: int = 0,
                           prompt_logprobs_last_n: int | None = None) -> types.SampleResponse:
        """Like `sample`, awaiting the result (as Tinker's does)."""
        item = self._sample_item(prompt, num_samples, sampling_params, include_prompt_logprobs,
                                   topk_prompt_logprobs, topk_sample_logprobs,
                                   target_prompt_logprobs, prompt_alt_tokens_k, prompt_logprobs_last_n)
        return await self._connection.submit_item(item, self._parse_sample)

    # ---------------------------------------------------------------- logprobs

    def _logprobs_item(self, prompt: types.ModelInput, prompt_logprobs_last_n: int | None):
        request = pb.ComputeLogprobsRequest(sampling_session_id=self.sampling_session_id,
                                            prompt=_wire.model_input_to_pb(prompt))
        if prompt_logprobs_last_n is not None:
            request.prompt_logprobs_last_n = prompt_logprobs_last_n
        return pb.SubmitItem(compute_logprobs=request)

    @staticmethod
    def _parse_logprobs(result: pb.FutureResult) -> list[float | None]:
        return _wire.logprobs_from_pb(result.compute_logprobs)

    def compute_logprobs(self, prompt: types.ModelInput,
                         prompt_logprobs_last_n: int | None = None) -> APIFuture[list[float | None]]:
        """Each token's logprob given the tokens before it; the first entry is None (and, with
        `prompt_logprobs_last_n`, every entry before the last n)."""
        return self._connection.submit_item(self._logprobs_item(prompt, prompt_logprobs_last_n),
                                            self._parse_logprobs)

    async def compute_logprobs_async(self, prompt: types.ModelInput,
                                     prompt_logprobs_last_n: int | None = None) -> list[float | None]:
        return await self.compute_logprobs(prompt, prompt_logprobs_last_n)

    # ---------------------------------------------------------------- information

    def get_base_model(self) -> str:
        return self._info.base_model

    async def get_base_model_async(self) -> str:
        return self._info.base_model

    def get_telemetry(self) -> None:
        """Tinker's client telemetry; Stillroom sends none."""
        return None

    def get_tokenizer(self) -> Any:
        return self._service._load_tokenizer(self._info.base_model)

    def __repr__(self) -> str:
        return f"<SamplingClient {self.model_path or self._info.base_model}>"


@forwarding(SamplingClient)
class BackcompatSamplingClientFuture(ClientFuture[SamplingClient], SamplingClient):
    """What `create_sampling_client` returns: the client, usable at once, and a future of it
    (`.result()`, `await`), as Tinker's."""


SamplingClientFuture = BackcompatSamplingClientFuture
