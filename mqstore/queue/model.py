"""Rows of the queue's state tables and payloads of its log entries, with their encodings.

Every integer is little-endian; times are milliseconds since the Unix epoch. Each encoding starts
with a version byte so fields can be added later. Index keys are big-endian so that bytewise
order is numeric order.

Tables (LMDB databases, see mqstore/store/env.py):

``messages``    message id -> MessageRow
``recipients``  message id + ordinal (u16 BE) -> RecipientRow
``ready``       ns NUL prio_inv(u8) due(u64 BE) mid ordinal -> domain     (queued/deferred, not held)
``ready_dom``   ns NUL domain NUL prio_inv due mid ordinal -> b""         (same, by domain)
``leases``      token (u64 BE) -> LeaseRow
``lease_due``   deadline (u64 BE) token -> b""
``expiry``      expires_at (u64 BE) mid -> b""                           (unfinished messages)
``retention``   retain_until (u64 BE) mid -> b""                         (finished messages)
``live``        mid -> b""                                               (unfinished messages)
``msg_ns``      ns NUL mid -> b""
``dedup``       ns NUL idempotency key -> mid + created (i64)
``dedup_exp``   until (u64 BE) ns NUL key -> b""
``stats``       ns NUL counter name -> i64
``policies``    ns -> PolicyRow
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from mqstore import limits
from mqstore.compliance.rules import Ctx
from mqstore.errors import Corruption

# --- recipient states ---------------------------------------------------------------------------

QUEUED = 1
LEASED = 2
DEFERRED = 3
DELIVERED = 4
BOUNCED = 5
EXPIRED = 6
STATE_NAMES = {QUEUED: "queued", LEASED: "leased", DEFERRED: "deferred", DELIVERED: "delivered",
               BOUNCED: "bounced", EXPIRED: "expired"}
STATE_BY_NAME = {name: code for code, name in STATE_NAMES.items()}
FINAL = frozenset((DELIVERED, BOUNCED, EXPIRED))
WAITING = frozenset((QUEUED, DEFERRED))  # in the ready index unless the message is held

# message flags
HELD = 0x01
FINISHED = 0x02
#: The operator gave up on some recipients (bounce_message): once finished, the message is kept as
#: long as an expired one (policy ``expired_retention``) so the MTA can send their DSN.
GIVEN_UP = 0x04

U64 = struct.Struct(">Q")
U16BE = struct.Struct(">H")


def mid_ord(mid: bytes, ordinal: int) -> bytes:
    return mid + U16BE.pack(ordinal)


def ns_key(namespace: str) -> bytes:
    return namespace.encode("utf-8") + b"\x00"


def prio_inv(priority: int) -> int:
    """Priority -128..127 as one byte where the highest priority sorts first."""
    return 127 - priority


def ready_key(ns0: bytes, priority: int, due_ms: int, mid: bytes, ordinal: int) -> bytes:
    return ns0 + bytes((prio_inv(priority),)) + U64.pack(max(due_ms, 0)) + mid + U16BE.pack(ordinal)


def ready_dom_key(ns0: bytes, domain: str, priority: int, due_ms: int, mid: bytes, ordinal: int) -> bytes:
    return ns0 + domain.encode("utf-8") + b"\x00" + ready_key(b"", priority, due_ms, mid, ordinal)


def time_key(time_ms: int, suffix: bytes) -> bytes:
    return U64.pack(max(time_ms, 0)) + suffix


def domain_of(address: str) -> str:
    """The lower-cased domain of an address (the part after the last @)."""
    return address.rpartition("@")[2].lower()


class _Reader:
    __slots__ = ("buf", "off", "what")

    def __init__(self, buf: bytes, what: str) -> None:
        self.buf = buf
        self.off = 0
        self.what = what

    def unpack(self, fmt: struct.Struct) -> tuple[Any, ...]:
        try:
            out = fmt.unpack_from(self.buf, self.off)
        except struct.error:
            raise Corruption(f"{self.what} is truncated") from None
        self.off += fmt.size
        return out

    def take(self, n: int) -> bytes:
        if self.off + n > len(self.buf):
            raise Corruption(f"{self.what} is truncated")
        out = self.buf[self.off : self.off + n]
        self.off += n
        return out

    def text8(self) -> str:
        (n,) = self.unpack(_B)
        return self._text(n)

    def text16(self) -> str:
        (n,) = self.unpack(_H)
        return self._text(n)

    def bytes16(self) -> bytes:
        (n,) = self.unpack(_H)
        return self.take(n)

    def _text(self, n: int) -> str:
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise Corruption(f"{self.what} holds invalid UTF-8") from None

    def ordinals(self) -> tuple[int, ...]:
        (n,) = self.unpack(_H)
        return struct.unpack_from(f"<{n}H", self.take(2 * n)) if n else ()

    def done(self) -> None:
        if self.off != len(self.buf):
            raise Corruption(f"{self.what} has {len(self.buf) - self.off} trailing bytes")


_B = struct.Struct("<B")
_H = struct.Struct("<H")


def _text8(s: str) -> bytes:
    b = s.encode("utf-8")
    return bytes((len(b),)) + b


def _text16(s: str) -> bytes:
    b = s.encode("utf-8")
    return _H.pack(len(b)) + b


def _bytes16(b: bytes) -> bytes:
    return _H.pack(len(b)) + b


def _ordinals(ords: tuple[int, ...]) -> bytes:
    return _H.pack(len(ords)) + struct.pack(f"<{len(ords)}H", *ords)


def _version(v: int, expected: int, r: _Reader) -> None:
    if v != expected:
        raise Corruption(f"{r.what} has unknown version {v}")


# --- rows -----------------------------------------------------------------------------------------

_MSG = struct.Struct("<BBbH6HQqqqqIBqI")


@dataclass(slots=True)
class MessageRow:
    namespace: str
    priority: int
    n_rcpts: int
    enqueue_index: int
    created_ms: int
    expires_at_ms: int
    size_bytes: int
    idempotency_key: str = ""
    flags: int = 0
    counts: list[int] = field(default_factory=lambda: [0] * 6)  # recipients per state 1..6
    finished_ms: int = 0
    retain_until_ms: int = 0  # finished: compaction may remove it from then on (housekeeping)
    lock_mode: int = 0  # compliance.Mode captured at enqueue
    lock_until_ms: int = 0  # immutable until then (compliance clock); extend only in COMPLIANCE
    key_id: int = 0  # the namespace key its body is sealed under (crypto-shredding checks it)

    @property
    def held(self) -> bool:
        return bool(self.flags & HELD)

    @property
    def finished(self) -> bool:
        return bool(self.flags & FINISHED)

    def count(self, state: int) -> int:
        return self.counts[state - 1]

    def encode(self) -> bytes:
        return (
            _MSG.pack(2, self.flags, self.priority, self.n_rcpts, *self.counts, self.enqueue_index,
                      self.created_ms, self.expires_at_ms, self.finished_ms, self.retain_until_ms, self.size_bytes,
                      self.lock_mode, self.lock_until_ms, self.key_id)
            + _text8(self.namespace)
            + _text16(self.idempotency_key)
        )

    @classmethod
    def decode(cls, buf: bytes) -> MessageRow:
        # Hot path (every queue operation reads rows): parse directly, validate at the end.
        try:
            (v, flags, prio, n, c1, c2, c3, c4, c5, c6, index, created, expires, finished, retain, size,
             lock_mode, lock_until, key_id) = _MSG.unpack_from(buf, 0)
            off = _MSG.size
            ns_len = buf[off]
            ns = buf[off + 1 : off + 1 + ns_len].decode("utf-8")
            off += 1 + ns_len
            (idem_len,) = _H.unpack_from(buf, off)
            idem = buf[off + 2 : off + 2 + idem_len].decode("utf-8")
            end = off + 2 + idem_len
        except (struct.error, IndexError, UnicodeDecodeError):
            raise Corruption("message row is truncated or not valid UTF-8") from None
        if v != 2 or end != len(buf):
            raise Corruption(f"message row has unknown version {v} or a bad length")
        return cls(ns, prio, n, index, created, expires, size, idem, flags, [c1, c2, c3, c4, c5, c6], finished, retain,
                   lock_mode, lock_until, key_id)


_RCPT = struct.Struct("<BBHqQq")
assert limits.RECIPIENT_ATTEMPTS_MAX == 2**16 - 1, "the attempt count is the u16 of _RCPT"


@dataclass(slots=True)
class RecipientRow:
    state: int
    domain: str
    attempts: int = 0
    due_ms: int = 0  # when QUEUED/DEFERRED: when it may be leased
    token: int = 0  # when LEASED: the lease's fencing token
    deadline_ms: int = 0  # when LEASED: the lease deadline
    reason: bytes = b""  # last reason, sealed (it may name addresses)

    def encode(self) -> bytes:
        return (
            _RCPT.pack(1, self.state, self.attempts, self.due_ms, self.token, self.deadline_ms)
            + _text8(self.domain)
            + _bytes16(self.reason)
        )

    @classmethod
    def decode(cls, buf: bytes) -> RecipientRow:
        try:
            v, state, attempts, due, token, deadline = _RCPT.unpack_from(buf, 0)
            off = _RCPT.size
            dom_len = buf[off]
            domain = buf[off + 1 : off + 1 + dom_len].decode("utf-8")
            off += 1 + dom_len
            (reason_len,) = _H.unpack_from(buf, off)
            reason = buf[off + 2 : off + 2 + reason_len]
            end = off + 2 + reason_len
        except (struct.error, IndexError, UnicodeDecodeError):
            raise Corruption("recipient row is truncated or not valid UTF-8") from None
        if v != 1 or end != len(buf):
            raise Corruption(f"recipient row has unknown version {v} or a bad length")
        return cls(state, domain, attempts, due, token, deadline, reason)


_LEASE = struct.Struct("<B16sq")


@dataclass(slots=True)
class LeaseRow:
    mid: bytes
    deadline_ms: int
    ordinals: tuple[int, ...]
    worker: str

    def encode(self) -> bytes:
        return _LEASE.pack(1, self.mid, self.deadline_ms) + _ordinals(self.ordinals) + _text8(self.worker)

    @classmethod
    def decode(cls, buf: bytes) -> LeaseRow:
        # Hot path (every settle reads its lease): parse directly; a row that does not parse
        # cleanly goes through the checked reader below, which names what is wrong.
        try:
            v, mid, deadline = _LEASE.unpack_from(buf, 0)
            (n,) = _H.unpack_from(buf, _LEASE.size)
            off = _LEASE.size + 2 + 2 * n
            worker_len = buf[off]
            if v == 1 and off + 1 + worker_len == len(buf):
                ords = struct.unpack_from(f"<{n}H", buf, _LEASE.size + 2) if n else ()
                return cls(mid, deadline, ords, buf[off + 1 :].decode("utf-8"))
        except (struct.error, IndexError, UnicodeDecodeError):
            pass
        r = _Reader(buf, "lease row")
        v, mid, deadline = r.unpack(_LEASE)
        if v != 1:
            raise Corruption(f"lease row has unknown version {v}")
        ords = r.ordinals()
        worker = r.text8()
        r.done()
        return cls(mid, deadline, tuple(ords), worker)


_POLICY = struct.Struct("<BqqqqBq")


@dataclass(frozen=True, slots=True)
class Policy:
    """Per-namespace queue policy. An empty ``backoff_ms`` means Postfix's doubling backoff."""

    backoff_ms: tuple[int, ...] = ()
    lifetime_ms: int = 5 * 24 * 3600 * 1000  # Postfix maximal_queue_lifetime: 5 days
    retention_ms: int = 0  # keep finished messages this long before compaction
    dedup_window_ms: int = 24 * 3600 * 1000
    #: A message that finished with expired recipients is kept at least this long, so the MTA
    #: can find it (``list(state="expired")``) and send the delay DSN; it deletes it when done.
    expired_retention_ms: int = 7 * 24 * 3600 * 1000
    #: Immutability (compliance.Mode) and the lock period new messages get (from enqueue).
    mode: int = 0
    lock_retention_ms: int = 0

    def encode(self) -> bytes:
        return (
            _POLICY.pack(2, self.lifetime_ms, self.retention_ms, self.dedup_window_ms, self.expired_retention_ms,
                         self.mode, self.lock_retention_ms)
            + _H.pack(len(self.backoff_ms))
            + struct.pack(f"<{len(self.backoff_ms)}q", *self.backoff_ms)
        )

    @classmethod
    def decode(cls, buf: bytes) -> Policy:
        r = _Reader(buf, "policy")
        v, lifetime, retention, window, expired_retention, mode, lock_retention = r.unpack(_POLICY)
        if v != 2:
            raise Corruption(f"policy has unknown version {v}")
        (n,) = r.unpack(_H)
        backoff = struct.unpack_from(f"<{n}q", r.take(8 * n)) if n else ()
        r.done()
        return cls(tuple(backoff), lifetime, retention, window, expired_retention, mode, lock_retention)


