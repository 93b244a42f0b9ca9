"""A node's lease() after downtime: the backlog of lapsed leases and lifetimes is written before
it plans, in records of a page each and up to four pages, as the embedded store does."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mqstore.node import cluster_queue
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
        queue.lease(worker="w2", max_messages=9)
        states = [queue.get(mid).recipients[0] for mid in mids]
        lapsed = [r for r in states if r.state != "leased"]
        assert len(lapsed) == 8 and all(r.attempts == 1 for r in lapsed)  # it was one page (2) before
        again = queue.lease(worker="w2", max_messages=9)  # the last expiry, and the eight now due
        assert len(again) == 8
        (last,) = [queue.get(mid).recipients[0] for mid in mids if mid not in {x.message_id for x in again}]
        assert last.state != "leased" and last.attempts == 1
    finally:
        c.close()
