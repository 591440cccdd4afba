"""Tinker's wire encodings <-> engine types and stored results.

Requests arrive as JSON (parsed by pydantic models in http_api/schemas.py) or as the protobuf of
protos/tinker_wire; results leave as Tinker's JSON or protobuf. Malformed data raises InvalidInput
naming the field. This module knows encodings only: no owners, sessions or HTTP.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from stillroom._proto import stillroom_pb2 as pb
from stillroom_server.core.errors import InvalidInput
from stillroom_server.engine.types import ForwardBackwardWork, SampleWork, SamplingConfig, TrainDatum
from stillroom_server.http_api._proto import tinker_wire_pb2 as tw

_PROTO_DTYPES = {tw.DTYPE_FLOAT32: np.dtype("<f4"), tw.DTYPE_INT64: np.dtype("<i8"),
                 tw.DTYPE_INT32: np.dtype("<i4"), tw.DTYPE_BFLOAT16: np.dtype("<u2")}
INT_INPUTS = ("target_tokens",)


# ---------------------------------------------------------------- tensors in


def _widen(array: np.ndarray, proto_dtype: int) -> torch.Tensor:
    if proto_dtype == tw.DTYPE_BFLOAT16:  # bf16 bits are the top half of a float32
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return torch.from_numpy(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("=")))


def _check_shape(shape: list[int], count: int, field: str) -> None:
    if any(d < 0 for d in shape):
        raise InvalidInput(f"{field}: negative dimension in shape {shape}")
    if math.prod(shape) != count:
        raise InvalidInput(f"{field}: {count} values do not fill shape {shape}")


def tensor_from_proto(message: tw.Tensor, field: str) -> torch.Tensor:
    if message.dtype not in _PROTO_DTYPES:
        raise InvalidInput(f"{field}: unknown dtype {message.dtype}")
    dtype = _PROTO_DTYPES[message.dtype]
    shape = list(message.shape)
    if message.WhichOneof("encoding") == "sparse_csr":
        csr = message.sparse_csr
        values = _frombuffer(csr.values, dtype, field)
        crow = _frombuffer(csr.crow_indices, np.dtype("<i8"), field + ".crow_indices")
        col = _frombuffer(csr.col_indices, np.dtype("<i8"), field + ".col_indices")
        return _dense_from_csr(_widen(values, message.dtype), crow, col, shape, field)
    values = _frombuffer(message.dense, dtype, field)
    _check_shape(shape, values.size, field)
    return _widen(values, message.dtype).reshape(shape)


def _frombuffer(data: bytes, dtype: np.dtype, field: str) -> np.ndarray:
    if len(data) % dtype.itemsize:
        raise InvalidInput(f"{field}: {len(data)} bytes are not whole {dtype.itemsize}-byte values")
    return np.frombuffer(data, dtype=dtype)


def _dense_from_csr(values: torch.Tensor, crow: np.ndarray, col: np.ndarray, shape: list[int],
                    field: str) -> torch.Tensor:
    if len(shape) != 2 or len(crow) != shape[0] + 1 or len(col) != len(values):
        raise InvalidInput(f"{field}: sparse CSR indices do not match shape {shape}")
    try:
        sparse = torch.sparse_csr_tensor(torch.from_numpy(crow.copy()), torch.from_numpy(col.copy()),
                                         values, size=shape)
        return sparse.to_dense()
    except RuntimeError as error:
        raise InvalidInput(f"{field}: invalid sparse CSR tensor ({error})") from None


def _loss_input(tensor: torch.Tensor, key: str, field: str) -> torch.Tensor:
    if key in INT_INPUTS:
        if tensor.is_floating_point():
            raise InvalidInput(f"{field}: dtype must be int64, got float")
        return tensor.long()
    return tensor.float()


def tokens_from_chunks(chunks, field: str) -> torch.Tensor:
    parts = []
    for i, chunk in enumerate(chunks):
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise InvalidInput(f"{field}[{i}]: only encoded_text chunks are supported "
                               f"(this server hosts text models), got {kind}")
        parts.append(_widen(_frombuffer(chunk.encoded_text.tokens, np.dtype("<i4"),
                                        f"{field}[{i}].tokens"), tw.DTYPE_INT32).long())
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def tokens_from_json(model_input: dict, field: str) -> torch.Tensor:
    parts = []
    for i, chunk in enumerate(model_input.get("chunks") or []):
        if chunk.get("type", "encoded_text") != "encoded_text":
            raise InvalidInput(f"{field}.chunks[{i}]: only encoded_text chunks are supported "
                               f"(this server hosts text models), got {chunk.get('type')}")
        try:
            parts.append(torch.tensor([int(t) for t in chunk.get("tokens") or []], dtype=torch.long))
        except (TypeError, ValueError):
            raise InvalidInput(f"{field}.chunks[{i}].tokens: must be a list of integers") from None
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


# ---------------------------------------------------------------- requests


def forward_backward_from_proto(body: bytes) -> tuple[tw.ForwardBackwardRequest, ForwardBackwardWork]:
    request = tw.ForwardBackwardRequest()
    try:
        request.ParseFromString(body)
    except Exception:  # noqa: BLE001 - protobuf raises DecodeError or others on garbage
        raise InvalidInput("body: not a valid ForwardBackwardRequest protobuf message") from None
    data = []
    for i, datum in enumerate(request.data):
        tokens_T = tokens_from_chunks(datum.model_input, f"data[{i}].model_input")
        inputs = {key: _loss_input(tensor_from_proto(t, f"data[{i}].loss_fn_inputs.{key}"), key,
                                   f"data[{i}].loss_fn_inputs.{key}")
                  for key, t in datum.loss_fn_inputs.items()}
        data.append(TrainDatum(tokens_T, inputs))
    numbers = dict(request.loss_fn_config)
    strings: dict[str, str] = {}
    for key, value in request.loss_fn_config_v2.items():
        if value.WhichOneof("value") == "text":
            strings[key] = value.text
        else:
            numbers[key] = value.number
    work = ForwardBackwardWork(data=data, loss_fn=request.loss_fn, loss_fn_config=numbers,
                               forward_only=request.forward_only, loss_fn_config_strings=strings)
    return request, work


def sample_from_json(body: dict) -> SampleWork:
    """An `asample` body; the SDK's compute_logprobs is one of these too (one token, prompt
    logprobs), and runs as what it asks for."""
    prompt_T = tokens_from_json(body.get("prompt") or {}, "prompt")
    params = body.get("sampling_params") or {}
    stop = params.get("stop")
    stop_texts: tuple[str, ...] = ()
    stop_tokens: tuple[int, ...] = ()
    if isinstance(stop, str):
        stop_texts = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop_texts = tuple(stop)
    elif isinstance(stop, list) and all(isinstance(s, int) for s in stop):
        stop_tokens = tuple(stop)
    elif stop is not None:
        raise InvalidInput("sampling_params.stop: must be a string, a list of strings or a list of "
                           "token ids")
    config = SamplingConfig(
        max_tokens=_number(params, "max_tokens", int, -1),
        temperature=_number(params, "temperature", float, 1.0),
        top_k=_number(params, "top_k", int, -1), top_p=_number(params, "top_p", float, 1.0),
        seed=_number(params, "seed", int, None), stop_tokens=stop_tokens, stop_texts=stop_texts)
    work = SampleWork(prompt_T=prompt_T, num_samples=_number(body, "num_samples", int, 1), params=config,
                      include_prompt_logprobs=bool(body.get("prompt_logprobs")),
                      topk_prompt_logprobs=_number(body, "topk_prompt_logprobs", int, 0))
    work.topk_sample_logprobs = _number(body, "topk_sample_logprobs", int, 0)
    work.prompt_logprobs_last_n = _number(body, "prompt_logprobs_last_n", int, None)
    # record_stability_info is accepted and records nothing: Stillroom's stable_reinforce weighs
    # tokens by the sampler's logprobs the datum carries back (tinker-cookbook's RL default sets it)
    for name in ("target_prompt_logprobs", "prompt_alt_tokens_k"):
        if body.get(name):
            raise InvalidInput(f"{name}: not offered by this server")
    return work


def _number(values: dict, key: str, kind: type, default):
    value = values.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and value != int(value)):
        raise InvalidInput(f"{key}: must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


# ---------------------------------------------------------------- results out


def _numpy(tensor: pb.Tensor) -> np.ndarray:
    dtype = np.dtype("<f4") if tensor.dtype == pb.FLOAT32 else np.dtype("<i8")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(list(tensor.shape))


def forward_backward_to_proto(result: pb.ForwardBackwardResult, loss_fn: str = "") -> bytes:
    """One ArrayRecord: each output field's per-datum tensors concatenated, with byte offsets."""
    record = tw.ArrayRecord(type_tag="LossFnOutput", num_datums=len(result.loss_fn_outputs))
    names = sorted({name for out in result.loss_fn_outputs for name in out.tensors})
    for name in names:
        arrays = [_numpy(out.tensors[name]) for out in result.loss_fn_outputs]
        floating = arrays[0].dtype.kind == "f"
        target = np.dtype("<f4") if floating else np.dtype("<i8")
        chunks = [a.astype(target).tobytes() for a in arrays]
        offsets = np.cumsum([0] + [len(c) for c in chunks]).astype("<i8")
        record.fields[name].CopyFrom(tw.BatchedTensor(
            data=b"".join(chunks), offsets=offsets.tobytes(),
            dtype=tw.DTYPE_FLOAT32 if floating else tw.DTYPE_INT64,
            trailing_shape=list(arrays[0].shape[1:])))
    message = tw.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", metrics=dict(result.metrics))
    if result.loss_fn_outputs:
        message.loss_fn_outputs.append(record)
    return message.SerializeToString()


