"""The network edge of a node: one gRPC server interceptor that every call passes through before
it reaches a servicer.

For a client call, in this order (cheapest first; nothing is written before the call is admitted):

1. a request id (``x-request-id`` metadata, or a new one) for the logs;
2. authentication (:class:`~mqstore.security.auth.Authenticator`) -> UNAUTHENTICATED;
3. the client's request rate (a token bucket per identity; per connection when anonymous; calls
   failing authentication are refused by the rate of their source address, whatever the
   connection, and of the whole node, UNAUTHENTICATED_PER_SECOND, before each is audited; a
   request counts 1 plus 1 per RATE_COST_BYTES it carries): a call over it waits for its turn
   when that is within a second and the client has at most CLIENT_WAITING_CALLS_MAX calls
   waiting (one connection can have no more in flight); else it is refused with
   RESOURCE_EXHAUSTED, after that second (so a flood is slowed to a trickle of refusals); a
   stream is slowed down to the rate;
4. a deadline (Queue's unary calls; ``limits.deadline_required``) -> INVALID_ARGUMENT;
5. a request that does not parse (bad protobuf, invalid UTF-8 in a string) -> INVALID_ARGUMENT;
6. sizes: messages per batch, bytes per message, recipients per message -> INVALID_ARGUMENT;
7. authorization: the RPC's permission in the namespaces it names -> PERMISSION_DENIED (an
   actor limited to some namespaces that names a message or lease outside them is told only
   that it was not found or is not in its namespaces: which namespace, in the audit record);
8. enqueues while the node is not healthy (no leader: UNAVAILABLE; disk nearly full:
   RESOURCE_EXHAUSTED);
9. client calls (and one client's streams) in flight -> RESOURCE_EXHAUSTED. A node keeps
   ``PEER_THREADS_RESERVED`` of its gRPC threads for its peers: clients never take them all, so a
   flood of calls cannot stall replication. A call answered with a stream (Admin.Verify,
   Admin.Backup) counts as one of its client's streams, and a node runs at most
   STORE_COPIES_MAX calls that copy its whole store at once.

Health checks and server reflection ("open" calls) need no identity, but are counted in flight
within the clients' share of the threads (so never the peers' reserve), at most
OPEN_CALLS_PER_SOURCE_MAX per source address and half the clients' share in all, and take turns
from their address's rate: idle reflection streams or health Watches cannot hold every thread.

An open EnqueueStream is authenticated again on its next frame once a second has passed since the
last check: a token removed from the tokens file (nodes re-read it within a second) ends the
streams it opened, UNAUTHENTICATED and audited, as it refuses new calls; frames after that are
not stored.

Refusals carry ``mqstore-error`` trailing metadata (so :class:`mqstore.client.Client` raises the
embedded API's exception), are counted in the metrics, and denials (2 and 7) are passed to the
node's ``audit_denial(actor, rpc, reason)``. A peer's Raft call must come with a node's
certificate (over TLS); the node id it names is put in
:data:`~mqstore.security.auth.current_peer_node` for the Raft servicer to check against ``from``.
"""

from __future__ import annotations

import collections
import contextvars
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from mqstore import errors, limits, logs
from mqstore.actor import Actor
from mqstore.config import EdgeLimits
from mqstore.metrics import NodeMetrics
from mqstore.security.auth import (
    Authenticator,
    Method,
    current_actor,
    current_peer_node,
    method_rule,
    peer_identity,
    removed_node_refusal,
    unauthenticated_actor,
)

log = logging.getLogger(__name__)

REQUEST_ID = "x-request-id"
_REQUEST_ID_CHARS_MAX = 128


class EdgeHost(Protocol):
    """What the interceptor needs from the node server (:class:`mqstore.server.NodeServer`)."""

    authenticator: Authenticator
    metrics: NodeMetrics | None

    def authorize(self, actor: Actor, permission: str, namespace: str | None = None) -> None: ...
    def audit_denial(self, actor: Actor, rpc: str, reason: str) -> None: ...
    def namespace_of_message(self, message_id: str) -> str | None: ...
    def namespace_of_lease(self, token: int) -> str | None: ...
    def enqueue_refusal(self) -> errors.MQStoreError | None: ...


