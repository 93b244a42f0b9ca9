"""gRPC services of a storage node: Queue (clients), Admin (operators), Raft (peers).

Servicers are thin: convert the request, call the node's queue or runtime, convert the answer,
and map mqstore's errors to status codes with a message a person can act on. Every error also
carries trailing metadata ``mqstore-error`` (the exception's class name) so the client raises
the same exception type as the embedded API; ``NotLeader`` adds ``mqstore-leader`` (address) and
``mqstore-leader-id``.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import json
import logging
import os
import queue
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mqstore import errors, limits
from mqstore.actor import Actor
from mqstore.api import Lease, Message, MessageSummary, QueueBase
from mqstore.codec import crc32c
from mqstore.compliance.rules import Ctx, Mode
from mqstore.compliance.service import ComplianceService
from mqstore.config import NodeConfig, check_address, check_site
from mqstore.consensus.quorum import majority
from mqstore.consensus.raft import ProgressStatus
from mqstore.consensus.types import (
    ConfChange,
    ConfChangeItem,
    ConfChangeType,
    InvalidConfig,
    MessageType,
    ProposalDropped,
)
from mqstore.crypto.keyring import KeyShredded
from mqstore.health import NodeHealth
from mqstore.metrics import NodeMetrics
from mqstore.node.cluster_queue import ClusterQueue
from mqstore.node.raftlog import entry_payload
from mqstore.node.replica import MemberInfo
from mqstore.node.runtime import OPERATION_TIMEOUT_S, Node, Operation
from mqstore.node.transport import CHANNEL_OPTIONS, SERVER_PING_OPTIONS
from mqstore.node.wire import message_from_proto
from mqstore.ops import backup as ops_backup
from mqstore.ops import inspect as ops_inspect
from mqstore.ops import repair as ops_repair
from mqstore.ops import verify as ops_verify
from mqstore.proto import (
    admin_pb2,
    admin_pb2_grpc,
    compliance_pb2_grpc,
    queue_pb2,
    queue_pb2_grpc,
    raft_pb2,
    raft_pb2_grpc,
)
from mqstore.queue.model import DenialEntry
from mqstore.security import auth
from mqstore.security.auth import Authenticator, current_peer_node
from mqstore.security.edge import NOT_APPLIED, EdgeInterceptor, add_trailers
from mqstore.security.tls import PeerChannelFactory, server_credentials
from mqstore.store import LogStore

log = logging.getLogger(__name__)

#: Services a node serves, for gRPC server reflection.
_SERVICE_NAMES = (
    "mqstore.v1.Queue",
    "mqstore.v1.Admin",
    "mqstore.v1.Compliance",
    "mqstore.v1.Raft",
    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    reflection.SERVICE_NAME,
)

F = TypeVar("F", bound=Callable[..., Any])

_STATUS: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidConfig, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.StaleLease, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.NotLeader, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (ProposalDropped, grpc.StatusCode.UNAVAILABLE),
    (errors.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.Immutable, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.Corruption, grpc.StatusCode.DATA_LOSS),
    (errors.UnknownKey, grpc.StatusCode.NOT_FOUND),
    (KeyShredded, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.MQStoreError, grpc.StatusCode.INTERNAL),
]


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    code = grpc.StatusCode.INTERNAL
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            code = status
            break
    trailers = [("mqstore-error", type(exc).__name__)]
    if isinstance(exc, errors.NotLeader):
        trailers += [("mqstore-leader", exc.leader_address), ("mqstore-leader-id", str(exc.leader_id))]
    if isinstance(exc, errors.Unavailable) and exc.not_applied:
        trailers.append((NOT_APPLIED, "1"))
    add_trailers(context, trailers)
    context.abort(code, str(exc) or type(exc).__name__)


class InFlight:
    """Counts client calls being served, so a graceful stop can wait for them to finish."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.count = 0

    def __enter__(self) -> None:
        with self._cond:
            self.count += 1

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self.count -= 1
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.count == 0, timeout)


def handled(fn: F) -> F:
    """Map mqstore errors raised by a servicer method to gRPC statuses (and count the call)."""

    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        with self.in_flight:
            try:
                return fn(self, request, context)
            except (errors.MQStoreError, InvalidConfig, ProposalDropped) as exc:
                _abort(context, exc)
            except ValueError as exc:  # e.g. a protobuf field out of range
                _abort(context, errors.InvalidArgument(str(exc)))
            return None

    return wrapper  # type: ignore[return-value]


def _ms_to_s(ms: int) -> float | None:
    return ms / 1000 if ms else None


def _message_dict(m: queue_pb2.NewMessage) -> dict[str, Any]:
    return {
        "mail_from": m.mail_from,
        "recipients": list(m.recipients),
        "data": m.data,
        "namespace": m.namespace or "default",
        "priority": m.priority,
        "not_before": _ms_to_s(m.not_before_ms),
        "expires_in": _ms_to_s(m.expires_in_ms),
        "idempotency_key": m.idempotency_key or None,
    }


def _lease_proto(lease: Lease) -> queue_pb2.Lease:
    return queue_pb2.Lease(
        message_id=lease.message_id,
        token=lease.token,
        namespace=lease.namespace,
        mail_from=lease.mail_from,
        recipients=list(lease.recipients),
        data=lease.data,
        attempts=lease.attempts,
        deadline_ms=round(lease.deadline * 1000),
        priority=lease.priority,
    )


def _message_proto(m: Message, include_data: bool) -> queue_pb2.MessageInfo:
    return queue_pb2.MessageInfo(
        message_id=m.message_id,
        namespace=m.namespace,
        mail_from=m.mail_from,
        recipients=[
            queue_pb2.RecipientStatus(
                address=r.address,
                state=r.state,
                attempts=r.attempts,
                next_attempt_ms=round(r.next_attempt * 1000) if r.next_attempt else 0,
                last_reason=r.last_reason or "",
                lease_token=r.lease_token or 0,
                lease_deadline_ms=round(r.lease_deadline * 1000) if r.lease_deadline else 0,
            )
            for r in m.recipients
        ],
        data=m.data if include_data else b"",
        priority=m.priority,
        created_ms=round(m.created * 1000),
        not_before_ms=round(m.not_before * 1000) if m.not_before else 0,
        expires_at_ms=round(m.expires_at * 1000) if m.expires_at else 0,
        held=m.held,
        done=m.done,
        size=m.size,
        idempotency_key=m.idempotency_key or "",
        retain_until_ms=round(m.retain_until * 1000) if m.retain_until else 0,
        retention_mode=m.retention_mode,
        locked_until_ms=round(m.locked_until * 1000) if m.locked_until else 0,
        legal_holds=list(m.legal_holds),
        key_id=m.key_id,
    )


def _summary_proto(s: MessageSummary) -> queue_pb2.MessageSummary:
    return queue_pb2.MessageSummary(
        message_id=s.message_id,
        namespace=s.namespace,
        created_ms=round(s.created * 1000),
        priority=s.priority,
        size=s.size,
        held=s.held,
        done=s.done,
        recipients=s.recipients,
        states=s.states,
    )


