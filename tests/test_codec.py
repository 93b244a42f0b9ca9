"""Tests of the record/envelope codec: the pure-Python reference and the Cython extension.

Most tests run against both implementations (the ``codec`` fixture). The differential tests feed
the same valid, invalid and damaged inputs to both and require identical results: the same bytes,
the same values, or the same exception type with the same message. The Cython module is imported
directly (not through ``mqstore.codec``, which ``MQSTORE_PURE_PYTHON`` may switch).
"""

from __future__ import annotations

import array
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mqstore import _codec as cy
from mqstore import limits
from mqstore.codec import _reference as ref
from mqstore.codec._types import (
    HEADER_SIZE,
    KNOWN_RECORD_TYPES,
    U32_MAX,
    U64_MAX,
    Envelope,
    Flags,
    Record,
    RecordType,
)
from mqstore.errors import Corruption, InvalidArgument

REPO = Path(__file__).resolve().parent.parent
IMPLS = [pytest.param(ref, id="python"), pytest.param(cy, id="cython")]
DIFF = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(params=IMPLS)
def codec(request: pytest.FixtureRequest) -> ModuleType:
    module: ModuleType = request.param
    return module


def outcome(fn: Callable[..., Any], *args: Any) -> tuple[Any, ...]:
    """What calling ``fn`` did, in a form two implementations can be compared by."""
    try:
        return ("ok", fn(*args))
    except Exception as exc:  # the comparison is the assertion
        return ("error", type(exc), str(exc))


def same(name: str, *args: Any) -> tuple[Any, ...]:
    """Call ``name`` in both codecs; assert identical outcomes; return it."""
    expected = outcome(getattr(ref, name), *args)
    got = outcome(getattr(cy, name), *args)
    assert got == expected, f"{name}{args!r}"
    return got


# --- builders for hand-made (possibly invalid) bytes ---------------------------------------------

HEAD = struct.Struct("<2sBBHHQQIII")  # the header up to (excluding) the CRC


def raw_record(
    *,
    magic: bytes = b"MQ",
    version: int = 1,
    type: int = 3,
    flags: int = 0,
    reserved: int = 0,
    term: int = 1,
    index: int = 1,
    key_id: int = 0,
    dict_id: int = 0,
    length: int | None = None,
    payload: bytes = b"payload",
    crc: int | None = None,
) -> bytes:
    """A record with any header values and, unless ``crc`` is given, a correct checksum."""
    head = HEAD.pack(
        magic,
        version,
        type,
        flags,
        reserved,
        term,
        index,
        key_id,
        dict_id,
        len(payload) if length is None else length,
    )
    if crc is None:
        crc = ref.crc32c(payload, ref.crc32c(head))
    return head + struct.pack("<I", crc) + payload


def raw_envelope(
    *,
    version: int = 1,
    length: int | None = None,
    message_id: bytes = b"m" * 16,
    namespace: bytes = b"ns",
    mail_from: bytes = b"from@example.com",
    priority: int = 0,
    times: tuple[int, int, int] = (1, 0, 0),
    idem: bytes = b"",
    recipients: tuple[bytes, ...] = (b"to@example.com",),
    count: int | None = None,
    inner_extra: bytes = b"",
) -> bytes:
    """An envelope with any field values; ``inner_extra`` goes inside the envelope (counted by the
    length field) after the last field."""
    body = message_id + struct.pack("<B", len(namespace)) + namespace
    body += struct.pack("<H", len(mail_from)) + mail_from + struct.pack("<b", priority)
    body += struct.pack("<qqq", *times) + struct.pack("<H", len(idem)) + idem
    body += struct.pack("<H", len(recipients) if count is None else count)
    for r in recipients:
        body += struct.pack("<H", len(r)) + r
    body += inner_extra
    total = 5 + len(body) if length is None else length
    return struct.pack("<BI", version, total) + body


# --- strategies ----------------------------------------------------------------------------------

u64 = st.integers(0, U64_MAX)
utf8_char = st.characters(codec="utf-8")  # no lone surrogates
# <= 16 chars is <= 64 UTF-8 bytes and <= 80 chars is <= 320: always within the limits.
namespaces = st.text(utf8_char, min_size=1, max_size=16)
addresses = st.text(utf8_char, min_size=1, max_size=80)


@st.composite
def record_args(draw: st.DrawFn, max_payload: int = 300) -> tuple[Any, ...]:
    flags = draw(st.integers(0, 3))
    key_id = draw(st.integers(1, U32_MAX)) if flags & Flags.ENCRYPTED else 0
    dict_id = draw(st.integers(0, U32_MAX)) if flags & Flags.COMPRESSED else 0
    payload = draw(st.binary(max_size=max_payload))
    return (
        draw(st.sampled_from(sorted(KNOWN_RECORD_TYPES))),
        flags,
        draw(u64),
        draw(st.integers(1, U64_MAX)),
        key_id,
        dict_id,
        payload,
    )


envelopes = st.builds(
    Envelope,
    message_id=st.binary(min_size=16, max_size=16),
    namespace=namespaces,
    mail_from=st.one_of(st.just(""), addresses),
    recipients=st.lists(addresses, min_size=1, max_size=6).map(tuple),
    priority=st.integers(limits.PRIORITY_MIN, limits.PRIORITY_MAX),
    created_at_ms=st.integers(0, limits.TIME_MS_MAX),
    not_before_ms=st.integers(0, limits.TIME_MS_MAX),
    expires_at_ms=st.integers(0, limits.TIME_MS_MAX),
    idempotency_key=st.one_of(st.none(), st.text(utf8_char, min_size=1, max_size=64)),
)

