"""Security of nodes, with real TLS: who may connect (plaintext, a wrong CA, an expired or foreign
certificate, a wrong node identity are refused), who may do what (tokens and client certificates
map to roles, per namespace; every refusal changes nothing and is audited), tokens at rest,
configuration checks and the ``certs`` / ``tokens`` / ``config check`` commands."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import io
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory

from mqstore import cli
from mqstore.actor import Actor
from mqstore.client import AsyncClient, Client
from mqstore.compliance import audit
from mqstore.config import ConfigError, load, parse
from mqstore.crypto import create_key_file
from mqstore.errors import InvalidArgument, PermissionDenied, Unauthenticated, Unavailable
from mqstore.node.runtime import bootstrap
from mqstore.ops import remote
from mqstore.proto import admin_pb2, compliance_pb2, queue_pb2, queue_pb2_grpc, raft_pb2, raft_pb2_grpc
from mqstore.security import auth
from mqstore.security.certs import identity_from_pem
from mqstore.security.tokens import TokenStore
from mqstore.testing.cluster import free_port, wait_until
from mqstore.testing.secure import InProcessCluster, Pki

MAIL = b"From: a@example.org\r\nSubject: hi\r\n\r\nhello\r\n"


def _msg(ns: str = "default", i: int = 0) -> dict[str, Any]:
    return {"mail_from": "a@example.org", "recipients": [f"r{i}@example.net"], "data": MAIL, "namespace": ns}


class Node:
    """One TLS node with a tokens file."""

    def __init__(self, root: Path) -> None:
        self.pki = Pki(root / "pki")
        self.tokens_file = root / "tokens.json"
        store = TokenStore(self.tokens_file, create=True)
        self.tokens = {
            "producer": store.add("mta-1", ["producer"]),
            "worker": store.add("worker-1", ["worker"]),
            "admin": store.add("ops", ["admin", "reader"]),
            "alpha-reader": store.add("alpha-reader", ["reader", "worker"], ["alpha"]),
            "reader": store.add("reader-1", ["reader"]),
            "compliance": store.add("officer", ["compliance"]),
            "alpha-producer": store.add("alpha-mta", ["producer"], ["alpha"]),
        }
        self.store = store
        self.cluster = InProcessCluster(root / "cluster", ["a"], pki=self.pki,
                                        extra={"auth": {"tokens_file": str(self.tokens_file)}})
        self.server = self.cluster.leader()
        self.address = self.cluster.address(1)
        self.certs = {
            "producer": self.pki.client("mta-cert", ["producer"]),
            "admin": self.pki.client("admin-cert", ["admin", "reader", "worker", "producer"]),
            "plain": self.pki.client("no-roles", []),
        }

    def client(self, cert: str = "plain", token: str | None = None, timeout: float = 5.0) -> Client:
        return Client(self.address, timeout=timeout, tls=self.pki.client_tls(self.certs[cert]),
                      token=self.tokens[token] if token else None)

    def denials(self) -> list[dict[str, Any]]:
        """The node's audit records of refused calls, oldest first."""
        records: list[dict[str, Any]] = self.server.queue.audit_query(where={"outcome": "denied"})
        return records

    def stats(self) -> dict[str, Any]:
        with self.client("admin") as c:
            return c.stats()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = Node(tmp_path_factory.mktemp("secure"))
    try:
        yield n
    finally:
        n.cluster.close()


# --- who may connect -----------------------------------------------------------------------------------


def test_plaintext_client_is_refused(node: Node) -> None:
    with Client(node.address, timeout=1.5) as c, pytest.raises(Unavailable):
        c.stats()
    channel = grpc.insecure_channel(node.address)
    with pytest.raises(grpc.RpcError) as err:
        queue_pb2_grpc.QueueStub(channel).Stats(queue_pb2.StatsRequest(), timeout=2)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    channel.close()