# --- entries (log record payloads) -----------------------------------------------------------------
#
# Every entry ends with the request context (who asked, from which node and site, the wall and
# compliance clocks, a bypass flag and reason): every replica applies and audits the same thing.


#: An entry written without a request context (tests, old callers): the local administrator at
#: compliance time 0, so nothing it asks can unlock a retained message.
NO_CTX = Ctx()


_ctx_memo: tuple[Ctx | None, bytes] = (None, b"")


def _ctx(ctx: Ctx) -> bytes:
    # A batch (a lease of 256 messages: 256 entries) shares one Ctx: encode it once. Ctx is
    # frozen, so the same object always encodes the same; the memo is one atomic tuple.
    global _ctx_memo
    last, raw = _ctx_memo
    if last is not ctx:
        raw = _bytes16(ctx.encode())
        _ctx_memo = (ctx, raw)
    return raw


def _read_ctx(r: _Reader) -> Ctx:
    return Ctx.decode(r.bytes16())


_LEASE_ENTRY = struct.Struct("<Bqq16s")


@dataclass(frozen=True, slots=True)
class LeaseEntry:
    """LEASE: grant ``ordinals`` of message ``mid`` to ``worker`` until ``deadline_ms``.
    The fencing token is the record's log index."""

    now_ms: int
    deadline_ms: int
    mid: bytes
    ordinals: tuple[int, ...]
    worker: str
    ctx: Ctx = NO_CTX

    def encode(self) -> bytes:
        return (
            _LEASE_ENTRY.pack(2, self.now_ms, self.deadline_ms, self.mid)
            + _ordinals(self.ordinals)
            + _text8(self.worker)
            + _ctx(self.ctx)
        )

    @classmethod
    def decode(cls, buf: bytes) -> LeaseEntry:
        r = _Reader(buf, "lease entry")
        v, now, deadline, mid = r.unpack(_LEASE_ENTRY)
        _version(v, 2, r)
        ords = r.ordinals()
        worker = r.text8()
        ctx = _read_ctx(r)
        r.done()
        return cls(now, deadline, mid, tuple(ords), worker, ctx)


