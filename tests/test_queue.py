"""The embedded mail-queue API: lifecycle of every state, admin operations, scheduling, expiry,
retention, idempotency, listing, qshape, stats, restart persistence and bad input."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import mqstore
from mqstore import InvalidArgument, NotFound, StaleLease, Store
from mqstore.crypto import create_key_file
from mqstore.ids import parse_id
from mqstore.queue import machine
from mqstore.queue.kv import LmdbKV
from mqstore.queue.model import mid_ord
from mqstore.store import WriteContext

T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def qpath(tmp_path: Path) -> Path:
    return tmp_path / "queue"


@pytest.fixture
def kek(tmp_path: Path) -> Path:
    return create_key_file(tmp_path / "queue.key")


@pytest.fixture(params=["compiled", "pure"])
def either_machine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test through the compiled state machine and through the pure-Python one."""
    if request.param == "pure":
        monkeypatch.setattr(machine, "_fast", None)
    elif machine._fast is None:
        pytest.skip("the compiled state machine is not in use")
    return str(request.param)


@pytest.fixture
def store(qpath: Path, kek: Path, clock: Clock) -> Iterator[Store]:
    s = mqstore.open(qpath, key_file=kek, clock=clock, background=False)
    try:
        yield s
    finally:
        s.close()


def _enqueue(store: Store, recipients: list[str] | None = None, **kw: object) -> str:
    return store.enqueue(
        mail_from=str(kw.pop("mail_from", "sender@example.org")),
        recipients=recipients or ["alice@example.net", "bob@example.com"],
        data=bytes(kw.pop("data", b"Subject: test\r\n\r\nhello\r\n")),  # type: ignore[call-overload]
        **kw,  # type: ignore[arg-type]
    )


def _states(store: Store, mid: str) -> dict[str, str]:
    return {r.address: r.state for r in store.get(mid).recipients}


# --- lifecycle -----------------------------------------------------------------------------------


def test_enqueue_then_get_returns_envelope_data_and_queued_recipients(store: Store) -> None:
    mid = _enqueue(store, priority=3)
    msg = store.get(mid)
    assert msg.message_id == mid and len(mid) == 26
    assert msg.mail_from == "sender@example.org"
    assert msg.data == b"Subject: test\r\n\r\nhello\r\n"
    assert msg.priority == 3 and msg.namespace == "default"
    assert msg.created == T0 and msg.expires_at == T0 + 5 * 86400  # Postfix's 5-day lifetime
    assert [(r.address, r.state, r.attempts) for r in msg.recipients] == [
        ("alice@example.net", "queued", 0),
        ("bob@example.com", "queued", 0),
    ]
    assert not msg.done and not msg.held


def test_lease_ack_delivers_and_finishes(store: Store, clock: Clock) -> None:
    mid = _enqueue(store)
    (lease,) = store.lease("w1", lease_seconds=60)
    assert lease.message_id == mid and lease.recipients == ("alice@example.net", "bob@example.com")
    assert lease.data.startswith(b"Subject: test") and lease.mail_from == "sender@example.org"
    assert lease.deadline == T0 + 60 and lease.attempts == 0
    assert _states(store, mid) == {"alice@example.net": "leased", "bob@example.com": "leased"}
    store.ack(lease.token)
    msg = store.get(mid)
    assert msg.done and {r.state for r in msg.recipients} == {"delivered"}
    assert store.stats()["recipients"]["delivered"] == 2


def test_partial_settlement_keeps_the_rest_leased(store: Store) -> None:
    mid = _enqueue(store, recipients=["a@x.example", "b@x.example", "c@y.example"])
    (lease,) = store.lease("w1")
    store.ack(lease.token, recipients=["a@x.example"])
    store.bounce(lease.token, recipients=["b@x.example"], reason="550 5.1.1 <b@x.example>: no such user")
    msg = store.get(mid)
    assert [(r.state, r.last_reason) for r in msg.recipients] == [
        ("delivered", None),
        ("bounced", "550 5.1.1 <b@x.example>: no such user"),
        ("leased", None),
    ]
    assert not msg.done
    with pytest.raises(StaleLease):  # already settled
        store.ack(lease.token, recipients=["a@x.example"])
    store.defer(lease.token, recipients=["c@y.example"], reason="451 try later")
    assert _states(store, mid)["c@y.example"] == "deferred"
    with pytest.raises(StaleLease):  # nothing left under this token
        store.ack(lease.token)


