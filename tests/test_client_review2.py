"""Client fixes from a second review, as a user sees them:

- closing the blocking client while another thread is between taking a channel and starting its
  RPC raised gRPC's raw ``ValueError`` ("Cannot invoke RPC on closed channel!"), for reads,
  non-idempotent writes and ``enqueue_stream`` alike: now ``StoreClosed``;
- an ``AsyncClient`` used from a second event loop failed with a raw ``RuntimeError`` and stayed
  broken: now a closed first loop hands the client to the next one (``asyncio.run`` twice works),
  and a call from another loop while the first is open raises ``InvalidArgument`` saying why;
- the clients check enqueue and lease arguments with the embedded store's validators and
  messages (a ``bytes`` recipient was stored by the clients and refused embedded).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import mqstore
from mqstore.client import AsyncClient, Client, _Stubs
from mqstore.errors import InvalidArgument, StoreClosed
from mqstore.testing.cluster import free_port
from mqstore.testing.secure import InProcessCluster

R = ["b@example.net"]


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    cluster = InProcessCluster(tmp_path_factory.mktemp("client-review2") / "c", ["a"])
    try:
        cluster.leader()
        yield cluster.address(1)
    finally:
        cluster.close()


# --- 1. close() racing a call of another thread -------------------------------------------------------


class _ClosedInTheGap(Client):
    """A client whose close() runs right after a call took its channel and before the call starts
    the RPC: the moment another thread's close() can fall into (the lock is released in between)."""

    def _get_stubs(self, address: str) -> _Stubs:
        stubs = super()._get_stubs(address)
        self.close()
        return stubs


_CALLS: dict[str, Callable[[Client], Any]] = {
    "get": lambda c: c.get("0" * 26),
    "delete": lambda c: c.delete("0" * 26),  # not resent: nothing was sent, so StoreClosed says it all
    "lease": lambda c: c.lease("w"),
    "enqueue_stream": lambda c: list(c.enqueue_stream([{"mail_from": "a@example.org", "recipients": R,
                                                        "data": b"x"}])),
}


@pytest.mark.parametrize("call", sorted(_CALLS))
def test_close_between_taking_a_channel_and_starting_the_rpc_raises_store_closed(call: str) -> None:
    # Nothing listens there: the call never gets as far as the network.
    client = _ClosedInTheGap([f"127.0.0.1:{free_port()}"], timeout=5)
    with pytest.raises(StoreClosed, match="the client was closed"):
        _CALLS[call](client)


def test_close_while_threads_call_raises_only_store_closed(address: str) -> None:
    """The race itself, with threads (it does not always hit the gap; the test above does)."""
    seen: list[BaseException] = []
    for _ in range(5):
        client = Client([address], timeout=5)
        client.stats()
        go = threading.Event()

        def hammer(i: int, client: Client = client, go: threading.Event = go) -> None:
            go.wait()
            while True:
                try:
                    if i % 2:
                        client.delete("0" * 26)
                    else:
                        client.get("0" * 26)
                except mqstore.errors.NotFound:
                    continue
                except BaseException as exc:
                    seen.append(exc)
                    return

        threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        go.set()
        threading.Event().wait(0.03)
        client.close()
        for t in threads:
            t.join(10)
    assert seen and all(isinstance(e, StoreClosed) for e in seen), {type(e).__name__ + ": " + str(e) for e in seen}


# --- 2. one AsyncClient, more than one event loop ---------------------------------------------------------


def _one_message() -> list[dict[str, Any]]:
    return [{"mail_from": "a@example.org", "recipients": R, "data": b"x", "namespace": "loops"}]


def test_async_client_serves_asyncio_run_twice(address: str) -> None:
    client = AsyncClient([address], timeout=5)

    async def use() -> tuple[int, list[str]]:
        stats = await client.stats()
        ids = [mid async for mid in client.enqueue_stream(_one_message())]
        return len(stats), ids

    first = asyncio.run(use())
    second = asyncio.run(use())  # a new loop: the first one is closed
    assert len(first[1]) == len(second[1]) == 1
    asyncio.run(client.close())  # from a third loop, the second closed too
    with pytest.raises(StoreClosed):
        asyncio.run(client.stats())


def test_async_client_refuses_a_second_open_loop(address: str) -> None:
    client = AsyncClient([address], timeout=5)
    ready = threading.Event()
    finish = threading.Event()
    results: dict[str, Any] = {}

    def first_loop() -> None:
        async def main() -> None:
            await client.stats()
            ready.set()
            while not finish.is_set():
                await asyncio.sleep(0.02)
            results["first again"] = len(await client.stats())  # its loop still serves it
            await client.close()

        asyncio.run(main())

    thread = threading.Thread(target=first_loop)
    thread.start()
    try:
        assert ready.wait(10)

        async def other() -> None:
            for call in (client.stats(), client.get("0" * 26)):
                with pytest.raises(InvalidArgument, match="bound to the event loop it was first used in; "
                                                          "make one per loop"):
                    await asyncio.wait_for(call, 5)
            with pytest.raises(InvalidArgument, match="make one per loop"):
                async for _ in client.enqueue_stream(_one_message()):
                    pass

        asyncio.run(other())
    finally:
        finish.set()
        thread.join(10)
    assert results["first again"] > 0


