"""The compiled hot paths of the queue state machine (``ext/_machine.pyx``) against the Python
reference (``mqstore/queue/machine.py``).

Random sequences of enqueue (with and without idempotency keys), lease, ack / defer / bounce
(checked and unchecked, stale tokens, recipients not in the lease), hold / release, policy changes
(idempotency windows too) and lease plans (which recipients are due, by namespace and domain) are
applied to two stores, one through the compiled paths and one through the reference; after every
entry both give the same result and every table holds the same bytes. Damaged rows raise the
reference's ``Corruption`` either way. ``MQSTORE_FUZZ_EXAMPLES`` runs more examples.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mqstore import codec
from mqstore.codec import Envelope, RecordType
from mqstore.errors import Corruption, StaleLease
from mqstore.queue import machine
from mqstore.queue.kv import LmdbKV
from mqstore.queue.model import (
    STATE_NAMES,
    AdminEntry,
    LeaseEntry,
    LeaseRow,
    LegalHoldEntry,
    Policy,
    SettleEntry,
    mid_ord,
)
from mqstore.store.env import DATABASES, Environment

EXAMPLES = int(os.environ.get("MQSTORE_FUZZ_EXAMPLES", "150"))
COMPILED = machine._fast

pytestmark = pytest.mark.skipif(COMPILED is None, reason="the compiled state machine is not in use")

DOMAINS = ["example.org", "EXAMPLE.net", "mx.ex.com", "ünï.example"]
NAMESPACES = ["default", "bulk", "été"]
TIMES = st.integers(0, 20).map(lambda t: t * 50)  # coarse: equal times (deadlines, expiry) happen

ADDRESS = st.builds(lambda user, dom: f"{user}@{dom}", st.sampled_from(["a", "b", "Zoë"]), st.sampled_from(DOMAINS))
ENQUEUE = st.tuples(
    st.just("enqueue"),
    st.integers(0, 2),  # message number (a repeat is an enqueue of an existing id)
    st.sampled_from(NAMESPACES),
    st.integers(-128, 127),
    st.lists(ADDRESS, min_size=1, max_size=4),
    st.sampled_from([0, 50, 100]),  # created
    st.sampled_from([-50, 0, 0, 100, 300]),  # not_before offset (<= 0: due at once)
    st.sampled_from([0, 100, 200, 300]),  # expires after created (0: never)
    st.integers(0, 10_000),  # size
    st.integers(0, 3),  # key id
    st.none() | st.sampled_from(["k1", "k2", "ключ"]),  # idempotency key
)
LEASE = st.tuples(
    st.just("lease"),
    st.integers(0, 3),
    st.just((0, 1, 2, 3)) | st.lists(st.integers(0, 4), max_size=5).map(tuple),
    TIMES,
    st.integers(1, 500),
    st.sampled_from(["w1", "wörker", ""]),
)
SETTLE = st.tuples(
    st.just("settle"),
    st.sampled_from([RecordType.ACK, RecordType.DEFER, RecordType.BOUNCE]),
    st.sampled_from([0, 0, 0, 1, 2, 9]),  # which issued token, from the last (beyond: one never issued)
    # the recipients: None (all of the lease's), k (its last k), or any list
    st.none() | st.integers(1, 3) | st.lists(st.integers(0, 4), max_size=4).map(tuple),
    TIMES,
    st.lists(TIMES, max_size=4).map(tuple),
    st.sampled_from([b"", b"sealed reason", b"\x00" * 300]),
    st.booleans(),  # checked first, as the embedded API does
)
ADMIN_TYPES = [RecordType.HOLD, RecordType.HOLD, RecordType.RELEASE, RecordType.REQUEUE]
ADMIN = st.tuples(st.just("admin"), st.sampled_from(ADMIN_TYPES), st.integers(0, 3), TIMES)
LEGAL_HOLD = st.tuples(st.just("legal_hold"), st.integers(0, 3), st.sampled_from(["SEC-1", "SEC-2"]), st.booleans(),
                       TIMES)
PLAN = st.tuples(st.just("plan"), TIMES, st.integers(1, 4), st.none() | st.sampled_from(NAMESPACES),
                 st.none() | st.sampled_from([d.lower() for d in DOMAINS]))
POLICY = st.tuples(st.just("policy"), st.sampled_from(NAMESPACES), st.sampled_from([0, 100, 5_000]),
                   st.sampled_from([0, 50, 7_000]),
                   st.sampled_from([0, 50, 100, 86_400_000]))  # idempotency window
OPS = st.builds(
    lambda first, rest: first + rest,
    st.lists(ENQUEUE, min_size=1, max_size=4),
    st.lists(st.one_of(ENQUEUE, LEASE, LEASE, LEASE, SETTLE, SETTLE, SETTLE, ADMIN, LEGAL_HOLD, POLICY, PLAN),
             min_size=10, max_size=60),
)


@contextmanager
def implementation(compiled: bool) -> Iterator[None]:
    saved = machine._fast
    machine._fast = COMPILED if compiled else None
    try:
        yield
    finally:
        machine._fast = saved


def mid_of(n: int) -> bytes:
    return bytes([0x11, n]) + b"\x00" * 14


def dump(env: Environment) -> dict[bytes, list[tuple[bytes, bytes]]]:
    with env.env.begin() as txn:
        return {name: [(bytes(k), bytes(v)) for k, v in txn.cursor(db=env.dbs[name])] for name in DATABASES}


class Runner:
    """Applies the ops to one store; each op in its own write transaction, like a commit."""

    def __init__(self, path: Path, compiled: bool) -> None:
        self.env = Environment(path, map_size=64 << 20)
        self.compiled = compiled
        self.index = 0
        self.tokens: list[int] = []

    def apply(self, op: tuple[Any, ...]) -> object:
        self.index += 1
        with implementation(self.compiled), self.env.env.begin(write=True) as txn:
            kv = LmdbKV(txn, self.env.dbs)
            c = machine.Counters()
            c.index = self.index
            try:
                out = self._apply(kv, c, op)
            except (StaleLease, Corruption) as exc:
                out = (type(exc).__name__, str(exc))
            c.flush(kv)
            return out

    def _apply(self, kv: LmdbKV, c: machine.Counters, op: tuple[Any, ...]) -> object:
        kind = op[0]
        if kind == "enqueue":
            _, n, ns, prio, rcpts, created, nb, expires, size, key_id, *idem = op
            env = Envelope(mid_of(n), ns, "s@example.org", tuple(rcpts), prio, created, created + nb,
                           created + expires if expires else 0, idem[0] if idem else None)
            return machine.apply_enqueue(kv, c, self.index, env, size, None, key_id)
        if kind == "lease":
            _, n, ords, now, span, worker = op
            grant = machine.apply_lease(kv, c, self.index, LeaseEntry(now, now + span, mid_of(n), ords, worker))
            if grant.ordinals:
                self.tokens.append(self.index)
            return grant
        if kind == "settle":
            _, rtype, pick, ords, now, nxt, reason, checked = op
            token = self.tokens[-1 - pick] if pick < len(self.tokens) else 10_000 + pick
            raw = kv.get(b"leases", token.to_bytes(8, "big"))
            held = LeaseRow.decode(raw).ordinals if raw else ()
            if isinstance(ords, int):
                ords = held[-ords:]
            if checked:
                lease, ords = machine.check_settle(kv, token, ords)
                entry = SettleEntry(now, token, ords, nxt, reason)
                return machine.apply_settle(kv, c, rtype, entry, checked=lease)
            # An entry names its recipients: None stands for all of the lease's.
            entry = SettleEntry(now, token, held if ords is None else ords, nxt, reason)
            return machine.apply_settle(kv, c, rtype, entry)
        if kind == "plan":
            _, now, most, ns, domain = op
            return machine.plan_lease(kv, now, most, ns, domain)
        if kind == "admin":
            _, rtype, n, now = op
            return machine.apply_admin(kv, c, rtype, AdminEntry(now, mid_of(n)))
        if kind == "legal_hold":  # add (True) or remove the hold ``case`` on message n
            _, n, case, add, now = op
            return machine.apply_legal_hold(kv, c, LegalHoldEntry(now, mid_of(n), case, add))
        if kind == "attempts":  # set up a state: every recipient of message n has this many attempts
            _, n, attempts = op
            for ordinal, rcpt in machine.recipients_of(kv, mid_of(n)):
                rcpt.attempts = attempts
                kv.put(b"recipients", mid_ord(mid_of(n), ordinal), rcpt.encode())
            return None
        _, ns, retention, expired_retention, window = op
        policy = Policy(retention_ms=retention, expired_retention_ms=expired_retention, dedup_window_ms=window)
        kv.put(b"policies", ns.encode(), policy.encode())
        return None


def run_both(ops: list[tuple[Any, ...]]) -> list[object]:
    """Apply ``ops`` to a compiled and a reference store; after each, the results and every table
    must be the same. Returns the results."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        fast, ref = Runner(Path(tmp) / "fast", True), Runner(Path(tmp) / "ref", False)
        try:
            for step, op in enumerate(ops):
                got, want = fast.apply(op), ref.apply(op)
                assert got == want, f"step {step} {op}: compiled {got!r}, reference {want!r}"
                assert dump(fast.env) == dump(ref.env), f"tables differ after step {step} {op}"
                results.append(got)
        finally:
            fast.env.close()
            ref.env.close()
    return results


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS)
def test_compiled_paths_match_the_reference(ops: list[tuple[Any, ...]]) -> None:
    run_both(ops)


