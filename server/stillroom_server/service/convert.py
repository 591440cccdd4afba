"""Protobuf messages <-> engine types. Malformed wire data raises InvalidInput naming the field."""

from __future__ import annotations

import math

import numpy as np
import torch

from stillroom._proto import stillroom_pb2 as pb
from stillroom_server.engine.errors import InvalidInput
from stillroom_server.engine.types import (AdamConfig, ForwardBackwardResult, ForwardBackwardWork,
                                           LogprobsResult, LogprobsWork, SampleResult, SampleWork,
                                           SamplingConfig, TrainDatum)

_NUMPY = {pb.INT64: np.dtype("<i8"), pb.FLOAT32: np.dtype("<f4")}


def tensor_from_pb(message: pb.Tensor, field: str, dtype: int | None = None) -> torch.Tensor:
    if message.dtype not in _NUMPY:
        raise InvalidInput(f"{field}: unknown dtype {message.dtype}")
    if dtype is not None and message.dtype != dtype:
        raise InvalidInput(f"{field}: dtype must be {pb.DType.Name(dtype).lower()}, "
                           f"got {pb.DType.Name(message.dtype).lower()}")
    shape = list(message.shape)
    if any(d < 0 for d in shape):
        raise InvalidInput(f"{field}: negative dimension in shape {shape}")
    itemsize = _NUMPY[message.dtype].itemsize
    if len(message.data) != math.prod(shape) * itemsize:
        raise InvalidInput(f"{field}: {len(message.data)} bytes do not hold shape {shape} "
                           f"of {itemsize}-byte values")
    array = np.frombuffer(message.data, dtype=_NUMPY[message.dtype]).reshape(shape)
    return torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=True))


def tensor_to_pb(tensor: torch.Tensor) -> pb.Tensor:
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point():
        return pb.Tensor(dtype=pb.FLOAT32, shape=list(tensor.shape),
                         data=tensor.float().numpy().astype("<f4").tobytes())
    return pb.Tensor(dtype=pb.INT64, shape=list(tensor.shape),
                     data=tensor.long().numpy().astype("<i8").tobytes())


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
    config = AdamConfig(params.learning_rate, params.beta1, params.beta2, params.eps,
                        params.weight_decay, params.grad_clip_norm)
    checks = [
        ("learning_rate", config.learning_rate >= 0, ">= 0"),
        ("beta1", 0 <= config.beta1 < 1, "in [0, 1)"),
        ("beta2", 0 <= config.beta2 < 1, "in [0, 1)"),
        ("eps", config.eps > 0, "> 0"),
        ("weight_decay", config.weight_decay >= 0, ">= 0"),
        ("grad_clip_norm", config.grad_clip_norm >= 0, ">= 0 (0 disables clipping)"),
    ]
    for name, ok, rule in checks:
        value = getattr(config, name)
        if not (math.isfinite(value) and ok):
            raise InvalidInput(f"adam_params.{name}: must be {rule}, got {value}")
    return config


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
                      topk_prompt_logprobs=request.topk_prompt_logprobs)


def logprobs_from_pb(request: pb.ComputeLogprobsRequest) -> LogprobsWork:
    return LogprobsWork(tokens_from_pb(request.prompt, "prompt"))


def forward_backward_to_pb(result: ForwardBackwardResult) -> pb.ForwardBackwardResult:
    return pb.ForwardBackwardResult(
        loss_fn_outputs=[pb.LossFnOutput(tensors={k: tensor_to_pb(v) for k, v in out.items()})
                         for out in result.outputs],
        metrics=result.metrics)


_STOP = {"stop": pb.STOP, "length": pb.LENGTH}


def sample_to_pb(result: SampleResult) -> pb.SampleResult:
    message = pb.SampleResult(sequences=[
        pb.SampledSequence(tokens=tensor_to_pb(torch.tensor(s.tokens, dtype=torch.long)),
                           logprobs=tensor_to_pb(torch.tensor(s.logprobs, dtype=torch.float32)),
                           stop_reason=_STOP[s.stop_reason])
        for s in result.sequences])
    if result.prompt_logprobs_T is not None:
        message.prompt_logprobs.CopyFrom(tensor_to_pb(result.prompt_logprobs_T))
    if result.topk_ids_T_K is not None:
        message.topk_prompt_logprobs.token_ids.CopyFrom(tensor_to_pb(result.topk_ids_T_K))
        message.topk_prompt_logprobs.logprobs.CopyFrom(tensor_to_pb(result.topk_logprobs_T_K))
    return message


def logprobs_to_pb(result: LogprobsResult) -> pb.ComputeLogprobsResult:
    return pb.ComputeLogprobsResult(logprobs=tensor_to_pb(result.logprobs_T))
