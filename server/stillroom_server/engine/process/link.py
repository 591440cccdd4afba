"""One connection between the server and an engine process: framed messages, an authenticated
handshake, and large tensors through shared memory when both ends share a machine.

A frame is an 8-byte length and a message of `sharded/wire.py` (JSON and one safetensors blob, no
pickles). Messages are dicts whose "op" names them:

    engine -> server  hello {version, name, pid, host, proof}   proof = HMAC(token, challenge)
    server -> engine  challenge {nonce} (first), then welcome {settings} or refused {why}
    engine -> server  ready {run_memory_bytes, max_num_samples}
    server -> engine  submit {job, kind, lane, command};   stop {}
    engine -> server  done {job, result | error, queued, compute};   facts {facts, stats}

A message whose tensors hold more than `SHARED_BYTES` (forward_backward data, scores of many
rows) is sent through a file in /dev/shm when the link is local: the frame names the file, the
reader maps it and the tensors are views of that memory (no copy on the way in; the writer
copies once). Knows the framing, not what the commands do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import secrets
import socket
import struct
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

from stillroom_server.engine.sharded import wire

MAX_FRAME_BYTES = 1 << 34
MAX_UNTRUSTED_FRAME_BYTES = 1 << 16   # before a peer has proved it knows the token: a hello at most
SHARED_BYTES = 1 << 20
SHM = Path("/dev/shm")
_HEADER = struct.Struct("<Q")


class LinkClosed(ConnectionError):
    """The other end went away (or sent something that is not a frame)."""


def proof(token: str, nonce: str) -> str:
    return hmac.new(token.encode(), nonce.encode(), hashlib.sha256).hexdigest()


def new_token() -> str:
    return secrets.token_hex(32)


class Link:
    def __init__(self, sock: socket.socket, local: bool = False, trusted: bool = True) -> None:
        """`trusted`: the peer has proved it knows the token (a link the server accepts starts
        untrusted: small frames only, none through shared memory, until the handshake says so)."""
        self.trusted = trusted
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.local = local and SHM.is_dir()   # large tensors through /dev/shm
        self._send_lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        body = self._encode(message)
        with self._send_lock:
            try:
                if len(body) < 1 << 16:   # one write: a small message is one packet
                    self.sock.sendall(_HEADER.pack(len(body)) + body)
                else:
                    self.sock.sendall(_HEADER.pack(len(body)))
                    self.sock.sendall(body)
            except OSError as error:
                raise LinkClosed(str(error)) from None

    def recv(self) -> dict[str, Any]:
        (length,) = _HEADER.unpack(self._read(_HEADER.size))
        if length > (MAX_FRAME_BYTES if self.trusted else MAX_UNTRUSTED_FRAME_BYTES):
            raise LinkClosed(f"a frame of {length} bytes is over the limit")
        body = self._read(length)
        try:
            message = wire.decode(body)
        except Exception as error:  # noqa: BLE001 - whatever the bytes were, the link ends, named
            raise LinkClosed(f"a frame that could not be read ({type(error).__name__})") from None
        if not isinstance(message, dict) or "op" not in message:
            raise LinkClosed("a frame that is not a message")
        if "shared" in message:
            if not (self.trusted and self.local):
                raise LinkClosed("a shared-memory frame on a link that takes none")
            message = _read_shared(message)
        return message

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def _read(self, length: int) -> bytes:
        buffer = bytearray(length)
        view, got = memoryview(buffer), 0
        while got < length:
            try:
                n = self.sock.recv_into(view[got:], min(length - got, 1 << 24))
            except OSError as error:
                raise LinkClosed(str(error)) from None
            if n == 0:
                raise LinkClosed("the connection closed")
            got += n
        return bytes(buffer)

    def _encode(self, message: dict[str, Any]) -> bytes:
        if self.local:
            tensors: list[torch.Tensor] = []
            _collect(message, tensors)
            if sum(t.numel() * t.element_size() for t in tensors) > SHARED_BYTES:
                return wire.encode(_write_shared(message, tensors))
        return wire.encode(message)


# ------------------------------------------------------------------------------ shared memory

def _collect(value: Any, out: list[torch.Tensor]) -> None:
    if isinstance(value, torch.Tensor):
        out.append(value)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _collect(v, out)
    elif isinstance(value, dict):
        for v in value.values():
            _collect(v, out)
    elif hasattr(value, "__dataclass_fields__"):
        for name in value.__dataclass_fields__:
            _collect(getattr(value, name), out)


def _write_shared(message: dict[str, Any], tensors: list[torch.Tensor]) -> dict[str, Any]:
    """The message with its tensors' bytes in one /dev/shm file (64-byte aligned), and in the
    message only their places: {"shared": path, "layout": [[offset, dtype, shape], ...]}."""
    layout, offset = [], 0
    contiguous = [t.detach().cpu().contiguous() for t in tensors]
    for t in contiguous:
        layout.append([offset, str(t.dtype).removeprefix("torch."), list(t.shape)])
        offset += -(-t.numel() * t.element_size() // 64) * 64
    descriptor, path = tempfile.mkstemp(prefix=f"{shared_prefix(os.getpid())}", dir=SHM)
    with os.fdopen(descriptor, "wb") as handle:
        for t, (place, _, _) in zip(contiguous, layout):
            handle.seek(place)
            handle.write(t.view(torch.uint8).reshape(-1).numpy().data if t.numel() else b"")
        handle.truncate(max(offset, 1))
    replaced = iter(range(len(contiguous)))
    stripped = _replace(message, lambda _: {"slot": next(replaced)})
    return {"op": "shared", "shared": path, "layout": json.dumps(layout), "message": stripped}


def shared_prefix(pid: int) -> str:
    """The names of the shared-memory files process `pid` writes (removed if it dies with some)."""
    return f"stillroom-link-{pid}-"


def remove_shared(pid: int) -> None:
    for leftover in SHM.glob(shared_prefix(pid) + "*") if SHM.is_dir() else []:
        leftover.unlink(missing_ok=True)


def _read_shared(frame: dict[str, Any]) -> dict[str, Any]:
    path = frame["shared"]
    if not (isinstance(path, str) and Path(path).parent == SHM
            and Path(path).name.startswith("stillroom-link-")):
        raise LinkClosed("a shared-memory frame naming another file")
    try:
        size = os.path.getsize(path)
        memory = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
    finally:
        Path(path).unlink(missing_ok=True)   # the mapping stays until its tensors are freed
    tensors = []
    for offset, dtype, shape in json.loads(frame["layout"]):
        kind = getattr(torch, dtype)
        count = 1
        for n in shape:
            count *= n
        width = torch.empty((), dtype=kind).element_size()
        tensors.append(memory[offset:offset + count * width].view(kind).view(shape))
    return _replace(frame["message"], lambda slot: tensors[slot["slot"]], slots=True)


def _replace(value: Any, swap, slots: bool = False) -> Any:
    """`value` with each tensor (or, with `slots`, each {"slot": i} dict) swapped by `swap`."""
    if slots and isinstance(value, dict) and set(value) == {"slot"}:
        return swap(value)
    if not slots and isinstance(value, torch.Tensor):
        return swap(value)
    if isinstance(value, list):
        return [_replace(v, swap, slots) for v in value]
    if isinstance(value, tuple):
        return tuple(_replace(v, swap, slots) for v in value)
    if isinstance(value, dict):
        return {k: _replace(v, swap, slots) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _replace(getattr(value, f.name), swap, slots)
                                             for f in dataclasses.fields(value) if f.init})
    return value
