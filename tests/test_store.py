"""The log on LMDB: appends, reads, group commit, map growth, locking, corruption, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest

from mqstore import limits
from mqstore.codec import RecordType, decode_record, encode_record
from mqstore.errors import (
    Corruption,
    InvalidArgument,
    KeyFileError,
    NotFound,
    Overloaded,
    StoreClosed,
    StoreLocked,
)
from mqstore.store import LogStore, NewMessage, WriteContext
from mqstore.store.writer import Pending, Writer
from mqstore.testing.mail import MailFactory


def _msg(**kw: object) -> NewMessage:
    fields: dict[str, object] = {"mail_from": "a@example.org", "recipients": ["b@example.net"], "data": b"hi"}
    fields.update(kw)
    return NewMessage(**fields)  # type: ignore[arg-type]


def test_environment_flags_are_the_durable_ones(store: LogStore) -> None:
    flags = store.env.env.flags()
    assert flags["sync"] and flags["metasync"] and flags["meminit"]
    assert not flags["writemap"] and not flags["map_async"]


def test_append_and_read_back(store: LogStore) -> None:
    assert (store.first_index, store.last_index) == (1, 0)
    assert store.append(RecordType.BLOB, [b"one", b"two"]) == [1, 2]
    assert store.append(RecordType.BLOB, [b"three"]) == [3]
    assert [r.payload for r in store.read_range(1, 4)] == [b"one", b"two", b"three"]
    assert store.read(2).index == 2 and store.read(2).type == RecordType.BLOB
    assert store.last_index == 3
    with pytest.raises(NotFound, match="not in the log"):
        store.read(4)


def test_read_range_respects_max_bytes(store: LogStore) -> None:
    store.append(RecordType.BLOB, [b"x" * 100] * 10)
    got = store.read_range(1, 11, max_bytes=300)
    assert [r.index for r in got] == [1, 2]
    assert len(store.read_range(1, 11, max_bytes=1)) == 1  # always at least one


def test_records_and_messages_survive_reopen(store_path: Path, key_file: Path) -> None:
    mail = MailFactory(2)
    bodies = [mail.message(2048) for _ in range(20)]
    with LogStore(store_path, key_file=key_file) as s:
        s.append(RecordType.BLOB, [b"blob"])
        appended = s.append_messages([_msg(data=b, priority=i % 3, namespace="tenant-a") for i, b in enumerate(bodies)])
    with LogStore(store_path, key_file=key_file) as s:
        # Index 2 holds the KEY record of tenant-a's new key; the messages follow it.
        assert [a.index for a in appended] == list(range(3, 23))
        assert s.last_index == 22
        assert s.read(2).type == RecordType.KEY
        for i, a in enumerate(appended):
            m = s.read_message(a.index)
            assert m.data == bodies[i]
            assert m.envelope.message_id == a.message_id
            assert m.envelope.namespace == "tenant-a" and m.envelope.priority == i % 3
            assert m.envelope.recipients == ("b@example.net",)
        assert s.append(RecordType.BLOB, [b"after"]) == [23]


def test_message_envelope_fields_round_trip(store: LogStore) -> None:
    a = store.append_messages(
        [
            _msg(
                mail_from="",
                recipients=["x@example.net", "用户@例子.测试"],
                priority=-5,
                not_before_ms=123,
                expires_at_ms=456,
                idempotency_key="key-1",
            )
        ]
    )[0]
    env = store.read_message(a.index).envelope
    assert env.mail_from == "" and env.recipients == ("x@example.net", "用户@例子.测试")
    assert (env.priority, env.not_before_ms, env.expires_at_ms, env.idempotency_key) == (-5, 123, 456, "key-1")
    assert env.created_at_ms > 0


def test_reading_a_non_message_as_message_is_refused(store: LogStore) -> None:
    store.append(RecordType.BLOB, [b"x"])
    with pytest.raises(InvalidArgument, match="BLOB record, not a message"):
        store.read_message(1)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"recipients": []}, "at least one recipient"),
        ({"recipients": "b@example.net"}, "must be a list"),
        ({"recipients": ["not-an-address"]}, "local@domain"),
        ({"recipients": ["a b@example.net"]}, "not allowed"),
        ({"recipients": ["x@exa mple.net"]}, "not a valid domain"),
        ({"recipients": ["<x@example.net>"]}, "not allowed"),
        ({"recipients": ["x@example.net", "x@example.net"]}, "listed twice"),
        ({"recipients": [f"r{i}@example.net" for i in range(limits.RECIPIENTS_MAX + 1)]}, "the limit is"),
        ({"recipients": ["x" * 65 + "@example.net"]}, "local part is 65 bytes"),
        ({"recipients": [42]}, "must be a string"),
        ({"recipients": ("x@example.net", "")}, r"recipients\[1\] is empty"),
        ({"recipients": ["x@example.net", b"y@example.net"]}, r"recipients\[1\] must be a string"),
        ({"priority": True}, "must be an integer"),
        ({"mail_from": None}, "must be a string"),
        ({"mail_from": "nobody"}, "local@domain"),
        ({"data": "text, not bytes"}, "must be bytes"),
        ({"namespace": ""}, "not valid"),
        ({"namespace": "__system__"}, "not valid"),
        ({"namespace": "a/b"}, "not valid"),
        ({"priority": 1000}, "priority must be in"),
        ({"priority": "high"}, "must be an integer"),
        ({"not_before_ms": -1}, "not_before_ms must be in"),
        ({"expires_at_ms": 1.5}, "must be an integer"),
        ({"idempotency_key": ""}, "must not be empty"),
        ({"idempotency_key": "k" * 257}, "the limit is 256"),
        ({"recipients": ["\udcff@example.net"]}, "lone surrogate"),
        # 241 bytes as given, 361 once lower-cased (domains are kept lower-cased)
        ({"recipients": ["x@" + "\u0130" * 60 + "." + "\u0130" * 60]}, "361 bytes once lower-cased"),
    ],
)
def test_bad_message_input_is_refused_and_nothing_is_written(
    store: LogStore, fields: dict[str, object], message: str
) -> None:
    store.append(RecordType.BLOB, [b"before"])
    with pytest.raises(InvalidArgument, match=message):
        store.append_messages([_msg(), _msg(**fields)])  # the good one is not written either
    assert store.last_index == 1


def test_oversized_message_is_refused(store: LogStore) -> None:
    with pytest.raises(InvalidArgument, match=f"the limit is {limits.MESSAGE_BYTES_MAX}"):
        store.append_messages([_msg(data=b"x" * (limits.MESSAGE_BYTES_MAX + 1))])
    assert store.last_index == 0


def test_bad_raw_appends_are_refused(store: LogStore) -> None:
    with pytest.raises(InvalidArgument):
        store.append(RecordType.BLOB, [])
    with pytest.raises(InvalidArgument):
        store.append(RecordType.BLOB, ["str"])  # type: ignore[list-item]
    with pytest.raises(InvalidArgument):
        store.append(999, [b"x"])
    with pytest.raises(InvalidArgument):
        store.append(RecordType.BLOB, [b"x"] * (limits.APPEND_RECORDS_MAX + 1))
    with pytest.raises(InvalidArgument):
        store.append_messages([object()])  # type: ignore[list-item]
    with pytest.raises(InvalidArgument):
        store.read(0)
    assert store.last_index == 0


def test_group_commit_shares_one_transaction(store: LogStore) -> None:
    """While the writer is busy, concurrent appends queue up and commit together."""
    gate = threading.Event()
    started = threading.Event()

    def blocker(ctx: WriteContext) -> int:
        started.set()
        gate.wait(10)
        return ctx.append(RecordType.BLOB, b"first")

    first = store.submit(blocker)
    assert started.wait(10)
    commits_before = store.commits
    results: list[list[int]] = []
    threads = [
        threading.Thread(target=lambda i=i: results.append(store.append(RecordType.BLOB, [b"t%d" % i])))
        for i in range(16)
    ]
    for t in threads:
        t.start()
    while store.writer is not None and store.writer.queued() < 16:
        threading.Event().wait(0.01)
    gate.set()
    for t in threads:
        t.join(10)
    assert first.wait() == 1
    indices = sorted(i for r in results for i in r)
    assert indices == list(range(2, 18))  # distinct, contiguous
    # The blocked batch committed once; the 16 waiting appends shared one more commit.
    assert store.commits - commits_before == 2
    assert sorted(store.read(i).payload for i in indices) == sorted(b"t%d" % i for i in range(16))


def _slow_writer(seconds: float) -> tuple[Writer, list[tuple[int, int]]]:
    """A writer whose every batch takes ``seconds`` (like a slow fsync); it records each batch's
    size and the thread that ran it."""
    batches: list[tuple[int, int]] = []

    def run_batch(batch: list[Pending[Any]]) -> None:
        threading.Event().wait(seconds)
        for item in batch:
            item.result = item.fn(None)  # type: ignore[arg-type]
        batches.append((len(batch), threading.get_ident()))

    return Writer(run_batch, name="test-writer"), batches


def test_closed_loop_callers_share_one_commit_per_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """Callers that each write, wait and write again share one commit per round: the writer waits
    for the callers its last commit answered instead of committing them in two alternating halves."""
    monkeypatch.setattr(limits, "WRITE_LINGER_MAX_US", 1_000_000)  # no machine is too slow for it
    writer, batches = _slow_writer(0.05)
    callers, rounds = 8, 12
    barrier = threading.Barrier(callers)

    def caller() -> None:
        barrier.wait()
        for _ in range(rounds):
            writer.write(lambda ctx: None)

    threads = [threading.Thread(target=caller) for _ in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    writer.stop()
    sizes = [n for n, _ in batches]
    assert sum(sizes) == callers * rounds
    # A few batches to gather the callers at the start (and to finish), otherwise one full batch
    # per round.
    assert sizes.count(callers) >= rounds - 3, sizes
    assert len(sizes) <= rounds + 3, sizes


def test_a_lone_caller_after_a_busy_spell_writes_in_its_own_thread_again() -> None:
    writer, batches = _slow_writer(0.01)
    threads = [threading.Thread(target=lambda: [writer.write(lambda ctx: None) for _ in range(5)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert any(n > 1 for n, _ in batches)  # the callers were grouped
    for _ in range(3):  # the first write may still wait briefly for callers that have gone
        writer.write(lambda ctx: None)
    assert batches[-1] == (1, threading.get_ident())  # no hand-off to the writer thread
    writer.stop()


def test_mixed_writers_and_a_stop_leave_no_write_unanswered() -> None:
    """Threads that write synchronously, submit and wait, or submit with a callback, while the
    writer lingers and batches: every write runs exactly once, each thread's writes run in the
    order it made them, and writes still queued when the writer stops are answered with
    StoreClosed (none hangs)."""
    ran: list[tuple[int, int]] = []
    batches: list[int] = []

    def run_batch(batch: list[Pending[Any]]) -> None:
        threading.Event().wait(0.002)
        for item in batch:
            item.result = item.fn(None)  # type: ignore[arg-type]
        batches.append(len(batch))

    writer = Writer(run_batch, name="test-writer", queue_items_max=64)
    answered: list[tuple[int, int, object]] = []
    lock = threading.Lock()
    per_thread = 150

    def worker(t: int) -> None:
        for k in range(per_thread):
            def fn(ctx: object, t: int = t, k: int = k) -> tuple[int, int]:
                ran.append((t, k))
                return (t, k)

            mode = (t + k) % 3
            try:
                if mode == 0:
                    result: object = writer.write(fn)
                elif mode == 1:
                    result = writer.submit(fn).wait(30)
                else:
                    done = threading.Event()
                    pending = writer.submit(fn, callback=lambda p, done=done: done.set())
                    assert done.wait(30)
                    result = "closed" if isinstance(pending.error, StoreClosed) else pending.result
            except StoreClosed:
                result = "closed"
            with lock:
                answered.append((t, k, result))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    while len(answered) < 8 * per_thread // 2:
        threading.Event().wait(0.01)
    writer.stop()
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    assert len(answered) == 8 * per_thread  # every call returned
    assert len(ran) == len(set(ran))  # nothing ran twice
    for t in range(8):
        mine = [k for (tt, k) in ran if tt == t]
        assert mine == sorted(mine)  # a thread's writes ran in the order it made them
    closed = [(t, k) for (t, k, r) in answered if r == "closed"]
    assert closed and set(closed).isdisjoint(ran)  # refused after the stop, and did not run
    assert all(r == (t, k) for (t, k, r) in answered if r != "closed")
    assert max(batches) > 1


def test_a_failing_write_rolls_back_only_itself(store: LogStore) -> None:
    gate = threading.Event()

    def blocker(ctx: WriteContext) -> None:
        gate.wait(10)

    def good(ctx: WriteContext) -> int:
        return ctx.append(RecordType.BLOB, b"good")

    def bad(ctx: WriteContext) -> int:
        ctx.append(RecordType.BLOB, b"bad")
        ctx.put(b"meta", b"test.bad", b"1")
        raise InvalidArgument("refused after writing")

    p0 = store.submit(blocker)
    p1, p2, p3 = store.submit(good), store.submit(bad), store.submit(good)
    gate.set()
    p0.wait()
    assert p1.wait() == 1
    with pytest.raises(InvalidArgument, match="refused after writing"):
        p2.wait()
    assert p3.wait() == 2  # the bad write's index was given back
    assert [r.payload for r in store.read_range(1, 3)] == [b"good", b"good"]
    assert store.meta_get(b"test.bad") is None


def test_before_commit_hooks_run_after_every_function_and_before_the_commit(store: LogStore) -> None:
    """A before-commit hook sees its batch complete but not yet readable (the commit has not
    started); an on-commit hook runs after the commit; a batch whose function fails runs the
    hooks of the remaining functions only, once the batch goes through."""
    gate = threading.Event()
    seen: list[tuple[str, int]] = []

    def visible() -> int:  # records a reader sees
        with store.env.env.begin() as txn:
            return int(txn.stat(store.env.dbs[b"log"])["entries"])

    def blocker(ctx: WriteContext) -> None:
        gate.wait(10)

    def good(ctx: WriteContext) -> int:
        index = ctx.append(RecordType.BLOB, b"good")
        ctx.before_commit(lambda: seen.append(("before", index)))
        ctx.on_commit(lambda: seen.append(("after", index)))
        return index

    def check(ctx: WriteContext) -> None:
        ctx.before_commit(lambda: seen.append(("readable before", visible())))

    def bad(ctx: WriteContext) -> None:
        ctx.append(RecordType.BLOB, b"bad")
        ctx.before_commit(lambda: seen.append(("bad", 0)))
        raise InvalidArgument("refused")

    store.append(RecordType.BLOB, [b"first"])
    p0 = store.submit(blocker)
    p1, p2, p3, p4 = store.submit(good), store.submit(bad), store.submit(good), store.submit(check)
    gate.set()
    p0.wait()
    assert (p1.wait(), p3.wait()) == (2, 3)
    with pytest.raises(InvalidArgument):
        p2.wait()
    p4.wait()
    assert seen == [("before", 2), ("before", 3), ("readable before", 1), ("after", 2), ("after", 3)]
    assert visible() == 3


def test_a_write_never_overtakes_one_submitted_before_it(store: LogStore) -> None:
    """A synchronous write on an idle store runs in the caller's thread; while anything submitted
    earlier is unanswered it queues behind it instead."""
    gate = threading.Event()
    first = store.submit(lambda ctx: (gate.wait(10), ctx.append(RecordType.BLOB, b"first"))[1])
    second = store.submit(lambda ctx: ctx.append(RecordType.BLOB, b"second"))
    threading.Timer(0.2, gate.set).start()
    assert store.append(RecordType.BLOB, [b"third"]) == [3]  # waited for the two before it
    assert (first.wait(), second.wait()) == (1, 2)
    # Idle again: the next write runs at once, and the order of the log is the order of the calls.
    assert store.append(RecordType.BLOB, [b"fourth"]) == [4]
    assert [r.payload for r in store.read_range(1, 5)] == [b"first", b"second", b"third", b"fourth"]


def test_a_write_function_cannot_write_and_wait(store: LogStore) -> None:
    def nested(ctx: WriteContext) -> None:
        store.append(RecordType.BLOB, [b"inner"])

    # Run by the caller (the store is idle) ...
    with pytest.raises(AssertionError, match="would deadlock"):
        store.write(nested)
    # ... and by the writer thread (the store is busy).
    gate = threading.Event()
    busy = store.submit(lambda ctx: gate.wait(10))
    pending = store.submit(nested)
    gate.set()
    with pytest.raises(AssertionError, match="would deadlock"):
        pending.wait(10)
    busy.wait(10)
    assert store.last_index == 0  # nothing of either was written
    assert store.append(RecordType.BLOB, [b"after"]) == [1]  # and the store goes on


def test_full_write_queue_gives_overloaded(store_path: Path, key_file: Path) -> None:
    with LogStore(store_path, key_file=key_file, write_queue_items_max=4) as s:
        gate = threading.Event()
        s.submit(lambda ctx: gate.wait(10))
        while s.writer is not None and s.writer.queued():
            threading.Event().wait(0.01)
        pending = [s.submit(lambda ctx: ctx.append(RecordType.BLOB, b"q")) for _ in range(4)]
        with pytest.raises(Overloaded, match="write queue stayed full"):
            s.writer.submit(lambda ctx: None, wait_ms=50)  # type: ignore[union-attr]
        gate.set()
        assert [p.wait() for p in pending] == [1, 2, 3, 4]


def test_map_grows_without_losing_the_write(store_path: Path, key_file: Path) -> None:
    payload = os.urandom(200_000)
    with LogStore(store_path, key_file=key_file, map_size=limits.MAP_SIZE_BYTES_MIN) as s:
        before = s.stats()["map_size_bytes"]
        indices = [s.append(RecordType.BLOB, [payload])[0] for _ in range(30)]  # ~6 MB into 1 MiB
        assert s.stats()["map_size_bytes"] > before
        assert all(s.read(i).payload == payload for i in indices)
    with LogStore(store_path, key_file=key_file, map_size=limits.MAP_SIZE_BYTES_MIN) as s:
        assert s.last_index == 30 and s.read(30).payload == payload


def test_map_size_max_is_enforced(store_path: Path, key_file: Path) -> None:
    with LogStore(store_path, key_file=key_file, map_size=1 << 20, map_size_max=2 << 20) as s:
        s.append(RecordType.BLOB, [b"small"])
        with pytest.raises(Exception, match="maximum map size"):
            for _ in range(40):
                s.append(RecordType.BLOB, [os.urandom(200_000)])
        assert s.read(1).payload == b"small"


def test_second_writer_is_locked_out(store: LogStore, store_path: Path, key_file: Path) -> None:
    with pytest.raises(StoreLocked, match="already open in this process: use the store object"):
        LogStore(store_path, key_file=key_file)  # (it used to name this process as "another process")
    code = (
        "import sys\nfrom mqstore.store import LogStore\nfrom mqstore.errors import StoreLocked\n"
        f"try:\n    LogStore({str(store_path)!r}, key_file={str(key_file)!r})\n"
        "except StoreLocked as e:\n    print('locked', e)\n    sys.exit(3)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 3, out.stderr
    assert f"open for writing by another process (pid {os.getpid()})" in out.stdout


def test_read_only_open_works_beside_the_writer(store: LogStore, store_path: Path, key_file: Path) -> None:
    store.append(RecordType.BLOB, [b"visible"])
    # LMDB allows one environment per process, so the reader is another process (like the CLI).
    code = (
        "from mqstore.store import LogStore\nfrom mqstore.codec import RecordType\n"
        f"s = LogStore({str(store_path)!r}, key_file={str(key_file)!r}, readonly=True)\n"
        "print(s.read(1).payload.decode())\n"
        "try:\n    s.append(RecordType.BLOB, [b'nope'])\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "visible"
    assert lines[1].startswith("InvalidArgument") and "read-only" in lines[1]
    assert store.last_index == 1


def test_store_refuses_use_after_close_and_after_fork(store_path: Path, key_file: Path) -> None:
    s = LogStore(store_path, key_file=key_file)
    s.append(RecordType.BLOB, [b"x"])
    pid = os.fork()
    if pid == 0:  # child: the inherited environment must not be used
        try:
            s.read(1)
        except StoreClosed:
            os._exit(0)
        os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    s.close()
    with pytest.raises(StoreClosed):
        s.read(1)


def test_default_key_file_is_created_with_a_warning(tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with LogStore(tmp_path / "s") as s:
            s.append(RecordType.BLOB, [b"x"])
    assert any("production keys belong elsewhere" in str(w.message) for w in caught)
    assert (tmp_path / "s" / "kek.key").stat().st_mode & 0o777 == 0o600
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with LogStore(tmp_path / "s") as s:  # reopening uses it silently
            assert s.read(1).payload == b"x"
    assert not caught


def test_truncate_suffix_and_delete_prefix(store: LogStore) -> None:
    store.append(RecordType.BLOB, [b"%d" % i for i in range(1, 11)])
    assert store.truncate_suffix(8) == 3
    assert store.last_index == 7
    assert store.append(RecordType.BLOB, [b"new8"]) == [8]
    assert store.delete_prefix(5, keep=[2]) == 3  # 1, 3, 4 go; 2 is kept
    assert store.first_index == 5
    assert store.read(2).payload == b"2"
    with pytest.raises(NotFound):
        store.read(3)
    assert [r.payload for r in store.read_range(5, 9)] == [b"5", b"6", b"7", b"new8"]
    with pytest.raises(InvalidArgument):
        store.truncate_suffix(3)
    assert store.scan().clean


def _flip_in_file(path: Path, needle: bytes, offset: int) -> int:
    """Flip one byte at ``offset`` after every occurrence of ``needle`` in the file."""
    raw = bytearray(path.read_bytes())
    count = 0
    pos = raw.find(needle)
    while pos >= 0:
        raw[pos + offset] ^= 0x40
        count += 1
        pos = raw.find(needle, pos + 1)
    path.write_bytes(bytes(raw))
    return count


def test_corrupt_record_is_named_by_index_and_listed_by_scan(store_path: Path, key_file: Path) -> None:
    with LogStore(store_path, key_file=key_file) as s:
        s.append(RecordType.BLOB, [b"payload-%03d-" % i * 20 for i in range(1, 51)])
        s.append_messages([_msg(data=MailFactory(3).message(2048)) for _ in range(5)])
        victim_message = s.read(53)
        header = encode_record(*victim_message)[:36]
    assert _flip_in_file(store_path / "data.mdb", b"payload-017-", 3) >= 1
    assert _flip_in_file(store_path / "data.mdb", header, 60) >= 1  # inside the sealed payload
    with LogStore(store_path, key_file=key_file) as s:
        assert s.read(16).payload.startswith(b"payload-016-")
        with pytest.raises(Corruption, match="log index 17: checksum mismatch") as err:
            s.read(17)
        assert err.value.index == 17
        with pytest.raises(Corruption, match="log index 53"):
            s.read_message(53)
        with pytest.raises(Corruption, match="log index 17"):
            s.read_range(10, 20)
        report = s.scan()
        assert [i for i, _ in report.corrupt] == [17, 53]
        assert not report.clean and report.records_checked == 56  # 50 blobs, 1 KEY, 5 messages
        assert set(s.quarantined()) == {17, 53}
    with LogStore(store_path, key_file=key_file) as s:  # the quarantine list is persistent
        assert set(s.quarantined()) == {17, 53}


def test_deleted_record_inside_the_log_is_corruption_not_absence(store: LogStore) -> None:
    store.append(RecordType.BLOB, [b"a", b"b", b"c"])
    with store.env.env.begin(write=True) as txn:  # damage behind mqstore's back
        txn.delete((2).to_bytes(8, "big"), db=store.env.dbs[b"log"])
    with pytest.raises(Corruption, match="log index 2: record missing"):
        store.read(2)
    assert store.scan().corrupt == ((2, "record missing from the log"),)


def test_scan_reports_progress(store: LogStore) -> None:
    store.append(RecordType.BLOB, [b"x"] * 3000)
    store.append(RecordType.BLOB, [b"y"] * 3000)
    seen: list[tuple[int, int]] = []
    report = store.scan(progress=lambda done, total: seen.append((done, total)))
    assert report.clean and report.records_checked == 6000
    assert seen[-1] == (6000, 6000) and len(seen) >= 2


def test_decode_of_stored_bytes_matches_read(store: LogStore) -> None:
    store.append(RecordType.BLOB, [b"abc"])
    with store.env.read() as txn:
        raw = txn.get((1).to_bytes(8, "big"), db=store.env.dbs[b"log"])
    assert decode_record(raw, 1) == store.read(1)


@pytest.mark.parametrize("domain", ["\ud800.example", "\u0130" * 60 + "." + "\u0130" * 60])
def test_bad_domain_filters_are_refused_with_a_clear_error(tmp_path: Path, domain: str) -> None:
    import mqstore

    with mqstore.open(tmp_path / "q", background=False) as queue:
        queue.enqueue(mail_from="a@example.org", recipients=["b@example.net"], data=b"x")
        last = queue.log.last_index
        with pytest.raises(InvalidArgument, match="domain"):
            queue.lease(worker="w", domain=domain)
        with pytest.raises(InvalidArgument, match="domain"):
            queue.list(domain=domain)
        assert queue.log.last_index == last


def test_a_first_open_that_failed_leaves_a_store_the_default_key_still_opens(tmp_path: Path) -> None:
    """A first open given a key file that does not exist (a typo; or one killed between making
    the environment and the key) used to leave data.mdb behind, and every later open with the
    embedded default refused: "key file .../kek.key does not exist", for a store that never
    held anything. A store that holds no key check was never written: it is still new."""
    import mqstore

    path = tmp_path / "q"
    with pytest.raises(KeyFileError, match="does not exist"):
        mqstore.open(path, key_file=str(tmp_path / "typo.key"))
    assert (path / "data.mdb").exists()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        with mqstore.open(path, background=False) as store:
            mid = store.enqueue(mail_from="a@example.org", recipients=["b@example.net"], data=b"x")
    assert any("created a key-encryption key" in str(w.message) for w in said)
    with mqstore.open(path, background=False) as store:
        assert store.get(mid).data == b"x"
    (path / "kek.key").rename(tmp_path / "moved.key")
    with pytest.raises(KeyFileError, match="does not exist"):  # a store that was written: no new key
        mqstore.open(path)
