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
from stillroom_server.core import validate
from stillroom_server.core.errors import InvalidInput
from stillroom_server.engine.types import ForwardBackwardWork, SampleWork, SamplingConfig, TrainDatum
from stillroom_server.http_api import schemas
from stillroom_server.http_api._proto import tinker_wire_pb2 as tw

_PROTO_DTYPES = {tw.DTYPE_FLOAT32: np.dtype("<f4"), tw.DTYPE_INT64: np.dtype("<i8"),
                 tw.DTYPE_INT32: np.dtype("<i4"), tw.DTYPE_BFLOAT16: np.dtype("<u2")}
INT_INPUTS = ("target_tokens",)


# ---------------------------------------------------------------- tensors in
#
# Every tensor is checked by its invariants with numpy before torch sees it: a shape that its bytes
# fill, a sparse CSR tensor whose row pointers start at 0, never fall and end at its value count,
# and whose column indices lie inside its shape. The dense tensor is built by numpy; no torch
# constructor ever sees a sparse encoding.


class Budget:
    """How many values one request may still decode (a sparse encoding is a few bytes for a shape
    of any size, so the shape, not the body, is what is counted)."""

    def __init__(self, elements: int = validate.MAX_DECODED_ELEMENTS) -> None:
        self.left = elements

    def take(self, count: int, field: str) -> None:
        if count > self.left:
            raise InvalidInput(f"{field}: the request's tensors hold over {validate.MAX_DECODED_ELEMENTS} "
                               "values in all (split the call into several)")
        self.left -= count


def _widen(array: np.ndarray, proto_dtype: int) -> np.ndarray:
    """Little-endian wire values as native float32 / int64 (bf16 bits are a float32's top half)."""
    if proto_dtype == tw.DTYPE_BFLOAT16:
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32 if array.dtype.kind == "f" else np.int64)


def _check_shape(shape: list[int], field: str, rows: int | None, budget: Budget) -> int:
    """The shape's element count, once it is a sane shape: at most MAX_TENSOR_DIMS dimensions, none
    negative, the first `rows` where the caller knows it, and within the request's budget."""
    if not 1 <= len(shape) <= validate.MAX_TENSOR_DIMS:
        raise InvalidInput(f"{field}: shape {shape[:8]} must have 1 to {validate.MAX_TENSOR_DIMS} dimensions")
    if any(d < 0 for d in shape):
        raise InvalidInput(f"{field}: negative dimension in shape {shape}")
    if rows is not None and shape[0] != rows:
        raise InvalidInput(f"{field}: shape {shape} does not match model_input length {rows}")
    count = math.prod(shape)
    budget.take(count, field)
    return count


def tensor_from_proto(message: tw.Tensor, field: str, rows: int | None = None,
                      budget: Budget | None = None) -> torch.Tensor:
    """A wire tensor as a dense float32 or int64 torch tensor; `rows`, where given, is the length
    its first dimension must have."""
    if message.dtype not in _PROTO_DTYPES:
        raise InvalidInput(f"{field}: unknown dtype {message.dtype}")
    dtype = _PROTO_DTYPES[message.dtype]
    shape = list(message.shape)
    count = _check_shape(shape, field, rows, budget or Budget())
    if message.WhichOneof("encoding") == "sparse_csr":
        csr = message.sparse_csr
        dense = _dense_from_csr(_frombuffer(csr.values, dtype, field + ".values"),
                                _frombuffer(csr.crow_indices, np.dtype("<i8"), field + ".crow_indices"),
                                _frombuffer(csr.col_indices, np.dtype("<i8"), field + ".col_indices"),
                                shape, field)
    else:
        values = _frombuffer(message.dense, dtype, field)
        if values.size != count:
            raise InvalidInput(f"{field}: {values.size} values do not fill shape {shape}")
        dense = values.reshape(shape)
    return torch.from_numpy(np.ascontiguousarray(_widen(dense, message.dtype)))


def _frombuffer(data: bytes, dtype: np.dtype, field: str) -> np.ndarray:
    if len(data) % dtype.itemsize:
        raise InvalidInput(f"{field}: {len(data)} bytes are not whole {dtype.itemsize}-byte values")
    return np.frombuffer(data, dtype=dtype)


