"""Renderers turn a task's text into the tokens a model reads and back.

A renderer knows one tokenizer's conventions (specials, chat template), never a task or the
server. `CharRenderer` is for the character-level presets (bos + text; the completion ends with
eos); `ChatRenderer` wraps a Hugging Face tokenizer's `apply_chat_template` for real chat models.
"""

from __future__ import annotations

from typing import Any, Protocol


class Renderer(Protocol):
    stop_tokens: list[int]

    def prompt_tokens(self, prompt: str) -> list[int]: ...

    def completion_tokens(self, prompt: str, completion: str) -> list[int]: ...

    def decode(self, completion_tokens: list[int]) -> str: ...


class CharRenderer:
    """`<bos>` + prompt characters; the completion's characters then `<eos>`."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.stop_tokens = [tokenizer.eos_token_id]

    def prompt_tokens(self, prompt: str) -> list[int]:
        return [self.tokenizer.bos_token_id, *self.tokenizer.encode(prompt)]

    def completion_tokens(self, prompt: str, completion: str) -> list[int]:
        return [*self.tokenizer.encode(completion), self.tokenizer.eos_token_id]

    def decode(self, completion_tokens: list[int]) -> str:
        return self.tokenizer.decode(completion_tokens, skip_special_tokens=True)


class ChatRenderer:
    """A user turn (after an optional system turn) through the tokenizer's chat template.

    The completion is the tokens the template adds for the assistant's reply, up to and including
    its end-of-turn marker (where sampling stops). Templates whose full conversation does not start
    with the prompt's rendering (some strip reasoning from earlier turns) are refused rather than
    silently misaligned.
    """

    def __init__(self, tokenizer: Any, system: str | None = None) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("ChatRenderer: the tokenizer has no chat_template")
        self.tokenizer = tokenizer
        self.system = system
        self.stop_tokens = sorted({tokenizer.eos_token_id, *self._end_of_turn_tokens()} - {None})

    def _messages(self, prompt: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, {"role": "user", "content": prompt}]

    def _encode(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _end_of_turn_tokens(self) -> list[int]:
        """The token the template closes an assistant turn with, when it is a single special."""
        probe = "\x00probe\x00"
        messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": probe}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        tail = text[text.rindex(probe) + len(probe):]
        tokens = self.tokenizer.encode(tail, add_special_tokens=False)
        special = set(self.tokenizer.all_special_ids)
        return [t for t in tokens[:1] if t in special]

    def prompt_tokens(self, prompt: str) -> list[int]:
        return self._encode(self._messages(prompt), add_generation_prompt=True)

    def completion_tokens(self, prompt: str, completion: str) -> list[int]:
        prompt_tokens = self.prompt_tokens(prompt)
        full = self._encode([*self._messages(prompt), {"role": "assistant", "content": completion}],
                            add_generation_prompt=False)
        if full[:len(prompt_tokens)] != prompt_tokens:
            raise ValueError("ChatRenderer: the chat template does not render the conversation as "
                             "the prompt followed by the reply")
        reply = full[len(prompt_tokens):]
        ends = [i for i, t in enumerate(reply) if t in self.stop_tokens]
        return reply[:ends[0] + 1] if ends else reply

    def decode(self, completion_tokens: list[int]) -> str:
        return self.tokenizer.decode(completion_tokens, skip_special_tokens=True)
