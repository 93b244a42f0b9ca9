"""The operator's bounce of a whole message (``bounce_message``, like Exim's ``-Mg``): on the
embedded store, on a replicated node (its ClusterQueue) and through the Client and AsyncClient.

Every queued or deferred recipient (the message held or not) becomes bounced with the reason,
counted as an attempt; leased recipients are left to their worker, which can still settle them;
final ones are untouched. It needs the ``delete`` permission (role admin), retention never
refuses it, and it is audited."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import mqstore
from mqstore import NotFound
from mqstore.actor import Actor
from mqstore.api import QueueBase
from mqstore.client import AsyncClient, Client
from mqstore.crypto import create_key_file
from mqstore.errors import PermissionDenied
from mqstore.ops.inspect import message_history
from mqstore.ops.verify import verify_path
from mqstore.testing.secure import InProcessCluster, Pki

RAW = b"From: a@example.org\r\nSubject: hello\r\n\r\nbody\r\n"
#: One recipient per domain, so a lease by domain puts each in the state the test wants.
RECIPIENTS = ["queued@q.example", "deferred@d.example", "leased@l.example", "delivered@ok.example"]


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _states(message: mqstore.Message) -> dict[str, str]:
    return {r.address: r.state for r in message.recipients}


def _four_states(queue: mqstore.Store) -> tuple[str, int]:
    """A message whose recipients are queued, deferred, leased and delivered; returns its id and
    the token of the lease that still holds ``leased@l.example``."""
    mid = queue.enqueue("a@example.org", RECIPIENTS, RAW)
    (done,) = queue.lease("w1", domain="ok.example")
    queue.ack(done.token)
    (later,) = queue.lease("w1", domain="d.example")
    queue.defer(later.token, reason="451 4.7.1 try later")
    (held,) = queue.lease("w2", domain="l.example", lease_seconds=600)
    assert _states(queue.get(mid)) == dict(zip(RECIPIENTS, ["queued", "deferred", "leased", "delivered"],
                                               strict=True))
    return mid, held.token


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[mqstore.Store, Clock]]:
    clock = Clock()
    key = create_key_file(tmp_path / "kek.key")
    with mqstore.open(tmp_path / "store", key_file=key, clock=clock, background=False) as s:
        yield s, clock


def test_bounce_message_bounces_waiting_recipients_and_leaves_leased_ones(
        store: tuple[mqstore.Store, Clock]) -> None:
    s, _clock = store
    mid, token = _four_states(s)
    before = {r.address: r.attempts for r in s.get(mid).recipients}
    result = s.bounce_message(mid, reason="550 5.7.1 spam run, given up")
    assert result == mqstore.BounceResult(mid, bounced=2, left_leased=1)
    m = s.get(mid)
    assert _states(m) == {"queued@q.example": "bounced", "deferred@d.example": "bounced",
                          "leased@l.example": "leased", "delivered@ok.example": "delivered"}
    by_address = {r.address: r for r in m.recipients}
    for address in ("queued@q.example", "deferred@d.example"):
        assert by_address[address].last_reason == "550 5.7.1 spam run, given up"
        assert by_address[address].attempts == before[address] + 1  # counted like a worker's bounce
        assert by_address[address].next_attempt is None
    assert by_address["delivered@ok.example"].last_reason is None and by_address["leased@l.example"].lease_token
    assert not m.done
    # The MTA finds it to send the DSN; nothing of it is due any more.
    assert [x.message_id for x in s.list(state="bounced")] == [mid]
    assert s.lease("w3") == [] and s.qshape().total == (0,) * len(s.qshape().total)
    # The worker still settles what it holds; then the message is done as usual.
    s.bounce(token, reason="550 5.1.1 no such user")
    m = s.get(mid)
    assert m.done and m.retain_until is not None and _states(m)["leased@l.example"] == "bounced"
    assert [x.message_id for x in s.list(state="bounced")] == [mid]
    assert s.list(state="done")[0].states == {"bounced": 3, "delivered": 1}
    # Again: nothing is left to bounce.
    assert s.bounce_message(mid) == mqstore.BounceResult(mid, 0, 0)
    assert s.stats()["recipients"]["bounced"] == 3 and s.stats()["messages_active"] == 0


def test_a_lease_that_expires_after_the_bounce_leaves_its_recipient_to_bounce_again(
        store: tuple[mqstore.Store, Clock]) -> None:
    s, clock = store
    mid, token = _four_states(s)
    assert s.bounce_message(mid).left_leased == 1
    clock.now += 601  # the worker vanished: its lease expires and the recipient is due again
    assert s.maintain()["expired"] == 1
    assert _states(s.get(mid))["leased@l.example"] == "deferred"
    with pytest.raises(mqstore.StaleLease):
        s.ack(token)
    result = s.bounce_message(mid)
    assert (result.bounced, result.left_leased) == (1, 0)
    m = s.get(mid)
    assert m.done and {r.last_reason for r in m.recipients if r.address != "delivered@ok.example"} == {
        "bounced by the operator"}


def test_a_message_given_up_is_kept_for_its_dsn_like_an_expired_one(store: tuple[mqstore.Store, Clock]) -> None:
    # With the default retention of 0 it used to be compacted by the next maintenance (about a
    # second with the background thread), before the MTA could find it to send the DSN.
    s, clock = store
    given_up = s.enqueue("a@example.org", ["x@q.example"], RAW)
    partly = s.enqueue("a@example.org", ["y@l.example", "z@q2.example"], RAW)
    (held,) = s.lease("w1", domain="l.example")
    delivered = s.enqueue("a@example.org", ["d@ok.example"], RAW)
    (lease,) = s.lease("w1", domain="ok.example")
    s.ack(lease.token)
    assert s.bounce_message(given_up).bounced == 1 and s.bounce_message(partly).left_leased == 1
    s.ack(held.token)  # the worker settles the rest: the message finishes after the operator's bounce
    assert s.maintain()["compacted"] == 1  # the delivered one, retention 0
    with pytest.raises(NotFound):
        s.get(delivered)
    assert {x.message_id for x in s.list(state="bounced")} == {given_up, partly}
    week = 7 * 86_400
    assert s.get(given_up).retain_until == clock.now + week
    clock.now += week - 1
    assert s.maintain()["compacted"] == 0
    clock.now += 1
    assert s.maintain()["compacted"] == 2
    assert s.list(state="bounced") == []


def test_a_held_message_is_bounced_and_an_unknown_one_is_not_found(store: tuple[mqstore.Store, Clock]) -> None:
    s, _clock = store
    mid = s.enqueue("a@example.org", ["x@h.example", "y@h.example"], RAW)
    s.hold(mid)
    assert s.bounce_message(mid, reason="") == mqstore.BounceResult(mid, 2, 0)  # "": the default reason
    m = s.get(mid)
    assert m.held and m.done and {r.last_reason for r in m.recipients} == {"bounced by the operator"}
    assert [x.message_id for x in s.list(state="bounced")] == [mid]
    s.release(mid)
    assert s.lease("w") == []
    with pytest.raises(NotFound):
        s.bounce_message("0" * 26)
    s.delete(mid)
    with pytest.raises(NotFound):
        s.bounce_message(mid)
    with pytest.raises(mqstore.InvalidArgument):
        s.bounce_message("not-an-id")
    with pytest.raises(mqstore.InvalidArgument):
        s.bounce_message(s.enqueue("a@example.org", ["z@h.example"], RAW), reason="x" * 5000)


def test_bounce_needs_the_delete_permission_and_is_audited_under_compliance(
        store: tuple[mqstore.Store, Clock]) -> None:
    s, _clock = store
    s.set_policy("finance", mode="compliance", retention_days=30)
    mid = s.enqueue("cfo@example.org", ["board@b.example", "audit@a.example"], RAW, namespace="finance")
    s.add_legal_hold(mid, case="SEC-17")
    for roles in ({"producer"}, {"worker", "reader"}, {"compliance"}):
        actor = Actor("someone", frozenset(roles), source="test")
        with pytest.raises(PermissionDenied, match="'delete' permission"):
            s.bounce_message(mid, actor=actor)
    limited = Actor("ops-default", frozenset({"admin"}), namespaces=frozenset({"default"}))
    with pytest.raises(PermissionDenied, match="namespace 'finance'"):
        s.bounce_message(mid, actor=limited)
    assert _states(s.get(mid)) == {"board@b.example": "queued", "audit@a.example": "queued"}
    # Retention and a legal hold never refuse it: the message is kept, locked as it was.
    ops = Actor("ops", frozenset({"admin"}), source="test")
    assert s.bounce_message(mid, reason="550 policy", actor=ops).bounced == 2
    m = s.get(mid)
    assert m.done and m.retention_mode == "compliance" and m.legal_holds == ("SEC-17",)
    records = s.audit_query(where={"op": "bounce_message"})
    assert [(r["actor"], r["outcome"]) for r in records] == [("someone", "denied")] * 3 + [
        ("ops-default", "denied"), ("ops", "allowed")]
    allowed = records[-1]
    assert allowed["target"] == mid and allowed["namespace"] == "finance" and allowed["finished"] is True
    assert allowed["ordinals"] == [0, 1] and allowed["before"]["holds"] == ["SEC-17"]
    assert "550 policy" not in repr(records)  # reasons never appear in plain text
    assert s.audit_verify().ok


def test_history_and_verify_after_bounces(tmp_path: Path) -> None:
    key = create_key_file(tmp_path / "kek.key")
    with mqstore.open(tmp_path / "store", key_file=key, background=False) as s:
        mid, token = _four_states(s)
        held = s.enqueue("a@example.org", ["h@h.example"], RAW)
        s.hold(held)
        s.bounce_message(mid, reason="550 given up")
        s.bounce_message(held)
        s.ack(token)
        history = message_history(s.log, mid)
    events = [e["event"] for e in history["events"]]
    assert events == ["enqueued", "leased", "delivered", "leased", "deferred", "leased",
                      "bounced by the operator", "delivered"]
    (bounced,) = [e for e in history["events"] if e["event"] == "bounced by the operator"]
    assert bounced["reason"] == "550 given up"
    # verify replays the whole log into a scratch store and compares every table.
    report = verify_path(tmp_path / "store", key_file=str(key))
    assert report.clean, report.problems
    assert report.replayed


# --- a replicated cluster ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[InProcessCluster, Pki]]:
    root = tmp_path_factory.mktemp("bounce-cluster")
    pki = Pki(root / "pki")
    cluster = InProcessCluster(root / "cluster", ["a", "b", "c"], pki=pki)
    try:
        cluster.leader()
        yield cluster, pki
    finally:
        cluster.close()


def _client(cluster: InProcessCluster, pki: Pki, name: str, roles: list[str]) -> Client:
    return Client([cluster.address(i) for i in cluster.servers], timeout=20,
                  tls=pki.client_tls(pki.client(name, roles)))


def _cluster_four_states(client: Client) -> tuple[str, int]:
    mid = client.enqueue("a@example.org", RECIPIENTS, RAW, namespace="node")
    (done,) = client.lease("w1", namespace="node", domain="ok.example")
    client.ack(done.token)
    (later,) = client.lease("w1", namespace="node", domain="d.example")
    client.defer(later.token, reason="451 4.7.1 try later")
    (held,) = client.lease("w2", namespace="node", domain="l.example", lease_seconds=600)
    return mid, held.token


def test_bounce_message_through_the_client_and_on_every_replica(secure: tuple[InProcessCluster, Pki]) -> None:
    cluster, pki = secure
    with _client(cluster, pki, "ops", ["admin", "worker", "producer", "reader", "compliance"]) as client:
        mid, token = _cluster_four_states(client)
        result = client.bounce_message(mid.lower(), reason="550 5.7.1 given up")
        assert result == mqstore.BounceResult(mid, bounced=2, left_leased=1)
        m = client.get(mid)
        assert _states(m) == {"queued@q.example": "bounced", "deferred@d.example": "bounced",
                              "leased@l.example": "leased", "delivered@ok.example": "delivered"}
        assert {r.last_reason for r in m.recipients if r.state == "bounced"} == {"550 5.7.1 given up"}
        assert mid in [x.message_id for x in client.list(state="bounced", namespace="node")]
        client.bounce(token, reason="550 5.1.1 no such user")  # the worker settles what it held
        assert client.get(mid).done
        assert client.bounce_message(mid) == mqstore.BounceResult(mid, 0, 0)
        with pytest.raises(NotFound):
            client.bounce_message("0" * 26)
        # A held message, through the AsyncClient.
        held = client.enqueue("a@example.org", ["h1@h.example", "h2@h.example"], RAW, namespace="node")
        client.hold(held)
        tls = pki.client_tls(pki.client("ops-async", ["admin", "reader"]))

        async def bounce_async() -> mqstore.BounceResult:
            async with AsyncClient([cluster.address(i) for i in cluster.servers], timeout=20, tls=tls) as ac:
                return await ac.bounce_message(held)

        assert asyncio.run(bounce_async()) == mqstore.BounceResult(held, 2, 0)
        hm = client.get(held)
        assert hm.held and hm.done and {r.last_reason for r in hm.recipients} == {"bounced by the operator"}
        records = client.audit_query(where={"op": "bounce_message"})
        assert [(r["actor"], r["outcome"], r["target"]) for r in records][-3:] == [
            ("ops", "allowed", mid), ("ops", "allowed", mid), ("ops-async", "allowed", held)]
        applied = cluster.leader().node.applied_index
    # Every replica applied the same: the same recipient states, the same audit records.
    for server in cluster.servers.values():
        deadline = time.monotonic() + 20
        while server.node.applied_index < applied and time.monotonic() < deadline:
            time.sleep(0.05)
        local = QueueBase.get(server.queue, mid)  # this replica's own state (a follower's get() redirects)
        states = {r.address: (r.state, r.attempts) for r in local.recipients}
        assert states == {"queued@q.example": ("bounced", 1), "deferred@d.example": ("bounced", 2),
                          "leased@l.example": ("bounced", 1), "delivered@ok.example": ("delivered", 1)}


def test_bounce_message_on_the_node_queue_and_refused_at_the_edge(secure: tuple[InProcessCluster, Pki]) -> None:
    cluster, pki = secure
    with _client(cluster, pki, "mta", ["producer", "worker", "reader"]) as mta:
        mid = mta.enqueue("a@example.org", ["x@n.example", "y@n.example"], RAW, namespace="node")
        for roles in (["producer"], ["worker", "reader"]):
            with _client(cluster, pki, "-".join(roles), roles) as c, pytest.raises(PermissionDenied,
                                                                                     match="'delete' permission"):
                c.bounce_message(mid)
        assert {r.state for r in mta.get(mid).recipients} == {"queued"}
        (lease,) = mta.lease("w", namespace="node", domain="n.example", max_messages=1)
        mta.defer(lease.token, recipients=["y@n.example"], reason="451 later")
    # The leader's ClusterQueue proposes it through the node, as the other admin operations do.
    queue = cluster.leader().queue
    producer = Actor("mta-embedded", frozenset({"producer"}), auth="mtls", source="test")
    with pytest.raises(PermissionDenied):
        queue.bounce_message(mid, actor=producer)
    admin = Actor("ops-node", frozenset({"admin"}), auth="mtls", source="test")
    result = queue.bounce_message(mid, reason="550 operator", actor=admin)
    assert (result.message_id, result.bounced, result.left_leased) == (mid, 1, 1)
    with pytest.raises(NotFound):
        queue.bounce_message("0" * 26, actor=admin)
    with _client(cluster, pki, "auditor", ["compliance"]) as auditor:
        records = auditor.audit_query(where={"op": "bounce_message", "target": mid})
        assert [(r["actor"], r["outcome"]) for r in records] == [("mta-embedded", "denied"), ("ops-node", "allowed")]
        assert records[-1]["left_leased"] == [0] and records[-1]["ordinals"] == [1]
        # Refused at the edge: audited too (a follower reports its refusals to the leader).
        deadline = time.monotonic() + 20
        while True:
            edge = auditor.audit_query(where={"op": "Queue/BounceMessage"})
            if len(edge) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert sorted(r["actor"] for r in edge) == ["producer", "worker-reader"]
    assert all(r["outcome"] == "denied" and "'delete' permission" in r["reason"] for r in edge)
