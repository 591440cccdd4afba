"""The OpenAI-compatible API under `/oai/api/v1`, as Tinker serves one: `GET /models`,
`POST /completions` and `POST /chat/completions`, for evaluation harnesses, chat front ends and any
OpenAI client pointed at a base model or a sampler checkpoint without the SDK.

A thin adaptor over the core service, like the Tinker API beside it: the same keys (`Authorization:
Bearer`, or `X-API-Key`) and owner rules, bodies read by the same bounded JSON parser into strict,
bounded pydantic models before anything else sees them, and every sample goes through
`Service.sample`, so it is batched with SDK traffic on the same model in the same engine. Text
becomes tokens here (the engine sees token ids only), with the model's own tokenizer and chat
template; a model without a chat template (the char presets) gets FALLBACK_CHAT_TEMPLATE.

The engine returns a sample whole, when it ends: a streamed answer sends its first event at once
(keep-alive comments while it waits) and each choice's text in one chunk when the sample is done.
Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field, StringConstraints
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from stillroom._proto import stillroom_pb2 as pb
from stillroom_server.core import validate
from stillroom_server.core.errors import (
    FailedPrecondition,
    InvalidInput,
    NotFound,
    ResourceExhausted,
    StoredFailure,
    code_for,
)
from stillroom_server.core.futures import result_of
from stillroom_server.core.service import Service
from stillroom_server.engine import checkpoints
from stillroom_server.engine.types import SampleWork, SamplingConfig
from stillroom_server.http_api import schemas
from stillroom_server.http_api.app import STATUS, TinkerApi

PREFIX = "/oai/api/v1"
MAX_TEXT_CHARS = 8 << 20          # one prompt or message
MAX_PROMPTS = 64                  # prompts of one /completions request (each one engine request)
MAX_MESSAGES = 4096
MAX_PARTS = 256                   # content parts of one message
MAX_TOP_LOGPROBS = 20             # OpenAI's own bound (the engine allows 100)
KEEPALIVE_SECONDS = 15.0          # a streamed answer's comment line while the sample runs
COMPLETIONS_MAX_TOKENS = 16       # OpenAI's default for /completions (chat: up to the context)
# For a model whose tokenizer has no chat template (the char presets): one line per message,
# "role: content", after the BOS token, and "assistant:" as the generation prompt.
FALLBACK_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}")
# An engine field name -> the OpenAI parameter it comes from (for the error's `param`).
PARAMS = {"body": None, "num_samples": "n", "base_model": "model", "model_path": "model", "source": "model",
          "sampling_session_id": "model", "topk_sample_logprobs": "logprobs",
          "topk_prompt_logprobs": "logprobs", "prompt_logprobs_last_n": "logprobs"}
_FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]*): ")

Text = Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)]
TokenIds = Annotated[list[schemas.Int64], Field(max_length=schemas.MAX_PROMPT_TOKENS)]
StopText = Annotated[str, StringConstraints(max_length=validate.MAX_STOP_CHARS)]
TopK = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]


# ---------------------------------------------------------------- bodies


class StreamOptions(schemas._Body):  # pyright: ignore[reportPrivateUsage]
    include_usage: bool = False


class _Sampling(schemas._Body):  # pyright: ignore[reportPrivateUsage]
    """The fields both endpoints share. Unknown fields are ignored, as in the Tinker bodies; those
    that would change the answer and are not offered are declared, so asking is refused by name."""

    model: schemas.Name
    n: schemas.Count = 1
    max_tokens: schemas.Int64 | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: schemas.Int64 | None = None          # vLLM's extension
    seed: schemas.Int64 | None = None
    stop: StopText | Annotated[list[StopText], Field(max_length=validate.MAX_STOP_SEQUENCES)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: Annotated[dict[schemas.Id, float], Field(max_length=1024)] | None = None
    user: schemas.Name | None = None
    return_tokens_as_token_ids: bool | None = None  # vLLM's extension: tokens as "token_id:N"


class CompletionBody(_Sampling):
    prompt: (Text | Annotated[list[Text], Field(max_length=MAX_PROMPTS)] | TokenIds
             | Annotated[list[TokenIds], Field(max_length=MAX_PROMPTS)])
    logprobs: TopK | None = None
    echo: bool | None = False
    best_of: schemas.Count | None = None
    suffix: Text | None = None


class ContentPart(schemas._Body):  # pyright: ignore[reportPrivateUsage]
    type: Literal["text"]
    text: Text


class Message(schemas._Body):  # pyright: ignore[reportPrivateUsage]
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | Annotated[list[ContentPart], Field(max_length=MAX_PARTS)] | None = None
    name: schemas.Name | None = None


class ResponseFormat(schemas._Body):  # pyright: ignore[reportPrivateUsage]
    type: Literal["text"]


class ChatBody(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: schemas.Int64 | None = None
    logprobs: bool | None = False
    top_logprobs: TopK | None = None
    tools: Annotated[list[Any], Field(max_length=MAX_PARTS)] | None = None
    functions: Annotated[list[Any], Field(max_length=MAX_PARTS)] | None = None
    response_format: ResponseFormat | None = None


# Fields that take one of several forms: what a refusal says (pydantic names the last form it tried).
FORMS = {"prompt": f"a string, a list of at most {MAX_PROMPTS} strings, a list of token ids (integers), "
                   f"or a list of at most {MAX_PROMPTS} such lists",
         "stop": f"a string or a list of at most {validate.MAX_STOP_SEQUENCES} strings of at most "
                 f"{validate.MAX_STOP_CHARS} characters",
         "content": f"a string or a list of at most {MAX_PARTS} text parts ({{\"type\": \"text\", "
                    f"\"text\": ...}}; images and audio are not offered)"}


def parse(model: type[_Sampling], body: Any) -> Any:
    """`schemas.parse`, naming the forms of a field that takes several (prompt, stop, content)."""
    return schemas.parse(model, body, FORMS)


# ---------------------------------------------------------------- errors


def _error_type(status: int) -> str:
    return "requests" if status == 429 else "server_error" if status >= 500 else "invalid_request_error"


def error_body(error: BaseException, prompt_field: str = "prompt") -> tuple[int, dict, dict[str, str]]:
    """An error's status, OpenAI error object and headers. The core's messages lead with the
    field at fault, named as the engine names it: the param (and the message's lead) is the OpenAI
    field it came from. The openai client honours the retry headers."""
    code, message = code_for(error)
    status = STATUS.get(code, 500)
    match = _FIELD.match(message)
    param = None
    if match:
        field = match.group(1).removeprefix("sampling_params.")
        param = prompt_field if field == "prompt" else PARAMS.get(field, field)
        if param:
            message = f"{param}: {message[match.end():]}"
    headers = {}
    if isinstance(error, ResourceExhausted):
        headers["x-should-retry"] = "true" if error.retryable else "false"
        if error.retry_after_seconds:
            headers["retry-after-ms"] = str(int(error.retry_after_seconds * 1000))
    oai_code = {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(status)
    if status == 404:
        oai_code = "model_not_found" if param == "model" else "not_found"
    return status, {"message": message, "type": _error_type(status), "param": param,
                    "code": oai_code}, headers


def error_response(error: BaseException, prompt_field: str = "prompt") -> JSONResponse:
    status, body, headers = error_body(error, prompt_field)
    return JSONResponse({"error": body}, status_code=status, headers=headers)


# ---------------------------------------------------------------- the adaptor


@dataclass
class _Choice:
    """One sampled sequence, read from the stored result."""

    tokens: list[int]
    logprobs: list[float]
    finish_reason: str
    topk_ids: np.ndarray | None        # [n, k]
    topk_logprobs: np.ndarray | None


@dataclass
class _Prompt:
    tokens: list[int]
    text: str


def _array(tensor: pb.Tensor) -> np.ndarray:
    dtype = np.dtype("<f4") if tensor.dtype == pb.FLOAT32 else np.dtype("<i8")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(list(tensor.shape))


def _finite(value: float) -> float | None:
    """A logprob for JSON: NaN (no value) -> null; -inf -> -9999.0, as vLLM writes it."""
    if math.isnan(value):
        return None
    return value if math.isfinite(value) else -9999.0


class OpenAIApi:
    def __init__(self, api: TinkerApi) -> None:
        self.api = api
        self.service: Service = api.service
        self._sessions: dict[tuple[str, str], str] = {}
        self._opening: dict[tuple[str, str], asyncio.Task] = {}
        self._tokenizers: dict[str, Any] = {}
        # Tokenizers are used from one thread: a fast tokenizer is not safe to share across threads.
        self._text_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="oai-text")

    async def _text(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._text_thread, fn)

    # ---------------------------------------------------------------- models and tokenizers

    @staticmethod
    def _model_key(model: str) -> str:
        return checkpoints.parse(model, "model").uri if checkpoints.is_path(model) else model

    async def _session(self, owner: str, model: str) -> str:
        """The owner's sampling session on `model`, opened once (by `open_sampler`, with its owner
        rules) and kept: at most one per (owner, model the owner may read), where a session per
        request would pile up. The service closes a session whose checkpoint is deleted, or refuses
        one it no longer allows: the next request opens it again, which names the refusal."""
        key = (owner, self._model_key(model))
        session_id = self._sessions.get(key)
        if session_id is not None:
            try:
                self.service.sampler_info(owner, session_id)
                return session_id
            except (NotFound, FailedPrecondition):
                self._sessions.pop(key, None)
        task = self._opening.get(key)
        if task is None:
            task = asyncio.ensure_future(self._open(owner, key[1]))
            self._opening[key] = task
            task.add_done_callback(lambda _: self._opening.pop(key, None))
        return await asyncio.shield(task)

    async def _open(self, owner: str, model: str) -> str:
        if checkpoints.is_path(model):
            info = await self.service.open_sampler(owner, model_path=model)
        else:
            info = await self.service.open_sampler(owner, base_model=model)
        self._sessions[(owner, model)] = info.sampling_session_id
        return info.sampling_session_id

    async def _tokenizer(self, base_model: str) -> Any:
        if base_model not in self._tokenizers:
            def load():
                from transformers import AutoTokenizer
                return AutoTokenizer.from_pretrained(self.service.tokenizer_dir(base_model))
            self._tokenizers[base_model] = await self._text(load)
        return self._tokenizers[base_model]

    async def models(self, request: Request, owner: str) -> Response:
        data = [self._model_card(m["model_name"], "stillroom", 0) for m in self.service.supported_models()]
        data += [self._model_card(row.path, owner, int(row.created_at.timestamp()))
                 for row in self.service.list_checkpoints(owner) if row.kind == "sampler_weights"]
        return JSONResponse({"object": "list", "data": data})

    async def model(self, request: Request, owner: str) -> Response:
        name = request.path_params["model"]
        if checkpoints.is_path(name):
            _, row = self.service.owned_checkpoint(name, owner, "model")
            return JSONResponse(self._model_card(name, owner, int(row.created_at.timestamp())))
        if name not in {m["model_name"] for m in self.service.supported_models()}:
            raise NotFound(f"model: the model '{name[:120]}' does not exist")
        return JSONResponse(self._model_card(name, "stillroom", 0))

    @staticmethod
    def _model_card(name: str, owned_by: str, created: int) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": owned_by}

    # ---------------------------------------------------------------- requests

    @staticmethod
    def _config(body: _Sampling, max_tokens: int) -> SamplingConfig:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name):
                raise InvalidInput(f"{name}: not offered by this server (0 or unset only)")
        if body.logit_bias:
            raise InvalidInput("logit_bias: not offered by this server")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        return SamplingConfig(max_tokens=max_tokens,
                              temperature=1.0 if body.temperature is None else body.temperature,
                              top_k=-1 if body.top_k is None else body.top_k,
                              top_p=1.0 if body.top_p is None else body.top_p,
                              seed=body.seed, stop_texts=stop)

    def _submit(self, owner: str, session_id: str, prompts: list[_Prompt], n: int,
                config: SamplingConfig, topk: int, prompt_logprobs: bool) -> list[str]:
        """Queue one engine request per prompt, together (so they are batched)."""
        ids = []
        for prompt in prompts:
            work = SampleWork(prompt_T=torch.tensor(prompt.tokens, dtype=torch.long), num_samples=n,
                              params=config, include_prompt_logprobs=prompt_logprobs,
                              topk_prompt_logprobs=topk if prompt_logprobs else 0,
                              topk_sample_logprobs=topk)
            ids.append(self.service.sample(owner, session_id, work))
        return ids

    async def _results(self, owner: str, request_ids: list[str]) -> AsyncIterator[pb.SampleResult | None]:
        """Each request's result in order; None while one is still running (every
        KEEPALIVE_SECONDS). A failed request raises its own error."""
        for request_id in request_ids:
            record = await self.service.wait(owner, request_id, KEEPALIVE_SECONDS)
            while record.status == "pending":
                yield None
                record = await self.service.wait(owner, request_id, KEEPALIVE_SECONDS)
            if record.status == "failed":
                raise StoredFailure(record.error_code or "INTERNAL", record.error_message or "")
            yield result_of(record).sample

    @staticmethod
    def _choices(result: pb.SampleResult) -> list[_Choice]:
        out = []
        for s in result.sequences:
            has_topk = s.HasField("topk_logprobs")
            out.append(_Choice(
                tokens=_array(s.tokens).tolist(), logprobs=_array(s.logprobs).tolist(),
                finish_reason="stop" if s.stop_reason == pb.STOP else "length",
                topk_ids=_array(s.topk_logprobs.token_ids) if has_topk else None,
                topk_logprobs=_array(s.topk_logprobs.logprobs) if has_topk else None))
        return out

    @staticmethod
    def _text_of(tokenizer: Any, choice: _Choice, stop: tuple[str, ...]) -> str:
        """What the client reads: special tokens (EOS, end of turn) left out, and the text cut
        before the first stop string when one ended the sample."""
        text = tokenizer.decode(choice.tokens, skip_special_tokens=True)
        if choice.finish_reason == "stop" and stop:
            cuts = [text.find(s) for s in stop if s in text]
            if cuts:
                text = text[:min(cuts)]
        return text

    @staticmethod
    def _token_strings(tokenizer: Any, ids: list[int], as_ids: bool) -> list[str]:
        if as_ids:
            return [f"token_id:{i}" for i in ids]
        return tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False)

    # ---------------------------------------------------------------- /completions

    async def completions(self, request: Request, owner: str) -> Response:
        body = parse(CompletionBody, await self.api.json_body(request))
        if body.best_of is not None and body.best_of != body.n:
            raise InvalidInput("best_of: not offered by this server (unset, or equal to n)")
        if body.suffix:
            raise InvalidInput("suffix: not offered by this server")
        echo = bool(body.echo)
        max_tokens = COMPLETIONS_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        if max_tokens == 0 and not echo:
            raise InvalidInput("max_tokens: must be >= 1 (0 only with echo, to score the prompt)")
        config = self._config(body, 1 if max_tokens == 0 else max_tokens)
        session_id = await self._session(owner, body.model)  # the owner before the prompt is read
        tokenizer = await self._tokenizer(self.service.sampler_info(owner, session_id).base_model)
        prompts = await self._text(lambda: self._completion_prompts(tokenizer, body.prompt))
        topk = body.logprobs or 0
        scored = echo and body.logprobs is not None
        request_ids = self._submit(owner, session_id, prompts, body.n, config, topk, scored)
        answer = _Answer(self, body, tokenizer, prompts, request_ids, owner, chat=False,
                         echo=echo, max_tokens=max_tokens)
        return await answer.respond()

    @staticmethod
    def _completion_prompts(tokenizer: Any, prompt: Any) -> list[_Prompt]:
        """A prompt (text or token ids) or a list of them; text is encoded with the tokenizer's
        own special tokens (a BOS where its post-processor adds one), as vLLM does."""
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        if not prompt:
            raise InvalidInput("prompt: must not be empty")
        out = []
        for item in prompt:
            if isinstance(item, str):
                out.append(_Prompt(tokenizer.encode(item, add_special_tokens=True), item))
            else:
                out.append(_Prompt(list(item), ""))  # its text is decoded later, if echoed
        return out

    # ---------------------------------------------------------------- /chat/completions

    async def chat_completions(self, request: Request, owner: str) -> Response:
        body = parse(ChatBody, await self.api.json_body(request))
        if body.top_logprobs and not body.logprobs:
            raise InvalidInput("top_logprobs: needs logprobs to be true")
        for name in ("tools", "functions"):
            if getattr(body, name):
                raise InvalidInput(f"{name}: tool calling is not offered by this server")
        chosen = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = -1 if chosen is None else chosen
        config = self._config(body, max_tokens)
        session_id = await self._session(owner, body.model)  # the owner before the prompt is read
        tokenizer = await self._tokenizer(self.service.sampler_info(owner, session_id).base_model)
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content if isinstance(m.content, str)
                     else "\n".join(part.text for part in m.content or [])} for m in body.messages]
        prompt = await self._text(lambda: self._chat_prompt(tokenizer, messages))
        topk = (body.top_logprobs or 0) if body.logprobs else 0
        request_ids = self._submit(owner, session_id, [prompt], body.n, config, topk, False)
        answer = _Answer(self, body, tokenizer, [prompt], request_ids, owner, chat=True, echo=False,
                         max_tokens=max_tokens)
        return await answer.respond()

    @staticmethod
    def _chat_prompt(tokenizer: Any, messages: list[dict]) -> _Prompt:
        template = None if tokenizer.chat_template else FALLBACK_CHAT_TEMPLATE
        try:
            text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as error:  # noqa: BLE001 - the model's template refused these messages
            raise InvalidInput(f"messages: the model's chat template refused them: "
                               f"{str(error)[:200]}") from None
        return _Prompt(tokenizer.encode(text, add_special_tokens=False), text)


class _Answer:
    """One request's answer, whole or streamed, from its engine requests' results."""

    def __init__(self, oai: OpenAIApi, body: Any, tokenizer: Any, prompts: list[_Prompt],
                 request_ids: list[str], owner: str, chat: bool, echo: bool, max_tokens: int) -> None:
        self.oai, self.body, self.tokenizer, self.prompts = oai, body, tokenizer, prompts
        self.request_ids, self.owner, self.chat, self.echo = request_ids, owner, chat, echo
        self.scoring_only = max_tokens == 0  # echo with max_tokens 0: the prompt's logprobs only
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_ids[0].removeprefix("req-")
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        self.as_ids = bool(body.return_tokens_as_token_ids)
        self.prompt_field = "messages" if chat else "prompt"
        self.completion_tokens = 0

    async def respond(self) -> Response:
        if self.body.stream:
            return StreamingResponse(self._events(), media_type="text/event-stream",
                                     headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        choices, prompt = [], 0
        async for result in self.oai._results(self.owner, self.request_ids):
            if result is not None:
                choices += await self.oai._text(lambda r=result, p=prompt: self._render(r, p))
                prompt += 1
        return JSONResponse({"id": self.id, "object": self.object, "created": self.created,
                             "model": self.body.model, "system_fingerprint": None,
                             "choices": [c for c, _ in choices], "usage": self._usage()})

    def _usage(self) -> dict:
        prompt_tokens = sum(len(p.tokens) for p in self.prompts)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt_tokens + self.completion_tokens}

    def _render(self, result: pb.SampleResult, prompt_index: int) -> list[tuple[dict, dict]]:
        """Each choice of one prompt's result (choice i of prompt p is choice p * n + i, as OpenAI
        numbers them): (the whole choice, its streamed delta)."""
        prompt = self.prompts[prompt_index]
        out = []
        for offset, choice in enumerate(self.oai._choices(result)):
            index = prompt_index * self.body.n + offset
            if self.scoring_only:
                choice = _Choice([], [], "length", None, None)
            self.completion_tokens += len(choice.tokens)
            text = self.oai._text_of(self.tokenizer, choice, self.stop)
            if self.chat:
                logprobs = self._chat_logprobs(choice) if self.body.logprobs else None
                message = {"role": "assistant", "content": text}
                out.append(({"index": index, "message": message, "logprobs": logprobs,
                             "finish_reason": choice.finish_reason},
                            {"index": index, "delta": {"content": text}, "logprobs": logprobs,
                             "finish_reason": None}))
            else:
                if self.echo:
                    text = (prompt.text or self.tokenizer.decode(prompt.tokens)) + text
                logprobs = (self._completion_logprobs(result, prompt, choice)
                            if self.body.logprobs is not None else None)
                whole = {"index": index, "text": text, "logprobs": logprobs,
                         "finish_reason": choice.finish_reason}
                out.append((whole, whole | {"finish_reason": None}))
        return out

    def _top(self, ids: np.ndarray | None, values: np.ndarray | None, row: int) -> list[tuple[str, float]]:
        if ids is None or values is None or row >= len(ids):
            return []
        strings = self.oai._token_strings(self.tokenizer, [int(i) for i in ids[row]], self.as_ids)
        return [(s, float(v) if math.isfinite(v) else -9999.0) for s, v in zip(strings, values[row])]

    def _chat_logprobs(self, choice: _Choice) -> dict:
        strings = self.oai._token_strings(self.tokenizer, choice.tokens, self.as_ids)
        content = []
        for i, (token, logprob) in enumerate(zip(strings, choice.logprobs)):
            top = [{"token": t, "logprob": v, "bytes": list(t.encode())}
                   for t, v in self._top(choice.topk_ids, choice.topk_logprobs, i)]
            content.append({"token": token, "logprob": _finite(logprob), "bytes": list(token.encode()),
                            "top_logprobs": top})
        return {"content": content, "refusal": None}

    def _completion_logprobs(self, result: pb.SampleResult, prompt: _Prompt, choice: _Choice) -> dict:
        tokens: list[int] = []
        values: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        if self.echo:  # the prompt's own logprobs, the first one null (nothing precedes it)
            tokens += prompt.tokens
            scored = _array(result.prompt_logprobs).tolist() if result.HasField("prompt_logprobs") else []
            values += [_finite(v) for v in scored] or [None] * len(prompt.tokens)
            has_topk = result.HasField("topk_prompt_logprobs")
            ids = _array(result.topk_prompt_logprobs.token_ids) if has_topk else None
            lps = _array(result.topk_prompt_logprobs.logprobs) if has_topk else None
            tops += [None] + [dict(self._top(ids, lps, i)) for i in range(1, len(prompt.tokens))]
        tokens += choice.tokens
        values += [_finite(v) for v in choice.logprobs]
        tops += [dict(self._top(choice.topk_ids, choice.topk_logprobs, i)) for i in range(len(choice.tokens))]
        strings = self.oai._token_strings(self.tokenizer, tokens, self.as_ids)
        offset = 0 if self.echo else len(prompt.text)
        offsets = []
        for s in strings:
            offsets.append(offset)
            offset += len(s)
        return {"tokens": strings, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    async def _events(self) -> AsyncIterator[bytes]:
        """Server-sent events: the first at once (the role, for chat), keep-alive comments while
        the engine samples, each choice's text when its sample is done, then its finish_reason,
        the usage if stream_options asks for it, and `[DONE]`. A failure becomes an error event."""
        head = {"id": self.id, "object": self.object + (".chunk" if self.chat else ""),
                "created": self.created, "model": self.body.model, "system_fingerprint": None}
        n = self.body.n
        if self.chat:
            yield _event(head | {"choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                              "logprobs": None, "finish_reason": None}
                                             for i in range(n)]})
        else:
            yield b": stillroom sampling\n\n"
        prompt = 0
        try:
            async for result in self.oai._results(self.owner, self.request_ids):
                if result is None:
                    yield b": keep-alive\n\n"
                    continue
                rendered = await self.oai._text(lambda r=result, p=prompt: self._render(r, p))
                prompt += 1
                for whole, delta in rendered:
                    yield _event(head | {"choices": [delta]})
                    end = ({"index": whole["index"], "delta": {}, "logprobs": None} if self.chat
                           else {"index": whole["index"], "text": "", "logprobs": None})
                    yield _event(head | {"choices": [end | {"finish_reason": whole["finish_reason"]}]})
        except Exception as error:  # noqa: BLE001 - the status is sent: the error goes in the stream
            _, body, _ = error_body(error, self.prompt_field)
            yield _event({"error": body})
            return
        options = self.body.stream_options
        if options is not None and options.include_usage:
            yield _event(head | {"choices": [], "usage": self._usage()})
        yield b"data: [DONE]\n\n"


def _event(value: dict) -> bytes:
    return b"data: " + json.dumps(value, ensure_ascii=False, allow_nan=False,
                                  separators=(",", ":")).encode() + b"\n\n"


def oai_endpoint(oai: OpenAIApi, handler: Callable[[Request, str], Awaitable[Response]],
                 prompt_field: str = "prompt"):
    """Authenticate (the Tinker API's keys and rules), run, and answer any error in OpenAI's shape."""

    async def run(request: Request) -> Response:
        try:
            return await handler(request, oai.api.owner(request))
        except Exception as error:  # noqa: BLE001 - mapped to a status here, once
            return error_response(error, prompt_field)

    return run


async def unknown_route(request: Request) -> Response:
    message = (f"unknown endpoint: {request.method} {request.url.path[:200]} (this server offers GET "
               f"{PREFIX}/models, POST {PREFIX}/completions and POST {PREFIX}/chat/completions)")
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                   "code": "unknown_url"}}, status_code=404)


def routes(api: TinkerApi) -> list[Route]:
    oai = OpenAIApi(api)
    return [
        Route(f"{PREFIX}/models", oai_endpoint(oai, oai.models), methods=["GET"]),
        Route(f"{PREFIX}/models/{{model:path}}", oai_endpoint(oai, oai.model), methods=["GET"]),
        Route(f"{PREFIX}/completions", oai_endpoint(oai, oai.completions), methods=["POST"]),
        Route(f"{PREFIX}/chat/completions", oai_endpoint(oai, oai.chat_completions, "messages"),
              methods=["POST"]),
        Route(f"{PREFIX}/{{rest:path}}", unknown_route,
              methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
    ]
