"""The node's edge treats a stream as it treats calls: rate turns, request ids on its log lines,
commit latency; and a large message under a small burst still goes."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import grpc

from mqstore import logs
from mqstore.client import Client
from mqstore.proto import queue_pb2, queue_pb2_grpc
from mqstore.security.tokens import TokenStore
from mqstore.testing.secure import InProcessCluster


def _msg(ns: str = "default", data: bytes = b"Subject: x\r\n\r\nhi\r\n") -> Any:
    return queue_pb2.NewMessage(mail_from="a@example.org", recipients=["b@example.net"], data=data, namespace=ns)


def test_a_message_costing_more_than_the_burst_waits_for_a_full_bucket(tmp_path: Path) -> None:
    """A request costs a turn per 64 KiB: with requests_burst = 20 (accepted), a 5 MiB message
    (81 turns; the size limit allows 50 MiB) was refused as over the rate every time, however
    long the client had been idle. Now it costs the whole burst."""
    c = InProcessCluster(tmp_path, ["a"], extra={"limits": {"requests_per_second": 20, "requests_burst": 20}})
    try:
        c.leader()
        request = queue_pb2.EnqueueRequest(message=_msg(data=b"Subject: x\r\n\r\n" + b"A" * (5 << 20)))
        with grpc.insecure_channel(c.address(1), options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
            stub = queue_pb2_grpc.QueueStub(channel)
            for _ in range(2):
                time.sleep(1.1)  # the bucket fills again
                assert stub.Enqueue(request, timeout=10).message_id
    finally:
        c.close()


def test_opening_streams_takes_turns_and_their_denials_carry_the_request_id(tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens.json"
    store = TokenStore(tokens_file, create=True)
    busy = store.add("mta-1", ["producer"])
    limited = store.add("mta-2", ["producer"], namespaces=["default"])
    records: list[dict[str, Any]] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(json.loads(self.format(record)))

    capture = Capture()
    capture.addFilter(logs.NodeContext(1))
    capture.setFormatter(logs.JsonFormatter())
    # The edge's own logger (other tests may have configured logging: levels, propagation).
    edge_log = logging.getLogger("mqstore.security.edge")
    level, disabled = edge_log.level, edge_log.disabled
    edge_log.addHandler(capture)
    edge_log.setLevel(logging.INFO)
    edge_log.disabled = False
    c = InProcessCluster(tmp_path / "c", ["a"], extra={"auth": {"tokens_file": str(tokens_file)},
                                                       "limits": {"requests_per_second": 5, "requests_burst": 5}})
    try:
        c.leader()
        with grpc.insecure_channel(c.address(1)) as channel:
            stub = queue_pb2_grpc.QueueStub(channel)
            # Opening a stream is a call: at 5 per second, about 15 in 2 s (before: ~400 a second).
            opened = 0
            started = time.monotonic()
            while time.monotonic() - started < 2.0:
                try:
                    list(stub.EnqueueStream(iter([]), timeout=5, metadata=[("authorization", f"Bearer {busy}")]))
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                opened += 1
            assert opened <= 20, opened
            # A frame the edge refuses inside a stream: its log line names the stream's request id.
            frames = iter([queue_pb2.EnqueueBatchRequest(messages=[_msg("other")])])
            try:
                list(stub.EnqueueStream(frames, timeout=10, metadata=[("authorization", f"Bearer {limited}"),
                                                                       ("x-request-id", "rid-stream")]))
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.PERMISSION_DENIED
        time.sleep(0.3)
        denied = [r["request_id"] for r in records if r["message"].startswith("denied /mqstore.v1.Queue/EnqueueStream")]
        assert denied == ["rid-stream"], denied
    finally:
        c.close()
        edge_log.removeHandler(capture)
        edge_log.setLevel(level)
        edge_log.disabled = disabled


def test_a_streams_commits_are_in_the_commit_latency_histogram(tmp_path: Path) -> None:
    c = InProcessCluster(tmp_path, ["a"])
    try:
        leader = c.leader()
        message = {"mail_from": "a@example.org", "recipients": ["b@example.net"], "data": b"Subject: x\r\n\r\nhi\r\n"}
        with Client(c.address(1), timeout=10) as client:
            assert len(list(client.enqueue_stream([message] * 300))) == 300
        assert leader.metrics is not None
        count = leader.metrics.registry.get_sample_value("mqstore_commit_latency_seconds_count",
                                                         {"operation": "EnqueueStream"})
        assert count is not None and count >= 1  # before: never observed for streams
    finally:
        c.close()
