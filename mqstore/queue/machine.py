"""The mail-queue state machine: applies log entries to the state tables, and plans entries.

Pure and deterministic: every function here reads and writes only through a :class:`KV` and takes
time only from the entry it applies (``now_ms``, stamped by the writer). Applying the same entries
in the same order to the same state gives the same state, on any machine.

Two kinds of functions:

- ``apply_*``: change state for one entry. They never raise for a request that became stale
  (a replica must apply every committed entry); they return what happened instead.
- ``plan_*`` / ``check_*``: read-only decisions the writer makes before appending entries
  (which recipients to lease, which leases expired, whether a token is stale).
"""

from __future__ import annotations

import hashlib
import heapq
import os
import struct
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from mqstore import limits
from mqstore.codec import Envelope, RecordType
from mqstore.compliance import rules
from mqstore.compliance.rules import SYSTEM_ACTOR, Ctx, Lock, Mode, Refusal
from mqstore.errors import InvalidArgument, StaleLease
from mqstore.ids import format_id
from mqstore.queue.kv import KV, LmdbKV, first, prefix_end
from mqstore.queue.model import (
    BOUNCED,
    COMPACT_DEDUP,
    COMPACT_MESSAGE,
    DEFERRED,
    DELIVERED,
    EXPIRE_LEASE,
    EXPIRE_MESSAGE,
    EXPIRED,
    FINAL,
    FINISHED,
    GIVEN_UP,
    HELD,
    LEASED,
    QUEUED,
    STATE_NAMES,
    U64,
    WAITING,
    AdminEntry,
    BounceMessageEntry,
    DenialEntry,
    LeaseEntry,
    LeaseRow,
    LegalHoldEntry,
    MaintenanceEntry,
    MessageRow,
    NamespaceEntry,
    Policy,
    PolicyEntry,
    RecipientRow,
    RetentionEntry,
    SettleEntry,
    domain_of,
    mid_ord,
    ns_key,
    ready_dom_key,
    ready_key,
    time_key,
)

#: The compiled hot paths (``ext/_machine.pyx``): enqueue, lease and settle on an LMDB store in
#: namespaces without a compliance mode; everything else, and everything under
#: ``MQSTORE_PURE_PYTHON=1``, runs the Python below, which defines the behaviour.
_fast: Any = None
if os.environ.get("MQSTORE_PURE_PYTHON", "") in ("", "0"):
    from mqstore import _machine as _fast

#: Postfix defaults (minimal_backoff_time, maximal_backoff_time).
BACKOFF_MIN_MS = 300_000
BACKOFF_MAX_MS = 4_000_000
BACKOFF_JITTER = 0.1  # +-10%, so retries of many messages do not arrive in lockstep

_STATS_LIVE = "messages.live"
_STATS_STORED = "messages.stored"
_STATS_BYTES = "bytes"


# --- counters ------------------------------------------------------------------------------------


class AuditSink(Protocol):
    """Where audit records go: appended in the same transaction as the change they describe
    (if appending raises, the change is not made)."""

    def append(self, kv: KV, fields: dict[str, Any], time_ms: int) -> int: ...

    def checkpoint(self, kv: KV, time_ms: int) -> Any: ...

    def tick(self, kv: KV, time_ms: int) -> Any: ...


class Counters:
    """Per-write context of the machine: stats deltas, flushed once (one read-modify-write per
    counter touched); cached namespace policies (they change only through POLICY entries, which
    update the cache); the audit sink; and the highest compliance time applied (persisted, so the
    compliance clock never goes back)."""

    __slots__ = ("audit", "bounded", "clock_loaded", "clock_ms", "deltas", "hmac", "index", "policies")

    def __init__(self, audit: AuditSink | None = None, hmac: Callable[[str], str] | None = None) -> None:
        self.deltas: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.policies: dict[str, Policy] = {}
        self.audit = audit
        self.hmac = hmac  # recipient address -> keyed digest (audit records never hold addresses)
        self.clock_ms = 0
        self.clock_loaded = False
        self.index = 0  # log index of the entry being applied
        #: The context :meth:`observe` last bounded, and the compliance time it claimed.
        self.bounded: tuple[Ctx, int] | None = None

    def policy(self, kv: KV, namespace: str) -> Policy:
        policy = self.policies.get(namespace)
        if policy is None:
            policy = self.policies[namespace] = get_policy(kv, namespace)
        return policy

    def add(self, namespace: str, name: str, delta: int) -> None:
        self.deltas[(namespace, name)] += delta

    def state(self, namespace: str, state: int, delta: int) -> None:
        self.deltas[(namespace, STATE_NAMES[state])] += delta

    def observe(self, ctx: Ctx, stamp_ms: int) -> Ctx:
        """Take the compliance time of the entry being applied, stamped ``stamp_ms``: counted at
        most ``rules.COMPLIANCE_AHEAD_MAX_MS`` ahead of the stamp (see :func:`rules.bounded`).
        Returns the context to judge and audit the entry with."""
        judged = rules.bounded(ctx, stamp_ms)
        self.bounded = None if judged is ctx else (judged, ctx.compliance_ms)
        if judged.compliance_ms > self.clock_ms:
            self.clock_ms = judged.compliance_ms
        return judged

    def flush(self, kv: KV) -> None:
        for (ns, name), delta in self.deltas.items():
            if delta:
                key = ns_key(ns) + name.encode()
                old = kv.get(b"stats", key)
                value = (int.from_bytes(old, "little", signed=True) if old else 0) + delta
                kv.put(b"stats", key, value.to_bytes(8, "little", signed=True))
        self.deltas.clear()
        if self.clock_ms and self.clock_ms > compliance_clock_ms(kv):
            kv.put(b"qmeta", _CLOCK_KEY, _I64.pack(self.clock_ms))


_CLOCK_KEY = b"compliance.clock"
_I64 = struct.Struct("<q")


def compliance_clock_ms(kv: KV) -> int:
    """The highest compliance time any applied entry carried (0: none yet)."""
    raw = kv.get(b"qmeta", _CLOCK_KEY)
    return _I64.unpack(raw)[0] if raw else 0


def read_stats(kv: KV) -> dict[str, dict[str, int]]:
    """All counters, by namespace."""
    out: dict[str, dict[str, int]] = defaultdict(dict)
    for key, value in kv.scan(b"stats", b""):
        ns, _, name = key.partition(b"\x00")
        out[ns.decode()][name.decode()] = int.from_bytes(value, "little", signed=True)
    return dict(out)


def namespaces(kv: KV) -> list[str]:
    """Namespaces that have (or had) messages, in bytewise order."""
    seen: list[str] = []
    start = b""
    while True:
        item = first(kv, b"stats", start)
        if item is None:
            return seen
        ns = item[0].partition(b"\x00")[0]
        seen.append(ns.decode())
        start = ns + b"\x01"


# --- row helpers ----------------------------------------------------------------------------------


def get_message(kv: KV, mid: bytes) -> MessageRow | None:
    raw = kv.get(b"messages", mid)
    return None if raw is None else MessageRow.decode(raw)


def get_recipient(kv: KV, mid: bytes, ordinal: int) -> RecipientRow | None:
    raw = kv.get(b"recipients", mid_ord(mid, ordinal))
    return None if raw is None else RecipientRow.decode(raw)


def recipients_of(kv: KV, mid: bytes) -> list[tuple[int, RecipientRow]]:
    out = []
    for key, value in kv.scan(b"recipients", mid, prefix_end(mid)):
        out.append((int.from_bytes(key[16:18], "big"), RecipientRow.decode(value)))
    return out


def get_policy(kv: KV, namespace: str) -> Policy:
    raw = kv.get(b"policies", namespace.encode())
    return Policy() if raw is None else Policy.decode(raw)


def _add_ready(kv: KV, row: MessageRow, mid: bytes, ordinal: int, rcpt: RecipientRow) -> None:
    ns0 = ns_key(row.namespace)
    kv.put(b"ready", ready_key(ns0, row.priority, rcpt.due_ms, mid, ordinal), rcpt.domain.encode())
    kv.put(b"ready_dom", ready_dom_key(ns0, rcpt.domain, row.priority, rcpt.due_ms, mid, ordinal), b"")


