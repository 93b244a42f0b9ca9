"""The embedded mail-queue API: ``mqstore.open(path)`` returns a :class:`Store`.

Every mutation is a log entry, appended and applied to the state tables in one durable commit
by the store's writer (group commit). Reads use short read transactions. Times in this API are
Unix epoch seconds (floats); durations are seconds.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import logging
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mqstore import limits, validate
from mqstore.codec import Flags, Record, RecordType
from mqstore.crypto import KeyProvider
from mqstore.errors import InvalidArgument, NotFound, StaleLease
from mqstore.ids import format_id, id_time_ms, parse_id
from mqstore.queue import machine
from mqstore.queue.kv import LmdbKV, prefix_end
from mqstore.queue.machine import Counters
from mqstore.queue.model import (
    FINAL,
    STATE_BY_NAME,
    STATE_NAMES,
    AdminEntry,
    LeaseEntry,
    LeaseRow,
    MaintenanceEntry,
    MessageRow,
    Policy,
    PolicyEntry,
    SettleEntry,
    ns_key,
)
from mqstore.store import LogStore, NewMessage, WriteContext

log = logging.getLogger(__name__)

#: Postfix qshape's age buckets, in minutes (the last bucket is "older than 1280").
QSHAPE_BUCKETS_MIN = (0, 5, 10, 20, 40, 80, 160, 320, 640, 1280)
_LIST_SCAN_MAX = 200_000  # rows one list() call may examine before returning a partial page
_READ_CHUNK = 2_000  # rows per read transaction in long scans
_MAINTENANCE_ITEMS_MAX = 1_000  # expiry/compaction items per maintenance record
_LOG_COMPACT_EVERY = 50_000  # compact the log after this many new records
_RECIPIENT_CACHE_MAX = 65_536


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _to_ms(value: float | _dt.datetime | None, field_name: str) -> int:
    if value is None:
        return 0
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            raise InvalidArgument(f"{field_name} must be timezone-aware (or epoch seconds)")
        return _ms(value.timestamp())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(f"{field_name} must be epoch seconds or a datetime, not {type(value).__name__}")
    if value < 0 or value != value:
        raise InvalidArgument(f"{field_name} must be a time after 1970, not {value}")
    return _ms(value)


def _seconds(value: object, field_name: str, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise InvalidArgument(f"{field_name} must be a number of seconds, not {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise InvalidArgument(f"{field_name} must be {'>= 0' if allow_zero else '> 0'} seconds, not {value}")
    if value > 100 * 365 * 86400:
        raise InvalidArgument(f"{field_name} is more than a century ({value} s)")
    return float(value)


# --- results --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lease:
    """Recipients of one message leased to a worker. Settle them with ``token``."""

    message_id: str
    token: int
    namespace: str
    mail_from: str
    recipients: tuple[str, ...]
    data: bytes
    attempts: int  # attempts made before this lease (the most among the leased recipients)
    deadline: float  # epoch seconds; after it the recipients may be leased again
    priority: int


@dataclass(frozen=True, slots=True)
class RecipientStatus:
    address: str
    state: str
    attempts: int
    next_attempt: float | None  # epoch seconds, for queued/deferred recipients
    last_reason: str | None
    lease_token: int | None
    lease_deadline: float | None


@dataclass(frozen=True, slots=True)
class Message:
    message_id: str
    namespace: str
    mail_from: str
    recipients: tuple[RecipientStatus, ...]
    data: bytes
    priority: int
    created: float
    not_before: float | None
    expires_at: float | None
    held: bool
    done: bool
    size: int
    idempotency_key: str | None
    retain_until: float | None


@dataclass(frozen=True, slots=True)
class MessageSummary:
    message_id: str
    namespace: str
    created: float
    priority: int
    size: int
    held: bool
    done: bool
    recipients: int
    states: dict[str, int]


class Page(list[MessageSummary]):
    """One page of :meth:`Store.list`; pass ``next_after`` as ``after`` for the next page
    (None when the listing is complete)."""

    next_after: str | None = None


@dataclass(frozen=True, slots=True)
class QShape:
    """Recipient counts by domain and age (minutes since the message was created)."""

    buckets: tuple[str, ...]
    total: tuple[int, ...]
    domains: dict[str, tuple[int, ...]] = field(default_factory=dict)


# --- the store ------------------------------------------------------------------------------------


class QueueBase:
    """What the embedded store and a cluster node's queue share: argument checks, the read side
    (get, list, qshape, stats) and turning grants into leases. Subclasses implement the writes
    (``enqueue_many``, ``lease``, ``_settle``, ``ack_many``, ``_admin``, ``set_namespace_policy``)."""

    def __init__(self, log: LogStore, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.log = log
        self._rcpt_cache: OrderedDict[bytes, tuple[str, ...]] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._policies: dict[str, Policy] = {}

    # --- helpers ---------------------------------------------------------------------------------

    def _now_ms(self) -> int:
        return max(_ms(self._clock()), self.log.last_stamp_ms)

    def _kv(self, ctx: WriteContext) -> LmdbKV:
        return LmdbKV(ctx.txn, ctx.dbs)

    def _policy(self, namespace: str) -> Policy:
        policy = self._policies.get(namespace)
        if policy is None:
            with self.log.env.read() as txn:
                policy = machine.get_policy(LmdbKV(txn, self.log.env.dbs), namespace)
            self._policies[namespace] = policy
        return policy

    def _remember_recipients(self, mid: bytes, recipients: tuple[str, ...]) -> None:
        with self._cache_lock:
            self._rcpt_cache[mid] = recipients
            self._rcpt_cache.move_to_end(mid)
            while len(self._rcpt_cache) > _RECIPIENT_CACHE_MAX:
                self._rcpt_cache.popitem(last=False)

    def _recipients_of(self, enqueue_index: int, mid: bytes) -> tuple[str, ...]:
        with self._cache_lock:
            cached = self._rcpt_cache.get(mid)
        if cached is not None:
            return cached
        recipients = self.log.read_message(enqueue_index).envelope.recipients
        self._remember_recipients(mid, recipients)
        return recipients

    def _seal_reason(self, namespace: str, mid: bytes, reason: str) -> bytes:
        if not reason:
            return b""
        sealed = self.log.sealer.seal(RecordType.DEFER, namespace, mid, reason.encode("utf-8"), compress=False)
        return struct.pack("<I", sealed.key_id) + sealed.payload

    def _open_reason(self, blob: bytes) -> str | None:
        if not blob:
            return None
        (key_id,) = struct.unpack_from("<I", blob)
        record = Record(RecordType.DEFER, int(Flags.ENCRYPTED), 0, 0, key_id, 0, blob[4:])
        try:
            return self.log.sealer.open(record).plaintext.decode("utf-8", "replace")
        except Exception as exc:  # a reason is informational: never fail a read because of it
            return f"<unreadable reason: {exc}>"

    @staticmethod
    def _mid(message_id: object) -> bytes:
        if isinstance(message_id, bytes) and len(message_id) == 16:
            return message_id
        return parse_id(message_id)  # type: ignore[arg-type]

    def _new_messages(self, messages: Sequence[Mapping[str, Any]]) -> list[NewMessage]:
        """Check enqueue arguments (dicts with enqueue's keyword names) and resolve defaults."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise InvalidArgument("messages must be a non-empty list of dicts")
        now = self._now_ms()
        new = []
        allowed = {"mail_from", "recipients", "data", "namespace", "priority", "not_before", "expires_in",
                   "idempotency_key"}
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping):
                raise InvalidArgument(f"messages[{i}] must be a dict, not {type(m).__name__}")
            unknown = set(m) - allowed
            if unknown:
                raise InvalidArgument(f"messages[{i}] has unknown field(s) {sorted(unknown)}")
            if "mail_from" not in m or "recipients" not in m or "data" not in m:
                raise InvalidArgument(f"messages[{i}] needs mail_from, recipients and data")
            namespace = validate.namespace(m.get("namespace", "default"))
            expires_in = m.get("expires_in")
            if expires_in is None:
                lifetime_ms = self._policy(namespace).lifetime_ms
            else:
                lifetime_ms = _ms(_seconds(expires_in, f"messages[{i}].expires_in"))
            new.append(
                NewMessage(
                    mail_from=m["mail_from"],
                    recipients=m["recipients"],
                    data=m["data"],
                    namespace=namespace,
                    priority=m.get("priority", 0),
                    not_before_ms=_to_ms(m.get("not_before"), f"messages[{i}].not_before"),
                    expires_at_ms=now + lifetime_ms if lifetime_ms else 0,
                    idempotency_key=m.get("idempotency_key"),
                )
            )
        return new

    @staticmethod
    def _lease_args(
        worker: str, max_messages: int, lease_seconds: float, namespace: str | None, domain: str | None
    ) -> tuple[int, str | None]:
        """Check lease arguments; returns the lease length in ms and the normalised domain."""
        if not isinstance(worker, str) or not worker or len(worker.encode()) > 64:
            raise InvalidArgument("worker must be a name of 1..64 bytes")
        validate.integer(max_messages, "max_messages", 1, limits.APPEND_RECORDS_MAX)
        lease_ms = _ms(_seconds(lease_seconds, "lease_seconds"))
        if namespace is not None:
            validate.namespace(namespace)
        if domain is not None:
            domain = validate.domain(domain, "domain").lower()
        return lease_ms, domain

    @staticmethod
    def _check_reason(reason: str | None) -> None:
        if reason is not None and (not isinstance(reason, str) or len(reason.encode("utf-8", "replace")) > 4096):
            raise InvalidArgument("reason must be a string of at most 4096 bytes")

    def _new_policy(
        self,
        namespace: str,
        backoff: Sequence[float] | None,
        lifetime: float | None,
        retention: float | None,
        dedup_window: float | None,
        expired_retention: float | None,
    ) -> Policy:
        """The namespace's policy with the given changes (None keeps a value), checked."""
        validate.namespace(namespace)
        old = self._policy(namespace)
        if backoff is not None:
            if isinstance(backoff, (str, bytes)) or not isinstance(backoff, Sequence) or len(backoff) > 64:
                raise InvalidArgument("backoff must be a list of at most 64 delays in seconds")
            schedule = tuple(_ms(_seconds(s, f"backoff[{i}]")) for i, s in enumerate(backoff))
        else:
            schedule = old.backoff_ms

        def ms_or(old_ms: int, value: float | None, name: str, allow_zero: bool) -> int:
            return old_ms if value is None else _ms(_seconds(value, name, allow_zero=allow_zero))

        return Policy(
            backoff_ms=schedule,
            lifetime_ms=ms_or(old.lifetime_ms, lifetime, "lifetime", False),
            retention_ms=ms_or(old.retention_ms, retention, "retention", True),
            dedup_window_ms=ms_or(old.dedup_window_ms, dedup_window, "dedup_window", True),
            expired_retention_ms=ms_or(old.expired_retention_ms, expired_retention, "expired_retention", True),
        )

    # --- writes (subclasses) ---------------------------------------------------------------------

    def enqueue_many(self, messages: Sequence[Mapping[str, Any]]) -> list[str]:
        raise NotImplementedError

    def _settle(self, rtype: RecordType, token: int, recipients: Iterable[str] | None, reason: str | None) -> None:
        raise NotImplementedError

    def _admin(self, rtype: RecordType, message_id: str) -> None:
        raise NotImplementedError

    def enqueue(
        self,
        mail_from: str,
        recipients: Sequence[str],
        data: bytes,
        namespace: str = "default",
        priority: int = 0,
        not_before: float | _dt.datetime | None = None,
        expires_in: float | None = None,
        idempotency_key: str | None = None,
    ) -> str:
        """Store a message durably; returns its id. With an ``idempotency_key`` seen within the
        namespace's window, returns the earlier message's id and stores nothing."""
        return self.enqueue_many(
            [
                {
                    "mail_from": mail_from,
                    "recipients": recipients,
                    "data": data,
                    "namespace": namespace,
                    "priority": priority,
                    "not_before": not_before,
                    "expires_in": expires_in,
                    "idempotency_key": idempotency_key,
                }
            ]
        )[0]

    def ack(self, token: int, recipients: Iterable[str] | None = None) -> None:
        """Mark the lease's recipients (all, or those listed) delivered. Raises StaleLease if the
        token is unknown, expired or does not hold them; nothing changes then."""
        self._settle(RecordType.ACK, token, recipients, None)

    def defer(self, token: int, recipients: Iterable[str] | None = None, reason: str = "") -> None:
        """Retry the recipients later (backoff per namespace policy); keeps ``reason``."""
        self._settle(RecordType.DEFER, token, recipients, reason)

    def bounce(self, token: int, recipients: Iterable[str] | None = None, reason: str = "") -> None:
        """Mark the recipients permanently failed; keeps ``reason`` (for the DSN)."""
        self._settle(RecordType.BOUNCE, token, recipients, reason)

    def hold(self, message_id: str) -> None:
        """Stop leasing the message until :meth:`release` (leases already granted stay valid)."""
        self._admin(RecordType.HOLD, message_id)

    def release(self, message_id: str) -> None:
        self._admin(RecordType.RELEASE, message_id)

    def requeue(self, message_id: str) -> None:
        """Make the message's deferred recipients due now."""
        self._admin(RecordType.REQUEUE, message_id)

    def delete(self, message_id: str) -> None:
        """Remove the message (its leases become stale)."""
        self._admin(RecordType.DELETE, message_id)

    def _build_leases(self, grants: list[tuple[int, bytes, machine.Grant, int]]) -> list[Lease]:
        """Lease objects for committed grants: one read transaction, each body decrypted once."""
        if not grants:
            return []
        log_db = self.log.env.dbs[b"log"]
        out = []
        with self.log.env.read() as txn:
            get = txn.get
            for token, mid, grant, deadline_ms in grants:
                index = grant.enqueue_index
                stored = self.log.open_message(self.log.decode_raw(get(index.to_bytes(8, "big"), db=log_db), index))
                env = stored.envelope
                self._remember_recipients(mid, env.recipients)
                out.append(
                    Lease(
                        message_id=format_id(mid),
                        token=token,
                        namespace=env.namespace,
                        mail_from=env.mail_from,
                        recipients=tuple(env.recipients[o] for o in grant.ordinals),
                        data=stored.data,
                        attempts=grant.attempts,
                        deadline=deadline_ms / 1000,
                        priority=env.priority,
                    )
                )
        return out

    def _ordinals(
        self, kv: LmdbKV, token: int, recipients: Iterable[str] | None
    ) -> tuple[MessageRow, LeaseRow, tuple[int, ...]]:
        lease, ords = machine.check_settle(kv, token, None)
        row = machine.get_message(kv, lease.mid)
        if row is None:
            raise StaleLease(f"lease {token}: its message is gone")
        if recipients is not None:
            if isinstance(recipients, str):
                raise InvalidArgument("recipients must be a list of addresses, not a string")
            wanted = list(recipients)
            if not wanted:
                raise InvalidArgument("recipients is empty (pass None for all of the lease's recipients)")
            addresses = self._recipients_of(row.enqueue_index, lease.mid)
            by_address = {addresses[o]: o for o in lease.ordinals}
            unknown = [a for a in wanted if a not in by_address]
            if unknown:
                raise StaleLease(f"lease {token} does not hold recipient(s) {unknown}")
            ords = tuple(by_address[a] for a in wanted)
            machine.check_settle(kv, token, ords)
        return row, lease, ords

    # --- reading ---------------------------------------------------------------------------------

    def get(self, message_id: str) -> Message:
        """The message: envelope, raw bytes and every recipient's state."""
        mid = self._mid(message_id)
        with self.log.env.read() as txn:
            kv = LmdbKV(txn, self.log.env.dbs)
            row = machine.get_message(kv, mid)
            if row is None:
                raise NotFound(f"no message {format_id(mid)}")
            rcpts = machine.recipients_of(kv, mid)
        stored = self.log.read_message(row.enqueue_index)
        env = stored.envelope
        statuses = []
        for ordinal, r in rcpts:
            statuses.append(
                RecipientStatus(
                    address=env.recipients[ordinal],
                    state=STATE_NAMES[r.state],
                    attempts=r.attempts,
                    next_attempt=r.due_ms / 1000 if r.state not in FINAL and r.token == 0 else None,
                    last_reason=self._open_reason(r.reason),
                    lease_token=r.token or None,
                    lease_deadline=r.deadline_ms / 1000 if r.token else None,
                )
            )
        return Message(
            message_id=format_id(mid),
            namespace=env.namespace,
            mail_from=env.mail_from,
            recipients=tuple(statuses),
            data=stored.data,
            priority=env.priority,
            created=env.created_at_ms / 1000,
            not_before=env.not_before_ms / 1000 if env.not_before_ms else None,
            expires_at=env.expires_at_ms / 1000 if env.expires_at_ms else None,
            held=row.held,
            done=row.finished,
            size=row.size_bytes,
            idempotency_key=env.idempotency_key,
            retain_until=row.retain_until_ms / 1000 if row.finished else None,
        )

    def list(
        self,
        state: str | None = None,
        namespace: str | None = None,
        domain: str | None = None,
        older_than: float | None = None,
        limit: int = 1000,
        after: str | None = None,
    ) -> Page:
        """Messages in id (= arrival) order, filtered, one page at a time.

        ``state`` is a recipient state (a message matches if any recipient is in it), or "held",
        "active" (not finished) or "done". ``older_than`` is an age in seconds. Pass the returned
        page's ``next_after`` as ``after`` for the next page; memory use does not grow with the
        queue (rows are read in short chunks and at most 200,000 are examined per call).
        """
        validate.integer(limit, "limit", 1, 100_000)
        states = {"held", "active", "done", *STATE_BY_NAME}
        if state is not None and state not in states:
            raise InvalidArgument(f"state must be one of {sorted(states)}, not {state!r}")
        if namespace is not None:
            validate.namespace(namespace)
        if domain is not None:
            domain = validate.domain(domain, "domain").lower()
        cutoff = None
        if older_than is not None:
            cutoff = self._now_ms() - _ms(_seconds(older_than, "older_than", allow_zero=True))
        start_mid = b"" if after is None else self._mid(after) + b"\x00"
        page = Page()
        examined = 0
        prefix = b"" if namespace is None else ns_key(namespace)
        table = b"messages" if namespace is None else b"msg_ns"
        position = prefix + start_mid
        stop = None if namespace is None else prefix_end(prefix)
        while True:
            with self.log.env.read() as txn:
                kv = LmdbKV(txn, self.log.env.dbs)
                chunk = []
                for key, value in kv.scan(table, position, stop):
                    chunk.append((key, value))
                    if len(chunk) >= _READ_CHUNK:
                        break
                for key, value in chunk:
                    mid = key[len(prefix) :]
                    examined += 1
                    row = MessageRow.decode(value) if namespace is None else machine.get_message(kv, mid)
                    if row is None:
                        continue
                    if cutoff is not None and row.created_ms > cutoff:
                        continue
                    if not self._matches(kv, mid, row, state, domain):
                        continue
                    page.append(self._summary(mid, row))
                    if len(page) >= limit:
                        page.next_after = format_id(mid)
                        return page
            if len(chunk) < _READ_CHUNK:
                page.next_after = None
                return page
            position = chunk[-1][0] + b"\x00"
            if examined >= _LIST_SCAN_MAX:
                page.next_after = format_id(chunk[-1][0][len(prefix) :])
                return page

    @staticmethod
    def _matches(kv: LmdbKV, mid: bytes, row: MessageRow, state: str | None, domain: str | None) -> bool:
        if state == "held" and not row.held:
            return False
        if state == "active" and row.finished:
            return False
        if state == "done" and not row.finished:
            return False
        if state in STATE_BY_NAME and row.count(STATE_BY_NAME[state]) == 0:
            return False
        if domain is not None:
            return any(r.domain == domain for _, r in machine.recipients_of(kv, mid))
        return True

    @staticmethod
    def _summary(mid: bytes, row: MessageRow) -> MessageSummary:
        return MessageSummary(
            message_id=format_id(mid),
            namespace=row.namespace,
            created=row.created_ms / 1000,
            priority=row.priority,
            size=row.size_bytes,
            held=row.held,
            done=row.finished,
            recipients=row.n_rcpts,
            states={STATE_NAMES[s]: row.count(s) for s in STATE_NAMES if row.count(s)},
        )

    def qshape(self, namespace: str | None = None) -> QShape:
        """Waiting (queued and deferred, not held) recipients by domain and age, like Postfix's
        qshape: buckets of 0-5, 5-10, 10-20 ... 640-1280 and over 1280 minutes."""
        if namespace is not None:
            validate.namespace(namespace)
        now = self._now_ms()
        labels = (*(f"{a}-{b}" for a, b in itertools.pairwise(QSHAPE_BUCKETS_MIN)), f"{QSHAPE_BUCKETS_MIN[-1]}+")
        n = len(labels)
        domains: dict[str, list[int]] = {}
        total = [0] * n
        with self.log.env.read() as txn:
            spaces = [namespace] if namespace is not None else machine.namespaces(LmdbKV(txn, self.log.env.dbs))
        for ns in spaces:
            prefix = ns_key(ns)
            position = prefix
            stop = prefix_end(prefix)
            while True:
                with self.log.env.read() as txn:
                    chunk = list(_take(LmdbKV(txn, self.log.env.dbs).scan(b"ready", position, stop), _READ_CHUNK))
                for key, value in chunk:
                    mid = key[len(prefix) + 9 : len(prefix) + 25]
                    age_min = max(0, now - id_time_ms(mid)) / 60_000
                    bucket = n - 1
                    for i in range(n - 1):
                        if age_min < QSHAPE_BUCKETS_MIN[i + 1]:
                            bucket = i
                            break
                    counts = domains.setdefault(value.decode(), [0] * n)
                    counts[bucket] += 1
                    total[bucket] += 1
                if len(chunk) < _READ_CHUNK:
                    break
                position = chunk[-1][0] + b"\x00"
        ordered = sorted(domains.items(), key=lambda kv: (-sum(kv[1]), kv[0]))
        return QShape(labels, tuple(total), {d: tuple(c) for d, c in ordered})

    def stats(self) -> dict[str, Any]:
        """Recipient counts per state, messages, bytes and the oldest unfinished message's age,
        overall and per namespace."""
        with self.log.env.read() as txn:
            kv = LmdbKV(txn, self.log.env.dbs)
            per_ns = machine.read_stats(kv)
            oldest = next(iter(kv.scan(b"live", b"")), None)
        now = self._now_ms()
        states = list(STATE_NAMES.values())
        keys = [*states, "messages.live", "messages.stored", "bytes"]
        overall = {k: sum(v.get(k, 0) for v in per_ns.values()) for k in keys}
        return {
            "recipients": {s: overall[s] for s in states},
            "messages": overall["messages.stored"],
            "messages_active": overall["messages.live"],
            "bytes": overall["bytes"],
            "oldest_age_seconds": (now - id_time_ms(oldest[0])) / 1000 if oldest else 0.0,
            "namespaces": {
                ns: {
                    "recipients": {s: v.get(s, 0) for s in states},
                    "messages": v.get("messages.stored", 0),
                    "messages_active": v.get("messages.live", 0),
                    "bytes": v.get("bytes", 0),
                }
                for ns, v in sorted(per_ns.items())
            },
            "log": self.log.stats(),
        }



