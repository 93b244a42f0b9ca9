"""Replacing the database file (a key shred's scrub, a snapshot install) while another process
has the store open read-only, and copies/opens beside a writer that grows the map.

LMDB keeps the id of the last transaction in ``lock.mdb``, shared with every process that has
the store open; only an opener that gets it exclusively resets it. Before, a shred beside a
reader (`mqstore queue list --data-dir`, ``LogStore(readonly=True)``) swapped in the compacted
copy under the old lock table: the writer then read the new file by the stale transaction id
and saw an empty store (log 1..0, every acknowledged message NotFound, new writes at index 1),
for good. And a read-only copy (`verify`, `backup --data-dir`) of a store whose writer grew the
map crashed with a raw ``lmdb.MapResizedError``."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lmdb
import pytest

import mqstore
import mqstore.api
from mqstore.crypto import create_key_file
from mqstore.store import LogStore
from mqstore.store.env import Environment, StoreInUse

pytestmark = pytest.mark.filterwarnings("ignore:mqstore created a key-encryption key")

_READER = textwrap.dedent("""
    import sys
    from mqstore.store import LogStore
    log = LogStore(sys.argv[1], key_file=sys.argv[2], readonly=True)
    print("open", log.last_index, flush=True)
    sys.stdin.readline()
    print("still", log.last_index, flush=True)
    log.close()
