"""Group-commit batches of the log: what a batch that runs again, fails to commit or commits
publishes in memory (keys, dictionaries, bounds, quarantine), and what readers see meanwhile."""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest

from mqstore import codec
from mqstore.codec import RecordType
from mqstore.crypto.keyring import KeyShredded
from mqstore.errors import (
    Corruption,
    DecryptionFailed,
    InvalidArgument,
    MQStoreError,
    NotFound,
    StorageFull,
    UnknownKey,
)
from mqstore.store import LogStore
from mqstore.store.log import WriteContext
from mqstore.store.writer import Pending


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the key file created inside the data directory
        yield


def _message(log: LogStore, data: bytes, namespace: str = "ns1") -> int:
    return log.append_message(mail_from="a@example.org", recipients=["b@example.net"], data=data,
                              namespace=namespace).index


def _in_one_batch(log: LogStore, *calls: Callable[[], Any]) -> list[Any]:
    """Run ``calls`` (each makes one write) in threads so that their writes share one batch:
    the writer is held busy until all of them are queued. Returns each call's result or error."""
    gate = threading.Event()
    blocker = log.submit(lambda ctx: gate.wait(10))
    time.sleep(0.05)
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    assert log.writer is not None
    for i, t in enumerate(threads):
        t.start()
        deadline = time.monotonic() + 5
        while log.writer.queued() < i + 1 and time.monotonic() < deadline:
            time.sleep(0.005)
    gate.set()
    for t in threads:
        t.join(10)
    blocker.wait(10)
    return results


def _refused(ctx: WriteContext) -> None:
    raise InvalidArgument("refused request")


def _submit_refused(log: LogStore) -> Pending[None]:
    return log.submit(_refused)


def _refused_write(log: LogStore) -> Callable[[], None]:
    def call() -> None:
        _submit_refused(log).wait(10)

    return call


# --- keys -----------------------------------------------------------------------------------------


def test_key_rotated_in_a_batch_that_runs_again_is_kept_after_reopening(tmp_path: Path) -> None:
    log = LogStore(tmp_path)
    _message(log, b"first")
    rotated, refused = _in_one_batch(log, lambda: log.rotate_key("ns1"), _refused_write(log))
    assert isinstance(refused, InvalidArgument)
    assert rotated == 2
    index = _message(log, b"hello")
    assert log.read(index).key_id == 2
    log.close()
    with LogStore(tmp_path) as log:
        assert log.keyring.key_ids("ns1") == [1, 2]
        assert log.read_message(index).data == b"hello"


def test_first_key_created_in_a_batch_that_grew_the_map_is_kept(tmp_path: Path) -> None:
    log = LogStore(tmp_path, map_size=1 << 20)
    big = [(0, 0, 0, b"z" * 400_000)] * 3
    enqueued, grown = _in_one_batch(
        log,
        lambda: _message(log, b"m1", namespace="fresh"),
        lambda: log.write(lambda ctx: ctx.append_many(RecordType.BLOB, big)),
    )
    assert isinstance(enqueued, int), enqueued
    assert isinstance(grown, range)
    assert log.env.map_size() > 1 << 20
    second = _message(log, b"m2", namespace="fresh")
    log.close()
    with LogStore(tmp_path) as log:
        assert log.read_message(enqueued).data == b"m1"
        assert log.read_message(second).data == b"m2"


def test_message_sealed_under_a_key_of_its_own_batch_survives_a_rerun(tmp_path: Path) -> None:
    """A write function that creates a key and seals a record under it in the same transaction
    (as a replica applying a KEY and an ENQUEUE entry together) still works when the batch runs
    again, and the record opens after reopening."""
    log = LogStore(tmp_path)
    event = log.keyring.new_key_event("ns2", log.clock_ms())

    def fn(ctx: WriteContext) -> int:
        log.apply_key_event(ctx, event)
        sealed = log.sealer.seal(RecordType.BLOB, "ns2", b"\x01" * 16, b"payload", compress=False)
        assert sealed.key_id == event.key_id
        return ctx.append(RecordType.BLOB, sealed.payload, flags=sealed.flags, key_id=sealed.key_id)

    result, refused = _in_one_batch(log, lambda: log.write(fn), _refused_write(log))
    assert isinstance(refused, InvalidArgument)
    assert isinstance(result, int), result
    assert log.keyring.current_key_id("ns2") == event.key_id
    index = _message(log, b"after", namespace="ns2")
    log.close()
    with LogStore(tmp_path) as log:
        assert log.keyring.key_ids("ns2") == [event.key_id]
        assert log.sealer.open(log.read(result)).plaintext == b"payload"
        assert log.read_message(index).data == b"after"


