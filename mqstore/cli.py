"""The ``mqstore`` command.

``mqstore demo``     open (or create) the embedded default queue and run it through a cycle.
``mqstore scan``     verify every record of a stopped store's log (exit code 0 = clean).
``mqstore serve``    run a storage node (``--config node.toml``; without: a one-node trial).
``mqstore bootstrap`` / ``mqstore join``  prepare a node's data dir (new cluster / joining one).

Every command takes ``--json`` for scripts; human output otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import warnings
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


TRIAL_LISTEN = "127.0.0.1:7070"


def _load_config(args: argparse.Namespace) -> Any:
    from mqstore import config as cfg

    if args.config:
        return cfg.load(args.config)
    # No config: a single-node trial store on 127.0.0.1 in the embedded default data dir.
    return cfg.parse(
        {
            "node_id": 1,
            "site": "local",
            "listen": args.listen or TRIAL_LISTEN,
            "data_dir": str(args.data_dir),
            **({"key_file": args.key_file} if args.key_file else {}),
        },
        "<trial defaults>",
    )


def cmd_serve(args: argparse.Namespace) -> int:
    """Run a storage node until SIGTERM/SIGINT (graceful: leadership handed over first)."""
    import logging
    import threading

    from mqstore.node.runtime import bootstrap
    from mqstore.server import NodeServer

    config = _load_config(args)
    logging.basicConfig(
        level=getattr(logging, (args.log_level or config.log_level).upper()),
        format="%(asctime)s %(levelname)s node=" + str(config.node_id) + " %(name)s: %(message)s",
    )
    if not args.config and not (Path(config.data_dir) / "data.mdb").exists():
        bootstrap(config, "trial")
        print(f"mqstore: bootstrapped a single-node trial store in {config.data_dir}", file=sys.stderr)
    server = NodeServer(config)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    print(
        f"mqstore: node {config.node_id} (site {config.site}) serving on {config.listen}, data in {config.data_dir}",
        file=sys.stderr,
        flush=True,
    )
    stop.wait()
    print(f"mqstore: node {config.node_id} shutting down", file=sys.stderr, flush=True)
    server.stop()
    return 0


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from mqstore import config as cfg
    from mqstore.node.runtime import bootstrap

    config = cfg.load(args.config)
    conf = bootstrap(config, args.cluster_id)
    payload = {
        "node_id": config.node_id,
        "cluster_id": args.cluster_id,
        "voters": sorted(conf.voters),
        "sites": dict(conf.sites),
        "min_sites": conf.min_sites,
        "data_dir": str(config.data_dir),
    }
    _emit(args, payload, [
        f"bootstrapped node {config.node_id} of new cluster {args.cluster_id!r} in {config.data_dir}",
        f"voters {sorted(conf.voters)} in sites {sorted(set(dict(conf.sites).values()))}, min_sites {conf.min_sites}",
    ])
    return 0


def cmd_join(args: argparse.Namespace) -> int:
    from mqstore import config as cfg
    from mqstore.node.runtime import prepare_join

    config = cfg.load(args.config)
    prepare_join(config, args.cluster_id)
    _emit(args, {"node_id": config.node_id, "cluster_id": args.cluster_id, "data_dir": str(config.data_dir)}, [
        f"prepared {config.data_dir} for node {config.node_id} to join cluster {args.cluster_id!r}:",
        f"start it (mqstore serve --config {args.config}), then on the cluster: "
        f"mqstore cluster add --id {config.node_id} --site {config.site} --address {config.address}",
    ])
    return 0


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

    serve = sub.add_parser(
        "serve", help="run a storage node (no --config: a single-node trial store on 127.0.0.1:7070)"
    )
    serve.add_argument("--config", help="node configuration file (TOML)")
    serve.add_argument("--data-dir", default=str(default_data_dir()), help="trial mode: data directory")
    serve.add_argument("--key-file", default=None, help="trial mode: key file (default <data-dir>/kek.key)")
    serve.add_argument("--listen", default=None, help=f"trial mode: address to listen on (default {TRIAL_LISTEN})")
    serve.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=cmd_serve, json=False)

    boot = sub.add_parser("bootstrap", help="create a new cluster: run on each initial member's empty data dir")
    boot.add_argument("--config", required=True, help="node configuration file (TOML)")
    boot.add_argument("--cluster-id", required=True, help="name of the new cluster (the same on every member)")
    boot.add_argument("--json", action="store_true", help="machine-readable output")
    boot.set_defaults(func=cmd_bootstrap)

    join = sub.add_parser("join", help="prepare an empty data dir for a node to be added to a cluster")
    join.add_argument("--config", required=True, help="node configuration file (TOML)")
    join.add_argument("--cluster-id", required=True, help="the cluster to join")
    join.add_argument("--json", action="store_true", help="machine-readable output")
    join.set_defaults(func=cmd_join)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Behave like a Unix tool: a closed pipe (mqstore ... | head) ends quietly; warnings are one line.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    warnings.formatwarning = lambda message, *_a, **_k: f"mqstore: warning: {message}\n"
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
