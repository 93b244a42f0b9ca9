"""Free space on a store's disk: the floor below which new enqueues are refused, and what to tell
a caller whose write the disk could not take.

A mail spool must never fill its disk to the last byte: delivering, bouncing and deleting mail
are writes too (LMDB reuses the pages they free, but a transaction needs a few new ones), so a
store that took new mail until the disk was full could not drain itself. Below the floor —
the larger of ``min_bytes`` and ``min_percent`` of the disk — new enqueues are refused up front
with :class:`~mqstore.errors.StorageFull` and everything else goes on. If the disk fills anyway
(another program wrote to it, a file size limit), a failed commit changes nothing, and the
caller hears why in words an operator can act on, not only the kernel's (a short write on a
full disk comes back from LMDB as "Input/output error").

The space a store can write into is the disk's free space plus the pages its data file has free
inside: an LMDB file never shrinks, so mail settled, deleted and compacted away frees pages that
LMDB reuses before it grows the file, not space on the disk. Only counting both lets a store that
filled its disk to the floor take new mail again once it has drained.

But those pages count for at most half the floor, and the other half is a hard minimum of the
disk's own free space (:meth:`DiskSpace.hard_min_bytes`): new enqueues are refused while the disk
itself has less than half the floor free, however many free pages the file holds. The pages are
not as good as space on the disk: a body larger than a page needs a run of adjacent pages, and the
scattered pages a drained queue leaves (every other message settled, say) cannot give it one, so
LMDB grows the file for it even with megabytes free inside. Counted in full, they let large mail
fill the disk to its last byte while the store went on saying it took enqueues; capped, a drained
store whose disk sits at the floor takes mail again (until its own free space is down to half the
floor), and the disk always keeps half the floor for other programs, a node's snapshots and the
writes that drain the queue. So that a burst cannot run past that minimum between two readings,
:meth:`DiskSpace.check` reads the disk's free space again before every enqueue once it has less
than twice the floor free (a ``statvfs``; the file's free pages are read every ``interval_s``):
only enqueues already admitted can take the disk below the minimum, by what they write.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from mqstore import limits
from mqstore.errors import InvalidArgument, MQStoreError, StorageFull

if TYPE_CHECKING:
    from mqstore.store.env import Environment

log = logging.getLogger(__name__)

_PAGE_ID_BYTES = 8  # a free page's number in LMDB's freelist (a 64-bit word)
_SLACK_PAGES = 16  # the freelist's own leaf and branch pages, and then some


def unused_bytes(env: Environment) -> int | None:
    """Bytes of the pages ``env``'s data file holds but its database does not use (LMDB reuses
    them before it grows the file); None when it cannot tell just now (commits landed during
    three readings, or this thread is inside a read of its own, which must not nest). Cheap: a
    short read transaction, no page is read.

    LMDB (0.9) does not report its freelist, so this is the pages up to the last one in use
    minus those every database uses (branch, leaf and overflow pages of the main database and
    of each named one) and the two meta pages, all at one snapshot, minus an allowance for the
    pages the freelist itself takes. It counts as free the pages that an old read transaction
    still sees and those the last commit freed (LMDB reuses them after the next commit), which
    mqstore's short reads keep few; it errs low rather than high: a main database holding
    records other than ``env.dbs`` (a database this version does not open) gives 0."""
    if env.gate.held():
        return None
    for _ in range(3):
        with env.read() as txn:
            lmdb_env = env.env
            snapshot = txn.id()
            info = lmdb_env.info()
            main = lmdb_env.stat()  # the newest meta page: the same snapshot if no commit landed
            if int(info["last_txnid"]) != snapshot:
                continue
            dbs = list(env.dbs.values())
            if int(main["entries"]) != len(dbs):
                return 0
            used = 2 + _pages(main) + sum(_pages(txn.stat(db)) for db in dbs)
            if int(lmdb_env.info()["last_txnid"]) != snapshot:
                continue
        psize = int(main["psize"])
        free = int(info["last_pgno"]) + 1 - used
        free -= free * _PAGE_ID_BYTES // psize + _SLACK_PAGES
        return max(free, 0) * psize
    return None


def _pages(stat: dict[str, int]) -> int:
    return int(stat["branch_pages"]) + int(stat["leaf_pages"]) + int(stat["overflow_pages"])


class DiskSpace:
    """The free space of the disk holding ``path``, read at most every ``interval_s`` (by
    :meth:`check` before every call once it is under twice the floor), plus the free pages inside
    the data file of the store this process has open at ``path``, which count for at most half the
    floor (:func:`unused_bytes`; ``unused_in_file`` replaces how they are read: None from it keeps
    the last reading)."""

    def __init__(
        self,
        path: Path,
        min_bytes: int = limits.DISK_FREE_MIN_BYTES_DEFAULT,
        min_percent: float = limits.DISK_FREE_MIN_PERCENT_DEFAULT,
        *,
        interval_s: float = limits.DISK_CHECK_INTERVAL_S,
        what: str = "store",
        settings: str = "disk_free_min_bytes / disk_free_min_percent",
        monotonic: Callable[[], float] = time.monotonic,
        unused_in_file: Callable[[], int | None] | None = None,
    ) -> None:
        if isinstance(min_bytes, bool) or not isinstance(min_bytes, int) or min_bytes < 0:
            raise InvalidArgument(f"disk_free_min_bytes must be an integer >= 0, not {min_bytes!r}")
        if isinstance(min_percent, bool) or not isinstance(min_percent, (int, float)) or not 0 <= min_percent <= 100:
            raise InvalidArgument(f"disk_free_min_percent must be a number 0..100, not {min_percent!r}")
        self.path = Path(path)
        self.min_bytes = min_bytes
        self.min_percent = float(min_percent)
        self.interval_s = interval_s
        self.what = what
        self.settings = settings
        self._monotonic = monotonic
        self._unused_in_file = unused_in_file if unused_in_file is not None else self._unused_in_open_store
        self._env: weakref.ref[Environment] | None = None
        self.free_bytes = 0  # on the disk
        self.total_bytes = 0
        self.reusable_bytes = 0  # free inside the data file (see unused_bytes)
        self.nearly_full = False
        self._read_at: float | None = None
        self.update()

    def floor_bytes(self) -> int:
        return max(self.min_bytes, int(self.total_bytes * self.min_percent / 100))

    def hard_min_bytes(self) -> int:
        """Half the floor: enqueues are refused while the disk itself has less free than this,
        whatever the data file holds free inside."""
        return self.floor_bytes() // 2

    def counted_reusable_bytes(self) -> int:
        """The free pages inside the data file that count against the floor: at most the floor
        less :meth:`hard_min_bytes` (a large body cannot use scattered pages; see the module)."""
        return min(self.reusable_bytes, self.floor_bytes() - self.hard_min_bytes())

    def available_bytes(self) -> int:
        """What the floor is compared with: free on the disk plus free inside the data file, the
        latter counting for at most half the floor, so that it is below the floor whenever the
        disk's own free space is below :meth:`hard_min_bytes`."""
        return self.free_bytes + self.counted_reusable_bytes()

    def _unused_in_open_store(self) -> int | None:
        """:func:`unused_bytes` of the store at ``path`` this process has open for writing
        (an embedded store, or a node's data directory); 0 while there is none."""
        env = self._env() if self._env is not None else None
        if env is None or not _usable(env):
            env = None
            from mqstore.store import env as store_env  # imported here: mqstore.store imports this module

            for candidate in list(store_env._LOCK_HOLDERS):  # each writable store open in this process
                try:
                    if _usable(candidate) and os.path.samefile(candidate.path, self.path):
                        env = candidate
                        break
                except OSError:
                    continue
            self._env = weakref.ref(env) if env is not None else None
        return unused_bytes(env) if env is not None else 0

    def _read_disk(self) -> None:
        target = self.path.absolute()
        while not target.exists() and target != target.parent:  # a store not created yet
            target = target.parent
        try:
            usage = shutil.disk_usage(target)
            self.free_bytes, self.total_bytes = usage.free, usage.total
        except OSError:
            log.warning("%s: cannot read the free space of %s", self.what, self.path)

    def update(self) -> bool:
        """Read the free space now; returns whether the disk is below the floor."""
        self._read_disk()
        try:
            reusable = self._unused_in_file()
        except Exception as exc:  # a store closing meanwhile, say: count nothing inside the file
            log.debug("%s: cannot read the free pages of its data file: %s", self.what, exc)
            reusable = 0
        if reusable is not None:  # None: unknown just now, the last reading stands
            self.reusable_bytes = reusable
        self._read_at = self._monotonic()
        return self._judge()

    def _judge(self) -> bool:
        nearly_full = self.available_bytes() < self.floor_bytes()
        if nearly_full != self.nearly_full:
            (log.error if nearly_full else log.info)(
                "%s: disk %s: %d bytes free (%d of them inside the data file, which count for at most half "
                "the floor), the floor is %d bytes", self.what,
                "nearly full, refusing new enqueues" if nearly_full else "has room again",
                self.available_bytes(), self.counted_reusable_bytes(), self.floor_bytes(),
            )
        self.nearly_full = nearly_full
        return nearly_full

    def check(self) -> StorageFull | None:
        """:meth:`refusal`, reading the disk again first when the last reading is older than
        ``interval_s`` (for a caller with no thread that keeps the reading current), and the
        disk's free space alone before every call while the last reading found less than twice
        the floor free, so that a burst of enqueues cannot take the disk below
        :meth:`hard_min_bytes` between two readings."""
        if self._read_at is None or self._monotonic() - self._read_at >= self.interval_s:
            self.update()
        elif self.free_bytes < 2 * self.floor_bytes():
            self._read_disk()
            self._judge()
        return self.refusal()

    def refusal(self) -> StorageFull | None:
        """Why a new enqueue must be refused, by the last reading (None: it may go ahead)."""
        if not self.nearly_full:
            return None
        counted = self.counted_reusable_bytes()
        inside = (f"; {counted} of them free pages inside the data file, which never shrinks (they count for at "
                  f"most half the floor: the disk itself must keep {self.hard_min_bytes()} bytes free)"
                  if counted else "")
        if self.free_bytes < self.hard_min_bytes():
            freed = (f"leasing, settling and deleting go on, but the disk itself has {self.free_bytes} bytes free, "
                     "under half the floor: only space freed on the disk lets enqueues in again")
        else:
            freed = "leasing, settling and deleting go on: the pages they free inside the data file count"
        return StorageFull(
            f"{self.what}: disk nearly full ({self.available_bytes()} bytes free, below the floor of "
            f"{self.floor_bytes()} bytes: {self.settings}{inside}); nothing was stored, and new enqueues "
            f"are refused until space is freed ({freed})"
        )


