"""gRPC services of a storage node: Queue (clients), Admin (operators), Raft (peers).

Servicers are thin: convert the request, call the node's queue or runtime, convert the answer,
and map mqstore's errors to status codes with a message a person can act on. Every error also
carries trailing metadata ``mqstore-error`` (the exception's class name) so the client raises
the same exception type as the embedded API; ``NotLeader`` adds ``mqstore-leader`` (address) and
``mqstore-leader-id``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

import grpc

from mqstore import errors
from mqstore.api import Lease, Message, MessageSummary
from mqstore.codec import crc32c
from mqstore.config import NodeConfig
from mqstore.consensus.types import ConfChange, ConfChangeItem, ConfChangeType, InvalidConfig, ProposalDropped
from mqstore.node.cluster_queue import ClusterQueue
from mqstore.node.raftlog import entry_payload
from mqstore.node.replica import MemberInfo
from mqstore.node.runtime import Node, Operation
from mqstore.node.transport import CHANNEL_OPTIONS
from mqstore.node.wire import message_from_proto
from mqstore.proto import admin_pb2, admin_pb2_grpc, queue_pb2, queue_pb2_grpc, raft_pb2, raft_pb2_grpc

log = logging.getLogger(__name__)

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
    (errors.Corruption, grpc.StatusCode.DATA_LOSS),
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
    context.set_trailing_metadata(tuple(trailers))
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
        """Commits whatever has arrived (up to 4096 messages) while the previous commit ran."""
        pending: list[Any] = []
        lock = threading.Condition()
        done = False

        def reader() -> None:
            nonlocal done
            try:
                for request in request_iterator:
                    with lock:
                        pending.extend(request.messages)
                        lock.notify()
            except grpc.RpcError:
                pass  # the client went away or the call was aborted: nothing more to read
            finally:
                with lock:
                    done = True
                    lock.notify()

        threading.Thread(target=reader, daemon=True).start()
        with self.in_flight:
            while True:
                with lock:
                    while not pending and not done:
                        lock.wait()
                    batch, pending[:] = list(pending[:4096]), pending[4096:]
                    finished = done and not batch
                if finished:
                    return
                try:
                    ids = self.queue.enqueue_many([_message_dict(m) for m in batch])
                except (errors.MQStoreError, ProposalDropped) as exc:
                    _abort(context, exc)
                    return
                yield queue_pb2.EnqueueBatchResponse(message_ids=ids)

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
        return self._admin(self.queue.delete, request)

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
        )
        return queue_pb2.PolicyResponse(
            backoff_ms=list(policy.backoff_ms),
            lifetime_ms=policy.lifetime_ms,
            retention_ms=policy.retention_ms,
            dedup_window_ms=policy.dedup_window_ms,
            expired_retention_ms=policy.expired_retention_ms,
        )


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
            role=st["role"],
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
            if node_id in self.node.removed_ids():
                raise errors.InvalidArgument(
                    f"node id {node_id} was removed from this cluster; node ids are never reused: pick a new one"
                )
            if node_id in dict(self.node.raw.conf_state.sites):
                raise errors.InvalidArgument(f"node {node_id} is already a member")
            info = MemberInfo(node_id, request.site, request.address)
            self.node.submit(Operation(plan=lambda n: [(20, entry_payload(0, 0, 0, info.encode()))]))
            item = ConfChangeItem(ConfChangeType.ADD_LEARNER, node_id, request.site)
        elif op == admin_pb2.MembershipRequest.PROMOTE:
            site = dict(self.node.raw.conf_state.sites).get(node_id)
            if site is None:
                raise errors.NotFound(f"node {node_id} is not a member")
            item = ConfChangeItem(ConfChangeType.ADD_VOTER, node_id, site)
        elif op == admin_pb2.MembershipRequest.REMOVE:
            item = ConfChangeItem(ConfChangeType.REMOVE, node_id)
        else:
            raise errors.InvalidArgument("op must be ADD_LEARNER, PROMOTE or REMOVE")
        if not self.node.is_leader:
            raise self.node._not_leader()
        self.node.call(lambda: self.node.propose_conf_change(ConfChange((item,))))
        return admin_pb2.MembershipResponse(members=[admin_pb2.Member(**m) for m in self.node.status()["members"]])

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
        raise errors.MQStoreError("on-demand snapshots are not implemented yet")


class RaftService(raft_pb2_grpc.RaftServicer):  # type: ignore[misc]
    def __init__(self, node: Node) -> None:
        self.node = node

    def Send(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        for p in request_iterator:
            if p.cluster_id != self.node.cluster_id:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, f"message from cluster {p.cluster_id!r}, not ours")
            if p.to != self.node.node_id:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"message for node {p.to}, this is node {self.node.node_id}"
                )
            self.node.receive(message_from_proto(p))
        return raft_pb2.SendAck()

    def InstallSnapshot(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        """Receive a snapshot into ``snapshots/incoming-*``, checking every chunk's CRC32C, the
        offsets and the whole file's SHA-256, then hand it to the node (which installs it when
        its consensus core decides to)."""
        node = self.node
        target: Path | None = node.snapshot_dir / f"incoming-{uuid.uuid4().hex}.mdb"
        assert target is not None
        digest = hashlib.sha256()
        header = None
        offset = 0
        path = target
        try:
            with path.open("wb") as f:
                for chunk in request_iterator:
                    if chunk.cluster_id != node.cluster_id or chunk.to != node.node_id:
                        return raft_pb2.SnapshotAck(ok=False, error="snapshot for another cluster or node")
                    if header is None:
                        if not chunk.meta:
                            return raft_pb2.SnapshotAck(ok=False, error="first chunk carries no metadata")
                        header = raft_pb2.RaftMessage.FromString(chunk.meta)
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
                        message = message_from_proto(header)
                        if message.snapshot is None:
                            return raft_pb2.SnapshotAck(ok=False, error="snapshot metadata missing")
                        node.receive_snapshot(message, path)
                        target = None  # the node owns it now
                        return raft_pb2.SnapshotAck(ok=True)
            return raft_pb2.SnapshotAck(ok=False, error="stream ended before the last chunk")
        finally:
            if target is not None:
                target.unlink(missing_ok=True)


class NodeServer:
    """A node plus its gRPC server, started and stopped together."""

    def __init__(self, config: NodeConfig, *, workers: int = 128, **node_options: Any) -> None:
        self.config = config
        self.node = Node(config, **node_options)
        self.queue = ClusterQueue(self.node)
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=CHANNEL_OPTIONS)
        self.in_flight = InFlight()
        queue_pb2_grpc.add_QueueServicer_to_server(QueueService(self.queue, self.in_flight), self.grpc)
        admin_pb2_grpc.add_AdminServicer_to_server(AdminService(self.node, self.queue, self.in_flight), self.grpc)
        raft_pb2_grpc.add_RaftServicer_to_server(RaftService(self.node), self.grpc)
        self.port = self.grpc.add_insecure_port(config.listen)
        if self.port == 0:
            self.node.stop(transfer_leadership=False)
            raise errors.InvalidArgument(f"cannot listen on {config.listen}")

    def start(self) -> None:
        self.grpc.start()
        self.node.start()

    def stop(self, grace: float = 5.0) -> None:
        """Graceful (SIGTERM): hand leadership to another voter while everything still runs, stop
        taking new calls and let in-flight ones finish, then stop the node."""
        self.node.hand_over_leadership(grace)
        self.grpc.stop(grace)  # refuses new calls; peers' Raft streams would last the whole grace...
        self.in_flight.wait_idle(grace)  # ...so wait only for the client calls being served
        self.grpc.stop(0).wait(grace)
        self.queue.close()
        self.node.stop(transfer_leadership=False)


__all__ = ["AdminService", "NodeServer", "QueueService", "RaftService", "handled"]
