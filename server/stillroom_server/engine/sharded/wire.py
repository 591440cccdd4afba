"""Commands and answers between the server and its engine processes or sharded workers, as bytes
without pickles.

A message is JSON (numbers, strings, lists, tuples, string-keyed dicts, the engine's own
dataclasses by name, engine errors by name) followed by its tensors in one safetensors blob. Only
the dataclasses and errors registered here can be made from a message: nothing else is ever
constructed from bytes. Knows the engine's types, not what the commands do.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any

import torch
from safetensors.torch import load, save

from stillroom_server.engine import protocol, types
from stillroom_server.engine.errors import AlreadyExists, FailedPrecondition, InvalidInput, NotFound
from stillroom_server.engine.protocol import RunFacts, SamplerFacts


def _registry() -> dict[str, type]:
    from stillroom_server.engine.engine import LoraSpec

    classes = [c for c in vars(types).values() if isinstance(c, type) and dataclasses.is_dataclass(c)]
    return {c.__name__: c for c in [*classes, LoraSpec, RunFacts, SamplerFacts, *protocol.COMMANDS]}


ERRORS: dict[str, type[BaseException]] = {c.__name__: c for c in (
    InvalidInput, NotFound, AlreadyExists, FailedPrecondition, RuntimeError, MemoryError)}
_CLASSES: dict[str, type] = {}


def encode(value: Any) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    header = json.dumps(_encode(value, tensors)).encode()
    return struct.pack("<Q", len(header)) + header + save(tensors)


def decode(message: bytes) -> Any:
    (length,) = struct.unpack("<Q", message[:8])
    tensors = load(message[8 + length:])
    return _decode(json.loads(message[8:8 + length]), tensors)


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous()
        return {"tensor": key}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, dict):
        assert all(isinstance(k, str) for k in value), "only string-keyed dicts travel"
        return {"dict": {k: _encode(v, tensors) for k, v in value.items()}}
    if isinstance(value, BaseException):
        name = type(value).__name__ if type(value).__name__ in ERRORS else "RuntimeError"
        text = str(value) if name != "RuntimeError" else f"{type(value).__name__}: {value}"
        return {"error": name, "message": text}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = type(value).__name__
        assert name in _classes(), f"{name} is not a registered message type"
        return {"dataclass": name, "fields": {f.name: _encode(getattr(value, f.name), tensors)
                                              for f in dataclasses.fields(value)}}
    raise TypeError(f"{type(value).__name__} cannot be sent to or from the workers")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "tensor" in value:
        return tensors[value["tensor"]]
    if "tuple" in value:
        return tuple(_decode(v, tensors) for v in value["tuple"])
    if "dict" in value:
        return {k: _decode(v, tensors) for k, v in value["dict"].items()}
    if "error" in value:
        return ERRORS[value["error"]](value["message"])
    cls = _classes()[value["dataclass"]]
    return cls(**{k: _decode(v, tensors) for k, v in value["fields"].items()})


def _classes() -> dict[str, type]:
    if not _CLASSES:
        _CLASSES.update(_registry())
    return _CLASSES