def _remove_ready(kv: KV, row: MessageRow, mid: bytes, ordinal: int, rcpt: RecipientRow) -> None:
    ns0 = ns_key(row.namespace)
    kv.delete(b"ready", ready_key(ns0, row.priority, rcpt.due_ms, mid, ordinal))
    kv.delete(b"ready_dom", ready_dom_key(ns0, rcpt.domain, row.priority, rcpt.due_ms, mid, ordinal))


def _attempted(attempts: int) -> int:
    """A recipient's attempt count after one more attempt: it stops at
    ``limits.RECIPIENT_ATTEMPTS_MAX`` (a u16 in the row), where the next attempt would not fit."""
    return attempts + 1 if attempts < limits.RECIPIENT_ATTEMPTS_MAX else limits.RECIPIENT_ATTEMPTS_MAX


def _set_state(row: MessageRow, c: Counters, old: int, new: int) -> None:
    if old == new:
        return
    row.counts[old - 1] -= 1
    row.counts[new - 1] += 1
    c.state(row.namespace, old, -1)
    c.state(row.namespace, new, +1)


def _maybe_finish(kv: KV, c: Counters, mid: bytes, row: MessageRow, now_ms: int) -> None:
    if row.finished:
        return
    if sum(row.counts[s - 1] for s in FINAL) != row.n_rcpts:
        return
    policy = c.policy(kv, row.namespace)
    retention = policy.retention_ms
    if row.count(EXPIRED) or row.flags & GIVEN_UP:  # the MTA sends a DSN for these: keep them for it
        retention = max(retention, policy.expired_retention_ms)
    row.flags |= FINISHED
    row.finished_ms = now_ms
    row.retain_until_ms = now_ms + retention
    kv.delete(b"live", mid)
    if row.expires_at_ms:
        kv.delete(b"expiry", time_key(row.expires_at_ms, mid))  # may be gone already
    key = retention_key(kv, mid, row)
    if key is not None:
        kv.put(b"retention", key, b"")
    c.add(row.namespace, _STATS_LIVE, -1)


# --- compliance -------------------------------------------------------------------------------------
#
# Every change that could remove a message or weaken its protection decides through
# rules.check, here, inside the transaction that applies the entry: the embedded API, gRPC, the
# CLI, replication and maintenance all end up in these functions. A refusal changes nothing but
# the audit log (written in the same transaction) and is returned as Denied.


@dataclass(frozen=True, slots=True)
class Denied:
    """The enforcement function refused this entry: nothing changed except the audit log."""

    reason: str
    kind: str = "immutable"  # "permission", "immutable", "invalid" or "retry" (nothing done: do it again)


def has_holds(kv: KV, mid: bytes) -> bool:
    return first(kv, b"holds", mid, prefix_end(mid)) is not None


def holds_of(kv: KV, mid: bytes) -> tuple[str, ...]:
    """Case ids of the legal holds on a message, sorted."""
    return tuple(key[16:].decode("utf-8") for key, _ in kv.scan(b"holds", mid, prefix_end(mid)))


def lock_of(kv: KV, mid: bytes, row: MessageRow) -> Lock:
    return Lock(row.namespace, Mode(row.lock_mode), row.lock_until_ms, holds_of(kv, mid) if row.lock_mode or
                has_holds(kv, mid) else ())


def _removable_at(row: MessageRow) -> int:
    """When compaction should look at a finished message (its retention index time)."""
    return max(row.retain_until_ms, row.lock_until_ms) if row.lock_mode else row.retain_until_ms


def retention_key(kv: KV, mid: bytes, row: MessageRow) -> bytes | None:
    """Where message ``mid``'s entry in the retention index belongs: keyed at when compaction
    should look at it (its housekeeping retention end; under a retention mode the later of that
    and its lock end). None when it has none: it is not finished, or a legal hold keeps it out of
    the index while the hold lasts (with or without a retention mode: a held message is locked
    whatever its retention, and releasing its last hold puts it back)."""
    if not row.finished or has_holds(kv, mid):
        return None
    return time_key(_removable_at(row), mid)


def _lock_fields(lock: Lock) -> dict[str, Any]:
    return {"mode": lock.mode.name.lower(), "retain_until_ms": lock.lock_until_ms, "holds": list(lock.holds)}


def audit(kv: KV, c: Counters, ctx: Ctx, op: str, *, target: str = "", namespace: str = "",
          outcome: str = "allowed", reason: str = "", before: dict[str, Any] | None = None,
          after: dict[str, Any] | None = None, **extra: Any) -> None:
    """Append one audit record (no-op without a sink)."""
    if c.audit is None:
        return
    actor = ctx.actor
    fields: dict[str, Any] = {
        "op": op,
        "target": target,
        "namespace": namespace,
        "outcome": outcome,
        "reason": reason,
        "actor": actor.name,
        "auth": actor.auth,
        "source": actor.source,
        "node": ctx.node_id,
        "site": ctx.site,
        "index": c.index,
        "wall": ctx.wall_ms,  # the record's "time" is the compliance clock
        "bypass": ctx.bypass,
        "bypass_reason": ctx.reason,
    }
    if before is not None:
        fields["before"] = before
    if after is not None:
        fields["after"] = after
    if c.bounded is not None and c.bounded[0] is ctx:
        fields["claimed_compliance_ms"] = c.bounded[1]  # more than a day ahead of the entry's stamp
    fields.update(extra)
    # Records are stamped with the compliance clock (the caller observed the entry's context),
    # which never goes back in the audit log even when entries stamped by different writers (or
    # without a clock) apply out of clock order.
    _load_clock(kv, c)
    c.audit.append(kv, fields, c.clock_ms)


def _load_clock(kv: KV, c: Counters) -> None:
    """Count the compliance time already applied (stored) in ``c``'s clock, once per write."""
    if not c.clock_loaded:
        c.clock_ms = max(c.clock_ms, compliance_clock_ms(kv))
        c.clock_loaded = True


def _deny(kv: KV, c: Counters, ctx: Ctx, op: str, refusal: Refusal, target: str, namespace: str,
          before: dict[str, Any] | None = None, **extra: Any) -> Denied:
    reason = refusal.reason
    if refusal.kind == "immutable" and c.bounded is not None and c.bounded[0] is ctx:
        reason += (f" (judged at {rules._time(ctx.compliance_ms)}: the request's compliance time "
                   f"{rules._time(c.bounded[1])} counts only up to a day ahead of its entry's time stamp)")
    audit(kv, c, ctx, op, target=target, namespace=namespace, outcome="denied", reason=reason,
          before=before, **extra)
    return Denied(reason, refusal.kind)


def _hmac_all(c: Counters, addresses: Iterable[str]) -> list[str]:
    return [c.hmac(a) for a in addresses] if c.hmac is not None else []


# --- apply ------------------------------------------------------------------------------------------


