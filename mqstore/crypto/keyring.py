"""Namespace keys: creation, wrapping under the KEK, lookup, rotation and shredding.

A namespace key is 32 random bytes with a store-wide key id (u32, from 1). It is persisted only in
wrapped form (by a :class:`~mqstore.crypto.providers.KeyProvider`), inside a KEY log record and the
``keys`` table, so replicas that share the KEK can open each other's records. Rotation adds a new
key id for the namespace; new records use the newest key, old ones keep decrypting with theirs.
Shredding forgets a key's wrapped bytes: every record sealed under it becomes unreadable.

The per-message data key is HKDF-SHA256 (RFC 5869) of the namespace key with ``info`` = the
message id. HKDF's extract step depends only on the namespace key, so its output (the PRK) is
cached per key id and each message costs one HMAC (the expand step), computed from the key's
precomputed inner and outer SHA-256 states (a quarter of the cost of a one-shot HMAC call).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass

from mqstore.crypto.providers import KeyProvider
from mqstore.errors import Corruption, MQStoreError, UnknownKey

NAMESPACE_KEY_BYTES = 32
#: HKDF salt for per-message data keys. Changing it makes every stored record unreadable.
HKDF_SALT = b"mqstore-v1 message data key"
#: Namespace names starting with this prefix are reserved for mqstore's own records.
SYSTEM_NAMESPACE = "__system__"

_EVENT_VERSION = 1
ACTION_CREATE = 1
ACTION_SHRED = 2
#: ``meta`` key set in the transaction that applies a key shred, cleared once the key's wrapped
#: bytes are scrubbed from the store's files: a store (or node) opened with it set finishes the
#: scrub first (a crash came in between).
META_SCRUB_PENDING = b"keys.scrub_pending"
_EVENT_HEAD = struct.Struct("<BBIqB")  # version, action, key id, created_at_ms, namespace length


class KeyShredded(MQStoreError):
    """The key a record was sealed under has been shredded: the record can never be read again."""


@dataclass(frozen=True, slots=True)
class KeyEvent:
    """A KEY log record: a namespace key created (with its wrapped bytes) or shredded."""

    action: int
    key_id: int
    namespace: str
    created_at_ms: int
    wrapped: bytes = b""

    def encode(self) -> bytes:
        ns = self.namespace.encode("utf-8")
        head = _EVENT_HEAD.pack(_EVENT_VERSION, self.action, self.key_id, self.created_at_ms, len(ns))
        return head + ns + struct.pack("<H", len(self.wrapped)) + self.wrapped

    @classmethod
    def decode(cls, payload: bytes) -> KeyEvent:
        event, used = cls.decode_prefix(payload)
        if used != len(payload):
            raise Corruption("malformed key event: trailing bytes")
        return event

    @classmethod
    def decode_prefix(cls, payload: bytes) -> tuple[KeyEvent, int]:
        """The event at the start of ``payload`` and how many bytes it used (a KEY record may
        carry the request context after it)."""
        try:
            version, action, key_id, created, ns_len = _EVENT_HEAD.unpack_from(payload, 0)
            off = _EVENT_HEAD.size
            namespace = payload[off : off + ns_len].decode("utf-8")
            off += ns_len
            (wrapped_len,) = struct.unpack_from("<H", payload, off)
            off += 2
            wrapped = bytes(payload[off : off + wrapped_len])
            off += wrapped_len
        except (struct.error, UnicodeDecodeError) as exc:
            raise Corruption(f"malformed key event: {exc}") from None
        if version != _EVENT_VERSION or action not in (ACTION_CREATE, ACTION_SHRED):
            raise Corruption(f"malformed key event (version {version}, action {action})")
        if len(namespace.encode("utf-8")) != ns_len or len(wrapped) != wrapped_len:
            raise Corruption("malformed key event: truncated")
        return cls(action, key_id, namespace, created, wrapped), off


def split_key_record(payload: bytes) -> tuple[KeyEvent, bytes]:
    """A KEY record's payload -> its event and the request context after it (b"": none); the
    inverse of ``store.log.key_record_payload``. Corruption if either is malformed."""
    event, used = KeyEvent.decode_prefix(payload)
    if used == len(payload):
        return event, b""
    if len(payload) < used + 2:
        raise Corruption("KEY record: truncated request context")
    (n,) = struct.unpack_from("<H", payload, used)
    if used + 2 + n != len(payload):
        raise Corruption("KEY record: malformed request context")
    return event, bytes(payload[used + 2 :])


def wrap_context(key_id: int, namespace: str) -> bytes:
    """What a namespace key's wrapping is bound to: moving it to another id or namespace fails."""
    return b"ns-key:" + struct.pack(">I", key_id) + namespace.encode("utf-8")


def hkdf_extract(key: bytes) -> bytes:
    """RFC 5869 HKDF-Extract with SHA-256 and mqstore's fixed salt."""
    return hmac.digest(HKDF_SALT, key, "sha256")


