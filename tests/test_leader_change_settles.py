"""Settling and admin calls around a leader change and concurrent settles, on in-process clusters
(real nodes, gRPC between them). Raft messages are filtered only to fix the timing of a leader
crash: followers that hold entries without having heard they committed, and a new leader whose
first round cannot commit yet."""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mqstore import StaleLease
from mqstore.consensus.types import Message, MessageType
from mqstore.errors import MQStoreError, Unavailable
from mqstore.testing.secure import InProcessCluster

MAIL: dict[str, Any] = {"mail_from": "a@example.org", "data": b"Subject: s\r\n\r\nx\r\n"}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[InProcessCluster]:
    c = InProcessCluster(tmp_path, ["a", "b", "c"])
    try:
        yield c
    finally:
        c.close()


class Links:
    """Filters every node's outgoing Raft messages: ``dead`` (nodes cut off both ways),
    ``commit_cap`` ((node, index): that node's messages say its commit index is below ``index``),
    ``hold_responses`` (append responses are dropped, so a new leader cannot commit)."""

    def __init__(self, cluster: InProcessCluster) -> None:
        self.dead: set[int] = set()
        self.commit_cap: tuple[int, int] | None = None
        self.hold_responses = False
        for node_id, server in cluster.servers.items():
            transport = server.node.transport
            transport.send = self._filtered(node_id, transport.send)  # type: ignore[method-assign,assignment]

    def _filtered(self, src: int, send: Callable[[list[Message]], None]) -> Callable[[list[Message]], None]:
        def filtered(messages: list[Message]) -> None:
            out = []
            for m in messages:
                if m.frm in self.dead or m.to in self.dead:
                    continue
                if self.commit_cap is not None and src == self.commit_cap[0] and m.commit >= self.commit_cap[1]:
                    m = dataclasses.replace(m, commit=self.commit_cap[1] - 1)
                if self.hold_responses and m.type == MessageType.APPEND_RESPONSE:
                    continue
                out.append(m)
            send(out)

        return filtered


def test_a_new_leader_answers_from_everything_committed_before_it(cluster: InProcessCluster) -> None:
    """The old leader acknowledged an enqueue and a lease grant, then died before the followers
    heard those entries committed. The new leader must not answer from its applied state until
    it applied them (it commits an entry of its own term first): an ack of the live lease and a
    hold of the acknowledged message wait and succeed; before, they got StaleLease and NotFound."""
    old = cluster.leader()
    old_id = old.node.node_id
    links = Links(cluster)
    time.sleep(0.3)
    links.commit_cap = (old_id, old.node.raw.last_index + 1)
    q_old = old.queue
    leased_mid = q_old.enqueue(recipients=["a@x.example"], **MAIL)
    (lease,) = q_old.lease(worker="w1", max_messages=1, lease_seconds=300)
    other_mid = q_old.enqueue(recipients=["b@x.example"], **MAIL)
    assert lease.message_id == leased_mid
    links.hold_responses = True
    links.dead.add(old_id)
    new = cluster.leader(among=[i for i in cluster.servers if i != old_id])
    assert new.node.applied_index < new.node.raw.last_index  # the enqueues and the lease: not applied
    release = threading.Timer(1.5, lambda: setattr(links, "hold_responses", False))
    release.start()
    try:
        q_new = new.queue
        q_new.ack(lease.token)  # waits for the new leader's first commit, then settles the live lease
        q_new.hold(other_mid)
    finally:
        release.cancel()
        links.dead.clear()
    assert q_new.get(leased_mid).recipients[0].state == "delivered"
    assert q_new.get(other_mid).held


