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

LMDB keeps its reader table and the id of the last committed transaction in ``lock.mdb``, shared
by every process that has the store open: each holds a read lock (``fcntl``) on its first byte
for as long as it has it open, and only an opener that gets the lock exclusively resets the
table from ``data.mdb``. Replacing ``data.mdb`` (:meth:`Environment.replace_data`) therefore
waits until no other process has the store open (or, forced — a snapshot install — leaves those
reading the old file), and starts a new table with it: a table left over from the old file would
make the writer read the new one by a stale transaction id (an empty database). Every open checks
that ``lock.mdb`` and ``data.mdb`` are still the files at their paths once LMDB has them open, and
opens again if a swap came in between (see :meth:`Environment.replace_data`).

Before LMDB maps the data file, its two meta pages are read here (:func:`check_data_file`): a
file shorter than the pages its newest meta page says are in use would be mapped anyway, and the
first read past its end kills the process with SIGBUS. Such a file, and one LMDB refuses (meta
pages damaged, not an LMDB file), is :class:`~mqstore.errors.Corruption` naming the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb

from mqstore import limits
from mqstore._proc import fork_generation
from mqstore.errors import Corruption, InvalidArgument, MQStoreError, StoreClosed, StoreLocked


class StoreInUse(StoreLocked):
    """Another process (or another store object of this process) has the store open, read-only
    (an inspection command, ``LogStore(readonly=True)``): its database file cannot be replaced
    now. Nothing was changed; try again once it has closed the store."""

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
LMDB_LOCK_FILE = "lock.mdb"
#: How long :meth:`Environment.replace_data` waits, by default, for other processes to close the
#: store (the CLI's inspection commands are short-lived).
REPLACE_WAIT_S = 5.0
#: How often an open or a copy is tried again when another process grows the map meanwhile.
_RESIZE_TRIES = 5
# struct flock of Linux (l_type, l_whence, l_start, l_len, l_pid), for F_GETLK.
_FLOCK = struct.Struct("hhqqi4x")

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


