"""``mqstore demo`` and ``mqstore scan``: the embedded store from the command line."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from mqstore import __version__, codec
from mqstore.commands._common import add_store_args, emit


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the embedded queue through a full cycle on the default store and report it."""
    import mqstore
    from mqstore.testing.mail import MailFactory

    data_dir = Path(args.data_dir)
    with mqstore.open(data_dir, key_file=args.key_file) as store:
        mail = MailFactory(seed=int(time.time()))
        batch = [
            {"mail_from": "demo@example.org", "recipients": [mail.address(), mail.address()],
             "data": mail.message(2048)}
            for _ in range(args.messages)
        ]
        t0 = time.perf_counter()
        ids = store.enqueue_many(batch)
        enqueue_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        leases = store.lease("demo-worker", max_messages=args.messages, lease_seconds=60)
        lease_s = time.perf_counter() - t0
        delivered = deferred = 0
        for i, lease in enumerate(leases):
            if i % 4 == 3:
                store.defer(lease.token, reason="451 4.7.1 greylisted, try again later")
                deferred += 1
            else:
                store.ack(lease.token)
                delivered += 1
        stats = store.stats()
        shape = store.qshape()
        report = store.log.scan()
        first = store.get(ids[0])
    payload = {
        "data_dir": str(data_dir.resolve()),
        "codec": codec.IMPLEMENTATION,
        "enqueued": len(ids),
        "enqueue_seconds": enqueue_s,
        "leased": len(leases),
        "lease_seconds": lease_s,
        "delivered": delivered,
        "deferred": deferred,
        "stats": stats,
        "qshape": {"buckets": shape.buckets, "total": shape.total, "domains": shape.domains},
        "scan_clean": report.clean,
        "records_checked": report.records_checked,
    }
    lines = [
        f"mqstore {__version__}: embedded queue at {payload['data_dir']} (codec: {codec.IMPLEMENTATION})",
        f"enqueued {len(ids)} messages in one durable commit ({enqueue_s * 1000:.1f} ms), "
        f"leased {len(leases)} ({lease_s * 1000:.1f} ms); delivered {delivered}, deferred {deferred}",
        f"first message {first.message_id}: {first.size} bytes, recipients "
        + ", ".join(f"{r.address} ({r.state})" for r in first.recipients),
        "recipients by state: " + ", ".join(f"{k} {v}" for k, v in stats["recipients"].items() if v),
        f"messages stored: {stats['messages']} ({stats['bytes']} bytes raw), "
        f"oldest unfinished: {stats['oldest_age_seconds']:.0f} s",
        "waiting by domain (qshape): "
        + (", ".join(f"{d} {sum(c)}" for d, c in list(shape.domains.items())[:5]) or "none"),
        f"log scan: {report.records_checked} records verified, "
        + ("clean" if report.clean else f"{len(report.corrupt)} corrupt"),
    ]
    emit(args, payload, lines)
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
    emit(args, payload, lines)
    return 0 if report.clean else 1


def register(sub: Any) -> None:
    demo = sub.add_parser("demo", help="create/open the embedded default store and run it through a cycle")
    add_store_args(demo)
    demo.add_argument("--messages", type=int, default=100, help="messages to enqueue (default: %(default)s)")
    demo.set_defaults(func=cmd_demo)

    scan = sub.add_parser("scan", help="verify every record of a stopped store (exit 0 = clean)")
    add_store_args(scan)
    scan.set_defaults(func=cmd_scan)
