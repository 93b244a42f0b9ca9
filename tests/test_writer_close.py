"""No caller waits forever on a store that is closing or broken: writes caught by close() or by
a failed writer while they waited for room, stop()'s report of a writer still busy, a FIFO at the
key-file path, and readers of a read-only store whose map another process grew."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mqstore.crypto.providers import read_key_file
from mqstore.errors import KeyFileError, StoreClosed
from mqstore.store import LogStore
from mqstore.store.env import Environment
from mqstore.store.writer import Pending, Writer, WriterFailed


class _Crash(BaseException):
    """An unexpected error in the writer thread (like ``lmdb.PanicError``): the writer stops."""


def _wait_until(cond: Any, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_writes_waiting_for_room_when_the_writer_fails_raise_writer_failed(tmp_path: Path) -> None:
    log = LogStore(tmp_path / "store", write_queue_items_max=2)
    gate = threading.Event()

    def crash(ctx: object) -> None:
        gate.wait(10)
        raise _Crash("unexpected error in the writer")

    log.submit(crash)
    assert log.writer is not None
    _wait_until(lambda: log.writer is not None and log.writer.queued() == 0)  # the batch runs
    queued = [log.submit(lambda ctx: None) for _ in range(2)]  # the queue is full
    outcomes: dict[int, object] = {}

    def caller(i: int) -> None:
        try:
            outcomes[i] = log.write(lambda ctx: i)
        except Exception as exc:
            outcomes[i] = exc

    callers = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(3)]
    for t in callers:
        t.start()
    time.sleep(0.3)  # they wait for room in the queue
    gate.set()
    for t in callers:
        t.join(10)
    assert not any(t.is_alive() for t in callers), f"write() still waiting: {outcomes}"
    assert all(isinstance(o, WriterFailed) for o in outcomes.values()), outcomes
    for pending in queued:
        with pytest.raises(WriterFailed, match="writer stopped"):
            pending.wait(5)
    with pytest.raises(WriterFailed, match="reopen the store"):
        log.write(lambda ctx: None)
    log.close()


class _ArrivesAfterStop(int):
    """``wait_ms`` of a caller that passed the open check just before close() began: turning it
    into seconds waits until stop() has queued its marker (filling the one-place queue) and
    lets the running batch finish shortly after."""

    def __init__(self, value: int) -> None:
        self.writer: Writer | None = None
        self.gate = threading.Event()
        self.stopper: threading.Thread | None = None

    def __truediv__(self, other: int) -> float:
        writer = self.writer
        assert writer is not None
        self.stopper = threading.Thread(target=writer.stop, args=(10,), daemon=True)
        self.stopper.start()
        _wait_until(lambda: writer.queued() == 1)
        threading.Timer(0.2, self.gate.set).start()
        return int(self) / other


def test_a_write_caught_by_close_while_waiting_for_room_raises_store_closed() -> None:
    wait_ms = _ArrivesAfterStop(10_000)

    def run_batch(batch: list[Pending[Any]]) -> None:
        wait_ms.gate.wait(10)
        for item in batch:
            item.result = item.fn(None)  # type: ignore[arg-type]

    writer = Writer(run_batch, name="test-writer", queue_items_max=1)
    wait_ms.writer = writer
    first = writer.submit(lambda ctx: "first")
    _wait_until(lambda: writer.queued() == 0)  # the writer runs it
    started = time.monotonic()
    with pytest.raises(StoreClosed):
        writer.submit(lambda ctx: "late", wait_ms=wait_ms).wait(5)
    assert time.monotonic() - started < 5
    assert first.wait(5) == "first"
    assert wait_ms.stopper is not None
    wait_ms.stopper.join(10)
    assert not wait_ms.stopper.is_alive()


def test_stop_says_whether_the_writer_thread_ended() -> None:
    gate = threading.Event()

    def run_batch(batch: list[Pending[Any]]) -> None:
        gate.wait(10)
        for item in batch:
            item.result = item.fn(None)  # type: ignore[arg-type]

    writer = Writer(run_batch, name="test-writer")
    pending = writer.submit(lambda ctx: "done")
    _wait_until(lambda: writer.queued() == 0)
    assert writer.stop(0.2) is False  # a batch still runs: its environment must stay open
    assert writer.thread.is_alive()
    gate.set()
    assert writer.stop(10) is True  # asking again waits again
    assert not writer.thread.is_alive()
    assert pending.wait(1) == "done"


def test_a_fifo_at_the_key_file_path_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "kek.key"
    os.mkfifo(fifo, 0o600)
    outcome: list[BaseException | None] = []

    def read() -> None:
        try:
            read_key_file(fifo)
            outcome.append(None)
        except Exception as exc:
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(5)
    try:
        assert not reader.is_alive(), "reading the key file blocked on the FIFO"
    finally:
        if reader.is_alive():  # unblock it (without the fix): a writer end opens, then closes
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            reader.join(5)
    assert len(outcome) == 1 and isinstance(outcome[0], KeyFileError)
    assert "is not a regular file" in str(outcome[0])


_GROWER = """
import os, sys, warnings
warnings.simplefilter("ignore")
from mqstore.codec import RecordType
from mqstore.store import LogStore
log = LogStore(sys.argv[1], map_size=1 << 20)
log.append(RecordType.BLOB, [b"a" * 100])
print("ready", flush=True)
sys.stdin.readline()
for _ in range(60):
    log.append(RecordType.BLOB, [os.urandom(100_000)])
