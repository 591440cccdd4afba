"""Conversions between the SDK's pydantic types and the protobuf messages on the wire.

Tensors travel as packed little-endian bytes (int64 or float32), built with the standard `array`
module so the SDK needs neither numpy nor torch. This module does no I/O.
"""

from __future__ import annotations

import math
import sys
from array import array
from collections.abc import Sequence

from stillroom import types
from stillroom._proto import stillroom_pb2 as pb

_TYPECODES = {pb.INT64: "q", pb.FLOAT32: "f"}
_DTYPE_TO_PB = {"int64": pb.INT64, "float32": pb.FLOAT32}
_PB_TO_DTYPE = {pb.INT64: "int64", pb.FLOAT32: "float32"}
_BIG_ENDIAN = sys.byteorder == "big"


def pack(values: Sequence[float] | Sequence[int], dtype: str,
         shape: Sequence[int] | None = None) -> pb.Tensor:
    code = _DTYPE_TO_PB[dtype]
    buffer = array(_TYPECODES[code], values)
    if _BIG_ENDIAN:
        buffer.byteswap()
    return pb.Tensor(dtype=code, shape=list(shape) if shape is not None else [len(buffer)],
                     data=buffer.tobytes())


def unpack(tensor: pb.Tensor) -> list:
    """The flat values of a packed tensor, as a Python list."""
    if tensor.dtype not in _TYPECODES:
        raise ValueError(f"tensor has unknown dtype {tensor.dtype}")
    buffer = array(_TYPECODES[tensor.dtype])
    buffer.frombytes(tensor.data)
    if _BIG_ENDIAN:
        buffer.byteswap()
    return buffer.tolist()


def tensor_to_pb(tensor: types.TensorData) -> pb.Tensor:
    tensor = tensor.dense()  # sparse CSR travels dense (the pad value is 0)
    return pack(tensor.data, tensor.dtype, tensor.shape)


def tensor_from_pb(tensor: pb.Tensor) -> types.TensorData:
    dtype: types.DType = "int64" if tensor.dtype == pb.INT64 else "float32"
    if tensor.dtype not in _PB_TO_DTYPE:
        raise ValueError(f"tensor has unknown dtype {tensor.dtype}")
    return types.TensorData(data=unpack(tensor), dtype=dtype, shape=list(tensor.shape))


def model_input_to_pb(model_input: types.ModelInput) -> pb.ModelInput:
    chunks = []
    for chunk in model_input.chunks:
        if not isinstance(chunk, types.EncodedTextChunk):
            raise ValueError(f"model_input: a {chunk.type!r} chunk was given; Stillroom's models read "
                             "text tokens only (EncodedTextChunk)")
        tokens = pack(chunk.tokens, "int64")
        chunks.append(pb.ModelInputChunk(encoded_text=pb.EncodedTextChunk(tokens=tokens)))
    return pb.ModelInput(chunks=chunks)


def checkpoint_path(path: str) -> str:
    """A checkpoint path as the server names it: tinker:// and stillroom:// name the same ones."""
    return "stillroom://" + path[len("tinker://"):] if path.startswith("tinker://") else path


def datum_to_pb(datum: types.Datum) -> pb.Datum:
    return pb.Datum(
        model_input=model_input_to_pb(datum.model_input),
        loss_fn_inputs={key: tensor_to_pb(value) for key, value in datum.loss_fn_inputs.items()},
    )


def sampling_params_to_pb(params: types.SamplingParams) -> pb.SamplingParams:
    stop = params.stop
    if isinstance(stop, str):
        stop = [stop]
    conditions = []
    for item in stop or []:
        if isinstance(item, str):
            conditions.append(pb.StopCondition(text=item))
        else:
            conditions.append(pb.StopCondition(token=item))
    message = pb.SamplingParams(
        max_tokens=-1 if params.max_tokens is None else params.max_tokens,
        stop=conditions,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
    )
    if params.seed is not None:
        message.seed = params.seed
    return message


def adam_params_to_pb(params: types.AdamParams) -> pb.AdamParams:
    return pb.AdamParams(**params.model_dump())


def _nan_to_none(values: list[float]) -> list[float | None]:
    return [None if math.isnan(v) else v for v in values]


def forward_backward_from_pb(result: pb.ForwardBackwardResult) -> types.ForwardBackwardOutput:
    return types.ForwardBackwardOutput(
        loss_fn_outputs=[{key: tensor_from_pb(t) for key, t in out.tensors.items()}
                         for out in result.loss_fn_outputs],
        metrics=dict(result.metrics),
    )


_STOP_REASONS: dict[int, types.StopReason] = {pb.STOP: "stop", pb.LENGTH: "length"}


def _topk_rows(topk: pb.TopkLogprobs) -> list[list[tuple[int, float]] | None]:
    """[T, k] ids and logprobs as T lists of (id, logprob); a row whose logprobs are all NaN
    (nothing was scored there) is None."""
    ids, values = unpack(topk.token_ids), unpack(topk.logprobs)
    rows, k = topk.token_ids.shape
    out: list[list[tuple[int, float]] | None] = []
    for r in range(rows):
        row = list(zip(ids[r * k:(r + 1) * k], values[r * k:(r + 1) * k]))
        out.append(None if row and all(math.isnan(v) for _, v in row) else row)
    return out


def sampled_sequence_from_pb(seq: pb.SampledSequence) -> types.SampledSequence:
    return types.SampledSequence(
        tokens=unpack(seq.tokens), logprobs=unpack(seq.logprobs),
        stop_reason=_STOP_REASONS[seq.stop_reason], sequence_id=seq.sequence_id,
        topk_logprobs=_topk_rows(seq.topk_logprobs) if seq.HasField("topk_logprobs") else None)


def sample_from_pb(result: pb.SampleResult) -> types.SampleResponse:
    sequences = [sampled_sequence_from_pb(seq) for seq in result.sequences]
    prompt_logprobs = None
    if result.HasField("prompt_logprobs"):
        prompt_logprobs = _nan_to_none(unpack(result.prompt_logprobs))
    topk = None
    if result.HasField("topk_prompt_logprobs"):
        topk = _topk_rows(result.topk_prompt_logprobs)
        topk[0] = None  # row 0 is padding: the first token has no logprob
    targets = (tensor_from_pb(result.target_prompt_logprobs)
               if result.HasField("target_prompt_logprobs") else None)
    return types.SampleResponse(sequences=sequences, prompt_logprobs=prompt_logprobs,
                                topk_prompt_logprobs=topk, target_prompt_logprobs=targets)


def logprobs_from_pb(result: pb.ComputeLogprobsResult) -> list[float | None]:
    return _nan_to_none(unpack(result.logprobs))