def test_client_without_certificate_is_refused(node: Node) -> None:
    # The Client says so at once (a token alone does not help) ...
    with pytest.raises(InvalidArgument, match="require a client certificate"), \
            Client(node.address, timeout=1.5, tls=node.pki.client_tls(None), token="any") as c:
        c.stats()
    # ... and the node refuses the handshake of any client without one.
    ca = node.pki.ca_pem.read_bytes()
    admin = node.certs["admin"]

    def stats(creds: grpc.ChannelCredentials) -> None:
        with grpc.secure_channel(node.address, creds) as channel:
            queue_pb2_grpc.QueueStub(channel).Stats(queue_pb2.StatsRequest(), timeout=5)

    stats(grpc.ssl_channel_credentials(ca, admin.key.read_bytes(), admin.cert.read_bytes()))  # with one: served
    with pytest.raises(grpc.RpcError) as err:
        stats(grpc.ssl_channel_credentials(ca))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_wrong_ca_is_refused(node: Node, tmp_path: Path) -> None:
    other = Pki(tmp_path / "other")
    foreign = other.client("intruder", ["admin"])
    # Client files that do not fit together (a certificate another CA signed, or a CA file that is
    # not the nodes' CA): refused at once, naming the file (until stop 30: Unavailable after the
    # whole timeout, the nodes refusing the handshake).
    with pytest.raises(InvalidArgument, match="is not signed by the CA in"):
        Client(node.address, timeout=1.5, tls=node.pki.client_tls(foreign))
    with pytest.raises(InvalidArgument, match="is not signed by the CA in"):
        Client(node.address, timeout=1.5, tls=node.pki.client_tls(node.certs["admin"], ca=other.ca_pem))
    # A client of another CA altogether: the node refuses its certificate, it refuses the node's.
    with Client(node.address, timeout=1.5, tls=other.client_tls(foreign)) as c, pytest.raises(Unavailable):
        c.stats()


def test_expired_certificate_is_refused(node: Node) -> None:
    expired = node.pki.client("old-admin", ["admin", "reader"], expired=True)
    with pytest.raises(InvalidArgument, match="not now"):  # at once (until stop 30: Unavailable after the timeout)
        Client(node.address, timeout=1.5, tls=node.pki.client_tls(expired))


#: ``from`` is a Python keyword: Raft messages take it as a keyword argument this way.
_FROM_NODE_2: dict[str, Any] = {"from": 2}


