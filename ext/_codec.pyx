# cython: language_level=3
"""Compiled codec: record framing, CRC32C and envelopes (built as ``mqstore._codec``).

Behaviour is defined by the pure-Python reference, ``mqstore/codec/_reference.py``: same bytes,
same return values, same exception types and messages, same order of checks. The differential
tests in ``tests/test_codec.py`` hold the two together; when changing one, change both.

The layouts are specified in ``mqstore/codec/_types.py``. They are written out here as C offsets;
``_bind()`` checks the shared constants against the values assumed here.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_CheckBuffer
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_Check,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.exc cimport PyErr_Clear, PyErr_ExceptionMatches, PyErr_Occurred
from cpython.list cimport PyList_Check
from cpython.long cimport PyLong_Check
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_Check, PyTuple_GET_ITEM, PyTuple_GET_SIZE, PyTuple_New, PyTuple_SET_ITEM
from cpython.unicode cimport PyUnicode_Check, PyUnicode_DecodeUTF8
from libc.stdint cimport UINT32_MAX, UINT64_MAX, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

import operator

from mqstore import limits
from mqstore.errors import Corruption, InvalidArgument

cdef extern from "crc32c.h" nogil:
    void mq_crc32c_init()
    uint32_t mq_crc32c(uint32_t crc, const uint8_t *p, size_t n)
    uint32_t mq_crc32c_sw(uint32_t crc, const uint8_t *p, size_t n)
    const char *mq_crc32c_impl_name

# Variants of C-API calls without Cython's automatic error checks: the callers below look at the
# result themselves and turn a failure into InvalidArgument / Corruption with the codec's own
# message (the C-API's OverflowError / UnicodeError texts would differ from the reference's).
cdef extern from "Python.h":
    bint PyBool_Check(object o)
    int _get_buffer "PyObject_GetBuffer"(object obj, Py_buffer *view, int flags)
    unsigned long long _as_ull "PyLong_AsUnsignedLongLong"(object o)
    long long _as_ll "PyLong_AsLongLong"(object o)
    const char *_as_utf8 "PyUnicode_AsUTF8AndSize"(object o, Py_ssize_t *size)
    void PyObject_GC_UnTrack(void *op)

cdef extern from *:
    """
    /* A NamedTuple instance built the way tuple.__new__(cls, iterable) builds one (tp_alloc, then
     * fill the slots) but without the intermediate tuple and the Python-level __new__ call: this
     * is a large part of the cost of returning a Record. The caller fills every slot before the
     * object is visible to anyone. */
    static PyObject *mq_new_tuple_of(PyObject *type, Py_ssize_t n)
    {
        PyTypeObject *tp = (PyTypeObject *)type;
        return tp->tp_alloc(tp, n);
    }

    /* Fill just the fields the codec reads (buf, len) with a bytes object's storage, borrowed; with
     * obj = NULL, PyBuffer_Release on the view does nothing. */
    static void mq_borrow_bytes(Py_buffer *view, PyObject *obj)
    {
        view->buf = PyBytes_AS_STRING(obj);
        view->len = PyBytes_GET_SIZE(obj);
        view->obj = NULL;
    }
    """
    object mq_new_tuple_of(object type, Py_ssize_t n)
    void mq_borrow_bytes(Py_buffer *view, object obj)


# --- messages (identical to mqstore/codec/_reference.py; a test compares the two sets) ----------

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
C_ENV_TRUNCATED = "envelope truncated in {field}: needs {need} bytes at offset {offset}, the buffer ends at {end}"
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


# --- constants ----------------------------------------------------------------------------------

cdef enum:
    # The layout, as C constants (checked against mqstore.codec._types by _bind()).
    _HEADER_SIZE = 40
    _CRC_OFFSET = 36
    _FORMAT_VERSION = 1
    _ENVELOPE_SCHEMA_VERSION = 1
    _MESSAGE_ID_BYTES = 16
    _FLAG_COMPRESSED = 0x0001
    _FLAG_ENCRYPTED = 0x0002
    # Inputs at least this large are checksummed and copied with the GIL released: below it the
    # cost of dropping and retaking the GIL is comparable to the work (64 KiB is ~10 µs at 6 GB/s).
    _NOGIL_BYTES = 64 * 1024

cdef unsigned long long _U32_MAX = UINT32_MAX
cdef unsigned long long _U64_MAX = UINT64_MAX

cdef Py_ssize_t _PAYLOAD_MAX = limits.RECORD_PAYLOAD_BYTES_MAX
cdef Py_ssize_t _NAMESPACE_MAX = limits.NAMESPACE_BYTES_MAX
cdef Py_ssize_t _ADDRESS_MAX = limits.ADDRESS_BYTES_MAX
cdef Py_ssize_t _IDEMPOTENCY_MAX = limits.IDEMPOTENCY_KEY_BYTES_MAX
cdef Py_ssize_t _RECIPIENTS_MAX = limits.RECIPIENTS_MAX
cdef long long _PRIORITY_MIN = limits.PRIORITY_MIN
cdef long long _PRIORITY_MAX = limits.PRIORITY_MAX
cdef long long _TIME_MAX = limits.TIME_MS_MAX

mq_crc32c_init()

#: Which CRC32C implementation this process uses: "sse4.2" or "slicing-by-8".
CRC32C_IMPL = mq_crc32c_impl_name.decode("ascii")


# --- shared types, bound lazily -----------------------------------------------------------------
# Record, Envelope and the known record types live in mqstore.codec._types. Importing that module
# runs mqstore/codec/__init__.py, which imports this module: doing it at import time would fail
# whenever mqstore._codec is imported first (the package would find it half-initialised). So the
# names are bound on the first call that needs them, when this module is complete.

cdef bint _bound = False
cdef object _Record = None
cdef object _Envelope = None
cdef object _MAGIC = None
cdef uint8_t _known_type[256]
cdef unsigned long long _KNOWN_FLAGS = 0


cdef int _bind() except -1:
    global _bound, _Record, _Envelope, _MAGIC, _KNOWN_FLAGS
    from mqstore.codec import _types

    if (_types.HEADER_SIZE, _types.FORMAT_VERSION, _types.ENVELOPE_SCHEMA_VERSION, _types.MESSAGE_ID_BYTES,
            int(_types.Flags.COMPRESSED), int(_types.Flags.ENCRYPTED), _types.MAGIC) != (
            _HEADER_SIZE, _FORMAT_VERSION, _ENVELOPE_SCHEMA_VERSION, _MESSAGE_ID_BYTES,
            _FLAG_COMPRESSED, _FLAG_ENCRYPTED, b"MQ"):
        raise RuntimeError("mqstore._codec was built for a different record layout than mqstore.codec._types")
    for t in _types.KNOWN_RECORD_TYPES:
        if not 0 < t < 256:
            raise RuntimeError(f"record type {t} does not fit the u8 type field")
        _known_type[t] = 1
    _KNOWN_FLAGS = _types.KNOWN_FLAGS
    _Record = _types.Record
    _Envelope = _types.Envelope
    _MAGIC = _types.MAGIC
    _bound = True
    return 0


cdef inline int _ensure_bound() except -1:
    if not _bound:
        _bind()
    return 0


# --- little-endian loads and stores (compilers turn these into single moves on x86-64/arm64) ----

cdef inline void _st16(uint8_t *p, uint16_t v) noexcept nogil:
    p[0] = <uint8_t>v
    p[1] = <uint8_t>(v >> 8)

cdef inline void _st32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = <uint8_t>v
    p[1] = <uint8_t>(v >> 8)
    p[2] = <uint8_t>(v >> 16)
    p[3] = <uint8_t>(v >> 24)

cdef inline void _st64(uint8_t *p, uint64_t v) noexcept nogil:
    _st32(p, <uint32_t>v)
    _st32(p + 4, <uint32_t>(v >> 32))

cdef inline uint16_t _ld16(const uint8_t *p) noexcept nogil:
    return <uint16_t>(p[0] | (<uint16_t>p[1] << 8))

cdef inline uint32_t _ld32(const uint8_t *p) noexcept nogil:
    return p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)

cdef inline uint64_t _ld64(const uint8_t *p) noexcept nogil:
    return _ld32(p) | (<uint64_t>_ld32(p + 4) << 32)


# --- argument checks ----------------------------------------------------------------------------

cdef inline str _type_name(object value):
    return type(value).__name__


cdef int _range_error(object value, str field, object lo, object hi) except -1:
    raise InvalidArgument(E_RANGE.format(field=field, lo=lo, hi=hi, value=operator.index(value)))


cdef inline int _uint_arg(object value, str field, unsigned long long lo, unsigned long long hi,
                          unsigned long long *out) except -1:
    """``value`` (an int, not a bool) in lo..hi into ``out``, else InvalidArgument."""
    cdef unsigned long long x
    if not PyLong_Check(value) or PyBool_Check(value):
        raise InvalidArgument(E_NOT_INT.format(field=field, type=_type_name(value)))
    x = _as_ull(value)
    if x == <unsigned long long>-1 and PyErr_Occurred() != NULL:
        PyErr_Clear()  # negative or above 2**64-1: out of every range we check
        _range_error(value, field, lo, hi)
    if x < lo or x > hi:
        _range_error(value, field, lo, hi)
    out[0] = x
    return 0


cdef inline int _int_arg(object value, str field, long long lo, long long hi, long long *out) except -1:
    """Signed variant of _uint_arg."""
    cdef long long x
    if not PyLong_Check(value) or PyBool_Check(value):
        raise InvalidArgument(E_NOT_INT.format(field=field, type=_type_name(value)))
    x = _as_ll(value)
    if x == -1 and PyErr_Occurred() != NULL:
        PyErr_Clear()
        _range_error(value, field, lo, hi)
    if x < lo or x > hi:
        _range_error(value, field, lo, hi)
    out[0] = x
    return 0


cdef str _field_name(str field, Py_ssize_t item):
    """``field``, or ``field[item]`` for an element of a list (built only for error messages)."""
    return field if item < 0 else f"{field}[{item}]"


cdef inline int _bytes_view(object obj, str field, Py_ssize_t item, Py_buffer *view) except -1:
    """A contiguous byte view of ``obj`` (release it with PyBuffer_Release), else InvalidArgument
    naming ``field`` (``field[item]`` when item >= 0)."""
    if PyBytes_CheckExact(obj):
        # The common case, without the buffer protocol's calls: a borrowed pointer is enough, since
        # the caller's reference keeps ``obj`` alive, and view.obj = NULL makes the release a no-op.
        mq_borrow_bytes(view, obj)
        return 0
    if not PyObject_CheckBuffer(obj):
        raise InvalidArgument(E_NOT_BYTES.format(field=_field_name(field, item), type=_type_name(obj)))
    if _get_buffer(obj, view, PyBUF_SIMPLE) < 0:
        PyErr_Clear()  # non-contiguous, or a released memoryview
        raise InvalidArgument(E_NOT_CONTIGUOUS.format(field=_field_name(field, item)))
    return 0


cdef inline uint32_t _crc2(const uint8_t *a, size_t na, const uint8_t *b, size_t nb) noexcept:
    """CRC of a[0..na) followed by b[0..nb), dropping the GIL when the work is large."""
    cdef uint32_t crc
    if na + nb >= _NOGIL_BYTES:
        with nogil:
            crc = mq_crc32c(mq_crc32c(0, a, na), b, nb)
    else:
        crc = mq_crc32c(mq_crc32c(0, a, na), b, nb)
    return crc


# --- CRC32C -------------------------------------------------------------------------------------

cdef object _crc32c(object data, object value, bint software):
    cdef Py_buffer view
    cdef unsigned long long start = 0
    cdef uint32_t crc
    if PyBytes_CheckExact(data):
        mq_borrow_bytes(&view, data)
    elif not PyObject_CheckBuffer(data):
        raise TypeError(E_CRC_DATA_TYPE.format(type=_type_name(data)))
    elif _get_buffer(data, &view, PyBUF_SIMPLE) < 0:
        PyErr_Clear()
        raise TypeError(E_CRC_DATA_CONTIGUOUS)
    try:
        _uint_arg(value, "value", 0, _U32_MAX, &start)
        if software:
            with nogil:
                crc = mq_crc32c_sw(<uint32_t>start, <const uint8_t *>view.buf, view.len)
        elif view.len >= _NOGIL_BYTES:
            with nogil:
                crc = mq_crc32c(<uint32_t>start, <const uint8_t *>view.buf, view.len)
        else:
            crc = mq_crc32c(<uint32_t>start, <const uint8_t *>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
    return crc


def crc32c(data, value=0):
    """CRC-32C of ``data``; pass a previous result as ``value`` to continue it over more bytes."""
    return _crc32c(data, value, False)


def _crc32c_sw(data, value=0):
    """crc32c() forced onto the portable slicing-by-8 path (for tests comparing the two)."""
    return _crc32c(data, value, True)


# --- records ------------------------------------------------------------------------------------

cdef bytes _encode(object type_, object flags_, object term_, object index_, object key_id_,
                   object dict_id_, object payload):
    # Same order of checks as the reference: arguments in order, cross-field rules, payload.
    cdef long long rtype
    # (Initialised only to keep Cython's flow analysis quiet: _uint_arg sets them or raises.)
    cdef unsigned long long flags = 0, term = 0, index = 0, key_id = 0, dict_id = 0
    cdef Py_buffer view
    cdef Py_ssize_t n
    cdef bytes out
    cdef uint8_t *p

    if not PyLong_Check(type_) or PyBool_Check(type_):
        raise InvalidArgument(E_NOT_INT.format(field="type", type=_type_name(type_)))
    rtype = _as_ll(type_)
    if rtype == -1 and PyErr_Occurred() != NULL:
        PyErr_Clear()
        raise InvalidArgument(E_RECORD_TYPE.format(value=operator.index(type_)))
    if rtype < 0 or rtype > 255 or not _known_type[rtype]:
        raise InvalidArgument(E_RECORD_TYPE.format(value=operator.index(type_)))
    _uint_arg(flags_, "flags", 0, 0xFFFF, &flags)
    if flags & ~_KNOWN_FLAGS:
        raise InvalidArgument(E_FLAGS.format(value=flags, bits=flags & ~_KNOWN_FLAGS, known=_KNOWN_FLAGS))
    _uint_arg(term_, "term", 0, _U64_MAX, &term)
    _uint_arg(index_, "index", 1, _U64_MAX, &index)
    _uint_arg(key_id_, "key_id", 0, _U32_MAX, &key_id)
    _uint_arg(dict_id_, "dict_id", 0, _U32_MAX, &dict_id)
    if key_id != 0 and not (flags & _FLAG_ENCRYPTED):
        raise InvalidArgument(E_KEY_WITHOUT_ENCRYPTED.format(key_id=key_id))
    if (flags & _FLAG_ENCRYPTED) and key_id == 0:
        raise InvalidArgument(E_ENCRYPTED_WITHOUT_KEY)
    if dict_id != 0 and not (flags & _FLAG_COMPRESSED):
        raise InvalidArgument(E_DICT_WITHOUT_COMPRESSED.format(dict_id=dict_id))

    _bytes_view(payload, "payload", -1, &view)
    try:
        n = view.len
        if n > _PAYLOAD_MAX:
            raise InvalidArgument(E_PAYLOAD_TOO_LONG.format(n=n, limit=_PAYLOAD_MAX))
        out = PyBytes_FromStringAndSize(NULL, _HEADER_SIZE + n)
        p = <uint8_t *>PyBytes_AS_STRING(out)
        p[0] = b'M'
        p[1] = b'Q'
        p[2] = _FORMAT_VERSION
        p[3] = <uint8_t>rtype
        _st16(p + 4, <uint16_t>flags)
        _st16(p + 6, 0)
        _st64(p + 8, term)
        _st64(p + 16, index)
        _st32(p + 24, <uint32_t>key_id)
        _st32(p + 28, <uint32_t>dict_id)
        _st32(p + 32, <uint32_t>n)
        if n >= _NOGIL_BYTES:
            with nogil:
                memcpy(p + _HEADER_SIZE, view.buf, n)
        else:
            memcpy(p + _HEADER_SIZE, view.buf, n)
        # Checksum the copy, not the caller's buffer, so what is stored is what was summed even if
        # another thread writes into a shared bytearray meanwhile.
        _st32(p + _CRC_OFFSET, _crc2(p, _CRC_OFFSET, p + _HEADER_SIZE, n))
    finally:
        PyBuffer_Release(&view)
    return out


cdef object _decode(const uint8_t *p, Py_ssize_t n, unsigned long long expected):
    # The order of the checks is part of the contract (see the reference).
    cdef uint8_t rtype
    cdef uint16_t flags, reserved
    cdef uint32_t key_id, dict_id, length, stored, computed
    cdef uint64_t term, index
    cdef Py_ssize_t have
    cdef bytes payload
    cdef char *dst
    cdef object rec

    if n < _HEADER_SIZE:
        raise Corruption(C_HEADER_TRUNCATED.format(n=n, need=_HEADER_SIZE))
    if p[0] != b'M' or p[1] != b'Q':
        raise Corruption(C_MAGIC.format(found=PyBytes_FromStringAndSize(<const char *>p, 2), expected=_MAGIC))
    if p[2] != _FORMAT_VERSION:
        raise Corruption(C_FORMAT_VERSION.format(version=p[2], supported=_FORMAT_VERSION))
    length = _ld32(p + 32)
    if length > _PAYLOAD_MAX:
        raise Corruption(C_PAYLOAD_TOO_LONG.format(n=length, limit=_PAYLOAD_MAX))
    have = n - _HEADER_SIZE
    if have < length:
        raise Corruption(C_PAYLOAD_TRUNCATED.format(n=length, have=have))
    if have > length:
        raise Corruption(C_TRAILING.format(extra=have - length, n=length))
    stored = _ld32(p + _CRC_OFFSET)
    computed = _crc2(p, _CRC_OFFSET, p + _HEADER_SIZE, length)
    if computed != stored:
        raise Corruption(C_CHECKSUM.format(stored=stored, computed=computed))
    rtype = p[3]
    flags = _ld16(p + 4)
    reserved = _ld16(p + 6)
    term = _ld64(p + 8)
    index = _ld64(p + 16)
    key_id = _ld32(p + 24)
    dict_id = _ld32(p + 28)
    if not _known_type[rtype]:
        raise Corruption(C_RECORD_TYPE.format(value=rtype))
    if flags & ~_KNOWN_FLAGS:
        raise Corruption(C_FLAGS.format(bits=flags & ~_KNOWN_FLAGS, value=flags))
    if reserved != 0:
        raise Corruption(C_RESERVED.format(value=reserved))
    if key_id != 0 and not (flags & _FLAG_ENCRYPTED):
        raise Corruption(C_KEY_WITHOUT_ENCRYPTED.format(key_id=key_id))
    if (flags & _FLAG_ENCRYPTED) and key_id == 0:
        raise Corruption(C_ENCRYPTED_WITHOUT_KEY)
    if dict_id != 0 and not (flags & _FLAG_COMPRESSED):
        raise Corruption(C_DICT_WITHOUT_COMPRESSED.format(dict_id=dict_id))
    if index == 0:
        raise Corruption(C_INDEX_ZERO)
    if expected != 0 and index != expected:
        raise Corruption(C_INDEX_MISMATCH.format(index=index, expected=expected))

    payload = PyBytes_FromStringAndSize(NULL, length)
    dst = PyBytes_AS_STRING(payload)
    if length >= _NOGIL_BYTES:
        with nogil:
            memcpy(dst, p + _HEADER_SIZE, length)
    else:
        memcpy(dst, p + _HEADER_SIZE, length)
    rec = mq_new_tuple_of(_Record, 7)
    _set_item(rec, 0, rtype)
    _set_item(rec, 1, flags)
    _set_item(rec, 2, term)
    _set_item(rec, 3, index)
    _set_item(rec, 4, key_id)
    _set_item(rec, 5, dict_id)
    _set_item(rec, 6, payload)
    # A Record holds only ints and bytes, so it can never be part of a reference cycle; leaving it
    # tracked only makes every young-generation collection traverse it (with many records in flight
    # that was ~30% of decode_records' time). CPython untracks such plain tuples itself, lazily,
    # but not tuple subclasses.
    PyObject_GC_UnTrack(<void *>rec)
    return rec


cdef inline void _set_item(object tup, Py_ssize_t i, object value):
    Py_INCREF(value)  # PyTuple_SET_ITEM steals a reference
    PyTuple_SET_ITEM(tup, i, value)


def encode_record(type, flags, term, index, key_id, dict_id, payload):
    """One framed record: the 40-byte header followed by ``payload``."""
    _ensure_bound()
    return _encode(type, flags, term, index, key_id, dict_id, payload)


def decode_record(buf, expected_index=0):
    """Validate one framed record and return it (payload copied). ``expected_index`` 0: any index."""
    cdef Py_buffer view
    cdef unsigned long long expected = 0
    _ensure_bound()
    _bytes_view(buf, "buf", -1, &view)
    try:
        _uint_arg(expected_index, "expected_index", 0, _U64_MAX, &expected)
        return _decode(<const uint8_t *>view.buf, view.len, expected)
    finally:
        PyBuffer_Release(&view)


def encode_records(items):
    """``encode_record`` over many 7-tuples (a ``Record`` is one); errors name the item."""
    cdef tuple seq
    cdef tuple item
    cdef Py_ssize_t i = 0, n
    cdef list out = []
    _ensure_bound()
    if PyTuple_Check(items):
        seq = <tuple>items
    elif PyList_Check(items):
        seq = tuple(items)  # a snapshot: cheap, and the loop cannot be upset by list mutation
    else:
        raise InvalidArgument(E_NOT_SEQUENCE.format(field="items", type=_type_name(items)))
    n = PyTuple_GET_SIZE(seq)
    for i in range(n):
        obj = <object>PyTuple_GET_ITEM(seq, i)
        if PyTuple_Check(obj):
            item = <tuple>obj
        elif PyList_Check(obj):
            item = tuple(obj)
        else:
            raise InvalidArgument(E_ITEM_SHAPE.format(i=i))
        if PyTuple_GET_SIZE(item) != 7:
            raise InvalidArgument(E_ITEM_SHAPE.format(i=i))
        try:
            out.append(_encode(
                <object>PyTuple_GET_ITEM(item, 0), <object>PyTuple_GET_ITEM(item, 1),
                <object>PyTuple_GET_ITEM(item, 2), <object>PyTuple_GET_ITEM(item, 3),
                <object>PyTuple_GET_ITEM(item, 4), <object>PyTuple_GET_ITEM(item, 5),
                <object>PyTuple_GET_ITEM(item, 6),
            ))
        except InvalidArgument as exc:
            raise InvalidArgument(E_ITEM_PREFIX.format(i=i, reason=exc)) from None
    return out


def decode_records(bufs, first_index=0):
    """``decode_record`` over many buffers. With ``first_index`` != 0, ``bufs[i]`` must hold log
    index ``first_index + i`` and a Corruption names that index; without it the reason names the
    position in ``bufs``."""
    cdef tuple seq
    cdef Py_ssize_t i = 0, n
    cdef unsigned long long first = 0
    cdef Py_buffer view
    cdef list out = []
    _ensure_bound()
    if PyTuple_Check(bufs):
        seq = <tuple>bufs
    elif PyList_Check(bufs):
        seq = tuple(bufs)
    else:
        raise InvalidArgument(E_NOT_SEQUENCE.format(field="bufs", type=_type_name(bufs)))
    _uint_arg(first_index, "first_index", 0, _U64_MAX, &first)
    n = PyTuple_GET_SIZE(seq)
    # first + i must stay a valid index (and must not wrap to 0, which would mean "don't check").
    if first != 0 and n > 0 and <unsigned long long>(n - 1) > _U64_MAX - first:
        raise InvalidArgument(E_FIRST_INDEX_OVERFLOW.format(first=first, n=n))
    for i in range(n):
        _bytes_view(<object>PyTuple_GET_ITEM(seq, i), "bufs", i, &view)
        try:
            out.append(_decode(<const uint8_t *>view.buf, view.len, first + i if first else 0))
        except Corruption as exc:
            if first:
                raise Corruption(exc.reason, first + i) from None
            raise Corruption(C_BATCH_PREFIX.format(i=i, reason=exc.reason)) from None
        finally:
            PyBuffer_Release(&view)
    return out


# --- envelopes ----------------------------------------------------------------------------------

cdef const char *_utf8_arg(object value, str field, Py_ssize_t item, Py_ssize_t limit, bint allow_empty,
                           Py_ssize_t *size) except NULL:
    """The UTF-8 form of a str field and its length, checked in the reference's order: type,
    encodable, empty, length. The pointer stays valid while ``value`` is alive (CPython caches the
    UTF-8 form in the str; for ASCII it is the str's own storage)."""
    cdef const char *s
    if not PyUnicode_Check(value):
        raise InvalidArgument(E_NOT_STR.format(field=_field_name(field, item), type=_type_name(value)))
    s = _as_utf8(value, size)
    if s == NULL:
        if not PyErr_ExceptionMatches(UnicodeEncodeError):
            return NULL  # MemoryError and the like: propagate as is
        PyErr_Clear()  # a str fails to encode only when it holds a lone surrogate
        raise InvalidArgument(E_NOT_UTF8.format(field=_field_name(field, item)))
    if size[0] == 0 and not allow_empty:
        raise InvalidArgument(E_EMPTY.format(field=_field_name(field, item)))
    if size[0] > limit:
        raise InvalidArgument(E_TOO_LONG.format(field=_field_name(field, item), n=size[0], limit=limit))
    return s


cdef inline Py_ssize_t _put_text(uint8_t *p, Py_ssize_t pos, const char *s, Py_ssize_t n, int width) noexcept:
    """Write a ``width``-byte (1 or 2) length prefix and ``n`` bytes of text at ``pos``; return the new
    position."""
    if width == 1:
        p[pos] = <uint8_t>n
    else:
        _st16(p + pos, <uint16_t>n)
    pos += width
    memcpy(p + pos, s, n)
    return pos + n


def encode_envelope(env):
    """The schema-version-1 encoding of ``env``."""
    cdef object message_id, recipients, idem
    cdef tuple rseq
    cdef const char *ns
    cdef const char *sender
    cdef const char *key = NULL
    cdef const char *addr
    cdef Py_ssize_t ns_len = 0, sender_len = 0, key_len = 0, addr_len = 0, count, i, total, pos
    cdef long long priority = 0, created = 0, not_before = 0, expires = 0
    cdef bytes out
    cdef uint8_t *p

    # Validation, in field order (as the reference), also sums up the encoded size.
    if not PyTuple_Check(env):
        raise InvalidArgument(E_ENVELOPE_TYPE.format(type=_type_name(env)))
    if PyTuple_GET_SIZE(env) != 9:
        raise InvalidArgument(E_ENVELOPE_FIELDS.format(n=PyTuple_GET_SIZE(env)))
    message_id = <object>PyTuple_GET_ITEM(env, 0)
    if not PyBytes_Check(message_id):
        raise InvalidArgument(E_NOT_BYTES.format(field="message_id", type=_type_name(message_id)))
    if PyBytes_GET_SIZE(message_id) != _MESSAGE_ID_BYTES:
        raise InvalidArgument(E_MESSAGE_ID_LENGTH.format(n=PyBytes_GET_SIZE(message_id), need=_MESSAGE_ID_BYTES))
    ns = _utf8_arg(<object>PyTuple_GET_ITEM(env, 1), "namespace", -1, _NAMESPACE_MAX, False, &ns_len)
    sender = _utf8_arg(<object>PyTuple_GET_ITEM(env, 2), "mail_from", -1, _ADDRESS_MAX, True, &sender_len)
    recipients = <object>PyTuple_GET_ITEM(env, 3)
    if PyTuple_Check(recipients):
        rseq = <tuple>recipients
    elif PyList_Check(recipients):
        rseq = tuple(recipients)  # a snapshot: the second pass below must see the same strings
    else:
        raise InvalidArgument(E_RECIPIENTS_TYPE.format(type=_type_name(recipients)))
    count = PyTuple_GET_SIZE(rseq)
    if count == 0:
        raise InvalidArgument(E_EMPTY.format(field="recipients"))
    if count > _RECIPIENTS_MAX:
        raise InvalidArgument(E_RECIPIENTS_COUNT.format(n=count, limit=_RECIPIENTS_MAX))
    # version, length, message id, namespace length, mail_from length, priority, three times,
    # idempotency key length, recipient count
    total = 1 + 4 + _MESSAGE_ID_BYTES + 1 + ns_len + 2 + sender_len + 1 + 3 * 8 + 2 + 2
    for i in range(count):
        _utf8_arg(<object>PyTuple_GET_ITEM(rseq, i), "recipients", i, _ADDRESS_MAX, False, &addr_len)
        total += 2 + addr_len
    _int_arg(<object>PyTuple_GET_ITEM(env, 4), "priority", _PRIORITY_MIN, _PRIORITY_MAX, &priority)
    _int_arg(<object>PyTuple_GET_ITEM(env, 5), "created_at_ms", 0, _TIME_MAX, &created)
    _int_arg(<object>PyTuple_GET_ITEM(env, 6), "not_before_ms", 0, _TIME_MAX, &not_before)
    _int_arg(<object>PyTuple_GET_ITEM(env, 7), "expires_at_ms", 0, _TIME_MAX, &expires)
    idem = <object>PyTuple_GET_ITEM(env, 8)
    if idem is not None:
        if not PyUnicode_Check(idem):
            raise InvalidArgument(E_NOT_STR_OR_NONE.format(field="idempotency_key", type=_type_name(idem)))
        if len(<str>idem) == 0:
            # "" would decode as None, so accepting it would break the round trip.
            raise InvalidArgument(E_IDEMPOTENCY_EMPTY)
        key = _utf8_arg(idem, "idempotency_key", -1, _IDEMPOTENCY_MAX, False, &key_len)
        total += key_len

    out = PyBytes_FromStringAndSize(NULL, total)
    p = <uint8_t *>PyBytes_AS_STRING(out)
    p[0] = _ENVELOPE_SCHEMA_VERSION
    _st32(p + 1, <uint32_t>total)
    memcpy(p + 5, PyBytes_AS_STRING(message_id), _MESSAGE_ID_BYTES)
    pos = 5 + _MESSAGE_ID_BYTES
    pos = _put_text(p, pos, ns, ns_len, 1)
    pos = _put_text(p, pos, sender, sender_len, 2)
    p[pos] = <uint8_t>(<int>priority & 0xFF)
    _st64(p + pos + 1, <uint64_t>created)
    _st64(p + pos + 9, <uint64_t>not_before)
    _st64(p + pos + 17, <uint64_t>expires)
    pos += 25
    pos = _put_text(p, pos, key, key_len, 2)
    _st16(p + pos, <uint16_t>count)
    pos += 2
    for i in range(count):
        # Validated by the first pass and the UTF-8 form cached then: this is a pointer lookup.
        addr = _utf8_arg(<object>PyTuple_GET_ITEM(rseq, i), "recipients", i, _ADDRESS_MAX, False, &addr_len)
        pos = _put_text(p, pos, addr, addr_len, 2)
    assert pos == total
    return out


# Sequential reads from an envelope. ``end`` is where reading must stop: the buffer's end until the
# envelope length is known, then the smaller of the two.
cdef struct _Reader:
    const uint8_t *p
    Py_ssize_t pos
    Py_ssize_t end
    Py_ssize_t size      # bytes in the buffer
    long long length     # the envelope length field, -1 until read


cdef str _env_field_name(str field, Py_ssize_t item, bint is_length):
    cdef str name = _field_name(field, item)
    return name + " length" if is_length else name


cdef Py_ssize_t _take(_Reader *r, Py_ssize_t n, str field, Py_ssize_t item, bint is_length) except -1:
    """Claim the next ``n`` bytes; return their offset. Corruption naming the field if they are not
    there (truncated buffer) or not inside the envelope (envelope length too small)."""
    cdef Py_ssize_t start = r.pos
    cdef str name
    if n > r.end - r.pos:
        name = _env_field_name(field, item, is_length)
        if r.length >= 0 and r.length <= r.size:
            raise Corruption(C_ENV_LENGTH_SHORT.format(length=r.length, field=name, upto=r.pos + n))
        raise Corruption(C_ENV_TRUNCATED.format(field=name, need=n, offset=r.pos, end=r.end))
    r.pos += n
    return start


cdef object _length_prefixed(_Reader *r, int width, str field, Py_ssize_t item, Py_ssize_t limit,
                             bint allow_empty):
    cdef Py_ssize_t at = _take(r, width, field, item, True)
    cdef Py_ssize_t n = r.p[at] if width == 1 else _ld16(r.p + at)
    if n == 0 and not allow_empty:
        raise Corruption(C_ENV_EMPTY.format(field=_field_name(field, item)))
    if n > limit:
        raise Corruption(C_ENV_TOO_LONG.format(field=_field_name(field, item), n=n, limit=limit))
    at = _take(r, n, field, item, False)
    if n == 0:
        return ""
    try:
        return PyUnicode_DecodeUTF8(<const char *>r.p + at, n, NULL)
    except UnicodeDecodeError:
        raise Corruption(C_ENV_UTF8.format(field=_field_name(field, item))) from None


cdef long long _time(_Reader *r, str field) except? -1:
    cdef long long value = <int64_t>_ld64(r.p + _take(r, 8, field, -1, False))
    if value < 0:  # an i64 cannot exceed TIME_MS_MAX; only the sign can be wrong
        raise Corruption(C_ENV_RANGE.format(field=field, value=value, lo=0, hi=_TIME_MAX))
    return value


cdef object _decode_envelope(const uint8_t *p, Py_ssize_t size):
    cdef _Reader r
    cdef uint8_t version
    cdef uint32_t length
    cdef Py_ssize_t at, count, i
    cdef int priority
    cdef long long created, not_before, expires
    cdef object message_id, namespace, mail_from, idem, env
    cdef tuple recipients

    r.p = p
    r.pos = 0
    r.end = size
    r.size = size
    r.length = -1
    version = p[_take(&r, 1, "schema version", -1, False)]
    if version == 0:
        raise Corruption(C_ENV_VERSION_ZERO)
    if version > _ENVELOPE_SCHEMA_VERSION:
        raise Corruption(C_ENV_VERSION_NEWER.format(version=version, supported=_ENVELOPE_SCHEMA_VERSION))
    length = _ld32(p + _take(&r, 4, "envelope length", -1, False))
    r.length = length
    r.end = length if length < size else size

    # --- schema version 1 fields ---
    at = _take(&r, _MESSAGE_ID_BYTES, "message_id", -1, False)
    message_id = PyBytes_FromStringAndSize(<const char *>p + at, _MESSAGE_ID_BYTES)
    namespace = _length_prefixed(&r, 1, "namespace", -1, _NAMESPACE_MAX, False)
    mail_from = _length_prefixed(&r, 2, "mail_from", -1, _ADDRESS_MAX, True)
    priority = <signed char>p[_take(&r, 1, "priority", -1, False)]
    if priority < _PRIORITY_MIN or priority > _PRIORITY_MAX:
        raise Corruption(C_ENV_RANGE.format(field="priority", value=priority, lo=_PRIORITY_MIN, hi=_PRIORITY_MAX))
    created = _time(&r, "created_at_ms")
    not_before = _time(&r, "not_before_ms")
    expires = _time(&r, "expires_at_ms")
    idem = _length_prefixed(&r, 2, "idempotency_key", -1, _IDEMPOTENCY_MAX, True)
    count = _ld16(p + _take(&r, 2, "recipient count", -1, False))
    if count < 1 or count > _RECIPIENTS_MAX:
        raise Corruption(C_ENV_RECIPIENT_COUNT.format(n=count, limit=_RECIPIENTS_MAX))
    recipients = PyTuple_New(count)
    for i in range(count):
        _set_item(recipients, i, _length_prefixed(&r, 2, "recipients", i, _ADDRESS_MAX, False))
    # --- fields of later schema versions go here, each read only when ``version`` has it (and
    # defaulted otherwise). Until then every accepted version is fully known, so the envelope
    # must end exactly where its fields do: stray bytes inside it are damage, not extensions.

    if length > size:
        raise Corruption(C_ENV_LENGTH_PAST_BUFFER.format(length=length, have=size))
    if r.pos != length:
        raise Corruption(C_ENV_LENGTH_MISMATCH.format(length=length, used=r.pos))
    env = mq_new_tuple_of(_Envelope, 9)
    _set_item(env, 0, message_id)
    _set_item(env, 1, namespace)
    _set_item(env, 2, mail_from)
    _set_item(env, 3, recipients)
    _set_item(env, 4, priority)
    _set_item(env, 5, created)
    _set_item(env, 6, not_before)
    _set_item(env, 7, expires)
    _set_item(env, 8, idem if len(<str>idem) else None)
    # Only str, bytes, ints and a tuple of str: no cycle is possible (see _decode for why untrack).
    PyObject_GC_UnTrack(<void *>recipients)
    PyObject_GC_UnTrack(<void *>env)
    return (env, length)


def decode_envelope(buf):
    """Decode the envelope at the start of ``buf``; return it and the bytes it occupies (the
    message body, if any, follows)."""
    cdef Py_buffer view
    _ensure_bound()
    _bytes_view(buf, "buf", -1, &view)
    try:
        return _decode_envelope(<const uint8_t *>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
