"""A message body damaged on disk stays damage: compaction keeps the record (verify names it,
repair can put it back), and a lease call that meets it still hands out every healthy message."""

from __future__ import annotations

import struct
from pathlib import Path

import lmdb
import pytest

import mqstore
from mqstore.errors import Corruption
from mqstore.ids import parse_id
from mqstore.queue import machine
from mqstore.queue.kv import LmdbKV
from mqstore.store import keeps_live_body

pytestmark = pytest.mark.filterwarnings("ignore:mqstore created a key-encryption key")


def _enqueue_index(store: mqstore.Store, mid: str) -> int:
    with store.log.env.read() as txn:
        row = machine.get_message(LmdbKV(txn, store.log.env.dbs), parse_id(mid))
    assert row is not None
    return int(row.enqueue_index)


def _flip(path: Path, index: int, offset: int) -> None:
    """Bit rot in one stored log record, behind mqstore's back."""
    env = lmdb.open(str(path), max_dbs=32)
    try:
        db = env.open_db(b"log")
        with env.begin(write=True) as txn:
            key = struct.pack(">Q", index)
            raw = txn.get(key, db=db)
            assert raw is not None
            value = bytearray(raw)
            value[offset] ^= 0x01
            txn.put(key, bytes(value), db=db)
    finally:
        env.close()


def test_compaction_keeps_a_damaged_record_of_a_live_message(tmp_path: Path) -> None:
    """The damage is in the bytes compaction read the message id from: before, it found no
    such message, deleted the record, and the message's body turned from Corruption into
    NotFound, out of the quarantine list and out of reach of repair."""
    path = tmp_path / "s"
    with mqstore.open(path, background=False) as store:
        mid = store.enqueue(mail_from="a@example.org", recipients=["b@example.net"], data=b"Subject: x\r\n\r\nhi\r\n")
        for _ in range(3):  # records compaction may drop
            store.delete(store.enqueue(mail_from="a@example.org", recipients=["b@example.net"], data=b"x"))
        index = _enqueue_index(store, mid)
    _flip(path, index, 45)  # inside the sealed payload's message id
    with mqstore.open(path, background=False) as store:
        assert store.compact_log() > 0
        assert store.log.first_index > index  # the log's head moved past it ...
        with pytest.raises(Corruption, match=f"log index {index}: checksum mismatch"):
            store.get(mid)  # ... and the record is still there, still damage
        assert index in store.log.quarantined()
        assert [m.message_id for m in store.list()] == [mid]


def test_a_damaged_body_does_not_take_the_healthy_leases_of_its_call_with_it(tmp_path: Path) -> None:
    """Before, lease() committed the grants of all five messages and then raised Corruption
    reading the damaged one: the four healthy ones were leased to a worker that never got their
    tokens, until the lease expired (an attempt counted), and again each time the damaged one
    came due. Now the call returns the healthy leases and defers the damaged message under its
    lease, the damage as its reason."""
    path = tmp_path / "s"
    with mqstore.open(path, background=False) as store:
        mids = [store.enqueue(mail_from="a@example.org", recipients=[f"r{i}@example.net"], data=b"mail %d" % i)
                for i in range(5)]
        index = _enqueue_index(store, mids[0])
    _flip(path, index, -1)  # the oldest message's body
    with mqstore.open(path, background=False) as store:
        leases = store.lease("w", max_messages=10, lease_seconds=300)
        assert sorted(lease.message_id for lease in leases) == sorted(mids[1:])
        for lease in leases:
            store.ack(lease.token)
        assert store.stats()["recipients"]["delivered"] == 4
        damaged = store.list(state="deferred")
        assert [m.message_id for m in damaged] == [mids[0]]
        assert damaged[0].states == {"deferred": 1}
        with store.log.env.read() as txn:  # get() needs the body: read the recipient's row
            ((_, row),) = machine.recipients_of(LmdbKV(txn, store.log.env.dbs), parse_id(mids[0]))
        assert row.attempts == 1
        assert f"damaged in the store (log index {index}" in (store._open_reason(row.reason) or "")
        assert index in store.log.quarantined()
        assert store.lease("w", max_messages=10, lease_seconds=300) == []  # deferred: not due yet