def _usable(env: Environment) -> bool:
    try:
        env.check_open()
    except MQStoreError:  # closed, or opened before this process forked
        return False
    return True


def write_failure(data_file: Path, exc: BaseException, size: int = 0) -> MQStoreError:
    """The error a caller gets for a commit that failed with ``exc`` (nothing was committed).

    :class:`StorageFull` when the failure is for want of space — the disk has less free than the
    write needed plus a margin, or the data file reached the process's file size limit — with
    the figures; a plain :class:`MQStoreError` otherwise (an I/O error of the disk itself)."""
    margin = size + 16 * 1024 * 1024
    try:
        free = shutil.disk_usage(data_file.parent).free
    except OSError:
        free = None
    try:
        current = data_file.stat().st_size
    except OSError:
        current = 0
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY and current + margin >= soft:
        return StorageFull(
            f"write failed, nothing was committed: the data file {data_file} ({current} bytes) reached this "
            f"process's file size limit ({soft} bytes, ulimit -f): {exc}"
        )
    if free is not None and free < margin:
        return StorageFull(
            f"write failed, nothing was committed: the disk holding {data_file.parent} is full ({free} bytes "
            f"free): {exc}"
        )
    return MQStoreError(f"write failed, nothing was committed: {exc}")


__all__ = ["DiskSpace", "unused_bytes", "write_failure"]
