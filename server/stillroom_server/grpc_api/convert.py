"""Stillroom protobuf requests -> engine types. Malformed wire data raises InvalidInput naming the field.

Results go the other way in core/results.py (the store keeps them in Stillroom's message form)."""

from __future__ import annotations

import math

import numpy as np
import torch

from stillroom._proto import stillroom_pb2 as pb
from stillroom_server.core import validate
from stillroom_server.engine.errors import InvalidInput
from stillroom_server.engine.types import (
    AdamConfig,
    ForwardBackwardWork,
    LogprobsWork,
    SampleWork,
    SamplingConfig,
    TrainDatum,
)

_NUMPY = {pb.INT64: np.dtype("<i8"), pb.FLOAT32: np.dtype("<f4")}


def tensor_from_pb(message: pb.Tensor, field: str, dtype: int | None = None) -> torch.Tensor:
    if message.dtype not in _NUMPY:
        raise InvalidInput(f"{field}: unknown dtype {message.dtype}")
    if dtype is not None and message.dtype != dtype:
        raise InvalidInput(f"{field}: dtype must be {pb.DType.Name(dtype).lower()}, "
                           f"got {pb.DType.Name(message.dtype).lower()}")
    shape = list(message.shape)
    if not 1 <= len(shape) <= validate.MAX_TENSOR_DIMS:
        raise InvalidInput(f"{field}: shape {shape[:8]} must have 1 to {validate.MAX_TENSOR_DIMS} dimensions")
    if any(d < 0 for d in shape):
        raise InvalidInput(f"{field}: negative dimension in shape {shape}")
    itemsize = _NUMPY[message.dtype].itemsize
    if len(message.data) != math.prod(shape) * itemsize:
        raise InvalidInput(f"{field}: {len(message.data)} bytes do not hold shape {shape} "
                           f"of {itemsize}-byte values")
    array = np.frombuffer(message.data, dtype=_NUMPY[message.dtype]).reshape(shape)
    return torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=True))


def tokens_from_pb(model_input: pb.ModelInput, field: str) -> torch.Tensor:
    parts = []
    for i, chunk in enumerate(model_input.chunks):
        if chunk.WhichOneof("chunk") != "encoded_text":
            raise InvalidInput(f"{field}.chunks[{i}]: only encoded_text chunks are supported")
        tokens = tensor_from_pb(chunk.encoded_text.tokens, f"{field}.chunks[{i}].tokens", pb.INT64)
        if tokens.dim() != 1:
            raise InvalidInput(f"{field}.chunks[{i}].tokens: must be 1-D, got shape {list(tokens.shape)}")
        parts.append(tokens)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def forward_backward_from_pb(request: pb.ForwardBackwardRequest) -> ForwardBackwardWork:
    data = []
    for i, datum in enumerate(request.data):
        tokens_T = tokens_from_pb(datum.model_input, f"data[{i}].model_input")
        inputs = {}
        for key, tensor in datum.loss_fn_inputs.items():
            expected = pb.INT64 if key == "target_tokens" else pb.FLOAT32
            inputs[key] = tensor_from_pb(tensor, f"data[{i}].loss_fn_inputs.{key}", expected)
        data.append(TrainDatum(tokens_T, inputs))
    return ForwardBackwardWork(data=data, loss_fn=request.loss_fn,
                               loss_fn_config=dict(request.loss_fn_config),
                               forward_only=request.forward_only,
                               loss_fn_config_strings=dict(request.loss_fn_config_strings),
                               part=request.part, num_parts=request.num_parts)


def adam_from_pb(params: pb.AdamParams) -> AdamConfig:
    return AdamConfig(params.learning_rate, params.beta1, params.beta2, params.eps,
                      params.weight_decay, params.grad_clip_norm)


def sample_from_pb(request: pb.SampleRequest) -> SampleWork:
    params = request.sampling_params
    stop_tokens, stop_texts = [], []
    for i, condition in enumerate(params.stop):
        kind = condition.WhichOneof("kind")
        if kind == "text":
            stop_texts.append(condition.text)
        elif kind == "token":
            stop_tokens.append(condition.token)
        else:
            raise InvalidInput(f"sampling_params.stop[{i}]: needs a text or a token")
    config = SamplingConfig(
        max_tokens=params.max_tokens, temperature=params.temperature, top_k=params.top_k,
        top_p=params.top_p, seed=params.seed if params.HasField("seed") else None,
        stop_tokens=tuple(stop_tokens), stop_texts=tuple(stop_texts))
    return SampleWork(prompt_T=tokens_from_pb(request.prompt, "prompt"),
                      num_samples=request.num_samples, params=config,
                      include_prompt_logprobs=request.include_prompt_logprobs,
                      topk_prompt_logprobs=request.topk_prompt_logprobs,
                      topk_sample_logprobs=request.topk_sample_logprobs,
                      prompt_logprobs_last_n=(request.prompt_logprobs_last_n
                                              if request.HasField("prompt_logprobs_last_n") else None),
                      target_prompt_ids_T_K=(tensor_from_pb(request.target_prompt_logprobs,
                                                            "target_prompt_logprobs", pb.INT64)
                                             if request.HasField("target_prompt_logprobs") else None))


def logprobs_from_pb(request: pb.ComputeLogprobsRequest) -> LogprobsWork:
    last_n = request.prompt_logprobs_last_n if request.HasField("prompt_logprobs_last_n") else None
    return LogprobsWork(tokens_from_pb(request.prompt, "prompt"), last_n=last_n)
