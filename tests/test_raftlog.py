"""The node's Raft storage over the LMDB log: recently persisted entries are read back from memory,
and what it returns is always what LMDB holds (after appends, a replaced suffix, a failed
transaction, eviction, compaction and a reload)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from mqstore.codec import RecordType
from mqstore.consensus.types import Compacted, Entry, Unavailable
from mqstore.node.raftlog import LmdbRaftStorage, entry_payload
from mqstore.store import LogStore, WriteContext

BIG = 1 << 40


def make_entries(first: int, count: int, term: int, seed: int, size: int = 300) -> list[Entry]:
    rng = random.Random(seed)
    out = []
    for index in range(first, first + count):
        if rng.random() < 0.2:
            out.append(Entry(term=term, index=index, rtype=RecordType.NOOP, payload=b""))
        else:
            body = rng.randbytes(rng.randrange(1, size))
            payload = entry_payload(0, 0, 0, body)
            out.append(Entry(term=term, index=index, rtype=RecordType.BLOB, payload=payload))
    return out


def append(storage: LmdbRaftStorage, entries: list[Entry]) -> None:
    storage.log.write(lambda ctx: storage.append(ctx, entries))


def from_disk(log: LogStore, lo: int, hi: int, max_size: int = BIG) -> list[Entry]:
    """The same read through a storage with no cache: every entry from LMDB."""
    return LmdbRaftStorage(log, cache_bytes=0).entries(lo, hi, max_size)


class DiskReads:
    """Counts the LMDB range reads a storage makes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, log: LogStore) -> None:
        self.calls = 0
        real = log.read_range

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(log, "read_range", counted)


def test_recent_entries_are_served_from_memory_and_equal_what_lmdb_holds(
    store: LogStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = LmdbRaftStorage(store)
    written = make_entries(1, 40, 1, seed=1) + make_entries(41, 25, 2, seed=2)
    append(storage, written[:40])
    append(storage, written[40:])
    reads = DiskReads(monkeypatch, store)
    assert storage.entries(1, 66, BIG) == written
    assert storage.entries(17, 30, BIG) == written[16:29]
    for max_size in (0, 500, 3_000, 10_000):  # the longest prefix within max_size, at least one
        got = storage.entries(5, 60, max_size)
        assert got == written[4 : 4 + len(got)]
        total = sum(e.size() for e in got)
        assert len(got) == 1 or total <= max_size
        assert len(got) == 55 or total + written[4 + len(got)].size() > max_size
    assert reads.calls == 0
    assert from_disk(store, 1, 66) == written


def test_a_replaced_suffix_is_replaced_in_memory_too(store: LogStore) -> None:
    storage = LmdbRaftStorage(store)
    append(storage, make_entries(1, 10, 1, seed=3))
    newer = make_entries(6, 3, 2, seed=4)
    append(storage, newer)  # a new leader's entries from index 6 replace 6..10
    assert storage.last_index() == 8
    got = storage.entries(1, 9, BIG)
    assert got[5:] == newer
    assert got == from_disk(store, 1, 9)
    with pytest.raises(Unavailable):
        storage.entries(1, 11, BIG)
    append(storage, make_entries(9, 4, 2, seed=5))
    assert storage.entries(1, 13, BIG) == from_disk(store, 1, 13)


def test_entries_of_a_failed_transaction_are_never_served(store: LogStore) -> None:
    storage = LmdbRaftStorage(store)
    kept = make_entries(1, 10, 1, seed=6)
    append(storage, kept)
    doomed = make_entries(6, 3, 2, seed=7)  # would replace 6..10

    def fails(ctx: WriteContext) -> None:
        storage.append(ctx, doomed)
        raise RuntimeError("the disk said no")

    with pytest.raises(RuntimeError, match="the disk said no"):
        store.write(fails)
    assert storage.last_index() == 10
    assert storage.entries(6, 9, BIG) == kept[5:8]
    assert storage.entries(1, 11, BIG) == kept == from_disk(store, 1, 11)
    def appends_then_fails(ctx: WriteContext) -> None:
        storage.append(ctx, make_entries(11, 2, 1, seed=8))
        raise RuntimeError("the disk said no")

    with pytest.raises(RuntimeError, match="the disk said no"):
        store.write(appends_then_fails)
    with pytest.raises(Unavailable):
        storage.entries(11, 12, BIG)
    instead = make_entries(11, 3, 1, seed=9)
    append(storage, instead)
    assert storage.entries(1, 14, BIG) == kept + instead == from_disk(store, 1, 14)


def test_old_entries_leave_memory_and_are_read_from_lmdb(store: LogStore, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = LmdbRaftStorage(store, cache_bytes=8_000)
    written = make_entries(1, 120, 1, seed=9, size=600)
    for lo in range(0, 120, 7):
        append(storage, written[lo : lo + 7])
    reads = DiskReads(monkeypatch, store)
    assert storage.entries(110, 121, BIG) == written[109:]
    assert reads.calls == 0  # the newest are still in memory
    assert storage.entries(1, 121, BIG) == written
    assert reads.calls == 1  # the oldest were evicted: the whole range came from LMDB


def test_compaction_and_reload(store: LogStore) -> None:
    storage = LmdbRaftStorage(store)
    written = make_entries(1, 30, 3, seed=10)
    append(storage, written)
    store.write(lambda ctx: storage.set_compacted(ctx, 12, 3))
    with pytest.raises(Compacted):
        storage.entries(12, 20, BIG)
    assert storage.entries(13, 31, BIG) == written[12:]
    storage.reload()  # e.g. after the data was replaced: everything is read from LMDB again
    assert storage.entries(13, 31, BIG) == written[12:]
    append(storage, make_entries(31, 5, 4, seed=11))
    assert storage.entries(13, 36, BIG) == from_disk(store, 13, 36)
