"""Pure-Python reference codec: record framing, CRC32C and envelopes.

This module is the readable definition of the codec. ``mqstore._codec`` (Cython) must produce
the same bytes, return the same values and raise the same exception types with the same
messages; the differential tests in ``tests/test_codec.py`` hold the two together. Keep this
one simple and obviously correct rather than fast.

The layouts are specified in :mod:`mqstore.codec._types`.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

from mqstore import limits
from mqstore.codec._types import (
    ENVELOPE_SCHEMA_VERSION,
    FORMAT_VERSION,
    HEADER_SIZE,
    KNOWN_FLAGS,
    KNOWN_RECORD_TYPES,
    MAGIC,
    MESSAGE_ID_BYTES,
    U32_MAX,
    U64_MAX,
    Envelope,
    Flags,
    Record,
)
from mqstore.errors import Corruption, InvalidArgument

if TYPE_CHECKING:
    from typing_extensions import Buffer

    #: The 7 fields ``encode_records`` takes per record, in ``Record`` field order.
    _RecordItem = tuple[int, int, int, int, int, int, Buffer]

# --- messages -----------------------------------------------------------------------------------
# Every message either implementation can produce, as str.format templates. ext/_codec.pyx holds
# an identical copy (a test compares the two sets), so errors read the same whichever codec runs.

# Caller errors (InvalidArgument, or TypeError for crc32c's data).
E_NOT_INT = "{field} must be an int, not {type}"
E_RANGE = "{field} must be in {lo}..{hi}, got {value}"
E_NOT_BYTES = "{field} must be bytes, not {type}"
E_NOT_CONTIGUOUS = "{field} must be a C-contiguous buffer"
E_RECORD_TYPE = "type {value} is not a known record type"
E_FLAGS = "flags 0x{value:04x} has undefined bits 0x{bits:04x} (defined: 0x{known:04x})"
E_KEY_WITHOUT_ENCRYPTED = "key_id is {key_id} but the ENCRYPTED flag is not set"
E_ENCRYPTED_WITHOUT_KEY = "the ENCRYPTED flag is set but key_id is 0"
E_DICT_WITHOUT_COMPRESSED = "dict_id is {dict_id} but the COMPRESSED flag is not set"
E_PAYLOAD_TOO_LONG = "payload is {n} bytes, the limit is {limit}"
E_NOT_SEQUENCE = "{field} must be a list or tuple, not {type}"
E_ITEM_SHAPE = "items[{i}] must be a tuple of 7 fields (type, flags, term, index, key_id, dict_id, payload)"
E_ITEM_PREFIX = "items[{i}]: {reason}"
E_FIRST_INDEX_OVERFLOW = "first_index {first} + {n} records runs past the largest log index"
E_ENVELOPE_TYPE = "envelope must be an Envelope (a tuple of 9 fields), not {type}"
E_ENVELOPE_FIELDS = "envelope must have 9 fields, got {n}"
E_MESSAGE_ID_LENGTH = "message_id is {n} bytes, must be exactly {need}"
E_NOT_STR = "{field} must be a str, not {type}"
E_NOT_STR_OR_NONE = "{field} must be a str or None, not {type}"
E_NOT_UTF8 = "{field} cannot be encoded as UTF-8 (it contains a lone surrogate)"
E_EMPTY = "{field} must not be empty"
E_IDEMPOTENCY_EMPTY = "idempotency_key must not be empty (use None)"
E_TOO_LONG = "{field} is {n} bytes, the limit is {limit}"
E_RECIPIENTS_TYPE = "recipients must be a list or tuple of str, not {type}"
E_RECIPIENTS_COUNT = "recipients has {n} entries, the limit is {limit}"
E_CRC_DATA_TYPE = "crc32c() data must be a bytes-like object, not {type}"
E_CRC_DATA_CONTIGUOUS = "crc32c() data must be a C-contiguous buffer"

# Damaged bytes (Corruption).
C_HEADER_TRUNCATED = "record truncated: {n} bytes, the header alone needs {need}"
C_MAGIC = "bad magic {found!r}, expected {expected!r} (not an mqstore record)"
C_FORMAT_VERSION = "unsupported record format version {version} (this mqstore reads version {supported})"
C_PAYLOAD_TOO_LONG = "payload length {n} in the header exceeds the limit of {limit} bytes"
C_PAYLOAD_TRUNCATED = "record truncated: the header announces {n} payload bytes, only {have} present"
C_TRAILING = "record has {extra} trailing bytes after its {n}-byte payload"
C_CHECKSUM = "checksum mismatch: stored 0x{stored:08x}, computed 0x{computed:08x}"
C_RECORD_TYPE = "unknown record type {value}"
C_FLAGS = "unknown flag bits 0x{bits:04x} in flags 0x{value:04x}"
C_RESERVED = "reserved header field is 0x{value:04x}, must be zero"
C_KEY_WITHOUT_ENCRYPTED = "key_id {key_id} is set but the ENCRYPTED flag is not"
C_ENCRYPTED_WITHOUT_KEY = "the ENCRYPTED flag is set but key_id is 0"
C_DICT_WITHOUT_COMPRESSED = "dict_id {dict_id} is set but the COMPRESSED flag is not"
C_INDEX_ZERO = "record index is 0 (log indexes start at 1)"
C_INDEX_MISMATCH = "record index is {index}, expected {expected}"
C_BATCH_PREFIX = "bufs[{i}]: {reason}"
C_ENV_TRUNCATED = (
    "envelope truncated in {field}: needs {need} bytes at offset {offset}, the buffer ends at {end}"
)
C_ENV_LENGTH_SHORT = "envelope length {length} is too short: {field} needs bytes up to offset {upto}"
C_ENV_LENGTH_PAST_BUFFER = "envelope length {length} exceeds the {have} bytes in the buffer"
C_ENV_LENGTH_MISMATCH = "envelope length {length} but its fields end at offset {used}"
C_ENV_VERSION_ZERO = "envelope schema version 0 is invalid"
C_ENV_VERSION_NEWER = "envelope schema version {version} is newer than this mqstore supports ({supported})"
C_ENV_UTF8 = "envelope {field} is not valid UTF-8"
C_ENV_EMPTY = "envelope {field} is empty"
C_ENV_TOO_LONG = "envelope {field} is {n} bytes, the limit is {limit}"
C_ENV_RECIPIENT_COUNT = "envelope recipient count {n} is outside 1..{limit}"
C_ENV_RANGE = "envelope {field} is {value}, outside {lo}..{hi}"

# --- CRC32C -------------------------------------------------------------------------------------

_CRC32C_POLY = 0x82F63B78  # Castagnoli, bit-reversed (the "reflected" form used LSB first)


def _crc32c_table() -> tuple[int, ...]:
    """CRC of every single byte value: the classic byte-at-a-time lookup table."""
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = ((crc >> 1) ^ _CRC32C_POLY) if crc & 1 else (crc >> 1)
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def _crc32c_update(data: bytes, value: int) -> int:
    """Continue the CRC ``value`` (a finished CRC, as returned to callers) over ``data``."""
    table = _CRC32C_TABLE
    crc = value ^ 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def crc32c(data: Buffer, value: int = 0) -> int:
    """CRC-32C of ``data``; pass a previous result as ``value`` to continue it over more bytes."""
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(E_CRC_DATA_TYPE.format(type=type(data).__name__)) from None
    except ValueError:  # e.g. a released memoryview
        raise TypeError(E_CRC_DATA_CONTIGUOUS) from None
    if not view.c_contiguous:
        raise TypeError(E_CRC_DATA_CONTIGUOUS)
    start = _int_field(value, "value", 0, U32_MAX)
    return _crc32c_update(view.tobytes(), start)


# --- argument checks ----------------------------------------------------------------------------


def _int_field(value: object, field: str, lo: int, hi: int) -> int:
    """``value`` as an exact int in lo..hi. bool is refused: a flag passed where a number belongs is
    almost always a bug. ``operator.index`` strips int subclasses (IntEnum, IntFlag) to their value
    without calling any overridden comparison or formatting."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(E_NOT_INT.format(field=field, type=type(value).__name__))
    number = operator.index(value)
    if not lo <= number <= hi:
        raise InvalidArgument(E_RANGE.format(field=field, lo=lo, hi=hi, value=number))
    return number