def _dense_from_csr(values: np.ndarray, crow: np.ndarray, col: np.ndarray, shape: list[int], field: str,
                    fill: int = 0) -> np.ndarray:
    """The dense array of a CSR encoding (`fill` where no value is listed), after checking every
    invariant torch's constructor assumes (an unchecked one crashed the process) and the SDK's own
    decoder checks."""
    if len(shape) != 2:
        raise InvalidInput(f"{field}: a sparse CSR tensor is 2-D, got shape {shape}")
    rows, cols = shape
    if len(crow) != rows + 1:
        raise InvalidInput(f"{field}.crow_indices: {len(crow)} entries, shape {shape} needs {rows + 1}")
    if len(col) != len(values):
        raise InvalidInput(f"{field}.col_indices: {len(col)} entries for {len(values)} values")
    if crow[0] != 0 or crow[-1] != len(values) or bool(np.any(np.diff(crow) < 0)):
        raise InvalidInput(f"{field}.crow_indices: must start at 0, never decrease and end at the "
                           f"number of values ({len(values)})")
    if len(col) and (int(col.min()) < 0 or int(col.max()) >= cols):
        raise InvalidInput(f"{field}.col_indices: must lie in [0, {cols}) for shape {shape}")
    row_of_value = np.repeat(np.arange(rows), np.diff(crow))
    if bool(np.any((row_of_value[1:] == row_of_value[:-1]) & (np.diff(col) <= 0))):
        raise InvalidInput(f"{field}.col_indices: must increase strictly within each row")
    dense = np.full(shape, fill, dtype=values.dtype)
    dense[row_of_value, col] = values
    return dense


def ids_from_json(tensor: schemas.TensorData, field: str, rows: int) -> torch.Tensor:
    """A JSON TensorData of token ids (int64, [rows, K], dense or sparse CSR) as a tensor; a sparse
    encoding lists the cells that ask for something, the rest are -1 (nothing)."""
    if tensor.dtype != "int64" or any(isinstance(v, float) for v in tensor.data):
        raise InvalidInput(f"{field}: dtype must be int64 (token ids), got {tensor.dtype}")
    shape = list(tensor.shape) if tensor.shape is not None else [len(tensor.data)]
    count = _check_shape(shape, field, rows, Budget())
    values = np.asarray(tensor.data, dtype=np.int64)
    if tensor.sparse_crow_indices is None:
        if values.size != count:
            raise InvalidInput(f"{field}: {values.size} values do not fill shape {shape}")
        return torch.from_numpy(values.reshape(shape))
    col = np.asarray(tensor.sparse_col_indices or [], dtype=np.int64)
    crow = np.asarray(tensor.sparse_crow_indices, dtype=np.int64)
    return torch.from_numpy(_dense_from_csr(values, crow, col, shape, field, fill=-1))


def _loss_input(tensor: torch.Tensor, key: str, field: str) -> torch.Tensor:
    if key in INT_INPUTS:
        if tensor.is_floating_point():
            raise InvalidInput(f"{field}: dtype must be int64, got float")
        return tensor
    return tensor.float()


def tokens_from_chunks(chunks, field: str, budget: Budget) -> torch.Tensor:
    parts = []
    for i, chunk in enumerate(chunks):
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise InvalidInput(f"{field}[{i}]: only encoded_text chunks are supported "
                               f"(this server hosts text models), got {kind}")
        tokens = _frombuffer(chunk.encoded_text.tokens, np.dtype("<i4"), f"{field}[{i}].tokens")
        budget.take(tokens.size, f"{field}[{i}].tokens")
        parts.append(tokens.astype(np.int64))
    return torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))


def tokens_from_json(model_input: schemas.ModelInput, field: str) -> torch.Tensor:
    """A validated JSON ModelInput's tokens (each a JSON integer that fits int64; the engine holds
    them to the vocabulary)."""
    parts = []
    for i, chunk in enumerate(model_input.chunks):
        if chunk.type != "encoded_text":
            raise InvalidInput(f"{field}.chunks[{i}]: only encoded_text chunks are supported "
                               f"(this server hosts text models), got {chunk.type[:40]!r}")
        parts.extend(chunk.tokens)
    return torch.tensor(parts, dtype=torch.long)


# ---------------------------------------------------------------- requests


