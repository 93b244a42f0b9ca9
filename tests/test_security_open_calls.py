"""What a node lets callers without an identity do: health checks and reflection (no identity
needed) are counted in flight and limited per source address, so idle streams cannot take the
node's threads; a health Watch of a name the node does not report ends NOT_FOUND and is not
remembered; calls that fail authentication are rate limited per address (not per connection)
and for the whole node before each is audited."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from mqstore.config import EdgeLimits
from mqstore.proto import admin_pb2, admin_pb2_grpc, queue_pb2, queue_pb2_grpc
from mqstore.security import edge
from mqstore.security.certs import CertPair
from mqstore.security.tokens import TokenStore
from mqstore.testing.cluster import wait_until
from mqstore.testing.secure import InProcessCluster, Pki


class Node:
    """One TLS node with a tokens file."""

    def __init__(self, root: Path, limits: dict[str, Any] | None = None) -> None:
        self.pki = Pki(root / "pki")
        store = TokenStore(root / "tokens.json", create=True)
        self.admin = store.add("ops", ["admin", "reader"])
        extra: dict[str, Any] = {"auth": {"tokens_file": str(root / "tokens.json")}}
        if limits:
            extra["limits"] = limits
        self.cluster = InProcessCluster(root / "cluster", ["a"], pki=self.pki, extra=extra)
        self.server = self.cluster.leader()
        self.address = self.cluster.address(1)
        self.plain = self.pki.client("no-roles", [])

    def channel(self, pair: CertPair | None = None) -> grpc.Channel:
        return self.pki.channel(self.address, pair or self.plain)

    def denials(self) -> int:
        return len(self.server.queue.audit_query(where={"outcome": "denied"}))


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = Node(tmp_path_factory.mktemp("open"))
    try:
        yield n
    finally:
        n.cluster.close()


def _admin_status(n: Node) -> int:
    with n.channel() as ch:
        answer = admin_pb2_grpc.AdminStub(ch).Status(
            admin_pb2.StatusRequest(), metadata=[("authorization", "Bearer " + n.admin)], timeout=10)
    return int(answer.leader_id)


# --- health and reflection are counted in flight ------------------------------------------------------


def test_idle_reflection_streams_from_one_address_are_capped_and_other_calls_go_on(node: Node) -> None:
    """A caller without roles opening many idle reflection streams (each holds a server thread)
    gets OPEN_CALLS_PER_SOURCE_MAX of them; the rest are refused at once with RESOURCE_EXHAUSTED,
    an admin's call is served meanwhile, and a reflection call works again once they end."""
    wanted = edge.OPEN_CALLS_PER_SOURCE_MAX + 6
    channels = [node.channel(), node.channel()]  # two connections, one address
    calls: list[Any] = []
    try:
        for i in range(wanted):
            stub = reflection_pb2_grpc.ServerReflectionStub(channels[i % 2])
            requests: queue.Queue[Any] = queue.Queue()  # never fed: the stream stays open
            calls.append(stub.ServerReflectionInfo(iter(requests.get, None), timeout=60))
        wait_until(lambda: sum(c.done() for c in calls) >= wanted - edge.OPEN_CALLS_PER_SOURCE_MAX, timeout=10)
        refused = [c for c in calls if c.done()]
        assert len(refused) == wanted - edge.OPEN_CALLS_PER_SOURCE_MAX
        for c in refused:
            assert c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (c.code(), c.details())
            assert "health and reflection calls" in c.details()
        assert _admin_status(node) == 1
    finally:
        for c in calls:
            c.cancel()
        for ch in channels:
            ch.close()
    # The streams ended: their places are free again.
    wait_until(lambda: node.server.edge.open_calls.total == 0, timeout=10)
    with node.channel() as ch:
        answers = list(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
    assert any(s.name == "mqstore.v1.Queue" for s in answers[0].list_services_response.service)


def test_health_checks_still_answer(node: Node) -> None:
    with node.channel() as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "mqstore.v1.Queue"):
            wait_until(lambda service=service: stub.Check(health_pb2.HealthCheckRequest(service=service),  # type: ignore[misc]
                                                          timeout=10).status == health_pb2.HealthCheckResponse.SERVING,
                       timeout=10)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


# --- health Watch of unknown names --------------------------------------------------------------------


