"""An enqueue that meets a shred of its namespace's current key in the writer (same group
commit, or the commit right after) is stored readable under the namespace's next key: the id
it returns can be read, leased and verified. A lease that meets a body whose key was shredded
(a store an earlier version wrote) leaves it out and defers it, as it does a damaged body."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import mqstore
from mqstore.crypto import create_key_file
from mqstore.crypto.keyring import KeyShredded
from mqstore.ids import parse_id
from mqstore.ops.verify import verify_path
from mqstore.queue import machine
from mqstore.queue.kv import LmdbKV
from mqstore.store import WriteContext

pytestmark = pytest.mark.filterwarnings("ignore:mqstore created a key-encryption key")


def _wait(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _finished_namespace(store: mqstore.Store, rotate: bool) -> tuple[int, int | None]:
    """Namespace 'n' with one delivered message under its first key (and, with ``rotate``, a
    second key that is current); returns (the key to shred, the key that is current after)."""
    store.set_namespace_policy("n", retention=0)
    store.enqueue(mail_from="a@example.org", recipients=["b@example.net"], data=b"x", namespace="n")
    for lease in store.lease("w"):
        store.ack(lease.token)
    store.maintain()
    (first,) = [k["key_id"] for k in store.list_keys() if k["namespace"] == "n"]
    if not rotate:
        return first, None
    return store.rotate_key("n"), first


def _race(store: mqstore.Store, key_id: int, same_batch: bool) -> tuple[object, str]:
    """Run shred_key(key_id) and an enqueue into 'n' (staged while the key was current) so that
    the writer runs them in one group commit (``same_batch``) or the enqueue in the next one."""
    writer = store.log.writer
    assert writer is not None
    res: dict[str, object] = {}

    def shred() -> None:
        res["shred"] = store.shred_key(key_id)

    def enqueue() -> None:
        try:
            res["mid"] = store.enqueue(mail_from="a@example.org", recipients=["c@example.net"],
                                       data=b"Subject: important\r\n\r\nbody", namespace="n")
        except Exception as exc:
            res["error"] = exc

    threads = [threading.Thread(target=shred), threading.Thread(target=enqueue)]
    with writer.held():  # no batch runs: the requests queue up
        if same_batch:
            writer.submit(lambda ctx: None)  # the writer takes this and waits for the lock
            _wait(lambda: writer.queued() == 0, "the writer to take the first request")
        threads[0].start()
        _wait(lambda: writer.queued() == (1 if same_batch else 0) and writer._outstanding == 2 - (not same_batch),
              "the shred to be queued")
        threads[1].start()
        _wait(lambda: writer.queued() == (2 if same_batch else 1), "the enqueue to be queued")
    for t in threads:
        t.join(30)
    assert "error" not in res, f"enqueue raised {res['error']!r}"
    assert isinstance(res["mid"], str)
    return res["shred"], res["mid"]


@pytest.mark.parametrize("rotate", [False, True], ids=["only-key", "older-key-left"])
@pytest.mark.parametrize("same_batch", [True, False], ids=["same-commit", "next-commit"])
def test_an_enqueue_racing_a_shred_is_stored_readable(tmp_path: Path, same_batch: bool, rotate: bool) -> None:
    """Before, in one commit with the shred the enqueue returned an id whose body was sealed
    under the shredded key: get() raised KeyShredded, lease() committed the lease and then
    raised, verify was NOT CLEAN; in the commit right after it raised
    ``UnknownKey: namespace 'n' has no key yet``."""
    key = create_key_file(tmp_path / "k.key")
    path = tmp_path / "s"
    with mqstore.open(path, key_file=key, background=False) as store:
        shred_id, older = _finished_namespace(store, rotate)
        removed, mid = _race(store, shred_id, same_batch)
        assert removed == 0
        keys = {k["key_id"]: k for k in store.list_keys() if k["namespace"] == "n"}
        assert keys[shred_id]["shredded"]
        message = store.get(mid)
        assert message.data == b"Subject: important\r\n\r\nbody"
        assert message.key_id != shred_id and not keys[message.key_id]["shredded"]
        assert keys[message.key_id]["current"]
        if older is not None:
            assert message.key_id == older  # the namespace's newest live key
        leases = store.lease("w", max_messages=10)
        assert [(lease.message_id, lease.data) for lease in leases] == [(mid, message.data)]
        store.ack(leases[0].token)
    report = verify_path(path, key_file=str(key))
    assert report.clean, "\n".join(report.lines())


def test_a_lease_meeting_a_body_under_a_shredded_key_does_not_raise(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A store written before the fix can hold a message sealed under a shredded key. Before,
    lease() committed its lease and then raised KeyShredded: the healthy messages granted with
    it went to nobody until their lease expired, and the poisoned one stayed leased. Now it is
    left out and deferred under its lease, like a damaged body, and the others are returned."""
    key = create_key_file(tmp_path / "k.key")
    path = tmp_path / "s"
    with mqstore.open(path, key_file=key, background=False) as store:
        shred_id, _ = _finished_namespace(store, rotate=False)
        with monkeypatch.context() as m:  # what the enqueue did before: no look at the key
            m.setattr(WriteContext, "key_shredded", lambda self, key_id: False)
            _, poisoned = _race(store, shred_id, same_batch=True)
        with pytest.raises(KeyShredded):
            store.get(poisoned)
    with mqstore.open(path, key_file=key, background=False) as store:
        healthy = [store.enqueue(mail_from="a@example.org", recipients=[f"r{i}@example.com"], data=b"ok %d" % i,
                                 namespace=ns) for i, ns in enumerate(["default", "default", "n"])]
        assert store.get(healthy[-1]).key_id not in (0, shred_id)  # 'n' got a new key
        leases = store.lease("w", max_messages=10)
        assert sorted(lease.message_id for lease in leases) == sorted(healthy)
        for lease in leases:
            store.ack(lease.token)
        stats = store.stats()["recipients"]
        assert stats["leased"] == 0 and stats["delivered"] == 3 and stats["deferred"] == 1
        with store.log.env.read() as txn:
            ((_, row),) = machine.recipients_of(LmdbKV(txn, store.log.env.dbs), parse_id(poisoned))
        assert row.token == 0 and row.attempts == 1
        assert f"key id {shred_id} of namespace 'n' was shredded" in (store._open_reason(row.reason) or "")
        assert store.lease("w", max_messages=10) == []  # deferred: not due yet


