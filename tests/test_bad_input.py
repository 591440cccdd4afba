"""Bad input gets a clear status code and a message naming the field, changes nothing, and the
server keeps serving."""

from __future__ import annotations

import pytest

import stillroom
from stillroom import _wire, types
from stillroom._proto import stillroom_pb2 as pb

from conftest import TINY
from helpers import encode_line, sft_datum


@pytest.fixture(scope="module")
def trainer(service):
    return service.create_full_training_client(TINY, seed=0)


@pytest.fixture(scope="module")
def sampler(service):
    return service.create_sampling_client(base_model=TINY)


def datum(tokens, targets=None, weights=None, **extra):
    targets = targets if targets is not None else tokens
    weights = weights if weights is not None else [1.0] * len(tokens)
    return types.Datum(model_input=types.ModelInput.from_ints(tokens),
                       loss_fn_inputs={"target_tokens": targets, "weights": weights, **extra})


def test_unknown_model_is_not_found(service):
    with pytest.raises(stillroom.NotFoundError, match="base_model: unknown model 'no/such-model'"):
        service.create_full_training_client("no/such-model")
    with pytest.raises(stillroom.NotFoundError, match="base_model"):
        service.create_sampling_client(base_model="no/such-model")
    with pytest.raises(stillroom.BadRequestError, match="lora.rank"):
        service.create_lora_training_client(TINY, rank=0)


BAD_TRAINING_CALLS = [
    ("token id out of vocabulary", lambda: ([datum([5, 6, 100])], "cross_entropy", None),
     "data\\[0\\].model_input: token id 100 is outside the vocabulary \\[0, 100\\)"),
    ("negative token id", lambda: ([datum([5, -1])], "cross_entropy", None), "token id -1"),
    ("target out of vocabulary", lambda: ([datum([5, 6], targets=[6, 1000])], "cross_entropy", None),
     "target_tokens: token id 1000"),
    ("mismatched weights", lambda: ([datum([5, 6, 7], weights=[1.0, 1.0])], "cross_entropy", None),
     "data\\[0\\].loss_fn_inputs.weights: shape \\[2\\] does not match model_input length 3"),
    ("mismatched targets", lambda: ([datum([5, 6, 7], targets=[6, 7])], "cross_entropy", None),
     "target_tokens: shape \\[2\\]"),
    ("unknown loss", lambda: ([datum([5, 6])], "mystery_loss", None), "loss_fn: unknown loss 'mystery_loss'"),
    ("missing advantages", lambda: ([datum([5, 6])], "importance_sampling", None),
     "loss_fn_inputs: missing \\['advantages', 'logprobs'\\]"),
    ("unknown config key", lambda: ([datum([5, 6])], "cross_entropy", {"beta": 1.0}),
     "loss_fn_config: unknown key"),
    ("empty data", lambda: ([], "cross_entropy", None), "data: at least one datum"),
    ("empty tokens", lambda: ([datum([])], "cross_entropy", None), "must hold at least one token"),
    ("too long", lambda: ([datum([5] * 513)], "cross_entropy", None),
     "513 tokens is over the model's limit of 512"),
    ("NaN weight", lambda: ([datum([5, 6], weights=[1.0, float("nan")])], "cross_entropy", None),
     "weights: values must be finite"),
]