def test_a_key_whose_commit_failed_is_not_used(tmp_path: Path) -> None:
    log = LogStore(tmp_path)
    _message(log, b"first")
    event = log.keyring.new_key_event("ns1", log.clock_ms())

    def fail_commit() -> None:
        raise lmdb.Error("simulated commit failure")

    def fn(ctx: WriteContext) -> None:
        log.apply_key_event(ctx, event)
        ctx.before_commit(fail_commit)

    with pytest.raises(MQStoreError, match="nothing was committed"):
        log.write(fn)
    assert log.keyring.key_ids("ns1") == [1]
    assert log.keyring.current_key_id("ns1") == 1
    index = _message(log, b"after the failure")
    assert log.read(index).key_id == 1
    assert log.rotate_key("ns1") == 2  # the id is free: the failed key left no trace
    log.close()
    with LogStore(tmp_path) as log:
        assert log.read_message(index).data == b"after the failure"


def test_a_key_being_created_is_not_seen_by_other_threads_before_its_commit(tmp_path: Path) -> None:
    log = LogStore(tmp_path)
    _message(log, b"first")
    event = log.keyring.new_key_event("ns1", log.clock_ms())
    seen: list[int | None] = []

    def fn(ctx: WriteContext) -> None:
        log.apply_key_event(ctx, event)
        other = threading.Thread(target=lambda: seen.append(log.keyring.current_key_id("ns1")))
        other.start()
        other.join()
        seen.append(log.keyring.current_key_id("ns1"))

    log.write(fn)
    assert seen == [1, 2]
    assert log.keyring.current_key_id("ns1") == 2
    log.close()


# --- dictionaries and after-commit actions ---------------------------------------------------------


def test_two_dictionaries_added_in_one_batch_get_distinct_ids(tmp_path: Path) -> None:
    log = LogStore(tmp_path)
    log.ensure_keys(["__system__"])
    a_data, b_data = os.urandom(2000), os.urandom(2000)
    a, b = _in_one_batch(log, lambda: log.add_dictionary(a_data), lambda: log.add_dictionary(b_data))
    assert sorted([a, b]) == [1, 2], (a, b)
    assert log.sealer.dictionary_ids() == [1, 2]
    log.meta_put(b"x", b"y")  # the store still takes writes
    log.use_dictionary(b)
    log.close()
    with LogStore(tmp_path) as log:
        assert log.sealer.dictionary_ids() == [1, 2]
        assert log.sealer.dictionary_id == b
        assert log.sealer._dicts[a].as_bytes() == a_data
        assert log.sealer._dicts[b].as_bytes() == b_data


def test_a_failing_after_commit_action_does_not_fail_the_committed_write(tmp_path: Path) -> None:
    log = LogStore(tmp_path)

    def broken() -> None:
        raise RuntimeError("after-commit action failed")

    def fn(ctx: WriteContext) -> int:
        ctx.on_commit(broken)
        return ctx.append(RecordType.BLOB, b"kept")

    index = log.write(fn)
    assert log.read(index).payload == b"kept"
    assert log.append(RecordType.BLOB, [b"next"]) == [index + 1]
    log.close()


# --- a full map -------------------------------------------------------------------------------------


def test_reaching_map_size_max_fails_the_write_with_storage_full_and_the_store_goes_on(tmp_path: Path) -> None:
    log = LogStore(tmp_path, map_size=1 << 20, map_size_max=2 << 20)
    stored = []
    with pytest.raises(StorageFull, match="nothing was committed"):
        for _ in range(40):
            stored.extend(log.append(RecordType.BLOB, [b"z" * 200_000]))
    assert log.last_index == stored[-1]
    log.meta_put(b"small", b"1")  # small writes still fit
    assert log.meta_get(b"small") == b"1"
    log.delete_prefix(stored[-1])  # deletes go on: they free pages later writes reuse
    assert log.first_index == stored[-1]
    assert log.append(RecordType.BLOB, [b"y" * 20_000]) == [stored[-1] + 1]
    log.close()


# --- compaction and truncation ----------------------------------------------------------------------


def test_a_read_between_compaction_chunks_is_not_found_not_corruption(tmp_path: Path) -> None:
    log = LogStore(tmp_path)
    log.append(RecordType.BLOB, [b"r%d" % i for i in range(10)])
    original = log.write
    outcomes: list[str] = []

    def write(fn: Any, **kw: Any) -> Any:
        out = original(fn, **kw)
        if not outcomes:  # a reader between the first and second chunk
            try:
                log.read(1)
                outcomes.append("read")
            except NotFound:
                outcomes.append("not found")
            except Corruption:
                outcomes.append("corruption")
        return out

    log.write = write  # type: ignore[method-assign]
    try:
        assert log.compact(8, keep=lambda ctx, i, raw: False, chunk=3) == 7
    finally:
        log.write = original  # type: ignore[method-assign]
    assert outcomes == ["not found"]
    assert log.first_index == 8
    assert log.quarantined() == {}
    log.close()
    with LogStore(tmp_path) as log:
        assert log.quarantined() == {}
        assert log.stats()["quarantined"] == 0


