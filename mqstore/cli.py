"""The ``mqstore`` command.

``mqstore demo``     open (or create) the embedded default store and show it working.
``mqstore scan``     verify every record of a stopped store's log (exit code 0 = clean).

Every command takes ``--json`` for scripts; human output otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mqstore import __version__, codec
from mqstore.errors import MQStoreError

DEFAULT_DATA_DIR = "mqstore-data"


def default_data_dir() -> Path:
    """``$MQSTORE_DATA_DIR``, else ``./mqstore-data``."""
    return Path(os.environ.get("MQSTORE_DATA_DIR", DEFAULT_DATA_DIR))


def _emit(args: argparse.Namespace, payload: dict[str, Any], lines: Sequence[str]) -> None:
    if args.json:
        json.dump(payload, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        for line in lines:
            print(line)


def cmd_demo(args: argparse.Namespace) -> int:
    from mqstore.store import LogStore, NewMessage
    from mqstore.testing.mail import MailFactory

    data_dir = Path(args.data_dir)
    with LogStore(data_dir, key_file=args.key_file) as store:
        mail = MailFactory(seed=int(time.time()))
        batch = [
            NewMessage(
                mail_from="demo@example.org",
                recipients=[mail.address(), mail.address()],
                data=mail.message(2048),
                namespace="default",
            )
            for _ in range(args.messages)
        ]
        t0 = time.perf_counter()
        appended = store.append_messages(batch)
        elapsed = time.perf_counter() - t0
        first = store.read_message(appended[0].index)
        record = store.read(appended[0].index)
        report = store.scan()
        stats = store.stats()
        payload = {
            "data_dir": str(data_dir.resolve()),
            "codec": codec.IMPLEMENTATION,
            "appended": len(appended),
            "append_seconds": elapsed,
            "first_index": stats["first_index"],
            "last_index": stats["last_index"],
            "stored_bytes_first": len(record.payload) + codec.HEADER_SIZE,
            "raw_bytes_first": len(first.data),
            "scan_clean": report.clean,
            "records_checked": report.records_checked,
        }
        lines = [
            f"mqstore {__version__} — embedded store at {payload['data_dir']} (codec: {codec.IMPLEMENTATION})",
            f"appended {len(appended)} messages in one durable commit ({elapsed * 1000:.1f} ms)",
            f"log now holds indices {stats['first_index']}..{stats['last_index']}",
            f"first message: {len(first.data)} bytes raw, {payload['stored_bytes_first']} bytes stored "
            f"(compressed + encrypted), recipients {', '.join(first.envelope.recipients)}",
            f"scan: {report.records_checked} records verified, "
            + ("clean" if report.clean else f"{len(report.corrupt)} corrupt"),
        ]
        _emit(args, payload, lines)
    return 0 if report.clean else 1


def cmd_scan(args: argparse.Namespace) -> int:
    from mqstore.store import LogStore

    with LogStore(args.data_dir, key_file=args.key_file, readonly=True) as store:
        report = store.scan()
    payload = {
        "records_checked": report.records_checked,
        "first_index": report.first_index,
        "last_index": report.last_index,
        "clean": report.clean,
        "corrupt": [{"index": i, "reason": r} for i, r in report.corrupt],
    }
    lines = [f"{report.records_checked} records checked ({report.first_index}..{report.last_index})"]
    lines += [f"log index {i}: {r}" for i, r in report.corrupt]
    lines.append("clean" if report.clean else f"{len(report.corrupt)} corrupt record(s)")
    _emit(args, payload, lines)
    return 0 if report.clean else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mqstore", description="mqstore: a durable, encrypted mail-queue store")
    parser.add_argument("--version", action="version", version=f"mqstore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", default=str(default_data_dir()), help="store directory (default: %(default)s)")
        p.add_argument("--key-file", default=None, help="key-encryption key file (default: <data-dir>/kek.key)")
        p.add_argument("--json", action="store_true", help="machine-readable output")

    demo = sub.add_parser("demo", help="create/open the embedded default store and show it working")
    common(demo)
    demo.add_argument("--messages", type=int, default=100, help="messages to append (default: %(default)s)")
    demo.set_defaults(func=cmd_demo)

    scan = sub.add_parser("scan", help="verify every record of a stopped store (exit 0 = clean)")
    common(scan)
    scan.set_defaults(func=cmd_scan)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except MQStoreError as exc:
        if getattr(args, "json", False):
            json.dump({"error": type(exc).__name__, "message": str(exc)}, sys.stdout)
            sys.stdout.write("\n")
        else:
            print(f"mqstore: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
