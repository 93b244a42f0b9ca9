"""Conversions between the consensus core's messages and their protobuf form."""

from __future__ import annotations

from mqstore.consensus.raft import decode_snapshot_meta, encode_snapshot_meta
from mqstore.consensus.types import Entry, Message, MessageType, Snapshot
from mqstore.errors import Corruption, InvalidArgument
from mqstore.proto import raft_pb2


def message_to_proto(
    m: Message, cluster_id: str, founding: bytes = b"", kek_fingerprint: bytes = b""
) -> raft_pb2.RaftMessage:
    return raft_pb2.RaftMessage(
        type=int(m.type),
        to=m.to,
        **{"from": m.frm},
        term=m.term,
        log_term=m.log_term,
        index=m.index,
        entries=[raft_pb2.RaftEntry(term=e.term, index=e.index, rtype=e.rtype, payload=e.payload) for e in m.entries],
        commit=m.commit,
        reject=m.reject,
        reject_hint=m.reject_hint,
        snapshot_meta=encode_snapshot_meta(m.snapshot.meta) if m.snapshot is not None else b"",
        context=m.context,
        cluster_id=cluster_id,
        founding=founding,
        kek_fingerprint=kek_fingerprint,
    )


def message_from_proto(p: raft_pb2.RaftMessage) -> Message:
    """The core's message for a received one. Raises :class:`InvalidArgument` for a message no
    correct peer sends (an unknown type, no sender, snapshot metadata that does not decode,
    entries that do not follow the message's index one by one): it is refused at the edge, so
    it never reaches the core, whose checks stop the node on an impossible *state*."""
    try:
        mtype = MessageType(p.type)
    except ValueError:
        raise InvalidArgument(f"raft message of unknown type {p.type}") from None
    frm = getattr(p, "from")
    if frm == 0:
        raise InvalidArgument("raft message without a sender (from = 0)")
    snapshot = None
    if p.snapshot_meta:
        try:
            snapshot = Snapshot(decode_snapshot_meta(p.snapshot_meta))
        except Corruption as exc:
            raise InvalidArgument(f"raft message: {exc}") from None
    entries = tuple(Entry(term=e.term, index=e.index, rtype=e.rtype, payload=e.payload) for e in p.entries)
    for k, e in enumerate(entries):
        if e.index != p.index + 1 + k:
            raise InvalidArgument(
                f"raft message entries out of sequence: entry {k} has index {e.index}, expected {p.index + 1 + k}"
            )
    return Message(
        type=mtype,
        to=p.to,
        frm=frm,
        term=p.term,
        log_term=p.log_term,
        index=p.index,
        entries=entries,
        commit=p.commit,
        reject=p.reject,
        reject_hint=p.reject_hint,
        snapshot=snapshot,
        context=p.context,
    )


__all__ = ["message_from_proto", "message_to_proto"]
