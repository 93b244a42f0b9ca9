"""Applying committed log entries on a replicated node (leader and followers alike).

Every replica applies the same committed entries in the same order, inside the transaction
that also persists the next batch of entries and the applied index, so its state tables are
exactly those of the embedded store that appended the same records. Message records arrive
sealed: a replica needs the cluster KEK (from its own key provider) to read their envelopes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from mqstore.codec import Record, RecordType
from mqstore.compliance.rules import Ctx
from mqstore.consensus.types import Entry
from mqstore.crypto.keyring import ACTION_CREATE, META_SCRUB_PENDING, split_key_record
from mqstore.errors import Corruption, WrongKey
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
    """Applies committed entries to a :class:`LogStore`'s state tables.

    ``counters`` makes the machine's per-write context (the node's queue sets one with the audit
    log); ``on_applied`` hears about each applied batch after it commits (the compliance clock)."""

    def __init__(self, log: LogStore) -> None:
        self.log = log
        self.counters: Callable[[], machine.Counters] = machine.Counters
        self.on_applied: Callable[[machine.Counters], None] | None = None
        #: Key shreds applied so far (the node then scrubs the key's wrapped bytes from its files).
        self.shreds = 0

    def apply(
        self, ctx: WriteContext, entries: Iterable[Entry], hints: dict[int, object] | None = None
    ) -> dict[int, object]:
        """Apply ``entries`` in order; returns each entry's result by index (see
        ``machine.apply_entry``; KEY -> key id, DICTIONARY -> dictionary id, others None).

        ``hints`` maps an ENQUEUE entry's index to its ``(Envelope, body size, request context)``
        when the caller already has them (the leader that sealed the message): no decryption is
        needed then."""
        hints = hints or {}
        kv = LmdbKV(ctx.txn, ctx.dbs)
        c = self.counters()
        results: dict[int, object] = {}
        shredded: set[int] = set()  # keys shredded by entries applied so far in this batch
        for entry in entries:
            rtype = entry.rtype
            c.index = entry.index
            if rtype == RecordType.ENQUEUE:
                hint = hints.get(entry.index)
                record = entry_to_record(entry)
                if record.key_id and (self.log.keyring.is_shredded(record.key_id) or record.key_id in shredded):
                    # Sealed under a key a SHRED entry before it removed (an enqueue that raced
                    # the shred): stored by no replica, whether it could still decrypt it or not.
                    results[entry.index] = machine.Denied(
                        f"the message was sealed under key {record.key_id}, shredded before it could be stored "
                        f"(log index {entry.index}): nothing was stored, enqueue it again", "retry")
                    continue
                if isinstance(hint, tuple):
                    envelope, size, request = hint
                else:
                    try:
                        stored = self.log.open_message(record)
                    except WrongKey as exc:
                        raise self._not_the_cluster_kek(record.key_id, entry.index) from exc
                    envelope, size = stored.envelope, len(stored.data)
                    request = Ctx.decode(stored.context) if stored.context else None
                self.log.ids.observe(envelope.message_id)  # a later leader issues larger ids
                results[entry.index] = machine.apply_enqueue(kv, c, entry.index, envelope, size, request,
                                                             record.key_id)
            elif rtype == RecordType.KEY:
                results[entry.index] = self._apply_key(ctx, kv, c, entry, shredded)
            elif rtype == RecordType.DICTIONARY:
                record = entry_to_record(entry)
                try:
                    results[entry.index] = self._apply_dictionary(ctx, record)
                except WrongKey as exc:
                    raise self._not_the_cluster_kek(record.key_id, entry.index) from exc
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
        if self.on_applied is not None:
            done = self.on_applied
            ctx.on_commit(lambda: done(c))
        return results

    def _not_the_cluster_kek(self, key_id: int, index: int) -> WrongKey:
        """The error for a committed entry this node's KEK cannot open. Its own store opened (the
        KEK check passed), so the store is not to blame: the key was wrapped by the leader under
        the cluster's KEK, which this node's key_file does not hold."""
        provider = self.log.keyring.provider
        where = getattr(provider, "description", type(provider).__name__)
        try:
            whose = f"key {key_id} of namespace {self.log.keyring.namespace_of(key_id)!r}"
        except Exception:
            whose = f"key {key_id}"
        return WrongKey(
            f"this node's key-encryption key (from {where}) does not open {whose}, which committed log entry "
            f"{index} is sealed under: this node's key_file is not the cluster's KEK. Every node of a cluster needs "
            "the same key_file: copy the cluster's key file to this node (restarting with this one fails again)"
        )

    def _apply_key(self, ctx: WriteContext, kv: LmdbKV, c: machine.Counters, entry: Entry,
                   shredded: set[int]) -> object:
        try:
            event, context = split_key_record(entry_to_record(entry).payload)
        except Corruption as exc:
            raise exc.with_index(entry.index) from None
        request = Ctx.decode(context) if context else None
        keyring = self.log.keyring
        if event.action == ACTION_CREATE:
            if event.key_id in keyring.key_ids():
                if keyring.event(event.key_id) == event:
                    return event.key_id  # the same event again: nothing to do
                # Two leaders gave out one id (the second before it saw the first's entry): the
                # first entry's key keeps it; this one is refused on every replica alike.
                return machine.Denied(f"key id {event.key_id} was given to another key by an earlier entry "
                                      f"(log index {entry.index}): nothing was created, rotate again", "retry")
            keyring.check_applicable(event)
            # Audit first: a new key joins the keyring as it is stored, so nothing may fail after.
            machine.apply_key_created(kv, c, event.key_id, event.namespace, request, event.created_at_ms)
            self.log.store_key_event(ctx, event)
            return event.key_id
        keyring.check_applicable(event)
        if keyring.is_shredded(event.key_id):
            return machine.Denied(f"key {event.key_id} was shredded already", "invalid")
        result = machine.apply_shred(kv, c, event.key_id, event.namespace, request or Ctx(), event.created_at_ms)
        if not isinstance(result, machine.Denied):
            self.log.store_key_event(ctx, event)
            # Durable with the shred: the node scrubs the key from its files, after a crash too.
            ctx.put(b"meta", META_SCRUB_PENDING, b"\x01")
            self.shreds += 1
            shredded.add(event.key_id)  # an ENQUEUE after it in this batch sees it gone
        return result

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