_SETTLE = struct.Struct("<BqQ")


@dataclass(frozen=True, slots=True)
class SettleEntry:
    """ACK / DEFER / BOUNCE of ``ordinals`` under lease ``token``. DEFER carries the next attempt
    time of each ordinal; DEFER and BOUNCE carry the (sealed) reason."""

    now_ms: int
    token: int
    ordinals: tuple[int, ...]
    next_attempt_ms: tuple[int, ...] = ()
    reason: bytes = b""
    ctx: Ctx = NO_CTX

    def encode(self) -> bytes:
        return (
            _SETTLE.pack(2, self.now_ms, self.token)
            + _ordinals(self.ordinals)
            + _H.pack(len(self.next_attempt_ms))
            + struct.pack(f"<{len(self.next_attempt_ms)}q", *self.next_attempt_ms)
            + _bytes16(self.reason)
            + _ctx(self.ctx)
        )

    @classmethod
    def decode(cls, buf: bytes) -> SettleEntry:
        r = _Reader(buf, "settle entry")
        v, now, token = r.unpack(_SETTLE)
        _version(v, 2, r)
        ords = r.ordinals()
        (n,) = r.unpack(_H)
        nxt = struct.unpack_from(f"<{n}q", r.take(8 * n)) if n else ()
        reason = r.bytes16()
        ctx = _read_ctx(r)
        r.done()
        return cls(now, token, tuple(ords), tuple(nxt), reason, ctx)


