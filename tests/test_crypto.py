"""Compression and encryption: key files, the KEK check, HKDF, sealing, rotation, dictionaries."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

import mqstore.crypto.seal as seal_module
from mqstore.codec import Flags, Record, RecordType
from mqstore.crypto import AesKeyProvider, FileKeyProvider, KeyRing, Sealer, create_key_file, read_key_file
from mqstore.crypto.keyring import HKDF_SALT, HkdfExpander, KeyShredded, hkdf_expand_32, hkdf_extract
from mqstore.errors import DecryptionFailed, InvalidArgument, KeyFileError, UnknownKey, WrongKey
from mqstore.store import LogStore, NewMessage
from mqstore.testing.mail import MailFactory


def test_key_file_is_created_0600_and_read_back(tmp_path: Path) -> None:
    path = create_key_file(tmp_path / "k.key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(read_key_file(path)) == 32
    with pytest.raises(KeyFileError, match="already exists"):
        create_key_file(path)


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o660, 0o666])
def test_key_file_with_unsafe_mode_is_refused(tmp_path: Path, mode: int) -> None:
    path = create_key_file(tmp_path / "k.key")
    os.chmod(path, mode)
    with pytest.raises(KeyFileError, match="chmod 600"):
        read_key_file(path)


def test_group_readable_key_file_is_accepted(tmp_path: Path) -> None:
    path = create_key_file(tmp_path / "k.key")
    os.chmod(path, 0o640)
    assert len(read_key_file(path)) == 32


@pytest.mark.parametrize(
    "content, message",
    [(b"", "not an mqstore key file"), (b"mqstore-kek-v1:zz", "not hexadecimal"), (b"mqstore-kek-v1:00ff", "2 bytes")],
)
def test_malformed_key_file_is_refused(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "k.key"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError, match=message):
        read_key_file(path)


def test_missing_key_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        FileKeyProvider(tmp_path / "nope.key")


def test_hkdf_matches_rfc5869_implementation() -> None:
    for _ in range(20):
        ikm, info = os.urandom(32), os.urandom(16)
        expected = HKDF(algorithm=hashes.SHA256(), length=32, salt=HKDF_SALT, info=info).derive(ikm)
        assert hkdf_expand_32(hkdf_extract(ikm), info) == expected
        assert HkdfExpander(hkdf_extract(ikm)).expand_32(info) == expected


def test_wrong_kek_is_refused_before_anything_is_read(tmp_path: Path) -> None:
    path = tmp_path / "s"
    k1 = create_key_file(tmp_path / "k1.key")
    k2 = create_key_file(tmp_path / "k2.key")
    with LogStore(path, key_file=k1) as s:
        s.append_message(mail_from="a@example.org", recipients=["b@example.net"], data=b"x")
    with pytest.raises(WrongKey, match="not the one store"):
        LogStore(path, key_file=k2)
    with LogStore(path, key_file=k1) as s:  # and the right key still works
        assert s.read_message(s.last_index).data == b"x"


def test_wrapped_key_moved_to_another_id_does_not_unwrap() -> None:
    provider = AesKeyProvider(os.urandom(32))
    wrapped = provider.wrap(b"k" * 32, b"ns-key:\x00\x00\x00\x01default")
    with pytest.raises(WrongKey):
        provider.unwrap(wrapped, b"ns-key:\x00\x00\x00\x02default")


def _sealer() -> Sealer:
    ring = KeyRing(AesKeyProvider(os.urandom(32)))
    for ns in ("a", "b"):
        ring.apply(ring.new_key_event(ns, 0))
    return Sealer(ring)


def _record(rtype: int, sealed: tuple[int, int, int, bytes], index: int = 1) -> Record:
    flags, key_id, dict_id, payload = sealed
    return Record(rtype, flags, 0, index, key_id, dict_id, payload)


def test_seal_and_open_round_trip_compresses() -> None:
    sealer = _sealer()
    body = MailFactory(1).message(2048)
    sealed = sealer.seal(RecordType.ENQUEUE, "a", b"m" * 16, body)
    assert sealed.flags == Flags.COMPRESSED | Flags.ENCRYPTED
    assert len(sealed.payload) < len(body)
    assert body not in sealed.payload
    opened = sealer.open(_record(RecordType.ENQUEUE, sealed))
    assert opened == (b"m" * 16, "a", body)


def test_incompressible_payload_is_stored_uncompressed() -> None:
    sealer = _sealer()
    body = os.urandom(3000)
    sealed = sealer.seal(RecordType.ENQUEUE, "a", b"m" * 16, body)
    assert sealed.flags == Flags.ENCRYPTED and sealed.dict_id == 0
    assert sealer.open(_record(RecordType.ENQUEUE, sealed)).plaintext == body


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("count", [1, 5, 63, 64, 65, 300])
def test_a_batch_seals_each_message_in_order_whoever_compresses_it(
    count: int, workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # From 64 messages on, a batch is split between this thread and the compression pool's
    # threads (one share each; 1 on 2 cores, 3 on 4): every message must still come back sealed
    # under its own id and namespace, in the order given.
    monkeypatch.setattr(seal_module, "_POOL_WORKERS", workers)
    sealer = _sealer()
    mail = MailFactory(3)
    items = []
    incompressible = {i for i in range(count) if i % 7 == 3}
    for i in range(count):
        body = os.urandom(700) if i in incompressible else mail.message(512 + (37 * i) % 3000)
        extra = int(Flags.CONTEXT) if i % 5 == 0 else 0
        items.append((int(RecordType.ENQUEUE), "ab"[i % 2], i.to_bytes(16, "big"), body, extra))
    sealed = sealer.seal_many(items)
    assert len(sealed) == count
    nonces = set()
    for i, ((rtype, ns, mid, body, extra), one) in enumerate(zip(items, sealed, strict=True)):
        assert bool(one.flags & Flags.COMPRESSED) == (i not in incompressible)
        assert one.flags & Flags.CONTEXT == extra
        assert sealer.open(_record(rtype, one)) == (mid, ns, body)
        nonces.add(one.payload[18:30])  # after message id (16) and namespace ("a": 1 + 1)
    assert len(nonces) == count


def test_a_batch_with_a_bad_message_id_is_refused() -> None:
    sealer = _sealer()
    items = [(int(RecordType.ENQUEUE), "a", i.to_bytes(16, "big"), b"mail %d" % i * 40, 0) for i in range(100)]
    items[80] = (*items[80][:2], b"short", *items[80][3:])
    with pytest.raises(InvalidArgument, match="message id must be 16 bytes"):
        sealer.seal_many(items)


def test_payload_moved_to_another_message_id_fails_to_decrypt() -> None:
    sealer = _sealer()
    flags, key_id, dict_id, payload = sealer.seal(RecordType.ENQUEUE, "a", b"A" * 16, b"secret mail")
    moved = b"B" * 16 + payload[16:]  # claim to be message B
    with pytest.raises(DecryptionFailed, match="authentication failed for message"):
        sealer.open(Record(RecordType.ENQUEUE, flags, 0, 1, key_id, dict_id, moved))


def test_payload_relabelled_with_another_key_id_fails_to_decrypt() -> None:
    sealer = _sealer()
    ring = sealer.keyring
    ring.apply(ring.new_key_event("a", 0))  # rotation: key 3 for namespace a
    flags, key_id, dict_id, payload = sealer.seal(RecordType.ENQUEUE, "a", b"A" * 16, b"secret mail")
    assert key_id == 3
    with pytest.raises(DecryptionFailed):
        sealer.open(Record(RecordType.ENQUEUE, flags, 0, 1, 1, dict_id, payload))
    # Key 2 belongs to namespace b: refused before decryption is even tried.
    with pytest.raises(DecryptionFailed, match="belongs to"):
        sealer.open(Record(RecordType.ENQUEUE, flags, 0, 1, 2, dict_id, payload))


def test_flipped_header_flag_or_type_fails_to_decrypt() -> None:
    sealer = _sealer()
    flags, key_id, dict_id, payload = sealer.seal(RecordType.ENQUEUE, "a", b"A" * 16, b"hello " * 100)
    with pytest.raises(DecryptionFailed):
        sealer.open(Record(RecordType.ENQUEUE, Flags.ENCRYPTED, 0, 1, key_id, 0, payload))
    with pytest.raises(DecryptionFailed):
        sealer.open(Record(RecordType.BLOB, flags, 0, 1, key_id, dict_id, payload))


def test_tampered_ciphertext_fails_to_decrypt() -> None:
    sealer = _sealer()
    flags, key_id, dict_id, payload = sealer.seal(RecordType.ENQUEUE, "a", b"A" * 16, b"hello " * 100)
    bad = bytearray(payload)
    bad[-20] ^= 1
    with pytest.raises(DecryptionFailed):
        sealer.open(Record(RecordType.ENQUEUE, flags, 0, 1, key_id, dict_id, bytes(bad)))


def test_unknown_namespace_key_and_bad_level() -> None:
    sealer = _sealer()
    with pytest.raises(UnknownKey, match="has no key"):
        sealer.seal(RecordType.ENQUEUE, "zzz", b"A" * 16, b"x")
    with pytest.raises(InvalidArgument, match="zstd level"):
        Sealer(sealer.keyring, level=42)


def test_key_rotation_keeps_old_records_readable(store: LogStore) -> None:
    first = store.append_message(mail_from="a@example.org", recipients=["b@example.net"], data=b"one")
    old_key = store.read(first.index).key_id
    new_key = store.rotate_key("default")
    assert new_key != old_key
    second = store.append_message(mail_from="a@example.org", recipients=["b@example.net"], data=b"two")
    assert store.read(second.index).key_id == new_key
    assert store.read_message(first.index).data == b"one"
    assert store.read_message(second.index).data == b"two"


def test_keys_survive_reopen(store_path: Path, key_file: Path) -> None:
    with LogStore(store_path, key_file=key_file) as s:
        a = s.append_message(mail_from="a@example.org", recipients=["b@example.net"], data=b"one", namespace="n1")
        s.rotate_key("n1")
        b = s.append_message(mail_from="a@example.org", recipients=["b@example.net"], data=b"two", namespace="n1")
    with LogStore(store_path, key_file=key_file) as s:
        assert s.read_message(a.index).data == b"one"
        assert s.read_message(b.index).data == b"two"
        assert s.keyring.current_key_id("n1") == s.read(b.index).key_id


def test_trained_dictionary_is_pinned_by_id_and_survives_reopen(store_path: Path, key_file: Path) -> None:
    mail = MailFactory(7)
    samples = [mail.message(2048) for _ in range(300)]
    body = mail.message(2048)
    with LogStore(store_path, key_file=key_file) as s:
        plain = s.append_message(mail_from="a@example.org", recipients=["b@example.net"], data=body)
        dict_id = s.train_dictionary(samples, 16384)
        s.use_dictionary(dict_id)
        with_dict = s.append_message(mail_from="a@example.org", recipients=["b@example.net"], data=body)
        rec_plain, rec_dict = s.read(plain.index), s.read(with_dict.index)
        assert rec_plain.dict_id == 0 and rec_dict.dict_id == dict_id
        assert len(rec_dict.payload) < len(rec_plain.payload)
        s.use_dictionary(0)
        after = s.append_message(mail_from="a@example.org", recipients=["b@example.net"], data=body)
        assert s.read(after.index).dict_id == 0
        s.use_dictionary(dict_id)
    with LogStore(store_path, key_file=key_file) as s:
        assert s.sealer.dictionary_id == dict_id
        assert s.read_message(with_dict.index).data == body
        assert s.read_message(plain.index).data == body
    with pytest.raises(UnknownKey), LogStore(store_path, key_file=key_file) as s:
        s.use_dictionary(99)


def test_dictionary_training_refuses_bad_input(store: LogStore) -> None:
    with pytest.raises(InvalidArgument, match="samples"):
        store.train_dictionary([b"x"], 4096)
    with pytest.raises(InvalidArgument, match="list of bytes"):
        store.train_dictionary(["text"] * 20, 4096)  # type: ignore[list-item]
    assert store.last_index == 0


def test_no_plaintext_in_the_lmdb_files(store_path: Path, key_file: Path) -> None:
    subject = b"Subject: Quarterly results for the board, strictly confidential"
    recipient = "board.member.unique@example.net"
    with LogStore(store_path, key_file=key_file) as s:
        for i in range(50):
            s.append_messages(
                [NewMessage(mail_from="cfo@example.org", recipients=[recipient], data=subject + b"\r\n\r\nbody %d" % i)]
            )
    raw = (store_path / "data.mdb").read_bytes()
    assert subject not in raw
    assert b"Quarterly results" not in raw
    assert recipient.encode() not in raw
    assert b"cfo@example.org" not in raw


class FakeKms:
    """A stand-in for a KMS: the KEK never leaves it; it only wraps and unwraps on request."""

    def __init__(self) -> None:
        self._inner = AesKeyProvider(os.urandom(32), "fake KMS key arn:test")
        self.calls: list[str] = []

    @property
    def description(self) -> str:
        return "fake KMS key arn:test"

    def wrap(self, secret: bytes, context: bytes) -> bytes:
        self.calls.append("wrap")
        return self._inner.wrap(secret, context)

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        self.calls.append("unwrap")
        return self._inner.unwrap(wrapped, context)


def test_a_kms_style_key_provider_plugs_in(store_path: Path) -> None:
    kms = FakeKms()
    with LogStore(store_path, key_provider=kms) as s:
        a = s.append_message(mail_from="a@example.org", recipients=["b@example.net"], data=b"via kms")
    assert "wrap" in kms.calls
    assert not (store_path / "kek.key").exists()  # no key file when a provider is given
    kms.calls.clear()
    with LogStore(store_path, key_provider=kms) as s:
        assert s.read_message(a.index).data == b"via kms"
    assert "unwrap" in kms.calls
    with pytest.raises(WrongKey, match="fake KMS"):
        LogStore(store_path, key_provider=FakeKms())  # another KMS key does not open it


def test_a_shredded_key_gives_no_more_data_keys_even_cached_ones() -> None:
    ring = KeyRing(AesKeyProvider(os.urandom(32)))
    ring.apply(ring.new_key_event("n1", 0))
    ring.apply(ring.new_key_event("n2", 0))
    mid = os.urandom(16)
    first = ring.data_key(1, mid)
    assert ring.data_key(1, mid) == first == hkdf_expand_32(ring.prk(1), mid)  # cached or not: the same key
    other = ring.data_key(2, mid)
    ring.apply(ring.shred_event(1, 0))
    with pytest.raises(KeyShredded):
        ring.data_key(1, mid)
    assert ring.data_key(2, mid) == other  # other keys are untouched


def test_nonce_randomness_is_never_shared_with_a_forked_child() -> None:
    """Nonces and message ids come from a buffer of OS randomness; a child process after fork()
    must not hand out the bytes its parent will (one repeated nonce under a key breaks AES-GCM)."""
    from mqstore._proc import random_bytes

    seen = {random_bytes(12) for _ in range(50)}  # the buffer is filled and partly used
    assert len(seen) == 50
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(write_fd, b"".join(random_bytes(12) for _ in range(20)))
        finally:
            os._exit(0)
    os.close(write_fd)
    child = b""
    while chunk := os.read(read_fd, 4096):
        child += chunk
    os.close(read_fd)
    os.waitpid(pid, 0)
    parent = b"".join(random_bytes(12) for _ in range(20))
    assert len(child) == len(parent) == 240
    child_nonces = {child[i : i + 12] for i in range(0, 240, 12)}
    parent_nonces = {parent[i : i + 12] for i in range(0, 240, 12)}
    assert not child_nonces & parent_nonces and not child_nonces & seen
