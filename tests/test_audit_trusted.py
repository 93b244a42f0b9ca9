"""A checkpoint exported from one node checks every node's audit log.

On a cluster the audit records and Merkle roots are the same on every replica, but each node
signs its checkpoints with its own key. ``audit verify --trusted-checkpoint`` checks the trusted
checkpoint's signature with its own key, compares its size and root with the log's, and checks
the log's own checkpoints with the log's own key (before, it expected the exported checkpoint's
key on every checkpoint, and every node but the one that signed it was reported TAMPERED)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_audit import FORGER, HMAC_KEY, SIGNER, MemoryBackend, fields_for

from mqstore.client import Client
from mqstore.compliance import audit, signing
from mqstore.compliance.audit import AuditLog, Checkpoint, signed_message, verify
from mqstore.testing.secure import InProcessCluster

BODY = b"Subject: minutes\r\n\r\nconfidential\r\n"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MQSTORE_")}
    return subprocess.run([sys.executable, "-m", "mqstore", *args], capture_output=True, text=True, timeout=60,
                          env=env)


def _wait_applied(cluster: InProcessCluster, index: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    for i, server in cluster.servers.items():
        while server.node.applied_index < index:
            assert time.monotonic() < deadline, f"node {i} applied {server.node.applied_index}, wanted {index}"
            time.sleep(0.05)


def _replica_logs(n: int, signers: list[Ed25519PrivateKey]) -> list[MemoryBackend]:
    """The same ``n`` records appended on one backend per signer, as replicas apply them."""
    backends = [MemoryBackend() for _ in signers]
    logs = [AuditLog(s, HMAC_KEY, checkpoint_every=4, checkpoint_ms=10**9) for s in signers]
    for i in range(1, n + 1):
        for b, log in zip(backends, logs, strict=True):
            with b.write() as kv:
                log.append(kv, fields_for(log, i), 1000 + 10 * i)
    return backends


def test_replica_signed_by_another_key_verifies_against_the_exported_checkpoint() -> None:
    leader, follower = _replica_logs(14, [SIGNER, FORGER])
    with leader.read() as kv:
        trusted = AuditLog(SIGNER, HMAC_KEY).export_checkpoint(kv)
    assert trusted is not None and trusted.size == 12
    with follower.read() as kv:
        report = verify(kv, FORGER.public_key(), trusted)  # the follower's own key
    assert report.ok, report.problems
    assert report.signatures_checked == 3
    assert any(f"signed by key {signing.key_id(SIGNER.public_key())}" in n for n in report.notes), report.notes
    # without a key of the follower's own, its checkpoints are held to the exported one's key
    with follower.read() as kv:
        report = verify(kv, None, trusted)
    assert not report.ok and report.first_bad_checkpoint == 4


def _export_from_the_leader(tmp_path: Path) -> tuple[Path, Path, int, Checkpoint, list[int]]:
    """A 3-node cluster with some audited history; ``audit export-checkpoint --server`` (the
    leader signs it); then every node stopped. Returns the cluster's root, the checkpoint file,
    the leader's id, the checkpoint and the node ids."""
    cluster = InProcessCluster(tmp_path / "c", ["a", "b", "c"])
    try:
        leader = cluster.leader()
        addresses = ",".join(cluster.addresses.values())
        with Client(list(cluster.addresses.values()), timeout=20) as client:
            client.set_policy("finance", mode="compliance", retention_days=30)
            assert client.audit_checkpoint() is not None  # an earlier checkpoint, each node's signed by itself
            for i in range(3):
                client.enqueue(mail_from="cfo@example.org", recipients=[f"r{i}@example.net"], data=BODY,
                               namespace="finance")
        ckpt_file = tmp_path / "safe" / "ck.json"
        ckpt_file.parent.mkdir()
        out = _cli("audit", "export-checkpoint", "--server", addresses, "--out", str(ckpt_file))
        assert out.returncode == 0, out.stdout + out.stderr
        ckpt = Checkpoint.from_json(ckpt_file.read_text())
        assert ckpt.key_id == signing.key_id(leader.queue.audit.log.public_key)
        # the output names the signing node and key, and a verify command that names a node's store
        assert f"signed with node {leader.node.node_id}'s key {ckpt.key_id}" in out.stdout, out.stdout
        assert f"mqstore audit verify --trusted-checkpoint {ckpt_file} --config " in out.stdout, out.stdout
        _wait_applied(cluster, leader.node.applied_index)
        ids = sorted(cluster.servers)
        leader_id = leader.node.node_id
    finally:
        cluster.close()
    return tmp_path / "c", ckpt_file, leader_id, ckpt, ids


