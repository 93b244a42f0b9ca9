"""gRPC clients for an mqstore cluster: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio).

Both mirror the embedded API (:mod:`mqstore.api`): the same method names, arguments, result types
(:class:`~mqstore.api.Lease`, :class:`~mqstore.api.Message`, :class:`~mqstore.api.Page`, ...) and
exceptions (:mod:`mqstore.errors`). Times are Unix epoch seconds and durations seconds, as in the
embedded API (the wire uses milliseconds).

Finding the leader
    Give the client any node addresses (``"host:port"``). Calls go to the last node that answered
    as leader. A follower answers ``NotLeader`` naming the leader: the client follows it at once
    (adding its address to the list). When a node cannot be reached, is shutting down, or knows no
    leader, the client tries the other nodes; once every node has been tried it waits (50 ms,
    doubling to 1 s, with jitter) and starts another round, until ``timeout`` seconds have passed
    since the call began. Then the call raises :class:`~mqstore.errors.Unavailable` (or
    :class:`~mqstore.errors.NotLeader` when the last node asked knew no reachable leader). One
    attempt may use half of ``timeout`` (at least 1 s), so a node that hangs leaves time for the
    others: set ``timeout`` above twice the slowest call you expect (a large ``list``, say).

Retries and duplicates
    ``enqueue``, ``enqueue_many`` and ``enqueue_stream`` give every message that has no
    ``idempotency_key`` a fresh random one *before* the first attempt and send exactly that key on
    every retry, so a retry after a timeout or a leader change returns the original message id and
    stores nothing twice. If a call still fails with ``Unavailable`` the message may or may not be
    stored: callers that retry on their own should pass their own ``idempotency_key``.

    ``lease`` is retried freely: a lease granted by an attempt whose answer was lost just expires.

    ``enqueue_stream`` resends the messages that were sent but not answered, with their keys. If
    the caller stops iterating early, messages already sent may be stored without their ids having
    been yielded (give them your own keys to find them again).

    ``ack``/``defer``/``bounce``/``ack_many`` are retried too. If an attempt committed but its
    answer was lost (the leader failed right after committing), the retry finds the lease already
    settled and raises :class:`~mqstore.errors.StaleLease`: after an ambiguous failure StaleLease
    means "already settled, or expired" — the client does not guess which.

    Reads, and the writes that set a state (``hold``, ``release``, ``requeue``,
    ``set_namespace_policy``, ``set_policy``, ``add_legal_hold``, ``extend_retention``,
    ``audit_checkpoint``: done twice, they leave the same state and give the same answer), are
    retried freely.

    The writes that are not idempotent (``delete``, ``bounce_message``, ``remove_legal_hold``,
    ``drop_namespace``, ``compact_messages``, ``rotate_key``, ``shred_key``: done twice, the second
    would raise NotFound, count 0, or make a second key) are resent only after an answer that
    says the node did nothing with the request: a follower's NotLeader, a refusal before the
    write was proposed (no leader known, shutting down, the leader refused the proposal), or a
    connection that could not be made (the request was never sent). After any other failure (the
    connection broke once the request was sent, the attempt timed out, the node answered
    Unavailable because the write may still commit) the call raises
    :class:`~mqstore.errors.Unavailable` saying the operation may or may not have been applied,
    and how to check (``get`` the message, ``list_keys``, ...). An attempt of such a write may use
    all of the call's ``timeout``, and when time runs out after refusals only, the Unavailable
    says it was not applied.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import datetime as _dt
import json
import queue
import random
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import grpc
import grpc.aio

from mqstore import errors, ids, limits, validate
from mqstore.api import (
    BOUNCE_REASON_DEFAULT,
    BounceResult,
    Lease,
    Message,
    MessageSummary,
    Page,
    QShape,
    QueueBase,
    RecipientStatus,
    _duration_ms,
    _seconds,
    _to_ms,
    _why,
    token_list,
)
from mqstore.compliance.audit import AUDIT_READ_RECORDS_MAX
from mqstore.compliance.rules import Mode
from mqstore.node.transport import CHANNEL_OPTIONS, GRPC_MESSAGE_BYTES_MAX
from mqstore.proto import admin_pb2, admin_pb2_grpc, compliance_pb2, compliance_pb2_grpc, queue_pb2, queue_pb2_grpc
from mqstore.queue.model import Policy
from mqstore.security.tls import ClientTLS
from mqstore.security.tls import aio_channel_factory as tls_aio_channel_factory
from mqstore.security.tls import channel_factory as tls_channel_factory

#: First and longest wait between attempts when no node could serve a call.
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 1.0
#: EnqueueStream: messages (and bytes) sent but not yet answered, at most.
STREAM_WINDOW_MESSAGES = 8192
STREAM_WINDOW_BYTES = 32 * 1024 * 1024
_STREAM_OUTBOX_MAX = 1024  # messages read from the caller's iterable ahead of sending
#: Messages per EnqueueStream request frame: framing many per request saves per-message gRPC work.
STREAM_FRAME_MESSAGES = 128
_STREAM_TICK_S = 0.1
#: One attempt may use this share of the call's ``timeout`` (at least ATTEMPT_TIMEOUT_MIN_S).
ATTEMPT_TIMEOUT_SHARE = 0.5
ATTEMPT_TIMEOUT_MIN_S = 1.0

#: The transport's options (message size limits, keepalive) plus a short reconnect backoff, so a
#: restarted node is noticed within a second rather than gRPC's default of up to two minutes.
CLIENT_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    *CHANNEL_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

ChannelFactory = Callable[[str], Any]  # address -> grpc.Channel (Client) or grpc.aio.Channel (AsyncClient)

_ENQUEUE_FIELDS = frozenset(
    ("mail_from", "recipients", "data", "namespace", "priority", "not_before", "expires_in", "idempotency_key")
)


def insecure_channel(address: str) -> Any:
    """The default channel factory of :class:`Client` (plaintext)."""
    return grpc.insecure_channel(address, options=CLIENT_CHANNEL_OPTIONS)


def insecure_aio_channel(address: str) -> Any:
    """The default channel factory of :class:`AsyncClient` (plaintext)."""
    return grpc.aio.insecure_channel(address, options=CLIENT_CHANNEL_OPTIONS)


# --- errors -----------------------------------------------------------------------------------------


def _error_classes() -> dict[str, type[errors.MQStoreError]]:
    out: dict[str, type[errors.MQStoreError]] = {}
    for name in errors.__all__:
        cls = getattr(errors, name)
        if isinstance(cls, type) and issubclass(cls, errors.MQStoreError):
            out[name] = cls
    return out


_ERROR_CLASSES = _error_classes()
_BY_STATUS: dict[Any, type[errors.MQStoreError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.Unavailable,
    grpc.StatusCode.CANCELLED: errors.Unavailable,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.Overloaded,
    grpc.StatusCode.DATA_LOSS: errors.Corruption,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
}
#: Failures that say nothing about the request itself: try again (elsewhere).
_RETRY_STATUS = frozenset((grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED))
_RETRY_ERRORS = frozenset(("NotLeader", "Unavailable", "ProposalDropped", "StoreClosed"))

#: Calls the client may send again after a failure that leaves open whether the node acted on the
#: request (the answer was lost, the attempt timed out, the node answered "it may still commit"):
#: reads; enqueues (their idempotency key makes a repeat return the first ids); ``Lease`` (a lease
#: whose answer was lost just expires); settles (a repeat raises StaleLease, documented); and the
#: writes that set a state, so that doing one twice leaves the same state and gives the same
#: answer (a policy of absolute values, a hold flag, a legal hold added, a retention end). Every
#: other call is in :data:`_NOT_RESENT`.
_RESENT = frozenset((
    "Enqueue", "EnqueueBatch", "Lease", "Ack", "Defer", "Bounce", "AckMany",
    "Get", "List", "QShape", "Stats", "GetPolicy", "ListKeys", "AuditRecords", "AuditQuery", "AuditHead",
    "Status",
    "Hold", "Release", "Requeue", "SetNamespacePolicy", "SetPolicy", "AddLegalHold", "ExtendRetention",
    "AuditCheckpoint",
))
#: The writes that are not idempotent (a repeat after the first took effect raises NotFound,
#: counts 0, makes a second key, ...): resent only after an answer that guarantees the node did
#: nothing (:func:`_nothing_done`). Their names in the API, and how a caller finds out whether one
#: whose outcome is unknown was applied. A call not listed in either set is treated as these.
_NOT_RESENT: dict[str, tuple[str, str]] = {
    "Delete": ("delete", "get(message_id) raises NotFound once it is deleted"),
    "BounceMessage": ("bounce_message", "get(message_id) shows each recipient's state ('bounced' and its reason)"),
    "RemoveLegalHold": ("remove_legal_hold", "get(message_id).legal_holds lists the holds still on it"),
    "DropNamespace": ("drop_namespace", "list(namespace=...) shows the messages left in it"),
    "CompactMessages": ("compact_messages", "get() each message: NotFound means it was removed"),
    "RotateKey": ("rotate_key", "list_keys() shows the namespace's keys and which one is current"),
    "ShredKey": ("shred_key", "list_keys() shows whether the key is shredded"),
}
#: gRPC's own UNAVAILABLE when no connection could be made: the request was never sent.
_NEVER_SENT = (
    "failed to connect to all addresses",
    "Failed to connect to remote host",
    "Connection refused",
    "errors resolving",
    "DNS resolution failed",
)


def _trailer(exc: Any, key: str) -> str:
    try:
        metadata = exc.trailing_metadata() or ()
    except Exception:
        return ""
    for k, v in metadata:
        if k == key:
            return v if isinstance(v, str) else v.decode("utf-8", "replace")
    return ""


def _code(exc: Any) -> Any:
    try:
        return exc.code()
    except Exception:
        return grpc.StatusCode.UNKNOWN


def _details(exc: Any) -> str:
    try:
        details = exc.details()
    except Exception:
        details = None
    return str(details or _code(exc))


def _map_error(exc: Any) -> errors.MQStoreError:
    """The exception the embedded API would raise for a failed call (a ``grpc.RpcError``)."""
    error = _error_of(exc)
    error.request_id = _trailer(exc, "x-request-id") or None
    return error


#: gRPC's refusal of a message over a size limit (RESOURCE_EXHAUSTED, as a full queue is).
_TOO_LARGE = re.compile(r"(CLIENT|SERVER): (Sent|Received) message larger than max \((\d+) vs\. (\d+)\)")


def _too_large(details: str) -> errors.MQStoreError | None:
    """The error for a request or an answer over gRPC's message size limit: not Overloaded (a
    retry of the same call fails the same way). A request that big was never served (nothing
    done); an answer that big was not delivered, after the node served the call."""
    found = _TOO_LARGE.search(details)
    if found is None:
        return None
    side, verb, size, limit = found.groups()
    if (side, verb) in (("CLIENT", "Sent"), ("SERVER", "Received")):
        return errors.InvalidArgument(
            f"the request is {size} bytes, over the {limit}-byte gRPC message limit: nothing was done "
            f"(send less per call) [{details}]")
    return errors.MQStoreError(
        f"the answer is {size} bytes, over the {limit}-byte gRPC message limit: it was not delivered, "
        f"though the node served the call; ask for less per call (a retry gets the same) [{details}]")


def _error_of(exc: Any) -> errors.MQStoreError:
    name = _trailer(exc, "mqstore-error")
    details = _details(exc)
    if not name and _code(exc) == grpc.StatusCode.RESOURCE_EXHAUSTED:
        too_large = _too_large(details)
        if too_large is not None:
            return too_large
    if name == "NotLeader":
        leader_id = _trailer(exc, "mqstore-leader-id")
        return errors.NotLeader(
            details, int(leader_id) if leader_id.isdigit() else 0, _trailer(exc, "mqstore-leader")
        )
    cls = _ERROR_CLASSES.get(name) or _BY_STATUS.get(_code(exc), errors.MQStoreError)
    try:
        return cls(details)
    except TypeError:  # a subclass with another constructor
        return errors.MQStoreError(details)


class _Stalled(grpc.RpcError):  # type: ignore[misc]
    """A stream attempt that got no answer within the attempt's time (cancelled by the client)."""

    def code(self) -> Any:
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self) -> str:
        return "no answer on the stream in time"

    def trailing_metadata(self) -> tuple[()]:
        return ()