# Values of the wrong kind for any argument; some happen to be valid, which is fine: both codecs
# must still agree.
junk = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False),
    st.integers(-(2**70), 2**70),
    st.sampled_from([-1, 0, 1, 2, 4, 0xFFFF, 0x10000, U32_MAX, U32_MAX + 1, U64_MAX, U64_MAX + 1, 2**63]),
    st.text(max_size=5),
    st.binary(max_size=5),
    st.binary(max_size=5).map(bytearray),
    st.binary(max_size=5).map(lambda b: memoryview(b)),
    st.lists(st.integers(0, 3), max_size=3),
    st.just(memoryview(b"abcdef")[::2]),
    st.just(array.array("H", [1, 2, 3])),  # a buffer whose items are not bytes
    st.just(memoryview(bytes(8)).cast("B", (2, 4))),  # a 2-D buffer
    st.just(RecordType.ENQUEUE),
    st.just(Flags.ENCRYPTED | Flags.COMPRESSED),
)


# --- CRC32C --------------------------------------------------------------------------------------

CRC_FUNCS = [
    pytest.param(ref.crc32c, id="python"),
    pytest.param(cy.crc32c, id="cython"),
    pytest.param(cy._crc32c_sw, id="cython-sw"),
]


@pytest.mark.parametrize("crc", CRC_FUNCS)
@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", 0),
        (b"123456789", 0xE3069283),
        (bytes(32), 0x8A9136AA),
        (b"\xff" * 32, 0x62A8AB43),
        (bytes(range(32)), 0x46DD794E),  # RFC 3720 B.4 "incrementing"
        (bytes(range(31, -1, -1)), 0x113FDB5C),  # RFC 3720 B.4 "decrementing"
    ],
)
def test_crc32c_known_vectors(crc: Callable[..., int], data: bytes, expected: int) -> None:
    assert crc(data) == expected


@pytest.mark.parametrize("crc", CRC_FUNCS)
def test_crc32c_accepts_bytes_like(crc: Callable[..., int]) -> None:
    data = b"123456789"
    assert crc(bytearray(data)) == crc(memoryview(data)) == crc(memoryview(b"xx" + data)[2:]) == 0xE3069283
    words = array.array("I", [1, 2, 3])
    assert crc(words) == crc(words.tobytes())


@pytest.mark.parametrize("crc", CRC_FUNCS)
def test_crc32c_refuses_non_buffers(crc: Callable[..., int]) -> None:
    with pytest.raises(TypeError, match="bytes-like object, not str"):
        crc("123456789")
    with pytest.raises(TypeError, match="C-contiguous"):
        crc(memoryview(b"123456789")[::2])
    with pytest.raises(InvalidArgument, match="value must be an int, not str"):
        crc(b"", "0")
    with pytest.raises(InvalidArgument, match=r"value must be in 0\.\.4294967295, got 4294967296"):
        crc(b"", 2**32)


@DIFF
@given(a=st.binary(max_size=200), b=st.binary(max_size=200))
def test_crc32c_continues(a: bytes, b: bytes) -> None:
    for crc in (ref.crc32c, cy.crc32c, cy._crc32c_sw):
        assert crc(b, crc(a)) == crc(a + b)
    assert cy.crc32c(a + b) == ref.crc32c(a + b)


@DIFF
@given(data=st.binary(min_size=0, max_size=5000), start=st.integers(0, 15), value=st.integers(0, U32_MAX))
def test_crc32c_hardware_and_software_paths_agree(data: bytes, start: int, value: int) -> None:
    # Slicing a memoryview moves the start address, exercising every alignment prologue.
    view = memoryview(data)[min(start, len(data)) :]
    assert cy.crc32c(view, value) == cy._crc32c_sw(view, value)


def test_crc32c_paths_agree_on_every_small_length_and_alignment() -> None:
    data = os.urandom(200)
    for start in range(16):
        for n in range(150):
            view = memoryview(data)[start : start + n]
            assert cy.crc32c(view) == cy._crc32c_sw(view) == ref.crc32c(view)


def test_crc32c_large_input() -> None:
    # Above the size where the extension releases the GIL.
    data = os.urandom(300_000)
    assert cy.crc32c(data) == cy._crc32c_sw(data) == ref.crc32c(data)


def test_crc32c_impl_is_reported() -> None:
    assert cy.CRC32C_IMPL in ("sse4.2", "slicing-by-8")


# --- records -------------------------------------------------------------------------------------


def test_record_layout(codec: ModuleType) -> None:
    buf = codec.encode_record(
        RecordType.ENQUEUE, Flags.ENCRYPTED | Flags.COMPRESSED, 7, 0x0102030405060708, 9, 10, b"hi"
    )
    assert buf == raw_record(
        type=3, flags=3, term=7, index=0x0102030405060708, key_id=9, dict_id=10, payload=b"hi"
    )
    assert buf[:2] == b"MQ" and buf[2] == 1 and buf[3] == 3
    assert struct.unpack_from("<I", buf, 36)[0] == ref.crc32c(buf[40:], ref.crc32c(buf[:36]))