def test_defer_uses_postfix_backoff_with_jitter(store: Store, clock: Clock) -> None:
    mid = _enqueue(store, recipients=["a@x.example"])
    expected_base = [300, 600, 1200, 2400, 4000, 4000]
    for attempt, base in enumerate(expected_base, start=1):
        (lease,) = store.lease("w")
        store.defer(lease.token, reason=f"451 attempt {attempt}")
        r = store.get(mid).recipients[0]
        assert r.state == "deferred" and r.attempts == attempt and r.last_reason == f"451 attempt {attempt}"
        assert r.next_attempt is not None
        delay = r.next_attempt - clock.now
        assert base * 0.9 - 0.001 <= delay <= base * 1.1 + 0.001, (attempt, delay)
        assert 300 <= delay <= 4000  # the jitter never leaves Postfix's minimum and maximum
        assert store.lease("w") == []  # not due yet
        clock.now = r.next_attempt
    assert len(store.lease("w")) == 1


def test_explicit_backoff_schedule_per_namespace(store: Store, clock: Clock) -> None:
    store.set_namespace_policy("fast", backoff=[120, 300, 600])
    mid = _enqueue(store, recipients=["a@x.example"], namespace="fast")
    delays = []
    for _ in range(5):
        (lease,) = store.lease("w", namespace="fast")
        store.defer(lease.token)
        nxt = store.get(mid).recipients[0].next_attempt
        assert nxt is not None
        delays.append(nxt - clock.now)
        clock.now = nxt
    assert delays == [120, 300, 600, 600, 600]  # the last step repeats


def test_stale_and_unknown_tokens_change_nothing(store: Store) -> None:
    mid = _enqueue(store)
    (lease,) = store.lease("w1")
    before = store.get(mid)
    last = store.log.last_index
    for bad in (lease.token + 1000, 0, -5):
        with pytest.raises(StaleLease):
            store.ack(bad)
    with pytest.raises(StaleLease, match="does not hold"):
        store.ack(lease.token, recipients=["stranger@example.org"])
    with pytest.raises(InvalidArgument, match="a lease token is an integer, not str"):
        store.ack("not-a-token")  # type: ignore[arg-type]
    assert store.get(mid) == before and store.log.last_index == last


def test_lease_expiry_makes_recipients_due_again_and_counts_an_attempt(store: Store, clock: Clock) -> None:
    mid = _enqueue(store, recipients=["a@x.example"])
    (first,) = store.lease("w1", lease_seconds=30)
    assert store.lease("w2") == []  # never leased to two workers at once
    clock.advance(31)
    (second,) = store.lease("w2", lease_seconds=30)
    assert second.message_id == mid and second.attempts == 1 and second.token != first.token
    with pytest.raises(StaleLease):
        store.ack(first.token)  # the fenced-off worker cannot settle any more
    store.ack(second.token)
    assert store.get(mid).recipients[0].state == "delivered"


def test_late_ack_before_the_expiry_is_recorded_is_accepted(store: Store, clock: Clock) -> None:
    # Expiry takes effect when it is written to the log; until then the lease still fences.
    mid = _enqueue(store, recipients=["a@x.example"])
    (lease,) = store.lease("w1", lease_seconds=30)
    clock.advance(45)
    store.ack(lease.token)
    assert store.get(mid).done


def test_maintenance_expires_leases_without_a_lease_call(store: Store, clock: Clock) -> None:
    mid = _enqueue(store, recipients=["a@x.example"])
    (lease,) = store.lease("w1", lease_seconds=30)
    clock.advance(31)
    assert store.maintain()["expired"] == 1
    r = store.get(mid).recipients[0]
    assert r.state == "deferred" and r.attempts == 1 and r.next_attempt == clock.now
    with pytest.raises(StaleLease):
        store.ack(lease.token)


def _set_attempts(store: Store, message_id: str, attempts: int) -> None:
    """Give every recipient of the message ``attempts`` attempts, written with the row encoder
    (what 65,535 lease timeouts would leave, without the minutes they take)."""
    mid = parse_id(message_id)

    def fn(wctx: WriteContext) -> None:
        kv = LmdbKV(wctx.txn, wctx.dbs)
        for ordinal, rcpt in machine.recipients_of(kv, mid):
            rcpt.attempts = attempts
            kv.put(b"recipients", mid_ord(mid, ordinal), rcpt.encode())

    store.log.write(fn)