def apply_enqueue(kv: KV, c: Counters, index: int, env: Envelope, size_bytes: int, ctx: Ctx | None = None,
                  key_id: int = 0) -> bytes:
    """ENQUEUE: a new message with all recipients QUEUED. Returns the id the enqueue resolved to:
    its own, or that of the earlier message with the same idempotency key (still inside its
    window, judged at this entry's time), in which case nothing changes. The check is part of
    applying, so two enqueues with one key that were both accepted before either was applied
    (on a replicated leader, say) still store one message."""
    mid = env.message_id
    if env.idempotency_key:
        dup = find_duplicate(kv, env.namespace, env.idempotency_key, env.created_at_ms)
        if dup is not None:
            return dup
    if _fast is not None and isinstance(kv, LmdbKV):
        fast_policy = c.policy(kv, env.namespace)
        until = env.created_at_ms + fast_policy.dedup_window_ms
        if not fast_policy.mode and 0 <= until < 1 << 63:
            idem = env.idempotency_key.encode("utf-8") if env.idempotency_key else b""
            done = _fast.enqueue(kv._txn, kv._dbs, c.deltas, index, env, size_bytes, key_id, idem, until)
            if done is False:  # a message with this id exists
                return mid
            if done is not None:
                if ctx is not None:
                    c.observe(ctx, env.created_at_ms)
                return mid
    if kv.get(b"messages", mid) is not None:
        return mid
    n = len(env.recipients)
    row = MessageRow(
        namespace=env.namespace,
        priority=env.priority,
        n_rcpts=n,
        enqueue_index=index,
        created_ms=env.created_at_ms,
        expires_at_ms=env.expires_at_ms,
        size_bytes=size_bytes,
        idempotency_key=env.idempotency_key or "",
        key_id=key_id,
    )
    policy = c.policy(kv, env.namespace)
    if policy.mode:
        # Retention runs on the compliance clock: the entry's, or (an entry without one) the
        # later of its creation time and the highest compliance time applied so far.
        if ctx is not None and ctx.compliance_ms:
            start = ctx.compliance_ms
        else:
            start = max(env.created_at_ms, c.clock_ms, compliance_clock_ms(kv))
        row.lock_mode = policy.mode
        row.lock_until_ms = start + policy.lock_retention_ms
    row.counts[QUEUED - 1] = n
    due = max(env.not_before_ms, env.created_at_ms)
    ns0 = ns_key(env.namespace)
    for ordinal, address in enumerate(env.recipients):
        rcpt = RecipientRow(QUEUED, domain_of(address), due_ms=due)
        kv.put(b"recipients", mid_ord(mid, ordinal), rcpt.encode())
        _add_ready(kv, row, mid, ordinal, rcpt)
    kv.put(b"messages", mid, row.encode())
    kv.put(b"live", mid, b"")
    kv.put(b"msg_ns", ns0 + mid, b"")
    if env.expires_at_ms:
        kv.put(b"expiry", time_key(env.expires_at_ms, mid), b"")
    if env.idempotency_key:
        dkey = ns0 + env.idempotency_key.encode()
        old = kv.get(b"dedup", dkey)
        if old is not None:  # the key's earlier window passed (else this was a duplicate)
            kv.delete(b"dedup_exp", time_key(U64.unpack(old[16:24])[0], dkey))
        until = env.created_at_ms + policy.dedup_window_ms
        kv.put(b"dedup", dkey, mid + U64.pack(until))
        kv.put(b"dedup_exp", time_key(until, dkey), b"")
    c.state(env.namespace, QUEUED, n)
    c.add(env.namespace, _STATS_LIVE, 1)
    c.add(env.namespace, _STATS_STORED, 1)
    c.add(env.namespace, _STATS_BYTES, size_bytes)
    if ctx is not None:
        ctx = c.observe(ctx, env.created_at_ms)
    if row.lock_mode:
        audit(kv, c, ctx or Ctx(actor=SYSTEM_ACTOR), "enqueue", target=format_id(mid), namespace=env.namespace,
              after=_lock_fields(Lock(env.namespace, Mode(row.lock_mode), row.lock_until_ms, ())),
              recipients=_hmac_all(c, env.recipients), size=size_bytes, key_id=key_id)
    return mid


def find_duplicate(kv: KV, namespace: str, key: str, now_ms: int) -> bytes | None:
    """The message id enqueued earlier with this idempotency key, if still inside its window."""
    raw = kv.get(b"dedup", ns_key(namespace) + key.encode())
    if raw is None:
        return None
    mid, until = raw[:16], U64.unpack(raw[16:24])[0]
    return mid if now_ms < until else None


@dataclass(frozen=True, slots=True)
class Grant:
    """What a LEASE entry granted: the ordinals, the most attempts among them, and where the
    message's body is (so the lease can be built without reading the state again)."""

    ordinals: tuple[int, ...]
    attempts: int = 0
    enqueue_index: int = 0


_NO_GRANT = Grant(())


def apply_lease(kv: KV, c: Counters, token: int, e: LeaseEntry) -> Grant:
    """LEASE: grant the entry's recipients that are still waiting and due; returns the grant.

    A recipient already leased (or final, or held) is skipped, so a recipient is never leased to
    two workers at once even if two grants for it were planned concurrently. Nothing of a message
    whose lifetime has passed (``expires_at_ms`` at or before the entry's time) is granted, even
    while its expiry is not yet applied (more expiries were due than one EXPIRE entry holds, or
    a replicated leader planned the lease beside the expiry): it expires, it is not delivered.
    """
    if _fast is not None and isinstance(kv, LmdbKV):
        got = _fast.lease(kv._txn, kv._dbs, c.deltas, token, e.mid, tuple(e.ordinals), e.now_ms, e.deadline_ms,
                          e.worker.encode())
        if got is False:  # the message is gone or held
            return _NO_GRANT
        if got is not None:
            c.observe(e.ctx, e.now_ms)
            return Grant(*got) if got[0] else _NO_GRANT
    row = get_message(kv, e.mid)
    if row is None or row.held:
        return _NO_GRANT
    granted = []
    attempts = 0
    for ordinal in () if _expired(row, e.now_ms) else e.ordinals:
        rcpt = get_recipient(kv, e.mid, ordinal)
        if rcpt is None or rcpt.state not in WAITING or rcpt.due_ms > e.now_ms:
            continue
        _remove_ready(kv, row, e.mid, ordinal, rcpt)
        _set_state(row, c, rcpt.state, LEASED)
        rcpt.state = LEASED
        rcpt.token = token
        rcpt.deadline_ms = e.deadline_ms
        kv.put(b"recipients", mid_ord(e.mid, ordinal), rcpt.encode())
        granted.append(ordinal)
        attempts = max(attempts, rcpt.attempts)
    ctx = c.observe(e.ctx, e.now_ms)
    if not granted:
        return _NO_GRANT
    kv.put(b"messages", e.mid, row.encode())
    kv.put(b"leases", U64.pack(token), LeaseRow(e.mid, e.deadline_ms, tuple(granted), e.worker).encode())
    kv.put(b"lease_due", time_key(e.deadline_ms, U64.pack(token)), b"")
    if row.lock_mode:
        audit(kv, c, ctx, "lease", target=format_id(e.mid), namespace=row.namespace, ordinals=granted,
              worker=e.worker, token=token, deadline_ms=e.deadline_ms)
    return Grant(tuple(granted), attempts, row.enqueue_index)


def _expired(row: MessageRow, now_ms: int) -> bool:
    """Whether the message's lifetime has passed at ``now_ms`` (so it is leased no more)."""
    return bool(row.expires_at_ms) and row.expires_at_ms <= now_ms


def check_settle(kv: KV, token: int, ordinals: Iterable[int] | None) -> tuple[LeaseRow, tuple[int, ...]]:
    """The lease ``token`` and the ordinals to settle (all of the lease's when None).

    Raises :class:`StaleLease` when the token is unknown or does not cover every ordinal, and
    :class:`InvalidArgument` when it is not an integer at all (as the Client does)."""
    if isinstance(token, bool) or not isinstance(token, int):
        raise InvalidArgument(f"a lease token is an integer, not {type(token).__name__}")
    if not 0 < token < 2**64:
        raise StaleLease(f"{token!r} is not a lease token")
    raw = kv.get(b"leases", U64.pack(token))
    if raw is None:
        raise StaleLease(f"lease {token} is not held (expired, settled, or never granted)")
    lease = LeaseRow.decode(raw)
    ords = lease.ordinals if ordinals is None else tuple(ordinals)
    if not ords:
        raise StaleLease(f"no recipients given for lease {token}")
    missing = [o for o in ords if o not in lease.ordinals]
    if missing:
        raise StaleLease(f"lease {token} does not hold recipient(s) {missing}")
    if len(set(ords)) != len(ords):
        raise StaleLease(f"a recipient is listed twice for lease {token}")
    return lease, ords


_SETTLE_STATE = {RecordType.ACK: DELIVERED, RecordType.BOUNCE: BOUNCED, RecordType.DEFER: DEFERRED}


