"""A node's lease() answers with at most LEASE_ANSWER_BYTES_MAX of leases, under gRPC's message
limit. Before, it leased ``max_messages`` whatever their size: an answer over 64 MiB was never
sent (the client got ``Overloaded``) and its messages stayed leased to nobody until the lease
expired, at every call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

import mqstore
from mqstore import Client, errors
from mqstore.client import CLIENT_CHANNEL_OPTIONS
from mqstore.node import cluster_queue
from mqstore.queue import machine
from mqstore.testing.secure import InProcessCluster

BODY = 10_000
#: Room for three 10 kB single-recipient leases, not four.
THREE = 3 * machine.lease_answer_bytes(BODY, 1) + 100


def _mail(i: int, size: int = BODY) -> dict[str, Any]:
    return {"mail_from": "a@example.org", "recipients": [f"r{i}@x.example"], "data": bytes([65 + i % 26]) * size}


def test_a_node_leases_what_fits_one_answer_and_leaves_the_rest_queued_for_the_next_call(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster_queue, "_MAINTENANCE_PERIOD_S", 3600.0)  # no background maintenance
    monkeypatch.setattr(cluster_queue, "LEASE_ANSWER_BYTES_MAX", THREE)
    c = InProcessCluster(tmp_path, ["a"])
    try:
        c.leader()
        with Client([c.address(1)], timeout=30) as client:
            mids = client.enqueue_many([_mail(i) for i in range(8)])
            first = client.lease("w1")  # max_messages=100: eight are due
            assert [x.message_id for x in first] == mids[:3]  # in order, as many as fit
            assert all(x.data == _mail(i)["data"] for i, x in zip(range(3), first, strict=True))
            counts = client.stats()["recipients"]
            assert counts["leased"] == 3 and counts["queued"] == 5  # nothing is leased to nobody
            second = client.lease("w2", max_messages=100)
            assert [x.message_id for x in second] == mids[3:6]
            third = client.lease("w3", max_messages=100)
            assert [x.message_id for x in third] == mids[6:]
            assert client.lease("w4") == []
            client.ack_many([x.token for x in first + second + third])
            assert client.stats()["recipients"]["delivered"] == 8
    finally:
        c.close()


def test_a_message_larger_than_the_answer_budget_is_still_leased_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster_queue, "_MAINTENANCE_PERIOD_S", 3600.0)
    monkeypatch.setattr(cluster_queue, "LEASE_ANSWER_BYTES_MAX", THREE)
    c = InProcessCluster(tmp_path, ["a"])
    try:
        queue = c.leader().queue
        big = queue.enqueue(**_mail(0, size=5 * BODY))  # over the budget on its own
        small = queue.enqueue(**_mail(1))
        (alone,) = queue.lease(worker="w1")
        assert alone.message_id == big and len(alone.data) == 5 * BODY
        (after,) = queue.lease(worker="w1")
        assert after.message_id == small
    finally:
        c.close()


def test_the_budget_counts_every_due_recipient_of_a_message() -> None:
    """The per-recipient share is what keeps a lease of 1,000 long addresses inside the answer."""
    assert machine.lease_answer_bytes(0, 1000) - machine.lease_answer_bytes(0, 0) >= 1000 * 320
    assert machine.lease_answer_bytes(mqstore.limits.MESSAGE_BYTES_MAX, mqstore.limits.RECIPIENTS_MAX) \
        <= cluster_queue.LEASE_ANSWER_BYTES_MAX < 64 * 1024 * 1024


def test_the_embedded_store_keeps_leasing_max_messages_whatever_their_size(tmp_path: Path) -> None:
    with mqstore.open(tmp_path / "s", background=False) as store:
        for i in range(4):
            store.enqueue(**_mail(i, size=100_000))
        assert len(store.lease(worker="w1", max_messages=100)) == 4


@pytest.mark.slow
def test_genuinely_large_messages_over_grpcs_limit_are_leased_over_two_calls(tmp_path: Path) -> None:
    """Three 25 MB messages (75 MB, over gRPC's 64 MiB) with the real budget: two, then one."""
    c = InProcessCluster(tmp_path, ["a"])
    try:
        c.leader()
        with Client([c.address(1)], timeout=60) as client:
            mids = [client.enqueue(**_mail(i, size=25_000_000)) for i in range(3)]
            first = client.lease("w1")
            assert [x.message_id for x in first] == mids[:2]
            assert client.stats()["recipients"]["queued"] == 1
            (last,) = client.lease("w1")
            assert last.message_id == mids[2] and len(last.data) == 25_000_000
    finally:
        c.close()


def test_a_request_or_answer_over_grpcs_limit_is_not_reported_as_overloaded(tmp_path: Path) -> None:
    """gRPC refuses both with RESOURCE_EXHAUSTED, which the client mapped to Overloaded: a retry
    fails the same way."""
    def small(limit: str) -> Any:
        options = [(k, v) for k, v in CLIENT_CHANNEL_OPTIONS if k != limit] + [(limit, 50_000)]
        return lambda address: grpc.insecure_channel(address, options=options)

    c = InProcessCluster(tmp_path, ["a"])
    try:
        c.leader()
        with (Client([c.address(1)], timeout=10, channel_factory=small("grpc.max_send_message_length")) as client,
              pytest.raises(errors.InvalidArgument, match=r"request is \d+ bytes, over the 50000-byte gRPC")):
            client.enqueue(**_mail(0, size=60_000))  # nothing was sent
        with Client([c.address(1)], timeout=10) as client:
            client.enqueue(**_mail(1, size=60_000))
        with Client([c.address(1)], timeout=10, channel_factory=small("grpc.max_receive_message_length")) as client:
            with pytest.raises(errors.MQStoreError, match=r"answer is \d+ bytes, over the 50000-byte gRPC") as raised:
                client.lease("w1")
            assert not isinstance(raised.value, errors.Overloaded)
    finally:
        c.close()
