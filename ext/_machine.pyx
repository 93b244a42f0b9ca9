# cython: language_level=3
"""Compiled hot paths of the queue state machine (built as ``mqstore._machine``).

The enqueue, lease and settle entries of namespaces without a compliance mode are most of what a
busy queue applies. Here they read and write the state rows as C fields and build the index keys
in C buffers, where the reference (``mqstore/queue/machine.py`` with the rows of
``mqstore/queue/model.py``) builds dataclasses and packs structs. Behaviour is defined by the
reference: the same rows, bytes for bytes, the same counters and return values, the same errors
(a row that fails a check here is decoded by the reference, which raises its ``Corruption``).
Everything else — idempotency keys, compliance modes (audit records, locks), over-long fields —
is handed back to the reference before anything is written: the functions return ``None`` then.
``tests/test_machine_fast.py`` applies random entries through both and compares every table.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

from mqstore import limits as _limits
from mqstore.queue import model as _model

cdef enum:
    QUEUED = 1
    LEASED = 2
    DEFERRED = 3
    DELIVERED = 4
    BOUNCED = 5
    EXPIRED = 6
    HELD = 0x01
    FINISHED = 0x02
    GIVEN_UP = 0x04
    MSG_FIXED = 74  # struct "<BBbH6HQqqqqIBqI"
    RCPT_FIXED = 28  # struct "<BBHqQq"
    LEASE_FIXED = 25  # struct "<B16sq"
    MID = 16
    ATTEMPTS_MAX = 0xFFFF  # limits.RECIPIENT_ATTEMPTS_MAX: a u16 in the recipient row

cdef tuple _NAMES = (None, "queued", "leased", "deferred", "delivered", "bounced", "expired")
cdef str _LIVE = "messages.live"
cdef str _STORED = "messages.stored"
cdef str _BYTES = "bytes"


def _bind():
    """Check the layouts and codes assumed here against the reference's."""
    assert _model._MSG.size == MSG_FIXED and _model._RCPT.size == RCPT_FIXED and _model._LEASE.size == LEASE_FIXED
    assert (_model.QUEUED, _model.LEASED, _model.DEFERRED, _model.DELIVERED, _model.BOUNCED, _model.EXPIRED) == (
        QUEUED, LEASED, DEFERRED, DELIVERED, BOUNCED, EXPIRED)
    assert (_model.HELD, _model.FINISHED, _model.GIVEN_UP) == (HELD, FINISHED, GIVEN_UP)
    assert _limits.RECIPIENT_ATTEMPTS_MAX == ATTEMPTS_MAX
    assert tuple(_model.STATE_NAMES[s] for s in range(1, 7)) == _NAMES[1:]


_bind()


# --- bytes ----------------------------------------------------------------------------------------

cdef inline void _le(unsigned char* p, uint64_t v, int n) noexcept:
    cdef int i
    for i in range(n):
        p[i] = <unsigned char>((v >> (8 * i)) & 0xFF)


cdef inline void _be(unsigned char* p, uint64_t v, int n) noexcept:
    cdef int i
    for i in range(n):
        p[i] = <unsigned char>((v >> (8 * (n - 1 - i))) & 0xFF)


cdef inline uint64_t _rle(const unsigned char* p, int n) noexcept:
    cdef uint64_t v = 0
    cdef int i
    for i in range(n):
        v |= (<uint64_t>p[i]) << (8 * i)
    return v


cdef inline uint64_t _clamp(int64_t t) noexcept:
    return <uint64_t>t if t > 0 else 0


cdef inline bytes _new(Py_ssize_t n):
    return PyBytes_FromStringAndSize(NULL, n)


cdef inline unsigned char* _ptr(bytes b) noexcept:
    return <unsigned char*>PyBytes_AS_STRING(b)


cdef bytes _u64be(uint64_t v):
    cdef bytes out = _new(8)
    _be(_ptr(out), v, 8)
    return out


