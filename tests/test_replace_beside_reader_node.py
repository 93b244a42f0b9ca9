"""A cluster node replacing its database (a shred's scrub, a snapshot install) while another
process has its data dir open read-only (`mqstore verify`/`backup --data-dir` beside it).
Before, the node read the swapped-in file by the old lock table's transaction id: an empty
store (log 1..0, acknowledged mail gone)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from test_node import InProcessCluster
from test_replace_beside_reader import reader_beside

import mqstore.node.runtime
from mqstore.api import QueueBase
from mqstore.client import Client
from mqstore.errors import NotFound
from mqstore.server import NodeServer

BODY = b"Subject: hello\r\n\r\nbody\r\n"


def _local(server: NodeServer, mid: str) -> bytes:
    """The message as this node's own state has it (no read barrier, no forwarding), once the
    node applied it (an enqueue is answered as the leader applies it: a follower may be behind)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return bytes(QueueBase.get(server.queue, mid).data)
        except NotFound:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _wait(cond: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_node_scrubs_a_shred_beside_a_reader_once_it_is_gone(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mqstore.node.runtime, "SCRUB_RETRY_S", 0.2)
    cluster = InProcessCluster(tmp_path, {1: "a", 2: "b", 3: "c"}, [1, 2, 3])
    try:
        cluster.leader()
        with Client(cluster.addresses(), timeout=20) as client:
            keep = [client.enqueue(mail_from="a@example.org", recipients=["b@example.net"], data=BODY)
                    for _ in range(5)]
            client.enqueue(mail_from="n@example.org", recipients=["r@example.net"], data=BODY, namespace="bulk")
            (key,) = [k for k in client.list_keys() if k["namespace"] == "bulk"]
            wrapped = cluster.leader().node.log.keyring.event(key["key_id"]).wrapped
            for lease in client.lease("w", namespace="bulk", max_messages=10):
                client.ack(lease.token)
            follower = next(i for i, s in cluster.servers.items() if not s.node.is_leader)
            node = cluster.servers[follower].node
            data_dir = Path(cluster.servers[follower].config.data_dir)
            server = cluster.servers[follower]
            with reader_beside(data_dir, cluster.key):
                client.shred_key(key["key_id"])
                cluster.wait_applied(follower, cluster.leader().node.applied_index)
                assert not node.failed.is_set()
                mid = client.enqueue(mail_from="a@example.org", recipients=["b@example.net"], data=BODY)
                cluster.wait_applied(follower, cluster.leader().node.applied_index)
                assert [_local(server, m) for m in [*keep, mid]] == [BODY] * 6
                assert node.log.meta_get(b"keys.scrub_pending") is not None  # put off, not lost
            _wait(lambda: node.log.meta_get(b"keys.scrub_pending") is None)  # the reader is gone: scrubbed
            assert not node.failed.is_set()
            assert [_local(server, m) for m in [*keep, mid]] == [BODY] * 6
            mid2 = client.enqueue(mail_from="a@example.org", recipients=["b@example.net"], data=BODY)
            cluster.wait_applied(follower, cluster.leader().node.applied_index)
            assert _local(server, mid2) == BODY
    finally:
        cluster.close()
    for f in data_dir.rglob("*"):
        if f.is_file():
            assert wrapped not in f.read_bytes(), f"{f} still holds the shredded key's wrapped bytes"


def test_a_node_installs_a_snapshot_beside_a_reader(tmp_path: Path) -> None:
    cluster = InProcessCluster(tmp_path, {1: "a", 2: "b", 3: "c"}, [1, 2, 3], snapshot_every=40, keep_entries=10)
    try:
        cluster.leader()
        with Client(cluster.addresses(), timeout=20) as client:
            lagging = next(i for i, s in cluster.servers.items() if not s.node.is_leader)
            data_dir = Path(cluster.configs[lagging].data_dir)
            cluster.stop(lagging)
            mids = [client.enqueue(mail_from="a@example.org", recipients=[f"r{i}@example.net"], data=BODY)
                    for i in range(60)]
            assert all(s.node.storage.compacted()[0] > 20 for s in cluster.servers.values())
            with reader_beside(data_dir, cluster.key):
                cluster.start(lagging)
                last_index = cluster.leader().node.applied_index
                cluster.wait_applied(lagging, last_index, timeout=40)
                server = cluster.servers[lagging]
                assert server.node.storage.snapshot_meta().index > 1  # it installed one
                assert not server.node.failed.is_set()
                mids.append(client.enqueue(mail_from="a@example.org", recipients=["x@example.net"], data=BODY))
                cluster.wait_applied(lagging, cluster.leader().node.applied_index)
                assert [_local(server, m) for m in mids] == [BODY] * len(mids)  # before: an empty store
            assert not server.node.failed.is_set()
    finally:
        cluster.close()