def _byte_view(value: object, field: str) -> memoryview:
    """A flat unsigned-byte view of a bytes-like ``value``; InvalidArgument for anything else."""
    try:
        view = memoryview(value)  # type: ignore[arg-type]  # the point is to find out
    except TypeError:
        raise InvalidArgument(E_NOT_BYTES.format(field=field, type=type(value).__name__)) from None
    except ValueError:  # a released memoryview
        raise InvalidArgument(E_NOT_CONTIGUOUS.format(field=field)) from None
    if not view.c_contiguous:
        raise InvalidArgument(E_NOT_CONTIGUOUS.format(field=field))
    if view.format == "B" and view.ndim == 1:
        return view
    return memoryview(view.tobytes())  # e.g. array("I"): its raw bytes, as the C buffer API sees them


def _utf8_field(value: object, field: str, limit: int, *, allow_empty: bool) -> bytes:
    """The UTF-8 bytes of a str field, checked in the order: type, encodable, empty, length."""
    if not isinstance(value, str):
        raise InvalidArgument(E_NOT_STR.format(field=field, type=type(value).__name__))
    try:
        # str.encode(value, ...) rather than value.encode(...): a str subclass cannot override it.
        data = str.encode(value, "utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(E_NOT_UTF8.format(field=field)) from None
    if not data and not allow_empty:
        raise InvalidArgument(E_EMPTY.format(field=field))
    if len(data) > limit:
        raise InvalidArgument(E_TOO_LONG.format(field=field, n=len(data), limit=limit))
    return data


# --- records ------------------------------------------------------------------------------------

# magic, format version, type, flags, reserved, term, index, key id, dict id, payload length, CRC
_HEADER = struct.Struct("<2sBBHHQQIIII")
_CRC_OFFSET = 36
assert _HEADER.size == HEADER_SIZE


def _record_type(value: object) -> int:
    # A separate function because encode_record's ``type`` parameter shadows the builtin.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(E_NOT_INT.format(field="type", type=type(value).__name__))
    number = operator.index(value)
    if number not in KNOWN_RECORD_TYPES:
        raise InvalidArgument(E_RECORD_TYPE.format(value=number))
    return number


def encode_record(
    type: int, flags: int, term: int, index: int, key_id: int, dict_id: int, payload: Buffer
) -> bytes:
    """One framed record: the 40-byte header followed by ``payload``."""
    # Checked in argument order, then the cross-field rules, then the payload (the Cython codec
    # follows exactly the same order, so both report the same first problem).
    type_ = _record_type(type)
    flags_ = _int_field(flags, "flags", 0, 0xFFFF)
    if flags_ & ~KNOWN_FLAGS:
        raise InvalidArgument(E_FLAGS.format(value=flags_, bits=flags_ & ~KNOWN_FLAGS, known=KNOWN_FLAGS))
    term_ = _int_field(term, "term", 0, U64_MAX)
    index_ = _int_field(index, "index", 1, U64_MAX)
    key_id_ = _int_field(key_id, "key_id", 0, U32_MAX)
    dict_id_ = _int_field(dict_id, "dict_id", 0, U32_MAX)
    encrypted = bool(flags_ & Flags.ENCRYPTED)
    if key_id_ != 0 and not encrypted:
        raise InvalidArgument(E_KEY_WITHOUT_ENCRYPTED.format(key_id=key_id_))
    if encrypted and key_id_ == 0:
        raise InvalidArgument(E_ENCRYPTED_WITHOUT_KEY)
    if dict_id_ != 0 and not flags_ & Flags.COMPRESSED:
        raise InvalidArgument(E_DICT_WITHOUT_COMPRESSED.format(dict_id=dict_id_))
    body = _byte_view(payload, "payload").tobytes()
    if len(body) > limits.RECORD_PAYLOAD_BYTES_MAX:
        raise InvalidArgument(E_PAYLOAD_TOO_LONG.format(n=len(body), limit=limits.RECORD_PAYLOAD_BYTES_MAX))
    head = _HEADER.pack(
        MAGIC, FORMAT_VERSION, type_, flags_, 0, term_, index_, key_id_, dict_id_, len(body), 0
    )[:_CRC_OFFSET]
    crc = _crc32c_update(body, _crc32c_update(head, 0))
    return head + crc.to_bytes(4, "little") + body


def decode_record(buf: Buffer, expected_index: int = 0) -> Record:
    """Validate one framed record and return it (payload copied). ``expected_index`` 0: any index."""
    view = _byte_view(buf, "buf")
    expected = _int_field(expected_index, "expected_index", 0, U64_MAX)
    return _decode(view, expected)


def _decode(view: memoryview, expected: int) -> Record:
    # The order of the checks is part of the contract (both codecs report the same first
    # problem): framing first, then the checksum, then what the checksummed bytes say.
    n = len(view)
    if n < HEADER_SIZE:
        raise Corruption(C_HEADER_TRUNCATED.format(n=n, need=HEADER_SIZE))
    magic, version, type_, flags, reserved, term, index, key_id, dict_id, length, stored = _HEADER.unpack(
        view[:HEADER_SIZE]
    )
    if magic != MAGIC:
        raise Corruption(C_MAGIC.format(found=magic, expected=MAGIC))
    if version != FORMAT_VERSION:
        raise Corruption(C_FORMAT_VERSION.format(version=version, supported=FORMAT_VERSION))
    if length > limits.RECORD_PAYLOAD_BYTES_MAX:
        raise Corruption(C_PAYLOAD_TOO_LONG.format(n=length, limit=limits.RECORD_PAYLOAD_BYTES_MAX))
    have = n - HEADER_SIZE
    if have < length:
        raise Corruption(C_PAYLOAD_TRUNCATED.format(n=length, have=have))
    if have > length:
        raise Corruption(C_TRAILING.format(extra=have - length, n=length))
    payload = view[HEADER_SIZE:].tobytes()
    computed = _crc32c_update(payload, _crc32c_update(view[:_CRC_OFFSET].tobytes(), 0))
    if computed != stored:
        raise Corruption(C_CHECKSUM.format(stored=stored, computed=computed))
    if type_ not in KNOWN_RECORD_TYPES:
        raise Corruption(C_RECORD_TYPE.format(value=type_))
    if flags & ~KNOWN_FLAGS:
        raise Corruption(C_FLAGS.format(bits=flags & ~KNOWN_FLAGS, value=flags))
    if reserved != 0:
        raise Corruption(C_RESERVED.format(value=reserved))
    encrypted = bool(flags & Flags.ENCRYPTED)
    if key_id != 0 and not encrypted:
        raise Corruption(C_KEY_WITHOUT_ENCRYPTED.format(key_id=key_id))
    if encrypted and key_id == 0:
        raise Corruption(C_ENCRYPTED_WITHOUT_KEY)
    if dict_id != 0 and not flags & Flags.COMPRESSED:
        raise Corruption(C_DICT_WITHOUT_COMPRESSED.format(dict_id=dict_id))
    if index == 0:
        raise Corruption(C_INDEX_ZERO)
    if expected != 0 and index != expected:
        raise Corruption(C_INDEX_MISMATCH.format(index=index, expected=expected))
    return Record(type_, flags, term, index, key_id, dict_id, payload)


def encode_records(items: Sequence[_RecordItem]) -> list[bytes]:
    """``encode_record`` over many 7-tuples (a ``Record`` is one); errors name the item."""
    if not isinstance(items, (list, tuple)):
        raise InvalidArgument(E_NOT_SEQUENCE.format(field="items", type=type(items).__name__))
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, (list, tuple)) or len(item) != 7:
            raise InvalidArgument(E_ITEM_SHAPE.format(i=i))
        try:
            out.append(encode_record(*item))
        except InvalidArgument as exc:
            raise InvalidArgument(E_ITEM_PREFIX.format(i=i, reason=exc)) from None
    return out