cdef bytes _time_key(int64_t t, bytes suffix):
    cdef Py_ssize_t n = PyBytes_GET_SIZE(suffix)
    cdef bytes out = _new(8 + n)
    cdef unsigned char* p = _ptr(out)
    _be(p, _clamp(t), 8)
    memcpy(p + 8, PyBytes_AS_STRING(suffix), n)
    return out


cdef bytes _mid_ord(bytes mid, int ordinal):
    cdef bytes out = _new(MID + 2)
    cdef unsigned char* p = _ptr(out)
    memcpy(p, PyBytes_AS_STRING(mid), MID)
    _be(p + MID, <uint64_t>ordinal, 2)
    return out


cdef tuple _ready_keys(bytes ns0, bytes dom, int priority, int64_t due, bytes mid, int ordinal):
    """(ready key, ready_dom key): ns NUL [domain NUL] prio_inv due(u64 BE) mid ordinal(u16 BE)."""
    cdef Py_ssize_t nn = PyBytes_GET_SIZE(ns0), nd = PyBytes_GET_SIZE(dom)
    cdef bytes ready = _new(nn + 1 + 8 + MID + 2)
    cdef bytes by_dom = _new(nn + nd + 1 + 1 + 8 + MID + 2)
    cdef unsigned char* p = _ptr(ready)
    cdef unsigned char* q = _ptr(by_dom)
    memcpy(p, PyBytes_AS_STRING(ns0), nn)
    p[nn] = <unsigned char>(127 - priority)
    _be(p + nn + 1, _clamp(due), 8)
    memcpy(p + nn + 9, PyBytes_AS_STRING(mid), MID)
    _be(p + nn + 9 + MID, <uint64_t>ordinal, 2)
    memcpy(q, p, nn)
    memcpy(q + nn, PyBytes_AS_STRING(dom), nd)
    q[nn + nd] = 0
    memcpy(q + nn + nd + 1, p + nn, 1 + 8 + MID + 2)
    return ready, by_dom


cdef inline bytes _raw(object value):
    if value is None or PyBytes_CheckExact(value):
        return value
    return bytes(value)


# --- rows -----------------------------------------------------------------------------------------

cdef struct Msg:
    int flags
    int priority
    int n
    int64_t counts[6]
    uint64_t index
    int64_t created
    int64_t expires
    int64_t finished
    int64_t retain
    uint64_t size
    int lock_mode
    int64_t lock_until
    uint64_t key_id


