"""Where base models come from and where they live: presets, local Hugging Face directories.

`ModelHost` resolves a `base_model` name to a directory, loads it once onto the engine's device as
a frozen module, and hands out structural copies that share its weights (for LoRA hosts) or own
them (for full fine-tuning and full snapshots). It knows nothing of runs or requests.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from stillroom_server.engine.kernels import packed_linear
from stillroom_server.engine.models import presets

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
from stillroom_server.engine.errors import InvalidInput, NotFound

logger = logging.getLogger("stillroom.engine")
MAX_NAME_CHARS = 512   # a model's name or folder path, as a request gives it
PEFT_NAME = re.compile(r"(?P<base>.+):peft:(?P<context>[0-9]{1,9})")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
                   "added_tokens.json", "generation_config.json")


@dataclasses.dataclass
class BaseModel:
    name: str
    directory: Path
    module: PreTrainedModel            # frozen, eval mode, on the engine's device
    vocab_size: int
    max_context: int
    eos_token_ids: tuple[int, ...]
    tokenizer: PreTrainedTokenizerBase  # for stop strings and tokenizer comparisons

    @classmethod
    def of(cls, name: str, directory: Path, module: Any, tokenizer: Any, vocab_size: int) -> BaseModel:
        """The facts of a loaded (or meta, or sharded) module: its context length and stop ids."""
        return cls(name=name, directory=directory, module=module, vocab_size=vocab_size,
                   max_context=int(getattr(module.config, "max_position_embeddings", 2048)),
                   eos_token_ids=stop_token_ids(module, tokenizer), tokenizer=tokenizer)

    def shared_copy(self) -> Any:
        """A copy of the module's structure whose parameters are this model's own tensors."""
        memo = {id(t): t for t in [*self.module.parameters(), *self.module.buffers()]}
        return copy.deepcopy(self.module, memo)

    def owned_copy(self, requires_grad: bool) -> Any:
        module = copy.deepcopy(self.module)
        for param in module.parameters():
            param.requires_grad_(requires_grad)
        return module

    def tokenizer_files(self) -> dict[str, bytes]:
        return {name: (self.directory / name).read_bytes()
                for name in TOKENIZER_FILES if (self.directory / name).exists()}


class ModelHost:
    def __init__(self, data_dir: Path, device: torch.device, dtype: torch.dtype,
                 local_models: dict[str, Path] | None = None) -> None:
        self.models_dir = data_dir / "models"
        self.device = device
        self.dtype = dtype
        self.local_models = dict(local_models or {})
        self._loaded: dict[str, BaseModel] = {}
        self._lock = threading.Lock()

    def known_models(self) -> list[str]:
        return [*presets.PRESETS, *self.local_models]

    def canonical(self, name: str) -> str:
        """The model a name means. Tinker's cookbook writes `NAME:peft:<context>` (NAME served for
        LoRA with that context): that is NAME, if its context is at least as long."""
        if len(name) > MAX_NAME_CHARS:
            raise InvalidInput(f"base_model: at most {MAX_NAME_CHARS} characters, got {len(name)}")
        match = PEFT_NAME.fullmatch(name)
        if match is None:
            return name
        base, context = match["base"], int(match["context"])
        limit = self.describe(base)["max_context"]
        if context > limit:
            raise InvalidInput(f"base_model: {name} asks for a context of {context} tokens; {base} "
                               f"has {limit}")
        return base

    def resolve(self, name: str) -> Path:
        name = self.canonical(name)
        if presets.is_preset(name):
            return presets.ensure_preset(name, self.models_dir)
        if name in self.local_models:
            return self.local_models[name]
        path = Path(name).expanduser()
        if path.is_absolute() and (path / "config.json").exists():
            return path
        raise NotFound(f"base_model: unknown model '{name}' (known: {', '.join(self.known_models())}, "
                       "or an absolute path to a Hugging Face model directory)")

    def describe(self, name: str) -> dict:
        """Context length and vocabulary size, read from config.json without loading weights."""
        name = self.canonical(name)
        if presets.is_preset(name):
            spec = presets.PRESETS[name]
            return {"max_context": spec.max_context,
                    "vocab_size": len(presets.SPECIAL_TOKENS) + len(presets.CHARACTERS)}
        config = json.loads((self.resolve(name) / "config.json").read_text())
        config = config.get("text_config", config)
        return {"max_context": int(config.get("max_position_embeddings", 2048)),
                "vocab_size": int(config["vocab_size"])}

    def loaded(self) -> list[str]:
        """The models whose weights (or facts, for a host of facts) are loaded."""
        with self._lock:
            return sorted(self._loaded)

    def get(self, name: str) -> BaseModel:
        name = self.canonical(name)
        with self._lock:
            if name not in self._loaded:
                self._loaded[name] = self._load(name)
            return self._loaded[name]

    def _load(self, name: str) -> BaseModel:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        directory = self.resolve(name)
        logger.info("loading base model %s from %s onto %s (%s)", name, directory, self.device,
                    self.dtype)
        try:
            # safetensors only: a pytorch_model.bin is a pickle, and no pickle is ever loaded
            module = AutoModelForCausalLM.from_pretrained(directory, dtype=self.dtype, use_safetensors=True)
            tokenizer = AutoTokenizer.from_pretrained(directory)
        except (OSError, ValueError) as error:
            raise InvalidInput(f"base_model: cannot load '{name}' from {directory}: {error}") from error
        module.to(self.device).eval()  # pyright: ignore[reportArgumentType] - transformers' stubs
        module.requires_grad_(False)
        packed_linear.install(module)  # inference linears on prepacked weights (packed_linear.py)
        vocab_size = int(module.get_input_embeddings().weight.shape[0])  # pyright: ignore[reportIndexIssue]
        return BaseModel.of(name, directory, module, tokenizer, vocab_size)


class FactsHost(ModelHost):
    """Base models as facts: config, tokenizer and a module on the meta device (no weights)."""

    def _load(self, name: str) -> BaseModel:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        directory = self.resolve(name)
        config = AutoConfig.from_pretrained(directory)
        with torch.device("meta"):
            module: Any = AutoModelForCausalLM.from_config(config)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        return BaseModel.of(name, directory, module, tokenizer, int(config.vocab_size))


def stop_token_ids(module: Any, tokenizer: Any) -> tuple[int, ...]:
    """Every id the model's config, generation config or tokenizer calls EOS: a chat model's
    end-of-turn token (SmolLM2's <|im_end|>) ends a sample as its end-of-text token does."""
    generation = getattr(module, "generation_config", None)
    ids: set[int] = set()
    for eos in (module.config.eos_token_id, getattr(generation, "eos_token_id", None),
                tokenizer.eos_token_id):
        ids.update(eos if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,)))
    return tuple(sorted(ids))