def decode_records(bufs: Sequence[Buffer], first_index: int = 0) -> list[Record]:
    """``decode_record`` over many buffers. With ``first_index`` != 0, ``bufs[i]`` must hold log
    index ``first_index + i`` and a Corruption names that index; without it the reason names the
    position in ``bufs``."""
    if not isinstance(bufs, (list, tuple)):
        raise InvalidArgument(E_NOT_SEQUENCE.format(field="bufs", type=type(bufs).__name__))
    first = _int_field(first_index, "first_index", 0, U64_MAX)
    if first != 0 and bufs and first + len(bufs) - 1 > U64_MAX:
        raise InvalidArgument(E_FIRST_INDEX_OVERFLOW.format(first=first, n=len(bufs)))
    out = []
    for i, buf in enumerate(bufs):
        view = _byte_view(buf, f"bufs[{i}]")
        try:
            out.append(_decode(view, first + i if first else 0))
        except Corruption as exc:
            if first:
                raise Corruption(exc.reason, first + i) from None
            raise Corruption(C_BATCH_PREFIX.format(i=i, reason=exc.reason)) from None
    return out


# --- envelopes ----------------------------------------------------------------------------------

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_I8 = struct.Struct("<b")
_I64 = struct.Struct("<q")
_ENVELOPE_PREFIX = 1 + 4  # schema version + envelope length


