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
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from mqstore.codec import Envelope, RecordType
from mqstore.errors import StaleLease
from mqstore.queue.kv import KV, first, prefix_end
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
    HELD,
    LEASED,
    QUEUED,
    STATE_NAMES,
    U64,
    WAITING,
    AdminEntry,
    LeaseEntry,
    LeaseRow,
    MaintenanceEntry,
    MessageRow,
    Policy,
    PolicyEntry,
    RecipientRow,
    SettleEntry,
    domain_of,
    mid_ord,
    ns_key,
    ready_dom_key,
    ready_key,
    time_key,
)

#: Postfix defaults (minimal_backoff_time, maximal_backoff_time).
BACKOFF_MIN_MS = 300_000
BACKOFF_MAX_MS = 4_000_000
BACKOFF_JITTER = 0.1  # +-10%, so retries of many messages do not arrive in lockstep

_STATS_LIVE = "messages.live"
_STATS_STORED = "messages.stored"
_STATS_BYTES = "bytes"


# --- counters ------------------------------------------------------------------------------------


class Counters:
    """Stats deltas of one write, flushed once (one read-modify-write per counter touched).

    Also caches namespace policies for the write (they change only through POLICY entries,
    which update the cache as they are applied)."""

    __slots__ = ("deltas", "policies")

    def __init__(self) -> None:
        self.deltas: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.policies: dict[str, Policy] = {}

    def policy(self, kv: KV, namespace: str) -> Policy:
        policy = self.policies.get(namespace)
        if policy is None:
            policy = self.policies[namespace] = get_policy(kv, namespace)
        return policy

    def add(self, namespace: str, name: str, delta: int) -> None:
        self.deltas[(namespace, name)] += delta

    def state(self, namespace: str, state: int, delta: int) -> None:
        self.deltas[(namespace, STATE_NAMES[state])] += delta

    def flush(self, kv: KV) -> None:
        for (ns, name), delta in self.deltas.items():
            if delta:
                key = ns_key(ns) + name.encode()
                old = kv.get(b"stats", key)
                value = (int.from_bytes(old, "little", signed=True) if old else 0) + delta
                kv.put(b"stats", key, value.to_bytes(8, "little", signed=True))
        self.deltas.clear()


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
    if row.count(EXPIRED):
        retention = max(retention, policy.expired_retention_ms)
    row.flags |= FINISHED
    row.finished_ms = now_ms
    row.retain_until_ms = now_ms + retention
    kv.delete(b"live", mid)
    if row.expires_at_ms:
        kv.delete(b"expiry", time_key(row.expires_at_ms, mid))  # may be gone already
    kv.put(b"retention", time_key(row.retain_until_ms, mid), b"")
    c.add(row.namespace, _STATS_LIVE, -1)


# --- apply ------------------------------------------------------------------------------------------