cdef int _decode_msg(bytes buf, Msg* m, list ns_out) except -1:
    """Parse a message row into ``m``; ``ns_out`` gets [namespace, its text8+text16 tail]."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(buf), off, ns_len, idem_len
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(buf)
    cdef int i
    if n < MSG_FIXED + 1 + 2 or p[0] != 2:
        return _reference_rejects(_model.MessageRow, buf)
    ns_len = p[MSG_FIXED]
    off = MSG_FIXED + 1 + ns_len
    if off + 2 > n:
        return _reference_rejects(_model.MessageRow, buf)
    idem_len = <Py_ssize_t>_rle(p + off, 2)
    if off + 2 + idem_len != n:
        return _reference_rejects(_model.MessageRow, buf)
    try:
        ns = PyUnicode_DecodeUTF8(<const char*>p + MSG_FIXED + 1, ns_len, NULL)
        PyUnicode_DecodeUTF8(<const char*>p + off + 2, idem_len, NULL)
    except UnicodeDecodeError:
        return _reference_rejects(_model.MessageRow, buf)
    m.flags = p[1]
    m.priority = <int>(<signed char>p[2])
    m.n = <int>_rle(p + 3, 2)
    for i in range(6):
        m.counts[i] = <int64_t>_rle(p + 5 + 2 * i, 2)
    m.index = _rle(p + 17, 8)
    m.created = <int64_t>_rle(p + 25, 8)
    m.expires = <int64_t>_rle(p + 33, 8)
    m.finished = <int64_t>_rle(p + 41, 8)
    m.retain = <int64_t>_rle(p + 49, 8)
    m.size = _rle(p + 57, 4)
    m.lock_mode = p[61]
    m.lock_until = <int64_t>_rle(p + 62, 8)
    m.key_id = _rle(p + 70, 4)
    ns_out.append(ns)
    ns_out.append(buf[MSG_FIXED:])
    return 0


cdef bytes _encode_msg(Msg* m, bytes tail):
    cdef Py_ssize_t nt = PyBytes_GET_SIZE(tail)
    cdef int i
    for i in range(6):
        if m.counts[i] < 0 or m.counts[i] > 0xFFFF:
            raise AssertionError(f"recipient count {m.counts[i]} out of range in a message row")
    cdef bytes out = _new(MSG_FIXED + nt)
    cdef unsigned char* p = _ptr(out)
    p[0] = 2
    p[1] = <unsigned char>m.flags
    p[2] = <unsigned char>(m.priority & 0xFF)
    _le(p + 3, <uint64_t>m.n, 2)
    for i in range(6):
        _le(p + 5 + 2 * i, <uint64_t>m.counts[i], 2)
    _le(p + 17, m.index, 8)
    _le(p + 25, <uint64_t>m.created, 8)
    _le(p + 33, <uint64_t>m.expires, 8)
    _le(p + 41, <uint64_t>m.finished, 8)
    _le(p + 49, <uint64_t>m.retain, 8)
    _le(p + 57, m.size, 4)
    p[61] = <unsigned char>m.lock_mode
    _le(p + 62, <uint64_t>m.lock_until, 8)
    _le(p + 70, m.key_id, 4)
    memcpy(p + MSG_FIXED, PyBytes_AS_STRING(tail), nt)
    return out


cdef struct Rcpt:
    int state
    int attempts
    int64_t due
    uint64_t token
    int64_t deadline


cdef int _decode_rcpt(bytes buf, Rcpt* r, list out) except -1:
    """Parse a recipient row into ``r``; ``out`` gets [domain bytes, reason bytes]."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(buf), dom_len, reason_len, off
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(buf)
    if n < RCPT_FIXED + 1 + 2 or p[0] != 1:
        return _reference_rejects(_model.RecipientRow, buf)
    dom_len = p[RCPT_FIXED]
    off = RCPT_FIXED + 1 + dom_len
    if off + 2 > n:
        return _reference_rejects(_model.RecipientRow, buf)
    reason_len = <Py_ssize_t>_rle(p + off, 2)
    if off + 2 + reason_len != n:
        return _reference_rejects(_model.RecipientRow, buf)
    try:
        PyUnicode_DecodeUTF8(<const char*>p + RCPT_FIXED + 1, dom_len, NULL)
    except UnicodeDecodeError:
        return _reference_rejects(_model.RecipientRow, buf)
    r.state = p[1]
    r.attempts = <int>_rle(p + 2, 2)
    r.due = <int64_t>_rle(p + 4, 8)
    r.token = _rle(p + 12, 8)
    r.deadline = <int64_t>_rle(p + 20, 8)
    out.append(buf[RCPT_FIXED + 1 : off])
    out.append(buf[off + 2 :])
    return 0


cdef bytes _encode_rcpt(Rcpt* r, bytes dom, bytes reason):
    cdef Py_ssize_t nd = PyBytes_GET_SIZE(dom), nr = PyBytes_GET_SIZE(reason)
    if r.attempts < 0 or r.attempts > 0xFFFF or nd > 0xFF or nr > 0xFFFF:
        raise AssertionError("a recipient row field is out of range")
    cdef bytes out = _new(RCPT_FIXED + 1 + nd + 2 + nr)
    cdef unsigned char* p = _ptr(out)
    p[0] = 1
    p[1] = <unsigned char>r.state
    _le(p + 2, <uint64_t>r.attempts, 2)
    _le(p + 4, <uint64_t>r.due, 8)
    _le(p + 12, r.token, 8)
    _le(p + 20, <uint64_t>r.deadline, 8)
    p[RCPT_FIXED] = <unsigned char>nd
    memcpy(p + RCPT_FIXED + 1, PyBytes_AS_STRING(dom), nd)
    _le(p + RCPT_FIXED + 1 + nd, <uint64_t>nr, 2)
    memcpy(p + RCPT_FIXED + 3 + nd, PyBytes_AS_STRING(reason), nr)
    return out