def hkdf_expand_32(prk: bytes, info: bytes) -> bytes:
    """RFC 5869 HKDF-Expand for L = 32 with SHA-256: a single block, T(1) = HMAC(PRK, info | 0x01)."""
    return hmac.digest(prk, info + b"\x01", "sha256")


class HkdfExpander:
    """HKDF-Expand (L = 32, SHA-256) for one PRK, with HMAC's keyed inner and outer SHA-256 states
    computed once: each expansion then costs two state copies and two short hashes."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, prk: bytes) -> None:
        block = prk.ljust(64, b"\0")  # a PRK is 32 bytes: shorter than SHA-256's block, so padded
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))

    def expand_32(self, info: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(info + b"\x01")
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


#: Data keys kept after use (about 100 bytes each).
DATA_KEY_CACHE_MAX = 8192


class KeyRing:
    """The namespace keys of one store, wrapped at rest, unwrapped lazily and cached in memory.

    Thread safe. Mutations come only from applying KEY events (:meth:`apply`), so every replica
    that applies the same log holds the same key ids.

    A key created by a write transaction is *staged* (:meth:`stage`): only the thread running
    that transaction sees it (records of the same transaction may be sealed or opened under it),
    until the transaction commits (:meth:`publish_staged`) or is abandoned
    (:meth:`discard_staged`: aborted, run again, or its commit failed), which leaves no trace.
    """

    def __init__(self, provider: KeyProvider) -> None:
        self.provider = provider
        self._lock = threading.Lock()
        self._events: dict[int, KeyEvent] = {}  # key id -> its CREATE event
        self._shredded: set[int] = set()
        self._current: dict[str, int] = {}  # namespace -> newest live key id
        self._prk: dict[int, bytes] = {}  # key id -> HKDF PRK (derived from the unwrapped key)
        self._expanders: dict[int, HkdfExpander] = {}  # key id -> expander of its PRK
        # (key id, message id) -> data key, for the messages sealed or opened most recently (a
        # message leased soon after it was enqueued opens without deriving its key again); an
        # OrderedDict because dropping the oldest entry of a plain dict again and again costs a
        # scan over the holes left by the earlier deletions
        self._data_keys: OrderedDict[tuple[int, bytes], bytes] = OrderedDict()
        # Keys created by the running write transaction, not committed yet (see :meth:`stage`):
        # key id -> CREATE event, namespace -> newest staged key id, and the thread running it.
        self._staged: dict[int, KeyEvent] = {}
        self._staged_current: dict[str, int] = {}
        self._staged_thread: int | None = None

    # --- mutations (from the log) ----------------------------------------------------------------

    def _sees_staged(self) -> bool:
        """Whether the calling thread runs the transaction that staged keys (if any are)."""
        return bool(self._staged) and self._staged_thread == threading.get_ident()

    def max_key_id(self) -> int:
        with self._lock:
            staged = self._staged if self._sees_staged() else {}
            return max(max(self._events, default=0), max(staged, default=0))

    def new_key_event(self, namespace: str, now_ms: int, key_id: int | None = None) -> KeyEvent:
        """A CREATE event for a fresh random key of ``namespace`` (not yet applied), with the next
        free key id unless ``key_id`` is given (a replicated leader allocates ids itself, so
        keys planned before the previous ones were applied still get distinct ids)."""
        if key_id is None:
            key_id = self.max_key_id() + 1
        secret = os.urandom(NAMESPACE_KEY_BYTES)
        wrapped = self.provider.wrap(secret, wrap_context(key_id, namespace))
        return KeyEvent(ACTION_CREATE, key_id, namespace, now_ms, wrapped)

    def shred_event(self, key_id: int, now_ms: int) -> KeyEvent:
        """A SHRED event for key ``key_id`` (not yet applied)."""
        return KeyEvent(ACTION_SHRED, key_id, self.namespace_of(key_id), now_ms)

    def check_applicable(self, event: KeyEvent) -> None:
        """Raise if ``event`` cannot be applied to the current key set (no state changed)."""
        with self._lock:
            staged = self._staged if self._sees_staged() else {}
            known = event.key_id in self._events or event.key_id in staged
            if event.action == ACTION_CREATE and known:
                raise UnknownKey(f"key id {event.key_id} already exists")
            if event.action == ACTION_SHRED and not known:
                raise UnknownKey(f"cannot shred key id {event.key_id}: no such key")

    def stage(self, event: KeyEvent) -> None:
        """Apply a CREATE event for the calling thread's write transaction only: that thread sees
        the key at once (to seal or open records of the same transaction under it), every other
        thread only once :meth:`publish_staged` ran after the commit. Raises like :meth:`apply`."""
        if event.action != ACTION_CREATE:
            raise AssertionError("only a key's creation is staged; a shred takes effect at commit")
        self.check_applicable(event)
        me = threading.get_ident()
        with self._lock:
            if self._staged and self._staged_thread != me:
                raise AssertionError("keys staged by two write transactions at once")
            self._staged_thread = me
            self._staged[event.key_id] = event
            if event.key_id > self._staged_current.get(event.namespace, 0):
                self._staged_current[event.namespace] = event.key_id

    def publish_staged(self) -> None:
        """The transaction that staged keys committed: every thread sees them from now on."""
        if not self._staged:
            return
        with self._lock:
            events = sorted(self._staged.values(), key=lambda e: e.key_id)
            self._staged = {}
            self._staged_current = {}
            self._staged_thread = None
        for event in events:
            if event.key_id not in self._events:
                self.apply(event)

    def discard_staged(self) -> None:
        """The transaction that staged keys did not commit: forget them (and anything derived
        from them), as if they had never been created; a re-run stages them again."""
        if not self._staged:
            return
        with self._lock:
            gone = set(self._staged)
            self._staged = {}
            self._staged_current = {}
            self._staged_thread = None
            for key_id in gone:
                if key_id not in self._events:
                    self._prk.pop(key_id, None)
                    self._expanders.pop(key_id, None)
            for k in [k for k in self._data_keys if k[0] in gone and k[0] not in self._events]:
                self._data_keys.pop(k, None)

    def apply(self, event: KeyEvent) -> None:
        self.check_applicable(event)
        with self._lock:
            if event.action == ACTION_CREATE:
                self._events[event.key_id] = event
                if event.key_id > self._current.get(event.namespace, 0):
                    self._current[event.namespace] = event.key_id
            else:
                self._shredded.add(event.key_id)
                self._prk.pop(event.key_id, None)
                self._expanders.pop(event.key_id, None)
                for k in [k for k in self._data_keys if k[0] == event.key_id]:
                    self._data_keys.pop(k, None)
                live = [
                    k
                    for k, e in self._events.items()
                    if e.namespace == event.namespace and k not in self._shredded
                ]
                if live:
                    self._current[event.namespace] = max(live)
                else:
                    self._current.pop(event.namespace, None)

    # --- lookups -----------------------------------------------------------------------------------

    def current_key_id(self, namespace: str) -> int | None:
        """The key id new records of ``namespace`` are sealed under, or None if it has none yet."""
        if self._staged and self._sees_staged():
            staged = self._staged_current.get(namespace)
            if staged is not None:
                return staged
        return self._current.get(namespace)

    def key_ids(self, namespace: str | None = None) -> list[int]:
        with self._lock:
            events = dict(self._events)
            if self._sees_staged():
                events.update(self._staged)
            return sorted(k for k, e in events.items() if namespace is None or e.namespace == namespace)

    def event(self, key_id: int) -> KeyEvent:
        try:
            return self._events[key_id]
        except KeyError:
            if self._staged and self._sees_staged() and key_id in self._staged:
                return self._staged[key_id]
            raise UnknownKey(f"key id {key_id} is not known to this store") from None

    def is_shredded(self, key_id: int) -> bool:
        return key_id in self._shredded

    def namespace_of(self, key_id: int) -> str:
        return self.event(key_id).namespace

    def prk(self, key_id: int) -> bytes:
        """HKDF PRK of key ``key_id`` (unwrapping the key on first use)."""
        prk = self._prk.get(key_id)
        if prk is not None:
            return prk
        if key_id in self._shredded:
            event = self.event(key_id)
            raise KeyShredded(f"key id {key_id} of namespace {event.namespace!r} was shredded")
        event = self.event(key_id)
        secret = self.provider.unwrap(event.wrapped, wrap_context(key_id, event.namespace))
        if len(secret) != NAMESPACE_KEY_BYTES:
            raise Corruption(f"key id {key_id} unwrapped to {len(secret)} bytes")
        prk = hkdf_extract(secret)
        with self._lock:
            if key_id not in self._shredded:
                self._prk[key_id] = prk
                self._expanders[key_id] = HkdfExpander(prk)
        return prk

    def data_key(self, key_id: int, message_id: bytes) -> bytes:
        """The per-message AES-256 key: HKDF-SHA256(namespace key, salt, info = message id)."""
        cache = self._data_keys
        entry = (key_id, message_id)
        found = cache.get(entry)
        if found is not None:
            return found
        expander = self._expanders.get(key_id)
        if expander is None:
            prk = self.prk(key_id)
            expander = self._expanders.get(key_id) or HkdfExpander(prk)
        key = expander.expand_32(message_id)
        # No lock: each dict operation is atomic, and a shred adds the key id to _shredded before
        # purging the cache, so an entry added while it runs is either purged by it or seen here.
        if len(cache) >= DATA_KEY_CACHE_MAX:
            with contextlib.suppress(KeyError):  # KeyError: emptied meanwhile by another thread
                cache.popitem(last=False)  # the oldest
        cache[entry] = key
        if key_id in self._shredded:
            cache.pop(entry, None)
        return key


__all__ = [
    "ACTION_CREATE",
    "ACTION_SHRED",
    "HKDF_SALT",
    "META_SCRUB_PENDING",
    "SYSTEM_NAMESPACE",
    "KeyEvent",
    "KeyRing",
    "KeyShredded",
    "hkdf_expand_32",
    "hkdf_extract",
    "split_key_record",
    "wrap_context",
]