def _retriable(exc: Any) -> bool:
    name = _trailer(exc, "mqstore-error")
    if name:
        return name in _RETRY_ERRORS
    # Without mqstore-error the failure came from gRPC itself, not the servicer: the connection
    # broke (UNAVAILABLE), the deadline passed, the server shut down (CANCELLED), or, for grpc.aio
    # streams whose connection broke while a request was being written, INTERNAL ("Internal error
    # from Core", grpc/grpc#36066).
    return _code(exc) in _RETRY_STATUS or _code(exc) == grpc.StatusCode.INTERNAL


def _nothing_done(exc: Any) -> bool:
    """Whether a failed attempt certainly did nothing (so even a write that is not idempotent may
    be sent again): a follower's NotLeader, a refusal before the write was proposed, or a
    connection that could not be made."""
    name = _trailer(exc, "mqstore-error")
    if name in ("NotLeader", "ProposalDropped") or _trailer(exc, "mqstore-not-applied") == "1":
        return True  # the node says so (mqstore.errors.Unavailable.not_applied)
    if name:
        return False
    return _code(exc) == grpc.StatusCode.UNAVAILABLE and any(text in _details(exc) for text in _NEVER_SENT)


class _Router:
    """Which node to call: the last one that answered as leader, else the addresses in turn.
    Shared by all calls of a client (thread safe)."""

    def __init__(self, addresses: str | Sequence[str]) -> None:
        if isinstance(addresses, str):
            addresses = [a for a in addresses.split(",") if a.strip()]
        if isinstance(addresses, (bytes, bytearray)) or not isinstance(addresses, Sequence):
            raise errors.InvalidArgument("addresses must be 'host:port' or a list of them")
        clean = [a.strip() for a in addresses if isinstance(a, str) and a.strip()]
        if not clean or len(clean) != len(addresses):
            raise errors.InvalidArgument(f"addresses must be non-empty 'host:port' strings, not {addresses!r}")
        for address in clean:
            port = address.rpartition(":")[2]
            if port.isascii() and port.isdigit() and not 0 < int(port) < 65536:
                # gRPC would take it modulo 65536: a typo would reach whatever listens there.
                raise errors.InvalidArgument(f"address {address!r}: the port must be 1..65535")
        self.addresses: list[str] = list(dict.fromkeys(clean))
        self.leader: str | None = None
        self._next = 0
        self._lock = threading.Lock()

    def current(self) -> str:
        with self._lock:
            return self.leader or self.addresses[self._next % len(self.addresses)]

    def succeeded(self, address: str) -> None:
        with self._lock:
            self.leader = address

    def redirect(self, address: str) -> None:
        with self._lock:
            if address not in self.addresses:
                self.addresses.append(address)
            self.leader = address

    def failed(self, address: str, skip: set[str]) -> str:
        """``address`` could not serve a call: forget it as leader; returns the next node to try,
        passing over those in ``skip`` unless that leaves none."""
        with self._lock:
            if self.leader == address:
                self.leader = None
            n = len(self.addresses)
            start = self.addresses.index(address) + 1 if address in self.addresses else self._next + 1
            order = [self.addresses[(start + i) % n] for i in range(n)]
            choice = next((a for a in order if a not in skip), order[0])
            self._next = self.addresses.index(choice)
            return choice


class _Attempts:
    """The retry state of one call: which node to try next, the backoff, the time left."""

    def __init__(
        self, router: _Router, timeout: float, address: str | None = None, method: str | None = None
    ) -> None:
        self.router = router
        self.timeout = timeout
        #: May the request be sent again after a failure that leaves its outcome open? (A call
        #: without ``method`` is a stream: it resends with the same idempotency keys.)
        self.resend = method is None or method in _RESENT
        self.method = method or ""
        self.fixed = address is not None
        self.address = address or router.current()
        self.deadline = time.monotonic() + timeout
        self.delay = BACKOFF_FIRST_S
        self.redirects = 0
        self.count = 0
        self.unreachable: set[str] = set()  # nodes gRPC could not reach (or hung) during this call
        self.tried: set[str] = set()  # nodes tried since the last backoff
        self.last: errors.MQStoreError | None = None

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def attempt_limit(self) -> float:
        """How long one attempt may take: part of the call's time, so that a node that hangs (a
        machine gone without closing its connections) leaves time to try the others. A write that
        is not resent after a timeout may use all of it (trying another node would not help)."""
        if not self.resend:
            return self.timeout
        return max(ATTEMPT_TIMEOUT_MIN_S, self.timeout * ATTEMPT_TIMEOUT_SHARE)

    def attempt_timeout(self) -> float:
        return max(0.001, min(self.remaining(), self.attempt_limit()))

    def progress(self) -> None:
        """The call made progress (a stream got an answer): its time and backoff start over."""
        self.deadline = time.monotonic() + self.timeout
        self.delay = BACKOFF_FIRST_S
        self.redirects = 0
        self.unreachable.clear()
        self.tried.clear()

    def failed(self, exc: BaseException) -> float:
        """An attempt failed with ``exc``: raise the mapped error if retrying cannot help or time
        is up; otherwise pick the node for the next attempt and return the seconds to wait."""
        self.count += 1
        if not isinstance(exc, grpc.RpcError):
            raise exc
        error = _map_error(exc)
        if not _retriable(exc):
            raise error from None
        if not self.resend and not _nothing_done(exc):
            raise self.outcome_unknown(error) from None  # it may have been applied: do not repeat it
        self.last = error
        leader = error.leader_address if isinstance(error, errors.NotLeader) else ""
        if not _trailer(exc, "mqstore-error"):
            self.unreachable.add(self.address)  # gRPC's failure, not an answer from the node
        self.tried.add(self.address)
        # Follow a redirect at once, unless it names a node that could not be reached in this
        # round (followers keep naming a crashed leader until they elect another) or redirects go
        # round in circles (nodes naming each other during an election). Otherwise try the next
        # node not yet tried in this round; once every candidate has been, back off and start a
        # new round in which every node is a candidate again.
        if (
            not self.fixed
            and leader
            and leader != self.address
            and leader not in self.unreachable
            and self.redirects < 2 * len(self.router.addresses)
        ):
            self.redirects += 1
            self.router.redirect(leader)
            self.address = leader
            wait = 0.0
        else:
            if not self.fixed:
                self.address = self.router.failed(self.address, self.unreachable)
            if self.fixed or self.address in self.tried:
                self.tried.clear()  # a new round: every node is a candidate again
                self.unreachable.clear()
                wait = self._backoff()
            else:
                wait = 0.0
        remaining = self.remaining()
        if remaining <= 0.001:
            raise self.give_up() from None
        return min(wait, remaining)

    def _backoff(self) -> float:
        wait = self.delay * random.uniform(0.5, 1.0)  # jitter: many clients do not retry in step
        self.delay = min(self.delay * 2, BACKOFF_MAX_S)
        return wait

    def check_time(self) -> None:
        if self.remaining() <= 0.001:
            raise self.give_up()

    def give_up(self) -> errors.MQStoreError:
        last = self.last
        tried = f"{self.count} attempt(s) in {self.timeout:g} s"
        if not self.resend:
            # Every attempt was refused before it did anything (else outcome_unknown was raised).
            tried += f"; {self._name()} was not applied"
        error: errors.MQStoreError
        if isinstance(last, errors.NotLeader):
            error = errors.NotLeader(f"no leader answered ({tried}); last: {last}", last.leader_id, last.leader_address)
        else:
            error = errors.Unavailable(f"no mqstore node could serve the call ({tried}); last error: {last}")
        error.request_id = last.request_id if last is not None else None  # the last attempt's
        return error

    def _name(self) -> str:
        return _NOT_RESENT.get(self.method, (self.method, ""))[0]

    def closed_error(self) -> errors.StoreClosed:
        """The error for a call the client's close() ended while it ran (a write that is not
        resent says that it may have been applied, and how to check)."""
        text = "the client was closed while the call ran"
        if not self.resend:
            check = _NOT_RESENT.get(self.method, ("", "read the state it changes"))[1]
            text += f" ({self._name()} may or may not have been applied: {check})"
        return errors.StoreClosed(text)

    def outcome_unknown(self, error: errors.MQStoreError) -> errors.Unavailable:
        """The error for a write that is not resent after a failure that leaves open whether the
        node applied it (the answer was lost, the attempt timed out, "it may still commit")."""
        check = _NOT_RESENT.get(self.method, ("", "read the state it changes"))[1]
        unknown = errors.Unavailable(
            f"{self._name()} may or may not have been applied: the attempt on {self.address} failed without an "
            f"answer that says which ({error}). It was not sent again (doing it twice is not the same as doing it "
            f"once): check before trying again: {check}"
        )
        unknown.request_id = error.request_id
        return unknown