def _race(calls: dict[str, tuple[Callable[[], None], float]]) -> dict[str, str]:
    """Run the calls at once (each after its delay): name -> "ok" or "stale" (StaleLease)."""
    result: dict[str, str] = {}
    start = threading.Barrier(len(calls))

    def run(name: str, call: Callable[[], None], delay: float) -> None:
        start.wait()
        time.sleep(delay)
        try:
            call()
            result[name] = "ok"
        except StaleLease:
            result[name] = "stale"

    threads = [threading.Thread(target=run, args=(name, call, delay)) for name, (call, delay) in calls.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return result


def test_ack_many_settles_all_or_none_beside_a_concurrent_ack(cluster: InProcessCluster) -> None:
    """ack_many([t1, t2]) racing an ack(t1): whichever comes second hears StaleLease, and an
    ack_many refused that way settled nothing (t2 still leased). Before, the leader's check saw
    only applied state: both calls passed it, and ack_many raised StaleLease having acked t2."""
    q = cluster.leader().queue
    outcomes: set[str] = set()
    for trial in range(40):
        first = q.enqueue(recipients=[f"one{trial}@x.example"], **MAIL)
        second = q.enqueue(recipients=[f"two{trial}@x.example"], **MAIL)
        tokens = {lease.message_id: lease.token for lease in q.lease("w", 10, 300)}
        t1, t2 = tokens[first], tokens[second]
        result = _race({"ack": (functools.partial(q.ack, t1), 0.0),
                        "ack_many": (functools.partial(q.ack_many, [t1, t2]), (trial % 5) / 1000)})
        state = q.get(second).recipients[0].state
        assert result["ack"] == "ok" or result["ack_many"] == "ok", result
        if result["ack_many"] == "stale":
            assert state == "leased", f"trial {trial}: ack_many refused but settled lease {t2} ({state})"
            q.ack(t2)
        else:
            assert state == "delivered"
        outcomes.add(result["ack_many"])
    assert "stale" in outcomes  # the race was run, not only one order


def _call(fn: Callable[[], object], out: dict[str, BaseException | None]) -> threading.Thread:
    """Run ``fn`` in a thread; ``out["error"]`` is what it raised (None: nothing)."""

    def run() -> None:
        try:
            fn()
            out["error"] = None
        except MQStoreError as exc:
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_leader_that_cannot_commit_its_term_fails_held_calls_and_answers_them_at_stop(
    cluster: InProcessCluster,
) -> None:
    """A new leader whose first entry cannot commit holds calls: after 5 s each fails with
    "nothing was written" (and the raft thread goes back to sleeping, not polling); one held when
    the node stops hears so at once, not at its 10 s timeout with "it may still commit"."""
    old = cluster.leader()
    links = Links(cluster)
    links.dead.add(old.node.node_id)
    links.hold_responses = True
    new = cluster.leader(among=[i for i in cluster.servers if i != old.node.node_id])
    first: dict[str, BaseException | None] = {}
    _call(lambda: new.queue.enqueue(recipients=["r@x.example"], **MAIL), first).join(timeout=30)
    error = first["error"]
    assert isinstance(error, Unavailable) and error.not_applied, error
    assert "has not committed an entry of its term" in str(error)
    assert new.node._hold_until is None  # nothing held: the loop sleeps until something happens
    second: dict[str, BaseException | None] = {}
    thread = _call(lambda: new.queue.enqueue(recipients=["s@x.example"], **MAIL), second)
    deadline = time.monotonic() + 3
    while not new.node._new_ops and time.monotonic() < deadline:
        time.sleep(0.01)
    assert new.node._new_ops, "the call was not held"
    new.node.stop(transfer_leadership=False)
    thread.join(timeout=30)
    error = second["error"]
    assert isinstance(error, Unavailable) and error.not_applied and "stopped" in str(error), error


def test_a_settle_whose_entry_a_snapshot_replaced_is_answered_and_released(tmp_path: Path) -> None:
    """A leader cut off right after planning ack(T): the others elect a leader, go on, snapshot and
    compact; the old node installs that snapshot. Its ack is answered then (it may have committed),
    and T is no longer counted as being settled: once the old node leads again, ack_many([T]) acks
    the live lease (before, it refused T for the life of the process)."""
    options = {i: {"snapshot_every": 40, "keep_entries": 10} for i in (1, 2, 3)}
    c = InProcessCluster(tmp_path, ["a", "b", "c"], node_options=options)
    try:
        old = c.leader()
        old_id = old.node.node_id
        links = Links(c)
        mid = old.queue.enqueue(recipients=["r@x.example"], **MAIL)
        (lease,) = old.queue.lease("w", 1, 600)
        time.sleep(0.3)
        links.dead.add(old_id)
        cut_off: dict[str, BaseException | None] = {}
        thread = _call(lambda: old.queue.ack(lease.token), cut_off)
        deadline = time.monotonic() + 3
        while lease.token not in old.node.settling and time.monotonic() < deadline:
            time.sleep(0.01)
        assert lease.token in old.node.settling
        new = c.leader(among=[i for i in c.servers if i != old_id])
        for k in range(120):
            new.queue.enqueue(recipients=[f"f{k}@x.example"], **MAIL)
        assert new.node.storage.snapshot_meta().index > old.node.applied_index
        links.dead.clear()
        thread.join(timeout=30)
        error = cut_off["error"]
        assert isinstance(error, Unavailable) and "installed a snapshot covering the write" in str(error), error
        assert old.node.settling == {}
        new.node.call(lambda: new.node.raw.transfer_leadership(old_id))
        deadline = time.monotonic() + 10
        while not old.node.is_leader and time.monotonic() < deadline:
            time.sleep(0.05)
        assert old.node.is_leader
        old.queue.ack_many([lease.token])
        assert old.queue.get(mid).recipients[0].state == "delivered"
    finally:
        c.close()