@pytest.mark.parametrize("case, build, message", BAD_TRAINING_CALLS, ids=[c[0] for c in BAD_TRAINING_CALLS])
def test_bad_forward_backward_is_invalid_argument_and_changes_nothing(service, trainer, tokenizer,
                                                                      case, build, message):
    probe = sft_datum(encode_line(tokenizer, "probe\n"))
    before = trainer.forward([probe], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data
    data, loss_fn, config = build()
    with pytest.raises(stillroom.BadRequestError, match=message) as raised:
        trainer.forward_backward(data, loss_fn, config).result()
    assert raised.value.code == "INVALID_ARGUMENT"
    # nothing was accumulated: an optimizer step with no gradient leaves the weights alone
    assert trainer.optim_step(types.AdamParams(learning_rate=1.0)).result().metrics["grad_norm:value"] == 0.0
    after = trainer.forward([probe], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data
    assert before == after


BAD_ADAM = [("learning_rate", -1.0), ("beta1", 1.0), ("beta2", -0.1), ("eps", 0.0),
            ("weight_decay", -1.0), ("grad_clip_norm", float("inf"))]


@pytest.mark.parametrize("field, value", BAD_ADAM)
def test_bad_adam_params_name_the_field(trainer, field, value):
    params = types.AdamParams(**{field: value})
    with pytest.raises(stillroom.BadRequestError, match=f"adam_params.{field}"):
        trainer.optim_step(params).result()


BAD_SAMPLES = [
    ("token out of vocabulary", [5, 200], {}, 1, "prompt: token id 200"),
    ("empty prompt", [], {}, 1, "prompt: must hold at least one token"),
    ("negative max_tokens", [5], {"max_tokens": -5}, 1, "sampling_params.max_tokens"),
    ("top_p zero", [5], {"top_p": 0.0}, 1, "sampling_params.top_p: must be in \\(0, 1\\]"),
    ("top_p above one", [5], {"top_p": 1.5}, 1, "sampling_params.top_p"),
    ("negative temperature", [5], {"temperature": -1.0}, 1, "sampling_params.temperature"),
    ("top_k zero", [5], {"top_k": 0}, 1, "sampling_params.top_k"),
    ("stop token out of vocabulary", [5], {"stop": [1000]}, 1, "sampling_params.stop: token 1000"),
    ("too many samples", [5], {}, 10_000, "num_samples: must be between 1 and 128"),
    ("no samples", [5], {}, 0, "num_samples"),
]


@pytest.mark.parametrize("case, prompt, params, n, message", BAD_SAMPLES, ids=[c[0] for c in BAD_SAMPLES])
def test_bad_sample_requests_name_the_field(sampler, case, prompt, params, n, message):
    with pytest.raises(stillroom.BadRequestError, match=message):
        sampler.sample(types.ModelInput.from_ints(prompt), n,
                       types.SamplingParams(**{"max_tokens": 5, **params})).result()


def test_malformed_wire_tensors_are_refused(trainer):
    connection = trainer._connection
    good = _wire.datum_to_pb(datum([5, 6]))
    torn = pb.Datum()
    torn.CopyFrom(good)
    torn.loss_fn_inputs["weights"].data = b"\x00\x00"
    wrong_type = pb.Datum()
    wrong_type.CopyFrom(good)
    wrong_type.loss_fn_inputs["target_tokens"].CopyFrom(_wire.pack([5.0, 6.0], "float32"))
    for bad, message in ((torn, "weights: 2 bytes do not hold shape"),
                         (wrong_type, "target_tokens: dtype must be int64")):
        request = pb.ForwardBackwardRequest(training_run_id=trainer.training_run_id,
                                            seq=trainer._next_seq, data=[bad], loss_fn="cross_entropy")
        with pytest.raises(stillroom.BadRequestError, match=message):
            connection.run(connection.call("ForwardBackward", request))


def test_missing_things_are_not_found(service, trainer):
    connection = trainer._connection
    calls = [
        ("RetrieveFuture", pb.RetrieveFutureRequest(request_id="req-nope"), "request_id"),
        ("GetTrainingRun", pb.GetTrainingRunRequest(training_run_id="run-nope"), "training_run_id"),
        ("Sample", pb.SampleRequest(sampling_session_id="samp-nope", num_samples=1), "sampling_session_id"),
        ("CreateSamplingSession", pb.CreateSamplingSessionRequest(
            model_path="stillroom://run-nope/sampler_weights/x"), "model_path"),
    ]
    for method, request, field in calls:
        with pytest.raises(stillroom.NotFoundError, match=field):
            connection.run(connection.call(method, request))
    with pytest.raises(stillroom.BadRequestError, match="model_path: .* is not a checkpoint path"):
        service.create_sampling_client(model_path="stillroom://../../etc/passwd")


def test_bad_checkpoint_names_are_refused_and_write_nothing(server, trainer):
    def files():
        return sorted(p for p in server.config.data_dir.rglob("*") if "stillroom.db" not in p.name)

    before = files()
    for name in ("../escape", "a/b", "bad\nname", ".hidden"):
        with pytest.raises(stillroom.BadRequestError, match="name: .* is not a valid checkpoint name"):
            trainer.save_weights_for_sampler(name).result()
    assert files() == before
    trainer.save_weights_for_sampler("taken").result()
    written = files()
    with pytest.raises(stillroom.ConflictError, match="already exists"):
        trainer.save_weights_for_sampler("taken").result()
    assert files() == written


def test_the_server_still_serves_after_all_of_that(service, tokenizer):
    sampler = service.create_sampling_client(base_model=TINY)
    result = sampler.sample(types.ModelInput.from_ints([1, 40]), 2,
                            types.SamplingParams(max_tokens=3, seed=0)).result()
    assert len(result.sequences) == 2


def test_a_stop_condition_without_text_or_token_is_refused(sampler):
    connection = sampler._connection
    request = pb.SampleRequest(
        sampling_session_id=sampler.sampling_session_id, num_samples=1,
        prompt=_wire.model_input_to_pb(types.ModelInput.from_ints([1, 40])),
        sampling_params=pb.SamplingParams(max_tokens=3, temperature=1.0, top_k=-1, top_p=1.0,
                                          stop=[pb.StopCondition(text="x"), pb.StopCondition()]))
    with pytest.raises(stillroom.BadRequestError,
                       match="sampling_params.stop\\[1\\]: needs a text or a token"):
        connection.run(connection.call("Sample", request))
    with pytest.raises(ValueError, match="stop"):
        types.SamplingParams(max_tokens=3, stop=[1.5, "x"])  # pyright: ignore[reportArgumentType]