def test_the_attempt_count_stops_at_its_limit_and_the_queue_goes_on(
    store: Store, clock: Clock, either_machine: str
) -> None:
    # A recipient whose worker keeps crashing: its 65,536th attempt (a lease timeout, then a
    # defer) used to raise struct.error / AssertionError in every lease() and maintain() after.
    flaky = _enqueue(store, recipients=["a@x.example"])
    _set_attempts(store, flaky, 65_534)
    (lease,) = store.lease("w", lease_seconds=1)
    clock.advance(2)
    (lease,) = store.lease("w", lease_seconds=1)  # the timeout counted: 65,535
    assert lease.attempts == 65_535
    clock.advance(2)
    (lease,) = store.lease("w", lease_seconds=1)  # one more timeout: the count stays
    assert lease.attempts == 65_535
    store.defer(lease.token, reason="451 later")
    r = store.get(flaky).recipients[0]
    assert (r.state, r.attempts, r.last_reason) == ("deferred", 65_535, "451 later")
    other = _enqueue(store, recipients=["b@y.example"])  # the rest of the queue is unaffected
    assert [x.message_id for x in store.lease("w2")] == [other]
    assert store.maintain()["expired"] == 0
    clock.advance(86_400)
    (lease,) = [x for x in store.lease("w3") if x.message_id == flaky]
    store.bounce(lease.token, reason="550 gave up")
    r = store.get(flaky).recipients[0]
    assert (r.state, r.attempts) == ("bounced", 65_535)


def test_message_lifetime_expires_waiting_recipients(store: Store, clock: Clock) -> None:
    mid = _enqueue(store, recipients=["a@x.example", "b@y.example"], expires_in=3600)
    (lease,) = store.lease("w", domain="x.example")
    store.defer(lease.token, reason="451 greylisted")
    clock.advance(3601)
    store.maintain()
    msg = store.get(mid)
    # The deferred one keeps its last reason for the DSN; the never-tried one expires too.
    assert [(r.state, r.last_reason) for r in msg.recipients] == [("expired", "451 greylisted"), ("expired", None)]
    assert msg.done
    # It stays findable for the MTA's DSN (7 days by default) even with retention 0 ...
    assert [m.message_id for m in store.list(state="expired")] == [mid]
    clock.advance(6 * 86400)
    store.maintain()
    assert store.get(mid).done
    # ... until the MTA deletes it, or the expired-retention period passes.
    clock.advance(86400)
    store.maintain()
    with pytest.raises(NotFound):
        store.get(mid)


def test_lease_never_hands_out_a_message_whose_lifetime_passed(store: Store, clock: Clock) -> None:
    # More expiries due than one maintenance record holds (1000): lease() used to expire 1000,
    # then lease the 1001st, which an ack then marked delivered.
    ids = store.enqueue_many([{"mail_from": "a@example.org", "recipients": [f"r{i}@example.net"], "data": b"x",
                               "expires_in": 60} for i in range(1001)])
    clock.advance(3600)
    assert store.lease("w", max_messages=10) == []
    assert store.stats()["recipients"]["expired"] == 1001
    assert {r.state for r in store.get(ids[-1]).recipients} == {"expired"}


def test_a_backlog_of_expiries_lease_does_not_write_is_still_not_leased(
    store: Store, clock: Clock, monkeypatch: pytest.MonkeyPatch, either_machine: str
) -> None:
    # lease() writes a bounded number of expiries before it plans; what is left of a backlog
    # beyond that is skipped by the plan and refused by the lease entry, and maintenance expires it.
    monkeypatch.setattr(mqstore.api, "_MAINTENANCE_ITEMS_MAX", 2)
    monkeypatch.setattr(mqstore.api, "_LEASE_EXPIRE_RECORDS_MAX", 2)
    short = [_enqueue(store, recipients=[f"r{i}@x.example"], expires_in=60, priority=5) for i in range(7)]
    live = _enqueue(store, recipients=["live@y.example"])
    clock.advance(3600)
    assert [(x.message_id, x.recipients) for x in store.lease("w", max_messages=3)] == [
        (live, ("live@y.example",))]
    assert store.stats()["recipients"]["expired"] == 4  # two records of two expiries
    assert store.maintain()["expired"] == 3  # the rest, never leased
    assert {r.state for mid in short for r in store.get(mid).recipients} == {"expired"}


