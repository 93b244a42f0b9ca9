"""A node's lease() after downtime: the backlog of lapsed leases and lifetimes is written before
it plans, in records of a page each and up to four pages, as the embedded store does."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from mqstore.node import cluster_queue
from mqstore.testing.cluster import state_digest
from mqstore.testing.secure import InProcessCluster

MAIL = {"mail_from": "a@example.org", "data": b"Subject: s\r\n\r\nx\r\n"}


def test_lease_writes_several_pages_of_lapsed_leases_before_it_plans(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster_queue, "_MAINTENANCE_PERIOD_S", 3600.0)  # no background maintenance
    monkeypatch.setattr(cluster_queue, "_MAINTENANCE_ITEMS_MAX", 2)  # pages of 2 instead of 1,000
    offset = [0.0]
    c = InProcessCluster(tmp_path, ["a"], node_options={1: {"clock": lambda: time.time() + offset[0]}})
    try:
        queue = c.leader().queue
        mids = [queue.enqueue(recipients=[f"r{i}@x.example"], **MAIL) for i in range(9)]
        assert len(queue.lease(worker="w1", max_messages=9, lease_seconds=60)) == 9
        offset[0] = 120.0  # every lease lapsed: nine expiries to write, four pages of two at most
        first = queue.lease(worker="w2", max_messages=9)
        # the eight expired are due again and granted in the same call, as the embedded store does
        # (it was one page (2) expired before, and none granted until the next call)
        assert len(first) == 8 and all(x.attempts == 1 for x in first)
        (last,) = [queue.get(mid).recipients[0] for mid in mids if mid not in {x.message_id for x in first}]
        assert last.state != "leased" and last.attempts == 1  # its expiry was written too
        again = queue.lease(worker="w2", max_messages=9)
        assert [x.attempts for x in again] == [1]
    finally:
        c.close()


def test_a_lapsed_lease_is_granted_again_by_the_next_lease_as_in_the_embedded_store(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster_queue, "_MAINTENANCE_PERIOD_S", 3600.0)  # no background maintenance
    c = InProcessCluster(tmp_path, ["a", "b", "c"])
    try:
        queue = c.leader().queue
        mid = queue.enqueue(recipients=["r@x.example"], **MAIL)
        (first,) = queue.lease(worker="w1", lease_seconds=0.5)
        time.sleep(0.7)
        (again,) = queue.lease(worker="w2", lease_seconds=60)  # was []: granted only by the call after
        assert again.message_id == mid and again.attempts == 1 and again.token != first.token
        assert queue.get(mid).recipients[0].state == "leased"
    finally:
        c.close()


def test_data_given_as_a_memoryview_of_wide_items_counts_its_bytes_everywhere(tmp_path: Path) -> None:
    """A memoryview's len() counts items: the leader (and the embedded store) recorded 8 for a
    32-byte body of 4-byte items, followers 32, so the replicas' stats differed."""
    from array import array

    import mqstore

    body = memoryview(array("I", range(8)))
    assert body.nbytes == 32 and len(body) == 8
    with mqstore.open(tmp_path / "embedded", background=False) as store:
        mid = store.enqueue(mail_from="a@example.org", recipients=["r@x.example"], data=body)
        assert store.get(mid).size == 32 and store.stats()["bytes"] == 32
    c = InProcessCluster(tmp_path / "cluster", ["a", "b", "c"])
    try:
        lead = c.leader()
        mid = lead.queue.enqueue(mail_from="a@example.org", recipients=["r@x.example"], data=body)
        assert lead.queue.get(mid).size == 32 and lead.queue.stats()["bytes"] == 32
        applied = lead.node.applied_index
        for s in c.servers.values():
            deadline = time.monotonic() + 10
            while s.node.applied_index < applied and time.monotonic() < deadline:
                time.sleep(0.02)
        c.close()
        digests = {i: state_digest(cfg.data_dir, cfg.key_file) for i, cfg in c.configs.items()}
        assert len(set(digests.values())) == 1, digests  # the same state on every replica
    finally:
        c.close()


def test_a_message_with_a_lapsed_lease_and_other_due_recipients_gets_one_lease_as_embedded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One recipient's lease lapsed, another recipient is due: the next lease() grants one lease
    covering both, on a cluster as in the embedded store (this stop's first second-round fix
    granted two leases for the message in one call)."""
    import mqstore

    monkeypatch.setattr(cluster_queue, "_MAINTENANCE_PERIOD_S", 3600.0)  # no background maintenance

    def scenario(queue: Any) -> list[tuple[str, tuple[str, ...], int]]:
        mid = queue.enqueue(recipients=["r1@a.example", "r2@b.example"], **MAIL)
        (first,) = queue.lease(worker="w1", domain="a.example", lease_seconds=0.5)
        assert first.recipients == ("r1@a.example",)
        time.sleep(0.7)
        return [(x.message_id == mid, tuple(sorted(x.recipients)), x.attempts)
                for x in queue.lease(worker="w2", max_messages=10, lease_seconds=60)]

    with mqstore.open(tmp_path / "embedded", background=False) as store:
        embedded = scenario(store)
    c = InProcessCluster(tmp_path / "cluster", ["a", "b", "c"])
    try:
        cluster = scenario(c.leader().queue)
    finally:
        c.close()
    assert embedded == [(True, ("r1@a.example", "r2@b.example"), 1)]
    assert cluster == embedded
