"""``mqstore verify``: a full check of one store, reporting every problem with where it is.

Phases (each reports progress):

``records``   every log record: CRC32C, framing, its index, none missing inside the log's bounds;
``decrypt``   every sealed record opens (AES-GCM tag, decompression, envelope) — messages,
              dictionaries, the sealed reasons of defers and bounces — and key events decode;
``state``     the state tables agree with each other and with the log: every message row points at
              the ENQUEUE record of that message, its recipient rows match the envelope and the
              row's counts, each index (ready, ready_dom, live, msg_ns, expiry, retention, leases,
              lease_due) holds exactly what the rows imply, and the stats counters add up;
``replay``    when the log still holds every entry since the store began (no compaction yet), the
              state tables are rebuilt from the log in a scratch directory and compared table by
              table, key by key;
``audit``     the compliance audit chain, when the store has one; and the compliance state the
              audit records derive (each message's lock mode and end and legal holds, each
              namespace's policy) against the ``messages``, ``holds`` and ``policies`` tables —
              on a compacted store too, where the replay cannot run.

The store is read in read-only mode; nothing is written to it. A store in use (a running node or
embedded store, its writer appending) is verified on a consistent copy of it, taken in one read
transaction (see :func:`verify_path`).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mqstore import codec
from mqstore.codec import Flags, Record, RecordType
from mqstore.compliance.rules import Ctx
from mqstore.crypto.keyring import split_key_record
from mqstore.errors import Corruption, MQStoreError
from mqstore.ids import format_id
from mqstore.ops.facts import META_RESTORED_FROM, STATE_TABLES, open_env, writer_running
from mqstore.ops.scratch import owned_temporary, remove_unowned
from mqstore.queue import machine
from mqstore.queue.kv import LmdbKV, prefix_end
from mqstore.queue.model import (
    FINAL,
    LEASED,
    STATE_NAMES,
    U64,
    WAITING,
    LeaseRow,
    MessageRow,
    Policy,
    RecipientRow,
    domain_of,
    mid_ord,
    ns_key,
    ready_dom_key,
    ready_key,
    time_key,
)
from mqstore.store import LogStore, WriteContext
from mqstore.store.log import DEFAULT_KEY_FILE

PROBLEMS_LISTED_MAX = 10_000  # problems reported word for word (the rest are counted)
_CHUNK = 4096
_U64 = struct.Struct(">Q")

PhaseProgress = Callable[[str, int, int], None]


@dataclass(slots=True)
class VerifyReport:
    records_checked: int = 0
    first_index: int = 0
    last_index: int = 0
    applied_index: int = 0
    messages_checked: int = 0
    sealed_checked: int = 0
    replayed: bool = False
    replay_note: str = ""
    audit: dict[str, Any] | None = None
    problems: list[dict[str, Any]] = field(default_factory=list)
    problems_total: int = 0
    by_check: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    #: The store was in use (its writer running): a consistent copy of it was verified.
    consistent_copy: bool = False

    @property
    def clean(self) -> bool:
        return self.problems_total == 0

    def add(self, check: str, problem: str, *, index: int | None = None, table: str | None = None,
            key: bytes | None = None, message_id: bytes | None = None) -> None:
        self.problems_total += 1
        self.by_check[check] += 1
        if len(self.problems) >= PROBLEMS_LISTED_MAX:
            return
        item: dict[str, Any] = {"check": check, "problem": problem, "index": index}
        if table is not None:
            item["table"] = table
        if key is not None:
            item["key"] = key.hex()
        if message_id is not None:
            item["message_id"] = format_id(message_id)
        self.problems.append(item)

    def to_dict(self) -> dict[str, Any]:
        return {
            "clean": self.clean,
            "records_checked": self.records_checked,
            "first_index": self.first_index,
            "last_index": self.last_index,
            "applied_index": self.applied_index,
            "messages_checked": self.messages_checked,
            "sealed_checked": self.sealed_checked,
            "replayed": self.replayed,
            "replay_note": self.replay_note,
            "audit": self.audit,
            "problems_total": self.problems_total,
            "problems_by_check": dict(self.by_check),
            "problems": list(self.problems),
            "consistent_copy": self.consistent_copy,
        }

    def lines(self) -> list[str]:
        out = ["the store is in use (its writer is running): verified a consistent copy of it, taken in one read "
               "transaction"] if self.consistent_copy else []
        out += [f"{self.records_checked} records checked (log {self.first_index}..{self.last_index}, "
               f"applied {self.applied_index}); {self.sealed_checked} sealed records opened; "
               f"{self.messages_checked} messages checked against the log"]
        out.append("replay: " + ("state tables rebuilt from the log and compared" if self.replayed
                                 else f"not done: {self.replay_note}"))
        if self.audit is not None:
            out.append("audit chain: " + ("ok" if self.audit.get("ok") else "PROBLEMS")
                       + (f" ({self.audit.get('records_checked', 0)} records)" if "records_checked" in self.audit
                          else f" ({self.audit.get('note', '')})"))
        for p in self.problems:
            where = f"log index {p['index']}" if p.get("index") is not None else "-"
            extra = "".join(f" {k}={p[k]}" for k in ("table", "message_id", "key") if k in p)
            out.append(f"[{p['check']}] {where}: {p['problem']}{extra}")
        if self.problems_total > len(self.problems):
            out.append(f"... and {self.problems_total - len(self.problems)} more problem(s)")
        out.append("clean" if self.clean else f"NOT CLEAN: {self.problems_total} problem(s) "
                   + ", ".join(f"{k} {v}" for k, v in sorted(self.by_check.items())))
        return out


@dataclass(slots=True)
class _Sealed:
    """What the log says about a message: from its ENQUEUE record."""

    mid: bytes
    namespace: str
    domains: tuple[str, ...]
    size: int


def _raw_records(log: LogStore) -> Iterator[list[tuple[int, bytes]]]:
    """Every stored record (including message bodies kept below the compaction point), in chunks,
    each chunk from its own short read transaction."""
    db = log.env.dbs[b"log"]
    position: bytes | None = None
    while True:
        chunk: list[tuple[int, bytes]] = []
        with log.env.read() as txn, txn.cursor(db=db) as cur:
            ok = cur.set_range(position) if position is not None else cur.first()
            if ok and position is not None and bytes(cur.key()) == position:
                ok = cur.next()
            while ok and len(chunk) < _CHUNK:
                chunk.append((int(_U64.unpack(bytes(cur.key()))[0]), bytes(cur.value())))
                ok = cur.next()
        if not chunk:
            return
        yield chunk
        position = _U64.pack(chunk[-1][0])
        if len(chunk) < _CHUNK:
            return


def applied_index_of(log: LogStore) -> int:
    """The last log index the state tables hold: a node's applied index; every record of an
    embedded store (it applies each record in the commit that appends it)."""
    raw = log.meta_get(b"raft.applied")
    return int(_U64.unpack(raw)[0]) if raw else log.last_index


def _is_node_log(log: LogStore) -> bool:
    return log.meta_get(b"raft.applied") is not None or log.meta_get(b"raft.hard_state") is not None


def _restored_from_node(log: LogStore) -> bool:
    """Whether this store was restored from a node's backup (its log numbering is the node's)."""
    raw = log.meta_get(META_RESTORED_FROM)
    try:
        source = json.loads(raw).get("source", {}) if raw else {}
    except (ValueError, AttributeError):
        return False
    return isinstance(source, dict) and source.get("kind") == "node"


def stale_applied_problem(log: LogStore) -> str | None:
    """Why the applied index this store records cannot be trusted (None: it can). A store that
    is no cluster node, yet records a node's applied index below its last index, was restored
    from a node's backup by an earlier mqstore and then written to as an embedded store (which
    never advances that index): the state tables then hold entries past it, and which ones is not
    known, so neither replaying up to it nor beyond it gives its state."""
    raw = log.meta_get(b"raft.applied")
    if raw is None or log.meta_get(b"node.id") is not None:
        return None
    applied = int(_U64.unpack(raw)[0])
    if log.last_index <= applied:
        return None
    return (f"this store is no cluster node, but it records a node's applied index {applied} while its log runs "
            f"to {log.last_index} (a node's backup restored by an earlier mqstore, then written to as an "
            "embedded store?): which log entries its state tables hold is not known, so the state cannot be "
            "derived from the log")


def replay_problem(log: LogStore) -> str | None:
    """Why the state tables cannot be rebuilt from this store's log (None: they can)."""
    stale = stale_applied_problem(log)
    if stale is not None:
        return stale
    first = log.first_index
    if _is_node_log(log) or _restored_from_node(log):
        # A node's log starts at 2 (index 1 is the bootstrap configuration); a node that installed
        # a snapshot, or compacted after its own, starts later. So does a store restored from a
        # node's backup.
        if first > 2:
            return (f"the log starts at index {first}: entries up to {first - 1} were compacted into a snapshot, "
                    "so the state cannot be derived from the log alone")
        return None
    if first > 1:
        return (f"the log starts at index {first}: records up to {first - 1} were compacted away "
                "(finished messages), so the state cannot be derived from the log alone")
    return None