def test_recipient_leased_at_expiry_expires_when_it_comes_back(store: Store, clock: Clock) -> None:
    mid = _enqueue(store, recipients=["a@x.example"], expires_in=100)
    (lease,) = store.lease("w", lease_seconds=600)
    clock.advance(200)
    store.maintain()
    assert store.get(mid).recipients[0].state == "leased"  # a worker may be delivering it right now
    store.defer(lease.token, reason="451 later")
    assert store.get(mid).recipients[0].state == "expired"


def test_not_before_and_priority_order(store: Store, clock: Clock) -> None:
    late = _enqueue(store, recipients=["a@x.example"], not_before=T0 + 600)
    low = _enqueue(store, recipients=["b@x.example"], priority=-1)
    high = _enqueue(store, recipients=["c@x.example"], priority=5)
    normal = _enqueue(store, recipients=["d@x.example"])
    got = [lease.message_id for lease in store.lease("w", max_messages=10, lease_seconds=3600)]
    assert got == [high, normal, low]  # highest priority first; the scheduled one is not due
    clock.advance(600)
    assert [lease.message_id for lease in store.lease("w")] == [late]


def test_a_message_that_would_expire_before_its_first_attempt_is_refused(store: Store, clock: Clock) -> None:
    # It used to be stored, then expired untried (its not_before at or after its expiry).
    store.set_namespace_policy("short", lifetime=100)
    last, stats = store.log.last_index, store.stats()["recipients"]
    mail: dict[str, Any] = {"mail_from": "a@example.org", "recipients": ["b@x.example"], "data": b"x"}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"not_before": T0 + 6 * 86400}, "the 432000 s lifetime of namespace 'default'"),  # 5 days by default
        ({"not_before": T0 + 60, "expires_in": 60}, "its expires_in of 60 s"),
        ({"not_before": T0 + 100, "namespace": "short"}, "the 100 s lifetime of namespace 'short'"),
    ]
    for late, why in cases:
        with pytest.raises(InvalidArgument, match="before its first attempt") as info:
            store.enqueue(**mail, **late)
        assert "at or after the message's expiry" in str(info.value) and why in str(info.value)
        with pytest.raises(InvalidArgument, match=r"messages\[1\]\.not_before"):  # the whole call is refused
            store.enqueue_many([mail, {**mail, **late}])
    assert store.log.last_index == last and store.stats()["recipients"] == stats
    # Just before its expiry it is stored, and leased when due.
    mid = store.enqueue(**mail, not_before=T0 + 59.999, expires_in=60)
    clock.advance(59.999)
    assert [x.message_id for x in store.lease("w")] == [mid]


def test_oldest_due_first_within_a_priority(store: Store, clock: Clock) -> None:
    ids = []
    for i in range(5):
        ids.append(_enqueue(store, recipients=[f"r{i}@x.example"]))
        clock.advance(1)
    assert [lease.message_id for lease in store.lease("w", max_messages=3)] == ids[:3]
    assert [lease.message_id for lease in store.lease("w", max_messages=3)] == ids[3:]


def test_lease_filters_by_namespace_and_domain(store: Store) -> None:
    a = _enqueue(store, recipients=["x@a.example", "y@b.example"], namespace="tenant1")
    b = _enqueue(store, recipients=["z@b.example"], namespace="tenant2")
    (only_b_domain,) = store.lease("w", domain="B.example", namespace="tenant1")
    assert only_b_domain.message_id == a and only_b_domain.recipients == ("y@b.example",)
    (t2,) = store.lease("w", namespace="tenant2")
    assert t2.message_id == b
    (rest,) = store.lease("w")
    assert rest.recipients == ("x@a.example",)


