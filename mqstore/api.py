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
import shutil
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from mqstore import limits, validate
from mqstore.actor import LOCAL_ADMIN, Actor
from mqstore.codec import Flags, Record, RecordType
from mqstore.compliance import audit as audit_log
from mqstore.compliance.rules import COMPLIANCE_AHEAD_MAX_MS, SYSTEM_ACTOR, ComplianceClock, Ctx, Mode, check_reason
from mqstore.compliance.signing import load_or_create_signing_key, public_key_from_hex
from mqstore.crypto import KeyProvider
from mqstore.crypto.keyring import META_SCRUB_PENDING, SYSTEM_NAMESPACE, KeyShredded
from mqstore.diskspace import DiskSpace
from mqstore.errors import (
    Corruption,
    Immutable,
    InvalidArgument,
    KeyError_,
    MQStoreError,
    NotFound,
    PermissionDenied,
    StaleLease,
    Unavailable,
    UnknownKey,
)
from mqstore.ids import format_id, id_time_ms, parse_id
from mqstore.queue import machine
from mqstore.queue.kv import KV, LmdbKV, prefix_end
from mqstore.queue.machine import Counters
from mqstore.queue.model import (
    COMPACT_MESSAGE,
    FINAL,
    STATE_BY_NAME,
    STATE_NAMES,
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
    RetentionEntry,
    SettleEntry,
    ns_key,
)
from mqstore.store import LogStore, NewMessage, WriteContext, keeps_live_body
from mqstore.store.env import REPLACE_WAIT_S, StoreInUse
from mqstore.store.log import Staged

log = logging.getLogger(__name__)

#: Postfix qshape's age buckets, in minutes (the last bucket is "older than 1280").
QSHAPE_BUCKETS_MIN = (0, 5, 10, 20, 40, 80, 160, 320, 640, 1280)
_LIST_SCAN_MAX = 200_000  # rows one list() call may examine before returning a partial page
_READ_CHUNK = 2_000  # rows per read transaction in long scans
_MAINTENANCE_ITEMS_MAX = 1_000  # expiry/compaction items per maintenance record
#: Maintenance records of expiries one lease() writes at most before it plans (a backlog beyond
#: is left to maintenance: the plan skips messages whose lifetime passed all the same).
_LEASE_EXPIRE_RECORDS_MAX = 4
_LOG_COMPACT_EVERY = 50_000  # compact the log after this many new records
_REWRITE_PREFIX = ".rewrite-"  # scratch directories of a compacting rewrite (after a key shred)
_SCRUB_RETRY_S = 2  # a scrub put off while another process had the store open: tried again after this
_SCRUB_WAIT_AT_OPEN_S = 1.0  # how long an open waits for such a process to finish a scrub (then: later)
AUDIT_KEY_FILE = "audit-signing.key"  # an embedded store's audit signing key, in its directory
_RECIPIENT_CACHE_MAX = 65_536


def token_list(tokens: object) -> list[int]:
    """The lease tokens of an ``ack_many`` call as a list; InvalidArgument for something that is
    not a list of tokens, or one that names a token twice (it cannot be settled twice)."""
    out = validate.listed(tokens, "tokens", "lease tokens")
    seen: set[object] = set()
    for t in out:
        if isinstance(t, int) and not isinstance(t, bool):
            if t in seen:
                raise InvalidArgument(f"lease token {t} is listed twice")
            seen.add(t)
    return out


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


#: The keys of one message given to enqueue_many (enqueue's keyword names).
_ENQUEUE_FIELDS = frozenset({"mail_from", "recipients", "data", "namespace", "priority", "not_before", "expires_in",
                             "idempotency_key"})


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
    if value > limits.EPOCH_SECONDS_MAX:
        raise InvalidArgument(f"{field_name} must be a time before the year 10000, not {value}")
    return _ms(value)


