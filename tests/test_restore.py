"""``mqstore restore`` as a user runs it (the installed command, ``--json`` parsed): a node's backup
restored as an embedded store and used as one, and what verify and ``repair --rebuild-state`` say
about it afterwards."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest

import mqstore
from mqstore.client import Client
from mqstore.consensus.types import HardState
from mqstore.crypto import create_key_file
from mqstore.node.raftlog import LmdbRaftStorage
from mqstore.ops.backup import clear_restore_leftovers
from mqstore.store import LogStore, NewMessage
from mqstore.testing.cluster import LocalCluster
from mqstore.testing.kill import stopped_in_write

RAW = b"Subject: x\r\n\r\nbody\r\n"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("mqstore", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "mqstore"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)


def ok(*args: str, code: int = 0) -> Any:
    """Run with --json; check the exit code; return the parsed output."""
    out = run(*args, "--json")
    assert out.returncode == code, f"mqstore {' '.join(args)} -> {out.returncode}\n{out.stdout}\n{out.stderr}"
    return json.loads(out.stdout)


def _fingerprint(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())
            if p.is_file() and p.name not in ("lock.mdb", "mqstore.lock")}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, list[str]]]:
    """A stopped one-node cluster's data dir (10 messages, 3 delivered): (data dir, KEK, ids)."""
    root = tmp_path_factory.mktemp("node")
    c = LocalCluster(root, ["a"], cluster_id="c1")
    try:
        c.bootstrap()
        c.start_all()
        c.wait_for_leader()
        with Client(c.addresses(), timeout=15) as client:
            ids = client.enqueue_many([{"mail_from": "a@example.org", "recipients": [f"r{i}@d.example"], "data": RAW}
                                       for i in range(10)])
            for lease in client.lease("w", max_messages=3):
                client.ack(lease.token)
        c.wait_converged()
        c.stop(1)
    except BaseException:
        print(c.log_tails())
        raise
    finally:
        c.close()
    yield c.data_dir(1), c.key_file, ids


def _messages(data_dir: Path, key: Path) -> set[str]:
    return {m["message_id"] for m in ok("queue", "list", "--data-dir", str(data_dir), "--key-file", str(key),
                                        "--all")["messages"]}


def _append_unapplied(data_dir: Path, key: Path) -> str:
    """Append an ENQUEUE after the node's applied index (as a crash between appending an entry
    and applying it leaves it); returns its message id."""
    log = LogStore(data_dir, key_file=key, create=False)
    try:
        (msg,) = log.append_messages([NewMessage(mail_from="a@example.org", recipients=["late@d.example"],
                                                 data=b"late")])
        storage = LmdbRaftStorage(log)
        hard, _ = storage.initial_state()
        assert storage.applied_index() < msg.index
        log.write(lambda ctx: storage.set_hard_state(ctx, HardState(hard.term, hard.vote, msg.index)))
        return str(msg.message_id)
    finally:
        log.close()


def test_a_restored_node_backup_is_an_embedded_store(node: tuple[Path, Path, list[str]], tmp_path: Path) -> None:
    source, key, ids = node
    shutil.copytree(source, tmp_path / "n1")
    late = _append_unapplied(tmp_path / "n1", key)
    backup = tmp_path / "n1.mqbak"
    header = ok("backup", "--data-dir", str(tmp_path / "n1"), "--out", str(backup))["header"]
    assert header["source"]["kind"] == "node" and header["last_index"] == header["applied_index"] + 1
    restored = tmp_path / "restored"
    result = ok("restore", "--in", str(backup), "--data-dir", str(restored), "--key-file", str(key))
    assert result["verify"]["clean"]
    assert result["log"] == {"embedded": True, "applied_index": header["applied_index"],
                             "last_index": header["applied_index"], "log_cut_from": header["applied_index"] + 1,
                             "entries_dropped": 1}
    st = ok("status", "--data-dir", str(restored))
    assert st["kind"] == "restored" and "node_id" not in st and st["last_index"] == header["applied_index"]
    target = ("--data-dir", str(restored), "--key-file", str(key))
    listed = {m["message_id"] for m in ok("queue", "list", *target, "--all")["messages"]}
    assert listed == _messages(source, key) and listed <= set(ids)
    assert late not in listed  # never applied on the node: not in the backup's state
    # Used as an embedded store: an acknowledged enqueue and a delivery.
    with mqstore.open(restored, key_file=key, background=False) as store:
        new = store.enqueue("x@example.org", ["y@d.example"], RAW)
        for lease in store.lease("w", max_messages=2):
            store.ack(lease.token)
        last = store.log.last_index
    report = ok("verify", *target)
    assert report["clean"] and report["replayed"] and report["applied_index"] == last, report["problems"]
    rebuilt = ok("repair", *target, "--rebuild-state")["rebuild_state"]
    assert rebuilt["to_index"] == last
    assert ok("message", "show", new, *target, "--no-history")["message_id"] == new
    assert ok("verify", *target)["clean"]


