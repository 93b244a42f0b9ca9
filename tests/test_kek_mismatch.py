"""A node given another key-encryption key (KEK) than its cluster: the KEK fingerprint its Raft
messages carry makes the other nodes refuse it (and it them), so it can neither lead nor apply
entries whose keys it cannot open; and a key provider with only wrap/unwrap gets clear errors."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import mqstore
import mqstore.testing.secure as secure
from mqstore.client import Client
from mqstore.codec import RecordType
from mqstore.config import parse as real_parse
from mqstore.crypto import AesKeyProvider, FileKeyProvider, create_key_file, kek_fingerprint, read_key_file
from mqstore.errors import InvalidArgument, WrongKey
from mqstore.node.raftlog import record_to_entry
from mqstore.node.replica import Applier
from mqstore.store import LogStore
from mqstore.testing.secure import InProcessCluster

# --- the fingerprint ------------------------------------------------------------------------------


def test_kek_fingerprint_names_the_key_without_revealing_it(tmp_path: Path) -> None:
    path = create_key_file(tmp_path / "a.key")
    kek = read_key_file(path)
    fp = kek_fingerprint(FileKeyProvider(path))
    assert len(fp) == 16
    assert fp == hmac.new(kek, b"mqstore kek fingerprint v1", hashlib.sha256).digest()[:16]
    assert fp == kek_fingerprint(AesKeyProvider(kek))  # the same KEK, however it is held
    assert kek_fingerprint(FileKeyProvider(create_key_file(tmp_path / "b.key"))) != fp
    assert fp not in kek and kek[:16] != fp
    # A store knows its KEK's fingerprint once its key check passed.
    with LogStore(tmp_path / "st", key_file=path) as store:
        assert store.kek_fingerprint == fp


class WrapOnly:
    """A provider as the README allows: wrap/unwrap only (a KMS client); a wrong key raises the
    KMS's own error (here cryptography's InvalidTag, which has no message)."""

    def __init__(self, key: bytes) -> None:
        self.aead = AESGCM(key)

    def wrap(self, secret: bytes, context: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self.aead.encrypt(nonce, secret, context)

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        return self.aead.decrypt(wrapped[:12], wrapped[12:], context)


class SaysNo(WrapOnly):
    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        raise WrongKey("kms says no")


class Unreachable(WrapOnly):
    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        raise ConnectionError("kms.example.net: connection refused")


def test_a_provider_without_a_fingerprint_gives_none_and_a_bad_one_is_refused() -> None:
    assert kek_fingerprint(WrapOnly(b"k" * 32)) == b""

    class Bad(WrapOnly):
        def fingerprint(self) -> bytes:
            return b"x"

    with pytest.raises(InvalidArgument, match="fingerprint"):
        kek_fingerprint(Bad(b"k" * 32))


def test_a_wrap_unwrap_provider_with_the_wrong_key_gets_wrong_key_errors(tmp_path: Path) -> None:
    store = mqstore.open(tmp_path / "st", key_provider=WrapOnly(b"k" * 32), background=False)
    mid = store.enqueue(mail_from="a@b.c", recipients=["x@y.z"], data=b"hello", namespace="fin")
    store.close()
    with mqstore.open(tmp_path / "st", key_provider=WrapOnly(b"k" * 32), background=False) as again:
        assert again.get(mid).data == b"hello"
    # The provider's own error (InvalidTag, no message), no description attribute: WrongKey.
    with pytest.raises(WrongKey, match=r"the key-encryption key from WrapOnly is not the one store .* was created"):
        mqstore.open(tmp_path / "st", key_provider=WrapOnly(b"W" * 32), background=False)
    # A provider raising WrongKey itself, without a description: no AttributeError.
    with pytest.raises(WrongKey, match=r"from SaysNo is not the one store"):
        mqstore.open(tmp_path / "st", key_provider=SaysNo(b"W" * 32), background=False)
    # Any other error of the provider: WrongKey too, saying what the provider said.
    with pytest.raises(WrongKey, match=r"ConnectionError: kms\.example\.net: connection refused"):
        mqstore.open(tmp_path / "st", key_provider=Unreachable(b"k" * 32), background=False)


# --- a replica applying an entry its KEK cannot open ----------------------------------------------


def test_a_replica_whose_kek_does_not_open_an_entry_blames_its_key_file(tmp_path: Path) -> None:
    """Without fingerprints (an older peer, a KMS provider) entries sealed under the cluster's
    KEK still reach a node with another: its error names its key_file, not its store."""
    leader = mqstore.open(tmp_path / "leader", key_file=create_key_file(tmp_path / "cluster.key"), background=False)
    leader.enqueue(mail_from="a@b.c", recipients=["x@y.z"], data=b"secret", namespace="fin")
    records = [r for r in leader.log.iter_records() if r.type in (RecordType.KEY, RecordType.ENQUEUE)]
    leader.close()
    assert {r.type for r in records} == {RecordType.KEY, RecordType.ENQUEUE}
    own = create_key_file(tmp_path / "own.key")
    replica = mqstore.open(tmp_path / "replica", key_file=own, background=False)
    try:
        applier = Applier(replica.log)
        applier.counters = replica._counters
        entries = [record_to_entry(r) for r in records]
        with pytest.raises(WrongKey) as err:
            replica.log.write(lambda ctx: applier.apply(ctx, entries))
        text = str(err.value)
        assert f"key file {own}" in text and "namespace 'fin'" in text
        assert "this node's key_file is not the cluster's KEK" in text
        assert "store was created with a different key" not in text
    finally:
        replica.close()


# --- a 3-node cluster whose node 3 has its own KEK ------------------------------------------------


def test_a_node_with_another_kek_neither_leads_nor_applies_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Node 3 got `keys new-kek` instead of a copy of the cluster's key file. It used to win
    elections (its namespace keys then crashed nodes 1 and 2 on every restart) or crash at its
    first applied enqueue; now nodes 1 and 2 keep serving and node 3 stays out, saying why."""
    other = create_key_file(tmp_path / "node3-own.key")

    def parse(data: dict[str, Any]) -> Any:
        if data["node_id"] == 3:
            data = {**data, "key_file": str(other)}  # the operator's mistake
        return real_parse(data)

    monkeypatch.setattr(secure, "parse", parse)
    caplog.set_level(logging.ERROR)
    cluster = InProcessCluster(tmp_path / "c", ["a", "b", "c"])
    try:
        node3 = cluster.servers[3].node
        assert cluster.configs[3].key_file == other
        leader = cluster.leader(among=[1, 2])
        start_applied = node3.applied_index
        client = Client([cluster.address(1), cluster.address(2)], timeout=20)
        try:
            ids = [client.enqueue(mail_from="a@b.c", recipients=["x@y.z"], data=b"Subject: m%d\r\n\r\nx" % i,
                                  namespace="fin") for i in range(3)]
            assert [client.get(mid).data for mid in ids] == [b"Subject: m%d\r\n\r\nx" % i for i in range(3)]
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:  # elections come and go: node 3 never wins one
                assert not node3.is_leader
                time.sleep(0.05)
            ids.append(client.enqueue(mail_from="a@b.c", recipients=["x@y.z"], data=b"later", namespace="fin"))
            assert client.get(ids[-1]).data == b"later"
        finally:
            client.close()
        assert leader.node.applied_index > start_applied
        assert not node3.failed.is_set()  # it did not crash on an entry it cannot open...
        assert node3.applied_index == start_applied  # ...because it was given none
        for i in (1, 2):
            assert not cluster.servers[i].node.failed.is_set()
        assert "node 3 uses a different key-encryption key than this node" in caplog.text  # nodes 1, 2
        assert "uses a different key-encryption key than this node (node 3" in caplog.text  # node 3's side
        assert "every node of a cluster needs the same key_file" in caplog.text
    finally:
        cluster.close()