cdef bytes _encode_lease(bytes mid, int64_t deadline, tuple ordinals, bytes worker):
    cdef Py_ssize_t k = len(ordinals), nw = PyBytes_GET_SIZE(worker), i
    cdef bytes out = _new(LEASE_FIXED + 2 + 2 * k + 1 + nw)
    cdef unsigned char* p = _ptr(out)
    p[0] = 1
    memcpy(p + 1, PyBytes_AS_STRING(mid), MID)
    _le(p + 17, <uint64_t>deadline, 8)
    _le(p + LEASE_FIXED, <uint64_t>k, 2)
    for i in range(k):
        _le(p + LEASE_FIXED + 2 + 2 * i, <uint64_t>(<int>ordinals[i]), 2)
    p[LEASE_FIXED + 2 + 2 * k] = <unsigned char>nw
    memcpy(p + LEASE_FIXED + 3 + 2 * k, PyBytes_AS_STRING(worker), nw)
    return out


cdef int _reference_rejects(object row_class, bytes buf) except -1:
    row_class.decode(buf)  # raises the reference's Corruption
    raise AssertionError(f"the compiled and reference decoders disagree on a {row_class.__name__}: {buf!r}")


cdef inline void _count(object deltas, str ns, str name, int64_t delta):
    key = (ns, name)
    deltas[key] = deltas[key] + delta


cdef inline void _set_state(Msg* m, object deltas, str ns, int old, int new):
    if old == new:
        return
    m.counts[old - 1] -= 1
    m.counts[new - 1] += 1
    _count(deltas, ns, _NAMES[old], -1)
    _count(deltas, ns, _NAMES[new], 1)


# --- apply ----------------------------------------------------------------------------------------


