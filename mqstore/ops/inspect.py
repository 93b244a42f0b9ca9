"""Reading a queue for operators: a message's history from the log, and the listing filters the
queue API does not have itself (sender, id prefix, younger than), applied over its pages.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from mqstore import codec, validate
from mqstore.codec import Flags, Record, RecordType
from mqstore.errors import Corruption, InvalidArgument, MQStoreError
from mqstore.ids import MESSAGE_ID_CHARS, format_id, id_time_ms, parse_id
from mqstore.queue import machine
from mqstore.queue.model import COMPACT_MESSAGE, EXPIRE_LEASE, EXPIRE_MESSAGE, U64
from mqstore.store import LogStore

_ID_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_HISTORY_CHUNK = 4096
_SETTLE_NAMES = {RecordType.ACK: "delivered", RecordType.DEFER: "deferred", RecordType.BOUNCE: "bounced"}
_ADMIN_NAMES = {RecordType.HOLD: "held", RecordType.RELEASE: "released", RecordType.REQUEUE: "requeued",
                RecordType.DELETE: "deleted"}


# --- history ---------------------------------------------------------------------------------------


def _open_reason(log: LogStore, blob: bytes) -> str | None:
    if not blob or len(blob) < 4:
        return None
    (key_id,) = struct.unpack_from("<I", blob)
    record = Record(RecordType.DEFER, int(Flags.ENCRYPTED), 0, 0, key_id, 0, blob[4:])
    try:
        return log.sealer.open(record).plaintext.decode("utf-8", "replace")
    except MQStoreError as exc:
        return f"<unreadable reason: {exc}>"


def message_history(log: LogStore, message_id: str, enqueue_index: int | None = None) -> dict[str, Any]:
    """Every log entry about one message, oldest first, as far back as the log still reaches.

    ``enqueue_index`` (from its state row) lets the scan start at the message's ENQUEUE record;
    without it the whole log is read. Leases are followed by token: an ack, defer, bounce or lease
    expiry names the lease, not the message."""
    mid = parse_id(message_id)
    first, last = log.first_index, log.last_index
    start = max(first, enqueue_index or first)
    events: list[dict[str, Any]] = []
    notes: list[str] = []
    recipients: tuple[str, ...] = ()
    tokens: set[int] = set()
    token_bytes: set[bytes] = set()
    if enqueue_index is not None and enqueue_index < first:
        try:
            stored = log.read_message(enqueue_index)
            recipients = stored.envelope.recipients
            events.append(_enqueued(stored.envelope, enqueue_index))
        except MQStoreError as exc:
            notes.append(f"its ENQUEUE record (index {enqueue_index}) cannot be read: {exc}")
        notes.append(f"log entries before index {first} were compacted: earlier events are not shown")

    def names(ordinals: tuple[int, ...]) -> list[str]:
        return [recipients[o] if o < len(recipients) else f"#{o}" for o in ordinals]

    db = log.env.dbs[b"log"]
    index = start
    while index <= last:
        with log.env.read() as txn, txn.cursor(db=db) as cur:
            chunk: list[tuple[int, bytes]] = []
            ok = cur.set_range(U64.pack(index))
            while ok and len(chunk) < _HISTORY_CHUNK:
                chunk.append((int(U64.unpack(bytes(cur.key()))[0]), bytes(cur.value())))
                ok = cur.next()
        if not chunk:
            break
        for i, raw in chunk:
            rtype = raw[3] if len(raw) > 3 else 0
            if rtype not in (RecordType.ENQUEUE, RecordType.EXPIRE, RecordType.COMPACT) and rtype not in _SETTLE_NAMES:
                if mid not in raw:
                    continue
            elif rtype in _SETTLE_NAMES:
                if not token_bytes or not any(t in raw for t in token_bytes):
                    continue
            elif rtype == RecordType.ENQUEUE and i != enqueue_index and enqueue_index is not None:
                continue
            try:
                record = codec.decode_record(raw, i)
            except Corruption as exc:
                notes.append(f"log index {i} is damaged ({exc.reason}): it may hold an event of this message")
                continue
            if rtype == RecordType.ENQUEUE:
                try:
                    stored = log.open_message(record)
                except MQStoreError as exc:
                    if enqueue_index == i:
                        notes.append(f"its ENQUEUE record (index {i}) cannot be read: {exc}")
                    continue
                if stored.envelope.message_id != mid:
                    continue
                recipients = stored.envelope.recipients
                events.append(_enqueued(stored.envelope, i))
                continue
            try:
                entry: Any = machine.decode_entry(rtype, record.payload)
            except (MQStoreError, AssertionError):
                continue
            event: dict[str, Any] | None = None
            if rtype == RecordType.LEASE and entry.mid == mid:
                tokens.add(i)
                token_bytes.add(struct.pack("<Q", i))
                event = {"event": "leased", "recipients": names(entry.ordinals), "worker": entry.worker,
                         "token": i, "deadline_ms": entry.deadline_ms}
            elif rtype in _SETTLE_NAMES and entry.token in tokens:
                event = {"event": _SETTLE_NAMES[RecordType(rtype)], "recipients": names(entry.ordinals),
                         "token": entry.token}
                reason = _open_reason(log, entry.reason)
                if reason:
                    event["reason"] = reason
                if entry.next_attempt_ms:
                    event["next_attempt_ms"] = list(entry.next_attempt_ms)
            elif rtype in _ADMIN_NAMES and entry.mid == mid:
                event = {"event": _ADMIN_NAMES[RecordType(rtype)]}
            elif rtype == RecordType.BOUNCE_MESSAGE and entry.mid == mid:
                # Which recipients it bounced depends on their states then (leased ones are left).
                event = {"event": "bounced by the operator"}
                reason = _open_reason(log, entry.reason)
                if reason:
                    event["reason"] = reason
            elif rtype == RecordType.EXPIRE:
                for kind, value in entry.items:
                    if kind == EXPIRE_LEASE and U64.unpack(value)[0] in tokens:
                        event = {"event": "lease expired", "token": U64.unpack(value)[0]}
                    elif kind == EXPIRE_MESSAGE and value == mid:
                        event = {"event": "lifetime expired"}
            elif rtype == RecordType.COMPACT:
                if any(kind == COMPACT_MESSAGE and value == mid for kind, value in entry.items):
                    event = {"event": "removed after retention"}
            elif getattr(entry, "mid", None) == mid:
                event = {"event": RecordType(rtype).name.lower().replace("_", " ")}
            if event is not None:
                event = {"index": i, "time_ms": getattr(entry, "now_ms", 0), **event}
                actor = getattr(getattr(entry, "ctx", None), "actor", None)
                if actor:
                    event["actor"] = str(getattr(actor, "name", actor))
                events.append(event)
        index = chunk[-1][0] + 1
    return {"message_id": format_id(mid), "from_index": start, "to_index": last, "events": events, "notes": notes}


def _enqueued(env: codec.Envelope, index: int) -> dict[str, Any]:
    return {"index": index, "time_ms": env.created_at_ms, "event": "enqueued", "recipients": list(env.recipients),
            "namespace": env.namespace}


# --- qshape by state ---------------------------------------------------------------------------------

SHAPE_STATES = ("queued", "deferred", "held")


def qshape_by_state(log: LogStore, namespace: str | None, state: str, now_ms: int) -> dict[str, Any]:
    """Like the queue's ``qshape`` but for one kind of waiting recipient (Postfix's ``qshape
    deferred``): ``queued`` or ``deferred`` recipients that are due or waiting, or the waiting
    recipients of ``held`` messages. Returns buckets (minutes), totals and counts per domain."""
    import itertools

    from mqstore.api import QSHAPE_BUCKETS_MIN
    from mqstore.queue.kv import LmdbKV, prefix_end
    from mqstore.queue.model import STATE_BY_NAME, WAITING, MessageRow, RecipientRow, ns_key

    if state not in SHAPE_STATES:
        raise InvalidArgument(f"state must be one of {list(SHAPE_STATES)}, not {state!r}")
    if namespace is not None:  # as the queue's qshape: a name no message can have is an error, not "none"
        validate.namespace(namespace)
    labels = [*(f"{a}-{b}" for a, b in itertools.pairwise(QSHAPE_BUCKETS_MIN)), f"{QSHAPE_BUCKETS_MIN[-1]}+"]
    n = len(labels)
    domains: dict[str, list[int]] = {}
    total = [0] * n

    def count(mid: bytes, domain: str) -> None:
        age_min = max(0, now_ms - id_time_ms(mid)) / 60_000
        bucket = next((i for i in range(n - 1) if age_min < QSHAPE_BUCKETS_MIN[i + 1]), n - 1)
        domains.setdefault(domain, [0] * n)[bucket] += 1
        total[bucket] += 1

    wanted_ns = None if namespace is None else namespace
    with log.env.read() as txn:
        kv = LmdbKV(txn, log.env.dbs)
        if state == "held":
            for mid, _ in kv.scan(b"live", b""):
                raw = kv.get(b"messages", mid)
                row = MessageRow.decode(raw) if raw is not None else None
                if row is None or not row.held or (wanted_ns is not None and row.namespace != wanted_ns):
                    continue
                for _, r in machine.recipients_of(kv, mid):
                    if r.state in WAITING:
                        count(mid, r.domain)
        else:
            code = STATE_BY_NAME[state]
            spaces = [namespace] if namespace is not None else machine.namespaces(kv)
            for ns in spaces:
                prefix = ns_key(ns)
                for key, value in kv.scan(b"ready", prefix, prefix_end(prefix)):
                    rest = key[len(prefix):]
                    raw = kv.get(b"recipients", rest[9:27])
                    if raw is not None and RecipientRow.decode(raw).state == code:
                        count(rest[9:25], value.decode())
    ordered = sorted(domains.items(), key=lambda kv: (-sum(kv[1]), kv[0]))
    return {"buckets": labels, "total": total, "domains": dict(ordered), "state": state}


# --- listing filters -------------------------------------------------------------------------------


class Lister(Protocol):
    """What both the embedded API and the client offer for listing."""

    def list(
        self,
        state: str | None = None,
        namespace: str | None = None,
        domain: str | None = None,
        older_than: float | None = None,
        limit: int = 1000,
        after: str | None = None,
    ) -> Any: ...


@dataclass(frozen=True, slots=True)
class Filter:
    """Which messages a listing or a bulk change selects. ``state``, ``namespace``, ``domain`` and
    ``older_than`` are the queue API's own filters; ``id_prefix`` and ``newer_than`` narrow the id
    range scanned (ids are time-ordered); ``sender`` needs each message's envelope (decrypted on
    the server: one extra call per message, so it is slower)."""

    state: str | None = None
    namespace: str | None = None
    domain: str | None = None
    older_than: float | None = None
    newer_than: float | None = None
    id_prefix: str | None = None
    sender: str | None = None

    def __post_init__(self) -> None:
        if self.id_prefix is not None:
            _prefix_bounds(self.id_prefix)  # an empty prefix would select every message

    def is_empty(self) -> bool:
        return all(getattr(self, name) is None for name in self.__slots__)

    def describe(self) -> str:
        parts = [f"{name}={getattr(self, name)}" for name in self.__slots__ if getattr(self, name) is not None]
        return ", ".join(parts) or "every message"


def _prefix_bounds(prefix: str) -> tuple[int, int]:
    text = prefix.upper()
    if not 1 <= len(text) <= MESSAGE_ID_CHARS or any(c not in _ID_ALPHABET for c in text):
        raise InvalidArgument(f"id prefix {prefix!r} is not the start of a message id (Crockford base32)")
    low = text + "0" * (MESSAGE_ID_CHARS - len(text))
    high = text + "Z" * (MESSAGE_ID_CHARS - len(text))
    try:
        lo = int.from_bytes(parse_id(low), "big")
    except InvalidArgument:
        raise InvalidArgument(f"no message id starts with {prefix!r}") from None
    try:
        hi = int.from_bytes(parse_id(high), "big")
    except InvalidArgument:
        hi = (1 << 128) - 1
    return lo, hi


def _after_for(lowest: int) -> str | None:
    """The ``after`` cursor that starts a listing at id ``lowest`` (inclusive)."""
    return None if lowest <= 0 else format_id((lowest - 1).to_bytes(16, "big"))


def iter_matching(
    source: Lister,
    flt: Filter,
    *,
    after: str | None = None,
    page_size: int = 1000,
    sender_of: Callable[[str], str | None] | None = None,
    now: float | None = None,
) -> Iterator[tuple[Any, str | None]]:
    """Every message summary matching ``flt``, in id order, with the cursor to resume after it.

    Pages through ``source.list`` (memory stays at one page however many messages there are).
    ``sender_of(message_id)`` returns a message's mail_from (needed only for ``flt.sender``), or
    None for a message gone since it was listed (delivered and removed, deleted): it no longer
    matches."""
    lo, hi = 0, (1 << 128) - 1
    if flt.id_prefix is not None:
        lo, hi = _prefix_bounds(flt.id_prefix)
    if flt.newer_than is not None:
        since_ms = int(((now if now is not None else time.time()) - flt.newer_than) * 1000)
        lo = max(lo, max(since_ms, 0) << 80)
    cursor = after
    if lo and (cursor is None or int.from_bytes(parse_id(cursor), "big") < lo - 1):
        cursor = _after_for(lo)
    sender = flt.sender.lower() if flt.sender is not None else None
    if sender is not None and sender_of is None:
        raise InvalidArgument("filtering by sender needs the messages' envelopes")
    while True:
        page = source.list(state=flt.state, namespace=flt.namespace, domain=flt.domain, older_than=flt.older_than,
                           limit=page_size, after=cursor)
        for summary in page:
            value = int.from_bytes(parse_id(summary.message_id), "big")
            if value > hi:
                return
            if sender is not None:
                assert sender_of is not None
                found = sender_of(summary.message_id)
                if found is None or found.lower() != sender:
                    continue
            yield summary, summary.message_id
        if page.next_after is None:
            return
        cursor = page.next_after
        if int.from_bytes(parse_id(cursor), "big") > hi:
            return


def summary_dict(s: Any) -> dict[str, Any]:
    return {
        "message_id": s.message_id,
        "namespace": s.namespace,
        "created": s.created,
        "age_seconds": max(0.0, time.time() - id_time_ms(parse_id(s.message_id)) / 1000),
        "priority": s.priority,
        "size": s.size,
        "held": s.held,
        "done": s.done,
        "recipients": s.recipients,
        "states": dict(s.states),
    }


__all__ = ["SHAPE_STATES", "Filter", "Lister", "iter_matching", "message_history", "qshape_by_state",
           "summary_dict"]
