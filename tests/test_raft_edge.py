"""The internal Raft service refuses malformed messages at the edge: a clear INVALID_ARGUMENT for
the sender, nothing handed to the consensus core (whose checks stop the node on an impossible
state), and the node goes on serving."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from mqstore.client import Client
from mqstore.consensus.raft import encode_snapshot_meta
from mqstore.consensus.types import ConfState, MessageType, SnapshotMeta
from mqstore.proto import raft_pb2, raft_pb2_grpc
from mqstore.testing.secure import InProcessCluster

SENDER: dict[str, Any] = {"from": 2}  # "from" is a Python keyword
RAW = b"From: a@example.org\r\nSubject: edge\r\n\r\nbody\r\n"


@pytest.fixture
def one_node(tmp_path: Path) -> Iterator[InProcessCluster]:
    cluster = InProcessCluster(tmp_path / "edge", ["a"])
    try:
        yield cluster
    finally:
        cluster.close()


def _message(cluster_id: str, **fields: Any) -> raft_pb2.RaftMessage:
    base: dict[str, Any] = {"type": int(MessageType.HEARTBEAT), "to": 1, "from": 2, "term": 0,
                            "cluster_id": cluster_id}
    base.update(fields)
    return raft_pb2.RaftMessage(**base)


MALFORMED: dict[str, tuple[dict[str, Any], str]] = {
    "unknown type": ({"type": 999}, "unknown type 999"),
    "no sender": ({"from": 0}, "without a sender"),
    "from itself": ({"from": 1}, "to itself"),
    "snapshot metadata that does not decode": ({"type": int(MessageType.SNAPSHOT), "snapshot_meta": b"\x01\x02"},
                                               "snapshot metadata"),
    "entries out of sequence": (
        {"type": int(MessageType.APPEND), "index": 5, "log_term": 0,
         "entries": [raft_pb2.RaftEntry(term=0, index=6, rtype=1), raft_pb2.RaftEntry(term=0, index=8, rtype=1)]},
        "entry 1 has index 8, expected 7",
    ),
    "entries not after the index": (
        {"type": int(MessageType.APPEND), "index": 5, "entries": [raft_pb2.RaftEntry(term=0, index=5, rtype=1)]},
        "entry 0 has index 5, expected 6",
    ),
}


def test_malformed_raft_messages_are_refused_and_the_node_goes_on(one_node: InProcessCluster) -> None:
    server = one_node.leader()
    node = server.node
    term = node.status()["term"]
    applied_before = node.applied_index
    channel = grpc.insecure_channel(one_node.address(1))
    stub = raft_pb2_grpc.RaftStub(channel)
    try:
        for case, (fields, expected) in MALFORMED.items():
            with pytest.raises(grpc.RpcError) as info:
                stub.Send(iter([_message(node.cluster_id, **fields)]), timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, info.value.details())
            assert expected in (info.value.details() or ""), (case, info.value.details())
        # A snapshot whose metadata chunk is not a message at all, not a snapshot message, or
        # names another sender than the stream's.
        conf = ConfState(voters=frozenset({1}), sites=((1, "a"),))
        meta_ok = encode_snapshot_meta(SnapshotMeta(index=1, term=1, conf_state=conf))
        for meta, expected in ((b"\xff\xff\xff", "does not decode"),
                               (_message(node.cluster_id, type=999).SerializeToString(), "unknown type 999"),
                               (_message(node.cluster_id).SerializeToString(), "snapshot metadata missing"),
                               (_message(node.cluster_id, type=int(MessageType.SNAPSHOT), snapshot_meta=meta_ok,
                                         **{"from": 3}).SerializeToString(), "another sender")):
            chunk = raft_pb2.SnapshotChunk(cluster_id=node.cluster_id, to=1, meta=meta, offset=0, data=b"",
                                           last=False, **SENDER)
            ack = stub.InstallSnapshot(iter([chunk]), timeout=10)
            assert not ack.ok and expected in ack.error, (meta, ack.error)
    finally:
        channel.close()
    # Nothing reached the core: still the leader, same term, and it serves writes.
    assert node.is_leader
    assert node.status()["term"] == term
    with Client(one_node.address(1), timeout=10) as client:
        mid = client.enqueue(mail_from="a@example.org", recipients=["b@example.net"], data=RAW)
        assert client.get(mid).data == RAW
    assert node.applied_index > applied_before
    assert not list((Path(server.config.data_dir) / "snapshots").glob("incoming-*"))