def test_log_append_messages_racing_a_shred_seals_again_under_the_next_key(tmp_path: Path) -> None:
    """The low-level LogStore.append_messages had the same race: in one group commit with a
    shred of its namespace's key it appended records sealed under the shredded key, which no
    one can open again. Now it seals them again under the namespace's next key."""
    key = create_key_file(tmp_path / "k.key")
    with mqstore.open(tmp_path / "s", key_file=key, background=False) as store:
        shred_id, _ = _finished_namespace(store, rotate=False)
        writer = store.log.writer
        assert writer is not None
        res: dict[str, object] = {}

        def append() -> None:
            try:
                res["appended"] = store.log.append_message(mail_from="a@example.org", recipients=["c@example.net"],
                                                           data=b"raw body", namespace="n")
            except Exception as exc:
                res["error"] = exc

        shredder = threading.Thread(target=lambda: res.setdefault("shred", store.shred_key(shred_id)))
        appender = threading.Thread(target=append)
        with writer.held():
            writer.submit(lambda ctx: None)
            _wait(lambda: writer.queued() == 0, "the writer to take the first request")
            shredder.start()
            _wait(lambda: writer.queued() == 1, "the shred to be queued")
            appender.start()
            _wait(lambda: writer.queued() == 2, "the append to be queued")
        shredder.join(30)
        appender.join(30)
        assert "error" not in res, f"append raised {res['error']!r}"
        appended = res["appended"]
        record = store.log.read(appended.index)  # type: ignore[attr-defined]
        assert record.key_id != shred_id
        stored = store.log.open_message(record)
        assert stored.data == b"raw body"