# --- requests ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _building(what: str) -> Iterator[None]:
    """Protobuf's complaints about a field's type or range, as InvalidArgument."""
    try:
        yield
    except (TypeError, ValueError, OverflowError) as exc:
        if isinstance(exc, errors.MQStoreError):
            raise
        raise errors.InvalidArgument(f"{what}: {exc}") from None


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _optional(value: Any, check: Callable[[Any, str], Any], name: str) -> str:
    """A filter argument: None means any ("" on the wire); anything else must be valid."""
    if value is None:
        return ""
    return str(check(value, name))


def _new_message(m: object, i: int, *, stream: bool = False) -> Any:
    """A message dict (enqueue's keyword names) as a NewMessage, with an idempotency key. In a
    ``stream`` a refused recipient list or data names the message's position in the caller's
    iterable, as the node's refusal did when it made those checks ("messages[150]: recipients[0]
    ..."); elsewhere the messages are the embedded store's."""
    if not isinstance(m, Mapping):
        raise errors.InvalidArgument(f"messages[{i}] must be a dict, not {type(m).__name__}")
    unknown = set(m) - _ENQUEUE_FIELDS
    if unknown:
        raise errors.InvalidArgument(f"messages[{i}] has unknown field(s) {sorted(unknown)}")
    if "mail_from" not in m or "recipients" not in m or "data" not in m:
        raise errors.InvalidArgument(f"messages[{i}] needs mail_from, recipients and data")
    # The embedded store's checks, in its order (mqstore.api QueueBase._new_messages, then the log's).
    namespace = validate.namespace(m.get("namespace", "default"))
    expires_in = m.get("expires_in")
    expires_in_ms = 0 if expires_in is None else _duration_ms(expires_in, f"messages[{i}].expires_in")
    not_before_ms = _to_ms(m.get("not_before"), f"messages[{i}].not_before")
    # The log's checks (mqstore.store.log stage_messages), with its validators and in its order.
    mail_from = validate.address(m["mail_from"], "mail_from", allow_null=True)  # None is not "" (the null path)
    where = f"messages[{i}]: " if stream else ""
    recipients = validate.recipients(m["recipients"], f"{where}recipients")
    priority = validate.integer(m.get("priority", 0), "priority", limits.PRIORITY_MIN, limits.PRIORITY_MAX)
    key = validate.idempotency_key(m.get("idempotency_key")) or uuid.uuid4().hex
    data = validate.data(m["data"], f"{where}data")
    with _building(f"messages[{i}]"):
        return queue_pb2.NewMessage(
            mail_from=mail_from,
            recipients=recipients,
            data=data,
            namespace=namespace,
            priority=priority,
            not_before_ms=not_before_ms,
            expires_in_ms=expires_in_ms,
            idempotency_key=key,
        )


def _batch_request(messages: Sequence[Mapping[str, Any]]) -> Any:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise errors.InvalidArgument("messages must be a non-empty list of dicts")
    request = queue_pb2.EnqueueBatchRequest(messages=[_new_message(m, i) for i, m in enumerate(messages)])
    size = request.ByteSize()
    if size > GRPC_MESSAGE_BYTES_MAX:
        raise errors.InvalidArgument(
            f"the batch is {size} bytes, over the {GRPC_MESSAGE_BYTES_MAX}-byte gRPC message limit: send fewer "
            "messages per call (or use enqueue_stream)"
        )
    return request


def _enqueue_dict(
    mail_from: str,
    recipients: Sequence[str],
    data: bytes,
    namespace: str,
    priority: int,
    not_before: float | _dt.datetime | None,
    expires_in: float | None,
    idempotency_key: str | None,
) -> dict[str, Any]:
    return {
        "mail_from": mail_from,
        "recipients": recipients,
        "data": data,
        "namespace": namespace,
        "priority": priority,
        "not_before": not_before,
        "expires_in": expires_in,
        "idempotency_key": idempotency_key,
    }


def _lease_request(
    worker: str, max_messages: int, lease_seconds: float, namespace: str | None, domain: str | None
) -> Any:
    # The embedded lease's checks (worker, max_messages: 0 would mean "100" on the wire,
    # lease_seconds: 0 would mean "300 s", namespace, domain), with its messages.
    lease_ms, _ = QueueBase._lease_args(worker, max_messages, lease_seconds, namespace, domain)
    with _building("lease"):
        return queue_pb2.LeaseRequest(
            worker=worker,
            max_messages=max_messages,
            lease_ms=lease_ms,
            namespace=_optional(namespace, validate.namespace, "namespace"),
            domain=_optional(domain, validate.domain, "domain"),
        )


def _namespace_ref(namespace: object) -> Any:
    return compliance_pb2.NamespaceRef(namespace=validate.namespace(namespace))


def _key_ref(key_id: object) -> Any:
    return compliance_pb2.KeyRef(key_id=validate.integer(key_id, "key_id", 1, 2**32 - 1))


def _tokens(tokens: object) -> list[int]:
    return [_token(t) for t in token_list(tokens)]


def _token(token: object) -> int:
    if isinstance(token, bool) or not isinstance(token, int):
        raise errors.InvalidArgument(f"a lease token is an integer, not {type(token).__name__}")
    if not 0 <= token < 2**64:
        raise errors.StaleLease(f"lease {token} does not exist")
    return token


def _settle_request(token: int, recipients: Iterable[str] | None, reason: str | None) -> Any:
    wanted: list[str] = []
    if recipients is not None:
        wanted = validate.listed(recipients, "recipients", "addresses")
        if not all(isinstance(a, str) for a in wanted):
            raise errors.InvalidArgument("recipients must be a list of addresses (strings)")
        if not wanted:  # on the wire, empty means "all of the lease's recipients"
            raise errors.InvalidArgument("recipients is empty (pass None for all of the lease's recipients)")
    QueueBase._check_reason(reason)  # as the embedded store checks it
    with _building("settle"):
        return queue_pb2.SettleRequest(token=_token(token), recipients=wanted, reason=reason or "")


def _message_id(message_id: object) -> str:
    if isinstance(message_id, bytes) and len(message_id) == 16:
        return ids.format_id(message_id)
    if not isinstance(message_id, str):
        raise errors.InvalidArgument(f"a message id is a string, not {type(message_id).__name__}")
    try:
        message_id.encode("utf-8")
    except UnicodeEncodeError:
        raise errors.InvalidArgument("a message id is not valid Unicode (lone surrogate)") from None
    return message_id


def _list_request(
    state: str | None,
    namespace: str | None,
    domain: str | None,
    older_than: float | None,
    limit: int,
    after: str | None,
) -> Any:
    validate.integer(limit, "limit", 1, 100_000)
    if state is not None and (not isinstance(state, str) or not state):
        raise errors.InvalidArgument(f"state must be a recipient state, 'held', 'active' or 'done', not {state!r}")
    older_ms = 0 if older_than is None else _ms(_seconds(older_than, "older_than", allow_zero=True))
    if after is not None:
        ids.parse_id(_message_id(after))
    with _building("list"):
        return queue_pb2.ListRequest(
            state=state or "",
            namespace=_optional(namespace, validate.namespace, "namespace"),
            domain=_optional(domain, validate.domain, "domain"),
            older_than_ms=older_ms,
            limit=limit,
            after="" if after is None else _message_id(after),
        )


def _mode_name(mode: object) -> str:
    return Mode.parse(mode).name.lower()


def _lock_retention_ms(seconds: object) -> int:
    """A namespace's lock retention (seconds) in ms, checked as the embedded store checks it
    (mqstore.api QueueBase._new_policy; "retention" is the name its messages use)."""
    ms = _duration_ms(seconds, "retention", allow_zero=True)
    if ms > limits.LOCK_RETENTION_MS_MAX:
        raise errors.InvalidArgument(f"retention is at most {limits.LOCK_RETENTION_MS_MAX // 86_400_000} days")
    return ms


