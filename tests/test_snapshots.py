"""Snapshots on a replicated node: a node that caught up from a snapshot sends it on once it
leads, a snapshot install killed at any point leaves a node that starts and catches up, and what a
crash leaves in ``snapshots/`` is removed at the next start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from test_node import InProcessCluster, _config, _messages

from mqstore.client import Client
from mqstore.compliance import audit, signing
from mqstore.config import parse
from mqstore.crypto import create_key_file
from mqstore.crypto.keyring import META_SCRUB_PENDING
from mqstore.node.runtime import Node, bootstrap, prepare_join
from mqstore.proto import admin_pb2, admin_pb2_grpc
from mqstore.queue import machine
from mqstore.testing.cluster import free_port


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[InProcessCluster]:
    c = InProcessCluster(tmp_path, {1: "a", 2: "b", 3: "c", 4: "c", 5: "b"}, [1, 2, 3], snapshot_every=40,
                         keep_entries=10)
    try:
        yield c
    finally:
        c.close()


def _fall_behind(cluster: InProcessCluster) -> int:
    """Stop a follower and write until the others compacted their logs past it: it can only
    catch up from a snapshot. Returns its id."""
    leader = cluster.leader()
    victim = next(i for i in cluster.servers if i != leader.node.node_id)
    cluster.stop(victim)
    with Client(cluster.addresses(), timeout=10) as client:
        for k in range(30):
            client.enqueue_many(_messages(3, f"r{k}-"))
    assert leader.node.storage.first_index() > 50
    return victim


def _stored(cluster: InProcessCluster, node_id: int) -> int:
    with cluster.servers[node_id].node.read_state() as kv:
        return sum(1 for _ in kv.scan(b"messages", b""))


def _snapshot_files(node: Node) -> list[str]:
    return sorted(p.name for p in node.snapshot_dir.iterdir())


def _add_learner(cluster: InProcessCluster, leader_id: int, node_id: int) -> None:
    cluster.configs[node_id] = _config(cluster.root, cluster.key, node_id, cluster.sites, cluster.ports,
                                       [1, 2, 3, node_id])
    prepare_join(cluster.configs[node_id], "t")
    cluster.start(node_id)
    stub = admin_pb2_grpc.AdminStub(grpc.insecure_channel(cluster.configs[leader_id].listen))
    req = admin_pb2.MembershipRequest
    stub.ChangeMembership(req(op=req.ADD_LEARNER, node_id=node_id, site=cluster.sites[node_id],
                              address=cluster.configs[node_id].listen), timeout=10)


def test_a_node_that_caught_up_from_a_snapshot_sends_it_once_it_leads(cluster: InProcessCluster) -> None:
    victim = _fall_behind(cluster)
    leader = cluster.leader()
    cluster.start(victim)
    cluster.wait_applied(victim, leader.node.applied_index)
    node = cluster.servers[victim].node
    installed = node.storage.snapshot_meta().index
    assert installed > 50
    # It keeps the snapshot it installed, as a node keeps the ones it takes.
    assert _snapshot_files(node) == [node.snapshot_file(installed).name]
    stub = admin_pb2_grpc.AdminStub(grpc.insecure_channel(leader.config.listen))
    stub.TransferLeader(admin_pb2.TransferLeaderRequest(to=victim), timeout=5)
    deadline = time.monotonic() + 10
    while not node.is_leader and time.monotonic() < deadline:
        time.sleep(0.05)
    assert node.is_leader
    # A new member catches up from the new leader's snapshot: the one it installed.
    _add_learner(cluster, victim, 4)
    cluster.wait_applied(4, node.applied_index)
    assert cluster.servers[4].node.storage.snapshot_meta().index == installed
    assert _stored(cluster, 4) == 90
    # Its snapshot file lost (removed by hand): the leader takes a new snapshot for the next one.
    node.snapshot_file(installed).unlink()
    _add_learner(cluster, victim, 5)
    cluster.wait_applied(5, node.applied_index)
    assert cluster.servers[5].node.storage.snapshot_meta().index > installed
    assert _stored(cluster, 5) == 90
    assert not node.failed.is_set()


#: The follower, run in a child process that dies (as under kill -9) at ``point`` of installing
#: the leader's snapshot: once it received the file, just before the database swap, or just after.
_CHILD = r"""
import json, os, sys, time
from mqstore.config import parse
from mqstore.node.runtime import Node
from mqstore.server import NodeServer
from mqstore.store.log import LogStore

config, point = parse(json.loads(sys.argv[1])), sys.argv[2]
replace_data, receive_snapshot = LogStore.replace_data, Node.receive_snapshot

def die(where):
    print("killed", where, flush=True)
    os._exit(9)

def patched_replace(self, path, **options):  # the swap of the whole database for the installed one
    if point == "before-swap":
        die(point)
    replace_data(self, path, **options)
    if point == "after-swap":
        die(point)

def patched_receive(self, message, path):
    if point == "received":
        die(point)
    receive_snapshot(self, message, path)