class _Refused(Exception):
    """A refusal at the edge: the status to end the call with."""

    def __init__(self, code: grpc.StatusCode, message: str, error: str, reason: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.error = error  # the mqstore error class name (mqstore-error trailer)
        self.reason = reason  # metrics label
        self.trailers: list[tuple[str, str]] = []  # more trailing metadata (a NotLeader's leader)
        self.index: int | None = None  # the message of the request refused (None: the request)


def _refused(exc: errors.MQStoreError, reason: str) -> _Refused:
    codes = {
        errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
        errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
        errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
        errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
        errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    }
    # The nearest class that has a code (a StorageFull is an Overloaded).
    code = next((codes[c] for c in type(exc).__mro__ if c in codes), grpc.StatusCode.FAILED_PRECONDITION)
    return _Refused(code, str(exc), type(exc).__name__, reason)


class _Malformed:
    """What the lenient deserializer returns for bytes that are not a valid request."""

    __slots__ = ("problem", "size", "too_large")

    def __init__(self, problem: str, size: int, too_large: bool = False) -> None:
        self.problem = problem
        self.size = size
        self.too_large = too_large


def _lenient(deserializer: Callable[[bytes], Any] | None, bytes_max: int) -> Callable[[bytes], Any] | None:
    """``deserializer`` that returns a :class:`_Malformed` instead of raising (the edge refuses it
    with INVALID_ARGUMENT, where gRPC would answer INTERNAL), and does not parse a request over
    ``bytes_max`` at all."""
    if deserializer is None:
        return None

    def parse(raw: bytes) -> Any:
        if len(raw) > bytes_max:
            return _Malformed(f"{len(raw)} bytes, over this node's limit of {bytes_max} (limits.request_bytes_max)",
                              len(raw), too_large=True)
        try:
            return deserializer(raw)
        except Exception as exc:  # DecodeError, invalid UTF-8 in a string field, ...
            return _Malformed(str(exc) or type(exc).__name__, len(raw))

    return parse


# --- rate limits ---------------------------------------------------------------------------------------


class RateLimiter:
    """A token bucket per client (``rate`` per second, up to ``burst``), for at most
    RATE_LIMITED_CLIENTS_MAX clients (the least recently seen are forgotten). Thread safe.

    :meth:`reserve` takes a turn even when the bucket is empty (it goes negative), as long as the
    turn comes within ``wait_max`` seconds; the caller then waits that long. So calls over the
    rate are spaced out in order, each woken exactly once."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self._buckets: collections.OrderedDict[str, list[float]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def reserve(self, key: str, wait_max: float, n: float = 1.0) -> float | None:
        """Seconds to wait before going ahead (0: now), or None: not within ``wait_max`` (nothing
        is taken then). A request costing more than the whole burst costs the burst: it waits
        for a full bucket rather than never going (a large message under a small burst)."""
        n = min(n, self.burst)
        now = time.monotonic()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = [self.burst, now]
                if len(self._buckets) > limits.RATE_LIMITED_CLIENTS_MAX:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(key)
                bucket[0] = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
                bucket[1] = now
            left = bucket[0] - n
            wait = 0.0 if left >= 0 else -left / self.rate
            if wait > wait_max:
                return None
            bucket[0] = left
            return wait

    def take(self, key: str, n: float = 1.0) -> bool:
        """Take a turn only if one is free now."""
        return self.reserve(key, 0.0, n) is not None


class _Counter:
    """Calls in flight, overall and per key (thread safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.total = 0
        self.by_key: dict[str, int] = {}

    def enter(self, total_max: int, key: str | None = None, key_max: int = 0) -> str | None:
        """Count one more call; returns why not (and counts nothing) when over a limit."""
        with self._lock:
            if self.total >= total_max:
                return f"{self.total} calls at once, the limit"
            if key is not None:
                n = self.by_key.get(key, 0)
                if n >= key_max:
                    return f"this client has {n} at once, the limit"
                self.by_key[key] = n + 1
            self.total += 1
            return None

    def leave(self, key: str | None = None) -> None:
        with self._lock:
            self.total -= 1
            if key is not None:
                n = self.by_key.get(key, 1) - 1
                if n > 0:
                    self.by_key[key] = n
                else:
                    self.by_key.pop(key, None)


# --- the interceptor -----------------------------------------------------------------------------------

#: An open stream's credentials are checked again at most this often (a token lookup: an HMAC).
STREAM_REAUTHENTICATE_S = 1.0

#: Health and reflection calls one source address may have in flight at once (they need no
#: identity, so they are counted per address; each holds a server thread while it lasts).
OPEN_CALLS_PER_SOURCE_MAX = 8

#: Calls failing authentication a node audits per second, from all sources together (each is a
#: replicated audit record); more are refused by rate, not audited. Each source address has its
#: own bucket too (the client rate), so one flooding address does not take them all.
UNAUTHENTICATED_PER_SECOND = 50.0
UNAUTHENTICATED_BURST = 200.0


def source_key(peer: str | None) -> str:
    """The rate-limiter key of a caller without an identity: its IP address, without the port
    (``ipv4:10.0.0.7:51234`` and ``ipv6:[::1]:51234`` as gRPC names them), so reconnecting does
    not give it a fresh bucket; a Unix socket's callers share one key."""
    text = peer or ""
    kind, _, rest = text.partition(":")
    if kind == "ipv4":
        address = rest.rsplit(":", 1)[0]
    elif kind == "ipv6":
        address = rest[1:].split("]", 1)[0] if rest.startswith("[") else rest.rsplit(":", 1)[0]
    elif kind.startswith("unix"):
        address = "unix"
    else:
        address = text or "unknown"
    return "source:" + address


#: Calls that copy a node's whole store (Admin.Verify, Admin.Backup: disk space and I/O of the
#: store's size each) a node runs at once; more are refused with RESOURCE_EXHAUSTED.
STORE_COPIES_MAX = 2


@dataclass(frozen=True, slots=True)
class _Admitted:
    """A call :meth:`EdgeInterceptor._admit_plain` let in: who, and what to release at its end."""

    actor: Actor
    key: str
    copies_store: bool


def _short(method: str) -> str:
    return method.rsplit("/", 1)[-1] if method.startswith("/mqstore.") else method


#: Trailer of a refusal given before the request reached the servicer or the consensus log: it did
#: nothing, so a client may send any request again (see mqstore.errors.Unavailable.not_applied).
NOT_APPLIED = "mqstore-not-applied"


def add_trailers(context: grpc.ServicerContext, trailers: list[tuple[str, str]]) -> None:
    """Add ``trailers`` to the call's trailing metadata, keeping what is there (the request id)."""
    kept = tuple(context.trailing_metadata() or ())
    context.set_trailing_metadata(kept + tuple(trailers))


def _abort(context: grpc.ServicerContext, refused: _Refused, *, not_applied: bool = True) -> None:
    """End the call with ``refused``: by default one refused before anything was done."""
    trailers = [("mqstore-error", refused.error), *refused.trailers]
    if not_applied:
        trailers.append((NOT_APPLIED, "1"))
    add_trailers(context, trailers)
    context.abort(refused.code, refused.message)


class EdgeInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, host: EdgeHost, edge: EdgeLimits, *, client_calls_max: int, tls: bool) -> None:
        self.host = host
        self.limits = edge
        self.tls = tls
        self.client_calls_max = client_calls_max
        self.rates = RateLimiter(edge.requests_per_second, edge.requests_burst)
        self.in_flight = _Counter()
        #: Calls copying the whole store (Verify, Backup) being served.
        self.store_copies = _Counter()
        #: Calls waiting for their client's turn (they hold a thread each: at most half of them).
        self.waiting = _Counter()
        self.waiting_max = max(limits.CLIENT_WAITING_CALLS_MAX, client_calls_max // 2)
        #: Health and reflection calls in flight (also counted in ``in_flight``).
        self.open_calls = _Counter()
        self.open_calls_max = max(1, client_calls_max // 2)
        #: One bucket for every call that fails authentication, whatever its source: each is an
        #: audit record (a replicated entry and an fsync on every node).
        self.unauthenticated = RateLimiter(min(edge.requests_per_second, UNAUTHENTICATED_PER_SECOND),
                                           min(edge.requests_burst, UNAUTHENTICATED_BURST))
        self._label_cache: dict[str, str] = {}

    # --- dispatch ----------------------------------------------------------------------------------

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method: str = details.method
        rule = method_rule(method)
        if rule.kind == "open":
            return self._open_handler(handler, method)
        if rule.kind == "peer":
            return self._peer_handler(handler, method)
        return self._client_handler(handler, method, rule, details.invocation_metadata)

    # --- open calls (health, reflection) ----------------------------------------------------------

    def _open_handler(self, handler: Any, method: str) -> Any:
        """Health checks and reflection need no identity, but each call holds one of the node's
        threads while it lasts (a reflection stream or a health Watch as long as its caller
        likes): they are counted in flight like client calls, within the client share of the
        threads (never the peers' reserve), at most OPEN_CALLS_PER_SOURCE_MAX from one address
        and at most half the client share in all; each call and each frame takes a turn from
        its address's rate. Over a limit: RESOURCE_EXHAUSTED."""
        if handler.request_streaming and handler.response_streaming:
            inner_ss = handler.stream_stream

            def stream_stream(request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
                key = self._admit_open(method, context)
                try:
                    yield from inner_ss(self._open_frames(method, key, request_iterator, context), context)
                finally:
                    self._leave_open(key)

            return grpc.stream_stream_rpc_method_handler(stream_stream, handler.request_deserializer,
                                                         handler.response_serializer)
        if handler.request_streaming:
            inner_su = handler.stream_unary

            def stream_unary(request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
                key = self._admit_open(method, context)
                try:
                    return inner_su(self._open_frames(method, key, request_iterator, context), context)
                finally:
                    self._leave_open(key)

            return grpc.stream_unary_rpc_method_handler(stream_unary, handler.request_deserializer,
                                                        handler.response_serializer)
        if handler.response_streaming:
            inner_us = handler.unary_stream

            def unary_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                key = self._admit_open(method, context)
                try:
                    yield from inner_us(request, context)
                finally:
                    self._leave_open(key)

            return grpc.unary_stream_rpc_method_handler(unary_stream, handler.request_deserializer,
                                                        handler.response_serializer)
        inner_uu = handler.unary_unary

        def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
            key = self._admit_open(method, context)
            try:
                return inner_uu(request, context)
            finally:
                self._leave_open(key)

        return grpc.unary_unary_rpc_method_handler(unary_unary, handler.request_deserializer,
                                                   handler.response_serializer)

    def _admit_open(self, method: str, context: grpc.ServicerContext) -> str:
        """Count an open call in flight (see :meth:`_open_handler`); its key, for
        :meth:`_leave_open`. Aborts the call when refused."""
        key = source_key(context.peer())
        try:
            if not self.rates.take(key):
                raise _refused(errors.Overloaded(f"too many requests from {key[len('source:'):]}: slow down"), "rate")
            why = self.open_calls.enter(self.open_calls_max)
            if why is not None:
                raise _refused(errors.Overloaded(
                    f"node busy: health and reflection calls: {why}; retry shortly"), "busy")
            why = self.in_flight.enter(self.client_calls_max, "open:" + key, OPEN_CALLS_PER_SOURCE_MAX)
            if why is not None:
                self.open_calls.leave()
                raise _refused(errors.Overloaded(
                    f"node busy: health and reflection calls and client calls: {why} (from this address); "
                    "retry shortly"), "busy")
        except _Refused as refused:
            self._count(method, refused.code.name, refused.reason, refused.error)
            _abort(context, refused)
        return key

    def _leave_open(self, key: str) -> None:
        self.in_flight.leave("open:" + key)
        self.open_calls.leave()

    def _open_frames(self, method: str, key: str, frames: Iterator[Any],
                     context: grpc.ServicerContext) -> Iterator[Any]:
        """An open stream's frames, each taking a turn from its address's rate (waiting for it
        when that is soon; else the stream ends, RESOURCE_EXHAUSTED)."""
        for frame in frames:
            wait = self.rates.reserve(key, limits.STREAM_THROTTLE_WAIT_MS_MAX / 1000)
            if wait is None:
                refused = _refused(errors.Overloaded(f"too many requests from {key[len('source:'):]}: slow down"),
                                   "rate")
                self._count(method, refused.code.name, refused.reason, refused.error)
                _abort(context, refused)
            elif wait > 0:
                time.sleep(wait)
            yield frame

    # --- peers -------------------------------------------------------------------------------------

    def _peer_handler(self, handler: Any, method: str) -> Any:
        inner = handler.stream_unary

        def behavior(request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
            node_id = None
            if self.tls:
                ident = peer_identity(context)
                if ident is None or ident.kind != "node":
                    try:
                        self._check_unauthenticated_rate(context)
                    except _Refused as refused:
                        self._count(method, refused.code.name, refused.reason, refused.error)
                        _abort(context, refused)
                    who = "no identity" if ident is None else f"client {ident.name!r}"
                    reason = f"only cluster nodes may call {method}; this certificate names {who}"
                    self._deny(unauthenticated_actor(context), method, reason)
                    self._count(method, "PERMISSION_DENIED", "permission")
                    _abort(context, _Refused(grpc.StatusCode.PERMISSION_DENIED, reason, "PermissionDenied",
                                             "permission"))
                assert ident is not None
                node_id = ident.node_id
                if node_id in self.host.authenticator.removed():
                    reason = removed_node_refusal(node_id)
                    self._deny(unauthenticated_actor(context), method, reason)
                    self._count(method, "PERMISSION_DENIED", "permission")
                    _abort(context, _Refused(grpc.StatusCode.PERMISSION_DENIED, reason, "PermissionDenied",
                                             "permission"))
            token = current_peer_node.set(node_id)
            try:
                return inner(request_iterator, context)
            finally:
                current_peer_node.reset(token)

        return grpc.stream_unary_rpc_method_handler(
            behavior, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    # --- clients -----------------------------------------------------------------------------------

    def _client_handler(self, handler: Any, method: str, rule: Method, metadata: Any) -> Any:
        deserializer = _lenient(handler.request_deserializer, self.limits.request_bytes_max)
        serializer = handler.response_serializer
        if handler.request_streaming and handler.response_streaming:
            inner = handler.stream_stream

            def stream_stream(request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
                return self._serve_stream(inner, method, rule, metadata, request_iterator, context)

            return grpc.stream_stream_rpc_method_handler(stream_stream, deserializer, serializer)
        if not handler.request_streaming and not handler.response_streaming:
            inner = handler.unary_unary

            def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
                return self._serve_unary(inner, method, rule, metadata, request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, deserializer, serializer)
        if handler.request_streaming:
            # Request streams with one answer (none among mqstore's client calls today): admitted
            # as a whole (no request to look into: the permission in every namespace), each frame
            # parsed by gRPC.
            inner_su = handler.stream_unary

            def stream_unary(request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
                admitted = self._admit_plain(method, rule, metadata, context, None)
                token = current_actor.set(admitted.actor)
                try:
                    return inner_su(request_iterator, context)
                finally:
                    current_actor.reset(token)
                    self._leave_plain(admitted)

            return grpc.stream_unary_rpc_method_handler(stream_unary, handler.request_deserializer, serializer)
        inner_us = handler.unary_stream

        def unary_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            return self._serve_response_stream(inner_us, method, rule, metadata, request, context)

        return grpc.unary_stream_rpc_method_handler(unary_stream, deserializer, serializer)

    def _admit_plain(self, method: str, rule: Method, metadata: Any, context: grpc.ServicerContext,
                     request: Any) -> _Admitted:
        """Admit a call that is neither unary nor bidi (Admin.Verify and Admin.Backup answer with
        a stream) as the others are: authenticated, within its client's rate, a request that
        parses, authorized, then counted in flight among its client's streams and, when it
        copies the whole store, against STORE_COPIES_MAX. Aborts the call when refused; else
        the caller must :meth:`_leave_plain` when the call ends."""
        entered: str | None = None
        try:
            actor = self._authenticate(method, metadata, context)
            key = self._rate_key(actor, context)
            self._wait_turn(actor, key, context, 1.0 if request is None else _cost(request))
            if isinstance(request, _Malformed):
                raise _malformed(method, request)
            self._authorize(actor, method, rule, request)
            why = self.in_flight.enter(self.client_calls_max, key, self.limits.streams_per_client_max)
            if why is not None:
                raise _refused(errors.Overloaded(
                    f"node busy: streams and client calls: {why} (limits.streams_per_client_max); retry shortly"),
                    "busy")
            entered = key
            if rule.copies_store and self.store_copies.enter(STORE_COPIES_MAX) is not None:
                raise _refused(errors.Overloaded(
                    f"node busy: {STORE_COPIES_MAX} calls that copy the whole store (Verify, Backup) are running "
                    "on this node, the most it runs at once: retry when one has finished"), "busy")
        except _Refused as refused:
            if entered is not None:
                self.in_flight.leave(entered)
            self._count(method, refused.code.name, refused.reason, refused.error)
            _abort(context, refused)
        return _Admitted(actor, key, rule.copies_store)

    def _leave_plain(self, admitted: _Admitted) -> None:
        if admitted.copies_store:
            self.store_copies.leave()
        self.in_flight.leave(admitted.key)

    def _serve_response_stream(self, inner: Callable[[Any, Any], Iterator[Any]], method: str, rule: Method,
                               metadata: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        rid = self._begin_request(metadata, context)
        admitted: _Admitted | None = None
        try:
            admitted = self._admit_plain(method, rule, metadata, context, request)
            started = time.perf_counter()
            actor_token = current_actor.set(admitted.actor)
            try:
                yield from inner(request, context)
            except Exception:
                self._count_failure(method, context)
                raise
            finally:
                current_actor.reset(actor_token)
            self._count_success(method, rule, request, None, context, started)
        finally:
            if admitted is not None:
                self._leave_plain(admitted)
            logs.request_id.reset(rid)

    def _begin_request(self, metadata: Any, context: grpc.ServicerContext) -> contextvars.Token[str | None]:
        """Take the call's request id (the client's ``x-request-id``, else a new one) for the log
        lines written while serving it, and send it back to the client as trailing metadata (with
        the status, at no cost: initial metadata sent on its own costs every call an extra
        round through gRPC's completion queue, ~8 % of a busy leader's throughput)."""
        rid = self._request_id(metadata, context)
        context.set_trailing_metadata(((REQUEST_ID, rid),))
        return logs.request_id.set(rid)

    def _request_id(self, metadata: Any, context: grpc.ServicerContext) -> str:
        for key, value in metadata or ():
            if key == REQUEST_ID and isinstance(value, str) and 0 < len(value) <= _REQUEST_ID_CHARS_MAX \
                    and value.isprintable():
                return value
        return uuid.uuid4().hex[:16]

    def _authenticate(self, method: str, metadata: Any, context: grpc.ServicerContext) -> Actor:
        try:
            return self.host.authenticator.authenticate(metadata, context)
        except errors.Unauthenticated as exc:
            self._check_unauthenticated_rate(context)
            self._deny(unauthenticated_actor(context), method, str(exc))
            raise _refused(exc, "unauthenticated") from None

    def _check_unauthenticated_rate(self, context: grpc.ServicerContext) -> None:
        """A flood of calls without a valid identity is refused by rate (RESOURCE_EXHAUSTED, not
        audited) before each would be audited: per source address (not per connection: a
        client reconnecting gets no fresh bucket), and UNAUTHENTICATED_PER_SECOND for the node."""
        if not self.rates.take(source_key(context.peer())):
            raise _refused(errors.Overloaded("too many requests from this address: slow down"), "rate")
        if not self.unauthenticated.take("node"):
            raise _refused(errors.Overloaded(
                "too many calls that fail authentication reach this node: slow down, and check the credentials"),
                "rate")

    def _from_node(self, context: grpc.ServicerContext) -> bool:
        """Whether the caller presented a cluster node's certificate (over TLS)."""
        if not self.tls:
            return False
        ident = peer_identity(context)
        return ident is not None and ident.kind == "node" and ident.node_id not in self.host.authenticator.removed()

    def _rate_key(self, actor: Actor, context: grpc.ServicerContext) -> str:
        if actor.auth == "none":
            # Anonymous (an insecure trial node: every role to everyone): one client per connection.
            return "peer:" + (context.peer() or "")
        return f"{actor.auth}:{actor.name}"

    def _check_messages(self, messages: Any, name: Callable[[int], str] = "message {}".format) -> None:
        """Refuse a request over the limits; ``name(i)`` names its message ``i`` in the error
        (a stream names its position in the stream). The refusal carries ``index``: the message
        refused (None: the request as a whole)."""
        lim = self.limits
        if len(messages) > lim.batch_messages_max:
            raise _refused(errors.InvalidArgument(
                f"{len(messages)} messages in one request, over this node's limit of {lim.batch_messages_max} "
                "(limits.batch_messages_max): send fewer per request"), "limit")
        for i, m in enumerate(messages):
            size = len(m.data)
            why = None
            if size > lim.message_bytes_max:
                why = (f"{name(i)} is {size} bytes, over this node's limit of {lim.message_bytes_max} bytes "
                       "(limits.message_bytes_max)")
            elif len(m.recipients) > lim.recipients_max:
                why = (f"{name(i)} has {len(m.recipients)} recipients, over this node's limit of "
                       f"{lim.recipients_max} (limits.recipients_max): split it")
            if why is not None:
                refused = _refused(errors.InvalidArgument(why), "limit")
                refused.index = i
                raise refused

    def _authorize(self, actor: Actor, method: str, rule: Method, request: Any) -> None:
        try:
            if rule.namespaces is not None and request is not None:
                spaces = rule.namespaces(request)
                if spaces is None:
                    self.host.authorize(actor, rule.permission, None)
                elif not spaces:
                    # A request naming no item (an empty batch) still needs the permission, in
                    # some namespace at least.
                    if rule.permission not in actor.permissions():
                        self.host.authorize(actor, rule.permission, None)  # "it needs the ... permission"
                else:
                    for ns in spaces:
                        self.host.authorize(actor, rule.permission, ns)
            elif rule.lookup and request is not None and actor.namespaces is not None:
                # Only an actor limited to some namespaces needs the target's namespace.
                assert rule.keys is not None
                if rule.permission not in actor.permissions():
                    self.host.authorize(actor, rule.permission, None)  # "it needs the ... permission"
                for key in rule.keys(request):
                    self._authorize_target(actor, method, rule, key)
            else:
                # Nothing in the request to narrow it to a namespace: the permission in every
                # namespace (an actor limited to some namespaces cannot, e.g., change membership).
                self.host.authorize(actor, rule.permission, None)
        except errors.PermissionDenied as exc:
            self._deny(actor, method, str(exc))
            raise _refused(exc, "permission") from None

    def _authorize_target(self, actor: Actor, method: str, rule: Method, key: Any) -> None:
        """Authorize a namespace-limited ``actor`` for the message or lease ``key`` (in the
        namespace the node looks up). Refused, the caller learns only that it is not one of its
        own: whether the target exists, and in which namespace, stays in the audit record (lease
        tokens are small sequential numbers, so a detailed refusal would name other tenants'
        namespaces one by one)."""
        what = "message" if rule.lookup == "messages" else "lease"
        try:
            found = (self.host.namespace_of_message(key) if rule.lookup == "messages"
                     else self.host.namespace_of_lease(key))
        except errors.NotLeader as exc:
            # A node that does not lead (it may not have applied the target yet): the leader
            # decides, as for the call itself. NotLeader naming it, which the client follows;
            # not a denial (nothing audited here: the leader audits one if it refuses).
            refused = _refused(exc, "not_leader")
            refused.trailers = [("mqstore-leader", exc.leader_address), ("mqstore-leader-id", str(exc.leader_id))]
            raise refused from None
        try:
            if found is None:
                raise errors.PermissionDenied(f"{actor.name!r} may only act in its namespaces, and {what} {key} "
                                              "is not known here")
            self.host.authorize(actor, rule.permission, found)
        except errors.PermissionDenied as exc:
            self._deny(actor, method, f"{exc} ({what} {key})" if found is not None else str(exc))
            assert actor.namespaces is not None
            raise _refused(errors.PermissionDenied(
                f"{actor.name!r} ({actor.auth}, namespaces {', '.join(sorted(actor.namespaces))}): {what} {key} "
                "was not found, or is not in the namespaces this identity may use"), "permission") from None

    def _deny(self, actor: Actor, method: str, reason: str) -> None:
        try:
            self.host.audit_denial(actor, method, reason)
        except Exception:
            log.exception("auditing a denied call failed")
        log.info("denied %s for %s (%s): %s", method, actor.name, actor.source, reason)

    def _count(self, method: str, code: str, reason: str | None = None, error: str | None = None) -> None:
        metrics = self.host.metrics
        if metrics is None:
            return
        metrics.requests.labels(_short(method), code).inc()
        if reason is not None:
            metrics.refused.labels(reason).inc()
        if code != "OK":
            metrics.errors.labels(error or code).inc()

    def _wait_turn(self, actor: Actor, key: str, context: grpc.ServicerContext | None, cost: float = 1.0,
                   wait_max_s: float = limits.RATE_WAIT_MS_MAX / 1000) -> None:
        """Go ahead when the client is within its rate; else wait for its turn (back-pressure)
        when that is soon and few of its calls wait already; else refuse (RESOURCE_EXHAUSTED)."""
        if context is not None:
            remaining = _time_remaining(context)
            if remaining is not None:
                wait_max_s = min(wait_max_s, remaining)
        wait = self.rates.reserve(key, wait_max_s, cost)
        if wait == 0:
            return
        if self.waiting.enter(self.waiting_max, key, limits.CLIENT_WAITING_CALLS_MAX) is None:
            try:
                # Its turn comes within wait_max_s: wait for it. It does not: the refusal waits
                # wait_max_s too, so a client flooding over its rate is slowed to its waiting
                # calls per second instead of costing the node a refusal as fast as it can ask.
                time.sleep(wait if wait is not None else wait_max_s)
            finally:
                self.waiting.leave(key)
            if wait is not None:
                return
        raise _refused(errors.Overloaded(
            f"{actor.name!r} is over its rate of {self.limits.requests_per_second} requests/s "
            "(limits.requests_per_second): slow down"), "rate")

    def _serve_unary(self, inner: Callable[[Any, Any], Any], method: str, rule: Method, metadata: Any,
                     request: Any, context: grpc.ServicerContext) -> Any:
        rid = self._begin_request(metadata, context)
        started = time.perf_counter()
        entered = False
        actor_token = None
        try:
            try:
                actor = self._authenticate(method, metadata, context)
                self._wait_turn(actor, self._rate_key(actor, context), context, _cost(request))
                if self.limits.deadline_required and method.startswith("/mqstore.v1.Queue/") \
                        and _time_remaining(context) is None:
                    raise _refused(errors.InvalidArgument(
                        "set a deadline (a timeout) on every call: this node refuses calls without one "
                        "(limits.deadline_required)"), "deadline")
                if isinstance(request, _Malformed):
                    raise _malformed(method, request)
                if rule.enqueue:
                    self._check_messages([request.message] if method.endswith("/Enqueue") else request.messages)
                if not (rule.nodes and self._from_node(context)):
                    self._authorize(actor, method, rule, request)
                if rule.enqueue:
                    refusal = self.host.enqueue_refusal()
                    if refusal is not None:
                        raise _refused(refusal, "no_leader" if isinstance(refusal, errors.Unavailable) else "disk")
                why = self.in_flight.enter(self.client_calls_max)
                if why is not None:
                    raise _refused(errors.Overloaded(f"node busy: client calls: {why}; retry shortly"), "busy")
                entered = True
            except _Refused as refused:
                self._count(method, refused.code.name, refused.reason, refused.error)
                _abort(context, refused)
            actor_token = current_actor.set(actor)
            try:
                response = inner(request, context)
            except BaseException:
                self._count_failure(method, context)
                raise
            self._count_success(method, rule, request, response, context, started)
            return response
        finally:
            if actor_token is not None:
                current_actor.reset(actor_token)
            if entered:
                self.in_flight.leave()
            logs.request_id.reset(rid)

    def _count_failure(self, method: str, context: grpc.ServicerContext) -> None:
        code = context.code() if hasattr(context, "code") else None
        name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
        self._count(method, name, error=_error_name(context) or name)

    def _count_success(self, method: str, rule: Method, request: Any, response: Any,
                       context: grpc.ServicerContext, started: float) -> None:
        metrics = self.host.metrics
        if metrics is None:
            return
        code = context.code() if hasattr(context, "code") else None
        if isinstance(code, grpc.StatusCode) and code != grpc.StatusCode.OK:
            self._count(method, code.name, error=_error_name(context) or code.name)
            return
        short = _short(method)
        metrics.requests.labels(short, "OK").inc()
        if rule.write:
            metrics.commit_latency.labels(short).observe(time.perf_counter() - started)
        if short == "Lease":
            metrics.leased.inc(len(response.leases))
        elif short in ("Ack", "Defer", "Bounce"):
            metrics.settled.labels(short.lower()).inc()
        elif short == "AckMany":
            metrics.settled.labels("ack").inc(len(request.tokens))

    def _serve_stream(self, inner: Callable[[Any, Any], Iterator[Any]], method: str, rule: Method, metadata: Any,
                      request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        rid = self._begin_request(metadata, context)
        stream_key: str | None = None
        try:
            try:
                actor = self._authenticate(method, metadata, context)
                rate_key = self._rate_key(actor, context)
                self._wait_turn(actor, rate_key, context)  # opening a stream is a call too
                if rule.enqueue:
                    refusal = self.host.enqueue_refusal()
                    if refusal is not None:
                        raise _refused(refusal, "no_leader" if isinstance(refusal, errors.Unavailable) else "disk")
                why = self.in_flight.enter(self.client_calls_max, rate_key, self.limits.streams_per_client_max)
                if why is not None:
                    raise _refused(errors.Overloaded(
                        f"node busy: streams and client calls: {why} (limits.streams_per_client_max); retry shortly"),
                        "busy")
                stream_key = rate_key
            except _Refused as refused:
                self._count(method, refused.code.name, refused.reason, refused.error)
                _abort(context, refused)
            failure: list[_Refused] = []
            arrivals: collections.deque[tuple[float, int]] = collections.deque()  # frames let through
            frames = self._stream_frames(method, rule, actor, rate_key, request_iterator, failure, metadata, context,
                                         arrivals)
            actor_token = current_actor.set(actor)
            try:
                for response in inner(frames, context):
                    self._observe_stream_commit(method, rule, response, arrivals)
                    yield response
            except GeneratorExit:
                # gRPC stops taking answers from a call the client cancelled or whose deadline
                # passed (while an answer was being sent): closed here, counted as it ended.
                code = _ended_code(context)
                self._count(method, "CANCELLED" if code == "OK" else code)
                raise
            except Exception:
                self._count_failure(method, context)
                raise
            finally:
                current_actor.reset(actor_token)
            if failure:
                self._count(method, failure[0].code.name, failure[0].reason, failure[0].error)
                _abort(context, failure[0], not_applied=False)  # earlier frames may be stored
            # A stream the client cancelled, or whose deadline passed, ends here too (the servicer
            # stops reading): it is counted as the client saw it, not as OK — once gRPC finished
            # the call, which is when it knows (the request side of a cancelled stream ends like
            # a closed one, and the cancellation is marked just after); the answer is not held.
            if not context.add_callback(lambda: self._count(method, _finished_code(context))):
                self._count(method, _ended_code(context))
        finally:
            if stream_key is not None:
                self.in_flight.leave(stream_key)
            logs.request_id.reset(rid)

    def _observe_stream_commit(self, method: str, rule: Method, response: Any,
                               arrivals: collections.deque[tuple[float, int]]) -> None:
        """A stream's answer for the messages of its oldest frames let through: their commit
        latency is from the first of those frames' arrival (as a unary write's from its own)."""
        metrics = self.host.metrics
        if metrics is None or not rule.write:
            return
        answered = len(getattr(response, "message_ids", ()))
        first: float | None = None
        while answered > 0 and arrivals:
            at, count = arrivals.popleft()
            first = at if first is None else first
            answered -= count
        if first is not None:
            metrics.commit_latency.labels(_short(method)).observe(time.perf_counter() - first)

    def _stream_frames(self, method: str, rule: Method, actor: Actor, rate_key: str, frames: Iterator[Any],
                       failure: list[_Refused], metadata: Any, context: grpc.ServicerContext,
                       arrivals: collections.deque[tuple[float, int]]) -> Iterator[Any]:
        """The stream's frames, each checked; the first that fails ends the stream (``failure``).
        Frames over the client's rate wait (back-pressure) rather than fail. The caller's
        credentials are checked again on a frame at most every STREAM_REAUTHENTICATE_S: a stream
        lives as long as its client likes, and a revoked token must not keep enqueueing on it."""
        wait_max_s = limits.STREAM_THROTTLE_WAIT_MS_MAX / 1000
        checked = time.monotonic()
        passed = 0  # messages of the frames let through so far
        try:
            for frame in frames:
                arrived = time.perf_counter()
                if isinstance(frame, _Malformed):
                    raise _malformed(method, frame)
                now = time.monotonic()
                if now - checked >= STREAM_REAUTHENTICATE_S:
                    checked = now
                    actor = self._reauthenticate(method, metadata, context)
                wait = self.rates.reserve(rate_key, wait_max_s, _cost(frame))
                if wait is None:
                    raise _refused(errors.Overloaded(
                        f"{actor.name!r} is far over its rate of {self.limits.requests_per_second} requests/s "
                        "(limits.requests_per_second)"), "rate")
                if wait > 0:
                    time.sleep(wait)  # the stream slows down to the client's rate
                if rule.enqueue:
                    bad = self._first_refused_message(actor, method, rule, frame, passed)
                    if bad is not None:
                        # The messages before it are let through (stored and answered as the
                        # caller's stream says), then the stream ends naming its position.
                        k, refused = bad
                        if k:
                            arrivals.append((arrived, k))
                            yield type(frame)(messages=frame.messages[:k])
                        raise refused
                self._authorize(actor, method, rule, frame)
                if rule.enqueue:
                    refusal = self.host.enqueue_refusal()
                    if refusal is not None:
                        raise _refused(refusal, "no_leader" if isinstance(refusal, errors.Unavailable) else "disk")
                    passed += len(frame.messages)
                    arrivals.append((arrived, len(frame.messages)))
                yield frame
        except _Refused as refused:
            failure.append(refused)

    def _first_refused_message(self, actor: Actor, method: str, rule: Method, frame: Any,
                               passed: int) -> tuple[int, _Refused] | None:
        """The first message of a stream's frame that this node's limits or the actor's
        namespaces refuse: its index in the frame and the refusal, naming its position in the
        stream (``passed`` messages came in earlier frames). A frame over the batch limit is
        refused whole (index 0). None: every message may go on."""
        if not frame.messages:
            return None  # an empty frame: the frame's own check says what it needs
        try:
            self._check_messages(frame.messages, lambda i: f"messages[{passed + i}]")
        except _Refused as refused:
            return refused.index or 0, refused
        if self._frame_allowed(actor, rule, frame):
            return None
        return self._first_denied(actor, method, rule, frame, passed)

    def _frame_allowed(self, actor: Actor, rule: Method, frame: Any) -> bool:
        """Whether the actor holds the permission in every namespace of the frame (no audit)."""
        assert rule.namespaces is not None
        try:
            for ns in rule.namespaces(frame) or ():
                self.host.authorize(actor, rule.permission, ns)
        except errors.PermissionDenied:
            return False
        return True

    def _first_denied(self, actor: Actor, method: str, rule: Method, frame: Any,
                      passed: int) -> tuple[int, _Refused]:
        for k, m in enumerate(frame.messages):
            try:
                self._authorize(actor, method, rule, type(frame)(messages=[m]))
            except _Refused as refused:
                refused.message = f"messages[{passed + k}]: {refused.message}"
                return k, refused
        raise AssertionError("a frame refused as a whole but no message of it on its own")

    def _reauthenticate(self, method: str, metadata: Any, context: grpc.ServicerContext) -> Actor:
        """The actor of an open stream's credentials now (its roles may have changed); a token
        removed since the stream opened ends it with UNAUTHENTICATED, audited as a refused call."""
        try:
            return self.host.authenticator.authenticate(metadata, context)
        except errors.Unauthenticated as exc:
            refusal = errors.Unauthenticated(f"{exc}: the stream was opened with it and is ended")
            self._deny(unauthenticated_actor(context), method, str(refusal))
            raise _refused(refusal, "unauthenticated") from None


def _cost(request: Any) -> float:
    """What a request counts against its client's rate: 1, plus 1 per RATE_COST_BYTES it carries."""
    size = request.size if isinstance(request, _Malformed) else request.ByteSize()
    return 1.0 + size // limits.RATE_COST_BYTES


#: gRPC reports "no deadline" as about 2**63 seconds remaining.
_NO_DEADLINE_S = 10 * 365 * 86400


_DEADLINE_SLACK_S = 0.25


def _ended_code(context: grpc.ServicerContext) -> str:
    """The status a call that returned normally ends with: OK, unless the client cancelled it or
    its deadline passed meanwhile (the client then saw CANCELLED or DEADLINE_EXCEEDED)."""
    is_active = getattr(context, "is_active", None)
    return "OK" if is_active is None or is_active() else _cancelled_code(context)


def _finished_code(context: grpc.ServicerContext) -> str:
    """:func:`_ended_code` of a call gRPC has finished (from its termination callback, when
    ``is_active()`` is False either way): whether the client cancelled it is in the call's state
    (grpc's server context keeps it; a context without it counts as OK)."""
    cancelled = getattr(getattr(context, "_state", None), "client", None) == "cancelled"
    return _cancelled_code(context) if cancelled else "OK"


def _cancelled_code(context: grpc.ServicerContext) -> str:
    remaining = _time_remaining(context)
    # The client's own deadline timer cancels the call a moment before the node's copy of the
    # deadline (set on arrival, after the call travelled) passes: a cancellation that close to
    # the deadline is the deadline's.
    return "DEADLINE_EXCEEDED" if remaining is not None and remaining < _DEADLINE_SLACK_S else "CANCELLED"


def _time_remaining(context: grpc.ServicerContext) -> float | None:
    """Seconds until the call's deadline (None: it has none)."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > _NO_DEADLINE_S else float(remaining)


def _malformed(method: str, request: _Malformed) -> _Refused:
    if request.too_large:
        return _refused(errors.Overloaded(f"the {_short(method)} request is {request.problem}"), "limit")
    return _refused(errors.InvalidArgument(f"the request is not a valid {_short(method)} request: {request.problem}"),
                    "malformed")


def _error_name(context: grpc.ServicerContext) -> str:
    """The mqstore error class a servicer put in its trailing metadata (empty when none)."""
    try:
        trailers = context.trailing_metadata() or ()
    except Exception:
        return ""
    for key, value in trailers:
        if key == "mqstore-error":
            return str(value)
    return ""


__all__ = ["REQUEST_ID", "EdgeHost", "EdgeInterceptor", "RateLimiter"]
