"""The audit log: RFC 6962 hashing, checkpoints, tamper detection, determinism, fail-closed writes."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from mqstore.compliance.audit import (
    META_STATE,
    TABLE_AUDIT,
    TABLE_CHECKPOINTS,
    TABLE_META,
    AuditLog,
    Checkpoint,
    canonical,
    checkpoints,
    event,
    frontier_push,
    frontier_root,
    head,
    latest_checkpoint,
    leaf_hash,
    node_hash,
    query,
    records,
    tail,
    verify,
)
from mqstore.compliance.signing import (
    create_signing_key,
    key_id,
    load_or_create_signing_key,
    public_key_from_hex,
    public_key_hex,
    read_signing_key,
)
from mqstore.crypto import create_key_file
from mqstore.errors import InvalidArgument, KeyFileError
from mqstore.queue.kv import KV, LmdbKV, MemoryKV

SIGNER = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
FORGER = Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))
HMAC_KEY = b"k" * 32
_U64 = struct.Struct(">Q")

# --- RFC 6962 reference --------------------------------------------------------------------------

# The certificate-transparency reference vectors (C++ merkle_tree_test, also used by trillian):
# leaf data, and the tree heads of the first n leaves.
CT_LEAVES = [
    bytes.fromhex(h)
    for h in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f")
]
CT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def reference_root(leaves: list[bytes]) -> bytes:
    """RFC 6962 section 2.1, written as the RFC says it (recursive, no cleverness)."""
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(b"\x01" + reference_root(leaves[:k]) + reference_root(leaves[k:])).digest()


def incremental_root(leaves: list[bytes]) -> bytes:
    frontier: list[bytes] = []
    for i, leaf in enumerate(leaves):
        frontier_push(frontier, i, leaf_hash(leaf))
    return frontier_root(frontier)


def test_rfc6962_known_vectors() -> None:
    for n in range(len(CT_LEAVES) + 1):
        assert reference_root(CT_LEAVES[:n]).hex() == CT_ROOTS[n]
        assert incremental_root(CT_LEAVES[:n]).hex() == CT_ROOTS[n]
    assert leaf_hash(b"").hex() == CT_ROOTS[1]
    assert node_hash(leaf_hash(b""), leaf_hash(b"\x00")).hex() == CT_ROOTS[2]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=12), max_size=150))
def test_incremental_root_equals_recursive_root(leaves: list[bytes]) -> None:
    frontier: list[bytes] = []
    assert frontier_root(frontier) == reference_root([])
    for i, leaf in enumerate(leaves):
        frontier_push(frontier, i, leaf_hash(leaf))
        assert len(frontier) == (i + 1).bit_count()  # O(log n) state
        assert frontier_root(frontier) == reference_root(leaves[: i + 1])


# --- backends ------------------------------------------------------------------------------------


class LmdbBackend:
    """A real LMDB environment with the audit tables (and a mutation table for fail-closed tests)."""

    def __init__(self, path: Path) -> None:
        self.env = lmdb.open(str(path), max_dbs=8, map_size=64 * 1024 * 1024, sync=False, metasync=False)
        self.dbs = {name: self.env.open_db(name) for name in (TABLE_AUDIT, TABLE_CHECKPOINTS, TABLE_META, b"messages")}

    @contextlib.contextmanager
    def write(self) -> Iterator[KV]:
        with self.env.begin(write=True) as txn:
            yield LmdbKV(txn, self.dbs)

    @contextlib.contextmanager
    def read(self) -> Iterator[KV]:
        with self.env.begin() as txn:
            yield LmdbKV(txn, self.dbs)

    def tables(self) -> dict[bytes, dict[bytes, bytes]]:
        out: dict[bytes, dict[bytes, bytes]] = {}
        with self.read() as kv:
            for name in self.dbs:
                data = dict(kv.scan(name, b""))
                if data:
                    out[name] = data
        return out

    def close(self) -> None:
        self.env.close()


class MemoryBackend:
    def __init__(self) -> None:
        self.kv = MemoryKV()

    @contextlib.contextmanager
    def write(self) -> Iterator[KV]:
        yield self.kv

    read = write

    def tables(self) -> dict[bytes, dict[bytes, bytes]]:
        return self.kv.tables()

    def close(self) -> None:
        pass


Backend = LmdbBackend | MemoryBackend


@pytest.fixture(params=["memory", "lmdb"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    b: Backend = MemoryBackend() if request.param == "memory" else LmdbBackend(tmp_path / "env")
    try:
        yield b
    finally:
        b.close()


def fields_for(log: AuditLog, i: int) -> dict[str, Any]:
    return event(
        op="delete" if i % 3 == 0 else "hold",
        target=f"msg-{i:04d}",
        outcome="denied" if i % 3 == 0 else "allowed",
        reason="retention: COMPLIANCE until 2031-01-01" if i % 3 == 0 else None,
        actor=f"user{i % 4}",
        auth="mtls",
        source="10.0.0.7:5544",
        node=1,
        site="fra1",
        wall_ms=1_700_000_000_000 + i,
        bypass=i % 5 == 0,
        bypass_reason="ticket OPS-17" if i % 5 == 0 else None,
        before={"mode": "GOVERNANCE", "retain_until": 1_900_000_000_000, "holds": []},
        after={"mode": "GOVERNANCE", "retain_until": 1_900_000_000_000, "holds": [f"case-{i}"]},
        recipient=log.hmac_address(f"Rcpt{i}@Example.org"),
    )


def fill(
    b: Backend,
    n: int,
    signer: Ed25519PrivateKey | None = SIGNER,
    every: int = 4,
    change: Callable[[int, dict[str, Any]], None] | None = None,
) -> AuditLog:
    """``n`` appends, one transaction each, times 1000, 1010, ... (``change`` alters record i's fields)."""
    log = AuditLog(signer, HMAC_KEY, checkpoint_every=every, checkpoint_ms=10**9)
    for i in range(1, n + 1):
        fields = fields_for(log, i)
        if change is not None:
            change(i, fields)
        with b.write() as kv:
            assert log.append(kv, fields, 1000 + 10 * i) == i
    return log


def check(b: Backend, trusted: Checkpoint | None = None, public: Any = "real") -> Any:
    key = SIGNER.public_key() if public == "real" else public
    with b.read() as kv:
        return verify(kv, key, trusted)


def raw(b: Backend, seq: int) -> bytes:
    with b.read() as kv:
        data = kv.get(TABLE_AUDIT, _U64.pack(seq))
    assert data is not None
    return data


def put_raw(b: Backend, seq: int, data: bytes) -> None:
    with b.write() as kv:
        kv.put(TABLE_AUDIT, _U64.pack(seq), data)


def export(b: Backend, log: AuditLog) -> Checkpoint:
    with b.read() as kv:
        ckpt = log.export_checkpoint(kv)
    assert ckpt is not None
    return Checkpoint.from_json(ckpt.to_json())  # through the file format


# --- writing -------------------------------------------------------------------------------------


def test_clean_log_verifies(backend: Backend) -> None:
    log = fill(backend, 22)
    report = check(backend, export(backend, log))
    assert report.ok, report.problems
    assert report.records_checked == 22 and report.head_seq == 22
    assert report.checkpoints_checked == 5 and report.signatures_checked == 5
    assert report.first_bad is None and report.first_bad_checkpoint is None
    with backend.read() as kv:
        rows = records(kv)
        assert [r["seq"] for r in rows] == list(range(1, 23))
        assert rows[0]["prev"] == "0" * 64
        for a, b in itertools.pairwise(rows):
            assert b["prev"] == hashlib.sha256(canonical(a)).hexdigest()
        assert head(kv).seq == 22 and head(kv).hash == hashlib.sha256(raw(backend, 22)).hexdigest()
        # every stored root is the RFC 6962 root of the stored record bytes
        leaves = [raw(backend, i) for i in range(1, 23)]
        for ckpt in checkpoints(kv):
            assert ckpt.root == reference_root(leaves[: ckpt.size]).hex()
            assert ckpt.signature_problem(SIGNER.public_key()) is None
        assert report.root == reference_root(leaves).hex()


def test_empty_log_verifies() -> None:
    kv = MemoryKV()
    report = verify(kv, SIGNER.public_key())
    assert report.ok and report.records_checked == 0 and head(kv).seq == 0
    assert latest_checkpoint(kv) is None


def test_records_are_canonical_json_with_hmac_addresses() -> None:
    b = MemoryBackend()
    log = fill(b, 3)
    data = raw(b, 1)
    obj = json.loads(data)
    assert data == json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    assert obj["seq"] == 1 and obj["time"] == 1010 and obj["outcome"] == "allowed"
    assert obj["recipient"] == log.hmac_address("rcpt1@example.org")
    assert b"@" not in data.replace(b"ticket", b"")  # no plain address anywhere
    assert obj["before"]["mode"] == "GOVERNANCE" and obj["after"]["holds"] == ["case-1"]


def test_checkpoints_every_n_records(backend: Backend) -> None:
    fill(backend, 13, every=4)
    with backend.read() as kv:
        assert [c.size for c in checkpoints(kv)] == [4, 8, 12]
        latest = latest_checkpoint(kv)
        assert latest is not None and latest.size == 12 and latest.time == 1000 + 10 * 12


def test_checkpoints_every_t_ms() -> None:
    kv = MemoryKV()
    log = AuditLog(SIGNER, HMAC_KEY, checkpoint_every=10**6, checkpoint_ms=100)
    # times 0, 30, ..., 300: the timer starts at the first record (0), then restarts at each checkpoint
    for i in range(11):
        log.append(kv, {"op": "x"}, 30 * i)
    assert [(c.size, c.time) for c in checkpoints(kv)] == [(5, 120), (9, 240)]
    assert log.tick(kv, 300) is None  # 60 ms since the last checkpoint
    ckpt = log.tick(kv, 340)
    assert ckpt is not None and (ckpt.size, ckpt.time) == (11, 340)
    assert log.tick(kv, 10_000) is None  # nothing new to cover
    assert log.checkpoint(kv, 10_000) is None
    log.append(kv, {"op": "x"}, 10_000)  # long after the last one: checkpoint 12
    log.append(kv, {"op": "x"}, 10_010)
    forced = log.checkpoint(kv, 10_020)  # e.g. before exporting one
    assert forced is not None and (forced.size, forced.time) == (13, 10_020)
    assert [c.size for c in checkpoints(kv)] == [5, 9, 11, 12, 13]
    report = verify(kv, SIGNER.public_key())
    assert report.ok, report.problems
    assert report.checkpoints_checked == 5


def test_verify_notes_the_records_no_checkpoint_covers_yet() -> None:
    kv = MemoryKV()
    log = AuditLog(SIGNER, HMAC_KEY, checkpoint_every=4, checkpoint_ms=100)
    for i in range(6):
        log.append(kv, {"op": "x"}, i)
    report = verify(kv, SIGNER.public_key(), checkpoint_every=4, checkpoint_ms=100)
    assert report.ok
    assert any("records 5..6 are not covered by a signed checkpoint yet" in n for n in report.notes), report.notes
    assert log.tick(kv, 200) is not None
    report = verify(kv, SIGNER.public_key(), checkpoint_every=4, checkpoint_ms=100)
    assert report.ok and not any("not covered" in n for n in report.notes), report.notes


def test_a_node_adopting_another_nodes_log_signs_its_checkpoints_that_match() -> None:
    """A snapshot brings another node's checkpoints: the receiving node signs each one again with
    its own key, but only where its records hash to the checkpoint's root."""
    kv = MemoryKV()
    sender = AuditLog(FORGER, HMAC_KEY, checkpoint_every=4, checkpoint_ms=10**9)
    for i in range(10):
        sender.append(kv, {"op": "x"}, 1000 + i)
    assert [c.size for c in checkpoints(kv)] == [4, 8]
    assert not verify(kv, SIGNER.public_key(), checkpoint_every=4, checkpoint_ms=10**9).ok  # another key
    # the copy's checkpoint 8 does not match its records (a record changed on the way)
    (key, data), = [(k, v) for k, v in kv.scan(TABLE_AUDIT, b"") if k == _U64.pack(6)]
    kv.put(TABLE_AUDIT, key, data.replace(b'"x"', b'"y"'))
    receiver = AuditLog(SIGNER, HMAC_KEY, checkpoint_every=4, checkpoint_ms=10**9)
    assert receiver.adopt_checkpoints(kv) == 1
    by_size = {c.size: c for c in checkpoints(kv)}
    assert by_size[4].key_id == key_id(SIGNER.public_key())
    assert by_size[4].signature_problem(SIGNER.public_key()) is None
    assert by_size[8].key_id == key_id(FORGER.public_key())  # left as it was: verify reports it
    assert receiver.adopt_checkpoints(kv) == 0  # nothing more it can sign


def test_unsigned_checkpoints_are_reported_when_a_key_is_expected() -> None:
    b = MemoryBackend()
    fill(b, 8, signer=None)
    report = verify(b.kv, None)
    assert report.ok and any("not checked" in note for note in report.notes)
    report = check(b)
    assert not report.ok and report.first_bad_checkpoint == 4
    assert "checkpoint 4: it is not signed" in report.problems


def test_bad_fields_write_nothing() -> None:
    kv = MemoryKV()
    log = AuditLog(SIGNER, HMAC_KEY)
    bad: list[dict[str, Any]] = [
        {"ratio": 0.5},
        {"seq": 7},
        {"time": 1},
        {"nested": {"deep": [1, {"x": float("nan")}]}},
        {"recipient": "alice@example.org"},
        {"recipients": [log.hmac_address("a@b.c"), "bob@example.org"]},
        {"blob": b"bytes"},
        {"big": 2**64},
        {"": 1},
        {"s": "\ud800"},
    ]
    for fields in bad:
        with pytest.raises(InvalidArgument):
            log.append(kv, fields, 1000)
    assert kv.tables() == {}
    with pytest.raises(InvalidArgument, match="reason"):
        event(op="delete", target="m", outcome="denied", actor="a", auth="mtls", source="cli")
    with pytest.raises(InvalidArgument, match="bypass"):
        event(op="delete", target="m", outcome="allowed", actor="a", auth="mtls", source="cli", bypass=True)
    with pytest.raises(InvalidArgument):
        event(op="delete", target="m", outcome="maybe", actor="a", auth="mtls", source="cli")


def test_time_never_goes_backwards() -> None:
    kv = MemoryKV()
    log = AuditLog(SIGNER, HMAC_KEY)
    log.append(kv, {"op": "a"}, 5000)
    before = kv.tables()
    with pytest.raises(InvalidArgument, match="backwards"):
        log.append(kv, {"op": "b"}, 4999)
    assert kv.tables() == before
    assert log.append(kv, {"op": "b"}, 5000) == 2  # equal times are fine


def test_hmac_address() -> None:
    log = AuditLog(SIGNER, HMAC_KEY)
    value = log.hmac_address("Alice@Example.ORG")
    assert value == log.hmac_address("alice@example.org")
    assert value.startswith("hmac:") and len(value) == 5 + 64
    assert value != AuditLog(SIGNER, b"x" * 32).hmac_address("alice@example.org")
    assert value != log.hmac_address("bob@example.org")
    with pytest.raises(InvalidArgument):
        AuditLog(SIGNER, b"short")


def test_reading_records_tail_and_query() -> None:
    b = MemoryBackend()
    fill(b, 30)
    assert [r["seq"] for r in records(b.kv, after=10, limit=5)] == [11, 12, 13, 14, 15]
    assert [r["seq"] for r in tail(b.kv, 3)] == [28, 29, 30]
    denied = query(b.kv, where={"outcome": "denied"})
    assert [r["seq"] for r in denied] == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    assert [r["seq"] for r in query(b.kv, where={"actor": "user1"}, since_ms=1100, until_ms=1200)] == [13, 17]
    assert records(b.kv, after=30) == []


def test_determinism_same_appends_same_bytes(tmp_path: Path) -> None:
    a, c = MemoryBackend(), MemoryBackend()
    fill(a, 37, every=5)
    fill(c, 37, every=5)
    assert a.tables() == c.tables()
    lm = LmdbBackend(tmp_path / "env")
    try:
        fill(lm, 37, every=5)
        assert lm.tables() == a.tables()  # a replica on LMDB writes the same bytes as one in memory
    finally:
        lm.close()
    assert set(a.tables()) == {TABLE_AUDIT, TABLE_CHECKPOINTS, TABLE_META}
    assert list(a.tables()[TABLE_META]) == [META_STATE]


# --- fail closed ---------------------------------------------------------------------------------


def test_abort_after_append_leaves_no_trace(tmp_path: Path) -> None:
    b = LmdbBackend(tmp_path / "env")
    try:
        log = fill(b, 3, every=4)
        before = b.tables()

        class Refused(Exception):
            pass

        # The caller's mutation and its audit record share one transaction; the mutation fails
        # after the audit append (say, the enforcement check said no): the record goes too.
        with pytest.raises(Refused), b.write() as kv:
            kv.put(b"messages", b"m1", b"deleted")
            log.append(kv, fields_for(log, 4), 2000)  # would also write checkpoint 4
            raise Refused
        assert b.tables() == before
        with b.write() as kv:
            assert log.append(kv, fields_for(log, 4), 2000) == 4
        assert check(b).ok
    finally:
        b.close()


def test_audit_write_failure_means_no_mutation(tmp_path: Path) -> None:
    b = LmdbBackend(tmp_path / "env")
    try:
        log = fill(b, 2)

        class FailingAuditKV:
            """Injects a failure into the audit table write (disk full, map full, ...)."""

            def __init__(self, inner: KV) -> None:
                self.inner = inner

            def get(self, table: bytes, key: bytes) -> bytes | None:
                return self.inner.get(table, key)

            def put(self, table: bytes, key: bytes, value: bytes) -> None:
                if table == TABLE_AUDIT:
                    raise lmdb.MapFullError("injected")
                self.inner.put(table, key, value)

            def delete(self, table: bytes, key: bytes) -> bool:
                return self.inner.delete(table, key)

            def scan(self, table: bytes, start: bytes, stop: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
                return self.inner.scan(table, start, stop)

        def mutate(kv: KV) -> None:  # what the state machine does: audit, then apply, one transaction
            log.append(kv, fields_for(log, 3), 5000)
            kv.put(b"messages", b"m1", b"retention shortened")

        before = b.tables()
        with pytest.raises(lmdb.MapFullError), b.write() as kv:
            mutate(FailingAuditKV(kv))
        assert b.tables() == before
        with b.read() as kv:
            assert kv.get(b"messages", b"m1") is None
        with b.write() as kv:
            mutate(kv)
        with b.read() as kv:
            assert kv.get(b"messages", b"m1") == b"retention shortened" and head(kv).seq == 3
    finally:
        b.close()


# --- tampering -----------------------------------------------------------------------------------

N = 14  # checkpoints at 4, 8, 12; records 13 and 14 after the last one


@pytest.mark.parametrize("k", [1, 2, 7, 8, 13, N])
def test_flip_a_byte_of_record_k_names_k(k: int) -> None:
    b = MemoryBackend()
    fill(b, N)
    original = raw(b, k)
    for position in range(len(original)):
        for mask in (0x01, 0x20, 0x80):
            tampered = bytearray(original)
            tampered[position] ^= mask
            put_raw(b, k, bytes(tampered))
            report = check(b)
            assert not report.ok
            assert report.first_bad == k, (position, mask, report.problems)
    put_raw(b, k, original)
    assert check(b).ok


def test_flip_a_byte_on_lmdb(backend: Backend) -> None:
    fill(backend, N)
    data = bytearray(raw(backend, 6))
    data[data.index(b'"outcome":"') + 11] ^= 0x01  # "allowed" -> "`llowed": still valid JSON
    put_raw(backend, 6, bytes(data))
    report = check(backend)
    assert report.first_bad == 6
    assert "record 7: prev does not match the hash of record 6 (record 6 or 7 was changed)" in report.problems
    assert report.first_bad_checkpoint == 8  # the checkpoint covering it no longer matches


def test_changing_the_prev_field_names_the_changed_record() -> None:
    b = MemoryBackend()
    fill(b, N)
    obj = json.loads(raw(b, 9))
    obj["prev"] = "ab" * 32
    put_raw(b, 9, canonical(obj))  # breaks the links on both sides of record 9
    assert check(b).first_bad == 9


@pytest.mark.parametrize("k", [1, 5, 13])
def test_delete_record_k(backend: Backend, k: int) -> None:
    fill(backend, N)
    with backend.write() as kv:
        assert kv.delete(TABLE_AUDIT, _U64.pack(k))
    report = check(backend)
    assert not report.ok and report.first_bad == k
    assert f"record {k} is missing" in report.problems


def test_delete_a_run_of_records() -> None:
    b = MemoryBackend()
    fill(b, N)
    for k in (5, 6, 7):
        b.kv.delete(TABLE_AUDIT, _U64.pack(k))
    report = check(b)
    assert report.first_bad == 5 and "records 5..7 are missing" in report.problems


@pytest.mark.parametrize(("j", "k"), [(3, 4), (4, 5), (1, 2), (2, 11), (13, 14)])
def test_swap_two_records(backend: Backend, j: int, k: int) -> None:
    fill(backend, N)
    a, c = raw(backend, j), raw(backend, k)
    put_raw(backend, j, c)
    put_raw(backend, k, a)
    report = check(backend)
    assert not report.ok and report.first_bad == j, report.problems


def test_swap_two_records_and_renumber_them() -> None:
    # A smarter attacker also rewrites the seq fields so each record matches its key.
    b = MemoryBackend()
    fill(b, N)
    a, c = json.loads(raw(b, 6)), json.loads(raw(b, 7))
    a["seq"], c["seq"] = 7, 6
    put_raw(b, 6, canonical(c))
    put_raw(b, 7, canonical(a))
    assert check(b).first_bad == 6


def test_truncate_the_tail(backend: Backend) -> None:
    log = fill(backend, N)
    trusted = export(backend, log)
    assert trusted.size == 12
    with backend.write() as kv:
        for seq in (10, 11, 12, 13, 14):
            kv.delete(TABLE_AUDIT, _U64.pack(seq))
    report = check(backend)  # no trusted checkpoint: the head in meta and the stored checkpoint tell
    assert not report.ok and report.first_bad == 10
    assert (
        "head mismatch: meta says the log ends at record 14, the log ends at 9: records 10..14 are missing (truncated)"
        in report.problems
    )
    assert "checkpoint 12 is beyond the end of the log (9 records): truncated" in report.problems
    report = check(backend, trusted)
    assert "truncated: the trusted checkpoint covers 12 records, the log has 9" in report.problems
    assert report.first_bad == 10 and report.first_bad_checkpoint == 12


def test_truncate_the_tail_and_cover_the_tracks() -> None:
    # The attacker truncates, rewrites meta and drops the checkpoints past the cut: the result is
    # exactly what an honest shorter log looks like. Only a checkpoint exported earlier tells.
    long, short = MemoryBackend(), MemoryBackend()
    log = fill(long, N)
    fill(short, 9)
    assert check(short).ok  # indistinguishable on its own
    report = check(short, export(long, log))
    assert not report.ok
    assert report.problems == ["truncated: the trusted checkpoint covers 12 records, the log has 9"]
    assert report.first_bad == 10 and report.first_bad_checkpoint == 12


def forge(k: int, signer: Ed25519PrivateKey) -> MemoryBackend:
    """The log with record k's outcome changed and everything after recomputed and re-signed."""

    def change(i: int, fields: dict[str, Any]) -> None:
        if i == k:
            fields["outcome"], fields["reason"] = "allowed", None

    b = MemoryBackend()
    fill(b, N, signer=signer, change=change)
    return b


def test_forged_log_resigned_with_another_key() -> None:
    genuine = MemoryBackend()
    trusted = export(genuine, fill(genuine, N))
    forged = forge(6, FORGER)
    assert check(forged, public=FORGER.public_key()).ok  # internally consistent

    report = check(forged)  # the real public key: every checkpoint is signed by someone else
    assert not report.ok and report.first_bad_checkpoint == 4
    assert f"checkpoint 4: it is signed by another key (key id {key_id(FORGER)}, expected {key_id(SIGNER)})" in (
        report.problems
    )

    report = check(forged, trusted, public=None)  # the exported checkpoint's key is used
    assert not report.ok and report.first_bad_checkpoint == 4
    assert any(p.startswith("the trusted checkpoint (size 12) does not match") for p in report.problems)

    # with the forger's key as the log's key, its signatures check, but the rewritten records do not
    # hash to the trusted root (another key alone is no problem: on a cluster each node signs with
    # its own key, see tests/test_audit_trusted.py)
    report = check(forged, trusted, public=FORGER.public_key())
    assert not report.ok and report.first_bad_checkpoint == 12
    assert any(p.startswith("the trusted checkpoint (size 12) does not match") for p in report.problems)
    assert any(f"was signed by key {key_id(SIGNER)}, this log's checkpoints are checked with its own key "
               f"{key_id(FORGER)}" in n for n in report.notes), report.notes


def test_forged_log_with_the_real_key_is_caught_by_the_trusted_checkpoint() -> None:
    # Someone holding the signing key rewrites record 6 and re-signs: the chain and signatures are
    # consistent, but the checkpoint exported before the rewrite does not match.
    genuine = MemoryBackend()
    trusted = export(genuine, fill(genuine, N))
    forged = forge(6, SIGNER)
    assert check(forged).ok
    report = check(forged, trusted)
    assert not report.ok and report.first_bad_checkpoint == 12
    assert report.first_bad is None  # a consistent rewrite cannot be pinned to one record


def test_forged_trusted_checkpoint_is_refused() -> None:
    b = MemoryBackend()
    trusted = export(b, fill(b, N))
    bad = Checkpoint(trusted.size, "00" * 32, trusted.time, trusted.signature, trusted.key_id, trusted.public_key)
    report = check(b, bad)
    assert "the trusted checkpoint (size 12) is not valid: its signature does not verify" in report.problems


def test_tampered_checkpoint_and_meta() -> None:
    b = MemoryBackend()
    fill(b, N)
    ckpt_key = _U64.pack(8)
    original = b.kv.get(TABLE_CHECKPOINTS, ckpt_key)
    assert original is not None
    obj = json.loads(original)
    obj["time"] += 1
    b.kv.put(TABLE_CHECKPOINTS, ckpt_key, canonical(obj))
    report = check(b)
    assert report.first_bad_checkpoint == 8 and report.first_bad is None
    assert "checkpoint 8: its signature does not verify" in report.problems
    b.kv.put(TABLE_CHECKPOINTS, ckpt_key, original)

    state = b.kv.get(TABLE_META, META_STATE)
    assert state is not None
    b.kv.put(TABLE_META, META_STATE, state[:9] + bytes(32) + state[41:])  # the head hash
    report = check(b)
    assert (
        report.first_bad == N and "head mismatch: record 14 does not hash to the head hash in meta" in report.problems
    )


def test_verify_reports_progress() -> None:
    b = MemoryBackend()
    fill(b, 5)
    seen: list[tuple[int, int]] = []
    verify(b.kv, SIGNER.public_key(), progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (5, 5)


# --- checkpoints and keys ------------------------------------------------------------------------


def test_checkpoint_export_round_trip() -> None:
    b = MemoryBackend()
    log = fill(b, 8)
    ckpt = log.export_checkpoint(b.kv)
    assert ckpt is not None and ckpt.public_key == public_key_hex(SIGNER)
    text = ckpt.to_json()
    assert json.loads(text)["format"] == "mqstore-audit-checkpoint-v1"
    assert Checkpoint.from_json(text) == ckpt
    stored = latest_checkpoint(b.kv)
    assert (
        stored is not None
        and stored.public_key is None
        and stored.encode() == Checkpoint.decode(stored.encode()).encode()
    )
    message = b"mqstore-audit-checkpoint-v1\n8\n" + ckpt.root.encode() + b"\n1080"
    SIGNER.public_key().verify(bytes.fromhex(ckpt.signature), message)
    for bad in ("", "{}", '{"format":"x"}', text.replace('"size":8', '"size":0'), text.replace("}", ',"x":1}')):
        with pytest.raises(InvalidArgument):
            Checkpoint.from_json(bad)


def test_signing_key_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.key"
    key = load_or_create_signing_key(path, create=True)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert path.read_text().startswith("mqstore-audit-signing-v1:")
    assert public_key_hex(read_signing_key(path)) == public_key_hex(key)
    assert public_key_hex(load_or_create_signing_key(path, create=True)) == public_key_hex(key)  # no overwrite
    assert public_key_hex(public_key_from_hex(public_key_hex(key))) == public_key_hex(key)
    assert len(key_id(key)) == 32 and key_id(key) == hashlib.sha256(bytes.fromhex(public_key_hex(key))).hexdigest()[:32]
    with pytest.raises(KeyFileError, match="already exists"):
        create_signing_key(path)
    with pytest.raises(KeyFileError, match="does not exist"):
        load_or_create_signing_key(tmp_path / "missing.key", create=False)
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="every user"):
        read_signing_key(path)
    os.chmod(path, 0o620)
    with pytest.raises(KeyFileError, match="writable by its group"):
        read_signing_key(path)
    os.chmod(path, 0o640)
    read_signing_key(path)  # group read is allowed, as for the KEK file
    kek = create_key_file(tmp_path / "kek.key")
    with pytest.raises(KeyFileError, match="separate"):
        read_signing_key(kek)
    bad = tmp_path / "bad.key"
    bad.write_text("mqstore-audit-signing-v1:zz\n")
    os.chmod(bad, 0o600)
    with pytest.raises(KeyFileError, match="hexadecimal"):
        read_signing_key(bad)


def test_replicas_with_the_same_key_sign_identically() -> None:
    a, c = MemoryBackend(), MemoryBackend()
    fill(a, 8, signer=Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
    fill(c, 8, signer=SIGNER)
    assert [x.signature for x in checkpoints(a.kv)] == [x.signature for x in checkpoints(c.kv)]


def test_deleted_record_before_the_trusted_checkpoint() -> None:
    b = MemoryBackend()
    trusted = export(b, fill(b, N))
    b.kv.delete(TABLE_AUDIT, _U64.pack(3))
    report = check(b, trusted)
    assert report.first_bad == 3 and report.first_bad_checkpoint == 4
    assert "the trusted checkpoint (size 12) cannot be checked: records before it are missing" in report.problems


def test_missing_meta_state_is_reported() -> None:
    b = MemoryBackend()
    fill(b, 5)
    b.kv.delete(TABLE_META, META_STATE)
    report = check(b)
    assert "meta has no audit state but the log has 5 records" in report.problems


def test_no_append_before_a_forced_checkpoint_time() -> None:
    kv = MemoryKV()
    log = AuditLog(SIGNER, HMAC_KEY)
    log.append(kv, {"op": "a"}, 1000)
    assert log.checkpoint(kv, 2000) is not None
    with pytest.raises(InvalidArgument, match="backwards"):
        log.append(kv, {"op": "b"}, 1500)  # would put a record after a checkpoint from its future
    log.append(kv, {"op": "b"}, 2000)
    assert verify(kv, SIGNER.public_key()).ok


def test_append_costs_the_same_at_any_size() -> None:
    """O(1) KV operations per append (O(log n) hashing): no scan, whatever the log's size."""

    class Counting(MemoryKV):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def get(self, table: bytes, key: bytes) -> bytes | None:
            self.ops.append("get")
            return super().get(table, key)

        def put(self, table: bytes, key: bytes, value: bytes) -> None:
            self.ops.append("put")
            super().put(table, key, value)

        def scan(self, table: bytes, start: bytes, stop: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
            self.ops.append("scan")
            return super().scan(table, start, stop)

    kv = Counting()
    log = AuditLog(SIGNER, HMAC_KEY, checkpoint_every=256)
    for i in range(1, 1025):
        kv.ops.clear()
        log.append(kv, {"op": "x", "i": i}, i)
        assert "scan" not in kv.ops
        assert kv.ops.count("get") == 2  # the state in meta, the (absent) record key
        assert kv.ops.count("put") == (3 if i % 256 == 0 else 2)  # record, state (+ checkpoint)
    state = kv.get(TABLE_META, META_STATE)
    assert state is not None and len(state) == 65 + 32 * (1024).bit_count()
    assert verify(kv, SIGNER.public_key()).ok


def _drop_checkpoints(kv: KV, keep: Callable[[int], bool] = lambda size: False) -> None:
    """What an attacker covering a rewrite does: delete checkpoints and make meta agree."""
    from mqstore.compliance.audit import _State

    kept = [c for c in checkpoints(kv) if keep(c.size)]
    for c in list(checkpoints(kv)):
        if not keep(c.size):
            kv.delete(TABLE_CHECKPOINTS, _U64.pack(c.size))
    state = _State.load(kv)
    first = records(kv, None, 1)[0]["time"]
    state.ckpt_size, state.ckpt_time = (kept[-1].size, kept[-1].time) if kept else (0, first)
    kv.put(TABLE_META, META_STATE, state.encode())


def test_a_rewritten_log_without_its_checkpoints_is_caught() -> None:
    """Record 6 rewritten (and the chain after it recomputed), every checkpoint deleted: the chain
    and the head agree, but the checkpoints the writer must have written are missing."""
    forged = forge(6, SIGNER)
    _drop_checkpoints(forged.kv)
    report = verify(forged.kv, SIGNER.public_key(), checkpoint_every=4, checkpoint_ms=10**9)
    assert not report.ok and report.first_bad_checkpoint == 4 and report.checkpoints_checked == 0
    assert report.problems[0] == ("checkpoint 4 is missing: one is written after record 4 (every 4 records); "
                                  "checkpoints were deleted")
    assert len(report.problems) == 3  # 4, 8, 12
    # an honest log too short for a checkpoint has none, and needs none
    short = MemoryBackend()
    fill(short, 3)
    assert verify(short.kv, SIGNER.public_key(), checkpoint_every=4, checkpoint_ms=10**9).ok


def test_a_deleted_timed_checkpoint_is_caught_and_forced_ones_restart_the_timer() -> None:
    kv = MemoryKV()
    log = AuditLog(SIGNER, HMAC_KEY, checkpoint_every=10**6, checkpoint_ms=100)
    for i in range(11):
        log.append(kv, {"op": "x"}, 30 * i)  # timed checkpoints at 5 (120 ms) and 9 (240 ms)
    assert log.checkpoint(kv, 320) is not None  # forced at 11: the next one is due 100 ms after it
    for t in (330, 400, 419, 420, 430):
        log.append(kv, {"op": "x"}, t)
    assert [c.size for c in checkpoints(kv)] == [5, 9, 11, 15]
    assert verify(kv, SIGNER.public_key(), checkpoint_every=10**6, checkpoint_ms=100).ok
    _drop_checkpoints(kv, keep=lambda size: size != 9)
    report = verify(kv, SIGNER.public_key(), checkpoint_every=10**6, checkpoint_ms=100)
    assert report.problems == ["checkpoint 9 is missing: one is written after record 9 (0.1 s after the previous "
                               "one); checkpoints were deleted"]
    assert report.first_bad_checkpoint == 9
