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
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from mqstore import limits, validate
from mqstore.actor import Actor
from mqstore.api import _LEASE_EXPIRE_RECORDS_MAX, _MAINTENANCE_ITEMS_MAX, QueueBase, token_list
from mqstore.codec import RecordType
from mqstore.compliance.rules import SYSTEM_ACTOR, Ctx
from mqstore.crypto.keyring import SYSTEM_NAMESPACE
from mqstore.errors import InvalidArgument, MQStoreError, NotLeader, StaleLease, Unavailable
from mqstore.ids import format_id
from mqstore.node.raftlog import entry_payload
from mqstore.node.runtime import Node, Operation, Plan
from mqstore.node.transport import GRPC_MESSAGE_BYTES_MAX
from mqstore.queue import machine
from mqstore.queue.kv import KV, LmdbKV
from mqstore.queue.model import (
    EXPIRE_LEASE,
    DenialEntry,
    LeaseEntry,
    MaintenanceEntry,
    SettleEntry,
)
from mqstore.security.auth import current_actor
from mqstore.store.log import key_record_payload

log = logging.getLogger(__name__)

_MAINTENANCE_PERIOD_S = 1.0

#: The most one lease() plans to return, in bytes of its answer (bodies plus each lease's envelope,
#: counted by machine.lease_answer_bytes): under gRPC's message limit with a margin, so a node's
#: answer is always sent. A lease committed but never sent would hold its messages for nobody
#: until it expired, and the next call would do the same. One message is always planned, and the
#: largest allowed fits.
LEASE_ANSWER_BYTES_MAX = GRPC_MESSAGE_BYTES_MAX - 4 * 1024 * 1024
assert machine.lease_answer_bytes(limits.MESSAGE_BYTES_MAX, limits.RECIPIENTS_MAX) <= LEASE_ANSWER_BYTES_MAX


def _plain(rtype: int, payload: bytes) -> tuple[int, bytes]:
    return rtype, entry_payload(0, 0, 0, payload)