def test_every_node_verifies_against_a_checkpoint_the_leader_exported(tmp_path: Path) -> None:
    root, ckpt_file, leader_id, ckpt, ids = _export_from_the_leader(tmp_path)
    kek = str(root / "kek.key")
    for i in ids:
        data = root / f"n{i}"
        r = _cli("audit", "verify", "--data-dir", str(data), "--key-file", kek, "--trusted-checkpoint", str(ckpt_file))
        assert r.returncode == 0, (i, r.stdout, r.stderr)
        assert r.stdout.startswith("audit log OK:"), (i, r.stdout)
        if i != leader_id:
            assert f"the trusted checkpoint (size {ckpt.size}) was signed by key {ckpt.key_id}" in r.stdout, r.stdout
        # the node's key named explicitly: the same
        r = _cli("audit", "verify", "--data-dir", str(data), "--key-file", kek, "--trusted-checkpoint", str(ckpt_file),
                 "--signing-key", str(data / "audit-signing.key"), "--json")
        assert r.returncode == 0, (i, r.stdout, r.stderr)
        report = json.loads(r.stdout)
        assert report["ok"] and report["signatures_checked"] >= 2, report

    follower = next(i for i in ids if i != leader_id)
    follower_dir = str(root / f"n{follower}")

    # a tampered copy of the checkpoint: its signature no longer verifies
    tampered = json.loads(ckpt_file.read_text())
    tampered["root"] = "00" * 32
    bad_file = tmp_path / "tampered.json"
    bad_file.write_text(json.dumps(tampered))
    r = _cli("audit", "verify", "--data-dir", follower_dir, "--key-file", kek, "--trusted-checkpoint", str(bad_file))
    assert r.returncode == 1, r.stdout
    assert "audit log TAMPERED" in r.stdout
    assert f"the trusted checkpoint (size {ckpt.size}) is not valid: its signature does not verify" in r.stdout

    # a checkpoint the leader's key really signed whose root is not the log's (the log was
    # rewritten since): every node's log fails against it
    leader_key = signing.read_signing_key(root / f"n{leader_id}" / "audit-signing.key")
    other_root = "ab" * 32
    forged = Checkpoint(ckpt.size, other_root, ckpt.time,
                        leader_key.sign(signed_message(ckpt.size, other_root, ckpt.time)).hex(), ckpt.key_id,
                        ckpt.public_key)
    forged_file = tmp_path / "other-root.json"
    forged_file.write_text(forged.to_json())
    for i in ids:
        r = _cli("audit", "verify", "--data-dir", str(root / f"n{i}"), "--key-file", kek, "--json",
                 "--trusted-checkpoint", str(forged_file))
        assert r.returncode == 1, (i, r.stdout)
        report = json.loads(r.stdout)
        assert report["first_bad_checkpoint"] == ckpt.size
        assert any(p.startswith(f"the trusted checkpoint (size {ckpt.size}) does not match") for p in
                   report["problems"]), report["problems"]

    # a trusted checkpoint that is longer than the log: truncated
    with_more = audit.Checkpoint(ckpt.size + 5, ckpt.root, ckpt.time,
                                 leader_key.sign(signed_message(ckpt.size + 5, ckpt.root, ckpt.time)).hex(),
                                 ckpt.key_id, ckpt.public_key)
    longer = tmp_path / "longer.json"
    longer.write_text(with_more.to_json())
    r = _cli("audit", "verify", "--data-dir", follower_dir, "--key-file", kek, "--trusted-checkpoint", str(longer))
    assert r.returncode == 1 and "truncated: the trusted checkpoint covers" in r.stdout, r.stdout


def test_export_from_a_store_on_disk_prints_a_verify_command_that_works(tmp_path: Path) -> None:
    import shlex

    import mqstore

    data = tmp_path / "my store"
    with mqstore.open(data, background=False) as s:
        s.set_policy("fin", mode="compliance", retention_days=1)
    ckpt_file = tmp_path / "ck.json"
    out = _cli("audit", "export-checkpoint", "--data-dir", str(data), "--out", str(ckpt_file))
    assert out.returncode == 0, out.stderr
    assert "signed with key " in out.stdout, out.stdout
    hint = out.stdout.split("check later with: ", 1)[1].strip()
    assert hint.startswith("mqstore audit verify --trusted-checkpoint ") and "--data-dir" in hint, hint
    r = _cli(*shlex.split(hint)[1:])
    assert r.returncode == 0 and r.stdout.startswith("audit log OK:"), (hint, r.stdout, r.stderr)