print(log.env.map_size(), flush=True)
sys.stdin.readline()
log.close()
"""


def test_a_reader_adopting_a_grown_map_leaves_other_readers_intact(tmp_path: Path) -> None:
    """Another process grew the map: the read that notices adopts the new size only once the
    other threads' read transactions ended; theirs keep working, and it reads everything."""
    path = tmp_path / "store"
    grower = subprocess.Popen(
        [sys.executable, "-c", _GROWER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert grower.stdin is not None and grower.stdout is not None
    try:
        assert grower.stdout.readline().strip() == "ready"
        env = Environment(path, readonly=True, map_size=1 << 20)
        holding, release = threading.Event(), threading.Event()
        held: list[object] = []

        def holder() -> None:
            with env.read() as txn:
                cursor = txn.cursor(db=env.dbs[b"log"])
                cursor.first()
                holding.set()
                release.wait(10)
                try:
                    held.append(sum(1 for _ in cursor))
                except Exception as exc:
                    held.append(exc)

        t = threading.Thread(target=holder, daemon=True)
        t.start()
        assert holding.wait(10)
        grower.stdin.write("\n")
        grower.stdin.flush()
        grown = int(grower.stdout.readline())
        assert grown > 1 << 20
        seen: list[object] = []

        def second() -> None:
            try:
                with env.read() as txn:
                    seen.append(sum(1 for _ in txn.cursor(db=env.dbs[b"log"])))
            except Exception as exc:
                seen.append(exc)

        s = threading.Thread(target=second, daemon=True)
        s.start()
        s.join(0.5)  # it waits for the holder's read to end before remapping
        release.set()
        t.join(10)
        s.join(10)
        assert not t.is_alive() and not s.is_alive()
        assert held == [1]  # the holder's snapshot, still readable
        assert seen == [61]
        assert env.map_size() == grown
        env.close()
    finally:
        if grower.poll() is None:
            grower.stdin.write("\n")
            grower.stdin.flush()
        grower.wait(30)


def test_close_waits_for_a_write_running_in_its_callers_thread(tmp_path: Path) -> None:
    """An idle writer runs a lone write in its caller's thread: close() waits for that write too
    (it closed the environment under it: the caller got a raw lmdb.Error, close() could hang)."""
    from mqstore.crypto import create_key_file

    log = LogStore(tmp_path / "store", key_file=create_key_file(tmp_path / "kek.key"))
    entered, release = threading.Event(), threading.Event()
    caller_thread: list[int] = []
    got: list[object] = []

    def fn(ctx: Any) -> int:
        caller_thread.append(threading.get_ident())
        entered.set()
        release.wait(10)
        ctx.put(b"meta", b"test.key", b"1")
        return 7

    def write() -> None:
        try:
            got.append(log.write(fn))
        except BaseException as exc:  # what the caller sees
            got.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    assert entered.wait(10)
    assert caller_thread == [writer.ident]  # it runs inline, in the caller's thread
    closer = threading.Thread(target=log.close)
    closer.start()
    time.sleep(0.3)
    assert closer.is_alive()  # waiting for the write
    release.set()
    writer.join(10)
    closer.join(10)
    assert not closer.is_alive() and got == [7]
    with pytest.raises(StoreClosed):
        log.write(fn)


def test_reads_running_when_the_store_closes_get_store_closed(tmp_path: Path) -> None:
    import mqstore
    from mqstore.crypto import create_key_file

    key = create_key_file(tmp_path / "kek.key")
    for trial in range(3):
        store = mqstore.open(tmp_path / f"s{trial}", key_file=key, background=False)
        mids = store.enqueue_many([{"mail_from": "a@example.org", "recipients": [f"r{i}@d{i % 5}.example.net"],
                                    "data": b"x" * 100} for i in range(300)])
        seen: list[BaseException] = []

        def reader(kind: str, store: Any = store, mids: list[str] = mids, seen: list[BaseException] = seen) -> None:
            i = 0
            while True:
                i += 1
                try:
                    if kind == "get":
                        store.get(mids[i % len(mids)])
                    elif kind == "list":
                        store.list(limit=500)
                    elif kind == "stats":
                        store.stats()
                    else:
                        store.qshape()
                except BaseException as exc:
                    seen.append(exc)
                    return

        threads = [threading.Thread(target=reader, args=(k,)) for k in ("get", "list", "stats", "qshape")]
        for t in threads:
            t.start()
        time.sleep(0.2)
        store.close()
        for t in threads:
            t.join(10)
        assert len(seen) == 4 and all(isinstance(e, StoreClosed) for e in seen), [repr(e) for e in seen]
