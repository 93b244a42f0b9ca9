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
"""

from __future__ import annotations

import logging
import resource
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from mqstore import limits
from mqstore.errors import InvalidArgument, MQStoreError, StorageFull

log = logging.getLogger(__name__)


class DiskSpace:
    """The free space of the disk holding ``path``, read at most every ``interval_s``."""

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
        self.free_bytes = 0
        self.total_bytes = 0
        self.nearly_full = False
        self._read_at: float | None = None
        self.update()

    def floor_bytes(self) -> int:
        return max(self.min_bytes, int(self.total_bytes * self.min_percent / 100))

    def update(self) -> bool:
        """Read the free space now; returns whether the disk is below the floor."""
        target = self.path.absolute()
        while not target.exists() and target != target.parent:  # a store not created yet
            target = target.parent
        try:
            usage = shutil.disk_usage(target)
            self.free_bytes, self.total_bytes = usage.free, usage.total
        except OSError:
            log.warning("%s: cannot read the free space of %s", self.what, self.path)
        self._read_at = self._monotonic()
        nearly_full = self.free_bytes < self.floor_bytes()
        if nearly_full != self.nearly_full:
            (log.error if nearly_full else log.info)(
                "%s: disk %s: %d bytes free, the floor is %d bytes", self.what,
                "nearly full, refusing new enqueues" if nearly_full else "has room again",
                self.free_bytes, self.floor_bytes(),
            )
        self.nearly_full = nearly_full
        return nearly_full

    def check(self) -> StorageFull | None:
        """:meth:`refusal`, reading the disk again first when the last reading is older than
        ``interval_s`` (for a caller with no thread that keeps the reading current)."""
        if self._read_at is None or self._monotonic() - self._read_at >= self.interval_s:
            self.update()
        return self.refusal()

    def refusal(self) -> StorageFull | None:
        """Why a new enqueue must be refused, by the last reading (None: it may go ahead)."""
        if not self.nearly_full:
            return None
        return StorageFull(
            f"{self.what}: disk nearly full ({self.free_bytes} bytes free, below the floor of "
            f"{self.floor_bytes()} bytes: {self.settings}); nothing was stored, "
            "and new enqueues are refused until space is freed (leasing, settling and deleting go on)"
        )


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


__all__ = ["DiskSpace", "write_failure"]