def _check_sealed(log: LogStore, report: VerifyReport, record: Record, seen: dict[int, _Sealed]) -> None:
    rtype = record.type
    try:
        if rtype == RecordType.ENQUEUE:
            stored = log.open_message(record)
            env = stored.envelope
            seen[record.index] = _Sealed(env.message_id, env.namespace, tuple(domain_of(a) for a in env.recipients),
                                         len(stored.data))
            report.sealed_checked += 1
        elif rtype == RecordType.DICTIONARY:
            log.sealer.open(record)
            report.sealed_checked += 1
        elif rtype == RecordType.KEY:
            _, context = split_key_record(record.payload)  # the event, then the request's context
            if context:
                Ctx.decode(context)
        elif rtype in (RecordType.DEFER, RecordType.BOUNCE, RecordType.BOUNCE_MESSAGE):
            entry: Any = machine.decode_entry(rtype, record.payload)
            blob = entry.reason
            if blob:
                (key_id,) = struct.unpack_from("<I", blob)
                log.sealer.open(Record(RecordType.DEFER, int(Flags.ENCRYPTED), 0, 0, key_id, 0, blob[4:]))
                report.sealed_checked += 1
        elif rtype not in machine.PASSIVE_TYPES:
            machine.decode_entry(rtype, record.payload)
    except MQStoreError as exc:
        what = "cannot be opened" if rtype in (RecordType.ENQUEUE, RecordType.DICTIONARY) else "does not decode"
        report.add("decrypt", f"{RecordType(rtype).name} record {what}: {exc}", index=record.index)
    except AssertionError as exc:  # a record type the queue does not know
        report.add("decrypt", f"record of type {rtype} does not decode: {exc}", index=record.index)


