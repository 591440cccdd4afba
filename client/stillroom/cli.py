"""The `stillroom` command. `serve` and `keys` need the server extra (pip install
'stillroom[server]'); `runs` and `checkpoints` use the SDK against a running server (--base-url or
STILLROOM_BASE_URL, --api-key or STILLROOM_API_KEY)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="stillroom", description="Stillroom post-training service")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run a Stillroom server")
    keys = commands.add_parser("keys", help="make, list and revoke API keys in a server's store")
    models = commands.add_parser("models", help="import packaged models as Hugging Face folders")
    try:  # the one place the SDK reaches the server: to run it, when the server extra is installed
        from stillroom_server.cli import (add_keys_arguments, add_models_arguments, add_serve_arguments,
                                          run_keys, run_models, run_serve)
    except ImportError as error:
        add_serve_arguments = run_serve = run_keys = run_models = None
        missing = error
    if add_serve_arguments is not None:
        add_serve_arguments(serve)
        add_keys_arguments(keys)
        add_models_arguments(models)
    add_management_commands(commands)
    args = parser.parse_args(argv)
    if args.command in ("serve", "keys", "models"):
        if run_serve is None:
            sys.exit(f"stillroom {args.command} needs the server extra: pip install 'stillroom[server]' ({missing})")
        {"serve": run_serve, "keys": run_keys, "models": run_models}[args.command](args)
    else:
        import stillroom

        try:
            with stillroom.ServiceClient(base_url=args.base_url, api_key=args.api_key) as service:
                args.handler(service.create_rest_client(), args)
        except (stillroom.StillroomError, ValueError, FileExistsError) as error:
            sys.exit(f"stillroom {args.command}: {error}")


def add_management_commands(commands) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--base-url", help="server address (default: STILLROOM_BASE_URL or localhost:50051)")
    common.add_argument("--api-key", help="API key (default: STILLROOM_API_KEY)")
    runs = commands.add_parser("runs", help="training runs").add_subparsers(dest="action", required=True)
    listing = runs.add_parser("list", parents=[common], help="list your training runs, newest first")
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--offset", type=int, default=0)
    listing.set_defaults(handler=_runs_list)

    ckpts = commands.add_parser("checkpoints", help="checkpoints").add_subparsers(dest="action", required=True)
    listing = ckpts.add_parser("list", parents=[common], help="list a run's checkpoints (or all of yours)")
    listing.add_argument("run", nargs="?", help="training run id (default: every checkpoint)")
    listing.set_defaults(handler=_checkpoints_list)
    download = ckpts.add_parser("download", parents=[common], help="download and extract a checkpoint")
    download.add_argument("path")
    download.add_argument("dir")
    download.set_defaults(handler=_checkpoints_download)
    export = ckpts.add_parser("export", parents=[common],
                              help="download a checkpoint; with --merge, fold a LoRA adapter into its base")
    export.add_argument("path")
    export.add_argument("dir")
    export.add_argument("--merge", action="store_true", help="write a plain Hugging Face model (needs peft)")
    export.add_argument("--base", help="local folder of the base model (default: the one the adapter names)")
    export.set_defaults(handler=_checkpoints_export)
    delete = ckpts.add_parser("delete", parents=[common], help="delete checkpoints")
    delete.add_argument("paths", nargs="+")
    delete.set_defaults(handler=_checkpoints_delete)
    ttl = ckpts.add_parser("set-ttl", parents=[common], help="have the server delete a checkpoint later")
    ttl.add_argument("path")
    ttl.add_argument("seconds", type=int, help="seconds from now; 0 keeps it forever")
    ttl.set_defaults(handler=_checkpoints_ttl)


def _size(n: int | None) -> str:
    n = n or 0
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _runs_list(rest, args) -> None:
    response = rest.list_training_runs(limit=args.limit, offset=args.offset)
    print(f"{'RUN':<22} {'BASE MODEL':<24} {'KIND':<9} {'CREATED':<20} LAST CHECKPOINT")
    for run in response.training_runs:
        kind = f"lora r{run.lora_rank}" if run.is_lora else "full"
        last = run.last_checkpoint or run.last_sampler_checkpoint
        created = run.created_at.strftime("%Y-%m-%d %H:%M:%S") if run.created_at else ""
        print(f"{run.training_run_id:<22} {run.base_model:<24} {kind:<9} {created:<20} "
              f"{last.path if last else '-'}")
    shown = len(response.training_runs)
    print(f"({shown} of {response.cursor.total_count} runs from offset {args.offset})")


def _checkpoints_list(rest, args) -> None:
    response = rest.list_checkpoints(args.run) if args.run else rest.list_user_checkpoints()
    for c in response.checkpoints:
        expires = f"  expires {c.expires_at:%Y-%m-%d %H:%M:%S}" if c.expires_at else ""
        print(f"{c.path}  {c.checkpoint_type:<8} {_size(c.size_bytes):>9}  "
              f"{c.time:%Y-%m-%d %H:%M:%S}{expires}")
    print(f"({len(response.checkpoints)} checkpoints)")


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
        rest.delete_checkpoint(path)
        print(f"deleted {path}")


def _checkpoints_ttl(rest, args) -> None:
    checkpoint = rest.set_checkpoint_ttl(args.path, args.seconds or None)
    print(f"{checkpoint.path} expires {checkpoint.expires_at or 'never'}")


if __name__ == "__main__":
    main()
