"""Temporary files and directories an operation owns while it runs (a backup's partial file and
database copy, verify's store copy and replay store): each is locked (flock) by its run, so one
nobody holds was left by a run that was killed, and the next run of that kind removes it."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path


@contextlib.contextmanager
def owned_temporary(parent: Path, prefix: str, *, directory: bool) -> Iterator[tuple[Path, int]]:
    """A new file or directory ``<prefix>XXXXXXXX`` in ``parent``, locked by this run while the
    block runs (yields its path and an open descriptor of it); removed when the block ends."""
    while True:
        if directory:
            path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, dir=parent)
            path = Path(name)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Between its creation and the lock another run may have taken it for a killed run's
            # leftover and removed it: then it is not ours any more, make another.
            ours = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except (BlockingIOError, FileNotFoundError):
            ours = False
        if ours:
            break
        os.close(fd)
    try:
        yield path, fd
    finally:
        try:
            if directory:
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        finally:
            os.close(fd)


def remove_unowned(parent: Path, prefixes: Iterable[str]) -> list[Path]:
    """Remove the files and directories in ``parent`` named with one of ``prefixes`` that no
    running operation holds (left by killed runs); returns them."""
    wanted = tuple(prefixes)
    removed: list[Path] = []
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return removed  # the operation itself reports a directory it cannot use
    for path in entries:
        if not path.name.startswith(wanted):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # its run is still going
        try:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


__all__ = ["owned_temporary", "remove_unowned"]