def _check_records(log: LogStore, report: VerifyReport, progress: PhaseProgress) -> dict[int, _Sealed]:
    first, last = log.first_index, log.last_index
    report.first_index, report.last_index = first, last
    total = max(0, last - first + 1)
    expected = first
    seen: dict[int, _Sealed] = {}
    for chunk in _raw_records(log):
        for index, raw in chunk:
            if index >= first:
                while expected < index and expected <= last:
                    report.add("records", "record missing from the log", index=expected)
                    expected += 1
                expected = max(expected, index + 1)
            report.records_checked += 1
            try:
                record = codec.decode_record(raw, index)
            except Corruption as exc:
                report.add("records", exc.reason, index=index)
                continue
            _check_sealed(log, report, record, seen)
        progress("records", min(report.records_checked, total), total)
    while expected <= last:
        report.add("records", "record missing from the log", index=expected)
        expected += 1
    return seen


def _check_state(log: LogStore, report: VerifyReport, seen: dict[int, _Sealed], progress: PhaseProgress) -> None:
    """Rows against the log and each index against the rows, in one read transaction."""
    with log.env.read() as txn:
        kv = LmdbKV(txn, log.env.dbs)
        total = txn.stat(log.env.dbs[b"messages"])["entries"]
        stats: dict[tuple[str, str], int] = defaultdict(int)
        expect = {name: 0 for name in ("ready", "ready_dom", "live", "msg_ns", "retention", "leases_rcpts",
                                       "rcpts_undecodable")}
        done = 0
        for mid, value in kv.scan(b"messages", b""):
            done += 1
            if done % _CHUNK == 0:
                progress("state", done, total)
            report.messages_checked += 1
            try:
                row = MessageRow.decode(value)
            except Corruption as exc:
                report.add("state", f"message row does not decode: {exc.reason}", table="messages", message_id=mid)
                continue
            _check_message(kv, report, mid, row, seen, stats, expect)
        progress("state", done, total)
        _check_indexes(kv, report, expect)
        # Recipients whose rows do not decode have no known state: the counters of their
        # namespaces' states and the lease count cannot be checked against the rows.
        _check_stats(kv, report, stats, states_known=not expect["rcpts_undecodable"])


def retention_entry(kv: LmdbKV, mid: bytes, row: MessageRow) -> bytes | None:
    """The retention index key the finished message ``mid`` must have, by the state machine's own
    rule (None: it must have none, a legal hold keeps it out of the index)."""
    return machine.retention_key(kv, mid, row)


def _recipients(
    kv: LmdbKV, report: VerifyReport, mid: bytes, index: int
) -> tuple[list[tuple[int, RecipientRow]], list[int]]:
    """The recipient rows of ``mid`` that decode, and the ordinals of those that do not (each
    reported where it is)."""
    rows: list[tuple[int, RecipientRow]] = []
    undecodable: list[int] = []
    for key, value in kv.scan(b"recipients", mid, prefix_end(mid)):
        ordinal = int.from_bytes(key[16:18], "big")
        try:
            rows.append((ordinal, RecipientRow.decode(value)))
        except Corruption as exc:
            undecodable.append(ordinal)
            report.add("state", f"recipient {ordinal}: row does not decode: {exc.reason}", index=index,
                       table="recipients", key=key, message_id=mid)
    return rows, undecodable