# Cases the random sequences reach only rarely, spelled out.


def test_a_defer_at_the_expiry_time_expires_the_recipient() -> None:
    enqueue = ("enqueue", 1, "default", 0, ["a@example.org"], 0, 0, 300, 10, 0)
    for defer_at, state in ((299, "deferred"), (300, "expired")):
        results = run_both([enqueue, ("lease", 1, (0,), 100, 500, "w"),
                            ("settle", RecordType.DEFER, 0, None, defer_at, (1_000,), b"451", False)])
        assert results[-1] is True
        with tempfile.TemporaryDirectory() as tmp:
            runner = Runner(Path(tmp), True)
            try:
                for op in (enqueue, ("lease", 1, (0,), 100, 500, "w"),
                           ("settle", RecordType.DEFER, 0, None, defer_at, (1_000,), b"451", False)):
                    runner.apply(op)
                with runner.env.env.begin() as txn:
                    kv = LmdbKV(txn, runner.env.dbs)
                    assert [STATE_NAMES[r.state] for _, r in machine.recipients_of(kv, mid_of(1))] == [state]
            finally:
                runner.env.close()


def test_nothing_of_a_message_whose_lifetime_passed_is_leased_or_planned() -> None:
    # Its expiry may not be applied yet (a backlog, or a replicated leader's lease planned beside
    # the EXPIRE entry): the LEASE entry itself must not grant it.
    expiring = ("enqueue", 1, "default", 0, ["a@x.org", "b@x.org"], 0, 0, 300, 10, 0)
    other = ("enqueue", 2, "default", -1, ["c@x.org"], 0, 0, 0, 10, 0)
    for now, granted in ((299, (0, 1)), (300, ()), (301, ())):
        results = run_both([expiring, other, ("plan", now, 4, None, None), ("lease", 1, (0, 1), now, 100, "w")])
        plans, grant = results[2], results[3]
        assert isinstance(plans, list) and isinstance(grant, machine.Grant)
        assert [p.mid for p in plans] == ([mid_of(1)] if granted else []) + [mid_of(2)]
        assert grant.ordinals == granted


