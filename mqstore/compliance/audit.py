"""The audit log: one hash-chained record per mutation and per denial, with signed Merkle checkpoints.

A pure module over :class:`~mqstore.queue.kv.KV`: the caller passes the KV of the write
transaction that makes the mutation, so the audit record and the mutation commit together or not
at all (fail closed: if :meth:`AuditLog.append` raises, the caller's transaction aborts). Every
replica applies the same appends in the same order with the same inputs, so nothing in here reads
a clock or draws randomness: record bytes are canonical and Ed25519 signatures are deterministic
(RFC 8032), so replicas holding the same signing key write byte-identical tables.

Tables (KV table names):

``audit``       u64 big-endian seq (from 1) -> record bytes (canonical JSON, see below)
``audit_ckpt``  u64 big-endian tree size -> checkpoint bytes (canonical JSON)
``meta``        ``audit.state`` -> head (seq, SHA-256 of the last record, its time), the last
                checkpoint's size and time, and the Merkle frontier (see :class:`_State`)

A record is the caller's fields plus ``seq``, ``prev`` (hex SHA-256 of the previous record's
stored bytes; 64 zeros for the first) and ``time`` (compliance clock, ms), serialised as JSON
with sorted keys, compact separators, UTF-8, no floats. Recipient addresses never appear in
plain: callers pass :meth:`AuditLog.hmac_address` values, and the fields named in
:data:`ADDRESS_FIELDS` are refused unless they hold such values. :func:`event` builds the fields
of a record with the names the rest of mqstore uses.

Checkpoints follow RFC 6962 (section 2.1): the records' stored bytes are the leaves,
``leaf = SHA-256(0x00 || bytes)``, ``node = SHA-256(0x01 || left || right)``; the root of ``n``
leaves is maintained incrementally from a frontier of at most 64 perfect-subtree roots, so an
append costs O(log n) and never rescans. A checkpoint is written after the append that makes the
size a multiple of ``checkpoint_every``, or that comes ``checkpoint_ms`` or more after the last
checkpoint (measured from the first record before there is one); it holds the size, the root, the
time, the Ed25519 signature over ``mqstore-audit-checkpoint-v1\\n<size>\\n<root hex>\\n<time>``
and the signing key's id (first 16 bytes of SHA-256 of the raw public key, hex).

:func:`verify` walks the whole log in order (streaming) and names the first bad record; see its
docstring for how a changed, missing or swapped record is told apart from its neighbours.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import struct
import time as _time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mqstore import validate
from mqstore.compliance.rules import COMPLIANCE_AHEAD_MAX_MS
from mqstore.compliance.signing import key_id, public_key_from_hex, public_key_hex
from mqstore.errors import Corruption, InvalidArgument
from mqstore.ids import MESSAGE_ID_CHARS, format_id, parse_id
from mqstore.limits import TIME_MS_MAX
from mqstore.queue.kv import KV

# --- limits (candidates for mqstore/limits.py) -----------------------------------------------------

#: Largest encoded audit record. A record names one mutation; a before/after of retention, mode
#: and holds fits in a few KiB. The cap keeps one record from bloating the write transaction.
AUDIT_RECORD_BYTES_MAX = 64 * 1024
#: Deepest nesting of lists/dicts inside a record's fields.
AUDIT_FIELD_DEPTH_MAX = 8
#: Largest integer magnitude in a record: JSON readers in other languages keep 64-bit integers.
AUDIT_INT_MIN = -(2**63)
AUDIT_INT_MAX = 2**64 - 1
#: Records one :meth:`AuditLog.records` call returns.
AUDIT_READ_RECORDS_MAX = 100_000
#: Problems a :class:`VerifyReport` lists word for word (the rest are counted).
VERIFY_PROBLEMS_MAX = 100
#: ``verify`` reports progress every this many records.
VERIFY_PROGRESS_EVERY = 4096
#: A checkpoint is written after every this many records, and after the first record that comes
#: this long (compliance clock) after the previous checkpoint: ``verify`` requires each of them.
CHECKPOINT_EVERY_DEFAULT = 256
CHECKPOINT_MS_DEFAULT = 60_000
HMAC_KEY_BYTES_MIN = 16
#: How far two nodes' wall clocks may legitimately differ: the largest ``max_clock_offset_ms`` a
#: node's config takes (mqstore/config.py). A leader whose own clock is off by less is trusted.
CLOCK_OFFSET_TOLERANCE_MS = 86_400_000
#: How far a record's compliance time may run ahead of the wall clock it was written at
#: (``wall``), and jump ahead of the previous record's by more than the wall clock advanced:
#: a request's compliance time counts at most :data:`~mqstore.compliance.rules.COMPLIANCE_AHEAD_MAX_MS`
#: ahead of its entry's stamp, and the stamp is the writer's clock (or the latest stamp, never
#: later than a clock that ran before), within :data:`CLOCK_OFFSET_TOLERANCE_MS` of any other
#: node's. Further ahead, the compliance clock was moved forward behind mqstore's back (the
#: persisted clock and stamp edited in the database), and retention was judged at a false time.
CLOCK_LEAD_MAX_MS = COMPLIANCE_AHEAD_MAX_MS + CLOCK_OFFSET_TOLERANCE_MS

# --- names -----------------------------------------------------------------------------------------

TABLE_AUDIT = b"audit"
TABLE_CHECKPOINTS = b"audit_ckpt"
TABLE_META = b"meta"
META_STATE = b"audit.state"

CHECKPOINT_FORMAT = "mqstore-audit-checkpoint-v1"
_SIGNED_PREFIX = CHECKPOINT_FORMAT + "\n"
ZERO_HASH = "0" * 64
#: Fields append() sets itself; callers may not pass them.
RESERVED_FIELDS = frozenset({"seq", "prev", "time"})
#: Fields that name mail addresses: their string values must be ``hmac:`` values (lists allowed).
ADDRESS_FIELDS = frozenset({"recipient", "recipients", "mail_from", "address", "addresses", "rcpt"})
OUTCOMES = ("allowed", "denied")
HMAC_PREFIX = "hmac:"

_U64 = struct.Struct(">Q")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX128 = re.compile(r"[0-9a-f]{128}")
_HMAC_VALUE = re.compile(r"hmac:[0-9a-f]{64}")
_EMPTY_ROOT = hashlib.sha256(b"").digest()  # RFC 6962: MTH({}) = SHA-256()

# --- RFC 6962 hashing ------------------------------------------------------------------------------


def leaf_hash(data: bytes) -> bytes:
    """RFC 6962 leaf hash: SHA-256(0x00 || data)."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 6962 interior node hash: SHA-256(0x01 || left || right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def frontier_push(frontier: list[bytes], size: int, leaf: bytes) -> None:
    """Add the leaf hash ``leaf`` to a tree of ``size`` leaves whose frontier is ``frontier``.

    The frontier holds the roots of the perfect subtrees that make up the tree, largest (leftmost)
    first: one per set bit of ``size``. Adding a leaf merges equal-sized subtrees like a binary
    increment, so it costs at most log2(size) node hashes."""
    assert len(frontier) == size.bit_count(), "the frontier does not match the tree size"
    h = leaf
    while size & 1:
        h = node_hash(frontier.pop(), h)
        size >>= 1
    frontier.append(h)


def frontier_root(frontier: list[bytes]) -> bytes:
    """The RFC 6962 Merkle tree hash of the tree ``frontier`` describes.

    RFC 6962 splits n leaves at the largest power of two k < n: the left part is the largest
    perfect subtree (the frontier's first entry) and the right part is the rest, recursively. So
    the root is the frontier folded from the right."""
    if not frontier:
        return _EMPTY_ROOT
    root = frontier[-1]
    for h in reversed(frontier[:-1]):
        root = node_hash(h, root)
    return root


# --- canonical records -----------------------------------------------------------------------------


def _check_value(value: Any, where: str, depth: int) -> None:
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        if not AUDIT_INT_MIN <= value <= AUDIT_INT_MAX:
            raise InvalidArgument(f"audit field {where}: integer {value} is out of the 64-bit range")
        return
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidArgument(f"audit field {where}: the string is not valid Unicode (lone surrogate)") from None
        return
    if depth >= AUDIT_FIELD_DEPTH_MAX:
        raise InvalidArgument(f"audit field {where}: nested deeper than {AUDIT_FIELD_DEPTH_MAX} levels")
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_value(item, f"{where}[{i}]", depth + 1)
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidArgument(f"audit field {where}: key {key!r} is not a string")
            _check_value(key, f"{where}.{key}", depth + 1)
            _check_value(item, f"{where}.{key}", depth + 1)
        return
    raise InvalidArgument(
        f"audit field {where}: {type(value).__name__} is not allowed (str, int, bool, None, list, dict only)"
    )