def _check_message(
    kv: LmdbKV, report: VerifyReport, mid: bytes, row: MessageRow, seen: dict[int, _Sealed],
    stats: dict[tuple[str, str], int], expect: dict[str, int],
) -> None:
    idx = row.enqueue_index
    sealed = seen.get(idx)

    def bad(problem: str, table: str = "messages") -> None:
        report.add("state", problem, index=idx, table=table, message_id=mid)

    if sealed is None:
        bad(f"its ENQUEUE record (index {idx}) is missing, damaged or not a message")
    elif sealed.mid != mid:
        bad(f"its ENQUEUE record (index {idx}) holds message {format_id(sealed.mid)}")
        sealed = None
    elif sealed.namespace != row.namespace:
        bad(f"namespace {row.namespace!r} differs from the envelope's {sealed.namespace!r}")
    if sealed is not None and sealed.size != row.size_bytes:
        bad(f"size {row.size_bytes} differs from the stored body's {sealed.size}")
    ns = row.namespace
    rcpts, undecodable = _recipients(kv, report, mid, idx)
    ordinals = sorted([o for o, _ in rcpts] + undecodable)
    if len(ordinals) != row.n_rcpts or ordinals != list(range(row.n_rcpts)):
        bad(f"{len(ordinals)} recipient rows for {row.n_rcpts} recipients", "recipients")
    if sealed is not None and len(sealed.domains) != row.n_rcpts:
        bad(f"{row.n_rcpts} recipients in the row, {len(sealed.domains)} in the envelope")
    counts = [0] * 6
    ns0 = ns_key(ns)
    for ordinal, r in rcpts:
        if not 1 <= r.state <= 6:
            bad(f"recipient {ordinal} has unknown state {r.state}", "recipients")
            continue
        counts[r.state - 1] += 1
        stats[(ns, STATE_NAMES[r.state])] += 1
        if sealed is not None and ordinal < len(sealed.domains) and r.domain != sealed.domains[ordinal]:
            bad(f"recipient {ordinal}: domain {r.domain!r} differs from the envelope's", "recipients")
        in_ready = kv.get(b"ready", ready_key(ns0, row.priority, r.due_ms, mid, ordinal)) is not None
        in_dom = kv.get(b"ready_dom", ready_dom_key(ns0, r.domain, row.priority, r.due_ms, mid, ordinal)) is not None
        should = r.state in WAITING and not row.held
        if should:
            expect["ready"] += 1
            expect["ready_dom"] += 1
        if in_ready != should:
            bad(f"recipient {ordinal} ({STATE_NAMES[r.state]}{', held' if row.held else ''}) is "
                f"{'in' if in_ready else 'missing from'} the ready index", "ready")
        if in_dom != should:
            bad(f"recipient {ordinal} is {'in' if in_dom else 'missing from'} the by-domain ready index", "ready_dom")
        if r.state == LEASED:
            raw = kv.get(b"leases", U64.pack(r.token))
            try:
                lease = LeaseRow.decode(raw) if raw is not None else None
            except Corruption:
                continue  # reported by the pass over the leases table
            if lease is None or lease.mid != mid or ordinal not in lease.ordinals:
                bad(f"recipient {ordinal} is leased under token {r.token}, which holds no such lease", "leases")
            else:
                expect["leases_rcpts"] += 1
        elif r.state in FINAL and r.token:
            bad(f"recipient {ordinal} is {STATE_NAMES[r.state]} but still names lease {r.token}", "recipients")
    if undecodable:
        # The states of recipients whose rows do not decode are not known: no count to compare.
        expect["rcpts_undecodable"] += len(undecodable)
    elif counts != list(row.counts):
        bad(f"per-state counts {list(row.counts)} differ from its recipients' states {counts}")
    expect["msg_ns"] += 1
    if kv.get(b"msg_ns", ns0 + mid) is None:
        bad("missing from the by-namespace index", "msg_ns")
    finished_by_counts = sum(counts[s - 1] for s in FINAL) == row.n_rcpts
    if row.finished != finished_by_counts and rcpts and not undecodable:
        bad("finished flag disagrees with its recipients' states")
    live = kv.get(b"live", mid) is not None
    if live == row.finished:
        bad("in the live index though finished" if live else "missing from the live index though unfinished", "live")
    if row.finished:
        key = retention_entry(kv, mid, row)
        if key is not None:  # (held: an entry of it is a stray, named by _check_indexes)
            if kv.get(b"retention", key) is not None:
                expect["retention"] += 1
            else:
                bad("finished but missing from the retention index", "retention")
    else:
        expect["live"] += 1
        stats[(ns, "messages.live")] += 1
        # An unfinished message with a lifetime is in the expiry index until its expiry is applied;
        # that turns every waiting recipient (held ones too) into an expired one, and none waits
        # again after it (a leased one settles as expired). So while one waits, the entry is due.
        waiting = any(r.state in WAITING for _, r in rcpts)
        if row.expires_at_ms and waiting and kv.get(b"expiry", time_key(row.expires_at_ms, mid)) is None:
            bad("unfinished, with recipients waiting, but missing from the expiry index (it would never expire)",
                "expiry")
    stats[(ns, "messages.stored")] += 1
    stats[(ns, "bytes")] += row.size_bytes


