"""The edge of a TLS node for the calls that are not unary: Admin.Verify and Admin.Backup (answered
with a stream) are rate limited, counted in flight and capped per node like every client call,
and a request that does not parse is INVALID_ARGUMENT; an open EnqueueStream ends when its token
is revoked."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from mqstore.client import Client
from mqstore.errors import Overloaded, PermissionDenied, Unauthenticated
from mqstore.ops import remote
from mqstore.proto import admin_pb2
from mqstore.security import edge
from mqstore.security.tokens import TokenStore
from mqstore.testing.cluster import wait_until
from mqstore.testing.secure import InProcessCluster, Pki, status_of

MAIL = b"From: a@example.org\r\nSubject: hi\r\n\r\nhello\r\n"


def _msg(ns: str, i: int = 0) -> dict[str, Any]:
    return {"mail_from": "a@example.org", "recipients": [f"r{i}@example.net"], "data": MAIL, "namespace": ns}


class Node:
    """One TLS node with a tokens file (``limits``: its ``[limits]`` table)."""

    def __init__(self, root: Path, limits: dict[str, Any] | None = None) -> None:
        self.pki = Pki(root / "pki")
        self.store = TokenStore(root / "tokens.json", create=True)
        self.tokens = {"admin": self.store.add("ops", ["admin", "reader"])}
        extra: dict[str, Any] = {"auth": {"tokens_file": str(root / "tokens.json")}}
        if limits:
            extra["limits"] = limits
        self.cluster = InProcessCluster(root / "cluster", ["a"], pki=self.pki, extra=extra)
        self.server = self.cluster.leader()
        self.address = self.cluster.address(1)
        self.plain = self.pki.client("no-roles", [])

    def client(self, token: str, timeout: float = 10.0) -> Client:
        return Client(self.address, timeout=timeout, tls=self.pki.client_tls(self.plain), token=self.tokens[token])

    def admin_stub(self, c: Client) -> Any:
        return remote.stub(c, self.address)

    def in_flight(self) -> int:
        """Client calls being served, as the node's metrics report them."""
        return int(self.server._metrics_state()["client_calls_in_flight"])

    def denials(self) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = self.server.queue.audit_query(where={"outcome": "denied"})
        return records


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = Node(tmp_path_factory.mktemp("edge"))
    try:
        yield n
    finally:
        n.cluster.close()


# --- Verify and Backup -----------------------------------------------------------------------------


def test_verify_is_rate_limited_like_other_calls(tmp_path: Path) -> None:
    """With 2 requests/s, a burst of Verify calls (each a full copy and check of the store) gets
    RESOURCE_EXHAUSTED for all but the few within the rate, as Stats calls do."""
    n = Node(tmp_path, limits={"requests_per_second": 2, "requests_burst": 2})
    try:
        with n.client("admin", timeout=30) as c:
            stub = n.admin_stub(c)

            def verify(_: int) -> tuple[str, str]:
                return status_of(lambda: list(stub.Verify(admin_pb2.VerifyRequest(), timeout=60)))

            with ThreadPoolExecutor(16) as pool:
                results = list(pool.map(verify, range(16)))
        codes = [code for code, _ in results]
        assert 1 <= codes.count("OK") <= 6, results
        assert any(code == "RESOURCE_EXHAUSTED" and "over its rate of 2 requests/s" in details
                   for code, details in results), results
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, results
    finally:
        n.cluster.close()