def _check_addresses(name: str, value: Any) -> None:
    if value is None:
        return
    items = value if isinstance(value, list | tuple) else [value]
    for item in items:
        if not isinstance(item, str) or not _HMAC_VALUE.fullmatch(item):
            raise InvalidArgument(
                f"audit field {name!r} names mail addresses: pass AuditLog.hmac_address() values, never plain addresses"
            )


def validate_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """A plain-dict copy of ``fields`` after checking every value can go into a record."""
    if not isinstance(fields, Mapping):
        raise InvalidArgument("audit fields are a mapping of names to values")
    out: dict[str, Any] = {}
    for name, value in fields.items():
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"audit field names are non-empty strings, not {name!r}")
        if name in RESERVED_FIELDS:
            raise InvalidArgument(f"audit field {name!r} is set by the audit log itself")
        _check_value(name, name, 0)
        _check_value(value, name, 0)
        if name in ADDRESS_FIELDS:
            _check_addresses(name, value)
        out[name] = value
    return out


def canonical(obj: Mapping[str, Any]) -> bytes:
    """The canonical bytes of a validated record or checkpoint: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def decode_record(data: bytes) -> dict[str, Any]:
    """Decode stored record bytes, checking they are canonical and carry ``seq``/``prev``/``time``.

    Raises :class:`Corruption` (without an index: the caller knows the key) on any deviation."""
    try:
        obj = json.loads(data.decode("utf-8"), parse_float=_no_float, parse_constant=_no_float)
    except (UnicodeDecodeError, ValueError) as exc:
        raise Corruption(f"the record does not decode: {exc}") from None
    if not isinstance(obj, dict):
        raise Corruption("the record is not a JSON object")
    seq, prev, time_ms = obj.get("seq"), obj.get("prev"), obj.get("time")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise Corruption("the record has no valid 'seq'")
    if not isinstance(prev, str) or not _HEX64.fullmatch(prev):
        raise Corruption("the record has no valid 'prev' hash")
    if not isinstance(time_ms, int) or isinstance(time_ms, bool) or not 0 <= time_ms <= TIME_MS_MAX:
        raise Corruption("the record has no valid 'time'")
    try:
        again = canonical(obj)
    except (TypeError, ValueError) as exc:
        raise Corruption(f"the record does not re-encode: {exc}") from None
    if again != data:
        raise Corruption("the record is not in canonical form")
    return obj


def _no_float(text: str) -> Any:
    raise ValueError(f"floats are not allowed in audit records ({text})")


def event(
    *,
    op: str,
    target: str,
    outcome: str,
    actor: str,
    auth: str,
    source: str,
    node: int | str | None = None,
    site: str | None = None,
    wall_ms: int | None = None,
    reason: str | None = None,
    bypass: bool = False,
    bypass_reason: str | None = None,
    before: Mapping[str, Any] | None = None,
    after: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The fields of one audit record, with the names mqstore uses everywhere.

    ``outcome`` is ``allowed`` or ``denied`` (a denial needs a ``reason``); ``bypass`` (governance
    bypass) needs a ``bypass_reason``; ``before``/``after`` carry retention, mode and holds as they
    were and became; ``wall_ms`` is the writer's wall clock (the record's ``time`` is the
    compliance clock); ``extra`` adds more fields (addresses only as :meth:`AuditLog.hmac_address`)."""
    if outcome not in OUTCOMES:
        raise InvalidArgument(f"an audit outcome is one of {OUTCOMES}, not {outcome!r}")
    if outcome == "denied" and not reason:
        raise InvalidArgument("a denial's audit record needs a reason")
    if bypass and not bypass_reason:
        raise InvalidArgument("a bypass needs a reason in the audit record")
    fields: dict[str, Any] = {
        "op": op,
        "target": target,
        "outcome": outcome,
        "actor": actor,
        "auth": auth,
        "source": source,
        "node": node,
        "site": site,
        "wall": wall_ms,
        "reason": reason,
        "bypass": bypass,
        "bypass_reason": bypass_reason,
        "before": None if before is None else dict(before),
        "after": None if after is None else dict(after),
    }
    for name, value in extra.items():
        if name in fields:
            raise InvalidArgument(f"audit field {name!r} given twice")
        fields[name] = value
    return validate_fields(fields)


def derive_hmac_key(secret: bytes) -> bytes:
    """A 32-byte address-HMAC key derived from a cluster-wide secret (e.g. the KEK) with HKDF.

    Every replica must use the same HMAC key, or their records (and hashes) differ."""
    if len(secret) < HMAC_KEY_BYTES_MIN:
        raise InvalidArgument(f"the secret for the audit HMAC key is at least {HMAC_KEY_BYTES_MIN} bytes")
    return HKDF(algorithm=SHA256(), length=32, salt=None, info=b"mqstore-audit-hmac-v1").derive(secret)


# --- checkpoints -----------------------------------------------------------------------------------


def signed_message(size: int, root: str, time_ms: int) -> bytes:
    """The exact bytes a checkpoint's signature covers (domain-separated)."""
    return f"{_SIGNED_PREFIX}{size}\n{root}\n{time_ms}".encode("ascii")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed statement: "the audit log's first ``size`` records have Merkle root ``root``".

    ``signature``/``key_id`` are empty when the log has no signing key. ``public_key`` (hex) is
    only set on an exported checkpoint (:meth:`to_json`); the stored form names the key by id."""

    size: int
    root: str
    time: int
    signature: str
    key_id: str
    public_key: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise InvalidArgument("a checkpoint's size is a positive integer")
        if not isinstance(self.root, str) or not _HEX64.fullmatch(self.root):
            raise InvalidArgument("a checkpoint's root is 64 lower-case hex digits")
        if not isinstance(self.time, int) or isinstance(self.time, bool) or not 0 <= self.time <= TIME_MS_MAX:
            raise InvalidArgument("a checkpoint's time is milliseconds since the epoch")
        if not isinstance(self.signature, str) or not (self.signature == "" or _HEX128.fullmatch(self.signature)):
            raise InvalidArgument("a checkpoint's signature is 128 lower-case hex digits (or empty: unsigned)")
        if not isinstance(self.key_id, str) or not (self.key_id == "" or _HEX32.fullmatch(self.key_id)):
            raise InvalidArgument("a checkpoint's key id is 32 lower-case hex digits (or empty: unsigned)")
        if (self.signature == "") != (self.key_id == ""):
            raise InvalidArgument("a checkpoint has both a signature and a key id, or neither")
        public_ok = isinstance(self.public_key, str) and _HEX64.fullmatch(self.public_key)
        if self.public_key is not None and not public_ok:
            raise InvalidArgument("a checkpoint's public key is 64 lower-case hex digits")

    @property
    def signed(self) -> bool:
        return self.signature != ""

    def message(self) -> bytes:
        return signed_message(self.size, self.root, self.time)

    def _fields(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "size": self.size,
            "root": self.root,
            "time": self.time,
            "signature": self.signature,
            "key_id": self.key_id,
        }

    def encode(self) -> bytes:
        """The stored form (canonical JSON, without the public key)."""
        return canonical(self._fields())

    @classmethod
    def decode(cls, data: bytes) -> Checkpoint:
        """The stored form back; :class:`Corruption` when it is not one."""
        try:
            return cls._from_obj(json.loads(data.decode("utf-8")), allow_public_key=False, exact=data)
        except (UnicodeDecodeError, ValueError) as exc:
            raise Corruption(f"the checkpoint does not decode: {exc}") from None

    def to_json(self) -> str:
        """The exported form: the stored fields plus ``public_key`` (when known), one JSON object."""
        obj = self._fields()
        if self.public_key is not None:
            obj["public_key"] = self.public_key
        return canonical(obj).decode("utf-8")

    @classmethod
    def from_json(cls, text: str | bytes) -> Checkpoint:
        """An exported checkpoint back; :class:`InvalidArgument` when the text is not one."""
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise InvalidArgument(f"not an exported audit checkpoint: {exc}") from None
        try:
            return cls._from_obj(obj, allow_public_key=True, exact=None)
        except ValueError as exc:
            raise InvalidArgument(f"not an exported audit checkpoint: {exc}") from None

    @classmethod
    def _from_obj(cls, obj: Any, allow_public_key: bool, exact: bytes | None) -> Checkpoint:
        if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not a {CHECKPOINT_FORMAT} object")
        expected = {"format", "size", "root", "time", "signature", "key_id"}
        extra = set(obj) - expected - ({"public_key"} if allow_public_key else set())
        if extra or not expected <= set(obj):
            raise ValueError(f"unexpected or missing fields {sorted(extra ^ (expected - set(obj)))}")
        try:
            ckpt = cls(obj["size"], obj["root"], obj["time"], obj["signature"], obj["key_id"], obj.get("public_key"))
        except InvalidArgument as exc:
            raise ValueError(str(exc)) from None
        if exact is not None and ckpt.encode() != exact:
            raise ValueError("the checkpoint is not in canonical form")
        return ckpt

    def with_public_key(self, public_key: Ed25519PublicKey) -> Checkpoint:
        return Checkpoint(self.size, self.root, self.time, self.signature, self.key_id, public_key_hex(public_key))

    def signature_problem(self, public_key: Ed25519PublicKey) -> str | None:
        """None when ``public_key`` made this checkpoint's signature, else what is wrong."""
        if not self.signed:
            return "it is not signed"
        expected = key_id(public_key)
        if self.key_id != expected:
            return f"it is signed by another key (key id {self.key_id}, expected {expected})"
        try:
            public_key.verify(bytes.fromhex(self.signature), self.message())
        except InvalidSignature:
            return "its signature does not verify"
        return None


