"""Applying committed log entries on a replicated node (leader and followers alike).

Every replica applies the same committed entries in the same order, inside the transaction
that also persists the next batch of entries and the applied index, so its state tables are
exactly those of the embedded store that appended the same records. Message records arrive
sealed: a replica needs the cluster KEK (from its own key provider) to read their envelopes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

from mqstore.codec import Record, RecordType
from mqstore.consensus.types import Entry
from mqstore.crypto.keyring import KeyEvent
from mqstore.errors import Corruption
from mqstore.node.raftlog import entry_to_record
from mqstore.queue import machine
from mqstore.queue.kv import LmdbKV
from mqstore.store import LogStore, WriteContext

MEMBER_PREFIX = b"member."
_MEMBER = struct.Struct("<BQ")  # version, node id; then u8 site length, site, u8 address length, address


@dataclass(frozen=True, slots=True)
class MemberInfo:
    node_id: int
    site: str
    address: str

    def encode(self) -> bytes:
        site, addr = self.site.encode(), self.address.encode()
        return _MEMBER.pack(1, self.node_id) + bytes((len(site),)) + site + bytes((len(addr),)) + addr

    @classmethod
    def decode(cls, raw: bytes) -> MemberInfo:
        try:
            version, node_id = _MEMBER.unpack_from(raw)
            off = _MEMBER.size
            n = raw[off]
            site = raw[off + 1 : off + 1 + n].decode()
            off += 1 + n
            m = raw[off]
            address = raw[off + 1 : off + 1 + m].decode()
            end = off + 1 + m
        except (struct.error, IndexError, UnicodeDecodeError):
            raise Corruption("malformed member record") from None
        if version != 1 or end != len(raw):
            raise Corruption("malformed member record")
        return cls(node_id, site, address)


def read_members(log: LogStore) -> dict[int, MemberInfo]:
    """The replicated member directory (site and advertised address of every member)."""
    out = {}
    with log.env.read() as txn:
        for _key, value in LmdbKV(txn, log.env.dbs).scan(b"meta", MEMBER_PREFIX, MEMBER_PREFIX[:-1] + b"/"):
            info = MemberInfo.decode(value)
            out[info.node_id] = info
    return out


class Applier:
    """Applies committed entries to a :class:`LogStore`'s state tables."""

    def __init__(self, log: LogStore) -> None:
        self.log = log

    def apply(
        self, ctx: WriteContext, entries: Iterable[Entry], hints: dict[int, object] | None = None
    ) -> dict[int, object]:
        """Apply ``entries`` in order; returns each entry's result by index (see
        ``machine.apply_entry``; KEY -> key id, DICTIONARY -> dictionary id, others None).

        ``hints`` maps an ENQUEUE entry's index to its ``(Envelope, body size)`` when the caller
        already has them (the leader that sealed the message): no decryption is needed then."""
        hints = hints or {}
        kv = LmdbKV(ctx.txn, ctx.dbs)
        c = machine.Counters()
        results: dict[int, object] = {}
        for entry in entries:
            rtype = entry.rtype
            if rtype == RecordType.ENQUEUE:
                hint = hints.get(entry.index)
                if isinstance(hint, tuple):
                    envelope, size = hint
                else:
                    stored = self.log.open_message(entry_to_record(entry))
                    envelope, size = stored.envelope, len(stored.data)
                self.log.ids.observe(envelope.message_id)  # a later leader issues larger ids
                results[entry.index] = machine.apply_enqueue(kv, c, entry.index, envelope, size)
            elif rtype == RecordType.KEY:
                results[entry.index] = self._apply_key(ctx, entry)
            elif rtype == RecordType.DICTIONARY:
                results[entry.index] = self._apply_dictionary(ctx, entry_to_record(entry))
            elif rtype == RecordType.MEMBERS:
                info = MemberInfo.decode(entry_to_record(entry).payload)
                ctx.put(b"meta", MEMBER_PREFIX + str(info.node_id).encode(), info.encode())
                results[entry.index] = info.node_id
            elif rtype in (RecordType.NOOP, RecordType.CONFIG, RecordType.BLOB):
                results[entry.index] = None  # CONFIG is applied to the consensus core by the node
            else:
                record = entry_to_record(entry)
                decoded = machine.decode_entry(rtype, record.payload)
                results[entry.index] = machine.apply_entry(kv, c, entry.index, rtype, decoded)
        c.flush(kv)
        return results

    def _apply_key(self, ctx: WriteContext, entry: Entry) -> int:
        event = KeyEvent.decode(entry_to_record(entry).payload)
        keyring = self.log.keyring
        if event.action == 1 and event.key_id in keyring.key_ids():
            if keyring.event(event.key_id) == event:
                return event.key_id  # the same event again: nothing to do
            raise Corruption(f"KEY entry {entry.index} reuses key id {event.key_id} for another key")
        keyring.check_applicable(event)
        ctx.put(b"keys", b"k" + struct.pack(">I", event.key_id), event.encode())
        ctx.on_commit(lambda: keyring.apply(event))
        return event.key_id

    def _apply_dictionary(self, ctx: WriteContext, record: Record) -> int:
        opened = self.log.sealer.open(record)
        dict_id = int(struct.unpack(">I", opened.message_id[12:16])[0])
        if dict_id in self.log.sealer.dictionary_ids():
            return dict_id
        ctx.put(b"dicts", struct.pack(">I", dict_id), self.log.frame(record))
        data = opened.plaintext
        ctx.on_commit(lambda: self.log.sealer.add_dictionary(dict_id, data))
        return dict_id


__all__ = ["MEMBER_PREFIX", "Applier", "MemberInfo", "read_members"]
