"""Operator commands: inspect and fix a spool from a shell, on a running cluster (``--server``) or
on a stopped node's data dir (``--data-dir``, or ``--config`` for a node's config file).

``status``, ``queue list``, ``message show``, ``qshape``; bulk ``hold``, ``release``, ``requeue``,
``delete``, ``bounce``; ``verify``, ``repair``, ``backup``, ``restore``, ``recover``; ``cluster
add|remove|promote|transfer-leader``. The logic lives in :mod:`mqstore.ops`; this module parses
arguments, picks the target and prints (a human table, or JSON with ``--json``). Exit codes: 0
success, 1 a problem was found (a store that is not clean, records left unrepaired, a bulk change
refused for some messages), 2 an error.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from mqstore.commands._common import default_data_dir, emit
from mqstore.config import check_address, check_site
from mqstore.errors import (
    InvalidArgument,
    MQStoreError,
    NotFound,
    NotLeader,
    Overloaded,
    PermissionDenied,
    StoreClosed,
    Unauthenticated,
    Unavailable,
)
from mqstore.ops.progress import Progress

SERVER_ENV = "MQSTORE_SERVER"
DEFAULT_PAGE = 100
BULK_OPS = ("hold", "release", "requeue", "delete", "bounce")

# --- targets ---------------------------------------------------------------------------------------

EMPTY_SERVER = ("--server is empty (an unset shell variable?): give a running cluster's node as host:port, or "
                "leave --server out")


def server_arg(text: str) -> str:
    """An argparse type for --server: a blank value is refused, never taken as "no --server" (that
    would run the command on the store on disk, or on $MQSTORE_SERVER's cluster, instead)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(EMPTY_SERVER)
    return text


def _check_server(args: argparse.Namespace) -> None:
    """Refuse a blank --server (for a Namespace not made by the parser, which checks it)."""
    server = getattr(args, "server", None)
    if server is not None and not str(server).strip():
        raise InvalidArgument(EMPTY_SERVER)


def add_target_args(p: argparse.ArgumentParser, *, server: bool = True, offline: bool = True,
                    timeout: float = 15.0) -> None:
    """--server (a running cluster) or --data-dir/--config (a store on disk), --key-file, --json."""
    if server:
        p.add_argument("--server", default=None, type=server_arg,
                       help=f"a running cluster: any node's host:port, or several comma-separated (${SERVER_ENV})")
        p.add_argument("--timeout", type=float, default=timeout,
                       help=f"seconds per call, retries included (default {timeout:g})")
    if offline:
        p.add_argument("--data-dir", default=None,
                       help="a store on disk: a stopped node's data dir or an embedded store "
                       f"(default {default_data_dir()})")
        p.add_argument("--config", default=None, help="a node's config file: its data_dir and key_file")
        p.add_argument("--key-file", default=None,
                       help="key-encryption key file (default: the config's, or <data-dir>/kek.key)")
    p.add_argument("--json", action="store_true", help="machine-readable output (no progress bar)")


def _config(args: argparse.Namespace) -> Any:
    """The --config node's config, read for its data dir, key file and node id: its TLS files are
    not checked (a node stopped by an expired certificate is when its store needs looking at)."""
    from mqstore import config as cfg

    return cfg.load(args.config, check_tls=False) if getattr(args, "config", None) else None


def _data_dir(args: argparse.Namespace) -> Path:
    if getattr(args, "data_dir", None):
        return Path(args.data_dir)
    conf = _config(args)
    if conf is not None:
        return Path(conf.data_dir)
    return default_data_dir()


def _key_file(args: argparse.Namespace) -> str | None:
    if getattr(args, "key_file", None):
        return str(args.key_file)
    conf = _config(args)
    if conf is not None and conf.key_file is not None:
        return str(conf.key_file)
    return None


def _remote(args: argparse.Namespace) -> bool:
    """Whether the command talks to a cluster: --server, or $MQSTORE_SERVER when no store on disk
    is named (an explicit --data-dir/--config wins over the environment). A blank --server is
    refused."""
    _check_server(args)
    on_disk = getattr(args, "data_dir", None) or getattr(args, "config", None)
    if getattr(args, "server", None) and on_disk:
        raise InvalidArgument("give --server (a running cluster) or --data-dir/--config (a store on disk), not both")
    if not getattr(args, "server", None) and not on_disk and os.environ.get(SERVER_ENV) and hasattr(args, "server"):
        args.server = os.environ[SERVER_ENV]
    return bool(getattr(args, "server", None))


def client_from_args(args: argparse.Namespace, addresses: str | list[str] | None = None) -> Any:
    """The client for ``--server`` (or ``addresses``). The one place these commands build a
    client. TLS and the bearer token come from ``MQSTORE_CA``, ``MQSTORE_CERT``, ``MQSTORE_KEY``,
    ``MQSTORE_TLS_SERVER_NAME`` and ``MQSTORE_TOKEN`` (never from arguments: a token on a command
    line would show in ``ps``)."""
    from mqstore.client import Client
    from mqstore.security.tls import client_settings_from_env

    return Client(addresses if addresses is not None else args.server, timeout=args.timeout,
                  **client_settings_from_env())


def cli_actor() -> Any:
    """Who an offline command acts as: the OS user on this host, as the local administrator
    (every role; COMPLIANCE still binds), recorded in the audit log with source ``cli``."""
    import getpass
    import socket

    from mqstore.actor import ROLES, Actor

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid-{os.getuid()}"
    name = f"{user}@{socket.gethostname()}".encode()[:128].decode(errors="ignore") or "cli"
    return Actor(name, frozenset(ROLES), auth="local", source="cli")


class Target:
    """What a command works on: ``queue`` has the queue API (get/list/qshape/stats and the admin
    writes) of a cluster client, an embedded store, or a read-only view of a store on disk."""

    def __init__(self, args: argparse.Namespace, *, write: bool = False) -> None:
        self.args = args
        self.client: Any = None
        self.log: Any = None
        self.queue: Any = None
        self._store: Any = None
        if _remote(args):
            self.client = client_from_args(args)
            self.queue = self.client
            self.where = f"cluster at {args.server}"
            return
        path = _data_dir(args)
        self.where = str(path)
        key = _key_file(args)
        if not (path / "data.mdb").exists():  # never create a store where none is (a typo'd path)
            raise NotFound(f"no mqstore store at {path}")
        if write:
            import mqstore

            self._store = mqstore.open(path, key_file=key, background=False)
            self._store.default_actor = cli_actor()
            self.queue = self._store
            self.log = self._store.log
        else:
            from mqstore.api import QueueBase
            from mqstore.store import LogStore

            self.log = LogStore(path, key_file=key, readonly=True, create=False)
            self.queue = QueueBase(self.log, time.time)

    @property
    def remote(self) -> bool:
        return self.client is not None

    def history(self, message_id: str) -> dict[str, Any]:
        if self.client is not None:
            from mqstore.ops import remote

            return remote.history(self.client, message_id)
        from mqstore.ids import parse_id
        from mqstore.ops.inspect import message_history
        from mqstore.queue import machine
        from mqstore.queue.kv import LmdbKV

        with self.log.env.read() as txn:
            row = machine.get_message(LmdbKV(txn, self.log.env.dbs), parse_id(message_id))
        result = message_history(self.log, message_id, row.enqueue_index if row else None)
        result["exists"] = row is not None
        return result

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        elif self._store is not None:
            self._store.close()
        elif self.log is not None:
            self.log.close()

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- formatting ------------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[int] = ()) -> list[str]:
    cells = [[str(c) for c in headers]] + [[("-" if c is None else str(c)) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = []
    for row in cells:
        out.append("  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths,
                                                                                                        strict=True)))
                   .rstrip())
    return out


def age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def duration(text: str) -> float:
    """'90', '90s', '15m', '2h', '3d' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    value = text.strip().lower()
    try:
        seconds = float(value[:-1]) * units[value[-1]] if value and value[-1] in units else float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 90, 15m, 2h, 3d)") from None
    if not 0 <= seconds <= 100 * 365 * 86400:  # also refuses nan and infinity
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration from 0 to a century (e.g. 90, 15m, 2h, 3d)")
    return seconds


def _top(text: str) -> int:
    """qshape --top: a count of domains, 0 for all."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of domains (0 or more; 0: all)")
    return value