def enqueue(txn, dict dbs, object deltas, uint64_t index, env, int64_t size_bytes, uint64_t key_id,
            bytes idem, uint64_t dedup_until):
    """ENQUEUE of a message in a namespace without a compliance mode (the caller checks). ``idem``
    is the idempotency key in UTF-8 (b"" for none): the caller has found no earlier message inside
    its window, and ``dedup_until`` is where this one's window ends. Returns the message id; False
    when a message with this id exists (nothing changes); None (nothing written) when a field does
    not fit its encoding and the reference must raise what it raises."""
    cdef bytes mid = env.message_id
    cdef str ns = env.namespace
    cdef tuple rcpts = tuple(env.recipients)
    cdef Py_ssize_t n = len(rcpts), ordinal
    cdef int priority = env.priority
    cdef int64_t created = env.created_at_ms, expires = env.expires_at_ms
    cdef int64_t due = max(<int64_t>env.not_before_ms, created)
    cdef bytes ns_b = ns.encode("utf-8")
    cdef Msg m
    cdef Rcpt r
    cdef int i
    if PyBytes_GET_SIZE(mid) != MID or PyBytes_GET_SIZE(ns_b) > 0xFF or n > 0xFFFF or size_bytes < 0 \
            or size_bytes > 0xFFFFFFFF or key_id > 0xFFFFFFFF or not -128 <= priority <= 127 \
            or PyBytes_GET_SIZE(idem) > 0xFFFF:
        return None
    domains = []
    for address in rcpts:
        dom = address.rpartition("@")[2].lower().encode("utf-8")
        if PyBytes_GET_SIZE(dom) > 0xFF:
            return None
        domains.append(dom)
    get, put = txn.get, txn.put
    db_messages = dbs[b"messages"]
    if get(mid, None, db_messages) is not None:
        return False
    cdef bytes ns0 = ns_b + b"\x00"
    cdef bytes dkey = None, old_dedup = None
    if PyBytes_GET_SIZE(idem):
        dkey = ns0 + idem
        old_dedup = _raw(get(dkey, None, dbs[b"dedup"]))
        if old_dedup is not None and PyBytes_GET_SIZE(old_dedup) < MID + 8:
            return None
    db_rcpts, db_ready, db_ready_dom = dbs[b"recipients"], dbs[b"ready"], dbs[b"ready_dom"]
    r.state = QUEUED
    r.attempts = 0
    r.due = due
    r.token = 0
    r.deadline = 0
    for ordinal in range(n):
        dom = domains[ordinal]
        put(_mid_ord(mid, ordinal), _encode_rcpt(&r, dom, b""), True, True, False, db_rcpts)
        ready, by_dom = _ready_keys(ns0, dom, priority, due, mid, ordinal)
        put(ready, dom, True, True, False, db_ready)
        put(by_dom, b"", True, True, False, db_ready_dom)
    m.flags = 0
    m.priority = priority
    m.n = <int>n
    for i in range(6):
        m.counts[i] = 0
    m.counts[QUEUED - 1] = n
    m.index = index
    m.created = created
    m.expires = expires
    m.finished = 0
    m.retain = 0
    m.size = <uint64_t>size_bytes
    m.lock_mode = 0
    m.lock_until = 0
    m.key_id = key_id
    cdef bytes idem_len = _new(2)
    _le(_ptr(idem_len), <uint64_t>PyBytes_GET_SIZE(idem), 2)
    put(mid, _encode_msg(&m, bytes((PyBytes_GET_SIZE(ns_b),)) + ns_b + idem_len + idem), True, True, False,
        db_messages)
    put(mid, b"", True, True, False, dbs[b"live"])
    put(ns0 + mid, b"", True, True, False, dbs[b"msg_ns"])
    if expires:
        put(_time_key(expires, mid), b"", True, True, False, dbs[b"expiry"])
    if dkey is not None:
        # The key's earlier window, if any, has passed (the caller found no duplicate): its
        # expiry entry goes, and the key now names this message until ``dedup_until``.
        if old_dedup is not None:
            txn.delete(old_dedup[MID : MID + 8] + dkey, b"", dbs[b"dedup_exp"])
        until = _u64be(dedup_until)
        put(dkey, mid + until, True, True, False, dbs[b"dedup"])
        put(until + dkey, b"", True, True, False, dbs[b"dedup_exp"])
    _count(deltas, ns, _NAMES[QUEUED], n)
    _count(deltas, ns, _LIVE, 1)
    _count(deltas, ns, _STORED, 1)
    _count(deltas, ns, _BYTES, size_bytes)
    return mid