def apply_settle(kv: KV, c: Counters, rtype: int, e: SettleEntry, checked: LeaseRow | None = None) -> bool:
    """ACK / DEFER / BOUNCE. All or nothing: False (and no change) if the lease is stale.

    ``checked`` is the lease row when the caller has just verified the entry with
    :func:`check_settle` in this same transaction (it saves reading it again)."""
    if checked is not None:
        lease, ords = checked, e.ordinals
    else:
        try:
            lease, ords = check_settle(kv, e.token, e.ordinals)
        except StaleLease:
            return False
    if _fast is not None and isinstance(kv, LmdbKV):
        done = _fast.settle(kv._txn, kv._dbs, c, kv, _SETTLE_STATE[RecordType(rtype)], e.token, lease.mid,
                            tuple(lease.ordinals), lease.deadline_ms, lease.worker.encode(), tuple(ords), e.now_ms,
                            tuple(e.next_attempt_ms), e.reason)
        if done is not None:
            if done:
                c.observe(e.ctx, e.now_ms)
            return bool(done)
    row = get_message(kv, lease.mid)
    if row is None:
        return False
    rcpts = []
    for ordinal in ords:
        rcpt = get_recipient(kv, lease.mid, ordinal)
        if rcpt is None or rcpt.state != LEASED or rcpt.token != e.token:
            return False
        rcpts.append(rcpt)
    target = _SETTLE_STATE[RecordType(rtype)]
    for i, (ordinal, rcpt) in enumerate(zip(ords, rcpts, strict=True)):
        new = target
        rcpt.attempts = _attempted(rcpt.attempts)
        if target == DEFERRED:
            if row.expires_at_ms and e.now_ms >= row.expires_at_ms:
                new = EXPIRED
            else:
                rcpt.due_ms = e.next_attempt_ms[i] if i < len(e.next_attempt_ms) else e.now_ms
        if e.reason:
            rcpt.reason = e.reason
        _set_state(row, c, LEASED, new)
        rcpt.state = new
        rcpt.token = 0
        rcpt.deadline_ms = 0
        kv.put(b"recipients", mid_ord(lease.mid, ordinal), rcpt.encode())
        if new in WAITING and not row.held:
            _add_ready(kv, row, lease.mid, ordinal, rcpt)
    _shrink_lease(kv, e.token, lease, ords)
    _maybe_finish(kv, c, lease.mid, row, e.now_ms)
    kv.put(b"messages", lease.mid, row.encode())
    ctx = c.observe(e.ctx, e.now_ms)
    if row.lock_mode:
        audit(kv, c, ctx, RecordType(rtype).name.lower(), target=format_id(lease.mid), namespace=row.namespace,
              ordinals=list(ords), token=e.token, finished=row.finished)
    return True


def _shrink_lease(kv: KV, token: int, lease: LeaseRow, settled: tuple[int, ...]) -> None:
    remaining = tuple(o for o in lease.ordinals if o not in settled)
    if remaining:
        kv.put(b"leases", U64.pack(token), LeaseRow(lease.mid, lease.deadline_ms, remaining, lease.worker).encode())
    else:
        kv.delete(b"leases", U64.pack(token))
        kv.delete(b"lease_due", time_key(lease.deadline_ms, U64.pack(token)))


_ADMIN_PERMISSION = {RecordType.HOLD: "hold", RecordType.RELEASE: "release", RecordType.REQUEUE: "requeue",
                     RecordType.DELETE: "delete"}


def apply_admin(kv: KV, c: Counters, rtype: int, e: AdminEntry) -> bool | Denied:
    """HOLD / RELEASE / REQUEUE / DELETE. False if the message does not exist; Denied if the
    actor may not, or (DELETE) retention or a legal hold forbid it."""
    ctx = c.observe(e.ctx, e.now_ms)
    row = get_message(kv, e.mid)
    if row is None:
        return False
    op = RecordType(rtype).name.lower()
    lock = lock_of(kv, e.mid, row)
    refusal = rules.check("delete" if rtype == RecordType.DELETE else "hold", ctx, lock,
                          permission=_ADMIN_PERMISSION[RecordType(rtype)])
    if refusal is not None:
        return _deny(kv, c, ctx, op, refusal, format_id(e.mid), row.namespace, _lock_fields(lock))
    audit(kv, c, ctx, op, target=format_id(e.mid), namespace=row.namespace, before=_lock_fields(lock))
    if rtype == RecordType.DELETE:
        remove_message(kv, c, e.mid, row)
        return True
    rcpts = recipients_of(kv, e.mid)
    if rtype == RecordType.HOLD:
        if not row.held:
            for ordinal, rcpt in rcpts:
                if rcpt.state in WAITING:
                    _remove_ready(kv, row, e.mid, ordinal, rcpt)
            row.flags |= HELD
    elif rtype == RecordType.RELEASE:
        if row.held:
            row.flags &= ~HELD
            for ordinal, rcpt in rcpts:
                if rcpt.state in WAITING:
                    _add_ready(kv, row, e.mid, ordinal, rcpt)
    elif rtype == RecordType.REQUEUE:
        for ordinal, rcpt in rcpts:
            if rcpt.state == DEFERRED and rcpt.due_ms > e.now_ms:
                if not row.held:
                    _remove_ready(kv, row, e.mid, ordinal, rcpt)
                rcpt.due_ms = e.now_ms
                kv.put(b"recipients", mid_ord(e.mid, ordinal), rcpt.encode())
                if not row.held:
                    _add_ready(kv, row, e.mid, ordinal, rcpt)
    else:
        raise AssertionError(f"not an admin record type: {rtype}")
    kv.put(b"messages", e.mid, row.encode())
    return True


#: The permission an operator's bounce of a whole message needs: it ends delivery for good (the
#: recipients get a DSN instead), as irreversible for delivery as deleting the message.
BOUNCE_MESSAGE_PERMISSION = "delete"


@dataclass(frozen=True, slots=True)
class BounceOutcome:
    """What a BOUNCE_MESSAGE entry did: recipients bounced, and leased ones left to their worker."""

    bounced: int
    left_leased: int


def apply_bounce_message(kv: KV, c: Counters, e: BounceMessageEntry) -> BounceOutcome | bool | Denied:
    """BOUNCE_MESSAGE: every QUEUED or DEFERRED recipient (the message held or not) becomes
    BOUNCED with the entry's reason, counted as an attempt like a worker's bounce. LEASED
    recipients are left alone (a delivery may be in flight: their worker settles them); final
    ones are untouched. False if the message does not exist; Denied if the actor may not.
    Retention never forbids it (the message is kept), as for HOLD."""
    ctx = c.observe(e.ctx, e.now_ms)
    row = get_message(kv, e.mid)
    if row is None:
        return False
    lock = lock_of(kv, e.mid, row)
    refusal = rules.check("hold", ctx, lock, permission=BOUNCE_MESSAGE_PERMISSION)
    if refusal is not None:
        return _deny(kv, c, ctx, "bounce_message", refusal, format_id(e.mid), row.namespace, _lock_fields(lock))
    bounced: list[int] = []
    leased: list[int] = []
    for ordinal, rcpt in recipients_of(kv, e.mid):
        if rcpt.state == LEASED:
            leased.append(ordinal)
            continue
        if rcpt.state not in WAITING:
            continue
        if not row.held:
            _remove_ready(kv, row, e.mid, ordinal, rcpt)
        _set_state(row, c, rcpt.state, BOUNCED)
        rcpt.state = BOUNCED
        rcpt.attempts = _attempted(rcpt.attempts)
        if e.reason:
            rcpt.reason = e.reason
        kv.put(b"recipients", mid_ord(e.mid, ordinal), rcpt.encode())
        bounced.append(ordinal)
    if bounced:
        row.flags |= GIVEN_UP
        _maybe_finish(kv, c, e.mid, row, e.now_ms)
        kv.put(b"messages", e.mid, row.encode())
    audit(kv, c, ctx, "bounce_message", target=format_id(e.mid), namespace=row.namespace,
          before=_lock_fields(lock), ordinals=bounced, left_leased=leased, finished=row.finished)
    return BounceOutcome(len(bounced), len(leased))


def remove_message(kv: KV, c: Counters, mid: bytes, row: MessageRow) -> None:
    """Remove every trace of a message from the state tables (delete, compaction)."""
    for ordinal, rcpt in recipients_of(kv, mid):
        if rcpt.state in WAITING and not row.held:
            _remove_ready(kv, row, mid, ordinal, rcpt)
        if rcpt.state == LEASED and rcpt.token:
            raw = kv.get(b"leases", U64.pack(rcpt.token))
            if raw is not None:
                lease = LeaseRow.decode(raw)
                kv.delete(b"leases", U64.pack(rcpt.token))
                kv.delete(b"lease_due", time_key(lease.deadline_ms, U64.pack(rcpt.token)))
        c.state(row.namespace, rcpt.state, -1)
        kv.delete(b"recipients", mid_ord(mid, ordinal))
    kv.delete(b"messages", mid)
    kv.delete(b"msg_ns", ns_key(row.namespace) + mid)
    if row.finished:
        kv.delete(b"retention", time_key(_removable_at(row), mid))
    else:
        kv.delete(b"live", mid)
        if row.expires_at_ms:
            kv.delete(b"expiry", time_key(row.expires_at_ms, mid))
        c.add(row.namespace, _STATS_LIVE, -1)
    c.add(row.namespace, _STATS_STORED, -1)
    c.add(row.namespace, _STATS_BYTES, -row.size_bytes)


