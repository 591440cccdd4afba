"""The `stillroom` command. `serve` needs the server extra (pip install 'stillroom[server]')."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="stillroom", description="Stillroom post-training service")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run a Stillroom server")
    try:
        from stillroom_server.cli import add_serve_arguments, run_serve
    except ImportError as error:
        add_serve_arguments = run_serve = None
        missing = error
    if add_serve_arguments is not None:
        add_serve_arguments(serve)
    args = parser.parse_args(argv)
    if args.command == "serve":
        if run_serve is None:
            sys.exit(f"stillroom serve needs the server extra: pip install 'stillroom[server]' ({missing})")
        run_serve(args)


if __name__ == "__main__":
    main()
