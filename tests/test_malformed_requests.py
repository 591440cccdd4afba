"""A table of malformed requests sent on the wire, each answered with the right status code and a
message naming the field; afterwards the server still serves and no run's weights changed."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

import stillroom
from stillroom import _wire, types
from stillroom._proto import stillroom_pb2 as pb

from conftest import TINY, inline_fixtures

# reads the engine's memory or patches its constants: the engine runs in the test process
server, service, tokenizer = inline_fixtures()

BAD, MISSING = "INVALID_ARGUMENT", "NOT_FOUND"


def tensor(values, dtype="<i8", shape=None, dtype_code=pb.INT64):
    array = np.asarray(values, dtype=dtype)
    return pb.Tensor(dtype=dtype_code, shape=list(array.shape) if shape is None else shape,
                     data=array.tobytes())


def floats(values):
    return tensor(values, "<f4", dtype_code=pb.FLOAT32)


def datum(tokens=(5, 6, 7), targets=None, weights=None, extra=None, token_tensor=None):
    n = len(tokens)
    inputs = {"target_tokens": tensor(targets if targets is not None else list(tokens)[1:] + [2]),
              "weights": floats(weights if weights is not None else [1.0] * n)}
    inputs.update(extra or {})
    inputs = {k: v for k, v in inputs.items() if v is not None}
    chunk = pb.ModelInputChunk(encoded_text=pb.EncodedTextChunk(tokens=token_tensor or tensor(list(tokens))))
    return pb.Datum(model_input=pb.ModelInput(chunks=[chunk]), loss_fn_inputs=inputs)


def rl(advantages=(1.0, 1.0, 1.0), logprobs=(-1.0, -1.0, -1.0), **kw):
    return datum(extra={"advantages": floats(list(advantages)), "logprobs": floats(list(logprobs)),
                        "weights": None}, **kw)


def fb(ctx, data, loss_fn="cross_entropy", config=None, strings=None, seq=None, run=None, **kw):
    return pb.ForwardBackwardRequest(training_run_id=run if run is not None else ctx["run"],
                                     seq=ctx["seq"] if seq is None else seq, data=data, loss_fn=loss_fn,
                                     loss_fn_config=config or {}, loss_fn_config_strings=strings or {}, **kw)


def adam(ctx, **fields):
    params = {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, **fields}
    return pb.OptimStepRequest(training_run_id=ctx["run"], seq=ctx["seq"], adam_params=pb.AdamParams(**params))


def sample(ctx, prompt=(1, 40), num_samples=1, session=None, topk=0, stop=(), **params):
    sampling = {"max_tokens": 4, "temperature": 1.0, "top_k": -1, "top_p": 1.0, **params}
    return pb.SampleRequest(sampling_session_id=session or ctx["session"], num_samples=num_samples,
                            prompt=_wire.model_input_to_pb(types.ModelInput.from_ints(list(prompt))),
                            sampling_params=pb.SamplingParams(stop=list(stop), **sampling),
                            topk_prompt_logprobs=topk)


CASES = [
    # ForwardBackward: shapes, types, ranges
    ("FB empty data", "ForwardBackward", lambda c: fb(c, []), BAD, "data: at least one datum"),
    ("FB no chunks", "ForwardBackward", lambda c: fb(c, [pb.Datum()]), BAD, "model_input: must hold at least one token"),
    ("FB float tokens", "ForwardBackward", lambda c: fb(c, [datum(token_tensor=floats([5.0, 6.0, 7.0]))]), BAD, "tokens: dtype must be int64"),
    ("FB torn tokens", "ForwardBackward", lambda c: fb(c, [datum(token_tensor=pb.Tensor(dtype=pb.INT64, shape=[3], data=b"\x01" * 7))]), BAD, "tokens: 7 bytes do not hold"),
    ("FB 2-D tokens", "ForwardBackward", lambda c: fb(c, [datum(token_tensor=tensor([[5, 6, 7]]))]), BAD, "tokens: must be 1-D"),
    ("FB negative shape", "ForwardBackward", lambda c: fb(c, [datum(token_tensor=tensor([5], shape=[-1]))]), BAD, "negative dimension"),
    ("FB unknown dtype 0", "ForwardBackward", lambda c: fb(c, [datum(token_tensor=pb.Tensor(shape=[1], data=b"\0" * 8))]), BAD, "tokens: unknown dtype"),
    ("FB unknown dtype 7", "ForwardBackward", lambda c: fb(c, [datum(token_tensor=pb.Tensor(dtype=7, shape=[1], data=b"\0" * 8))]), BAD, "tokens: unknown dtype"),  # pyright: ignore[reportArgumentType]
    ("FB token 100", "ForwardBackward", lambda c: fb(c, [datum((5, 6, 100))]), BAD, "model_input: token id 100 is outside"),
    ("FB token -1", "ForwardBackward", lambda c: fb(c, [datum((5, -1, 6))]), BAD, "model_input: token id -1"),
    ("FB huge token", "ForwardBackward", lambda c: fb(c, [datum((5, 2**62, 6))]), BAD, f"token id {2**62}"),
    ("FB target 1000", "ForwardBackward", lambda c: fb(c, [datum(targets=[6, 7, 1000])]), BAD, "target_tokens: token id 1000"),
    ("FB missing targets", "ForwardBackward", lambda c: fb(c, [datum(extra={"target_tokens": None})]), BAD, "missing ['target_tokens']"),
    # (cross_entropy's weights may be left out, as Tinker allows: tests/test_cookbook_surface.py)
    ("FB missing RL inputs", "ForwardBackward", lambda c: fb(c, [datum(extra={"weights": None})], loss_fn="importance_sampling"), BAD, "missing ['advantages', 'logprobs']"),
    ("FB short weights", "ForwardBackward", lambda c: fb(c, [datum(weights=[1.0, 1.0])]), BAD, "weights: shape [2] does not match"),
    ("FB short targets", "ForwardBackward", lambda c: fb(c, [datum(targets=[6, 7])]), BAD, "target_tokens: shape [2]"),
    ("FB NaN weight", "ForwardBackward", lambda c: fb(c, [datum(weights=[1.0, math.nan, 1.0])]), BAD, "weights: values must be finite"),
    ("FB inf weight", "ForwardBackward", lambda c: fb(c, [datum(weights=[1.0, math.inf, 1.0])]), BAD, "weights: values must be finite"),
    ("FB float targets", "ForwardBackward", lambda c: fb(c, [datum(extra={"target_tokens": floats([6.0, 7.0, 2.0])})]), BAD, "target_tokens: dtype must be int64"),
    ("FB int weights", "ForwardBackward", lambda c: fb(c, [datum(extra={"weights": tensor([1, 1, 1])})]), BAD, "weights: dtype must be float32"),
    ("FB unknown input", "ForwardBackward", lambda c: fb(c, [datum(extra={"mystery": floats([1.0, 1.0, 1.0])})]), BAD, "unexpected ['mystery']"),
    ("FB 513 tokens", "ForwardBackward", lambda c: fb(c, [datum(tuple([5] * 513))]), BAD, "513 tokens is over the model's limit of 512"),
    # ForwardBackward: losses and their config
    ("FB empty loss", "ForwardBackward", lambda c: fb(c, [datum()], loss_fn=""), BAD, "loss_fn: unknown loss ''"),
    ("FB unknown loss", "ForwardBackward", lambda c: fb(c, [datum()], loss_fn="l2"), BAD, "loss_fn: unknown loss 'l2'"),
    ("IS no advantages", "ForwardBackward", lambda c: fb(c, [datum()], loss_fn="importance_sampling"), BAD, "missing ['advantages', 'logprobs']"),
    ("IS NaN advantage", "ForwardBackward", lambda c: fb(c, [rl(advantages=(1.0, math.nan, 1.0))], loss_fn="importance_sampling"), BAD, "advantages: values must be finite"),
    ("IS inf logprob", "ForwardBackward", lambda c: fb(c, [rl(logprobs=(-1.0, -math.inf, -1.0))], loss_fn="importance_sampling"), BAD, "logprobs: values must be finite"),
    ("PPO no advantages", "ForwardBackward", lambda c: fb(c, [datum()], loss_fn="ppo"), BAD, "missing ['advantages', 'logprobs']"),
    ("PPO low > high", "ForwardBackward", lambda c: fb(c, [rl()], "ppo", {"clip_low_threshold": 1.5, "clip_high_threshold": 1.2}), BAD, "clip_low_threshold"),
    ("PPO negative low", "ForwardBackward", lambda c: fb(c, [rl()], "ppo", {"clip_low_threshold": -0.1}), BAD, "clip_low_threshold"),
    ("CISPO high < 1", "ForwardBackward", lambda c: fb(c, [rl()], "cispo", {"clip_high_threshold": 0.5}), BAD, "clip_high_threshold"),
    ("DRO negative beta", "ForwardBackward", lambda c: fb(c, [rl()], "dro", {"beta": -1.0}), BAD, "loss_fn_config.beta"),
    ("DRO NaN beta", "ForwardBackward", lambda c: fb(c, [rl()], "dro", {"beta": math.nan}), BAD, "loss_fn_config.beta must be finite"),
    ("CE unknown config", "ForwardBackward", lambda c: fb(c, [datum()], config={"beta": 1.0}), BAD, "loss_fn_config: unknown key(s) ['beta']"),
    ("CE string config", "ForwardBackward", lambda c: fb(c, [datum()], strings={"teacher": TINY}), BAD, "loss_fn_config: unknown key(s) ['teacher']"),
    ("KL no teacher", "ForwardBackward", lambda c: fb(c, [datum()], "teacher_reverse_kl"), BAD, "loss_fn_config.teacher: name the teacher"),
    ("KL unknown teacher", "ForwardBackward", lambda c: fb(c, [datum()], "teacher_reverse_kl", strings={"teacher": "no/model"}), MISSING, "unknown model 'no/model'"),
    ("KL teacher traversal", "ForwardBackward", lambda c: fb(c, [datum()], "teacher_reverse_kl", strings={"teacher": "stillroom://../../x"}), BAD, "loss_fn_config.teacher"),
    ("KL negative topk", "ForwardBackward", lambda c: fb(c, [datum()], "teacher_reverse_kl", {"topk": -3}, {"teacher": TINY}), BAD, "loss_fn_config.topk"),
    ("FB part past end", "ForwardBackward", lambda c: fb(c, [datum()], part=3, num_parts=2), BAD, "part: need 0 <= part < num_parts"),
    ("FB negative parts", "ForwardBackward", lambda c: fb(c, [datum()], part=0, num_parts=-2), BAD, "part:"),
    ("FB seq 0", "ForwardBackward", lambda c: fb(c, [datum()], seq=0), BAD, "seq: request numbers start at 1"),
    ("FB seq gap", "ForwardBackward", lambda c: fb(c, [datum()], seq=c["seq"] + 5), BAD, "expects request {0} next"),
    ("FB unknown run", "ForwardBackward", lambda c: fb(c, [datum()], run="run-nope"), MISSING, "training_run_id"),
    ("FB empty run", "ForwardBackward", lambda c: fb(c, [datum()], run=""), MISSING, "training_run_id"),
    # OptimStep
    ("adam NaN lr", "OptimStep", lambda c: adam(c, learning_rate=math.nan), BAD, "adam_params.learning_rate"),
    ("adam inf lr", "OptimStep", lambda c: adam(c, learning_rate=math.inf), BAD, "adam_params.learning_rate"),
    ("adam negative lr", "OptimStep", lambda c: adam(c, learning_rate=-1e-3), BAD, "adam_params.learning_rate"),
    ("adam beta1 = 1", "OptimStep", lambda c: adam(c, beta1=1.0), BAD, "adam_params.beta1"),
    ("adam beta2 < 0", "OptimStep", lambda c: adam(c, beta2=-0.5), BAD, "adam_params.beta2"),
    ("adam eps 0", "OptimStep", lambda c: adam(c, eps=0.0), BAD, "adam_params.eps"),
    ("adam negative decay", "OptimStep", lambda c: adam(c, weight_decay=-0.1), BAD, "adam_params.weight_decay"),
    ("adam negative clip", "OptimStep", lambda c: adam(c, grad_clip_norm=-1.0), BAD, "adam_params.grad_clip_norm"),
    # SaveWeightsForSampler
    ("save traversal", "SaveWeightsForSampler", lambda c: pb.SaveWeightsRequest(training_run_id=c["run"], seq=c["seq"], name="../x"), BAD, "name:"),
    ("save slash", "SaveWeightsForSampler", lambda c: pb.SaveWeightsRequest(training_run_id=c["run"], seq=c["seq"], name="a/b"), BAD, "name:"),
    ("save NUL", "SaveWeightsForSampler", lambda c: pb.SaveWeightsRequest(training_run_id=c["run"], seq=c["seq"], name="a\0b"), BAD, "name:"),
    ("save too long", "SaveWeightsForSampler", lambda c: pb.SaveWeightsRequest(training_run_id=c["run"], seq=c["seq"], name="n" * 200), BAD, "name:"),
    # CreateTrainingRun
    ("create unknown model", "CreateTrainingRun", lambda c: pb.CreateTrainingRunRequest(base_model="no/model"), MISSING, "base_model"),
    ("create empty model", "CreateTrainingRun", lambda c: pb.CreateTrainingRunRequest(base_model=""), MISSING, "base_model"),
    ("create rank 0", "CreateTrainingRun", lambda c: pb.CreateTrainingRunRequest(base_model=TINY, lora=pb.LoraConfig(rank=0)), BAD, "lora.rank"),
    ("create huge rank", "CreateTrainingRun", lambda c: pb.CreateTrainingRunRequest(base_model=TINY, lora=pb.LoraConfig(rank=2**30)), BAD, "lora.rank"),
    # CreateSamplingSession
    ("session no source", "CreateSamplingSession", lambda c: pb.CreateSamplingSessionRequest(), BAD, "source"),
    ("session bad path", "CreateSamplingSession", lambda c: pb.CreateSamplingSessionRequest(model_path="weights.bin"), BAD, "model_path"),
    ("session traversal", "CreateSamplingSession", lambda c: pb.CreateSamplingSessionRequest(model_path="stillroom://../../etc/sampler_weights/x"), BAD, "model_path"),
    ("session wrong kind", "CreateSamplingSession", lambda c: pb.CreateSamplingSessionRequest(model_path="stillroom://run-x/other/y"), BAD, "model_path"),
    ("session unknown path", "CreateSamplingSession", lambda c: pb.CreateSamplingSessionRequest(model_path="stillroom://run-x/sampler_weights/y"), MISSING, "model_path"),
    # Sample
    ("sample 0 samples", "Sample", lambda c: sample(c, num_samples=0), BAD, "num_samples"),
    ("sample 2**40 samples", "Sample", lambda c: sample(c, num_samples=2**40), BAD, "num_samples"),
    ("sample max_tokens -5", "Sample", lambda c: sample(c, max_tokens=-5), BAD, "sampling_params.max_tokens"),
    ("sample NaN temperature", "Sample", lambda c: sample(c, temperature=math.nan), BAD, "sampling_params.temperature"),
    ("sample top_p 0", "Sample", lambda c: sample(c, top_p=0.0), BAD, "sampling_params.top_p"),
    ("sample NaN top_p", "Sample", lambda c: sample(c, top_p=math.nan), BAD, "sampling_params.top_p"),
    ("sample top_k -2", "Sample", lambda c: sample(c, top_k=-2), BAD, "sampling_params.top_k"),
    ("sample huge stop token", "Sample", lambda c: sample(c, stop=[pb.StopCondition(token=10**12)]), BAD, "sampling_params.stop: token"),
    ("sample empty stop", "Sample", lambda c: sample(c, stop=[pb.StopCondition()]), BAD, "sampling_params.stop[0]"),
    ("sample empty stop text", "Sample", lambda c: sample(c, stop=[pb.StopCondition(text="")]), BAD, "sampling_params.stop"),
    ("sample empty prompt", "Sample", lambda c: sample(c, prompt=()), BAD, "prompt: must hold at least one token"),
    ("sample full context", "Sample", lambda c: sample(c, prompt=[5] * 512), BAD, "prompt: 512 tokens is over the model's limit of 511"),
    ("sample topk 1000", "Sample", lambda c: sample(c, topk=1000), BAD, "topk_prompt_logprobs"),
    ("sample unknown session", "Sample", lambda c: sample(c, session="samp-nope"), MISSING, "sampling_session_id"),
    # ComputeLogprobs, futures, tokenizers
    ("logprobs empty", "ComputeLogprobs", lambda c: pb.ComputeLogprobsRequest(sampling_session_id=c["session"]), BAD, "prompt"),
    ("logprobs token 5000", "ComputeLogprobs", lambda c: pb.ComputeLogprobsRequest(sampling_session_id=c["session"], prompt=_wire.model_input_to_pb(types.ModelInput.from_ints([1, 5000]))), BAD, "prompt: token id 5000"),
    ("future unknown", "RetrieveFuture", lambda c: pb.RetrieveFutureRequest(request_id="req-nope"), MISSING, "request_id"),
    ("tokenizer unknown", "GetTokenizer", lambda c: pb.GetTokenizerRequest(base_model="no/model"), MISSING, "base_model"),
]


def weights_checksum(server, run_id: str) -> str:
    """The weights of the run every malformed request names (the session server holds many)."""
    digest = hashlib.sha256()
    for param in server.engine.runs[run_id].trainable_parameters():
        digest.update(param.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def context(service):
    trainer = service.create_full_training_client(TINY, seed=0)
    sampler = service.create_sampling_client(base_model=TINY)
    return trainer, sampler


def test_there_are_at_least_fifty_distinct_cases():
    assert len({name for name, *_ in CASES}) == len(CASES) >= 50


@pytest.mark.parametrize("name, method, build, code, field", CASES, ids=[c[0] for c in CASES])
def test_malformed_request(server, context, name, method, build, code, field):
    trainer, sampler = context
    ctx = {"run": trainer.training_run_id, "seq": trainer._next_seq, "session": sampler.sampling_session_id}
    before = weights_checksum(server, trainer.training_run_id)
    connection = trainer._connection
    with pytest.raises(stillroom.StillroomError) as raised:
        connection.run(connection.call(method, build(ctx), retry=False))
    assert raised.value.code == code, str(raised.value)
    expected = field.format(ctx["seq"]) if "{0}" in field else field
    assert expected in raised.value.message, raised.value.message
    assert weights_checksum(server, trainer.training_run_id) == before


def test_the_server_still_serves_and_runs_go_on(context):
    trainer, sampler = context
    data = [types.Datum(model_input=types.ModelInput.from_ints([1, 40, 41]),
                        loss_fn_inputs={"target_tokens": [40, 41, 2], "weights": [1.0, 1.0, 1.0]})]
    assert trainer.forward_backward(data, "cross_entropy").result().metrics["loss:sum"] > 0
    assert trainer.optim_step(types.AdamParams(learning_rate=1e-3)).result().metrics["grad_norm:value"] > 0
    assert len(sampler.sample(types.ModelInput.from_ints([1, 40]), 2, types.SamplingParams(max_tokens=3)).result().sequences) == 2