def test_a_read_right_after_delete_prefix_commits_is_not_found(tmp_path: Path) -> None:
    log = LogStore(tmp_path)
    log.append(RecordType.BLOB, [b"r%d" % i for i in range(5)])
    outcomes: list[str] = []

    def observer(seconds: float) -> None:  # runs right after each commit, before anything else
        if log.meta_get(b"log.first") is None:
            return
        try:
            log.read(1)
            outcomes.append("read")
        except NotFound:
            outcomes.append("not found")
        except Corruption:
            outcomes.append("corruption")

    log.commit_observer = observer
    log.delete_prefix(3)
    log.commit_observer = None
    assert outcomes == ["not found"]
    assert log.quarantined() == {}
    log.close()


def _remove_behind_the_stores_back(log: LogStore, index: int) -> None:
    with log.env.env.begin(write=True) as txn:
        txn.delete(index.to_bytes(8, "big"), db=log.env.dbs[b"log"])


def _quarantined_on_disk(path: Path) -> dict[int, str]:
    with LogStore(path) as log:
        return log.quarantined()


def test_compaction_and_truncation_drop_quarantine_entries_of_removed_records(tmp_path: Path) -> None:
    log = LogStore(tmp_path)
    log.append(RecordType.BLOB, [b"r%d" % i for i in range(10)])
    for index in (2, 9):
        _remove_behind_the_stores_back(log, index)
        with pytest.raises(Corruption, match="missing"):
            log.read(index)
    log.meta_put(b"flush", b"1")
    assert sorted(log.quarantined()) == [2, 9]
    log.compact(5, keep=lambda ctx, i, raw: False)
    assert sorted(log.quarantined()) == [9]
    log.truncate_suffix(8)
    assert log.quarantined() == {}
    assert log.stats()["quarantined"] == 0
    log.close()
    assert _quarantined_on_disk(tmp_path) == {}


# --- quarantine -------------------------------------------------------------------------------------


def _flip_last_byte(log: LogStore, index: int) -> None:
    with log.env.env.begin(write=True) as txn:
        key = index.to_bytes(8, "big")
        stored = txn.get(key, db=log.env.dbs[b"log"])
        assert stored is not None
        raw = bytearray(stored)
        raw[-1] ^= 1
        txn.put(key, bytes(raw), db=log.env.dbs[b"log"])


def test_a_corrupt_record_found_while_the_write_queue_is_full_is_quarantined_later(tmp_path: Path) -> None:
    log = LogStore(tmp_path, write_queue_items_max=1)
    index = log.append(RecordType.BLOB, [b"hello"])[0]
    _flip_last_byte(log, index)
    gate = threading.Event()
    running = log.submit(lambda ctx: gate.wait(10))
    time.sleep(0.05)
    queued = log.submit(lambda ctx: None)  # fills the queue
    with pytest.raises(Corruption):
        log.read(index)  # the quarantine entry cannot be queued now
    gate.set()
    running.wait(10)
    queued.wait(10)
    with pytest.raises(Corruption):
        log.read(index)  # queued this time
    log.meta_put(b"flush", b"1")
    log.close()
    assert list(_quarantined_on_disk(tmp_path)) == [index]


def test_a_message_failing_authentication_is_quarantined_a_shredded_one_is_not(tmp_path: Path) -> None:
    log = LogStore(tmp_path)
    damaged = _message(log, b"hello", namespace="ns")
    shredded = _message(log, b"gone", namespace="other")
    record = log.read(damaged)
    payload = bytearray(record.payload)
    payload[-1] ^= 1  # the sealed bytes change, the CRC is made to match
    with log.env.env.begin(write=True) as txn:
        txn.put(damaged.to_bytes(8, "big"),
                codec.encode_record(record.type, record.flags, record.term, record.index, record.key_id,
                                    record.dict_id, bytes(payload)),
                db=log.env.dbs[b"log"])
    with pytest.raises(DecryptionFailed):
        log.read_message(damaged)
    key_id = log.read(shredded).key_id
    log.write(lambda ctx: log.apply_key_event(ctx, log.keyring.shred_event(key_id, log.clock_ms())))
    with pytest.raises(KeyShredded):
        log.read_message(shredded)
    with pytest.raises(UnknownKey):
        log.open_message(log.read(shredded)._replace(key_id=99))
    assert list(log.quarantined()) == [damaged]
    log.meta_put(b"flush", b"1")
    log.close()
    assert list(_quarantined_on_disk(tmp_path)) == [damaged]
