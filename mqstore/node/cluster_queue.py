"""The mail-queue API of a cluster node: the embedded API's names and meanings, replicated.

Writes are planned on the leader against its applied state and proposed as log entries; the
answer comes from applying them (the same ``mqstore.queue.machine`` functions the embedded store
uses), after a quorum spanning ``min_sites`` sites holds them. Reads go through ReadIndex, so they
are linearizable. On a follower every call raises :class:`~mqstore.errors.NotLeader` naming the
leader; the client follows it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mqstore.api import QueueBase
from mqstore.codec import RecordType
from mqstore.errors import InvalidArgument, MQStoreError, NotFound, NotLeader, StaleLease, Unavailable
from mqstore.ids import format_id
from mqstore.node.raftlog import entry_payload
from mqstore.node.runtime import Node, Operation, Plan
from mqstore.queue import machine
from mqstore.queue.model import (
    AdminEntry,
    LeaseEntry,
    MaintenanceEntry,
    Policy,
    PolicyEntry,
    SettleEntry,
)

log = logging.getLogger(__name__)

_MAINTENANCE_ITEMS_MAX = 1_000
_MAINTENANCE_PERIOD_S = 1.0


def _plain(rtype: int, payload: bytes) -> tuple[int, bytes]:
    return rtype, entry_payload(0, 0, 0, payload)


class ClusterQueue(QueueBase):
    """The queue on one node. Thread safe; every call may raise NotLeader or Unavailable."""

    def __init__(self, node: Node, maintenance: bool = True) -> None:
        super().__init__(node.log, node.clock)
        self.node = node
        node.log.key_creator = self._create_key
        self._last_key_id = 0
        self._closed = threading.Event()
        self._maintainer: threading.Thread | None = None
        if maintenance:
            self._maintainer = threading.Thread(target=self._maintain_loop, name="mqstore-maintenance", daemon=True)
            self._maintainer.start()

    def _now_ms(self) -> int:
        return max(round(self._clock() * 1000), self.node.stamp_ms)

    def close(self) -> None:
        self._closed.set()
        if self._maintainer is not None:
            self._maintainer.join(5)

    # --- keys --------------------------------------------------------------------------------------

    def _key_plan(self, node: Node, namespace: str) -> Plan:
        # Plans run one at a time in the raft thread: allocate ids past every key planned so far,
        # applied or not, so two keys planned close together never share an id.
        key_id = max(node.log.keyring.max_key_id(), self._last_key_id) + 1
        self._last_key_id = key_id
        event = node.log.keyring.new_key_event(namespace, node.now_ms(), key_id)
        return [_plain(RecordType.KEY, event.encode())]

    def _create_key(self, namespace: str) -> object:
        def plan(node: Node) -> Plan:
            if node.log.keyring.current_key_id(namespace) is not None:
                return []
            return self._key_plan(node, namespace)

        return self.node.submit(Operation(plan=plan))

    def rotate_key(self, namespace: str) -> int:
        def plan(node: Node) -> Plan:
            return self._key_plan(node, namespace)

        def finish(results: list[tuple[int, object]]) -> object:
            return results[0][1]

        key_id = self.node.submit(Operation(plan=plan, finish=finish))
        assert isinstance(key_id, int)
        return key_id

    # --- enqueue -----------------------------------------------------------------------------------

    def enqueue_many(self, messages: Sequence[Mapping[str, Any]]) -> list[str]:
        """Store messages; they are acknowledged once a quorum spanning min_sites sites holds them
        durably and the leader applied them. A retry with the same idempotency keys is safe."""
        if not self.node.is_leader:
            raise self.node._not_leader()
        new = self._new_messages(messages)
        staged = self.log.stage_messages(new)
        sealed = self.log.sealer.seal_many(
            [(int(RecordType.ENQUEUE), st.envelope.namespace, st.envelope.message_id, st.plaintext) for st in staged]
        )

        def plan(node: Node) -> Plan:
            # Duplicates are proposed too: applying an ENQUEUE resolves a seen idempotency key to
            # the earlier message id (in log order, so concurrent retries store one message).
            return [(RecordType.ENQUEUE, entry_payload(sl.flags, sl.key_id, sl.dict_id, sl.payload)) for sl in sealed]

        def finish(results: list[tuple[int, object]]) -> list[str]:
            return [format_id(mid) for _, mid in results]  # type: ignore[arg-type]

        sizes = [len(n.data) for n in new]
        hints: list[object] = [(st.envelope, size) for st, size in zip(staged, sizes, strict=True)]
        ids = self.node.submit(Operation(plan=plan, finish=finish, hints=hints))
        for st in staged:
            self._remember_recipients(st.envelope.message_id, st.envelope.recipients)
        return ids  # type: ignore[return-value]

    # --- leasing and settling --------------------------------------------------------------------

    def lease(
        self,
        worker: str,
        max_messages: int = 100,
        lease_seconds: float = 300,
        namespace: str | None = None,
        domain: str | None = None,
    ) -> list[Any]:
        lease_ms, domain = self._lease_args(worker, max_messages, lease_seconds, namespace, domain)
        op = Operation(plan=lambda node: [])

        def plan(node: Node) -> Plan:
            now = node.now_ms()
            out: Plan = []
            with node.read_state() as kv:
                expire = machine.plan_expire(kv, now, _MAINTENANCE_ITEMS_MAX)
                if expire:
                    out.append(_plain(RecordType.EXPIRE, MaintenanceEntry(now, tuple(expire)).encode()))
                for p in machine.plan_lease(kv, now, max_messages, namespace, domain, exclude=node._reserved):
                    entry = LeaseEntry(now, now + lease_ms, p.mid, p.ordinals, worker)
                    out.append(_plain(RecordType.LEASE, entry.encode()))
                    op.reserved.add(p.mid)
                    deadlines[p.mid] = entry.deadline_ms
            return out

        deadlines: dict[bytes, int] = {}

        def finish(results: list[tuple[int, object]]) -> list[tuple[int, bytes, machine.Grant, int]]:
            grants = []
            for index, result in results:
                if isinstance(result, machine.Grant) and result.ordinals:
                    mid = self._lease_mid(index)
                    grants.append((index, mid, result, deadlines[mid]))
            return grants

        op.plan = plan
        op.finish = finish
        grants = self.node.submit(op)
        return self._build_leases(grants)  # type: ignore[arg-type]

    def _lease_mid(self, token: int) -> bytes:
        raw = self.log.read(token).payload
        return LeaseEntry.decode(raw).mid

    def _settle(self, rtype: RecordType, token: int, recipients: Iterable[str] | None, reason: str | None) -> None:
        self._check_reason(reason)
        wanted = None if recipients is None else list(recipients) if not isinstance(recipients, str) else recipients
        if isinstance(wanted, str):
            raise InvalidArgument("recipients must be a list of addresses, not a string")

        def plan(node: Node) -> Plan:
            with node.read_state() as kv:
                row, lease, ords = self._ordinals(kv, token, wanted)
                nxt: tuple[int, ...] = ()
                now = node.now_ms()
                if rtype == RecordType.DEFER:
                    policy = machine.get_policy(kv, row.namespace)
                    rcpts = dict(machine.recipients_of(kv, lease.mid))
                    nxt = tuple(now + machine.backoff_ms(policy, rcpts[o].attempts + 1, lease.mid, o) for o in ords)
            sealed = self._seal_reason(row.namespace, lease.mid, reason or "")
            return [_plain(rtype, SettleEntry(now, token, ords, nxt, sealed).encode())]

        def finish(results: list[tuple[int, object]]) -> None:
            if results and results[0][1] is not True:
                raise StaleLease(f"lease {token} was settled or expired meanwhile; nothing changed")

        self.node.submit(Operation(plan=plan, finish=finish))

    def ack_many(self, tokens: Iterable[int]) -> None:
        """Settle every recipient of each lease as delivered. Each lease is checked when planned
        and again when applied: one that expired in between is not settled (StaleLease)."""
        tokens = list(tokens)
        if not tokens:
            return

        def plan(node: Node) -> Plan:
            now = node.now_ms()
            out: Plan = []
            with node.read_state() as kv:
                for token in tokens:
                    _, ords = machine.check_settle(kv, token, None)
                    out.append(_plain(RecordType.ACK, SettleEntry(now, token, ords).encode()))
            return out

        def finish(results: list[tuple[int, object]]) -> None:
            stale = [t for t, (_, r) in zip(tokens, results, strict=True) if r is not True]
            if stale:
                raise StaleLease(f"lease(s) {stale} were settled or expired before they were applied")

        self.node.submit(Operation(plan=plan, finish=finish))

    # --- administration --------------------------------------------------------------------------

    def _admin(self, rtype: RecordType, message_id: str) -> None:
        mid = self._mid(message_id)

        def plan(node: Node) -> Plan:
            with node.read_state() as kv:
                if kv.get(b"messages", mid) is None:
                    raise NotFound(f"no message {format_id(mid)}")
            return [_plain(rtype, AdminEntry(node.now_ms(), mid).encode())]

        def finish(results: list[tuple[int, object]]) -> None:
            if results and results[0][1] is not True:
                raise NotFound(f"no message {format_id(mid)}")

        self.node.submit(Operation(plan=plan, finish=finish))

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
        self.node.read_barrier()
        self._policies.pop(namespace, None)
        policy = self._new_policy(namespace, backoff, lifetime, retention, dedup_window, expired_retention)

        def plan(node: Node) -> Plan:
            return [_plain(RecordType.POLICY, PolicyEntry(node.now_ms(), namespace, policy).encode())]

        self.node.submit(Operation(plan=plan))
        self._policies.pop(namespace, None)
        return policy

    # --- maintenance -----------------------------------------------------------------------------

    def maintain(self) -> dict[str, int]:
        """On the leader: expire what is due and compact finished messages (replicated entries)."""

        def plan(node: Node) -> Plan:
            now = node.now_ms()
            out: Plan = []
            with node.read_state() as kv:
                expire = machine.plan_expire(kv, now, _MAINTENANCE_ITEMS_MAX)
                compact = machine.plan_compact(kv, now, _MAINTENANCE_ITEMS_MAX)
            if expire:
                out.append(_plain(RecordType.EXPIRE, MaintenanceEntry(now, tuple(expire)).encode()))
            if compact:
                out.append(_plain(RecordType.COMPACT, MaintenanceEntry(now, tuple(compact)).encode()))
            return out

        def finish(results: list[tuple[int, object]]) -> dict[str, int]:
            counts = [int(r) for _, r in results]  # type: ignore[call-overload]
            return {"entries": len(results), "items": sum(counts)}

        return self.node.submit(Operation(plan=plan, finish=finish))  # type: ignore[return-value]

    def _maintain_loop(self) -> None:
        while not self._closed.wait(_MAINTENANCE_PERIOD_S):
            if not self.node.is_leader:
                continue
            try:
                with self.node.read_state() as kv:
                    due = machine.next_timer_ms(kv)
                if due is not None and due <= self._now_ms():
                    self.maintain()
            except (NotLeader, Unavailable):
                continue
            except MQStoreError:
                log.exception("maintenance failed; retrying")

    # --- reads: linearizable through ReadIndex ---------------------------------------------------

    def get(self, message_id: str) -> Any:
        self.node.read_barrier()
        return super().get(message_id)

    def list(self, *args: Any, **kwargs: Any) -> Any:
        self.node.read_barrier()
        return super().list(*args, **kwargs)

    def qshape(self, namespace: str | None = None) -> Any:
        self.node.read_barrier()
        return super().qshape(namespace)

    def stats(self) -> dict[str, Any]:
        self.node.read_barrier()
        return super().stats()


__all__ = ["ClusterQueue"]