U64_MAX = 2**64 - 1
#: The longest --wait a node is asked for: its request carries milliseconds in 32 bits.
WAIT_S_MAX = (2**32 - 1) // 1000


def _whole_number(text: str, what: str, lo: int, hi: int) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        value = lo - 1
    if not lo <= value <= hi:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what} (a whole number from {lo} to {hi})")
    return value


def node_id(text: str) -> int:
    """A node id: 1 to 2**64-1."""
    return _whole_number(text, "a node id", 1, U64_MAX)


def _config_value(check: Callable[[object, str], str]) -> Callable[[str], str]:
    """An argparse type checking a value as a node's config does."""

    def parse(text: str) -> str:
        try:
            return check(text, "the value")
        except InvalidArgument as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def log_index(text: str) -> int:
    """A log index: 1 to 2**64-1."""
    return _whole_number(text, "a log index", 1, U64_MAX)


def wait_seconds(text: str) -> float:
    """Seconds to wait: more than 0, at most :data:`WAIT_S_MAX`."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= WAIT_S_MAX:  # also refuses nan and infinity
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds to wait (more than 0, at most "
                                         f"{WAIT_S_MAX})")
    return value


def _phase_progress(bar: Progress) -> Callable[[str, int, int], None]:
    current = {"phase": ""}

    def update(phase: str, done: int, total: int) -> None:
        if phase != current["phase"]:
            current["phase"] = phase
            bar.phase(f"{phase}:")
        bar.update(done, total)

    return update


# --- status ----------------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    if _remote(args):
        from mqstore.ops import remote

        with client_from_args(args) as client:
            st = remote.cluster_status(client)
        st["target"] = args.server
    else:
        from mqstore.ops.facts import store_facts

        st = store_facts(_data_dir(args), int(time.time() * 1000))
    emit(args, st, _status_lines(st))
    return 0


def _clock_cell(m: dict[str, Any]) -> str:
    """A member's clock offset as the status table shows it ("-": not known)."""
    if "clock_offset_ms" not in m:
        return "-"
    offset = m["clock_offset_ms"]
    return f"{offset / 1000:+.3f}s" if abs(offset) >= 1000 else f"{offset:+.1f}ms"


def _status_lines(st: dict[str, Any]) -> list[str]:
    lines = []
    if "node_id" in st:
        role = st["role"]
        where = f" ({st['kind']})" if "kind" in st else ""
        lines.append(f"node {st['node_id']}{' (site ' + st['site'] + ')' if st.get('site') else ''}: {role}{where}, "
                     f"term {st['term']}, cluster {st.get('cluster_id') or '?'}"
                     + (f" (founding {st['founding']})" if st.get("founding") else ""))
        if st.get("leader_id"):
            lines.append(f"leader: node {st['leader_id']} at {st.get('leader_address') or '?'}")
        elif "leader_error" in st:
            lines.append(f"leader: none known ({st['leader_error']})")
        lines.append(f"commit index {st['commit_index']}, applied {st['applied_index']}, log "
                     f"{st['first_index']}..{st['last_index']}, snapshot at {st.get('snapshot_index', 0)}, "
                     f"min_sites {st.get('min_sites', '?')}")
        rows = []
        for m in st.get("members", []):
            me = " *" if m["id"] == st["node_id"] else ""
            lead = " (leader)" if m["id"] == st.get("leader_id") else ""
            rows.append([f"{m['id']}{me}", m["site"], ("voter" if m["voter"] else "learner") + lead, m["address"],
                         m.get("match_index", "-"), m.get("lag", "-"), _clock_cell(m)])
        if rows:
            lines += ["members:", *("  " + r for r in table(["ID", "SITE", "ROLE", "ADDRESS", "MATCH", "LAG", "CLOCK"],
                                                            rows, right=(4, 5, 6)))]
        if st.get("clock_correction_ms"):
            ms = st["clock_correction_ms"]
            lines.append(f"clock: this node's clock is {abs(ms) / 1000:.3f} s {'behind' if ms > 0 else 'ahead of'} "
                         "the cluster's time (the median of the voters' clocks); it stamps new entries with the "
                         "cluster's time (fix its NTP)")
        if st.get("removed_ids"):
            lines.append(f"removed node ids (never reused): {', '.join(map(str, st['removed_ids']))}")
    else:
        lines.append(f"{st.get('kind', 'store')} store at {st.get('data_dir')}: log {st['first_index']}.."
                     f"{st['last_index']}")
    stats = st.get("stats") or {}
    if stats:
        r = stats.get("recipients", {})
        lines.append("recipients: " + ", ".join(f"{k} {v}" for k, v in r.items()))
        lines.append(f"messages: {stats.get('messages', 0)} stored, {stats.get('messages_active', 0)} active; "
                     f"{size(stats.get('bytes', 0))} of mail; "
                     f"oldest unfinished {age(stats.get('oldest_age_seconds', 0))}")
        disk = stats.get("disk") or {}
        if disk:
            whose = "the leader's disk" if "node_id" in st else "disk"
            state = ("new enqueues accepted" if disk["accepting_enqueues"]
                     else "NEW ENQUEUES REFUSED: below the floor, free space")
            lines.append(f"{whose}: {size(disk['free_bytes'])} free of {size(disk['total_bytes'])}, floor "
                         f"{size(disk['floor_bytes'])}; {state}")
    elif "node_id" in st:
        lines.append("queue counts: not available (no leader)")
    damaged = st.get("quarantined")
    lines.append(f"disk used: {size(st.get('disk_used_bytes', 0))}"
                 + (f"; {damaged} record(s) quarantined as damaged: run mqstore repair" if damaged else ""))
    for rec in st.get("recoveries", []):
        lines.append(f"RECOVERY {rec.get('action')} at {_ts(rec.get('time_ms', 0))} by {rec.get('operator')}: "
                     f"{rec.get('reason')}")
    if st.get("restored_from"):
        src = st["restored_from"]
        lines.append(f"restored from a backup of {_backup_source(src.get('source'))} at applied index "
                     f"{src.get('applied_index')}")
    return lines


def _backup_source(source: object) -> str:
    """Where a backup came from, for people: "node 2 (site fra) of cluster prod-eu at ADDR"."""
    if not isinstance(source, dict):
        return str(source)
    if source.get("kind") == "node":
        out = f"node {source.get('node_id')}"
        if source.get("site"):
            out += f" (site {source['site']})"
        if source.get("cluster_id"):
            out += f" of cluster {source['cluster_id']}"
        if source.get("address"):
            out += f" at {source['address']}"
        return out
    return "the embedded store" + (f" at {source['data_dir']}" if source.get("data_dir") else "")