def test_async_client_closed_from_another_loop_ends_the_first_loops_stream(address: str) -> None:
    client = AsyncClient([address], timeout=5)
    started = threading.Event()
    results: dict[str, BaseException] = {}

    def first_loop() -> None:
        async def slow() -> Any:
            while True:
                yield _one_message()[0]
                await asyncio.sleep(0.01)

        async def main() -> None:
            await client.stats()
            started.set()
            try:
                async for _ in client.enqueue_stream(slow()):
                    pass
            except BaseException as exc:
                results["stream"] = exc

        asyncio.run(main())

    thread = threading.Thread(target=first_loop)
    thread.start()
    assert started.wait(10)
    threading.Event().wait(0.2)
    asyncio.run(client.close())
    thread.join(10)
    assert not thread.is_alive()
    assert isinstance(results["stream"], StoreClosed)


# --- 3. argument checks as the embedded store's ------------------------------------------------------------


def _cases(ns: str) -> dict[str, Callable[[Any], Any]]:
    def enqueue(**kw: Any) -> Callable[[Any], Any]:
        return lambda q: q.enqueue(**{"mail_from": "a@example.org", "recipients": R, "data": b"x",
                                      "namespace": ns, **kw})

    return {
        "bytes recipient": enqueue(recipients=[b"b@example.net"]),
        "int recipient": enqueue(recipients=[5]),
        "no recipient": enqueue(recipients=[]),
        "recipient twice": enqueue(recipients=R * 2),
        "priority before data": enqueue(priority=1000, data="text"),
        "empty key": enqueue(idempotency_key=""),
        "many: bytes recipient": lambda q: q.enqueue_many([{"mail_from": "a@example.org", "namespace": ns,
                                                            "recipients": ["c@example.net", b"b@example.net"],
                                                            "data": b"x"}]),
        "worker int": lambda q: q.lease(5),
        "worker empty": lambda q: q.lease(""),
        "worker long": lambda q: q.lease("w" * 65),
        "bounce_message reason int": lambda q: q.bounce_message("0" * 26, reason=5),
        "bounce_message bad id first": lambda q: q.bounce_message("zz", reason=5),
        "defer reason int": lambda q: q.defer(1, reason=5),
    }


def _outcomes(q: Any, ns: str) -> dict[str, str]:
    out = {}
    for name, case in _cases(ns).items():
        try:
            out[name] = f"ok {case(q)!r}"
        except Exception as exc:
            out[name] = f"{type(exc).__name__}: {exc}"
    return out


def test_clients_refuse_arguments_as_the_embedded_store_does(address: str, tmp_path: Path, key_file: Path) -> None:
    store = mqstore.open(tmp_path / "s", key_file=key_file, background=False)
    try:
        embedded = _outcomes(store, "args")
    finally:
        store.close()
    assert embedded["bytes recipient"] == "InvalidArgument: recipients[0] must be a string, not bytes"
    assert embedded["worker int"] == "InvalidArgument: worker must be a name of 1..64 bytes"
    with Client([address], timeout=5) as client:
        blocking = _outcomes(client, "args-sync")
        stored_sync = len(client.list(namespace="args-sync"))

    async def main() -> tuple[dict[str, str], int]:
        async with AsyncClient([address], timeout=5) as aclient:
            outcomes = {}
            for name, case in _cases("args-async").items():
                try:
                    outcomes[name] = f"ok {await case(aclient)!r}"
                except Exception as exc:
                    outcomes[name] = f"{type(exc).__name__}: {exc}"
            return outcomes, len(await aclient.list(namespace="args-async"))

    asynchronous, stored_async = asyncio.run(main())
    assert blocking == embedded
    assert asynchronous == embedded
    assert stored_sync == stored_async == 0  # nothing refused embedded was stored by a client


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_stream_refuses_a_bytes_recipient_naming_its_position(kind: str, address: str) -> None:
    """A stream's message is checked as enqueue_many's would be, and the refusal names its place
    in the caller's messages (the node did both for a recipient before; a bytes one it stored)."""
    ns = f"stream-args-{kind}"
    messages = [{"mail_from": "a@example.org", "recipients": [f"r{i}@example.net"], "data": b"x", "namespace": ns}
                for i in range(5)]
    messages[2]["recipients"] = [b"b@example.net"]
    got: list[str] = []
    if kind == "sync":
        with Client([address], timeout=5) as client:
            with pytest.raises(InvalidArgument) as refused:
                got.extend(client.enqueue_stream(messages))
            stored = len(client.list(namespace=ns))
    else:
        async def main() -> int:
            async with AsyncClient([address], timeout=5) as client:
                with pytest.raises(InvalidArgument) as caught:
                    async for mid in client.enqueue_stream(messages):
                        got.append(mid)
                refusals.append(caught.value)
                return len(await client.list(namespace=ns))

        refusals: list[InvalidArgument] = []
        stored = asyncio.run(main())
        refused = pytest.ExceptionInfo.from_exception(refusals[0])
    assert str(refused.value) == "messages[2]: recipients[0] must be a string, not bytes"
    assert len(got) == stored == 2
