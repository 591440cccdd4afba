"""`stillroom serve`: start a server from flags and STILLROOM_* variables."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address to bind (default 127.0.0.1; STILLROOM_HOST)")
    parser.add_argument("--port", type=int, help="port to bind, 0 for any free one (default 50051; STILLROOM_PORT)")
    parser.add_argument("--data-dir", type=Path, help="models, checkpoints and the database (default ~/.stillroom; STILLROOM_DATA_DIR)")
    parser.add_argument("--database-url", help="SQLAlchemy URL (default: SQLite in the data dir; STILLROOM_DATABASE_URL)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="where models live (default cpu; STILLROOM_DEVICE)")
    parser.add_argument("--max-num-samples", type=int, help="most samples one request may ask for (default 128)")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                        help="serve a local Hugging Face model directory under NAME (repeatable)")
    parser.add_argument("--http-port", type=int, help="port for checkpoint downloads (default 0: any free one; STILLROOM_HTTP_PORT)")
    parser.add_argument("--ready-file", help="write host:port to this file once serving")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING (default INFO; STILLROOM_LOG_LEVEL)")


def run_serve(args: argparse.Namespace) -> None:
    from stillroom_server.config import ServerConfig
    from stillroom_server.service.app import serve

    local_models = {}
    for item in args.model:
        name, sep, directory = item.partition("=")
        if not sep:
            raise SystemExit(f"--model expects NAME=DIR, got {item!r}")
        local_models[name] = Path(directory).expanduser().resolve()
    config = ServerConfig.from_sources(host=args.host, port=args.port, data_dir=args.data_dir,
                                       database_url=args.database_url, device=args.device,
                                       max_num_samples=args.max_num_samples, log_level=args.log_level,
                                       http_port=args.http_port)
    config.local_models = local_models
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(config, ready_file=args.ready_file)