def _policy_request(
    namespace: str,
    backoff: Sequence[float] | None,
    lifetime: float | None,
    retention: float | None,
    dedup_window: float | None,
    expired_retention: float | None,
    mode: str | Mode | None,
    lock_retention: float | None,
    bypass_governance: bool,
    reason: str | None,
) -> Any:
    # The embedded set_namespace_policy's checks, in its order. On the wire -1 (0 for lifetime,
    # "" for mode, an empty list for backoff) keeps a value: every value sent was checked first,
    # so a value the store refuses never reaches the wire as one of those.
    validate.namespace(namespace)
    why = _why(bypass_governance, reason)
    backoff_ms: list[int] = []
    if backoff is not None:
        if isinstance(backoff, (str, bytes)) or not isinstance(backoff, Sequence) or len(backoff) > 64:
            raise errors.InvalidArgument("backoff must be a list of at most 64 delays in seconds")
        backoff_ms = [_duration_ms(s, f"backoff[{i}]") for i, s in enumerate(backoff)]
    mode_name = "" if mode is None else _mode_name(mode)
    lock_ms = -1 if lock_retention is None else _lock_retention_ms(lock_retention)

    def keep_or_ms(value: float | None, name: str) -> int:
        return -1 if value is None else _duration_ms(value, name, allow_zero=True)

    with _building("set_namespace_policy"):
        return queue_pb2.PolicyRequest(
            namespace=namespace,
            backoff_ms=backoff_ms,
            reset_backoff=backoff is not None and not backoff,
            lifetime_ms=0 if lifetime is None else _duration_ms(lifetime, "lifetime"),
            retention_ms=keep_or_ms(retention, "retention"),
            dedup_window_ms=keep_or_ms(dedup_window, "dedup_window"),
            expired_retention_ms=keep_or_ms(expired_retention, "expired_retention"),
            mode=mode_name,
            lock_retention_ms=lock_ms,
            bypass_governance=bypass_governance,
            reason=why,
        )


def _delete_request(message_id: str, bypass_governance: bool, reason: str | None) -> Any:
    with _building("delete"):
        return queue_pb2.MessageRef(message_id=_message_id(message_id), bypass_governance=bypass_governance,
                                    reason=reason or "")


def _bounce_message_request(message_id: str, reason: str | None) -> Any:
    mid = _message_id(message_id)
    ids.parse_id(mid)  # the embedded bounce_message's checks, in its order: the id, then the reason
    QueueBase._check_reason(reason)
    with _building("bounce_message"):
        return queue_pb2.BounceMessageRequest(message_id=mid, reason=reason or "")


def _bounce_result(message_id: str, response: Any) -> BounceResult:
    # The id as the store spells it (the call succeeded: the server parsed it).
    return BounceResult(ids.format_id(ids.parse_id(_message_id(message_id))), response.bounced, response.left_leased)


def _set_policy_request(
    namespace: str, mode: str, retention_days: float | None, bypass_governance: bool, reason: str | None
) -> Any:
    # The embedded set_policy's checks, in its order: a retention that is not a number of days
    # >= 0 is refused here, never sent as -1 ("keep") or as a made-up number.
    retention_s = None
    if retention_days is not None:
        retention_s = _seconds(retention_days, "retention_days", allow_zero=True) * 86_400
    validate.namespace(namespace)
    why = _why(bypass_governance, reason)
    mode_name = _mode_name(mode)
    retention_ms = -1 if retention_s is None else _lock_retention_ms(retention_s)  # -1: keep
    with _building("set_policy"):
        return compliance_pb2.SetPolicyRequest(
            namespace=namespace, mode=mode_name, retention_ms=retention_ms, bypass_governance=bypass_governance,
            reason=why)


def _legal_hold_request(message_id: str, case: str) -> Any:
    with _building("legal hold"):
        return compliance_pb2.LegalHoldRequest(message_id=_message_id(message_id), case=case)


def _retention_request(
    message_id: str, until: float | _dt.datetime, bypass_governance: bool, reason: str | None
) -> Any:
    # The embedded extend_retention's checks, in its order.
    mid = _message_id(message_id)
    until_ms = _to_ms(until, "until")
    if until_ms <= 0 or until_ms > limits.TIME_MS_MAX:
        raise errors.InvalidArgument("until must be a time after the epoch")
    why = _why(bypass_governance, reason)
    with _building("extend_retention"):
        return compliance_pb2.RetentionRequest(
            message_id=mid, until_ms=until_ms, bypass_governance=bypass_governance, reason=why)


def _compact_request(message_ids: Iterable[str]) -> Any:
    with _building("compact_messages"):
        return compliance_pb2.CompactRequest(message_ids=[_message_id(m) for m in message_ids])


def _audit_records_request(after: int | None, limit: int) -> Any:
    # The embedded audit_records' checks (0 would mean "the default", 1000, on the wire).
    if after is not None:
        validate.integer(after, "after", 0, 2**63)
    validate.integer(limit, "limit", 1, AUDIT_READ_RECORDS_MAX)
    with _building("audit_records"):
        return compliance_pb2.AuditRecordsRequest(after=after or 0, limit=limit)


def _audit_query_request(
    where: Mapping[str, Any] | None, since_ms: int | None, until_ms: int | None, after: int | None, limit: int
) -> Any:
    # As the embedded audit_query (mqstore.compliance.audit.query), first; 0 would mean "1000".
    if not isinstance(limit, int) or not 1 <= limit <= AUDIT_READ_RECORDS_MAX:
        raise errors.InvalidArgument(f"limit is 1..{AUDIT_READ_RECORDS_MAX}")
    for name, value in (("since_ms", since_ms), ("until_ms", until_ms), ("after", after)):
        if value is not None:
            validate.integer(value, name, 0, 2**63 - 1)
    if where is not None and not isinstance(where, Mapping):
        raise errors.InvalidArgument("where maps record field names to the values they must equal")
    with _building("audit_query"):
        return compliance_pb2.AuditQueryRequest(
            where_json=json.dumps(dict(where or {})), since_ms=since_ms or 0, until_ms=until_ms or 0,
            after=after or 0, limit=limit)


# --- answers ----------------------------------------------------------------------------------------


def _policy(p: Any) -> Policy:
    """A queue.PolicyResponse (SetNamespacePolicy's answer) as the embedded store's Policy."""
    return Policy(
        backoff_ms=tuple(p.backoff_ms),
        lifetime_ms=p.lifetime_ms,
        retention_ms=p.retention_ms,
        dedup_window_ms=p.dedup_window_ms,
        expired_retention_ms=p.expired_retention_ms,
        mode=int(Mode.parse(p.mode or "none")),
        lock_retention_ms=p.lock_retention_ms,
    )


def _lock_policy(p: Any) -> Policy:
    """A compliance.PolicyInfo (SetPolicy's and GetPolicy's answer): the namespace's whole policy."""
    return Policy(
        backoff_ms=tuple(p.backoff_ms),
        lifetime_ms=p.lifetime_ms,
        retention_ms=p.finished_retention_ms,
        dedup_window_ms=p.dedup_window_ms,
        expired_retention_ms=p.expired_retention_ms,
        mode=int(Mode.parse(p.mode or "none")),
        lock_retention_ms=p.retention_ms,
    )


def _no_unknown_filters(unknown: Mapping[str, Any]) -> None:
    """audit_query's keyword arguments it does not know: refused as the embedded store refuses them."""
    if unknown:
        raise errors.InvalidArgument(f"audit_query has no filter(s) {sorted(unknown)}: filter on record fields with "
                                     "where={name: value}; the others are since_ms, until_ms, after and limit")


def _s(ms: int) -> float | None:
    return ms / 1000 if ms else None


def _lease(p: Any) -> Lease:
    return Lease(
        message_id=p.message_id,
        token=p.token,
        namespace=p.namespace,
        mail_from=p.mail_from,
        recipients=tuple(p.recipients),
        data=p.data,
        attempts=p.attempts,
        deadline=p.deadline_ms / 1000,
        priority=p.priority,
    )


def _message(p: Any) -> Message:
    return Message(
        message_id=p.message_id,
        namespace=p.namespace,
        mail_from=p.mail_from,
        recipients=tuple(
            RecipientStatus(
                address=r.address,
                state=r.state,
                attempts=r.attempts,
                next_attempt=_s(r.next_attempt_ms),
                last_reason=r.last_reason or None,
                lease_token=r.lease_token or None,
                lease_deadline=_s(r.lease_deadline_ms),
            )
            for r in p.recipients
        ),
        data=p.data,
        priority=p.priority,
        created=p.created_ms / 1000,
        not_before=_s(p.not_before_ms),
        expires_at=_s(p.expires_at_ms),
        held=p.held,
        done=p.done,
        size=p.size,
        idempotency_key=p.idempotency_key or None,
        retain_until=_s(p.retain_until_ms),
        retention_mode=p.retention_mode or "none",
        locked_until=_s(p.locked_until_ms),
        legal_holds=tuple(p.legal_holds),
        key_id=p.key_id,
    )


def _page(p: Any) -> Page:
    page = Page(
        MessageSummary(
            message_id=s.message_id,
            namespace=s.namespace,
            created=s.created_ms / 1000,
            priority=s.priority,
            size=s.size,
            held=s.held,
            done=s.done,
            recipients=s.recipients,
            states=dict(s.states),
        )
        for s in p.messages
    )
    page.next_after = p.next_after or None
    return page


def _qshape(p: Any) -> QShape:
    return QShape(tuple(p.buckets), tuple(p.total), {row.domain: tuple(row.counts) for row in p.domains})


def _status(p: Any) -> dict[str, Any]:
    return {
        "node_id": p.node_id,
        "site": p.site,
        "role": p.role,
        "term": p.term,
        "leader_id": p.leader_id,
        "leader_address": p.leader_address,
        "commit_index": p.commit_index,
        "applied_index": p.applied_index,
        "first_index": p.first_index,
        "last_index": p.last_index,
        "min_sites": p.min_sites,
        "members": [
            {"id": m.id, "site": m.site, "address": m.address, "voter": m.voter, "match_index": m.match_index,
             **({"clock_offset_ms": m.clock_offset_ms, "clock_error_ms": m.clock_error_ms}
                if m.HasField("clock_offset_ms") else {})}
            for m in p.members
        ],
        "stats": json.loads(p.stats_json) if p.stats_json else {},
        "disk_used_bytes": p.disk_used_bytes,
        "founding": p.founding,
    }