def test_a_legal_hold_keeps_a_finished_message_out_of_the_retention_index_whichever_came_first() -> None:
    # A message without a retention mode: a hold placed before it finished used to leave it in
    # the index (the compiled settle did not look at holds), one placed after took it out.
    enqueue = ("enqueue", 1, "default", 0, ["a@x.org"], 0, 0, 0, 10, 0)
    lease, ack = ("lease", 1, (0,), 10, 100, "w"), ("settle", RecordType.ACK, 0, None, 20, (), b"", True)
    hold, release = ("legal_hold", 1, "SEC-1", True, 30), ("legal_hold", 1, "SEC-1", False, 40)
    for ops in ([enqueue, hold, lease, ack], [enqueue, lease, ack, hold]):
        assert run_both(ops)[-1] is True
        tables = _tables(ops)
        assert tables[b"retention"] == [] and [k for k, _ in tables[b"holds"]] == [mid_of(1) + b"SEC-1"]
        released = _tables([*ops, release])[b"retention"]
        assert released == [((20).to_bytes(8, "big") + mid_of(1), b"")]  # back, at its retention end


def _tables(ops: list[tuple[Any, ...]]) -> dict[bytes, list[tuple[bytes, bytes]]]:
    """Every table after applying ``ops`` (compiled)."""
    with tempfile.TemporaryDirectory() as tmp:
        runner = Runner(Path(tmp), True)
        try:
            for op in ops:
                runner.apply(op)
            return dump(runner.env)
        finally:
            runner.env.close()


