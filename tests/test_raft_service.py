"""The Raft service's refusals, called directly: which senders' messages a node takes."""

from __future__ import annotations

from collections.abc import Iterator
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

    def __init__(self, founding: bytes, removed: set[int]) -> None:
        self.node_id = 1
        self.cluster_id = "t"
        self.founding = founding
        self.removed = frozenset(removed)
        self.clocks = Clocks()
        self.received: list[int] = []

    def receive(self, message: Any) -> None:
        self.received.append(message.frm)

    def note_snapshot_founding(self, index: int, founding: bytes) -> None:
        pass


def _heartbeat(sender: int, founding: bytes) -> Iterator[raft_pb2.RaftMessage]:
    message = raft_pb2.RaftMessage(type=int(MessageType.HEARTBEAT), to=1, term=2, cluster_id="t", founding=founding)
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
