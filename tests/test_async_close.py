"""AsyncClient.close() while other tasks are in the middle of calls and streams: they end with
StoreClosed, an mqstore error, not asyncio.CancelledError (which tells a TaskGroup or gather()
that the task itself was cancelled); a task that is cancelled still sees its cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from mqstore.client import AsyncClient
from mqstore.errors import StoreClosed
from mqstore.testing.secure import InProcessCluster


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    cluster = InProcessCluster(tmp_path_factory.mktemp("async-close") / "c", ["a"])
    try:
        cluster.leader()
        yield cluster.address(1)
    finally:
        cluster.close()


def test_calls_in_flight_when_the_client_closes_raise_store_closed(address: str) -> None:
    async def main() -> list[str]:
        client = AsyncClient([address], timeout=10)
        await client.enqueue(mail_from="a@example.org", recipients=["b@example.net"], data=b"x")

        async def busy(kind: str) -> str:
            try:
                while True:
                    if kind == "enqueue":
                        await client.enqueue(mail_from="a@example.org", recipients=["b@example.net"], data=b"x" * 500)
                    elif kind == "stats":
                        await client.stats()
                    elif kind == "list":
                        await client.list(limit=50)
                    else:
                        async def frames() -> AsyncIterator[dict[str, object]]:
                            for _ in range(100_000):
                                yield {"mail_from": "a@example.org", "recipients": ["b@example.net"], "data": b"s"}

                        async for _ in client.enqueue_stream(frames()):
                            pass
            except StoreClosed:
                return "StoreClosed"
            except asyncio.CancelledError:
                return "CancelledError"

        tasks = [asyncio.ensure_future(busy(k)) for k in ("enqueue", "enqueue", "stats", "list", "stream")]
        await asyncio.sleep(0.5)
        await client.close()
        done, pending = await asyncio.wait(tasks, timeout=15)
        assert not pending
        return [t.result() for t in done]

    assert asyncio.run(main()) == ["StoreClosed"] * 5


def test_a_task_cancelled_in_a_call_is_still_cancelled(address: str) -> None:
    async def main() -> None:
        async with AsyncClient([address], timeout=10) as client:
            async def forever() -> None:
                while True:
                    await client.stats()

            task = asyncio.ensure_future(forever())
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
