"""The peer transport after a peer was down: every message queued once the peer is back arrives.

Each failed connection attempt can leave gRPC reading that attempt's request iterator from a
thread of its own. Such a stale reader must not consume messages meant for a later attempt (it
once did: one message lost per failed attempt, so a node restarted after a long outage missed its
peers' first pre-votes and votes and elections took seconds longer).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

from mqstore.consensus.types import Message, MessageType
from mqstore.node.transport import Transport
from mqstore.proto import raft_pb2, raft_pb2_grpc
from mqstore.testing.cluster import free_port

CLUSTER = "transport-test"
PEER = 2


class _Recorder(raft_pb2_grpc.RaftServicer):  # type: ignore[misc]
    """A peer that records the index of every message it receives."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.cond = threading.Condition()

    def Send(self, request_iterator: Iterator[raft_pb2.RaftMessage], context: Any) -> raft_pb2.SendAck:
        for m in request_iterator:
            with self.cond:
                self.received.append(m.index)
                self.cond.notify_all()
        return raft_pb2.SendAck()

    def wait_for(self, pred: Callable[[list[int]], bool], timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: pred(self.received), timeout)


def _message(index: int) -> Message:
    return Message(MessageType.HEARTBEAT, to=PEER, frm=1, term=1, index=index)


def test_messages_sent_after_a_peer_comes_back_all_arrive() -> None:
    port = free_port()
    unreachable: list[tuple[int, bool]] = []
    transport = Transport(CLUSTER, lambda _peer: f"127.0.0.1:{port}", lambda p, down: unreachable.append((p, down)))
    server = None
    try:
        # One message, then the peer stays down for ~2.5 s with nothing more to send (as a node
        # that only hears from its peers when an election starts): the sender fails one attempt
        # after another (its reconnect delay grows from 50 ms to 1 s).
        index = 1
        transport.send([_message(index)])
        time.sleep(2.5)
        failed_attempts = len(unreachable)
        assert failed_attempts >= 4, f"only {failed_attempts} failed attempts while the peer was down"
        assert all(p == PEER and down for p, down in unreachable), unreachable

        recorder = _Recorder()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        raft_pb2_grpc.add_RaftServicer_to_server(recorder, server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()

        # Messages queued while it was down may be lost (Raft retransmits); wait until one
        # sent now gets through, so the stream is up.
        first_live = index + 1
        connected = False
        deadline = time.monotonic() + 15
        while not connected and time.monotonic() < deadline:
            index += 1
            transport.send([_message(index)])
            connected = recorder.wait_for(lambda got: any(i >= first_live for i in got), 0.2)
        assert connected, "the transport never reconnected to the peer"

        # From here on nothing may go missing.
        start = index + 1
        wanted = set(range(start, start + 300))
        for i in sorted(wanted):
            transport.send([_message(i)])
            if i % 10 == 0:
                time.sleep(0.01)
        arrived = recorder.wait_for(lambda got: wanted <= set(got), 10)
        with recorder.cond:
            missing = sorted(wanted - set(recorder.received))
            twice = sorted(i for i in wanted if recorder.received.count(i) > 1)
        assert arrived and not missing, f"{len(missing)} of 300 messages never arrived: {missing[:20]}"
        assert not twice, f"messages delivered twice: {twice[:20]}"
        assert transport.dropped == 0
    finally:
        transport.close()
        if server is not None:
            server.stop(0).wait()
