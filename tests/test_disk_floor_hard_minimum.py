"""The free pages inside a data file count for at most half the free-space floor: the disk itself
always keeps half the floor free.

A large body needs a run of adjacent pages; the scattered pages a drained queue leaves cannot
give it one, so LMDB grows the file for it. In stop 31's first form those pages counted in full:
a store that filled its disk to the floor with small mail, drained every other message and then
took 1 MiB messages went on accepting them (and said ``accepting_enqueues: True``) until the disk
had 0 bytes free and a commit failed. The disk here is a stand-in whose free space is a fixed
amount minus what the store's directory takes, so nothing fills a real disk.
"""

from __future__ import annotations

import contextlib
import random
import shutil
from pathlib import Path
from typing import NamedTuple

import pytest

import mqstore
from mqstore.crypto import create_key_file
from mqstore.diskspace import DiskSpace
from mqstore.errors import NotFound, StorageFull

TOTAL = 100 * 2**30
FLOOR = 4 * 2**20
FREE_BEFORE = FLOOR + 12 * 2**20  # the disk's free space before the store wrote anything
SMALL = 40_000  # about ten pages: what draining every other one leaves are holes of that size
LARGE = 2**20


class _Usage(NamedTuple):
    total: int
    used: int
    free: int


def _fake_disk(monkeypatch: pytest.MonkeyPatch, directory: Path) -> list[int]:
    """shutil.disk_usage of a disk holding only ``directory``: its files take the free space.
    Returns the list the free space of each reading is appended to."""
    readings: list[int] = []

    def disk_usage(path: object) -> _Usage:
        taken = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
        readings.append(FREE_BEFORE - taken)
        return _Usage(TOTAL, TOTAL - FREE_BEFORE + taken, FREE_BEFORE - taken)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    return readings


def _free(directory: Path) -> int:
    return FREE_BEFORE - sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def test_large_mail_into_a_fragmented_data_file_stops_at_half_the_floor(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "queue"
    key = create_key_file(tmp_path / "queue.key")
    _fake_disk(monkeypatch, tmp_path)
    rng = random.Random(34)
    with mqstore.open(path, key_file=key, background=False, disk_free_min_bytes=FLOOR,
                      disk_free_min_percent=0) as store:
        disk = store.disk
        assert disk is not None and disk.floor_bytes() == FLOOR
        disk.interval_s = 0
        # Fill the disk to the floor with small mail, every other message to a domain drained below.
        drained: list[str] = []
        with pytest.raises(StorageFull, match="disk nearly full"):
            for _ in range(1000):
                drained.append(store.enqueue(mail_from="a@example.org", recipients=["x@drained.example"],
                                             data=rng.randbytes(SMALL)))  # incompressible
                store.enqueue(mail_from="a@example.org", recipients=["y@kept.example"], data=rng.randbytes(SMALL))
        assert len(drained) > 100
        while leases := store.lease("w", max_messages=100, domain="drained.example"):
            store.ack_many([lease.token for lease in leases])
        for mid in drained:
            with contextlib.suppress(NotFound):  # compacted already
                store.delete(mid)
        store.maintain()
        assert store.compact_log() > 0
        stats = store.stats()["disk"]
        # The point of counting the file's free pages: the drained store takes mail again...
        assert stats["free_bytes"] < FLOOR <= stats["free_bytes"] + stats["reusable_bytes"]
        assert stats["reusable_bytes"] > FLOOR  # (more than the whole floor, scattered)
        assert stats["accepting_enqueues"] is True
        # ...but 1 MiB bodies cannot use those pages. From here on the reading of the file's free
        # pages is not taken again (time stands still), only the disk's before each enqueue.
        disk.update()
        disk.interval_s = 3600.0
        accepted_at: list[int] = []
        with pytest.raises(StorageFull, match="disk nearly full") as refused:
            for _ in range(100):
                before = _free(tmp_path)
                store.enqueue(mail_from="a@example.org", recipients=["z@large.example"], data=rng.randbytes(LARGE))
                accepted_at.append(before)
        assert accepted_at, "the drained store took no mail at all"
        assert min(accepted_at) >= FLOOR // 2  # no enqueue went in once the disk had under half the floor
        # So the disk keeps half the floor, less at most the one large body admitted just above it.
        assert _free(tmp_path) >= FLOOR // 2 - LARGE - 64 * 1024
        assert _free(tmp_path) < FLOOR // 2  # (the refusal came from that minimum, not the floor)
        assert "the disk itself must keep" in str(refused.value)
        assert "only space freed on the disk" in str(refused.value)
        stats = store.stats()["disk"]
        assert stats["accepting_enqueues"] is False  # what an MTA checks at MAIL FROM
        assert stats["reusable_bytes"] > FLOOR  # the file's free pages are still there
        # Draining goes on, and what it frees inside the file does not let enqueues in again.
        (lease,) = store.lease("w", max_messages=1, domain="large.example")
        store.ack(lease.token)
        assert store.stats()["disk"]["accepting_enqueues"] is False


class _Disk:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.free = 0
        self.reads = 0
        monkeypatch.setattr(shutil, "disk_usage", self.usage)

    def usage(self, path: object) -> _Usage:
        self.reads += 1
        return _Usage(TOTAL, TOTAL - self.free, self.free)


def test_free_pages_inside_the_file_stand_in_for_at_most_half_the_floor(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path) -> None:
    fake = _Disk(monkeypatch)
    inside = [0]
    now = [0.0]
    fake.free = 3 * FLOOR
    disk = DiskSpace(tmp_path, FLOOR, 0, interval_s=0.25, monotonic=lambda: now[0],
                     unused_in_file=lambda: inside[0])
    assert disk.check() is None and fake.reads == 1
    inside[0] = 100 * FLOOR
    for free, accepting in [(FLOOR, True), (FLOOR // 2 + 1, True), (FLOOR // 2, True), (FLOOR // 2 - 1, False),
                            (0, False)]:
        fake.free = free
        now[0] += 1
        assert (disk.check() is None) is accepting, free
        assert disk.available_bytes() == free + FLOOR // 2
    # With fewer free pages inside than half the floor, all of them count.
    inside[0] = FLOOR // 4
    fake.free = FLOOR - FLOOR // 4
    now[0] += 1
    assert disk.check() is None and disk.available_bytes() == FLOOR
    fake.free -= 1
    now[0] += 1
    assert isinstance(disk.check(), StorageFull)
    # Under twice the floor the disk is read before every check, interval or not (the file's free
    # pages keep their last reading); at twice the floor or more, once per interval.
    fake.free = FLOOR
    now[0] += 1
    assert disk.check() is None
    reads = fake.reads
    fake.free = FLOOR // 2 - 1
    assert isinstance(disk.check(), StorageFull) and fake.reads == reads + 1
    fake.free = 2 * FLOOR
    assert disk.check() is None and fake.reads == reads + 2
    fake.free = 0
    assert disk.check() is None and fake.reads == reads + 2  # the reading is still fresh
    now[0] += 0.25
    assert isinstance(disk.check(), StorageFull) and fake.reads == reads + 3
