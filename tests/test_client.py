"""The gRPC clients (mqstore.client) against a real in-process 3-node cluster (3 sites): every
operation round-trips with the embedded API's results, the leader is found and followed across a
leader change, retried enqueues store nothing twice, errors map to the embedded exceptions, and a
dead cluster gives Unavailable after the timeout. Runs for Client and for AsyncClient."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from mqstore import InvalidArgument, NotFound, StaleLease
from mqstore.api import Lease, Message, Page, QShape
from mqstore.client import AsyncClient, Client, insecure_channel
from mqstore.compliance.audit import Checkpoint
from mqstore.compliance.rules import Mode
from mqstore.compliance.signing import public_key_from_hex
from mqstore.config import parse
from mqstore.crypto import create_key_file
from mqstore.errors import Immutable, Unavailable
from mqstore.node.runtime import bootstrap
from mqstore.queue.model import Policy
from mqstore.server import NodeServer
from mqstore.testing.cluster import free_port
from mqstore.testing.facade import AsyncFacade

SITES = {1: "a", 2: "b", 3: "c"}
KINDS = ["sync", "async"]


def _free_ports(n: int) -> list[int]:
    return [free_port() for _ in range(n)]  # distinct, and outside the ephemeral range


class Cluster:
    """Three NodeServers in this process (as /tmp/cluster3.py), one per site."""

    def __init__(self, root: Path) -> None:
        ports = dict(zip(SITES, _free_ports(len(SITES)), strict=True))
        self.addresses = {i: f"127.0.0.1:{ports[i]}" for i in SITES}
        key = create_key_file(root / "kek.key")
        self.servers: dict[int, NodeServer] = {}
        self.stopped: set[int] = set()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in SITES:
                cfg = parse(
                    {
                        "node_id": i,
                        "site": SITES[i],
                        "listen": self.addresses[i],
                        "data_dir": str(root / f"n{i}"),
                        "key_file": str(key),
                        "insecure": True,
                        "peers": [
                            {"id": j, "site": SITES[j], "address": self.addresses[j]} for j in SITES if j != i
                        ],
                    }
                )
                bootstrap(cfg, "test")
                self.servers[i] = NodeServer(cfg)
        for s in self.servers.values():
            s.start()
        self.wait_leader()

    def running(self) -> list[NodeServer]:
        return [s for i, s in self.servers.items() if i not in self.stopped]

    def wait_leader(self, timeout: float = 15.0, exclude: int = 0) -> NodeServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for s in self.running():
                if s.node.is_leader and s.node.node_id != exclude:
                    return s
            time.sleep(0.02)
        raise AssertionError("no leader elected")

    @property
    def leader(self) -> NodeServer:
        return self.wait_leader()

    def follower(self) -> NodeServer:
        leader = self.leader
        return next(s for s in self.running() if s is not leader)

    def address(self, s: NodeServer) -> str:
        return self.addresses[s.node.node_id]

    def all_addresses(self) -> list[str]:
        return list(self.addresses.values())

    def kill(self, node_id: int) -> None:
        """Stop a node abruptly (no leadership hand-over, in-flight calls cancelled)."""
        if node_id in self.stopped:
            return
        self.stopped.add(node_id)
        s = self.servers[node_id]
        s.grpc.stop(0).wait(5)
        s.queue.close()
        s.node.stop(transfer_leadership=False)

    def close(self) -> None:
        for i in list(self.servers):
            self.kill(i)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    logging.getLogger("mqstore").setLevel(logging.WARNING)
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def fresh_cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()


def make_client(kind: str, addresses: str | list[str], **kwargs: Any) -> Any:
    return Client(addresses, **kwargs) if kind == "sync" else AsyncFacade(addresses, **kwargs)


@pytest.fixture(params=KINDS)
def client(request: pytest.FixtureRequest, cluster: Cluster) -> Iterator[Any]:
    c = make_client(request.param, cluster.all_addresses())
    try:
        yield c
    finally:
        c.close()


def _msg(ns: str, rcpts: list[str] | None = None, **kw: Any) -> dict[str, Any]:
    return {
        "mail_from": "sender@example.org",
        "recipients": rcpts or ["alice@example.net"],
        "data": b"Subject: hi\r\n\r\n" + uuid.uuid4().bytes,
        "namespace": ns,
        **kw,
    }


def _ns() -> str:
    return "t" + uuid.uuid4().hex[:12]


def _comparable_stats(stats: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(json.dumps(stats, sort_keys=True))
    return result


# --- every operation round-trips --------------------------------------------------------------


def test_operations_round_trip(client: Any, cluster: Cluster) -> None:
    q = cluster.leader.queue  # the embedded API on the leader: the reference answers
    ns = _ns()
    client.set_namespace_policy(ns, retention=3600)  # keep finished messages (0 compacts them at once)
    before = time.time()
    mid = client.enqueue(
        "sender@example.org",
        ["alice@example.net", "bob@example.com"],
        b"Subject: one\r\n\r\nbody\r\n",
        namespace=ns,
        priority=5,
        expires_in=3600,
        idempotency_key="key-1",
    )
    got = client.get(mid)
    assert isinstance(got, Message)
    assert got == q.get(mid)
    assert got.data == b"Subject: one\r\n\r\nbody\r\n" and got.priority == 5 and got.idempotency_key == "key-1"
    assert got.expires_at is not None and abs(got.expires_at - (before + 3600)) < 5
    assert [r.state for r in got.recipients] == ["queued", "queued"]

    later = client.enqueue("", ["carol@example.org"], b"x", namespace=ns, not_before=time.time() + 3600)
    assert client.get(later) == q.get(later)
    assert client.get(later).not_before is not None

    batch = client.enqueue_many([_msg(ns, ["d@example.net"]), _msg(ns, ["e@example.com"]), _msg(ns)])
    assert len(batch) == 3 and len(set(batch)) == 3
    for m in batch:
        assert client.get(m) == q.get(m)
        assert client.get(m).idempotency_key  # the client set one

    streamed = list(client.enqueue_stream(_msg(ns, [f"s{i}@example.org"]) for i in range(40)))
    assert len(streamed) == 40 and len(set(streamed)) == 40
    assert [client.get(m).recipients[0].address for m in streamed[:3]] == [f"s{i}@example.org" for i in range(3)]
    assert client.get(streamed[-1]) == q.get(streamed[-1])

    # list: pages, filters, next_after
    page = client.list(namespace=ns)
    assert isinstance(page, Page)
    assert page == q.list(namespace=ns) and page.next_after is None
    assert [s.message_id for s in page] == [mid, later, *batch, *streamed]
    first = client.list(namespace=ns, limit=2)
    assert first == q.list(namespace=ns, limit=2) and first.next_after == later
    assert client.list(namespace=ns, limit=2, after=first.next_after) == q.list(namespace=ns, limit=2, after=later)
    assert client.list(namespace=ns, domain="example.com") == q.list(namespace=ns, domain="example.com")
    assert client.list(state="queued", namespace=ns, older_than=0) == q.list(state="queued", namespace=ns, older_than=0)

    shape = client.qshape(ns)
    assert isinstance(shape, QShape) and shape == q.qshape(ns)
    assert sum(shape.total) >= 2 + 3 + 40
    assert client.qshape() == q.qshape()

    # lease and settle
    leases = client.lease("w1", max_messages=2, lease_seconds=30, namespace=ns)
    assert [x.message_id for x in leases] == [mid, batch[0]]  # priority 5 first, then arrival order
    lease = leases[0]
    assert isinstance(lease, Lease)
    assert lease.recipients == ("alice@example.net", "bob@example.com") and lease.priority == 5
    assert lease.data == b"Subject: one\r\n\r\nbody\r\n" and lease.attempts == 0 and lease.namespace == ns
    assert abs(lease.deadline - (time.time() + 30)) < 5
    assert client.get(mid).recipients[0].lease_token == lease.token
    client.defer(lease.token, ["alice@example.net"], reason="451 try later")
    client.bounce(lease.token, ["bob@example.com"], reason="550 no such user")
    m = client.get(mid)
    assert m == q.get(mid)
    assert [(r.state, r.last_reason) for r in m.recipients] == [
        ("deferred", "451 try later"),
        ("bounced", "550 no such user"),
    ]
    assert m.recipients[0].next_attempt is not None and m.recipients[0].next_attempt > time.time()
    client.ack(leases[1].token)
    assert client.get(batch[0]).done and client.get(batch[0]) == q.get(batch[0])

    more = client.lease("w2", max_messages=3, lease_seconds=30, namespace=ns, domain="example.com")
    assert [x.message_id for x in more] == [batch[1]]
    rest = client.lease("w2", max_messages=3, namespace=ns)
    client.ack_many([x.token for x in more + rest])
    assert all(client.get(x.message_id).done for x in more + rest)
    client.ack_many([])

    # administration
    client.requeue(mid)
    assert client.get(mid).recipients[0].next_attempt <= time.time() + 1
    client.hold(later)
    assert client.get(later).held and later in [s.message_id for s in client.list(state="held", namespace=ns)]
    client.release(later)
    assert not client.get(later).held
    client.delete(later)
    with pytest.raises(NotFound):
        client.get(later)

    stats = client.stats()
    assert _comparable_stats(stats)["namespaces"][ns] == _comparable_stats(q.stats())["namespaces"][ns]
    assert set(stats) == set(q.stats())
    assert stats["disk"]["accepting_enqueues"] is True and stats["disk"]["free_bytes"] >= stats["disk"]["floor_bytes"]
    assert stats["namespaces"][ns]["recipients"]["delivered"] == 2 + len(rest)
    assert stats["namespaces"][ns]["messages"] == 44

    expected = Policy(
        backoff_ms=(1000, 2500), lifetime_ms=100_000, retention_ms=0, dedup_window_ms=60_000,
        expired_retention_ms=10_000,
    )
    assert client.set_namespace_policy(
        ns, backoff=[1, 2.5], lifetime=100, retention=0, dedup_window=60, expired_retention=10
    ) == expected
    q._policies.pop(ns, None)
    assert q._policy(ns) == expected
    changed = client.set_namespace_policy(ns, lifetime=200)  # None keeps the others
    assert changed.backoff_ms == (1000, 2500) and changed.lifetime_ms == 200_000
    assert client.set_namespace_policy(ns, backoff=[]).backoff_ms == ()  # back to Postfix's schedule
    q._policies.pop(ns, None)
    assert q._policy(ns).backoff_ms == () and q._policy(ns).lifetime_ms == 200_000

    status = client.status()
    assert status["role"] == "leader" and status["node_id"] == cluster.leader.node.node_id
    assert len(status["members"]) == 3 and status["stats"]["namespaces"][ns]["messages"] == 44
    follower = client.status(cluster.address(cluster.follower()))
    assert follower["role"] == "follower" and follower["leader_id"] == status["node_id"]


def test_async_client_natively(cluster: Cluster) -> None:
    """AsyncClient used directly under asyncio.run: context manager, an async source for
    enqueue_stream, concurrent calls."""
    ns = _ns()

    async def source() -> AsyncIterator[dict[str, Any]]:
        for i in range(25):
            yield _msg(ns, [f"a{i}@example.org"])
            if i % 10 == 0:
                await asyncio.sleep(0.01)

    async def main() -> None:
        async with AsyncClient(cluster.all_addresses()) as c:
            await c.set_namespace_policy(ns, retention=3600)  # finished messages stay countable
            ids = [mid async for mid in c.enqueue_stream(source())]
            assert len(ids) == 25
            more = await asyncio.gather(
                *(c.enqueue("s@example.org", [f"c{i}@example.org"], b"x", ns) for i in range(20))
            )
            assert len(set(more)) == 20
            page = await c.list(namespace=ns)
            assert [s.message_id for s in page] == ids + sorted(more)
            leases = await c.lease("aw", max_messages=50, namespace=ns)
            await asyncio.gather(*(c.ack(x.token) for x in leases))
            assert (await c.stats())["namespaces"][ns]["recipients"]["delivered"] == 45

    asyncio.run(main())


def test_async_client_compliance(cluster: Cluster) -> None:
    """Every compliance call of AsyncClient against the cluster, as the user sees it: locked
    namespaces refuse deletes (GOVERNANCE yields to a bypass with a reason), legal holds and
    retention show in get(), keys rotate and shred, and the audit log reads back consistently
    and ends in a signed checkpoint."""
    locked, governed, plain = _ns(), _ns(), _ns()

    async def main() -> None:
        async with AsyncClient(cluster.all_addresses()) as c:
            # set_policy/get_policy; delete refused under COMPLIANCE, even with a bypass
            policy = await c.set_policy(locked, mode="compliance", retention_days=1)
            assert policy.mode == int(Mode.COMPLIANCE) and policy.lock_retention_ms == 86_400_000
            assert await c.get_policy(locked) == policy
            assert (await c.get_policy(plain)).mode == int(Mode.NONE)
            before = time.time()
            mid = await c.enqueue("cfo@example.org", ["board@example.net"], b"Subject: m\r\n\r\nx\r\n", locked)
            m = await c.get(mid)
            assert m.retention_mode == "compliance" and m.locked_until is not None
            assert abs(m.locked_until - (before + 86_400)) < 60
            with pytest.raises(Immutable):
                await c.delete(mid)
            with pytest.raises(Immutable):
                await c.delete(mid, bypass_governance=True, reason="try anyway")
            with pytest.raises(Immutable):
                await c.drop_namespace(locked)

            # extend_retention (seconds or datetime); shortening is refused
            await c.extend_retention(mid, m.locked_until + 3600)
            assert (await c.get(mid)).locked_until == pytest.approx(m.locked_until + 3600, abs=0.002)
            later = datetime.datetime.fromtimestamp(m.locked_until + 7200, tz=datetime.UTC)
            await c.extend_retention(mid, later)
            assert (await c.get(mid)).locked_until == pytest.approx(later.timestamp(), abs=0.002)
            with pytest.raises(Immutable):
                await c.extend_retention(mid, m.locked_until)

            # legal holds show in get()
            await c.add_legal_hold(mid, case="SEC-1")
            await c.add_legal_hold(mid, case="SEC-2")
            assert sorted((await c.get(mid)).legal_holds) == ["SEC-1", "SEC-2"]
            await c.remove_legal_hold(mid, case="SEC-1")
            assert (await c.get(mid)).legal_holds == ("SEC-2",)
            with pytest.raises(NotFound):
                await c.remove_legal_hold(mid, case="SEC-1")

            # GOVERNANCE: delete refused, allowed with bypass_governance and a reason
            await c.set_policy(governed, mode="governance", retention_days=1)
            gid = await c.enqueue("s@example.org", ["r@example.org"], b"x", governed)
            with pytest.raises(Immutable):
                await c.delete(gid)
            await c.delete(gid, bypass_governance=True, reason="erasure request 42")
            with pytest.raises(NotFound):
                await c.get(gid)

            # compact_messages removes finished messages before their housekeeping retention ends
            await c.set_namespace_policy(plain, retention=3600)
            done = [await c.enqueue("s@example.org", [f"r{i}@example.org"], b"x", plain) for i in range(3)]
            for lease in await c.lease("w", namespace=plain):
                await c.ack(lease.token)
            assert await c.compact_messages([done[0]]) == 1
            with pytest.raises(NotFound):
                await c.get(done[0])
            assert (await c.get(done[1])).done

            # rotate_key: a new current key, in list_keys and used by new messages; shred_key
            # removes the finished messages sealed under it
            old = [k for k in await c.list_keys() if k["namespace"] == plain]
            key_id = await c.rotate_key(plain)
            keys = {k["key_id"]: k for k in await c.list_keys() if k["namespace"] == plain}
            assert key_id not in {k["key_id"] for k in old}
            assert keys[key_id]["current"] and not keys[key_id]["shredded"]
            assert abs(keys[key_id]["created_ms"] / 1000 - time.time()) < 60
            assert [k for k in keys.values() if k["current"]] == [keys[key_id]]
            sealed = await c.enqueue("s@example.org", ["k@example.org"], b"x", plain)
            assert (await c.get(sealed)).key_id == key_id
            for lease in await c.lease("w", namespace=plain):
                await c.ack(lease.token)
            assert await c.shred_key(key_id) == 1
            with pytest.raises(NotFound):
                await c.get(sealed)
            shredded = next(k for k in await c.list_keys() if k["key_id"] == key_id)
            assert shredded["shredded"] and not shredded["current"]

            # drop_namespace removes what is left
            assert await c.drop_namespace(plain) == 2
            assert list(await c.list(namespace=plain)) == []

            # the audit log: head, records and query agree
            head = await c.audit_head()
            tail = await c.audit_records(after=head - 5, limit=10)
            assert [r["seq"] for r in tail] == list(range(head - 4, head + 1))
            assert await c.audit_records(after=head) == []
            assert (tail[-1]["op"], tail[-1]["target"], tail[-1]["outcome"]) == ("drop_namespace", plain, "allowed")
            trail = await c.audit_query(where={"target": mid})
            assert [(r["op"], r["outcome"]) for r in trail] == [
                ("enqueue", "allowed"),
                ("delete", "denied"),
                ("delete", "denied"),
                ("retention", "allowed"),
                ("retention", "allowed"),
                ("retention", "denied"),
                ("legal_hold", "allowed"),
                ("legal_hold", "allowed"),
                ("release_legal_hold", "allowed"),
            ]
            assert trail[-1]["before"]["holds"] == ["SEC-1", "SEC-2"] and trail[-1]["after"]["holds"] == ["SEC-2"]
            assert [r["seq"] for r in trail] == sorted(r["seq"] for r in trail) and trail[-1]["seq"] < head
            for r in trail:  # the same records as audit_records returns
                assert await c.audit_records(after=r["seq"] - 1, limit=1) == [r]
            holds = await c.audit_query(where={"op": "legal_hold", "target": mid})
            assert holds == trail[6:8]
            assert await c.audit_query(where={"op": "legal_hold", "target": mid}, after=holds[0]["seq"]) == holds[1:]
            assert await c.audit_query(where={"target": mid}, limit=2) == trail[:2]
            assert await c.audit_query(where={"target": mid}, since_ms=trail[-1]["time"]) == [
                r for r in trail if r["time"] >= trail[-1]["time"]
            ]
            denied = await c.audit_query(where={"op": "delete", "outcome": "denied"}, after=trail[0]["seq"])
            assert [r["target"] for r in denied] == [mid, mid, gid]
            bypassed = await c.audit_query(where={"op": "delete", "target": gid, "outcome": "allowed"})
            assert len(bypassed) == 1 and bypassed[0]["bypass"] and bypassed[0]["bypass_reason"] == "erasure request 42"

            # audit_checkpoint: signed, over every record so far (itself included)
            ckpt = await c.audit_checkpoint()
            assert isinstance(ckpt, Checkpoint) and ckpt.size == head + 1
            assert ckpt.signed and ckpt.public_key
            assert ckpt.signature_problem(public_key_from_hex(ckpt.public_key)) is None
            assert await c.audit_head() == head + 1

    asyncio.run(main())


# --- finding and following the leader -----------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_follower_address_finds_leader(kind: str, cluster: Cluster) -> None:
    leader, follower = cluster.leader, cluster.follower()
    c = make_client(kind, cluster.address(follower))
    try:
        mid = c.enqueue("s@example.org", ["r@example.org"], b"x", namespace=_ns())
        assert c.get(mid).message_id == mid
        assert c.leader == cluster.address(leader)
        assert c.addresses == [cluster.address(follower), cluster.address(leader)]
    finally:
        c.close()


def test_async_stream_from_a_follower_finds_the_leader(cluster: Cluster) -> None:
    """AsyncClient.enqueue_stream as the first call of a client that knows only a follower: it
    follows the follower's NotLeader to the leader (no other call first), and stores every
    message once, also with large messages (the frames a follower refuses while more are being
    written)."""
    leader, follower = cluster.leader, cluster.follower()
    ns = _ns()
    big = b"Subject: big\r\n\r\n" + b"x" * 60_000

    async def one_stream(n: int) -> tuple[list[str], str | None]:
        async with AsyncClient(cluster.address(follower), timeout=10) as c:
            ids = [mid async for mid in c.enqueue_stream(_msg(ns, data=big) for _ in range(n))]
            return ids, c.leader

    streamed: list[str] = []
    for _ in range(5):
        ids, found = asyncio.run(one_stream(100))
        assert len(ids) == 100 and found == cluster.address(leader)
        streamed += ids
    with Client(cluster.address(leader)) as c:
        assert sorted(streamed) == [s.message_id for s in c.list(namespace=ns, limit=1000)]


def test_sync_client_is_thread_safe(cluster: Cluster) -> None:
    ns = _ns()
    with Client(cluster.all_addresses()) as c, ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda i: c.enqueue("s@example.org", [f"r{i}@example.org"], b"x", ns), range(80)))
        assert len(set(ids)) == 80
        assert c.stats()["namespaces"][ns]["messages"] == 80


class _LostAnswer(grpc.RpcError):  # type: ignore[misc]
    """An UNAVAILABLE failure reported after the call actually ran (the answer was lost)."""

    def code(self) -> Any:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection reset (simulated)"

    def trailing_metadata(self) -> tuple[()]:
        return ()


class _LoseFirstAnswers(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, methods: set[str]) -> None:
        self.methods = methods
        self.lost: list[Any] = []

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        outcome = continuation(details, request)
        name = details.method.rsplit("/", 1)[-1]
        if name in self.methods and outcome.code() == grpc.StatusCode.OK:  # it ran, and committed
            self.methods.discard(name)
            self.lost.append(request)
            raise _LostAnswer()
        return outcome


@pytest.mark.parametrize("kind", KINDS)
def test_same_idempotency_key_stores_once(kind: str, cluster: Cluster) -> None:
    ns = _ns()
    c = make_client(kind, cluster.all_addresses())
    try:
        a = c.enqueue("s@example.org", ["r@example.org"], b"x", namespace=ns, idempotency_key="order-17")
        b = c.enqueue("s@example.org", ["r@example.org"], b"x", namespace=ns, idempotency_key="order-17")
        many = c.enqueue_many([_msg(ns, idempotency_key="order-17"), _msg(ns, idempotency_key="order-18")])
        streamed = list(c.enqueue_stream([_msg(ns, idempotency_key="order-18")]))
        assert a == b == many[0] and many[1] == streamed[0] and a != many[1]
        assert c.stats()["namespaces"][ns]["messages"] == 2
    finally:
        c.close()


def test_lost_answer_is_retried_with_the_same_key(cluster: Cluster) -> None:
    """The first Enqueue/EnqueueBatch commits but its answer is lost: the client's retry (with
    the key it generated before the first attempt) returns the same ids and stores nothing twice."""
    ns = _ns()
    lose = _LoseFirstAnswers({"Enqueue", "EnqueueBatch", "Lease"})
    with Client(
        cluster.all_addresses(), channel_factory=lambda a: grpc.intercept_channel(insecure_channel(a), lose)
    ) as c:
        mid = c.enqueue("s@example.org", ["r@example.org"], b"x", namespace=ns)
        ids = c.enqueue_many([_msg(ns), _msg(ns)])
        assert len(lose.lost) == 2
        assert lose.lost[0].message.idempotency_key == c.get(mid).idempotency_key
        assert c.list(namespace=ns) == cluster.leader.queue.list(namespace=ns)
        assert [s.message_id for s in c.list(namespace=ns)] == [mid, *ids]
        assert c.stats()["namespaces"][ns]["messages"] == 3
        # A lease whose answer was lost just holds its recipients until it expires.
        assert [x.message_id for x in c.lease("w", max_messages=1, lease_seconds=1, namespace=ns)] == [ids[0]]


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_errors_map_to_the_embedded_exceptions(kind: str, cluster: Cluster) -> None:
    ns = _ns()
    q = cluster.leader.queue
    c = make_client(kind, cluster.all_addresses())
    try:
        bad: list[Callable[[Any], Any]] = [
            lambda x: x.enqueue("s@example.org", "r@example.org", b"x"),  # a string, not a list
            lambda x: x.enqueue("s@example.org", [], b"x"),
            lambda x: x.enqueue("s@example.org", ["not an address"], b"x"),  # checked by the server
            lambda x: x.enqueue("s@example.org", ["r@example.org"], "text"),
            lambda x: x.enqueue("s@example.org", ["r@example.org"], b"x", namespace=""),
            lambda x: x.enqueue("s@example.org", ["r@example.org"], b"x", priority=1000),
            lambda x: x.enqueue("s@example.org", ["r@example.org"], b"x", expires_in=0),
            lambda x: x.enqueue_many([]),
            lambda x: x.enqueue_many([{"mail_from": "s@example.org", "recipients": ["r@example.org"]}]),
            lambda x: x.enqueue_many([{**_msg(ns), "colour": "blue"}]),
            lambda x: x.lease(""),
            lambda x: x.lease("w", max_messages=0),
            lambda x: x.lease("w", lease_seconds=0),
            lambda x: x.lease("w", namespace=""),
            lambda x: x.get("nonsense"),
            lambda x: x.list(limit=0),
            lambda x: x.list(state="sleeping"),
            lambda x: x.list(state=""),
            lambda x: x.set_namespace_policy(ns, retention=-1),
            lambda x: x.set_namespace_policy(ns, lifetime=0),
            lambda x: x.set_namespace_policy("no spaces allowed"),
        ]
        for i, call in enumerate(bad):
            with pytest.raises(InvalidArgument):
                call(c)
            with pytest.raises(InvalidArgument):  # the embedded API agrees
                call(q)
            assert i >= 0
        with pytest.raises(InvalidArgument):
            list(c.enqueue_stream([_msg(_ns()), {"mail_from": "s@example.org"}]))

        c.set_namespace_policy(ns, retention=3600)  # the delivered message stays until deleted below
        mid = c.enqueue("s@example.org", ["r@example.org", "t@example.org"], b"x", namespace=ns)
        (lease,) = c.lease("w", namespace=ns)
        for x in (c, q):
            with pytest.raises(InvalidArgument):
                x.ack(lease.token, recipients=[])  # on the wire, [] would mean "all of them"
            with pytest.raises(InvalidArgument):
                x.defer(lease.token, recipients="r@example.org")
        with pytest.raises(StaleLease):
            c.ack(lease.token, ["someone-else@example.org"])
        c.ack(lease.token)
        for settle in (c.ack, c.defer, c.bounce):
            with pytest.raises(StaleLease):
                settle(lease.token)
        with pytest.raises(StaleLease):
            c.ack(10**12)
        with pytest.raises(StaleLease):
            c.ack_many([lease.token])

        unknown = "0" * 26
        for op in (c.get, c.hold, c.release, c.requeue, c.delete):
            with pytest.raises(NotFound):
                op(unknown)
        c.delete(mid)
        with pytest.raises(NotFound):
            c.get(mid)
    finally:
        c.close()


# --- leader changes and a dead cluster --------------------------------------------------------


Worker = Callable[[Callable[[str], None], threading.Event], None]


class Load:
    """Workers enqueueing until told to stop (one thread each), recording ids, errors and the
    slowest call."""

    def __init__(self, workers: dict[str, Worker]) -> None:
        self.ids: dict[str, list[str]] = {k: [] for k in workers}
        self.errors: list[tuple[str, BaseException]] = []
        self.slowest = dict.fromkeys(workers, 0.0)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(k, w), daemon=True) for k, w in workers.items()]
        for t in self.threads:
            t.start()

    def _run(self, kind: str, worker: Worker) -> None:
        last = time.monotonic()

        def record(mid: str) -> None:
            nonlocal last
            now = time.monotonic()
            self.slowest[kind] = max(self.slowest[kind], now - last)
            last = now
            self.ids[kind].append(mid)

        try:
            worker(record, self.stop)
        except BaseException as exc:
            self.errors.append((kind, exc))

    def wait_for(self, kind: str, count: int, timeout: float = 15.0) -> float:
        """Seconds until ``kind`` has ``count`` ids."""
        t = time.monotonic()
        while len(self.ids[kind]) < count:
            assert not self.errors, self.errors
            assert time.monotonic() - t < timeout, f"{kind}: no progress"
            time.sleep(0.002)
        return time.monotonic() - t

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)
        assert not self.errors, self.errors


def _enqueuer(c: Any, ns: str) -> Worker:
    def run(record: Callable[[str], None], stop: threading.Event) -> None:
        while not stop.is_set():
            record(c.enqueue("s@example.org", ["r@example.org"], b"x", namespace=ns))
            time.sleep(0.02)

    return run


def _streamer(c: Client, ns: str) -> Worker:
    def run(record: Callable[[str], None], stop: threading.Event) -> None:
        def source() -> Iterator[dict[str, Any]]:
            while not stop.is_set():
                yield _msg(ns)
                time.sleep(0.02)

        for mid in c.enqueue_stream(source()):
            record(mid)

    return run


def _async_streamer(addresses: list[str], ns: str) -> Worker:
    def run(record: Callable[[str], None], stop: threading.Event) -> None:
        async def source() -> AsyncIterator[dict[str, Any]]:
            while not stop.is_set():
                yield _msg(ns)
                await asyncio.sleep(0.02)

        async def main() -> None:
            async with AsyncClient(addresses) as c:
                async for mid in c.enqueue_stream(source()):
                    record(mid)

        asyncio.run(main())

    return run


def _failover(cluster: Cluster, how: str) -> None:
    ns = _ns()
    clients = {kind: make_client(kind, cluster.all_addresses()) for kind in KINDS}
    try:
        load = Load(
            {
                "sync": _enqueuer(clients["sync"], ns),
                "async": _enqueuer(clients["async"], ns),
                "sync stream": _streamer(Client(cluster.all_addresses()), ns),
                "async stream": _async_streamer(cluster.all_addresses(), ns),
            }
        )
        for kind in load.ids:
            load.wait_for(kind, 20)
        old = cluster.leader
        old_address = cluster.address(old)
        assert all(c.leader == old_address for c in clients.values())
        t0 = time.monotonic()
        if how == "graceful":
            stopper = threading.Thread(target=old.stop)  # hands leadership over, then drains (slow)
            stopper.start()
        else:
            cluster.kill(old.node.node_id)
        counts = {k: len(v) for k, v in load.ids.items()}
        new = cluster.wait_leader(exclude=old.node.node_id)
        elected = time.monotonic() - t0
        resumed = {}
        for kind in load.ids:
            load.wait_for(kind, counts[kind] + 5)
            resumed[kind] = time.monotonic() - t0
        for c in clients.values():
            assert c.leader == cluster.address(new)
        print(
            f"\n{how} leader stop: node {new.node.node_id} leads after {elected * 1000:.0f} ms; clients resumed: "
            + ", ".join(f"{k} {t * 1e3:.0f} ms (longest gap {load.slowest[k] * 1e3:.0f} ms)"
                        for k, t in resumed.items())
        )
        load.finish()
        if how == "graceful":
            cluster.stopped.add(old.node.node_id)
            stopper.join(30)
        c = clients["sync"]
        all_ids = [mid for ids in load.ids.values() for mid in ids]
        assert len(set(all_ids)) == len(all_ids)
        assert c.stats()["namespaces"][ns]["messages"] == len(all_ids)  # each stored exactly once
        assert sorted(all_ids) == [s.message_id for s in c.list(namespace=ns, limit=100_000)]
    finally:
        for c in clients.values():
            c.close()


def test_failover_graceful_stop(fresh_cluster: Cluster) -> None:
    _failover(fresh_cluster, "graceful")


def test_failover_crash_then_dead_cluster(fresh_cluster: Cluster) -> None:
    _failover(fresh_cluster, "crash")
    fresh_cluster.close()
    for kind in KINDS:
        c = make_client(kind, fresh_cluster.all_addresses(), timeout=1.0)
        try:
            t = time.monotonic()
            with pytest.raises(Unavailable):
                c.stats()
            elapsed = time.monotonic() - t
            t = time.monotonic()
            with pytest.raises(Unavailable):
                list(c.enqueue_stream([_msg("x")]))
            elapsed_stream = time.monotonic() - t
        finally:
            c.close()
        print(f"\n{kind}: all nodes down: Unavailable after {elapsed:.2f} s (stream {elapsed_stream:.2f} s)")
        assert 0.9 < elapsed < 2.0 and 0.9 < elapsed_stream < 2.0


def test_bad_addresses() -> None:
    with pytest.raises(InvalidArgument):
        Client([])
    with pytest.raises(InvalidArgument):
        Client(["127.0.0.1:1", ""])
    with contextlib.closing(Client("127.0.0.1:1, 127.0.0.1:2", timeout=0.3)) as c:
        assert c.addresses == ["127.0.0.1:1", "127.0.0.1:2"]
        with pytest.raises(Unavailable):
            c.status()


def test_compliance_arguments_of_the_wrong_type_are_invalid_before_any_call() -> None:
    # no node listens there: each refusal happens while building the request, in the embedded
    # store's words (tests/test_client_policy.py compares them with the store's)
    with Client("127.0.0.1:9", timeout=1) as c:
        with pytest.raises(InvalidArgument, match=r"^retention_days must be a number of seconds"):
            c.set_policy("finance", mode="compliance", retention_days="seven years")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match=r"^until must be epoch seconds or a datetime"):
            c.extend_retention("01M8XEP1JTA8SSGH0VGEGBCJ1V", until="soon")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match=r"^limit must be an integer"):
            c.audit_records(limit="all")  # type: ignore[arg-type]


def test_durations_under_a_millisecond_are_refused_before_anything_is_sent() -> None:
    """As the embedded store refuses them: 0 ms would mean "the default" on the wire."""
    with Client(["127.0.0.1:1"], timeout=1) as client:  # nothing listens there: nothing may be sent
        with pytest.raises(InvalidArgument, match=r"^lease_seconds must be at least 1 ms"):
            client.lease(worker="w", lease_seconds=0.0004)
        with pytest.raises(InvalidArgument, match=r"expires_in must be at least 1 ms"):
            client.enqueue(mail_from="a@example.org", recipients=["b@example.net"], data=b"x", expires_in=0.0004)
        with pytest.raises(InvalidArgument, match=r"^a message id is not valid Unicode"):
            client.get("\ud800")