def apply_expire(kv: KV, c: Counters, e: MaintenanceEntry) -> int:
    """EXPIRE: leases past their deadline and messages past their lifetime. Returns items applied.

    Each item is re-checked against the entry's time, so applying it is safe even if the state
    changed since it was planned (the lease was settled meanwhile, say)."""
    ctx = c.observe(e.ctx, e.now_ms)
    done = 0
    for kind, value in e.items:
        if kind == EXPIRE_LEASE:
            done += _expire_lease(kv, c, U64.unpack(value)[0], e.now_ms, ctx)
        elif kind == EXPIRE_MESSAGE:
            done += _expire_message(kv, c, value, e.now_ms, ctx)
    return done


def _expire_lease(kv: KV, c: Counters, token: int, now_ms: int, ctx: Ctx) -> int:
    raw = kv.get(b"leases", U64.pack(token))
    if raw is None:
        return 0
    lease = LeaseRow.decode(raw)
    if lease.deadline_ms > now_ms:
        return 0
    row = get_message(kv, lease.mid)
    if row is None:
        kv.delete(b"leases", U64.pack(token))
        kv.delete(b"lease_due", time_key(lease.deadline_ms, U64.pack(token)))
        return 1
    for ordinal in lease.ordinals:
        rcpt = get_recipient(kv, lease.mid, ordinal)
        if rcpt is None or rcpt.state != LEASED or rcpt.token != token:
            continue
        rcpt.attempts = _attempted(rcpt.attempts)  # the worker vanished: that was an attempt
        new = EXPIRED if row.expires_at_ms and now_ms >= row.expires_at_ms else DEFERRED
        _set_state(row, c, LEASED, new)
        rcpt.state = new
        rcpt.token = 0
        rcpt.deadline_ms = 0
        rcpt.due_ms = now_ms
        kv.put(b"recipients", mid_ord(lease.mid, ordinal), rcpt.encode())
        if new in WAITING and not row.held:
            _add_ready(kv, row, lease.mid, ordinal, rcpt)
    kv.delete(b"leases", U64.pack(token))
    kv.delete(b"lease_due", time_key(lease.deadline_ms, U64.pack(token)))
    _maybe_finish(kv, c, lease.mid, row, now_ms)
    kv.put(b"messages", lease.mid, row.encode())
    if row.lock_mode:
        audit(kv, c, ctx, "lease_expired", target=format_id(lease.mid), namespace=row.namespace,
              ordinals=list(lease.ordinals), token=token)
    return 1


def _expire_message(kv: KV, c: Counters, mid: bytes, now_ms: int, ctx: Ctx) -> int:
    row = get_message(kv, mid)
    if row is None or row.finished or not row.expires_at_ms or now_ms < row.expires_at_ms:
        return 0
    # The lifetime is handled once: recipients leased now expire when their lease ends (the
    # settle and lease-expiry paths check expires_at), so nothing stays due in the index.
    kv.delete(b"expiry", time_key(row.expires_at_ms, mid))
    for ordinal, rcpt in recipients_of(kv, mid):
        if rcpt.state in WAITING:
            if not row.held:
                _remove_ready(kv, row, mid, ordinal, rcpt)
            _set_state(row, c, rcpt.state, EXPIRED)
            rcpt.state = EXPIRED
            kv.put(b"recipients", mid_ord(mid, ordinal), rcpt.encode())
    # Leased recipients expire when their lease ends (deferred or timed out after expiry).
    _maybe_finish(kv, c, mid, row, now_ms)
    kv.put(b"messages", mid, row.encode())
    if row.lock_mode:
        audit(kv, c, ctx, "expire", target=format_id(mid), namespace=row.namespace)
    return 1


#: A finished message whose compaction was refused is looked at again after at least this long.
_COMPACT_RETRY_MS = 60_000
#: Retention index entries put off by a refused scheduled compaction that one maintenance pass
#: passes over (see plan_compact): bounds the pass's time however many gathered.
PUT_OFF_SCAN_MAX = 4_096


def _compact_not_before(kv: KV, mid: bytes, row: MessageRow) -> int:
    """When scheduled compaction may look at finished message ``mid`` again after refusing it (0:
    any time): the value of its retention index entry (empty until a refusal)."""
    raw = kv.get(b"retention", time_key(_removable_at(row), mid))
    return _retention_not_before(raw) if raw is not None else 0


def _retention_not_before(value: bytes) -> int:
    return U64.unpack(value)[0] if len(value) == 8 else 0


def apply_compact(kv: KV, c: Counters, e: MaintenanceEntry) -> int | Denied:
    """COMPACT: drop finished messages whose retention passed, and dedup keys past their window.

    Scheduled compaction (the maintenance actor) removes messages whose housekeeping retention
    passed; a person's forced compaction needs the ``delete`` permission and skips housekeeping.
    Either way a message under retention or a legal hold stays: the refusal is audited and the
    message is looked at again when its lock should have ended. Returns items applied, or Denied
    when a person's forced compaction refused every message it named."""
    ctx = c.observe(e.ctx, e.now_ms)
    scheduled = ctx.actor == SYSTEM_ACTOR
    if not scheduled:
        refusal = rules.check("compact", ctx, None, permission="delete")
        if refusal is not None:
            return _deny(kv, c, ctx, "compact", refusal, f"{len(e.items)} item(s)", "")
    done = 0
    denied: Denied | None = None
    for kind, value in e.items:
        if kind == COMPACT_MESSAGE:
            row = get_message(kv, value)
            if row is None or not row.finished or (scheduled and (
                    row.retain_until_ms > e.now_ms or _compact_not_before(kv, value, row) > e.now_ms)):
                continue
            lock = lock_of(kv, value, row)
            # A person needs ``delete`` in the message's own namespace (an actor limited to some
            # namespaces compacts nothing outside them); retention and holds bind everyone.
            refusal = rules.check("compact", ctx, lock, permission=None if scheduled else "delete")
            if refusal is not None and refusal.kind == "permission":
                denied = _deny(kv, c, ctx, "compact", refusal, format_id(value), row.namespace)
                continue
            if refusal is not None:
                denied = _deny(kv, c, ctx, "compact", refusal, format_id(value), row.namespace, _lock_fields(lock))
                if scheduled and not lock.holds:
                    # Maintenance looks again when the lock should have ended, not at every pass: only
                    # the message's retention index entry says so (its value), in place, so every path
                    # that recomputes the entry from the row (a retention change, a hold) still finds
                    # it and starts afresh. The row is untouched: a refusal changes nothing else, and a
                    # person's refused forced compaction changes nothing at all (before, either moved
                    # the message's housekeeping retention to its lock end, which a governance bypass
                    # shortening the lock then no longer undid).
                    key = time_key(_removable_at(row), value)
                    if kv.get(b"retention", key) is not None:
                        kv.put(b"retention", key, U64.pack(e.now_ms + max(
                            lock.lock_until_ms - ctx.compliance_ms, _COMPACT_RETRY_MS)))
                continue
            if row.lock_mode or not scheduled:
                audit(kv, c, ctx, "compact", target=format_id(value), namespace=row.namespace,
                      before=_lock_fields(lock))
            remove_message(kv, c, value, row)
            done += 1
        elif kind == COMPACT_DEDUP:
            # ``value`` is the dedup_exp key: window end (u64 BE) + dedup key.
            until, dkey = U64.unpack(value[:8])[0], value[8:]
            if until > e.now_ms:
                continue
            kv.delete(b"dedup_exp", value)
            raw = kv.get(b"dedup", dkey)
            if raw is not None and U64.unpack(raw[16:24])[0] <= e.now_ms:
                kv.delete(b"dedup", dkey)
            done += 1
    if denied is not None and not done and not scheduled:
        return denied
    return done


