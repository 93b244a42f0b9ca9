"""The append-only log on LMDB: records, message records, keys, dictionaries, scans.

``LogStore`` owns one store directory. Writes go through the group-commit writer thread
(:mod:`mqstore.store.writer`) as *write functions* that receive a :class:`WriteContext`; reads use
short read transactions from any thread. Every record read is CRC-checked by the codec; a record
that fails is recorded in the ``quarantine`` table and raised as :class:`Corruption` naming its
index, never reported as absent.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import lmdb

from mqstore import codec, limits, validate
from mqstore.codec import MESSAGE_ID_BYTES, Envelope, Flags, Record, RecordType
from mqstore.crypto.keyring import ACTION_CREATE, SYSTEM_NAMESPACE, KeyEvent, KeyRing
from mqstore.crypto.providers import FileKeyProvider, KeyProvider, create_key_file, kek_fingerprint
from mqstore.crypto.seal import Sealed, Sealer, SealRequest, train_dictionary
from mqstore.diskspace import write_failure
from mqstore.errors import (
    Corruption,
    InvalidArgument,
    MQStoreError,
    NotFound,
    StorageFull,
    Unavailable,
    UnknownKey,
    WrongKey,
)
from mqstore.ids import MessageIdGenerator, format_id
from mqstore.standstill import StandStillWarning
from mqstore.store.env import REPLACE_WAIT_S, Environment
from mqstore.store.writer import Pending, WriteFn, Writer

_FLAG_CONTEXT = int(Flags.CONTEXT)  # a plain int: `int & Flags.X` goes through enum's slow path

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_KEY_FILE = "kek.key"
_U64 = struct.Struct(">Q")
_MAP_GROW_ATTEMPTS = 40  # doubling from 1 MiB reaches 1 TiB in 20 steps; twice that is a bug
_META_FIRST_INDEX = b"log.first"  # lowest index not compacted away
_META_TERM = b"log.term"  # term stamped on records appended by this (single-node) store
_META_DICT = b"dict.current"
_META_CREATED = b"store.created_ms"
_META_STAMP = b"stamp.last_ms"  # the latest time stamped on a batch: stamps never go backwards
# The largest message id issued or seen: a reopened store never issues an id <= it, even if the
# message that had it was deleted and the clock stands still or stepped back.
_META_IDS = b"ids.last"
_META_FORMAT = b"store.format"
_KEYS_KEK_CHECK = b"kek-check"
_KEK_CHECK_PLAINTEXT = b"mqstore key-encryption key check v1"
_KEYS_PREFIX = b"k"
_SHRED_PREFIX = b"s"  # key id -> its SHRED event (the CREATE entry then holds no wrapped key)
_SCAN_CHUNK = 4096  # records per read transaction while scanning: keep readers short


def index_key(index: int) -> bytes:
    """The LMDB key of log index ``index`` (big-endian, so byte order is index order)."""
    return _U64.pack(index)


def key_index(key: bytes) -> int:
    return int(_U64.unpack(key)[0])


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class Appended(NamedTuple):
    index: int  # type: ignore[assignment]  # the log index (shadows tuple.index on purpose)
    message_id: bytes


class Staged(NamedTuple):
    """A message validated and encoded, not yet sealed."""

    envelope: Envelope
    plaintext: bytes  # encoded envelope, [u16 length + request context,] the raw message
    flags: int = 0  # Flags.CONTEXT when the plaintext carries a request context


def key_record_payload(event: KeyEvent, context: bytes = b"") -> bytes:
    """A KEY record's payload: the event, then (if given) u16 length + the request context."""
    return event.encode() + (struct.pack("<H", len(context)) + context if context else b"")


def _seal_request(staged: Staged) -> tuple[int, str, bytes, bytes, int]:
    env = staged.envelope
    return (RecordType.ENQUEUE, env.namespace, env.message_id, staged.plaintext, staged.flags)


class Prepared(NamedTuple):
    """A message validated, encoded and sealed, ready for the writer."""

    message_id: bytes
    envelope: Envelope
    sealed: Sealed


