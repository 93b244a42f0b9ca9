"""An :class:`~mqstore.client.AsyncClient` driven like a :class:`~mqstore.client.Client`, so one
test body covers both clients: its coroutines run on a private event loop thread, and the async
iterator of ``enqueue_stream`` is collected into a list."""

from __future__ import annotations

import asyncio
import inspect
import threading
from typing import Any

from mqstore.client import AsyncClient


class AsyncFacade:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="async-client-loop", daemon=True)
        self._thread.start()

        async def make() -> AsyncClient:
            return AsyncClient(*args, **kwargs)

        self.client: AsyncClient = self._run(make())

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.client, name)
        if name == "enqueue_stream":

            async def collect(messages: Any) -> list[str]:
                return [mid async for mid in attr(messages)]

            return lambda messages: iter(self._run(collect(messages)))
        if inspect.iscoroutinefunction(attr):
            return lambda *a, **kw: self._run(attr(*a, **kw))
        return attr

    def close(self) -> None:
        self._run(self.client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


__all__ = ["AsyncFacade"]