def _policy_fields(p: Policy) -> dict[str, Any]:
    return {"mode": Mode(p.mode).name.lower(), "lock_retention_ms": p.lock_retention_ms,
            "lifetime_ms": p.lifetime_ms, "retention_ms": p.retention_ms}


def apply_policy(kv: KV, e: PolicyEntry, c: Counters) -> bool | Denied:
    """POLICY: a namespace's queue policy and immutability mode. A namespace in COMPLIANCE mode
    never leaves it nor shortens its retention; weakening GOVERNANCE needs a bypass."""
    ctx = c.observe(e.ctx, e.now_ms)
    current = get_policy(kv, e.namespace)
    refusal = rules.check("policy", ctx, None, permission="policy", namespace=e.namespace,
                          new_mode=Mode(e.policy.mode), new_default_ms=e.policy.lock_retention_ms,
                          current_mode=Mode(current.mode), current_default_ms=current.lock_retention_ms)
    if refusal is not None:
        return _deny(kv, c, ctx, "policy", refusal, e.namespace, e.namespace, _policy_fields(current),
                     requested=_policy_fields(e.policy))
    kv.put(b"policies", e.namespace.encode(), e.policy.encode())
    c.policies[e.namespace] = e.policy
    audit(kv, c, ctx, "policy", target=e.namespace, namespace=e.namespace, before=_policy_fields(current),
          after=_policy_fields(e.policy))
    return True


def apply_legal_hold(kv: KV, c: Counters, e: LegalHoldEntry) -> bool | Denied:
    """LEGAL_HOLD: add or remove the hold ``case``. False if the message does not exist or (remove)
    has no such hold. A message with any hold is locked whatever its retention."""
    ctx = c.observe(e.ctx, e.now_ms)
    row = get_message(kv, e.mid)
    if row is None:
        return False
    lock = lock_of(kv, e.mid, row)
    op = "legal_hold" if e.add else "release_legal_hold"
    refusal = rules.check("hold" if e.add else "release_hold", ctx, lock, permission="legal_hold")
    if refusal is not None:
        return _deny(kv, c, ctx, op, refusal, format_id(e.mid), row.namespace, _lock_fields(lock), case=e.case)
    key = e.mid + e.case.encode("utf-8")
    present = kv.get(b"holds", key) is not None
    if e.add == present:
        # Already held (True), or no such hold to release (False): nothing changes, but the request
        # is audited like any other (a second officer holding the same case leaves a trace).
        audit(kv, c, ctx, op, target=format_id(e.mid), namespace=row.namespace, before=_lock_fields(lock),
              after=_lock_fields(lock), case=e.case,
              unchanged="the message already has this hold" if e.add else "the message has no such hold")
        return e.add
    if e.add:
        kv.put(b"holds", key, _I64.pack(ctx.compliance_ms) + ctx.actor.name.encode())
        if row.finished and not lock.holds:
            kv.delete(b"retention", time_key(_removable_at(row), e.mid))
        holds = tuple(sorted((*lock.holds, e.case)))
    else:
        kv.delete(b"holds", key)
        holds = tuple(h for h in lock.holds if h != e.case)
        if row.finished and not holds:
            kv.put(b"retention", time_key(_removable_at(row), e.mid), b"")
    after = Lock(lock.namespace, lock.mode, lock.lock_until_ms, holds)
    audit(kv, c, ctx, op, target=format_id(e.mid), namespace=row.namespace, before=_lock_fields(lock),
          after=_lock_fields(after), case=e.case)
    return True


def apply_retention(kv: KV, c: Counters, e: RetentionEntry) -> bool | Denied:
    """RETENTION: set a message's lock end. Extending is always allowed (``retention``
    permission); shortening only in GOVERNANCE with a bypass, never under a legal hold."""
    ctx = c.observe(e.ctx, e.now_ms)
    row = get_message(kv, e.mid)
    if row is None:
        return False
    lock = lock_of(kv, e.mid, row)
    refusal = rules.check("retention", ctx, lock, permission="retention", new_until_ms=e.until_ms)
    if refusal is not None:
        return _deny(kv, c, ctx, "retention", refusal, format_id(e.mid), row.namespace, _lock_fields(lock),
                     requested_until_ms=e.until_ms)
    if row.finished and not lock.holds:
        kv.delete(b"retention", time_key(_removable_at(row), e.mid))
    row.lock_until_ms = e.until_ms
    if row.finished and not lock.holds:
        kv.put(b"retention", time_key(_removable_at(row), e.mid), b"")
    kv.put(b"messages", e.mid, row.encode())
    after = Lock(lock.namespace, lock.mode, e.until_ms, lock.holds)
    audit(kv, c, ctx, "retention", target=format_id(e.mid), namespace=row.namespace, before=_lock_fields(lock),
          after=_lock_fields(after))
    return True


def _messages_in(kv: KV, namespace: str) -> list[tuple[bytes, MessageRow]]:
    prefix = ns_key(namespace)
    out = []
    for key, _ in kv.scan(b"msg_ns", prefix, prefix_end(prefix)):
        mid = key[len(prefix):]
        row = get_message(kv, mid)
        if row is not None:
            out.append((mid, row))
    return out


def _first_refusal(kv: KV, op: str, ctx: Ctx, messages: list[tuple[bytes, MessageRow]]) -> tuple[Refusal, str] | None:
    refused = []
    for mid, row in messages:
        refusal = rules.check(op, ctx, lock_of(kv, mid, row))
        if refusal is not None:
            refused.append((mid, refusal))
    if not refused:
        return None
    mid, refusal = refused[0]
    more = f" (and {len(refused) - 1} more locked message(s))" if len(refused) > 1 else ""
    return Refusal(f"message {format_id(mid)}: {refusal.reason}{more}", refusal.kind), format_id(mid)


def apply_drop(kv: KV, c: Counters, e: NamespaceEntry) -> int | Denied:
    """DROP: remove every message of a namespace; refused (nothing removed) if any is retained
    or held. Returns how many messages were removed."""
    ctx = c.observe(e.ctx, e.now_ms)
    refusal = rules.check("drop", ctx, None, permission="delete", namespace=e.namespace)
    if refusal is not None:
        return _deny(kv, c, ctx, "drop_namespace", refusal, e.namespace, e.namespace)
    messages = _messages_in(kv, e.namespace)
    found = _first_refusal(kv, "drop", ctx, messages)
    if found is not None:
        return _deny(kv, c, ctx, "drop_namespace", found[0], e.namespace, e.namespace, first_locked=found[1])
    for mid, row in messages:
        remove_message(kv, c, mid, row)
    audit(kv, c, ctx, "drop_namespace", target=e.namespace, namespace=e.namespace, removed=len(messages))
    return len(messages)


def check_shred(kv: KV, c: Counters, key_id: int, namespace: str, ctx: Ctx) -> list[bytes] | Denied:
    """Whether namespace key ``key_id`` may be shredded: only when no message sealed under it, or
    keeping a delivery reason sealed under it, is retained, held or still in delivery. Returns the
    (finished, unlocked) messages under it, which go with the key; a refusal is audited."""
    refusal = rules.check("shred", ctx, None, permission="keys", namespace=namespace)
    if refusal is not None:
        return _deny(kv, c, ctx, "shred_key", refusal, str(key_id), namespace)
    messages = _messages_in(kv, namespace)
    under = [(mid, row) for mid, row in messages if row.key_id in (key_id, 0)]
    # A recipient's delivery reason is sealed under the key that was current when it was given:
    # a message sealed under an older key can keep reasons sealed under this one. They would go
    # unreadable with it, so they count like messages under the key (but do not go with it).
    keeping = [(mid, row) for mid, row in messages if row.key_id not in (key_id, 0)
               and any(_reason_key_id(r.reason) == key_id for _, r in recipients_of(kv, mid))]
    found = _first_refusal(kv, "shred", ctx, under)
    if found is None:
        found = _first_refusal(kv, "shred", ctx, keeping)
        if found is not None:
            found = (Refusal(f"{found[0].reason}; the delivery reasons it keeps are sealed under key {key_id}",
                             found[0].kind), found[1])
    if found is not None:
        return _deny(kv, c, ctx, "shred_key", found[0], str(key_id), namespace, first_locked=found[1])
    live = [mid for mid, row in under + keeping if not row.finished]
    if live:
        return _deny(kv, c, ctx, "shred_key", Refusal(
            f"{len(live)} message(s) sealed under key {key_id} (or keeping delivery reasons sealed under it) are "
            f"still being delivered (first: {format_id(live[0])}); shredding would make them unreadable", "invalid"),
            str(key_id), namespace)
    return [mid for mid, _ in under]