def lease(txn, dict dbs, object deltas, uint64_t token, bytes mid, tuple ordinals, int64_t now_ms,
          int64_t deadline_ms, bytes worker):
    """LEASE. Returns False when the message is gone or held (nothing to observe), None (nothing
    written) when its namespace has a compliance mode or a field does not fit, else
    ``(granted ordinals, most attempts, enqueue index)``, the ordinals possibly empty (always
    when the message's lifetime passed by ``now_ms``)."""
    cdef Msg m
    cdef Rcpt r
    cdef list parts = [], rparts
    cdef Py_ssize_t k
    cdef int ordinal, attempts = 0
    if PyBytes_GET_SIZE(mid) != MID or PyBytes_GET_SIZE(worker) > 0xFF or len(ordinals) > 0xFFFF:
        return None
    get, put, delete = txn.get, txn.put, txn.delete
    db_messages, db_rcpts = dbs[b"messages"], dbs[b"recipients"]
    raw = _raw(get(mid, None, db_messages))
    if raw is None:
        return False
    _decode_msg(raw, &m, parts)
    if m.flags & HELD:
        return False
    if m.lock_mode:
        return None
    if m.expires and m.expires <= now_ms:  # its lifetime passed: nothing of it is leased
        return ((), 0, 0)
    cdef str ns = parts[0]
    cdef bytes tail = parts[1]
    cdef bytes ns0 = ns.encode("utf-8") + b"\x00"
    db_ready, db_ready_dom = dbs[b"ready"], dbs[b"ready_dom"]
    granted = []
    for k in range(len(ordinals)):
        ordinal = ordinals[k]
        key = _mid_ord(mid, ordinal)
        rraw = _raw(get(key, None, db_rcpts))
        if rraw is None:
            continue
        rparts = []
        _decode_rcpt(rraw, &r, rparts)
        if (r.state != QUEUED and r.state != DEFERRED) or r.due > now_ms:
            continue
        dom = rparts[0]
        ready, by_dom = _ready_keys(ns0, dom, m.priority, r.due, mid, ordinal)
        delete(ready, b"", db_ready)
        delete(by_dom, b"", db_ready_dom)
        _set_state(&m, deltas, ns, r.state, LEASED)
        r.state = LEASED
        r.token = token
        r.deadline = deadline_ms
        put(key, _encode_rcpt(&r, dom, rparts[1]), True, True, False, db_rcpts)
        granted.append(ordinal)
        if r.attempts > attempts:
            attempts = r.attempts
    if not granted:
        return ((), 0, 0)
    cdef tuple got = tuple(granted)
    cdef bytes tkey = _u64be(token)
    put(mid, _encode_msg(&m, tail), True, True, False, db_messages)
    put(tkey, _encode_lease(mid, deadline_ms, got, worker), True, True, False, dbs[b"leases"])
    put(_time_key(deadline_ms, tkey), b"", True, True, False, dbs[b"lease_due"])
    return got, attempts, m.index


def settle(txn, dict dbs, c, kv, int target, uint64_t token, bytes mid, tuple lease_ordinals,
           int64_t lease_deadline_ms, bytes worker, tuple ordinals, int64_t now_ms, tuple next_attempt_ms,
           bytes reason):
    """ACK / DEFER / BOUNCE (``target``: DELIVERED, DEFERRED or BOUNCED) of ``ordinals`` of a lease
    the caller has checked. Returns True when applied, False (nothing written) when the message or
    a recipient is not as the lease says, None (nothing written) when the namespace has a
    compliance mode or a field does not fit."""
    cdef Msg m
    cdef Rcpt r
    cdef list parts = [], rparts
    cdef Py_ssize_t i, n = len(ordinals)
    cdef int ordinal, new
    if PyBytes_GET_SIZE(mid) != MID or PyBytes_GET_SIZE(reason) > 0xFFFF or PyBytes_GET_SIZE(worker) > 0xFF:
        return None
    get, put, delete = txn.get, txn.put, txn.delete
    db_messages, db_rcpts = dbs[b"messages"], dbs[b"recipients"]
    raw = _raw(get(mid, None, db_messages))
    if raw is None:
        return False
    _decode_msg(raw, &m, parts)
    if m.lock_mode:
        return None
    cdef str ns = parts[0]
    cdef bytes tail = parts[1]
    deltas = c.deltas
    rows = []
    for i in range(n):
        ordinal = ordinals[i]
        key = _mid_ord(mid, ordinal)
        rraw = _raw(get(key, None, db_rcpts))
        if rraw is None:
            return False
        rparts = []
        _decode_rcpt(rraw, &r, rparts)
        if r.state != LEASED or r.token != token:
            return False
        rows.append((key, rraw, rparts[0], rparts[1]))
    cdef bytes ns0 = ns.encode("utf-8") + b"\x00"
    cdef Py_ssize_t n_next = len(next_attempt_ms)
    for i in range(n):
        key, rraw, dom, old_reason = rows[i]
        rparts = []
        _decode_rcpt(rraw, &r, rparts)
        new = target
        if r.attempts < ATTEMPTS_MAX:  # the count stops there (the reference's _attempted)
            r.attempts += 1
        if target == DEFERRED:
            if m.expires and now_ms >= m.expires:
                new = EXPIRED
            else:
                r.due = next_attempt_ms[i] if i < n_next else now_ms
        _set_state(&m, deltas, ns, LEASED, new)
        r.state = new
        r.token = 0
        r.deadline = 0
        put(key, _encode_rcpt(&r, dom, reason if reason else old_reason), True, True, False, db_rcpts)
        if (new == QUEUED or new == DEFERRED) and not (m.flags & HELD):
            ready, by_dom = _ready_keys(ns0, dom, m.priority, r.due, mid, ordinals[i])
            put(ready, dom, True, True, False, dbs[b"ready"])
            put(by_dom, b"", True, True, False, dbs[b"ready_dom"])
    cdef bytes tkey = _u64be(token)
    remaining = tuple([o for o in lease_ordinals if o not in ordinals])
    if remaining:
        put(tkey, _encode_lease(mid, lease_deadline_ms, remaining, worker), True, True, False, dbs[b"leases"])
    else:
        delete(tkey, b"", dbs[b"leases"])
        delete(_time_key(lease_deadline_ms, tkey), b"", dbs[b"lease_due"])
    _maybe_finish(txn, dbs, c, kv, mid, &m, ns, now_ms)
    put(mid, _encode_msg(&m, tail), True, True, False, db_messages)
    return True


