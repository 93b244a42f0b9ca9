"""``recover --force-new-cluster`` and ``restore --config`` (``mqstore.ops.recover.reseed``) refuse a
data dir that is not the configured node's, with a clear error and nothing changed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import mqstore
from mqstore.config import NodeConfig, parse
from mqstore.crypto import create_key_file
from mqstore.errors import InvalidArgument
from mqstore.node.runtime import bootstrap
from mqstore.ops.recover import force_new_cluster, reseed


def _config(data_dir: Path, key: Path, node_id: int) -> NodeConfig:
    return parse({
        "node_id": node_id, "site": "a", "listen": "127.0.0.1:1", "data_dir": str(data_dir),
        "key_file": str(key), "insecure": True,
        "peers": [{"id": 9, "site": "b", "address": "127.0.0.1:2"}],
    })


def _fingerprint(path: Path) -> dict[str, str]:
    # LMDB's lock file is left out: any reader (opening a store to look at it) rewrites its reader
    # table, which holds no data of the store.
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())
            if p.is_file() and p.name != "lock.mdb"}


def test_an_embedded_store_cannot_become_a_cluster_node(tmp_path: Path) -> None:
    key = create_key_file(tmp_path / "kek.key")
    with mqstore.open(tmp_path / "store", key_file=key, background=False) as store:
        store.enqueue("a@example.org", ["b@example.net"], b"x")
    before = _fingerprint(tmp_path / "store")
    config = _config(tmp_path / "store", key, 1)
    with pytest.raises(InvalidArgument, match="not a cluster node's data dir"):
        force_new_cluster(config, "test")
    with pytest.raises(InvalidArgument, match="holds an embedded store"):
        reseed(config, "new", action="seed-from-backup", reason="test")
    assert _fingerprint(tmp_path / "store") == before
    assert not (tmp_path / "store" / "RECOVERY.log").exists()


def test_another_nodes_data_dir_is_refused(tmp_path: Path) -> None:
    key = create_key_file(tmp_path / "kek.key")
    bootstrap(_config(tmp_path / "n1", key, 1), "c1")
    before = _fingerprint(tmp_path / "n1")
    as_node_2 = _config(tmp_path / "n1", key, 2)
    with pytest.raises(InvalidArgument, match="belongs to node 1, the config names node 2"):
        force_new_cluster(as_node_2, "test")
    assert _fingerprint(tmp_path / "n1") == before
    assert not (tmp_path / "n1" / "RECOVERY.log").exists()