def _reason_key_id(reason: bytes) -> int:
    """The key a recipient's last delivery reason is sealed under (0: it has none)."""
    return int.from_bytes(reason[:4], "little") if len(reason) >= 4 else 0


def apply_shred(kv: KV, c: Counters, key_id: int, namespace: str, ctx: Ctx, now_ms: int | None = None) -> int | Denied:
    """Shred a namespace key: the messages under it (finished, unlocked) go with it. ``now_ms`` is
    the shred's time stamp (None: the request context's wall time)."""
    ctx = c.observe(ctx, ctx.wall_ms if now_ms is None else now_ms)
    found = check_shred(kv, c, key_id, namespace, ctx)
    if isinstance(found, Denied):
        return found
    for mid in found:
        row = get_message(kv, mid)
        if row is not None:
            remove_message(kv, c, mid, row)
    audit(kv, c, ctx, "shred_key", target=str(key_id), namespace=namespace, removed=len(found))
    return len(found)


def apply_key_created(kv: KV, c: Counters, key_id: int, namespace: str, ctx: Ctx | None,
                      now_ms: int | None = None) -> None:
    """A new namespace key (rotation): audited when someone asked for it. ``now_ms`` is the key's
    time stamp (None: the request context's wall time)."""
    if ctx is not None:
        ctx = c.observe(ctx, ctx.wall_ms if now_ms is None else now_ms)
        audit(kv, c, ctx, "rotate_key", target=str(key_id), namespace=namespace)


#: The AUDIT entry ``op`` that asks for a signed audit checkpoint (``audit export-checkpoint``).
CHECKPOINT_OP = "audit_checkpoint"
#: The AUDIT entry ``op`` maintenance writes when a quiet log's last records wait for a time-based
#: checkpoint (records arriving are what writes one otherwise): it adds no record of its own.
TICK_OP = "audit_tick"


def apply_denial(kv: KV, c: Counters, e: DenialEntry) -> Denied | None:
    """AUDIT: an entry only the audit log sees: a request refused before it became an entry of
    its own (a permission check at the API), or a request for a checkpoint."""
    ctx = c.observe(e.ctx, e.now_ms)
    if e.op == CHECKPOINT_OP:
        if c.audit is not None:
            audit(kv, c, ctx, CHECKPOINT_OP, target="audit")
            c.audit.checkpoint(kv, c.clock_ms)
        return None
    if e.op == TICK_OP:
        if c.audit is not None:
            _load_clock(kv, c)  # as audit() does: what earlier writes applied counts, not only this batch
            c.audit.tick(kv, c.clock_ms)
        return None
    return _deny(kv, c, ctx, e.op, Refusal(e.reason, "permission"), e.target, "")


# --- planning (read-only) ---------------------------------------------------------------------------


def backoff_ms(policy: Policy, attempts: int, mid: bytes, ordinal: int) -> int:
    """Delay before the next attempt, after ``attempts`` attempts (>= 1).

    An explicit schedule is used as given (its last step repeats). The default follows Postfix:
    300 s, doubling, at most 4000 s, with +-10% jitter derived from the message id, recipient and
    attempt, so every replica planning it would pick the same time (only the writer plans). The
    jitter never takes a delay outside Postfix's minimum and maximum (300..4000 s)."""
    attempts = max(attempts, 1)
    if policy.backoff_ms:
        return policy.backoff_ms[min(attempts, len(policy.backoff_ms)) - 1]
    base = min(BACKOFF_MIN_MS * (1 << min(attempts - 1, 20)), BACKOFF_MAX_MS)
    digest = hashlib.blake2b(mid + bytes((ordinal & 0xFF, ordinal >> 8, attempts & 0xFF)), digest_size=4).digest()
    unit = int.from_bytes(digest, "big") / 0xFFFFFFFF  # 0..1
    return min(max(int(base * (1 - BACKOFF_JITTER + 2 * BACKOFF_JITTER * unit)), BACKOFF_MIN_MS), BACKOFF_MAX_MS)


@dataclass(frozen=True, slots=True)
class LeasePlan:
    mid: bytes
    ordinals: tuple[int, ...]


#: What a lease answer carries besides the body, at most, for plan_lease's ``bytes_max``: per lease
#: its id, token, namespace, sender, counters and framing; per recipient its address and framing.
LEASE_OVERHEAD_BYTES = 1024
LEASE_RECIPIENT_BYTES = limits.ADDRESS_BYTES_MAX + 8
assert 26 + limits.NAMESPACE_BYTES_MAX + limits.ADDRESS_BYTES_MAX + 128 <= LEASE_OVERHEAD_BYTES


def lease_answer_bytes(body_bytes: int, recipients: int) -> int:
    """Upper bound of the bytes a lease of a ``body_bytes`` body to ``recipients`` adds to an answer."""
    return body_bytes + LEASE_OVERHEAD_BYTES + recipients * LEASE_RECIPIENT_BYTES


def _due_in_namespace(kv: KV, ns: str, domain: str | None, now_ms: int) -> Iterator[tuple[bytes, bytes, int]]:
    """Waiting recipients of one namespace that are due, by (priority, due time, id, ordinal).

    Yields ``(sort key, message id, ordinal)``. Within a priority level the index is ordered by
    due time, so the scan stops at the first not-yet-due entry and jumps to the next level: the
    cost depends on what is due, not on how many messages are queued."""
    table = b"ready" if domain is None else b"ready_dom"
    prefix = ns_key(ns) if domain is None else ns_key(ns) + domain.encode() + b"\x00"
    stop_all = prefix_end(prefix)
    level_start = prefix
    while True:
        head = first(kv, table, level_start, stop_all)
        if head is None:
            return
        level = head[0][len(prefix)]
        level_prefix = prefix + bytes((level,))
        for key, _ in kv.scan(table, level_prefix, level_prefix + U64.pack(now_ms + 1)):
            rest = key[len(prefix) :]
            yield rest[:9], rest[9:25], int.from_bytes(rest[25:27], "big")
        if level == 255:
            return
        level_start = prefix + bytes((level + 1,))


def plan_lease(
    kv: KV,
    now_ms: int,
    max_messages: int,
    namespace: str | None = None,
    domain: str | None = None,
    exclude: set[bytes] | None = None,
    bytes_max: int | None = None,
) -> list[LeasePlan]:
    """Choose up to ``max_messages`` messages with due recipients: highest priority first, then
    the longest-due; each plan holds all of that message's due recipients (in ``domain`` if given).
    Messages in ``exclude`` are skipped (a replicated leader's grants not yet applied).
    ``bytes_max``: stop before the message whose lease would take the answer's size (bodies plus
    :func:`lease_answer_bytes`' overhead) over it; the first message is always planned. None: no
    bound (the embedded store, whose leases are not sent anywhere).
    """
    spaces = [namespace] if namespace is not None else namespaces(kv)
    streams = [_due_in_namespace(kv, ns, domain, now_ms) for ns in spaces]
    candidates = heapq.merge(*streams) if len(streams) > 1 else (streams[0] if streams else iter(()))
    # Messages whose lifetime passed are not leased (apply_lease grants them nothing); while
    # some such expiry is not yet applied, each candidate's lifetime is checked here too, so
    # the plan still fills up with messages that can be delivered.
    overdue = first(kv, b"expiry", b"", U64.pack(max(now_ms, 0) + 1)) is not None
    seen: set[bytes] = set()
    plans: list[LeasePlan] = []
    picked: list[bytes] = []
    for _sort, mid, _ordinal in candidates:
        if mid in seen or (exclude and mid in exclude):
            continue
        seen.add(mid)
        if overdue:
            row = get_message(kv, mid)
            if row is None or _expired(row, now_ms):
                continue
        picked.append(mid)
        if len(picked) >= max_messages:
            break
    # Collect each message's due recipients after the scan (never write while scanning).
    if _fast is not None and isinstance(kv, LmdbKV):
        fast, txn, db = _fast, kv._txn, kv._dbs[b"recipients"]
        dom = None if domain is None else domain.encode()

        def due(mid: bytes) -> tuple[int, ...]:
            ords: tuple[int, ...] = fast.due_ordinals(txn, db, mid, now_ms, dom)
            return ords
    else:

        def due(mid: bytes) -> tuple[int, ...]:
            return tuple(
                o
                for o, r in recipients_of(kv, mid)
                if r.state in WAITING and r.due_ms <= now_ms and (domain is None or r.domain == domain)
            )

    left = bytes_max
    for mid in picked:
        ords = due(mid)
        if not ords:
            continue
        if left is not None:
            row = get_message(kv, mid)
            size = lease_answer_bytes(row.size_bytes if row is not None else 0, len(ords))
            if plans and size > left:
                break  # the rest stay due, for the next call (in order: a large one is not passed over)
            left -= size
        plans.append(LeasePlan(mid, ords))
    return plans