def encode_envelope(env: Envelope) -> bytes:
    """The schema-version-1 encoding of ``env``."""
    if not isinstance(env, tuple):
        raise InvalidArgument(E_ENVELOPE_TYPE.format(type=type(env).__name__))
    if len(env) != 9:
        raise InvalidArgument(E_ENVELOPE_FIELDS.format(n=len(env)))
    message_id, namespace, mail_from, recipients, priority, created, not_before, expires, idem = env
    if not isinstance(message_id, bytes):
        raise InvalidArgument(E_NOT_BYTES.format(field="message_id", type=type(message_id).__name__))
    if len(message_id) != MESSAGE_ID_BYTES:
        raise InvalidArgument(E_MESSAGE_ID_LENGTH.format(n=len(message_id), need=MESSAGE_ID_BYTES))
    ns = _utf8_field(namespace, "namespace", limits.NAMESPACE_BYTES_MAX, allow_empty=False)
    sender = _utf8_field(mail_from, "mail_from", limits.ADDRESS_BYTES_MAX, allow_empty=True)
    if not isinstance(recipients, (list, tuple)):
        raise InvalidArgument(E_RECIPIENTS_TYPE.format(type=type(recipients).__name__))
    if not recipients:
        raise InvalidArgument(E_EMPTY.format(field="recipients"))
    if len(recipients) > limits.RECIPIENTS_MAX:
        raise InvalidArgument(E_RECIPIENTS_COUNT.format(n=len(recipients), limit=limits.RECIPIENTS_MAX))
    rcpts = [
        _utf8_field(r, f"recipients[{i}]", limits.ADDRESS_BYTES_MAX, allow_empty=False)
        for i, r in enumerate(recipients)
    ]
    prio = _int_field(priority, "priority", limits.PRIORITY_MIN, limits.PRIORITY_MAX)
    times = [
        _int_field(value, field, 0, limits.TIME_MS_MAX)
        for value, field in (
            (created, "created_at_ms"),
            (not_before, "not_before_ms"),
            (expires, "expires_at_ms"),
        )
    ]
    if idem is None:
        key = b""
    elif not isinstance(idem, str):
        raise InvalidArgument(E_NOT_STR_OR_NONE.format(field="idempotency_key", type=type(idem).__name__))
    elif not idem:
        # "" would decode as None, so accepting it would break the round trip.
        raise InvalidArgument(E_IDEMPOTENCY_EMPTY)
    else:
        key = _utf8_field(idem, "idempotency_key", limits.IDEMPOTENCY_KEY_BYTES_MAX, allow_empty=False)

    parts = [message_id, _U8.pack(len(ns)), ns, _U16.pack(len(sender)), sender, _I8.pack(prio)]
    parts += [_I64.pack(t) for t in times]
    parts += [_U16.pack(len(key)), key, _U16.pack(len(rcpts))]
    for r in rcpts:
        parts += [_U16.pack(len(r)), r]
    body = b"".join(parts)
    return _U8.pack(ENVELOPE_SCHEMA_VERSION) + _U32.pack(_ENVELOPE_PREFIX + len(body)) + body