class Store(QueueBase):
    """An embedded mail queue in one directory. Thread safe; also a context manager.

    ``clock`` (epoch seconds) is injectable for tests; the state machine itself only uses times
    stamped into log entries by the writer. ``background=True`` runs a maintenance thread that
    expires leases and messages and compacts finished ones when they fall due.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        key_file: str | os.PathLike[str] | None = None,
        key_provider: KeyProvider | None = None,
        clock: Callable[[], float] | None = None,
        background: bool = True,
        compression_level: int = limits.ZSTD_LEVEL_DEFAULT,
        map_size: int = limits.MAP_SIZE_BYTES_DEFAULT,
    ) -> None:
        clock = clock or time.time
        log_store = LogStore(
            path,
            key_file=key_file,
            key_provider=key_provider,
            clock_ms=lambda: _ms(clock()),
            compression_level=compression_level,
            map_size=map_size,
        )
        if log_store.meta_get(b"node.id") is not None:
            log_store.close()
            raise InvalidArgument(
                f"{path} is the data dir of a cluster node: write to it through the node (mqstore.Client), "
                "not as an embedded store (that would bypass replication)"
            )
        super().__init__(log_store, clock)
        self.path = Path(path)
        self._compacted_at = self.log.last_index
        self._closed = threading.Event()
        self._wake = threading.Event()
        self._maintainer: threading.Thread | None = None
        if background:
            self._maintainer = threading.Thread(target=self._maintain_loop, name="mqstore-maintenance", daemon=True)
            self._maintainer.start()

    # --- enqueue -----------------------------------------------------------------------------------

    def enqueue_many(self, messages: Sequence[Mapping[str, Any]]) -> list[str]:
        """Store several messages in one durable commit; returns their ids in order."""
        new = self._new_messages(messages)
        staged = self.log.stage_messages(new)
        sizes = [len(n.data) for n in new]

        def fn(ctx: WriteContext) -> list[bytes]:
            kv = self._kv(ctx)
            c = Counters()
            out = []
            for st, sealed, size in zip(staged, ctx.sealed, sizes, strict=True):
                env = st.envelope
                if env.idempotency_key:
                    dup = machine.find_duplicate(kv, env.namespace, env.idempotency_key, env.created_at_ms)
                    if dup is not None:
                        out.append(dup)
                        continue
                index = ctx.append(RecordType.ENQUEUE, sealed.payload, flags=sealed.flags,
                                   key_id=sealed.key_id, dict_id=sealed.dict_id)
                out.append(machine.apply_enqueue(kv, c, index, env, size))
            c.flush(kv)
            return out

        requests = [(int(RecordType.ENQUEUE), st.envelope.namespace, st.envelope.message_id, st.plaintext)
                    for st in staged]
        mids = self.log.write(fn, size=sum(sizes), seal=requests)
        for st in staged:
            self._remember_recipients(st.envelope.message_id, st.envelope.recipients)
        self._wake.set()
        return [format_id(m) for m in mids]

    # --- leasing and settling --------------------------------------------------------------------

    def lease(
        self,
        worker: str,
        max_messages: int = 100,
        lease_seconds: float = 300,
        namespace: str | None = None,
        domain: str | None = None,
    ) -> list[Lease]:
        """Lease due recipients: highest priority first, then the longest waiting. Each lease is
        one message's due recipients (only those in ``domain`` when given)."""
        lease_ms, domain = self._lease_args(worker, max_messages, lease_seconds, namespace, domain)

        def fn(ctx: WriteContext) -> list[tuple[int, bytes, machine.Grant, int]]:
            kv = self._kv(ctx)
            c = Counters()
            self._expire_in(ctx, kv, c)
            grants = []
            for plan in machine.plan_lease(kv, ctx.now_ms, max_messages, namespace, domain):
                entry = LeaseEntry(ctx.now_ms, ctx.now_ms + lease_ms, plan.mid, plan.ordinals, worker)
                token = ctx.append(RecordType.LEASE, entry.encode())
                grant = machine.apply_lease(kv, c, token, entry)
                if grant.ordinals:
                    grants.append((token, plan.mid, grant, entry.deadline_ms))
            c.flush(kv)
            return grants

        grants = self.log.write(fn)
        return self._build_leases(grants)

    def _settle(
        self, rtype: RecordType, token: int, recipients: Iterable[str] | None, reason: str | None
    ) -> None:
        self._check_reason(reason)

        def fn(ctx: WriteContext) -> None:
            kv = self._kv(ctx)
            row, lease, ords = self._ordinals(kv, token, recipients)
            mid = lease.mid
            nxt: tuple[int, ...] = ()
            if rtype == RecordType.DEFER:
                policy = machine.get_policy(kv, row.namespace)
                rcpts = dict(machine.recipients_of(kv, mid))
                nxt = tuple(
                    ctx.now_ms + machine.backoff_ms(policy, rcpts[o].attempts + 1, mid, o) for o in ords
                )
            sealed = self._seal_reason(row.namespace, mid, reason or "")
            entry = SettleEntry(ctx.now_ms, token, ords, nxt, sealed)
            ctx.append(rtype, entry.encode())
            c = Counters()
            if not machine.apply_settle(kv, c, rtype, entry, checked=lease):
                raise AssertionError("a settle entry checked under the write lock did not apply")
            c.flush(kv)

        self.log.write(fn)

    def ack_many(self, tokens: Iterable[int]) -> None:
        """Mark every recipient of each lease delivered, in one durable commit (all or nothing)."""
        tokens = list(tokens)
        if not tokens:
            return

        def fn(ctx: WriteContext) -> None:
            kv = self._kv(ctx)
            c = Counters()
            for token in tokens:
                lease, ords = machine.check_settle(kv, token, None)
                entry = SettleEntry(ctx.now_ms, token, ords)
                ctx.append(RecordType.ACK, entry.encode())
                if not machine.apply_settle(kv, c, RecordType.ACK, entry, checked=lease):
                    raise StaleLease(f"lease {token} could not be settled")
            c.flush(kv)

        self.log.write(fn)

    # --- administration --------------------------------------------------------------------------

    def _admin(self, rtype: RecordType, message_id: str) -> None:
        mid = self._mid(message_id)

        def fn(ctx: WriteContext) -> None:
            kv = self._kv(ctx)
            if kv.get(b"messages", mid) is None:
                raise NotFound(f"no message {format_id(mid)}")
            entry = AdminEntry(ctx.now_ms, mid)
            ctx.append(rtype, entry.encode())
            c = Counters()
            machine.apply_admin(kv, c, rtype, entry)
            c.flush(kv)

        self.log.write(fn)

    def set_namespace_policy(
        self,
        namespace: str,
        *,
        backoff: Sequence[float] | None = None,
        lifetime: float | None = None,
        retention: float | None = None,
        dedup_window: float | None = None,
        expired_retention: float | None = None,
    ) -> Policy:
        """Set a namespace's retry schedule (seconds; the last step repeats; None keeps Postfix's
        doubling 300..4000 s), message lifetime, retention of finished messages, idempotency
        window, and how long a message that expired is kept for the MTA's DSN (it may delete it
        sooner). Applies to messages enqueued (lifetime) or finished (retention) afterwards.
        Arguments left as None keep their current value."""
        policy = self._new_policy(namespace, backoff, lifetime, retention, dedup_window, expired_retention)

        def fn(ctx: WriteContext) -> None:
            entry = PolicyEntry(ctx.now_ms, namespace, policy)
            ctx.append(RecordType.POLICY, entry.encode())
            machine.apply_policy(self._kv(ctx), entry)
            self._policies.pop(namespace, None)

        self.log.write(fn)
        self._policies[namespace] = policy
        return policy

    # --- maintenance -----------------------------------------------------------------------------

    def _expire_in(self, ctx: WriteContext, kv: LmdbKV, c: Counters) -> int:
        items = machine.plan_expire(kv, ctx.now_ms, _MAINTENANCE_ITEMS_MAX)
        if not items:
            return 0
        entry = MaintenanceEntry(ctx.now_ms, tuple(items))
        ctx.append(RecordType.EXPIRE, entry.encode())
        return machine.apply_expire(kv, c, entry)

    def maintain(self) -> dict[str, int]:
        """Expire leases and messages that are due, compact finished messages whose retention
        passed, and compact the log when it has grown. Returns what was done."""
        done = {"expired": 0, "compacted": 0, "log_records_removed": 0}

        def fn(ctx: WriteContext) -> tuple[int, int]:
            kv = self._kv(ctx)
            c = Counters()
            expired = self._expire_in(ctx, kv, c)
            compacted = 0
            items = machine.plan_compact(kv, ctx.now_ms, _MAINTENANCE_ITEMS_MAX)
            if items:
                entry = MaintenanceEntry(ctx.now_ms, tuple(items))
                ctx.append(RecordType.COMPACT, entry.encode())
                compacted = machine.apply_compact(kv, c, entry)
            c.flush(kv)
            return expired, compacted

        while True:
            expired, compacted = self.log.write(fn)
            done["expired"] += expired
            done["compacted"] += compacted
            if expired < _MAINTENANCE_ITEMS_MAX and compacted < _MAINTENANCE_ITEMS_MAX:
                break
        if self.log.last_index - self._compacted_at >= _LOG_COMPACT_EVERY:
            done["log_records_removed"] = self.compact_log()
        return done

    def compact_log(self) -> int:
        """Drop log records no longer needed: every record already applied except the ENQUEUE
        records (message bodies) of messages still in the store. Returns how many were removed."""
        upto = self.log.last_index + 1

        def keep(ctx: WriteContext, index: int, raw: bytes) -> bool:
            if raw[3] != RecordType.ENQUEUE or len(raw) < 56:
                return False
            # The sealed payload starts with the message id (readable without decrypting).
            return ctx.txn.get(raw[40:56], db=ctx.dbs[b"messages"]) is not None

        removed = self.log.compact(upto, keep)
        self._compacted_at = upto - 1
        return removed

    def _maintain_loop(self) -> None:
        while not self._closed.is_set():
            try:
                with self.log.env.read() as txn:
                    due = machine.next_timer_ms(LmdbKV(txn, self.log.env.dbs))
                now = self._now_ms()
                if due is not None and due <= now:
                    self.maintain()
                    continue
                wait = 1.0 if due is None else min(1.0, max(0.01, (due - now) / 1000))
            except Exception:
                if self._closed.is_set():
                    return
                log.exception("mqstore maintenance failed; retrying in 1 s")
                wait = 1.0
            self._wake.wait(wait)
            self._wake.clear()

    # --- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        if self._maintainer is not None:
            self._maintainer.join(30)
        self.log.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _take(it: Iterable[tuple[bytes, bytes]], n: int) -> list[tuple[bytes, bytes]]:
    out = []
    for item in it:
        out.append(item)
        if len(out) >= n:
            break
    return out


def open(path: str | os.PathLike[str] = "mqstore-data", **options: Any) -> Store:
    """Open (creating if new) the mail queue in ``path``. See :class:`Store` for options."""
    return Store(path, **options)


__all__ = ["Lease", "Message", "MessageSummary", "Page", "QShape", "QueueBase", "RecipientStatus", "Store", "open"]
