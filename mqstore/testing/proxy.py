"""A TCP proxy on 127.0.0.1 whose link can be cut, healed and slowed while a test runs.

``Proxy(target)`` listens on a free port of 127.0.0.1 and forwards every connection to ``target``
(``"host:port"``). Point one node's ``peer_address`` for another node at ``proxy.address`` (see
:meth:`mqstore.testing.cluster.LocalCluster.proxy_link`) and that one link is under the test's
control:

* :meth:`Proxy.cut` — reset every open connection (RST, so gRPC notices at once instead of after a
  keepalive timeout) and reset every new one as soon as it is accepted: nothing gets through in
  either direction until :meth:`Proxy.heal`. gRPC reconnects on its own; every reconnection is
  refused the same way, so a cut link stays cut.
* :meth:`Proxy.cut` with ``direction="up"`` or ``"down"`` — a one-way *blackhole*: the bytes the
  dialing side sends (``up``) or receives (``down``) are read and dropped, connections stay open.
  This models a one-way packet loss; the peers only notice through their own timeouts.
* :meth:`Proxy.delay` — every chunk is delivered ``seconds`` after it was read (order kept, no
  throughput limit).

A node dials each peer for its *own* messages (mqstore's transport opens one stream per
direction), so the link ``i -> j`` carries what ``i`` sends to ``j``: cutting only that proxy is
an asymmetric partition at the Raft level (``j`` still reaches ``i``).

The proxy runs an asyncio loop in one daemon thread; its methods are thread safe and return once
the change took effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Literal

Direction = Literal["both", "up", "down"]
_CHUNK = 64 * 1024
_CONNECT_TIMEOUT_S = 2.0


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"an address is 'host:port', not {address!r}")
    return host, int(port)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0) rather than FIN: the peer's next read or write fails at once."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass
class ProxyStats:
    connections: int = 0  # accepted and forwarded
    refused: int = 0  # accepted while cut, reset at once
    bytes_up: int = 0  # dialer -> target, delivered
    bytes_down: int = 0  # target -> dialer, delivered
    dropped_up: int = 0  # read and dropped (blackholed or cut)
    dropped_down: int = 0


class _Connection:
    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.client = client
        self.server = server
        self.tasks: list[asyncio.Task[None]] = []

    def reset(self) -> None:
        _reset(self.client)
        _reset(self.server)
        for task in self.tasks:
            task.cancel()


class Proxy:
    """Forwards ``listen`` (default: a free port on 127.0.0.1) to ``target``; see the module doc."""

    def __init__(self, target: str, *, listen: str = "127.0.0.1:0", name: str = "") -> None:
        self.target = target
        self.name = name or f"proxy->{target}"
        self._target = _split(target)
        self._listen = _split(listen)
        self._cut = False
        self._blackhole = {"up": False, "down": False}
        self._delay = 0.0
        self.stats = ProxyStats()
        self._connections: set[_Connection] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name=self.name, daemon=True)
        self._port = 0
        self._closed = False

    # --- control (any thread) ---------------------------------------------------------------------

    @property
    def address(self) -> str:
        """Where to connect (``host:port``); the proxy must have been started."""
        if not self._port:
            raise RuntimeError(f"{self.name} is not started")
        return f"{self._listen[0]}:{self._port}"

    @property
    def is_cut(self) -> bool:
        return self._cut

    def start(self) -> Proxy:
        self._thread.start()
        self._run(self._start())
        return self

    def cut(self, direction: Direction = "both") -> None:
        """``both``: reset every connection and refuse new ones. ``up``/``down``: drop the bytes
        flowing that way (dialer -> target is ``up``), keeping connections open."""
        if direction == "both":
            self._run(self._cut_all())
        elif direction in self._blackhole:
            self._blackhole[direction] = True
        else:
            raise ValueError(f"direction must be 'both', 'up' or 'down', not {direction!r}")

    def heal(self) -> None:
        """Forward everything again (new connections are accepted; blackholes end)."""
        self._cut = False
        self._blackhole = {"up": False, "down": False}

    def delay(self, seconds: float) -> None:
        """Deliver every chunk ``seconds`` after it was read (0 ends the delay)."""
        if seconds < 0:
            raise ValueError("delay must be >= 0 seconds")
        self._delay = float(seconds)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                self._run(self._stop())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "cut" if self._cut else "blackhole " + ",".join(d for d, b in self._blackhole.items() if b)
        state = state if self._cut or any(self._blackhole.values()) else "open"
        port = self._port or "-"
        return f"<Proxy {self.name} 127.0.0.1:{port} -> {self.target} {state} delay={self._delay:g}s>"

    def _run(self, coro: Coroutine[Any, Any, None], timeout: float = 10.0) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # --- the loop ---------------------------------------------------------------------------------

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self._listen[0], self._listen[1], reuse_address=True)
        self._port = int(self._server.sockets[0].getsockname()[1])

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.reset()
        self._connections.clear()
        # Finish every pump before the loop stops: a task left pending when the loop closes is
        # destroyed later by the garbage collector, which reports it as an ignored exception.
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _cut_all(self) -> None:
        self._cut = True
        for conn in list(self._connections):
            conn.reset()
        self._connections.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            self.stats.refused += 1
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(*self._target), timeout=_CONNECT_TIMEOUT_S
            )
        except (OSError, TimeoutError):
            _reset(writer)  # the target is down: the dialer sees a refused/broken connection
            return
        if self._cut:  # cut while connecting
            self.stats.refused += 1
            _reset(writer)
            _reset(up_writer)
            return
        self.stats.connections += 1
        conn = _Connection(writer, up_writer)
        self._connections.add(conn)
        conn.tasks = [
            asyncio.ensure_future(self._pump(reader, up_writer, "up", conn)),
            asyncio.ensure_future(self._pump(up_reader, writer, "down", conn)),
        ]
        await asyncio.gather(*conn.tasks, return_exceptions=True)
        self._connections.discard(conn)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str, conn: _Connection
    ) -> None:
        """Copy ``reader`` to ``writer`` (through a delay line when one is set) until either side
        closes; then close the whole connection."""
        line: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        sender = asyncio.ensure_future(self._deliver(line, writer, direction))
        try:
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                if self._cut or self._blackhole[direction]:
                    self._count(direction, dropped=len(data))
                    continue
                line.put_nowait((time.monotonic() + self._delay, data))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            line.put_nowait(None)
            with contextlib.suppress(BaseException):
                await sender
            conn.reset()

    async def _deliver(
        self, line: asyncio.Queue[tuple[float, bytes] | None], writer: asyncio.StreamWriter, direction: str
    ) -> None:
        while True:
            item = await line.get()
            if item is None:
                return
            due, data = item
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if self._cut or self._blackhole[direction]:
                self._count(direction, dropped=len(data))
                continue
            try:
                writer.write(data)
                await writer.drain()
            except (OSError, RuntimeError):
                return
            self._count(direction, delivered=len(data))

    def _count(self, direction: str, *, delivered: int = 0, dropped: int = 0) -> None:
        if direction == "up":
            self.stats.bytes_up += delivered
            self.stats.dropped_up += dropped
        else:
            self.stats.bytes_down += delivered
            self.stats.dropped_down += dropped


__all__ = ["Direction", "Proxy", "ProxyStats"]
