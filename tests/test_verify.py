"""``mqstore verify``'s check of the state tables against each other and against the log: every
kind of inconsistency it looks for, made behind mqstore's back in a copy of one store, is named
with its table and message (the replay, a separate check, is off here)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lmdb
import pytest

import mqstore
from mqstore.crypto import create_key_file
from mqstore.ids import format_id, parse_id
from mqstore.ops.verify import verify_path
from mqstore.queue.model import U64, mid_ord, ns_key, time_key

Txn = Any
Made = dict[str, bytes]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Made]:
    """A store with one message of each kind: queued, leased, delivered, held, expiring."""
    root = tmp_path_factory.mktemp("verify")
    key = create_key_file(root / "kek.key")
    made: Made = {}
    with mqstore.open(root / "store", key_file=key, background=False) as store:
        for name in ("leased", "delivered", "queued", "held"):
            (mid,) = store.enqueue_many([{"mail_from": "a@example.org", "recipients": [f"{name}@example.net"],
                                          "data": b"Subject: " + name.encode() + b"\r\n\r\nbody\r\n"}])
            made[name] = parse_id(mid)
        (lease,) = store.lease("w1", max_messages=1)
        assert parse_id(lease.message_id) == made["leased"]
        (done,) = store.lease("w1", max_messages=1)
        assert parse_id(done.message_id) == made["delivered"]
        store.ack(done.token)
        store.hold(format_id(made["held"]))
        (mid,) = store.enqueue_many([{"mail_from": "a@example.org", "recipients": ["x@example.net"],
                                      "data": b"x", "expires_in": 3600}])
        made["expiring"] = parse_id(mid)
    report = verify_path(root / "store", key_file=str(key), replay=False)
    assert report.clean, report.problems
    return root / "store", key, made


def _first_key(txn: Txn, db: Any, containing: bytes) -> bytes:
    for k, _ in txn.cursor(db=db):
        if containing in bytes(k):
            return bytes(k)
    raise AssertionError(f"no key containing {containing.hex()}")


def _delete_with(table: bytes, which: str) -> Callable[[Txn, Callable[[bytes], Any], Made], None]:
    def damage(txn: Txn, db: Callable[[bytes], Any], made: Made) -> None:
        assert txn.delete(_first_key(txn, db(table), made[which]), db=db(table))

    return damage


def _delete_only(table: bytes) -> Callable[[Txn, Callable[[bytes], Any], Made], None]:
    """Delete the table's one entry (leases are keyed by token: the store holds one lease)."""

    def damage(txn: Txn, db: Callable[[bytes], Any], made: Made) -> None:
        keys = [bytes(k) for k, _ in txn.cursor(db=db(table))]
        assert len(keys) == 1
        assert txn.delete(keys[0], db=db(table))

    return damage


def _stray_ready(txn: Txn, db: Callable[[bytes], Any], made: Made) -> None:
    key = _first_key(txn, db(b"ready"), made["queued"])
    ns_end = key.index(b"\x00") + 1
    due = U64.unpack(key[ns_end + 1 : ns_end + 9])[0]
    txn.put(key[: ns_end + 1] + U64.pack(due + 1) + key[ns_end + 9 :], b"", db=db(b"ready"))


def _finished_but_live(txn: Txn, db: Callable[[bytes], Any], made: Made) -> None:
    txn.put(made["delivered"], b"", db=db(b"live"))


def _stray_expiry(txn: Txn, db: Callable[[bytes], Any], made: Made) -> None:
    txn.put(time_key(123, b"\x07" * 16), b"", db=db(b"expiry"))


def _counter_off(txn: Txn, db: Callable[[bytes], Any], made: Made) -> None:
    key = ns_key("default") + b"queued"
    value = int.from_bytes(txn.get(key, db=db(b"stats")), "little", signed=True)
    txn.put(key, (value + 1).to_bytes(8, "little", signed=True), db=db(b"stats"))


def _lost_recipient(txn: Txn, db: Callable[[bytes], Any], made: Made) -> None:
    assert txn.delete(mid_ord(made["queued"], 0), db=db(b"recipients"))


def _undecodable_recipient(txn: Txn, db: Callable[[bytes], Any], made: Made) -> None:
    txn.put(mid_ord(made["queued"], 0), b"\xff\xff", db=db(b"recipients"))


def _undecodable_lease(txn: Txn, db: Callable[[bytes], Any], made: Made) -> None:
    (key,) = [bytes(k) for k, _ in txn.cursor(db=db(b"leases"))]
    txn.put(key, b"\xff\xff", db=db(b"leases"))


