"""Sealing record payloads: zstd compression (optionally with a trained dictionary), then
AES-256-GCM encryption under a per-message data key.

Sealed payload layout::

    message id (16) | namespace length (u8) | namespace (UTF-8) | nonce (12) | ciphertext + tag (16)

The message id and namespace stay readable (the key and the data key are chosen by them); the
GCM additional data binds the format version, record type, flags, key id, dictionary id, message
id and namespace, so a payload moved to another message, namespace, key id or dictionary, or a
header flag flipped, fails to decrypt with :class:`~mqstore.errors.DecryptionFailed`.
"""

from __future__ import annotations

import functools
import itertools
import os
import struct
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import zstandard as zstd
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mqstore import limits
from mqstore._proc import random_bytes
from mqstore.codec import FORMAT_VERSION, MESSAGE_ID_BYTES, Flags, Record
from mqstore.crypto.keyring import KeyRing
from mqstore.errors import Corruption, DecryptionFailed, InvalidArgument, UnknownKey

_FLAG_COMPRESSED = int(Flags.COMPRESSED)  # a plain int: `int & Flags.X` goes through enum's slow path

NONCE_BYTES = 12
TAG_BYTES = 16
#: What :meth:`Sealer.seal_many` seals: record type, namespace, message id, plaintext, extra flags
#: (``Flags.CONTEXT`` or 0; authenticated with the record).
SealRequest = tuple[int, str, bytes, bytes, int]
_AAD_HEAD = struct.Struct("<2sBBHII")  # magic, format version, type, flags, key id, dict id
_COMPRESSED_ENCRYPTED = int(Flags.COMPRESSED | Flags.ENCRYPTED)
_ENCRYPTED = int(Flags.ENCRYPTED)
#: From this many messages on, a chunk is compressed by one zstd call (see _compress_chunk).
_MULTI_ITEMS_MIN = 4
_POOL_WORKERS = max(0, min(7, (os.cpu_count() or 1) - 1))
#: Messages per compression chunk of the calling thread's share of a large batch (see
#: Sealer.seal_many).
_CHUNK_ITEMS = 32
#: Batches smaller than this are compressed in the caller's thread only: handing work to another
#: thread costs more than compressing a few small messages.
_PARALLEL_ITEMS_MIN = 2 * _CHUNK_ITEMS
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _compression_pool() -> ThreadPoolExecutor | None:
    """A process-wide pool of compression threads (one per extra core), made on first use."""
    global _pool
    if _POOL_WORKERS == 0:
        return None
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(_POOL_WORKERS, thread_name_prefix="mqstore-zstd")
    return _pool


class Sealed(NamedTuple):
    flags: int
    key_id: int
    dict_id: int
    payload: bytes


class Opened(NamedTuple):
    message_id: bytes
    namespace: str
    plaintext: bytes


@functools.lru_cache(maxsize=4096)
def _namespace_prefix(namespace: str) -> bytes:
    """The stored namespace field: length byte + UTF-8 (cached: namespaces are few)."""
    ns = namespace.encode("utf-8")
    return bytes((len(ns),)) + ns


def _aad(rtype: int, flags: int, key_id: int, dict_id: int, prefix: bytes) -> bytes:
    # ``prefix`` is message id | namespace length | namespace, exactly as stored.
    return _AAD_HEAD.pack(b"MQ", FORMAT_VERSION, rtype, flags, key_id, dict_id) + prefix


def train_dictionary(samples: list[bytes], size_bytes: int = 112_640) -> bytes:
    """Train a zstd dictionary from sample messages (raw bytes); returns the dictionary bytes.

    A dictionary pays off for small, similar messages (notification mail, templates): on this
    class of machine it takes 2 KiB messages from ratio 2.0 to ~3.6 and compression ~35% faster.
    """
    if not isinstance(samples, list) or not all(isinstance(s, bytes) for s in samples):
        raise InvalidArgument("samples must be a list of bytes")
    if not limits.DICTIONARY_SAMPLES_MIN <= len(samples) <= limits.DICTIONARY_SAMPLES_MAX:
        raise InvalidArgument(
            f"{len(samples)} samples given; training needs {limits.DICTIONARY_SAMPLES_MIN}.."
            f"{limits.DICTIONARY_SAMPLES_MAX}"
        )
    if not isinstance(size_bytes, int) or not 1024 <= size_bytes <= limits.DICTIONARY_BYTES_MAX:
        raise InvalidArgument(f"dictionary size must be 1024..{limits.DICTIONARY_BYTES_MAX} bytes")
    sample_list: list[bytes | bytearray | memoryview] = list(samples)
    try:
        trained = zstd.train_dictionary(size_bytes, sample_list)
    except zstd.ZstdError as exc:
        raise InvalidArgument(f"zstd could not train a dictionary from these samples: {exc}") from None
    return bytes(trained.as_bytes())


