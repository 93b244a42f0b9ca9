"""A store that filled its disk to the free-space floor takes mail again once it has drained.

An LMDB data file never shrinks: the pages that settled, deleted and compacted mail frees are
reused inside the file, not given back to the disk. The floor counts them as free space, for at
most half the floor (test_disk_floor_hard_minimum.py says why; until
stop 31 it compared only the disk's free space with the floor, so a drained store went on
refusing enqueues for good, and a node stayed NOT_SERVING). The disk here is a stand-in whose
free space is a fixed amount minus what the store's directory takes, so nothing fills a real disk.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import NamedTuple

import pytest
from grpc_health.v1 import health_pb2

import mqstore
from mqstore.crypto import create_key_file
from mqstore.diskspace import DiskSpace
from mqstore.errors import StorageFull
from mqstore.health import NodeHealth
from mqstore.store import LogStore, NewMessage

TOTAL = 100 * 2**30
FREE_BEFORE = 10 * 2**30  # the disk's free space before the store wrote anything
ROOM = 2 * 2**20  # the floor lies this far below it
BODY = 128 * 1024


class _Usage(NamedTuple):
    total: int
    used: int
    free: int


def _fake_disk(monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
    """shutil.disk_usage of a disk holding only ``directory``: its files take the free space."""

    def disk_usage(path: object) -> _Usage:
        taken = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
        return _Usage(TOTAL, TOTAL - FREE_BEFORE + taken, FREE_BEFORE - taken)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)


def _body(rng: random.Random) -> bytes:
    return rng.randbytes(BODY)  # incompressible: the store compresses bodies


def test_a_store_drained_after_filling_its_disk_to_the_floor_takes_enqueues_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "queue"
    key = create_key_file(tmp_path / "queue.key")
    _fake_disk(monkeypatch, tmp_path)
    rng = random.Random(31)
    with mqstore.open(path, key_file=key, background=False, disk_free_min_bytes=FREE_BEFORE - ROOM,
                      disk_free_min_percent=0) as store:
        assert store.disk is not None
        store.disk.interval_s = 0  # read the disk before every enqueue
        stored = 0
        with pytest.raises(StorageFull, match="disk nearly full"):
            for _ in range(100):
                store.enqueue(mail_from="a@example.org", recipients=["b@example.net"], data=_body(rng))
                stored += 1
        assert 0 < stored < 100
        assert store.stats()["disk"]["accepting_enqueues"] is False
        size_full = (path / "data.mdb").stat().st_size
        # Drain it: lease and ack everything, delete what is kept after delivery, then compact
        # the log (maintenance does it by itself).
        while leases := store.lease("w", max_messages=100):
            store.ack_many([lease.token for lease in leases])
        for message in store.list(limit=1000):
            store.delete(message.message_id)
        store.maintain()
        assert store.compact_log() > 0
        assert store.stats()["messages"] == 0
        assert (path / "data.mdb").stat().st_size >= size_full  # the file did not give anything back
        disk = store.stats()["disk"]
        assert disk["free_bytes"] < disk["floor_bytes"]  # the disk has no more free than when full
        assert disk["accepting_enqueues"] is True  # but the data file's free pages take new mail
        assert disk["free_bytes"] + disk["reusable_bytes"] >= disk["floor_bytes"]  # and stats() says so
        assert store.disk.reusable_bytes >= (stored - 2) * BODY
        # New mail goes into the freed pages: about as much as was drained, the file barely grows.
        for _ in range(stored // 2):
            mid = store.enqueue(mail_from="a@example.org", recipients=["b@example.net"], data=_body(rng))
            assert store.get(mid).recipients[0].state == "queued"
        assert (path / "data.mdb").stat().st_size <= size_full + 4 * BODY
        # And once they are used up too, the floor holds again.
        with pytest.raises(StorageFull, match="disk nearly full"):
            for _ in range(100):
                store.enqueue(mail_from="a@example.org", recipients=["b@example.net"], data=_body(rng))


def _status(health: NodeHealth) -> int:
    return int(health.servicer.Check(health_pb2.HealthCheckRequest(service=""), None).status)


def test_a_node_whose_disk_reached_the_floor_serves_again_once_its_log_is_compacted(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data_dir = tmp_path / "node"
    _fake_disk(monkeypatch, tmp_path)
    rng = random.Random(32)
    log = LogStore(data_dir, key_file=create_key_file(tmp_path / "node.key"))  # what a node has open there
    try:
        health = NodeHealth(1, data_dir, lambda: 1, disk_free_min_bytes=FREE_BEFORE - ROOM, disk_free_min_percent=0)
        assert health.serving and health.enqueue_refusal() is None
        while health.serving:
            log.append_messages([NewMessage("a@example.org", ["b@example.net"], _body(rng)) for _ in range(2)])
            health.update()  # what the watcher thread does every CHECK_INTERVAL_S
        assert _status(health) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert isinstance(health.enqueue_refusal(), StorageFull)
        size_full = (data_dir / "data.mdb").stat().st_size
        log.delete_prefix(log.last_index + 1)  # the log compacted behind a snapshot
        health.update()
        assert (data_dir / "data.mdb").stat().st_size >= size_full
        assert health.serving and _status(health) == health_pb2.HealthCheckResponse.SERVING
        assert health.enqueue_refusal() is None
        assert health.disk.free_bytes < health.disk.floor_bytes() <= health.disk.available_bytes()
    finally:
        log.close()


def test_the_free_pages_of_a_data_file_are_not_over_counted(tmp_path: Path) -> None:
    from mqstore.diskspace import unused_bytes  # here: the other tests run against the code before it too

    rng = random.Random(33)
    log = LogStore(tmp_path / "s", key_file=create_key_file(tmp_path / "k.key"))
    try:
        log.append_messages([NewMessage("a@example.org", ["b@example.net"], _body(rng)) for _ in range(40)])
        log.delete_prefix(log.last_index + 1)
        log.append_messages([NewMessage("a@example.org", ["b@example.net"], _body(rng)) for _ in range(10)])
        estimate = unused_bytes(log.env)
        assert estimate is not None
        # The truth: the pages up to the last in use, minus a compacted copy's (every page in use).
        (tmp_path / "copy").mkdir()
        log.env.copy_to(tmp_path / "copy")
        psize = log.env.env.stat()["psize"]
        unused = (log.env.env.info()["last_pgno"] + 1) * psize - (tmp_path / "copy" / "data.mdb").stat().st_size
        assert 20 * BODY <= estimate <= unused  # about 30 bodies freed, less than all of it
        disk = DiskSpace(tmp_path / "s", 0, 0)  # finds the store this process has open there
        assert disk.reusable_bytes == estimate
        assert DiskSpace(tmp_path, 0, 0).reusable_bytes == 0  # no store open in that directory
    finally:
        log.close()
    assert DiskSpace(tmp_path / "s", 0, 0).reusable_bytes == 0  # closed: nothing counts