def apply_enqueue(kv: KV, c: Counters, index: int, env: Envelope, size_bytes: int) -> bytes:
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
    )
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
        until = env.created_at_ms + c.policy(kv, env.namespace).dedup_window_ms
        kv.put(b"dedup", dkey, mid + U64.pack(until))
        kv.put(b"dedup_exp", time_key(until, dkey), b"")
    c.state(env.namespace, QUEUED, n)
    c.add(env.namespace, _STATS_LIVE, 1)
    c.add(env.namespace, _STATS_STORED, 1)
    c.add(env.namespace, _STATS_BYTES, size_bytes)
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
    two workers at once even if two grants for it were planned concurrently.
    """
    row = get_message(kv, e.mid)
    if row is None or row.held:
        return _NO_GRANT
    granted = []
    attempts = 0
    for ordinal in e.ordinals:
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
    if not granted:
        return _NO_GRANT
    kv.put(b"messages", e.mid, row.encode())
    kv.put(b"leases", U64.pack(token), LeaseRow(e.mid, e.deadline_ms, tuple(granted), e.worker).encode())
    kv.put(b"lease_due", time_key(e.deadline_ms, U64.pack(token)), b"")
    return Grant(tuple(granted), attempts, row.enqueue_index)


def check_settle(kv: KV, token: int, ordinals: Iterable[int] | None) -> tuple[LeaseRow, tuple[int, ...]]:
    """The lease ``token`` and the ordinals to settle (all of the lease's when None).

    Raises :class:`StaleLease` when the token is unknown or does not cover every ordinal."""
    if isinstance(token, bool) or not isinstance(token, int) or token <= 0:
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
        if target == DEFERRED:
            rcpt.attempts += 1
            if row.expires_at_ms and e.now_ms >= row.expires_at_ms:
                new = EXPIRED
            else:
                rcpt.due_ms = e.next_attempt_ms[i] if i < len(e.next_attempt_ms) else e.now_ms
        elif target == BOUNCED:
            rcpt.attempts += 1
        else:
            rcpt.attempts += 1
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
    return True


def _shrink_lease(kv: KV, token: int, lease: LeaseRow, settled: tuple[int, ...]) -> None:
    remaining = tuple(o for o in lease.ordinals if o not in settled)
    if remaining:
        kv.put(b"leases", U64.pack(token), LeaseRow(lease.mid, lease.deadline_ms, remaining, lease.worker).encode())
    else:
        kv.delete(b"leases", U64.pack(token))
        kv.delete(b"lease_due", time_key(lease.deadline_ms, U64.pack(token)))


def apply_admin(kv: KV, c: Counters, rtype: int, e: AdminEntry) -> bool:
    """HOLD / RELEASE / REQUEUE / DELETE. False if the message does not exist."""
    row = get_message(kv, e.mid)
    if row is None:
        return False
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
        kv.delete(b"retention", time_key(row.retain_until_ms, mid))
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
    done = 0
    for kind, value in e.items:
        if kind == EXPIRE_LEASE:
            done += _expire_lease(kv, c, U64.unpack(value)[0], e.now_ms)
        elif kind == EXPIRE_MESSAGE:
            done += _expire_message(kv, c, value, e.now_ms)
    return done


def _expire_lease(kv: KV, c: Counters, token: int, now_ms: int) -> int:
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
        rcpt.attempts += 1  # the worker vanished: that was an attempt
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
    return 1


def _expire_message(kv: KV, c: Counters, mid: bytes, now_ms: int) -> int:
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
    return 1


def apply_compact(kv: KV, c: Counters, e: MaintenanceEntry) -> int:
    """COMPACT: drop finished messages whose retention passed, and dedup keys past their window."""
    done = 0
    for kind, value in e.items:
        if kind == COMPACT_MESSAGE:
            row = get_message(kv, value)
            if row is not None and row.finished and row.retain_until_ms <= e.now_ms:
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
    return done


def apply_policy(kv: KV, e: PolicyEntry, c: Counters | None = None) -> None:
    kv.put(b"policies", e.namespace.encode(), e.policy.encode())
    if c is not None:
        c.policies[e.namespace] = e.policy


# --- planning (read-only) ---------------------------------------------------------------------------


def backoff_ms(policy: Policy, attempts: int, mid: bytes, ordinal: int) -> int:
    """Delay before the next attempt, after ``attempts`` attempts (>= 1).

    An explicit schedule is used as given (its last step repeats). The default follows Postfix:
    300 s, doubling, at most 4000 s, with +-10% jitter derived from the message id, recipient and
    attempt, so every replica planning it would pick the same time (only the writer plans)."""
    attempts = max(attempts, 1)
    if policy.backoff_ms:
        return policy.backoff_ms[min(attempts, len(policy.backoff_ms)) - 1]
    base = min(BACKOFF_MIN_MS * (1 << min(attempts - 1, 20)), BACKOFF_MAX_MS)
    digest = hashlib.blake2b(mid + bytes((ordinal & 0xFF, ordinal >> 8, attempts & 0xFF)), digest_size=4).digest()
    unit = int.from_bytes(digest, "big") / 0xFFFFFFFF  # 0..1
    return int(base * (1 - BACKOFF_JITTER + 2 * BACKOFF_JITTER * unit))


@dataclass(frozen=True, slots=True)
class LeasePlan:
    mid: bytes
    ordinals: tuple[int, ...]


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
) -> list[LeasePlan]:
    """Choose up to ``max_messages`` messages with due recipients: highest priority first, then
    the longest-due; each plan holds all of that message's due recipients (in ``domain`` if given).
    Messages in ``exclude`` are skipped (a replicated leader's grants not yet applied).
    """
    spaces = [namespace] if namespace is not None else namespaces(kv)
    streams = [_due_in_namespace(kv, ns, domain, now_ms) for ns in spaces]
    candidates = heapq.merge(*streams) if len(streams) > 1 else (streams[0] if streams else iter(()))
    seen: set[bytes] = set()
    plans: list[LeasePlan] = []
    picked: list[bytes] = []
    for _sort, mid, _ordinal in candidates:
        if mid in seen or (exclude and mid in exclude):
            continue
        seen.add(mid)
        picked.append(mid)
        if len(picked) >= max_messages:
            break
    # Collect each message's due recipients after the scan (never write while scanning).
    for mid in picked:
        ords = tuple(
            o
            for o, r in recipients_of(kv, mid)
            if r.state in WAITING and r.due_ms <= now_ms and (domain is None or r.domain == domain)
        )
        if ords:
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
    for key, _ in kv.scan(b"retention", b"", U64.pack(now_ms + 1)):
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
    for table in (b"lease_due", b"expiry", b"retention", b"dedup_exp"):
        head = first(kv, table, b"")
        if head is not None:
            times.append(U64.unpack(head[0][:8])[0])
    return min(times) if times else None


__all__ = [
    "Counters",
    "Grant",
    "LeasePlan",
    "StaleLease",
    "apply_admin",
    "apply_compact",
    "apply_enqueue",
    "apply_expire",
    "apply_lease",
    "apply_policy",
    "apply_settle",
    "backoff_ms",
    "check_settle",
    "find_duplicate",
    "get_message",
    "get_policy",
    "namespaces",
    "next_timer_ms",
    "plan_compact",
    "plan_expire",
    "plan_lease",
    "read_stats",
    "recipients_of",
]


# --- dispatch ---------------------------------------------------------------------------------------

_ADMIN_TYPES = frozenset((RecordType.HOLD, RecordType.RELEASE, RecordType.REQUEUE, RecordType.DELETE))
_SETTLE_TYPES = frozenset((RecordType.ACK, RecordType.DEFER, RecordType.BOUNCE))
#: Record types that carry no queue state (framework records).
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
    raise AssertionError(f"record type {rtype} has no queue entry")


def apply_entry(kv: KV, c: Counters, index: int, rtype: int, entry: object) -> object:
    """Apply one decoded entry (``(Envelope, size)`` for ENQUEUE); returns what it did."""
    if rtype == RecordType.ENQUEUE:
        assert isinstance(entry, tuple)
        env, size = entry
        return apply_enqueue(kv, c, index, env, size)
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
        apply_policy(kv, entry, c)
        return True
    if rtype in PASSIVE_TYPES:
        return None
    raise AssertionError(f"unknown record type {rtype}")