def test_client_certificate_cannot_speak_raft(node: Node) -> None:
    pair = node.certs["admin"]
    channel = node.pki.channel(node.address, pair)
    msg = raft_pb2.RaftMessage(to=1, cluster_id="test", **_FROM_NODE_2)
    with pytest.raises(grpc.RpcError) as err:
        raft_pb2_grpc.RaftStub(channel).Send(iter([msg]), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "only cluster nodes" in (err.value.details() or "")
    channel.close()


def test_a_node_certificate_must_name_the_sender(node: Node) -> None:
    pair = node.pki.node(3)
    channel = node.pki.channel(node.address, pair)
    before = node.server.node.raw.term
    msg = raft_pb2.RaftMessage(to=1, cluster_id="test", term=before + 5, type=1, **_FROM_NODE_2)  # claims node 2
    with pytest.raises(grpc.RpcError) as err:
        raft_pb2_grpc.RaftStub(channel).Send(iter([msg]), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "names node 3" in (err.value.details() or "")
    chunk = raft_pb2.SnapshotChunk(cluster_id="test", to=1, **_FROM_NODE_2)
    with pytest.raises(grpc.RpcError) as err:
        raft_pb2_grpc.RaftStub(channel).InstallSnapshot(iter([chunk]), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert node.server.node.raw.term == before  # the forged message never reached the core
    channel.close()


# --- who may do what -----------------------------------------------------------------------------------


def test_producer_token_cannot_lease_or_delete(node: Node) -> None:
    with node.client(token="producer") as c:
        mid = c.enqueue(**_msg())
        before = node.stats()
        seen = len(node.denials())
        with pytest.raises(PermissionDenied, match="needs the 'lease' permission"):
            c.lease("w1")
        with pytest.raises(PermissionDenied, match="needs the 'delete' permission"):
            c.delete(mid)
        with pytest.raises(PermissionDenied, match="'read' permission"):
            c.get(mid)
    assert node.stats()["recipients"] == before["recipients"]  # nothing changed
    denied = node.denials()[seen:]  # each refusal is in the audit log, with who and what
    assert [(r["actor"], r["auth"], r["op"]) for r in denied] == [
        ("mta-1", "token", "Queue/Lease"), ("mta-1", "token", "Queue/Delete"), ("mta-1", "token", "Queue/Get")]
    assert all("permission" in r["reason"] for r in denied)
    with node.client("admin") as c:
        assert c.get(mid).message_id == mid  # still there


def test_worker_cannot_hold_or_bypass(node: Node) -> None:
    with node.client(token="producer") as c:
        mid = c.enqueue(**_msg())
    seen = len(node.denials())
    with node.client(token="worker") as c:
        with pytest.raises(PermissionDenied, match="needs the 'hold' permission"):
            c.hold(mid)
        with pytest.raises(PermissionDenied, match="'policy' permission"):
            c.set_namespace_policy("default", lifetime=60)
    with node.client("admin") as c:
        # Checked before the worker acks it: once delivered, housekeeping may remove it any time.
        assert not c.get(mid).held
    with node.client(token="worker") as c:
        leases = c.lease("w1", max_messages=1000)
        assert leases
        for lease in leases:
            c.ack(lease.token)
    worker = Actor("worker-1", frozenset({"worker"}), auth="token")
    with pytest.raises(PermissionDenied, match="bypass_governance"):
        node.server.authorize(worker, "bypass_governance", "default")
    assert [r["op"] for r in node.denials()[seen:]] == ["Queue/Hold", "Queue/SetNamespacePolicy"]


def test_tokens_ride_on_every_kind_of_call_sync_and_async(node: Node) -> None:
    """A bearer token is sent on unary calls and on streams, by Client and by AsyncClient (each
    has its own interceptors): a producer token streams messages in, a worker token leases and
    acks them, an admin token reads a node's verify stream; a token without the role is refused."""
    ns = "tokens"
    with node.client(token="producer") as c:
        streamed = list(c.enqueue_stream(_msg(ns, i) for i in range(5)))  # stream-stream
    assert len(streamed) == 5
    with node.client(token="admin") as c:
        events = list(remote.stub(c, node.address).Verify(admin_pb2.VerifyRequest(), timeout=30))  # unary-stream
    assert events and json.loads(events[-1].report_json)["clean"]

    async def main() -> list[str]:
        tls = node.pki.client_tls(node.certs["plain"])
        async with AsyncClient(node.address, timeout=5, tls=tls, token=node.tokens["producer"]) as producer:
            one = await producer.enqueue(**_msg(ns, 10))  # unary-unary
            more = [mid async for mid in producer.enqueue_stream([_msg(ns, 11 + i) for i in range(3)])]
            with pytest.raises(PermissionDenied, match="'lease' permission"):
                await producer.lease("w", namespace=ns)
        async with AsyncClient(node.address, timeout=5, tls=tls, token=node.tokens["worker"]) as worker:
            leases = await worker.lease("w", max_messages=100, namespace=ns)
            await worker.ack_many([x.token for x in leases])
            return sorted([one, *more]) + sorted(x.message_id for x in leases)

    ids = asyncio.run(main())
    assert len(ids) == 4 + 9 and set(ids[:4]) <= set(ids[4:]) and set(streamed) <= set(ids[4:])


@pytest.mark.parametrize("token, ns", [("producer", "default"), ("alpha-producer", "alpha")])
def test_async_stream_needs_only_the_enqueue_permission(node: Node, token: str, ns: str) -> None:
    """AsyncClient.enqueue_stream as a client's first call, with a producer-only token and with one
    limited to a namespace: it streams, as the blocking client does (it once asked Stats for the
    leader first, which needs 'read' in every namespace)."""
    seen = len(node.denials())

    async def main() -> list[str]:
        tls = node.pki.client_tls(node.certs["plain"])
        async with AsyncClient(node.address, timeout=5, tls=tls, token=node.tokens[token]) as c:
            return [mid async for mid in c.enqueue_stream([_msg(ns, i) for i in range(3)])]

    ids = asyncio.run(main())
    assert len(ids) == 3
    with node.client("admin") as c:
        assert {c.get(mid).namespace for mid in ids} == {ns}
    assert node.denials()[seen:] == []


def test_client_certificate_roles(node: Node) -> None:
    with node.client("producer") as c:
        c.enqueue(**_msg())
        with pytest.raises(PermissionDenied) as err:
            c.stats()
    assert "'mta-cert' (mtls, roles producer)" in str(err.value)
    with node.client("plain") as c, pytest.raises(PermissionDenied, match="roles none"):
        c.enqueue(**_msg())


def test_unknown_and_revoked_tokens_are_unauthenticated(node: Node) -> None:
    seen = len(node.denials())
    tls = node.pki.client_tls(node.certs["plain"])
    with Client(node.address, timeout=5, tls=tls, token="mqs_not-a-token") as c, \
            pytest.raises(Unauthenticated, match="unknown or revoked token"):
        c.stats()
    temp = node.store.add("temp", ["reader"])
    c = Client(node.address, timeout=5, tls=node.pki.client_tls(node.certs["plain"]), token=temp)
    try:
        assert wait_until(lambda: not _refused(c), timeout=5)  # nodes read the tokens file within a second
        node.store.remove("temp")
        assert wait_until(lambda: _refused(c), timeout=5)
    finally:
        c.close()
    denied = node.denials()[seen:]
    assert denied and all(r["actor"] == "unauthenticated" for r in denied)
    assert any("unknown or revoked token" in r["reason"] for r in denied)


def _refused(c: Client) -> bool:
    try:
        c.stats()
    except Unauthenticated:
        return True
    return False


def test_namespace_limited_actor(node: Node) -> None:
    with node.client(token="admin") as c, pytest.raises(PermissionDenied):  # admin may not enqueue
        c.enqueue(**_msg("alpha"))
    with node.client("admin") as c:
        alpha = c.enqueue(**_msg("alpha", 1))
        beta = c.enqueue(**_msg("beta-tenant", 2))
    seen = len(node.denials())
    with node.client(token="alpha-reader") as c:
        assert c.get(alpha).namespace == "alpha"
        assert c.list(namespace="alpha").__len__() >= 1
        # A message of another namespace and one that does not exist are refused alike: the
        # refusal names neither the other namespace nor whether the message exists.
        with pytest.raises(PermissionDenied) as elsewhere:
            c.get(beta)
        with pytest.raises(PermissionDenied) as unknown:
            c.get("0" * 26)
        generic = "was not found, or is not in the namespaces this identity may use"
        assert generic in str(elsewhere.value) and "beta" not in str(elsewhere.value)
        assert str(elsewhere.value).replace(beta, "0" * 26) == str(unknown.value)
        with pytest.raises(PermissionDenied, match="name one"):
            c.list()
        with pytest.raises(PermissionDenied, match="name one"):
            c.lease("w")
        with pytest.raises(PermissionDenied, match="needs the 'hold' permission"):  # not its role at all
            c.hold(beta)
        leases = c.lease("w", namespace="alpha")
        assert {x.namespace for x in leases} == {"alpha"}
        for lease in leases:
            c.ack(lease.token)
    with node.client("admin") as c:
        lease = c.lease("w", namespace="beta-tenant")[0]
    with node.client(token="alpha-reader") as c:
        with pytest.raises(PermissionDenied, match=generic) as acked:
            c.ack(lease.token)
        with pytest.raises(PermissionDenied, match=generic) as expired:
            c.ack(2**40)  # no such lease
    assert "beta" not in str(acked.value) and "beta" not in str(expired.value)
    # The audit log keeps what happened.
    reasons = [r["reason"] for r in node.denials()[seen:] if r["actor"] == "alpha-reader"]
    assert len(reasons) == 7  # get, get, list, lease, hold, ack, ack
    assert "may not act in namespace 'beta-tenant'" in reasons[0] and "not known here" in reasons[1]
    assert "may not act in namespace 'beta-tenant'" in reasons[5] and "not known here" in reasons[6]


def _proto_methods() -> list[tuple[str, Any]]:
    """Every RPC of mqstore's protos, as ``(/package.Service/Method, method descriptor)``."""
    found = []
    for module in (admin_pb2, compliance_pb2, queue_pb2, raft_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            found += [(f"/{service.full_name}/{m.name}", m) for m in service.methods]
    return found


def test_every_rpc_of_every_service_has_its_own_rule() -> None:
    """No RPC falls to UNKNOWN_METHOD (which made the whole Compliance service admin-only), and
    each rule's namespace and key extractors work on its request type."""
    methods = _proto_methods()
    assert {p.split("/")[1] for p, _ in methods} == {"mqstore.v1.Admin", "mqstore.v1.Compliance",
                                                      "mqstore.v1.Queue", "mqstore.v1.Raft"}
    missing = [p for p, _ in methods if p not in auth.METHODS]
    assert missing == [], f"RPCs without a rule in mqstore/security/auth.py METHODS: {missing}"
    for path, m in methods:
        rule = auth.method_rule(path)
        assert rule.kind == ("peer" if "/mqstore.v1.Raft/" in path else "client"), path
        request = message_factory.GetMessageClass(m.input_type)()
        if rule.namespaces is not None:
            rule.namespaces(request)
        if rule.lookup:
            assert rule.keys is not None, path
            rule.keys(request)


def test_compliance_role_uses_the_compliance_service_and_a_reader_does_not(node: Node) -> None:
    with node.client("admin") as c:
        mid = c.enqueue(**_msg("default", 7))
    seen = len(node.denials())
    with node.client(token="compliance") as c:
        c.add_legal_hold(mid, case="SEC-7")
        with node.client("admin") as admin:
            assert admin.get(mid).legal_holds == ("SEC-7",)
        head = c.audit_head()
        assert head > 0
        assert c.audit_query(where={"op": "legal_hold", "target": mid})[0]["actor"] == "officer"
        assert c.audit_records(after=head - 1, limit=5)[0]["seq"] == head
        c.remove_legal_hold(mid, case="SEC-7")
    with node.client(token="reader") as c:
        assert c.get(mid).legal_holds == ()  # a reader reads messages...
        with pytest.raises(PermissionDenied, match="needs the 'legal_hold' permission \\(role compliance\\)"):
            c.add_legal_hold(mid, case="SEC-8")
        with pytest.raises(PermissionDenied, match="needs the 'audit' permission \\(role compliance\\)"):
            c.audit_records(limit=5)  # ...but not who did what
        with pytest.raises(PermissionDenied, match="'audit' permission"):
            c.audit_head()
        shape = remote.state_shape(c, None, "queued")  # `mqstore qshape --state queued`
        assert isinstance(shape, dict)
        assert c.get(mid).legal_holds == ()
    denied = node.denials()[seen:]
    assert [(r["actor"], r["op"]) for r in denied] == [
        ("reader-1", "Compliance/AddLegalHold"), ("reader-1", "Compliance/AuditRecords"),
        ("reader-1", "Compliance/AuditHead")]


def test_current_actor_is_set_while_the_queue_runs(node: Node) -> None:
    seen: list[Actor | None] = []
    queue = node.server.queue
    original = queue.stats

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(auth.current_actor.get())
        return original(*args, **kwargs)

    queue.stats = spy
    try:
        with node.client(token="admin") as c:
            c.stats()
    finally:
        del queue.stats
    assert [a.name if a else None for a in seen] == ["ops"]
    assert auth.current_actor.get() is None


# --- a TLS cluster -------------------------------------------------------------------------------------


def test_tls_cluster_replicates_and_refuses_a_wrong_node_identity(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    impostor = pki.node(9, prefix="impostor")
    key = create_key_file(tmp_path / "kek.key")
    ports = {i: free_port() for i in (1, 2, 3)}
    sites = {1: "a", 2: "b", 3: "c"}
    configs = {}
    for i in (1, 2, 3):
        cfg = parse({
            "node_id": i, "site": sites[i], "listen": f"127.0.0.1:{ports[i]}", "data_dir": str(tmp_path / f"n{i}"),
            "key_file": str(key), "tls": pki.node_tls(i),
            "peers": [{"id": j, "site": sites[j], "address": f"127.0.0.1:{ports[j]}"} for j in (1, 2, 3) if j != i],
        })
        if i == 3:  # node 3 presents node 9's certificate (config validation would refuse it)
            assert cfg.tls is not None
            cfg = dataclasses.replace(cfg, tls=dataclasses.replace(cfg.tls, cert=impostor.cert, key=impostor.key))
        configs[i] = cfg
    from mqstore.server import NodeServer

    servers = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in (1, 2, 3):
            bootstrap(configs[i], "test")
            servers[i] = NodeServer(configs[i])
    for s in servers.values():
        s.start()
    try:
        assert wait_until(lambda: any(servers[i].node.is_leader for i in (1, 2)), timeout=20)
        admin = pki.client("admin", ["admin", "producer", "reader"])
        with Client([f"127.0.0.1:{ports[i]}" for i in (1, 2)], timeout=10, tls=pki.client_tls(admin)) as c:
            ids = c.enqueue_many([_msg(i=i) for i in range(20)])
        assert len(ids) == 20
        leader = next(servers[i] for i in (1, 2) if servers[i].node.is_leader)
        follower = servers[3 - leader.node.node_id]
        assert wait_until(lambda: follower.node.applied_index >= leader.node.applied_index, timeout=10)
        time.sleep(0.5)
        # Node 3 (certificate of node 9) gets nothing: its peers refuse it both ways.
        assert servers[3].node.applied_index < leader.node.applied_index
        assert servers[3].node.leader_id == 0 or not servers[3].node.is_leader
    finally:
        for s in servers.values():
            s.grpc.stop(0)
            s.health.stop()
            s.queue.close()
            s.node.stop(transfer_leadership=False)


# --- configuration -------------------------------------------------------------------------------------


def _base(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {"node_id": 1, "site": "a", "listen": "127.0.0.1:7001", "data_dir": str(tmp_path / "d"), **extra}


def test_config_requires_tls_or_an_explicit_insecure(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="TLS is required: set \\[tls\\] ca, cert and key"):
        parse(_base(tmp_path))
    assert parse(_base(tmp_path, insecure=True)).insecure
    with pytest.raises(ConfigError, match="insecure must be true or false"):
        parse(_base(tmp_path, insecure="yes"))


def test_config_checks_the_tls_material(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    good = pki.node_tls(1)
    assert parse(_base(tmp_path, tls=good)).tls is not None
    pki.node(2)
    cases = [
        ({**good, "cert": str(tmp_path / "pki" / "node-2.pem"), "key": str(tmp_path / "pki" / "node-2.key")},
         "names node 2, but node_id is 1"),
        ({**good, "key": str(tmp_path / "pki" / "node-2.key")}, "tls.key: .* is not the key of the certificate"),
        ({**good, "ca": str(Pki(tmp_path / "other").ca_pem)}, "tls.cert: .* is not signed by the CA"),
        ({**good, "cert": str(tmp_path / "missing.pem")}, "tls.cert: cannot read"),
        ({"ca": good["ca"], "cert": good["cert"]}, "tls: missing 'key'"),
        ({**good, "bogus": 1}, "tls: unknown key"),
    ]
    for tls, message in cases:
        with pytest.raises(ConfigError, match=message):
            parse(_base(tmp_path, tls=tls))
    old = pki.ca.issue_node(1, tmp_path / "old", not_after=datetime.datetime.now(datetime.UTC))
    with pytest.raises(ConfigError, match="not now"):
        parse(_base(tmp_path, tls={**good, "cert": str(old.cert), "key": str(old.key)}))
    with pytest.raises(ConfigError, match="insecure = true and a \\[tls\\] table"):
        parse(_base(tmp_path, tls=good, insecure=True))


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"limits": {"message_bytes_max": 0}}, "limits.message_bytes_max must be an integer"),
        ({"limits": {"recipients_max": 5000}}, "limits.recipients_max must be an integer 1..1000"),
        ({"limits": {"deadline_required": "no"}}, "limits.deadline_required must be true or false"),
        ({"limits": {"requests_per_second": 10, "requests_burst": 5}}, "requests_burst must be >="),
        ({"limits": {"bogus": 1}}, "limits: unknown key"),
        ({"auth": {"clients": [{"name": "x", "roles": ["root"]}]}}, "auth.clients\\[0\\].roles: unknown role"),
        ({"auth": {"clients": [{"name": "x"}]}}, "auth.clients\\[0\\]: needs name and roles"),
        ({"auth": {"anonymous": 1}}, "auth.anonymous must be true or false"),
        ({"metrics": {"listen": "nowhere"}}, "metrics.listen must be 'host:port'"),
        ({"health": {"disk_free_min_percent": 200}}, "health.disk_free_min_percent must be a number 0..100"),
        ({"tls": "yes"}, "tls must be a table"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(_base(tmp_path, insecure=True, **extra))


def _cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = cli.main(list(args))
    return code, out.getvalue()


def test_certs_tokens_and_config_check_commands(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    assert _cli("certs", "init", "--dir", str(d))[0] == 0
    assert (d / "ca.key").stat().st_mode & 0o777 == 0o600
    assert _cli("certs", "init", "--dir", str(d))[0] == 2  # never replaced by accident
    assert _cli("certs", "issue", "node", "--dir", str(d), "--id", "1", "--host", "mq1.example.net",
                "--host", "10.0.0.5")[0] == 0
    code, out = _cli("certs", "issue", "client", "--dir", str(d), "--name", "mta-1", "--roles", "producer",
                     "--namespaces", "default,bulk", "--json")
    assert code == 0
    ident = identity_from_pem(Path(json.loads(out)["cert"]).read_bytes())
    assert ident is not None and ident.name == "mta-1" and ident.roles == frozenset({"producer"})
    assert ident.namespaces == frozenset({"default", "bulk"})
    assert _cli("certs", "issue", "client", "--dir", str(d), "--name", "x", "--roles", "root")[0] == 2

    tokens = tmp_path / "tokens.json"
    code, out = _cli("tokens", "add", "mta-2", "--file", str(tokens), "--roles", "producer,worker", "--json")
    token = json.loads(out)["token"]
    assert code == 0 and token.startswith("mqs_")
    assert token not in tokens.read_text()  # hashed at rest
    assert tokens.stat().st_mode & 0o777 == 0o600
    code, out = _cli("tokens", "list", "--file", str(tokens), "--json")
    assert [t["name"] for t in json.loads(out)] == ["mta-2"] and "digest" not in out
    assert TokenStore(tokens).lookup(token) is not None
    assert _cli("tokens", "add", "mta-2", "--file", str(tokens), "--roles", "producer")[0] == 2  # no duplicates
    assert _cli("tokens", "remove", "mta-2", "--file", str(tokens))[0] == 0
    assert TokenStore(tokens).lookup(token) is None
    assert _cli("tokens", "remove", "mta-2", "--file", str(tokens))[0] == 2

    cfg = tmp_path / "node.toml"
    cfg.write_text(
        f'node_id = 1\nsite = "a"\nlisten = "127.0.0.1:7001"\ndata_dir = "{tmp_path / "data"}"\n'
        f'[tls]\nca = "{d / "ca.pem"}"\ncert = "{d / "node-1.pem"}"\nkey = "{d / "node-1.key"}"\n'
        f'[auth]\ntokens_file = "{tokens}"\n[metrics]\nlisten = "127.0.0.1:9464"\n'
    )
    code, out = _cli("config", "check", str(cfg), "--json")
    assert code == 0 and json.loads(out)["tls"] is True and json.loads(out)["tokens"] == 0
    cfg.write_text(cfg.read_text().replace('site = "a"', 'site = "a"\nlimits = 3'))
    code, _ = _cli("config", "check", str(cfg))
    assert code == 2
    with pytest.raises(ConfigError, match="limits must be a table"):
        load(cfg)


def test_serve_says_loudly_that_it_is_insecure(tmp_path: Path) -> None:
    key = create_key_file(tmp_path / "k")
    path = tmp_path / "node.toml"
    path.write_text(
        f'node_id = 1\nsite = "a"\nlisten = "127.0.0.1:{free_port()}"\ndata_dir = "{tmp_path / "d"}"\n'
        f'key_file = "{key}"\ninsecure = true\nlog_json = true\n'
    )
    bootstrap(load(path), "t")
    proc = subprocess.Popen([sys.executable, "-m", "mqstore", "serve", "--config", str(path)],
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        assert proc.stderr is not None
        for line in proc.stderr:  # until the node logs that it leads (a JSON line)
            lines.append(line)
            if line.startswith("{") and "leader in term" in line:
                break
        text = "".join(lines)
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    records = [json.loads(x) for x in text.splitlines() if x.startswith("{")]
    assert records, "log_json = true writes JSON lines"
    assert [r for r in records if r["level"].lower() == "warning" and r["message"].startswith("INSECURE")
            and "PLAINTEXT" in r["message"]], text
    assert all(r["node_id"] == 1 and "term" in r and "request_id" in r and r["level"] for r in records)
    assert records[-1]["term"] >= 1


def test_invalid_argument_is_not_permission(node: Node) -> None:
    with node.client("admin") as c, pytest.raises(InvalidArgument):
        c.enqueue("not an address", ["b@example.net"], MAIL)


def test_cli_against_a_tls_node_takes_credentials_from_the_environment(node: Node) -> None:
    admin = node.certs["admin"]
    env = {**os.environ, "MQSTORE_CA": str(node.pki.ca_pem), "MQSTORE_CERT": str(admin.cert),
           "MQSTORE_KEY": str(admin.key)}
    with node.client(token="producer") as c:
        mid = c.enqueue(**_msg())

    def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mqstore", *args, "--server", node.address, "--json",
                               "--timeout", "3"],
                              capture_output=True, text=True, timeout=60, env=env)

    shown = run("message", "show", mid, env=env)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["message_id"] == mid
    # a producer's token (over TLS, with a certificate that carries no roles) may not look
    plain = node.certs["plain"]
    producer = {**env, "MQSTORE_CERT": str(plain.cert), "MQSTORE_KEY": str(plain.key),
                "MQSTORE_TOKEN": node.tokens["producer"]}
    refused = run("message", "show", mid, env=producer)
    assert refused.returncode != 0, refused.stdout
    error = json.loads(refused.stdout)
    assert error["error"] == "PermissionDenied" and "'read' permission" in error["message"], error
    # and without the CA nothing gets through
    bare = {k: v for k, v in env.items() if not k.startswith("MQSTORE_")}
    assert run("message", "show", mid, env=bare).returncode != 0


def test_a_refusal_at_a_followers_edge_is_audited_by_the_leader(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    tokens_file = tmp_path / "tokens.json"
    producer = TokenStore(tokens_file, create=True).add("mta-7", ["producer"])
    cluster = InProcessCluster(tmp_path / "cluster", ["a", "b", "c"], pki=pki,
                               extra={"auth": {"tokens_file": str(tokens_file)}})
    try:
        leader = cluster.leader()
        follower = next(i for i, s in cluster.servers.items() if s is not leader)
        # a client that talks to that follower only: its edge refuses before any redirect
        with Client(cluster.address(follower), timeout=5, tls=pki.client_tls(pki.client("plain", [])),
                    token=producer) as c, pytest.raises(PermissionDenied, match="'lease' permission"):
            c.lease("w1")

        def denials(server: Any) -> list[dict[str, Any]]:  # from the node's own applied state
            with server.node.read_state() as kv:
                return audit.query(kv, where={"outcome": "denied", "actor": "mta-7"})

        assert wait_until(lambda: len(denials(leader)) == 1, timeout=10), "the leader never audited the refusal"
        (record,) = denials(leader)
        assert (record["op"], record["auth"], record["node"]) == ("Queue/Lease", "token", follower)
        assert "'lease' permission" in record["reason"]
        # replicated like any audit record
        assert wait_until(lambda: all(denials(s) == [record] for s in cluster.servers.values()), timeout=10)
    finally:
        cluster.close()