class _Reader:
    """Sequential little-endian reads from an envelope, naming the field that ran out of bytes."""

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.pos = 0
        self.end = len(data)  # narrowed to the envelope length once that is known
        self.length: int | None = None

    def take(self, n: int, field: str) -> bytes:
        if self.pos + n > self.end:
            if self.length is not None and self.length <= len(self.data):
                # The bytes exist but the envelope's own length field says they are not its own.
                raise Corruption(
                    C_ENV_LENGTH_SHORT.format(length=self.length, field=field, upto=self.pos + n)
                )
            raise Corruption(C_ENV_TRUNCATED.format(field=field, need=n, offset=self.pos, end=self.end))
        chunk = self.data[self.pos : self.pos + n].tobytes()
        self.pos += n
        return chunk

    def unpack(self, fmt: struct.Struct, field: str) -> int:
        value: int = fmt.unpack(self.take(fmt.size, field))[0]
        return value

    def text(self, n: int, field: str) -> str:
        try:
            return self.take(n, field).decode("utf-8")
        except UnicodeDecodeError:
            raise Corruption(C_ENV_UTF8.format(field=field)) from None


def _length_prefixed(r: _Reader, fmt: struct.Struct, field: str, limit: int, *, allow_empty: bool) -> str:
    n = r.unpack(fmt, f"{field} length")
    if n == 0 and not allow_empty:
        raise Corruption(C_ENV_EMPTY.format(field=field))
    if n > limit:
        raise Corruption(C_ENV_TOO_LONG.format(field=field, n=n, limit=limit))
    return r.text(n, field)