def test_hold_release_requeue_delete(store: Store, clock: Clock) -> None:
    mid = _enqueue(store, recipients=["a@x.example"])
    store.hold(mid)
    assert store.get(mid).held and store.lease("w") == []
    assert [m.message_id for m in store.list(state="held")] == [mid]
    store.release(mid)
    (lease,) = store.lease("w")
    store.defer(lease.token, reason="451")
    assert store.lease("w") == []
    store.requeue(mid)
    r = store.get(mid).recipients[0]
    assert r.state == "deferred" and r.next_attempt == clock.now
    (lease2,) = store.lease("w")
    store.delete(mid)
    with pytest.raises(NotFound):
        store.get(mid)
    with pytest.raises(StaleLease):
        store.ack(lease2.token)
    for op in (store.hold, store.release, store.requeue, store.delete):
        with pytest.raises(NotFound):
            op(mid)
    assert store.stats()["messages"] == 0


def test_hold_keeps_recipients_out_after_a_leased_one_returns(store: Store) -> None:
    mid = _enqueue(store, recipients=["a@x.example"])
    (lease,) = store.lease("w")
    store.hold(mid)
    store.defer(lease.token)
    store.requeue(mid)
    assert store.lease("w") == []
    store.release(mid)
    assert len(store.lease("w")) == 1


def test_idempotency_key_returns_the_first_id_within_the_window(store: Store, clock: Clock) -> None:
    first = _enqueue(store, idempotency_key="msg-1")
    last = store.log.last_index
    assert _enqueue(store, idempotency_key="msg-1") == first
    assert store.log.last_index == last  # nothing stored
    assert _enqueue(store, idempotency_key="msg-1", namespace="other") != first  # per namespace
    ids = store.enqueue_many(
        [{"mail_from": "a@example.org", "recipients": ["b@example.net"], "data": b"x", "idempotency_key": "k2"}] * 3
    )
    assert ids[0] == ids[1] == ids[2]
    clock.advance(86400 + 1)
    store.maintain()
    assert _enqueue(store, idempotency_key="msg-1") != first  # window passed


def test_retention_keeps_finished_messages_then_compacts(store: Store, clock: Clock) -> None:
    store.set_namespace_policy("keep", retention=3600)
    mid = _enqueue(store, recipients=["a@x.example"], namespace="keep")
    (lease,) = store.lease("w")
    store.ack(lease.token)
    store.maintain()
    msg = store.get(mid)
    assert msg.done and msg.retain_until == clock.now + 3600
    clock.advance(3601)
    assert store.maintain()["compacted"] == 1
    with pytest.raises(NotFound):
        store.get(mid)


def _retention_index(store: Store) -> list[bytes]:
    with store.log.env.read() as txn:
        return [k for k, _ in LmdbKV(txn, store.log.env.dbs).scan(b"retention", b"")]


def test_a_legal_hold_protects_a_message_without_retention_mode_alike_before_or_after_it_finishes(
    store: Store, clock: Clock, either_machine: str
) -> None:
    # Placed before the message finished, the hold used to leave it due for compaction: when its
    # retention passed, maintenance tried, was refused and audited a denial; placed after, not.
    store.set_namespace_policy("default", retention=60)
    early, late = _enqueue(store, recipients=["a@x.example"]), _enqueue(store, recipients=["b@x.example"])
    store.add_legal_hold(early, "SEC-1")
    for lease in store.lease("w"):
        store.ack(lease.token)
    store.add_legal_hold(late, "SEC-2")
    assert _retention_index(store) == []  # nothing due for compaction while held
    with store.log.env.read() as txn:
        kv = LmdbKV(txn, store.log.env.dbs)
        for mid in (early, late):
            row = machine.get_message(kv, parse_id(mid))
            assert row is not None and row.finished and machine.retention_key(kv, parse_id(mid), row) is None
    clock.advance(61)
    assert store.maintain()["compacted"] == 0
    assert store.audit_query(where={"op": "compact"}) == []  # no refused compaction of either
    assert [(m.done, m.legal_holds) for m in map(store.get, (early, late))] == [(True, ("SEC-1",)), (True, ("SEC-2",))]
    store.remove_legal_hold(early, "SEC-1")
    store.remove_legal_hold(late, "SEC-2")
    assert len(_retention_index(store)) == 2
    assert store.maintain()["compacted"] == 2
    for mid in (early, late):
        with pytest.raises(NotFound):
            store.get(mid)