def _keys(p: Any) -> list[dict[str, Any]]:
    return [{"key_id": k.key_id, "namespace": k.namespace, "created_ms": k.created_ms, "shredded": k.shredded,
             "current": k.current} for k in p.keys]


def _audit_records(p: Any) -> list[dict[str, Any]]:
    return [json.loads(x) for x in p.records_json]


def _checkpoint(p: Any) -> Any:
    """A CheckpointResponse as an :class:`mqstore.compliance.audit.Checkpoint` (None: no audit record yet)."""
    from mqstore.compliance.audit import Checkpoint

    text = p.checkpoint_json
    return Checkpoint.from_json(text) if text else None


class _Stubs:
    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.queue = queue_pb2_grpc.QueueStub(channel)
        self.admin = admin_pb2_grpc.AdminStub(channel)
        self.compliance = compliance_pb2_grpc.ComplianceStub(channel)


# --- EnqueueStream bookkeeping ------------------------------------------------------------------------


class _StreamState:
    """What an enqueue stream has sent but not had answered (``pending``, resent in order after a
    failure, with the same idempotency keys) and what it has read ahead from the caller
    (``outbox``). ``generation`` names the current attempt: an older attempt's request iterator
    stops moving messages once it changes."""

    def __init__(self) -> None:
        self.outbox: deque[Any] = deque()
        self.pending: deque[tuple[Any, int]] = deque()
        self.pending_bytes = 0
        self.source_done = False
        self.source_error: BaseException | None = None
        self.generation = 0
        #: The current attempt got an answer (the asyncio client sends one frame until then).
        self.confirmed = False
        self.closed = False
        #: Messages answered so far, over every attempt (the caller's position in its iterable).
        self.answered_count = 0

    def window_open(self) -> bool:
        return not self.pending or (
            len(self.pending) < STREAM_WINDOW_MESSAGES and self.pending_bytes < STREAM_WINDOW_BYTES
        )

    def take(self) -> list[Any]:
        """Move up to a frame's worth of messages from the outbox to pending (the caller checked
        the window is open; it may overshoot by less than a frame)."""
        frame: list[Any] = []
        while self.outbox and len(frame) < STREAM_FRAME_MESSAGES and self.window_open():
            m = self.outbox.popleft()
            size = len(m.data)
            self.pending.append((m, size))
            self.pending_bytes += size
            frame.append(m)
        return frame

    def answered(self) -> None:
        if not self.pending:
            raise errors.MQStoreError("EnqueueStream answered more messages than were sent")
        _, size = self.pending.popleft()
        self.pending_bytes -= size
        self.answered_count += 1
        self.confirmed = True

    def complete(self) -> bool:
        """Every message the caller gave was sent and answered: only the end of the stream is
        still to come."""
        return self.source_done and not self.outbox and not self.pending

    def close(self) -> None:
        """Stop the feeder and the attempt's request iterator (the caller holds the condition)."""
        self.closed = True
        self.generation += 1

    def finished_early(self) -> errors.MQStoreError:
        return errors.MQStoreError(
            f"the server ended EnqueueStream with {len(self.pending)} message(s) unanswered"
        )


def _stream_position(error: errors.MQStoreError, base: int) -> errors.MQStoreError:
    """A node's refusal of a stream's ``messages[j]``, counted from the start of one attempt,
    as the caller's position: ``base`` messages were answered before that attempt (it resent the
    rest in order)."""
    text = str(error)
    named = _BAD_MESSAGE.match(text)
    if not base or named is None or not isinstance(error, errors.InvalidArgument):
        return error
    renamed = errors.InvalidArgument(f"messages[{base + int(named.group(1))}]{text[named.end():]}")
    renamed.request_id = error.request_id
    return renamed


#: An enqueue error naming the message it refuses.
_BAD_MESSAGE = re.compile(r"messages\[(\d+)\]")


# --- what both clients share ----------------------------------------------------------------------------


class _ClientBase:
    """What the blocking and the asyncio client share: the addresses, the leader last seen, and
    how channels are made (``_tls_factory`` and ``_insecure`` differ between the two)."""

    _tls_factory: Callable[..., ChannelFactory]
    _insecure: Callable[[str], Any]

    def __init__(
        self,
        addresses: str | list[str],
        *,
        timeout: float = 10.0,
        channel_factory: ChannelFactory | None = None,
        tls: ClientTLS | None = None,
        token: str | None = None,
    ) -> None:
        self.timeout = _seconds(timeout, "timeout")
        self._router = _Router(addresses)
        if channel_factory is not None and (tls is not None or token is not None):
            raise errors.InvalidArgument("give channel_factory, or tls/token, not both")
        if channel_factory is None and (tls is not None or token is not None):
            channel_factory = self._tls_factory(tls, token, CLIENT_CHANNEL_OPTIONS)
        self._channel_factory = channel_factory or self._insecure
        self._stubs: dict[str, _Stubs] = {}
        self._closed = False

    @property
    def addresses(self) -> list[str]:
        """The nodes this client knows (the ones given, plus leaders it was redirected to)."""
        return list(self._router.addresses)

    @property
    def leader(self) -> str | None:
        """The address of the node that last answered as leader (None before the first call)."""
        return self._router.leader


# --- the blocking client --------------------------------------------------------------------------------