def _check_indexes(kv: LmdbKV, report: VerifyReport, expect: dict[str, int]) -> None:
    """Entries of each index that no row accounts for (the per-row pass found the missing ones)."""

    def stray(table: str, key: bytes, mid: bytes | None, problem: str) -> None:
        report.add("state", problem, table=table, key=key, message_id=mid)

    def message(mid: bytes) -> MessageRow | None:
        raw = kv.get(b"messages", mid)
        try:
            return None if raw is None else MessageRow.decode(raw)
        except Corruption:
            return None

    for table in ("ready", "ready_dom"):
        count = 0
        for _ in kv.scan(table.encode(), b""):
            count += 1
            if count > expect[table]:
                break
        if count > expect[table]:
            # Find the strays: entries whose recipient is not waiting at that due time.
            for key, _ in kv.scan(table.encode(), b""):
                rest = key.partition(b"\x00")[2]
                if table == "ready_dom":
                    _, _, rest = rest.partition(b"\x00")
                mid, ordinal, due = rest[9:25], int.from_bytes(rest[25:27], "big"), U64.unpack(rest[1:9])[0]
                raw = kv.get(b"recipients", mid_ord(mid, ordinal))
                try:
                    r = RecipientRow.decode(raw) if raw is not None else None
                except Corruption:
                    continue  # the row is reported with its message; this entry cannot be judged
                row = message(mid)
                if r is None or row is None or r.state not in WAITING or row.held or r.due_ms != due:
                    stray(table, key, mid, "index entry for a recipient that is not waiting (or another due time)")
    for table, expected_key in (("live", "live"), ("msg_ns", "msg_ns"), ("retention", "retention")):
        count = sum(1 for _ in kv.scan(table.encode(), b""))
        if count > expect[expected_key]:
            for key, _ in kv.scan(table.encode(), b""):
                mid = key[-16:]
                row = message(mid)
                if row is None:
                    stray(table, key, mid, "index entry for a message that does not exist")
                elif table == "live" and row.finished:
                    stray(table, key, mid, "live index entry for a finished message")
                elif table == "retention" and (not row.finished or retention_entry(kv, mid, row) != key):
                    stray(table, key, mid, "retention entry that does not match the message")
    for key, _ in kv.scan(b"expiry", b""):
        mid = key[8:24]
        row = message(mid)
        if row is None or row.finished or not row.expires_at_ms or key[:8] != U64.pack(row.expires_at_ms):
            stray("expiry", key, mid, "expiry entry that does not match an unfinished message")
    leases = 0
    undecodable = 0
    for key, value in kv.scan(b"leases", b""):
        try:
            lease = LeaseRow.decode(value)
        except Corruption as exc:
            undecodable += 1
            report.add("state", f"lease {U64.unpack(key)[0] if len(key) == 8 else '?'}: row does not decode: "
                       f"{exc.reason}", table="leases", key=key)
            continue
        leases += len(lease.ordinals)
        if kv.get(b"lease_due", time_key(lease.deadline_ms, key)) is None:
            stray("leases", key, lease.mid, f"lease {U64.unpack(key)[0]} has no deadline entry")
    for key, _ in kv.scan(b"lease_due", b""):
        if kv.get(b"leases", key[8:16]) is None:
            stray("lease_due", key, None, f"deadline entry for lease {U64.unpack(key[8:16])[0]}, which does not exist")
    if leases != expect["leases_rcpts"] and not undecodable and not expect["rcpts_undecodable"]:
        report.add("state", f"leases hold {leases} recipient(s); {expect['leases_rcpts']} recipients are leased",
                   table="leases")


def _check_stats(kv: LmdbKV, report: VerifyReport, stats: dict[tuple[str, str], int], *,
                 states_known: bool = True) -> None:
    stored = machine.read_stats(kv)
    names = [*(STATE_NAMES.values() if states_known else ()), "messages.live", "messages.stored", "bytes"]
    for ns in sorted(set(stored) | {n for n, _ in stats}):
        for name in names:
            have = stored.get(ns, {}).get(name, 0)
            want = stats.get((ns, name), 0)
            if have != want:
                report.add("state", f"namespace {ns!r}: counter {name} is {have}, the rows add up to {want}",
                           table="stats")