@DIFF
@given(args=record_args())
def test_record_round_trip_and_both_codecs_agree(args: tuple[Any, ...]) -> None:
    buf = ref.encode_record(*args)
    assert cy.encode_record(*args) == buf
    assert len(buf) == HEADER_SIZE + len(args[6])
    for codec in (ref, cy):
        rec = codec.decode_record(buf, args[3])
        assert type(rec) is Record
        assert tuple(rec) == args
        assert type(rec.payload) is bytes


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview, lambda b: memoryview(b"xyz" + b)[3:]])
def test_record_accepts_bytes_like(codec: ModuleType, wrap: Callable[[bytes], Any]) -> None:
    buf = codec.encode_record(18, 0, 0, 5, 0, 0, wrap(b"body"))
    rec = codec.decode_record(wrap(buf))
    assert rec == Record(18, 0, 0, 5, 0, 0, b"body")
    assert type(rec.payload) is bytes


def test_record_large_payload(codec: ModuleType) -> None:
    # Above the size where the extension drops the GIL to copy and checksum.
    payload = os.urandom(100_000)
    buf = codec.encode_record(18, 0, 1, 2, 0, 0, payload)
    assert buf == raw_record(type=18, term=1, index=2, payload=payload)
    assert codec.decode_record(buf).payload == payload
    with pytest.raises(Corruption, match="checksum mismatch"):
        codec.decode_record(buf[:-1] + bytes([buf[-1] ^ 1]))


def test_int_subclasses_are_plain_numbers(codec: ModuleType) -> None:
    buf = codec.encode_record(RecordType.BLOB, Flags.COMPRESSED, 1, 1, 0, 3, b"")
    rec = codec.decode_record(buf)
    assert rec.type == 18 and type(rec.type) is int and type(rec.flags) is int


# -- encode errors

ENCODE_ERRORS = [
    (("3", 0, 0, 1, 0, 0, b""), "type must be an int, not str"),
    ((True, 0, 0, 1, 0, 0, b""), "type must be an int, not bool"),
    ((0, 0, 0, 1, 0, 0, b""), "type 0 is not a known record type"),
    ((2**70, 0, 0, 1, 0, 0, b""), f"type {2**70} is not a known record type"),
    ((-1, 0, 0, 1, 0, 0, b""), "type -1 is not a known record type"),
    ((3, 1.0, 0, 1, 0, 0, b""), "flags must be an int, not float"),
    ((3, 8, 0, 1, 0, 0, b""), "flags 0x0008 has undefined bits 0x0008 (defined: 0x0007)"),
    ((3, -1, 0, 1, 0, 0, b""), "flags must be in 0..65535, got -1"),
    ((3, 0x10000, 0, 1, 0, 0, b""), "flags must be in 0..65535, got 65536"),
    ((3, 0, -1, 1, 0, 0, b""), f"term must be in 0..{U64_MAX}, got -1"),
    ((3, 0, 2**64, 1, 0, 0, b""), f"term must be in 0..{U64_MAX}, got {2**64}"),
    ((3, 0, None, 1, 0, 0, b""), "term must be an int, not NoneType"),
    ((3, 0, 0, 0, 0, 0, b""), f"index must be in 1..{U64_MAX}, got 0"),
    ((3, 0, 0, "1", 0, 0, b""), "index must be an int, not str"),
    ((3, 2, 0, 1, 2**32, 0, b""), f"key_id must be in 0..{U32_MAX}, got {2**32}"),
    ((3, 1, 0, 1, 0, -5, b""), f"dict_id must be in 0..{U32_MAX}, got -5"),
    ((3, 0, 0, 1, 5, 0, b""), "key_id is 5 but the ENCRYPTED flag is not set"),
    ((3, 2, 0, 1, 0, 0, b""), "the ENCRYPTED flag is set but key_id is 0"),
    ((3, 2, 0, 1, 1, 7, b""), "dict_id is 7 but the COMPRESSED flag is not set"),
    ((3, 0, 0, 1, 0, 0, "text"), "payload must be bytes, not str"),
    ((3, 0, 0, 1, 0, 0, None), "payload must be bytes, not NoneType"),
    ((3, 0, 0, 1, 0, 0, memoryview(b"abcd")[::2]), "payload must be a C-contiguous buffer"),
]