def _seconds(value: object, field_name: str, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise InvalidArgument(f"{field_name} must be a number of seconds, not {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise InvalidArgument(f"{field_name} must be {'>= 0' if allow_zero else '> 0'} seconds, not {value}")
    if value > 100 * 365 * 86400:
        raise InvalidArgument(f"{field_name} is more than a century ({value} s)")
    return float(value)


def _utf8(value: str, field_name: str) -> bytes:
    """A text argument in UTF-8, as entries hold it; InvalidArgument when it cannot be encoded
    (a lone surrogate, e.g. from a file name decoded with surrogateescape)."""
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{field_name} is not valid Unicode (lone surrogate)") from None


def _why(bypass: bool, reason: str | None) -> str:
    """A governance bypass's reason, checked (rules.check_reason), refusing one that cannot be
    encoded with a message that says so."""
    if isinstance(reason, str):
        _utf8(reason, "reason")
    return check_reason(bypass, reason)


def _duration_ms(value: object, field_name: str, *, allow_zero: bool = False) -> int:
    """A duration argument (seconds) as the whole milliseconds entries hold. One that must be
    > 0 is refused when it rounds to 0 ms: a lifetime of 0 means "never expires", a lease of 0
    would end as it starts."""
    ms = _ms(_seconds(value, field_name, allow_zero=allow_zero))
    if ms <= 0 and not allow_zero:
        raise InvalidArgument(f"{field_name} must be at least 1 ms (0.001 s; durations are kept in whole "
                              f"milliseconds), not {value}")
    return ms


def stats_counts(per_ns: Mapping[str, Mapping[str, int]], oldest_id: bytes | None, now_ms: int) -> dict[str, Any]:
    """The queue's counts as ``stats()`` gives them: recipients per state, messages, bytes and the
    oldest unfinished message's age (``oldest_id``, None: no such message), overall and per
    namespace, from the state machine's counters (``machine.read_stats``). The one place that
    shape is built: a running node's status (:meth:`QueueBase.stats`) and a stopped one's
    (:func:`mqstore.ops.facts.queue_counts`) must stay alike."""
    states = list(STATE_NAMES.values())
    keys = [*states, "messages.live", "messages.stored", "bytes"]

    def counts(c: Mapping[str, int]) -> dict[str, Any]:
        return {
            "recipients": {s: c.get(s, 0) for s in states},
            "messages": c.get("messages.stored", 0),
            "messages_active": c.get("messages.live", 0),
            "bytes": c.get("bytes", 0),
        }

    overall = counts({k: sum(v.get(k, 0) for v in per_ns.values()) for k in keys})
    return {
        **overall,
        "oldest_age_seconds": max(0, now_ms - id_time_ms(oldest_id)) / 1000 if oldest_id else 0.0,
        "namespaces": {ns: counts(v) for ns, v in sorted(per_ns.items())},
    }


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
    retain_until: float | None  # finished: housekeeping may remove it from then on
    retention_mode: str = "none"  # "none", "governance" or "compliance" (captured at enqueue)
    locked_until: float | None = None  # immutable until then (compliance clock), if a mode is set
    legal_holds: tuple[str, ...] = ()
    key_id: int = 0  # the namespace key its body is sealed under


@dataclass(frozen=True, slots=True)
class BounceResult:
    """What :meth:`Store.bounce_message` did: ``bounced`` recipients (queued or deferred) are now
    bounced; ``left_leased`` recipients were leased to a worker and left alone (a delivery may be
    in flight: the worker settles them)."""

    message_id: str
    bounced: int
    left_leased: int


#: The reason :meth:`Store.bounce_message` keeps when none is given.
BOUNCE_REASON_DEFAULT = "bounced by the operator"


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

_HMAC_INFO = b"mqstore-audit-hm"  # 16 bytes: the HKDF info deriving the address-HMAC key


class AuditServices:
    """The audit log's keys: the Ed25519 checkpoint signer, and the address-HMAC key, derived
    from the store's first system key (replicated in the log, so every replica derives the same;
    crypto-shredding a namespace key never touches it)."""

    def __init__(self, log: LogStore, signer: Any) -> None:
        self._store = log
        # The AuditLog's own HMAC key is unused: addresses go through hmac_address below.
        self.log = audit_log.AuditLog(signer, b"\x00" * 32)
        self.signer = signer
        self._hmac: audit_log.AuditLog | None = None

    def hmac_address(self, address: str) -> str:
        if self._hmac is None:
            keyring = self._store.keyring  # looked up each time: restoring a copy replaces it
            ids = keyring.key_ids(SYSTEM_NAMESPACE)
            if not ids:
                raise InvalidArgument("the store has no system key yet (it is created before the first message)")
            self._hmac = audit_log.AuditLog(None, keyring.data_key(ids[0], _HMAC_INFO))
        return self._hmac.hmac_address(address)


class QueueBase:
    """What the embedded store and a cluster node's queue share: argument checks, the read side
    (get, list, qshape, stats) and turning grants into leases. Subclasses implement the writes
    (``enqueue_many``, ``lease``, ``_settle``, ``ack_many``, ``_admin``, ``set_namespace_policy``)."""

    def __init__(self, log: LogStore, clock: Callable[[], float], *, node_id: int = 0, site: str = "",
                 monotonic: Callable[[], float] = time.monotonic, audit_signer: Any = None) -> None:
        self._clock = clock
        self.log = log
        self._rcpt_cache: OrderedDict[bytes, tuple[str, ...]] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._policies: dict[str, Policy] = {}
        #: Bumped whenever a policy may have changed: a reader that started before a change never
        #: caches what it read (see :meth:`_policy`).
        self._policy_generation = 0
        self._policy_lock = threading.Lock()
        self.node_id = node_id
        self.site = site
        #: Who a mutation without an ``actor`` is attributed to in the audit log (the local
        #: administrator: every role, still bound by COMPLIANCE). The CLI names the OS user.
        self.default_actor = LOCAL_ADMIN
        with log.env.read() as txn:
            persisted = machine.compliance_clock_ms(LmdbKV(txn, log.env.dbs))
        #: Time for retention decisions: never behind what was applied, never following the wall clock.
        self.compliance_clock = ComplianceClock(persisted, lambda: self._compliance_start_ms(), monotonic)
        self.audit = AuditServices(log, audit_signer)
        #: The free space of the store's disk and the floor below which enqueues are refused
        #: (the embedded store's own; a node's health watcher's).
        self.disk: DiskSpace | None = None

    # --- compliance helpers ----------------------------------------------------------------------

    def _compliance_start_ms(self) -> int:
        """Where a store's compliance clock starts when it has none yet and has applied none."""
        return _ms(self._clock())

    def _ctx(self, actor: Actor | None, bypass: bool = False, reason: str = "") -> Ctx:
        """The request context stamped into an entry: who, from where, and both clocks."""
        return Ctx(actor or self.default_actor, self.node_id, self.site, _ms(self._clock()),
                   self.compliance_clock.now_ms(), bypass, reason)

    def _counters(self) -> Counters:
        return Counters(self.audit.log, self.audit.hmac_address)

    def _after_apply(self, c: Counters) -> None:
        self.compliance_clock.observe(c.clock_ms)

    @staticmethod
    def _actor(actor: Actor | None) -> Actor | None:
        if actor is not None and not isinstance(actor, Actor):
            raise InvalidArgument(f"actor must be an mqstore.Actor, not {type(actor).__name__}")
        return actor

    def _require(self, actor: Actor | None, permission: str, namespace: str | None, op: str, target: str) -> None:
        """Refuse (PermissionDenied, audited) a hot-path request the actor may not make.
        ``namespace`` None: a request that covers every namespace, which needs the permission in
        every namespace (an actor limited to some must name one), as at a node's edge."""
        if actor is None or (actor.can(permission, namespace) and (namespace is not None or actor.namespaces is None)):
            return
        if permission not in actor.permissions():
            reason = f"actor {actor.name!r} lacks the {permission!r} permission"
        elif namespace is None:
            spaces = ", ".join(sorted(actor.namespaces or ()))
            reason = (f"actor {actor.name!r} may only act in its namespaces ({spaces}): name one (this request "
                      "covers every namespace)")
        else:
            reason = f"actor {actor.name!r} lacks the {permission!r} permission in namespace {namespace!r}"
        self.record_denial(op, target, reason, actor)
        raise PermissionDenied(reason)

    def _require_settle(self, actor: Actor | None, tokens: Sequence[object], op: str) -> None:
        """Refuse (PermissionDenied, audited) settling leases the actor may not settle: it needs
        ``settle`` in the namespace of each lease's message. Like a node's edge, an actor limited
        to some namespaces learns only that a lease is not one of its own (the audit record says
        whether it exists, and where)."""
        target = ",".join(map(str, tokens[:8]))
        if actor is None or actor.namespaces is None or "settle" not in actor.permissions():
            self._require(actor, "settle", None, op, target)
            return
        for token in tokens:
            if isinstance(token, bool) or not isinstance(token, int) or not 0 < token < 2**64:
                continue  # not a token at all: settling refuses it (StaleLease)
            namespace = self._namespace_of_lease(token)
            if namespace is not None and actor.can("settle", namespace):
                continue
            why = "is not known here" if namespace is None else f"is in namespace {namespace!r}"
            self.record_denial(op, target, f"actor {actor.name!r} may only act in its namespaces, and lease "
                               f"{token} {why}", actor)
            raise PermissionDenied(f"actor {actor.name!r} (namespaces {', '.join(sorted(actor.namespaces))}): lease "
                                   f"{token} was not found, or is not in the namespaces this identity may use")

    def _namespace_of_lease(self, token: int) -> str | None:
        """The namespace of the message lease ``token`` holds (None: no such lease)."""
        with self.log.env.read() as txn:
            kv = LmdbKV(txn, self.log.env.dbs)
            raw = kv.get(b"leases", token.to_bytes(8, "big"))
            row = None if raw is None else machine.get_message(kv, LeaseRow.decode(raw).mid)
        return None if row is None else row.namespace

    def record_denial(self, op: str, target: str, reason: str, actor: Actor | None) -> None:
        """Write a denied-request record to the audit log (a request refused before it reached
        the queue, e.g. by a node's authentication or authorization at the edge)."""
        self._propose(RecordType.AUDIT, lambda now, ctx: DenialEntry(now, op[:255], target, reason, ctx), actor)

    @staticmethod
    def _raise_denied(result: object) -> None:
        if isinstance(result, machine.Denied):
            if result.kind == "permission":
                raise PermissionDenied(result.reason)
            if result.kind == "invalid":
                raise InvalidArgument(result.reason)
            if result.kind == "retry":
                raise Unavailable(result.reason)
            raise Immutable(result.reason)

    def _propose(self, rtype: RecordType, make: Callable[[int, Ctx], object], actor: Actor | None,
                 bypass: bool = False, reason: str = "", precheck: Callable[[KV], None] | None = None) -> object:
        """Append one entry built by ``make(now_ms, ctx)`` (after ``precheck(kv)`` passes, under
        the write lock) and apply it; returns what applying it returned."""
        raise NotImplementedError

    # --- helpers ---------------------------------------------------------------------------------

    def _now_ms(self) -> int:
        return max(_ms(self._clock()), self.log.last_stamp_ms)

    def _kv(self, ctx: WriteContext) -> LmdbKV:
        return LmdbKV(ctx.txn, ctx.dbs)

    def _policy(self, namespace: str) -> Policy:
        policy = self._policies.get(namespace)
        if policy is None:
            generation = self._policy_generation
            with self.log.env.read() as txn:
                policy = machine.get_policy(LmdbKV(txn, self.log.env.dbs), namespace)
            with self._policy_lock:
                # A change committed while this read ran may be missing from it: use it once, but
                # cache it only if no change happened since the read began.
                if generation == self._policy_generation:
                    self._policies[namespace] = policy
        return policy

    def _forget_policies(self) -> None:
        """Drop cached policies after a change to any (or a state replaced by a snapshot)."""
        with self._policy_lock:
            self._policy_generation += 1
            self._policies.clear()

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
        recipients = self.log.read_message(enqueue_index, mid).envelope.recipients
        self._remember_recipients(mid, recipients)
        return recipients

    def _seal_reason(self, namespace: str, mid: bytes, reason: str) -> bytes:
        if not reason:
            return b""
        sealed = self.log.sealer.seal(RecordType.DEFER, namespace, mid, reason.encode("utf-8"), compress=False)
        return struct.pack("<I", sealed.key_id) + sealed.payload

    def _open_reason(self, blob: bytes, mid: bytes | None = None) -> str | None:
        if not blob:
            return None
        (key_id,) = struct.unpack_from("<I", blob)
        record = Record(RecordType.DEFER, int(Flags.ENCRYPTED), 0, 0, key_id, 0, blob[4:])
        try:
            opened = self.log.sealer.open(record)
        except Exception as exc:  # a reason is informational: never fail a read because of it
            return f"<unreadable reason: {exc}>"
        if mid is not None and opened.message_id != mid:
            return f"<unreadable reason: sealed for message {format_id(opened.message_id)}>"
        return opened.plaintext.decode("utf-8", "replace")

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
        allowed = _ENQUEUE_FIELDS
        lifetimes: dict[str, int] = {}  # namespace -> its lifetime (ms), looked up once per call
        for i, m in enumerate(messages):
            if type(m) is not dict and not isinstance(m, Mapping):
                raise InvalidArgument(f"messages[{i}] must be a dict, not {type(m).__name__}")
            if not m.keys() <= allowed:
                raise InvalidArgument(f"messages[{i}] has unknown field(s) {sorted(set(m) - allowed)}")
            if "mail_from" not in m or "recipients" not in m or "data" not in m:
                raise InvalidArgument(f"messages[{i}] needs mail_from, recipients and data")
            namespace = m.get("namespace", "default")
            expires_in = m.get("expires_in")
            if expires_in is None:
                lifetime_ms = lifetimes.get(namespace) if type(namespace) is str else None
                if lifetime_ms is None:
                    namespace = validate.namespace(namespace)
                    lifetime_ms = lifetimes[namespace] = self._policy(namespace).lifetime_ms
            else:
                namespace = validate.namespace(namespace)
                lifetime_ms = _duration_ms(expires_in, f"messages[{i}].expires_in")
            not_before = m.get("not_before")
            not_before_ms = 0 if not_before is None else _to_ms(not_before, f"messages[{i}].not_before")
            expires_at_ms = now + lifetime_ms if lifetime_ms else 0
            if expires_at_ms and not_before_ms >= expires_at_ms:
                lifetime = (f"the {lifetime_ms / 1000:g} s lifetime of namespace {namespace!r}" if expires_in is None
                            else f"its expires_in of {lifetime_ms / 1000:g} s")
                raise InvalidArgument(
                    f"messages[{i}].not_before ({not_before_ms / 1000:.3f}) is at or after the message's expiry "
                    f"({expires_at_ms / 1000:.3f}, now + {lifetime}): it would expire before its first attempt"
                )
            new.append(
                NewMessage(
                    mail_from=m["mail_from"],
                    recipients=m["recipients"],
                    data=m["data"],
                    namespace=namespace,
                    priority=m.get("priority", 0),
                    not_before_ms=not_before_ms,
                    expires_at_ms=expires_at_ms,
                    idempotency_key=m.get("idempotency_key"),
                )
            )
        return new

    @staticmethod
    def _lease_args(
        worker: str, max_messages: int, lease_seconds: float, namespace: str | None, domain: str | None
    ) -> tuple[int, str | None]:
        """Check lease arguments; returns the lease length in ms and the normalised domain."""
        if not isinstance(worker, str) or not worker or len(_utf8(worker, "worker")) > 64:
            raise InvalidArgument("worker must be a name of 1..64 bytes")
        validate.integer(max_messages, "max_messages", 1, limits.APPEND_RECORDS_MAX)
        lease_ms = _duration_ms(lease_seconds, "lease_seconds")
        if namespace is not None:
            validate.namespace(namespace)
        if domain is not None:
            domain = validate.domain(domain, "domain").lower()
        return lease_ms, domain

    @staticmethod
    def _check_reason(reason: str | None) -> None:
        if reason is not None and (not isinstance(reason, str) or len(_utf8(reason, "reason")) > 4096):
            raise InvalidArgument("reason must be a string of at most 4096 bytes")

    def _new_policy(
        self,
        namespace: str,
        backoff: Sequence[float] | None,
        lifetime: float | None,
        retention: float | None,
        dedup_window: float | None,
        expired_retention: float | None,
        mode: str | Mode | None = None,
        lock_retention: float | None = None,
    ) -> Policy:
        """The namespace's policy with the given changes (None keeps a value), checked."""
        validate.namespace(namespace)
        old = self._policy(namespace)
        if backoff is not None:
            if isinstance(backoff, (str, bytes)) or not isinstance(backoff, Sequence) or len(backoff) > 64:
                raise InvalidArgument("backoff must be a list of at most 64 delays in seconds")
            schedule = tuple(_duration_ms(s, f"backoff[{i}]") for i, s in enumerate(backoff))
        else:
            schedule = old.backoff_ms

        def ms_or(old_ms: int, value: float | None, name: str, allow_zero: bool) -> int:
            return old_ms if value is None else _duration_ms(value, name, allow_zero=allow_zero)

        new_mode = old.mode if mode is None else int(Mode.parse(mode))
        lock_ms = ms_or(old.lock_retention_ms, lock_retention, "retention", True)
        if lock_ms > limits.LOCK_RETENTION_MS_MAX:
            raise InvalidArgument(f"retention is at most {limits.LOCK_RETENTION_MS_MAX // 86_400_000} days")
        if new_mode != Mode.NONE and lock_ms <= 0:
            raise InvalidArgument(f"mode {Mode(new_mode).name.lower()} needs a retention period of at least 1 ms "
                                  "(retention_days > 0)")
        return Policy(
            backoff_ms=schedule,
            lifetime_ms=ms_or(old.lifetime_ms, lifetime, "lifetime", False),
            retention_ms=ms_or(old.retention_ms, retention, "retention", True),
            dedup_window_ms=ms_or(old.dedup_window_ms, dedup_window, "dedup_window", True),
            expired_retention_ms=ms_or(old.expired_retention_ms, expired_retention, "expired_retention", True),
            mode=new_mode,
            lock_retention_ms=lock_ms if new_mode != Mode.NONE else 0,
        )

    # --- writes (subclasses) ---------------------------------------------------------------------

    def enqueue_many(self, messages: Sequence[Mapping[str, Any]], actor: Actor | None = None) -> list[str]:
        raise NotImplementedError

    def _settle(self, rtype: RecordType, token: int, recipients: Iterable[str] | None, reason: str | None,
                actor: Actor | None = None) -> None:
        raise NotImplementedError

    def _sync(self) -> None:
        """Make local state current before planning from it (a cluster leader's read barrier)."""

    def _check_enqueue(self, messages: Sequence[Mapping[str, Any]], actor: Actor | None) -> Actor | None:
        actor = self._actor(actor)
        if actor is not None:
            checked: set[str] = set()  # each namespace once per call
            for m in messages if isinstance(messages, (list, tuple)) else ():
                ns = m.get("namespace", "default") if isinstance(m, Mapping) else "default"
                if isinstance(ns, str) and ns not in checked:  # (another namespace is refused as invalid)
                    self._require(actor, "enqueue", ns, "enqueue", ns)
                    checked.add(ns)
        return actor

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
        actor: Actor | None = None,
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
            ],
            actor=actor,
        )[0]

    def ack(self, token: int, recipients: Iterable[str] | None = None, actor: Actor | None = None) -> None:
        """Mark the lease's recipients (all, or those listed) delivered. Raises StaleLease if the
        token is unknown, expired or does not hold them; nothing changes then."""
        self._settle(RecordType.ACK, token, recipients, None, actor)

    def defer(self, token: int, recipients: Iterable[str] | None = None, reason: str = "",
              actor: Actor | None = None) -> None:
        """Retry the recipients later (backoff per namespace policy); keeps ``reason``."""
        self._settle(RecordType.DEFER, token, recipients, reason, actor)

    def bounce(self, token: int, recipients: Iterable[str] | None = None, reason: str = "",
               actor: Actor | None = None) -> None:
        """Mark the recipients permanently failed; keeps ``reason`` (for the DSN)."""
        self._settle(RecordType.BOUNCE, token, recipients, reason, actor)

    def hold(self, message_id: str, actor: Actor | None = None) -> None:
        """Stop leasing the message until :meth:`release` (leases already granted stay valid)."""
        self._admin(RecordType.HOLD, message_id, actor)

    def release(self, message_id: str, actor: Actor | None = None) -> None:
        self._admin(RecordType.RELEASE, message_id, actor)

    def requeue(self, message_id: str, actor: Actor | None = None) -> None:
        """Make the message's deferred recipients due now."""
        self._admin(RecordType.REQUEUE, message_id, actor)

    def delete(self, message_id: str, actor: Actor | None = None, bypass_governance: bool = False,
               reason: str | None = None) -> None:
        """Remove the message (its leases become stale). Refused with :class:`Immutable` while
        COMPLIANCE retention or any legal hold protects it, and under GOVERNANCE retention unless
        the actor has the ``bypass_governance`` permission, passes ``bypass_governance=True`` and
        gives a ``reason``. Every outcome is audited."""
        self._admin(RecordType.DELETE, message_id, actor, bypass_governance, _why(bypass_governance, reason))

    def bounce_message(self, message_id: str, *, reason: str | None = BOUNCE_REASON_DEFAULT,
                       actor: Actor | None = None) -> BounceResult:
        """Give up on the message (Exim's ``-Mg``): every queued or deferred recipient, held
        message or not, becomes bounced with ``reason`` (empty or None: "bounced by the
        operator"), counted as an attempt, so the MTA finds it with ``list(state="bounced")`` and
        sends the DSN. Recipients leased to a worker are left alone (a delivery may be in flight:
        the worker settles them; ``left_leased`` counts them); delivered, bounced and expired ones
        are untouched. Needs the ``delete`` permission (role admin): like a delete it ends
        delivery for good. Retention and legal holds do not forbid it (the message is kept).
        Raises NotFound for an unknown id. Audited."""
        mid = self._mid(message_id)
        self._check_reason(reason)
        why = reason or BOUNCE_REASON_DEFAULT
        actor = self._actor(actor)
        namespace = ""

        def precheck(kv: KV) -> None:
            nonlocal namespace
            row = machine.get_message(kv, mid)
            if row is None:
                raise NotFound(f"no message {format_id(mid)}")
            namespace = row.namespace

        def make(now: int, ctx: Ctx) -> BounceMessageEntry:
            return BounceMessageEntry(now, mid, self._seal_reason(namespace, mid, why), ctx)

        result = self._propose(RecordType.BOUNCE_MESSAGE, make, actor, precheck=precheck)
        self._raise_denied(result)
        if result is False:
            raise NotFound(f"no message {format_id(mid)}")
        assert isinstance(result, machine.BounceOutcome)
        return BounceResult(format_id(mid), result.bounced, result.left_leased)

    def _admin(self, rtype: RecordType, message_id: str, actor: Actor | None, bypass: bool = False,
               reason: str = "") -> None:
        mid = self._mid(message_id)
        actor = self._actor(actor)

        def precheck(kv: KV) -> None:
            if kv.get(b"messages", mid) is None:
                raise NotFound(f"no message {format_id(mid)}")

        result = self._propose(rtype, lambda now, ctx: AdminEntry(now, mid, ctx), actor, bypass, reason, precheck)
        self._raise_denied(result)
        if result is False:
            raise NotFound(f"no message {format_id(mid)}")

    def set_namespace_policy(
        self,
        namespace: str,
        *,
        backoff: Sequence[float] | None = None,
        lifetime: float | None = None,
        retention: float | None = None,
        dedup_window: float | None = None,
        expired_retention: float | None = None,
        mode: str | None = None,
        lock_retention: float | None = None,
        actor: Actor | None = None,
        bypass_governance: bool = False,
        reason: str | None = None,
    ) -> Policy:
        """Set a namespace's retry schedule (seconds; the last step repeats; None keeps Postfix's
        doubling 300..4000 s), message lifetime, retention of finished messages (housekeeping),
        idempotency window, how long a message that expired is kept for the MTA's DSN, and its
        immutability ``mode`` ("none", "governance", "compliance") with the ``lock_retention``
        (seconds) new messages get. Applies to messages enqueued (lifetime, lock) or finished
        (retention) afterwards. Arguments left as None keep their current value. A namespace in
        COMPLIANCE mode never leaves it nor shortens its lock (:class:`Immutable`)."""
        actor = self._actor(actor)
        validate.namespace(namespace)
        why = _why(bypass_governance, reason)
        self._sync()
        self._forget_policies()
        policy = self._new_policy(namespace, backoff, lifetime, retention, dedup_window, expired_retention,
                                  mode, lock_retention)
        try:
            result = self._propose(RecordType.POLICY, lambda now, ctx: PolicyEntry(now, namespace, policy, ctx),
                                   actor, bypass_governance, why)
        finally:
            self._forget_policies()
        self._raise_denied(result)
        return policy

    def set_policy(self, namespace: str, mode: str = "none", retention_days: float | None = None, *,
                   actor: Actor | None = None, bypass_governance: bool = False, reason: str | None = None) -> Policy:
        """Set a namespace's immutability: ``mode`` "none", "governance" or "compliance" and the
        retention (days) each new message gets from its enqueue. Existing messages keep theirs."""
        if retention_days is not None:
            retention_days = _seconds(retention_days, "retention_days", allow_zero=True) * 86_400
        return self.set_namespace_policy(namespace, mode=mode, lock_retention=retention_days, actor=actor,
                                         bypass_governance=bypass_governance, reason=reason)

    # --- compliance --------------------------------------------------------------------------------

    @staticmethod
    def _case(case: object) -> str:
        if not isinstance(case, str) or not case.strip() or len(_utf8(case, "case")) > limits.LEGAL_HOLD_CASE_BYTES_MAX:
            raise InvalidArgument(f"case must be a non-empty id of at most {limits.LEGAL_HOLD_CASE_BYTES_MAX} bytes")
        if any(ord(ch) < 32 for ch in case):
            raise InvalidArgument("case must not contain control characters")
        return case

    def add_legal_hold(self, message_id: str, case: str, *, actor: Actor | None = None) -> None:
        """Put the message under the legal hold ``case``: nothing deletes it, whatever its
        retention and whoever asks, until every hold on it is removed. Needs ``legal_hold``."""
        mid = self._mid(message_id)
        case = self._case(case)
        actor = self._actor(actor)

        def precheck(kv: KV) -> None:
            row = machine.get_message(kv, mid)
            if row is None:
                raise NotFound(f"no message {format_id(mid)}")
            if not (actor or self.default_actor).can("legal_hold", row.namespace):
                return  # the state machine refuses it, audited (no hint about the message's holds)
            held = machine.holds_of(kv, mid)
            if case not in held and len(held) >= limits.LEGAL_HOLDS_PER_MESSAGE_MAX:
                raise InvalidArgument(f"message {format_id(mid)} has {len(held)} legal holds, the limit")

        result = self._propose(RecordType.LEGAL_HOLD, lambda now, ctx: LegalHoldEntry(now, mid, case, True, ctx),
                               actor, precheck=precheck)
        self._raise_denied(result)
        if result is False:
            raise NotFound(f"no message {format_id(mid)}")

    def remove_legal_hold(self, message_id: str, case: str, *, actor: Actor | None = None) -> None:
        """Remove the legal hold ``case``; the message stays locked while any other hold remains."""
        mid = self._mid(message_id)
        case = self._case(case)
        actor = self._actor(actor)

        def precheck(kv: KV) -> None:
            row = machine.get_message(kv, mid)
            if row is None:
                raise NotFound(f"no message {format_id(mid)}")
            if not (actor or self.default_actor).can("legal_hold", row.namespace):
                return  # the state machine refuses it, audited: the permission is checked before the case
            if case not in machine.holds_of(kv, mid):
                raise NotFound(f"message {format_id(mid)} has no legal hold {case!r}")

        result = self._propose(RecordType.LEGAL_HOLD, lambda now, ctx: LegalHoldEntry(now, mid, case, False, ctx),
                               actor, precheck=precheck)
        self._raise_denied(result)
        if result is False:
            raise NotFound(f"message {format_id(mid)} has no legal hold {case!r}")

    def extend_retention(self, message_id: str, until: float | _dt.datetime, *, actor: Actor | None = None,
                         bypass_governance: bool = False, reason: str | None = None) -> None:
        """Set the message's retention end (epoch seconds or datetime, on the compliance clock).
        Extending needs the ``retention`` permission; shortening is refused under COMPLIANCE and
        needs a governance bypass under GOVERNANCE."""
        mid = self._mid(message_id)
        until_ms = _to_ms(until, "until")
        if until_ms <= 0 or until_ms > limits.TIME_MS_MAX:
            raise InvalidArgument("until must be a time after the epoch")
        actor = self._actor(actor)
        why = _why(bypass_governance, reason)

        def precheck(kv: KV) -> None:
            row = machine.get_message(kv, mid)
            if row is None:
                raise NotFound(f"no message {format_id(mid)}")
            if not row.lock_mode:
                raise InvalidArgument(f"message {format_id(mid)} is not under retention (its namespace had mode "
                                      "'none' when it was enqueued)")

        result = self._propose(RecordType.RETENTION, lambda now, ctx: RetentionEntry(now, mid, until_ms, ctx),
                               actor, bypass_governance, why, precheck)
        self._raise_denied(result)
        if result is False:
            raise NotFound(f"no message {format_id(mid)}")

    def drop_namespace(self, namespace: str, *, actor: Actor | None = None) -> int:
        """Remove every message of ``namespace``; refused (nothing removed) if any is under
        retention or a legal hold. Returns how many messages were removed."""
        validate.namespace(namespace)
        actor = self._actor(actor)
        result = self._propose(RecordType.DROP, lambda now, ctx: NamespaceEntry(now, namespace, ctx), actor)
        self._raise_denied(result)
        assert isinstance(result, int)
        return result

    def compact_messages(self, message_ids: Iterable[str], *, actor: Actor | None = None) -> int:
        """Forced compaction: remove these finished messages now, before their housekeeping
        retention ends (``delete`` permission). Retention locks and legal holds still apply:
        a message they protect stays (each refusal audited). Returns how many were removed;
        raises :class:`Immutable` when every one named was refused."""
        mids = [self._mid(m) for m in validate.listed(message_ids, "message_ids", "message ids")]
        if not mids or len(mids) > limits.APPEND_RECORDS_MAX:
            raise InvalidArgument(f"give 1..{limits.APPEND_RECORDS_MAX} message ids")
        actor = self._actor(actor)
        items = tuple((COMPACT_MESSAGE, m) for m in mids)
        result = self._propose(RecordType.COMPACT, lambda now, ctx: MaintenanceEntry(now, items, ctx), actor)
        self._raise_denied(result)
        assert isinstance(result, int)
        return result

    def _check_rotate(self, namespace: str, actor: Actor | None) -> None:
        validate.namespace(namespace)
        self._require(actor, "keys", namespace, "rotate_key", namespace)
        if len(self.log.keyring.key_ids(namespace)) >= limits.KEYS_PER_NAMESPACE_MAX:
            raise InvalidArgument(f"namespace {namespace!r} has {limits.KEYS_PER_NAMESPACE_MAX} keys already")

    def _check_shred(self, key_id: int) -> str:
        """The namespace of key ``key_id``, if it may be asked to be shredded (UnknownKey if none)."""
        validate.integer(key_id, "key_id", 1, 2**32 - 1)
        keyring = self.log.keyring
        namespace = keyring.namespace_of(key_id)
        if namespace == SYSTEM_NAMESPACE:
            raise InvalidArgument("the system key cannot be shredded (the audit log and dictionaries use it)")
        if keyring.is_shredded(key_id):
            raise InvalidArgument(f"key {key_id} was shredded already")
        return namespace

    def rotate_key(self, namespace: str, *, actor: Actor | None = None) -> int:
        raise NotImplementedError

    def shred_key(self, key_id: int, *, actor: Actor | None = None) -> int:
        raise NotImplementedError

    def audit_records(self, after: int | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Audit records with a sequence number above ``after``, oldest first (at most ``limit``)."""
        if after is not None:
            validate.integer(after, "after", 0, 2**63)
        validate.integer(limit, "limit", 1, audit_log.AUDIT_READ_RECORDS_MAX)
        self._sync()
        with self.log.env.read() as txn:
            return audit_log.records(LmdbKV(txn, self.log.env.dbs), after, limit)

    def audit_head(self) -> int:
        """The sequence number of the last audit record (0: none yet)."""
        self._sync()
        with self.log.env.read() as txn:
            return audit_log.head(LmdbKV(txn, self.log.env.dbs)).seq

    def list_keys(self) -> list[dict[str, Any]]:
        """Every namespace key: id, namespace, created, shredded, and whether new records use it."""
        self.log.env.check_open()  # (the keyring is in memory: a closed store still has it)
        self._sync()
        keyring = self.log.keyring
        out = []
        for key_id in keyring.key_ids():
            event = keyring.event(key_id)
            out.append({"key_id": key_id, "namespace": event.namespace, "created_ms": event.created_at_ms,
                        "shredded": keyring.is_shredded(key_id),
                        "current": keyring.current_key_id(event.namespace) == key_id})
        return out

    def get_policy(self, namespace: str) -> Policy:
        """A namespace's policy (the defaults if none was set)."""
        validate.namespace(namespace)
        self._sync()
        with self.log.env.read() as txn:
            return machine.get_policy(LmdbKV(txn, self.log.env.dbs), namespace)

    def audit_query(self, where: Mapping[str, Any] | None = None, since_ms: int | None = None,
                    until_ms: int | None = None, after: int | None = None, limit: int = 1000,
                    **unknown: Any) -> list[dict[str, Any]]:
        """Audit records whose fields equal every ``where`` item and whose time (compliance clock,
        ms) is in [``since_ms``, ``until_ms``), oldest first, with a seq above ``after``, at most
        ``limit`` (see :func:`mqstore.compliance.audit.query`)."""
        if unknown:
            raise InvalidArgument(f"audit_query has no filter(s) {sorted(unknown)}: filter on record fields with "
                                  "where={name: value}; the others are since_ms, until_ms, after and limit")
        self._sync()
        with self.log.env.read() as txn:
            return audit_log.query(LmdbKV(txn, self.log.env.dbs), where=where, since_ms=since_ms,
                                   until_ms=until_ms, after=after, limit=limit)

    def audit_verify(self, trusted: audit_log.Checkpoint | str | bytes | None = None, public_key: Any = None,
                     progress: Callable[[int, int], None] | None = None) -> audit_log.VerifyReport:
        """Recompute the audit log (hash chain, Merkle checkpoints, signatures) and, with a
        ``trusted`` checkpoint exported earlier (a Checkpoint, or its exported JSON text), detect
        truncation or rewriting before it. ``public_key`` (an Ed25519 public key, or its 64 hex
        digits) checks the signatures; by default the store's own signing key."""
        if isinstance(trusted, (str, bytes)):
            trusted = audit_log.Checkpoint.from_json(trusted)
        elif trusted is not None and not isinstance(trusted, audit_log.Checkpoint):
            raise InvalidArgument(f"trusted must be an exported audit checkpoint, not {type(trusted).__name__}")
        if isinstance(public_key, str):
            public_key = public_key_from_hex(public_key)
        elif public_key is not None and not isinstance(public_key, Ed25519PublicKey):
            raise InvalidArgument(f"public_key must be an Ed25519 public key (or its hex), not "
                                  f"{type(public_key).__name__}")
        if progress is not None and not callable(progress):
            raise InvalidArgument("progress must be a callable(done, total)")
        key = public_key if public_key is not None else self.audit.log.public_key
        with self.log.env.read() as txn:
            return audit_log.verify(LmdbKV(txn, self.log.env.dbs), key, trusted, progress,
                                    self.audit.log.checkpoint_every, self.audit.log.checkpoint_ms)

    def _audit_tick_due(self, kv: KV, compliance_ms: int, stamp_ms: int) -> bool:
        """Whether audit records wait for a time-based checkpoint that no new record will write
        (a quiet log): maintenance then writes a tick entry (every replica signs one). Judged at
        the time applying a tick stamped ``stamp_ms`` would use (the compliance time counts at
        most a day ahead of the stamp; never before the compliance time already applied), so a
        tick found due always writes its checkpoint."""
        due = self.audit.log.tick_due_ms(kv)
        if due is None:
            return False
        at = max(machine.compliance_clock_ms(kv), min(compliance_ms, stamp_ms + COMPLIANCE_AHEAD_MAX_MS))
        return due <= at

    def audit_checkpoint(self, *, actor: Actor | None = None) -> audit_log.Checkpoint | None:
        """Sign a checkpoint over every audit record so far (if any came since the last one) and
        return the latest checkpoint with the signing public key, to keep somewhere safe."""
        actor = self._actor(actor)
        self._propose(RecordType.AUDIT, lambda now, ctx: DenialEntry(now, machine.CHECKPOINT_OP, "", "", ctx), actor)
        with self.log.env.read() as txn:
            return self.audit.log.export_checkpoint(LmdbKV(txn, self.log.env.dbs))

    def _build_leases(self, grants: list[tuple[int, bytes, machine.Grant, int]], actor: Actor | None) -> list[Lease]:
        """Lease objects for committed grants: one read transaction, each body decrypted once."""
        if not grants:
            return []
        log_db = self.log.env.dbs[b"log"]
        out = []
        damaged: list[tuple[int, int, MQStoreError]] = []  # token, log index, why
        with self.log.env.read() as txn:
            get = txn.get
            for token, mid, grant, deadline_ms in grants:
                index = grant.enqueue_index
                try:
                    stored = self.log.open_message(
                        self.log.decode_raw(get(index.to_bytes(8, "big"), None, log_db), index), mid)
                except (Corruption, KeyShredded, KeyError_) as bad:
                    # Damaged (recorded in the quarantine list by the read), or sealed under a key
                    # shredded or not opened by this KEK: the lease is committed, so no raising.
                    damaged.append((token, index, bad))
                    continue
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
        for token, index, why in damaged:
            self._defer_damaged(token, index, why, actor)
        return out

    def _defer_damaged(self, token: int, index: int, exc: MQStoreError, actor: Actor | None) -> None:
        """A message granted whose body does not read back (damaged on disk, or sealed under a
        key that is shredded or that the KEK does not open) is left out of the leases returned —
        the others in the call are delivered — and deferred under its lease, with why as its
        reason: it comes back after the backoff (repaired by then, or still unreadable and
        deferred again) and expires at its lifetime like any other."""
        if isinstance(exc, Corruption):
            reason = (f"4.3.0 the message body is damaged in the store (log index {index}: {exc.reason[:120]}): "
                      "repair it (mqstore repair) or restore a backup")
        elif isinstance(exc, KeyShredded):
            reason = (f"4.3.0 the message body cannot be opened (log index {index}: {str(exc)[:120]}): "
                      "it can never be delivered; delete it or let it expire")
        else:
            reason = (f"4.3.0 the message body cannot be opened (log index {index}: {str(exc)[:120]}): "
                      "check the store's key-encryption key")
        log.error("lease: message at log index %d left out: %s", index, exc)
        try:
            try:
                self.defer(token, reason=reason, actor=actor)
            except UnknownKey:  # its namespace has no key to seal the reason under (all shredded)
                self.defer(token, actor=actor)
        except MQStoreError as failed:  # the lease then expires at its deadline
            log.warning("lease: could not defer the damaged message at log index %d: %s", index, failed)

    def _ordinals(
        self, kv: LmdbKV, token: int, recipients: Iterable[str] | None
    ) -> tuple[MessageRow, LeaseRow, tuple[int, ...]]:
        lease, ords = machine.check_settle(kv, token, None)
        row = machine.get_message(kv, lease.mid)
        if row is None:
            raise StaleLease(f"lease {token}: its message is gone")
        if recipients is not None:
            wanted = validate.listed(recipients, "recipients", "addresses")
            if not all(isinstance(a, str) for a in wanted):
                raise InvalidArgument("recipients must be a list of addresses (strings)")
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
            holds = machine.holds_of(kv, mid)
        stored = self.log.read_message(row.enqueue_index, mid)
        env = stored.envelope
        statuses = []
        for ordinal, r in rcpts:
            statuses.append(
                RecipientStatus(
                    address=env.recipients[ordinal],
                    state=STATE_NAMES[r.state],
                    attempts=r.attempts,
                    next_attempt=r.due_ms / 1000 if r.state not in FINAL and r.token == 0 else None,
                    last_reason=self._open_reason(r.reason, mid),
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
            retention_mode=Mode(row.lock_mode).name.lower(),
            locked_until=row.lock_until_ms / 1000 if row.lock_mode else None,
            legal_holds=holds,
            key_id=row.key_id,
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
        if state is not None and (not isinstance(state, str) or state not in states):
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
        want = min(_READ_CHUNK, limit + 1)  # a page without filters reads little more than itself
        while True:
            with self.log.env.read() as txn:
                kv = LmdbKV(txn, self.log.env.dbs)
                chunk = []
                for key, value in kv.scan(table, position, stop):
                    chunk.append((key, value))
                    if len(chunk) >= want:
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
            if len(chunk) < want:
                page.next_after = None
                return page
            want = min(_READ_CHUNK, want * 4)  # filters reject rows: read more at a time
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
        overall and per namespace; and the store's disk: free space, the floor, and whether new
        enqueues are accepted (an MTA can answer 452 4.3.1 before taking a message's data)."""
        with self.log.env.read() as txn:
            kv = LmdbKV(txn, self.log.env.dbs)
            per_ns = machine.read_stats(kv)
            oldest = next(iter(kv.scan(b"live", b"")), None)
        return {
            **stats_counts(per_ns, oldest[0] if oldest else None, self._now_ms()),
            "log": self.log.stats(),
            "disk": self._disk_stats(),
            # The time retention and legal holds are judged at (epoch seconds): the store's
            # compliance clock, which never goes back (see "Compliance" in the README).
            "compliance_time": self.compliance_clock.now_ms() / 1000,
        }

    def _disk_stats(self) -> dict[str, Any]:
        disk = self.disk
        if disk is None:
            return {}
        refused = disk.check()
        return {"free_bytes": disk.free_bytes, "total_bytes": disk.total_bytes, "floor_bytes": disk.floor_bytes(),
                "reusable_bytes": disk.reusable_bytes, "accepting_enqueues": refused is None}



class Store(QueueBase):
    """An embedded mail queue in one directory. Thread safe; also a context manager.

    ``clock`` (epoch seconds) is injectable for tests; the state machine itself only uses times
    stamped into log entries by the writer. ``monotonic`` drives the compliance clock (tests
    inject it too). ``background=True`` runs a maintenance thread that expires leases and
    messages and compacts finished ones when they fall due. The audit log's checkpoints are
    signed with the Ed25519 key in ``audit_signing_key`` (default ``<path>/audit-signing.key``,
    created on first open; keep a copy of its public key, or an exported checkpoint, elsewhere).
    Below ``disk_free_min_bytes`` / ``disk_free_min_percent`` of free space on the store's disk
    (the larger counts) enqueues raise :class:`~mqstore.errors.StorageFull`; everything else goes
    on, since leasing, settling and deleting are what frees space.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        key_file: str | os.PathLike[str] | None = None,
        key_provider: KeyProvider | None = None,
        clock: Callable[[], float] | None = None,
        monotonic: Callable[[], float] | None = None,
        background: bool = True,
        compression_level: int = limits.ZSTD_LEVEL_DEFAULT,
        map_size: int = limits.MAP_SIZE_BYTES_DEFAULT,
        audit_signing_key: str | os.PathLike[str] | None = None,
        disk_free_min_bytes: int = limits.DISK_FREE_MIN_BYTES_DEFAULT,
        disk_free_min_percent: float = limits.DISK_FREE_MIN_PERCENT_DEFAULT,
    ) -> None:
        clock = clock or time.time
        disk = DiskSpace(Path(path), disk_free_min_bytes, disk_free_min_percent, what=f"store {path}")
        log_store = LogStore(
            path,
            key_file=key_file,
            key_provider=key_provider,
            clock_ms=lambda: _ms(clock()),
            compression_level=compression_level,
            map_size=map_size,
        )
        try:
            if log_store.meta_get(b"node.id") is not None:
                raise InvalidArgument(
                    f"{path} is the data dir of a cluster node (the trial `mqstore serve` makes one there too): write "
                    "to it through the node (mqstore.Client), not as an embedded store (that would bypass "
                    "replication); an embedded store needs another directory"
                )
            signer_path = Path(audit_signing_key) if audit_signing_key is not None else Path(path) / AUDIT_KEY_FILE
            with log_store.env.read() as txn:  # checkpoints signed already: the store had a key
                had_key = audit_log.signed_by(LmdbKV(txn, log_store.env.dbs))
            signer = load_or_create_signing_key(signer_path, create=audit_signing_key is None, signed_by=had_key)
            log_store.ensure_keys([SYSTEM_NAMESPACE])  # the audit's address-HMAC key derives from it
        except BaseException:
            log_store.close()
            raise
        super().__init__(log_store, clock, monotonic=monotonic or time.monotonic, audit_signer=signer)
        self.path = Path(path)
        self.disk = disk
        self._compacted_at = self.log.last_index
        if not self.log.readonly:
            for leftover in self.path.glob(_REWRITE_PREFIX + "*"):
                # A copy of the database a killed rewrite left (this process holds the store's
                # lock, so nobody else is writing one): it may hold a shredded key's bytes.
                shutil.rmtree(leftover, ignore_errors=True)
                log.warning("removed %s, a copy of the store a killed process left behind", leftover)
        self._scrub_lock = threading.Lock()
        self._scrub_retry_at: float | None = None  # a scrub put off (see _scrub): when to try again
        if self.log.meta_get(META_SCRUB_PENDING) is not None:
            try:  # a key was shredded and the process died before its scrub finished: finish it
                self._scrub(wait_s=_SCRUB_WAIT_AT_OPEN_S)
            except BaseException:
                self.log.close()
                raise
        self._closed = threading.Event()
        self._wake = threading.Event()
        self._maintainer: threading.Thread | None = None
        if background:
            self._maintainer = threading.Thread(target=self._maintain_loop, name="mqstore-maintenance", daemon=True)
            self._maintainer.start()

    def _propose(self, rtype: RecordType, make: Callable[[int, Ctx], object], actor: Actor | None,
                 bypass: bool = False, reason: str = "", precheck: Callable[[KV], None] | None = None) -> object:
        def fn(wctx: WriteContext) -> tuple[object, Counters]:
            kv = self._kv(wctx)
            if precheck is not None:
                precheck(kv)
            entry = make(wctx.now_ms, self._ctx(actor, bypass, reason))
            index = wctx.append(rtype, entry.encode())  # type: ignore[attr-defined]
            c = self._counters()
            result = machine.apply_entry(kv, c, index, rtype, entry)
            c.flush(kv)
            return result, c

        result, c = self.log.write(fn)
        self._after_apply(c)
        if rtype == RecordType.POLICY or rtype == RecordType.DROP:
            self._forget_policies()
        return result

    # --- enqueue -----------------------------------------------------------------------------------

    def enqueue_many(self, messages: Sequence[Mapping[str, Any]], actor: Actor | None = None) -> list[str]:
        """Store several messages in one durable commit; returns their ids in order."""
        actor = self._check_enqueue(messages, actor)
        new = self._new_messages(messages)
        refusal = self.disk.check() if self.disk is not None else None
        if refusal is not None:
            raise refusal
        ctx = self._ctx(actor)
        sizes: list[int] = []

        def stage() -> list[Staged]:
            staged = self.log.stage_messages(new, ctx.encode())  # validates new: before nbytes
            sizes[:] = [validate.nbytes(n.data) for n in new]
            return staged

        def fn(wctx: WriteContext, staged: list[Staged]) -> tuple[list[bytes], Counters]:
            kv = self._kv(wctx)
            c = self._counters()
            out = []
            for st, sealed, size in zip(staged, wctx.sealed, sizes, strict=True):
                env = st.envelope
                if env.idempotency_key:
                    dup = machine.find_duplicate(kv, env.namespace, env.idempotency_key, env.created_at_ms)
                    if dup is not None:
                        out.append(dup)
                        continue
                index = wctx.append(RecordType.ENQUEUE, sealed.payload, flags=sealed.flags,
                                    key_id=sealed.key_id, dict_id=sealed.dict_id)
                c.index = index
                out.append(machine.apply_enqueue(kv, c, index, env, size, ctx, sealed.key_id))
            c.flush(kv)
            return out, c

        staged, (mids, c) = self.log.write_messages(stage, fn, size=lambda _staged: sum(sizes))
        self._after_apply(c)
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
        actor: Actor | None = None,
    ) -> list[Lease]:
        """Lease due recipients: highest priority first, then the longest waiting. Each lease is
        one message's due recipients (only those in ``domain`` when given)."""
        lease_ms, domain = self._lease_args(worker, max_messages, lease_seconds, namespace, domain)
        actor = self._actor(actor)
        self._require(actor, "lease", namespace, "lease", namespace or "*")

        def fn(wctx: WriteContext) -> tuple[list[tuple[int, bytes, machine.Grant, int]], Counters]:
            kv = self._kv(wctx)
            c = self._counters()
            ctx = self._ctx(actor)
            for _ in range(_LEASE_EXPIRE_RECORDS_MAX):
                if self._expire_in(wctx, kv, c) < _MAINTENANCE_ITEMS_MAX:
                    break
            grants = []
            for plan in machine.plan_lease(kv, wctx.now_ms, max_messages, namespace, domain):
                entry = LeaseEntry(wctx.now_ms, wctx.now_ms + lease_ms, plan.mid, plan.ordinals, worker, ctx)
                token = wctx.append(RecordType.LEASE, entry.encode())
                c.index = token
                grant = machine.apply_lease(kv, c, token, entry)
                if grant.ordinals:
                    grants.append((token, plan.mid, grant, entry.deadline_ms))
            c.flush(kv)
            return grants, c

        grants, c = self.log.write(fn)
        self._after_apply(c)
        return self._build_leases(grants, actor)

    def _settle(
        self, rtype: RecordType, token: int, recipients: Iterable[str] | None, reason: str | None,
        actor: Actor | None = None,
    ) -> None:
        self._check_reason(reason)
        actor = self._actor(actor)
        self._require_settle(actor, [token], RecordType(rtype).name.lower())

        def fn(wctx: WriteContext) -> Counters:
            kv = self._kv(wctx)
            row, lease, ords = self._ordinals(kv, token, recipients)
            mid = lease.mid
            nxt: tuple[int, ...] = ()
            if rtype == RecordType.DEFER:
                policy = machine.get_policy(kv, row.namespace)
                rcpts = dict(machine.recipients_of(kv, mid))
                nxt = tuple(
                    wctx.now_ms + machine.backoff_ms(policy, rcpts[o].attempts + 1, mid, o) for o in ords
                )
            sealed = self._seal_reason(row.namespace, mid, reason or "")
            entry = SettleEntry(wctx.now_ms, token, ords, nxt, sealed, self._ctx(actor))
            c = self._counters()
            c.index = wctx.append(rtype, entry.encode())
            if not machine.apply_settle(kv, c, rtype, entry, checked=lease):
                raise AssertionError("a settle entry checked under the write lock did not apply")
            c.flush(kv)
            return c

        self._after_apply(self.log.write(fn))

    def ack_many(self, tokens: Iterable[int], actor: Actor | None = None) -> None:
        """Mark every recipient of each lease delivered, in one durable commit (all or nothing)."""
        tokens = token_list(tokens)
        if not tokens:
            return
        actor = self._actor(actor)
        self._require_settle(actor, tokens, "ack")

        def fn(wctx: WriteContext) -> Counters:
            kv = self._kv(wctx)
            c = self._counters()
            ctx = self._ctx(actor)
            for token in tokens:
                lease, ords = machine.check_settle(kv, token, None)
                entry = SettleEntry(wctx.now_ms, token, ords, ctx=ctx)
                c.index = wctx.append(RecordType.ACK, entry.encode())
                if not machine.apply_settle(kv, c, RecordType.ACK, entry, checked=lease):
                    raise StaleLease(f"lease {token} could not be settled")
            c.flush(kv)
            return c

        self._after_apply(self.log.write(fn))

    # --- keys --------------------------------------------------------------------------------------

    def rotate_key(self, namespace: str, *, actor: Actor | None = None) -> int:
        """A new key for ``namespace``: new messages are sealed under it, old ones keep theirs
        (and still decrypt). Needs the ``keys`` permission; audited. Returns the new key id."""
        actor = self._actor(actor)
        with self.log.key_lock:  # the id is chosen here: no other key may take it before this one commits
            self._check_rotate(namespace, actor)
            return self._rotate_key(namespace, actor)

    def _rotate_key(self, namespace: str, actor: Actor | None) -> int:
        event = self.log.keyring.new_key_event(namespace, self._now_ms())

        def fn(wctx: WriteContext) -> tuple[int, Counters]:
            ctx = self._ctx(actor)
            c = self._counters()
            c.index = wctx.next_index
            # Audit first: a new key joins the keyring as it is stored, so nothing may fail after.
            machine.apply_key_created(self._kv(wctx), c, event.key_id, namespace, ctx, wctx.now_ms)
            c.flush(self._kv(wctx))
            self.log.apply_key_event(wctx, event, ctx.encode())
            return event.key_id, c

        key_id, c = self.log.write(fn)
        self._after_apply(c)
        return key_id

    def shred_key(self, key_id: int, *, actor: Actor | None = None) -> int:
        """Crypto-shred a namespace key: every record sealed under it becomes unreadable for
        good. Allowed only when no message under it is retained, held or still in delivery;
        finished messages under it are removed with it. Needs the ``keys`` permission; audited.
        The wrapped key leaves the log at once (the log is compacted). Returns messages removed."""
        actor = self._actor(actor)
        namespace = self._check_shred(key_id)
        keyring = self.log.keyring

        def fn(wctx: WriteContext) -> tuple[object, Counters]:
            kv = self._kv(wctx)
            ctx = self._ctx(actor)
            c = self._counters()
            c.index = wctx.next_index
            result = machine.apply_shred(kv, c, key_id, namespace, ctx, wctx.now_ms)
            c.flush(kv)
            if not isinstance(result, machine.Denied):
                self.log.apply_key_event(wctx, keyring.shred_event(key_id, self._now_ms()), ctx.encode())
                wctx.put(b"meta", META_SCRUB_PENDING, b"\x01")  # durable with the shred (see _scrub)
            return result, c

        result, c = self.log.write(fn)
        self._after_apply(c)
        self._raise_denied(result)
        self._scrub()
        assert isinstance(result, int)
        return result

    def _scrub(self, wait_s: float = REPLACE_WAIT_S) -> bool:
        """After a shred: the wrapped key must not survive anywhere in the files. Drop the log
        records that held it, rewrite the database compactly (freed pages keep old bytes until
        reused), then clear the marker the shred set; a crash before that redoes it at open.

        The file is not rewritten while another process has the store open (read-only, e.g.
        `mqstore queue list --data-dir`; see Environment.replace_data): after ``wait_s`` seconds
        the rewrite is put off, said in a warning, and tried again by the maintenance (every
        ``_SCRUB_RETRY_S`` s, or at each maintain() call) and when the store is next opened, the
        marker staying until it is done. Returns whether it was done."""
        with self._scrub_lock:
            self.compact_log()
            try:
                self._rewrite_compacted(wait_s)
            except StoreInUse as exc:
                # the marker again: a scrub that finished meanwhile cleared it (this shred's too)
                self.log.write(lambda wctx: wctx.put(b"meta", META_SCRUB_PENDING, b"\x01"))
                if self._scrub_retry_at is None:
                    log.warning("store %s: a key was shredded (its records can no longer be opened, its wrapped "
                                "key is out of the log), but the database file, whose freed pages may still hold "
                                "it, is not rewritten yet: %s. It is tried again every %d s while this store is "
                                "open, and when it is opened next", self.path, exc, _SCRUB_RETRY_S)
                self._scrub_retry_at = time.monotonic() + _SCRUB_RETRY_S
                return False
            self.log.write(lambda wctx: wctx.delete(b"meta", META_SCRUB_PENDING))
            if self._scrub_retry_at is not None:
                log.warning("store %s: the database file was rewritten: the shredded key is in none of its files",
                            self.path)
            self._scrub_retry_at = None
            return True

    def _scrub_if_due(self) -> None:
        """The scrub a reader put off (see _scrub), once it is due and nobody else has the store
        open: tried without waiting."""
        if self._scrub_retry_at is None or time.monotonic() < self._scrub_retry_at:
            return
        if self.log.env.in_use_elsewhere() is not None:
            self._scrub_retry_at = time.monotonic() + _SCRUB_RETRY_S
            return
        self._scrub(wait_s=0.0)

    def _rewrite_compacted(self, wait_s: float = REPLACE_WAIT_S) -> None:
        """Replace the database file by a compacted copy of itself (pauses writes briefly);
        StoreInUse while another process has the store open (nothing changed)."""
        scratch = self.path / f"{_REWRITE_PREFIX}{os.getpid()}-{threading.get_ident()}"
        try:
            self.log.rewrite_compacted(scratch, wait_s=wait_s)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    # --- maintenance -----------------------------------------------------------------------------

    def _expire_in(self, wctx: WriteContext, kv: LmdbKV, c: Counters) -> int:
        items = machine.plan_expire(kv, wctx.now_ms, _MAINTENANCE_ITEMS_MAX)
        if not items:
            return 0
        entry = MaintenanceEntry(wctx.now_ms, tuple(items), self._ctx(SYSTEM_ACTOR))
        c.index = wctx.append(RecordType.EXPIRE, entry.encode())
        return machine.apply_expire(kv, c, entry)

    def maintain(self) -> dict[str, int]:
        """Expire leases and messages that are due, compact finished messages whose retention
        passed, and compact the log when it has grown. Returns what was done."""
        self._scrub_if_due()
        done = {"expired": 0, "compacted": 0, "log_records_removed": 0}

        def fn(wctx: WriteContext) -> tuple[int, int, Counters]:
            kv = self._kv(wctx)
            c = self._counters()
            expired = self._expire_in(wctx, kv, c)
            compacted = 0
            items = machine.plan_compact(kv, wctx.now_ms, _MAINTENANCE_ITEMS_MAX)
            if items:
                entry = MaintenanceEntry(wctx.now_ms, tuple(items), self._ctx(SYSTEM_ACTOR))
                c.index = wctx.append(RecordType.COMPACT, entry.encode())
                result = machine.apply_compact(kv, c, entry)
                compacted = result if isinstance(result, int) else 0
            ctx = self._ctx(SYSTEM_ACTOR)
            if self._audit_tick_due(kv, ctx.compliance_ms, wctx.now_ms):  # last: it covers the records above too
                tick = DenialEntry(wctx.now_ms, machine.TICK_OP, "", "", ctx)
                c.index = wctx.append(RecordType.AUDIT, tick.encode())
                machine.apply_denial(kv, c, tick)
            c.flush(kv)
            return expired, compacted, c

        while True:
            expired, compacted, c = self.log.write(fn)
            self._after_apply(c)
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

        removed = self.log.compact(upto, keeps_live_body)
        self._compacted_at = upto - 1
        return removed

    def _maintain_loop(self) -> None:
        while not self._closed.is_set():
            try:
                self._scrub_if_due()
                with self.log.env.read() as txn:
                    kv = LmdbKV(txn, self.log.env.dbs)
                    due = machine.next_timer_ms(kv)
                    tick = self._audit_tick_due(kv, self.compliance_clock.now_ms(), self._now_ms())
                now = self._now_ms()
                if tick or (due is not None and due <= now):
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


__all__ = ["BOUNCE_REASON_DEFAULT", "BounceResult", "Lease", "Message", "MessageSummary", "Page", "QShape", "QueueBase",
           "RecipientStatus", "Store", "open"]
