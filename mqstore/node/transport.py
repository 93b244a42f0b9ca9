"""Sending the consensus core's messages to peers over gRPC.

One long-lived client stream (``Raft.Send``) per peer, fed by a bounded queue and a sender thread.
A node dials each peer at the address in its own configuration when one is given there (a local
override, e.g. a proxy in a test), otherwise at the address the member directory advertises.
Messages that cannot be delivered are dropped: Raft retransmits, and the core is told the peer is
unreachable so it stops streaming to it optimistically. With TLS the channel factory is a
:class:`mqstore.security.tls.PeerChannelFactory`: mutual TLS, and each peer verified by its node id.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import grpc

from mqstore.codec import crc32c
from mqstore.consensus.types import Message
from mqstore.node.wire import message_to_proto
from mqstore.proto import raft_pb2, raft_pb2_grpc

log = logging.getLogger(__name__)

PEER_QUEUE_MESSAGES_MAX = 4096
GRPC_MESSAGE_BYTES_MAX = 64 * 1024 * 1024
_RECONNECT_DELAY_S = (0.05, 1.0)  # first and longest wait between connection attempts
#: A peer with no known address this long is said in the log (once a minute).
UNKNOWN_ADDRESS_WARN_S = 5.0
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", GRPC_MESSAGE_BYTES_MAX),
    ("grpc.max_receive_message_length", GRPC_MESSAGE_BYTES_MAX),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]
#: A node takes the keepalive pings CHANNEL_OPTIONS send (every 10 s, calls or not) from peers and
#: clients: gRPC's server default allows one ping per 5 minutes without data and answers a third
#: early one with GOAWAY "too_many_pings" (the connection dropped, a core error line on the
#: client's stderr, every 30 s on an idle client).
SERVER_PING_OPTIONS = [
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
]

ChannelFactory = Callable[[str], grpc.Channel]


def insecure_channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


class _Peer:
    def __init__(self, transport: Transport, peer_id: int) -> None:
        self.transport = transport
        self.peer_id = peer_id
        self.queue: queue.Queue[raft_pb2.RaftMessage | None] = queue.Queue(maxsize=PEER_QUEUE_MESSAGES_MAX)
        self.stopped = False
        self._denied_quiet_until = 0.0
        self.thread = threading.Thread(target=self._run, name=f"mqstore-peer-{peer_id}", daemon=True)
        self.thread.start()

    def send(self, message: raft_pb2.RaftMessage) -> bool:
        try:
            self.queue.put_nowait(message)
            return True
        except queue.Full:
            return False

    def stop(self) -> None:
        self.stopped = True
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(None)

    def _messages(self, done: threading.Event) -> Iterator[raft_pb2.RaftMessage]:
        """The messages of one stream attempt. gRPC may keep reading an attempt's iterator from
        a thread of its own after the call failed; ``done`` (set when the attempt ends) makes
        such a reader put back what it took instead of consuming a later attempt's messages."""
        while not self.stopped and not done.is_set():
            try:
                item = self.queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is None:
                return
            if done.is_set():
                with contextlib.suppress(queue.Full):
                    self.queue.put_nowait(item)  # a message taken by a stale reader goes back
                return
            if self.transport.stamp is not None:
                self.transport.stamp(self.peer_id, item)  # the clock fields, as late as possible
            yield item

    def _run(self) -> None:
        delay = _RECONNECT_DELAY_S[0]
        unknown_since: float | None = None
        quiet_until = 0.0
        while not self.stopped:
            address = self.transport.address_of(self.peer_id)
            if address is None:
                now = time.monotonic()
                if unknown_since is None:
                    unknown_since = now
                elif now - unknown_since >= UNKNOWN_ADDRESS_WARN_S and now >= quiet_until:
                    quiet_until = now + 60
                    log.warning("peer %d: no address known for it (not in this node's [[peers]], nor in the member "
                                "directory it has yet): its messages to it wait. A node being added needs every "
                                "member in its [[peers]]", self.peer_id)
                time.sleep(delay)
                continue
            unknown_since = None
            channel = self.transport.channel_to(address, self.peer_id)
            done = threading.Event()
            try:
                raft_pb2_grpc.RaftStub(channel).Send(self._messages(done), wait_for_ready=False)
                delay = _RECONNECT_DELAY_S[0]
            except grpc.RpcError as exc:
                if not self.stopped:
                    log.debug("peer %d at %s: stream ended: %s", self.peer_id, address, exc.code())
                    if exc.code() == grpc.StatusCode.PERMISSION_DENIED and time.monotonic() >= self._denied_quiet_until:
                        # Not a network fault: the peer refuses this node (another cluster or
                        # founding, a certificate naming another node). Said once a minute.
                        self._denied_quiet_until = time.monotonic() + 60
                        log.error("peer %d at %s refuses this node's messages: %s", self.peer_id, address,
                                  exc.details())
                    # UNAVAILABLE: the connection was refused or reset (the peer's process is
                    # most likely gone), not a slow or rejecting peer.
                    self.transport.on_unreachable(self.peer_id, exc.code() == grpc.StatusCode.UNAVAILABLE)
                    time.sleep(delay)
                    delay = min(delay * 2, _RECONNECT_DELAY_S[1])
            finally:
                done.set()
                channel.close()


