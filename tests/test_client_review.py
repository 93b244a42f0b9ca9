"""Client and Queue service fixes from a review, as a user sees them:

- ``enqueue_stream`` with a message only the store refuses (sync and asyncio): the messages
  before it are stored and their ids yielded, then InvalidArgument names its position in the
  caller's iterable (the node used to refuse its whole batch, naming the position in the batch);
- a namespace-limited identity calling a follower that has not applied the target yet is sent
  to the leader (NotLeader naming it), not refused with PermissionDenied (nor audited);
- closing the client stops an open stream's feeder (thread or task);
- ``enqueue_stream`` returns within its ``timeout`` when every message is answered and the node
  never ends the stream.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from mqstore.client import AsyncClient, Client
from mqstore.errors import InvalidArgument, PermissionDenied, StoreClosed
from mqstore.ids import format_id
from mqstore.proto import queue_pb2, queue_pb2_grpc
from mqstore.security.tokens import TokenStore
from mqstore.testing.cluster import free_port, wait_until
from mqstore.testing.secure import InProcessCluster, Pki

KINDS = ["sync", "async"]


def _msg(ns: str, i: int) -> dict[str, Any]:
    return {"mail_from": "a@example.org", "recipients": [f"r{i}@example.net"], "data": b"x", "namespace": ns}


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    cluster = InProcessCluster(tmp_path_factory.mktemp("client-review") / "c", ["a"])
    try:
        cluster.leader()
        yield cluster.address(1)
    finally:
        cluster.close()


def _stream(kind: str, address: str, messages: list[dict[str, Any]], ns: str) -> tuple[list[str], Any, int]:
    """Ids yielded, the error raised (None) and the messages stored in ``ns``."""
    if kind == "sync":
        got: list[str] = []
        error: Any = None
        with Client([address], timeout=10) as client:
            try:
                for mid in client.enqueue_stream(messages):
                    got.append(mid)
            except InvalidArgument as exc:
                error = exc
            return got, error, len(client.list(namespace=ns))

    async def main() -> tuple[list[str], Any, int]:
        got: list[str] = []
        error: Any = None
        async with AsyncClient([address], timeout=10) as client:
            try:
                async for mid in client.enqueue_stream(messages):
                    got.append(mid)
            except InvalidArgument as exc:
                error = exc
            return got, error, len(await client.list(namespace=ns))

    return asyncio.run(main())


# --- 1. a bad message in a stream ------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_stream_stores_the_messages_before_one_the_store_refuses(kind: str, address: str) -> None:
    """300 messages; the 201st would expire before its first attempt (a check only the store
    makes). The 200 before it are stored and yielded; the error names messages[200]."""
    ns = f"expiry-{kind}"
    messages = [_msg(ns, i) for i in range(300)]
    messages[200].update(not_before=time.time() + 100, expires_in=10)
    got, error, stored = _stream(kind, address, messages, ns)
    assert (len(got), stored) == (200, 200)
    assert error is not None and str(error).startswith("messages[200].not_before"), error


@pytest.mark.parametrize("kind", KINDS)
def test_stream_refusal_that_names_no_message_is_placed_too(kind: str, address: str) -> None:
    """A recipient only the store checks (its error names the recipient, not the message): the
    messages before the bad one are stored and yielded, and the error is placed in the stream."""
    ns = f"rcpt-{kind}"
    messages = [_msg(ns, i) for i in range(300)]
    messages[150]["recipients"] = ["not an address"]
    got, error, stored = _stream(kind, address, messages, ns)
    assert (len(got), stored) == (150, 150)
    assert error is not None and str(error).startswith("messages[150]: recipients[0]"), error


def test_stream_position_counts_the_messages_answered_before_a_retry() -> None:
    """A node counts from the start of its attempt; a retried attempt resent the unanswered
    messages in order, so the caller's position adds the messages answered before it."""
    from mqstore.client import _stream_position

    error = InvalidArgument("messages[3].not_before (1.000) is at or after the message's expiry")
    error.request_id = "abc"
    moved = _stream_position(error, 200)
    assert isinstance(moved, InvalidArgument)
    assert str(moved) == "messages[203].not_before (1.000) is at or after the message's expiry"
    assert moved.request_id == "abc"
    assert _stream_position(error, 0) is error


# --- 2. a lagging follower and a namespace-limited identity --------------------------------------


