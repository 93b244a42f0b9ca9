"""Group commit: one writer thread turns many callers' writes into one LMDB transaction.

Callers (any thread) submit a *write function* and wait. The writer thread takes the first
pending request, drains whatever else is pending (bounded by count and bytes), runs every
function inside one write transaction and commits once: N concurrent callers share one fsync.
A caller is answered only after the commit returned, i.e. after the data is on disk.

A function that raises (bad input found under the lock, a stale lease) gets its own exception
and leaves no trace; the others of its batch still commit together (the store re-runs the batch
without it). If LMDB's map fills up, the whole transaction is aborted, the map grows, and the
batch runs again from the start: no write is lost, so write functions must be re-runnable (they
are: they only read and write through the transaction).

A synchronous write that finds the store idle (nothing submitted and not yet answered, no batch
running) runs its batch in the caller's own thread, under the same commit lock the writer thread
holds while it runs a batch: a lone caller (and a Raft node's persistence loop) then pays no
thread hand-offs, which on a virtual machine cost as much as a third of an fsync. Order is kept:
a write never overtakes one submitted before it and not yet answered.

The request queue is bounded: when it is full, callers block (back-pressure) and give up with
``Overloaded`` after ``limits.WRITE_QUEUE_WAIT_MS``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from mqstore import limits
from mqstore.errors import MQStoreError, Overloaded, StoreClosed

if TYPE_CHECKING:
    from mqstore.crypto.seal import SealRequest
    from mqstore.store.log import WriteContext

log = logging.getLogger(__name__)

T = TypeVar("T")
WriteFn = Callable[["WriteContext"], T]


class WriterFailed(MQStoreError):
    """The writer thread stopped on an unexpected error; the store must be reopened."""


class Pending(Generic[T]):
    """One submitted write: its function, and its outcome once the batch committed."""

    __slots__ = ("_done", "callback", "error", "fn", "result", "seal", "sealed", "size")

    def __init__(
        self,
        fn: WriteFn[T],
        size: int,
        callback: Callable[[Pending[T]], None] | None,
        seal: list[SealRequest] | None = None,
    ) -> None:
        self.fn = fn
        self.size = size
        self.seal = seal
        self.sealed: list[Any] = []
        self.result: T | None = None
        self.error: BaseException | None = None
        self.callback = callback
        # A pre-acquired lock released by the writer: the cheapest one-shot wake-up in CPython.
        self._done = threading.Lock()
        self._done.acquire()

    def finish(self) -> None:
        self._done.release()
        if self.callback is not None:
            try:
                self.callback(self)
            except Exception:  # a callback's failure must not stop the writer
                log.exception("write completion callback failed")

    def wait(self, timeout: float | None = None) -> T:
        if not self._done.acquire(timeout=-1 if timeout is None else timeout):
            raise TimeoutError("write not committed in time")
        self._done.release()
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]

    def done(self) -> bool:
        return not self._done.locked()


_STOP = object()


class Writer:
    """The single writer thread of a store."""

    def __init__(
        self,
        run_batch: Callable[[list[Pending[Any]]], None],
        name: str,
        queue_items_max: int = limits.WRITE_QUEUE_ITEMS_MAX,
    ) -> None:
        self._run_batch = run_batch
        self._queue_items_max = queue_items_max
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_items_max)
        self._failed: BaseException | None = None
        self._stopping = False
        self._submit_lock = threading.Lock()  # orders stop() against late submissions
        self._commit_lock = threading.Lock()  # held while a batch runs, in any thread
        self._count_lock = threading.Lock()
        self._outstanding = 0  # submitted and not yet answered (queued or in the running batch)
        self._inline_thread: int | None = None  # the caller running its batch inline, if any
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def submit(
        self,
        fn: WriteFn[T],
        *,
        size: int = 0,
        callback: Callable[[Pending[T]], None] | None = None,
        wait_ms: int = limits.WRITE_QUEUE_WAIT_MS,
        seal: list[SealRequest] | None = None,
    ) -> Pending[T]:
        """Queue ``fn``; returns at once with a :class:`Pending` to wait on.

        ``seal`` asks the writer to seal payloads for ``fn`` first (see ``LogStore.submit``).
        """
        if self._failed is not None:
            raise WriterFailed(f"the store's writer stopped: {self._failed!r}; reopen the store")
        if self._stopping:
            raise StoreClosed("the store is closing")
        if threading.current_thread() is self._thread or self._inline_thread == threading.get_ident():
            raise AssertionError("a write function cannot itself write and wait (it would deadlock)")
        item: Pending[T] = Pending(fn, size, callback, seal)
        with self._count_lock:
            self._outstanding += 1
        try:
            self._queue.put(item, timeout=wait_ms / 1000)
        except queue.Full:
            with self._count_lock:
                self._outstanding -= 1
            raise Overloaded(
                f"the write queue stayed full ({self._queue_items_max} requests) for {wait_ms} ms"
            ) from None
        return item

    def write(
        self, fn: WriteFn[T], *, size: int = 0, seal: list[SealRequest] | None = None
    ) -> T:
        """Run ``fn`` in the next committed batch and return its result (or raise its error)."""
        if self._outstanding == 0 and self._commit_lock.acquire(blocking=False):
            try:
                with self._count_lock:
                    idle = self._outstanding == 0
                if idle:
                    return self._run_inline(fn, size, seal)
            finally:
                self._commit_lock.release()
        return self.submit(fn, size=size, seal=seal).wait()

    def _run_inline(self, fn: WriteFn[T], size: int, seal: list[SealRequest] | None) -> T:
        """Run a batch of one in the calling thread (the commit lock is held)."""
        if self._failed is not None:
            raise WriterFailed(f"the store's writer stopped: {self._failed!r}; reopen the store")
        if self._stopping:
            raise StoreClosed("the store is closing")
        if threading.current_thread() is self._thread:
            raise AssertionError("a write function cannot itself write and wait (it would deadlock)")
        item: Pending[T] = Pending(fn, size, None, seal)
        self._inline_thread = threading.get_ident()
        try:
            self._run_batch([item])
        except BaseException as exc:
            self._failed = exc
            log.exception("mqstore write failed unexpectedly; the store must be reopened")
            raise WriterFailed(f"the store's writer stopped: {exc!r}") from exc
        finally:
            self._inline_thread = None
        item.finish()
        return item.wait()

    def submit_nowait(self, fn: WriteFn[Any]) -> bool:
        """Queue ``fn`` without waiting for room or for its commit; False when the queue is full."""
        if self._failed is not None or self._stopping:
            return False
        with self._count_lock:
            self._outstanding += 1
        try:
            self._queue.put_nowait(Pending(fn, 0, None))
        except queue.Full:
            with self._count_lock:
                self._outstanding -= 1
            return False
        return True

    def queued(self) -> int:
        """Requests waiting for the writer (not counting the batch it is running)."""
        return self._queue.qsize()

    def _take(self, block: bool) -> tuple[list[Pending[Any]], bool]:
        """The next batch: the first request (waiting for it if ``block``), then whatever else is
        queued, within the batch limits. Returns ``(batch, stop_seen)``."""
        q = self._queue
        batch: list[Pending[Any]] = []
        size = 0
        if block:
            first = q.get()
            if first is _STOP:
                return batch, True
            batch.append(first)
            size = first.size
        while len(batch) < limits.WRITE_BATCH_ITEMS_MAX and size < limits.WRITE_BATCH_BYTES_MAX:
            try:
                item = q.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
            size += item.size
        return batch, False

    def _loop(self) -> None:
        stop = False
        batch: list[Pending[Any]] = []
        try:
            while not stop:
                batch, stop = self._take(block=True)
                if not batch:
                    break
                with self._commit_lock:
                    self._run_batch(batch)
                with self._count_lock:
                    self._outstanding -= len(batch)
                for item in batch:
                    item.finish()
                batch = []
        except BaseException as exc:
            self._failed = exc
            log.exception("mqstore writer thread failed; the store must be reopened")
            for item in batch:
                if not item.done():
                    item.error = WriterFailed(f"the store's writer stopped: {exc!r}")
                    item.finish()
        # Answer whatever is still queued so no caller waits forever.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                item.error = StoreClosed("the store closed before this write ran")
                item.finish()

    def stop(self, timeout: float = 60.0) -> None:
        """Finish everything already queued, then stop the thread."""
        with self._submit_lock:
            if self._stopping:
                return
            self._stopping = True
        if self._thread.is_alive():
            deadline = time.monotonic() + timeout
            while True:
                try:
                    self._queue.put(_STOP, timeout=0.1)
                    break
                except queue.Full:
                    if time.monotonic() > deadline or not self._thread.is_alive():
                        break
            self._thread.join(max(0.0, deadline - time.monotonic()))


__all__ = ["Pending", "Writer", "WriterFailed"]