# --- state in meta ---------------------------------------------------------------------------------

_STATE_VERSION = 1
_STATE = struct.Struct(">BQ32sQQQ")  # version, head seq, head hash, head time, ckpt size, ckpt time


@dataclass(frozen=True, slots=True)
class AuditHead:
    """The last record: its seq (0: empty log), the hex SHA-256 of its bytes, its time."""

    seq: int
    hash: str
    time: int


@dataclass(slots=True)
class _State:
    seq: int
    head_hash: bytes
    head_time: int
    ckpt_size: int  # size of the last checkpoint (0: none yet)
    ckpt_time: int  # its time; before the first checkpoint, the first record's time
    frontier: list[bytes]

    @classmethod
    def empty(cls) -> _State:
        return cls(0, bytes(32), 0, 0, 0, [])

    def encode(self) -> bytes:
        assert len(self.frontier) == self.seq.bit_count()
        head = _STATE.pack(_STATE_VERSION, self.seq, self.head_hash, self.head_time, self.ckpt_size, self.ckpt_time)
        return head + b"".join(self.frontier)

    @classmethod
    def decode(cls, data: bytes) -> _State:
        if len(data) < _STATE.size or data[0] != _STATE_VERSION or (len(data) - _STATE.size) % 32:
            raise Corruption("the audit state in meta is malformed (unknown version or length)")
        _, seq, head_hash, head_time, ckpt_size, ckpt_time = _STATE.unpack_from(data)
        rest = data[_STATE.size :]
        frontier = [rest[i : i + 32] for i in range(0, len(rest), 32)]
        if len(frontier) != seq.bit_count() or ckpt_size > seq:
            raise Corruption(f"the audit state in meta is inconsistent (head seq {seq}, {len(frontier)} subtree roots)")
        return cls(seq, head_hash, head_time, ckpt_size, ckpt_time, frontier)

    @classmethod
    def load(cls, kv: KV) -> _State:
        data = kv.get(TABLE_META, META_STATE)
        return cls.empty() if data is None else cls.decode(data)


def _seq_key(seq: int) -> bytes:
    return _U64.pack(seq)


# --- the log ---------------------------------------------------------------------------------------