_ADMIN = struct.Struct("<Bq16s")


@dataclass(frozen=True, slots=True)
class AdminEntry:
    """HOLD / RELEASE / REQUEUE / DELETE of one message."""

    now_ms: int
    mid: bytes
    ctx: Ctx = NO_CTX

    def encode(self) -> bytes:
        return _ADMIN.pack(2, self.now_ms, self.mid) + _ctx(self.ctx)

    @classmethod
    def decode(cls, buf: bytes) -> AdminEntry:
        r = _Reader(buf, "admin entry")
        v, now, mid = r.unpack(_ADMIN)
        _version(v, 2, r)
        ctx = _read_ctx(r)
        r.done()
        return cls(now, mid, ctx)


@dataclass(frozen=True, slots=True)
class BounceMessageEntry:
    """BOUNCE_MESSAGE: an operator gives up on message ``mid``: its queued and deferred
    recipients (held or not) become bounced with the (sealed) ``reason``; leased ones are left
    to the worker that holds them."""

    now_ms: int
    mid: bytes
    reason: bytes = b""
    ctx: Ctx = NO_CTX

    def encode(self) -> bytes:
        return _ADMIN.pack(1, self.now_ms, self.mid) + _bytes16(self.reason) + _ctx(self.ctx)

    @classmethod
    def decode(cls, buf: bytes) -> BounceMessageEntry:
        r = _Reader(buf, "bounce message entry")
        v, now, mid = r.unpack(_ADMIN)
        _version(v, 1, r)
        reason = r.bytes16()
        ctx = _read_ctx(r)
        r.done()
        return cls(now, mid, reason, ctx)