def test_verify_and_backup_are_counted_in_flight_and_capped(node: Node) -> None:
    """Backups being served count as client calls in flight (metrics, graceful stop), and a node
    copies its whole store for at most STORE_COPIES_MAX calls at once: more are refused with a
    RESOURCE_EXHAUSTED that says why, and served again once those end."""
    assert edge.STORE_COPIES_MAX == 2
    results: list[tuple[str, str]] = []
    with node.client("admin", timeout=30) as c:
        stub = node.admin_stub(c)
        # Backups that wait (for an index this node never reaches) hold their place meanwhile.
        waiting = admin_pb2.BackupRequest(min_applied_index=10**12, wait_ms=3000)

        def backup() -> None:
            results.append(status_of(lambda: list(stub.Backup(waiting, timeout=20))))

        threads = [threading.Thread(target=backup) for _ in range(edge.STORE_COPIES_MAX)]
        for t in threads:
            t.start()
        try:
            assert wait_until(lambda: node.in_flight() == edge.STORE_COPIES_MAX, timeout=5), node.in_flight()
            code, details = status_of(lambda: list(stub.Backup(waiting, timeout=20)))
            assert code == "RESOURCE_EXHAUSTED" and "copy the whole store (Verify, Backup)" in details
            with pytest.raises(Overloaded, match="copy the whole store"):
                remote.verify(c, node.address)
            assert node.in_flight() == edge.STORE_COPIES_MAX  # the refused calls were not counted
        finally:
            for t in threads:
                t.join(30)
        assert [code for code, _ in results] == ["UNAVAILABLE"] * edge.STORE_COPIES_MAX  # waited, then gave up
        assert wait_until(lambda: node.in_flight() == 0, timeout=5)
        assert remote.verify(c, node.address)["clean"]  # served again


@pytest.mark.parametrize("rpc", ["Verify", "Backup"])
def test_a_request_that_does_not_parse_is_invalid_argument(node: Node, rpc: str) -> None:
    """As for the unary calls: INVALID_ARGUMENT naming the call, not gRPC's INTERNAL
    ("Exception deserializing request!")."""
    with node.client("admin") as c:
        channel = c._get_stubs(node.address).channel
        code, details = status_of(lambda: list(channel.unary_stream(f"/mqstore.v1.Admin/{rpc}")(b"\xff\xff\xff",
                                                                                           timeout=5)))
    assert (code, details.split(":")[0]) == ("INVALID_ARGUMENT", f"the request is not a valid {rpc} request")


# --- revoked tokens ------------------------------------------------------------------------------------


def test_a_revoked_token_ends_the_stream_it_opened(node: Node) -> None:
    """`mqstore tokens remove` stops an MTA's long-lived EnqueueStream too: once nodes read the
    tokens file, the stream's next frame (after at most STREAM_REAUTHENTICATE_S) ends it with
    UNAUTHENTICATED, audited; nothing sent after the revocation is stored."""
    ns = "revoked"
    token = node.store.add("mta-stream", ["producer"])
    c = Client(node.address, timeout=10, tls=node.pki.client_tls(node.plain), token=token)
    assert wait_until(lambda: _accepted(c), timeout=5)  # nodes read the tokens file within a second
    before = 2
    seen = len(node.denials())

    def messages() -> Iterator[dict[str, Any]]:
        for i in range(before):
            yield _msg(ns, i)
        time.sleep(0.5)
        node.store.remove("mta-stream")
        assert wait_until(lambda: not _accepted(c), timeout=5)  # revoked: refused on new calls
        time.sleep(edge.STREAM_REAUTHENTICATE_S + 0.2)
        for i in range(before, before + 5):
            yield _msg(ns, i)
            time.sleep(0.1)

    ids: list[str] = []
    try:
        with pytest.raises(Unauthenticated, match="unknown or revoked token"):
            for mid in c.enqueue_stream(messages()):
                ids.append(mid)
    finally:
        c.close()
    assert len(ids) == before
    with node.client("admin") as admin:
        assert [m.message_id for m in admin.list(namespace=ns)] == sorted(ids)  # none stored after
    denied = [r for r in node.denials()[seen:] if r["op"] == "Queue/EnqueueStream"]
    assert denied and denied[0]["actor"] == "unauthenticated" and "revoked" in denied[0]["reason"]


def _accepted(c: Client) -> bool:
    """Whether the node takes ``c``'s token (a producer's: authenticated, then refused Stats)."""
    try:
        c.stats()
    except Unauthenticated:
        return False
    except PermissionDenied:
        return True
    raise AssertionError("a producer's token was allowed Stats")