# --- replay ------------------------------------------------------------------------------------------


def applier_for(log: LogStore) -> Any:
    """The node's applier over ``log``: the one function that applies a committed log record to
    the state tables (the embedded store applies the same records with the same machine)."""
    from mqstore.node.replica import Applier

    return Applier(log)


def replay_chunk(applier: Any, ctx: WriteContext, records: list[Record]) -> int:
    """Apply ``records`` (in order) inside the write transaction ``ctx``; returns how many."""
    from mqstore.node.raftlog import record_to_entry

    applier.apply(ctx, [record_to_entry(r) for r in records])
    return len(records)


def _iter_log(log: LogStore, lo: int, hi: int) -> Iterator[list[Record]]:
    index = lo
    while index <= hi:
        batch = log.read_range(index, min(index + _CHUNK, hi + 1))
        yield batch
        index = batch[-1].index + 1


@contextlib.contextmanager
def _scratch(prefix: str, parent: Path | None) -> Iterator[Path]:
    """A new directory ``<prefix>XXXXXXXX`` under ``parent`` (default: the temp dir), locked by
    this run and removed afterwards. One of the same prefix that no running verify holds was left
    by a verify that was killed (a store copy each: they would fill the disk): removed first, and
    named on stderr."""
    where = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    for old in remove_unowned(where, (prefix,)):
        print(f"mqstore: removed {old}, left by a verify that was killed", file=sys.stderr)
    with owned_temporary(where, prefix, directory=True) as (path, _fd):
        yield path


def _replay_and_compare(
    log: LogStore, report: VerifyReport, applied: int, scratch_parent: Path | None, progress: PhaseProgress
) -> None:
    """Apply the whole log again into a scratch store (same key), then compare state tables."""
    with _scratch("mqstore-verify-replay-", scratch_parent) as tmp:
        scratch = LogStore(tmp / "store", key_provider=log.keyring.provider)
        try:
            applier = applier_for(scratch)
            first = log.first_index
            total = max(0, applied - first + 1)
            done = 0
            for batch in _iter_log(log, first, applied):

                def apply(ctx: WriteContext, batch: list[Record] = batch) -> int:
                    return replay_chunk(applier, ctx, batch)

                done += scratch.write(apply)
                progress("replay", done, total)
            with log.env.read() as txn, scratch.env.read() as stxn:
                for name in STATE_TABLES:
                    if name in log.env.dbs:
                        _compare_table(report, name, txn, log.env.dbs[name], stxn, scratch.env.dbs[name])
            report.replayed = True
        finally:
            scratch.close()


_ZERO_COUNTER = (0).to_bytes(8, "little", signed=True)


def _compare_table(report: VerifyReport, name: bytes, txn: Any, db: Any, scratch: Any, sdb: Any) -> None:
    """Report every key whose presence or value differs. A stats counter that is zero counts as
    absent: whether a zero is stored depends on how writes were grouped into transactions."""
    table = name.decode()
    zero = _ZERO_COUNTER if name == b"stats" else None
    with txn.cursor(db=db) as a, scratch.cursor(db=sdb) as b:
        ok_a, ok_b = a.first(), b.first()
        while ok_a or ok_b:
            ka = bytes(a.key()) if ok_a else None
            kb = bytes(b.key()) if ok_b else None
            if kb is None or (ka is not None and ka < kb):
                assert ka is not None
                problem = "present in the store but not derived from the log"
                skip = bytes(a.value()) == zero
                ok_a = a.next()
                key = ka
                if skip:
                    continue
            elif ka is None or kb < ka:
                problem = "derived from the log but missing from the store"
                skip = bytes(b.value()) == zero
                ok_b = b.next()
                key = kb
                if skip:
                    continue
            else:
                same = bytes(a.value()) == bytes(b.value())
                ok_a, ok_b = a.next(), b.next()
                if same:
                    continue
                problem = "value differs from the one derived from the log"
                key = ka
            report.add("replay", problem, table=table, key=key)


