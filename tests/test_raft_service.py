"""The Raft service's refusals, called directly: which senders' messages a node takes."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from mqstore.consensus.types import MessageType
from mqstore.proto import raft_pb2
from mqstore.server import RaftService


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class Context:
    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


class Clocks:
    def observe(self, *args: Any) -> None:
        pass


class FakeNode:
    """What RaftService.Send uses of a node."""

    def __init__(self, founding: bytes, removed: set[int], kek_fingerprint: bytes = b"") -> None:
        self.node_id = 1
        self.cluster_id = "t"
        self.founding = founding
        self.removed = frozenset(removed)
        self.clocks = Clocks()
        self.log = SimpleNamespace(kek_fingerprint=kek_fingerprint)
        self.transport = SimpleNamespace(kek_fingerprint=b"")
        self.received: list[int] = []

    def receive(self, message: Any) -> None:
        self.received.append(message.frm)

    def note_snapshot_founding(self, index: int, founding: bytes) -> None:
        pass


def _heartbeat(sender: int, founding: bytes, kek_fingerprint: bytes = b"") -> Iterator[raft_pb2.RaftMessage]:
    message = raft_pb2.RaftMessage(type=int(MessageType.HEARTBEAT), to=1, term=2, cluster_id="t", founding=founding,
                                   kek_fingerprint=kek_fingerprint)
    setattr(message, "from", sender)  # ("from" is a Python keyword)
    yield message


@pytest.mark.parametrize(
    ("mine", "theirs", "removed", "refused"),
    [
        (b"A" * 16, b"A" * 16, set(), None),                       # same founding
        (b"A" * 16, b"", set(), None),                             # a joined node that does not know it yet
        (b"", b"B" * 16, set(), None),                             # this node does not know it yet
        (b"A" * 16, b"B" * 16, set(), "bootstrapped with another member list"),
        (b"A" * 16, b"A" * 16, {2}, "was removed from cluster 't'"),  # removed: even with the same founding
        (b"A" * 16, b"", {2}, "was removed from cluster 't'"),        # ... or none (a reseed's old members)
    ],
)
def test_send_refuses_removed_nodes_and_other_foundings(
    mine: bytes, theirs: bytes, removed: set[int], refused: str | None
) -> None:
    node = FakeNode(mine, removed)
    service = RaftService(node)  # type: ignore[arg-type]
    if refused is None:
        service.Send(_heartbeat(2, theirs), Context())
        assert node.received == [2]
        return
    with pytest.raises(Aborted) as err:
        service.Send(_heartbeat(2, theirs), Context())
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED and refused in err.value.details
    assert node.received == []


@pytest.mark.parametrize(
    ("mine", "theirs", "refused"),
    [
        (b"A" * 16, b"A" * 16, False),
        (b"A" * 16, b"", False),  # an older node, or a provider that cannot give one
        (b"", b"B" * 16, False),
        (b"A" * 16, b"B" * 16, True),
    ],
)
def test_raft_messages_of_a_node_with_another_kek_are_refused(
    mine: bytes, theirs: bytes, refused: bool, caplog: pytest.LogCaptureFixture
) -> None:
    node = FakeNode(b"F" * 16, set(), kek_fingerprint=mine)
    service = RaftService(node)  # type: ignore[arg-type]
    assert node.transport.kek_fingerprint == mine  # what this node's own messages carry
    if not refused:
        service.Send(_heartbeat(2, b"F" * 16, theirs), Context())
        assert node.received == [2]
        return
    with caplog.at_level(logging.ERROR, logger="mqstore.server"), pytest.raises(Aborted) as err:
        service.Send(_heartbeat(2, b"F" * 16, theirs), Context())
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "node 2 uses a different key-encryption key than this node" in err.value.details
    assert "every node of a cluster needs the same key_file" in err.value.details
    assert node.received == []
    assert "node 2 uses a different key-encryption key" in caplog.text
