"""The LMDB environment of one store: flags, the process lock, map growth, read transactions.

Environment flags, set explicitly (never left to library defaults):

``sync=True``
    fsync the data file on every commit: a commit that returned is on disk.
``metasync=True``
    fsync the meta page too; with ``metasync=False`` the last commit can be lost on power failure.
``writemap=False``
    write through ``write(2)``, not a writable mmap: a stray pointer write cannot reach the file,
    and a full disk is an error returned by commit instead of a SIGBUS.
``meminit=True``
    zero malloc'd pages before writing them: with ``meminit=False`` old heap bytes (decrypted
    mail) could end up in unused parts of pages on disk.
``max_spare_txns=0``
    no cached read transactions: a cached read transaction keeps a reader slot (and so old pages)
    alive; mqstore keeps read transactions short instead.
``readahead=False``
    the log is read by random index more than scanned; readahead wastes page cache.
``lock=True``
    LMDB's own reader/writer locking stays on. On top of it, ``mqstore.lock`` (an exclusive
    ``flock``) keeps a second process from opening the same store for writing.

``reader_check()`` runs at open to clear reader slots left by crashed processes.

Before LMDB maps the data file, its two meta pages are read here (:func:`check_data_file`): a
file shorter than the pages its newest meta page says are in use would be mapped anyway, and the
first read past its end kills the process with SIGBUS. Such a file, and one LMDB refuses (meta
pages damaged, not an LMDB file), is :class:`~mqstore.errors.Corruption` naming the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb

from mqstore import limits
from mqstore._proc import fork_generation
from mqstore.errors import Corruption, InvalidArgument, MQStoreError, StoreClosed, StoreLocked

#: Named databases of a store (see ../shared/DESIGN.md "Storage").
DATABASES = (
    b"log",  # u64 big-endian index -> framed record
    b"meta",  # hard state, configuration, log bounds
    b"keys",  # wrapped namespace keys, KEK check
    b"dicts",  # compression dictionaries (framed, sealed DICTIONARY records)
    b"quarantine",  # u64 big-endian index -> why the record at that index is corrupt
    # Queue state, derived only by applying the log (layouts in mqstore/queue/model.py):
    b"messages",
    b"recipients",
    b"ready",
    b"ready_dom",
    b"leases",
    b"lease_due",
    b"expiry",
    b"retention",
    b"live",
    b"msg_ns",
    b"dedup",
    b"dedup_exp",
    b"stats",
    b"policies",
    b"holds",  # message id + case id -> when and by whom (legal holds)
    b"qmeta",  # derived facts of the applied log (the compliance clock)
    # Audit log (layouts in mqstore/compliance/audit.py), written with the changes it records:
    b"audit",
    b"audit_ckpt",
)
MAX_DBS = 32
LOCK_FILE = "mqstore.lock"


DATA_FILE = "data.mdb"

# LMDB's meta pages (lmdb.h / mdb.c of LMDB 0.9, the format py-lmdb bundles), in the machine's
# byte order: pages 0 and 1 each hold a page header (``mp_pgno``: a word; ``mp_pad``,
# ``mp_flags``, ``mp_lower``, ``mp_upper``: 16 bits each), then ``MDB_meta``: ``mm_magic`` (u32),
# ``mm_version`` (u32), ``mm_address`` and ``mm_mapsize`` (words), ``mm_dbs[2]`` (``MDB_db``:
# ``md_pad`` (u32, in the first one the page size), ``md_flags`` and ``md_depth`` (u16), then five
# words), ``mm_last_pg`` (the last page in use) and ``mm_txnid`` (words). The meta page with the
# higher transaction id is the current one.
_WORD = struct.calcsize("P")
_WORD_FMT = "Q" if _WORD == 8 else "I"
_PAGE_HEADER = _WORD + 8
_META_HEAD = struct.Struct("=II")  # mm_magic, mm_version
_PSIZE_AT = _PAGE_HEADER + 8 + 2 * _WORD
_LAST_PG_AT = _PAGE_HEADER + 8 + 2 * _WORD + 2 * (8 + 5 * _WORD)
_LAST_PG_TXNID = struct.Struct("=" + 2 * _WORD_FMT)
_META_BYTES = _LAST_PG_AT + _LAST_PG_TXNID.size
MDB_MAGIC = 0xBEEFC0DE
MDB_DATA_VERSION = 1
#: LMDB errors that say the file is damaged (others, e.g. a permission denied, are not).
_DAMAGE = (lmdb.InvalidError, lmdb.CorruptedError, lmdb.VersionMismatchError, lmdb.PageNotFoundError,
           lmdb.PanicError, lmdb.BadChecksumError, lmdb.IncompatibleError)


def _meta(page: bytes) -> tuple[int, int, int] | None:
    """(page size, last page in use, transaction id) of a meta page; None if it is not one."""
    if len(page) < _META_BYTES:
        return None
    magic, version = _META_HEAD.unpack_from(page, _PAGE_HEADER)
    if magic != MDB_MAGIC or version != MDB_DATA_VERSION:
        return None
    (psize,) = struct.unpack_from("=I", page, _PSIZE_AT)
    last_pg, txnid = _LAST_PG_TXNID.unpack_from(page, _LAST_PG_AT)
    return int(psize), int(last_pg), int(txnid)


def check_data_file(data_file: Path) -> None:
    """Corruption when ``data_file`` is shorter than its current meta page says it is (the pages
    up to ``mm_last_pg`` are in use: mapping it would end in SIGBUS). A file whose meta pages are
    not LMDB's is left to LMDB to refuse; a missing or empty one is a new store."""
    try:
        with open(data_file, "rb") as f:
            first = _meta(f.read(_META_BYTES))
            if first is None:
                return
            psize = first[0]
            if psize < 512 or psize > 1 << 16 or psize & (psize - 1):
                return  # not a page size: LMDB refuses the file
            f.seek(psize)
            metas = [first, *filter(None, [_meta(f.read(_META_BYTES))])]
            # The size after the meta pages: a writer (beside this reader) extends the file before
            # it writes a meta page naming the new pages.
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return
    _, last_pg, _ = max(metas, key=lambda m: m[2])
    need = (last_pg + 1) * psize
    if size < need:
        raise Corruption(
            f"{data_file} is cut short: {size} bytes, but its database uses {last_pg + 1} pages of {psize} bytes "
            f"({need} bytes); restore it from a backup (or rebuild a cluster node with mqstore recover)"
        )


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory (the names in it: a rename or a new file survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _ReadGate:
    """Lets many read transactions run, but none while the map is being resized.

    LMDB's ``mdb_env_set_mapsize`` may only be called with no transaction active in the process
    (py-lmdb invalidates the open ones), and by one thread at a time. A thread must not ask for
    :meth:`exclusive` while it is inside :meth:`reading` (it would wait for itself).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._resizing = False
        self._mine = threading.local()  # .depth: this thread's readings (nested reads)

    def held(self) -> bool:
        """Whether the calling thread is inside :meth:`reading`."""
        return bool(getattr(self._mine, "depth", 0))

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._readers += 1
        self._mine.depth = getattr(self._mine, "depth", 0) + 1
        try:
            yield
        finally:
            self._mine.depth -= 1
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._resizing:  # one resize at a time
                self._cond.wait()
            self._resizing = True
            while self._readers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._resizing = False
                self._cond.notify_all()


#: Environments holding their store's process lock (a child forked from this process drops its
#: copies of the lock's descriptors: see _drop_inherited_locks).
_LOCK_HOLDERS: weakref.WeakSet[Environment] = weakref.WeakSet()


def _drop_inherited_locks() -> None:
    """In a child after fork(): close the inherited descriptors of every store's lock, without
    unlocking (the lock belongs to the parent, whose descriptor shares it). A child may not use
    the store; before, one that outlived its parent (a pre-forked worker) kept the store locked,
    and the restarted parent got StoreLocked naming itself."""
    for env in list(_LOCK_HOLDERS):
        fd, env._lock_fd = env._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


os.register_at_fork(after_in_child=_drop_inherited_locks)


class Environment:
    """An open LMDB environment with mqstore's flags, databases and process lock."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        map_size: int = limits.MAP_SIZE_BYTES_DEFAULT,
        map_size_max: int = limits.MAP_SIZE_BYTES_MAX,
        readonly: bool = False,
        create: bool = True,
    ) -> None:
        if not isinstance(map_size, int) or not limits.MAP_SIZE_BYTES_MIN <= map_size <= map_size_max:
            raise InvalidArgument(
                f"map_size must be {limits.MAP_SIZE_BYTES_MIN}..{map_size_max} bytes, not {map_size!r}"
            )
        if map_size_max > limits.MAP_SIZE_BYTES_MAX:
            raise InvalidArgument(f"map_size_max must be at most {limits.MAP_SIZE_BYTES_MAX}")
        self.path = Path(path)
        self.readonly = readonly
        self.map_size_max = map_size_max
        self._pid = os.getpid()
        self._generation = fork_generation()
        self._lock_fd: int | None = None
        self._closed = False
        self.gate = _ReadGate()
        self.dbs: dict[bytes, Any] = {}
        if not self.path.exists():
            if readonly or not create:
                raise InvalidArgument(f"store {self.path} does not exist")
            self.path.mkdir(parents=True, mode=0o700)
        elif not self.path.is_dir():
            raise InvalidArgument(f"store path {self.path} exists and is not a directory")
        if not readonly:
            self._take_lock()
        self._map_size = map_size
        try:
            self._open_lmdb()
        except BaseException:
            self._release_lock()
            raise

    def _open_lmdb(self) -> None:
        data_file = self.path / DATA_FILE
        check_data_file(data_file)
        try:
            self._open_env()
        except _DAMAGE as exc:
            raise Corruption(f"{data_file} is damaged: LMDB cannot open it ({exc})") from None
        except lmdb.Error as exc:
            raise MQStoreError(f"cannot open store {self.path}: {exc}") from None

    def _open_env(self) -> None:
        # A store that already has a bigger map keeps it: LMDB adopts the larger size on open.
        self.env = lmdb.open(
            str(self.path),
            map_size=self._map_size,
            subdir=True,
            readonly=self.readonly,
            create=not self.readonly,
            sync=True,
            metasync=True,
            writemap=False,
            meminit=True,
            map_async=False,
            readahead=False,
            max_spare_txns=0,
            max_dbs=MAX_DBS,
            max_readers=256,
            lock=True,
            mode=0o600,
        )
        self.env.reader_check()
        self.dbs = {}
        if self.readonly:
            for name in DATABASES:
                # A read-only open cannot create databases: a store without one of them was
                # never written by this version, and callers check ``name in dbs``.
                with contextlib.suppress(lmdb.NotFoundError):
                    self.dbs[name] = self.env.open_db(name, create=False)
        else:
            with self.env.begin(write=True) as txn:
                for name in DATABASES:
                    self.dbs[name] = self.env.open_db(name, txn=txn, create=True)

    def replace_data(self, data_file: Path) -> None:
        """Swap the whole database for ``data_file`` (a verified copy of another store, e.g. a
        snapshot from the leader). The caller must have stopped every writer; readers wait."""
        self.check_open()
        os.chmod(data_file, 0o600)  # a copy is made with the umask's mode: the store stays private
        with self.gate.exclusive():
            self.env.close()
            os.replace(data_file, self.path / "data.mdb")
            fsync_path(self.path)  # the rename is durable before anything relies on it
            self._open_lmdb()

    def copy_to(self, target: Path) -> None:
        """A consistent, compacted copy of the database (one read transaction) in ``target``."""
        self.check_open()
        with self.gate.reading():
            self.env.copy(str(target), compact=True)

    # --- process lock --------------------------------------------------------------------------

    def forked(self) -> bool:
        """Whether this is a child process forked after the store was opened (it may not use it)."""
        return fork_generation() != self._generation

    def abort(self, txn: Any) -> None:
        """Abort a write transaction. py-lmdb (3.x) makes an abort wait until no other thread is
        inside an LMDB call, which readers scanning in chunks back to back could put off for as
        long as they run (a refused write then held up every write, and close()): new reads wait
        at the gate meanwhile, and the running ones end first, as for a map resize."""
        if self.gate.held():  # this thread reads (it would wait for itself): abort as it is
            txn.abort()
            return
        with self.gate.exclusive():
            txn.abort()

    def _take_lock(self) -> None:
        lock_path = self.path / LOCK_FILE
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if holder == str(os.getpid()):
                raise StoreLocked(f"store {self.path} is already open in this process: use the store object "
                                  "that has it open, or close that one first") from None
            raise StoreLocked(
                f"store {self.path} is open for writing by another process (pid {holder}); stop it first, or "
                "read it without writing (the CLI's inspection commands, or LogStore(path, readonly=True))"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._lock_fd = fd
        _LOCK_HOLDERS.add(self)

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- transactions --------------------------------------------------------------------------

    def check_open(self) -> None:
        if self._closed:
            raise StoreClosed(f"store {self.path} is closed")
        if fork_generation() != self._generation:
            # LMDB environments must never be used across fork(): the child would share locks
            # and the mmap with the parent.
            raise StoreClosed(f"store {self.path} was opened in process {self._pid}; reopen it after fork()")

    @contextlib.contextmanager
    def read(self) -> Iterator[Any]:
        """A short read transaction (never held across a map resize)."""
        self.check_open()
        tries = 3
        for _ in range(tries):
            with self.gate.reading():
                self.check_open()  # closed while this read waited for the gate
                try:
                    txn = self.env.begin(write=False, buffers=False)
                except lmdb.MapResizedError:
                    pass
                else:
                    try:
                        yield txn
                    finally:
                        txn.abort()
                    return
            # Another process grew the map: adopt its size, then read again. set_mapsize
            # invalidates every read transaction of this process, so it waits (outside the
            # reading gate) until the other threads' reads have ended, and none starts meanwhile.
            if self.gate.held():  # a read nested in this thread's own: it would wait for itself
                raise MQStoreError(f"store {self.path}: another process grew the map during this read; retry")
            with self.gate.exclusive():
                self.check_open()
                self.env.set_mapsize(0)
        raise MQStoreError(f"store {self.path}: the map kept growing under this reader ({tries} tries); retry")

    def map_size(self) -> int:
        return int(self.env.info()["map_size"])

    def grow(self) -> int:
        """Double the map (up to ``map_size_max``); returns the new size.

        Called by the writer thread after a ``MapFullError`` aborted its transaction.
        """
        current = self.map_size()
        if current >= self.map_size_max:
            raise lmdb.MapFullError(
                f"store {self.path} reached its maximum map size ({self.map_size_max} bytes)"
            )
        new = min(current * 2, self.map_size_max)
        with self.gate.exclusive():
            self.env.set_mapsize(new)
        return new

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if fork_generation() == self._generation:
            # Reads still running end first (LMDB must not free what they use); new ones see
            # _closed and raise StoreClosed. A thread closing inside its own read would wait
            # for itself: it closes at once instead (its read ends with the environment).
            if self.gate.held():
                self.env.close()
            else:
                with self.gate.exclusive():
                    self.env.close()
            self._release_lock()


__all__ = ["DATABASES", "DATA_FILE", "LOCK_FILE", "Environment", "check_data_file", "fsync_path"]
