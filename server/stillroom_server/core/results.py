"""Engine results -> the stored form of a finished request: a Stillroom `FutureResult` message.

The store keeps every result in this one format whatever wire asked for it; the gRPC edge hands it
out as it is and the Tinker HTTP API re-encodes it. Tensors go out little-endian, floats as float32.
"""

from __future__ import annotations

import torch

from stillroom._proto import stillroom_pb2 as pb
from stillroom_server.engine.types import ForwardBackwardResult, LogprobsResult, OptimResult, SampleResult


def tensor_to_pb(tensor: torch.Tensor) -> pb.Tensor:
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point():
        return pb.Tensor(dtype=pb.FLOAT32, shape=list(tensor.shape),
                         data=tensor.float().numpy().astype("<f4").tobytes())
    return pb.Tensor(dtype=pb.INT64, shape=list(tensor.shape),
                     data=tensor.long().numpy().astype("<i8").tobytes())


def forward_backward(result: ForwardBackwardResult) -> pb.FutureResult:
    return pb.FutureResult(forward_backward=pb.ForwardBackwardResult(
        loss_fn_outputs=[pb.LossFnOutput(tensors={k: tensor_to_pb(v) for k, v in out.items()})
                         for out in result.outputs],
        metrics=result.metrics))


def optim_step(result: OptimResult) -> pb.FutureResult:
    return pb.FutureResult(optim_step=pb.OptimStepResult(metrics=result.metrics))


def saved(path: str) -> pb.FutureResult:
    return pb.FutureResult(save_weights=pb.SaveWeightsResult(path=path))


_STOP = {"stop": pb.STOP, "length": pb.LENGTH}


def _sequence(s) -> pb.SampledSequence:
    message = pb.SampledSequence(tokens=tensor_to_pb(torch.tensor(s.tokens, dtype=torch.long)),
                                 logprobs=tensor_to_pb(torch.tensor(s.logprobs, dtype=torch.float32)),
                                 stop_reason=_STOP[s.stop_reason], sequence_id=s.sequence_id)
    if s.topk_ids is not None:  # [n, k] at each sampled position
        k = max((len(row) for row in s.topk_ids), default=0)
        message.topk_logprobs.token_ids.CopyFrom(
            tensor_to_pb(torch.tensor(s.topk_ids, dtype=torch.long).reshape(len(s.topk_ids), k)))
        message.topk_logprobs.logprobs.CopyFrom(
            tensor_to_pb(torch.tensor(s.topk_logprobs, dtype=torch.float32).reshape(len(s.topk_ids), k)))
    return message


def sample(result: SampleResult) -> pb.FutureResult:
    message = pb.SampleResult(sequences=[_sequence(s) for s in result.sequences])
    if result.prompt_logprobs_T is not None:
        message.prompt_logprobs.CopyFrom(tensor_to_pb(result.prompt_logprobs_T))
    if result.topk_ids_T_K is not None and result.topk_logprobs_T_K is not None:
        message.topk_prompt_logprobs.token_ids.CopyFrom(tensor_to_pb(result.topk_ids_T_K))
        message.topk_prompt_logprobs.logprobs.CopyFrom(tensor_to_pb(result.topk_logprobs_T_K))
    if result.target_logprobs_T_K is not None:
        message.target_prompt_logprobs.CopyFrom(tensor_to_pb(result.target_logprobs_T_K))
    return pb.FutureResult(sample=message)


def compute_logprobs(result: LogprobsResult) -> pb.FutureResult:
    return pb.FutureResult(compute_logprobs=pb.ComputeLogprobsResult(
        logprobs=tensor_to_pb(result.logprobs_T)))