def plan_expire(kv: KV, now_ms: int, limit: int) -> list[tuple[int, bytes]]:
    """Leases whose deadline passed and unfinished messages whose lifetime passed (up to limit)."""
    items: list[tuple[int, bytes]] = []
    for key, _ in kv.scan(b"lease_due", b"", U64.pack(now_ms + 1)):
        items.append((EXPIRE_LEASE, key[8:16]))
        if len(items) >= limit:
            return items
    for key, _ in kv.scan(b"expiry", b"", U64.pack(now_ms + 1)):
        items.append((EXPIRE_MESSAGE, key[8:24]))
        if len(items) >= limit:
            break
    return items


def plan_compact(kv: KV, now_ms: int, limit: int) -> list[tuple[int, bytes]]:
    """Finished messages whose retention passed, and dedup keys past their window (up to limit)."""
    items: list[tuple[int, bytes]] = []
    put_off = 0
    for key, value in kv.scan(b"retention", b"", U64.pack(now_ms + 1)):
        if _retention_not_before(value) > now_ms:
            # Refused by a scheduled compaction: not before its lock should have ended. Passed
            # over, but only so many per pass (they gather at the head of the index after the
            # compliance clock lagged): those behind them wait until they come due.
            put_off += 1
            if put_off >= PUT_OFF_SCAN_MAX:
                break
            continue
        items.append((COMPACT_MESSAGE, key[8:24]))
        if len(items) >= limit:
            return items
    for key, _ in kv.scan(b"dedup_exp", b"", U64.pack(now_ms + 1)):
        items.append((COMPACT_DEDUP, key))
        if len(items) >= limit:
            break
    return items


def next_timer_ms(kv: KV) -> int | None:
    """The earliest time at which maintenance has something to do (None: nothing pending)."""
    times = []
    for table in (b"lease_due", b"expiry", b"dedup_exp"):
        head = first(kv, table, b"")
        if head is not None:
            times.append(U64.unpack(head[0][:8])[0])
    # The retention index: its first entry, unless a refusal put it off (see apply_compact); then
    # the earliest of those put off and the first entry not put off (the keys are in time order).
    retention: int | None = None
    for seen, (key, value) in enumerate(kv.scan(b"retention", b"")):
        at = U64.unpack(key[:8])[0]
        if retention is not None and (at >= retention or seen >= PUT_OFF_SCAN_MAX):
            break  # (as plan_compact passes over at most PUT_OFF_SCAN_MAX put-off entries)
        due = max(at, _retention_not_before(value))
        retention = due if retention is None else min(retention, due)
    if retention is not None:
        times.append(retention)
    return min(times) if times else None


__all__ = [
    "BOUNCE_MESSAGE_PERMISSION",
    "AuditSink",
    "BounceOutcome",
    "Counters",
    "Denied",
    "Grant",
    "LeasePlan",
    "StaleLease",
    "apply_admin",
    "apply_bounce_message",
    "apply_compact",
    "apply_denial",
    "apply_drop",
    "apply_enqueue",
    "apply_expire",
    "apply_lease",
    "apply_legal_hold",
    "apply_policy",
    "apply_retention",
    "apply_settle",
    "apply_shred",
    "audit",
    "backoff_ms",
    "check_settle",
    "check_shred",
    "compliance_clock_ms",
    "find_duplicate",
    "get_message",
    "get_policy",
    "holds_of",
    "lock_of",
    "namespaces",
    "next_timer_ms",
    "plan_compact",
    "plan_expire",
    "plan_lease",
    "read_stats",
    "recipients_of",
    "retention_key",
]


# --- dispatch ---------------------------------------------------------------------------------------

_ADMIN_TYPES = frozenset((RecordType.HOLD, RecordType.RELEASE, RecordType.REQUEUE, RecordType.DELETE))
_SETTLE_TYPES = frozenset((RecordType.ACK, RecordType.DEFER, RecordType.BOUNCE))
#: Record types that carry no queue state (framework records; KEY is applied by the store).
PASSIVE_TYPES = frozenset(
    (RecordType.NOOP, RecordType.CONFIG, RecordType.KEY, RecordType.BLOB, RecordType.DICTIONARY, RecordType.MEMBERS)
)


def decode_entry(rtype: int, payload: bytes) -> object:
    """Decode the payload of a queue record other than ENQUEUE (which is sealed)."""
    if rtype == RecordType.LEASE:
        return LeaseEntry.decode(payload)
    if rtype in _SETTLE_TYPES:
        return SettleEntry.decode(payload)
    if rtype in _ADMIN_TYPES:
        return AdminEntry.decode(payload)
    if rtype in (RecordType.EXPIRE, RecordType.COMPACT):
        return MaintenanceEntry.decode(payload)
    if rtype == RecordType.POLICY:
        return PolicyEntry.decode(payload)
    if rtype == RecordType.LEGAL_HOLD:
        return LegalHoldEntry.decode(payload)
    if rtype == RecordType.RETENTION:
        return RetentionEntry.decode(payload)
    if rtype == RecordType.AUDIT:
        return DenialEntry.decode(payload)
    if rtype == RecordType.DROP:
        return NamespaceEntry.decode(payload)
    if rtype == RecordType.BOUNCE_MESSAGE:
        return BounceMessageEntry.decode(payload)
    raise AssertionError(f"record type {rtype} has no queue entry")


def apply_entry(kv: KV, c: Counters, index: int, rtype: int, entry: object) -> object:
    """Apply one decoded entry (``(Envelope, size, ctx, key id)`` for ENQUEUE); returns what it did."""
    c.index = index
    if rtype == RecordType.ENQUEUE:
        assert isinstance(entry, tuple)
        env, size, ctx, key_id = entry
        return apply_enqueue(kv, c, index, env, size, ctx, key_id)
    if rtype == RecordType.LEASE:
        assert isinstance(entry, LeaseEntry)
        return apply_lease(kv, c, index, entry)
    if rtype in _SETTLE_TYPES:
        assert isinstance(entry, SettleEntry)
        return apply_settle(kv, c, rtype, entry)
    if rtype in _ADMIN_TYPES:
        assert isinstance(entry, AdminEntry)
        return apply_admin(kv, c, rtype, entry)
    if rtype == RecordType.EXPIRE:
        assert isinstance(entry, MaintenanceEntry)
        return apply_expire(kv, c, entry)
    if rtype == RecordType.COMPACT:
        assert isinstance(entry, MaintenanceEntry)
        return apply_compact(kv, c, entry)
    if rtype == RecordType.POLICY:
        assert isinstance(entry, PolicyEntry)
        return apply_policy(kv, entry, c)
    if rtype == RecordType.LEGAL_HOLD:
        assert isinstance(entry, LegalHoldEntry)
        return apply_legal_hold(kv, c, entry)
    if rtype == RecordType.RETENTION:
        assert isinstance(entry, RetentionEntry)
        return apply_retention(kv, c, entry)
    if rtype == RecordType.AUDIT:
        assert isinstance(entry, DenialEntry)
        return apply_denial(kv, c, entry)
    if rtype == RecordType.DROP:
        assert isinstance(entry, NamespaceEntry)
        return apply_drop(kv, c, entry)
    if rtype == RecordType.BOUNCE_MESSAGE:
        assert isinstance(entry, BounceMessageEntry)
        return apply_bounce_message(kv, c, entry)
    if rtype in PASSIVE_TYPES:
        return None
    raise AssertionError(f"unknown record type {rtype}")
