"""The embedded store beside threads that read, and across fork(): a refused write does not
wait on readers; a forked child neither hangs closing the store nor keeps it locked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import mqstore
from mqstore.errors import StaleLease, StoreClosed

pytestmark = pytest.mark.filterwarnings("ignore:mqstore created a key-encryption key")


def test_a_refused_write_goes_through_while_threads_read(tmp_path: Path) -> None:
    """A write refused inside the writer (an ack of a settled lease: StaleLease) aborts its LMDB
    transaction, and py-lmdb makes an abort wait until no other thread is inside an LMDB call:
    with six threads listing, shaping and counting back to back, the ack and every write behind
    it waited for as long as they read (close() too). Now they go through while the reads go on."""
    store = mqstore.open(tmp_path / "s", background=False)
    stop = threading.Event()
    readers: list[threading.Thread] = []
    try:
        store.enqueue_many([{"mail_from": "a@example.org", "recipients": [f"r{i}@d{i % 50}.example"],
                             "data": b"x" * 100} for i in range(2000)])
        (lease,) = store.lease("w", max_messages=1)
        store.ack(lease.token)

        def read(kind: str) -> None:
            while not stop.is_set():
                if kind == "list":
                    store.list(limit=1000)
                elif kind == "qshape":
                    store.qshape()
                else:
                    store.stats()

        readers = [threading.Thread(target=read, args=(k,), daemon=True) for k in ("list", "qshape", "stats") * 2]
        for t in readers:
            t.start()
        time.sleep(0.5)
        done: dict[str, object] = {}

        def stale_ack() -> None:
            try:
                store.ack(lease.token)
            except StaleLease as exc:
                done["ack"] = exc

        def enqueue() -> None:
            done["enqueue"] = store.enqueue(mail_from="a@example.org", recipients=["b@example.net"], data=b"y")

        writers = [threading.Thread(target=stale_ack, daemon=True), threading.Thread(target=enqueue, daemon=True)]
        for t in writers:
            t.start()
        for t in writers:
            t.join(10)  # a hang, not a speed: before, they waited until the readers stopped
        assert set(done) == {"ack", "enqueue"}, done
        assert all(t.is_alive() for t in readers)  # the reads were still going on
    finally:
        stop.set()
        for t in readers:
            t.join(10)
        store.close()


_BUSY_THEN_FORK = """
import os, sys, threading, time, warnings
warnings.simplefilter("ignore")
import mqstore
from mqstore.errors import StoreClosed
store = mqstore.open(sys.argv[1], background=False)
stop = threading.Event()
def busy():
    while not stop.is_set():
        message = {"mail_from": "a@example.org", "recipients": ["b@example.net"], "data": os.urandom(2000)}
        store.enqueue_many([message] * 50)
threads = [threading.Thread(target=busy) for _ in range(3)]
for t in threads:
    t.start()
time.sleep(0.3)
for _ in range(4000):  # fork while the writer holds its commit lock (most of the time, this busy)
    if store.log.writer._commit_lock.locked():
        pid = os.fork()
        break
    time.sleep(0.0005)
else:
    print("the writer was never busy"); os._exit(2)
if pid == 0:
    started = time.monotonic()
    try:
        store.enqueue(mail_from="a@example.org", recipients=["b@example.net"], data=b"x")
        os._exit(3)
    except StoreClosed:
        pass
    store.close()
    os._exit(0 if time.monotonic() - started < 30 else 4)
_, status = os.waitpid(pid, 0)
stop.set()
for t in threads:
    t.join()
store.close()
print("child", os.waitstatus_to_exitcode(status), flush=True)
"""


def test_a_child_forked_while_the_store_writes_closes_it_at_once(tmp_path: Path) -> None:
    """In the child the store refuses use (StoreClosed); closing it waited 60 s for the parent's
    writer's lock, copied locked into the child, and then raised."""
    run = subprocess.run([sys.executable, "-c", _BUSY_THEN_FORK, str(tmp_path / "s")], capture_output=True,
                         text=True, timeout=180)
    assert run.returncode == 0 and run.stdout.strip() == "child 0", (run.stdout, run.stderr)


def test_a_forked_child_does_not_keep_the_store_locked_after_its_parent_died(tmp_path: Path) -> None:
    """A pre-forked worker that never touched the store kept its lock after the parent was
    killed: the restarted parent got StoreLocked naming the dead process."""
    path = tmp_path / "s"
    parent = textwrap.dedent(f"""
        import os, time, warnings
        warnings.simplefilter("ignore")
        import mqstore
        store = mqstore.open({str(path)!r}, background=False)
        store.enqueue(mail_from="a@example.org", recipients=["b@example.net"], data=b"x")
        if os.fork() == 0:
            print(os.getpid(), flush=True)  # (after fork()'s hooks ran in this child)
            time.sleep(60)
            os._exit(0)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        with mqstore.open(path, background=False) as store:  # the worker still runs
            assert store.stats()["messages"] == 1
    finally:
        os.kill(child, signal.SIGKILL)


def test_stats_after_close_is_store_closed(tmp_path: Path) -> None:
    store = mqstore.open(tmp_path / "s", background=False)
    store.close()
    with pytest.raises(StoreClosed):
        store.log.stats()


def test_list_keys_after_close_is_store_closed(tmp_path: Path) -> None:
    """It answered from memory after close(), where every other call raises StoreClosed."""
    store = mqstore.open(tmp_path / "s", background=False)
    store.enqueue(mail_from="a@example.org", recipients=["b@example.net"], data=b"x")
    assert store.list_keys()
    store.close()
    with pytest.raises(StoreClosed):
        store.list_keys()


def test_a_message_enqueued_after_the_clock_was_set_back_is_new_to_stats_and_qshape(tmp_path: Path) -> None:
    """A message created at the queue's time (the clock never goes back past the latest stamp)
    must be as young to stats() and qshape() as to get() and list(older_than=...). Until stop 31
    its id carried the raw clock, so one enqueued a moment after the clock was set back an hour
    showed oldest_age_seconds 3600 and sat in qshape's 40-80 minute bucket."""
    t0 = 1_800_000_000.0
    now = [t0]
    with mqstore.open(tmp_path / "s", clock=lambda: now[0], background=False) as store:
        store.enqueue(mail_from="a@example.org", recipients=["b@example.net"], data=b"x")
        for lease in store.lease("w"):
            store.ack(lease.token)
        now[0] = t0 + 7200
        store.maintain()  # a stamp at the queue's time, two hours on
        now[0] = t0 + 3600  # the clock is stepped back an hour
        mid = store.enqueue(mail_from="a@example.org", recipients=["new@fresh.example"], data=b"x")
        assert store.get(mid).created == t0 + 7200
        assert store.list(older_than=60) == []
        assert store.stats()["oldest_age_seconds"] < 60
        shape = store.qshape()
        assert shape.domains["fresh.example"][0] == 1  # the youngest bucket
