"""What the clients (mqstore.client, sync and asyncio) resend after a failed attempt, against a
real in-process 3-node cluster. A client interceptor injects the failures: an answer lost after
the node applied the write (the connection broke, the attempt timed out, the node answered
"Unavailable: it may still commit"), or a refusal before the request reached the node.

Writes that are not idempotent (delete, bounce_message, remove_legal_hold, drop_namespace,
compact_messages, rotate_key, shred_key) are applied once and raise Unavailable saying they may or
may not have been applied, rather than being resent (which reported NotFound, a count of 0, or
rotated a key twice); after a refusal that guarantees nothing was done they are resent. Reads and
idempotent writes are resent as before. audit_records/audit_query refuse a limit outside
1..AUDIT_READ_RECORDS_MAX as the embedded API does, before anything is sent."""

from __future__ import annotations

import logging
import threading
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

import mqstore
from mqstore import InvalidArgument, NotFound, StaleLease
from mqstore.api import BounceResult
from mqstore.client import CLIENT_CHANNEL_OPTIONS, Client
from mqstore.config import parse
from mqstore.crypto import create_key_file
from mqstore.errors import Unavailable
from mqstore.node.runtime import bootstrap
from mqstore.server import NodeServer
from mqstore.testing.cluster import free_port
from mqstore.testing.facade import AsyncFacade

SITES = {1: "a", 2: "b", 3: "c"}
KINDS = ["sync", "async"]
UNKNOWN = r"may or may not have been applied"


class Cluster:
    """Three NodeServers in this process, one per site (as in tests/test_client.py)."""

    def __init__(self, root: Path) -> None:
        self.addresses = {i: f"127.0.0.1:{free_port()}" for i in SITES}
        key = create_key_file(root / "kek.key")
        self.servers: dict[int, NodeServer] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in SITES:
                cfg = parse({
                    "node_id": i, "site": SITES[i], "listen": self.addresses[i], "data_dir": str(root / f"n{i}"),
                    "key_file": str(key), "insecure": True,
                    "peers": [{"id": j, "site": SITES[j], "address": self.addresses[j]} for j in SITES if j != i],
                })
                bootstrap(cfg, "test")
                self.servers[i] = NodeServer(cfg)
        for s in self.servers.values():
            s.start()
        self.leader()

    def leader(self, timeout: float = 15.0) -> NodeServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for s in self.servers.values():
                if s.node.is_leader:
                    return s
            time.sleep(0.02)
        raise AssertionError("no leader elected")

    def leader_address(self) -> str:
        return self.addresses[self.leader().node.node_id]

    def follower_address(self) -> str:
        leader = self.leader().node.node_id
        return next(a for i, a in self.addresses.items() if i != leader)

    def close(self) -> None:
        for s in self.servers.values():
            s.grpc.stop(0).wait(5)
            s.queue.close()
            s.node.stop(transfer_leadership=False)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    logging.getLogger("mqstore").setLevel(logging.WARNING)
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield c
    finally:
        c.close()


# --- injected failures ------------------------------------------------------------------------------

#: Failures after the node got the request and applied it: the answer is replaced by these.
AFTER = {
    "connection reset": (grpc.StatusCode.UNAVAILABLE, (), "Socket closed"),
    "attempt timed out": (grpc.StatusCode.DEADLINE_EXCEEDED, (), "Deadline Exceeded"),
    "may still commit": (grpc.StatusCode.UNAVAILABLE, (("mqstore-error", "Unavailable"),),
                         "no quorum confirmed the write within 10 s (leader 1); it may still commit: retry with "
                         "the same idempotency key"),
}
NOT_APPLIED = (("mqstore-error", "Unavailable"), ("mqstore-not-applied", "1"))
#: Refusals before the request reaches the servicer (nothing done), as nodes and gRPC give them.
BEFORE = {
    "connection refused": (grpc.StatusCode.UNAVAILABLE, (),
                           "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:7001: Failed to "
                           "connect to remote host: Connection refused"),
    # A node's refusals before the write reached the consensus log, marked as such.
    "no leader": (grpc.StatusCode.UNAVAILABLE, NOT_APPLIED,
                  "node 2 knows no leader (an election is under way): retry shortly"),
    "shutting down": (grpc.StatusCode.UNAVAILABLE, NOT_APPLIED, "node 1 is shutting down"),
    "proposal refused": (grpc.StatusCode.UNAVAILABLE, NOT_APPLIED,
                         "the leader refused the write for now: leadership is being transferred to node 2"),
}


