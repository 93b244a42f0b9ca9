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

Closed-loop callers (each writes, waits, writes again) would otherwise settle into cohorts: the
callers answered by one commit resubmit while the next batch (the others) is already running, so
16 callers make two batches of 8 forever and pay twice the commits. After a batch of several
synchronous callers, the writer therefore lingers briefly before running the next one, until
as many requests are queued as were in play at the last commit, or a deadline passes (the last
batch's duration, capped by ``limits.WRITE_LINGER_MAX_US``). Submitters only wake the lingering
writer when that count is reached. While several callers are in play, a write does not run
inline (it would commit alone); the first batch that finds only one caller ends that, so a lone
caller never lingers.

The request queue is bounded: when it is full, callers block (back-pressure) and give up with
``Overloaded`` after ``limits.WRITE_QUEUE_WAIT_MS``. Once the writer has stopped (the store
closed) or failed, the queue is closed: whatever it still held is answered (``StoreClosed``, or
``WriterFailed`` when the writer failed), and a caller still waiting for room, or submitting
later, is refused with the same error at once; no write waits for a writer that is gone.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
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

    __slots__ = ("_done", "callback", "error", "fn", "result", "seal", "sealed", "size", "waited")

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
        self.waited = False  # a caller blocks on it (it will likely write again once answered)
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


class _Requests:
    """The writer's bounded FIFO of requests. Submitters wake the writer only once ``want``
    requests are queued, so a writer lingering for a fuller batch is not woken by each one."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.items: deque[Any] = deque()
        self.lock = threading.Lock()
        self.ready = threading.Condition(self.lock)  # the writer waits here
        self.room = threading.Condition(self.lock)  # submitters wait here while it is full
        self.want = 1
        self.closed = False  # set by drain(): the writer reads no more, nothing is accepted

    def put(self, item: Any, timeout: float) -> bool:
        """Append ``item``, waiting up to ``timeout`` seconds for room (0: not at all); False if
        there was none or the queue was drained meanwhile (``closed``: also for a caller that was
        waiting for room then)."""
        with self.lock:
            if self.closed:
                return False
            if len(self.items) >= self.maxsize:
                deadline = time.monotonic() + timeout
                while len(self.items) >= self.maxsize:
                    rest = deadline - time.monotonic()
                    if rest <= 0:
                        return False
                    self.room.wait(rest)
                    if self.closed:
                        return False
            self.items.append(item)
            if len(self.items) >= self.want or item is _STOP:
                self.ready.notify()
        return True

    def take(self, max_items: int, max_bytes: int) -> tuple[list[Any], bool]:
        """Up to ``max_items``/``max_bytes`` of the queued requests (at least one if any is
        queued: a request is never split), and whether the stop marker was reached."""
        items = self.items
        with self.lock:
            batch: list[Any] = []
            size = 0
            stop = False
            while items and len(batch) < max_items and (size < max_bytes or not batch):
                item = items[0]
                if item is _STOP:
                    stop = True
                    items.popleft()
                    break
                if batch and size + item.size > max_bytes:
                    break
                items.popleft()
                batch.append(item)
                size += item.size
            if batch:
                self.room.notify(len(batch))
            return batch, stop

    def wait_for(self, count: int, deadline: float | None) -> bool:
        """Wait until ``count`` requests (or the stop marker) are queued, or ``deadline``
        (``time.monotonic()``; None: no deadline) passes; True if they are there."""
        items = self.items
        with self.lock:
            if len(items) >= count or (items and items[-1] is _STOP):
                return True
            self.want = count
            try:
                while len(items) < count and not (items and items[-1] is _STOP):
                    if deadline is None:
                        self.ready.wait()
                        continue
                    rest = deadline - time.monotonic()
                    if rest <= 0 or not self.ready.wait(rest):
                        return len(items) >= count
                return True
            finally:
                self.want = 1

    def drain(self) -> list[Any]:
        """Close the queue (every later or waiting ``put`` returns False) and return
        what it still held, for the writer to answer."""
        with self.lock:
            self.closed = True
            rest = list(self.items)
            self.items.clear()
            self.room.notify_all()
            return rest

    def __len__(self) -> int:
        return len(self.items)


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
        self._queue = _Requests(queue_items_max)
        self._failed: BaseException | None = None
        self._stopping = False
        self._stop_queued = False  # stop() put the stop marker in the queue
        self._submit_lock = threading.Lock()  # orders stop() against late submissions
        self._commit_lock = threading.Lock()  # held while a batch runs, in any thread
        self._count_lock = threading.Lock()
        self._outstanding = 0  # submitted and not yet answered (queued or in the running batch)
        self._inline_thread: int | None = None  # the caller running its batch inline, if any
        self._expect = 0  # requests in play at the last commit (waited-on ones answered + queued)
        self._linger_s = 0.0  # how long the writer may wait for them before the next batch
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
        self._check_writable()
        return self._put(Pending(fn, size, callback, seal), wait_ms)

    def _check_writable(self) -> None:
        if self._failed is not None or self._stopping:
            raise self._gone()
        if threading.current_thread() is self._thread or self._inline_thread == threading.get_ident():
            raise AssertionError("a write function cannot itself write and wait (it would deadlock)")

    def _gone(self) -> MQStoreError:
        """The error for a write the writer will not run: it failed, or the store is closing."""
        if self._failed is not None:
            return WriterFailed(f"the store's writer stopped: {self._failed!r}; reopen the store")
        return StoreClosed("the store is closing")

    def _put(self, item: Pending[T], wait_ms: int) -> Pending[T]:
        with self._count_lock:
            self._outstanding += 1
        if not self._queue.put(item, timeout=wait_ms / 1000):
            with self._count_lock:
                self._outstanding -= 1
            if self._queue.closed:
                raise self._gone() from None
            raise Overloaded(
                f"the write queue stayed full ({self._queue_items_max} requests) for {wait_ms} ms"
            ) from None
        return item

    def write(
        self, fn: WriteFn[T], *, size: int = 0, seal: list[SealRequest] | None = None
    ) -> T:
        """Run ``fn`` in the next committed batch and return its result (or raise its error)."""
        if self._expect <= 1 and self._outstanding == 0 and self._commit_lock.acquire(blocking=False):
            try:
                with self._count_lock:
                    idle = self._outstanding == 0
                if idle:
                    return self._run_inline(fn, size, seal)
            finally:
                self._commit_lock.release()
        self._check_writable()
        item: Pending[T] = Pending(fn, size, None, seal)
        item.waited = True
        return self._put(item, limits.WRITE_QUEUE_WAIT_MS).wait()

    def _run_inline(self, fn: WriteFn[T], size: int, seal: list[SealRequest] | None) -> T:
        """Run a batch of one in the calling thread (the commit lock is held)."""
        self._check_writable()
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

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """No batch runs while this is held (the writer and inline callers wait for it; new
        writes queue, subject to the queue's bound): the database can be copied or swapped under
        it. Not from a write function."""
        self._check_writable()
        with self._commit_lock:
            yield

    def submit_nowait(self, fn: WriteFn[Any]) -> bool:
        """Queue ``fn`` without waiting for room or for its commit; False when the queue is full."""
        if self._failed is not None or self._stopping:
            return False
        with self._count_lock:
            self._outstanding += 1
        if not self._queue.put(Pending(fn, 0, None), timeout=0):
            with self._count_lock:
                self._outstanding -= 1
            return False
        return True

    def queued(self) -> int:
        """Requests waiting for the writer (not counting the batch it is running)."""
        return len(self._queue)

    def _next_batch(self) -> tuple[list[Pending[Any]], bool]:
        """Wait for the next request; after a commit that answered several waiting callers,
        linger for them (see the module's docstring); then take what is queued."""
        max_items, max_bytes = limits.WRITE_BATCH_ITEMS_MAX, limits.WRITE_BATCH_BYTES_MAX
        q = self._queue
        q.wait_for(1, None)
        expect = min(self._expect, max_items)
        if expect > 1:
            q.wait_for(expect, time.monotonic() + self._linger_s)
        return q.take(max_items, max_bytes)

    def _loop(self) -> None:
        stop = False
        batch: list[Pending[Any]] = []
        try:
            while not stop:
                batch, stop = self._next_batch()
                if not batch:
                    break
                with self._commit_lock:
                    started = time.perf_counter()
                    self._run_batch(batch)
                    took = time.perf_counter() - started
                with self._count_lock:
                    self._outstanding -= len(batch)
                waited = sum(1 for item in batch if item.waited)
                in_play = waited + len(self._queue)
                self._expect = in_play if in_play > 1 else 0
                self._linger_s = min(took, limits.WRITE_LINGER_MAX_US / 1e6)
                for item in batch:
                    item.finish()
                batch = []
        except BaseException as exc:
            self._failed = exc
            log.exception("mqstore writer thread failed; the store must be reopened")
            for item in batch:
                if not item.done():
                    item.error = self._gone()
                    item.finish()
        # Answer whatever is still queued, and close the queue (a caller waiting for room is
        # refused, not queued behind a writer that is gone): no caller waits forever.
        for item in self._queue.drain():
            if item is not _STOP:
                item.error = self._gone()
                item.finish()

    def stop(self, timeout: float = 60.0) -> bool:
        """Finish everything already queued, then stop the thread.

        Returns True once the thread has ended; False if it is still running a batch after
        ``timeout`` seconds: that batch still uses the environment, which must not be closed
        under it (calling ``stop`` again waits again).
        """
        deadline = time.monotonic() + timeout
        with self._submit_lock:
            self._stopping = True
        while not self._stop_queued and self._thread.is_alive():
            if self._queue.put(_STOP, timeout=0.1):
                self._stop_queued = True
                break
            if self._queue.closed:
                break  # the writer already ended (it failed)
            if time.monotonic() > deadline:
                break  # the queue stayed full; a later stop() queues the marker
        if self._thread is not threading.current_thread():
            self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            return False
        # A batch may still run inline in a caller's thread (it took the commit lock before
        # _stopping was set): the environment must not be closed under it either. Any later
        # write sees _stopping once it holds the lock, and is refused.
        if not self._commit_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return False
        self._commit_lock.release()
        return True


__all__ = ["Pending", "Writer", "WriterFailed"]