# (damage, table named, words of the problem, message named (None: no single message))
CASES = {
    "ready entry lost": (_delete_with(b"ready", "queued"), "ready", "missing from the ready index", "queued"),
    "by-domain entry lost": (_delete_with(b"ready_dom", "queued"), "ready_dom",
                             "missing from the by-domain ready index", "queued"),
    "stray ready entry": (_stray_ready, "ready", "index entry for a recipient that is not waiting", "queued"),
    "namespace index entry lost": (_delete_with(b"msg_ns", "queued"), "msg_ns",
                                   "missing from the by-namespace index", "queued"),
    "live entry lost": (_delete_with(b"live", "queued"), "live", "missing from the live index though unfinished",
                        "queued"),
    "finished but live": (_finished_but_live, "live", "in the live index though finished", "delivered"),
    "retention entry lost": (_delete_with(b"retention", "delivered"), "retention",
                             "finished but missing from the retention index", "delivered"),
    "lease row lost": (_delete_only(b"leases"), "leases", "which holds no such lease", "leased"),
    "lease deadline lost": (_delete_only(b"lease_due"), "leases", "has no deadline entry", "leased"),
    "recipient row lost": (_lost_recipient, "recipients", "0 recipient rows for 1 recipients", "queued"),
    "recipient row does not decode": (_undecodable_recipient, "recipients", "recipient 0: row does not decode",
                                      "queued"),
    "lease row does not decode": (_undecodable_lease, "leases", "row does not decode", None),
    "stray expiry entry": (_stray_expiry, "expiry", "expiry entry that does not match", None),
    "expiry entry lost": (_delete_with(b"expiry", "expiring"), "expiry", "missing from the expiry index",
                          "expiring"),
    "counter off": (_counter_off, "stats", "counter queued is", None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_verify_names_each_kind_of_state_damage(built: tuple[Path, Path, Made], tmp_path: Path, case: str) -> None:
    path, key, made = built
    damage, table, words, which = CASES[case]
    copy = tmp_path / "store"
    shutil.copytree(path, copy)
    env = lmdb.open(str(copy), max_dbs=64, create=False)
    try:
        with env.begin(write=True) as txn:
            damage(txn, lambda name: env.open_db(name, txn=txn, create=False), made)
    finally:
        env.close()
    report = verify_path(copy, key_file=str(key), replay=False)
    assert not report.clean
    assert set(report.by_check) == {"state"}  # the log itself is intact
    named = [p for p in report.problems if p.get("table") == table and words in p["problem"]]
    assert named, report.problems
    if which is not None:
        assert {p.get("message_id") for p in named} == {format_id(made[which])}
    # The state can be rebuilt from the log: the replay names the damage too.
    assert not verify_path(copy, key_file=str(key), replay=True).clean


def test_rows_that_do_not_decode_are_named_and_the_rest_of_the_report_goes_on(
    built: tuple[Path, Path, Made], tmp_path: Path
) -> None:
    path, key, made = built
    copy = tmp_path / "store"
    shutil.copytree(path, copy)
    env = lmdb.open(str(copy), max_dbs=64, create=False)
    try:
        with env.begin(write=True) as txn:
            for damage in (_undecodable_recipient, _undecodable_lease, _delete_with(b"live", "expiring")):
                damage(txn, lambda name: env.open_db(name, txn=txn, create=False), made)
    finally:
        env.close()
    report = verify_path(copy, key_file=str(key), replay=True)
    found = {(p.get("table"), p.get("message_id")) for p in report.problems if p["check"] == "state"}
    assert found == {("recipients", format_id(made["queued"])), ("leases", None),
                     ("live", format_id(made["expiring"]))}, report.problems
    assert report.replayed and report.by_check["replay"] >= 2  # the replay ran to the end too
    assert report.messages_checked == len(made)


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Made]:
    """Delivered messages under COMPLIANCE retention, under a legal hold in GOVERNANCE mode, and
    under a legal hold without a retention mode (placed before and after delivery)."""
    from mqstore.actor import Actor

    root = tmp_path_factory.mktemp("verify-locked")
    key = create_key_file(root / "kek.key")
    officer = Actor("j.doe", frozenset({"compliance", "admin"}), auth="mtls")
    made: Made = {}
    with mqstore.open(root / "store", key_file=key, background=False) as store:
        store.set_policy("finance", mode="compliance", retention_days=30)
        store.set_policy("gov", mode="governance", retention_days=1)
        for name, ns in (("compliance", "finance"), ("extended", "finance"), ("held", "gov"),
                         ("plain-held-early", "default"), ("plain-held-late", "default")):
            mid = store.enqueue("cfo@example.org", [f"{name}@example.net"], b"Subject: x\r\n\r\nbody\r\n",
                                namespace=ns)
            made[name] = parse_id(mid)
            if name in ("held", "plain-held-early"):
                store.add_legal_hold(mid, case="SEC-1", actor=officer)
            (lease,) = store.lease("w", max_messages=1, namespace=ns)
            store.ack(lease.token)
            if name == "plain-held-late":
                store.add_legal_hold(mid, case="SEC-2", actor=officer)
            if name == "extended":
                store.extend_retention(mid, until=time.time() + 400 * 86400, actor=officer)
    return root / "store", key, made


def test_messages_locked_by_retention_or_legal_holds_verify_clean(locked: tuple[Path, Path, Made]) -> None:
    path, key, _made = locked
    report = verify_path(path, key_file=str(key), replay=True)
    assert report.clean and report.replayed, report.problems


def test_a_locked_messages_lost_retention_entry_is_named(locked: tuple[Path, Path, Made], tmp_path: Path) -> None:
    path, key, made = locked
    copy = tmp_path / "store"
    shutil.copytree(path, copy)
    env = lmdb.open(str(copy), max_dbs=64, create=False)
    try:
        with env.begin(write=True) as txn:
            _delete_with(b"retention", "extended")(txn, lambda name: env.open_db(name, txn=txn, create=False), made)
            # ... and one for a message its legal hold keeps out of the index
            txn.put(time_key(1, made["held"]), b"", db=env.open_db(b"retention", txn=txn, create=False))
    finally:
        env.close()
    report = verify_path(copy, key_file=str(key), replay=False)
    named = {(p["problem"], p.get("message_id")) for p in report.problems}
    assert named == {("finished but missing from the retention index", format_id(made["extended"])),
                     ("retention entry that does not match the message", format_id(made["held"]))}, report.problems


def test_a_store_after_operator_bounces_verifies_clean_and_their_reasons_open(tmp_path: Path) -> None:
    """verify replays BOUNCE_MESSAGE records (a held message, a recipient left leased and settled
    later, a deferred one) to the same state, and opens the sealed reason each one carries."""
    key = create_key_file(tmp_path / "kek.key")
    with mqstore.open(tmp_path / "store", key_file=key, background=False) as store:
        mid = store.enqueue("a@example.org", ["q@q.example", "d@d.example", "l@l.example"], b"x")
        held = store.enqueue("a@example.org", ["h@h.example"], b"y")
        (later,) = store.lease("w", domain="d.example")
        store.defer(later.token, reason="451 later")
        (leased,) = store.lease("w", domain="l.example")
        store.hold(held)
    before = verify_path(tmp_path / "store", key_file=str(key))
    assert before.clean and before.replayed, before.problems
    with mqstore.open(tmp_path / "store", key_file=key, background=False) as store:
        assert store.bounce_message(mid, reason="550 given up").left_leased == 1
        store.bounce_message(held)
        store.ack(leased.token)
        assert store.get(mid).done and store.get(held).done
    report = verify_path(tmp_path / "store", key_file=str(key))
    assert report.clean and report.replayed, report.problems
    assert report.sealed_checked == before.sealed_checked + 2  # each bounce's sealed reason opened


def test_an_expired_message_with_a_recipient_still_leased_verifies_clean(tmp_path: Path) -> None:
    """Once a message's expiry is applied it leaves the expiry index while a leased recipient keeps
    it unfinished (that one expires when it settles): no expiry entry is missing then."""
    key = create_key_file(tmp_path / "kek.key")
    now = [1_900_000_000.0]
    with mqstore.open(tmp_path / "store", key_file=key, background=False, clock=lambda: now[0]) as store:
        mid = store.enqueue("a@example.org", ["l@l.example", "q@q.example"], b"x", expires_in=60)
        (lease,) = store.lease("w", domain="l.example")
        now[0] += 120
        store.maintain()
        message = store.get(mid)
        assert not message.done and sorted(r.state for r in message.recipients) == ["expired", "leased"]
    report = verify_path(tmp_path / "store", key_file=str(key))
    assert report.clean and report.replayed, report.problems
    with mqstore.open(tmp_path / "store", key_file=key, background=False, clock=lambda: now[0]) as store:
        store.defer(lease.token, reason="451 later")  # settles as expired: the message is finished
        assert store.get(mid).done
    report = verify_path(tmp_path / "store", key_file=str(key))
    assert report.clean and report.replayed, report.problems