def test_a_grant_reports_the_most_attempts_among_its_recipients() -> None:
    three = ("enqueue", 1, "default", 0, ["a@x.org", "b@x.org", "c@x.org"], 0, 0, 0, 10, 0)
    results = run_both([
        three,
        ("lease", 1, (0, 1, 2), 0, 100, "w"),
        ("settle", RecordType.DEFER, 0, 2, 10, (20, 20), b"", True),  # b and c: 1 attempt, due at 20
        ("lease", 1, (1, 2), 30, 100, "w"),
        ("settle", RecordType.DEFER, 0, 1, 40, (50,), b"", True),  # c: 2 attempts, due at 50
        ("settle", RecordType.DEFER, 0, None, 40, (50,), b"", True),  # b: 2 attempts
        ("settle", RecordType.DEFER, 1, None, 45, (50,), b"", False),  # a: 1 attempt (first lease)
        ("lease", 1, (2, 1, 0), 60, 100, "w"),
    ])
    grant = results[-1]
    assert isinstance(grant, machine.Grant) and grant.ordinals == (2, 1, 0) and grant.attempts == 2


def _attempts(ops: list[tuple[Any, ...]], n: int) -> list[int]:
    """The attempt counts of message ``n``'s recipients after applying ``ops`` (compiled)."""
    with tempfile.TemporaryDirectory() as tmp:
        runner = Runner(Path(tmp), True)
        try:
            for op in ops:
                runner.apply(op)
            with runner.env.env.begin() as txn:
                return [r.attempts for _, r in machine.recipients_of(LmdbKV(txn, runner.env.dbs), mid_of(n))]
        finally:
            runner.env.close()


@pytest.mark.parametrize("rtype", [RecordType.ACK, RecordType.DEFER, RecordType.BOUNCE])
def test_a_settle_at_the_attempt_limit_keeps_the_count_there(rtype: RecordType) -> None:
    # The count is a u16 in the row: the 65,536th attempt used to raise AssertionError (compiled)
    # or struct.error (reference), so the entry could not be applied.
    ops = [("enqueue", 1, "default", 0, ["a@x.org", "b@x.org"], 0, 0, 0, 10, 0),
           ("attempts", 1, 65_535),
           ("lease", 1, (0, 1), 10, 100, "w"),
           ("settle", rtype, 0, 1, 20, (1_000,), b"451", False)]  # its last recipient
    results = run_both(ops)
    assert isinstance(results[2], machine.Grant) and results[2].attempts == 65_535
    assert results[-1] is True
    assert _attempts(ops, 1) == [65_535, 65_535]