def parse_forward_backward(body: bytes) -> tw.ForwardBackwardRequest:
    """The message, not yet its tensors: the caller checks the run's owner before decoding them."""
    request = tw.ForwardBackwardRequest()
    try:
        request.ParseFromString(body)
    except Exception:  # noqa: BLE001 - protobuf raises DecodeError or others on garbage
        raise InvalidInput("body: not a valid ForwardBackwardRequest protobuf message") from None
    validate.text(request.model_id, "model_id")
    return request


def forward_backward_work(request: tw.ForwardBackwardRequest) -> ForwardBackwardWork:
    budget = Budget()
    data = []
    for i, datum in enumerate(request.data):
        tokens_T = tokens_from_chunks(datum.model_input, f"data[{i}].model_input", budget)
        inputs = {}
        for key, t in datum.loss_fn_inputs.items():
            field = f"data[{i}].loss_fn_inputs.{validate.text(key, 'loss_fn_inputs key', 64)}"
            inputs[key] = _loss_input(tensor_from_proto(t, field, len(tokens_T), budget), key, field)
        data.append(TrainDatum(tokens_T, inputs))
    numbers: dict[str, float] = {}
    strings: dict[str, str] = {}
    for key, value in [*request.loss_fn_config.items(),
                       *((k, v.text if v.WhichOneof("value") == "text" else v.number)
                         for k, v in request.loss_fn_config_v2.items())]:
        field = f"loss_fn_config.{validate.text(key, 'loss_fn_config key', 64)}"
        if isinstance(value, str):
            strings[key] = validate.text(value, field, validate.MAX_NAME_CHARS)
        else:  # the loss's resolve_config holds numbers to its range
            numbers[key] = value
    return ForwardBackwardWork(data=data, loss_fn=validate.text(request.loss_fn, "loss_fn", 64),
                               loss_fn_config=numbers, forward_only=request.forward_only,
                               loss_fn_config_strings=strings)


def sample_from_json(body: schemas.Sample) -> SampleWork:
    """A validated `asample` body as engine work."""
    params = body.sampling_params
    stop_texts: tuple[str, ...] = ()
    stop_tokens: tuple[int, ...] = ()
    if isinstance(params.stop, str):
        stop_texts = (params.stop,)
    elif params.stop and isinstance(params.stop[0], str):
        stop_texts = tuple(str(s) for s in params.stop)
    elif params.stop:
        stop_tokens = tuple(int(s) for s in params.stop)
    config = SamplingConfig(
        max_tokens=-1 if params.max_tokens is None else params.max_tokens,
        temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=params.seed,
        stop_tokens=stop_tokens, stop_texts=stop_texts)
    # record_stability_info is accepted and records nothing: Stillroom's stable_reinforce weighs
    # tokens by the sampler's logprobs the datum carries back (tinker-cookbook's RL default sets it)
    if body.prompt_alt_tokens_k:
        raise InvalidInput("prompt_alt_tokens_k: not offered by this server")
    prompt_T = tokens_from_json(body.prompt, "prompt")
    targets = body.target_prompt_logprobs
    return SampleWork(prompt_T=prompt_T, num_samples=body.num_samples,
                      params=config, include_prompt_logprobs=bool(body.prompt_logprobs),
                      topk_prompt_logprobs=body.topk_prompt_logprobs,
                      topk_sample_logprobs=body.topk_sample_logprobs,
                      prompt_logprobs_last_n=body.prompt_logprobs_last_n,
                      target_prompt_ids_T_K=(None if targets is None else ids_from_json(
                          targets, "target_prompt_logprobs", max(len(prompt_T) - 1, 0))))


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
    if result.HasField("target_prompt_logprobs"):
        targets = _numpy(result.target_prompt_logprobs)
        message.target_prompt_logprobs.CopyFrom(tw.Tensor(
            dense=targets.astype("<f4").tobytes(), dtype=tw.DTYPE_FLOAT32, shape=list(targets.shape)))
    return message.SerializeToString()


def logprobs_to_proto(result: pb.ComputeLogprobsResult) -> bytes:
    """compute_logprobs answered as Tinker's SDK asks for it: a one-token sample plus the prompt's
    logprobs (the SDK reads only `prompt_logprobs`)."""
    message = tw.SampleResponse(prompt_logprobs=_numpy(result.logprobs).astype("<f4").tobytes())
    message.sequences.add(stop_reason=tw.STOP_REASON_LENGTH, tokens=b"", logprobs=b"")
    return message.SerializeToString()
