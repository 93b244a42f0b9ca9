"""Permissions at a TLS node's edge that the rules table alone did not make plain: the raw log
(Admin.ReadRecords, audit records included) is for the ``audit`` permission and for peers, and a
request naming no namespace still needs its permission."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from mqstore.proto import admin_pb2, admin_pb2_grpc, queue_pb2, queue_pb2_grpc
from mqstore.security.certs import CertPair
from mqstore.security.tokens import TokenStore
from mqstore.server import AdminService
from mqstore.testing.cluster import wait_until
from mqstore.testing.secure import InProcessCluster, Pki, status_of

ROLES = {
    "ops": (["admin", "reader"], None),
    "officer": (["compliance"], None),
    "reader": (["reader"], None),
    "alpha-reader": (["reader"], ["alpha"]),
    "producer": (["producer"], None),
}


class Cluster:
    """Two TLS nodes with a tokens file."""

    def __init__(self, root: Path) -> None:
        self.pki = Pki(root / "pki")
        store = TokenStore(root / "tokens.json", create=True)
        self.tokens = {name: store.add(name, roles, ns) for name, (roles, ns) in ROLES.items()}
        extra: dict[str, Any] = {"auth": {"tokens_file": str(root / "tokens.json")}}
        self.cluster = InProcessCluster(root / "cluster", ["a", "b"], pki=self.pki, extra=extra)
        self.leader = self.cluster.leader()
        self.address = self.cluster.address(self.leader.node.node_id)
        self.plain = self.pki.client("no-roles", [])

    def channel(self, pair: CertPair | None = None, address: str | None = None) -> grpc.Channel:
        return self.pki.channel(address or self.address, pair or self.plain)


def _md(token: str) -> list[tuple[str, str]]:
    return [("authorization", "Bearer " + token)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("hardening"))
    try:
        yield c
    finally:
        c.cluster.close()


# --- Admin.ReadRecords: the raw log, audit records included -------------------------------------------


def test_raw_log_records_need_the_audit_permission_or_a_node_certificate(cluster: Cluster) -> None:
    """The raw records hold the audit log's entries (who was refused what, from where): an admin
    or a reader may not read them (as they may not read the audit log), a compliance officer
    may, and so may a node's certificate: a peer repairing its log still gets its copies."""
    # A denial to find in the raw log.
    with cluster.channel() as ch:
        assert status_of(lambda: queue_pb2_grpc.QueueStub(ch).Lease(
            queue_pb2.LeaseRequest(worker="w"), metadata=_md(cluster.tokens["producer"]), timeout=10))[0] == \
            "PERMISSION_DENIED"
    last = cluster.leader.node.raw.commit_index
    request = admin_pb2.ReadRecordsRequest(indices=list(range(1, last + 1)))
    with cluster.channel() as ch:
        stub = admin_pb2_grpc.AdminStub(ch)
        for who in ("ops", "reader"):
            code, details = status_of(lambda who=who: stub.ReadRecords(request, metadata=_md(cluster.tokens[who]),
                                                                   timeout=10))
            assert code == "PERMISSION_DENIED", (who, code, details)
            assert "'audit' permission (role compliance)" in details
        assert status_of(lambda: stub.ReadRecords(request, timeout=10))[0] == "PERMISSION_DENIED"  # no roles
        answer = stub.ReadRecords(request, metadata=_md(cluster.tokens["officer"]), timeout=10)
        assert b"needs the 'lease' permission" in b"".join(r.data for r in answer.records)
    # The other node, as a peer repairing damaged records asks it (its own node certificate).
    follower = next(s for s in cluster.cluster.servers.values() if s is not cluster.leader)
    wait_until(lambda: follower.node.raw.commit_index >= last, timeout=10)
    admin = AdminService(cluster.leader.node, cluster.leader.queue, cluster.leader.in_flight)
    found, notes = admin._peer_fetch(list(range(1, last + 1)))
    assert last in found, notes  # (the first records may be compacted behind a snapshot there)
    assert not any("PERMISSION_DENIED" in note for note in notes), notes


# --- a client certificate's empty namespace list ---------------------------------------------------