class Faults:
    """Which failure the next call of each method (its short name: "Delete") meets, and how many
    times each method was sent (counted whether or not it reached the node)."""

    def __init__(self) -> None:
        self.next: dict[str, str] = {}
        self.sent: Counter[str] = Counter()
        self.lock = threading.Lock()

    def take(self, method: str | bytes) -> tuple[str, str | None]:
        name = (method.decode() if isinstance(method, bytes) else method).rsplit("/", 1)[1]
        with self.lock:
            self.sent[name] += 1
            return name, self.next.pop(name, None)

    @staticmethod
    def error(fault: str) -> grpc.aio.AioRpcError:
        code, trailers, details = AFTER[fault] if fault in AFTER else BEFORE[fault]
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), details)


class SyncFaults(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, faults: Faults) -> None:
        self.faults = faults

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        _, fault = self.faults.take(details.method)
        if fault in BEFORE:
            raise Faults.error(fault)
        out = continuation(details, request)
        if fault is None:
            return out
        out.result()  # the node answered: the write was applied; the answer is lost
        raise Faults.error(fault)


class AioFaults(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, faults: Faults) -> None:
        self.faults = faults

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        _, fault = self.faults.take(client_call_details.method)
        if fault in BEFORE:
            raise Faults.error(fault)
        call = await continuation(client_call_details, request)
        if fault is None:
            return call
        await call
        raise Faults.error(fault)


def make_client(kind: str, addresses: list[str], faults: Faults | None = None, timeout: float = 5.0) -> Any:
    if kind == "sync":
        interceptors = [SyncFaults(faults)] if faults is not None else []

        def factory(a: str) -> Any:
            return grpc.intercept_channel(grpc.insecure_channel(a, options=CLIENT_CHANNEL_OPTIONS), *interceptors)

        return Client(addresses, timeout=timeout, channel_factory=factory)

    def aio_factory(a: str) -> Any:
        interceptors = [AioFaults(faults)] if faults is not None else None
        return grpc.aio.insecure_channel(a, options=CLIENT_CHANNEL_OPTIONS, interceptors=interceptors)

    return AsyncFacade(addresses, timeout=timeout, channel_factory=aio_factory)


def _ns() -> str:
    return "t" + uuid.uuid4().hex[:12]


def _enqueue(c: Any, ns: str) -> str:
    mid: str = c.enqueue("s@example.org", ["b@example.net", "c@example.net"], b"Subject: t\r\n\r\nx\r\n",
                         namespace=ns)
    return mid


def _keys(c: Any, ns: str) -> list[dict[str, Any]]:
    return [k for k in c.list_keys() if k["namespace"] == ns]


# --- writes that are not idempotent -------------------------------------------------------------------


