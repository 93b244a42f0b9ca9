"""The consensus core's storage on a node: the Raft log is mqstore's LMDB log.

Raft entries are log records: an entry's term and index are the record header's, its type is the
record type, and its payload is the record's flags, key id and dictionary id (10 bytes, so a
sealed record can be re-framed byte for byte on every replica) followed by the record payload.
The entries the consensus core writes itself (NOOP, CONFIG) are plain records: their payload is
the record payload as is.
The hard state (term, vote, commit), the configuration, the applied index and the latest snapshot's
metadata live in the ``meta`` table, written in the same transaction as what they describe.
"""

from __future__ import annotations

import struct
import threading

from mqstore import limits
from mqstore.codec import Record, RecordType
from mqstore.consensus.raft import decode_conf_state, decode_snapshot_meta, encode_conf_state, encode_snapshot_meta
from mqstore.consensus.storage import limit_size
from mqstore.consensus.types import Compacted, ConfState, Entry, HardState, Snapshot, SnapshotMeta, Unavailable
from mqstore.store import LogStore, WriteContext

META_HARD_STATE = b"raft.hard_state"
META_CONF_STATE = b"raft.conf_state"
META_APPLIED = b"raft.applied"
META_SNAPSHOT = b"raft.snapshot"  # index, term, conf state of the latest snapshot
META_COMPACTED = b"raft.compacted"  # index, term of the compaction point (entries up to it are gone)

_HARD = struct.Struct(">QQQ")
_POINT = struct.Struct(">QQ")
_APPLIED = struct.Struct(">Q")
_RECORD_META = struct.Struct("<HII")  # flags, key id, dict id
RECORD_META_BYTES = _RECORD_META.size


def entry_payload(flags: int, key_id: int, dict_id: int, payload: bytes) -> bytes:
    """What a proposal carries for a record: its header fields the leader does not assign."""
    return _RECORD_META.pack(flags, key_id, dict_id) + payload


_CORE_TYPES = frozenset((RecordType.NOOP, RecordType.CONFIG))


def split_payload(rtype: int, entry_payload_bytes: bytes) -> tuple[int, int, int, bytes]:
    if rtype in _CORE_TYPES:
        return 0, 0, 0, entry_payload_bytes
    flags, key_id, dict_id = _RECORD_META.unpack_from(entry_payload_bytes)
    return flags, key_id, dict_id, entry_payload_bytes[RECORD_META_BYTES:]


def entry_to_record(entry: Entry) -> Record:
    flags, key_id, dict_id, payload = split_payload(entry.rtype, entry.payload)
    return Record(entry.rtype, flags, entry.term, entry.index, key_id, dict_id, payload)


def record_to_entry(record: Record) -> Entry:
    if record.type in _CORE_TYPES:
        payload = record.payload
    else:
        payload = entry_payload(record.flags, record.key_id, record.dict_id, record.payload)
    return Entry(term=record.term, index=record.index, rtype=record.type, payload=payload)


_ENTRY_OVERHEAD = 120  # bytes an Entry object costs in memory beyond its payload, about


def _footprint(entries: list[Entry]) -> int:
    """What ``entries`` cost the entry cache, in bytes (payloads plus the per-entry estimate)."""
    return sum(len(e.payload) for e in entries) + _ENTRY_OVERHEAD * len(entries)


