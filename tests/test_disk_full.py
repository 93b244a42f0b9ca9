"""A store whose disk fills up: writes that cannot be stored are refused with a clear error and
change nothing (on disk or in what the open store answers), reads go on, and once there is room
again the same store takes writes as before; reopened, it holds exactly what was acknowledged.

The disk is filled for real, as far as the store can tell: a child process lowers its own file
size limit (RLIMIT_FSIZE) to the data file's size, so every write that needs the file to grow
fails in the kernel (EFBIG) the way it would on a full disk (ENOSPC); writes that fit in pages
LMDB freed earlier still succeed, as they would on a full disk.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, NamedTuple

import lmdb
import pytest

import mqstore
from mqstore.crypto import create_key_file
from mqstore.diskspace import DiskSpace
from mqstore.errors import InvalidArgument, StorageFull
from mqstore.store.writer import WriterFailed

CHILD = textwrap.dedent(
    """
    import json, os, resource, signal, sys
    import mqstore
    from mqstore.errors import MQStoreError

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed, as ENOSPC would
    path, key, namespace = sys.argv[1], sys.argv[2], sys.argv[3]
    out = {"acked": [], "refused": [], "acks": [], "ack_refused": [], "holds": [], "hold_refused": []}
    data_file = os.path.join(path, "data.mdb")

    def body(i):
        return os.urandom(3000)  # incompressible: every message needs new pages

    def enqueue(i):
        mid = store.enqueue(mail_from="a@example.org", recipients=[f"r{i}@example.net"], data=body(i),
                            namespace=namespace)
        out["acked"].append(mid)

    with mqstore.open(path, key_file=key, background=False) as store:
        if namespace == "regulated":
            store.set_policy(namespace, mode="compliance", retention_days=1)
        for i in range(30):
            enqueue(i)
        leases = store.lease(worker="w1", max_messages=10)
        out["leased"] = [[l.message_id, l.token] for l in leases]
        before = store.stats()
        resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(data_file), resource.RLIM_INFINITY))

        # Fill the disk: enqueue until three in a row are refused.
        streak, i = 0, 30
        while streak < 3 and i < 2000:
            try:
                enqueue(i)
                streak = 0
            except MQStoreError as exc:
                out["refused"].append(f"{type(exc).__name__}: {exc}")
                streak += 1
            i += 1
        out["acked_when_full"] = list(out["acked"])
        stats_full = store.stats()
        # Reads go on while the disk is full.
        out["reads_ok"] = all(store.get(m).message_id == m for m in out["acked"])
        out["listed_full"] = sorted(m.message_id for m in store.list(limit=10000))
        # Settling and admin writes either fit or are refused whole.
        for mid, token in out["leased"][:5]:
            try:
                store.ack(token)
                out["acks"].append(token)
            except MQStoreError as exc:
                out["ack_refused"].append([token, f"{type(exc).__name__}: {exc}"])
        for mid in out["acked"][20:25]:
            try:
                store.hold(mid)
                out["holds"].append(mid)
            except MQStoreError as exc:
                out["hold_refused"].append([mid, f"{type(exc).__name__}: {exc}"])
        out["stats_full"] = stats_full
        out["stats_before"] = before
        out["stats_after_tries"] = store.stats()
        out["acks_when_full"], out["holds_when_full"] = list(out["acks"]), list(out["holds"])

        # Room again: the same open store takes writes, including the ones refused before.
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        for token, _ in out["ack_refused"]:
            store.ack(token)
            out["acks"].append(token)
        for mid, _ in out["hold_refused"]:
            store.hold(mid)
            out["holds"].append(mid)
        for j in range(5):
            enqueue(10000 + j)
        out["stats_end"] = store.stats()
    print(json.dumps(out))
    """
)


@pytest.mark.parametrize("namespace", ["default", "regulated"])
def test_a_full_disk_refuses_writes_whole_and_the_store_goes_on_when_there_is_room(tmp_path: Path,
                                                                                   namespace: str) -> None:
    """In a COMPLIANCE namespace ("regulated") every enqueue, lease, ack and hold also writes a
    hash-chained audit record: a refused write must leave no gap or fork in the chain."""
    path = tmp_path / "queue"
    key = create_key_file(tmp_path / "queue.key")
    run = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(key), namespace], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.splitlines()[-1])

    # The disk filled up, and every refusal says what happened and that nothing was stored.
    assert len(out["refused"]) >= 3
    for message in out["refused"] + [m for _, m in out["ack_refused"]] + [m for _, m in out["hold_refused"]]:
        # StorageFull (an Overloaded: an MTA answers 452 4.3.1), naming the limit it ran into.
        assert message.startswith("StorageFull: write failed, nothing was committed: the data file "), message
        assert "reached this process's file size limit" in message and "ulimit -f" in message
    # While full, reads answered and the open store's counts were those of what was stored.
    assert out["reads_ok"]
    stored_while_full = len(out["acked_when_full"]) - 30
    assert out["listed_full"] == sorted(out["acked_when_full"])
    assert out["stats_full"]["messages"] == 30 + stored_while_full
    assert out["stats_full"]["recipients"]["queued"] == 20 + stored_while_full
    assert out["stats_full"]["recipients"]["leased"] == 10
    assert out["stats_after_tries"]["recipients"]["delivered"] == len(out["acks_when_full"])
    assert out["stats_after_tries"]["recipients"]["leased"] == 10 - len(out["acks_when_full"])
    # Once there was room, everything refused went through on the same open store.
    assert len(out["acks"]) == 5 and len(out["holds"]) == 5
    end = out["stats_end"]
    assert end["messages"] == len(out["acked"]) == 30 + stored_while_full + 5
    assert end["recipients"]["delivered"] == 5 and end["recipients"]["leased"] == 5

    # Reopened: exactly what was acknowledged, in the states the acknowledged operations left.
    with mqstore.open(path, key_file=key, background=False) as store:
        assert store.log.scan().clean
        assert store.stats()["recipients"] == end["recipients"]
        assert sorted(m.message_id for m in store.list(limit=10000)) == sorted(out["acked"])
        states = {m: store.get(m).recipients[0].state for m in out["acked"]}
        acked_mids = {mid for mid, token in out["leased"] if token in out["acks"]}
        for mid, state in states.items():
            if mid in acked_mids:
                assert state == "delivered"
            elif mid in {mid for mid, _ in out["leased"]}:
                assert state == "leased"
            else:
                assert state == "queued"
        held = {m.message_id for m in store.list(state="held", limit=10000)}
        assert held == set(out["holds"])
        report = store.audit_verify()
        assert report.ok, report.problems
        if namespace == "regulated":  # one audit record per acknowledged enqueue, none for a refused one
            audited = store.audit_query(where={"op": "enqueue"}, limit=10000)
            assert sorted(r["target"] for r in audited) == sorted(out["acked"])
        # And it keeps working: a lease hands out the queued messages, not the held ones.
        leased = store.lease(worker="w2", max_messages=1000)
        assert {lease.message_id for lease in leased} == {
            m for m, s in states.items() if s == "queued" and m not in held
        }


def _mail(i: int) -> dict[str, object]:
    return {"mail_from": "a@example.org", "recipients": [f"r{i}@example.net"], "data": b"Subject: x\r\n\r\nbody\r\n"}


def test_below_the_free_space_floor_enqueues_are_refused_and_the_queue_still_drains(tmp_path: Path) -> None:
    path = tmp_path / "queue"
    key = create_key_file(tmp_path / "queue.key")
    clock = lambda: 1_800_000_000.0  # noqa: E731  (a fixed time: stats() reports ages)
    with mqstore.open(path, key_file=key, background=False, clock=clock) as store:
        mids = store.enqueue_many([_mail(i) for i in range(4)])
        leases = store.lease(worker="w1", max_messages=2)
    # A floor above what the disk has free (the whole disk): the disk counts as nearly full.
    with mqstore.open(path, key_file=key, background=False, clock=clock, disk_free_min_percent=100) as store:
        before, last_index = store.stats(), store.log.last_index
        before.pop("compliance_time")  # a clock: it moves by itself
        disk = before.pop("disk")  # what an MTA checks before it takes a message's data
        assert disk["accepting_enqueues"] is False and disk["floor_bytes"] == disk["total_bytes"] > 0
        assert 0 < disk["free_bytes"] < disk["floor_bytes"]
        with pytest.raises(StorageFull, match=r"disk nearly full \(\d+ bytes free, below the floor of \d+ bytes"):
            store.enqueue(**_mail(9))  # type: ignore[arg-type]
        with pytest.raises(StorageFull):
            store.enqueue_many([_mail(10), _mail(11)])
        after = store.stats()
        after.pop("compliance_time")
        assert after.pop("disk")["accepting_enqueues"] is False
        assert after == before and store.log.last_index == last_index
        assert sorted(m.message_id for m in store.list()) == sorted(mids)
        # What frees space goes on: settling, leasing, holding, deleting.
        store.ack(leases[0].token)
        store.bounce(leases[1].token, reason="550 5.1.1 no such user")
        (more,) = store.lease(worker="w2", max_messages=1)
        store.defer(more.token, reason="451 4.7.1 later")
        remaining = next(m for m in mids if m not in {leases[0].message_id, leases[1].message_id, more.message_id})
        store.hold(remaining)
        store.delete(leases[0].message_id)
        states = {m: store.get(m).recipients[0].state for m in mids if m != leases[0].message_id}
        assert states == {leases[1].message_id: "bounced", more.message_id: "deferred", remaining: "queued"}
        assert store.get(remaining).held
    # With room again (the default floor), enqueues are taken.
    with mqstore.open(path, key_file=key, background=False) as store:
        disk = store.stats()["disk"]
        assert disk["accepting_enqueues"] is True and disk["free_bytes"] >= disk["floor_bytes"] > 0
        assert store.get(store.enqueue(**_mail(12))).recipients[0].state == "queued"  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "option, value",
    [("disk_free_min_bytes", -1), ("disk_free_min_bytes", 1.5), ("disk_free_min_bytes", True),
     ("disk_free_min_percent", 101), ("disk_free_min_percent", -0.5), ("disk_free_min_percent", "5")],
)
def test_a_bad_free_space_floor_is_refused_before_anything_is_created(tmp_path: Path, option: str,
                                                                       value: object) -> None:
    with pytest.raises(InvalidArgument, match=option):
        mqstore.open(tmp_path / "queue", key_file=create_key_file(tmp_path / "k.key"), **{option: value})
    assert not (tmp_path / "queue").exists()


class _Usage(NamedTuple):
    total: int
    used: int
    free: int


def test_the_free_space_is_read_again_after_the_interval_and_not_before(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    free = [10 * 2**30]
    reads = [0]
    now = [100.0]

    def disk_usage(path: object) -> _Usage:
        reads[0] += 1
        return _Usage(100 * 2**30, 100 * 2**30 - free[0], free[0])

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    disk = DiskSpace(tmp_path, 2**30, 5.0, interval_s=0.25, monotonic=lambda: now[0])
    assert disk.floor_bytes() == 5 * 2**30  # the larger of 1 GiB and 5 % of 100 GiB
    assert disk.check() is None and reads[0] == 1
    free[0] = 4 * 2**30  # another program fills the disk
    now[0] += 0.2
    assert disk.check() is None and reads[0] == 1  # the reading is still fresh
    now[0] += 0.05
    refusal = disk.check()
    assert isinstance(refusal, StorageFull) and reads[0] == 2
    assert f"{4 * 2**30} bytes free, below the floor of {5 * 2**30} bytes" in str(refusal)
    free[0] = 6 * 2**30  # space freed
    now[0] += 0.25
    assert disk.check() is None and reads[0] == 3
    free[0] = 1  # a node's watcher thread reads the disk; refusal() answers from the last reading
    assert disk.refusal() is None and reads[0] == 3


class _PanickingEnv:
    """An LMDB environment whose commits fail as after a failed meta-page write (MDB_PANIC)."""

    def __init__(self, env: Any) -> None:
        self._env = env

    def begin(self, *args: Any, **kwargs: Any) -> Any:
        txn = self._env.begin(*args, **kwargs)
        if not kwargs.get("write"):
            return txn
        return _PanickingTxn(txn)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._env, name)


class _PanickingTxn:
    def __init__(self, txn: Any) -> None:
        self._txn = txn

    def commit(self) -> None:
        self._txn.abort()
        raise lmdb.PanicError("mdb_txn_commit: MDB_PANIC: Update of meta page failed or environment had fatal error")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._txn, name)


def test_an_environment_that_panicked_stops_the_writer_and_says_to_reopen(tmp_path: Path) -> None:
    path = tmp_path / "queue"
    key = create_key_file(tmp_path / "queue.key")
    with mqstore.open(path, key_file=key, background=False) as store:
        first = store.enqueue(**_mail(1))  # type: ignore[arg-type]
        healthy = store.log.env.env
        store.log.env.env = _PanickingEnv(healthy)  # type: ignore[assignment]
        with pytest.raises(WriterFailed, match="MDB_PANIC"):
            store.enqueue(**_mail(2))  # type: ignore[arg-type]
        store.log.env.env = healthy  # even so: the store stays failed until it is reopened
        with pytest.raises(WriterFailed, match="reopen the store"):
            store.enqueue(**_mail(3))  # type: ignore[arg-type]
        assert store.get(first).recipients[0].state == "queued"  # reads go on
    with mqstore.open(path, key_file=key, background=False) as store:
        assert [m.message_id for m in store.list()] == [first]
        store.enqueue(**_mail(4))  # type: ignore[arg-type]
        assert store.stats()["messages"] == 2
