"""Helpers shared by the ``mqstore`` command modules."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_DATA_DIR = "mqstore-data"


def default_data_dir() -> Path:
    """``$MQSTORE_DATA_DIR``, else ``./mqstore-data``."""
    return Path(os.environ.get("MQSTORE_DATA_DIR", DEFAULT_DATA_DIR))


def emit(args: argparse.Namespace, payload: Any, lines: Sequence[str]) -> None:
    """Print ``payload`` as JSON under ``--json``, else the human ``lines``."""
    if getattr(args, "json", False):
        json.dump(payload, sys.stdout, indent=2, sort_keys=True, default=str)
        sys.stdout.write("\n")
    else:
        for line in lines:
            print(line)


def add_store_args(p: argparse.ArgumentParser) -> None:
    """--data-dir, --key-file and --json, for commands that work on a store directory."""
    p.add_argument("--data-dir", default=str(default_data_dir()), help="store directory (default: %(default)s)")
    p.add_argument("--key-file", default=None, help="key-encryption key file (default: <data-dir>/kek.key)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