def test_an_idempotency_key_names_one_message_inside_its_window() -> None:
    def enqueue(n: int, created: int) -> tuple[Any, ...]:
        return ("enqueue", n, "default", 0, [f"u{n}@example.org"], created, 0, 0, 10, 0, "order-7")

    results = run_both([
        ("policy", "default", 0, 0, 100),  # a window of 100 ms
        enqueue(1, 0),
        enqueue(2, 50),  # inside the first one's window: that message, nothing stored
        enqueue(2, 100),  # the window has passed: stored, with a new window
        enqueue(3, 150),  # inside the second one's window
    ])
    assert results[1:] == [mid_of(1), mid_of(1), mid_of(2), mid_of(2)]
    with tempfile.TemporaryDirectory() as tmp:
        runner = Runner(Path(tmp), True)
        try:
            for op in (("policy", "default", 0, 0, 100), enqueue(1, 0), enqueue(2, 100)):
                runner.apply(op)
            tables = dump(runner.env)
            # One window per key: the first one's expiry entry went when the second took the key.
            assert [v[:16] for _, v in tables[b"dedup"]] == [mid_of(2)]
            assert [k[:8] for k, _ in tables[b"dedup_exp"]] == [(200).to_bytes(8, "big")]
            assert {k for k, _ in tables[b"messages"]} == {mid_of(1), mid_of(2)}
        finally:
            runner.env.close()


def test_the_compiled_paths_are_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    # The comparison above would compare the reference with itself if the switch did nothing.
    assert codec.IMPLEMENTATION == "cython" and COMPILED is not None
    with tempfile.TemporaryDirectory() as tmp:
        runner = Runner(Path(tmp), True)
        try:
            calls: list[str] = []
            real = machine.get_message

            def spy(kv: Any, mid: bytes) -> Any:
                calls.append("reference")
                return real(kv, mid)

            monkeypatch.setattr(machine, "get_message", spy)
            monkeypatch.setattr(machine, "MessageRow", lambda *a, **k: calls.append("reference enqueue"))
            runner.apply(("enqueue", 1, "default", 0, ["a@example.org"], 0, 0, 0, 10, 0))
            runner.apply(("enqueue", 2, "default", 0, ["a@example.org"], 0, 0, 0, 10, 0, "order-7"))
            grant = runner.apply(("lease", 1, (0,), 10, 100, "w"))
            assert isinstance(grant, machine.Grant) and grant.ordinals == (0,)
            assert runner.apply(("settle", RecordType.ACK, 0, None, 20, (), b"", True)) is True
            assert calls == []  # the reference read no message row: the compiled paths did the work
        finally:
            runner.env.close()


@pytest.mark.parametrize("table", [b"messages", b"recipients"])
@pytest.mark.parametrize("damage", ["truncate", "version", "utf8"])
def test_a_damaged_row_raises_the_references_corruption(table: bytes, damage: str) -> None:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for compiled in (True, False):
            runner = Runner(Path(tmp) / str(compiled), compiled)
            try:
                runner.apply(("enqueue", 1, "default", 0, ["a@example.org"], 0, 0, 0, 10, 0))
                with runner.env.env.begin(write=True) as txn:
                    key = mid_of(1) if table == b"messages" else mid_of(1) + b"\x00\x00"
                    stored = txn.get(key, db=runner.env.dbs[table])
                    assert stored is not None
                    raw = bytearray(stored)
                    if damage == "truncate":
                        raw = raw[:-1]
                    elif damage == "version":
                        raw[0] = 9
                    else:  # the namespace's / domain's first byte: invalid UTF-8
                        raw[75 if table == b"messages" else 29] = 0xFF
                    txn.put(key, bytes(raw), db=runner.env.dbs[table])
                results.append(runner.apply(("lease", 1, (0,), 10, 100, "w")))
            finally:
                runner.env.close()
    assert results[0] == results[1]
    assert results[0][0] == "Corruption"  # type: ignore[index]