cdef int _maybe_finish(txn, dict dbs, c, kv, bytes mid, Msg* m, str ns, int64_t now_ms) except -1:
    """The reference's _maybe_finish for a message without a compliance mode."""
    if m.flags & FINISHED:
        return 0
    if m.counts[DELIVERED - 1] + m.counts[BOUNCED - 1] + m.counts[EXPIRED - 1] != m.n:
        return 0
    policy = c.policy(kv, ns)
    cdef int64_t retention = policy.retention_ms
    if m.counts[EXPIRED - 1] or m.flags & GIVEN_UP:
        retention = max(retention, <int64_t>policy.expired_retention_ms)
    m.flags |= FINISHED
    m.finished = now_ms
    m.retain = now_ms + retention
    txn.delete(mid, b"", dbs[b"live"])
    if m.expires:
        txn.delete(_time_key(m.expires, mid), b"", dbs[b"expiry"])
    if not _has_holds(txn, dbs[b"holds"], mid):  # a legal hold keeps it out of the index (retention_key)
        txn.put(_time_key(m.retain, mid), b"", True, True, False, dbs[b"retention"])
    _count(c.deltas, ns, _LIVE, -1)
    return 0


cdef bint _has_holds(txn, db, bytes mid) except -1:
    """Whether the message has a legal hold (a key of the holds table starts with its id)."""
    with txn.cursor(db=db) as cur:
        if not cur.set_range(mid):
            return False
        key = _raw(cur.key())
        return PyBytes_GET_SIZE(key) >= MID and key[:MID] == mid


# --- planning -------------------------------------------------------------------------------------


def due_ordinals(txn, db, bytes mid, int64_t now_ms, object domain):
    """The reference's plan_lease filter: the ordinals of ``mid``'s recipients that are waiting
    (QUEUED or DEFERRED) and due by ``now_ms``, in ``domain`` (UTF-8 bytes) when not None."""
    cdef Rcpt r
    cdef list parts, out = []
    cdef bytes key
    cdef const unsigned char* k
    if PyBytes_GET_SIZE(mid) != MID:
        raise ValueError("a message id is 16 bytes")
    with txn.cursor(db=db) as cur:
        if not cur.set_range(mid):
            return ()
        for raw_key, raw_value in cur.iternext():
            key = _raw(raw_key)
            if PyBytes_GET_SIZE(key) < MID or key[:MID] != mid:
                break
            parts = []
            _decode_rcpt(_raw(raw_value), &r, parts)
            if (r.state == QUEUED or r.state == DEFERRED) and r.due <= now_ms and (domain is None or parts[0] == domain):
                out.append(int.from_bytes(key[MID : MID + 2], "big"))
    return tuple(out)