def verify_store(
    log: LogStore,
    *,
    progress: PhaseProgress | None = None,
    replay: bool = True,
    scratch_dir: Path | None = None,
    audit_public_key: Any = None,
) -> VerifyReport:
    """Run every check on ``log`` (open it read-only, with its key) and return the report.

    ``audit_public_key`` (the Ed25519 public key of the audit signing key) checks the audit
    checkpoints' signatures; without it an unsigned checkpoint is a problem and signed ones go
    unchecked (a note says so)."""
    report = VerifyReport()
    prog = progress or (lambda phase, done, total: None)
    applied = applied_index_of(log)
    report.applied_index = applied
    seen = _check_records(log, report, prog)
    _check_state(log, report, seen, prog)
    seen.clear()
    why = replay_problem(log)
    stale = stale_applied_problem(log)
    if stale is not None:
        report.add("replay", stale, index=applied)
    if not replay:
        report.replay_note = "skipped (--no-replay)"
    elif stale is not None:
        report.replay_note = "the applied index this store records cannot be trusted (see the problem below)"
    elif why is not None:
        report.replay_note = why
    elif report.by_check.get("records"):
        report.replay_note = "skipped: damaged records must be repaired first"
    else:
        try:
            _replay_and_compare(log, report, applied, scratch_dir, prog)
        except MQStoreError as exc:
            report.replay_note = f"failed: {exc}"
            report.add("replay", f"replaying the log failed: {exc}", index=getattr(exc, "index", None))
    _check_audit(log, report, prog, audit_public_key)
    return report


def _check_audit(log: LogStore, report: VerifyReport, progress: PhaseProgress, public_key: Any) -> None:
    if b"audit" not in log.env.dbs:
        report.audit = {"note": "this store has no audit log"}
        return
    try:
        from mqstore.compliance import audit
    except ImportError:  # pragma: no cover - compliance is part of mqstore
        report.audit = {"note": "audit verification is not available"}
        return
    with log.env.read() as txn:
        kv = LmdbKV(txn, log.env.dbs)
        result = audit.verify(kv, public_key, progress=lambda done, total: progress("audit", done, total),
                              require_signed=True)
        report.audit = result.to_dict()
        for text in result.problems:
            report.add("audit", text, index=None)
        if result.problems_omitted:
            report.problems_total += result.problems_omitted
            report.by_check["audit"] += result.problems_omitted
        if result.fold is not None:
            _check_compliance_state(kv, report, result.fold)


def _check_compliance_state(kv: LmdbKV, report: VerifyReport, fold: Any) -> None:
    """The locks, legal holds and policies the audit records derive (``fold``, see
    :class:`mqstore.compliance.audit.ComplianceFold`) against the state tables. The audit log is
    signed and never compacted, so this holds on a compacted store too, where the replay cannot
    run: a legal hold's row deleted, a lock shortened or its mode changed in a message's row, a
    policy row edited — behind mqstore's back — is named with its message or namespace."""
    from mqstore.compliance.audit import POLICY_FIELDS, describe_lock, lock_difference
    from mqstore.compliance.rules import Mode

    messages = fold.messages
    for mid, lock in messages.items():
        raw = kv.get(b"messages", mid)
        if raw is None:
            report.add("compliance", f"the audit log records no removal of this message, but its row is gone; by "
                       f"the audit records it is locked ({describe_lock(*lock.fields())})", table="messages",
                       message_id=mid)
            continue
        try:
            row = MessageRow.decode(raw)
        except Corruption:
            continue  # reported by the state check
        try:
            mode = Mode(row.lock_mode).name.lower()
        except ValueError:
            mode = f"unknown ({row.lock_mode})"
        holds = tuple(sorted(machine.holds_of(kv, mid)))
        have = (mode, row.lock_until_ms, holds)
        if have != lock.fields():
            what = []
            if mode != lock.mode or row.lock_until_ms != lock.until:
                what.append("its row in `messages`")
            if holds != lock.holds:
                what.append("its legal holds (`holds`)")
            report.add("compliance", f"{' and '.join(what)} changed behind mqstore's back: the store has "
                       f"{lock_difference(have, lock.fields(), want_name='the audit records say')}",
                       table="messages" if "holds" not in what[0] else "holds", message_id=mid)
    for key, _ in kv.scan(b"holds", b""):
        mid, case = key[:16], key[16:].decode("utf-8", "replace")
        lock = messages.get(mid)
        if lock is None or case not in lock.holds:
            if lock is None and kv.get(b"messages", mid) is None:
                problem = f"a legal hold ({case}) on a message that does not exist"
            elif lock is None:
                problem = f"a legal hold ({case}) that no audit record placed"
            else:
                continue  # the message's own comparison above names it
            report.add("compliance", problem, table="holds", key=key, message_id=mid)
    policies = fold.policies
    for ns, fields in sorted(policies.items()):
        raw = kv.get(b"policies", ns.encode())
        if raw is None:
            report.add("compliance", f"namespace {ns!r}: the audit records set its policy "
                       f"({_policy_text(fields)}), but the store has none", table="policies")
            continue
        try:
            policy = Policy.decode(raw)
        except Corruption as exc:
            report.add("compliance", f"namespace {ns!r}: the policy row does not decode: {exc.reason}",
                       table="policies")
            continue
        stored = _policy_fields_of(policy)
        if stored != {name: fields.get(name) for name in POLICY_FIELDS}:
            report.add("compliance", f"namespace {ns!r}: the store's policy is {_policy_text(stored)}, the audit "
                       f"records set {_policy_text(fields)}: changed behind mqstore's back", table="policies")
    for key, _ in kv.scan(b"policies", b""):
        ns = key.decode("utf-8", "replace")
        if ns not in policies:
            report.add("compliance", f"namespace {ns!r}: a policy that no audit record set", table="policies",
                       key=key)


