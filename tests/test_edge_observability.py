"""What a node's edge tells its operators and clients about the calls it serves: the enqueue
counter counts messages stored, not answers; a failed stream is counted like a failed call; a
follower's own disk does not turn a client away from a leader with room; and every call gets its
request id back."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from mqstore import server
from mqstore.client import Client
from mqstore.errors import NotFound, Unavailable
from mqstore.proto import queue_pb2, queue_pb2_grpc
from mqstore.testing.secure import InProcessCluster

MAIL = b"From: a@example.org\r\nSubject: hi\r\n\r\nbody\r\n"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessCluster]:
    c = InProcessCluster(tmp_path_factory.mktemp("edge"), ["a", "b", "c"])
    try:
        c.leader()
        yield c
    finally:
        c.close()


def _follower(cluster: InProcessCluster) -> Any:
    leader = cluster.leader()
    return next(s for s in cluster.servers.values() if s is not leader)


def _sample(server: Any, name: str, labels: dict[str, str] | None = None) -> float:
    value = server.metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else float(value)


def test_enqueues_an_idempotency_key_answered_with_an_earlier_message_are_not_counted(
        cluster: InProcessCluster) -> None:
    leader = cluster.leader()
    before = _sample(leader, "mqstore_enqueued_messages_total")
    message = {"mail_from": "a@example.org", "recipients": ["b@example.net"], "data": MAIL,
               "idempotency_key": "counted-once"}
    with Client(cluster.address(leader.node.node_id), timeout=10) as c:
        ids = {c.enqueue(**message) for _ in range(3)}  # type: ignore[arg-type]
        ids |= set(c.enqueue_many([message, message]))
        ids |= set(c.enqueue_stream([message] * 3))
        fresh = c.enqueue_many([{**message, "idempotency_key": "new-1"}, {**message, "idempotency_key": "new-2"}])
    assert len(ids) == 1
    assert _sample(leader, "mqstore_enqueued_messages_total") - before == 1 + len(fresh)


def test_a_stream_the_servicer_refuses_is_counted_as_a_failed_call(cluster: InProcessCluster) -> None:
    follower = _follower(cluster)
    labels = {"method": "EnqueueStream", "code": "FAILED_PRECONDITION"}
    before = _sample(follower, "mqstore_requests_total", labels)
    before_errors = _sample(follower, "mqstore_errors_total", {"kind": "NotLeader"})
    frame = queue_pb2.EnqueueBatchRequest(messages=[queue_pb2.NewMessage(
        mail_from="a@example.org", recipients=["b@example.net"], data=MAIL)])
    with grpc.insecure_channel(cluster.address(follower.node.node_id)) as channel:
        stream = queue_pb2_grpc.QueueStub(channel).EnqueueStream(iter([frame]), timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            list(stream)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert _sample(follower, "mqstore_requests_total", labels) == before + 1
    assert _sample(follower, "mqstore_errors_total", {"kind": "NotLeader"}) == before_errors + 1


def test_a_follower_with_a_nearly_full_disk_sends_the_client_on_to_the_leader(cluster: InProcessCluster) -> None:
    leader, follower = cluster.leader(), _follower(cluster)
    floor = follower.health.disk.min_bytes
    follower.health.disk.min_bytes = 1 << 62  # its disk is "nearly full"; the leader's has room
    try:
        follower.health.update()
        assert not follower.health.serving
        with Client([cluster.address(follower.node.node_id), cluster.address(leader.node.node_id)],
                    timeout=10) as c:
            mid = c.enqueue(mail_from="a@example.org", recipients=["b@example.net"], data=MAIL)
            assert c.get(mid).recipients[0].state == "queued"
        # Asked directly, the follower names the leader rather than its own disk.
        request = queue_pb2.EnqueueRequest(message=queue_pb2.NewMessage(
            mail_from="a@example.org", recipients=["b@example.net"], data=MAIL))
        with grpc.insecure_channel(cluster.address(follower.node.node_id)) as channel, \
                pytest.raises(grpc.RpcError) as err:
            queue_pb2_grpc.QueueStub(channel).Enqueue(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert ("mqstore-error", "NotLeader") in tuple(err.value.trailing_metadata() or ())
    finally:
        follower.health.disk.min_bytes = floor
        follower.health.update()


@pytest.mark.parametrize("sent", [None, "req-42"])
def test_every_call_gets_its_request_id_back(cluster: InProcessCluster, sent: str | None) -> None:
    leader, follower = cluster.leader(), _follower(cluster)
    metadata = () if sent is None else (("x-request-id", sent),)
    with grpc.insecure_channel(cluster.address(leader.node.node_id)) as channel:
        _, call = queue_pb2_grpc.QueueStub(channel).Stats.with_call(
            queue_pb2.StatsRequest(), metadata=metadata, timeout=10)
        answered = dict(call.trailing_metadata())
    # A refused call brings it back too, beside the error's own trailers.
    request = queue_pb2.EnqueueRequest(message=queue_pb2.NewMessage(
        mail_from="a@example.org", recipients=["b@example.net"], data=MAIL))
    with grpc.insecure_channel(cluster.address(follower.node.node_id)) as channel, \
            pytest.raises(grpc.RpcError) as err:
        queue_pb2_grpc.QueueStub(channel).Enqueue(request, metadata=metadata, timeout=10)
    refused = dict(err.value.trailing_metadata() or ())
    assert refused["mqstore-error"] == "NotLeader"
    for trailers in (answered, refused):
        if sent is None:
            assert len(trailers["x-request-id"]) == 16  # one the node made up for its log lines
        else:
            assert trailers["x-request-id"] == sent
    if sent is None:
        assert answered["x-request-id"] != refused["x-request-id"]


def test_a_client_error_names_the_request_id_of_the_failed_call(cluster: InProcessCluster) -> None:
    leader = cluster.leader()
    seen = []
    with Client(cluster.address(leader.node.node_id), timeout=10) as c:
        for _ in range(2):
            with pytest.raises(NotFound) as err:
                c.get("0" * 26)
            seen.append(err.value.request_id)
    assert all(isinstance(rid, str) and len(rid) == 16 for rid in seen)  # the ids the node logged the calls under
    assert seen[0] != seen[1]


class _Context:
    def __init__(self) -> None:
        self.trailers: tuple[tuple[str, str], ...] = ()

    def set_trailing_metadata(self, trailers: tuple[tuple[str, str], ...]) -> None:
        self.trailers = trailers

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.trailers

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise RuntimeError(code, details)


@pytest.mark.parametrize(("error", "said"), [
    (Unavailable("node 1 is shutting down", not_applied=True), True),
    (Unavailable("no quorum confirmed the write; it may still commit"), False),
])
def test_a_servicer_says_when_a_refused_request_did_nothing(error: Unavailable, said: bool) -> None:
    context = _Context()
    with pytest.raises(RuntimeError):
        server._abort(context, error)  # type: ignore[arg-type]
    assert ("mqstore-error", "Unavailable") in context.trailers
    assert (("mqstore-not-applied", "1") in context.trailers) is said