def test_default_retention_zero_removes_finished_messages_and_log_compaction_keeps_live_bodies(
    store: Store,
) -> None:
    done = _enqueue(store, recipients=["a@x.example"])
    (lease,) = store.lease("w")
    store.ack(lease.token)
    live = _enqueue(store, recipients=["b@x.example"], data=b"still here")
    store.maintain()
    with pytest.raises(NotFound):
        store.get(done)
    removed = store.compact_log()
    assert removed > 0
    assert store.get(live).data == b"still here"  # its ENQUEUE record was kept
    assert store.log.scan().clean
    (lease,) = store.lease("w")
    assert lease.data == b"still here"


def test_list_filters_and_pages(store: Store, clock: Clock) -> None:
    ids = [_enqueue(store, recipients=[f"r{i}@d{i % 2}.example"], namespace="n1" if i < 6 else "n2") for i in range(8)]
    clock.advance(100)
    newest = _enqueue(store, recipients=["z@d0.example"])
    assert [m.message_id for m in store.list()] == [*ids, newest]
    assert [m.message_id for m in store.list(namespace="n2")] == ids[6:]
    assert [m.message_id for m in store.list(domain="d1.example")] == ids[1::2]
    assert [m.message_id for m in store.list(older_than=50)] == ids
    page1 = store.list(limit=3)
    page2 = store.list(limit=3, after=page1.next_after)
    page3 = store.list(limit=3, after=page2.next_after)
    assert [m.message_id for m in page1 + page2 + page3] == [*ids, newest]
    assert store.list(limit=3, after=page3[-1].message_id) == [] and page3.next_after is not None
    summary = store.list(limit=1)[0]
    assert summary.states == {"queued": 1} and summary.recipients == 1


def test_qshape_counts_waiting_recipients_by_domain_and_age(store: Store, clock: Clock) -> None:
    for i in range(3):
        _enqueue(store, recipients=[f"a{i}@big.example"])
    clock.advance(7 * 60)
    _enqueue(store, recipients=["x@small.example", "y@big.example"])
    clock.advance(60)
    shape = store.qshape()
    assert shape.buckets[0] == "0-5" and shape.buckets[-1] == "1280+"
    assert shape.domains["big.example"][:2] == (1, 3)
    assert shape.domains["small.example"][:2] == (1, 0)
    assert shape.total[:2] == (2, 3)
    assert list(shape.domains) == ["big.example", "small.example"]  # biggest first


def test_stats_report_counts_bytes_and_oldest_age(store: Store, clock: Clock) -> None:
    _enqueue(store, data=b"x" * 100)
    clock.advance(30)
    _enqueue(store, recipients=["c@z.example"], data=b"y" * 50, namespace="other")
    stats = store.stats()
    assert stats["recipients"]["queued"] == 3 and stats["messages"] == 2 and stats["bytes"] == 150
    assert stats["oldest_age_seconds"] == 30
    assert stats["namespaces"]["other"]["recipients"]["queued"] == 1


def test_state_survives_reopen(qpath: Path, kek: Path, clock: Clock) -> None:
    with mqstore.open(qpath, key_file=kek, clock=clock, background=False) as s:
        mid = _enqueue(s, recipients=["a@x.example", "b@x.example"])
        (lease,) = s.lease("w", lease_seconds=100)
        s.ack(lease.token, recipients=["a@x.example"])
        before = s.get(mid)
        stats = s.stats()
    with mqstore.open(qpath, key_file=kek, clock=clock, background=False) as s:
        assert s.get(mid) == before
        assert s.stats()["recipients"] == stats["recipients"]
        s.ack(lease.token)  # the lease survived the restart too
        assert s.get(mid).done


def test_clock_set_back_does_not_move_time_backwards(qpath: Path, kek: Path, clock: Clock) -> None:
    with mqstore.open(qpath, key_file=kek, clock=clock, background=False) as s:
        mid = _enqueue(s, recipients=["a@x.example"])
        (lease,) = s.lease("w", lease_seconds=60)
        clock.advance(120)
        s.maintain()  # the lease expires at T0 + 120
    clock.now = T0  # a restart on a machine whose clock is behind
    with mqstore.open(qpath, key_file=kek, clock=clock, background=False) as s:
        with pytest.raises(StaleLease):
            s.ack(lease.token)
        (again,) = s.lease("w", lease_seconds=60)
        assert again.deadline == T0 + 180  # stamped from the last time written, not the clock
        assert s.get(mid).recipients[0].state == "leased"