def _policy_fields_of(policy: Policy) -> dict[str, Any]:
    from mqstore.compliance.rules import Mode

    try:
        mode: Any = Mode(policy.mode).name.lower()
    except ValueError:
        mode = policy.mode
    return {"mode": mode, "lock_retention_ms": policy.lock_retention_ms, "lifetime_ms": policy.lifetime_ms,
            "retention_ms": policy.retention_ms}


def _policy_text(fields: dict[str, Any]) -> str:
    return ", ".join(f"{name} {fields.get(name)}" for name in ("mode", "lock_retention_ms", "lifetime_ms",
                                                               "retention_ms"))


def verify_path(
    path: Path,
    *,
    key_file: str | None = None,
    key_provider: Any = None,
    progress: PhaseProgress | None = None,
    replay: bool = True,
    scratch_dir: Path | None = None,
    audit_signing_key: str | os.PathLike[str] | None = None,
    audit_public_key: Any = None,
) -> VerifyReport:
    """Verify the store in ``path`` (stopped, or in use: a running node or embedded store),
    opened read-only.

    The audit checkpoints' signatures are checked with ``audit_public_key``, else with the key
    in ``audit_signing_key`` (a node's configured one; it must exist), else with
    ``<path>/audit-signing.key`` when there is one; with no key at all an unsigned checkpoint is
    reported as a problem (a log rewritten without the key), signed ones are noted as unchecked.

    The checks read the store in several read transactions (the records in short ones, then the
    state tables, then the replay up to the applied index): beside a running writer they would
    see different states and report a healthy store as damaged. So a store in use is verified
    on a consistent copy of it, taken in one read transaction in a new directory under
    ``scratch_dir`` (default: the temp dir) and removed afterwards; the report says so."""
    with open_env(path):  # a clear NotFound when there is no store
        in_use = writer_running(path)
    if audit_public_key is None:
        audit_public_key = _audit_public_key(path, audit_signing_key)
    if not in_use:
        return _verify_at(path, key_file=key_file, key_provider=key_provider, progress=progress, replay=replay,
                          scratch_dir=scratch_dir, audit_public_key=audit_public_key)
    with _scratch("mqstore-verify-copy-", scratch_dir) as copy:
        with open_env(path) as env:
            env.copy_to(copy)
        if key_provider is None and key_file is None:
            key_file = str(path / DEFAULT_KEY_FILE)  # the store's own default, not the copy's directory
        report = _verify_at(copy, key_file=key_file, key_provider=key_provider, progress=progress, replay=replay,
                            scratch_dir=scratch_dir, audit_public_key=audit_public_key)
        report.consistent_copy = True
        return report


def _audit_public_key(path: Path, signing_key: str | os.PathLike[str] | None) -> Any:
    """The public key of the store's audit signing key: ``signing_key`` (must be readable), else
    ``<path>/audit-signing.key`` if it exists (None when it does not)."""
    from mqstore.compliance.signing import read_signing_key
    from mqstore.ops.backup import AUDIT_KEY_FILE

    if signing_key is None:
        signing_key = path / AUDIT_KEY_FILE
        if not os.path.lexists(signing_key):
            return None
    return read_signing_key(signing_key).public_key()


def _verify_at(
    path: Path, *, key_file: str | None, key_provider: Any, progress: PhaseProgress | None, replay: bool,
    scratch_dir: Path | None, audit_public_key: Any,
) -> VerifyReport:
    if key_provider is not None:
        log = LogStore(path, key_provider=key_provider, readonly=True, create=False)
    else:
        log = LogStore(path, key_file=key_file, readonly=True, create=False)
    try:
        return verify_store(log, progress=progress, replay=replay, scratch_dir=scratch_dir,
                            audit_public_key=audit_public_key)
    finally:
        log.close()


__all__ = ["VerifyReport", "applied_index_of", "applier_for", "replay_chunk", "replay_problem",
           "stale_applied_problem", "verify_path", "verify_store"]