class Sealer:
    """Compresses and encrypts record payloads for one store. Thread safe.

    zstd compressor objects are not safe to share between threads, so each thread keeps its own
    (per dictionary id). ``level`` is the zstd level for new records; reading never depends on it.
    """

    def __init__(self, keyring: KeyRing, level: int = limits.ZSTD_LEVEL_DEFAULT) -> None:
        if not isinstance(level, int) or not limits.ZSTD_LEVEL_MIN <= level <= limits.ZSTD_LEVEL_MAX:
            raise InvalidArgument(
                f"zstd level must be {limits.ZSTD_LEVEL_MIN}..{limits.ZSTD_LEVEL_MAX}, not {level!r}"
            )
        self.keyring = keyring
        self.level = level
        self._dicts: dict[int, zstd.ZstdCompressionDict] = {}
        self._default_dict_id = 0  # dictionary new records use (0: none)
        self._local = threading.local()

    # --- dictionaries --------------------------------------------------------------------------

    def add_dictionary(self, dict_id: int, data: bytes) -> None:
        if dict_id <= 0 or dict_id in self._dicts:
            raise InvalidArgument(f"dictionary id {dict_id} is invalid or already present")
        dictionary = zstd.ZstdCompressionDict(data)
        # Digest it once for our level: otherwise every multi-message compression call loads
        # (copies and digests) the whole dictionary again, ~0.1 ms per call for 64 KiB.
        dictionary.precompute_compress(level=self.level)
        self._dicts[dict_id] = dictionary

    def use_dictionary(self, dict_id: int) -> None:
        """Make new records compress with dictionary ``dict_id`` (0: no dictionary)."""
        if dict_id != 0 and dict_id not in self._dicts:
            raise UnknownKey(f"dictionary id {dict_id} is not known to this store")
        self._default_dict_id = dict_id

    @property
    def dictionary_id(self) -> int:
        return self._default_dict_id

    def dictionary_ids(self) -> list[int]:
        return sorted(self._dicts)

    def _compressor(self, dict_id: int) -> zstd.ZstdCompressor:
        cache: dict[int, zstd.ZstdCompressor] | None = getattr(self._local, "compressors", None)
        if cache is None:
            cache = self._local.compressors = {}
        comp = cache.get(dict_id)
        if comp is None:
            if dict_id:
                comp = zstd.ZstdCompressor(level=self.level, dict_data=self._dicts[dict_id])
            else:
                comp = zstd.ZstdCompressor(level=self.level)
            cache[dict_id] = comp
        return comp

    def _decompressor(self, dict_id: int) -> zstd.ZstdDecompressor:
        cache: dict[int, zstd.ZstdDecompressor] | None = getattr(self._local, "decompressors", None)
        if cache is None:
            cache = self._local.decompressors = {}
        dec = cache.get(dict_id)
        if dec is None:
            if dict_id:
                try:
                    d = self._dicts[dict_id]
                except KeyError:
                    raise UnknownKey(f"dictionary id {dict_id} is not known to this store") from None
                dec = zstd.ZstdDecompressor(dict_data=d)
            else:
                dec = zstd.ZstdDecompressor()
            cache[dict_id] = dec
        return dec

    # --- seal / open ---------------------------------------------------------------------------

    def seal(
        self,
        rtype: int,
        namespace: str,
        message_id: bytes,
        plaintext: bytes,
        *,
        compress: bool = True,
        dict_id: int | None = None,
        extra_flags: int = 0,
    ) -> Sealed:
        """Compress (when it helps) and encrypt ``plaintext`` under ``namespace``'s current key.

        Raises :class:`UnknownKey` when the namespace has no key yet (the store creates one).
        """
        use_dict = self._default_dict_id if dict_id is None else dict_id
        packed = self._compressor(use_dict).compress(plaintext) if compress else None
        return self._encrypt(rtype, *self._key_of(namespace), message_id, plaintext, packed, use_dict,
                             random_bytes(NONCE_BYTES), extra_flags)

    def seal_many(self, items: Sequence[SealRequest]) -> list[Sealed]:
        """Seal ``(record type, namespace, message_id, plaintext, extra flags)`` items, like
        :meth:`seal` each (extra flags, e.g. ``Flags.CONTEXT``, are authenticated with the record).

        zstd releases the GIL and AES-GCM does not. A large batch is split: each pool thread
        compresses one contiguous share in a single call (it never needs the GIL meanwhile),
        while this thread compresses its own, smaller share chunk by chunk and encrypts each
        chunk as it goes, then encrypts the pool's shares. One read of OS randomness gives every
        nonce.
        """
        n = len(items)
        use_dict = self._default_dict_id
        if n == 1:  # a lone caller's append: none of the batch machinery below
            rtype, namespace, message_id, plaintext, extra = items[0]
            return [self.seal(rtype, namespace, message_id, plaintext, extra_flags=extra)]
        nonces = random_bytes(NONCE_BYTES * n)
        plaintexts = [item[3] for item in items]
        # Per namespace, once per batch: its current key id and stored prefix.
        spaces = {item[1]: self._key_of(item[1]) for item in items}
        encrypt = self._encrypt

        def seal_range(lo: int, packed: list[bytes]) -> list[Sealed]:
            return [
                encrypt(rtype, *spaces[ns], mid, plain, pk, use_dict, nonces[NONCE_BYTES * i : NONCE_BYTES * (i + 1)],
                        extra)
                for i, (rtype, ns, mid, plain, extra), pk in zip(
                    range(lo, lo + len(packed)), items[lo : lo + len(packed)], packed, strict=True
                )
            ]

        pool = _compression_pool()
        if pool is None or n < _PARALLEL_ITEMS_MIN:
            return seal_range(0, self._compress_chunk(plaintexts, use_dict))
        # This thread's share is the smaller one because it also encrypts everything: 2 parts
        # for it to 3 per pool thread (measured on 2 cores, 2 KiB mail: 2/5 of the batch here
        # seals 256 messages in 12.8 us each; 1/2 in 13.2; 1/3 in 14.2; chunks taken in turn
        # from a shared list, as before, in 13.7).
        own = n * 2 // (2 + 3 * _POOL_WORKERS)
        bounds = [own + (n - own) * w // _POOL_WORKERS for w in range(_POOL_WORKERS + 1)]
        shares = [
            (lo, pool.submit(self._compress_chunk, plaintexts[lo:hi], use_dict))
            for lo, hi in itertools.pairwise(bounds)
        ]
        out: list[Sealed] = []
        for lo in range(0, own, _CHUNK_ITEMS):
            out.extend(seal_range(lo, self._compress_chunk(plaintexts[lo : min(lo + _CHUNK_ITEMS, own)], use_dict)))
        for lo, share in shares:
            out.extend(seal_range(lo, share.result()))
        return out

    def _compress_chunk(self, plaintexts: list[bytes], dict_id: int) -> list[bytes]:
        compressor = self._compressor(dict_id)
        if len(plaintexts) < _MULTI_ITEMS_MIN:
            return [compressor.compress(p) for p in plaintexts]
        # One call for the whole chunk: it releases the GIL once instead of once per message,
        # which matters when other threads are waiting for the GIL (the writer's case).
        inputs: list[bytes | bytearray | memoryview] = list(plaintexts)
        result = compressor.multi_compress_to_buffer(inputs, threads=1)
        return [result[i].tobytes() for i in range(len(result))]

    def _key_of(self, namespace: str) -> tuple[int, bytes]:
        """The key id new records of ``namespace`` use, and its stored prefix."""
        key_id = self.keyring.current_key_id(namespace)
        if key_id is None:
            raise UnknownKey(f"namespace {namespace!r} has no key yet")
        return key_id, _namespace_prefix(namespace)

    def _encrypt(
        self,
        rtype: int,
        key_id: int,
        ns: bytes,
        message_id: bytes,
        plaintext: bytes,
        packed: bytes | None,
        dict_id: int,
        nonce: bytes,
        extra_flags: int = 0,
    ) -> Sealed:
        """Encrypt one record under key ``key_id``; ``ns`` is the namespace's stored prefix (both
        from :meth:`_key_of`, which a batch calls once per namespace)."""
        if len(message_id) != MESSAGE_ID_BYTES:
            raise InvalidArgument(f"message id must be {MESSAGE_ID_BYTES} bytes")
        if packed is not None and len(packed) < len(plaintext):
            flags, body = _COMPRESSED_ENCRYPTED, packed
        else:
            flags, body, dict_id = _ENCRYPTED, plaintext, 0  # incompressible: stored as is
        flags |= extra_flags
        aad = _AAD_HEAD.pack(b"MQ", FORMAT_VERSION, rtype, flags, key_id, dict_id) + message_id + ns
        sealed = AESGCM(self.keyring.data_key(key_id, message_id)).encrypt(nonce, body, aad)
        return Sealed(flags, key_id, dict_id, b"".join((message_id, ns, nonce, sealed)))

    def open(self, record: Record) -> Opened:
        """Authenticate, decrypt and decompress a sealed record's payload."""
        payload = record.payload
        if not record.flags & _ENCRYPTED:
            raise InvalidArgument(f"record {record.index} is not sealed")
        if len(payload) < MESSAGE_ID_BYTES + 1:
            raise Corruption("sealed payload truncated", record.index)
        ns_len = payload[MESSAGE_ID_BYTES]
        head = MESSAGE_ID_BYTES + 1 + ns_len
        if len(payload) < head + NONCE_BYTES + TAG_BYTES:
            raise Corruption("sealed payload truncated", record.index)
        message_id = payload[:MESSAGE_ID_BYTES]
        try:
            namespace = payload[MESSAGE_ID_BYTES + 1 : head].decode("utf-8")
        except UnicodeDecodeError:
            raise Corruption("sealed payload: namespace is not UTF-8", record.index) from None
        key_event = self.keyring.event(record.key_id)
        if key_event.namespace != namespace:
            raise DecryptionFailed(
                f"record {record.index} names namespace {namespace!r} but key id {record.key_id} "
                f"belongs to {key_event.namespace!r}",
                record.index,
            )
        aead = AESGCM(self.keyring.data_key(record.key_id, message_id))
        try:
            body = aead.decrypt(
                payload[head : head + NONCE_BYTES],
                payload[head + NONCE_BYTES :],
                _aad(record.type, record.flags, record.key_id, record.dict_id, payload[:head]),
            )
        except InvalidTag:
            raise DecryptionFailed(
                f"authentication failed for message {message_id.hex()} under key id {record.key_id}: "
                "the record was altered, moved to another message or key, or sealed with another key",
                record.index,
            ) from None
        if record.flags & _FLAG_COMPRESSED:
            body = self._decompress(body, record)
        return Opened(message_id, namespace, body)

    def _decompress(self, body: bytes, record: Record) -> bytes:
        # The body was authenticated, so it is what a writer produced; still never trust a size
        # from disk blindly (a decompression bomb sealed by a compromised writer stays bounded).
        try:
            size = zstd.frame_content_size(body)
        except zstd.ZstdError:
            size = -1
        if size < 0 or size > limits.RECORD_PAYLOAD_BYTES_MAX:
            raise Corruption(f"compressed body declares an invalid size ({size})", record.index)
        try:
            return bytes(self._decompressor(record.dict_id).decompress(body))
        except zstd.ZstdError as exc:
            raise Corruption(f"cannot decompress: {exc}", record.index) from None


__all__ = ["NONCE_BYTES", "TAG_BYTES", "Opened", "Sealed", "Sealer", "train_dictionary"]