def _lock_holder(fd: int) -> int | None:
    """The pid of a process holding a lock on byte 0 of the file ``fd`` is open on (LMDB's
    "this process has the store open" lock; 0 if its pid is not known here), or None: none, not
    counting this process's own locks, or no way to ask on this platform."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        raw = fcntl.fcntl(fd, fcntl.F_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0))
    except OSError:
        return None
    l_type, _, _, _, pid = _FLOCK.unpack(raw)
    return None if l_type == fcntl.F_UNLCK else max(int(pid), 0)


def _in_use_message(path: Path, holder: str) -> str:
    return (
        f"store {path} is open in {holder} (read-only: `mqstore queue list/status`, `verify` or "
        "`backup --data-dir`, or LogStore(readonly=True)): its database file cannot be replaced while "
        "another opener has it; nothing was changed, try again once that has closed the store"
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


#: Environments open in this process (a database file is replaced only when no other one has it).
_OPEN_ENVS: weakref.WeakSet[Environment] = weakref.WeakSet()
log = logging.getLogger(__name__)

#: Environments holding their store's process lock (a child forked from this process drops its
#: copies of the lock's descriptors: see _drop_inherited_locks).
_LOCK_HOLDERS: weakref.WeakSet[Environment] = weakref.WeakSet()


def _drop_inherited_locks() -> None:
    """In a child after fork(): close the inherited descriptors of every store's lock, without
    unlocking (the lock belongs to the parent, whose descriptor shares it). A child may not use
    the store; before, one that outlived its parent (a pre-forked worker) kept the store locked,
    and the restarted parent got StoreLocked naming itself."""
    for env in list(_LOCK_HOLDERS):
        for attr in ("_lock_fd", "_probe_fd"):
            fd = getattr(env, attr)
            setattr(env, attr, None)
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
        #: lock.mdb, open while LMDB has it open (opened just before LMDB opens it: see
        #: _open_lmdb): asks whether another process has the store open (writable stores). Closed
        #: only after LMDB closed the store: closing any descriptor of a file drops every fcntl
        #: lock this process holds on it, LMDB's own included.
        self._probe_fd: int | None = None
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
        _OPEN_ENVS.add(self)

    def _open_lmdb(self, probe: int | None = None) -> None:
        """Open LMDB on the store; ``probe``: a descriptor of the ``lock.mdb`` to open (its lock
        held by :meth:`replace_data`), which this takes over (closed if the open fails).

        ``lock.mdb`` and ``data.mdb`` are opened here first (``probe``, and a descriptor of the
        data file held for the open): if both paths still name those files once LMDB has opened
        them, LMDB has them, and no swap of :meth:`replace_data` came in between, so the lock
        table LMDB joined (or set up) is that of this data file. Otherwise LMDB may hold a
        ``lock.mdb`` a forced swap replaced (a table nobody else uses, or one of the old file),
        or the old ``data.mdb`` under the new table: it is closed and opened again."""
        data_file, lock_file = self.path / DATA_FILE, self.path / LMDB_LOCK_FILE
        try:
            for _ in range(_RESIZE_TRIES):
                check_data_file(data_file)  # again on each try: a swap may have brought another file
                if probe is None:
                    probe = self._open_probe(lock_file)
                data_fd = _open_or_none(data_file)
                try:
                    self._open_env(((probe, lock_file), (data_fd, data_file)))
                except _SwappedMeanwhile:
                    pass  # opened the files of a swap half done: open again, on the new ones
                except lmdb.MapResizedError:
                    # Another process grew the map between LMDB reading its size and this open's
                    # first transaction (a read-only open beside a running store): open again at
                    # the new size.
                    pass
                except lmdb.InvalidParameterError:
                    # The lock table this open waited for was emptied: the store's writer replaced
                    # the database meanwhile (see replace_data). Open again, on the new lock table.
                    time.sleep(0.05)
                except _DAMAGE as exc:
                    raise Corruption(f"{data_file} is damaged: LMDB cannot open it ({exc})") from None
                except lmdb.Error as exc:
                    raise MQStoreError(f"cannot open store {self.path}: {exc}") from None
                else:
                    self._probe_fd, probe = probe, None
                    return
                finally:
                    if data_fd is not None:
                        os.close(data_fd)
                # LMDB closed its descriptor of lock.mdb (and with it this process's locks on it):
                # the next try opens it anew, at its path.
                if probe is not None:
                    os.close(probe)
                    probe = None
            raise MQStoreError(f"cannot open store {self.path}: its map kept growing, or its database was "
                               f"replaced, while it was opened ({_RESIZE_TRIES} tries); retry")
        finally:
            if probe is not None:
                os.close(probe)

    def _open_probe(self, lock_file: Path) -> int | None:
        """A descriptor of ``lock.mdb`` (created if missing, as LMDB does); None for a read-only
        open that cannot open it (a read-only file system: LMDB then reads without a lock table)."""
        try:
            return os.open(lock_file, (os.O_RDONLY if self.readonly else os.O_RDWR) | os.O_CREAT, 0o600)
        except OSError as exc:
            if self.readonly:
                return None
            raise MQStoreError(f"cannot open store {self.path}: {lock_file}: {exc.strerror}") from None

    def _open_env(self, same_files: tuple[tuple[int | None, Path], ...] = ()) -> None:
        """Open LMDB; ``same_files``: descriptors, each of the file its path named before the
        open, which must still be the one there (see _open_lmdb)."""
        env = self._lmdb_open()
        try:
            if not all(_names(fd, path) for fd, path in same_files):
                raise _SwappedMeanwhile
            env.reader_check()
            dbs: dict[bytes, Any] = {}
            if self.readonly:
                for name in DATABASES:
                    # A read-only open cannot create databases: a store without one of them was
                    # never written by this version, and callers check ``name in dbs``.
                    with contextlib.suppress(lmdb.NotFoundError):
                        dbs[name] = env.open_db(name, create=False)
            else:
                with env.begin(write=True) as txn:
                    for name in DATABASES:
                        dbs[name] = env.open_db(name, txn=txn, create=True)
        except BaseException:
            env.close()
            raise
        self.env, self.dbs = env, dbs

    def _lmdb_open(self) -> Any:
        # A store that already has a bigger map keeps it: LMDB adopts the larger size on open.
        return lmdb.open(
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

    def in_use_elsewhere(self) -> str | None:
        """Who else has this store open — "process N", or another store object of this process —
        or None: nobody (then :meth:`replace_data` would not have to wait). Writable stores only;
        a process opening the store right now is not seen."""
        here = self._open_here()
        if here is not None or self.readonly or self._probe_fd is None:
            return here
        pid = _lock_holder(self._probe_fd)
        return None if pid is None else (f"process {pid}" if pid else "another process")

    def _open_here(self) -> str | None:
        for other in list(_OPEN_ENVS):
            if other is not self and not other._closed and not other.forked() and _same_dir(other.path, self.path):
                return "another store object of this process"
        return None

    def wait_alone(self, wait_s: float) -> None:
        """Wait up to ``wait_s`` seconds until no other process (or store object of this one) has
        the store open; :class:`StoreInUse` naming it if one still has."""
        deadline = time.monotonic() + wait_s
        while (holder := self.in_use_elsewhere()) is not None:
            if time.monotonic() >= deadline:
                raise StoreInUse(_in_use_message(self.path, holder))
            time.sleep(0.05)

    def replace_data(self, data_file: Path, *, wait_s: float = REPLACE_WAIT_S, force: bool = False) -> None:
        """Swap the whole database for ``data_file`` (a verified copy of another store, e.g. a
        snapshot from the leader). The caller must have stopped every writer; readers of this
        process wait.

        Another process that has the store open (read-only) shares LMDB's lock table, which holds
        the id of the last transaction of the OLD file: the swap waits up to ``wait_s`` seconds
        for every other opener to close the store, then swaps and starts a new lock table. When
        one still has it open, :class:`StoreInUse` is raised and the store stays as it was — or,
        with ``force``, the swap is done anyway with a new lock table (a new ``lock.mdb`` in place
        of the old one, which is not emptied: the other process keeps reading the old file,
        consistent but no longer updated, until it reopens the store).

        How each swap meets another process R opening the store (LMDB opens ``data.mdb``, then
        ``lock.mdb``, then locks byte 0 of it; :meth:`_open_lmdb` checks afterwards that both are
        still the files at their paths, else opens again):

        * Alone: this process holds the exclusive lock on ``lock.mdb`` from before the swap until
          its own LMDB, reopened in this process (so granted the lock at once), has set the table
          up again from the new file and shared the lock; the file stays (truncated first).
          R locking meanwhile waits for that, and then joins the new table: if it opened the old
          ``data.mdb`` before the swap, the data path has changed: it opens again. If the reopen
          fails the lock goes with the descriptor; R then finds the table empty (EINVAL, it
          retries) or, exclusive, sets it up from the new file. (Before: ``lock.mdb`` was
          unlinked and the lock dropped before the reopen: R, holding the unlinked file, took its
          lock and kept a table of its own, unseen by the writer.)
        * Forced: a new ``lock.mdb``, locked exclusively by this process, is renamed over the
          old one, then ``data.mdb`` is replaced, then this process reopens as above. R that
          opened the old ``lock.mdb`` finds another at the path afterwards: it opens again; if
          the rename came after its open, so did the data swap: R has the old pair, like a
          reader that had the store open before (it reads the old file, unseen by the writer).
          R that opened the new ``lock.mdb`` waits for the writer's table, set up from the new
          file, and opens the new ``data.mdb`` after it.
        * Readers open before the swap: an alone swap waits for them (or is refused); a forced
          one leaves them the old pair, whole."""
        self.check_open()
        os.chmod(data_file, 0o600)  # a copy is made with the umask's mode: the store stays private
        if self.readonly or self._probe_fd is None:
            raise InvalidArgument(f"store {self.path} is open read-only")
        with self.gate.exclusive():
            self.check_open()
            here = self._open_here()
            if here is not None and not force:
                raise StoreInUse(_in_use_message(self.path, here))
            self.env.close()  # LMDB's lock on lock.mdb goes with it; the probe keeps the file open
            probe: int | None
            probe, self._probe_fd = self._probe_fd, None
            try:
                alone = here is None and _lock_alone(probe, wait_s)
                if not alone and not force:
                    holder = _lock_holder(probe)
                    raise StoreInUse(_in_use_message(self.path, f"process {holder}" if holder else "another process"))
                if alone:
                    # Nobody else has the table: it is set up again by this process's reopen,
                    # before anyone else gets the lock (emptied, in case that reopen fails: an
                    # opener waiting for the lock then fails, and retries, instead of adopting it).
                    os.ftruncate(probe, 0)
                else:
                    holder = _lock_holder(probe)
                    log.warning("store %s: its database file is replaced while %s has the store open (read-only); "
                                "that one goes on reading the old file until it opens the store again", self.path,
                                here or (f"process {holder}" if holder else "another process"))
                    # Those still open keep the old table (on the old file); a new one, locked by
                    # this process until its reopen has set it up, comes first: before the data file.
                    os.close(probe)
                    probe = None
                    probe = _new_lock_file(self.path)
                os.replace(data_file, self.path / DATA_FILE)
                fsync_path(self.path)  # the rename is durable before anything relies on it
            finally:
                # With the probe's lock: LMDB's exclusive lock is granted at once (same process).
                self._open_lmdb(probe)

    def copy_to(self, target: Path) -> None:
        """A consistent, compacted copy of the database (one read transaction) in ``target``.
        Another process growing the map meanwhile (a read-only opener beside a running store)
        is followed, as :meth:`read` does."""
        self.check_open()
        for _ in range(_RESIZE_TRIES):
            with self.gate.reading():
                self.check_open()
                try:
                    self.env.copy(str(target), compact=True)
                    return
                except lmdb.MapResizedError:
                    # LMDB created the copy's file before its read transaction failed
                    (Path(target) / DATA_FILE).unlink(missing_ok=True)
            self._adopt_map_size()
        raise MQStoreError(f"store {self.path}: the map kept growing during the copy ({_RESIZE_TRIES} tries); retry")

    def _adopt_map_size(self) -> None:
        """Another process grew the map: adopt its size. set_mapsize invalidates every read
        transaction of this process, so it waits (outside the reading gate) until the other
        threads' reads have ended, and none starts meanwhile."""
        if self.gate.held():  # a read nested in this thread's own: it would wait for itself
            raise MQStoreError(f"store {self.path}: another process grew the map during this read; retry")
        with self.gate.exclusive():
            self.check_open()
            self.env.set_mapsize(0)

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
            self._adopt_map_size()  # another process grew the map: adopt its size, then read again
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
            if self._probe_fd is not None:  # after LMDB closed (see _probe_fd)
                os.close(self._probe_fd)
                self._probe_fd = None
            self._release_lock()


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class _SwappedMeanwhile(Exception):
    """LMDB opened a ``lock.mdb`` or ``data.mdb`` that is no longer the one at its path."""