class Client(_ClientBase):
    """A blocking mqstore client (thread safe): the embedded API, served by a cluster.

    ``addresses`` are any of the cluster's nodes (``"host:port"``, a list, or comma-separated).
    ``timeout`` bounds each call, retries included. ``tls`` (a
    :class:`~mqstore.security.tls.ClientTLS`: the cluster CA, this client's certificate and key)
    connects with mutual TLS, as nodes with ``[tls]`` require; without it the client speaks
    plaintext (to ``insecure`` nodes). ``token`` sends ``authorization: Bearer <token>`` on every
    call. ``channel_factory(address)`` replaces all that with channels of your own making.
    """

    _tls_factory = staticmethod(tls_channel_factory)
    _insecure = staticmethod(insecure_channel)

    def __init__(
        self,
        addresses: str | list[str],
        *,
        timeout: float = 10.0,
        channel_factory: ChannelFactory | None = None,
        tls: ClientTLS | None = None,
        token: str | None = None,
    ) -> None:
        super().__init__(addresses, timeout=timeout, channel_factory=channel_factory, tls=tls, token=token)
        self._lock = threading.Lock()
        #: The open enqueue streams (their state and condition): close() stops their threads.
        self._streams: dict[_StreamState, threading.Condition] = {}

    # --- plumbing --------------------------------------------------------------------------------

    def _get_stubs(self, address: str) -> _Stubs:
        with self._lock:
            if self._closed:
                raise errors.StoreClosed("the client was closed")
            stubs = self._stubs.get(address)
            if stubs is None:
                stubs = self._stubs[address] = _Stubs(self._channel_factory(address))
            return stubs

    def _raise_if_closed(self) -> None:
        """StoreClosed if close() ran: a call that took a channel just before close() closed it
        gets gRPC's ValueError ("Cannot invoke RPC on closed channel!") when it starts the RPC."""
        if self._closed:
            raise errors.StoreClosed("the client was closed") from None

    def _call(self, method: str, request: Any, *, admin: bool = False, address: str | None = None,
              compliance: bool = False) -> Any:
        attempts = _Attempts(self._router, self.timeout, address, method)
        while True:
            stubs = self._get_stubs(attempts.address)
            rpc = getattr(stubs.compliance if compliance else stubs.admin if admin else stubs.queue, method)
            try:
                response = rpc(request, timeout=attempts.attempt_timeout(), wait_for_ready=False)
            except grpc.RpcError as exc:
                if self._closed:  # close() closed the channel under the call (CANCELLED)
                    raise attempts.closed_error() from None
                time.sleep(attempts.failed(exc))
                attempts.check_time()
                continue
            except ValueError:
                self._raise_if_closed()  # close() closed the channel after _get_stubs: nothing was sent
                raise
            if not admin:
                self._router.succeeded(attempts.address)
            return response

    # --- enqueue -----------------------------------------------------------------------------------

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
        """Store a message durably (a quorum holds it); returns its id. See the embedded API."""
        m = _enqueue_dict(mail_from, recipients, data, namespace, priority, not_before, expires_in, idempotency_key)
        request = queue_pb2.EnqueueRequest(message=_new_message(m, 0))
        return str(self._call("Enqueue", request).message_id)

    def enqueue_many(self, messages: Sequence[Mapping[str, Any]]) -> list[str]:
        """Store several messages in one replicated commit (all or nothing); their ids in order."""
        response = self._call("EnqueueBatch", _batch_request(messages))
        return list(response.message_ids)

    def enqueue_stream(self, messages: Iterable[Mapping[str, Any]]) -> Iterator[str]:
        """Enqueue messages (dicts, as for enqueue_many) from an iterable of any length over one
        stream; yields their ids in order as they are stored (the server commits whatever has
        arrived together). After a failure the unanswered messages are resent with the same
        idempotency keys. ``timeout`` bounds the time without an answer while messages are
        outstanding, and the wait for the end of the stream once every message is answered. A
        bad message raises InvalidArgument (naming its position in ``messages``) after the ids of
        those before it. Closing the client stops the stream's threads (the iterator then raises
        StoreClosed)."""
        stream = _StreamState()
        cond = threading.Condition()
        with self._lock:
            if self._closed:
                raise errors.StoreClosed("the client was closed")
            self._streams[stream] = cond
        feeder = threading.Thread(
            target=self._feed, args=(stream, cond, messages), name="mqstore-client-feeder", daemon=True
        )
        feeder.start()
        call: Any = None
        try:
            attempts = _Attempts(self._router, self.timeout)
            while True:
                with cond:
                    stream.generation += 1
                    generation = stream.generation
                    resend = [m for m, _ in stream.pending]
                    base = stream.answered_count
                    cond.notify_all()
                answers: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
                address = attempts.address
                stubs = self._get_stubs(address)
                try:
                    call = stubs.queue.EnqueueStream(
                        self._stream_requests(stream, cond, generation, resend), wait_for_ready=False
                    )
                except ValueError:
                    self._raise_if_closed()  # closed between _get_stubs and here
                    raise
                threading.Thread(
                    target=_read_answers, args=(call, answers), name="mqstore-client-reader", daemon=True
                ).start()
                failure: BaseException | None = None
                waiting_since = time.monotonic()
                while failure is None:
                    try:
                        kind, value = answers.get(timeout=_STREAM_TICK_S)
                    except queue.Empty:
                        kind, value = "tick", None
                    if kind == "tick":
                        with cond:
                            idle = not stream.pending and not stream.source_done
                            complete = stream.complete()
                            source_error = stream.source_error
                        if idle:
                            attempts.progress()  # waiting for the caller's next message
                            waiting_since = time.monotonic()
                        elif time.monotonic() - waiting_since > attempts.attempt_limit():
                            if complete:
                                # Every id was received: the end of the stream adds nothing (the
                                # node hangs, or its answer is lost). Done (the call is cancelled).
                                if source_error is not None:
                                    raise source_error
                                return
                            call.cancel()  # no answer for too long: try elsewhere
                            failure = _Stalled()
                        continue
                    if kind == "ids":
                        with cond:
                            for _ in value:
                                stream.answered()
                            cond.notify_all()
                        self._router.succeeded(address)
                        attempts.progress()
                        waiting_since = time.monotonic()
                        yield from value
                    elif kind == "end":
                        with cond:
                            if stream.closed:
                                raise errors.StoreClosed("the client was closed while the stream ran")
                            if stream.pending:
                                raise stream.finished_early()
                            if stream.source_error is not None:
                                raise stream.source_error
                        return
                    else:
                        if isinstance(value, ValueError):
                            self._raise_if_closed()
                        failure = value
                call = None
                try:
                    wait = attempts.failed(failure)
                except errors.MQStoreError as exc:
                    raise _stream_position(exc, base) from None
                time.sleep(wait)
                attempts.check_time()
        finally:
            with cond:
                stream.close()
                cond.notify_all()
            with self._lock:
                self._streams.pop(stream, None)
            if call is not None:
                call.cancel()

    @staticmethod
    def _feed(stream: _StreamState, cond: threading.Condition, messages: Iterable[Mapping[str, Any]]) -> None:
        try:
            for i, item in enumerate(messages):
                m = _new_message(item, i, stream=True)
                with cond:
                    while len(stream.outbox) >= _STREAM_OUTBOX_MAX and not stream.closed:
                        cond.wait(_STREAM_TICK_S)
                    if stream.closed:
                        return
                    stream.outbox.append(m)
                    cond.notify_all()
        except BaseException as exc:
            with cond:
                stream.source_error = exc
        finally:
            with cond:
                stream.source_done = True
                cond.notify_all()

    @staticmethod
    def _stream_requests(
        stream: _StreamState, cond: threading.Condition, generation: int, resend: list[Any]
    ) -> Iterator[Any]:
        for k in range(0, len(resend), STREAM_FRAME_MESSAGES):
            yield queue_pb2.EnqueueBatchRequest(messages=resend[k : k + STREAM_FRAME_MESSAGES])
        while True:
            with cond:
                while stream.generation == generation and not (
                    (stream.outbox and stream.window_open()) or (stream.source_done and not stream.outbox)
                ):
                    cond.wait(_STREAM_TICK_S)
                if stream.generation != generation or not stream.outbox:
                    return
                frame = stream.take()
            yield queue_pb2.EnqueueBatchRequest(messages=frame)

    # --- leasing and settling --------------------------------------------------------------------

    def lease(
        self,
        worker: str,
        max_messages: int = 100,
        lease_seconds: float = 300,
        namespace: str | None = None,
        domain: str | None = None,
    ) -> list[Lease]:
        """Lease due recipients (highest priority first, then the longest waiting)."""
        response = self._call("Lease", _lease_request(worker, max_messages, lease_seconds, namespace, domain))
        return [_lease(p) for p in response.leases]

    def ack(self, token: int, recipients: Iterable[str] | None = None) -> None:
        """Mark the lease's recipients (all, or those listed) delivered."""
        self._call("Ack", _settle_request(token, recipients, None))

    def defer(self, token: int, recipients: Iterable[str] | None = None, reason: str = "") -> None:
        """Retry the recipients later (backoff per namespace policy); keeps ``reason``."""
        self._call("Defer", _settle_request(token, recipients, reason))

    def bounce(self, token: int, recipients: Iterable[str] | None = None, reason: str = "") -> None:
        """Mark the recipients permanently failed; keeps ``reason``."""
        self._call("Bounce", _settle_request(token, recipients, reason))

    def ack_many(self, tokens: Iterable[int]) -> None:
        """Mark every recipient of each lease delivered, in one replicated round. A stale or
        unknown token refuses the whole call (StaleLease, nothing settled); a lease that expires
        in the moment between the leader's check and the commit is the one exception: it is not
        settled, the others are, and the StaleLease names it."""
        checked = _tokens(tokens)
        if checked:
            self._call("AckMany", queue_pb2.AckManyRequest(tokens=checked))

    # --- reading and administration --------------------------------------------------------------

    def get(self, message_id: str) -> Message:
        """The message: envelope, raw bytes and every recipient's state."""
        return _message(self._call("Get", queue_pb2.GetRequest(message_id=_message_id(message_id), include_data=True)))

    def hold(self, message_id: str) -> None:
        self._call("Hold", queue_pb2.MessageRef(message_id=_message_id(message_id)))

    def release(self, message_id: str) -> None:
        self._call("Release", queue_pb2.MessageRef(message_id=_message_id(message_id)))

    def requeue(self, message_id: str) -> None:
        self._call("Requeue", queue_pb2.MessageRef(message_id=_message_id(message_id)))

    def delete(self, message_id: str, bypass_governance: bool = False, reason: str | None = None) -> None:
        """Remove the message; refused (Immutable) while retention or a legal hold protects it.
        See the embedded API for the GOVERNANCE bypass."""
        self._call("Delete", _delete_request(message_id, bypass_governance, reason))

    def bounce_message(self, message_id: str, *, reason: str | None = BOUNCE_REASON_DEFAULT) -> BounceResult:
        """Give up on the message: its queued and deferred recipients become bounced with
        ``reason``; leased ones are left to their worker (``left_leased``). See the embedded API."""
        return _bounce_result(message_id, self._call("BounceMessage", _bounce_message_request(message_id, reason)))

    def list(
        self,
        state: str | None = None,
        namespace: str | None = None,
        domain: str | None = None,
        older_than: float | None = None,
        limit: int = 1000,
        after: str | None = None,
    ) -> Page:
        """Messages in id (= arrival) order, filtered, one page at a time (see the embedded API)."""
        return _page(self._call("List", _list_request(state, namespace, domain, older_than, limit, after)))

    def qshape(self, namespace: str | None = None) -> QShape:
        ns = _optional(namespace, validate.namespace, "namespace")
        return _qshape(self._call("QShape", queue_pb2.QShapeRequest(namespace=ns)))

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self._call("Stats", queue_pb2.StatsRequest()).json)
        return result

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
        bypass_governance: bool = False,
        reason: str | None = None,
    ) -> Policy:
        """Change a namespace's policy (None keeps a value; ``backoff=[]`` restores Postfix's
        doubling schedule), immutability ``mode`` and ``lock_retention`` (seconds) included, as the
        embedded :meth:`mqstore.Store.set_namespace_policy`; returns the resulting policy."""
        request = _policy_request(namespace, backoff, lifetime, retention, dedup_window, expired_retention,
                                  mode, lock_retention, bypass_governance, reason)
        return _policy(self._call("SetNamespacePolicy", request))

    # --- compliance (the embedded API's names; see mqstore.Store) -------------------------------

    def _c(self, method: str, request: Any) -> Any:
        return self._call(method, request, compliance=True)

    def set_policy(self, namespace: str, mode: str = "none", retention_days: float | None = None, *,
                   bypass_governance: bool = False, reason: str | None = None) -> Policy:
        request = _set_policy_request(namespace, mode, retention_days, bypass_governance, reason)
        return _lock_policy(self._c("SetPolicy", request))

    def get_policy(self, namespace: str) -> Policy:
        return _lock_policy(self._c("GetPolicy", _namespace_ref(namespace)))

    def add_legal_hold(self, message_id: str, case: str) -> None:
        self._c("AddLegalHold", _legal_hold_request(message_id, case))

    def remove_legal_hold(self, message_id: str, case: str) -> None:
        self._c("RemoveLegalHold", _legal_hold_request(message_id, case))

    def extend_retention(self, message_id: str, until: float | _dt.datetime, *, bypass_governance: bool = False,
                         reason: str | None = None) -> None:
        self._c("ExtendRetention", _retention_request(message_id, until, bypass_governance, reason))

    def drop_namespace(self, namespace: str) -> int:
        return int(self._c("DropNamespace", _namespace_ref(namespace)).count)

    def compact_messages(self, message_ids: Iterable[str]) -> int:
        return int(self._c("CompactMessages", _compact_request(message_ids)).count)

    def rotate_key(self, namespace: str) -> int:
        return int(self._c("RotateKey", _namespace_ref(namespace)).count)

    def shred_key(self, key_id: int) -> int:
        return int(self._c("ShredKey", _key_ref(key_id)).count)

    def list_keys(self) -> builtins.list[dict[str, Any]]:
        return _keys(self._c("ListKeys", compliance_pb2.ListKeysRequest()))

    def audit_records(self, after: int | None = None, limit: int = 1000) -> builtins.list[dict[str, Any]]:
        return _audit_records(self._c("AuditRecords", _audit_records_request(after, limit)))

    def audit_query(self, where: Mapping[str, Any] | None = None, since_ms: int | None = None,
                    until_ms: int | None = None, after: int | None = None,
                    limit: int = 1000, **unknown: Any) -> builtins.list[dict[str, Any]]:
        _no_unknown_filters(unknown)
        request = _audit_query_request(where, since_ms, until_ms, after, limit)
        return _audit_records(self._c("AuditQuery", request))

    def audit_head(self) -> int:
        return int(self._c("AuditHead", compliance_pb2.AuditHeadRequest()).seq)

    def audit_checkpoint(self) -> Any:
        """Sign a checkpoint over every audit record so far; returns it (an audit.Checkpoint)."""
        return _checkpoint(self._c("AuditCheckpoint", compliance_pb2.CheckpointRequest()))

    def status(self, address: str | None = None) -> dict[str, Any]:
        """Admin.Status of ``address``, or of the node the client talks to (the leader once known):
        role, term, leader, indexes, members, queue stats (on the leader) and disk use."""
        return _status(self._call("Status", admin_pb2.StatusRequest(), admin=True, address=address))

    # --- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the channels; calls and enqueue streams still open raise StoreClosed, and the
        streams' threads stop."""
        with self._lock:
            self._closed = True
            stubs, self._stubs = list(self._stubs.values()), {}
            streams, self._streams = list(self._streams.items()), {}
        for stream, cond in streams:
            with cond:
                stream.close()
                cond.notify_all()
        for s in stubs:
            s.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_answers(call: Any, answers: queue.SimpleQueue[tuple[str, Any]]) -> None:
    try:
        for response in call:
            answers.put(("ids", list(response.message_ids)))
        answers.put(("end", None))
    except BaseException as exc:
        answers.put(("error", exc))


