"""Conversions between the consensus core's messages and their protobuf form."""

from __future__ import annotations

from mqstore.consensus.raft import decode_snapshot_meta, encode_snapshot_meta
from mqstore.consensus.types import Entry, Message, MessageType, Snapshot
from mqstore.proto import raft_pb2


def message_to_proto(m: Message, cluster_id: str) -> raft_pb2.RaftMessage:
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
    )


def message_from_proto(p: raft_pb2.RaftMessage) -> Message:
    snapshot = Snapshot(decode_snapshot_meta(p.snapshot_meta)) if p.snapshot_meta else None
    return Message(
        type=MessageType(p.type),
        to=p.to,
        frm=getattr(p, "from"),
        term=p.term,
        log_term=p.log_term,
        index=p.index,
        entries=tuple(Entry(term=e.term, index=e.index, rtype=e.rtype, payload=e.payload) for e in p.entries),
        commit=p.commit,
        reject=p.reject,
        reject_hint=p.reject_hint,
        snapshot=snapshot,
        context=p.context,
    )


__all__ = ["message_from_proto", "message_to_proto"]
