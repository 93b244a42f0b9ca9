"""Compliance on a replicated cluster: refusals over gRPC and the CLI, and an audit log that is
the same on every replica (it is derived from the replicated log)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_node import InProcessCluster

from mqstore.client import Client
from mqstore.compliance import audit, signing
from mqstore.errors import Immutable, NotFound

BODY = b"Subject: board minutes 51d2\r\n\r\nconfidential\r\n"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[InProcessCluster]:
    c = InProcessCluster(tmp_path, {1: "a", 2: "b", 3: "c"}, [1, 2, 3])
    try:
        yield c
    finally:
        c.close()


def _audit_tables(cluster: InProcessCluster) -> dict[int, list[dict[str, object]]]:
    out = {}
    for i, server in cluster.servers.items():
        with server.node.read_state() as kv:
            out[i] = audit.records(kv, None, 100_000)
    return out


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mqstore", *args], capture_output=True, text=True, timeout=60)


def test_compliance_refusals_over_grpc_and_cli_are_audited_on_every_replica(cluster: InProcessCluster) -> None:
    cluster.leader()
    addresses = ",".join(cluster.addresses())
    with Client(cluster.addresses(), timeout=20) as client:
        policy = client.set_policy("finance", mode="compliance", retention_days=2555)
        assert policy.lock_retention_ms == 2555 * 86_400_000
        mid = client.enqueue(mail_from="cfo@example.org", recipients=["board@example.net"], data=BODY,
                             namespace="finance")
        m = client.get(mid)
        assert m.retention_mode == "compliance" and m.locked_until is not None
        with pytest.raises(Immutable, match="COMPLIANCE retention"):
            client.delete(mid)
        with pytest.raises(Immutable):
            client.delete(mid, bypass_governance=True, reason="try anyway")
        assert client.compact_messages([mid]) == 0  # forced compaction only concerns finished messages
        for lease in client.lease("w", namespace="finance"):
            client.ack(lease.token)
        assert client.get(mid).done
        with pytest.raises(Immutable):
            client.compact_messages([mid])
        with pytest.raises(Immutable):
            client.set_policy("finance", mode="governance", retention_days=1)
        with pytest.raises(Immutable):
            client.extend_retention(mid, until=m.locked_until - 86_400)
        client.add_legal_hold(mid, case="SEC-2026-17")
        assert client.get(mid).legal_holds == ("SEC-2026-17",)
        with pytest.raises(NotFound):
            client.remove_legal_hold(mid, case="NO-SUCH-CASE")

        # the CLI against the running cluster goes through the same path
        refused = _cli("delete", mid, "--server", addresses, "--json")
        assert refused.returncode == 1, refused.stdout + refused.stderr
        (refusal,) = json.loads(refused.stdout)["refusals"]
        assert refusal["error"] == "Immutable" and "SEC-2026-17" in refusal["message"], refusal
        shown = _cli("audit", "query", "--op", "delete", "--outcome", "denied", "--server", addresses, "--json")
        assert shown.returncode == 0, shown.stderr
        assert len(json.loads(shown.stdout)) == 3  # two client deletes and the CLI's

        assert client.get(mid).data == BODY
        head = client.audit_head()
        ckpt = client.audit_checkpoint()
        assert ckpt is not None and ckpt.size == head + 1  # the checkpoint request is audited too
        assert ckpt.signature and ckpt.public_key  # signed with the node's audit key
        last_index = cluster.leader().node.applied_index

    for i in cluster.servers:
        cluster.wait_applied(i, last_index)
    tables = _audit_tables(cluster)
    assert tables[1] == tables[2] == tables[3], "replicas derived different audit logs"
    ops = [(r["op"], r["outcome"]) for r in tables[1]]
    assert ops.count(("delete", "denied")) == 3
    assert ("legal_hold", "allowed") in ops and ("policy", "denied") in ops and ("compact", "denied") in ops
    keys = set()
    for i, server in cluster.servers.items():
        # each node signs its checkpoints with its own key (<data_dir>/audit-signing.key)
        assert (Path(server.config.data_dir) / "audit-signing.key").exists()
        public_key = server.queue.audit.log.public_key
        keys.add(signing.public_key_hex(public_key))
        with server.node.read_state() as kv:
            report = audit.verify(kv, public_key)
        assert report.ok, (i, report.problems)
        assert report.checkpoints_checked >= 1 and report.signatures_checked >= 1
    assert len(keys) == 3


def test_a_follower_that_installed_a_snapshot_keeps_auditing_like_the_others(tmp_path: Path) -> None:
    cluster = InProcessCluster(tmp_path, {1: "a", 2: "b", 3: "c"}, [1, 2, 3], snapshot_every=40, keep_entries=10)
    try:
        cluster.leader()
        with Client(cluster.addresses(), timeout=20) as client:
            client.set_policy("finance", mode="compliance", retention_days=30)
            lagging = next(i for i, s in cluster.servers.items() if not s.node.is_leader)
            cluster.stop(lagging)
            for i in range(60):  # audited entries; the others snapshot and compact past the stopped node
                client.enqueue(mail_from="cfo@example.org", recipients=[f"r{i}@example.net"], data=BODY,
                               namespace="finance")
            assert all(s.node.storage.compacted()[0] > 20 for s in cluster.servers.values())
            cluster.start(lagging)
            # after catching up from the snapshot the node applies (and audits) new entries itself
            for lease in client.lease("w", namespace="finance", max_messages=20):
                client.ack(lease.token)
            with pytest.raises(Immutable):
                client.set_policy("finance", mode="none")
            last_index = cluster.leader().node.applied_index
        for i in cluster.servers:
            cluster.wait_applied(i, last_index)
        assert cluster.servers[lagging].node.storage.snapshot_meta().index > 1  # it did install one
        tables = _audit_tables(cluster)
        ops = [(r["op"], r["outcome"]) for r in tables[lagging]]
        assert ops.count(("ack", "allowed")) == 20 and ops[-1] == ("policy", "denied")
        assert tables[1] == tables[2] == tables[3], "a replica's audit log diverged after a snapshot install"
    finally:
        cluster.close()


def test_a_shredded_key_leaves_every_nodes_files(tmp_path: Path) -> None:
    cluster = InProcessCluster(tmp_path, {1: "a", 2: "b", 3: "c"}, [1, 2, 3])
    try:
        cluster.leader()
        with Client(cluster.addresses(), timeout=20) as client:
            mids = [client.enqueue(mail_from="news@example.org", recipients=[f"r{i}@example.net"], data=BODY,
                                   namespace="bulk") for i in range(3)]
            (key,) = [k for k in client.list_keys() if k["namespace"] == "bulk"]
            wrapped = cluster.leader().node.log.keyring.event(key["key_id"]).wrapped
            assert len(wrapped) >= 32
            for lease in client.lease("w", namespace="bulk", max_messages=10):
                client.ack(lease.token)
            assert client.shred_key(key["key_id"]) == len(mids)
            last_index = cluster.leader().node.applied_index
            for i in cluster.servers:
                cluster.wait_applied(i, last_index)
            # the cluster goes on serving, with the other namespaces' keys intact
            mid = client.enqueue(mail_from="a@example.org", recipients=["b@example.net"], data=BODY)
            assert client.get(mid).data == BODY
            last_index = cluster.leader().node.applied_index
        for i in cluster.servers:
            cluster.wait_applied(i, last_index)
            assert cluster.servers[i].node.log.keyring.is_shredded(key["key_id"])
        dirs = [Path(s.config.data_dir) for s in cluster.servers.values()]
    finally:
        cluster.close()
    for d in dirs:
        for f in d.rglob("*"):
            if f.is_file():
                assert wrapped not in f.read_bytes(), f"{f} still holds the shredded key's wrapped bytes"


def test_kill_9_while_nodes_scrub_a_shredded_key(tmp_path: Path) -> None:
    from mqstore.store import LogStore
    from mqstore.testing.cluster import LocalCluster

    with LocalCluster(tmp_path, ["a", "b", "c"]) as cluster:
        cluster.bootstrap()
        cluster.start_all()
        cluster.wait_for_leader(30)
        with Client(cluster.addresses(), timeout=30) as client:
            kept = [client.enqueue(mail_from="a@example.org", recipients=[f"k{i}@example.net"], data=BODY)
                    for i in range(10)]
            for i in range(5):
                client.enqueue(mail_from="news@example.org", recipients=[f"n{i}@example.net"], data=BODY,
                               namespace="bulk")
            for lease in client.lease("w", namespace="bulk", max_messages=10):
                client.ack(lease.token)
            (key,) = [k["key_id"] for k in client.list_keys() if k["namespace"] == "bulk"]
            leader = cluster.wait_for_leader(30)
            reader = next(n for n in cluster.nodes if n != leader)
            cluster.wait_converged(30)
            cluster.stop(reader)  # read the wrapped key off a stopped node's files
            with LogStore(cluster.data_dir(reader), key_file=cluster.key_file, readonly=True, create=False) as log:
                wrapped = log.keyring.event(key).wrapped
            assert len(wrapped) >= 32
            cluster.start(reader)
            cluster.wait_converged(60)
            client.shred_key(key)  # (the finished messages may have been compacted away already)
            assert next(k for k in client.list_keys() if k["key_id"] == key)["shredded"]
            victim = next(n for n in cluster.nodes if n != cluster.wait_for_leader(30))
            cluster.kill(victim)  # kill -9 as the follower applies the shred and scrubs
            kept += [client.enqueue(mail_from="a@example.org", recipients=[f"j{i}@example.net"], data=BODY)
                     for i in range(5)]
            cluster.start(victim)
            cluster.wait_converged(60)
            for mid in kept:
                assert client.get(mid).data == BODY
            cluster.wait_converged(60)
        for n in cluster.nodes:
            cluster.kill(n)  # at one applied index (a graceful stop would hand leadership over)
        digests = {cluster.state_digest(n) for n in cluster.nodes}
        assert len(digests) == 1, "replicas differ after the kill"
        for n in cluster.nodes:
            assert cluster.scan(n)["clean"], f"node {n}'s log does not scan clean"
            for f in cluster.data_dir(n).rglob("*"):
                if f.is_file():
                    assert wrapped not in f.read_bytes(), f"{f} still holds the shredded key"


def test_a_scrub_a_crash_interrupted_is_finished_when_the_node_starts(tmp_path: Path) -> None:
    from mqstore.crypto.keyring import META_SCRUB_PENDING
    from mqstore.store import LogStore
    from mqstore.testing.cluster import wait_until

    cluster = InProcessCluster(tmp_path, {1: "a", 2: "b", 3: "c"}, [1, 2, 3])
    try:
        cluster.leader()
        with Client(cluster.addresses(), timeout=20) as client:
            client.enqueue(mail_from="news@example.org", recipients=["n@example.net"], data=BODY, namespace="bulk")
            for lease in client.lease("w", namespace="bulk"):
                client.ack(lease.token)
            (key,) = [k["key_id"] for k in client.list_keys() if k["namespace"] == "bulk"]
            client.shred_key(key)
            last_index = cluster.leader().node.applied_index
        for i in cluster.servers:
            cluster.wait_applied(i, last_index)
        follower = next(i for i, s in cluster.servers.items() if not s.node.is_leader)
        assert wait_until(lambda: cluster.servers[follower].node.log.meta_get(META_SCRUB_PENDING) is None, 10)
        cluster.stop(follower)
        # as if the node had crashed after applying the shred, before its scrub finished
        with LogStore(cluster.configs[follower].data_dir, key_file=cluster.key) as log:
            log.write(lambda ctx: ctx.put(b"meta", META_SCRUB_PENDING, b"\x01"))
        snapshot_before = next(Path(cluster.configs[follower].data_dir, "snapshots").glob("snap-*.mdb"))
        snapshot_before.unlink()  # the scrub writes a new one
        cluster.start(follower)
        node = cluster.servers[follower].node
        assert wait_until(lambda: node.log.meta_get(META_SCRUB_PENDING) is None, 10), "the scrub never ran"
        assert node.snapshot_file(node.storage.snapshot_meta().index).exists()
    finally:
        cluster.close()


def test_a_reported_denial_never_moves_the_compliance_clock(cluster: InProcessCluster) -> None:
    import time

    from mqstore.actor import Actor
    from mqstore.compliance.rules import Ctx
    from mqstore.queue.model import DenialEntry

    leader = cluster.leader()
    with Client(cluster.addresses(), timeout=20) as client:
        client.set_policy("finance", mode="compliance", retention_days=2555)
        mid = client.enqueue(mail_from="cfo@example.org", recipients=["board@example.net"], data=BODY,
                             namespace="finance")
        follower = next(i for i in cluster.servers if i != leader.node.node_id)
        century_ms = 100 * 365 * 86_400_000
        # what a follower's edge sends the leader (Raft/RecordDenials), its context stamped a century ahead
        forged = Ctx(Actor("someone", frozenset(), auth="token", source="10.0.0.9"), node_id=follower, site="b",
                     wall_ms=int(time.time() * 1000) + century_ms,
                     compliance_ms=leader.queue.compliance_clock.now_ms() + century_ms)
        leader.queue.append_reported_denials(
            [DenialEntry(0, "Queue/Lease", "*", "lacks the 'lease' permission", forged).encode()], follower)
        last_index = leader.node.applied_index
        for i in cluster.servers:
            cluster.wait_applied(i, last_index)
        with pytest.raises(Immutable, match="COMPLIANCE retention"):
            client.delete(mid)
        assert client.get(mid).data == BODY
        (record,) = client.audit_query(where={"op": "Queue/Lease"})
    # the denial is audited as reported (who, which node), the node's site from the member
    # directory (the report said "b" for whichever follower), at the leader's time
    assert (record["actor"], record["node"], record["site"], record["outcome"]) == (
        "someone", follower, cluster.sites[follower], "denied")
    assert abs(record["wall"] - time.time() * 1000) < 600_000
    for i, server in cluster.servers.items():
        ahead_ms = server.queue.compliance_clock.now_ms() - time.time() * 1000
        assert ahead_ms < 600_000, f"node {i}'s compliance clock moved {ahead_ms / 86_400_000:.0f} days ahead"


def test_the_nodes_queue_refuses_a_limited_actor_outside_its_namespaces(cluster: InProcessCluster) -> None:
    """The node's queue API checks what its edge checks: a request naming no namespace covers
    every namespace, and a lease of another namespace is not the actor's to settle."""
    from mqstore.actor import Actor
    from mqstore.errors import PermissionDenied

    leader = cluster.leader()
    team_worker = Actor("team-a-worker", frozenset({"worker"}), auth="token", namespaces=frozenset({"team-a"}))
    with Client(cluster.addresses(), timeout=20) as client:
        client.set_policy("finance", mode="compliance", retention_days=30)
        mid = client.enqueue(mail_from="cfo@example.org", recipients=["board@example.net"], data=BODY,
                             namespace="finance")
        with pytest.raises(PermissionDenied, match="name one"):
            leader.queue.lease("w", actor=team_worker)
        (lease,) = client.lease("w", namespace="finance")
        with pytest.raises(PermissionDenied, match="not in the namespaces"):
            leader.queue.bounce(lease.token, reason="dropped", actor=team_worker)
        with pytest.raises(PermissionDenied, match="not in the namespaces"):
            leader.queue.ack_many([lease.token], actor=team_worker)
        assert client.get(mid).recipients[0].state == "leased"
        denied = client.audit_query(where={"actor": "team-a-worker", "outcome": "denied"})
        assert [r["op"] for r in denied] == ["lease", "bounce", "ack"]


def test_a_quiet_clusters_last_audit_records_are_signed_on_every_replica(cluster: InProcessCluster) -> None:
    """No record arrives after a refusal: the leader's maintenance writes a tick entry and every
    replica signs a checkpoint covering the refusal (a minute later by default; 0.3 s here)."""
    cluster.leader()
    for server in cluster.servers.values():
        server.queue.audit.log.checkpoint_ms = 300
    with Client(cluster.addresses(), timeout=20) as client:
        client.set_policy("finance", mode="compliance", retention_days=30)
        mid = client.enqueue(mail_from="cfo@example.org", recipients=["board@example.net"], data=BODY,
                             namespace="finance")
        with pytest.raises(Immutable):
            client.delete(mid)
        head = client.audit_head()
    covered: dict[int, int] = {}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for i, server in cluster.servers.items():
            with server.node.read_state() as kv:
                latest = audit.latest_checkpoint(kv)
            covered[i] = 0 if latest is None else latest.size
        if all(size == head for size in covered.values()):
            break
        time.sleep(0.1)
    assert covered == {1: head, 2: head, 3: head}
    assert len(_audit_tables(cluster)[1]) == head  # the ticks added no record
