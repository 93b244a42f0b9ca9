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
from dataclasses import replace
from typing import Any

import grpc
import pytest

from mqstore.consensus.types import Entry, Message, MessageType
from mqstore.node.transport import Transport
from mqstore.node.wire import message_to_proto
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


def test_each_peer_gets_its_own_message_when_appends_share_a_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """The leader builds one protobuf for an append every follower gets alike and copies it for
    the others: what each peer is handed must still be exactly its own message."""
    entries = tuple(Entry(term=2, index=i, rtype=18, payload=bytes([i]) * 300) for i in range(11, 15))
    app = Message(MessageType.APPEND, to=2, frm=1, term=2, log_term=2, index=10, entries=entries, commit=9)
    messages = [
        app,
        replace(app, to=3),
        replace(app, to=4, commit=10),
        replace(app, to=5, index=11, entries=entries[1:]),
        replace(app, to=6, entries=tuple(Entry(e.term, e.index, e.rtype, e.payload) for e in entries)),
        Message(MessageType.HEARTBEAT, to=2, frm=1, term=2, commit=9),
        Message(MessageType.HEARTBEAT, to=3, frm=1, term=2, commit=8),
        replace(app, to=7, entries=(*entries[:3], Entry(3, 14, 18, b"other"))),
    ]
    got: list[raft_pb2.RaftMessage] = []

    class Peer:
        def send(self, proto: raft_pb2.RaftMessage) -> bool:
            got.append(proto)
            return True

    transport = Transport(CLUSTER, lambda node: None, lambda node, down: None)
    monkeypatch.setattr(transport, "_peer", lambda node: Peer())
    transport.send(messages)
    assert [p.to for p in got] == [m.to for m in messages]
    for proto, m in zip(got, messages, strict=True):
        assert proto == message_to_proto(m, CLUSTER), m.to
    assert len({id(p) for p in got}) == len(got)
    got[0].commit = 99  # the copies are copies
    assert got[1].commit == 9


def test_a_peer_with_no_known_address_is_said_in_the_log(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A node being added whose [[peers]] lacks the leader cannot answer it (it learns the member
    directory only with its first snapshot): its messages wait, and the log says why instead of
    nothing at all."""
    monkeypatch.setattr("mqstore.node.transport.UNKNOWN_ADDRESS_WARN_S", 0.2)
    transport = Transport(CLUSTER, lambda peer: None, lambda peer, down: None)
    try:
        transport.send([_message(1)])
        deadline = time.monotonic() + 5
        said = f"peer {PEER}: no address known for it"
        while said not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert said in caplog.text and "needs every member in its [[peers]]" in caplog.text
    finally:
        transport.close()