# --- the asyncio client -----------------------------------------------------------------------------


class AsyncClient(_ClientBase):
    """The asyncio twin of :class:`Client` (grpc.aio): the same methods, as coroutines;
    ``enqueue_stream`` is an async iterator. ``tls`` and ``token`` as for :class:`Client`;
    ``channel_factory(address)`` must return a ``grpc.aio.Channel``.

    A client is bound to the event loop it is first used in (grpc.aio channels belong to one
    loop): a call from another loop while that one is still open raises InvalidArgument (make
    one client per loop). Once that loop is closed, the next call's loop takes over (new
    channels), so ``asyncio.run`` twice with one client works."""

    _tls_factory = staticmethod(tls_aio_channel_factory)
    _insecure = staticmethod(insecure_aio_channel)

    def __init__(
        self,
        addresses: str | list[str],
        *,
        timeout: float = 10.0,
        channel_factory: ChannelFactory | None = None,
        tls: ClientTLS | None = None,
        token: str | None = None,
    ) -> None:
        super().__init__(addresses, timeout=timeout, channel_factory=channel_factory, tls=tls, token=token)
        #: The open enqueue streams (their state, condition and feeder task): close() stops them.
        self._streams: dict[_StreamState, tuple[asyncio.Condition, asyncio.Future[None]]] = {}
        #: The event loop the channels (and streams) belong to: the first one the client was used in.
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- plumbing --------------------------------------------------------------------------------

    def _bind_loop(self) -> None:
        """Tie the client to the running loop: the first one it is used in, or a new one once that
        is closed (its channels, which cannot be used from another loop, are dropped). A call
        from another loop while the first is open is refused."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        if self._loop is not None and not self._loop.is_closed():
            raise errors.InvalidArgument(
                "an AsyncClient is bound to the event loop it was first used in; make one per loop"
            )
        # The first use, or the first loop is gone (asyncio.run twice): its channels and streams
        # died with it (they cannot be closed from here); this loop gets channels of its own.
        self._loop = loop
        self._stubs = {}
        self._streams = {}

    def _get_stubs(self, address: str) -> _Stubs:
        if self._closed:
            raise errors.StoreClosed("the client was closed")
        self._bind_loop()
        stubs = self._stubs.get(address)
        if stubs is None:
            stubs = self._stubs[address] = _Stubs(self._channel_factory(address))
        return stubs

    async def _call(
        self,
        method: str,
        request: Any,
        *,
        admin: bool = False,
        address: str | None = None,
        timeout: float | None = None,
        compliance: bool = False,
    ) -> Any:
        attempts = _Attempts(self._router, self.timeout if timeout is None else timeout, address, method)
        while True:
            stubs = self._get_stubs(attempts.address)
            rpc = getattr(stubs.compliance if compliance else stubs.admin if admin else stubs.queue, method)
            try:
                response = await rpc(request, timeout=attempts.attempt_timeout(), wait_for_ready=False)
            except grpc.RpcError as exc:
                await asyncio.sleep(attempts.failed(exc))
                attempts.check_time()
                continue
            except asyncio.CancelledError:
                if self._cancelled_by_close():
                    raise attempts.closed_error() from None
                raise
            if not admin:
                self._router.succeeded(attempts.address)
            return response

    # --- enqueue -----------------------------------------------------------------------------------

    async def enqueue(
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
        m = _enqueue_dict(mail_from, recipients, data, namespace, priority, not_before, expires_in, idempotency_key)
        request = queue_pb2.EnqueueRequest(message=_new_message(m, 0))
        return str((await self._call("Enqueue", request)).message_id)

    async def enqueue_many(self, messages: Sequence[Mapping[str, Any]]) -> list[str]:
        response = await self._call("EnqueueBatch", _batch_request(messages))
        return list(response.message_ids)

    async def enqueue_stream(
        self, messages: Iterable[Mapping[str, Any]] | AsyncIterable[Mapping[str, Any]]
    ) -> AsyncIterator[str]:
        """Like :meth:`Client.enqueue_stream`; ``messages`` may be an iterable or async iterable."""
        if self._closed:
            raise errors.StoreClosed("the client was closed")
        self._bind_loop()
        stream = _StreamState()
        cond = asyncio.Condition()
        feeder = asyncio.ensure_future(self._feed(stream, cond, messages))
        self._streams[stream] = (cond, feeder)
        call: Any = None
        read: asyncio.Future[Any] | None = None
        try:
            attempts = _Attempts(self._router, self.timeout)
            while True:
                async with cond:
                    stream.generation += 1
                    stream.confirmed = False
                    generation = stream.generation
                    resend = [m for m, _ in stream.pending]
                    base = stream.answered_count
                    cond.notify_all()
                # No call beforehand to find the leader (it would need a permission a producer
                # may lack): a follower refuses the first frame with NotLeader, followed as the
                # blocking client does (see _stream_requests).
                address = attempts.address
                stubs = self._get_stubs(address)
                call = stubs.queue.EnqueueStream(
                    self._stream_requests(stream, cond, generation, resend), wait_for_ready=False
                )
                failure: BaseException | None = None
                waiting_since = time.monotonic()
                while failure is None:
                    if read is None:
                        read = asyncio.ensure_future(call.read())
                    done, _ = await asyncio.wait({read}, timeout=_STREAM_TICK_S)
                    if not done:
                        if not stream.pending and not stream.source_done:
                            attempts.progress()  # waiting for the caller's next message
                            waiting_since = time.monotonic()
                        elif time.monotonic() - waiting_since > attempts.attempt_limit():
                            if stream.complete():
                                # Every id was received: the end of the stream adds nothing (the
                                # node hangs, or its answer is lost). Done (the call is cancelled).
                                if stream.source_error is not None:
                                    raise stream.source_error
                                return
                            read.cancel()  # no answer for too long: try elsewhere
                            read = None
                            failure = _Stalled()
                        continue
                    finished, read = read, None
                    try:
                        response = finished.result()
                    except grpc.RpcError as exc:
                        failure = exc
                        continue
                    except asyncio.CancelledError:
                        if self._cancelled_by_close():
                            raise errors.StoreClosed("the client was closed while the call ran") from None
                        raise
                    if response is grpc.aio.EOF:
                        if stream.closed:
                            raise errors.StoreClosed("the client was closed while the stream ran")
                        if stream.pending:
                            raise stream.finished_early()
                        if stream.source_error is not None:
                            raise stream.source_error
                        return
                    async with cond:
                        for _ in response.message_ids:
                            stream.answered()
                        cond.notify_all()
                    self._router.succeeded(address)
                    attempts.progress()
                    waiting_since = time.monotonic()
                    for mid in response.message_ids:
                        yield mid
                call.cancel()
                call = None
                try:
                    wait = attempts.failed(failure)
                except errors.MQStoreError as exc:
                    raise _stream_position(exc, base) from None
                await asyncio.sleep(wait)
                attempts.check_time()
        finally:
            stream.close()
            self._streams.pop(stream, None)
            if read is not None:
                read.cancel()
            if call is not None:
                call.cancel()
            feeder.cancel()
            with contextlib.suppress(BaseException):
                await feeder

    @staticmethod
    async def _feed(
        stream: _StreamState,
        cond: asyncio.Condition,
        messages: Iterable[Mapping[str, Any]] | AsyncIterable[Mapping[str, Any]],
    ) -> None:
        async def put(m: Any) -> bool:
            async with cond:
                await cond.wait_for(lambda: len(stream.outbox) < _STREAM_OUTBOX_MAX or stream.closed)
                if stream.closed:
                    return False
                stream.outbox.append(m)
                cond.notify_all()
                return True

        try:
            i = 0
            if isinstance(messages, AsyncIterable):
                async for item in messages:
                    if not await put(_new_message(item, i, stream=True)):
                        return
                    i += 1
            else:
                for item in messages:
                    if not await put(_new_message(item, i, stream=True)):
                        return
                    i += 1
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            stream.source_error = exc
        finally:
            stream.source_done = True
            with contextlib.suppress(BaseException):
                async with cond:
                    cond.notify_all()

    @staticmethod
    async def _stream_requests(
        stream: _StreamState, cond: asyncio.Condition, generation: int, resend: list[Any]
    ) -> AsyncIterator[Any]:
        """The frames of one attempt. The first goes alone: the rest wait for its answer. grpc.aio
        reports a stream that the server ended while requests were being written as INTERNAL,
        without the server's status and trailers (grpc/grpc#36066), so a follower's NotLeader
        (naming the leader) would often be lost; with nothing written after the first frame, it
        arrives intact."""

        async def confirmed() -> bool:
            async with cond:
                await cond.wait_for(lambda: stream.generation != generation or stream.confirmed)
                return stream.generation == generation

        first = True
        for k in range(0, len(resend), STREAM_FRAME_MESSAGES):
            yield queue_pb2.EnqueueBatchRequest(messages=resend[k : k + STREAM_FRAME_MESSAGES])
            if first:
                first = False
                if not await confirmed():
                    return
        while True:
            async with cond:
                await cond.wait_for(
                    lambda: stream.generation != generation
                    or (bool(stream.outbox) and stream.window_open())
                    or (stream.source_done and not stream.outbox)
                )
                if stream.generation != generation or not stream.outbox:
                    return
                frame = stream.take()
            yield queue_pb2.EnqueueBatchRequest(messages=frame)
            if first:
                first = False
                if not await confirmed():
                    return

    # --- leasing and settling --------------------------------------------------------------------

    async def lease(
        self,
        worker: str,
        max_messages: int = 100,
        lease_seconds: float = 300,
        namespace: str | None = None,
        domain: str | None = None,
    ) -> list[Lease]:
        response = await self._call("Lease", _lease_request(worker, max_messages, lease_seconds, namespace, domain))
        return [_lease(p) for p in response.leases]

    async def ack(self, token: int, recipients: Iterable[str] | None = None) -> None:
        await self._call("Ack", _settle_request(token, recipients, None))

    async def defer(self, token: int, recipients: Iterable[str] | None = None, reason: str = "") -> None:
        await self._call("Defer", _settle_request(token, recipients, reason))

    async def bounce(self, token: int, recipients: Iterable[str] | None = None, reason: str = "") -> None:
        await self._call("Bounce", _settle_request(token, recipients, reason))

    async def ack_many(self, tokens: Iterable[int]) -> None:
        checked = _tokens(tokens)
        if checked:
            await self._call("AckMany", queue_pb2.AckManyRequest(tokens=checked))

    # --- reading and administration --------------------------------------------------------------

    async def get(self, message_id: str) -> Message:
        request = queue_pb2.GetRequest(message_id=_message_id(message_id), include_data=True)
        return _message(await self._call("Get", request))

    async def hold(self, message_id: str) -> None:
        await self._call("Hold", queue_pb2.MessageRef(message_id=_message_id(message_id)))

    async def release(self, message_id: str) -> None:
        await self._call("Release", queue_pb2.MessageRef(message_id=_message_id(message_id)))

    async def requeue(self, message_id: str) -> None:
        await self._call("Requeue", queue_pb2.MessageRef(message_id=_message_id(message_id)))

    async def delete(self, message_id: str, bypass_governance: bool = False, reason: str | None = None) -> None:
        await self._call("Delete", _delete_request(message_id, bypass_governance, reason))

    async def bounce_message(self, message_id: str, *, reason: str | None = BOUNCE_REASON_DEFAULT) -> BounceResult:
        request = _bounce_message_request(message_id, reason)
        return _bounce_result(message_id, await self._call("BounceMessage", request))

    async def list(
        self,
        state: str | None = None,
        namespace: str | None = None,
        domain: str | None = None,
        older_than: float | None = None,
        limit: int = 1000,
        after: str | None = None,
    ) -> Page:
        return _page(await self._call("List", _list_request(state, namespace, domain, older_than, limit, after)))

    async def qshape(self, namespace: str | None = None) -> QShape:
        ns = _optional(namespace, validate.namespace, "namespace")
        return _qshape(await self._call("QShape", queue_pb2.QShapeRequest(namespace=ns)))

    async def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads((await self._call("Stats", queue_pb2.StatsRequest())).json)
        return result

    async def set_namespace_policy(
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
        bypass_governance: bool = False,
        reason: str | None = None,
    ) -> Policy:
        request = _policy_request(namespace, backoff, lifetime, retention, dedup_window, expired_retention,
                                  mode, lock_retention, bypass_governance, reason)
        return _policy(await self._call("SetNamespacePolicy", request))

    # --- compliance (as Client's) ------------------------------------------------------------------

    async def _c(self, method: str, request: Any) -> Any:
        return await self._call(method, request, compliance=True)

    async def set_policy(self, namespace: str, mode: str = "none", retention_days: float | None = None, *,
                         bypass_governance: bool = False, reason: str | None = None) -> Policy:
        request = _set_policy_request(namespace, mode, retention_days, bypass_governance, reason)
        return _lock_policy(await self._c("SetPolicy", request))

    async def get_policy(self, namespace: str) -> Policy:
        return _lock_policy(await self._c("GetPolicy", _namespace_ref(namespace)))

    async def add_legal_hold(self, message_id: str, case: str) -> None:
        await self._c("AddLegalHold", _legal_hold_request(message_id, case))

    async def remove_legal_hold(self, message_id: str, case: str) -> None:
        await self._c("RemoveLegalHold", _legal_hold_request(message_id, case))

    async def extend_retention(self, message_id: str, until: float | _dt.datetime, *,
                               bypass_governance: bool = False, reason: str | None = None) -> None:
        await self._c("ExtendRetention", _retention_request(message_id, until, bypass_governance, reason))

    async def drop_namespace(self, namespace: str) -> int:
        return int((await self._c("DropNamespace", _namespace_ref(namespace))).count)

    async def compact_messages(self, message_ids: Iterable[str]) -> int:
        return int((await self._c("CompactMessages", _compact_request(message_ids))).count)

    async def rotate_key(self, namespace: str) -> int:
        return int((await self._c("RotateKey", _namespace_ref(namespace))).count)

    async def shred_key(self, key_id: int) -> int:
        return int((await self._c("ShredKey", _key_ref(key_id))).count)

    async def list_keys(self) -> builtins.list[dict[str, Any]]:
        return _keys(await self._c("ListKeys", compliance_pb2.ListKeysRequest()))

    async def audit_records(self, after: int | None = None, limit: int = 1000) -> builtins.list[dict[str, Any]]:
        return _audit_records(await self._c("AuditRecords", _audit_records_request(after, limit)))

    async def audit_query(self, where: Mapping[str, Any] | None = None, since_ms: int | None = None,
                          until_ms: int | None = None, after: int | None = None,
                          limit: int = 1000, **unknown: Any) -> builtins.list[dict[str, Any]]:
        _no_unknown_filters(unknown)
        request = _audit_query_request(where, since_ms, until_ms, after, limit)
        return _audit_records(await self._c("AuditQuery", request))

    async def audit_head(self) -> int:
        return int((await self._c("AuditHead", compliance_pb2.AuditHeadRequest())).seq)

    async def audit_checkpoint(self) -> Any:
        """Sign a checkpoint over every audit record so far; returns it (an audit.Checkpoint)."""
        return _checkpoint(await self._c("AuditCheckpoint", compliance_pb2.CheckpointRequest()))

    async def status(self, address: str | None = None) -> dict[str, Any]:
        return _status(await self._call("Status", admin_pb2.StatusRequest(), admin=True, address=address))

    # --- lifecycle -------------------------------------------------------------------------------

    def _cancelled_by_close(self) -> bool:
        """Whether a call asyncio cancelled was cancelled by this client's close() (closing the
        channels cancels the calls on them: the call raises StoreClosed), not by a cancel of the
        task itself (which must go on as a cancellation, as asyncio expects)."""
        task = asyncio.current_task()
        return self._closed and (task is None or task.cancelling() == 0)

    async def close(self) -> None:
        """Close the channels; calls and enqueue streams still open raise StoreClosed, and the
        streams' feeder tasks stop."""
        self._closed = True
        stubs, self._stubs = list(self._stubs.values()), {}
        streams, self._streams = list(self._streams.items()), {}
        owner = self._loop
        if owner is not None and owner is not asyncio.get_running_loop():
            # Closed from another loop: the channels and streams belong to the one they were made
            # in. Close them there if it still runs; a closed loop took them with it.
            if not owner.is_closed() and owner.is_running():
                asyncio.run_coroutine_threadsafe(self._close_all(stubs, streams), owner)
            return
        await self._close_all(stubs, streams)

    @staticmethod
    async def _close_all(
        stubs: builtins.list[_Stubs],
        streams: builtins.list[tuple[_StreamState, tuple[asyncio.Condition, asyncio.Future[None]]]],
    ) -> None:
        for stream, (cond, feeder) in streams:
            stream.close()
            feeder.cancel()  # it may be waiting for the caller's (async) iterable
            async with cond:
                cond.notify_all()  # the attempt's request iterator sees the stream closed
        for s in stubs:
            await s.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = [
    "BACKOFF_FIRST_S",
    "BACKOFF_MAX_S",
    "CLIENT_CHANNEL_OPTIONS",
    "AsyncClient",
    "ChannelFactory",
    "Client",
    "ClientTLS",
    "insecure_aio_channel",
    "insecure_channel",
]