@pytest.mark.parametrize("fault", list(AFTER))
@pytest.mark.parametrize("kind", KINDS)
def test_a_non_idempotent_write_whose_answer_is_lost_is_applied_once_and_raises_unavailable(
    kind: str, fault: str, cluster: Cluster
) -> None:
    """The write was applied but its answer lost: the caller hears "may or may not have been
    applied" (Unavailable, with how to check), the request went out once, and the store shows the
    write done exactly once. Before, the client resent it: NotFound, a count of 0, two new keys."""
    faults = Faults()
    c = make_client(kind, [cluster.leader_address()], faults)
    ns = _ns()

    def lose(method: str, call: Callable[[], Any], check: str) -> None:
        faults.next[method] = fault
        with pytest.raises(Unavailable, match=UNKNOWN) as info:
            call()
        assert check in str(info.value)
        assert faults.sent[method] == 1, f"{method} was sent again after its outcome was lost"

    try:
        # delete: done (get raises NotFound), not "NotFound" for the caller
        mid = _enqueue(c, ns)
        lose("Delete", lambda: c.delete(mid), "get(message_id)")
        with pytest.raises(NotFound):
            c.get(mid)

        # bounce_message: both recipients bounced once, not BounceResult(bounced=0)
        mid = _enqueue(c, ns)
        lose("BounceMessage", lambda: c.bounce_message(mid, reason="given up"), "get(message_id)")
        message = c.get(mid)
        assert [(r.state, r.attempts) for r in message.recipients] == [("bounced", 1), ("bounced", 1)]

        # remove_legal_hold: removed, not "no legal hold"
        c.add_legal_hold(mid, "case-1")
        assert c.get(mid).legal_holds == ("case-1",)
        lose("RemoveLegalHold", lambda: c.remove_legal_hold(mid, "case-1"), "legal_holds")
        assert c.get(mid).legal_holds == ()

        # compact_messages: the finished message removed
        lose("CompactMessages", lambda: c.compact_messages([mid]), "NotFound")
        with pytest.raises(NotFound):
            c.get(mid)

        # rotate_key: one new key, not two
        _enqueue(c, ns)  # the namespace's first key
        before = _keys(c, ns)
        lose("RotateKey", lambda: c.rotate_key(ns), "list_keys()")
        after = _keys(c, ns)
        assert len(after) == len(before) + 1
        old_key = before[0]["key_id"]

        # drop_namespace: every message gone (a resend counted 0)
        _enqueue(c, ns)
        lose("DropNamespace", lambda: c.drop_namespace(ns), "list(namespace=")
        assert list(c.list(namespace=ns)) == []

        # shred_key (no message left under the old key): shredded once (a resend: "shredded already")
        lose("ShredKey", lambda: c.shred_key(old_key), "list_keys()")
        assert next(k for k in _keys(c, ns) if k["key_id"] == old_key)["shredded"]
    finally:
        c.close()


@pytest.mark.parametrize("fault", list(BEFORE))
@pytest.mark.parametrize("kind", KINDS)
def test_a_non_idempotent_write_refused_before_it_was_done_is_sent_again(
    kind: str, fault: str, cluster: Cluster
) -> None:
    """A refusal that guarantees nothing was done (no connection, no leader known, the node shutting
    down, the proposal refused): the write is resent and the caller gets its real answer."""
    faults = Faults()
    c = make_client(kind, [cluster.leader_address()], faults)
    ns = _ns()
    try:
        mid = _enqueue(c, ns)
        faults.next["BounceMessage"] = fault
        assert c.bounce_message(mid, reason="given up") == BounceResult(mid, 2, 0)
        assert faults.sent["BounceMessage"] == 2
        faults.next["Delete"] = fault
        assert c.delete(mid) is None
        assert faults.sent["Delete"] == 2
        with pytest.raises(NotFound):
            c.get(mid)
    finally:
        c.close()


@pytest.mark.parametrize("kind", KINDS)
def test_a_non_idempotent_write_follows_redirects_and_skips_unreachable_nodes(kind: str, cluster: Cluster) -> None:
    """A dead node first (connection refused: never sent), then a follower (NotLeader): the
    delete still reaches the leader and is applied once."""
    dead = f"127.0.0.1:{free_port()}"
    c = make_client(kind, [dead, cluster.follower_address()])
    try:
        mid = _enqueue(c, _ns())
        c2 = make_client(kind, [dead, cluster.follower_address()])
        try:
            assert c2.delete(mid) is None
            assert c2.leader == cluster.leader_address()
        finally:
            c2.close()
        with pytest.raises(NotFound):
            c.get(mid)
    finally:
        c.close()