class StoredMessage(NamedTuple):
    index: int  # type: ignore[assignment]
    term: int
    envelope: Envelope
    data: bytes
    context: bytes = b""  # the encoded request context (who enqueued it, when), if recorded


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message to append (see :meth:`LogStore.append_messages`). Times in ms since the epoch."""

    mail_from: str
    recipients: Sequence[str]
    data: bytes
    namespace: str = "default"
    priority: int = 0
    not_before_ms: int = 0
    expires_at_ms: int = 0
    idempotency_key: str | None = None


@dataclass(frozen=True, slots=True)
class ScanReport:
    """Result of :meth:`LogStore.scan`: how many records were read and which are damaged."""

    records_checked: int
    first_index: int
    last_index: int
    corrupt: tuple[tuple[int, str], ...]

    @property
    def clean(self) -> bool:
        return not self.corrupt


class _Batch:
    """State of one writer transaction, shared by the write functions of a batch."""

    __slots__ = ("dict_ids", "first_index", "hooks", "next_index", "pre_commit", "term")

    def __init__(self, next_index: int, term: int) -> None:
        self.next_index = next_index
        self.term = term
        self.hooks: list[Callable[[], None]] = []
        self.pre_commit: list[Callable[[], None]] = []
        self.dict_ids: set[int] = set()  # dictionary ids this transaction allocated
        self.first_index = 0  # the log's first index once committed (0: unchanged)


#: Times :meth:`LogStore.write_messages` seals messages again when a shred took the key they
#: were sealed under in the writer (then Unavailable).
_RESEAL_ATTEMPTS = 4


class _ShreddedMeanwhile(Exception):
    """Records of a write were sealed under a key a shred took away before they were appended:
    the write function refuses, nothing of it is stored."""


class WriteContext:
    """What a write function gets: the (nested) write transaction and log-append helpers.

    A write function must only touch the store through this context and must be re-runnable:
    a full map, or another function of the batch refusing, aborts the transaction and runs the
    batch again. When a function raises, nothing it wrote is kept.
    """

    __slots__ = ("_batch", "dbs", "now_ms", "sealed", "store", "txn")

    def __init__(self, store: LogStore, txn: Any, batch: _Batch, now_ms: int, sealed: list[Sealed]) -> None:
        self.store = store
        self.txn = txn
        self.dbs = store.env.dbs
        self._batch = batch
        self.now_ms = now_ms
        #: What the writer sealed for this request (see ``Writer.submit(seal=...)``), in order.
        self.sealed = sealed

    def key_shredded(self, key_id: int) -> bool:
        """Whether key ``key_id`` is shredded as this transaction sees it: by a commit before it,
        or by a write function earlier in the same group commit (the keyring learns of that one
        only once it commits; the keys table has it at once). The writer seals a whole batch
        before its functions run, so a record sealed under such a key must not be appended."""
        if self.store.keyring.is_shredded(key_id):
            return True
        return self.txn.get(_SHRED_PREFIX + struct.pack(">I", key_id), db=self.dbs[b"keys"]) is not None

    def require_live_keys(self) -> None:
        """Refuse (nothing of this write stored) when a key the writer sealed this request's
        records under is shredded as this transaction sees it (see :meth:`key_shredded`)."""
        for key_id in {sealed.key_id for sealed in self.sealed}:
            if self.key_shredded(key_id):
                raise _ShreddedMeanwhile(f"key {key_id} was shredded while the message(s) were being stored")

    @property
    def next_index(self) -> int:
        return self._batch.next_index

    @property
    def term(self) -> int:
        return self._batch.term

    # Log puts pass (dupdata, overwrite, append, db) positionally: py-lmdb parses keyword
    # arguments noticeably slower (0.8 vs 0.6 us a put), and every record goes through here.
    def append(self, rtype: int, payload: bytes, *, flags: int = 0, key_id: int = 0, dict_id: int = 0) -> int:
        """Append one record at the next index; returns the index."""
        index = self._batch.next_index
        framed = codec.encode_record(rtype, flags, self._batch.term, index, key_id, dict_id, payload)
        if not self.txn.put(_U64.pack(index), framed, True, True, True, self.dbs[b"log"]):
            raise AssertionError(f"log index {index} already exists")
        self._batch.next_index = index + 1
        return index

    def append_many(self, rtype: int, items: Sequence[tuple[int, int, int, bytes]]) -> range:
        """Append records ``(flags, key_id, dict_id, payload)`` of one type; returns their indices."""
        first = self._batch.next_index
        term = self._batch.term
        framed = codec.encode_records(
            [(rtype, f, term, first + i, k, d, p) for i, (f, k, d, p) in enumerate(items)]
        )
        put = self.txn.put
        db = self.dbs[b"log"]
        pack = _U64.pack
        for i, value in enumerate(framed):
            if not put(pack(first + i), value, True, True, True, db):
                raise AssertionError(f"log index {first + i} already exists")
        self._batch.next_index = first + len(framed)
        return range(first, first + len(framed))

    def append_entry(
        self, term: int, index: int, rtype: int, payload: bytes, *, flags: int = 0, key_id: int = 0, dict_id: int = 0
    ) -> None:
        """Append a record whose term and index the caller decided (a replicated log entry).
        It must continue the log: truncate a conflicting suffix first."""
        if index != self._batch.next_index:
            raise AssertionError(f"entry {index} does not continue the log (next is {self._batch.next_index})")
        framed = codec.encode_record(rtype, flags, term, index, key_id, dict_id, payload)
        if not self.txn.put(_U64.pack(index), framed, True, True, True, self.dbs[b"log"]):
            raise AssertionError(f"log index {index} already exists")
        self._batch.next_index = index + 1
        if term > self._batch.term:
            self._batch.term = term

    def append_framed(self, records: Sequence[bytes], first_index: int) -> None:
        """Append records already framed elsewhere (replication): they must continue the log."""
        if first_index != self._batch.next_index:
            raise AssertionError(f"append at {first_index} but the log continues at {self._batch.next_index}")
        db = self.dbs[b"log"]
        for i, value in enumerate(records):
            if not self.txn.put(_U64.pack(first_index + i), value, True, True, True, db):
                raise AssertionError(f"log index {first_index + i} already exists")
        self._batch.next_index = first_index + len(records)

    def truncate_suffix(self, from_index: int) -> int:
        """Delete every record at ``from_index`` or later; returns how many were deleted."""
        first = self.store._first_index
        if from_index < first:
            raise InvalidArgument(f"cannot truncate to {from_index}: the log starts at {first}")
        db = self.dbs[b"log"]
        with self.txn.cursor(db=db) as cur:
            doomed = list(cur.iternext(values=False)) if cur.set_range(_U64.pack(from_index)) else []
        for key in doomed:
            self.txn.delete(key, db=db)
        deleted = len(doomed)
        self._batch.next_index = min(self._batch.next_index, from_index)
        self.store._forget_quarantined(self, from_index, None)
        return deleted

    def set_term(self, term: int) -> None:
        self.txn.put(_META_TERM, _U64.pack(term), db=self.dbs[b"meta"])
        self._batch.term = term

    def get(self, db: bytes, key: bytes) -> bytes | None:
        value = self.txn.get(key, db=self.dbs[db])
        return None if value is None else bytes(value)

    def put(self, db: bytes, key: bytes, value: bytes) -> None:
        self.txn.put(key, value, db=self.dbs[db])

    def delete(self, db: bytes, key: bytes) -> bool:
        return bool(self.txn.delete(key, db=self.dbs[db]))

    def new_dictionary_id(self) -> int:
        """A dictionary id no other dictionary has: not the store's, nor one allocated earlier
        in this transaction (two dictionaries added by one group commit get distinct ids)."""
        taken = self._batch.dict_ids
        dict_id = max(max(self.store.sealer.dictionary_ids(), default=0), max(taken, default=0)) + 1
        taken.add(dict_id)
        return dict_id

    def on_commit(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` in the writer thread once this batch committed (never if it did not).
        A hook that raises is logged: the batch stays committed and its callers are answered."""
        self._batch.hooks.append(hook)

    def before_commit(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` in the writer thread once every function of the batch succeeded, just
        before the commit (and its fsync) starts. The commit may still fail, or a full map may
        run the batch again (and register the hook again): a hook must not raise, must be
        idempotent, and may only publish what does not depend on this transaction being durable."""
        self._batch.pre_commit.append(hook)


class LogStore:
    """An encrypted, compressed, crash-safe append-only log in one directory.

    ``key_provider`` supplies the key-encryption key. Without one, ``key_file`` is read; without
    either, the store uses ``<path>/kek.key``, creating it for a new store with a warning (fine
    for trying mqstore; production keys belong outside the data directory).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        key_provider: KeyProvider | None = None,
        key_file: str | os.PathLike[str] | None = None,
        map_size: int = limits.MAP_SIZE_BYTES_DEFAULT,
        map_size_max: int = limits.MAP_SIZE_BYTES_MAX,
        compression_level: int = limits.ZSTD_LEVEL_DEFAULT,
        readonly: bool = False,
        create: bool = True,
        clock_ms: Callable[[], int] | None = None,
        write_queue_items_max: int = limits.WRITE_QUEUE_ITEMS_MAX,
    ) -> None:
        self.path = Path(path)
        #: Write transactions committed since opening (group commit makes it < writes).
        self.commits = 0
        #: Called with the seconds each transaction commit (its fsyncs) took (metrics); None: not timed.
        self.commit_observer: Callable[[float], None] | None = None
        self.readonly = readonly
        self.clock_ms = clock_ms or _wall_clock_ms
        #: Says so in the log when the clock is behind the latest stamp (None: not watched here).
        self._standstill: StandStillWarning | None = StandStillWarning(f"store {self.path}", log)
        is_new = not (self.path / "data.mdb").exists()
        if is_new and (readonly or not create):
            raise NotFound(f"no store at {self.path}")
        if key_provider is not None and key_file is not None:
            raise InvalidArgument("give key_provider or key_file, not both")
        self.env = Environment(self.path, map_size=map_size, map_size_max=map_size_max, readonly=readonly)
        try:
            if not is_new and not readonly and self._kek_check_record() is None:
                # A first open that failed or was killed before it wrote anything (the key check
                # is the first thing a store holds): still a new store, its default key made now.
                is_new = True
            provider = key_provider or self._default_provider(key_file, is_new)
            self.keyring = KeyRing(provider)
            self.sealer = Sealer(self.keyring, compression_level)
            # Ids carry the queue's time, as the messages' created times do: after the clock is set
            # back, an id from the raw clock made a new message look old to stats() and qshape(),
            # which take ages from ids (a node gives its own clock: see use_clock).
            self.ids = MessageIdGenerator(lambda: self.queue_time_ms())
            #: Held while a key id is chosen and its key written: two threads must never pick one id.
            self.key_lock = threading.RLock()
            # Held by the writer from a commit until the bounds in memory match it (see
            # _missing_inside_bounds); reentrant: an after-commit hook may read the log.
            self._bounds_lock = threading.RLock()
            self._quarantine_mem: dict[int, str] = {}  # found corrupt since opening, and why
            # Quarantine entries queued for the writer or committed, and why: a record found
            # corrupt again is queued again only when its reason is not here (a queued write that
            # ran but did not commit leaves it out again).
            self._quarantine_recorded: dict[int, str] = {}
            self._first_index, self._last_index, self._term = self._load_bounds()
            raw_stamp = self.meta_get(_META_STAMP)
            self._last_stamp_ms = _U64.unpack(raw_stamp)[0] if raw_stamp else 0
            raw_ids = self.meta_get(_META_IDS)
            if raw_ids:
                self.ids.observe(raw_ids)
            self._ids_persisted = self.ids.last
            self._check_kek(is_new)
            self._load_keys_and_dictionaries()
            self.writer: Writer | None = None
            #: Creates a namespace's key when it has none. A replicated node replaces it: its
            #: keys are created by committing a KEY entry through consensus, not appended here.
            self.key_creator: Callable[[str], object] | None = None
            if not readonly:
                self.writer = Writer(
                    self._run_batch, name=f"mqstore-writer:{self.path.name}", queue_items_max=write_queue_items_max
                )
        except BaseException:
            self.env.close()
            raise

    # --- opening ---------------------------------------------------------------------------------

    def _default_provider(self, key_file: str | os.PathLike[str] | None, is_new: bool) -> KeyProvider:
        if key_file is not None:
            return FileKeyProvider(key_file)
        default = self.path / DEFAULT_KEY_FILE
        if is_new and not default.exists():
            create_key_file(default)
            warnings.warn(
                f"mqstore created a key-encryption key in {default}, inside the data directory: "
                "fine for trying mqstore, but production keys belong elsewhere (pass key_file= or a "
                "key provider), so that a copy of the data is not a copy of the key",
                stacklevel=4,
            )
        return FileKeyProvider(default)

    def _load_bounds(self) -> tuple[int, int, int]:
        with self.env.read() as txn:
            raw_first = txn.get(_META_FIRST_INDEX, db=self.env.dbs[b"meta"])
            first = _U64.unpack(raw_first)[0] if raw_first else 1
            raw_term = txn.get(_META_TERM, db=self.env.dbs[b"meta"])
            term = _U64.unpack(raw_term)[0] if raw_term else 0
            last = first - 1
            if b"log" in self.env.dbs:
                with txn.cursor(db=self.env.dbs[b"log"]) as cur:
                    if cur.last():
                        last = max(last, key_index(cur.key()))
        return first, last, term

    def _kek_check_record(self) -> bytes | None:
        with self.env.read() as txn:
            raw = txn.get(_KEYS_KEK_CHECK, db=self.env.dbs[b"keys"]) if b"keys" in self.env.dbs else None
        return None if raw is None else bytes(raw)

    def _check_kek(self, is_new: bool) -> None:
        provider = self.keyring.provider
        #: Names the KEK without revealing it (empty: the provider cannot say); a replicated node
        #: sends it with its Raft messages and refuses a peer whose KEK differs.
        self.kek_fingerprint = kek_fingerprint(provider)
        raw = self._kek_check_record()
        if raw is None:
            if self.readonly:
                raise NotFound(f"{self.path} is not an mqstore store (no key check record)")
            check = provider.wrap(_KEK_CHECK_PLAINTEXT, _KEYS_KEK_CHECK)
            with self.env.env.begin(write=True) as txn:
                txn.put(_KEYS_KEK_CHECK, check, db=self.env.dbs[b"keys"])
                txn.put(_META_FORMAT, bytes([codec.FORMAT_VERSION]), db=self.env.dbs[b"meta"])
                txn.put(_META_CREATED, _U64.pack(self.clock_ms()), db=self.env.dbs[b"meta"])
            return
        # Only wrap/unwrap is required of a provider (a KMS client): its description is optional,
        # and a wrong key may raise its own error (cryptography's InvalidTag, a KMS exception).
        description = getattr(provider, "description", type(provider).__name__)
        failure: Exception | None = None
        try:
            ok = provider.unwrap(bytes(raw), _KEYS_KEK_CHECK) == _KEK_CHECK_PLAINTEXT
        except WrongKey:
            ok = False
        except Exception as exc:
            ok, failure = False, exc
        if failure is not None and str(failure):
            raise WrongKey(
                f"the key provider {description} cannot open the key check of store {self.path} "
                f"({type(failure).__name__}: {failure}): its key-encryption key is not the one the store was "
                "created with, or the provider failed; nothing was read or written"
            ) from failure
        if not ok:
            raise WrongKey(
                f"the key-encryption key from {description} is not the one store {self.path} "
                "was created with; nothing was read or written"
            ) from failure

    def _load_keys_and_dictionaries(self) -> None:
        with self.env.read() as txn:
            events = [
                KeyEvent.decode(bytes(v))
                for k, v in txn.cursor(db=self.env.dbs[b"keys"])
                if k[:1] in (_KEYS_PREFIX, _SHRED_PREFIX) and len(k) == 5
            ]
            dict_records = [bytes(v) for _, v in txn.cursor(db=self.env.dbs[b"dicts"])]
            raw_dict = txn.get(_META_DICT, db=self.env.dbs[b"meta"])
        for event in sorted(events, key=lambda e: (e.action != ACTION_CREATE, e.key_id)):
            self.keyring.apply(event)
        for framed in dict_records:
            record = codec.decode_record(framed)
            opened = self.sealer.open(record)
            self.sealer.add_dictionary(_dict_id_of(opened.message_id), opened.plaintext)
        if raw_dict:
            self.sealer.use_dictionary(int(_U64.unpack(raw_dict)[0]))

    # --- writing -----------------------------------------------------------------------------------

    def _writer(self) -> Writer:
        self.env.check_open()
        if self.writer is None:
            raise InvalidArgument(f"store {self.path} is open read-only")
        return self.writer

    def write(
        self, fn: WriteFn[T], *, size: int = 0, seal: list[SealRequest] | None = None
    ) -> T:
        """Run ``fn(ctx)`` in the next group commit; returns once it is durable (or raises).

        ``seal`` lists ``(record type, namespace, message id, plaintext)`` for the writer to seal
        first (batched with the other requests); ``fn`` finds the results in ``ctx.sealed``.
        """
        return self._writer().write(fn, size=size, seal=seal)

    def submit(
        self,
        fn: WriteFn[T],
        *,
        size: int = 0,
        callback: Callable[[Pending[T]], None] | None = None,
        seal: list[SealRequest] | None = None,
    ) -> Pending[T]:
        """Like :meth:`write` but returns at once; wait on the result or pass a callback.

        ``seal`` lists ``(record type, namespace, message id, plaintext)`` for the writer to seal
        before running ``fn``, which finds the results in ``ctx.sealed``.
        """
        return self._writer().submit(fn, size=size, callback=callback, seal=seal)

    def _run_batch(self, batch: list[Pending[Any]]) -> None:
        """Run a batch of write functions in one transaction and commit it (one fsync).

        All functions share the transaction. If one raises, the transaction is aborted, that
        function gets its exception, and the batch runs again without it: a refused write leaves
        no trace, and the others still commit together. (Nested transactions would do the same
        per function, but each one releases and re-takes the GIL twice, which under many callers
        costs more than the rare re-run.) If the map is full, it grows and the batch runs again;
        if it cannot grow any more (``map_size_max``), the batch fails with StorageFull.

        Keys created by the batch's functions are staged in the keyring (seen by this thread
        only): published once the transaction committed, discarded whenever it did not (a re-run
        stages them again), so no key the store did not commit is ever used.

        Requests that asked for sealing are sealed first, all in one call: one thread compressing
        and encrypting a batch beats many caller threads each doing a little, because CPython's
        threads hand the GIL back and forth at every zstd call (measured: 16 threads seal about
        3x slower in total than one).
        """
        env = self.env.env
        self._seal_batch(batch)
        live = [item for item in batch if item.error is None]
        grow_attempts = 0
        while live:
            state = _Batch(self._last_index + 1, self._term)
            # The batch's time stamp: a wall clock set back (or a restart on a machine whose
            # clock is behind) must not move time backwards for what the writer decides.
            clock_ms = self.clock_ms()
            if self._standstill is not None:
                self._standstill.check(clock_ms, self._last_stamp_ms)
            now_ms = max(clock_ms, self._last_stamp_ms)
            failed: Pending[Any] | None = None
            committed = False
            try:
                try:
                    txn = env.begin(write=True)
                    try:
                        for item in live:
                            try:
                                item.result = item.fn(WriteContext(self, txn, state, now_ms, item.sealed))
                            except lmdb.MapFullError:
                                raise
                            except Exception as exc:
                                item.error = exc
                                failed = item
                                break
                        if failed is None:
                            if now_ms != self._last_stamp_ms:
                                txn.put(_META_STAMP, _U64.pack(now_ms), db=self.env.dbs[b"meta"])
                            ids_last = self.ids.last
                            if ids_last != self._ids_persisted:
                                txn.put(_META_IDS, ids_last.to_bytes(16, "big"), db=self.env.dbs[b"meta"])
                            for hook in state.pre_commit:
                                hook()
                            t0 = time.perf_counter()
                            self._bounds_lock.acquire()
                            try:
                                txn.commit()
                            except BaseException:
                                self._bounds_lock.release()
                                raise
                            committed = True
                        else:
                            self.env.abort(txn)
                    except BaseException:
                        if not committed:
                            self.env.abort(txn)
                        raise
                except lmdb.MapFullError:
                    grow_attempts += 1
                    if grow_attempts > _MAP_GROW_ATTEMPTS:
                        raise AssertionError("the map kept filling up after growing it repeatedly") from None
                    try:
                        new_size = self.env.grow()
                    except lmdb.MapFullError as exc:
                        # map_size_max reached: this batch cannot be stored; the store goes on (acks,
                        # deletes and compaction free pages that later writes reuse).
                        full = StorageFull(
                            f"write failed, nothing was committed: the store reached its maximum map size "
                            f"({self.env.map_size_max} bytes, map_size_max): {exc}"
                        )
                        log.error("store %s: %s", self.path, full)
                        for item in live:
                            item.result = None
                            item.error = full
                        return
                    log.info("store %s: map full, grown to %d bytes; retrying the batch", self.path, new_size)
                    continue
                except lmdb.PanicError:
                    # LMDB could not write a meta page and refuses every later write of this
                    # environment: the writer stops (WriterFailed: "reopen the store"), rather than
                    # failing every write one by one with the same words as a full disk.
                    raise
                except lmdb.Error as exc:
                    # Disk full, I/O error: nothing of this batch is committed; every caller hears it.
                    error = write_failure(self.env.path / "data.mdb", exc, sum(item.size for item in live))
                    log.error("store %s: %s", self.path, error)
                    for item in live:
                        item.result = None
                        item.error = error
                    return
            finally:
                if not committed:
                    # Keys the batch's functions staged leave no trace: the batch failed, runs
                    # again (a refused request, a grown map), or the writer stops.
                    self.keyring.discard_staged()
            if failed is not None:
                live.remove(failed)
                for item in live:
                    item.result = None
                continue
            try:
                self._after_commit(state, now_ms, ids_last, time.perf_counter() - t0)
            finally:
                self._bounds_lock.release()
            return

    def _after_commit(self, state: _Batch, now_ms: int, ids_last: int, commit_s: float) -> None:
        """Publish what a committed batch changed. Nothing here may fail the batch: it is
        durable, and its callers must hear so (a failing hook is logged, the others still run)."""
        self.keyring.publish_staged()
        self.commits += 1
        self._last_stamp_ms = now_ms
        self._ids_persisted = ids_last
        self._last_index = state.next_index - 1
        if state.first_index > self._first_index:
            self._first_index = state.first_index
        self._term = state.term
        observer = self.commit_observer
        if observer is not None:
            try:
                observer(commit_s)
            except Exception:
                log.exception("store %s: the commit observer failed", self.path)
        for hook in state.hooks:
            try:
                hook()
            except Exception:
                log.exception("store %s: an action after a committed write failed (the write is committed)",
                              self.path)

    def _seal_batch(self, batch: list[Pending[Any]]) -> None:
        """Seal what the batch's requests asked for, in one call (compression uses every core);
        a request that cannot be sealed fails alone."""
        wanting = [item for item in batch if item.seal]
        if not wanting:
            return
        try:
            sealed = self.sealer.seal_many([req for item in wanting for req in item.seal or ()])
        except Exception:
            # Somebody's request is bad: seal each one alone so only that request fails.
            for item in wanting:
                try:
                    item.sealed = self.sealer.seal_many(item.seal or [])
                except Exception as exc:
                    item.error = exc
            return
        offset = 0
        for item in wanting:
            n = len(item.seal or ())
            item.sealed = sealed[offset : offset + n]
            offset += n

    def append(
        self, rtype: int, payloads: Sequence[bytes], *, flags: int = 0, key_id: int = 0, dict_id: int = 0
    ) -> list[int]:
        """Append records of type ``rtype`` (unsealed payloads) durably; returns their indices."""
        if not isinstance(payloads, (list, tuple)) or not payloads:
            raise InvalidArgument("payloads must be a non-empty list of bytes")
        if len(payloads) > limits.APPEND_RECORDS_MAX:
            raise InvalidArgument(f"{len(payloads)} records in one append; the limit is {limits.APPEND_RECORDS_MAX}")
        items = [(flags, key_id, dict_id, p) for p in payloads]
        # Validate by framing once here, in the caller's thread, so bad input fails before the
        # writer sees it (the writer frames again with the real indices).
        codec.encode_records([(rtype, flags, 0, 1, key_id, dict_id, p) for p in payloads])
        size = sum(len(p) for p in payloads)
        return list(self.write(lambda ctx: ctx.append_many(rtype, items), size=size))

    # --- messages ------------------------------------------------------------------------------------

    def stage_messages(self, messages: Sequence[NewMessage], context: bytes = b"") -> list[Staged]:
        """Validate messages and encode their envelopes (in the caller's thread; no state changes
        except creating a namespace's first key). Raises InvalidArgument naming the bad field.

        ``context`` (an encoded request context) is sealed with each message, between envelope
        and body, so every replica applying it knows who enqueued it and when."""
        if len(context) > 0xFFFF:
            raise InvalidArgument("request context too large")
        ctx_block = struct.pack("<H", len(context)) + context if context else b""
        flags = int(Flags.CONTEXT) if context else 0
        if not isinstance(messages, (list, tuple)) or not messages:
            raise InvalidArgument("messages must be a non-empty list")
        if len(messages) > limits.APPEND_RECORDS_MAX:
            raise InvalidArgument(f"{len(messages)} messages in one call; the limit is {limits.APPEND_RECORDS_MAX}")
        # The queue's time, as the writer stamps entries: a clock set back must not make a new
        # message older than those already queued (lease order) nor move its idempotency window.
        now = self.queue_time_ms()
        staged = []
        encode = codec.encode_envelope
        integer = validate.integer
        ids = self.ids.next_many(len(messages))
        for i, m in enumerate(messages):
            if not isinstance(m, NewMessage):
                raise InvalidArgument(f"messages[{i}] must be a NewMessage, not {type(m).__name__}")
            envelope = Envelope(
                ids[i],
                validate.namespace(m.namespace),
                validate.address(m.mail_from, "mail_from", allow_null=True),
                validate.recipients(m.recipients),
                integer(m.priority, "priority", limits.PRIORITY_MIN, limits.PRIORITY_MAX),
                now,
                integer(m.not_before_ms, "not_before_ms", 0, limits.TIME_MS_MAX),
                integer(m.expires_at_ms, "expires_at_ms", 0, limits.TIME_MS_MAX),
                validate.idempotency_key(m.idempotency_key),
            )
            staged.append(Staged(envelope, encode(envelope) + ctx_block + validate.data(m.data), flags))
        self.ensure_keys(sorted({st.envelope.namespace for st in staged}))  # key ids in a predictable order
        return staged

    def prepare_messages(self, messages: Sequence[NewMessage]) -> list[Prepared]:
        """Validate, encode and seal messages in the caller's thread (for callers that ship
        sealed records elsewhere; :meth:`append_messages` seals in the writer instead)."""
        staged = self.stage_messages(messages)
        sealed = self.sealer.seal_many([_seal_request(st) for st in staged])
        return [Prepared(st.envelope.message_id, st.envelope, sl) for st, sl in zip(staged, sealed, strict=True)]

    def append_messages(self, messages: Sequence[NewMessage]) -> list[Appended]:
        """Append messages as ENQUEUE records in one durable commit (compressed, encrypted).

        The caller's thread validates; the writer compresses and encrypts the whole group-commit
        batch at once (CPython threads that each compress a little contend for the GIL so much
        that 16 of them seal slower than one), then appends and commits.
        """
        staged, indices = self.write_messages(
            lambda: self.stage_messages(messages), lambda ctx, _staged: ctx.append_many(RecordType.ENQUEUE, ctx.sealed),
            size=lambda staged: sum(len(st.plaintext) for st in staged))
        return [Appended(i, st.envelope.message_id) for i, st in zip(indices, staged, strict=True)]

    def write_messages(
        self,
        stage: Callable[[], list[Staged]],
        fn: Callable[[WriteContext, list[Staged]], T],
        *,
        size: Callable[[list[Staged]], int],
    ) -> tuple[list[Staged], T]:
        """Stage messages (``stage()``: validated, encoded), have the writer seal them and run
        ``fn(ctx, staged)`` in its group commit, the sealed records in ``ctx.sealed``; returns the
        staged messages and what ``fn`` returned. Every enqueue goes this way.

        The writer seals a whole batch before its functions run, so a shred earlier in the same
        group commit (or in the one just before, which may leave the namespace no key to seal
        under) can take the key away: then nothing is stored, and the messages are staged and
        sealed again under the namespace's next key (staging creates one when it has none), up to
        ``_RESEAL_ATTEMPTS`` times, then Unavailable."""
        attempt = 0
        while True:
            attempt += 1
            staged = stage()

            def run(ctx: WriteContext, staged: list[Staged] = staged) -> T:
                ctx.require_live_keys()
                return fn(ctx, staged)

            try:
                return staged, self.write(run, size=size(staged), seal=[_seal_request(st) for st in staged])
            except (_ShreddedMeanwhile, UnknownKey) as exc:
                if isinstance(exc, UnknownKey) and all(self.keyring.current_key_id(st.envelope.namespace) is not None
                                                       for st in staged):
                    raise  # not a key a shred took away
                if attempt >= _RESEAL_ATTEMPTS:
                    raise Unavailable(f"{exc}: nothing was stored, enqueue it again", not_applied=True) from exc
                log.info("%s; sealing the message(s) again under the namespace's next key", exc)

    def append_message(self, **fields: Any) -> Appended:
        return self.append_messages([NewMessage(**fields)])[0]

    def queue_time_ms(self) -> int:
        """The queue's time, which new messages are created at: the clock, but never earlier than
        the latest stamp (a node replaces this with its own, see :meth:`use_clock`)."""
        return max(self.clock_ms(), self._last_stamp_ms)

    def use_clock(self, clock_ms: Callable[[], int], queue_time_ms: Callable[[], int]) -> None:
        """Take times (message ids, batch stamps) from ``clock_ms`` from now on: a node gives its
        clock corrected to the voters' (see mqstore/node/clocks.py). The node's entries carry the
        queue's time (``queue_time_ms``: its latest applied stamp, or its clock when later), so
        the node, not the store, watches for a clock behind it; this store's own batch stamps
        are not the queue's time there."""
        self.clock_ms = clock_ms
        self.ids.clock_ms = clock_ms
        self.queue_time_ms = queue_time_ms  # type: ignore[method-assign]
        self._standstill = None

    def open_message(self, record: Record, message_id: bytes | None = None) -> StoredMessage:
        """Decrypt and decode an ENQUEUE record; with ``message_id`` (the message the state tables
        say is at this index), a record sealed for another message is Corruption: the AES-GCM tag
        binds the payload to the message id it carries, but whole records moved to other indices
        (re-framed by someone without the key) still open — as the wrong message.

        A record whose sealed content is damaged (authentication tag, framing inside the seal,
        envelope) raises Corruption naming its index and is quarantined like a bad CRC. A key
        that is shredded (KeyShredded), unknown (UnknownKey) or not opened by the KEK (WrongKey)
        says nothing about the record and quarantines nothing."""
        if record.type != RecordType.ENQUEUE:
            raise InvalidArgument(f"log index {record.index} is a {_type_name(record.type)} record, not a message")
        try:
            stored = self._open_message(record)
            if message_id is not None and stored.envelope.message_id != message_id:
                raise Corruption(f"holds message {format_id(stored.envelope.message_id)}, not "
                                 f"{format_id(message_id)}: log records were moved", record.index)
            return stored
        except Corruption as exc:
            # Only errors about this record's bytes name its index (a damaged key's do not).
            if exc.index is not None and exc.index == record.index and record.index >= 1:
                self._record_corrupt(record.index, exc.reason)
            raise

    def _open_message(self, record: Record) -> StoredMessage:
        opened = self.sealer.open(record)
        try:
            envelope, used = codec.decode_envelope(opened.plaintext)
        except Corruption as exc:
            raise exc.with_index(record.index) from None
        if envelope.message_id != opened.message_id or envelope.namespace != opened.namespace:
            raise Corruption("envelope does not match the sealed message id or namespace", record.index)
        context = b""
        if record.flags & _FLAG_CONTEXT:
            plain = opened.plaintext
            if len(plain) < used + 2:
                raise Corruption("sealed message: request context truncated", record.index)
            (n,) = struct.unpack_from("<H", plain, used)
            context = plain[used + 2 : used + 2 + n]
            used += 2 + n
            if len(context) != n:
                raise Corruption("sealed message: request context truncated", record.index)
        return StoredMessage(record.index, record.term, envelope, opened.plaintext[used:], context)

    def read_message(self, index: int, message_id: bytes | None = None) -> StoredMessage:
        """The message whose ENQUEUE record is at ``index``; with ``message_id``, checked to be that
        message (see :meth:`open_message`)."""
        return self.open_message(self.read(index), message_id)

    # --- keys and dictionaries -----------------------------------------------------------------

    def ensure_keys(self, namespaces: Iterable[str]) -> None:
        """Create a key for every namespace that has none yet (one durable commit each)."""
        for ns in namespaces:
            if self.keyring.current_key_id(ns) is None:
                with self.key_lock:  # two threads must not both create a namespace's first key
                    if self.keyring.current_key_id(ns) is None:
                        (self.key_creator or self.rotate_key)(ns)

    def rotate_key(self, namespace: str) -> int:
        """Add a new key for ``namespace``; new records use it, old ones keep theirs. Returns its id."""
        if namespace != SYSTEM_NAMESPACE:
            validate.namespace(namespace)
        if len(self.keyring.key_ids(namespace)) >= limits.KEYS_PER_NAMESPACE_MAX:
            raise InvalidArgument(f"namespace {namespace!r} has {limits.KEYS_PER_NAMESPACE_MAX} keys already")
        with self.key_lock:  # the id is chosen here: no other key may take it before this one commits
            event = self.keyring.new_key_event(namespace, self.clock_ms())

            def fn(ctx: WriteContext) -> int:
                self.apply_key_event(ctx, event)
                return event.key_id

            return self.write(fn)

    def apply_key_event(self, ctx: WriteContext, event: KeyEvent, context: bytes = b"") -> int:
        """Append a KEY record for ``event`` (followed by the request ``context`` when given) and
        record it in the key table; returns the record's index. See :meth:`store_key_event`."""
        self.keyring.check_applicable(event)
        index = ctx.append(RecordType.KEY, key_record_payload(event, context))
        self.store_key_event(ctx, event)
        return index

    def store_key_event(self, ctx: WriteContext, event: KeyEvent) -> None:
        """Record a key event in the key table. A new key is usable at once (later records of
        the same transaction may be sealed under it, and a replica may apply both together);
        a shred replaces the wrapped key with nothing and takes effect when the shred commits."""
        kid = struct.pack(">I", event.key_id)
        if event.action == ACTION_CREATE:
            ctx.put(b"keys", _KEYS_PREFIX + kid, event.encode())
            if event.key_id not in self.keyring.key_ids():
                # Seen by this transaction at once, by everybody once it commits; forgotten if
                # it does not (a re-run of the batch stages it again).
                self.keyring.stage(event)
        else:
            created = self.keyring.event(event.key_id)
            gone = KeyEvent(ACTION_CREATE, created.key_id, created.namespace, created.created_at_ms, b"")
            ctx.put(b"keys", _KEYS_PREFIX + kid, gone.encode())
            ctx.put(b"keys", _SHRED_PREFIX + kid, event.encode())
            ctx.on_commit(lambda: self.keyring.apply(event) if not self.keyring.is_shredded(event.key_id) else None)

    def add_dictionary(self, data: bytes) -> int:
        """Store a zstd dictionary (sealed, replicated as a DICTIONARY record); returns its id.

        The dictionary is not used until :meth:`use_dictionary` is called with its id.
        """
        if not isinstance(data, bytes) or not 0 < len(data) <= limits.DICTIONARY_BYTES_MAX:
            raise InvalidArgument(f"a dictionary is 1..{limits.DICTIONARY_BYTES_MAX} bytes")
        self.ensure_keys([SYSTEM_NAMESPACE])

        def fn(ctx: WriteContext) -> int:
            dict_id = ctx.new_dictionary_id()
            sealed = self.sealer.seal(RecordType.DICTIONARY, SYSTEM_NAMESPACE, _dict_message_id(dict_id), data)
            index = ctx.append(RecordType.DICTIONARY, sealed.payload, flags=sealed.flags,
                               key_id=sealed.key_id, dict_id=sealed.dict_id)
            framed = codec.encode_record(RecordType.DICTIONARY, sealed.flags, ctx.term, index,
                                         sealed.key_id, sealed.dict_id, sealed.payload)
            ctx.put(b"dicts", struct.pack(">I", dict_id), framed)
            ctx.on_commit(lambda: self.sealer.add_dictionary(dict_id, data))
            return dict_id

        return self.write(fn)

    def train_dictionary(self, samples: list[bytes], size_bytes: int = 112_640) -> int:
        """Train a dictionary from sample messages, store it, and return its id (not yet in use)."""
        return self.add_dictionary(train_dictionary(samples, size_bytes))

    def use_dictionary(self, dict_id: int) -> None:
        """Compress new records with dictionary ``dict_id`` (0: none). Persisted."""
        if dict_id != 0 and dict_id not in self.sealer.dictionary_ids():
            raise UnknownKey(f"dictionary id {dict_id} is not known to this store")

        def fn(ctx: WriteContext) -> None:
            ctx.put(b"meta", _META_DICT, _U64.pack(dict_id))
            ctx.on_commit(lambda: self.sealer.use_dictionary(dict_id))

        self.write(fn)

    # --- reading -------------------------------------------------------------------------------------

    @property
    def first_index(self) -> int:
        """Lowest index still in the log (compaction removes what is below)."""
        return self._first_index

    @property
    def last_index(self) -> int:
        """Highest committed index (``first_index - 1`` when the log is empty)."""
        return self._last_index

    def _decode(self, raw: bytes | None, index: int) -> Record:
        if raw is None:
            if self._first_index <= index <= self._last_index and self._missing_inside_bounds(index):
                # Inside the log's bounds a record can only be missing if something deleted it
                # behind mqstore's back: that is damage, not absence.
                self._record_corrupt(index, "record missing from the log")
                raise Corruption("record missing from the log", index)
            raise NotFound(f"log index {index} is not in the log ({self._first_index}..{self._last_index})")
        try:
            return codec.decode_record(raw, index)
        except Corruption as exc:
            self._record_corrupt(index, exc.reason)
            raise exc.with_index(index) from None

    def _missing_inside_bounds(self, index: int) -> bool:
        """A record inside the bounds known in memory was absent from a read: is it still inside
        them once the writer published every commit that read could have seen? The writer holds
        ``_bounds_lock`` from a commit until the bounds in memory are updated (compaction moves
        the first index, truncation the last one), so a read that raced with such a commit
        finds the record below or above the bounds now: absent (NotFound), not damaged."""
        with self._bounds_lock:
            return self._first_index <= index <= self._last_index

    @staticmethod
    def frame(record: Record) -> bytes:
        """The stored (framed, CRC'd) bytes of ``record``."""
        return codec.encode_record(*record)

    def decode_raw(self, raw: bytes | None, index: int) -> Record:
        """Decode bytes read from the ``log`` table at ``index`` (CRC-checked; quarantined and
        raised as Corruption when damaged; NotFound when absent below or above the log)."""
        return self._decode(raw, index)

    def read(self, index: int) -> Record:
        """The record at ``index`` (CRC-verified)."""
        if isinstance(index, bool) or not isinstance(index, int) or index < 1:
            raise InvalidArgument(f"a log index is an integer >= 1, not {index!r}")
        with self.env.read() as txn:
            raw = txn.get(_U64.pack(index), db=self.env.dbs[b"log"])
        return self._decode(raw, index)

    def read_range(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Record]:
        """Records ``lo <= index < hi`` in order (at least one if any, then up to ``max_bytes``)."""
        if lo < self._first_index or hi > self._last_index + 1 or lo > hi:
            raise NotFound(
                f"range {lo}..{hi} is outside the log ({self._first_index}..{self._last_index + 1})"
            )
        hi = min(hi, lo + limits.READ_RANGE_RECORDS_MAX)
        out: list[Record] = []
        total = 0
        with self.env.read() as txn:
            get = txn.get
            db = self.env.dbs[b"log"]
            for index in range(lo, hi):
                raw = get(_U64.pack(index), db=db)
                record = self._decode(raw, index)
                total += len(record.payload) + codec.HEADER_SIZE
                if out and max_bytes is not None and total > max_bytes:
                    break
                out.append(record)
        return out

    def term_at(self, index: int) -> int:
        return self.read(index).term

    def iter_records(self, lo: int | None = None, chunk: int = _SCAN_CHUNK) -> Iterator[Record]:
        """Iterate the log from ``lo`` in chunks (each chunk its own short read transaction)."""
        index = self._first_index if lo is None else lo
        while index <= self._last_index:
            batch = self.read_range(index, min(index + chunk, self._last_index + 1))
            yield from batch
            index = batch[-1].index + 1

    # --- maintenance -----------------------------------------------------------------------------

    def truncate_suffix(self, from_index: int) -> int:
        """Delete every record at ``from_index`` or later (consensus: conflicting entries)."""
        return self.write(lambda ctx: ctx.truncate_suffix(from_index))

    def delete_prefix(self, upto_index: int, keep: Iterable[int] = ()) -> int:
        """Delete records below ``upto_index`` except those in ``keep`` (compaction)."""
        if upto_index > self._last_index + 1:
            raise InvalidArgument(f"cannot compact to {upto_index}: the log ends at {self._last_index}")
        keep_set = set(keep)

        def fn(ctx: WriteContext) -> int:
            db = ctx.dbs[b"log"]
            doomed = []
            with ctx.txn.cursor(db=db) as cur:
                for key in cur.iternext(values=False):
                    index = key_index(key)
                    if index >= upto_index:
                        break
                    if index not in keep_set:
                        doomed.append(key)
            for key in doomed:
                ctx.txn.delete(key, db=db)
            deleted = len(doomed)
            self._advance_first_index(ctx, upto_index)
            return deleted

        return self.write(fn)

    def _advance_first_index(self, ctx: WriteContext, new_first: int) -> None:
        """Records below ``new_first`` were compacted away (by ``ctx``'s transaction): move the
        log's first index there, on disk and (once committed) in memory, and forget quarantine
        entries of records no longer in the log."""
        new_first = max(self._first_index, new_first)
        ctx.put(b"meta", _META_FIRST_INDEX, _U64.pack(new_first))
        self._forget_quarantined(ctx, 0, new_first)
        ctx._batch.first_index = max(ctx._batch.first_index, new_first)  # set with the commit

    def _forget_quarantined(self, ctx: WriteContext, lo: int, hi: int | None) -> None:
        """Drop the quarantine entries of indices ``lo <= index < hi`` (None: no upper end) that
        have no record in the log any more (compacted away, truncated): a record that is not in
        the log is not damaged. Kept records (compaction keeps some) stay quarantined."""
        if b"quarantine" not in ctx.dbs:
            return
        qdb, ldb = ctx.dbs[b"quarantine"], ctx.dbs[b"log"]
        gone = []
        with ctx.txn.cursor(db=qdb) as cur:
            ok = cur.set_range(_U64.pack(lo))
            while ok:
                key = bytes(cur.key())
                if hi is not None and key_index(key) >= hi:
                    break
                if ctx.txn.get(key, db=ldb) is None:
                    gone.append(key)
                ok = cur.next()
        for key in gone:
            ctx.txn.delete(key, db=qdb)
        found = [  # list(): readers add entries meanwhile
            i for i in list(self._quarantine_mem)
            if i >= lo and (hi is None or i < hi) and ctx.txn.get(_U64.pack(i), db=ldb) is None
        ]
        if not found and not gone:
            return
        forget = found + [key_index(k) for k in gone]

        def hook() -> None:
            for index in forget:
                self._quarantine_mem.pop(index, None)
                self._quarantine_recorded.pop(index, None)

        ctx.on_commit(hook)

    def compact(
        self, upto_index: int, keep: Callable[[WriteContext, int, bytes], bool], chunk: int = 10_000
    ) -> int:
        """Delete records below ``upto_index`` for which ``keep(ctx, index, raw)`` is false.

        Runs in chunks of ``chunk`` records, one short write transaction each, so appends go on
        in between; returns how many records were deleted. Kept records stay readable by index.
        """
        if upto_index > self._last_index + 1:
            raise InvalidArgument(f"cannot compact to {upto_index}: the log ends at {self._last_index}")
        deleted = 0
        position = b""

        def step(ctx: WriteContext) -> tuple[int, bytes | None]:
            db = ctx.dbs[b"log"]
            doomed = []
            seen = 0
            last_key = None
            with ctx.txn.cursor(db=db) as cur:
                ok = cur.set_range(position) if position else cur.first()
                while ok and seen < chunk:
                    key = bytes(cur.key())
                    index = key_index(key)
                    if index >= upto_index:
                        ok = False
                        break
                    if not keep(ctx, index, bytes(cur.value())):
                        doomed.append(key)
                    last_key = key
                    seen += 1
                    ok = cur.next()
            for key in doomed:
                ctx.txn.delete(key, db=db)
            if not ok or last_key is None:
                self._advance_first_index(ctx, upto_index)
                return len(doomed), None
            # Every record up to last_key is compacted (or kept): the log starts after it now,
            # so a read between two chunks finds a deleted record below the first index (absent),
            # not missing inside the log (damage).
            self._advance_first_index(ctx, key_index(last_key) + 1)
            return len(doomed), last_key + b"\x00"

        while True:
            n, nxt = self.write(step)
            deleted += n
            if nxt is None:
                return deleted
            position = nxt

    def _record_corrupt(self, index: int, reason: str) -> None:
        if self._quarantine_mem.get(index) != reason:
            self._quarantine_mem[index] = reason
            log.error("store %s: log index %d is corrupt: %s", self.path, index, reason)
        writer = self.writer
        if writer is None or self._quarantine_recorded.get(index) == reason:
            return
        # Persist without waiting (a read must not block on the writer). If the queue is full,
        # or the write does not commit, the next read of the record records it again.
        value = f"{self.clock_ms()} {reason}".encode()

        def persist(ctx: WriteContext) -> None:
            if self._quarantine_recorded.get(index) == reason:
                self._quarantine_recorded.pop(index, None)  # from now on the commit decides
            key = _U64.pack(index)
            if index < self._first_index and ctx.txn.get(key, db=ctx.dbs[b"log"]) is None:
                return  # compacted away meanwhile: nothing left to quarantine
            ctx.put(b"quarantine", key, value)

            def saved() -> None:
                self._quarantine_recorded[index] = reason

            ctx.on_commit(saved)

        self._quarantine_recorded[index] = reason
        if not writer.submit_nowait(persist):
            self._quarantine_recorded.pop(index, None)

    def quarantined(self) -> dict[int, str]:
        """Indices found corrupt (persisted ones and those found since opening) and why."""
        out: dict[int, str] = {}
        with self.env.read() as txn:
            if b"quarantine" in self.env.dbs:
                for k, v in txn.cursor(db=self.env.dbs[b"quarantine"]):
                    out[key_index(k)] = bytes(v).decode("utf-8", "replace").partition(" ")[2]
        out.update(self._quarantine_mem)
        return dict(sorted(out.items()))

    def rewrite_records(self, records: dict[int, bytes]) -> None:
        """Put good copies of damaged records back (repair tools): ``records`` maps a log index to
        the framed record for it (from a replica that has it committed). Each must decode with
        its CRC and index; they replace what is stored at those indices in one durable commit,
        and leave the quarantine list. The log's bounds do not change."""
        for index, raw in records.items():
            codec.decode_record(raw, index)  # raises Corruption: never write a bad copy

        def fn(ctx: WriteContext) -> None:
            for index, raw in sorted(records.items()):
                if not self._first_index <= index <= self._last_index:
                    raise InvalidArgument(f"log index {index} is outside the log ({self._first_index}.."
                                          f"{self._last_index}): a repair only replaces records")
                ctx.txn.put(_U64.pack(index), raw, db=ctx.dbs[b"log"])
                ctx.delete(b"quarantine", _U64.pack(index))

            def hook() -> None:
                for index in records:
                    self._quarantine_mem.pop(index, None)
                    self._quarantine_recorded.pop(index, None)

            ctx.on_commit(hook)

        self.write(fn)

    def scan(self, progress: Callable[[int, int], None] | None = None) -> ScanReport:
        """Read and verify every record (CRC, framing, index); report every damaged one.

        Corrupt records are recorded in the quarantine list. ``progress(done, total)`` is called
        after each chunk.
        """
        corrupt: list[tuple[int, str]] = []
        missing: list[int] = []
        checked = 0
        first, last = self._first_index, self._last_index
        total = max(0, last - first + 1)
        expected = first
        db = self.env.dbs[b"log"]
        position: bytes | None = None
        done = False
        while not done:
            with self.env.read() as txn, txn.cursor(db=db) as cur:
                ok = cur.set_range(position) if position is not None else cur.first()
                if position is not None and ok and cur.key() == position:
                    ok = cur.next()
                n = 0
                while ok and n < _SCAN_CHUNK:
                    index = key_index(cur.key())
                    if index >= first:
                        while expected < index and expected <= last:
                            missing.append(expected)
                            expected += 1
                        expected = max(expected, index + 1)
                    try:
                        codec.decode_record(cur.value(), index)
                    except Corruption as exc:
                        corrupt.append((index, exc.reason))
                    checked += 1
                    n += 1
                    position = cur.key()
                    ok = cur.next()
                done = not ok
            if progress is not None:
                progress(min(checked, total), total)
        missing.extend(range(expected, last + 1))
        # The scan reads in chunks, each its own transaction: a record compacted or truncated
        # away between two chunks is absent, not damage (see _missing_inside_bounds).
        corrupt += [(i, "record missing from the log") for i in missing if self._missing_inside_bounds(i)]
        for index, reason in corrupt:
            self._record_corrupt(index, reason)
        return ScanReport(checked, first, last, tuple(sorted(corrupt)))

    # --- meta ----------------------------------------------------------------------------------------

    @property
    def last_stamp_ms(self) -> int:
        """The time stamped on the last committed batch (never decreases)."""
        return self._last_stamp_ms

    def meta_get(self, key: bytes) -> bytes | None:
        with self.env.read() as txn:
            value = txn.get(key, db=self.env.dbs[b"meta"])
        return None if value is None else bytes(value)

    def meta_put(self, key: bytes, value: bytes) -> None:
        self.write(lambda ctx: ctx.put(b"meta", key, value))

    def stats(self) -> dict[str, int]:
        with self.env.read():  # StoreClosed once closed (not a raw lmdb.Error)
            info = self.env.env.info()
        data_file = self.path / "data.mdb"
        return {
            "first_index": self._first_index,
            "last_index": self._last_index,
            "map_size_bytes": int(info["map_size"]),
            "file_size_bytes": data_file.stat().st_size if data_file.exists() else 0,
            "quarantined": len(self.quarantined()),
        }

    # --- whole-store copies (snapshots) ----------------------------------------------------------

    def copy_to(self, directory: Path) -> Path:
        """A consistent, compacted copy of this store's database: ``directory/data.mdb``.
        Call it when no write is in flight if the copy must match a known state exactly."""
        directory.mkdir(parents=True, exist_ok=False)
        self.env.copy_to(directory)
        return directory / "data.mdb"

    def reset_bounds(self) -> None:
        """Re-read the log bounds after the log was rewritten wholesale (snapshot install)."""
        self._first_index, self._last_index, self._term = self._load_bounds()

    def replace_data(self, data_file: Path, *, wait_s: float = REPLACE_WAIT_S, force: bool = True) -> None:
        """Replace this store's whole database by ``data_file`` (a copy of another store of the
        same cluster, i.e. under the same KEK). Stops and restarts the writer; reloads the log
        bounds, keys and dictionaries. Another process having the store open (read-only) is
        waited for up to ``wait_s`` seconds; then, with ``force`` (a snapshot install cannot be
        put off), the file is swapped anyway, with a new lock table (see
        :meth:`Environment.replace_data <mqstore.store.env.Environment.replace_data>`), else it
        is :class:`~mqstore.store.env.StoreInUse` and nothing changed."""
        if self.readonly or self.writer is None:
            raise InvalidArgument(f"store {self.path} is open read-only")
        self._stop_writer()
        try:
            self._swap_data(data_file, wait_s=wait_s, force=force)
        finally:
            self.writer = Writer(self._run_batch, name=f"mqstore-writer:{self.path.name}")

    def rewrite_compacted(self, scratch: Path, *, wait_s: float = REPLACE_WAIT_S) -> None:
        """Replace the database by a compacted copy of itself (freed pages keep old bytes until
        reused: a shredded key's must go). Writes wait meanwhile and then commit into the new
        file; none is lost or refused, whatever commits before the copy is in it.

        Only when no other process has the store open (see :meth:`replace_data`): one that still
        has after ``wait_s`` seconds makes it :class:`~mqstore.store.env.StoreInUse`, nothing
        changed. It is waited for before the copy is made (writes go on meanwhile)."""
        self.env.wait_alone(wait_s)
        writer = self._writer()
        with writer.held():
            self._swap_data(self.copy_to(scratch), wait_s=wait_s)

    def _swap_data(self, data_file: Path, *, wait_s: float, force: bool = False) -> None:
        """Swap the database file for ``data_file`` and reload what this object caches of it;
        no batch may run meanwhile. StoreInUse: nothing changed (nothing to reload)."""
        self.env.replace_data(data_file, wait_s=wait_s, force=force)
        self._first_index, self._last_index, self._term = self._load_bounds()
        raw_stamp = self.meta_get(_META_STAMP)
        self._last_stamp_ms = max(self._last_stamp_ms, _U64.unpack(raw_stamp)[0] if raw_stamp else 0)
        self._check_kek(is_new=False)
        self.keyring = KeyRing(self.keyring.provider)
        self.sealer = Sealer(self.keyring, self.sealer.level)
        self._load_keys_and_dictionaries()
        self._quarantine_mem.clear()
        self._quarantine_recorded.clear()

    # --- lifecycle ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Finish queued writes, stop the writer and close the environment. Idempotent. In a
        child forked after the store opened there is no writer to stop (its thread is the
        parent's): it only lets go of the store."""
        if self.writer is not None:
            if self.env.forked():
                self.writer = None
            else:
                self._stop_writer()
        self.env.close()

    def _stop_writer(self) -> None:
        """Stop the writer; raise while it still runs a batch (the environment must stay open under
        it: call close() again)."""
        assert self.writer is not None
        if not self.writer.stop():
            raise MQStoreError(f"store {self.path}: the writer is still running a batch; the store stays open "
                               "(call close() again)")

    def __enter__(self) -> LogStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def keeps_live_body(ctx: WriteContext, index: int, raw: bytes) -> bool:
    """Log compaction's rule (see :meth:`LogStore.compact`): keep the ENQUEUE record of a
    message still in the store (its body), and any record that fails its checksum — damage is
    never compacted away, where it would turn from Corruption into absent: ``verify`` keeps
    naming it and ``repair`` can still put it back."""
    try:
        record = codec.decode_record(raw, index)
    except Corruption:
        return True
    if record.type != RecordType.ENQUEUE or len(record.payload) < MESSAGE_ID_BYTES:
        return False
    # The sealed payload starts with the message id (readable without decrypting).
    return ctx.txn.get(record.payload[:MESSAGE_ID_BYTES], db=ctx.dbs[b"messages"]) is not None


def _dict_message_id(dict_id: int) -> bytes:
    # Dictionaries are sealed like messages; their "message id" is fixed by their dictionary id.
    return b"mqstore-dict" + struct.pack(">I", dict_id)


def _dict_id_of(message_id: bytes) -> int:
    if not message_id.startswith(b"mqstore-dict"):
        raise Corruption("dictionary record has a foreign message id")
    return int(struct.unpack(">I", message_id[12:16])[0])


def _type_name(rtype: int) -> str:
    try:
        return RecordType(rtype).name
    except ValueError:
        return f"type-{rtype}"


__all__ = [
    "Appended",
    "LogStore",
    "NewMessage",
    "Prepared",
    "ScanReport",
    "Staged",
    "StoredMessage",
    "WriteContext",
    "index_key",
    "keeps_live_body",
    "key_index",
]