def _ts(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


# --- queue list / message show / qshape ------------------------------------------------------------


def add_filter_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("filters (combined with AND)")
    g.add_argument("--state", help="a recipient state (queued, leased, deferred, delivered, bounced, expired), "
                   "or held, active, done")
    g.add_argument("--namespace", help="only this namespace (queue/tenant)")
    g.add_argument("--domain", help="a recipient domain")
    g.add_argument("--sender", help="the envelope sender (mail_from); slower: every candidate's envelope is read")
    g.add_argument("--older-than", type=duration, metavar="AGE", help="at least this old (90, 15m, 2h, 3d)")
    g.add_argument("--newer-than", type=duration, metavar="AGE", help="at most this old")
    g.add_argument("--id-prefix", help="message ids starting with this (ids sort by arrival time)")


def _filter(args: argparse.Namespace) -> Any:
    from mqstore.ops.inspect import Filter

    return Filter(state=args.state, namespace=args.namespace, domain=args.domain, older_than=args.older_than,
                  newer_than=args.newer_than, id_prefix=args.id_prefix, sender=args.sender)


def _sender_of(target: Target) -> Callable[[str], str | None]:
    def sender(message_id: str) -> str | None:
        try:
            return str(target.queue.get(message_id).mail_from)
        except NotFound:  # gone since it was listed (delivered and removed, deleted): no match
            return None

    return sender


def _summary_row(d: dict[str, Any]) -> list[object]:
    states = " ".join(f"{k}:{v}" for k, v in d["states"].items())
    flags = ("H" if d["held"] else "") + ("D" if d["done"] else "")
    return [d["message_id"], age(d["age_seconds"]), d["namespace"], d["priority"], size(d["size"]), d["recipients"],
            flags or "-", states]


def cmd_queue_list(args: argparse.Namespace) -> int:
    from mqstore.ops.inspect import iter_matching, summary_dict

    if not 1 <= args.limit <= 100_000:
        raise InvalidArgument("--limit must be 1..100000")
    with Target(args) as target:
        flt = _filter(args)
        items = iter_matching(target.queue, flt, after=args.after, page_size=min(args.limit, 1000) if not args.all
                              else 1000, sender_of=_sender_of(target) if flt.sender is not None else None)
        if args.all:
            return _list_all(args, items)
        page: list[dict[str, Any]] = []
        next_after = None
        for summary, cursor in items:
            if len(page) >= args.limit:
                break
            page.append(summary_dict(summary))
            next_after = cursor
        else:
            next_after = None
        if len(page) < args.limit:
            next_after = None
    headers = ["ID", "AGE", "NAMESPACE", "PRIO", "SIZE", "RCPTS", "FLAGS", "STATES"]
    lines = table(headers, [_summary_row(d) for d in page], right=(3, 4, 5)) if page else ["no messages match"]
    if next_after:
        lines.append(f"more: mqstore queue list ... --after {next_after}")
    emit(args, {"messages": page, "count": len(page), "next_after": next_after}, lines)
    return 0


def _list_all(args: argparse.Namespace, items: Iterator[tuple[Any, str | None]]) -> int:
    """Every match, streamed (memory stays at one page): JSON written as it goes, or a table
    printed in blocks."""
    from mqstore.ops.inspect import summary_dict

    out = sys.stdout
    count = 0
    if args.json:
        # The first match is read before anything is written, so bad arguments give the usual
        # error document; an error later (a damaged row, say) still ends a valid document: it
        # names the error and, as "next_after", the cursor to resume after the last message.
        # Ctrl-C too ends the document (error "Interrupted", exit 130), not cli.main's second one.
        first = next(items, None)
        out.write('{"messages": [')
        error: dict[str, str] | None = None
        last: str | None = None
        try:
            for summary, cursor in itertools.chain([first] if first is not None else [], items):
                out.write((",\n  " if count else "\n  ") + json.dumps(summary_dict(summary), sort_keys=True))
                count += 1
                last = cursor
        except MQStoreError as exc:
            error = {"error": type(exc).__name__, "message": str(exc)}
        except KeyboardInterrupt:
            error = {"error": "Interrupted", "message": "interrupted (Ctrl-C)"}
        tail: dict[str, Any] = {"count": count, "next_after": last if error is not None else None}
        if error is not None:
            tail |= error
        out.write("\n], " + json.dumps(tail)[1:] + "\n")
        out.flush()
        if error is None:
            return 0
        return 130 if error["error"] == "Interrupted" else 2
    headers = ["ID", "AGE", "NAMESPACE", "PRIO", "SIZE", "RCPTS", "FLAGS", "STATES"]
    block: list[list[object]] = []
    for summary, _ in items:
        block.append(_summary_row(summary_dict(summary)))
        count += 1
        if len(block) >= 1000:
            print("\n".join(table(headers, block, right=(3, 4, 5))))
            block = []
    if block:
        print("\n".join(table(headers, block, right=(3, 4, 5))))
    print(f"{count} message(s)")
    return 0


def _message_dict(m: Any) -> dict[str, Any]:
    return {
        "message_id": m.message_id,
        "namespace": m.namespace,
        "mail_from": m.mail_from,
        "priority": m.priority,
        "created": m.created,
        "not_before": m.not_before,
        "expires_at": m.expires_at,
        "held": m.held,
        "done": m.done,
        "size": m.size,
        "idempotency_key": m.idempotency_key,
        "retain_until": m.retain_until,
        "recipients": [
            {"address": r.address, "state": r.state, "attempts": r.attempts, "next_attempt": r.next_attempt,
             "last_reason": r.last_reason, "lease_token": r.lease_token, "lease_deadline": r.lease_deadline}
            for r in m.recipients
        ],
    }


def cmd_message_show(args: argparse.Namespace) -> int:
    if args.out and not args.raw:
        raise InvalidArgument("--out goes with --raw (it names where the message's bytes go)")
    with Target(args) as target:
        try:
            message = target.queue.get(args.message_id)
        except NotFound:
            if args.raw or args.no_history:
                raise
            gone = target.history(args.message_id)
            if not gone["events"]:
                raise
            emit(args, {"message_id": args.message_id, "stored": False, "history": gone},
                 [f"message {args.message_id} is not stored (any more); what the log still shows:",
                  *_history_lines(gone)])
            return 1
        if args.raw:
            data = message.data
            if args.out:
                Path(args.out).write_bytes(data)
            else:
                sys.stdout.buffer.write(data)
                sys.stdout.flush()
            return 0
        hist = None if args.no_history else target.history(args.message_id)
    payload = _message_dict(message)
    payload["stored"] = True
    if hist is not None:
        payload["history"] = hist
    lines = [
        f"message {message.message_id}  namespace {message.namespace}  priority {message.priority}",
        f"from <{message.mail_from}>, {size(message.size)}, created {_ts(int(message.created * 1000))} "
        f"({age(time.time() - message.created)} ago)"
        + (", HELD" if message.held else "") + (", finished" if message.done else ""),
    ]
    if message.expires_at:
        lines.append(f"expires {_ts(int(message.expires_at * 1000))}")
    rows = []
    for r in message.recipients:
        when = _ts(int(r.next_attempt * 1000)) if r.next_attempt else (
            f"lease {r.lease_token} until {_ts(int(r.lease_deadline * 1000))}" if r.lease_token else "-")
        rows.append([r.address, r.state, r.attempts, when, r.last_reason or ""])
    lines += table(["RECIPIENT", "STATE", "ATTEMPTS", "NEXT / LEASE", "LAST REASON"], rows, right=(2,))
    if hist is not None:
        lines.append("history:")
        lines += _history_lines(hist)
    emit(args, payload, lines)
    return 0


def _history_lines(hist: dict[str, Any]) -> list[str]:
    def show(key: str, value: Any) -> str:
        if key.endswith("_ms"):
            values = value if isinstance(value, list) else [value]
            return f"{key[:-3]} {', '.join(_ts(int(v)) for v in values)}"
        if isinstance(value, list):
            return f"{key} {', '.join(str(v) for v in value)}"
        return f"{key} {value}"

    lines = []
    for e in hist["events"]:
        detail = ", ".join(show(k, v) for k, v in e.items()
                           if k not in ("index", "time_ms", "event") and v not in (None, [], ""))
        lines.append(f"  {_ts(e['time_ms']) if e.get('time_ms') else '?':19}  #{e['index']:<8} {e['event']}"
                     + (f": {detail}" if detail else ""))
    lines += [f"  note: {n}" for n in hist.get("notes", [])]
    return lines or ["  (no events in the log)"]


def cmd_qshape(args: argparse.Namespace) -> int:
    with Target(args) as target:
        if args.state is None:
            shape = target.queue.qshape(args.namespace)
            buckets, total = list(shape.buckets), list(shape.total)
            domains = [(d, list(c)) for d, c in shape.domains.items()]
        else:
            if target.remote:
                from mqstore.ops import remote

                result = remote.state_shape(target.client, args.namespace, args.state)
            else:
                from mqstore.ops.inspect import qshape_by_state

                now_ms = max(int(time.time() * 1000), target.log.last_stamp_ms)
                result = qshape_by_state(target.log, args.namespace, args.state, now_ms)
            buckets, total = result["buckets"], result["total"]
            domains = list(result["domains"].items())
    shown = domains[: args.top] if args.top else domains
    what = {None: "waiting recipients (queued and deferred, not held)", "queued": "queued recipients",
            "deferred": "deferred recipients", "held": "waiting recipients of held messages"}[args.state]
    payload = {"state": args.state or "waiting", "buckets_minutes": buckets, "total": total,
               "domains": dict(domains)}
    headers = ["DOMAIN", "T", *buckets]
    rows = [["TOTAL", sum(total), *total]] + [[d, sum(c), *c] for d, c in shown]
    lines = table(headers, rows, right=tuple(range(1, len(headers))))
    if len(domains) > len(shown):
        lines.append(f"... {len(domains) - len(shown)} more domain(s) (--top 0 shows all)")
    lines.append(f"{what} by domain and age in minutes")
    emit(args, payload, lines)
    return 0


# --- bulk changes -----------------------------------------------------------------------------------


def _ids_from(args: argparse.Namespace) -> list[str]:
    from mqstore.ids import format_id, parse_id

    ids: list[str] = []
    for item in args.ids:
        if item == "-":
            ids += [line.split()[0] for line in sys.stdin if line.strip() and not line.startswith("#")]
        else:
            ids.append(item)
    return [format_id(parse_id(i)) for i in ids]  # fail on a bad id before changing anything


def _would_change(op: str, held: bool, done: bool, states: dict[str, int]) -> bool:
    if op == "hold":
        return not held and not done
    if op == "release":
        return held
    if op == "requeue":  # only if one is still waiting: see _requeue_changes
        return states.get("deferred", 0) > 0
    if op == "bounce":  # leased recipients are left to their worker: only waiting ones bounce
        return any(states.get(s, 0) for s in ("queued", "deferred"))
    return True  # delete


def _requeue_changes(message: Any, now_ms: int) -> bool:
    """Whether a requeue changes the message: it makes due a deferred recipient whose next attempt
    is still ahead (as the state machine does: one already due is left as it is)."""
    return any(r.state == "deferred" and r.next_attempt is not None and round(r.next_attempt * 1000) > now_ms
               for r in message.recipients)


def _leader_time_ms(target: Target) -> int:
    """The cluster's compliance time (ms), from the leader's stats; this host's clock from a node
    that does not report it, or for an identity limited to some namespaces (Stats covers every
    namespace: until stop 31 such an admin's requeue, and delete --dry-run --bypass-governance,
    were refused before doing anything)."""
    try:
        judged_at = target.queue.stats().get("compliance_time")
    except PermissionDenied:
        judged_at = None
    return round(judged_at * 1000) if isinstance(judged_at, (int, float)) else int(time.time() * 1000)


def _queue_now(target: Target) -> Callable[[], int]:
    """The queue's time (ms) a requeue is judged at: a store's own (offline), or the leader's
    compliance time (--server, read once and advanced by the time passed since; this host's clock
    from a node that does not report it)."""
    if target.remote:
        base = _leader_time_ms(target)
        start = time.monotonic()
        return lambda: base + int((time.monotonic() - start) * 1000)
    return lambda: max(int(time.time() * 1000), target.log.last_stamp_ms)


#: Errors that mean the cluster (or store) cannot take changes now, not that this message was
#: refused: a bulk change stops at the first one (the next messages would each wait out --timeout).
_BULK_STOPS = (Unavailable, NotLeader, Overloaded, Unauthenticated, StoreClosed)
_PAST = {"hold": "held", "release": "released", "requeue": "requeued", "delete": "deleted", "bounce": "bounced"}


def _states_of(message: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in message.recipients:
        out[r.state] = out.get(r.state, 0) + 1
    return out


def cmd_bulk(args: argparse.Namespace) -> int:
    op = args.command
    flt = _filter(args)
    if args.ids and not flt.is_empty():
        raise InvalidArgument("give message ids or filters, not both")
    if not args.ids and flt.is_empty() and not args.all:
        raise InvalidArgument(f"{op} what? give message ids (or - to read them from stdin), filters, or --all")
    if op == "delete" and args.reason and not args.bypass_governance:
        raise InvalidArgument("--reason goes with --bypass-governance (a plain delete records no reason)")
    ids = _ids_from(args) if args.ids else None
    with Target(args, write=not args.dry_run) as target:
        if args.dry_run and not target.remote and target.log.meta_get(b"node.id") is not None:
            # As the real run (mqstore.open refuses a node's data dir): say so now, not after counting.
            raise InvalidArgument(
                f"{target.where} is the data dir of a cluster node: change its queue through the node (--server), "
                "not on its data dir (that would bypass replication)"
            )
        action = _bulk_action(target, op, args)
        refusal_of = _dry_run_refusal(target, op, args) if args.dry_run else None
        counts = {"matched": 0, "would_change": 0, "changed": 0, "unchanged": 0, "missing": 0, "refused": 0}
        # bounce: recipients bounced, and leased ones left to their worker (the real run's results)
        recipients = {"bounced_recipients": 0, "left_leased": 0}
        refusals: list[dict[str, str]] = []
        bar = Progress.for_args(args, f"{op}:")
        now_ms = _queue_now(target) if op == "requeue" else None

        def candidates() -> Iterator[tuple[str, bool | None, dict[str, int]]]:
            """(id, whether it would change or None: read the message to tell, recipient states)."""
            if ids is not None:
                for mid in ids:
                    yield mid, None, {}
                return
            from mqstore.ops.inspect import iter_matching

            sender_of = _sender_of(target) if flt.sender is not None else None
            for summary, _ in iter_matching(target.queue, flt, sender_of=sender_of):
                states = dict(summary.states)
                change: bool | None = _would_change(op, summary.held, summary.done, states)
                if op == "requeue" and change:
                    change = None  # deferred, but still waiting or already due? its recipients tell
                yield summary.message_id, change, states

        # A run ends early on an error that is not about one message (the cluster unreachable, its
        # quorum lost, a listing that fails): the summary says how far it got, and exit 2.
        stop: MQStoreError | None = None
        uncertain: str | None = None  # the message whose change was sent without an answer
        attempted = 0
        interrupted = False
        calling: str | None = None  # the message whose change is being sent
        items = candidates()
        with bar:
            try:
                while True:
                    calling = None
                    try:
                        item = next(items, None)
                    except MQStoreError as exc:  # listing the candidates (or reading their envelopes) failed
                        stop = exc
                        break
                    if item is None:
                        break
                    mid, change, states = item
                    if change is None:
                        try:
                            m = target.queue.get(mid)
                        except NotFound:
                            attempted += 1
                            counts["missing"] += 1
                            bar.update(counts["matched"] + counts["missing"], len(ids or ()))
                            continue
                        except _BULK_STOPS as exc:
                            stop = exc
                            break
                        except MQStoreError as exc:  # this message cannot be read (a damaged row, say)
                            attempted += 1
                            counts["matched"] += 1
                            counts["refused"] += 1
                            if len(refusals) < 1000:
                                refusals.append({"message_id": mid, "error": type(exc).__name__, "message": str(exc)})
                            bar.update(counts["matched"] + counts["missing"], len(ids or ()))
                            continue
                        states = _states_of(m)
                        change = (_requeue_changes(m, now_ms()) if now_ms is not None
                                  else _would_change(op, m.held, m.done, states))
                    attempted += 1
                    counts["matched"] += 1
                    refusal = refusal_of(mid) if change and refusal_of is not None else None
                    if refusal is not None:  # a dry run: the real run would be refused this one
                        counts["refused"] += 1
                        if len(refusals) < 1000:
                            refusals.append({"message_id": mid, **refusal})
                    elif not change:
                        counts["unchanged"] += 1
                        if op == "bounce":  # every waiting recipient leased: all left to their worker
                            recipients["left_leased"] += states.get("leased", 0)
                    else:
                        counts["would_change"] += 1
                    if refusal is None and change and not args.dry_run:
                        try:
                            calling = mid
                            result = action(mid)
                            calling = None
                            counts["changed"] += 1
                            if op == "bounce":
                                recipients["bounced_recipients"] += result.bounced
                                recipients["left_leased"] += result.left_leased
                        except NotFound:
                            counts["missing"] += 1
                        except _BULK_STOPS as exc:
                            stop = exc
                            if not (isinstance(exc, Unavailable) and exc.not_applied) and not isinstance(
                                    exc, (Overloaded, Unauthenticated)):  # those refused it before doing anything
                                uncertain = mid
                            break
                        except MQStoreError as exc:
                            counts["refused"] += 1
                            if len(refusals) < 1000:
                                refusals.append({"message_id": mid, "error": type(exc).__name__, "message": str(exc)})
                    bar.update(counts["matched"] + counts["missing"], len(ids or ()))
            except KeyboardInterrupt:
                # Ctrl-C: the summary so far, as for a stop (exit 130); a change sent without an
                # answer may or may not have been made.
                interrupted = True
                uncertain = calling
    payload = {"operation": op, "dry_run": args.dry_run, "selection": "ids" if ids is not None else flt.describe(),
               **counts, **(recipients if op == "bounce" and not args.dry_run else {}), "refusals": refusals}
    not_attempted = len(ids) - attempted if ids is not None else None
    ended = stop is not None or interrupted
    error, message = ("Interrupted", "interrupted (Ctrl-C)") if interrupted else (type(stop).__name__, str(stop))
    if ended:
        # not_attempted: None when selected by filter (the rest of the selection, not counted)
        payload |= {"error": error, "message": message, "not_attempted": not_attempted, "uncertain": uncertain}
    if args.dry_run:
        lines = [f"dry run: {op} would change {counts['would_change']} of {counts['matched']} matching message(s)"
                 + (f", {counts['refused']} would be REFUSED" if counts["refused"] else "")
                 + (f"; {counts['missing']} id(s) not found" if counts["missing"] else "")]
        lines += [f"  {r['message_id']}: {r['error']}: {r['message']}" for r in refusals[:50]]
    else:
        lines = [f"{op}: changed {counts['changed']} of {counts['matched']} matching message(s)"
                 + (f", {counts['unchanged']} needed no change" if counts["unchanged"] else "")
                 + (f", {counts['missing']} not found" if counts["missing"] else "")
                 + (f", {counts['refused']} REFUSED" if counts["refused"] else "")]
        if op == "bounce":
            lines.append(f"  {recipients['bounced_recipients']} recipient(s) bounced"
                         + (f"; {recipients['left_leased']} leased recipient(s) left to their worker (a delivery "
                            "may be in flight: the worker settles them)" if recipients["left_leased"] else ""))
        lines += [f"  {r['message_id']}: {r['error']}: {r['message']}" for r in refusals[:50]]
    if ended:
        rest = (f"{not_attempted} message(s) not attempted" if not_attempted is not None
                else "the rest of the selection not attempted")
        lines.append(f"STOPPED: {error}: {message}")
        lines.append(f"  {rest}: run the same command again"
                     + (" to go on" if interrupted else " once the cluster answers"))
        if uncertain is not None:
            lines.append(f"  {uncertain} may or may not have been {_PAST[op]} (the call got no answer that says)")
        if not args.json:
            print(f"mqstore: {op} interrupted" if interrupted else
                  f"mqstore: error: {op} stopped early: {error}: {message}", file=sys.stderr)
    emit(args, payload, lines)
    if ended:
        return 130 if interrupted else 2
    return 1 if counts["refused"] or (ids is not None and counts["missing"]) else 0


def _dry_run_refusal(target: Target, op: str, args: argparse.Namespace) -> Callable[[str], dict[str, str] | None]:
    """For a dry run: why the real run would refuse ``op`` on a message because of its retention
    or legal holds (None: it would not), decided by the enforcement function the state machine
    applies (:func:`mqstore.compliance.rules.check`) on the message's lock. Only ``delete`` can be
    refused so: the state machine checks hold, release, requeue and bounce as "hold", which
    retention never refuses (a bounced message is kept). Judged at the store's compliance time
    (offline), or at the leader's (--server, from its stats). Permissions are the real run's to
    check (offline, the local administrator has every role)."""
    from mqstore.compliance import rules
    from mqstore.ids import parse_id

    if op != "delete":
        return lambda mid: None
    bypass = bool(getattr(args, "bypass_governance", False))
    reason = (getattr(args, "reason", None) or "") if bypass else ""
    if target.remote:
        def lock_of(mid: str) -> rules.Lock | None:
            try:
                m = target.queue.get(mid)
            except NotFound:
                return None
            until = round(m.locked_until * 1000) if m.locked_until is not None else 0
            return rules.Lock(m.namespace, rules.Mode.parse(m.retention_mode), until, tuple(m.legal_holds))

        now_ms = _leader_time_ms(target)
    else:
        from mqstore.queue import machine
        from mqstore.queue.kv import LmdbKV

        def lock_of(mid: str) -> rules.Lock | None:
            key = parse_id(mid)
            with target.log.env.read() as txn:
                kv = LmdbKV(txn, target.log.env.dbs)
                row = machine.get_message(kv, key)
                return machine.lock_of(kv, key, row) if row is not None else None

        now_ms = target.queue.compliance_clock.now_ms()
    ctx = rules.Ctx(cli_actor(), compliance_ms=now_ms, bypass=bypass, reason=reason)

    def refusal(mid: str) -> dict[str, str] | None:
        lock = lock_of(mid)
        found = rules.check("delete", ctx, lock) if lock is not None else None
        if found is None:
            return None
        return {"error": "PermissionDenied" if found.kind == "permission" else "Immutable", "message": found.reason}

    return refusal


def _bulk_action(target: Target, op: str, args: argparse.Namespace) -> Callable[[str], Any]:
    queue = target.queue
    if op == "bounce":
        from mqstore.api import BOUNCE_REASON_DEFAULT

        reason = args.reason or BOUNCE_REASON_DEFAULT
        return lambda mid: queue.bounce_message(mid, reason=reason)
    if op == "delete" and args.bypass_governance:
        if not args.reason:
            raise InvalidArgument("--bypass-governance needs --reason")
        return lambda mid: queue.delete(mid, bypass_governance=True, reason=args.reason)

    fn: Callable[[str], Any] = getattr(queue, op)
    return fn


# --- verify / repair -------------------------------------------------------------------------------


def cmd_verify(args: argparse.Namespace) -> int:
    bar = Progress.for_args(args, "verify")
    with bar:
        if _remote(args):
            from mqstore.ops import remote

            with client_from_args(args) as client:
                report = remote.verify(client, remote.answering(client)[0], _phase_progress(bar))
            lines = _verify_lines(report)
        else:
            from mqstore.ops.verify import verify_path

            if args.scratch and not Path(args.scratch).is_dir():
                raise InvalidArgument(f"--scratch {args.scratch} is not a directory")
            conf = _config(args)
            result = verify_path(_data_dir(args), key_file=_key_file(args), progress=_phase_progress(bar),
                                 replay=not args.no_replay, scratch_dir=Path(args.scratch) if args.scratch else None,
                                 audit_signing_key=conf.audit_signing_key if conf is not None else None)
            report = result.to_dict()
            lines = result.lines()
    emit(args, report, lines)
    return 0 if report["clean"] else 1


def _verify_lines(report: dict[str, Any]) -> list[str]:
    from mqstore.ops.verify import VerifyReport

    r = VerifyReport(**{k: report[k] for k in ("records_checked", "first_index", "last_index", "applied_index",
                                                "messages_checked", "sealed_checked", "replayed", "replay_note",
                                                "audit", "problems")})
    r.problems_total = report["problems_total"]
    r.consistent_copy = bool(report.get("consistent_copy"))
    r.by_check.update(report["problems_by_check"])
    lines = r.lines()
    if "node_id" in report:
        lines.insert(0, f"node {report['node_id']} (a consistent copy of its store, checked inside the node):")
    return lines


def cmd_repair(args: argparse.Namespace) -> int:
    indices = sorted(set(args.index or []))
    if _remote(args):
        if args.rebuild_state:
            raise InvalidArgument("--rebuild-state works on a stopped node's data dir (--data-dir/--config)")
        if args.peer:
            raise InvalidArgument("--peer is for a stopped node (--config/--data-dir): a running node (--server) "
                                  "asks its own members")
        from mqstore.ops import remote

        with client_from_args(args) as client:
            report = remote.repair(client, remote.answering(client)[0], indices, scan=not args.no_scan,
                                   dry_run=args.dry_run)
        lines = _repair_lines(report)
        emit(args, report, lines)
        return 1 if report["unresolved"] else 0
    from mqstore.ops import repair
    from mqstore.store import LogStore

    path = _data_dir(args)
    report = {}
    # A dry run changes nothing: read-only (no writer lock, no quarantine list update), so it also
    # works beside a running store.
    with LogStore(path, key_file=_key_file(args), readonly=args.dry_run, create=False) as log:
        damaged = repair.find_damaged(log, indices, scan=not args.no_scan)
        report = {"damaged": 0, "repaired": 0, "unresolved": [], "records": [], "notes": []}
        if damaged:
            with _offline_fetch(args, log) as fetch:
                report = repair.repair_records(log, damaged, fetch, dry_run=args.dry_run)
        if args.rebuild_state:
            if args.dry_run:
                from mqstore.ops.verify import replay_problem

                why = replay_problem(log)
                report["rebuild_state"] = {"possible": why is None, "why_not": why}
            else:
                bar = Progress.for_args(args, "rebuilding state tables")
                with bar:
                    report["rebuild_state"] = repair.rebuild_state(log, bar.update)
    lines = _repair_lines(report)
    emit(args, report, lines)
    return 1 if report["unresolved"] else 0


@contextlib.contextmanager
def _offline_fetch(args: argparse.Namespace, log: Any) -> Iterator[Any]:
    """Where a stopped node gets good copies: --peer addresses, else its members' addresses."""
    from mqstore.ops import facts, remote

    raft = facts.raft_facts(log.env)
    peers = list(args.peer or [])
    cluster_id = raft.cluster_id if raft is not None else ""
    if not peers and raft is not None:
        peers = [addr for n, (_, addr) in sorted(raft.members.items()) if n != raft.node_id and addr]
    if not peers:
        def nowhere(indices: list[int]) -> tuple[dict[int, tuple[bytes, str]], list[str]]:
            return {}, ["no peers to fetch from: an embedded store has no replicas (restore a backup), "
                        "or pass --peer host:port"]

        yield nowhere
        return
    with client_from_args(args, peers) as client:
        yield remote.peer_fetcher(client, peers, cluster_id)


def _repair_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    if "node_id" in report:
        lines.append(f"node {report['node_id']}:")
    if not report.get("records"):
        lines.append("no damaged records found")
    for r in report.get("records", []):
        lines.append(f"log index {r['index']}: {r['damage']} -> {r['status']}"
                     + (f" from {r['source']}" if r.get("source") else "") + (f" ({r['problem']})" if r.get("problem")
                                                                             else ""))
    lines += [f"note: {n}" for n in report.get("notes", [])]
    rb = report.get("rebuild_state")
    if rb:
        if "possible" in rb:
            lines.append("state tables: " + ("can be rebuilt from the log" if rb["possible"] else
                                             f"cannot be rebuilt: {rb['why_not']}"))
        else:
            lines.append(f"state tables rebuilt from log entries {rb['from_index']}..{rb['to_index']} "
                         f"({rb['entries_applied']} applied)")
    if report.get("unresolved"):
        lines.append(f"UNRESOLVED: {len(report['unresolved'])} record(s) could not be repaired: "
                     f"{', '.join(map(str, report['unresolved'][:20]))}")
    elif report.get("dry_run"):
        lines.append(f"dry run: {report.get('would_repair', 0)} record(s) would be repaired")
    return lines


# --- backup / restore --------------------------------------------------------------------------------


def cmd_backup(args: argparse.Namespace) -> int:
    from mqstore.ops import backup

    out = Path(args.out)
    removed, older = backup.clear_leftovers(out)
    for path in removed:
        print(f"mqstore: removed {path}, left by a backup to {out} that was killed", file=sys.stderr)
    for path in older:
        print(f"mqstore: warning: {path} looks left by an interrupted backup of an earlier mqstore version: "
              "remove it once no such backup runs", file=sys.stderr)
    bar = Progress.for_args(args, "backup", unit="B")
    with bar:
        if _remote(args):
            from mqstore.ops import remote

            with client_from_args(args) as client:
                address = remote.answering(client)[0]
                point = 0
                if not args.no_wait:
                    # Everything acknowledged before now is committed at or below the leader's
                    # commit index: the node copied must have applied that far.
                    point = remote.leader_status(client)["commit_index"]
                remote.backup(client, address, out, min_applied_index=point, wait_s=args.wait,
                              progress=lambda _p, done, total: bar.update(done, total))
        else:
            backup.backup_local(_data_dir(args), out, progress=bar.update)
        bar.phase("checking the backup")
        header, trailer = backup.check_file(out, progress=bar.update)
    payload = {"file": str(out), "file_bytes": out.stat().st_size, "header": header, "sha256": trailer["sha256"],
               "leftovers_removed": [str(p) for p in removed]}
    src = header["source"]
    emit(args, payload, [
        f"backup of {src.get('kind')} {src.get('node_id') or src.get('data_dir', '')} written to {out} "
        f"({size(out.stat().st_size)}, database {size(header['data_bytes'])})",
        f"consistent at applied index {header['applied_index']} (log {header['first_index']}..{header['last_index']}), "
        f"{header['messages']} messages ({header['messages_active']} active)",
        f"sha256 {trailer['sha256']} (checked)",
        *([f"the audit checkpoints are signed by key id {header['audit_signing_key']['key_id']}: the signing key is "
           f"not in the backup; keep a copy of it ({header['audit_signing_key']['file']} of the store, or the node's "
           "audit_signing_key) with the backup"] if header.get("audit_signing_key") else []),
    ])
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from mqstore.crypto.providers import read_key_file
    from mqstore.ops import backup

    if args.cluster_id is not None:  # as bootstrap's (an empty one would seed nothing, silently)
        from mqstore.config import check_cluster_id

        check_cluster_id(args.cluster_id, "--cluster-id")
    conf = _config(args)
    if args.cluster_id and conf is None:
        raise InvalidArgument("--cluster-id (seeding a new cluster from the backup) needs --config for the new node")
    path = Path(args.data_dir) if args.data_dir else (Path(conf.data_dir) if conf is not None else None)
    if path is None:
        raise InvalidArgument("restore into which directory? give --data-dir (or --config)")
    # Everything that can be checked before writing: the backup's header (and whether it can seed
    # a cluster), the target, and the keys the store is opened with afterwards.
    source = backup.read_header(Path(args.input)).get("source")
    if (path / "data.mdb").exists():
        raise InvalidArgument(f"{path} already holds a store: restore into a new directory")
    key = _key_file(args) or str(path / "kek.key")  # verify's key: as for any command on the restored store
    if not args.no_verify:
        read_key_file(key)
    seed_conf = None
    if args.cluster_id:
        import dataclasses

        seed_conf = dataclasses.replace(conf, key_file=Path(conf.key_file or path / "kek.key"))
        read_key_file(seed_conf.key_file)
    seeded: dict[str, Any] | None = None
    report: dict[str, Any] | None = None
    bar = Progress.for_args(args, "restore", unit="B")

    def finish(work: Path) -> None:
        """Seed and verify the restored store in ``work`` (it moves to ``path`` once this returned)."""
        nonlocal seeded, report
        if seed_conf is not None:
            from mqstore.ops.recover import reseed

            seeded = reseed(seed_conf, args.cluster_id, action="seed-from-backup", data_dir=work,
                            keep_unapplied=False, reason=f"restored from {args.input} (backup of {source})",
                            previous_cluster_id=(source or {}).get("cluster_id"))
        if not args.no_verify:
            from mqstore.ops.verify import verify_path

            bar.phase("verify:", unit="")  # verify counts records, not the restore's bytes
            report = verify_path(work, key_file=key, progress=_phase_progress(bar)).to_dict()

    leftovers = [str(p) for p in backup.clear_restore_leftovers(path)]
    for left in leftovers:
        print(f"mqstore: removed {left}, left by a restore into {path} that was killed", file=sys.stderr)
    with bar:
        signing_key_file = (conf.audit_signing_key if seed_conf is not None and conf.audit_signing_key is not None
                            else path / backup.AUDIT_KEY_FILE)
        restored = backup.restore(Path(args.input), path, progress=bar.update, node=bool(args.cluster_id),
                                  finish=finish, signing_key_file=Path(signing_key_file))
        header = restored["header"]
    signing = restored["audit_signing_key"]
    leases = _lease_tokens(header["applied_index"])
    payload = {"data_dir": str(path), "header": header, "log": restored["log"], "verify": report, "seeded": seeded,
               "audit_signing_key": signing, "lease_tokens": leases,
               "leftovers_removed": leftovers + restored["leftovers_removed"]}
    lines = [f"restored {args.input} into {path}: applied index {header['applied_index']}, "
             f"{header['messages']} messages"]
    cut = restored["log"]
    if cut is not None and cut["embedded"]:
        lines.append("a node's backup made an embedded store: Raft state dropped"
                     + (f", log cut back to the applied index {cut['applied_index']} ({cut['entries_dropped']} "
                        "entries after it were never applied)" if cut["entries_dropped"] else ""))
    elif cut is not None:
        lines.append(f"WARNING: a store restored by an earlier mqstore and written to since: it records applied index "
                     f"{cut['applied_index']}, its log runs to {cut['last_index']}; kept as it is")
    if seeded:
        lines.append(f"seeded node {seeded['node_id']} as the only voter of new cluster {seeded['cluster_id']!r}: "
                     "start it, then add nodes with mqstore recover")
    else:
        lines.append("the restored store belongs to no cluster: inspect it with --data-dir, open it as an embedded "
                     "store, or seed a new cluster from it (restore --config ... --cluster-id ...)")
    if report is not None:
        lines.append("verify: " + ("clean" if report["clean"] else f"NOT CLEAN ({report['problems_total']} problems)"))
    if signing is not None:
        lines.append(_signing_key_line(signing))
    lines.append(f"ACTION NEEDED: {leases['action']}")
    emit(args, payload, lines)
    return 0 if report is None or report["clean"] else 1


def _lease_tokens(applied_index: int, lost: str = "the lost store's entries after the backup",
                  event: str = "the restore") -> dict[str, Any]:
    """What a restored (or seeded, or force-recovered) store means for the leases workers hold: a
    lease token is the log index of its LEASE record, and the store's log goes on after
    ``applied_index``, so it grants again the tokens of ``lost``."""
    return {
        "reissued_above": applied_index,
        "action": (f"lease tokens are log indices, and this store's log goes on after index {applied_index}: it "
                   f"grants again the tokens of {lost}. Before workers use it, every worker must drop every lease "
                   f"it holds from before {event} (and restart): an ack, defer or bounce with an old token may "
                   "settle ANOTHER message's lease"),
    }


def _signing_key_line(signing: dict[str, Any]) -> str:
    """What a restored store needs for its signed audit checkpoints, said plainly."""
    from mqstore.ops.backup import AUDIT_KEY_FILE

    which = f"the audit signing key with key id {signing['key_id']}"
    if signing["matches"]:
        return f"audit: {signing['file']} holds {which}, which signed its {signing['checkpoints']} checkpoint(s)"
    if signing["present"]:
        return (f"WARNING: {signing['file']} is not {which}, which signed the store's {signing['checkpoints']} audit "
                f"checkpoint(s): put that key there (the {AUDIT_KEY_FILE} file of the store backed up), or "
                "audit verify reports the log as tampered with")
    return (f"ACTION NEEDED: the backup does not hold the audit signing key: copy {which} (the "
            f"{AUDIT_KEY_FILE} file of the store backed up) to {signing['file']} before opening the store; "
            f"its {signing['checkpoints']} audit checkpoint(s) are verified with it")


# --- recover / cluster ----------------------------------------------------------------------------------


FORCE_FLAG = "--i-understand-acknowledged-writes-may-be-lost"


def cmd_recover(args: argparse.Namespace) -> int:
    from mqstore import config as cfg
    from mqstore.ops import recover

    # Forcing a new cluster works on the survivor's stopped data dir: its TLS files are not needed
    # (replacing a node starts a new one, which serves: its config is checked whole).
    _check_server(args)
    conf = cfg.load(args.config, check_tls=not args.force_new_cluster)
    if args.force_new_cluster:
        if args.server is not None:
            raise InvalidArgument("--force-new-cluster works on a stopped survivor's data dir (no --server)")
        if not args.confirm:
            raise InvalidArgument(
                f"--force-new-cluster rewrites the membership to this node alone: entries the lost members held "
                f"and this node did not are gone for good. Confirm with {FORCE_FLAG} and --reason")
        if not args.reason:
            raise InvalidArgument("--force-new-cluster needs --reason (it is recorded)")
        print("mqstore: WARNING: forcing a new cluster from the survivor's data: this is never automatic, it is "
              "recorded, and acknowledged writes that only the lost members held are lost", file=sys.stderr)
        entry = recover.force_new_cluster(conf, args.reason)
        entry["lease_tokens"] = _lease_tokens(entry["applied_index"], "the entries only the lost members held",
                                              "the recovery")
        emit(args, entry, [
            f"node {entry['node_id']} is now the only voter of cluster {entry['cluster_id']!r} "
            f"(term {entry['term']}, applied {entry['applied_index']})",
            f"removed for good: {', '.join(map(str, entry['removed_ids'])) or 'none'}",
            *([f"unapplied membership change(s) at log index {', '.join(map(str, entry['config_replaced']))} "
               "replaced by no-op entries; every other entry of the log is kept"] if entry["config_replaced"] else []),
            f"recorded in the store and in {Path(conf.data_dir) / recover.RECOVERY_FILE}",
            f"next: start it (mqstore serve --config {args.config}), then add new nodes with mqstore recover",
            f"ACTION NEEDED: {entry['lease_tokens']['action']}",
        ])
        return 0
    _check_server(args)
    args.server = args.server or os.environ.get(SERVER_ENV)
    if not args.server:
        raise InvalidArgument("recover needs --server (the surviving cluster), or --force-new-cluster")
    bar = Progress.for_args(args, "recover")

    def say(text: str) -> None:
        if not args.json:
            bar.close()
            print(f"mqstore: {text}", file=sys.stderr, flush=True)

    with client_from_args(args) as client, bar:
        result = recover.replace_node(client, conf, replace=args.replace, wait_s=args.wait, say=say,
                                      progress=lambda _p, done, total: bar.update(done, total))
    emit(args, result, [*result["steps"], f"node {result['node_id']} is a voter of cluster {result['cluster_id']!r}"])
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    from mqstore.ops import remote

    _check_server(args)
    args.server = args.server or os.environ.get(SERVER_ENV)
    if not args.server:
        raise InvalidArgument(f"cluster commands need --server (a running cluster) or ${SERVER_ENV}")
    with client_from_args(args) as client:
        if args.cluster_command == "snapshot":
            targets = list(client.addresses)  # the --server nodes (before any leader hint adds one)
            done: list[dict[str, Any]] = []
            failed: list[dict[str, str]] = []
            for address in targets:  # each node on its own: one that fails does not hide the others'
                try:
                    done.append(remote.snapshot(client, address))
                except MQStoreError as exc:
                    failed.append({"address": address, "error": type(exc).__name__, "message": str(exc)})
            emit(args, {"snapshots": done, "failed": failed}, [
                *(f"node {r['node_id']} ({r['address']}): snapshot at index {r['index']} (term {r['term']}); "
                  f"its log now starts at {r['first_index']}" for r in done),
                *(f"{f['address']}: no snapshot: {f['message']}" for f in failed),
            ])
            return 1 if failed else 0
        if args.cluster_command == "transfer-leader":
            to = remote.transfer_leader(client, args.to or 0)
            emit(args, {"leader_id": to}, [f"leadership is being handed to node {to}"])
            return 0
        if args.cluster_command == "add":
            members = remote.change_membership(client, "add", args.id, args.site, args.address)
            text = f"node {args.id} added as a learner; once it caught up: mqstore cluster promote --id {args.id}"
        elif args.cluster_command == "promote":
            members = remote.change_membership(client, "promote", args.id)
            text = f"node {args.id} is being promoted to voter"
        else:
            members = remote.change_membership(client, "remove", args.id)
            text = f"node {args.id} is being removed (its id is never reused)"
    rows = [[m["id"], m["site"], "voter" if m["voter"] else "learner", m["address"]] for m in members]
    emit(args, {"members": members}, [text, *table(["ID", "SITE", "ROLE", "ADDRESS"], rows)])
    return 0


# --- registration ------------------------------------------------------------------------------------


def register(sub: Any) -> None:
    st = sub.add_parser("status", help="node role, term, leader, indexes, members and lag, queue counts, disk use")
    add_target_args(st)
    st.set_defaults(func=cmd_status)

    queue = sub.add_parser("queue", help="list messages in the queue")
    qsub = queue.add_subparsers(dest="queue_command", required=True)
    ls = qsub.add_parser("list", help="messages in arrival order, filtered, a page at a time (or --all)")
    add_target_args(ls)
    add_filter_args(ls)
    ls.add_argument("--limit", type=int, default=DEFAULT_PAGE, help=f"page size (default {DEFAULT_PAGE})")
    ls.add_argument("--after", help="continue after this message id (the last one of the previous page)")
    ls.add_argument("--all", action="store_true", help="every match, streamed (JSON is written as it goes)")
    ls.set_defaults(func=cmd_queue_list)

    message = sub.add_parser("message", help="one message")
    msub = message.add_subparsers(dest="message_command", required=True)
    show = msub.add_parser("show", help="envelope, recipients' states and the message's history")
    show.add_argument("message_id")
    add_target_args(show)
    show.add_argument("--raw", action="store_true", help="write the decrypted RFC 5322 message to stdout (or --out)")
    show.add_argument("--out", help="with --raw: write to this file")
    show.add_argument("--no-history", action="store_true", help="skip the history (it reads the log)")
    show.set_defaults(func=cmd_message_show)

    qs = sub.add_parser("qshape", help="waiting recipients by domain and age (like Postfix's qshape)")
    add_target_args(qs)
    qs.add_argument("--namespace")
    qs.add_argument("--state", choices=["queued", "deferred", "held"],
                    help="only queued, only deferred, or the held messages' recipients (default: all waiting)")
    qs.add_argument("--top", type=_top, default=20, help="domains shown (default 20; 0: all)")
    qs.set_defaults(func=cmd_qshape)

    helps = {
        "hold": "stop leasing messages until released",
        "release": "release held messages",
        "requeue": "make deferred recipients due now",
        "delete": "delete messages (compliance rules apply)",
        "bounce": "give up on messages: their queued and deferred recipients bounce (leased ones are left to "
                  "their worker)",
    }
    for op in BULK_OPS:
        p = sub.add_parser(op, help=f"{helps[op]}: by id (args, or - for stdin) or by filter")
        p.add_argument("ids", nargs="*", metavar="ID", help="message ids; - reads ids from stdin (one per line)")
        add_target_args(p)
        add_filter_args(p)
        p.add_argument("--all", action="store_true", help="every message (when no filter or id is given)")
        p.add_argument("--dry-run", action="store_true", help="only count what would change")
        if op == "delete":
            p.add_argument("--bypass-governance", action="store_true",
                           help="delete under GOVERNANCE retention (needs the permission; audited)")
        if op == "delete":
            p.add_argument("--reason", help="why (required with --bypass-governance; audited)")
        if op == "bounce":
            p.add_argument("--reason", help="kept with each recipient it bounces, for the DSN (default: "
                                            "'bounced by the operator')")
        p.set_defaults(func=cmd_bulk, command=op)

    ver = sub.add_parser("verify", help="full check of a store: record CRCs, decryption, state vs log, audit chain")
    add_target_args(ver)
    ver.add_argument("--no-replay", action="store_true", help="skip rebuilding the state from the log to compare")
    ver.add_argument("--scratch", help="directory for the replay's scratch store, and for the consistent copy "
                     "of a store in use that is verified (default: the temp dir)")
    ver.set_defaults(func=cmd_verify)

    rep = sub.add_parser("repair", help="fetch good copies of damaged records from peers; rebuild state tables")
    add_target_args(rep)
    rep.add_argument("--index", type=log_index, action="append", help="a log index to repair (repeatable)")
    rep.add_argument("--no-scan", action="store_true", help="only the quarantined and --index records (no full scan)")
    rep.add_argument("--peer", action="append", help="offline: a peer's host:port (default: the node's members)")
    rep.add_argument("--rebuild-state", action="store_true",
                     help="offline: drop the state tables and apply the log again (needs the whole log)")
    rep.add_argument("--dry-run", action="store_true", help="report what would be done")
    rep.set_defaults(func=cmd_repair)

    bk = sub.add_parser("backup", help="a consistent online snapshot to a file (compressed, checksummed)")
    add_target_args(bk)
    bk.add_argument("--out", required=True, help="the backup file to write (never overwritten)")
    bk.add_argument("--no-wait", action="store_true",
                    help="--server: copy the node as it is (default: first wait until it applied the leader's commit)")
    bk.add_argument("--wait", type=wait_seconds, default=30.0,
                    help="seconds to wait for the node to catch up (default 30)")
    bk.set_defaults(func=cmd_backup)

    rs = sub.add_parser("restore", help="restore a backup into a new directory (and verify it)")
    rs.add_argument("--in", dest="input", required=True, help="the backup file")
    rs.add_argument("--data-dir", help="the new store directory (must hold no store)")
    rs.add_argument("--config", help="a new node's config: restore into its data_dir (with --cluster-id: seed)")
    rs.add_argument("--cluster-id", help="seed a NEW cluster from the backup, with the --config node as only voter")
    rs.add_argument("--key-file", help="the store's KEK, to verify (default: the config's, or <data-dir>/kek.key)")
    rs.add_argument("--no-verify", action="store_true", help="skip verifying the restored store")
    rs.add_argument("--json", action="store_true", help="machine-readable output")
    rs.set_defaults(func=cmd_restore)

    rc = sub.add_parser("recover", help="rebuild a lost node from its peers under a new node id; or, "
                        "after losing a majority, --force-new-cluster on a survivor (explicit, recorded)")
    rc.add_argument("--config", required=True,
                    help="the new node's config (or, with --force-new-cluster, the survivor's)")
    rc.add_argument("--server", default=None, type=server_arg,
                    help=f"the surviving cluster (any node; default ${SERVER_ENV})")
    rc.add_argument("--timeout", type=float, default=15.0, help="seconds per call")
    rc.add_argument("--replace", type=node_id, help="the failed node's id: removed once the new node is a voter")
    rc.add_argument("--wait", type=wait_seconds, default=600.0, help="seconds to wait for each step (default 600)")
    rc.add_argument("--force-new-cluster", action="store_true",
                    help="majority lost: make this stopped survivor the only member (never automatic)")
    rc.add_argument(FORCE_FLAG, dest="confirm", action="store_true", help="confirm --force-new-cluster")
    rc.add_argument("--reason", help="why (recorded with --force-new-cluster)")
    rc.add_argument("--json", action="store_true", help="machine-readable output")
    rc.set_defaults(func=cmd_recover)

    cl = sub.add_parser("cluster", help="membership through consensus (add, promote, remove, transfer-leader) "
                        "and snapshots")
    csub = cl.add_subparsers(dest="cluster_command", required=True)
    add = csub.add_parser("add", help="add a node as a learner (prepare it with mqstore join, start it)")
    add.add_argument("--id", type=node_id, required=True)
    add.add_argument("--site", type=_config_value(check_site), required=True)
    add.add_argument("--address", type=_config_value(check_address), required=True, help="its advertised host:port")
    pro = csub.add_parser("promote", help="make a caught-up learner a voter (placement rules checked)")
    pro.add_argument("--id", type=node_id, required=True)
    rem = csub.add_parser("remove", help="remove a member (its id is never reused)")
    rem.add_argument("--id", type=node_id, required=True)
    tl = csub.add_parser("transfer-leader", help="hand leadership to a voter (default: the most up-to-date)")
    tl.add_argument("--to", type=node_id, default=0, help="a voter's node id (default: the most up-to-date)")
    snap = csub.add_parser("snapshot", help="snapshot each --server node now and compact its log behind it "
                           "(a node also does so by itself every 100,000 applied entries)")
    for p in (add, pro, rem, tl, snap):
        add_target_args(p, offline=False, timeout=600.0 if p is snap else 15.0)  # copying a store takes a while
        p.set_defaults(func=cmd_cluster)


__all__ = ["Target", "add_filter_args", "add_target_args", "client_from_args", "register"]