def test_background_maintenance_expires_leases(qpath: Path, kek: Path) -> None:
    with mqstore.open(qpath, key_file=kek) as s:
        mid = _enqueue(s, recipients=["a@x.example"])
        assert len(s.lease("w", lease_seconds=0.2)) == 1
        deadline = time.time() + 10
        while s.get(mid).recipients[0].state == "leased" and time.time() < deadline:
            time.sleep(0.05)
        assert s.get(mid).recipients[0].state == "deferred"


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"recipients": []}, "at least one recipient"),
        ({"recipients": ["nope"]}, "local@domain"),
        ({"mail_from": "bad address@x"}, "not allowed"),
        ({"data": "str"}, "must be bytes"),
        ({"data": b"x" * (50 * 1024 * 1024 + 1)}, "the limit is"),
        ({"priority": 1000}, "priority"),
        ({"not_before": -1}, "not_before"),
        ({"not_before": "tomorrow"}, "not_before"),
        ({"expires_in": 0}, "expires_in"),
        ({"expires_in": -5}, "expires_in"),
        ({"expires_in": 0.0004}, r"expires_in must be at least 1 ms"),  # 0 ms: it would never expire
        ({"namespace": "bad/ns"}, "namespace"),
        ({"idempotency_key": ""}, "idempotency_key"),
    ],
)
def test_bad_enqueue_input_is_refused_and_nothing_changes(
    store: Store, kwargs: dict[str, object], message: str
) -> None:
    _enqueue(store)
    last, stats = store.log.last_index, store.stats()["recipients"]
    fields: dict[str, object] = {"mail_from": "a@example.org", "recipients": ["b@example.net"], "data": b"x"}
    fields.update(kwargs)
    with pytest.raises(InvalidArgument, match=message):
        store.enqueue(**fields)  # type: ignore[arg-type]
    assert store.log.last_index == last and store.stats()["recipients"] == stats


def test_durations_that_round_to_zero_milliseconds_are_refused(store: Store, clock: Clock) -> None:
    # Durations are kept in whole milliseconds, where 0 means "never expires": 0.0004 s passed
    # the "> 0" check, then became a message (or a namespace lifetime) that never expired, and a
    # lease whose deadline was its start.
    mid = _enqueue(store)
    last = store.log.last_index
    calls: list[tuple[Callable[[], object], str]] = [
        (lambda: store.set_namespace_policy("tiny", lifetime=0.0004), "lifetime"),
        (lambda: store.set_namespace_policy("tiny", backoff=[60, 0.0004]), r"backoff\[1\]"),
        (lambda: store.lease("w", lease_seconds=0.0004), "lease_seconds"),
        (lambda: store.enqueue_many([{"mail_from": "a@example.org", "recipients": ["b@example.net"], "data": b"x"},
                                     {"mail_from": "a@example.org", "recipients": ["b@example.net"], "data": b"x",
                                      "expires_in": 0.0004}]), r"messages\[1\]\.expires_in"),
    ]
    for call, name in calls:
        with pytest.raises(InvalidArgument, match=f"{name} must be at least 1 ms"):
            call()
    assert store.log.last_index == last and store.get_policy("tiny").lifetime_ms == 5 * 86_400_000
    assert {r.state for r in store.get(mid).recipients} == {"queued"}
    # What rounds to 1 ms is kept as 1 ms.
    short = _enqueue(store, expires_in=0.0006)
    assert store.get(short).expires_at == pytest.approx(T0 + 0.001)
    (lease,) = store.lease("w", lease_seconds=0.0006, max_messages=1)
    assert lease.deadline == pytest.approx(T0 + 0.001)
    clock.advance(1)
    store.maintain()
    assert {r.state for r in store.get(short).recipients} == {"expired"}