SNAPSHOT_CHUNK_BYTES = 1 << 20
SNAPSHOT_TIMEOUT_S = 600.0


def _snapshot_chunks(
    message: Message, f: BinaryIO, cluster_id: str, founding: bytes = b"", kek_fingerprint: bytes = b""
) -> Iterator[raft_pb2.SnapshotChunk]:
    """The chunks of the snapshot file open as ``f`` (opened, and closed, by the caller: a file
    that cannot be opened fails the transfer before it starts, not inside gRPC's request stream)."""
    header = message_to_proto(message, cluster_id, founding, kek_fingerprint).SerializeToString()
    digest = hashlib.sha256()
    offset = 0
    first = True
    while True:
        data = f.read(SNAPSHOT_CHUNK_BYTES)
        digest.update(data)
        last = len(data) < SNAPSHOT_CHUNK_BYTES
        yield raft_pb2.SnapshotChunk(
            cluster_id=cluster_id,
            founding=founding,
            kek_fingerprint=kek_fingerprint,
            to=message.to,
            meta=header if first else b"",
            offset=offset,
            data=data,
            crc32c=crc32c(data),
            last=last,
            sha256=digest.digest() if last else b"",
            **{"from": message.frm},
        )
        offset += len(data)
        first = False
        if last:
            return


def _same_but_recipient(a: Message, b: Message) -> bool:
    """Whether ``b`` is ``a`` sent to another node (entries compared last: usually the same
    objects, read once from the Raft storage for every follower)."""
    return (
        a.type == b.type
        and a.frm == b.frm
        and a.term == b.term
        and a.log_term == b.log_term
        and a.index == b.index
        and a.commit == b.commit
        and a.reject == b.reject
        and a.reject_hint == b.reject_hint
        and a.context == b.context
        and a.snapshot is None
        and b.snapshot is None
        and a.entries == b.entries
    )