""")


@contextmanager
def reader_beside(path: Path, key: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process with the store open read-only until the block ends (it then reads once
    more, prints what it sees, and exits)."""
    child = subprocess.Popen([sys.executable, "-c", _READER, str(path), str(key)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdin is not None
        line = child.stdout.readline()
        assert line.startswith("open "), line + (child.stderr.read() if child.stderr else "")
        yield child
        child.stdin.write("\n")
        child.stdin.flush()
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)


def _store(tmp_path: Path) -> tuple[Path, Path]:
    key = create_key_file(tmp_path / "k.key")
    return tmp_path / "s", key


def _enqueue(s: mqstore.Store, data: bytes, namespace: str = "default") -> str:
    return s.enqueue(mail_from="a@example.org", recipients=["b@example.net"], data=data, namespace=namespace)


def _raw_files(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in path.iterdir() if p.is_file())


def test_a_shred_beside_a_reader_keeps_every_message_and_scrubs_once_the_reader_is_gone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(mqstore.api, "_SCRUB_RETRY_S", 0)
    path, key = _store(tmp_path)
    s = mqstore.open(path, key_file=key, background=False)
    try:
        s.set_namespace_policy("old", retention=0)
        live = [_enqueue(s, b"keep me %d" % i) for i in range(20)]
        _enqueue(s, b"x", namespace="old")
        for lease in s.lease("w", namespace="old"):
            s.ack(lease.token)
        s.maintain()
        key_id = next(k["key_id"] for k in s.list_keys() if k["namespace"] == "old")
        wrapped = s.log.keyring.event(key_id).wrapped
        last = s.log.last_index
        with reader_beside(path, key) as reader, caplog.at_level(logging.WARNING, logger="mqstore"):
            s.shred_key(key_id)
            # the writer still has its log and every acknowledged message (before: 1..0, all NotFound)
            assert s.log.last_index == last + 1
            assert s.stats()["messages"] == 20
            assert [s.get(mid).data for mid in live] == [b"keep me %d" % i for i in range(20)]
            new = _enqueue(s, b"after")
            assert s.log.last_index == last + 2  # not index 1 again
            # the rewrite is put off while the reader has the store open, and the user is told
            assert s.log.meta_get(b"keys.scrub_pending") is not None
            assert "not rewritten yet" in caplog.text and f"process {reader.pid}" in caplog.text
            s.maintain()  # tried again, put off again: the reader is still there
            assert s.log.meta_get(b"keys.scrub_pending") is not None
        assert reader.returncode == 0
        s.maintain()  # the reader is gone: the scrub happens
        assert s.log.meta_get(b"keys.scrub_pending") is None
        assert wrapped not in _raw_files(path), "the wrapped key survives in the store's files"
        assert s.get(new).data == b"after"
    finally:
        s.close()
    with mqstore.open(path, key_file=key, background=False) as s:
        assert s.log.last_index == last + 2
        assert [s.get(mid).data for mid in live] == [b"keep me %d" % i for i in range(20)]


def test_a_shred_put_off_by_a_reader_is_finished_when_the_store_opens_next(tmp_path: Path) -> None:
    path, key = _store(tmp_path)
    with mqstore.open(path, key_file=key, background=False) as s:
        s.set_namespace_policy("old", retention=0)
        keep = _enqueue(s, b"keep")
        _enqueue(s, b"x", namespace="old")
        for lease in s.lease("w", namespace="old"):
            s.ack(lease.token)
        s.maintain()
        key_id = next(k["key_id"] for k in s.list_keys() if k["namespace"] == "old")
        wrapped = s.log.keyring.event(key_id).wrapped
        with reader_beside(path, key):
            s.shred_key(key_id)
    with mqstore.open(path, key_file=key, background=False) as s:
        assert s.log.meta_get(b"keys.scrub_pending") is None
        assert s.get(keep).data == b"keep"
    assert wrapped not in _raw_files(path)


def test_replace_data_beside_a_reader_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    path, key = _store(tmp_path)
    with mqstore.open(path, key_file=key, background=False) as s:
        ids = [_enqueue(s, b"m%d" % i) for i in range(30)]
        last = s.log.last_index
        with reader_beside(path, key) as reader:
            copy = s.log.copy_to(tmp_path / "c1")
            with pytest.raises(StoreInUse, match=f"process {reader.pid}"):
                s.log.replace_data(copy, wait_s=0.2, force=False)
            assert s.log.last_index == last and s.get(ids[-1]).data == b"m29"  # nothing changed
            _enqueue(s, b"one more")
            assert s.log.last_index == last + 1
        # nobody beside it: replaced at once
        copy = s.log.copy_to(tmp_path / "c2")
        s.log.replace_data(copy, wait_s=0, force=False)
        assert s.log.last_index == last + 1
    with mqstore.open(path, key_file=key, background=False) as s:
        assert s.log.last_index == last + 1
        assert [s.get(mid).data for mid in ids] == [b"m%d" % i for i in range(30)]


def test_a_forced_replace_data_beside_a_reader_starts_a_new_lock_table(tmp_path: Path) -> None:
    """What a snapshot install does (force): the writer's view is the new file, whole; the
    reader goes on with its old one. Two swaps: LMDB picks a meta page by the parity of the
    transaction id, so one of them hit the empty meta page of the copy before."""
    path, key = _store(tmp_path)
    with mqstore.open(path, key_file=key, background=False) as s:
        ids = [_enqueue(s, b"m%d" % i) for i in range(30)]
        last = s.log.last_index
        with reader_beside(path, key) as reader:
            for i in range(2):
                s.log.replace_data(s.log.copy_to(tmp_path / f"c{i}"), wait_s=0.2)  # force, the default
                assert (s.log.first_index, s.log.last_index) == (1, last)  # before: 1..0
                assert [s.get(mid).data for mid in ids] == [b"m%d" % i for i in range(30)]
            ids.append(_enqueue(s, b"after"))
            assert s.log.last_index == last + 1
        assert reader.returncode == 0
        assert reader.stdout is not None and reader.stdout.read().startswith("still ")
    with mqstore.open(path, key_file=key, background=False) as s:
        assert s.log.last_index == last + 1
        assert [s.get(mid).data for mid in ids] == [b"m%d" % i for i in range(30)] + [b"after"]


_GROW = textwrap.dedent("""
    import os, sys, mqstore
    with mqstore.open(sys.argv[1], key_file=sys.argv[2], background=False, map_size=1024 * 1024) as s:
        for _ in range(8):
            s.enqueue_many([{"mail_from": "a@example.org", "recipients": ["b@example.net"],
                             "data": os.urandom(60000)} for _ in range(10)])
        print(s.stats()["log"]["map_size_bytes"], s.log.last_index)
""")


def test_a_copy_beside_a_writer_that_grew_the_map_follows_the_new_size(tmp_path: Path) -> None:
    """`verify`/`backup --data-dir` beside a running store: the map grew after the read-only open.
    Before, the copy raised a raw lmdb.MapResizedError (verify: a traceback, exit 1)."""
    path, key = _store(tmp_path)
    with mqstore.open(path, key_file=key, background=False, map_size=1024 * 1024) as s:
        _enqueue(s, b"x")
    env = Environment(path, readonly=True, map_size=1024 * 1024)
    try:
        out = subprocess.run([sys.executable, "-c", _GROW, str(path), str(key)], capture_output=True, text=True,
                             check=True).stdout.split()
        grown, last = int(out[0]), int(out[1])
        assert grown > env.map_size()  # the writer grew the map beyond what this reader mapped
        (tmp_path / "copy").mkdir()
        env.copy_to(tmp_path / "copy")
    finally:
        env.close()
    with LogStore(tmp_path / "copy", key_file=key, readonly=True) as copied:
        assert copied.last_index == last


def test_a_read_only_open_the_map_grew_under_opens_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LMDB's first transaction of an open fails with MDB_MAP_RESIZED when a writer grew the map
    after the opener read its size: before, the open failed ("cannot open store ...")."""
    path, key = _store(tmp_path)
    with mqstore.open(path, key_file=key, background=False) as s:
        _enqueue(s, b"x")
    real_open = lmdb.open
    calls = []

    def resized_once(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 1:
            raise lmdb.MapResizedError("mdb_txn_begin: MDB_MAP_RESIZED: Database contents grew beyond environment "
                                       "mapsize")
        return real_open(*args, **kwargs)

    monkeypatch.setattr(lmdb, "open", resized_once)
    env = Environment(path, readonly=True)
    try:
        assert len(calls) == 2
        with env.read() as txn:
            assert txn.get(b"x", db=env.dbs[b"meta"]) is None
    finally:
        env.close()
    assert os.path.exists(path / "data.mdb")
