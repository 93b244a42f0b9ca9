"""The ``mqstore`` command.

Subcommands live in ``mqstore/commands/*.py``; each module has ``register(subparsers)`` and is
listed in :data:`COMMAND_MODULES`. Every command takes ``--json`` for scripts (human output
otherwise) and exits 0 on success, 1 when it found a problem (a damaged store, say), 2 on an
error (bad arguments, an unreachable cluster).
"""

from __future__ import annotations

import argparse
import importlib
import json
import signal
import sys
import warnings
from collections.abc import Sequence
from typing import NoReturn

from mqstore import __version__
from mqstore.commands._common import DEFAULT_DATA_DIR, default_data_dir, emit
from mqstore.errors import MQStoreError

#: Modules that add subcommands (in help order).
COMMAND_MODULES = (
    "mqstore.commands.local",
    "mqstore.commands.node",
    "mqstore.commands.ops",
    "mqstore.commands.compliance",
    "mqstore.commands.security",
)


class _Parser(argparse.ArgumentParser):
    """argparse's refusal of a malformed argument (exit 2, usage on stderr), and with ``--json``
    on the command line also the JSON error object every command prints on an error, so a script
    reads one format whatever went wrong."""

    json_requested = False

    def error(self, message: str) -> NoReturn:
        if _Parser.json_requested:
            json.dump({"error": "InvalidArgument", "message": f"{self.prog}: {message}"}, sys.stdout)
            sys.stdout.write("\n")
            sys.stdout.flush()
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mqstore", description="mqstore: a durable, encrypted mail-queue store")
    parser.add_argument("--version", action="version", version=f"mqstore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Behave like a Unix tool: a closed pipe (mqstore ... | head) ends quietly; warnings are one line.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    warnings.formatwarning = lambda message, *_a, **_k: f"mqstore: warning: {message}\n"
    _Parser.json_requested = "--json" in (sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        # Ctrl-C: what a command had done before it stays done (each change is its own durable
        # write); no traceback. 130: the shell's code for a command ended by SIGINT.
        if getattr(args, "json", False):
            json.dump({"error": "Interrupted", "message": "interrupted (Ctrl-C)"}, sys.stdout)
            sys.stdout.write("\n")
        else:
            print("mqstore: interrupted", file=sys.stderr)
        return 130
    except (MQStoreError, OSError) as exc:
        # OSError: a path given on the command line that cannot be read or written (missing,
        # a directory where a file belongs, no permission, a full disk).
        if isinstance(exc, OSError) and not isinstance(exc, MQStoreError):
            where = f": {exc.filename}" if exc.filename else ""
            message = f"{exc.strerror or exc}{where}"
        else:
            message = str(exc)
        if getattr(args, "json", False):
            json.dump({"error": type(exc).__name__, "message": message}, sys.stdout)
            sys.stdout.write("\n")
        else:
            print(f"mqstore: error: {message}", file=sys.stderr)
        return 2


__all__ = ["COMMAND_MODULES", "DEFAULT_DATA_DIR", "build_parser", "default_data_dir", "emit", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