class ClusterQueue(QueueBase):
    """The queue on one node. Thread safe; every call may raise NotLeader or Unavailable."""

    def __init__(self, node: Node, maintenance: bool = True, audit_signer: Any = None) -> None:
        super().__init__(node.log, node.clock, node_id=node.node_id, site=node.config.site, audit_signer=audit_signer)
        self.node = node
        node.applier.counters = self._counters
        node.applier.on_applied = self._after_apply
        node.log.key_creator = self._create_key
        node.on_state_changed = self._state_changed
        node.on_snapshot_adopted = self.audit.log.adopt_checkpoints
        self._last_key_id = 0
        #: Told how many messages each enqueue stored anew (not those an idempotency key resolved
        #: to an earlier message): the node's ``mqstore_enqueued_messages_total``.
        self.on_enqueued: Callable[[int], None] | None = None
        self._closed = threading.Event()
        self._maintainer: threading.Thread | None = None
        if maintenance:
            self._maintainer = threading.Thread(target=self._maintain_loop, name="mqstore-maintenance", daemon=True)
            self._maintainer.start()

    def _actor(self, actor: Actor | None) -> Actor | None:  # type: ignore[override]
        """The given actor, else the one the node's edge authenticated for the call being served."""
        actor = QueueBase._actor(actor)
        return actor if actor is not None else current_actor.get()

    def _now_ms(self) -> int:
        return max(self.node.clocks.now_ms(), self.node.stamp_ms)

    def _compliance_start_ms(self) -> int:
        return self.node.clocks.now_ms()  # this node's clock corrected to the voters' (node/clocks.py)

    def _state_changed(self, replaced: bool) -> None:
        """The raft thread applied a policy change (proposed by whichever node led then), or a
        snapshot replaced the whole state (``replaced``): cached policies are stale. A snapshot
        also brings the cluster's compliance time, which this node's clock never falls behind."""
        self._forget_policies()
        if replaced:
            with self.log.env.read() as txn:
                self.compliance_clock.observe(machine.compliance_clock_ms(LmdbKV(txn, self.log.env.dbs)))

    def close(self) -> None:
        self._closed.set()
        if self._maintainer is not None:
            self._maintainer.join(5)

    # --- keys --------------------------------------------------------------------------------------

    def _key_plan(self, node: Node, namespace: str, ctx: Ctx | None = None) -> Plan:
        # Plans run one at a time in the raft thread: allocate ids past every key planned so far,
        # applied or not, so two keys planned close together never share an id — and past every
        # key in the log not applied yet (a previous leader's, which this leader will commit).
        key_id = max(node.log.keyring.max_key_id(), self._last_key_id, node.unapplied_key_id_max()) + 1
        self._last_key_id = key_id
        event = node.log.keyring.new_key_event(namespace, node.now_ms(), key_id)
        return [_plain(RecordType.KEY, key_record_payload(event, ctx.encode() if ctx is not None else b""))]

    def _create_key(self, namespace: str) -> object:
        def plan(node: Node) -> Plan:
            if node.log.keyring.current_key_id(namespace) is not None:
                return []
            return self._key_plan(node, namespace)

        results = self.node.submit(Operation(plan=plan))
        for _, result in results:  # type: ignore[attr-defined]
            self._raise_denied(result)
        return results

    def rotate_key(self, namespace: str, *, actor: Actor | None = None) -> int:
        actor = self._actor(actor)
        self._check_rotate(namespace, actor)

        def plan(node: Node) -> Plan:
            return self._key_plan(node, namespace, self._ctx(actor))

        def finish(results: list[tuple[int, object]]) -> object:
            return results[0][1]

        key_id = self.node.submit(Operation(plan=plan, finish=finish))
        self._raise_denied(key_id)
        assert isinstance(key_id, int)
        return key_id

    def shred_key(self, key_id: int, *, actor: Actor | None = None) -> int:
        actor = self._actor(actor)
        self._sync()
        self._check_shred(key_id)

        def plan(node: Node) -> Plan:
            event = node.log.keyring.shred_event(key_id, node.now_ms())
            return [_plain(RecordType.KEY, key_record_payload(event, self._ctx(actor).encode()))]

        def finish(results: list[tuple[int, object]]) -> object:
            return results[0][1]

        result = self.node.submit(Operation(plan=plan, finish=finish))
        self._raise_denied(result)
        assert isinstance(result, int)
        return result

    # --- denials reported by followers ------------------------------------------------------------

    def append_reported_denials(self, raws: Sequence[bytes], reporter: int) -> None:
        """Leader: append denials a follower's edge reported (encoded DenialEntries carrying the
        follower's request context), in one operation. Only who was refused, on which node and
        site, is taken from the report: the entry's time stamp and its request context's wall and
        compliance times are this leader's own, so a report can add an audit record and nothing
        else (a follower's clock, or a forged report, never moves the compliance clock). Raises
        InvalidArgument if one is not a denial entry or names another node than ``reporter`` (none
        is appended then), NotLeader when this node does not lead. The site recorded is the one
        the member directory gives the reporter."""
        reported = []
        for raw in raws:
            try:
                entry = DenialEntry.decode(raw)
            except MQStoreError as exc:
                raise InvalidArgument(f"not a denial entry: {exc}") from None
            if entry.op in (machine.CHECKPOINT_OP, machine.TICK_OP):
                raise InvalidArgument("not a denial entry: a checkpoint request")
            if entry.ctx.node_id != reporter:
                raise InvalidArgument(f"node {reporter} reported a denial by node {entry.ctx.node_id}: a node "
                                      "reports only its own")
            reported.append(entry)
        if not self.node.is_leader:
            raise self.node._not_leader()
        if not reported:
            return

        def plan(node: Node) -> Plan:
            now = node.now_ms()
            out: Plan = []
            for r in reported:
                own = self._ctx(r.ctx.actor)
                member = node.members.get(reporter)
                site = member.site if member is not None else r.ctx.site
                ctx = Ctx(r.ctx.actor, r.ctx.node_id, site, own.wall_ms, own.compliance_ms)
                out.append(_plain(RecordType.AUDIT, DenialEntry(now, r.op, r.target, r.reason, ctx).encode()))
            return out

        self.node.submit(Operation(plan=plan))

    # --- the generic write path -----------------------------------------------------------------

    def _sync(self) -> None:
        self.node.read_barrier()

    def _propose(self, rtype: RecordType, make: Callable[[int, Ctx], object], actor: Actor | None,
                 bypass: bool = False, reason: str = "", precheck: Callable[[KV], None] | None = None) -> object:
        def plan(node: Node) -> Plan:
            if precheck is not None:
                with node.read_state() as kv:
                    precheck(kv)
            entry = make(node.now_ms(), self._ctx(actor, bypass, reason))
            return [_plain(rtype, entry.encode())]  # type: ignore[attr-defined]

        def finish(results: list[tuple[int, object]]) -> object:
            return results[0][1] if results else None

        result = self.node.submit(Operation(plan=plan, finish=finish))
        if rtype in (RecordType.POLICY, RecordType.DROP):
            self._forget_policies()
        return result

    # --- enqueue -----------------------------------------------------------------------------------

    def enqueue_many(self, messages: Sequence[Mapping[str, Any]], actor: Actor | None = None) -> list[str]:
        """Store messages; they are acknowledged once a quorum spanning min_sites sites holds them
        durably and the leader applied them. A retry with the same idempotency keys is safe."""
        if not self.node.is_leader:
            raise self.node._not_leader()
        actor = self._check_enqueue(messages, actor)
        new = self._new_messages(messages)
        self.log.ensure_keys([SYSTEM_NAMESPACE])  # the audit's address-HMAC key derives from it
        ctx = self._ctx(actor)
        staged = self.log.stage_messages(new, ctx.encode())
        sealed = self.log.sealer.seal_many(
            [(int(RecordType.ENQUEUE), st.envelope.namespace, st.envelope.message_id, st.plaintext, st.flags)
             for st in staged]
        )

        def plan(node: Node) -> Plan:
            # Duplicates are proposed too: applying an ENQUEUE resolves a seen idempotency key to
            # the earlier message id (in log order, so concurrent retries store one message).
            return [(RecordType.ENQUEUE, entry_payload(sl.flags, sl.key_id, sl.dict_id, sl.payload)) for sl in sealed]

        def finish(results: list[tuple[int, object]]) -> list[str]:
            if self.on_enqueued is not None:
                # A message whose idempotency key resolved to an earlier one stored nothing new.
                self.on_enqueued(sum(1 for (_, mid), st in zip(results, staged, strict=True)
                                     if mid == st.envelope.message_id))
            for _, result in results:
                self._raise_denied(result)  # sealed under a key shredded meanwhile: not stored
            return [format_id(mid) for _, mid in results]  # type: ignore[arg-type]

        sizes = [validate.nbytes(n.data) for n in new]
        hints: list[object] = [(st.envelope, size, ctx) for st, size in zip(staged, sizes, strict=True)]
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
        actor: Actor | None = None,
    ) -> list[Any]:
        lease_ms, domain = self._lease_args(worker, max_messages, lease_seconds, namespace, domain)
        actor = self._actor(actor)
        self._require(actor, "lease", namespace, "lease", namespace or "*")
        grants, expired = self._lease_round(worker, max_messages, lease_ms, namespace, domain, actor,
                                            expire_first=True)
        if expired:
            # Leases planned against the state before this call's expiries applied would leave
            # out the recipients those make due, or lease a message twice in one call (one lease
            # for its recipients due before, one for those just expired): the first round wrote
            # only the expiries, this one leases against the state they left, as the embedded
            # store does in one transaction.
            grants, _ = self._lease_round(worker, max_messages, lease_ms, namespace, domain, actor)
        return self._build_leases(grants, actor)

    def _lease_round(
        self, worker: str, max_messages: int, lease_ms: int, namespace: str | None, domain: str | None,
        actor: Actor | None, expire_first: bool = False,
    ) -> tuple[list[tuple[int, bytes, machine.Grant, int]], int]:
        """One LEASE operation (after the expiries that are due): its grants, and how many lapsed
        leases it expired. ``expire_first``: when there are lapsed leases to expire, write only
        the expiries (no grants)."""
        op = Operation(plan=lambda node: [])
        deadlines: dict[bytes, int] = {}
        expired = 0

        def plan(node: Node) -> Plan:
            nonlocal expired
            now = node.now_ms()
            ctx = self._ctx(actor)
            out: Plan = []
            with node.read_state() as kv:
                # A backlog of expiries (after downtime) is written first, in records of at most
                # a page each and up to as many as the embedded store's lease writes.
                expire = machine.plan_expire(kv, now, _MAINTENANCE_ITEMS_MAX * _LEASE_EXPIRE_RECORDS_MAX)
                expired = sum(1 for kind, _ in expire if kind == EXPIRE_LEASE)
                system = self._ctx(SYSTEM_ACTOR)
                for at in range(0, len(expire), _MAINTENANCE_ITEMS_MAX):
                    page = tuple(expire[at : at + _MAINTENANCE_ITEMS_MAX])
                    out.append(_plain(RecordType.EXPIRE, MaintenanceEntry(now, page, system).encode()))
                if expire_first and expired:
                    return out
                for p in machine.plan_lease(kv, now, max_messages, namespace, domain, exclude=node._reserved,
                                            bytes_max=LEASE_ANSWER_BYTES_MAX):
                    entry = LeaseEntry(now, now + lease_ms, p.mid, p.ordinals, worker, ctx)
                    out.append(_plain(RecordType.LEASE, entry.encode()))
                    op.reserved.add(p.mid)
                    deadlines[p.mid] = entry.deadline_ms
            return out

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
        return grants, expired  # type: ignore[return-value]

    def _lease_mid(self, token: int) -> bytes:
        raw = self.log.read(token).payload
        return LeaseEntry.decode(raw).mid

    def _settle(self, rtype: RecordType, token: int, recipients: Iterable[str] | None, reason: str | None,
                actor: Actor | None = None) -> None:
        self._check_reason(reason)
        actor = self._actor(actor)
        self._require_settle(actor, [token], RecordType(rtype).name.lower())
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
            return [_plain(rtype, SettleEntry(now, token, ords, nxt, sealed, self._ctx(actor)).encode())]

        def finish(results: list[tuple[int, object]]) -> None:
            if results and results[0][1] is not True:
                raise StaleLease(f"lease {token} was settled or expired meanwhile; nothing changed")

        self.node.submit(Operation(plan=plan, finish=finish, settling={token}))

    def ack_many(self, tokens: Iterable[int], actor: Actor | None = None) -> None:
        """Settle every recipient of each lease as delivered. Each lease is checked when planned
        and again when applied: one that expired in between is not settled (StaleLease)."""
        tokens = token_list(tokens)
        if not tokens:
            return
        actor = self._actor(actor)
        self._require_settle(actor, tokens, "ack")

        def plan(node: Node) -> Plan:
            # All or none: a lease another call is settling right now (planned, not applied) is
            # refused here, before anything is proposed, as one already settled would be.
            busy = [t for t in tokens if t in node.settling]
            if busy:
                raise StaleLease(f"lease(s) {busy} are being settled by another call; nothing changed")
            now = node.now_ms()
            ctx = self._ctx(actor)
            out: Plan = []
            with node.read_state() as kv:
                for token in tokens:
                    _, ords = machine.check_settle(kv, token, None)
                    out.append(_plain(RecordType.ACK, SettleEntry(now, token, ords, ctx=ctx).encode()))
            return out

        def finish(results: list[tuple[int, object]]) -> None:
            stale = [t for t, (_, r) in zip(tokens, results, strict=True) if r is not True]
            if stale:
                raise StaleLease(f"lease(s) {stale} were settled or expired before they were applied")

        self.node.submit(Operation(plan=plan, finish=finish, settling=set(tokens)))

    # --- maintenance -----------------------------------------------------------------------------

    def maintain(self) -> dict[str, int]:
        """On the leader: expire what is due and compact finished messages (replicated entries)."""

        def plan(node: Node) -> Plan:
            now = node.now_ms()
            ctx = self._ctx(SYSTEM_ACTOR)
            out: Plan = []
            with node.read_state() as kv:
                expire = machine.plan_expire(kv, now, _MAINTENANCE_ITEMS_MAX)
                compact = machine.plan_compact(kv, now, _MAINTENANCE_ITEMS_MAX)
                tick = self._audit_tick_due(kv, ctx.compliance_ms, now)
            if expire:
                out.append(_plain(RecordType.EXPIRE, MaintenanceEntry(now, tuple(expire), ctx).encode()))
            if compact:
                out.append(_plain(RecordType.COMPACT, MaintenanceEntry(now, tuple(compact), ctx).encode()))
            if tick:  # last, so it covers what the entries above audit too
                out.append(_plain(RecordType.AUDIT, DenialEntry(now, machine.TICK_OP, "", "", ctx).encode()))
            return out

        def finish(results: list[tuple[int, object]]) -> dict[str, int]:
            counts = [r if isinstance(r, int) else 0 for _, r in results]
            return {"entries": len(results), "items": sum(counts)}

        return self.node.submit(Operation(plan=plan, finish=finish))  # type: ignore[return-value]

    def _maintain_loop(self) -> None:
        while not self._closed.wait(_MAINTENANCE_PERIOD_S):
            if not self.node.is_leader:
                continue
            try:
                with self.node.read_state() as kv:
                    due = machine.next_timer_ms(kv)
                    # The queue's time read, not a stamp taken (Node.now_ms() would raise the floor)
                    tick = self._audit_tick_due(kv, self.compliance_clock.now_ms(), self._now_ms())
                if tick or (due is not None and due <= self._now_ms()):
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

    def audit_verify(self, *args: Any, **kwargs: Any) -> Any:
        self.node.read_barrier()
        return super().audit_verify(*args, **kwargs)


__all__ = ["ClusterQueue"]
