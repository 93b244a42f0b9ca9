"""Types and constants shared by both codec implementations (Cython ``mqstore._codec`` and the
pure-Python ``mqstore.codec._reference``). Both import from here, so a record type or flag is
defined once.

Record layout (format version 1), all integers little-endian::

    offset size  field
    0      2     magic            b"MQ"
    2      1     format version   1
    3      1     record type      RecordType (0 is never valid)
    4      2     flags            Flags; undefined bits must be zero
    6      2     reserved         must be zero
    8      8     term             u64 (Raft term; 0 for a single-node store)
    16     8     index            u64 log index (>= 1)
    24     4     key id           u32, != 0 exactly when Flags.ENCRYPTED is set
    28     4     dictionary id    u32, != 0 only when Flags.COMPRESSED is set
    32     4     payload length   u32, <= limits.RECORD_PAYLOAD_BYTES_MAX
    36     4     CRC32C           Castagnoli CRC of bytes [0, 36) followed by the payload
    40     n     payload

Envelope layout (schema version 1), all integers little-endian::

    u8   schema version          1
    u32  envelope length         bytes of the whole envelope, these 5 included
    16B  message id
    u8   namespace length (1..64), UTF-8 namespace
    u16  mail_from length (0..320), UTF-8 mail_from ("" is the null reverse-path <>)
    i8   priority                limits.PRIORITY_MIN..PRIORITY_MAX
    i64  created_at_ms           >= 0
    i64  not_before_ms           >= 0 (0: deliverable at once)
    i64  expires_at_ms           >= 0 (0: never)
    u16  idempotency key length (0..256; 0 means none), UTF-8 key
    u16  recipient count (1..limits.RECIPIENTS_MAX)
         each: u16 length (1..320), UTF-8 address

A later schema version may only append fields after the recipients; a decoder reads the fields
it knows and uses defaults for missing ones. A version newer than ``ENVELOPE_SCHEMA_VERSION`` is
refused (``Corruption``) rather than half-read.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import NamedTuple

MAGIC = b"MQ"
FORMAT_VERSION = 1
HEADER_SIZE = 40
ENVELOPE_SCHEMA_VERSION = 1
MESSAGE_ID_BYTES = 16
U64_MAX = 2**64 - 1
U32_MAX = 2**32 - 1


class RecordType(IntEnum):
    """What a log record means. Numbers are part of the on-disk format: never reuse one."""

    NOOP = 1  # no effect; a new Raft leader's first entry, padding in tests
    CONFIG = 2  # cluster membership / configuration change
    ENQUEUE = 3  # a message: sealed envelope + body
    LEASE = 4  # lease grant (fencing token = this record's index)
    ACK = 5  # recipients delivered
    DEFER = 6  # recipients deferred with a reason
    BOUNCE = 7  # recipients bounced with a reason
    HOLD = 8
    RELEASE = 9
    REQUEUE = 10
    DELETE = 11
    EXPIRE = 12  # lease deadlines and message lifetimes passed (time stamped by the writer)
    COMPACT = 13  # retention passed: derived state of finished messages may go
    POLICY = 14  # namespace policy (backoff, lifetime, retention, immutability)
    LEGAL_HOLD = 15  # compliance: add or remove a named legal hold
    RETENTION = 16  # compliance: extend a message's retention
    KEY = 17  # key rotation / shredding events
    BLOB = 18  # an opaque payload (tests, benchmarks, tools)
    DICTIONARY = 19  # a trained zstd dictionary, sealed under the store's system key
    MEMBERS = 20  # cluster directory: a member's site and advertised address
    AUDIT = 21  # a refused request: only the audit log records it
    DROP = 22  # remove a whole namespace
    BOUNCE_MESSAGE = 23  # an operator gives up on a message: its waiting recipients bounce


class Flags(IntFlag):
    """Record flags. A bit not defined here is a format error."""

    COMPRESSED = 0x0001  # payload body was zstd-compressed before sealing
    ENCRYPTED = 0x0002  # payload is sealed with AES-256-GCM under ``key_id``
    CONTEXT = 0x0004  # a sealed payload carries a plaintext, authenticated context block


#: Every defined record type number, as a frozenset of ints (what the codecs accept).
KNOWN_RECORD_TYPES: frozenset[int] = frozenset(int(t) for t in RecordType)
#: Bitwise OR of every defined flag.
KNOWN_FLAGS: int = int(Flags.COMPRESSED | Flags.ENCRYPTED | Flags.CONTEXT)


class Record(NamedTuple):
    """One decoded log record."""

    type: int
    flags: int
    term: int
    index: int  # type: ignore[assignment]  # shadows tuple.index on purpose: it is the log index
    key_id: int
    dict_id: int
    payload: bytes


class Envelope(NamedTuple):
    """The SMTP envelope and scheduling facts of one message (never its body)."""

    message_id: bytes
    namespace: str
    mail_from: str
    recipients: tuple[str, ...]
    priority: int = 0
    created_at_ms: int = 0
    not_before_ms: int = 0
    expires_at_ms: int = 0
    idempotency_key: str | None = None