@pytest.mark.parametrize(("args", "message"), ENCODE_ERRORS)
def test_encode_record_errors(codec: ModuleType, args: tuple[Any, ...], message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        codec.encode_record(*args)
    assert str(info.value) == message


def test_encode_record_payload_limit(codec: ModuleType) -> None:
    # A real 51 MiB payload through the reference CRC would take seconds; the length check comes
    # before any checksumming, so an oversized zero buffer costs only the allocation.
    big = bytes(limits.RECORD_PAYLOAD_BYTES_MAX + 1)
    with pytest.raises(InvalidArgument) as info:
        codec.encode_record(3, 0, 0, 1, 0, 0, big)
    assert str(info.value) == f"payload is {len(big)} bytes, the limit is {limits.RECORD_PAYLOAD_BYTES_MAX}"


@DIFF
@given(args=record_args(max_payload=20), position=st.integers(0, 6), bad=junk)
def test_invalid_record_arguments_give_identical_errors(
    args: tuple[Any, ...], position: int, bad: Any
) -> None:
    mutated = list(args)
    mutated[position] = bad
    result = same("encode_record", *mutated)
    if result[0] == "error":
        assert result[1] is InvalidArgument


@DIFF
@given(
    fields=st.tuples(
        st.integers(-2, 260),
        st.integers(-1, 0x1_0003),
        u64,
        st.integers(0, 3),
        st.integers(0, 3),
        st.integers(0, 3),
    )
)
def test_random_record_fields_give_identical_results(fields: tuple[int, ...]) -> None:
    same("encode_record", *fields, b"p")


# -- decode errors


def check_corrupt(codec: ModuleType, buf: Any, *fragments: str, expected_index: int = 0) -> None:
    with pytest.raises(Corruption) as info:
        codec.decode_record(buf, expected_index)
    assert info.value.index is None
    for fragment in fragments:
        assert fragment in str(info.value)


def test_decode_record_truncated_header(codec: ModuleType) -> None:
    check_corrupt(codec, b"MQ\x01" + bytes(9), "record truncated: 12 bytes, the header alone needs 40")
    check_corrupt(codec, b"", "record truncated: 0 bytes")


def test_decode_record_bad_magic(codec: ModuleType) -> None:
    check_corrupt(codec, raw_record(magic=b"XY"), "bad magic b'XY', expected b'MQ'")


def test_decode_record_bad_version(codec: ModuleType) -> None:
    check_corrupt(codec, raw_record(version=2), "unsupported record format version 2", "reads version 1")


def test_decode_record_payload_length_over_limit(codec: ModuleType) -> None:
    check_corrupt(
        codec,
        raw_record(length=limits.RECORD_PAYLOAD_BYTES_MAX + 1),
        f"payload length {limits.RECORD_PAYLOAD_BYTES_MAX + 1} in the header exceeds the limit",
    )


def test_decode_record_truncated_payload(codec: ModuleType) -> None:
    buf = raw_record(payload=b"0123456789")
    check_corrupt(codec, buf[:-3], "record truncated: the header announces 10 payload bytes, only 7 present")


def test_decode_record_trailing_bytes(codec: ModuleType) -> None:
    check_corrupt(codec, raw_record(payload=b"0123") + b"xyz", "3 trailing bytes after its 4-byte payload")


def test_decode_record_checksum(codec: ModuleType) -> None:
    good = raw_record()
    computed = struct.unpack_from("<I", good, 36)[0]
    check_corrupt(
        codec,
        raw_record(crc=0x1234ABCD),
        f"checksum mismatch: stored 0x1234abcd, computed 0x{computed:08x}",
    )
    flipped = bytearray(good)
    flipped[-1] ^= 0x40
    check_corrupt(codec, bytes(flipped), "checksum mismatch")


def test_decode_record_unknown_type(codec: ModuleType) -> None:
    check_corrupt(codec, raw_record(type=0), "unknown record type 0")
    check_corrupt(codec, raw_record(type=200), "unknown record type 200")


def test_decode_record_unknown_flags(codec: ModuleType) -> None:
    check_corrupt(codec, raw_record(flags=0x8001), "unknown flag bits 0x8000 in flags 0x8001")


def test_decode_record_reserved(codec: ModuleType) -> None:
    check_corrupt(codec, raw_record(reserved=0x0100), "reserved header field is 0x0100, must be zero")


def test_decode_record_key_without_encrypted(codec: ModuleType) -> None:
    check_corrupt(codec, raw_record(key_id=9), "key_id 9 is set but the ENCRYPTED flag is not")


def test_decode_record_encrypted_without_key(codec: ModuleType) -> None:
    check_corrupt(codec, raw_record(flags=Flags.ENCRYPTED), "the ENCRYPTED flag is set but key_id is 0")


def test_decode_record_dict_without_compressed(codec: ModuleType) -> None:
    check_corrupt(codec, raw_record(dict_id=4), "dict_id 4 is set but the COMPRESSED flag is not")


def test_decode_record_index_zero(codec: ModuleType) -> None:
    check_corrupt(codec, raw_record(index=0), "record index is 0")


def test_decode_record_expected_index(codec: ModuleType) -> None:
    buf = raw_record(index=5)
    assert codec.decode_record(buf, 5).index == 5
    check_corrupt(codec, buf, "record index is 5, expected 6", expected_index=6)


def test_decode_record_check_order(codec: ModuleType) -> None:
    # Several faults at once: the first in the documented order is the one reported.
    check_corrupt(codec, raw_record(magic=b"ZZ", version=9, crc=1), "bad magic")
    check_corrupt(codec, raw_record(version=9, crc=1), "format version 9")
    check_corrupt(codec, raw_record(type=0, crc=1), "checksum mismatch")
    check_corrupt(codec, raw_record(type=0, flags=8, reserved=1), "unknown record type 0")
    check_corrupt(codec, raw_record(flags=8, reserved=1), "unknown flag bits")
    check_corrupt(codec, raw_record(reserved=1, key_id=1, index=0), "reserved header field")
    check_corrupt(codec, raw_record(key_id=1, index=0), "ENCRYPTED flag is not")
    check_corrupt(codec, raw_record(dict_id=1, index=0), "COMPRESSED flag is not")


def test_decode_record_argument_errors(codec: ModuleType) -> None:
    with pytest.raises(InvalidArgument, match=r"^buf must be bytes, not str$"):
        codec.decode_record("MQ")
    with pytest.raises(InvalidArgument, match=r"^buf must be a C-contiguous buffer$"):
        codec.decode_record(memoryview(raw_record() * 2)[::2])
    with pytest.raises(InvalidArgument, match=r"^expected_index must be an int, not float$"):
        codec.decode_record(raw_record(), 1.0)
    with pytest.raises(InvalidArgument, match=r"^expected_index must be in 0\.\.\d+, got -1$"):
        codec.decode_record(raw_record(), -1)


@DIFF
@given(buf=st.one_of(junk, st.just(raw_record(index=2))), expected_index=junk, value=junk)
def test_invalid_decode_arguments_give_identical_errors(buf: Any, expected_index: Any, value: Any) -> None:
    same("decode_record", buf, expected_index)
    same("decode_records", [buf], expected_index)
    same("decode_records", buf, expected_index)
    same("decode_envelope", buf)
    same("crc32c", buf, value)


# -- damaged records: both decoders agree, and never return garbage


def mutate(draw: st.DrawFn, buf: bytes) -> bytes:
    kind = draw(st.sampled_from(["flip", "truncate", "append", "field", "field+crc", "bytes"]))
    data = bytearray(buf)
    if kind == "flip":
        bit = draw(st.integers(0, len(data) * 8 - 1))
        data[bit // 8] ^= 1 << (bit % 8)
    elif kind == "truncate":
        del data[draw(st.integers(0, len(data) - 1)) :]
    elif kind == "append":
        data += draw(st.binary(min_size=1, max_size=8))
    elif kind == "bytes":
        at = draw(st.integers(0, len(data) - 1))
        chunk = draw(st.binary(min_size=1, max_size=8))
        data[at : at + len(chunk)] = chunk
    else:
        # Overwrite a whole header field; "field+crc" then fixes the checksum so the checks behind
        # the CRC (type, flags, reserved, ids, index) are reached.
        offset, size = draw(
            st.sampled_from(
                [(0, 2), (2, 1), (3, 1), (4, 2), (6, 2), (8, 8), (16, 8), (24, 4), (28, 4), (32, 4), (36, 4)]
            )
        )
        value = draw(st.one_of(st.integers(0, 3), st.integers(0, 2 ** (8 * size) - 1)))
        data[offset : offset + size] = value.to_bytes(size, "little")
        if kind == "field+crc" and len(data) >= HEADER_SIZE:
            crc = ref.crc32c(bytes(data[HEADER_SIZE:]), ref.crc32c(bytes(data[:36])))
            data[36:40] = crc.to_bytes(4, "little")
    return bytes(data)


@st.composite
def damaged_records(draw: st.DrawFn) -> tuple[bytes, int]:
    buf = ref.encode_record(*draw(record_args(max_payload=40)))
    return mutate(draw, buf), draw(st.sampled_from([0, 0, 1, 2, 5]))


@DIFF
@given(case=damaged_records())
def test_damaged_records_decode_identically(case: tuple[bytes, int]) -> None:
    buf, expected_index = case
    result = same("decode_record", buf, expected_index)
    if result[0] == "ok":
        # Whatever is accepted is exactly what the encoder makes of the decoded values.
        assert ref.encode_record(*result[1]) == buf
    else:
        assert result[1] is Corruption


# --- batches -------------------------------------------------------------------------------------


@FEW
@given(items=st.lists(record_args(max_payload=30), max_size=8))
def test_batches_match_single_calls(items: list[tuple[Any, ...]]) -> None:
    bufs = [ref.encode_record(*item) for item in items]
    assert ref.encode_records(items) == cy.encode_records(items) == bufs
    as_lists: Any = [list(item) for item in items]
    assert cy.encode_records(as_lists) == bufs
    expected = [ref.decode_record(b) for b in bufs]
    assert ref.decode_records(bufs) == cy.decode_records(tuple(bufs)) == expected
    # Records are 7-tuples in encode order, so decoded records re-encode directly.
    assert cy.encode_records(expected) == bufs


def test_decode_records_first_index(codec: ModuleType) -> None:
    bufs = [raw_record(index=i) for i in (7, 8, 9)]
    assert [r.index for r in codec.decode_records(bufs, 7)] == [7, 8, 9]
    with pytest.raises(Corruption) as info:
        codec.decode_records(bufs, 6)
    assert info.value.index == 6
    assert info.value.reason == "record index is 7, expected 6"
    assert str(info.value) == "log index 6: record index is 7, expected 6"


def test_decode_records_error_names_position(codec: ModuleType) -> None:
    bufs = [raw_record(index=1), raw_record(index=2)[:-1]]
    with pytest.raises(Corruption) as info:
        codec.decode_records(bufs)
    assert info.value.index is None
    assert str(info.value).startswith("bufs[1]: record truncated")
    with pytest.raises(Corruption) as info:
        codec.decode_records(bufs, 1)
    assert info.value.index == 2 and info.value.reason.startswith("record truncated")


def test_batch_argument_errors(codec: ModuleType) -> None:
    with pytest.raises(InvalidArgument, match=r"^items must be a list or tuple, not generator$"):
        codec.encode_records(x for x in [1, 2])
    with pytest.raises(InvalidArgument, match=r"^items\[1\] must be a tuple of 7 fields"):
        codec.encode_records([(3, 0, 0, 1, 0, 0, b""), (3, 0, 0, 1, 0, 0)])
    with pytest.raises(InvalidArgument, match=r"^items\[0\] must be a tuple of 7 fields"):
        codec.encode_records(["abcdefg"])
    with pytest.raises(InvalidArgument, match=r"^items\[1\]: index must be in 1\.\."):
        codec.encode_records([(3, 0, 0, 1, 0, 0, b""), (3, 0, 0, 0, 0, 0, b"")])
    with pytest.raises(InvalidArgument, match=r"^bufs must be a list or tuple, not bytes$"):
        codec.decode_records(raw_record())
    with pytest.raises(InvalidArgument, match=r"^bufs\[1\] must be bytes, not int$"):
        codec.decode_records([raw_record(), 5])
    with pytest.raises(InvalidArgument, match=r"^first_index must be an int, not str$"):
        codec.decode_records([], "1")
    with pytest.raises(InvalidArgument, match="runs past the largest log index"):
        codec.decode_records([raw_record(), raw_record()], U64_MAX)
    assert codec.decode_records([raw_record(index=U64_MAX)], U64_MAX)[0].index == U64_MAX
    assert codec.encode_records([]) == [] and codec.decode_records((), 5) == []


@FEW
@given(
    items=st.lists(st.one_of(record_args(max_payload=5), st.lists(junk, max_size=8).map(tuple)), max_size=4)
)
def test_invalid_batches_give_identical_errors(items: list[tuple[Any, ...]]) -> None:
    same("encode_records", items)


@FEW
@given(bufs=st.lists(damaged_records(), max_size=4), first=st.sampled_from([0, 1, 3]))
def test_damaged_batches_decode_identically(bufs: list[tuple[bytes, int]], first: int) -> None:
    same("decode_records", [b for b, _ in bufs], first)


# --- envelopes -----------------------------------------------------------------------------------

ENV = Envelope(
    b"\x01" * 16, "tenant", "from@example.com", ("a@example.com", "bé@exämple.org"), -5, 10, 20, 30, "k1"
)


def test_envelope_layout(codec: ModuleType) -> None:
    buf = codec.encode_envelope(ENV)
    assert buf == raw_envelope(
        message_id=b"\x01" * 16,
        namespace=b"tenant",
        mail_from=b"from@example.com",
        priority=-5,
        times=(10, 20, 30),
        idem=b"k1",
        recipients=(b"a@example.com", "bé@exämple.org".encode()),
    )


@DIFF
@given(env=envelopes, body=st.binary(max_size=20))
def test_envelope_round_trip_and_both_codecs_agree(env: Envelope, body: bytes) -> None:
    buf = ref.encode_envelope(env)
    assert cy.encode_envelope(env) == buf
    for codec in (ref, cy):
        decoded, n = codec.decode_envelope(buf + body)
        assert decoded == env and n == len(buf)
        assert type(decoded) is Envelope and type(decoded.recipients) is tuple


def test_envelope_list_recipients_and_defaults(codec: ModuleType) -> None:
    env = Envelope(b"m" * 16, "n", "", ["x@y"])  # type: ignore[arg-type]
    decoded, _ = codec.decode_envelope(codec.encode_envelope(env))
    assert decoded == Envelope(b"m" * 16, "n", "", ("x@y",), 0, 0, 0, 0, None)


def test_envelope_at_every_limit(codec: ModuleType) -> None:
    addr = "é" * (limits.ADDRESS_BYTES_MAX // 2)  # 2 UTF-8 bytes each: exactly the limit
    env = Envelope(
        b"\xff" * 16,
        "n" * limits.NAMESPACE_BYTES_MAX,
        addr,
        tuple(addr[:-1] + "x" + str(i % 10) for i in range(limits.RECIPIENTS_MAX)),
        limits.PRIORITY_MAX,
        limits.TIME_MS_MAX,
        limits.TIME_MS_MAX,
        limits.TIME_MS_MAX,
        "k" * limits.IDEMPOTENCY_KEY_BYTES_MAX,
    )
    buf = codec.encode_envelope(env)
    assert buf == ref.encode_envelope(env) == cy.encode_envelope(env)
    assert codec.decode_envelope(buf) == (env, len(buf))
    assert len(buf) <= limits.ENVELOPE_BYTES_MAX


def env_with(**changes: Any) -> tuple[Any, ...]:
    return tuple(ENV._replace(**changes))


ENVELOPE_ERRORS = [
    ([1, 2, 3], "envelope must be an Envelope (a tuple of 9 fields), not list"),
    (("a",) * 8, "envelope must have 9 fields, got 8"),
    (env_with(message_id="x" * 16), "message_id must be bytes, not str"),
    (env_with(message_id=bytearray(16)), "message_id must be bytes, not bytearray"),
    (env_with(message_id=b"x" * 15), "message_id is 15 bytes, must be exactly 16"),
    (env_with(namespace=b"ns"), "namespace must be a str, not bytes"),
    (env_with(namespace=""), "namespace must not be empty"),
    (env_with(namespace="n" * 65), "namespace is 65 bytes, the limit is 64"),
    (env_with(namespace="é" * 33), "namespace is 66 bytes, the limit is 64"),
    (env_with(namespace="a\ud800"), "namespace cannot be encoded as UTF-8 (it contains a lone surrogate)"),
    (env_with(mail_from=None), "mail_from must be a str, not NoneType"),
    (env_with(mail_from="x" * 321), "mail_from is 321 bytes, the limit is 320"),
    (env_with(mail_from="\udfff"), "mail_from cannot be encoded as UTF-8 (it contains a lone surrogate)"),
    (env_with(recipients="a@b"), "recipients must be a list or tuple of str, not str"),
    (env_with(recipients=()), "recipients must not be empty"),
    (env_with(recipients=("a",) * 1001), "recipients has 1001 entries, the limit is 1000"),
    (env_with(recipients=("a", "b", "c", b"d")), "recipients[3] must be a str, not bytes"),
    (env_with(recipients=("a", "")), "recipients[1] must not be empty"),
    (env_with(recipients=("a", "b", "c", "x" * 400)), "recipients[3] is 400 bytes, the limit is 320"),
    (
        env_with(recipients=["\ud800"]),
        "recipients[0] cannot be encoded as UTF-8 (it contains a lone surrogate)",
    ),
    (env_with(priority=128), "priority must be in -128..127, got 128"),
    (env_with(priority=1.5), "priority must be an int, not float"),
    (env_with(priority=False), "priority must be an int, not bool"),
    (env_with(created_at_ms=-1), "created_at_ms must be in 0..9223372036854775807, got -1"),
    (env_with(not_before_ms=2**63), f"not_before_ms must be in 0..9223372036854775807, got {2**63}"),
    (env_with(expires_at_ms="0"), "expires_at_ms must be an int, not str"),
    (env_with(idempotency_key=""), "idempotency_key must not be empty (use None)"),
    (env_with(idempotency_key=b"k"), "idempotency_key must be a str or None, not bytes"),
    (env_with(idempotency_key="k" * 257), "idempotency_key is 257 bytes, the limit is 256"),
    (
        env_with(idempotency_key="\ud800"),
        "idempotency_key cannot be encoded as UTF-8 (it contains a lone surrogate)",
    ),
]


@pytest.mark.parametrize(("env", "message"), ENVELOPE_ERRORS)
def test_encode_envelope_errors(codec: ModuleType, env: Any, message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        codec.encode_envelope(env)
    assert str(info.value) == message


bad_strings = st.one_of(
    st.sampled_from(["", "\ud800", "x" * 65, "x" * 321, "é" * 161, "k" * 257]), junk, st.text(max_size=3)
)


@st.composite
def invalid_envelopes(draw: st.DrawFn) -> Any:
    env = list(draw(envelopes))
    position = draw(st.integers(0, 8))
    if position == 3:
        env[3] = draw(
            st.one_of(
                junk,
                st.lists(st.one_of(addresses, bad_strings), max_size=4),
                st.lists(bad_strings, max_size=3).map(tuple),
            )
        )
    else:
        env[position] = draw(st.one_of(junk, bad_strings))
    shape = draw(st.sampled_from(["tuple"] * 12 + ["list", "short", "long"]))
    if shape == "list":
        return env
    if shape == "short":
        return tuple(env[:-1])
    if shape == "long":
        return (*env, None)
    return tuple(env)


@DIFF
@given(env=invalid_envelopes())
def test_invalid_envelopes_give_identical_errors(env: Any) -> None:
    result = same("encode_envelope", env)
    if result[0] == "error":
        assert result[1] is InvalidArgument


# -- decode errors


def check_env_corrupt(codec: ModuleType, buf: bytes, *fragments: str) -> None:
    with pytest.raises(Corruption) as info:
        codec.decode_envelope(buf)
    assert info.value.index is None
    for fragment in fragments:
        assert fragment in str(info.value)


def test_decode_envelope_truncated_names_field(codec: ModuleType) -> None:
    good = raw_envelope(idem=b"key")
    check_env_corrupt(codec, b"", "envelope truncated in schema version")
    check_env_corrupt(codec, good[:3], "envelope truncated in envelope length")
    check_env_corrupt(codec, good[:10], "envelope truncated in message_id", "the buffer ends at 10")
    check_env_corrupt(codec, good[:21], "envelope truncated in namespace length")
    check_env_corrupt(codec, good[:23], "envelope truncated in namespace:")
    check_env_corrupt(codec, good[:25], "envelope truncated in mail_from length")
    check_env_corrupt(codec, good[:26], "envelope truncated in mail_from:")
    at = 26 + len(b"from@example.com")  # just past mail_from
    check_env_corrupt(codec, good[:at], "envelope truncated in priority")
    check_env_corrupt(codec, good[: at + 3], "envelope truncated in created_at_ms")
    check_env_corrupt(codec, good[: at + 9], "envelope truncated in not_before_ms")
    check_env_corrupt(codec, good[: at + 17], "envelope truncated in expires_at_ms")
    check_env_corrupt(codec, good[: at + 25], "envelope truncated in idempotency_key length")
    check_env_corrupt(codec, good[: at + 28], "envelope truncated in idempotency_key:")
    check_env_corrupt(codec, good[: at + 30], "envelope truncated in recipient count")
    check_env_corrupt(codec, good[: at + 31], "envelope truncated in recipient count")
    check_env_corrupt(codec, good[: at + 32], "envelope truncated in recipients[0] length")
    check_env_corrupt(codec, good[:-1], "envelope truncated in recipients[0]:")


def test_decode_envelope_version(codec: ModuleType) -> None:
    check_env_corrupt(codec, raw_envelope(version=0), "envelope schema version 0 is invalid")
    check_env_corrupt(
        codec, raw_envelope(version=2), "envelope schema version 2 is newer than this mqstore supports (1)"
    )
    check_env_corrupt(codec, b"\x07", "schema version 7 is newer")


def test_decode_envelope_length_field(codec: ModuleType) -> None:
    good = raw_envelope()
    n = len(good)
    check_env_corrupt(
        codec, raw_envelope(length=n - 3), f"envelope length {n - 3} is too short: recipients[0] needs bytes"
    )
    check_env_corrupt(codec, raw_envelope(length=3), "envelope length 3 is too short: message_id needs bytes")
    # A length past the end of the buffer, but every field present: the length field is wrong.
    check_env_corrupt(codec, raw_envelope(length=n + 10), f"envelope length {n + 10} exceeds the {n} bytes")
    # Bytes inside a v1 envelope that no v1 field accounts for.
    check_env_corrupt(
        codec, raw_envelope(inner_extra=b"\0\0"), f"envelope length {n + 2} but its fields end at offset {n}"
    )
    # The same bytes after the envelope are the message body, not part of it.
    assert codec.decode_envelope(good + b"\0\0")[1] == n


def test_decode_envelope_bad_utf8(codec: ModuleType) -> None:
    check_env_corrupt(codec, raw_envelope(namespace=b"\xff"), "envelope namespace is not valid UTF-8")
    check_env_corrupt(codec, raw_envelope(mail_from=b"a\xc3"), "envelope mail_from is not valid UTF-8")
    check_env_corrupt(
        codec, raw_envelope(idem=b"\xed\xa0\x80"), "envelope idempotency_key is not valid UTF-8"
    )
    check_env_corrupt(
        codec, raw_envelope(recipients=(b"a", b"\xc0\xaf")), "envelope recipients[1] is not valid UTF-8"
    )


def test_decode_envelope_empty_and_long_fields(codec: ModuleType) -> None:
    check_env_corrupt(codec, raw_envelope(namespace=b""), "envelope namespace is empty")
    check_env_corrupt(
        codec, raw_envelope(namespace=b"n" * 65), "envelope namespace is 65 bytes, the limit is 64"
    )
    check_env_corrupt(
        codec, raw_envelope(mail_from=b"m" * 321), "envelope mail_from is 321 bytes, the limit is 320"
    )
    check_env_corrupt(
        codec, raw_envelope(idem=b"k" * 257), "envelope idempotency_key is 257 bytes, the limit is 256"
    )
    check_env_corrupt(codec, raw_envelope(recipients=(b"a", b"")), "envelope recipients[1] is empty")
    check_env_corrupt(
        codec, raw_envelope(recipients=(b"r" * 321,)), "envelope recipients[0] is 321 bytes, the limit is 320"
    )


def test_decode_envelope_recipient_count(codec: ModuleType) -> None:
    check_env_corrupt(codec, raw_envelope(recipients=()), "envelope recipient count 0 is outside 1..1000")
    check_env_corrupt(codec, raw_envelope(count=1001), "envelope recipient count 1001 is outside 1..1000")


def test_decode_envelope_negative_times(codec: ModuleType) -> None:
    for i, field in enumerate(["created_at_ms", "not_before_ms", "expires_at_ms"]):
        times = [0, 0, 0]
        times[i] = -7
        check_env_corrupt(
            codec, raw_envelope(times=(times[0], times[1], times[2])), f"envelope {field} is -7, outside 0.."
        )


def test_decode_envelope_argument_errors(codec: ModuleType) -> None:
    with pytest.raises(InvalidArgument, match=r"^buf must be bytes, not list$"):
        codec.decode_envelope([1])


def test_decode_envelope_accepts_bytes_like(codec: ModuleType) -> None:
    buf = codec.encode_envelope(ENV) + b"body"
    for wrapped in (bytearray(buf), memoryview(buf), memoryview(b"xx" + buf)[2:]):
        assert codec.decode_envelope(wrapped) == (ENV, len(buf) - 4)


@st.composite
def damaged_envelopes(draw: st.DrawFn) -> bytes:
    buf = ref.encode_envelope(draw(envelopes)) + draw(st.binary(max_size=4))
    kind = draw(st.sampled_from(["flip", "truncate", "append", "bytes", "length"]))
    data = bytearray(buf)
    if kind == "flip":
        bit = draw(st.integers(0, len(data) * 8 - 1))
        data[bit // 8] ^= 1 << (bit % 8)
    elif kind == "truncate":
        del data[draw(st.integers(0, len(data) - 1)) :]
    elif kind == "append":
        data += draw(st.binary(min_size=1, max_size=8))
    elif kind == "bytes":
        at = draw(st.integers(0, len(data) - 1))
        chunk = draw(st.binary(min_size=1, max_size=4))
        data[at : at + len(chunk)] = chunk
    else:
        delta = draw(st.integers(-20, 20))
        length = max(0, struct.unpack_from("<I", data, 1)[0] + delta)
        data[1:5] = struct.pack("<I", length)
    return bytes(data)


@DIFF
@given(buf=damaged_envelopes())
def test_damaged_envelopes_decode_identically(buf: bytes) -> None:
    result = same("decode_envelope", buf)
    if result[0] == "ok":
        env, n = result[1]
        assert ref.encode_envelope(env) == buf[:n]
    else:
        assert result[1] is Corruption


@DIFF
@given(buf=st.binary(max_size=60))
def test_random_bytes_as_envelope(buf: bytes) -> None:
    assume(len(buf) > 0)
    buf = b"\x01" + buf[1:]
    same("decode_envelope", buf)


# --- the two implementations, side by side -------------------------------------------------------


def test_messages_are_defined_identically() -> None:
    names = [name for name in vars(ref) if name[:2] in ("E_", "C_")]
    assert len(names) > 40
    for name in names:
        assert getattr(cy, name) == getattr(ref, name), name
    assert {n for n in dir(cy) if n[:2] in ("E_", "C_")} == set(names)


def test_both_export_the_same_api() -> None:
    for name in ref.__all__:
        assert callable(getattr(cy, name)), name


def run_python(code: str, pure: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "MQSTORE_PURE_PYTHON"}
    if pure is not None:
        env["MQSTORE_PURE_PYTHON"] = pure
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=60
    )
    return done.stdout.strip()


@pytest.mark.parametrize(("pure", "expected"), [("1", "python"), (None, "cython"), ("0", "cython")])
def test_pure_python_switch(pure: str | None, expected: str) -> None:
    code = "import mqstore.codec as c; print(c.IMPLEMENTATION, c.crc32c.__module__)"
    implementation, module = run_python(code, pure).split()
    assert implementation == expected
    assert module == ("mqstore.codec._reference" if expected == "python" else "mqstore._codec")


def test_extension_imports_first() -> None:
    # mqstore._codec binds mqstore.codec._types lazily; importing it before mqstore.codec must work.
    code = "import mqstore._codec as c; print(c.decode_record(c.encode_record(1, 0, 0, 1, 0, 0, b'')).type)"
    assert run_python(code, None) == "1"