@pytest.mark.parametrize("kind", KINDS)
def test_a_non_idempotent_write_no_node_would_take_says_it_was_not_applied(kind: str) -> None:
    c = make_client(kind, [f"127.0.0.1:{free_port()}"], timeout=0.5)
    try:
        with pytest.raises(Unavailable, match=r"delete was not applied"):
            c.delete("01M985Y4J9ZYAPM4K5W1ZK1Y6B")
        with pytest.raises(Unavailable, match=r"rotate_key was not applied"):
            c.rotate_key("default")
    finally:
        c.close()


# --- reads and idempotent writes: resent as before ------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_reads_and_idempotent_writes_are_resent_after_a_lost_answer(kind: str, cluster: Cluster) -> None:
    faults = Faults()
    c = make_client(kind, [cluster.leader_address()], faults)
    ns = _ns()
    try:
        mid = _enqueue(c, ns)
        calls: list[tuple[str, Callable[[], Any]]] = [
            ("Hold", lambda: c.hold(mid)),
            ("Release", lambda: c.release(mid)),
            ("Requeue", lambda: c.requeue(mid)),
            ("AddLegalHold", lambda: c.add_legal_hold(mid, "case-2")),
            ("SetNamespacePolicy", lambda: c.set_namespace_policy(ns, retention=3600)),
            ("Get", lambda: c.get(mid)),
            ("ListKeys", lambda: c.list_keys()),
        ]
        for method, call in calls:
            faults.next[method] = "connection reset"
            call()
            assert faults.sent[method] == 2, method
        message = c.get(mid)
        assert not message.held and message.legal_holds == ("case-2",)
        assert c.get_policy(ns) == c.get_policy(ns)
        # A settle resent after its answer was lost finds the lease settled: StaleLease, as documented.
        (lease,) = c.lease("w", max_messages=1, namespace=ns)
        faults.next["Ack"] = "may still commit"
        with pytest.raises(StaleLease):
            c.ack(lease.token)
        assert [r.state for r in c.get(mid).recipients] == ["delivered", "delivered"]
    finally:
        c.close()


# --- audit reads: the limit checked as the embedded API checks it -----------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_audit_limit_out_of_range_is_refused_as_embedded_before_anything_is_sent(kind: str, tmp_path: Path) -> None:
    """limit=0 used to reach the node, which reads 0 as "the default" and returned up to 1000
    records; the embedded API refuses it. Nothing listens at the client's address: the refusal
    must come before any call (else it would be Unavailable)."""
    store = mqstore.open(tmp_path / "emb", key_file=create_key_file(tmp_path / "kek.key"))
    c = make_client(kind, [f"127.0.0.1:{free_port()}"], timeout=1.0)
    try:
        for limit in (0, -1, 100_001, True):
            for name, kwargs in (("audit_records", {"limit": limit}), ("audit_query", {"limit": limit})):
                try:
                    getattr(store, name)(**kwargs)
                except InvalidArgument as exc:
                    embedded = str(exc)
                else:
                    continue  # accepted embedded (audit_query(limit=True)): not an error case
                with pytest.raises(InvalidArgument) as info:
                    getattr(c, name)(**kwargs)
                assert str(info.value) == embedded, (name, limit)
    finally:
        c.close()
        store.close()


@pytest.mark.parametrize("kind", KINDS)
def test_audit_records_with_a_limit_return_at_most_that_many(kind: str, cluster: Cluster) -> None:
    c = make_client(kind, [cluster.leader_address()])
    try:
        for _ in range(3):
            c.hold(_enqueue(c, _ns()))
        assert len(c.audit_records(limit=2)) == 2
        assert len(c.audit_query(limit=1)) == 1
    finally:
        c.close()
