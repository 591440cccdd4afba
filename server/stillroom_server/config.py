"""Server configuration: one validated object, from command-line flags and STILLROOM_* variables.

Flags win over variables, variables over defaults. The database defaults to a SQLite file in the
data directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = Field(default=50051, ge=0, le=65535)
    database_url: str | None = None
    device: Literal["cpu", "cuda"] = "cpu"
    # auto: bf16 weights on cuda, fp32 on cpu; bf16 on cpu: fp32 weights with bf16 autocast;
    # bf16-train on cpu: bf16 autocast in training passes only, sampling and logprobs in fp32
    dtype: Literal["auto", "fp32", "bf16", "bf16-train"] = "auto"
    max_num_samples: int = Field(default=128, ge=1)
    max_live_runs_per_owner: int = Field(default=32, ge=1)
    max_tokens_per_request: int = Field(default=4_000_000, ge=1)
    threads: int | None = Field(default=None, ge=1)  # torch CPU threads; None: measured at start
    # sampling and scoring compute each row as it would alone, whatever shares its batch (CPU fp32;
    # engine/kernels/batch_invariant.py): bitwise the same tokens and logprobs, at a cost in speed
    batch_invariant: bool = False
    # worker processes a training run is sharded over (FSDP2); 1: every model in the server process
    workers: int = Field(default=1, ge=1)
    # HOST:PORT where a worker group launched elsewhere (torchrun) connects; None: start them here
    worker_listen: str | None = None
    # engine processes started here, each holding the base models placed on it (0: the engine in the
    # server process itself: no process boundary, a crash in torch is the server's)
    engines: int = Field(default=1, ge=0, le=64)
    # engines that connect from other machines (`stillroom engine --connect ... --name NAME`), by name
    remote_engines: list[str] = Field(default_factory=list)
    # base model -> engine name ("0", "1", ... or a remote one); a model placed nowhere is on the first
    place: dict[str, str] = Field(default_factory=dict)
    # HOST:PORT the engines dial (default: a free loopback port; needed for remote engines)
    engine_listen: str | None = None
    # bytes of training-run weights and AdamW moments the engines keep in memory (idle runs beyond it
    # wait on disk); None: a share of the memory available at start
    run_memory_bytes: int | None = Field(default=None, ge=1)
    log_level: str = "INFO"
    local_models: dict[str, Path] = Field(default_factory=dict)
    # The Tinker HTTP API and checkpoint downloads; None: the gRPC port + 1 (any free one if 0).
    http_port: int | None = Field(default=None, ge=0, le=65535)
    checkpoint_sweep_seconds: float = Field(default=60.0, gt=0)  # how often expired checkpoints are deleted
    # A client session with no heartbeat for this long lapses: it ends as a finish would (its runs
    # leave memory, their checkpoints stay). 0: sessions never lapse. The Tinker SDK beats every 10 s.
    session_timeout: float = Field(default=300.0, ge=0)
    # "keys": every call but health needs an API key; "off": one local owner, loopback hosts only.
    auth: Literal["keys", "off"] = "keys"

    tls_cert: Path | None = None  # PEM certificate chain: serve gRPC and downloads over TLS
    tls_key: Path | None = None   # its PEM private key

    @model_validator(mode="after")
    def _tls_needs_both_files(self) -> ServerConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key: give both files or neither")
        for path in (self.tls_cert, self.tls_key):
            if path is not None and not path.is_file():
                raise ValueError(f"tls: {path} is not a file")
        return self

    @model_validator(mode="after")
    def _batch_invariant_on_cpu_fp32(self) -> ServerConfig:
        if self.batch_invariant and (self.device != "cpu" or self.dtype == "bf16" or self.workers > 1):
            raise ValueError("batch_invariant: for sampling and scoring in fp32 on the CPU in one engine "
                             "process (device cpu, dtype auto, fp32 or bf16-train, one worker)")
        return self

    @model_validator(mode="after")
    def _some_engine(self) -> ServerConfig:
        names = [str(i) for i in range(self.engines)] + list(self.remote_engines)
        if len(set(names)) != len(names):
            raise ValueError(f"remote_engines: names must be unique and not 0..{self.engines - 1}")
        for model, engine in self.place.items():
            if engine not in names and not (engine == "0" and self.engines == 0):
                raise ValueError(f"place: {model} is placed on engine '{engine}', not one of "
                                 f"{', '.join(names) or 'the in-process engine'}")
        if self.remote_engines and self.engine_listen is None:
            raise ValueError("engine_listen: remote engines need an address to connect to (HOST:PORT)")
        return self

    @property
    def engine_token_file(self) -> Path:
        """The secret engines prove they know (made at first start, readable by this user only)."""
        return self.data_dir / "engine_token"

    @model_validator(mode="after")
    def _auth_off_only_on_loopback(self) -> ServerConfig:
        from stillroom_server.core.auth import is_loopback

        if self.auth == "off" and not is_loopback(self.host):
            raise ValueError(f"auth 'off' is refused on the non-loopback address {self.host}: "
                             "serve with keys (the default) or bind 127.0.0.1")
        return self

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def resolved_http_port(self) -> int:
        if self.http_port is not None:
            return self.http_port
        return self.port + 1 if 0 < self.port < 65535 else 0

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'stillroom.db'}"

    @classmethod
    def from_sources(cls, **flags) -> ServerConfig:
        """Flags (None = not given) over STILLROOM_<NAME> variables over defaults."""
        values = {}
        for name in cls.model_fields:
            if name in ("local_models", "place", "remote_engines"):
                continue
            env = os.environ.get(f"STILLROOM_{name.upper()}")
            if env is not None:
                values[name] = env
        values.update({k: v for k, v in flags.items() if v is not None})
        values.setdefault("data_dir", Path.home() / ".stillroom")
        return cls(**values)