def test_lagging_follower_sends_a_namespace_limited_identity_to_the_leader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that knows only a follower, which has not applied the message or lease yet:
    get, hold and ack reach the leader (the follower's NotLeader names it) at once, rather than
    PermissionDenied or waiting for the follower to catch up; the follower audits no denial."""
    pki = Pki(tmp_path / "pki")
    tokens = TokenStore(tmp_path / "tokens.json", create=True)
    token = tokens.add("alpha-app", ["producer", "worker", "reader", "admin"], ["alpha"])
    ops = tokens.add("ops", ["producer", "admin"])
    cluster = InProcessCluster(tmp_path / "cl", ["a", "b", "c"], pki=pki,
                               extra={"auth": {"tokens_file": str(tmp_path / "tokens.json")}})
    try:
        leader = cluster.leader()
        lid = leader.node.node_id
        fid = next(i for i in cluster.servers if i != lid)
        follower = cluster.servers[fid]
        tls = pki.client_tls(pki.client("no-roles", []))
        with Client([cluster.address(lid)], timeout=5, tls=tls, token=token) as c:
            c.enqueue("a@example.org", ["b@example.net"], b"x", namespace="alpha")  # warm up
        with Client([cluster.address(lid)], timeout=5, tls=tls, token=ops) as c:
            other = c.enqueue("a@example.org", ["b@example.net"], b"x", namespace="beta")
        assert wait_until(lambda: follower.node.applied_index >= leader.node.applied_index, 5)
        denials: list[str] = []
        monkeypatch.setattr(follower, "audit_denial", lambda actor, rpc, reason: denials.append(rpc))
        lag_s = 3.0
        threading.Thread(target=lambda: follower.node.call(lambda: time.sleep(lag_s), timeout=10),
                         daemon=True).start()
        lag_started = time.monotonic()
        time.sleep(0.2)
        with Client([cluster.address(lid)], timeout=5, tls=tls, token=token) as c:
            c.enqueue("a@example.org", ["b@example.net"], b"x", namespace="alpha")
            (lease,) = c.lease("w1", max_messages=1, namespace="alpha")
            mid = c.enqueue("a@example.org", ["c@example.net"], b"y", namespace="alpha")
        with Client([cluster.address(fid)], timeout=5, tls=tls, token=token) as c:
            assert c.get(mid).message_id == mid
            c.hold(mid)
            c.ack(lease.token)
            assert time.monotonic() - lag_started < lag_s - 0.5  # redirected, not waiting out the lag
            assert c.leader == cluster.address(lid)
        assert denials == []
        # The follower tells nothing of the ids it holds: a message of another namespace it has
        # applied gets the same NotLeader as an id that does not exist (the leader refuses both).
        missing = format_id(bytes(16))
        channel = pki.channel(cluster.address(fid), pki.client("no-roles-2", []))
        try:
            answers = []
            for mid in (other, missing):
                try:
                    queue_pb2_grpc.QueueStub(channel).Get(queue_pb2.GetRequest(message_id=mid), timeout=5,
                                                          metadata=[("authorization", f"Bearer {token}")])
                except grpc.RpcError as exc:
                    trailers = dict(exc.trailing_metadata() or ())
                    answers.append((exc.code(), trailers.get("mqstore-error"), trailers.get("mqstore-leader")))
            assert answers == [(grpc.StatusCode.FAILED_PRECONDITION, "NotLeader", cluster.address(lid))] * 2
        finally:
            channel.close()
        with Client([cluster.address(fid)], timeout=5, tls=tls, token=token) as c:
            for mid in (other, missing):
                with pytest.raises(PermissionDenied, match="was not found, or is not in the namespaces"):
                    c.get(mid)
        assert denials == []
    finally:
        cluster.close()


# --- 3. close() stops an open stream's feeder --------------------------------------------------------


def test_close_stops_an_open_streams_feeder_thread(address: str) -> None:
    pulled = itertools.count()

    def source() -> Iterator[dict[str, Any]]:
        for i in itertools.count():
            next(pulled)
            yield _msg("close-sync", i)

    before = set(threading.enumerate())
    client = Client([address], timeout=5)
    it = client.enqueue_stream(source())
    next(it)
    feeders = [t for t in threading.enumerate() if t not in before and t.name == "mqstore-client-feeder"]
    assert len(feeders) == 1
    client.close()
    feeders[0].join(2)
    assert not feeders[0].is_alive()
    count = next(pulled)
    time.sleep(0.3)
    assert next(pulled) == count + 1  # nothing more taken from the caller's iterable
    with pytest.raises(StoreClosed):
        for _ in it:
            pass


def test_close_stops_an_open_streams_feeder_task(address: str) -> None:
    async def main() -> None:
        pulled = itertools.count()

        async def source() -> AsyncIterator[dict[str, Any]]:
            for i in itertools.count():
                next(pulled)
                yield _msg("close-async", i)
                await asyncio.sleep(0)

        def feeders() -> list[asyncio.Task[Any]]:
            return [t for t in asyncio.all_tasks() if not t.done() and t.get_coro().__qualname__ == "AsyncClient._feed"]

        client = AsyncClient([address], timeout=5)
        it = client.enqueue_stream(source())
        await it.__anext__()
        assert len(feeders()) == 1
        await client.close()
        await asyncio.sleep(0.3)
        assert feeders() == []
        count = next(pulled)
        await asyncio.sleep(0.3)
        assert next(pulled) == count + 1
        with pytest.raises(StoreClosed):
            async for _ in it:
                pass

    asyncio.run(main())


# --- 4. a node that never ends the stream ---------------------------------------------------------


class _Hung(queue_pb2_grpc.QueueServicer):  # type: ignore[misc]
    """Answers every frame, then does not end the stream (until ``release``)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def EnqueueStream(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        n = 0
        for request in request_iterator:
            ids = [f"01M997H{n + i:019d}"[:26] for i in range(len(request.messages))]
            n += len(ids)
            yield queue_pb2.EnqueueBatchResponse(message_ids=ids)
        self.release.wait(60)


@pytest.fixture()
def hung() -> Iterator[str]:
    servicer = _Hung()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    queue_pb2_grpc.add_QueueServicer_to_server(servicer, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        servicer.release.set()
        server.stop(0).wait(5)


@pytest.mark.parametrize("kind", KINDS)
def test_stream_returns_within_timeout_when_the_node_never_ends_it(kind: str, hung: str) -> None:
    """timeout=2; every message is answered, then the node hangs: the ids come back (well
    within the 60 s the node would hang)."""
    messages = [_msg("default", i) for i in range(3)]
    started = time.monotonic()
    if kind == "sync":
        result: dict[str, Any] = {}

        def run() -> None:
            with Client([hung], timeout=2) as c:
                result["ids"] = list(c.enqueue_stream(messages))

        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive()
        ids = result["ids"]
    else:
        async def main() -> list[str]:
            async with AsyncClient([hung], timeout=2) as c:
                return [mid async for mid in c.enqueue_stream(messages)]

        ids = asyncio.run(asyncio.wait_for(main(), 10))
    assert len(ids) == 3
    assert time.monotonic() - started < 5


# --- the edge's per-message checks in a stream ------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_stream_message_the_edge_refuses_ends_the_stream_after_those_before_it(kind: str, tmp_path: Path) -> None:
    """The node's edge checks each frame of up to 128 messages before any of it is stored: a
    message over the size limit, or in a namespace the identity may not enqueue to, refused the
    whole frame (its messages before the bad one unstored too) and the error named its position
    in the frame. Now the messages before it are stored and yielded, and the error names its
    position in the caller's messages."""
    tokens = TokenStore(tmp_path / "tokens.json", create=True)
    limited = tokens.add("alpha-app", ["producer"], ["alpha"])
    ops = tokens.add("ops", ["reader"])
    cluster = InProcessCluster(tmp_path / "c", ["a"], extra={
        "auth": {"tokens_file": str(tmp_path / "tokens.json")}, "limits": {"message_bytes_max": 4096}})
    try:
        cluster.leader()
        address = cluster.address(1)
        cases: list[tuple[list[dict[str, Any]], int, type[Exception], str]] = []
        big = [_msg("alpha", i) for i in range(300)]
        big[200]["data"] = b"x" * 5000
        cases.append((big, 200, InvalidArgument, "messages[200] is 5000 bytes, over this node's limit"))
        foreign = [_msg("alpha", i) for i in range(300)]
        foreign[150]["namespace"] = "beta"
        cases.append((foreign, 150, PermissionDenied, "messages[150]: "))
        stored_before = 0
        for messages, bad, error_class, said in cases:
            got: list[str] = []
            error: Exception | None = None
            if kind == "sync":
                with Client([address], timeout=10, token=limited) as client:
                    try:
                        got.extend(client.enqueue_stream(messages))
                    except (InvalidArgument, PermissionDenied) as exc:
                        error = exc
            else:
                async def main(messages: list[dict[str, Any]], got: list[str]) -> Exception | None:
                    async with AsyncClient([address], timeout=10, token=limited) as client:
                        try:
                            async for mid in client.enqueue_stream(messages):
                                got.append(mid)
                        except (InvalidArgument, PermissionDenied) as exc:
                            return exc
                    return None

                error = asyncio.run(main(messages, got))
            assert isinstance(error, error_class) and str(error).startswith(said), error
            assert len(got) == bad
            with Client([address], timeout=10, token=ops) as client:
                stored = len(client.list(namespace="alpha", limit=1000))
            assert stored - stored_before == bad
            stored_before = stored
    finally:
        cluster.close()