def test_a_stale_applied_index_is_refused_by_rebuild_and_named_by_verify(
    node: tuple[Path, Path, list[str]], tmp_path: Path
) -> None:
    """A store restored from a node's backup by an earlier mqstore kept the node's applied index,
    which the embedded store never advances: verify and repair must not take it for the state."""
    source, key, _ids = node
    backup = tmp_path / "n1.mqbak"
    ok("backup", "--data-dir", str(source), "--out", str(backup))
    restored = tmp_path / "restored"
    ok("restore", "--in", str(backup), "--data-dir", str(restored), "--key-file", str(key))
    with mqstore.open(restored, key_file=key, background=False) as store:
        new = store.enqueue("x@example.org", ["y@d.example"], RAW)
        applied = store.log.last_index - 1
    env = lmdb.open(str(restored), max_dbs=64)  # what the earlier restore left in meta
    try:
        with env.begin(write=True) as txn:
            txn.put(b"raft.applied", struct.pack(">Q", applied), db=env.open_db(b"meta", txn=txn))
    finally:
        env.close()
    before = _fingerprint(restored)
    target = ("--data-dir", str(restored), "--key-file", str(key))
    report = ok("verify", *target, code=1)
    assert not report["replayed"]
    assert [p["check"] for p in report["problems"]] == ["replay"]
    assert f"records a node's applied index {applied}" in report["problems"][0]["problem"]
    refused = run("repair", *target, "--rebuild-state", "--json")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    error = json.loads(refused.stdout)
    assert error["error"] == "InvalidArgument" and "which log entries its state tables hold is not known" in \
        error["message"]
    assert _fingerprint(restored) == before
    assert ok("message", "show", new, *target, "--no-history")["message_id"] == new


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A backup of an embedded store, and its KEK."""
    root = tmp_path_factory.mktemp("embedded")
    key = create_key_file(root / "kek.key")
    with mqstore.open(root / "store", key_file=key, background=False) as store:
        store.enqueue_many([{"mail_from": "a@example.org", "recipients": [f"u{i}@d.example"], "data": RAW}
                            for i in range(5)])
    ok("backup", "--data-dir", str(root / "store"), "--out", str(root / "store.mqbak"))
    return root / "store.mqbak", key


def _node_config(path: Path, data_dir: Path, key: Path) -> Path:
    path.write_text(f'node_id = 1\nsite = "a"\nlisten = "127.0.0.1:1"\ndata_dir = "{data_dir}"\n'
                    f'key_file = "{key}"\ninsecure = true\n\n[[peers]]\nid = 9\nsite = "b"\naddress = "127.0.0.1:2"\n')
    return path


def _left(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_a_restore_that_fails_leaves_nothing_behind(embedded: tuple[Path, Path], tmp_path: Path) -> None:
    backup, key = embedded
    other = create_key_file(tmp_path / "other.key")
    root = tmp_path / "r"
    root.mkdir()
    seed = root / "seed"
    config = _node_config(tmp_path / "node.toml", seed, key)
    failures = {
        "an embedded store cannot seed a cluster": (
            ["--in", str(backup), "--config", str(config), "--cluster-id", "new"], "InvalidArgument"),
        "no key to verify with": (["--in", str(backup), "--data-dir", str(root / "r1")], "KeyFileError"),
        "not the store's key": (["--in", str(backup), "--data-dir", str(root / "r1"), "--key-file", str(other)],
                                "WrongKey"),
        "no backup file": (["--in", str(tmp_path / "missing.mqbak"), "--data-dir", str(root / "r1"),
                            "--key-file", str(key)], "FileNotFoundError"),
        "a backup cut short": (["--in", str(tmp_path / "short.mqbak"), "--data-dir", str(root / "a" / "b"),
                                "--key-file", str(key)], "Corruption"),
    }
    (tmp_path / "short.mqbak").write_bytes(backup.read_bytes()[: backup.stat().st_size // 2])
    for what, (args, error) in failures.items():
        out = run("restore", *args, "--json")
        assert out.returncode == 2, f"{what}: {out.stdout} {out.stderr}"
        assert json.loads(out.stdout)["error"] == error, what
        assert _left(root) == [], f"{what}: left {_left(root)}"
    # The corrected runs are not refused.
    assert ok("restore", "--in", str(backup), "--data-dir", str(root / "r1"), "--key-file", str(key))["verify"]["clean"]
    assert ok("status", "--data-dir", str(root / "r1"))["stats"]["messages"] == 5
    assert _left(root) == ["r1"]


def test_the_restore_after_one_killed_mid_write_removes_its_leftovers(
    embedded: tuple[Path, Path], tmp_path: Path
) -> None:
    """A restore killed with SIGKILL leaves its staging directory beside the target; the next
    restore into that target removes it and names it, and keeps one a running restore holds."""
    backup, key = embedded
    root = tmp_path / "r"
    root.mkdir()
    target = root / "spool"
    killed = stopped_in_write("restore", str(backup), str(target))
    killed.kill()
    killed.wait(timeout=60)
    left = _left(root)
    assert len(left) == 1 and left[0].startswith(".spool.restoring-") and not target.exists()
    out = run("restore", "--in", str(backup), "--data-dir", str(target), "--key-file", str(key), "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["leftovers_removed"] == [str(root / left[0])]
    assert f"mqstore: removed {root / left[0]}, left by a restore into {target} that was killed" in out.stderr
    assert _left(root) == ["spool"]
    assert ok("status", "--data-dir", str(target))["stats"]["messages"] == 5
    # A restore still running holds its directory: it is not taken for a leftover.
    other = root / "other"
    running = stopped_in_write("restore", str(backup), str(other))
    try:
        (held,) = set(_left(root)) - {"spool"}
        assert clear_restore_leftovers(other) == [] and (root / held).is_dir()
    finally:
        running.kill()
        running.wait(timeout=60)
    assert clear_restore_leftovers(other) == [root / held] and _left(root) == ["spool"]


def test_a_restore_into_an_existing_directory_keeps_what_it_holds(embedded: tuple[Path, Path], tmp_path: Path) -> None:
    backup, key = embedded
    target = tmp_path / "restored"
    target.mkdir()
    shutil.copy2(key, target / "kek.key")  # the default key file: <data-dir>/kek.key
    result = ok("restore", "--in", str(backup), "--data-dir", str(target))
    assert result["verify"]["clean"]
    assert {"kek.key", "data.mdb"} <= set(_left(target)) and _left(tmp_path) == ["restored"]
    refused = run("restore", "--in", str(backup), "--data-dir", str(target), "--json")
    assert refused.returncode == 2 and "already holds a store" in json.loads(refused.stdout)["message"]


def test_a_nodes_backup_seeds_a_new_cluster(node: tuple[Path, Path, list[str]], tmp_path: Path) -> None:
    source, key, ids = node
    backup = tmp_path / "n1.mqbak"
    ok("backup", "--data-dir", str(source), "--out", str(backup))
    seed = tmp_path / "seed"
    seed.mkdir()
    config = _node_config(tmp_path / "node.toml", seed, key)
    result = ok("restore", "--in", str(backup), "--config", str(config), "--cluster-id", "rebuilt")
    assert result["verify"]["clean"] and result["seeded"]["action"] == "seed-from-backup"
    assert result["seeded"]["previous_cluster_id"] == "c1"  # the backup's cluster, named in its header
    st = ok("status", "--config", str(config))
    assert st["node_id"] == 1 and st["cluster_id"] == "rebuilt"
    assert _messages(seed, key) == _messages(source, key) and _messages(seed, key) <= set(ids)
    assert (seed / "RECOVERY.log").exists() and _left(tmp_path) == ["n1.mqbak", "node.toml", "seed"]


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """An embedded store whose audit log has a signed checkpoint: (store, KEK, signing key id)."""
    from mqstore.actor import Actor
    from mqstore.compliance.signing import key_id, read_signing_key

    root = tmp_path_factory.mktemp("audited")
    key = create_key_file(root / "kek.key")
    officer = Actor("j.doe", frozenset({"compliance", "admin"}), auth="mtls")
    with mqstore.open(root / "store", key_file=key, background=False) as store:
        store.set_policy("finance", mode="compliance", retention_days=30)
        mid = store.enqueue("cfo@example.org", ["board@example.net"], RAW, namespace="finance")
        store.add_legal_hold(mid, case="SEC-1", actor=officer)
        assert store.audit_checkpoint() is not None
    return root / "store", key, key_id(read_signing_key(root / "store" / "audit-signing.key"))


def test_restore_says_where_the_audit_signing_key_must_go(audited: tuple[Path, Path, str], tmp_path: Path) -> None:
    from mqstore.compliance.signing import create_signing_key, public_key_hex, read_signing_key

    source, key, signer = audited
    backup = tmp_path / "store.mqbak"
    made = run("backup", "--data-dir", str(source), "--out", str(backup))
    assert made.returncode == 0 and f"signed by key id {signer}: the signing key is not in the backup" in made.stdout
    header = ok("backup", "--data-dir", str(source), "--out", str(tmp_path / "again.mqbak"))["header"]
    assert header["audit_signing_key"] == {
        "checkpoints": 1, "key_id": signer, "file": "audit-signing.key",
        "public_key": public_key_hex(read_signing_key(source / "audit-signing.key"))}
    restored = tmp_path / "restored"
    result = ok("restore", "--in", str(backup), "--data-dir", str(restored), "--key-file", str(key))
    assert result["audit_signing_key"] == {"checkpoints": 1, "key_id": signer, "present": False, "matches": None,
                                           "file": str(restored / "audit-signing.key")}
    text = run("restore", "--in", str(backup), "--data-dir", str(tmp_path / "r2"), "--key-file", str(key))
    assert text.returncode == 0
    assert (f"copy the audit signing key with key id {signer} (the audit-signing.key file of the store backed up) "
            f"to {tmp_path / 'r2' / 'audit-signing.key'}") in text.stdout
    # Copied there, the restored audit log verifies.
    shutil.copy2(source / "audit-signing.key", restored / "audit-signing.key")
    verified = run("audit", "verify", "--data-dir", str(restored), "--key-file", str(key))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    # Another key where the store looks for it is named as the wrong one.
    other = tmp_path / "r3"
    other.mkdir()
    create_signing_key(other / "audit-signing.key")
    warned = ok("restore", "--in", str(backup), "--data-dir", str(other), "--key-file", str(key))
    assert warned["audit_signing_key"]["present"] is True and warned["audit_signing_key"]["matches"] is False
    matching = tmp_path / "r4"
    matching.mkdir()
    shutil.copy2(source / "audit-signing.key", matching / "audit-signing.key")
    text = run("restore", "--in", str(backup), "--data-dir", str(matching), "--key-file", str(key))
    assert f"holds the audit signing key with key id {signer}" in text.stdout


@contextlib.contextmanager
def _signed_node(root: Path) -> Iterator[LocalCluster]:
    """A running one-node cluster whose audit log holds a signed checkpoint (its log tails are
    printed when the block fails)."""
    c = LocalCluster(root / "cluster", ["a"], cluster_id="c1")
    try:
        c.bootstrap()
        c.start_all()
        c.wait_for_leader()
        with Client(c.addresses(), timeout=15) as client:
            client.enqueue(mail_from="a@example.org", recipients=["r@d.example"], data=RAW)
            client.audit_checkpoint()
        yield c
    except BaseException:
        print(c.log_tails())
        raise
    finally:
        c.close()


def test_a_backup_over_the_network_names_the_nodes_audit_signing_key(tmp_path: Path) -> None:
    """A node's backup (``--server``) carries the public key that signed its audit checkpoints,
    so the key to copy beside a restore can be checked against the backup itself."""
    from mqstore.compliance.signing import key_id, public_key_hex, read_signing_key

    with _signed_node(tmp_path) as c:
        header = ok("backup", "--server", c.addresses()[0], "--out", str(tmp_path / "n1.mqbak"))["header"]
    signer = read_signing_key(c.data_dir(1) / "audit-signing.key")
    assert header["audit_signing_key"]["key_id"] == key_id(signer)
    assert header["audit_signing_key"]["public_key"] == public_key_hex(signer)


def test_a_node_whose_audit_log_is_signed_does_not_start_with_a_new_signing_key(tmp_path: Path) -> None:
    """Its key file gone (a restored data dir, a botched move), a node refuses to start rather
    than sign with a new key, naming the file; with the file back it starts and verifies."""
    with _signed_node(tmp_path) as c:
        c.stop(1)
        key_file = c.data_dir(1) / "audit-signing.key"
        saved = key_file.read_bytes()
        key_file.unlink()
        c.start(1)
        proc = c.nodes[1].process
        assert proc is not None and proc.wait(60) != 0
        logged = c.log_tail(1, 20)
        assert f"{key_file} does not exist, but this store's audit log holds checkpoints signed by key" in logged
        assert not key_file.exists()
        key_file.write_bytes(saved)
        key_file.chmod(0o600)
        c.start(1)
        c.wait_for_leader()
        c.stop(1)
        verified = run("audit", "verify", "--data-dir", str(c.data_dir(1)), "--key-file", str(c.key_file))
        assert verified.returncode == 0, verified.stdout + verified.stderr