class LmdbRaftStorage:
    """``mqstore.consensus.storage.Storage`` over a :class:`LogStore` (read side), plus the
    write-side helpers the node uses inside its persist transaction.

    The core asks for terms and bounds many times per message it sends, so the compaction point,
    the snapshot metadata and the terms of recent entries are kept in memory, updated when the
    transactions that change them commit (never before: a crash must not leave them ahead).

    So are the most recently persisted entries themselves (up to ``cache_bytes``), as one
    contiguous run ending at the last index: the core reads back what it just persisted, to send
    it to followers and to apply it once committed, and serving that from memory saves reading,
    checking and re-framing each entry from LMDB on every replica. An entry enters the cache only
    when the transaction that wrote it has committed; a read the cache cannot answer whole goes
    to LMDB (a follower far behind, an entry from before a restart)."""

    _TERMS_CACHED_MAX = 65_536

    def __init__(self, log: LogStore, cache_bytes: int = limits.RAFT_ENTRY_CACHE_BYTES) -> None:
        self.log = log
        self.cache_bytes = cache_bytes
        self._cache_lock = threading.Lock()
        self.reload()

    def reload(self) -> None:
        """Re-read what is cached (after the store's data was replaced by a snapshot)."""
        raw = self.log.meta_get(META_SNAPSHOT)
        self._snapshot = decode_snapshot_meta(raw) if raw else SnapshotMeta(index=0, term=0, conf_state=ConfState())
        raw = self.log.meta_get(META_COMPACTED)
        if raw:
            index, term = _POINT.unpack(raw)
            self._compacted = (int(index), int(term))
        else:
            self._compacted = (self._snapshot.index, self._snapshot.term)
        self._terms: dict[int, int] = {}
        with self._cache_lock:
            self._cache: list[Entry] = []  # entries _cache_lo, _cache_lo + 1, ... (contiguous)
            self._cache_lo = 0
            self._cache_used = 0

    # --- Storage ------------------------------------------------------------------------------

    def initial_state(self) -> tuple[HardState, ConfState]:
        raw = self.log.meta_get(META_HARD_STATE)
        hard = HardState(*_HARD.unpack(raw)) if raw else HardState()
        raw_conf = self.log.meta_get(META_CONF_STATE)
        conf = decode_conf_state(raw_conf) if raw_conf else ConfState()
        return hard, conf

    def snapshot_meta(self) -> SnapshotMeta:
        return self._snapshot

    def applied_index(self) -> int:
        raw = self.log.meta_get(META_APPLIED)
        return int(_APPLIED.unpack(raw)[0]) if raw else 0

    def compacted(self) -> tuple[int, int]:
        """(index, term) of the compaction point: entries up to it are not in the log."""
        return self._compacted

    def first_index(self) -> int:
        return self._compacted[0] + 1

    def last_index(self) -> int:
        return max(self.log.last_index, self._compacted[0])

    def term(self, index: int) -> int:
        point, point_term = self._compacted
        if index == point:
            return point_term
        if index < point:
            raise Compacted(f"term of {index}: compacted up to {point}")
        if index > self.log.last_index:
            raise Unavailable(f"term of {index}: last index is {self.log.last_index}")
        term = self._terms.get(index)
        if term is None:
            term = self.log.term_at(index)
        return term

    def entries(self, lo: int, hi: int, max_size: int) -> list[Entry]:
        point = self._compacted[0]
        if lo <= point:
            raise Compacted(f"entries from {lo}: compacted up to {point}")
        if hi > self.log.last_index + 1:
            raise Unavailable(f"entries up to {hi - 1}: last index is {self.log.last_index}")
        if lo >= hi:
            return []
        hi = min(hi, lo + limits.READ_RANGE_RECORDS_MAX)  # as many as a read from LMDB gives
        with self._cache_lock:
            start = lo - self._cache_lo
            if start >= 0 and hi - self._cache_lo <= len(self._cache):
                return limit_size(self._cache[start : hi - self._cache_lo], max_size)
        return limit_size([record_to_entry(r) for r in self.log.read_range(lo, hi, max_size)], max_size)

    def snapshot(self) -> Snapshot:
        return Snapshot(self._snapshot)

    # --- writes (inside the node's persist transaction) ------------------------------------------

    def append(self, ctx: WriteContext, entries: list[Entry]) -> None:
        """Append entries, replacing a conflicting suffix (never a committed one: the core only
        hands out entries from the first index where its log differs from what was persisted)."""
        if not entries:
            return
        first = entries[0].index
        truncated = first < ctx.next_index
        if truncated:
            ctx.truncate_suffix(first)
        for e in entries:
            flags, key_id, dict_id, payload = split_payload(e.rtype, e.payload)
            ctx.append_entry(e.term, e.index, e.rtype, payload, flags=flags, key_id=key_id, dict_id=dict_id)
        terms = {e.index: e.term for e in entries}

        def remember() -> None:
            if truncated:
                for index in [i for i in self._terms if i >= first]:
                    del self._terms[index]
            if len(self._terms) + len(terms) > self._TERMS_CACHED_MAX:
                self._terms.clear()
            self._terms.update(terms)
            self._cache_entries(first, entries)

        ctx.on_commit(remember)

    def _cache_entries(self, first: int, entries: list[Entry]) -> None:
        """Add committed ``entries`` (from index ``first``) to the cache, replacing any cached
        suffix from ``first`` on; the oldest entries go when the cache is over its size."""
        with self._cache_lock:
            cache = self._cache
            cut = first - self._cache_lo
            if cache and 0 <= cut <= len(cache):
                if cut < len(cache):
                    self._cache_used -= _footprint(cache[cut:])
                    del cache[cut:]
            else:
                cache.clear()
                self._cache_lo = first
                self._cache_used = 0
            cache.extend(entries)
            self._cache_used += _footprint(entries)
            if self._cache_used > self.cache_bytes:
                # Drop from the front down to 3/4 of the limit, so this happens once in a while.
                target = self.cache_bytes * 3 // 4
                drop = 0
                while drop < len(cache) and self._cache_used > target:
                    self._cache_used -= len(cache[drop].payload) + _ENTRY_OVERHEAD
                    drop += 1
                del cache[:drop]
                self._cache_lo += drop

    def _uncache_upto(self, index: int) -> None:
        with self._cache_lock:
            drop = min(max(index + 1 - self._cache_lo, 0), len(self._cache))
            if drop:
                self._cache_used -= _footprint(self._cache[:drop])
                del self._cache[:drop]
                self._cache_lo += drop

    @staticmethod
    def set_hard_state(ctx: WriteContext, hard: HardState) -> None:
        ctx.put(b"meta", META_HARD_STATE, _HARD.pack(hard.term, hard.vote, hard.commit))

    @staticmethod
    def set_conf_state(ctx: WriteContext, conf: ConfState) -> None:
        ctx.put(b"meta", META_CONF_STATE, encode_conf_state(conf))

    @staticmethod
    def set_applied(ctx: WriteContext, index: int) -> None:
        ctx.put(b"meta", META_APPLIED, _APPLIED.pack(index))

    def set_snapshot_meta(self, ctx: WriteContext, meta: SnapshotMeta) -> None:
        ctx.put(b"meta", META_SNAPSHOT, encode_snapshot_meta(meta))

        def remember() -> None:
            self._snapshot = meta

        ctx.on_commit(remember)

    @staticmethod
    def installed_snapshot_meta(meta: SnapshotMeta, hard: HardState) -> dict[bytes, bytes]:
        """The ``meta`` rows a node's copy of another node's snapshot gets before it becomes the
        node's database (see ``Node._install_snapshot``): this node's hard state, and the snapshot
        point as its snapshot, compaction point, configuration and applied index. Written into
        the copy, so the database swap installs them in the same step as the data."""
        return {
            META_HARD_STATE: _HARD.pack(hard.term, hard.vote, hard.commit),
            META_CONF_STATE: encode_conf_state(meta.conf_state),
            META_APPLIED: _APPLIED.pack(meta.index),
            META_SNAPSHOT: encode_snapshot_meta(meta),
            META_COMPACTED: _POINT.pack(meta.index, meta.term),
        }

    def set_compacted(self, ctx: WriteContext, index: int, term: int) -> None:
        ctx.put(b"meta", META_COMPACTED, _POINT.pack(index, term))

        def remember() -> None:
            self._compacted = (index, term)
            for old in [i for i in self._terms if i <= index]:
                del self._terms[old]
            self._uncache_upto(index)

        ctx.on_commit(remember)


__all__ = [
    "META_APPLIED",
    "META_COMPACTED",
    "META_CONF_STATE",
    "META_HARD_STATE",
    "META_SNAPSHOT",
    "RECORD_META_BYTES",
    "LmdbRaftStorage",
    "entry_payload",
    "entry_to_record",
    "record_to_entry",
    "split_payload",
]
