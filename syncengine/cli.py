"""The ``syncengine`` command.

Each subcommand lives with its component and is imported only when used, so the terminal
SDK does not pull in server dependencies:

- ``syncengine run``        start a local sync server with the sandbox processor (``make run``)
- ``syncengine serve``      the sync server           (syncengine.server.cli)
- ``syncengine backup``     back up its SQLite database (syncengine.server.backup)
- ``syncengine restore``    put a backup in place      (syncengine.server.restore)
- ``syncengine owner-key``  a new owner API key, made on the server's machine
                            (syncengine.server.ownerkey)
- ``syncengine processor``  the sandbox card processor (syncengine.processor.cli)
- ``syncengine scenario``   chaos scenarios            (syncengine.sim.cli)
- ``syncengine bench``      benchmarks                 (bench runner, syncengine.benchmarks)
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Protocol, cast

# subcommand -> (module, help). Each module defines add_arguments(parser) and run(args) -> int.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("syncengine.runlocal", "start a local server + sandbox processor and show next steps"),
    "serve": ("syncengine.server.cli", "run the sync server"),
    "backup": ("syncengine.server.backup", "back up a running server's SQLite database"),
    "restore": ("syncengine.server.restore", "put a backup in place (the server stopped)"),
    "owner-key": (
        "syncengine.server.ownerkey",
        "make a new owner API key from the server's store (when every owner key is lost)",
    ),
    "processor": ("syncengine.processor.cli", "run the sandbox card processor service"),
    "scenario": ("syncengine.sim.cli", "run chaos scenarios"),
    "bench": ("syncengine.benchmarks", "run the benchmarks"),
}


class _Command(Protocol):
    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


def _load(name: str) -> _Command | None:
    module_name = SUBCOMMANDS[name][0]
    try:
        return cast(_Command, importlib.import_module(module_name))
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            return None
        raise


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="syncengine", description="Offline-first sync engine for card payment terminals."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or only == name:
            command = _load(name)
            if command is not None:
                command.add_arguments(sp)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    parser = build_parser(only=chosen or "")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    command = _load(args.command)
    if command is None:
        print(f"syncengine {args.command}: this component is not installed", file=sys.stderr)
        return 2
    return command.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