LogStore.replace_data = patched_replace
Node.receive_snapshot = patched_receive
NodeServer(config).start()
time.sleep(45)
print("never killed", flush=True)
"""


@pytest.mark.parametrize("point", ["received", "before-swap", "after-swap"])
def test_a_node_killed_while_installing_a_snapshot_starts_and_catches_up(cluster: InProcessCluster,
                                                                        point: str) -> None:
    victim = _fall_behind(cluster)
    leader = cluster.leader()
    raw = {"node_id": victim, "site": cluster.sites[victim], "listen": cluster.configs[victim].listen,
           "data_dir": str(cluster.configs[victim].data_dir), "key_file": str(cluster.key), "insecure": True,
           "peers": [{"id": j, "site": cluster.sites[j], "address": cluster.configs[j].listen}
                     for j in (1, 2, 3) if j != victim]}
    child = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(raw), point], capture_output=True, text=True,
                           timeout=90)
    assert child.returncode == 9 and f"killed {point}" in child.stdout, child.stdout + child.stderr
    cluster.start(victim)  # it starts (with its own id, state and hard state, old or new)...
    node = cluster.servers[victim].node
    cluster.wait_applied(victim, leader.node.applied_index)  # ...and catches up
    assert _stored(cluster, victim) == 90
    assert node.storage.snapshot_meta().index > 50
    # Nothing the crash left stays: only the snapshot this node now has (a copy the leader sent
    # again meanwhile is removed as soon as it arrived, once the node holds that index).
    current = [node.snapshot_file(node.storage.snapshot_meta().index).name]
    deadline = time.monotonic() + 15
    while _snapshot_files(node) != current and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _snapshot_files(node) == current
    assert node.log.scan().clean


_SNAPSHOT_CHILD = r"""
import json, os, sys, time
from mqstore.config import parse
from mqstore.node.runtime import Node
from mqstore.store.log import LogStore

copy_to = LogStore.copy_to

def patched_copy(self, directory):
    copy_to(self, directory)
    print("killed while copying", flush=True)
    os._exit(9)

node = Node(parse(json.loads(sys.argv[1])))
node.start()
deadline = time.monotonic() + 20
while not node.is_leader and time.monotonic() < deadline:
    time.sleep(0.02)
while node.applied_index < 2:
    time.sleep(0.02)