def _open_or_none(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDONLY)
    except OSError:
        return None  # missing (a new store): LMDB creates it, or refuses the open


def _names(fd: int | None, path: Path) -> bool:
    """Whether ``path`` names the file ``fd`` is open on (True with no ``fd``: nothing to check)."""
    if fd is None:
        return True
    mine = os.fstat(fd)
    try:
        there = os.stat(path)
    except FileNotFoundError:
        return False
    return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)


def _new_lock_file(store: Path) -> int:
    """Put a new, empty ``lock.mdb`` in place of the store's one (a forced swap), locked
    exclusively (byte 0, as LMDB's first opener) through the descriptor returned: an opener that
    finds it waits until this process's LMDB has set up its table."""
    tmp = store / (LMDB_LOCK_FILE + ".new")
    tmp.unlink(missing_ok=True)  # left by a swap that was killed
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0, os.SEEK_SET)
        os.replace(tmp, store / LMDB_LOCK_FILE)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    return fd


def _lock_alone(fd: int, wait_s: float) -> bool:
    """Take the exclusive lock on byte 0 of lock.mdb (``fd``), as LMDB's first opener does:
    granted only when no other process has the store open. Tries for up to ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0, os.SEEK_SET)
            return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


__all__ = ["DATABASES", "DATA_FILE", "LMDB_LOCK_FILE", "LOCK_FILE", "REPLACE_WAIT_S", "Environment", "StoreInUse",
           "check_data_file", "fsync_path"]