def test_a_scan_beside_compaction_reports_only_real_damage(tmp_path: Path) -> None:
    """scan() reads in chunks, each its own read transaction. A compaction between two chunks
    (the maintenance thread of a store in use) removed records ahead of the scan, which counted
    every one as "record missing from the log" and quarantined it. A
    record really missing inside the log is still reported."""
    import threading

    path = tmp_path / "s"
    with mqstore.open(path, background=False) as store:
        for _ in range(10):
            store.enqueue_many([{"mail_from": "a@example.org", "recipients": ["b@example.net"], "data": b"x"}
                                for _ in range(1000)])
        while leases := store.lease("w", 4096, 60):
            for lease in leases:
                store.ack(lease.token)
        store.maintain()  # the finished messages are compacted: their records may go
        last = store.log.last_index
    env = lmdb.open(str(path), max_dbs=32)  # and one record lost behind mqstore's back
    log_db = env.open_db(b"log")
    with env.begin(write=True) as txn:
        assert txn.delete(struct.pack(">Q", last - 5), db=log_db)
    env.close()
    with mqstore.open(path, background=False) as store:
        chunks: list[int] = []

        def progress(done: int, total: int) -> None:
            if not chunks:  # between the first chunk and the second, another thread compacts
                compactor = threading.Thread(target=store.log.compact, args=(first + 8000, keeps_live_body))
                compactor.start()
                compactor.join()
            chunks.append(done)

        first = store.log.first_index
        report = store.log.scan(progress=progress)
        assert len(chunks) > 1 and store.log.first_index > first + 4096  # it did compact ahead of the scan
        assert report.corrupt == ((last - 5, "record missing from the log"),)
        assert list(store.log.quarantined()) == [last - 5]


def test_records_moved_to_other_indices_read_as_damage_not_as_the_other_message(tmp_path: Path) -> None:
    """Someone with write access to the files but not the key swaps two messages' ENQUEUE
    records and frames each anew at the other's index (a CRC is not a MAC). Each record still
    opens — its tag binds it to its own message id, which moved with it — so get(A) returned
    B's sender, recipients and body. Now reading A where the state tables expect A is
    Corruption naming the index, and lease() leaves both out."""
    from mqstore import codec

    path = tmp_path / "s"
    with mqstore.open(path, background=False) as store:
        a = store.enqueue(mail_from="ceo@example.org", recipients=["board@example.org"], data=b"Subject: A\r\n\r\nA")
        b = store.enqueue(mail_from="x@example.net", recipients=["y@example.net"], data=b"Subject: B\r\n\r\nB")
        ia, ib = _enqueue_index(store, a), _enqueue_index(store, b)
    env = lmdb.open(str(path), max_dbs=32)
    log_db = env.open_db(b"log")
    with env.begin(write=True) as txn:
        raw_a, raw_b = txn.get(struct.pack(">Q", ia), db=log_db), txn.get(struct.pack(">Q", ib), db=log_db)
        assert raw_a is not None and raw_b is not None
        for raw, at in ((raw_b, ia), (raw_a, ib)):
            r = codec.decode_record(raw)
            txn.put(struct.pack(">Q", at), codec.encode_record(r.type, r.flags, r.term, at, r.key_id, r.dict_id,
                                                               r.payload), db=log_db)
    env.close()
    with mqstore.open(path, background=False) as store:
        with pytest.raises(Corruption, match=f"log index {ia}: holds message {b}, not {a}"):
            store.get(a)
        with pytest.raises(Corruption, match=f"log index {ib}: holds message {a}, not {b}"):
            store.get(b)
        assert store.lease("w", max_messages=10, lease_seconds=60) == []
        assert sorted(store.log.quarantined()) == sorted([ia, ib])