def _client_cert_with_uri(cluster: Cluster, uri: str, out: Path) -> CertPair:
    """A client certificate whose SAN URI is ``uri`` (as another PKI, or an older mqstore, may write it)."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from mqstore.security.certs import CA, _write_pair

    ca = CA.load(cluster.pki.root)
    cert, key = ca._issue("tenant-x", [x509.UniformResourceIdentifier(uri)], [ExtendedKeyUsageOID.CLIENT_AUTH], 30,
                          None, None)
    return _write_pair(cert, key, out / "tenant-x.pem", out / "tenant-x.key")


def test_a_certificate_with_an_empty_namespace_list_grants_no_namespace(cluster: Cluster, tmp_path: Path) -> None:
    """``namespaces=`` (blank) in a client certificate limits it to no namespace; it used to be
    read as "every namespace" (the blank value was dropped)."""
    from cryptography import x509

    from mqstore.security.certs import identity_of

    pair = _client_cert_with_uri(cluster, "mqstore://client/tenant-x?roles=admin,reader&namespaces=", tmp_path)
    ident = identity_of(x509.load_pem_x509_certificate(pair.cert.read_bytes()))
    assert ident is not None and ident.namespaces == frozenset()
    with cluster.channel(pair) as ch:
        stub = queue_pb2_grpc.QueueStub(ch)
        code, details = status_of(lambda: stub.Stats(queue_pb2.StatsRequest(), timeout=10))
        assert code == "PERMISSION_DENIED", (code, details)
        code, details = status_of(lambda: stub.List(queue_pb2.ListRequest(namespace="default"), timeout=10))
        assert code == "PERMISSION_DENIED", (code, details)
        assert "may not act in namespace 'default'" in details


def test_an_empty_namespace_list_is_refused_when_issuing_or_adding(cluster: Cluster, tmp_path: Path) -> None:
    import subprocess
    import sys

    from mqstore.errors import InvalidArgument
    from mqstore.security.certs import CA

    ca = CA.load(cluster.pki.root)
    with pytest.raises(InvalidArgument, match="an empty list would allow no namespace"):
        ca.issue_client("tenant-y", tmp_path, roles=["reader"], namespaces=[])
    store = TokenStore(tmp_path / "tokens.json", create=True)
    with pytest.raises(InvalidArgument, match="an empty list would allow no namespace"):
        store.add("tenant-y", ["reader"], [])
    for argv in (["certs", "issue", "client", "--dir", str(cluster.pki.root), "--name", "tenant-y", "--roles",
                  "reader", "--namespaces", ",", "--out", str(tmp_path)],
                 ["tokens", "add", "tenant-y", "--file", str(tmp_path / "tokens.json"), "--roles", "reader",
                  "--namespaces", ","]):
        run = subprocess.run([sys.executable, "-m", "mqstore", *argv], capture_output=True, text=True, timeout=60)
        assert run.returncode == 2, (argv, run.stdout, run.stderr)
        assert "an empty list would allow no namespace" in run.stderr
    assert not (tmp_path / "client-tenant-y.pem").exists()
    assert "tenant-y" not in (tmp_path / "tokens.json").read_text()


# --- AuditQuery with a where_json nested too deeply -------------------------------------------------


@pytest.mark.parametrize(("where", "said"), [
    ('{"actor": ' + "[" * 5000 + "]" * 5000 + "}", "nested too deeply"),
    ("[" * 100_000, "over the 65536 a query may have"),
])
def test_an_audit_query_nested_too_deeply_is_invalid_argument(cluster: Cluster, where: str, said: str) -> None:
    from mqstore.proto import compliance_pb2, compliance_pb2_grpc

    with cluster.channel() as ch:
        stub = compliance_pb2_grpc.ComplianceStub(ch)
        code, details = status_of(lambda: stub.AuditQuery(compliance_pb2.AuditQueryRequest(where_json=where),
                                                      metadata=_md(cluster.tokens["officer"]), timeout=10))
        assert code == "INVALID_ARGUMENT", (code, details)
        assert said in details
        # The node goes on answering queries.
        answer = stub.AuditQuery(compliance_pb2.AuditQueryRequest(where_json='{"outcome": "denied"}'),
                                 metadata=_md(cluster.tokens["officer"]), timeout=10)
        assert answer is not None


# --- a request naming no item still needs its permission ----------------------------------------------


def test_an_empty_enqueue_needs_the_enqueue_permission(cluster: Cluster) -> None:
    """An EnqueueBatch or EnqueueStream without messages names no namespace; it is refused with
    PERMISSION_DENIED (and audited) for an identity without ``enqueue``, as a full one is, not let
    through to the queue (an empty stream ended OK)."""
    before = len(cluster.leader.queue.audit_query(where={"outcome": "denied"}))
    with cluster.channel() as ch:
        stub = queue_pb2_grpc.QueueStub(ch)
        for who in ("reader", "alpha-reader"):
            md = _md(cluster.tokens[who])
            code, details = status_of(lambda md=md: stub.EnqueueBatch(queue_pb2.EnqueueBatchRequest(), metadata=md,
                                                                  timeout=10))
            assert code == "PERMISSION_DENIED", (who, code, details)
            assert "needs the 'enqueue' permission" in details
            code, details = status_of(lambda md=md: list(stub.EnqueueStream(
                iter([queue_pb2.EnqueueBatchRequest()] * 3), metadata=md, timeout=10)))
            assert code == "PERMISSION_DENIED", (who, code, details)
        # A producer's empty batch is not a permission problem.
        code, details = status_of(lambda: stub.EnqueueBatch(queue_pb2.EnqueueBatchRequest(),
                                                        metadata=_md(cluster.tokens["producer"]), timeout=10))
        assert code != "PERMISSION_DENIED", details
    wait_until(lambda: len(cluster.leader.queue.audit_query(where={"outcome": "denied"})) >= before + 4, timeout=10)


# --- a removed node's certificate -------------------------------------------------------------------


def test_a_removed_nodes_certificate_admits_it_no_more(tmp_path: Path) -> None:
    """A node's certificate lets a member read (repair fetches records from peers) and report
    its edge's denials for the audit log. Once the node is removed from the cluster (a machine
    decommissioned or compromised) the certificate on its disk admits it to nothing: before, it
    still read any namespace's mail and the raw log, and appended audit records."""
    from mqstore.actor import Actor
    from mqstore.compliance.rules import Ctx
    from mqstore.proto import raft_pb2, raft_pb2_grpc
    from mqstore.queue.model import DenialEntry

    pki = Pki(tmp_path / "pki")
    c = InProcessCluster(tmp_path / "cluster", ["a", "b", "c"], pki=pki)
    try:
        leader = c.leader()
        address = c.address(leader.node.node_id)
        ops = pki.client("ops", ["admin", "producer"])
        victim, member = (i for i in c.servers if i != leader.node.node_id)
        with pki.channel(address, ops) as ch:
            mid = queue_pb2_grpc.QueueStub(ch).Enqueue(queue_pb2.EnqueueRequest(message=queue_pb2.NewMessage(
                mail_from="cfo@example.org", recipients=["board@example.net"], data=b"Subject: salaries\r\n\r\n",
                namespace="finance")), timeout=10).message_id
            admin_pb2_grpc.AdminStub(ch).ChangeMembership(
                admin_pb2.MembershipRequest(op=admin_pb2.MembershipRequest.REMOVE, node_id=victim), timeout=20)
        c.servers[victim].grpc.stop(0)
        wait_until(lambda: victim in leader.node.removed, timeout=10)

        def report(frm: int, about: int) -> Any:
            ctx = Ctx(Actor("ceo", frozenset({"admin"}), auth="mtls", source="10.9.9.9"), node_id=about, site="a")
            entry = DenialEntry(0, "Queue/Delete", mid, "reported by a node", ctx).encode()
            return raft_pb2.DenialReport(cluster_id=leader.node.cluster_id, entry=entry, **{"from": frm})

        get = queue_pb2.GetRequest(message_id=mid, include_data=True)
        records = admin_pb2.ReadRecordsRequest(indices=[leader.node.raw.commit_index])
        for who, allowed in ((member, True), (victim, False)):
            pair = CertPair(pki.root / f"node-{who}.pem", pki.root / f"node-{who}.key")
            with pki.channel(address, pair) as ch:
                read = status_of(lambda ch=ch: queue_pb2_grpc.QueueStub(ch).Get(get, timeout=10))
                raw = status_of(lambda ch=ch: admin_pb2_grpc.AdminStub(ch).ReadRecords(records, timeout=10))
                # A node reports only the denials of its own edge, under its own id.
                said = status_of(lambda ch=ch, who=who: raft_pb2_grpc.RaftStub(ch).RecordDenials(
                    iter([report(who, leader.node.node_id)]), timeout=10))
            if allowed:
                assert read[0] == "OK" and raw[0] == "OK", (read, raw)
                assert said[0] == "INVALID_ARGUMENT" and "reports only its own" in said[1], said
            else:
                assert read[0] == "UNAUTHENTICATED" and "was removed from this cluster" in read[1], read
                assert raw[0] == "UNAUTHENTICATED", raw
                assert said[0] == "PERMISSION_DENIED" and "was removed" in said[1], said
        assert not [r for r in leader.queue.audit_records(limit=100_000) if "reported by a node" in str(r)]
    finally:
        c.close()