class Transport:
    """Delivers messages to peers; thread safe. ``on_unreachable(peer, down)`` hears of every
    failed stream; ``down`` when the connection was refused or reset (the consensus core may
    then stop waiting for a leader that is gone: ``RawNode.report_peer_down``). ``stamp(peer,
    message)`` is called on each message as its stream takes it."""

    def __init__(
        self,
        cluster_id: str,
        address_of: Callable[[int], str | None],
        on_unreachable: Callable[[int, bool], None],
        channel_factory: ChannelFactory = insecure_channel,
        stamp: Callable[[int, raft_pb2.RaftMessage], None] | None = None,
    ) -> None:
        self.cluster_id = cluster_id
        #: The founding digest sent with every message (the node sets it; see founding_digest).
        self.founding = b""
        #: The fingerprint of this node's key-encryption key sent with every message (empty: not
        #: known; see mqstore.crypto.providers.kek_fingerprint): a peer with another KEK refuses them.
        self.kek_fingerprint = b""
        self.stamp = stamp  # sets a message's clock fields as it leaves (PeerClocks.stamp)
        self.address_of = address_of
        self.on_unreachable = on_unreachable
        self.channel_factory = channel_factory
        self._peers: dict[int, _Peer] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._snapshots_in_flight: set[int] = set()
        self.dropped = 0

    def channel_to(self, address: str, peer_id: int) -> grpc.Channel:
        """A channel to peer ``peer_id``. A factory with ``for_peer(address, peer_id)`` (TLS:
        :class:`mqstore.security.tls.PeerChannelFactory`) gets the peer's id too, to verify it."""
        for_peer = getattr(self.channel_factory, "for_peer", None)
        if for_peer is not None:
            return for_peer(address, peer_id)
        return self.channel_factory(address)

    def send(self, messages: list[Message]) -> None:
        # A leader in the steady state sends every follower the same append: the protobuf
        # message is built once (its entries are most of the work) and copied for the others.
        built: tuple[Message, raft_pb2.RaftMessage] | None = None
        for m in messages:
            peer = self._peer(m.to)
            if peer is None:
                self.dropped += 1
                continue
            if built is not None and _same_but_recipient(built[0], m):
                proto = raft_pb2.RaftMessage()
                proto.CopyFrom(built[1])
                proto.to = m.to
            else:
                proto = message_to_proto(m, self.cluster_id, self.founding, self.kek_fingerprint)
                if m.entries:
                    built = (m, proto)
            if not peer.send(proto):
                self.dropped += 1

    def _peer(self, peer_id: int) -> _Peer | None:
        with self._lock:
            if self._closed:
                return None
            peer = self._peers.get(peer_id)
            if peer is None:
                peer = self._peers[peer_id] = _Peer(self, peer_id)
            return peer

    def send_snapshot(self, message: Message, path: Path, done: Callable[[bool], None]) -> None:
        """Stream the snapshot file ``path`` to ``message.to`` (InstallSnapshot, checksummed
        chunks) in a thread; ``done(ok)`` reports the outcome. One transfer per peer at a time."""
        with self._lock:
            if self._closed or message.to in self._snapshots_in_flight:
                return
            self._snapshots_in_flight.add(message.to)

        def run() -> None:
            ok = False
            try:
                address = self.address_of(message.to)
                if address is None:
                    return
                with path.open("rb") as f:
                    channel = self.channel_to(address, message.to)
                    try:
                        ack = raft_pb2_grpc.RaftStub(channel).InstallSnapshot(
                            _snapshot_chunks(message, f, self.cluster_id, self.founding, self.kek_fingerprint),
                            timeout=SNAPSHOT_TIMEOUT_S,
                        )
                        ok = bool(ack.ok)
                        if not ok:
                            log.warning("peer %d refused the snapshot: %s", message.to, ack.error)
                    finally:
                        channel.close()
            except (grpc.RpcError, OSError) as exc:
                log.warning("sending the snapshot to peer %d failed: %s", message.to, exc)
            finally:
                with self._lock:
                    self._snapshots_in_flight.discard(message.to)
                done(ok)

        threading.Thread(target=run, name=f"mqstore-snapshot-to-{message.to}", daemon=True).start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            peers = list(self._peers.values())
        for p in peers:
            p.stop()
        for p in peers:
            p.thread.join(2)


__all__ = [
    "CHANNEL_OPTIONS",
    "GRPC_MESSAGE_BYTES_MAX",
    "SERVER_PING_OPTIONS",
    "SNAPSHOT_CHUNK_BYTES",
    "Transport",
    "insecure_channel",
]