#: EnqueueStream commits up to this many of the messages that arrived while its previous commit ran.
_STREAM_BATCH_MESSAGES = limits.BATCH_MESSAGES_MAX
#: EnqueueStream reads its client's next frame only while it holds fewer than a batch of messages
#: (above) and fewer than this many bytes not yet being stored: one largest request's worth. So
#: a stream holds at most the batch being stored plus under one batch and one frame read ahead;
#: a client sending faster than the node commits is held back by HTTP/2 flow control.
_STREAM_READ_AHEAD_BYTES_MAX = limits.REQUEST_BYTES_MAX


class QueueService(queue_pb2_grpc.QueueServicer):  # type: ignore[misc]
    def __init__(self, queue: ClusterQueue, in_flight: InFlight) -> None:
        self.queue = queue
        self.in_flight = in_flight

    @handled
    def Enqueue(self, request: Any, context: grpc.ServicerContext) -> Any:
        (mid,) = self.queue.enqueue_many([_message_dict(request.message)])
        return queue_pb2.EnqueueResponse(message_id=mid)

    @handled
    def EnqueueBatch(self, request: Any, context: grpc.ServicerContext) -> Any:
        ids = self.queue.enqueue_many([_message_dict(m) for m in request.messages])
        return queue_pb2.EnqueueBatchResponse(message_ids=ids)

    def EnqueueStream(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        """Commits whatever has arrived (up to 4096 messages) while the previous commit ran. The
        reader takes the next frame from gRPC only while what it holds is under a batch (by count
        and by bytes, see _STREAM_READ_AHEAD_BYTES_MAX), so a fast client waits on flow control."""
        frames: list[list[Any]] = []  # [messages, bytes] per frame read and not yet taken
        held_messages = 0
        held_bytes = 0  # a frame's bytes count until its last message is taken
        lock = threading.Condition()
        done = False  # the reader stopped reading
        stopped = False  # the call ended or the loop below returned: the reader must stop

        def reader() -> None:
            nonlocal done, held_messages, held_bytes
            try:
                for request in request_iterator:
                    messages = list(request.messages)
                    if not messages:
                        continue
                    size = request.ByteSize()
                    with lock:
                        if stopped:
                            return
                        frames.append([messages, size])
                        held_messages += len(messages)
                        held_bytes += size
                        lock.notify_all()
                        while not stopped and (held_messages >= _STREAM_BATCH_MESSAGES
                                               or held_bytes >= _STREAM_READ_AHEAD_BYTES_MAX):
                            lock.wait()
                        if stopped:
                            return
            except grpc.RpcError:
                pass  # the client went away or the call was aborted: nothing more to read
            finally:
                with lock:
                    done = True
                    lock.notify_all()

        def stop() -> None:
            nonlocal stopped
            with lock:
                stopped = True
                lock.notify_all()

        def take() -> list[Any]:
            """Up to a batch of the messages read, in order (the caller holds ``lock``)."""
            nonlocal held_messages, held_bytes
            batch: list[Any] = []
            whole = 0
            for entry in frames:
                room = _STREAM_BATCH_MESSAGES - len(batch)
                if room <= 0:
                    break
                messages, size = entry
                if len(messages) > room:
                    batch += messages[:room]
                    entry[0] = messages[room:]
                    break
                batch += messages
                held_bytes -= size
                whole += 1
            del frames[:whole]
            held_messages -= len(batch)
            lock.notify_all()  # room for the reader
            return batch

        def store(messages: list[Any]) -> list[str]:
            return self.queue.enqueue_many([_message_dict(m) for m in messages])

        def store_before_bad(
            messages: list[Any], refusal: errors.InvalidArgument
        ) -> tuple[list[str], int | None, errors.InvalidArgument]:
            """``messages`` were refused together with ``refusal``: store those before the bad
            one, in order (each store is all or nothing). Returns their ids, the bad one's index in
            ``messages`` (None: stored in parts, none was refused on its own) and its error. The
            index the error names is taken when it gives one; else the messages are halved until
            one alone is refused."""
            named = _BAD_MESSAGE.match(str(refusal))
            k = int(named.group(1)) if named is not None else -1
            if k == 0 or len(messages) == 1:
                return [], 0, refusal
            if 0 < k < len(messages):
                parts, bad = [messages[:k]], k  # stored, they leave messages[k] the bad one
            else:
                half = len(messages) // 2
                parts, bad = [messages[:half], messages[half:]], None
            ids: list[str] = []
            offset = 0
            for part in parts:
                try:
                    ids += store(part)
                except errors.InvalidArgument as again:
                    more, j, error = store_before_bad(part, again)
                    ids += more
                    if j is not None:
                        return ids, offset + j, error
                offset += len(part)
            return ids, bad, refusal

        # A reader waiting for room wakes when the call ends (cancelled, deadline, node stopping)
        # even while the loop below waits for a commit or for gRPC to take an answer.
        if not context.add_callback(stop):
            stop()  # already ended
        # The reader runs the edge's per-frame checks: in this call's context (its request id
        # on their log lines), which a new thread would not have.
        threading.Thread(target=contextvars.copy_context().run, args=(reader,), daemon=True).start()
        received = 0  # messages of this stream committed before the current batch
        with self.in_flight:
            try:
                while True:
                    with lock:
                        while not frames and not done:
                            lock.wait()
                        batch = take()
                        finished = done and not batch
                    if finished:
                        return
                    bad: int | None = None
                    error: errors.InvalidArgument | None = None
                    try:
                        try:
                            ids = store(batch)
                        except errors.InvalidArgument as refusal:
                            # A message the store refuses must not take the others of its batch with
                            # it: those before it are stored and answered, then the stream ends naming
                            # its position in this stream (not in the batch).
                            ids, bad, error = store_before_bad(batch, refusal)
                    except (errors.MQStoreError, ProposalDropped) as exc:
                        _abort(context, exc)
                        return
                    if ids:
                        yield queue_pb2.EnqueueBatchResponse(message_ids=ids)
                    if bad is not None and error is not None:
                        text = str(error)
                        named = _BAD_MESSAGE.match(text)
                        position = f"messages[{received + bad}]"
                        _abort(context, errors.InvalidArgument(
                            position + text[named.end():] if named is not None else f"{position}: {text}"))
                        return
                    received += len(batch)
            finally:
                stop()

    @handled
    def Lease(self, request: Any, context: grpc.ServicerContext) -> Any:
        leases = self.queue.lease(
            request.worker,
            max_messages=request.max_messages or 100,
            lease_seconds=(request.lease_ms or 300_000) / 1000,
            namespace=request.namespace or None,
            domain=request.domain or None,
        )
        return queue_pb2.LeaseResponse(leases=[_lease_proto(x) for x in leases])

    @handled
    def Ack(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.queue.ack(request.token, list(request.recipients) or None)
        return queue_pb2.SettleResponse()

    @handled
    def Defer(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.queue.defer(request.token, list(request.recipients) or None, reason=request.reason)
        return queue_pb2.SettleResponse()

    @handled
    def Bounce(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.queue.bounce(request.token, list(request.recipients) or None, reason=request.reason)
        return queue_pb2.SettleResponse()

    @handled
    def AckMany(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.queue.ack_many(list(request.tokens))
        return queue_pb2.SettleResponse()

    @handled
    def Get(self, request: Any, context: grpc.ServicerContext) -> Any:
        return _message_proto(self.queue.get(request.message_id), request.include_data)

    def _admin(self, op: Callable[[str], None], request: Any) -> Any:
        op(request.message_id)
        return queue_pb2.AdminResponse()

    @handled
    def Hold(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._admin(self.queue.hold, request)

    @handled
    def Release(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._admin(self.queue.release, request)

    @handled
    def Requeue(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._admin(self.queue.requeue, request)

    @handled
    def Delete(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.queue.delete(request.message_id, bypass_governance=request.bypass_governance,
                          reason=request.reason or None)
        return queue_pb2.AdminResponse()

    @handled
    def BounceMessage(self, request: Any, context: grpc.ServicerContext) -> Any:
        result = self.queue.bounce_message(request.message_id, reason=request.reason or None)
        return queue_pb2.BounceMessageResponse(bounced=result.bounced, left_leased=result.left_leased)

    @handled
    def List(self, request: Any, context: grpc.ServicerContext) -> Any:
        page = self.queue.list(
            state=request.state or None,
            namespace=request.namespace or None,
            domain=request.domain or None,
            older_than=request.older_than_ms / 1000 if request.older_than_ms else None,
            limit=request.limit or 1000,
            after=request.after or None,
        )
        return queue_pb2.ListResponse(messages=[_summary_proto(s) for s in page], next_after=page.next_after or "")

    @handled
    def QShape(self, request: Any, context: grpc.ServicerContext) -> Any:
        shape = self.queue.qshape(request.namespace or None)
        return queue_pb2.QShapeResponse(
            buckets=list(shape.buckets),
            total=list(shape.total),
            domains=[queue_pb2.QShapeRow(domain=d, counts=list(c)) for d, c in shape.domains.items()],
        )

    @handled
    def Stats(self, request: Any, context: grpc.ServicerContext) -> Any:
        return queue_pb2.StatsResponse(json=json.dumps(self.queue.stats(), sort_keys=True))

    @handled
    def SetNamespacePolicy(self, request: Any, context: grpc.ServicerContext) -> Any:
        def keep_or_seconds(ms: int, name: str) -> float | None:
            if ms < -1:
                raise errors.InvalidArgument(f"{name} must be >= 0 ms, or -1 to keep the current value")
            return None if ms == -1 else ms / 1000

        if request.reset_backoff and request.backoff_ms:
            raise errors.InvalidArgument("give backoff_ms or reset_backoff, not both")
        if request.lifetime_ms < 0:
            raise errors.InvalidArgument("lifetime_ms must be > 0, or 0 to keep the current value")
        policy = self.queue.set_namespace_policy(
            request.namespace,
            backoff=[] if request.reset_backoff else ([ms / 1000 for ms in request.backoff_ms] or None),
            lifetime=request.lifetime_ms / 1000 if request.lifetime_ms else None,
            retention=keep_or_seconds(request.retention_ms, "retention_ms"),
            dedup_window=keep_or_seconds(request.dedup_window_ms, "dedup_window_ms"),
            expired_retention=keep_or_seconds(request.expired_retention_ms, "expired_retention_ms"),
            mode=request.mode or None,
            lock_retention=keep_or_seconds(request.lock_retention_ms, "lock_retention_ms"),
            bypass_governance=request.bypass_governance,
            reason=request.reason or None,
        )
        return queue_pb2.PolicyResponse(
            backoff_ms=list(policy.backoff_ms),
            lifetime_ms=policy.lifetime_ms,
            retention_ms=policy.retention_ms,
            dedup_window_ms=policy.dedup_window_ms,
            expired_retention_ms=policy.expired_retention_ms,
            mode=Mode(policy.mode).name.lower(),
            lock_retention_ms=policy.lock_retention_ms,
        )


#: An enqueue error that names the message it refuses (by its index in the call's list).
_BAD_MESSAGE = re.compile(r"messages\[(\d+)\]")

def ops_members(node: Node) -> list[int]:
    """Every member of the node's configuration (voters and learners)."""
    return [n for n, _ in node.raw.conf_state.sites]


class AdminService(admin_pb2_grpc.AdminServicer):  # type: ignore[misc]
    def __init__(self, node: Node, queue: ClusterQueue, in_flight: InFlight) -> None:
        self.node = node
        self.queue = queue
        self.in_flight = in_flight

    @handled
    def Status(self, request: Any, context: grpc.ServicerContext) -> Any:
        st = self.node.status()
        stats: dict[str, Any] = {}
        if self.node.is_leader:
            try:
                stats = self.queue.stats()
            except errors.MQStoreError:
                stats = {}
        return admin_pb2.StatusResponse(
            node_id=st["node_id"],
            site=st["site"],
            role="removed" if self.node.is_removed else st["role"],
            term=st["term"],
            leader_id=st["leader_id"],
            leader_address=st["leader_address"],
            commit_index=st["commit_index"],
            applied_index=st["applied_index"],
            first_index=st["first_index"],
            last_index=st["last_index"],
            members=[admin_pb2.Member(**m) for m in st["members"]],
            min_sites=st["min_sites"],
            stats_json=json.dumps(stats, sort_keys=True),
            disk_used_bytes=self.node.log.stats()["file_size_bytes"],
            cluster_id=self.node.cluster_id,
            founding=self.node.founding.hex(),
            removed_ids=self.node.removed_ids(),
            snapshot_index=self.node.storage.snapshot_meta().index,
            quarantined=len(self.node.log.quarantined()),
            clock_correction_ms=st["clock_correction_ms"],
        )

    @handled
    def ChangeMembership(self, request: Any, context: grpc.ServicerContext) -> Any:
        op = request.op
        node_id = request.node_id
        if node_id <= 0:
            raise errors.InvalidArgument("node_id must be > 0")
        if op == admin_pb2.MembershipRequest.ADD_LEARNER:
            if not request.site or not request.address:
                raise errors.InvalidArgument("adding a member needs its site and address")
            # As its own config must say them (a typo would use up the node id for good).
            check_site(request.site, "site")
            check_address(request.address, "address")
            if node_id in self.node.removed_ids():
                raise errors.InvalidArgument(
                    f"node id {node_id} was removed from this cluster; node ids are never reused: pick a new one"
                )
            if node_id in dict(self.node.raw.conf_state.sites):
                raise errors.InvalidArgument(f"node {node_id} is already a member")
            if not self.node.is_leader:
                raise self.node._not_leader()
            self._check_new_member(node_id, request.site, request.address)
            info = MemberInfo(node_id, request.site, request.address)
            self.node.submit(Operation(plan=lambda n: [(20, entry_payload(0, 0, 0, info.encode()))]))
            item = ConfChangeItem(ConfChangeType.ADD_LEARNER, node_id, request.site)
        elif op == admin_pb2.MembershipRequest.PROMOTE:
            site = dict(self.node.raw.conf_state.sites).get(node_id)
            if site is None:
                raise errors.NotFound(f"node {node_id} is not a member")
            item = ConfChangeItem(ConfChangeType.ADD_VOTER, node_id, site)
            if node_id not in self.node.raw.conf_state.voters:
                # A learner added while it did not answer was taken as given: a voter whose own
                # config names another site would count in the wrong one and never start again.
                member = self.node.members.get(node_id)
                if member is not None:
                    try:
                        self._check_new_member(node_id, site, member.address)
                    except errors.InvalidArgument as exc:
                        raise errors.InvalidArgument(
                            f"{exc} (promotion refused: remove node {node_id} and add the node again, under a "
                            "new id, with its own site)") from None
                self._wait_ready_to_vote(node_id, context)
        elif op == admin_pb2.MembershipRequest.REMOVE:
            item = ConfChangeItem(ConfChangeType.REMOVE, node_id)
        else:
            raise errors.InvalidArgument("op must be ADD_LEARNER, PROMOTE or REMOVE")
        if not self.node.is_leader:
            raise self.node._not_leader()
        # Answered once applied here: the reply's member table shows the change in force.
        remaining = context.time_remaining()
        timeout = OPERATION_TIMEOUT_S if remaining is None else min(OPERATION_TIMEOUT_S, remaining)
        self.node.change_membership(ConfChange((item,)), timeout)
        return admin_pb2.MembershipResponse(members=[admin_pb2.Member(**m) for m in self.node.status()["members"]])

    def _check_new_member(self, node_id: int, site: str, address: str) -> None:
        """Ask the node at ``address`` who it is before adding it: a site given that is not the
        one in the node's own config would be counted by the commit rule (a voter of site b that
        stands in site c), and the node could never start again (its store names another site
        than its config). Refused, nothing changed, when it answers as another node, site or
        cluster; a node that does not answer within 5 s (not started) is taken as given, with a
        warning."""
        try:
            channel = self.node.transport.channel_to(address, node_id)
            try:
                answer = admin_pb2_grpc.AdminStub(channel).Status(admin_pb2.StatusRequest(), timeout=5.0,
                                                                  wait_for_ready=True)
            finally:
                channel.close()
        except grpc.RpcError as exc:
            if self.node.config.tls is not None:
                # Dialed as node_id, a node presenting another node's certificate fails the
                # handshake just as a node not running does: ask the certificate itself.
                from mqstore.security.tls import presented_node_id

                try:
                    presented = presented_node_id(self.node.config.tls, address)
                except OSError:
                    presented = node_id  # nothing answers there: not started
                if presented != node_id:
                    raise errors.InvalidArgument(
                        f"the node at {address} does not match: its certificate names "
                        f"{f'node {presented}' if presented else 'no node'}, not node {node_id}; nothing changed"
                    ) from None
            log.warning("adding node %d at %s: it did not say who it is (%s: %s); its site %r is taken as given",
                        node_id, address, exc.code().name, exc.details(), site)
            return
        wrong = []
        if answer.node_id != node_id:
            wrong.append(f"it is node {answer.node_id}, not {node_id}")
        if answer.site != site:
            wrong.append(f"its config says site {answer.site!r}, not {site!r}")
        if answer.cluster_id and answer.cluster_id != self.node.cluster_id:
            wrong.append(f"it was prepared for cluster {answer.cluster_id!r}, not {self.node.cluster_id!r}")
        elif answer.founding and self.node.founding and answer.founding != self.node.founding.hex():
            wrong.append("it was bootstrapped as a cluster of its own (founding "
                         f"{answer.founding}, this cluster's {self.node.founding.hex()}): a node added to a cluster is "
                         "prepared with `mqstore join` (remove its data dir's data.mdb and lock.mdb and join it)")
        if wrong:
            raise errors.InvalidArgument(f"the node at {address} does not match: {'; '.join(wrong)}; nothing changed")

    def _wait_ready_to_vote(self, node_id: int, context: grpc.ServicerContext) -> None:
        """Wait (up to two election timeouts) until learner ``node_id`` has caught up with the
        leader's commit index and answers it, and the voters that answer, with it, make a quorum
        of the new configuration; else refuse the promotion (nothing changed). Promoting a learner
        that is down or far behind raises the quorum without adding a voter that helps reach it:
        with one voter lost as well, the cluster could elect no leader."""
        node = self.node
        wait_s = 2 * node.config.election_tick * node.config.heartbeat_ms / 1000
        remaining = context.time_remaining()
        deadline = time.monotonic() + (wait_s if remaining is None else max(0.0, min(wait_s, remaining - 1.0)))

        def view() -> tuple[dict[int, ProgressStatus], int]:
            return node.raw.progress(), node.raw.commit_index

        while True:
            if not node.is_leader:
                raise node._not_leader()
            progress, commit = cast(tuple[dict[int, ProgressStatus], int], node.call(view))
            pr = progress.get(node_id)
            voters = set(node.raw.conf_state.voters) | {node_id}
            answering = {n for n in voters if n == node.node_id or (n in progress and progress[n].recent_active)}
            quorum = majority(len(voters))
            if pr is None or not pr.recent_active or pr.match == 0:  # a new learner starts "active"
                why = ("it has not answered the leader lately (is it running, is its address right, can it dial the "
                       "leader — its [[peers]] must list every member — and does its log say it refuses this "
                       "cluster's messages?)")
            elif pr.match + limits.PROMOTE_LAG_ENTRIES_MAX < commit:
                why = (f"its log is at index {pr.match}, the leader's commit index is {commit} (it must be within "
                       f"{limits.PROMOTE_LAG_ENTRIES_MAX} entries)")
            elif len(answering) < quorum:
                why = (f"only {len(answering)} of the {len(voters)} voters it would make answer the leader, fewer "
                       f"than the {quorum} a quorum needs")
            else:
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        raise errors.Unavailable(
            f"node {node_id} is not ready to vote: {why}. Nothing was changed; promote it once `mqstore status` "
            "shows it caught up", not_applied=True)

    @handled
    def TransferLeader(self, request: Any, context: grpc.ServicerContext) -> Any:
        if not self.node.is_leader:
            raise self.node._not_leader()
        to = request.to
        if to:
            self.node.call(lambda: self.node.raw.transfer_leadership(to))
        else:
            to = int(self.node.call(self.node._transfer_to_best))  # type: ignore[call-overload]
        return admin_pb2.TransferLeaderResponse(leader_id=to)

    @handled
    def Snapshot(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Snapshot this node now and compact its log behind the snapshot (any node, not only
        the leader: each node snapshots its own state)."""
        meta = self.node.snapshot_now(SNAPSHOT_CALL_TIMEOUT_S)
        return admin_pb2.SnapshotResponse(index=meta.index, term=meta.term)

    # --- operations (mqstore/ops, the admin CLI) -------------------------------------------------

    @handled
    def ReadRecords(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Committed records by index, for a replica repairing damaged ones."""
        node = self.node
        served = ops_repair.serve_records(node.log, list(request.indices), node.raw.commit_index)
        return admin_pb2.ReadRecordsResponse(
            node_id=node.node_id,
            cluster_id=node.cluster_id,
            commit_index=node.raw.commit_index,
            first_index=node.log.first_index,
            last_index=node.log.last_index,
            records=[admin_pb2.RawRecord(index=i, data=data, error=error) for i, data, error in served],
        )

    @handled
    def Repair(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Repair this node's damaged records from its peers, through its own writer."""
        node = self.node
        damaged = ops_repair.find_damaged(node.log, list(request.indices), request.scan)
        report = ops_repair.repair_records(node.log, damaged, self._peer_fetch, dry_run=request.dry_run)
        report["node_id"] = node.node_id
        return admin_pb2.RepairResponse(report_json=json.dumps(report, sort_keys=True))

    def _peer_fetch(self, indices: list[int]) -> tuple[dict[int, tuple[bytes, str]], list[str]]:
        node = self.node
        found: dict[int, tuple[bytes, str]] = {}
        notes: list[str] = []
        peers = sorted(n for n in ops_members(node) if n != node.node_id)
        for peer in peers:
            wanted = [i for i in indices if i not in found]
            if not wanted:
                break
            address = node._address_of(peer)
            if not address:
                notes.append(f"node {peer}: no address known")
                continue
            channel = node.transport.channel_factory(address)
            try:
                answer = admin_pb2_grpc.AdminStub(channel).ReadRecords(
                    admin_pb2.ReadRecordsRequest(indices=wanted), timeout=30
                )
            except grpc.RpcError as exc:
                notes.append(f"node {peer} ({address}): {exc.code().name} {exc.details()}")
                continue
            finally:
                channel.close()
            if answer.cluster_id != node.cluster_id:
                notes.append(f"node {peer} answered for cluster {answer.cluster_id!r}: ignored")
                continue
            for rec in answer.records:
                if rec.data and not rec.error:
                    found[rec.index] = (bytes(rec.data), f"node {answer.node_id}")
                elif rec.error:
                    notes.append(f"node {answer.node_id}, index {rec.index}: {rec.error}")
        return found, notes

    @handled
    def MessageHistory(self, request: Any, context: grpc.ServicerContext) -> Any:
        """A message's history from this node's log. On the leader only (after a read barrier),
        so it includes everything acknowledged."""
        from mqstore.ids import parse_id
        from mqstore.queue import machine

        mid = parse_id(request.message_id)
        self.node.read_barrier()
        with self.node.read_state() as kv:
            row = machine.get_message(kv, mid)
        result = ops_inspect.message_history(self.node.log, request.message_id, row.enqueue_index if row else None)
        result["exists"] = row is not None
        return admin_pb2.HistoryResponse(json=json.dumps(result, sort_keys=True))

    @handled
    def StateShape(self, request: Any, context: grpc.ServicerContext) -> Any:
        """qshape for queued, deferred or held recipients (on the leader, after a read barrier)."""
        self.node.read_barrier()
        shape = ops_inspect.qshape_by_state(self.node.log, request.namespace or None, request.state,
                                            self.queue._now_ms())  # the queue's time, read (no stamp taken)
        return admin_pb2.StateShapeResponse(json=json.dumps(shape))

    def _copy(self) -> Path:
        """A consistent copy of this node's store in a fresh directory under snapshots/."""
        work = self.node.snapshot_dir / f"ops-{uuid.uuid4().hex}"
        self.node.log.copy_to(work)
        return work

    def Verify(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        """Verify a consistent copy of this node's store (inside the node: its key stays here)."""
        events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        with self.in_flight:
            try:
                work = self._copy()
            except errors.MQStoreError as exc:
                _abort(context, exc)
                return
            result: dict[str, Any] = {}

            def run() -> None:
                try:
                    report = ops_verify.verify_path(
                        work,
                        key_provider=self.node.log.keyring.provider,
                        audit_public_key=self.queue.audit.log.public_key,  # the key this node signs with
                        progress=lambda phase, done, total: events.put(("progress", (phase, done, total))),
                        scratch_dir=self.node.snapshot_dir,
                    )
                    report.consistent_copy = True  # the node's own copy of itself (_copy): not in use
                    result.update(report.to_dict())
                    result["node_id"] = self.node.node_id
                    events.put(("done", None))
                except BaseException as exc:  # reported to the caller below
                    events.put(("error", exc))

            worker = threading.Thread(target=run, name="mqstore-verify", daemon=True)
            worker.start()
            try:
                last_sent = 0.0
                while True:
                    kind, value = events.get()
                    if kind == "progress":
                        now = time.monotonic()
                        if now - last_sent >= 0.2:
                            last_sent = now
                            phase, done, total = value
                            yield admin_pb2.VerifyEvent(progress=admin_pb2.Progress(phase=phase, done=done,
                                                                                     total=total))
                    elif kind == "done":
                        yield admin_pb2.VerifyEvent(report_json=json.dumps(result, sort_keys=True))
                        return
                    else:
                        failure = value if isinstance(value, errors.MQStoreError) else errors.MQStoreError(str(value))
                        _abort(context, failure)
                        return
            finally:
                worker.join(1)
                shutil.rmtree(work, ignore_errors=True)

    def Backup(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        """A consistent copy of this node's store, streamed in the backup file format. With
        ``min_applied_index``, first waits until this node applied that index (the CLI passes the
        leader's commit index: everything acknowledged before the backup began is in it)."""
        node = self.node
        with self.in_flight:
            wait_s = (request.wait_ms or 30_000) / 1000
            deadline = time.monotonic() + wait_s
            while node.applied_index < request.min_applied_index:
                if time.monotonic() > deadline or not context.is_active():
                    _abort(context, errors.Unavailable(
                        f"node {node.node_id} applied {node.applied_index}, not {request.min_applied_index}, "
                        f"within {wait_s:g} s: back up another node, or wait for it to catch up"))
                    return
                time.sleep(0.02)
            try:
                work = self._copy()
            except errors.MQStoreError as exc:
                _abort(context, exc)
                return
            try:
                source = {"kind": "node", "node_id": node.node_id, "cluster_id": node.cluster_id,
                          "site": node.config.site, "address": node.config.address}
                config = node.config
                signing_key = (Path(config.audit_signing_key) if config.audit_signing_key is not None
                               else Path(config.data_dir) / ops_backup.AUDIT_KEY_FILE)
                header = ops_backup.describe_copy(work, source, signing_key)
                offset = 0
                state = {"done": 0, "total": header["data_bytes"]}

                def progress(done: int, total: int) -> None:
                    state["done"], state["total"] = done, total

                for piece in ops_backup.backup_bytes(work / "data.mdb", header, progress):
                    yield admin_pb2.BackupChunk(
                        data=piece, offset=offset,
                        progress=admin_pb2.Progress(phase="backup", done=state["done"], total=state["total"]),
                    )
                    offset += len(piece)
            finally:
                shutil.rmtree(work, ignore_errors=True)


class RaftService(raft_pb2_grpc.RaftServicer):  # type: ignore[misc]
    def __init__(self, node: Node, queue: ClusterQueue | None = None) -> None:
        self.node = node
        self.queue = queue
        self._refusal_quiet_until: dict[int, float] = {}
        # The fingerprint of this node's KEK (empty: its key provider cannot give one): checked
        # against each sender's, and sent with this node's own messages, so that a node given
        # another key file can neither lead nor take entries whose keys it cannot open.
        self.kek_fingerprint: bytes = node.log.kek_fingerprint
        node.transport.kek_fingerprint = self.kek_fingerprint

    def _refused_sender(self, sender: int, founding: bytes, kek_fingerprint: bytes = b"") -> str | None:
        """Why ``sender``'s Raft messages and snapshots are refused (None: they are not), logged
        once a minute per sender: it was removed from this cluster (its id never comes back; after
        a reseed every old member is), or both founding digests are known and differ, i.e. the two
        nodes were founded apart (see :func:`mqstore.node.runtime.founding_digest`), or both KEK
        fingerprints are known and differ (see :func:`mqstore.crypto.providers.kek_fingerprint`)."""
        node = self.node
        if sender in node.removed:
            why = (f"node {sender} was removed from cluster {node.cluster_id!r} (or left behind by a reseed of "
                   f"node {node.node_id}): a removed node id is never a member again")
        elif founding and node.founding and founding != node.founding:
            why = (
                f"node {sender} was bootstrapped with another member list than node {node.node_id} (founding "
                f"{founding.hex()} vs {node.founding.hex()}), or one of them was reseeded apart (recover "
                f"--force-new-cluster, restore --cluster-id): they are two clusters under the id {node.cluster_id!r}. "
                "Every initial member is bootstrapped with the same [[peers]] (ids and sites) and min_sites"
            )
        elif kek_fingerprint and self.kek_fingerprint and kek_fingerprint != self.kek_fingerprint:
            why = (
                f"node {sender} uses a different key-encryption key than this node (node {node.node_id}; KEK "
                f"fingerprint {kek_fingerprint.hex()} vs {self.kek_fingerprint.hex()}): every node of a cluster "
                "needs the same key_file (copy the cluster's key file to the node that differs; `mqstore keys "
                "new-kek` makes a new key, not a copy). Neither takes the other's votes or entries"
            )
        else:
            return None
        now = time.monotonic()
        if now >= self._refusal_quiet_until.get(sender, 0.0):
            self._refusal_quiet_until[sender] = now + 60
            log.error("refusing raft messages: %s", why)
        return why

    def RecordDenials(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        """A follower's edge refused calls: append them to the audit log (leader only)."""
        peer = current_peer_node.get()
        entries: list[bytes] = []
        reporter = 0
        for r in request_iterator:
            if peer is not None and getattr(r, "from") != peer:
                context.abort(grpc.StatusCode.PERMISSION_DENIED,
                              f"report from node {getattr(r, 'from')} over a connection naming node {peer}")
            if reporter and getattr(r, "from") != reporter:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "reports of two nodes in one call")
            reporter = getattr(r, "from")
            if r.cluster_id != self.node.cluster_id:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, f"report from cluster {r.cluster_id!r}, not ours")
            other = self._refused_sender(getattr(r, "from"), b"")
            if other is not None:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, other)
            if len(entries) >= _DENIAL_BATCH_MAX:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"over {_DENIAL_BATCH_MAX} reports in one call")
            entries.append(r.entry)
        try:
            if self.queue is None:
                raise errors.Unavailable("this node does not record denials")
            self.queue.append_reported_denials(entries, reporter)
        except errors.MQStoreError as exc:
            _abort(context, exc)
        return raft_pb2.SendAck()

    def Send(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        peer = current_peer_node.get()  # the node the caller's certificate names (None: insecure)
        for p in request_iterator:
            if peer is not None and getattr(p, "from") != peer:
                context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"message from node {getattr(p, 'from')} over a connection whose certificate names node {peer}",
                )
            if p.cluster_id != self.node.cluster_id:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, f"message from cluster {p.cluster_id!r}, not ours")
            other = self._refused_sender(getattr(p, "from"), p.founding, p.kek_fingerprint)
            if other is not None:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, other)
            if p.to != self.node.node_id:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"message for node {p.to}, this is node {self.node.node_id}"
                )
            if getattr(p, "from") == self.node.node_id:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"message from node {p.to} to itself")
            try:
                message = message_from_proto(p)
            except errors.InvalidArgument as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            if message.snapshot is not None:
                self.node.note_snapshot_founding(message.snapshot.meta.index, p.founding)
            self.node.clocks.observe(message.frm, p.clock_sent_us, p.clock_echo_us, p.clock_echo_received_us,
                                     p.clock_correction_ms if p.HasField("clock_correction_ms") else None)
            self.node.receive(message)
        return raft_pb2.SendAck()

    def InstallSnapshot(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        """Receive a snapshot into ``snapshots/incoming-*``, checking every chunk's CRC32C, the
        offsets and the whole file's SHA-256, then hand it to the node (which installs it when
        its consensus core decides to)."""
        node = self.node
        peer = current_peer_node.get()
        target: Path | None = node.snapshot_dir / f"incoming-{uuid.uuid4().hex}.mdb"
        assert target is not None
        digest = hashlib.sha256()
        header = None
        offset = 0
        path = target
        try:
            with path.open("wb") as f:
                for chunk in request_iterator:
                    if peer is not None and getattr(chunk, "from") != peer:
                        context.abort(
                            grpc.StatusCode.PERMISSION_DENIED,
                            f"snapshot from node {getattr(chunk, 'from')} over a connection whose certificate "
                            f"names node {peer}",
                        )
                    if chunk.cluster_id != node.cluster_id or chunk.to != node.node_id:
                        return raft_pb2.SnapshotAck(ok=False, error="snapshot for another cluster or node")
                    other = self._refused_sender(getattr(chunk, "from"), chunk.founding, chunk.kek_fingerprint)
                    if other is not None:
                        return raft_pb2.SnapshotAck(ok=False, error=other)
                    if header is None:
                        if not chunk.meta:
                            return raft_pb2.SnapshotAck(ok=False, error="first chunk carries no metadata")
                        try:
                            header = message_from_proto(raft_pb2.RaftMessage.FromString(chunk.meta))
                        except DecodeError:
                            return raft_pb2.SnapshotAck(ok=False, error="first chunk's metadata does not decode")
                        except errors.InvalidArgument as exc:
                            return raft_pb2.SnapshotAck(ok=False, error=f"snapshot metadata: {exc}")
                        if header.type != MessageType.SNAPSHOT or header.snapshot is None:
                            return raft_pb2.SnapshotAck(ok=False, error="snapshot metadata missing")
                        if header.to != node.node_id or header.frm != getattr(chunk, "from"):
                            return raft_pb2.SnapshotAck(ok=False, error="snapshot metadata names another sender "
                                                        "or receiver than its stream")
                        node.note_snapshot_founding(header.snapshot.meta.index, chunk.founding)
                    if chunk.offset != offset or crc32c(chunk.data) != chunk.crc32c:
                        error = f"chunk at {chunk.offset} is damaged or out of order"
                        return raft_pb2.SnapshotAck(ok=False, error=error)
                    f.write(chunk.data)
                    digest.update(chunk.data)
                    offset += len(chunk.data)
                    if chunk.last:
                        if chunk.sha256 != digest.digest():
                            return raft_pb2.SnapshotAck(ok=False, error="snapshot checksum mismatch")
                        f.flush()
                        os.fsync(f.fileno())
                        node.receive_snapshot(header, path)
                        target = None  # the node owns it now
                        return raft_pb2.SnapshotAck(ok=True)
            return raft_pb2.SnapshotAck(ok=False, error="stream ended before the last chunk")
        finally:
            if target is not None:
                target.unlink(missing_ok=True)


def _audit_signer(config: NodeConfig, log_store: LogStore) -> Any:
    """The Ed25519 key this node signs its audit checkpoints with: ``audit_signing_key`` (must
    exist), else ``<data_dir>/audit-signing.key`` (created 0600 on first start — but never for a
    store whose audit log holds signed checkpoints already: its key file is missing, say after a
    restore, and a new key would make each of them fail ``audit verify``)."""
    from mqstore.api import AUDIT_KEY_FILE
    from mqstore.compliance import audit as audit_log
    from mqstore.compliance.signing import load_or_create_signing_key
    from mqstore.queue.kv import LmdbKV

    if config.audit_signing_key is not None:
        return load_or_create_signing_key(config.audit_signing_key, create=False)
    with log_store.env.read() as txn:
        had_key = audit_log.signed_by(LmdbKV(txn, log_store.env.dbs))
    return load_or_create_signing_key(Path(config.data_dir) / AUDIT_KEY_FILE, create=True, signed_by=had_key)


#: Denials a follower may hold for the leader, and how long it retries each.
_DENIAL_QUEUE_MAX = 10_000
#: Admin.Snapshot waits this long for the copy of the store (the node goes on if it takes longer).
SNAPSHOT_CALL_TIMEOUT_S = 600.0
_DENIAL_REPORT_S = 10.0
_DENIAL_BATCH_MAX = 1_000  # reports per RecordDenials call (one consensus operation)


class NodeServer:
    """A node plus its gRPC server, health service and metrics, started and stopped together.

    Every call passes the edge interceptor (:mod:`mqstore.security.edge`: authentication,
    authorization, limits, metrics) first. With ``[tls]`` the port speaks mutual TLS and peers
    are dialed with mutual TLS too; with ``insecure = true`` everything is plaintext.

    Hooks the edge calls (the compliance layer fills in the audit): :meth:`authorize`,
    :meth:`audit_denial`, :meth:`namespace_of_message`, :meth:`namespace_of_lease`.
    """

    def __init__(self, config: NodeConfig, *, workers: int = limits.SERVER_THREADS_DEFAULT,
                 **node_options: Any) -> None:
        if workers <= limits.PEER_THREADS_RESERVED:
            raise errors.InvalidArgument(f"a node needs more than {limits.PEER_THREADS_RESERVED} gRPC threads")
        self.config = config
        self.authenticator = Authenticator(config)  # reads the tokens file: fails before anything opens
        if config.tls is not None and "channel_factory" not in node_options:
            node_options["channel_factory"] = PeerChannelFactory(config.tls)
        self.node = Node(config, **node_options)
        self.authenticator.removed = lambda: self.node.removed
        try:
            self.queue = ClusterQueue(self.node, audit_signer=_audit_signer(config, self.node.log))
        except BaseException:
            self.node.stop(transfer_leadership=False)
            raise
        try:
            self.metrics: NodeMetrics | None = NodeMetrics(self._metrics_state)
            self.node.log.commit_observer = self.metrics.observe_fsync
            self.queue.on_enqueued = self.metrics.enqueued.inc
            self.health = NodeHealth(
                config.node_id, config.data_dir, lambda: self.node.leader_id,
                disk_free_min_bytes=config.disk_free_min_bytes, disk_free_min_percent=config.disk_free_min_percent,
                on_leader_change=lambda _old, _new: self._leader_changed(),
                removed=lambda: self.node.is_removed,
            )
            self.queue.disk = self.health.disk  # stats() reports the disk the watcher reads
            self.edge = EdgeInterceptor(self, config.limits, client_calls_max=workers - limits.PEER_THREADS_RESERVED,
                                        tls=config.tls is not None)
            # No SO_REUSEPORT (gRPC's default): a second node on an address in use must fail to
            # start, not share the port and answer every other connection from another store.
            options = [*CHANNEL_OPTIONS, ("grpc.max_concurrent_streams", limits.CONNECTION_STREAMS_MAX),
                       ("grpc.so_reuseport", 0), *SERVER_PING_OPTIONS]
            self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), interceptors=[self.edge],
                                    options=options)
            self.in_flight = InFlight()
            queue_pb2_grpc.add_QueueServicer_to_server(QueueService(self.queue, self.in_flight), self.grpc)
            admin_pb2_grpc.add_AdminServicer_to_server(AdminService(self.node, self.queue, self.in_flight), self.grpc)
            compliance_pb2_grpc.add_ComplianceServicer_to_server(ComplianceService(self.queue, self.in_flight),
                                                                 self.grpc)
            raft_pb2_grpc.add_RaftServicer_to_server(RaftService(self.node, self.queue), self.grpc)
            health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, self.grpc)
            reflection.enable_server_reflection(_SERVICE_NAMES, self.grpc)
            try:
                if config.tls is not None:
                    self.port = self.grpc.add_secure_port(config.listen, server_credentials(config.tls))
                else:
                    self.port = self.grpc.add_insecure_port(config.listen)
            except RuntimeError:
                self.port = 0
            if self.port == 0:
                raise errors.InvalidArgument(f"cannot listen on {config.listen} (listen): the address is in use "
                                             "or not one of this machine's")
        except BaseException:
            self.queue.close()
            self.node.stop(transfer_leadership=False)
            raise
        self.metrics_port = 0
        self._denials: queue.Queue[bytes] = queue.Queue(maxsize=_DENIAL_QUEUE_MAX)
        self._reporter: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> None:
        try:
            # The metrics address first: one that cannot be listened on starts nothing.
            if self.config.metrics_listen and self.metrics is not None:
                self.metrics_port = self.metrics.serve(self.config.metrics_listen)
        except BaseException:
            self.queue.close()
            self.node.stop(transfer_leadership=False)
            raise
        self.grpc.start()
        self.node.start()
        self.health.start()

    def stop(self, grace: float = 5.0) -> None:
        """Graceful (SIGTERM): hand leadership to another voter while everything still runs, stop
        taking new calls and let in-flight ones finish, then stop the node."""
        self._closed = True
        self.node.hand_over_leadership(grace)
        self.health.stop()  # NOT_SERVING from now on
        self.grpc.stop(grace)  # refuses new calls; peers' Raft streams would last the whole grace...
        self.in_flight.wait_idle(grace)  # ...so wait only for the client calls being served
        self.grpc.stop(0).wait(grace)
        self.queue.close()
        self.node.stop(transfer_leadership=False)
        if self.metrics is not None:
            self.metrics.close()

    # --- hooks of the edge (mqstore/security/edge.py) --------------------------------------------

    def authorize(self, actor: Actor, permission: str, namespace: str | None = None) -> None:
        """Raise PermissionDenied unless ``actor`` may use ``permission`` in ``namespace`` (None:
        in every namespace). Called before a call reaches the queue."""
        auth.check(actor, permission, namespace)

    def audit_denial(self, actor: Actor, rpc: str, reason: str) -> None:
        """A call was refused (UNAUTHENTICATED or PERMISSION_DENIED) before reaching the queue;
        nothing was changed. ``actor`` is ``unauthenticated`` (no roles) when the caller could not
        be authenticated. Written to the (replicated) audit log through consensus: the leader
        proposes it; a follower (which cannot propose) sends it to the leader in the background."""
        op, reason = rpc.lstrip("/").removeprefix("mqstore.v1."), reason[:4000]
        if self.node.is_leader:
            try:
                self.queue.record_denial(op, "", reason, actor)
            except errors.MQStoreError as exc:
                log.error("refused %s for %s, and auditing the refusal failed (%s): %s", rpc, actor.name, exc, reason)
            return
        # The leader stamps the entry and its context with its own times (append_reported_denials):
        # none of this node's are sent. Taking them would do harm here: Node.now_ms() raises the
        # node's stamp floor (kept on disk, the floor of its stamps once it leads) and the queue's
        # context starts its compliance clock, both from a clock no leader has corrected yet (an
        # hour ahead: the queue's time and retention moved an hour ahead for good once it led).
        ctx = Ctx(actor, self.node.node_id, self.node.config.site, 0, 0)
        entry = DenialEntry(0, op, "", reason, ctx).encode()
        try:
            self._denials.put_nowait(entry)
        except queue.Full:
            log.error("refused %s for %s: not audited, %d reports to the leader are already waiting",
                      rpc, actor.name, self._denials.maxsize)
            return
        with self._lock:
            if self._reporter is None or not self._reporter.is_alive():
                self._reporter = threading.Thread(target=self._report_denials, name="mqstore-denials", daemon=True)
                self._reporter.start()

    def _report_denials(self) -> None:
        """Send queued denials to the leader, as many as are waiting in one call (retrying while
        leadership settles); exits when idle."""
        while True:
            try:
                batch = [self._denials.get(timeout=5)]
            except queue.Empty:
                return
            while len(batch) < _DENIAL_BATCH_MAX:
                try:
                    batch.append(self._denials.get_nowait())
                except queue.Empty:
                    break
            deadline = time.monotonic() + _DENIAL_REPORT_S
            while True:
                try:
                    self._send_denials(batch)
                    break
                except (grpc.RpcError, errors.MQStoreError) as exc:
                    if time.monotonic() > deadline or self._closed:
                        log.error("%d refused call(s) could not be reported to the leader (not audited): %s",
                                  len(batch), exc)
                        break
                    time.sleep(0.2)

    def _send_denials(self, entries: list[bytes]) -> None:
        node = self.node
        if node.is_leader:  # became leader meanwhile: propose them here
            self.queue.append_reported_denials(entries, node.node_id)
            return
        leader = node.leader_id
        address = node._address_of(leader) if leader else None
        if not address:
            raise errors.Unavailable("no leader known")
        channel = node.transport.channel_to(address, leader)
        try:
            reports = [raft_pb2.DenialReport(cluster_id=node.cluster_id, entry=e, **{"from": node.node_id})
                       for e in entries]
            raft_pb2_grpc.RaftStub(channel).RecordDenials(iter(reports), timeout=10)
        finally:
            channel.close()

    def namespace_of_message(self, message_id: str) -> str | None:
        """The namespace of a message in this node's applied state (None: unknown here). Used to
        authorize calls that name only a message id, for actors limited to some namespaces."""
        from mqstore.ids import parse_id
        from mqstore.queue import machine

        try:
            mid = parse_id(message_id)
        except Exception:  # malformed: the caller is refused (fail closed)
            return None

        def lookup() -> str | None:
            with self.node.read_state() as kv:
                row = machine.get_message(kv, mid)
            return None if row is None else str(row.namespace)

        return self._looked_up(lookup)

    def namespace_of_lease(self, token: int) -> str | None:
        """The namespace of the message a lease token holds (None: unknown here)."""
        import struct

        from mqstore.queue import machine
        from mqstore.queue.model import LeaseRow

        def lookup() -> str | None:
            with self.node.read_state() as kv:
                raw = kv.get(b"leases", struct.pack(">Q", token))
                if raw is None:
                    return None
                row = machine.get_message(kv, LeaseRow.decode(raw).mid)
            return None if row is None else str(row.namespace)

        return self._looked_up(lookup)

    def _looked_up(self, lookup: Callable[[], str | None]) -> str | None:
        """``lookup()`` in the applied state; when it finds nothing on the leader, once more after
        a read barrier. The leader answers a write while its apply is still being synced, so the
        caller's next request may arrive before that state is readable without a barrier.

        On a node that does not lead (or stops leading before the barrier) it raises NotLeader,
        naming the leader: the calls that name a message or lease are the leader's to answer
        (a follower serves none of them itself), and a follower may not have applied the target
        yet. Whatever the follower holds, it says no more: neither "not here" (a lagging follower
        refused what the leader allows) nor "in another namespace" (beside NotLeader for the ids
        it lacks, that would tell a caller which ids exist)."""
        if not self.node.is_leader:
            raise self.node._not_leader()
        try:
            found = lookup()
            if found is None:
                self.node.read_barrier()
                found = lookup()
            return found
        except errors.NotLeader:
            raise
        except Exception:  # unknown, malformed, or no barrier possible: refused (fail closed)
            return None

    def enqueue_refusal(self) -> errors.MQStoreError | None:
        return self.health.enqueue_refusal()

    # --- metrics -----------------------------------------------------------------------------------

    def _leader_changed(self) -> None:
        if self.metrics is not None:
            self.metrics.leader_changes.inc()

    def _metrics_state(self) -> dict[str, Any]:
        st = self.node.status()
        is_leader = st["role"] == "leader"
        out: dict[str, Any] = {
            "term": st["term"],
            "is_leader": int(is_leader),
            "leader_id": st["leader_id"],
            "commit_index": st["commit_index"],
            "applied_index": st["applied_index"],
            "disk_free_bytes": self.health.disk.free_bytes,
            "disk_total_bytes": self.health.disk.total_bytes,
            "serving": int(self.health.serving),
            "client_calls_in_flight": self.edge.in_flight.total,
            "peer_messages_dropped": self.node.transport.dropped,
        }
        out["clock_offsets"] = {
            m["id"]: m["clock_offset_ms"] / 1000 for m in st["members"]
            if m["id"] != st["node_id"] and "clock_offset_ms" in m
        }
        out["clock_correction_seconds"] = st["clock_correction_ms"] / 1000
        if is_leader:
            out["replication_lag"] = {
                m["id"]: max(0, st["last_index"] - m["match_index"]) for m in st["members"] if m["id"] != st["node_id"]
            }
        try:
            out["disk_used_bytes"] = self.node.log.stats()["file_size_bytes"]
            stats = QueueBase.stats(self.queue)  # this node's applied state: no ReadIndex round
            out["queue"] = stats["namespaces"]
            out["oldest_age_seconds"] = stats["oldest_age_seconds"]
        except Exception:
            log.debug("metrics: queue stats unavailable", exc_info=True)
        return out


__all__ = ["AdminService", "NodeServer", "QueueService", "RaftService", "handled"]
