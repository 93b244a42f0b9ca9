"""After a key shred the embedded store rewrites its database compactly (freed LMDB pages keep
old bytes, the shredded key's among them). Writes from other threads go on meanwhile and none
is lost or refused; a rewrite killed midway leaves no copy of the database behind."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import mqstore
from mqstore.errors import MQStoreError, NotFound

pytestmark = pytest.mark.filterwarnings("ignore:mqstore created a key-encryption key")


def test_writes_beside_a_shreds_rewrite_are_neither_lost_nor_refused(tmp_path: Path) -> None:
    """Before, the rewrite copied the database while the writer still ran and then swapped the
    copy in: an enqueue acknowledged between the two was gone (its log index, a lease token,
    given out again), and every write meanwhile was refused as "the store is closing"."""
    with mqstore.open(tmp_path / "s", background=False) as store:
        for _ in range(20):  # some bulk, so that the copy takes a moment
            store.enqueue_many([{"mail_from": "a@example.org", "recipients": ["b@example.net"],
                                 "data": b"x" * 20_000} for _ in range(50)])
        old = store.rotate_key("other")
        store.rotate_key("other")
        acked: list[str] = []
        refused: list[str] = []
        stop = threading.Event()

        def write() -> None:
            while not stop.is_set():
                try:
                    acked.append(store.enqueue(mail_from="a@example.org", recipients=["c@example.com"],
                                               data=b"hello"))
                except MQStoreError as exc:
                    refused.append(f"{type(exc).__name__}: {exc}")

        writer = threading.Thread(target=write)
        writer.start()
        try:
            time.sleep(0.2)
            store.shred_key(old)
            time.sleep(0.2)
        finally:
            stop.set()
            writer.join()
        assert not refused, refused[:3]
        assert len(acked) > 10

        def missing() -> list[str]:
            out = []
            for mid in acked:
                try:
                    store.get(mid)
                except NotFound:
                    out.append(mid)
            return out

        assert missing() == []
    with mqstore.open(tmp_path / "s", background=False) as store:
        assert missing() == []
        tokens: list[int] = []
        while batch := store.lease("w", max_messages=4096, lease_seconds=600):
            tokens += [lease.token for lease in batch]
        assert len(set(tokens)) == len(tokens) == len(acked) + 1000  # every message once, no token twice


def test_a_rewrite_killed_midway_leaves_no_copy_of_the_database(tmp_path: Path) -> None:
    """kill -9 right after the rewrite's scratch copy was written: that copy held every key the
    store had, wrapped under the store's KEK, so a key shredded later survived in the store's
    directory. The next open removes it (and finishes the interrupted scrub)."""
    d = tmp_path / "s"
    child = textwrap.dedent(f"""
        import os, signal, warnings
        warnings.simplefilter("ignore")
        import mqstore
        from mqstore.store.log import LogStore
        s = mqstore.open({str(d)!r}, background=False)
        mid = s.enqueue(mail_from="a@example.org", recipients=["b@example.net"], data=b"SECRET", namespace="a")
        for lease in s.lease("w", 10, 60, namespace="a"):
            s.ack(lease.token)
        print(mid, flush=True)
        b1 = s.rotate_key("b")
        s.rotate_key("b")
        copy_to = LogStore.copy_to
        def copy_then_die(self, directory):
            copy_to(self, directory)
            os.kill(os.getpid(), signal.SIGKILL)
        LogStore.copy_to = copy_then_die
        s.shred_key(b1)
    """)
    run = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert run.returncode == -9, run.stderr
    mid = run.stdout.strip()
    assert [p.name for p in d.glob(".rewrite-*")], "the child died before its copy was written"
    with mqstore.open(d, background=False) as store:
        assert list(d.glob(".rewrite-*")) == []
        key = store.get(mid).key_id
        store.rotate_key("a")
        store.shred_key(key)
        with pytest.raises(NotFound):
            store.get(mid)
    assert list(d.glob(".rewrite-*")) == []