# EXPIRE / COMPACT items
EXPIRE_LEASE = 1  # value: token (u64 BE)
EXPIRE_MESSAGE = 2  # value: message id
COMPACT_MESSAGE = 1  # value: message id
COMPACT_DEDUP = 2  # value: the dedup_exp key (window end u64 BE + ns NUL key)

_MAINT = struct.Struct("<BqH")


@dataclass(frozen=True, slots=True)
class MaintenanceEntry:
    """EXPIRE (lease deadlines, message lifetimes) or COMPACT (retention passed) of many items."""

    now_ms: int
    items: tuple[tuple[int, bytes], ...]
    ctx: Ctx = NO_CTX

    def encode(self) -> bytes:
        out = [_MAINT.pack(2, self.now_ms, len(self.items))]
        for kind, value in self.items:
            out.append(bytes((kind,)) + _bytes16(value))
        out.append(_ctx(self.ctx))
        return b"".join(out)

    @classmethod
    def decode(cls, buf: bytes) -> MaintenanceEntry:
        r = _Reader(buf, "maintenance entry")
        v, now, n = r.unpack(_MAINT)
        _version(v, 2, r)
        items = []
        for _ in range(n):
            (kind,) = r.unpack(_B)
            items.append((kind, r.bytes16()))
        ctx = _read_ctx(r)
        r.done()
        return cls(now, tuple(items), ctx)