class AuditLog:
    """Appends audit records and writes checkpoints through the caller's KV (its transaction).

    ``signer`` signs checkpoints (None: checkpoints are written unsigned; :func:`verify` with a
    public key then reports them). ``hmac_key`` keys :meth:`hmac_address`. Every replica must be
    built with the same key material and settings, or their audit tables diverge."""

    def __init__(
        self,
        signer: Ed25519PrivateKey | None,
        hmac_key: bytes,
        checkpoint_every: int = CHECKPOINT_EVERY_DEFAULT,
        checkpoint_ms: int = CHECKPOINT_MS_DEFAULT,
    ) -> None:
        if signer is not None and not isinstance(signer, Ed25519PrivateKey):
            raise InvalidArgument("the audit signer is an Ed25519 private key")
        if not isinstance(hmac_key, bytes) or len(hmac_key) < HMAC_KEY_BYTES_MIN:
            raise InvalidArgument(f"the audit HMAC key is at least {HMAC_KEY_BYTES_MIN} bytes")
        if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise InvalidArgument("checkpoint_every is a positive number of records")
        if not isinstance(checkpoint_ms, int) or checkpoint_ms < 1:
            raise InvalidArgument("checkpoint_ms is a positive number of milliseconds")
        self._signer = signer
        self._hmac_key = hmac_key
        self.checkpoint_every = checkpoint_every
        self.checkpoint_ms = checkpoint_ms
        self.public_key: Ed25519PublicKey | None = None if signer is None else signer.public_key()
        self._key_id = "" if self.public_key is None else key_id(self.public_key)

    def hmac_address(self, address: str) -> str:
        """``hmac:`` + hex HMAC-SHA256 of the lower-cased address: what records carry instead of it."""
        if not isinstance(address, str):
            raise InvalidArgument("an address is a string")
        digest = hmac.new(self._hmac_key, address.lower().encode("utf-8", "surrogatepass"), hashlib.sha256)
        return HMAC_PREFIX + digest.hexdigest()

    # -- writing --

    def append(self, kv: KV, fields: Mapping[str, Any], time_ms: int) -> int:
        """Write one record (and a checkpoint when one is due); return its seq.

        ``time_ms`` is the compliance clock; it may not go backwards. Raises
        :class:`InvalidArgument` for bad fields (nothing written) and :class:`Corruption` when the
        stored state is damaged: either way the caller's transaction must abort."""
        record = validate_fields(fields)
        if not isinstance(time_ms, int) or isinstance(time_ms, bool) or not 0 <= time_ms <= TIME_MS_MAX:
            raise InvalidArgument("an audit record's time is milliseconds since the epoch")
        state = _State.load(kv)
        floor = max(state.head_time, state.ckpt_time)  # a forced checkpoint may be later than the head
        if state.seq and time_ms < floor:
            raise InvalidArgument(
                f"the compliance clock went backwards: {time_ms} < {floor} (audit record {state.seq})"
            )
        seq = state.seq + 1
        record["seq"] = seq
        record["prev"] = state.head_hash.hex() if state.seq else ZERO_HASH
        record["time"] = time_ms
        data = canonical(record)
        if len(data) > AUDIT_RECORD_BYTES_MAX:
            raise InvalidArgument(f"an audit record is at most {AUDIT_RECORD_BYTES_MAX} bytes, this one is {len(data)}")
        key = _seq_key(seq)
        if kv.get(TABLE_AUDIT, key) is not None:
            raise Corruption(f"audit record {seq} already exists but meta says the log ends at {state.seq}")
        kv.put(TABLE_AUDIT, key, data)
        frontier_push(state.frontier, state.seq, leaf_hash(data))
        if state.seq == 0:
            state.ckpt_time = time_ms  # the checkpoint timer starts with the first record
        state.seq = seq
        state.head_hash = hashlib.sha256(data).digest()
        state.head_time = time_ms
        if seq % self.checkpoint_every == 0 or time_ms - state.ckpt_time >= self.checkpoint_ms:
            self._write_checkpoint(kv, state, time_ms)
        kv.put(TABLE_META, META_STATE, state.encode())
        return seq

    def tick(self, kv: KV, time_ms: int) -> Checkpoint | None:
        """Write a checkpoint if records came since the last one and ``checkpoint_ms`` has passed.

        For a replicated periodic entry, so a quiet log's last records get covered too."""
        state = _State.load(kv)
        if state.seq > state.ckpt_size and time_ms - state.ckpt_time >= self.checkpoint_ms:
            return self._checkpoint_now(kv, state, time_ms)
        return None

    def tick_due_ms(self, kv: KV) -> int | None:
        """When :meth:`tick` would write a checkpoint (compliance time), or None: every record is
        covered by one."""
        state = _State.load(kv)
        return state.ckpt_time + self.checkpoint_ms if state.seq > state.ckpt_size else None

    def adopt_checkpoints(self, kv: KV) -> int:
        """After another node's copy of the store became this node's (a snapshot installed): sign
        with this node's key the checkpoints the other node signed, each only if this log's
        records hash to its root (one that does not match is left as it is, for verify to
        report), so this node's log verifies with its own key like every other node's. Returns
        how many were signed."""
        if self._signer is None:
            return 0
        foreign = {ckpt.size: ckpt for ckpt in checkpoints(kv) if ckpt.key_id != self._key_id}
        if not foreign:
            return 0
        last = max(foreign)
        frontier: list[bytes] = []
        adopted = []
        for size, (key, data) in enumerate(kv.scan(TABLE_AUDIT, b""), start=1):
            if key != _seq_key(size):
                break  # a gap: nothing after it can match
            frontier_push(frontier, size - 1, leaf_hash(data))
            ckpt = foreign.get(size)
            if ckpt is not None and frontier_root(frontier).hex() == ckpt.root:
                signature = self._signer.sign(signed_message(ckpt.size, ckpt.root, ckpt.time)).hex()
                adopted.append(Checkpoint(ckpt.size, ckpt.root, ckpt.time, signature, self._key_id))
            if size >= last:
                break
        for ckpt in adopted:  # written after the scan (no write while a cursor of the table runs)
            kv.put(TABLE_CHECKPOINTS, _seq_key(ckpt.size), ckpt.encode())
        return len(adopted)

    def checkpoint(self, kv: KV, time_ms: int) -> Checkpoint | None:
        """Write a checkpoint now if records came since the last one (None: nothing new)."""
        state = _State.load(kv)
        if state.seq > state.ckpt_size:
            return self._checkpoint_now(kv, state, time_ms)
        return None

    def _checkpoint_now(self, kv: KV, state: _State, time_ms: int) -> Checkpoint:
        if not isinstance(time_ms, int) or isinstance(time_ms, bool) or not 0 <= time_ms <= TIME_MS_MAX:
            raise InvalidArgument("a checkpoint's time is milliseconds since the epoch")
        if time_ms < max(state.head_time, state.ckpt_time):
            raise InvalidArgument(f"the compliance clock went backwards: {time_ms} < {state.head_time}")
        ckpt = self._write_checkpoint(kv, state, time_ms)
        kv.put(TABLE_META, META_STATE, state.encode())
        return ckpt

    def _write_checkpoint(self, kv: KV, state: _State, time_ms: int) -> Checkpoint:
        assert state.seq > state.ckpt_size, "a checkpoint must cover new records"
        root = frontier_root(state.frontier).hex()
        signature = "" if self._signer is None else self._signer.sign(signed_message(state.seq, root, time_ms)).hex()
        ckpt = Checkpoint(state.seq, root, time_ms, signature, self._key_id)
        kv.put(TABLE_CHECKPOINTS, _seq_key(state.seq), ckpt.encode())
        state.ckpt_size = state.seq
        state.ckpt_time = time_ms
        return ckpt

    # -- reading --

    def head(self, kv: KV) -> AuditHead:
        return head(kv)

    def records(self, kv: KV, after: int | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        return records(kv, after, limit)

    def checkpoints(self, kv: KV) -> Iterator[Checkpoint]:
        return checkpoints(kv)

    def latest_checkpoint(self, kv: KV) -> Checkpoint | None:
        return latest_checkpoint(kv)

    def export_checkpoint(self, kv: KV) -> Checkpoint | None:
        """The latest checkpoint with this log's public key, for ``audit export-checkpoint``."""
        ckpt = latest_checkpoint(kv)
        if ckpt is None or self.public_key is None:
            return ckpt
        return ckpt.with_public_key(self.public_key)


def head(kv: KV) -> AuditHead:
    """The last record's seq, hash and time (seq 0 for an empty log)."""
    state = _State.load(kv)
    if state.seq == 0:
        return AuditHead(0, ZERO_HASH, 0)
    return AuditHead(state.seq, state.head_hash.hex(), state.head_time)


def _decoded(seq: int, data: bytes) -> dict[str, Any]:
    try:
        obj = decode_record(data)
    except Corruption as exc:
        raise Corruption(f"audit record {seq}: {exc.reason}") from None
    if obj["seq"] != seq:
        raise Corruption(f"audit record {seq}: stored under seq {seq} but says seq {obj['seq']}")
    return obj


def _start_key(after: int | None) -> bytes:
    if after is not None and (not isinstance(after, int) or isinstance(after, bool) or not 0 <= after < 2**64 - 1):
        raise InvalidArgument("after is a record seq (0 or more)")
    return _seq_key(1 if after is None else after + 1)


def records(kv: KV, after: int | None = None, limit: int = 1000) -> list[dict[str, Any]]:
    """Up to ``limit`` decoded records with seq > ``after`` (from the first when None), ascending.

    Raises :class:`Corruption` naming the seq of a record that does not decode."""
    if not isinstance(limit, int) or not 1 <= limit <= AUDIT_READ_RECORDS_MAX:
        raise InvalidArgument(f"limit is 1..{AUDIT_READ_RECORDS_MAX}")
    out: list[dict[str, Any]] = []
    for key, data in kv.scan(TABLE_AUDIT, _start_key(after)):
        out.append(_decoded(_U64.unpack(key)[0], data))
        if len(out) >= limit:
            break
    return out


def tail(kv: KV, count: int = 20) -> list[dict[str, Any]]:
    """The last ``count`` records (by the head in meta), ascending."""
    if not isinstance(count, int) or not 1 <= count <= AUDIT_READ_RECORDS_MAX:
        raise InvalidArgument(f"count is 1..{AUDIT_READ_RECORDS_MAX}")
    last = head(kv).seq
    return records(kv, after=max(0, last - count), limit=count) if last else []


def query(
    kv: KV,
    where: Mapping[str, Any] | None = None,
    since_ms: int | None = None,
    until_ms: int | None = None,
    after: int | None = None,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    """Records whose fields equal every ``where`` item and whose time is in [since, until), ascending.

    Every record with a seq above ``after`` is considered, to the end of the log or the ``limit``-th
    match: nothing matching is left out (before, the scan stopped silently after a million
    records). Records' times never go backwards, so the records of [since, until) are found by
    binary search, and a record is decoded only when its stored bytes contain each string value
    of ``where`` as that field (canonical JSON): a scan for a rare record in a large log reads the
    bytes without decoding them. A caller paging through the matches passes the last seq it saw
    as ``after``."""
    if not isinstance(limit, int) or not 1 <= limit <= AUDIT_READ_RECORDS_MAX:
        raise InvalidArgument(f"limit is 1..{AUDIT_READ_RECORDS_MAX}")
    if where is not None and (not isinstance(where, Mapping) or not all(isinstance(k, str) for k in where)):
        raise InvalidArgument("where maps record field names to the values they must equal")
    for name, value in (("since_ms", since_ms), ("until_ms", until_ms)):
        if value is not None:
            validate.integer(value, name, 0, TIME_MS_MAX)
    wanted = dict(where or {})
    needles = _needles(wanted)
    first_seq = _start_seq(after)
    stop_seq: int | None = None
    if since_ms is not None:
        first_seq = _first_seq_at(kv, first_seq, since_ms) or first_seq
    if until_ms is not None:
        stop_seq = _first_seq_at(kv, first_seq, until_ms)
    out: list[dict[str, Any]] = []
    scan = kv.scan(TABLE_AUDIT, _seq_key(first_seq), None if stop_seq is None else _seq_key(stop_seq))
    for key, data in scan:
        if not all(needle in data for needle in needles):
            continue  # a field wanted has another value (needles only rule records out)
        obj = _decoded(_U64.unpack(key)[0], data)
        if since_ms is not None and obj["time"] < since_ms:
            continue
        if until_ms is not None and obj["time"] >= until_ms:
            break  # times never go backwards
        if all(obj.get(name) == value for name, value in wanted.items()):
            out.append(obj)
            if len(out) >= limit:
                break
    return out


def _needles(wanted: Mapping[str, Any]) -> list[bytes]:
    """For each ``where`` item with a string value, the bytes ``"name":"value"`` that a canonical
    record whose field equals it holds (a string equals only a string, whose JSON is one text)."""
    needles = []
    for name, value in wanted.items():
        if isinstance(value, str):
            try:
                needles.append(canonical({name: value})[1:-1])
            except (UnicodeEncodeError, ValueError):
                continue  # not representable in a record: the decoded comparison decides
    return needles


def _start_seq(after: int | None) -> int:
    _start_key(after)  # checks it
    return 1 if after is None else after + 1


def _first_seq_at(kv: KV, lo: int, time_ms: int) -> int | None:
    """The smallest seq >= ``lo`` whose record's time is >= ``time_ms``, found by binary search
    (record times never go backwards), or the seq after the last record. None when the log
    cannot be searched (a record missing or undecodable on the way, meta damaged): the caller's
    scan then checks every record's time instead."""
    try:
        hi = head(kv).seq + 1  # exclusive
    except Corruption:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        data = kv.get(TABLE_AUDIT, _seq_key(mid))
        try:
            if data is None:
                raise Corruption(f"audit record {mid} is missing")
            at = _decoded(mid, data)["time"]
        except Corruption:
            return None
        if at >= time_ms:
            hi = mid
        else:
            lo = mid + 1
    return lo


def checkpoints(kv: KV) -> Iterator[Checkpoint]:
    """Every stored checkpoint, by size (a generator: do not write to the log while it runs)."""
    for key, data in kv.scan(TABLE_CHECKPOINTS, b""):
        size = _U64.unpack(key)[0] if len(key) == 8 else -1
        try:
            ckpt = Checkpoint.decode(data)
        except Corruption as exc:
            raise Corruption(f"audit checkpoint {size}: {exc.reason}") from None
        if ckpt.size != size:
            raise Corruption(f"audit checkpoint stored under size {size} says size {ckpt.size}")
        yield ckpt


def latest_checkpoint(kv: KV) -> Checkpoint | None:
    """The checkpoint covering the most records (the one meta names), or None."""
    state = _State.load(kv)
    if state.ckpt_size == 0:
        return None
    data = kv.get(TABLE_CHECKPOINTS, _seq_key(state.ckpt_size))
    if data is None:
        raise Corruption(f"audit checkpoint {state.ckpt_size} (the latest, by meta) is missing")
    try:
        return Checkpoint.decode(data)
    except Corruption as exc:
        raise Corruption(f"audit checkpoint {state.ckpt_size}: {exc.reason}") from None


def signed_by(kv: KV) -> str | None:
    """The key id that signed the log's latest checkpoint (else any signed one), None when the log
    holds no signed checkpoint: whether a store already had an audit signing key."""
    try:
        latest = latest_checkpoint(kv)
    except Corruption:
        latest = None
    if latest is not None and latest.signed:
        return latest.key_id
    for _key, data in kv.scan(TABLE_CHECKPOINTS, b""):
        try:
            ckpt = Checkpoint.decode(data)
        except Corruption:
            continue
        if ckpt.signed:
            return ckpt.key_id
    return None


# --- verification ----------------------------------------------------------------------------------


@dataclass(slots=True)
class VerifyReport:
    """What :func:`verify` found. ``first_bad`` is the seq of the first record found changed,
    missing or out of place (None: no record can be named — e.g. a log rewritten consistently and
    re-signed with another key, which ``first_bad_checkpoint`` names instead)."""

    records_checked: int = 0
    checkpoints_checked: int = 0
    signatures_checked: int = 0
    first_bad: int | None = None
    first_bad_checkpoint: int | None = None
    head_seq: int = 0
    root: str = _EMPTY_ROOT.hex()
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems_omitted: int = 0
    #: The messages' locks and holds and the namespaces' policies the records derive (see
    #: :class:`ComplianceFold`): ``mqstore verify`` compares them with the state tables.
    fold: ComplianceFold | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records_checked": self.records_checked,
            "checkpoints_checked": self.checkpoints_checked,
            "signatures_checked": self.signatures_checked,
            "first_bad": self.first_bad,
            "first_bad_checkpoint": self.first_bad_checkpoint,
            "head_seq": self.head_seq,
            "root": self.root,
            "problems": list(self.problems),
            "problems_omitted": self.problems_omitted,
            "notes": list(self.notes),
        }


class _Verifier:
    def __init__(self, report: VerifyReport) -> None:
        self.report = report
        self.bad_records: list[int] = []
        self.bad_checkpoints: list[int] = []
        self.broken_links: list[int] = []  # j: record j+1's prev is not H(record j) (j=0: genesis)

    def problem(self, text: str, record: int | None = None, checkpoint: int | None = None) -> None:
        if record is not None:
            self.bad_records.append(record)
        if checkpoint is not None:
            self.bad_checkpoints.append(checkpoint)
        if len(self.report.problems) < VERIFY_PROBLEMS_MAX:
            self.report.problems.append(text)
        else:
            self.report.problems_omitted += 1

    def broken_link(self, j: int, text: str) -> None:
        if len(self.broken_links) < 2:  # only the first two decide (see _first_bad_from_links)
            self.broken_links.append(j)
        self.problem(text)

    def first_bad_from_links(self) -> int | None:
        # A changed record j always breaks link j (its successor's prev names its ORIGINAL hash);
        # it also breaks link j-1 when the change hit its own prev field. So with b the first
        # broken link: if link b+1 is intact, record b+1 is vouched for by b+2 and the change is in
        # record b; if links b and b+1 are both broken, one change to record b+1 explains both
        # (the more likely story than two changes). Link 0 is record 1's prev against zeros.
        if not self.broken_links:
            return None
        b = self.broken_links[0]
        if b == 0:
            return 1
        if len(self.broken_links) > 1 and self.broken_links[1] == b + 1:
            return b + 1
        return b


# --- what the records say about time, locks and holds ----------------------------------------------


def _iso(ms: int) -> str:
    return _time.strftime("%Y-%m-%dT%H:%M:%SZ", _time.gmtime(ms / 1000))


def _days(ms: int) -> str:
    return f"{ms / 86_400_000:.1f} days"


def _label(obj: Mapping[str, Any]) -> str:
    """``record 12 (delete 01M9...)``: a record as problems name it."""
    what = " ".join(x for x in (obj.get("op"), obj.get("target")) if isinstance(x, str) and x)
    return f"record {obj['seq']}" + (f" ({what})" if what else "")


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_or(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


#: A wall clock recorded this much behind the latest one went back (set back, or corrected after it
#: ran ahead): :class:`_ClockCheck` then measures from it. Less is what nodes' clocks differ by.
WALL_BACK_MS = 60_000


class _ClockCheck:
    """Finds the records whose compliance time was moved forward behind mqstore's back.

    A record's ``time`` is the compliance clock; ``wall`` is the wall clock of the writer that
    made the request (0 or absent: none, e.g. an entry without a request context). The
    compliance clock advances with the writers' monotonic clocks, never faster than real time, so
    its lead over the latest wall time recorded so far (the latest: a wall clock set back is not
    held against it) never grows by more than :data:`CLOCK_LEAD_MAX_MS` (see there): a request's
    compliance time counts at most a day ahead of its entry's stamp, and the stamp never passes
    the writer's clock (or the latest stamp). The lead itself may be anything (a store created
    while its clock was ahead keeps its compliance clock ahead; one stopped for a while lags by
    the downtime); a rise of it is what someone who edits the persisted compliance clock and the
    latest batch stamp in the database leaves: the time moves ahead and the cap of a day ahead of
    the stamp with it, and only the wall clock recorded beside the time shows it.

    So a record is reported when its lead exceeds the base (the smallest lead before it) by more
    than :data:`CLOCK_LEAD_MAX_MS`, when its time jumped past the previous record's by more than
    that beyond what the wall clock advanced between them, or (with a trusted checkpoint) past the
    trusted checkpoint's time by more than that beyond what the wall clock advanced since. Each
    jump is reported once: later records are measured from it.

    A wall clock running ahead lowers a record's lead just as downtime does, and only what comes
    after tells them apart (until stop 31 such a record lowered the base at once, so a wall clock
    set days ahead for one write, then corrected, had every record reported once real time passed
    the mistaken one). So a lower lead becomes the base only when the next record's lead stays
    within the bound of it (downtime: the lag stays); if the next one's lead is back up, the record
    is taken for a wall clock that ran ahead and ignored, also as the previous record the next
    jump is measured from. A wall clock recorded more than :data:`WALL_BACK_MS` behind the latest
    one went back (set back, or corrected after it ran ahead): it tells nothing of the time since
    the record before, so that record is held only to the cap (its lead over the latest wall at
    most the bound above the base, or above 0 when the base is below it); later records are
    measured from it (the latest wall, the base, the trusted checkpoint's wall), and a lower lead
    waiting for the next record is dropped."""

    def __init__(self, problem: Callable[[str, int], None], lead_max_ms: int = CLOCK_LEAD_MAX_MS) -> None:
        self._problem = problem
        self._lead_max = lead_max_ms
        self._wall_max = 0
        #: seq, time, wall of the last record with a wall the next jump is measured from (not one
        #: whose lower lead waits for the next record).
        self._last: tuple[int, int, int] | None = None
        self._anchor: tuple[int, int, int] | None = None  # size, time, wall: the trusted checkpoint
        self._base: int | None = None  # the smallest lead so far (after a jump reported: that one's)
        self._pending: int | None = None  # a lead below the base the next record has to confirm
        self._excused_anchor = 0
        #: How far the jumps reported so far moved the compliance clock forward (0: none).
        self.moved_ms = 0

    def trusted(self, size: int, time_ms: int) -> None:
        """Records up to ``size`` match a trusted checkpoint of time ``time_ms``."""
        if self._last is not None:
            self._anchor = (size, time_ms, self._last[2])

    def record(self, obj: Mapping[str, Any]) -> None:
        wall = _int_or(obj.get("wall"), 0)
        if wall <= 0:
            return
        t: int = obj["time"]
        found: list[tuple[int, str]] = []
        ref = max(wall, self._wall_max)
        lead = t - ref
        base = lead if self._base is None else self._base
        # A wall clock that went back tells nothing of the time since the record before: only the cap
        # of a day ahead of the entry's stamp (which never passed the latest wall, plus the offset
        # nodes' clocks may have, unless the log began ahead of it) bounds the lead then.
        went_back = wall < self._wall_max - WALL_BACK_MS
        floor = max(base, 0) if went_back else base
        if lead - floor > self._lead_max:
            base = floor
            at = (f"the wall clock it was written at ({_iso(wall)})" if ref == wall
                  else f"the latest wall clock recorded up to it ({_iso(ref)}; its own: {_iso(wall)})")
            before = ""
            if base > 0:
                before = f", where the records before it ran at most {_days(base)} ahead"
            elif base < 0:  # a compliance clock behind the wall clock (downtime): it ran up
                before = f", where the records before it ran {_days(-base)} behind the wall clock"
            found.append((lead - base, f"its time {_iso(t)} runs {_days(lead)} ahead of {at}{before}"))
        jump = 0
        if self._last is not None and not went_back:
            seq, last_t, last_w = self._last
            jump = t - last_t - max(wall - last_w, 0)
            if jump > self._lead_max:
                found.append((jump, f"its time {_iso(t)} is {_days(t - last_t)} past record {seq}'s "
                                    f"({_iso(last_t)}), while the wall clock advanced {_days(max(wall - last_w, 0))}"))
        gain = 0
        if self._anchor is not None and not went_back:
            size, anchor_t, anchor_w = self._anchor
            gain = t - anchor_t - max(wall - anchor_w, 0)
            if gain - self._excused_anchor > self._lead_max:
                found.append((gain - self._excused_anchor,
                              f"its time {_iso(t)} is {_days(t - anchor_t)} past the trusted checkpoint's "
                              f"(size {size}, {_iso(anchor_t)}), while the wall clock advanced "
                              f"{_days(max(wall - anchor_w, 0))}"))
        settled = True  # measure the next jump from this record
        if found:
            detail = max(found)[1]
            self._problem(
                f"{_label(obj)}: the compliance clock was moved forward: {detail} (a record's compliance time never "
                f"leads the wall clock by more than {_days(self._lead_max)}: a day ahead of its entry's stamp, plus "
                "the offset nodes' clocks may have): retention and legal holds were judged at a false time from "
                "here on",
                obj["seq"],
            )
            self._base = max(base, lead)
            self._pending = None
            self._excused_anchor = max(self._excused_anchor, gain)
            self.moved_ms = max(self.moved_ms + max(lead - base, jump, 0), gain)
            self._wall_max = max(self._wall_max, wall)
        elif went_back:
            # The wall clock went back (set back, or corrected after running ahead): measure from it.
            # The compliance time went on meanwhile, so this record's own lead is the base now,
            # unless the base is higher; the trusted checkpoint's wall moves back alike.
            self._base = max(base, t - wall)
            self._pending = None
            self._wall_max = wall
            if self._anchor is not None:
                size, anchor_t, anchor_w = self._anchor
                self._anchor = (size, anchor_t, min(anchor_w, wall - (t - anchor_t)))
        else:
            self._base = base
            if self._pending is not None:
                if lead - self._pending <= self._lead_max:
                    self._base = min(base, self._pending)  # the lag stayed: downtime
                # else: the lead is back up: the record before ran on a wall clock set ahead
                self._pending = None
            if lead < self._base:
                self._pending = lead
                settled = False
            self._wall_max = max(self._wall_max, wall)
        if settled:
            self._last = (obj["seq"], t, wall)


_MODES = ("none", "governance", "compliance")
#: Ops whose allowed record removed the message it names (its ``before``: the lock it had).
_REMOVING = ("delete", "compact")
#: Ops whose allowed record changed the lock of the message it names (``after``: the new lock).
_CHANGING = ("retention", "legal_hold", "release_legal_hold")
#: The policy fields a ``policy`` record's ``after`` holds.
POLICY_FIELDS = ("mode", "lock_retention_ms", "lifetime_ms", "retention_ms")


@dataclass(slots=True)
class MessageLock:
    """A message's lock as the audit records derive it."""

    namespace: str
    mode: str  # "none", "governance", "compliance"
    until: int  # retain_until_ms
    holds: tuple[str, ...]  # legal holds' case ids, sorted
    key_id: int | None  # the key it was sealed under (None: not known, no enqueue record seen)

    def fields(self) -> tuple[str, int, tuple[str, ...]]:
        return self.mode, self.until, self.holds


def describe_lock(mode: str, until: int, holds: tuple[str, ...]) -> str:
    return (f"mode {mode}, retained until {_iso(until) if until > 0 else '-'}, "
            f"legal holds [{', '.join(holds)}]")


def lock_difference(have: tuple[str, int, tuple[str, ...]], want: tuple[str, int, tuple[str, ...]],
                    have_name: str = "", want_name: str = "the audit records before it say") -> str:
    """What differs between two locks (mode, until, holds), e.g. ``legal holds [] (the audit
    records before it say [SEC-1])``."""
    parts = []
    if have[0] != want[0]:
        parts.append(f"mode {have[0]} ({want_name} {want[0]})")
    if have[1] != want[1]:
        parts.append(f"retention until {_iso(have[1]) if have[1] > 0 else '-'} ({want_name} "
                     f"{_iso(want[1]) if want[1] > 0 else '-'})")
    if have[2] != want[2]:
        parts.append(f"legal holds [{', '.join(have[2])}] ({want_name} [{', '.join(want[2])}])")
    return (have_name + " " if have_name else "") + "; ".join(parts)


def _lock_fields(value: Any) -> tuple[str, int, tuple[str, ...]] | None:
    """(mode, until, holds) from a record's ``before``/``after`` (None: not a lock)."""
    if not isinstance(value, Mapping):
        return None
    mode, until, holds = value.get("mode"), _int_or(value.get("retain_until_ms"), -1), value.get("holds")
    if mode not in _MODES or until < 0 or not isinstance(holds, list):
        return None
    if not all(isinstance(h, str) for h in holds):
        return None
    return str(mode), until, tuple(sorted(holds))


class ComplianceFold:
    """Folds the audit records, oldest first, into the compliance state they derive: each
    message's lock mode and end and its legal holds (from its ``enqueue`` record's ``after``, then
    allowed ``retention``, ``legal_hold`` and ``release_legal_hold`` records; gone with an allowed
    ``delete``, ``compact``, ``drop_namespace`` or ``shred_key``), and each namespace's policy
    (allowed ``policy`` records). Only what a lock protects is kept: messages with a retention
    mode or a legal hold.

    While folding it reports a record whose ``before`` (the lock as the message's row and the
    holds table had it when the record was written) differs from what the records before it
    derive — the row or the holds were changed behind mqstore's back — and an allowed removal of
    a message the records before it say was locked at the record's time. ``mqstore verify``
    then compares :attr:`messages` and :attr:`policies` with the state tables."""

    def __init__(self, problem: Callable[[str, int], None]) -> None:
        self._problem = problem
        self.messages: dict[bytes, MessageLock] = {}
        self.policies: dict[str, dict[str, Any]] = {}
        self._names: dict[str, str] = {}  # one string per namespace name

    def _ns(self, obj: Mapping[str, Any]) -> str:
        ns = obj.get("namespace")
        if not isinstance(ns, str):
            return ""
        return self._names.setdefault(ns, ns)

    def record(self, obj: Mapping[str, Any], moved_ms: int = 0) -> None:
        """Fold record ``obj``; ``moved_ms``: how far its time is known to have been moved forward
        (removals are judged at its time less that)."""
        op = obj.get("op")
        allowed = obj.get("outcome") == "allowed"
        target = obj.get("target")
        if op == "policy":
            after = obj.get("after")
            if allowed and isinstance(target, str) and isinstance(after, Mapping):
                self.policies[target] = {name: after.get(name) for name in POLICY_FIELDS}
            return
        if op in ("drop_namespace", "shred_key"):
            if allowed:
                self._removed_together(obj, str(op), target, moved_ms)
            return
        if not isinstance(target, str) or len(target) != MESSAGE_ID_CHARS:
            return
        try:
            mid = parse_id(target)
        except InvalidArgument:
            return
        if op == "enqueue":
            lock = _lock_fields(obj.get("after"))
            if allowed and lock is not None:
                key = obj.get("key_id")
                self._keep(mid, MessageLock(self._ns(obj), *lock, key_id=key if _int(key) else None))
            return
        current = self.messages.get(mid)
        derived = current
        before = _lock_fields(obj.get("before"))
        if before is not None:
            if current is None:
                current = MessageLock(self._ns(obj), *before, key_id=None)
            elif current.fields() != before:
                self._problem(
                    f"{_label(obj)}: when this record was written the message had "
                    f"{lock_difference(before, current.fields())}: its lock or legal holds were changed behind "
                    "mqstore's back", obj["seq"])
                current = MessageLock(current.namespace, *before, key_id=current.key_id)
        if not allowed:
            self._keep(mid, current)
            return
        if op in _REMOVING:
            judged = derived if derived is not None else current
            if judged is not None:
                why = _locked_at(judged, obj, moved_ms)
                if why is not None:
                    self._problem(f"{_label(obj)}: allowed, but by the audit records before it {why}: the message "
                                  "was removed while it was locked", obj["seq"])
            self.messages.pop(mid, None)
            return
        if op in _CHANGING:
            after = _lock_fields(obj.get("after"))
            if after is not None:
                namespace = current.namespace if current is not None else self._ns(obj)
                current = MessageLock(namespace, *after, key_id=current.key_id if current is not None else None)
        self._keep(mid, current)

    def _keep(self, mid: bytes, lock: MessageLock | None) -> None:
        if lock is None or (lock.mode == "none" and not lock.holds):
            self.messages.pop(mid, None)  # nothing to protect
        else:
            self.messages[mid] = lock

    def _removed_together(self, obj: Mapping[str, Any], op: str, target: Any, moved_ms: int) -> None:
        """An allowed ``drop_namespace`` removed every message of its namespace; an allowed
        ``shred_key`` those sealed under the key (every one finished and unlocked, else it is
        refused)."""
        ns = self._ns(obj)
        key: int | None = None
        if op == "shred_key":
            if not isinstance(target, str) or not target.isdigit():
                return
            key = int(target)
        for mid, lock in list(self.messages.items()):
            if lock.namespace != ns:
                continue
            if key is not None and lock.key_id not in (key, 0):
                if lock.key_id is None and not lock.holds:
                    del self.messages[mid]  # under an unknown key: it may have gone with this one
                continue
            why = _locked_at(lock, obj, moved_ms)
            if why is not None:
                self._problem(f"{_label(obj)}: allowed, but by the audit records before it message "
                              f"{format_id(mid)} {why}: it was removed while it was locked", obj["seq"])
            del self.messages[mid]


def _locked_at(lock: MessageLock, obj: Mapping[str, Any], moved_ms: int = 0) -> str | None:
    """Why ``lock`` forbade the removal that record ``obj`` says was allowed (None: it did not),
    judged at the record's time less ``moved_ms`` (how far the compliance clock was moved forward)."""
    t = obj["time"] - max(moved_ms, 0)
    at = f" (at {_iso(t)}, the record's time before the compliance clock was moved forward)" if moved_ms > 0 else ""
    if lock.holds:
        return f"it was under legal hold(s) {', '.join(lock.holds)}"
    if lock.mode == "compliance" and t < lock.until:
        return f"its COMPLIANCE retention ran until {_iso(lock.until)}{at}"
    if lock.mode == "governance" and t < lock.until and not (obj.get("op") == "delete" and obj.get("bypass") is True):
        return f"its GOVERNANCE retention ran until {_iso(lock.until)} and the record names no bypass{at}"
    return None


def verify(
    kv: KV,
    public_key: Ed25519PublicKey | None,
    trusted: Checkpoint | None = None,
    progress: Callable[[int, int], None] | None = None,
    checkpoint_every: int = CHECKPOINT_EVERY_DEFAULT,
    checkpoint_ms: int = CHECKPOINT_MS_DEFAULT,
    require_signed: bool = False,
    clock_lead_max_ms: int = CLOCK_LEAD_MAX_MS,
) -> VerifyReport:
    """Recompute the whole audit log: hash chain, Merkle roots, checkpoints, signatures, head.

    Walks the records in seq order without holding them (the Merkle frontier is recomputed
    incrementally and compared at every stored checkpoint's size). Checks: seq keys contiguous
    from 1 and equal to each record's ``seq``; each record decodes and is canonical; times never
    go backwards; each ``prev`` is the SHA-256 of the previous record's stored bytes; every stored
    checkpoint's root, time and signature (with ``public_key``, the log's own key; unchecked when
    None and no trusted checkpoint gives one); the head in meta names the last record. With
    ``trusted`` (an exported checkpoint): its signature is valid for its own public key (the one
    it carries, else ``public_key``), the log has at least ``trusted.size`` records (else it was
    truncated) and its root at that size equals ``trusted.root`` (else records up to there were
    rewritten, re-signed or not). The log's own checkpoints are checked with ``public_key`` when
    given, which may be another key than the trusted checkpoint's: on a cluster the records and
    roots are the same on every replica but each node signs with its own key, so a checkpoint
    exported from one node checks every node's log (a note names both keys). Only without
    ``public_key`` are they checked with the trusted checkpoint's key.

    The checkpoints the writer must have written are required too: the schedule is recomputed
    during the walk (after every ``checkpoint_every`` records, and after the first record
    ``checkpoint_ms`` or more after the previous checkpoint, as :class:`AuditLog` writes them;
    checkpoints forced in between restart the timer), and each missing one is a problem: a log
    rewritten and re-chained whose checkpoints were deleted does not pass for an intact one.

    With ``require_signed`` and no key to check signatures with, an unsigned checkpoint is a
    problem (every mqstore store and node signs its checkpoints; a log rewritten by someone
    without the signing key has unsigned ones), not just unchecked.

    What the records say is checked too (see :class:`_ClockCheck` and :class:`ComplianceFold`): a
    record whose compliance time runs more than ``clock_lead_max_ms`` ahead of the wall clocks
    recorded up to it, or jumped that much further than the wall clock advanced since the
    previous record (or the trusted checkpoint), is reported: the compliance clock was moved
    forward; and a record whose ``before`` contradicts the locks and legal holds the records
    before it derive, or that allowed removing a message they say was locked. The state they
    derive is in the report's ``fold`` (``mqstore verify`` compares it with the state tables).

    ``progress(done, total)`` is called every few thousand records (total: the head in meta)."""
    report = VerifyReport()
    v = _Verifier(report)
    def record_problem(text: str, seq: int) -> None:
        v.problem(text, record=seq)

    clock = _ClockCheck(record_problem, clock_lead_max_ms)
    fold = report.fold = ComplianceFold(record_problem)

    # -- keys --
    if trusted is not None:
        trusted_key: Ed25519PublicKey | None = None
        if trusted.public_key is not None:
            trusted_key = public_key_from_hex(trusted.public_key)
        elif public_key is not None:
            trusted_key = public_key
            report.notes.append("the trusted checkpoint carries no public key: checked with the given one")
        if trusted_key is None:
            v.problem(
                f"the trusted checkpoint (size {trusted.size}) carries no public key and none was given",
                checkpoint=trusted.size,
            )
        else:
            why = trusted.signature_problem(trusted_key)
            if why is not None:
                v.problem(f"the trusted checkpoint (size {trusted.size}) is not valid: {why}", checkpoint=trusted.size)
            if public_key is None:
                public_key = trusted_key
                report.notes.append(f"the log's checkpoints are checked with the trusted checkpoint's key "
                                    f"{key_id(trusted_key)} (no key of the log's own was given)")
            elif public_key_hex(trusted_key) != public_key_hex(public_key):
                # Another node's checkpoint (each replica signs with its own key): its signature is
                # checked with its key, its size and root against this log's records; this log's
                # own checkpoints with this log's key.
                report.notes.append(
                    f"the trusted checkpoint (size {trusted.size}) was signed by key {key_id(trusted_key)}, this "
                    f"log's checkpoints are checked with its own key {key_id(public_key)} (on a cluster each node "
                    f"signs with its own key): records 1..{trusted.size} are compared with the trusted root"
                )
    if public_key is None:
        report.notes.append("checkpoint signatures not checked: no public key given"
                            + (" (an unsigned checkpoint is reported)" if require_signed else ""))

    # -- meta --
    state: _State | None
    try:
        raw_state = kv.get(TABLE_META, META_STATE)
        state = None if raw_state is None else _State.decode(raw_state)
    except Corruption as exc:
        v.problem(f"meta: {exc.reason}")
        state = None
        raw_state = b""
    total = state.seq if state is not None else 0
    report.head_seq = total

    # -- the walk --
    ckpt_iter = kv.scan(TABLE_CHECKPOINTS, b"")
    next_ckpt: Checkpoint | None = None
    pending_time_check: Checkpoint | None = None  # its time must not exceed the next record's
    last_good_ckpt = 0  # the last checkpoint that verified, with every one before it
    all_good = True
    trusted_compared = False

    def advance_ckpt() -> Checkpoint | None:
        for key, data in ckpt_iter:
            size = _U64.unpack(key)[0] if len(key) == 8 else None
            try:
                ckpt = Checkpoint.decode(data)
            except Corruption as exc:
                v.problem(f"checkpoint {size}: {exc.reason}", checkpoint=size)
                continue
            if size != ckpt.size:
                v.problem(f"checkpoint {ckpt.size} is stored under size {size}", checkpoint=ckpt.size)
                continue
            return ckpt
        return None

    next_ckpt = advance_ckpt()
    schedule_time: int | None = None  # the time the writer's checkpoint timer ran from (None: no record yet)
    frontier: list[bytes] = []
    n = 0  # leaves seen
    expected = 1
    prev_hash: bytes | None = bytes(32)  # H(previous stored record); None across a gap
    genesis = True
    prev_time = 0
    gap = False
    for key, data in kv.scan(TABLE_AUDIT, b""):
        if len(key) != 8:
            v.problem(f"a key in the audit table is not a seq ({key.hex()})")
            continue
        seq = _U64.unpack(key)[0]
        if seq > expected:
            if seq == expected + 1:
                missing = f"record {expected} is missing"
            else:
                missing = f"records {expected}..{seq - 1} are missing"
            v.problem(missing, record=expected)
            prev_hash = None
            gap = True
        expected = seq + 1
        obj: dict[str, Any] | None
        try:
            obj = decode_record(data)
        except Corruption as exc:
            v.problem(f"record {seq}: {exc.reason}", record=seq)
            obj = None
        if obj is not None:
            if obj["seq"] != seq:
                v.problem(f"record {seq}: stored under seq {seq} but says seq {obj['seq']} (moved)", record=seq)
            if obj["time"] < prev_time:
                v.problem(
                    f"record {seq}: its time {obj['time']} is before the previous record's {prev_time}", record=seq
                )
            if prev_hash is not None and obj["prev"] != prev_hash.hex():
                if genesis:
                    v.broken_link(0, f"record {seq}: the first record's prev is not zeros")
                else:
                    v.broken_link(
                        seq - 1,
                        f"record {seq}: prev does not match the hash of record {seq - 1} "
                        f"(record {seq - 1} or {seq} was changed)",
                    )
            prev_time = max(prev_time, obj["time"])
            clock.record(obj)
            fold.record(obj, clock.moved_ms)
            if pending_time_check is not None and pending_time_check.time > obj["time"]:
                v.problem(
                    f"checkpoint {pending_time_check.size}: its time {pending_time_check.time} is after record "
                    f"{seq}'s time {obj['time']}",
                    checkpoint=pending_time_check.size,
                )
        pending_time_check = None
        genesis = False
        prev_hash = hashlib.sha256(data).digest()
        frontier_push(frontier, n, leaf_hash(data))
        n += 1
        report.records_checked = n
        record_time = obj["time"] if obj is not None else None
        if schedule_time is None and record_time is not None:
            schedule_time = record_time  # the writer's timer starts with the first record
        due = n % checkpoint_every == 0 or (
            record_time is not None and schedule_time is not None and record_time - schedule_time >= checkpoint_ms)
        found: Checkpoint | None = None

        # checkpoints at (or, if damaged, before) this size
        while next_ckpt is not None and next_ckpt.size <= n:
            ckpt = next_ckpt
            next_ckpt = advance_ckpt()
            if ckpt.size < n:  # only possible if keys are out of order
                v.problem(f"checkpoint {ckpt.size} is out of order", checkpoint=ckpt.size)
                continue
            found = ckpt
            report.checkpoints_checked += 1
            if gap:
                v.problem(
                    f"checkpoint {ckpt.size} cannot be checked: records before it are missing", checkpoint=ckpt.size
                )
                continue
            good = True
            root = frontier_root(frontier).hex()
            if root != ckpt.root:
                v.problem(
                    f"checkpoint {ckpt.size}: records 1..{ckpt.size} hash to root {root}, the checkpoint says "
                    f"{ckpt.root} (a record after {last_good_ckpt} was changed)",
                    checkpoint=ckpt.size,
                )
                good = False
            if record_time is not None and ckpt.time < record_time:
                v.problem(
                    f"checkpoint {ckpt.size}: its time {ckpt.time} is before record {n}'s time {record_time}",
                    checkpoint=ckpt.size,
                )
                good = False
            pending_time_check = ckpt
            if public_key is not None:
                report.signatures_checked += 1
                why = ckpt.signature_problem(public_key)
                if why is not None:
                    v.problem(f"checkpoint {ckpt.size}: {why}", checkpoint=ckpt.size)
                    good = False
            elif require_signed and not ckpt.signed:
                v.problem(f"checkpoint {ckpt.size}: it is not signed (mqstore signs every checkpoint it writes: "
                          "the log was rewritten without the signing key)", checkpoint=ckpt.size)
                good = False
            if good and all_good:
                last_good_ckpt = ckpt.size
            all_good = all_good and good
        if found is not None:
            schedule_time = found.time  # a forced checkpoint restarts the timer too
        elif due:
            rule = f"every {checkpoint_every} records" if n % checkpoint_every == 0 else (
                f"{checkpoint_ms / 1000:g} s after the previous one")
            v.problem(f"checkpoint {n} is missing: one is written after record {n} ({rule}); "
                      "checkpoints were deleted", checkpoint=n)
            all_good = False
            schedule_time = record_time
        if trusted is not None and trusted.size == n and not gap:
            trusted_compared = True
            root = frontier_root(frontier).hex()
            if root != trusted.root:
                v.problem(
                    f"the trusted checkpoint (size {trusted.size}) does not match: records 1..{trusted.size} hash to "
                    f"{root}, it says {trusted.root} (the log was rewritten)",
                    checkpoint=trusted.size,
                )
            else:
                clock.trusted(trusted.size, trusted.time)
        if progress is not None and n % VERIFY_PROGRESS_EVERY == 0:
            progress(n, total)

    last = expected - 1  # the greatest seq in the log (0: empty)
    report.root = frontier_root(frontier).hex()

    # -- the tail: head in meta, checkpoints beyond the end, the trusted checkpoint --
    if state is None:
        if last > 0 and raw_state is None:
            v.problem(f"meta has no audit state but the log has {last} records")
    elif state.seq > last:
        v.problem(
            f"head mismatch: meta says the log ends at record {state.seq}, the log ends at {last}: "
            f"records {last + 1}..{state.seq} are missing (truncated)",
            record=last + 1,
        )
    elif state.seq < last:
        v.problem(
            f"head mismatch: meta says the log ends at record {state.seq}, but records {state.seq + 1}..{last} follow",
            record=state.seq + 1,
        )
    else:
        if last > 0 and prev_hash is not None and state.head_hash != prev_hash:
            v.broken_link(last, f"head mismatch: record {last} does not hash to the head hash in meta")
        if not gap and state.frontier != frontier:
            v.problem("meta: the Merkle frontier does not match the records")
        if state.ckpt_size and kv.get(TABLE_CHECKPOINTS, _seq_key(state.ckpt_size)) is None:
            v.problem(
                f"meta names checkpoint {state.ckpt_size} as the latest, but it is missing", checkpoint=state.ckpt_size
            )
        if state.ckpt_size < last:
            report.notes.append(
                f"records {state.ckpt_size + 1}..{last} are not covered by a signed checkpoint yet (maintenance signs "
                "them a minute after the last checkpoint; `audit export-checkpoint` signs them now)"
            )
    while next_ckpt is not None:
        v.problem(
            f"checkpoint {next_ckpt.size} is beyond the end of the log ({last} records): truncated",
            record=last + 1,
            checkpoint=next_ckpt.size,
        )
        next_ckpt = advance_ckpt()
    if trusted is not None:
        if trusted.size > last:
            v.problem(
                f"truncated: the trusted checkpoint covers {trusted.size} records, the log has {last}",
                record=last + 1,
                checkpoint=trusted.size,
            )
        elif not trusted_compared:
            v.problem(
                f"the trusted checkpoint (size {trusted.size}) cannot be checked: records before it are missing",
                checkpoint=trusted.size,
            )
    if progress is not None:
        progress(n, total)

    candidates = list(v.bad_records)
    from_links = v.first_bad_from_links()
    if from_links is not None:
        candidates.append(from_links)
    report.first_bad = min(candidates) if candidates else None
    report.first_bad_checkpoint = min(v.bad_checkpoints) if v.bad_checkpoints else None
    return report


__all__ = [
    "ADDRESS_FIELDS",
    "AUDIT_RECORD_BYTES_MAX",
    "CHECKPOINT_FORMAT",
    "CLOCK_LEAD_MAX_MS",
    "META_STATE",
    "TABLE_AUDIT",
    "TABLE_CHECKPOINTS",
    "TABLE_META",
    "ZERO_HASH",
    "AuditHead",
    "AuditLog",
    "Checkpoint",
    "ComplianceFold",
    "MessageLock",
    "VerifyReport",
    "canonical",
    "checkpoints",
    "decode_record",
    "derive_hmac_key",
    "event",
    "frontier_push",
    "frontier_root",
    "head",
    "latest_checkpoint",
    "leaf_hash",
    "node_hash",
    "query",
    "records",
    "signed_by",
    "signed_message",
    "tail",
    "validate_fields",
    "verify",
]