_STOP = {pb.STOP: tw.STOP_REASON_STOP, pb.LENGTH: tw.STOP_REASON_LENGTH}
NONE_LOGPROB = -99999.0


def _topk(ids: np.ndarray, logprobs: np.ndarray) -> tw.TopkLogprobs:
    ids = ids.astype("<i4").copy()
    logprobs = logprobs.astype("<f4").copy()
    missing = ~np.isfinite(logprobs)
    ids[missing], logprobs[missing] = 0, NONE_LOGPROB
    return tw.TopkLogprobs(token_ids=ids.tobytes(), logprobs=logprobs.tobytes(), k=ids.shape[1],
                           length=ids.shape[0])


def sample_to_proto(result: pb.SampleResult) -> bytes:
    message = tw.SampleResponse()
    for sequence in result.sequences:
        out = message.sequences.add(stop_reason=_STOP.get(sequence.stop_reason, tw.STOP_REASON_STOP),
                                    tokens=_numpy(sequence.tokens).astype("<i4").tobytes(),
                                    logprobs=_numpy(sequence.logprobs).astype("<f4").tobytes())
        topk = getattr(sequence, "topk_logprobs", None)
        if topk is not None and sequence.HasField("topk_logprobs"):
            out.topk_sampled_logprobs.CopyFrom(_topk(_numpy(topk.token_ids), _numpy(topk.logprobs)))
    if result.HasField("prompt_logprobs"):
        message.prompt_logprobs = _numpy(result.prompt_logprobs).astype("<f4").tobytes()
    if result.HasField("topk_prompt_logprobs"):
        message.topk_prompt_logprobs.CopyFrom(_topk(_numpy(result.topk_prompt_logprobs.token_ids),
                                                    _numpy(result.topk_prompt_logprobs.logprobs)))
    return message.SerializeToString()


def logprobs_to_proto(result: pb.ComputeLogprobsResult) -> bytes:
    """compute_logprobs answered as Tinker's SDK asks for it: a one-token sample plus the prompt's
    logprobs (the SDK reads only `prompt_logprobs`)."""
    message = tw.SampleResponse(prompt_logprobs=_numpy(result.logprobs).astype("<f4").tobytes())
    message.sequences.add(stop_reason=tw.STOP_REASON_LENGTH, tokens=b"", logprobs=b"")
    return message.SerializeToString()
