"""Disaster drills on real multi-process clusters, driven by the ``mqstore`` command as an operator
would (README "Operations" walks through the same steps):

* a record rots on one node: ``verify`` names it, ``repair`` puts it back from a peer — on a
  running node (``--server``) and on a stopped one (``--config``);
* a node's data dir is lost: ``recover`` rebuilds it under a new node id from its peers, it
  catches up, becomes a voter, and the old id is removed for good;
* a backup is taken under write load: restored into a new dir it verifies clean and holds every
  message acknowledged before the backup began;
* a majority is lost: ``recover --force-new-cluster`` (explicit, recorded) makes a survivor the
  cluster again, with its data, and it grows back with ``recover``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mqstore
from mqstore.client import Client
from mqstore.errors import MQStoreError
from mqstore.testing.cluster import LocalCluster, wait_until

RAW = b"From: a@example.org\r\nSubject: drill\r\n\r\nbody\r\n"


def ok(c: LocalCluster, *args: str, code: int = 0, timeout: float = 120) -> Any:
    out = c.mqstore(*args, "--json", timeout=timeout)
    assert out.returncode == code, f"mqstore {' '.join(args)} -> {out.returncode}\n{out.stdout}\n{out.stderr}"
    return json.loads(out.stdout)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path, ["a", "b", "c"])
    try:
        c.bootstrap()
        c.start_all()
        c.wait_for_leader()
        yield c
    except BaseException:
        print(c.log_tails())
        raise
    finally:
        c.close()


def _fill(c: LocalCluster, n: int) -> list[str]:
    with Client(c.addresses(), timeout=15) as client:
        return client.enqueue_many([
            {"mail_from": "a@example.org", "recipients": [f"r{i}@d{i % 5}.example"], "data": RAW} for i in range(n)
        ])


def _enqueue_index(c: LocalCluster, mid: str) -> int:
    shown = ok(c, "message", "show", mid, "--server", c.servers())
    index: int = shown["history"]["events"][0]["index"]
    return index


def test_drill_damaged_record_is_named_and_repaired_from_a_peer(cluster: LocalCluster) -> None:
    c = cluster
    ids = _fill(c, 40)
    c.wait_converged()
    leader = c.wait_for_leader()
    victim = next(n for n in c.nodes if n != leader)
    address = c.nodes[victim].address
    # Online: a message body rots on a running follower.
    index = _enqueue_index(c, ids[7])
    c.corrupt_record(victim, index)
    report = ok(c, "verify", "--server", address, code=1)
    assert report["node_id"] == victim
    assert [p["index"] for p in report["problems"] if p["check"] == "records"] == [index]
    assert ok(c, "repair", "--server", address, "--dry-run")["would_repair"] == 1
    fixed = ok(c, "repair", "--server", address)
    assert fixed["repaired"] == 1 and fixed["unresolved"] == []
    assert fixed["records"][0]["index"] == index and fixed["records"][0]["source"].startswith("node ")
    assert ok(c, "verify", "--server", address)["clean"]
    # Offline: the node is stopped, another record rots; its peers are found from its data dir.
    c.stop(victim)
    index2 = _enqueue_index(c, ids[21])
    c.corrupt_record(victim, index2, offset=50)
    config = str(c.config_path(victim))
    # A node's data dir is never written offline as if it were an embedded store (that would
    # bypass replication): changes go through the cluster.
    refused = c.mqstore("hold", ids[0], "--config", config, "--json")
    assert refused.returncode == 2 and "through the node" in refused.stdout
    report = ok(c, "verify", "--config", config, code=1)
    assert index2 in [p["index"] for p in report["problems"] if p["check"] == "records"]
    fixed = ok(c, "repair", "--config", config)
    assert fixed["repaired"] == 1 and fixed["records"][0]["index"] == index2
    assert ok(c, "verify", "--config", config)["clean"]
    c.start(victim)
    c.wait_converged()
    # The repaired bodies read back through the cluster, on the repaired node's copy too.
    with Client([address], timeout=15) as client:
        assert client.get(ids[7]).data == RAW
    assert ok(c, "status", "--server", address)["quarantined"] == 0


def test_drill_lost_data_dir_is_rebuilt_under_a_new_id(cluster: LocalCluster) -> None:
    c = cluster
    ids = _fill(c, 60)
    leader = c.wait_for_leader()
    lost = next(n for n in c.nodes if n != leader)
    site = c.nodes[lost].site
    c.kill(lost)
    c.wipe(lost)
    more = _fill(c, 20)  # the cluster goes on with two of three
    new = c.add_node(site)
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mqstore", "recover", "--config", str(c.config_path(new)), "--server", c.servers(),
         "--replace", str(lost), "--wait", "60", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=c.env,
    )
    try:
        # recover prepares the empty data dir, adds the node as a learner and waits for it: start it.
        assert wait_until(lambda: (c.data_dir(new) / "data.mdb").exists(), 30), proc.stderr
        c.start(new)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    result = json.loads(out)
    print(f"recover: node {new} replaced node {lost} in {time.monotonic() - start:.1f} s")
    assert result["node_id"] == new and result["replaced"] == lost
    members = {m["id"]: m for m in result["members"]}
    assert set(members) == set(c.nodes) - {lost} and members[new]["voter"] and members[new]["site"] == site
    c.wait_converged(node_ids=[n for n in c.nodes if n != lost])
    st = ok(c, "status", "--server", c.nodes[new].address)
    assert st["applied_index"] == st["leader_commit_index"] and lost in st["removed_ids"]
    # The new node has every message; the old id can never come back.
    c.stop(new)
    report = ok(c, "verify", "--config", str(c.config_path(new)))
    assert report["clean"] and report["messages_checked"] == len(ids) + len(more)
    error = c.mqstore("cluster", "add", "--server", c.servers(), "--id", str(lost), "--site", site,
                      "--address", "127.0.0.1:1", "--json")
    assert error.returncode == 2 and "never reused" in error.stdout
    # recover refuses, and changes nothing, when the config names the removed id, when a node
    # would replace itself, and when the data dir already holds another store.
    servers = c.servers()
    before = sorted(m["id"] for m in ok(c, "status", "--server", servers)["members"])
    refused = c.mqstore("recover", "--config", str(c.config_path(lost)), "--server", servers, "--json")
    assert refused.returncode == 2 and f"node id {lost} was removed" in refused.stdout, refused.stdout
    assert not c.data_dir(lost).exists() or not any(c.data_dir(lost).iterdir())
    refused = c.mqstore("recover", "--config", str(c.config_path(new)), "--server", servers,
                        "--replace", str(new), "--json")
    assert refused.returncode == 2 and "needs a new node id" in refused.stdout, refused.stdout
    other = c.add_node(site)
    mqstore.open(c.data_dir(other), key_file=c.key_file).close()  # an embedded store, not a node
    # (LMDB's lock file is left out: opening a store to read it rewrites its reader table.)
    files = {p.name: p.read_bytes() for p in c.data_dir(other).iterdir() if p.name != "lock.mdb"}
    refused = c.mqstore("recover", "--config", str(c.config_path(other)), "--server", servers, "--json")
    assert refused.returncode == 2 and "starts from an empty data dir" in refused.stdout, refused.stdout
    assert {p.name: p.read_bytes() for p in c.data_dir(other).iterdir() if p.name != "lock.mdb"} == files
    assert sorted(m["id"] for m in ok(c, "status", "--server", servers)["members"]) == before


def test_drill_backup_under_load_restores_everything_acknowledged(cluster: LocalCluster, tmp_path: Path) -> None:
    c = cluster
    _fill(c, 50)
    acked: list[tuple[float, str]] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        with Client(c.addresses(), timeout=15) as client:
            i = 0
            while not stop.is_set():
                try:
                    ids = client.enqueue_many([{"mail_from": "load@example.org", "recipients": [f"l{i}-{k}@x.example"],
                                                "data": RAW} for k in range(5)])
                except MQStoreError as exc:
                    errors.append(exc)
                    continue
                now = time.monotonic()
                acked.extend((now, mid) for mid in ids)
                i += 1

    threads = [threading.Thread(target=writer) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        assert wait_until(lambda: len(acked) > 200, 30)
        follower = next(n for n in c.nodes if n != c.wait_for_leader())
        began = time.monotonic()
        out = tmp_path / "spool.mqbak"
        backup = ok(c, "backup", "--server", c.nodes[follower].address, "--out", str(out))
        after_backup = len(acked)
        assert wait_until(lambda: len(acked) > after_backup + 50, 30)  # the load went on throughout
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors[:3]
    header = backup["header"]
    assert header["source"]["node_id"] == follower and header["source"]["kind"] == "node"
    before = {mid for t, mid in acked if t < began}
    restored = tmp_path / "restored"
    result = ok(c, "restore", "--in", str(out), "--data-dir", str(restored), "--key-file", str(c.key_file))
    assert result["verify"]["clean"]
    listed = ok(c, "queue", "list", "--data-dir", str(restored), "--key-file", str(c.key_file), "--all")
    present = {m["message_id"] for m in listed["messages"]}
    missing = before - present
    assert not missing, f"{len(missing)} message(s) acknowledged before the backup are not in it"
    print(f"backup under load: {len(before)} acknowledged before it began, {len(present)} in it, "
          f"{len(acked)} acknowledged in all")
    assert len(present) < 50 + len(acked)  # it is a point in time, not the end state
    # The same backup seeds a new one-node cluster (the whole old cluster lost, say).
    with LocalCluster(tmp_path / "seeded", ["z"], cluster_id="rebuilt") as seeded:
        seeded.key_file.write_bytes(c.key_file.read_bytes())
        seeded.write_config(1)
        result = ok(c, "restore", "--in", str(out), "--config", str(seeded.config_path(1)), "--cluster-id", "rebuilt")
        assert result["verify"]["clean"] and result["seeded"]["action"] == "seed-from-backup"
        seeded.start(1)
        assert seeded.wait_for_leader(timeout=20) == 1
        with Client(seeded.addresses(), timeout=15) as client:
            page = client.list(limit=100_000)
            assert {s.message_id for s in page} == present
            client.enqueue("after@example.org", ["x@d.example"], RAW)
        st = ok(c, "status", "--server", seeded.nodes[1].address)
        assert st["cluster_id"] == "rebuilt" and [m["id"] for m in st["members"]] == [1]


def test_drill_majority_lost_force_new_cluster(cluster: LocalCluster) -> None:
    c = cluster
    ids = _fill(c, 30)
    c.wait_converged()
    survivor = 1
    for n in (2, 3):
        c.kill(n)
    c.stop(survivor)
    config = str(c.config_path(survivor))
    # Never automatic: refused without the explicit confirmation and a reason.
    refused = c.mqstore("recover", "--force-new-cluster", "--config", config, "--json")
    assert refused.returncode == 2 and "--i-understand" in refused.stdout
    entry = ok(c, "recover", "--force-new-cluster", "--config", config,
               "--i-understand-acknowledged-writes-may-be-lost", "--reason", "sites b and c destroyed")
    assert entry["removed_ids"] == [2, 3] and entry["operator"] and entry["reason"] == "sites b and c destroyed"
    # Tokens after the survivor's applied index are granted again: workers must drop their leases.
    assert entry["lease_tokens"]["reissued_above"] == entry["applied_index"]
    assert "must drop every lease" in entry["lease_tokens"]["action"]
    st = ok(c, "status", "--config", config)
    assert st["recoveries"][-1]["action"] == "force-new-cluster"
    assert [m["id"] for m in st["members"]] == [survivor] and st["removed_ids"] == [2, 3]
    assert (c.data_dir(survivor) / "RECOVERY.log").read_text().count("force-new-cluster") == 1
    c.start(survivor)
    assert c.wait_for_leader(among=[survivor], timeout=20) == survivor
    with Client([c.nodes[survivor].address], timeout=15) as client:
        assert {s.message_id for s in client.list(limit=1000)} == set(ids)
        client.enqueue("after@example.org", ["x@d.example"], RAW)
    # The cluster grows back with new node ids.
    new = c.add_node("b")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mqstore", "recover", "--config", str(c.config_path(new)), "--server",
         c.nodes[survivor].address, "--wait", "60", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=c.env,
    )
    try:
        assert wait_until(lambda: (c.data_dir(new) / "data.mdb").exists(), 30)
        c.start(new)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    assert {m["id"] for m in json.loads(out)["members"]} == {survivor, new}
    c.wait_converged(node_ids=[survivor, new])
