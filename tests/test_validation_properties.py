"""Property-based: random requests thrown at the validation layer (wire conversion + engine checks)
are either accepted or refused with an engine error that names a field; nothing else escapes, and
nothing is changed."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stillroom._proto import stillroom_pb2 as pb
from stillroom_server.engine.engine import Engine
from stillroom_server.engine.errors import EngineError
from stillroom_server.grpc_api import convert

from conftest import TINY

FIELD_NAMES = ("data", "loss_fn", "prompt", "sampling_params", "num_samples", "topk", "part",
               "adam_params", "loss_fn_config", "seq")

int64s = st.integers(min_value=-(2**63), max_value=2**63 - 1)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from([pb.INT64, pb.FLOAT32, pb.DTYPE_UNSPECIFIED, 7]))
    shape = draw(st.lists(st.integers(min_value=-2, max_value=6), max_size=2))
    data = draw(st.binary(max_size=64))
    if draw(st.booleans()) and dtype in (pb.INT64, pb.FLOAT32):
        values = draw(st.lists(st.integers(-5, 120) if dtype == pb.INT64 else floats, max_size=8))
        import numpy as np
        array = np.asarray(values, dtype="<i8" if dtype == pb.INT64 else "<f4")
        data, shape = array.tobytes(), [len(values)]
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


@st.composite
def data(draw):
    keys = st.sampled_from(["target_tokens", "weights", "advantages", "logprobs", "mystery"])
    return [pb.Datum(model_input=pb.ModelInput(chunks=[
                pb.ModelInputChunk(encoded_text=pb.EncodedTextChunk(tokens=draw(tensors())))
                for _ in range(draw(st.integers(0, 2)))]),
            loss_fn_inputs=draw(st.dictionaries(keys, tensors(), max_size=4)))
            for _ in range(draw(st.integers(0, 3)))]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    engine = Engine(tmp_path_factory.mktemp("validation"))
    engine.create_run("run-prop", TINY, None, seed=0)
    return engine


def weights_of(engine):
    return [p.detach().clone() for p in engine.get_run("run-prop").trainable_parameters()]


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=data(),
       loss_fn=st.sampled_from(["cross_entropy", "importance_sampling", "ppo", "dro", "nope", ""]),
       config=st.dictionaries(st.sampled_from(["beta", "clip_low_threshold", "clip_high_threshold", "x"]),
                              st.floats(allow_nan=True), max_size=2),
       part=st.integers(-2, 3), num_parts=st.integers(-1, 3))
def test_random_forward_backward_requests_are_accepted_or_refused_by_name(engine, data, loss_fn, config, part,
                                                                         num_parts):
    request = pb.ForwardBackwardRequest(training_run_id="run-prop", seq=1, data=data, loss_fn=loss_fn,
                                        loss_fn_config=config, part=part, num_parts=num_parts)
    try:
        work = convert.forward_backward_from_pb(request)
        engine.validate_forward_backward("run-prop", work)
    except EngineError as error:
        assert any(name in str(error) for name in FIELD_NAMES), str(error)
        return
    before = weights_of(engine)
    engine.forward_backward("run-prop", work)  # accepted requests must run without error
    assert all(torch.equal(a, b) for a, b in zip(before, weights_of(engine)))


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=tensors(), num_samples=int64s, max_tokens=st.integers(-3, 4), temperature=floats,
       top_k=st.integers(-3, 200), top_p=floats,
       stop=st.lists(st.one_of(st.text(max_size=3), int64s), max_size=2),
       topk=st.integers(-2, 200))
def test_random_sample_requests_are_accepted_or_refused_by_name(engine, prompt, num_samples, max_tokens,
                                                               temperature, top_k, top_p, stop, topk):
    conditions = [pb.StopCondition(text=s) if isinstance(s, str) else pb.StopCondition(token=s) for s in stop]
    request = pb.SampleRequest(
        prompt=pb.ModelInput(chunks=[pb.ModelInputChunk(encoded_text=pb.EncodedTextChunk(tokens=prompt))]),
        num_samples=num_samples, topk_prompt_logprobs=topk,
        sampling_params=pb.SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                          top_p=top_p, stop=conditions))
    opened = engine.open_sampler(base_model=TINY)
    try:
        work = convert.sample_from_pb(request)
        engine.validate_sample(opened, work)
    except EngineError as error:
        assert any(name in str(error) for name in FIELD_NAMES), str(error)
        return
    result = engine.sample(opened, [work])[0]
    assert len(result.sequences) == num_samples