def test_text_that_cannot_be_encoded_is_refused_and_nothing_changes(store: Store) -> None:
    # A lone surrogate (as os.fsdecode or a careless decoder leaves in a str) passed the checks,
    # then failed inside with UnicodeEncodeError; the reason check even used "replace".
    mid = _enqueue(store, recipients=["a@x.example"])
    (lease,) = store.lease("w")
    store.add_legal_hold(mid, "SEC-1")
    before, last = store.get(mid), store.log.last_index
    calls: list[tuple[Callable[[], object], str]] = [
        (lambda: store.lease("\ud800"), "worker"),
        (lambda: store.defer(lease.token, reason="451 \ud800"), "reason"),
        (lambda: store.bounce(lease.token, reason="550 \udcff"), "reason"),
        (lambda: store.add_legal_hold(mid, "\ud800"), "case"),
        (lambda: store.remove_legal_hold(mid, "SEC-\udc80"), "case"),
        (lambda: store.delete(mid, bypass_governance=True, reason="\ud800"), "reason"),
        (lambda: store.set_namespace_policy("default", lifetime=60, bypass_governance=True, reason="\ud800"), "reason"),
    ]
    for call, field in calls:
        with pytest.raises(InvalidArgument, match=f"{field} is not valid Unicode"):
            call()
    assert store.get(mid) == before and store.log.last_index == last
    store.defer(lease.token, reason="451 later")  # the lease is still good
    assert store.get(mid).recipients[0].last_reason == "451 later"


def test_bad_calls_elsewhere_are_refused(store: Store) -> None:
    mid = _enqueue(store)
    calls: list[tuple[Callable[[], object], str]] = [
        (lambda: store.get("not-an-id"), "message id"),
        (lambda: store.get("0" * 26), "no message"),
        (lambda: store.lease(""), "worker"),
        (lambda: store.lease("w", max_messages=0), "max_messages"),
        (lambda: store.lease("w", lease_seconds=-1), "lease_seconds"),
        (lambda: store.lease("w", domain="not a domain"), "domain"),
        (lambda: store.list(state="weird"), "state must be one of"),
        (lambda: store.list(limit=0), "limit"),
        (lambda: store.enqueue_many([]), "non-empty"),
        (lambda: store.enqueue_many([{"mail_from": "a@b.c"}]), "needs mail_from"),
        (lambda: store.enqueue_many([{"mail_from": "a@b.c", "recipients": ["x@y.z"], "data": b"", "oops": 1}]),
         "unknown field"),
        (lambda: store.set_namespace_policy("n", backoff=[0]), "backoff"),
        (lambda: store.hold(12345), "message id"),  # type: ignore[arg-type]
    ]
    for call, message in calls:
        with pytest.raises((InvalidArgument, NotFound), match=message):
            call()
    assert store.get(mid).recipients[0].state == "queued"
    (lease,) = store.lease("w")
    with pytest.raises(InvalidArgument, match="not a string"):
        store.ack(lease.token, recipients="alice@example.net")
    with pytest.raises(InvalidArgument, match="reason"):
        store.defer(lease.token, reason="x" * 5000)
    assert {r.state for r in store.get(mid).recipients} == {"leased"}


def test_a_policy_change_during_a_policy_read_is_not_hidden_by_the_cache(
        store: Store, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    # An enqueue that read the namespace's policy just before a change committed used to cache
    # what it read, so every later enqueue kept the old lifetime until the next change.
    original = machine.get_policy
    changed: list[bool] = []

    def read_then_change(kv: Any, namespace: str) -> Any:
        policy = original(kv, namespace)  # the old policy, read in the old snapshot
        if not changed:
            changed.append(True)
            t = threading.Thread(target=store.set_namespace_policy, args=("default",), kwargs={"lifetime": 3600})
            t.start()
            t.join()
        return policy

    monkeypatch.setattr(machine, "get_policy", read_then_change)
    first = _enqueue(store)  # raced with the change: may use the old lifetime once
    second = _enqueue(store)
    assert changed
    assert store.get(first).expires_at == T0 + 5 * 86400
    assert store.get(second).expires_at == T0 + 3600


def test_a_token_that_is_not_an_integer_is_an_invalid_argument(store: Store) -> None:
    # It used to raise StaleLease, as if it were a lease that had expired; the Client says this.
    _enqueue(store)
    (lease,) = store.lease("w")
    last = store.log.last_index
    for wrong in ("5", str(lease.token), True, float(lease.token), None):
        for settle in (store.ack, store.defer, store.bounce):
            with pytest.raises(InvalidArgument, match="a lease token is an integer"):
                settle(wrong)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="a lease token is an integer"):
            store.ack_many([lease.token, wrong])  # type: ignore[list-item]
    with pytest.raises(StaleLease):
        store.ack(2**70)  # an integer no lease has: unknown
    assert store.log.last_index == last and _states(store, lease.message_id)["alice@example.net"] == "leased"
    store.ack(lease.token)