def _time(r: _Reader, field: str) -> int:
    value = r.unpack(_I64, field)
    if value < 0:  # an i64 cannot exceed TIME_MS_MAX; only the sign can be wrong
        raise Corruption(C_ENV_RANGE.format(field=field, value=value, lo=0, hi=limits.TIME_MS_MAX))
    return value


def decode_envelope(buf: Buffer) -> tuple[Envelope, int]:
    """Decode the envelope at the start of ``buf``; return it and the bytes it occupies (the
    message body, if any, follows)."""
    r = _Reader(_byte_view(buf, "buf"))  # a view: the message body after the envelope is not copied
    version = r.unpack(_U8, "schema version")
    if version == 0:
        raise Corruption(C_ENV_VERSION_ZERO)
    if version > ENVELOPE_SCHEMA_VERSION:
        raise Corruption(C_ENV_VERSION_NEWER.format(version=version, supported=ENVELOPE_SCHEMA_VERSION))
    length = r.unpack(_U32, "envelope length")
    r.length = length
    r.end = min(length, len(r.data))

    # --- schema version 1 fields ---
    message_id = r.take(MESSAGE_ID_BYTES, "message_id")
    namespace = _length_prefixed(r, _U8, "namespace", limits.NAMESPACE_BYTES_MAX, allow_empty=False)
    mail_from = _length_prefixed(r, _U16, "mail_from", limits.ADDRESS_BYTES_MAX, allow_empty=True)
    priority = r.unpack(_I8, "priority")
    if not limits.PRIORITY_MIN <= priority <= limits.PRIORITY_MAX:
        raise Corruption(
            C_ENV_RANGE.format(
                field="priority", value=priority, lo=limits.PRIORITY_MIN, hi=limits.PRIORITY_MAX
            )
        )
    created = _time(r, "created_at_ms")
    not_before = _time(r, "not_before_ms")
    expires = _time(r, "expires_at_ms")
    idem = _length_prefixed(r, _U16, "idempotency_key", limits.IDEMPOTENCY_KEY_BYTES_MAX, allow_empty=True)
    count = r.unpack(_U16, "recipient count")
    if not 1 <= count <= limits.RECIPIENTS_MAX:
        raise Corruption(C_ENV_RECIPIENT_COUNT.format(n=count, limit=limits.RECIPIENTS_MAX))
    recipients = tuple(
        _length_prefixed(r, _U16, f"recipients[{i}]", limits.ADDRESS_BYTES_MAX, allow_empty=False)
        for i in range(count)
    )
    # --- fields of later schema versions go here, each read only when ``version`` has it (and
    # defaulted otherwise). Until then every accepted version is fully known, so the envelope
    # must end exactly where its fields do: stray bytes inside it are damage, not extensions.

    if length > len(r.data):
        raise Corruption(C_ENV_LENGTH_PAST_BUFFER.format(length=length, have=len(r.data)))
    if r.pos != length:
        raise Corruption(C_ENV_LENGTH_MISMATCH.format(length=length, used=r.pos))
    env = Envelope(
        message_id, namespace, mail_from, recipients, priority, created, not_before, expires, idem or None
    )
    return env, length


__all__ = [
    "crc32c",
    "decode_envelope",
    "decode_record",
    "decode_records",
    "encode_envelope",
    "encode_record",
    "encode_records",
]