def test_watching_a_service_the_node_does_not_report_ends_not_found_and_is_not_kept(node: Node) -> None:
    """Each name watched used to be kept by the node for ever (memory a caller without roles
    could grow without bound); now a name other than "" and mqstore.v1.Queue is answered
    SERVICE_UNKNOWN, the call ends NOT_FOUND, and the node keeps nothing of it."""
    servicer = node.server.health.servicer
    before = set(servicer._send_response_callbacks)
    with node.channel() as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for i in range(5):
            name = f"no-such-service-{i}-" + "x" * 10_000
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=name), timeout=10)
            answers = []
            with pytest.raises(grpc.RpcError) as err:
                for answer in watch:
                    answers.append(answer.status)
            assert answers == [health_pb2.HealthCheckResponse.SERVICE_UNKNOWN]
            assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value
            assert "unknown service" in (err.value.details() or "")
            with pytest.raises(grpc.RpcError) as err:
                stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert set(servicer._send_response_callbacks) <= before | {"", "mqstore.v1.Queue"}


# --- failed authentication ----------------------------------------------------------------------------


@pytest.mark.parametrize(("peer", "key"), [
    ("ipv4:10.0.0.7:51234", "source:10.0.0.7"),
    ("ipv6:[2001:db8::1]:443", "source:2001:db8::1"),
    ("ipv6:[::1]:51234", "source:::1"),
    ("unix:/run/mqstore.sock", "source:unix"),
    ("unix-abstract:mq", "source:unix"),
    ("", "source:unknown"),
])
def test_callers_without_an_identity_are_known_by_their_address_without_the_port(peer: str, key: str) -> None:
    assert edge.source_key(peer) == key


def test_reconnecting_does_not_refill_the_rate_of_calls_that_fail_authentication(tmp_path: Path) -> None:
    """With 5 requests/s (burst 10), calls with an unknown token over fresh connections from one
    address get UNAUTHENTICATED (each audited) only within that address's rate; the rest are
    refused RESOURCE_EXHAUSTED and not audited (before, every new connection got a new burst)."""
    n = Node(tmp_path, limits={"requests_per_second": 5, "requests_burst": 10})
    try:
        before = n.denials()
        codes: dict[str, int] = {}
        for _ in range(6):
            with n.channel() as ch:
                stub = queue_pb2_grpc.QueueStub(ch)
                for _ in range(10):
                    try:
                        stub.Stats(queue_pb2.StatsRequest(), metadata=[("authorization", "Bearer mqs_not-a-token")],
                                   timeout=10)
                    except grpc.RpcError as exc:
                        codes[exc.code().name] = codes.get(exc.code().name, 0) + 1
        assert set(codes) == {"UNAUTHENTICATED", "RESOURCE_EXHAUSTED"}, codes
        assert codes["UNAUTHENTICATED"] <= 20, codes  # the burst (10) and what 5/s refills meanwhile
        wait_until(lambda: n.denials() - before >= codes["UNAUTHENTICATED"], timeout=10)
        assert n.denials() - before == codes["UNAUTHENTICATED"]
    finally:
        n.cluster.close()


class _Host:
    authenticator: Any = None
    metrics = None


class _Context:
    def __init__(self, peer: str) -> None:
        self._peer = peer

    def peer(self) -> str:
        return self._peer


def test_calls_failing_authentication_from_many_addresses_are_limited_for_the_whole_node() -> None:
    """Every address has its own bucket, and the node one more for all of them: a flood from many
    addresses is refused by rate once the node's UNAUTHENTICATED_BURST is spent."""
    interceptor = edge.EdgeInterceptor(_Host(), EdgeLimits(), client_calls_max=112, tls=True)  # type: ignore[arg-type]
    admitted = 0
    refusal = ""
    for i in range(int(edge.UNAUTHENTICATED_BURST) + 50):
        try:
            interceptor._check_unauthenticated_rate(_Context(f"ipv4:10.1.{i // 250}.{i % 250}:4000"))
            admitted += 1
        except edge._Refused as refused:
            assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            refusal = refused.message
    assert edge.UNAUTHENTICATED_BURST <= admitted < edge.UNAUTHENTICATED_BURST + 50
    assert "fail authentication" in refusal