_STAMP = struct.Struct("<Bq")


@dataclass(frozen=True, slots=True)
class PolicyEntry:
    now_ms: int
    namespace: str
    policy: Policy
    ctx: Ctx = NO_CTX

    def encode(self) -> bytes:
        return _STAMP.pack(2, self.now_ms) + _text8(self.namespace) + _bytes16(self.policy.encode()) + _ctx(self.ctx)

    @classmethod
    def decode(cls, buf: bytes) -> PolicyEntry:
        r = _Reader(buf, "policy entry")
        v, now = r.unpack(_STAMP)
        _version(v, 2, r)
        ns = r.text8()
        policy = Policy.decode(r.bytes16())
        ctx = _read_ctx(r)
        r.done()
        return cls(now, ns, policy, ctx)


@dataclass(frozen=True, slots=True)
class LegalHoldEntry:
    """LEGAL_HOLD: add (``add``) or remove the hold named ``case`` on a message."""

    now_ms: int
    mid: bytes
    case: str
    add: bool
    ctx: Ctx = NO_CTX

    def encode(self) -> bytes:
        return _ADMIN.pack(2, self.now_ms, self.mid) + bytes((int(self.add),)) + _text8(self.case) + _ctx(self.ctx)

    @classmethod
    def decode(cls, buf: bytes) -> LegalHoldEntry:
        r = _Reader(buf, "legal hold entry")
        v, now, mid = r.unpack(_ADMIN)
        _version(v, 2, r)
        (add,) = r.unpack(_B)
        case = r.text8()
        ctx = _read_ctx(r)
        r.done()
        return cls(now, mid, case, bool(add), ctx)


@dataclass(frozen=True, slots=True)
class RetentionEntry:
    """RETENTION: set a message's lock to ``until_ms`` (compliance clock)."""

    now_ms: int
    mid: bytes
    until_ms: int
    ctx: Ctx = NO_CTX

    def encode(self) -> bytes:
        return _ADMIN.pack(2, self.now_ms, self.mid) + struct.pack("<q", self.until_ms) + _ctx(self.ctx)

    @classmethod
    def decode(cls, buf: bytes) -> RetentionEntry:
        r = _Reader(buf, "retention entry")
        v, now, mid = r.unpack(_ADMIN)
        _version(v, 2, r)
        (until,) = r.unpack(struct.Struct("<q"))
        ctx = _read_ctx(r)
        r.done()
        return cls(now, mid, until, ctx)


@dataclass(frozen=True, slots=True)
class DenialEntry:
    """AUDIT: a refused request (nothing changes but the audit log): what, on what, why."""

    now_ms: int
    op: str
    target: str
    reason: str
    ctx: Ctx = NO_CTX

    def encode(self) -> bytes:
        return (
            _STAMP.pack(2, self.now_ms) + _text8(self.op) + _text16(self.target) + _text16(self.reason)
            + _ctx(self.ctx)
        )

    @classmethod
    def decode(cls, buf: bytes) -> DenialEntry:
        r = _Reader(buf, "denial entry")
        v, now = r.unpack(_STAMP)
        _version(v, 2, r)
        op = r.text8()
        target = r.text16()
        reason = r.text16()
        ctx = _read_ctx(r)
        r.done()
        return cls(now, op, target, reason, ctx)


@dataclass(frozen=True, slots=True)
class NamespaceEntry:
    """DROP: remove every message of a namespace (refused if any is locked or held)."""

    now_ms: int
    namespace: str
    ctx: Ctx = NO_CTX

    def encode(self) -> bytes:
        return _STAMP.pack(2, self.now_ms) + _text8(self.namespace) + _ctx(self.ctx)

    @classmethod
    def decode(cls, buf: bytes) -> NamespaceEntry:
        r = _Reader(buf, "namespace entry")
        v, now = r.unpack(_STAMP)
        _version(v, 2, r)
        ns = r.text8()
        ctx = _read_ctx(r)
        r.done()
        return cls(now, ns, ctx)