LogStore.copy_to = patched_copy
node.snapshot_now()
"""


def test_a_snapshot_copy_left_by_a_crash_is_removed_at_start(tmp_path: Path) -> None:
    raw = {"node_id": 1, "site": "a", "listen": f"127.0.0.1:{free_port()}", "data_dir": str(tmp_path / "n1"),
           "key_file": str(create_key_file(tmp_path / "kek.key")), "insecure": True}
    bootstrap(parse(raw), "t")
    child = subprocess.run([sys.executable, "-c", _SNAPSHOT_CHILD, json.dumps(raw)], capture_output=True,
                           text=True, timeout=120)
    assert child.returncode == 9 and "killed while copying" in child.stdout, child.stdout + child.stderr
    snapshots = tmp_path / "n1" / "snapshots"
    left = [p.name for p in snapshots.iterdir()]
    assert left and all(name.startswith("tmp-") for name in left)
    (snapshots / "notes.txt").write_text("not ours")
    node = Node(parse(raw))
    try:
        assert sorted(p.name for p in snapshots.iterdir()) == ["notes.txt"]
    finally:
        node.stop(transfer_leadership=False)


def test_a_node_that_installed_a_snapshot_is_never_behind_its_compliance_time(cluster: InProcessCluster) -> None:
    """The compliance time a snapshot brings holds at once, even with nothing applied after it
    (the node may lead next and stamp entries with its compliance clock)."""
    leader = cluster.leader()
    victim = next(i for i in cluster.servers if i != leader.node.node_id)
    with Client(cluster.addresses(), timeout=10) as client:
        client.enqueue(**_messages(1, "first")[0])  # the victim has a compliance time of its own
    cluster.wait_applied(victim, leader.node.applied_index)
    cluster.stop(victim)
    time.sleep(3)  # the cluster's compliance time moves on without it
    with Client(cluster.addresses(), timeout=10) as client:
        for k in range(30):
            client.enqueue_many(_messages(3, f"r{k}-"))
    time.sleep(0.3)
    snapshot = leader.node.snapshot_now()
    assert snapshot.index == leader.node.raw.last_index  # nothing after the snapshot point
    cluster.start(victim)
    cluster.wait_applied(victim, snapshot.index)
    server = cluster.servers[victim]
    assert server.node.storage.snapshot_meta().index == snapshot.index
    with server.node.read_state() as kv:
        applied = machine.compliance_clock_ms(kv)
    assert server.queue.compliance_clock.now_ms() >= applied


def test_a_node_that_installed_a_snapshot_verifies_its_audit_log_with_its_own_key(cluster: InProcessCluster) -> None:
    """The snapshot brings the leader's checkpoints, signed by the leader; the new node signs them
    again (the records match their roots), so `audit verify` with its own key passes as on every
    other node, instead of reporting checkpoints "signed by another key"."""
    leader = cluster.leader()
    victim = next(i for i in cluster.servers if i != leader.node.node_id)
    cluster.stop(victim)
    with Client(cluster.addresses(), timeout=10) as client:
        client.set_policy("finance", mode="compliance", retention_days=30)
        for k in range(20):
            client.enqueue(mail_from="cfo@example.org", recipients=[f"r{k}@example.net"], data=b"x",
                           namespace="finance")
        ckpt = client.audit_checkpoint()  # signed by the leader, inside the snapshot
        assert ckpt is not None
    snapshot = leader.node.snapshot_now()
    cluster.start(victim)
    cluster.wait_applied(victim, snapshot.index)
    server = cluster.servers[victim]
    assert server.node.storage.snapshot_meta().index == snapshot.index
    own = server.queue.audit.log.public_key
    assert own is not None
    with server.node.read_state() as kv:
        report = audit.verify(kv, own)
        signers = {c.key_id for c in audit.checkpoints(kv)}
    assert report.ok, report.problems
    assert report.signatures_checked >= 1
    assert signers == {signing.key_id(own)}


def test_a_node_that_installed_a_snapshot_taken_by_a_scrub_scrubs_at_once(cluster: InProcessCluster) -> None:
    """A leader scrubbing a shredded key snapshots before its scrub is done (so its snapshots say
    the scrub is pending): a follower that installs one scrubs right away, not after its next
    restart."""
    leader = cluster.leader()
    victim = next(i for i in cluster.servers if i != leader.node.node_id)
    with Client(cluster.addresses(), timeout=10) as client:
        shredded = client.rotate_key("default")
        client.rotate_key("default")  # messages are sealed under this one
        cluster.stop(victim)
        for k in range(30):
            client.enqueue_many(_messages(3, f"r{k}-"))
        client.shred_key(shredded)
    cluster.start(victim)
    cluster.wait_applied(victim, leader.node.applied_index)
    node = cluster.servers[victim].node
    deadline = time.monotonic() + 10
    while node.log.meta_get(META_SCRUB_PENDING) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert node.log.meta_get(META_SCRUB_PENDING) is None
    assert _stored(cluster, victim) == 90
    assert not node.failed.is_set()


def test_snapshot_data_received_for_an_index_already_held_is_removed(cluster: InProcessCluster) -> None:
    """A copy the leader sent twice (or one that arrived after the node caught up by the log) is
    never installed: its file goes at once instead of staying until the next install."""
    from mqstore.consensus.types import Message, MessageType, Snapshot, SnapshotMeta

    leader = cluster.leader()
    follower = next(s.node for i, s in cluster.servers.items() if i != leader.node.node_id)
    with Client(cluster.addresses(), timeout=10) as client:
        client.enqueue_many(_messages(3, "s-"))
    cluster.wait_applied(follower.node_id, leader.node.applied_index)
    stale = follower.snapshot_dir / ("incoming-" + "ab" * 16 + ".mdb")
    stale.write_bytes(b"an old copy")
    meta = SnapshotMeta(index=2, term=leader.node.raw.term, conf_state=follower.raw.conf_state)
    follower.receive_snapshot(Message(MessageType.SNAPSHOT, follower.node_id, leader.node.node_id,
                                      leader.node.raw.term, snapshot=Snapshot(meta)), stale)
    deadline = time.monotonic() + 10
    while stale.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not stale.exists()
    assert follower.applied_index >= leader.node.applied_index - 5  # and it goes on as before


def test_a_backup_copy_a_killed_node_left_is_removed_when_it_starts(tmp_path: Path) -> None:
    """A node killed while it streamed a backup (or a live verify) kept the copy of its whole
    store it streams from, snapshots/ops-<hex>/, for good: sealed mail and wrapped keys (a key
    shredded later survived in it)."""
    from mqstore.testing.cluster import LocalCluster, wait_until

    c = LocalCluster(tmp_path, ["a"], cluster_id="c1")
    try:
        c.bootstrap()
        c.start_all()
        c.wait_for_leader()
        with Client(c.addresses(), timeout=15) as client:
            for k in range(4):  # ~10 MB: far more than flow control lets through unread
                client.enqueue_many([{"mail_from": "a@example.org", "recipients": [f"r{k}-{i}@d.example"],
                                      "data": b"Subject: x\r\n\r\n" + os.urandom(50_000)} for i in range(50)])
        channel = grpc.insecure_channel(c.addresses()[0])
        stream = admin_pb2_grpc.AdminStub(channel).Backup(admin_pb2.BackupRequest(wait_ms=5000), timeout=60)
        snapshots = c.data_dir(1) / "snapshots"
        # The node makes its copy and streams from it; unread, the stream stays open (flow control).
        assert wait_until(lambda: bool(list(snapshots.glob("ops-*"))), 30)
        c.kill(1)
        stream.cancel()
        channel.close()
        c.start(1)
        c.wait_for_leader()
        assert list(snapshots.glob("ops-*")) == []
    finally:
        c.close()
