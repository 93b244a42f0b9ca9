"""What an operator watches: the Prometheus endpoint, the gRPC health service, JSON logs with
node id, term and request id, and the refusal of new enqueues while a node cannot take them.

The first test runs ``mqstore serve`` as a real process and reads it the way Prometheus, a load
balancer's health probe and a log shipper would."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from mqstore.client import Client
from mqstore.crypto import create_key_file
from mqstore.errors import StorageFull, Unavailable
from mqstore.node.runtime import bootstrap
from mqstore.proto import queue_pb2, queue_pb2_grpc
from mqstore.security.tokens import TokenStore
from mqstore.testing.cluster import free_port
from mqstore.testing.secure import InProcessCluster

MAIL = b"Subject: operability\r\n\r\nhello\r\n"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _health(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                               timeout=2)
        except grpc.RpcError:
            return -1
        return int(reply.status)


def _wait(predicate: object, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def _scrape(port: int) -> dict[str, float]:
    """The samples of /metrics as {'name{labels}': value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, int, dict[str, str]]]:
    tokens_file = tmp_path / "tokens.json"
    store = TokenStore(tokens_file, create=True)
    tokens = {"producer": store.add("mta-1", ["producer"]), "ops": store.add("ops", ["admin", "reader", "worker"])}
    listen, metrics_port = f"127.0.0.1:{free_port()}", free_port()
    config = tmp_path / "node.toml"
    config.write_text(
        f'node_id = 1\nsite = "a"\nlisten = "{listen}"\ndata_dir = "{tmp_path / "data"}"\n'
        f'key_file = "{create_key_file(tmp_path / "kek.key")}"\ninsecure = true\nlog_json = true\n'
        f'[auth]\ntokens_file = "{tokens_file}"\n'
        f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from mqstore.config import load

        bootstrap(load(config), "ops-test")
    proc = subprocess.Popen([sys.executable, "-m", "mqstore", "serve", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield proc, listen, metrics_port, tokens
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_metrics_health_and_json_logs_of_a_running_node(
        served: tuple[subprocess.Popen[str], str, int, dict[str, str]]) -> None:
    proc, listen, metrics_port, tokens = served
    assert _wait(lambda: _health(listen) == _SERVING), "the node never reported SERVING"
    assert _health(listen, "mqstore.v1.Queue") == _SERVING
    with grpc.insecure_channel(listen) as channel:  # server reflection, as grpcurl uses it
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"mqstore.v1.Queue", "mqstore.v1.Admin", "mqstore.v1.Compliance", "grpc.health.v1.Health"} <= services

    with Client(listen, timeout=10, token=tokens["producer"]) as producer:
        producer.enqueue_many([{"mail_from": "a@example.org", "recipients": [f"r{i}@example.net", "x@example.com"],
                                "data": MAIL} for i in range(3)])
    with Client(listen, timeout=10, token=tokens["ops"]) as ops:
        (lease,) = ops.lease("w1", max_messages=1, domain="example.com")
        ops.ack(lease.token)
    # a refused call, tagged with our request id
    with grpc.insecure_channel(listen) as channel:
        with pytest.raises(grpc.RpcError) as err:
            queue_pb2_grpc.QueueStub(channel).Lease(
                queue_pb2.LeaseRequest(worker="w2", max_messages=1, lease_ms=30_000), timeout=5,
                metadata=[("authorization", f"Bearer {tokens['producer']}"), ("x-request-id", "rid-7f3a")])
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

    m = _scrape(metrics_port)
    assert m["mqstore_enqueued_messages_total"] == 3
    assert m["mqstore_leased_messages_total"] == 1
    assert m['mqstore_settled_total{outcome="ack"}'] == 1
    assert m['mqstore_queue_recipients{namespace="default",state="queued"}'] == 5
    assert m['mqstore_queue_recipients{namespace="default",state="delivered"}'] == 1
    assert m['mqstore_refused_total{reason="permission"}'] == 1
    assert m["mqstore_is_leader"] == 1 and m["mqstore_term"] >= 1 and m["mqstore_serving"] == 1
    assert m["mqstore_applied_index"] >= 4
    assert m["mqstore_disk_free_bytes"] > 0 and m["mqstore_disk_used_bytes"] > 0
    assert m["mqstore_fsync_latency_seconds_count"] >= 4
    writes = {k: v for k, v in m.items() if k.startswith("mqstore_commit_latency_seconds_count")}
    assert sum(writes.values()) >= 2, writes  # the enqueue batch and the ack (and the lease)
    assert m["mqstore_oldest_message_age_seconds"] >= 0

    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert lines, stderr
    assert all(rec["node_id"] == 1 and {"time", "level", "logger", "message", "term"} <= rec.keys() for rec in lines)
    (denied,) = [rec for rec in lines if rec["request_id"] == "rid-7f3a"]
    assert "denied" in denied["message"] and "mta-1" in denied["message"] and denied["term"] >= 1
    # Every line of the node's own is JSON, the operator's lines too (gRPC's C core writes its own).
    assert not [line for line in stderr.splitlines() if line.startswith("mqstore")], stderr
    said = [rec["message"] for rec in lines if rec["logger"] == "mqstore.serve"]
    assert any("PLAINTEXT" in m for m in said), said  # an insecure node says so
    assert any("serving on" in m for m in said) and any("shutting down" in m for m in said), said


def test_disk_nearly_full_is_not_serving_and_refuses_enqueues(tmp_path: Path) -> None:
    # a floor of 100% of the disk: this node's disk is always "nearly full"
    cluster = InProcessCluster(tmp_path, ["a"], extra={"health": {"disk_free_min_percent": 100}})
    try:
        server = cluster.leader()
        address = cluster.address(1)
        assert _wait(lambda: _health(address) == _NOT_SERVING)
        with Client(address, timeout=3) as c:
            with pytest.raises(StorageFull, match="disk nearly full"):  # an Overloaded: retry later
                c.enqueue(mail_from="a@example.org", recipients=["b@example.net"], data=MAIL)
            message = {"mail_from": "a@example.org", "recipients": ["b@example.net"], "data": MAIL}
            with pytest.raises(StorageFull, match="disk nearly full"):
                c.enqueue_many([message, message])
            with pytest.raises(StorageFull, match="disk nearly full"):
                list(c.enqueue_stream([message] * 3))
        # What a client in another language sees: RESOURCE_EXHAUSTED, with the error class named.
        with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as err:
            queue_pb2_grpc.QueueStub(channel).Enqueue(
                queue_pb2.EnqueueRequest(message=queue_pb2.NewMessage(
                    mail_from="a@example.org", recipients=["b@example.net"], data=MAIL)), timeout=5)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert ("mqstore-error", "StorageFull") in tuple(err.value.trailing_metadata() or ())
        with Client(address, timeout=3) as c:
            stats = c.stats()
            assert stats["messages"] == 0  # reads go on; nothing was written
            assert stats["disk"]["accepting_enqueues"] is False  # what an MTA checks before DATA
            assert stats["disk"]["floor_bytes"] == stats["disk"]["total_bytes"] > stats["disk"]["free_bytes"] > 0
        assert server.node.is_leader
    finally:
        cluster.close()


def test_a_node_without_a_leader_is_not_serving_and_says_so(tmp_path: Path) -> None:
    cluster = InProcessCluster(tmp_path, ["a", "b", "c"])
    try:
        cluster.leader()
        assert _wait(lambda: all(_health(cluster.address(i)) == _SERVING for i in (1, 2, 3)))
        for i in (2, 3):  # two of three voters gone: node 1 cannot have a leader
            s = cluster.servers.pop(i)
            s.grpc.stop(0).wait(5)
            s.health.stop()
            s.queue.close()
            s.node.stop(transfer_leadership=False)
        address = cluster.address(1)
        assert _wait(lambda: _health(address) == _NOT_SERVING), "node 1 still reports SERVING"
        with Client(address, timeout=2) as c, pytest.raises(Unavailable):
            c.enqueue(mail_from="a@example.org", recipients=["b@example.net"], data=MAIL)
        # Refused before anything was proposed: the node says any request may be sent again.
        with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as err:
            queue_pb2_grpc.QueueStub(channel).Enqueue(
                queue_pb2.EnqueueRequest(message=queue_pb2.NewMessage(
                    mail_from="a@example.org", recipients=["b@example.net"], data=MAIL)), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        trailers = tuple(err.value.trailing_metadata() or ())
        assert ("mqstore-error", "Unavailable") in trailers and ("mqstore-not-applied", "1") in trailers
    finally:
        cluster.close()


def test_a_metrics_address_in_use_is_named_in_the_error() -> None:
    import socket

    from mqstore.errors import InvalidArgument
    from mqstore.metrics import NodeMetrics

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        metrics = NodeMetrics(lambda: {})
        expected = rf"^metrics.listen {listen}: cannot listen there: Address already in use"
        with pytest.raises(InvalidArgument, match=expected):
            metrics.serve(listen)


def test_a_second_node_on_an_address_in_use_does_not_start(tmp_path: Path) -> None:
    """gRPC servers share a port by default (SO_REUSEPORT): a second node would answer every
    other connection from another store. It must refuse to start instead, naming the address."""
    from mqstore.testing.cluster import free_port, wait_until

    listen = f"127.0.0.1:{free_port()}"
    serve = [sys.executable, "-m", "mqstore", "serve", "--listen", listen]
    first = subprocess.Popen([*serve, "--data-dir", str(tmp_path / "a")], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        def serving() -> bool:
            try:
                with Client([listen], timeout=2) as client:
                    client.stats()
                return True
            except Exception:
                return False

        assert wait_until(serving, 60, 0.2), "the first node did not start"
        second = subprocess.run([*serve, "--data-dir", str(tmp_path / "b")], capture_output=True, text=True,
                                timeout=60)
        assert second.returncode == 2, second.stderr
        assert f"cannot listen on {listen} (listen): the address is in use" in second.stderr
    finally:
        first.terminate()
        first.wait(30)


def test_the_trial_node_and_the_embedded_demo_do_not_mix_up_a_directory(tmp_path: Path) -> None:
    """`mqstore demo` and the trial `mqstore serve` both default to ./mqstore-data: whichever
    comes second says what the directory holds and what to do, and changes nothing."""
    from mqstore.testing.cluster import free_port

    demo = subprocess.run([sys.executable, "-m", "mqstore", "demo"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert demo.returncode == 0, demo.stderr
    before = sorted(p.name for p in (tmp_path / "mqstore-data").iterdir())
    serve = subprocess.run([sys.executable, "-m", "mqstore", "serve", "--listen", f"127.0.0.1:{free_port()}"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert serve.returncode == 2, serve.stderr
    assert "mqstore: WARNING: INSECURE: this node speaks PLAINTEXT" in serve.stderr  # the trial node says so
    assert "mqstore-data is not a cluster node's data dir: it holds an embedded store" in serve.stderr
    assert "mqstore serve --data-dir DIR" in serve.stderr
    assert sorted(p.name for p in (tmp_path / "mqstore-data").iterdir()) == before
