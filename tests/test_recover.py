"""``mqstore recover`` as an operator runs it (the installed command, ``--json`` parsed), against
real node processes: ``--force-new-cluster`` on a survivor whose log holds committed writes after
a membership change it had not applied."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mqstore.client import Client
from mqstore.codec import RecordType
from mqstore.consensus.raft import encode_conf_change
from mqstore.consensus.types import ConfChange, ConfChangeItem, ConfChangeType, HardState
from mqstore.errors import Unavailable
from mqstore.ids import format_id
from mqstore.node.raftlog import LmdbRaftStorage
from mqstore.store import LogStore, NewMessage
from mqstore.testing.cluster import LocalCluster, wait_until

RAW = b"Subject: x\r\n\r\nbody\r\n"


def ok(c: LocalCluster, *args: str) -> Any:
    out = c.mqstore(*args, "--json")
    assert out.returncode == 0, f"mqstore {' '.join(args)} -> {out.returncode}\n{out.stdout}\n{out.stderr}"
    return json.loads(out.stdout)


def _running_with_mail(c: LocalCluster, messages: int) -> None:
    """Bootstrap and start ``c``, enqueue ``messages`` messages, wait until every node has them."""
    c.bootstrap()
    c.start_all()
    c.wait_for_leader()
    with Client(c.addresses(), timeout=15) as client:
        client.enqueue_many([{"mail_from": "a@example.org", "recipients": [f"r{i}@d.example"], "data": RAW}
                             for i in range(messages)])
    c.wait_converged()


@pytest.fixture
def survivor(tmp_path: Path) -> Iterator[LocalCluster]:
    """A one-node cluster with mail in it, stopped."""
    c = LocalCluster(tmp_path, ["a"], cluster_id="c1")
    try:
        _running_with_mail(c, 5)
        c.stop(1)
        yield c
    except BaseException:
        print(c.log_tails())
        raise
    finally:
        c.close()


def test_force_new_cluster_keeps_committed_writes_after_an_unapplied_membership_change(
    survivor: LocalCluster,
) -> None:
    c = survivor
    # As a crash between commit and apply leaves it: after the applied index, a membership change
    # (a learner being added) and then an acknowledged, committed enqueue.
    log = LogStore(c.data_dir(1), key_file=c.key_file, create=False)
    try:
        storage = LmdbRaftStorage(log)
        hard, _ = storage.initial_state()
        applied = storage.applied_index()
        change = ConfChange((ConfChangeItem(ConfChangeType.ADD_LEARNER, 5, "b"),))
        (config_index,) = log.append(RecordType.CONFIG, [encode_conf_change(change)])
        (acked,) = log.append_messages([NewMessage(mail_from="a@example.org", recipients=["acked@d.example"],
                                                   data=b"acked")])
        log.write(lambda ctx: storage.set_hard_state(ctx, HardState(hard.term, hard.vote, acked.index)))
        config_term = log.read(config_index).term
    finally:
        log.close()
    assert applied < config_index < acked.index
    founding = ok(c, "status", "--data-dir", str(c.data_dir(1)))["founding"]
    entry = ok(c, "recover", "--force-new-cluster", "--config", str(c.config_path(1)), "--reason", "test",
               "--i-understand-acknowledged-writes-may-be-lost")
    assert entry["config_replaced"] == [config_index] and entry["log_cut_from"] is None
    human = (c.data_dir(1) / "RECOVERY.log").read_text()
    assert f'"config_replaced": [{config_index}]' in human
    # Founded anew: a second survivor reseeded apart would be refused, not merged.
    assert len(founding) == 32 and ok(c, "status", "--data-dir", str(c.data_dir(1)))["founding"] not in ("", founding)
    log = LogStore(c.data_dir(1), key_file=c.key_file, readonly=True, create=False)
    try:
        assert log.last_index == acked.index
        noop = log.read(config_index)
        assert (noop.type, noop.term, noop.payload) == (RecordType.NOOP, config_term, b"")
        assert log.read(acked.index).type == RecordType.ENQUEUE
    finally:
        log.close()
    # Started, the node commits and applies the acknowledged write; the membership is its own.
    c.start(1)
    assert c.wait_for_leader(timeout=20) == 1
    with Client(c.addresses(), timeout=15) as client:
        assert client.get(format_id(acked.message_id)).recipients[0].address == "acked@d.example"
    st = ok(c, "status", "--server", c.nodes[1].address)
    assert [m["id"] for m in st["members"]] == [1]


def test_recover_waits_for_a_leader_instead_of_giving_up(tmp_path: Path) -> None:
    """The leader dies and the cluster has no majority when ``recover`` starts (an election that
    cannot end yet): recover says what it waits for and goes on once a leader is elected, in one
    run."""
    c = LocalCluster(tmp_path, ["a", "b", "c"], cluster_id="c1")
    try:
        c.bootstrap()
        c.start_all()
        lost = c.wait_for_leader()
        other = next(n for n in c.nodes if n != lost)
        with Client(c.addresses(), timeout=15) as client:
            client.enqueue_many([{"mail_from": "a@example.org", "recipients": [f"r{i}@d.example"], "data": RAW}
                                 for i in range(5)])
        c.wait_converged()
        c.kill(lost)
        c.kill(other)  # and one more: no majority, no leader until it is back
        new = c.add_node(c.nodes[lost].site)
        alive = [n for n in c.nodes if c.alive(n)]
        recover = subprocess.Popen(
            [sys.executable, "-m", "mqstore", "recover", "--config", str(c.config_path(new)), "--server",
             ",".join(c.nodes[n].address for n in [*alive, other]), "--replace", str(lost), "--wait", "60",
             "--timeout", "3"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=c.env)
        try:
            time.sleep(3)
            assert recover.poll() is None, recover.communicate()
            c.start(other)  # a majority again: a leader is elected

            def added() -> bool:
                st = c.status(other, timeout=1.0)
                return st is not None and any(m["id"] == new for m in st["members"])

            assert wait_until(added, 60), recover.communicate()
            c.start(new)
            out, err = recover.communicate(timeout=120)
        finally:
            if recover.poll() is None:
                recover.kill()
                recover.communicate()
        assert recover.returncode == 0, out + err
        assert "waiting: a leader, for the cluster's leader" in err, err
        assert f"node {new} is a voter of cluster 'c1'" in out
        st = ok(c, "status", "--server", c.servers())
        assert sorted(m["id"] for m in st["members"]) == sorted([*alive, other, new]) and lost in st["removed_ids"]
    except BaseException:
        print(c.log_tails())
        raise
    finally:
        c.close()


class _FakeCluster:
    """What ``recover`` sees of a cluster through ``mqstore.ops.remote``: the leader's status (or
    no leader) and membership changes, scripted."""

    def __init__(self, members: list[dict[str, Any]]) -> None:
        self.members = members
        self.no_leader_for = 0  # status calls that find no leader
        self.proposals: list[tuple[str, int]] = []
        self.on_propose: list[Exception | None] = []  # per proposal: raise this (after it took effect)
        self.refuse: Exception | None = None  # raise this instead of making the change
        self.removed: list[int] = []

    def leader_status(self, client: Any, first: Any = None) -> dict[str, Any]:
        if self.no_leader_for:
            self.no_leader_for -= 1
            raise Unavailable("node 2 knows no leader right now (role follower, term 3)")
        return {"node_id": 1, "term": 2, "role": "leader", "cluster_id": "c1", "removed_ids": list(self.removed),
                "commit_index": 10, "members": [dict(m) for m in self.members]}

    def change_membership(self, client: Any, op: str, node_id: int, site: str = "", address: str = "") -> list[Any]:
        self.proposals.append((op, node_id))
        if self.refuse is not None:
            raise self.refuse
        if op == "add":
            self.members.append({"id": node_id, "site": site, "address": address, "voter": False, "match_index": 10})
        elif op == "promote":
            next(m for m in self.members if m["id"] == node_id)["voter"] = True
        else:
            self.members = [m for m in self.members if m["id"] != node_id]
            self.removed.append(node_id)
        error = self.on_propose.pop(0) if self.on_propose else None
        if error is not None:
            raise error
        return self.members


def test_each_membership_step_retries_and_counts_a_change_made_by_a_failed_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mqstore.config import parse
    from mqstore.errors import MQStoreError
    from mqstore.ops import recover, remote

    fake = _FakeCluster([{"id": n, "site": s, "address": f"127.0.0.1:{n}", "voter": True, "match_index": 10}
                         for n, s in ((1, "a"), (2, "b"), (3, "c"))])
    monkeypatch.setattr(remote, "leader_status", fake.leader_status)
    monkeypatch.setattr(remote, "change_membership", fake.change_membership)
    monkeypatch.setattr(recover, "_POLL_S", 0.01, raising=False)
    monkeypatch.setattr(recover, "REFUSED_CHANGE_SHOWS_WITHIN_S", 0.1, raising=False)
    monkeypatch.setattr("mqstore.node.runtime.prepare_join", lambda config, cluster_id: None)
    config = parse({"node_id": 4, "site": "c", "listen": "127.0.0.1:4", "data_dir": str(tmp_path / "n4"),
                    "key_file": str(tmp_path / "kek.key"), "insecure": True,
                    "peers": [{"id": 1, "site": "a", "address": "127.0.0.1:1"}]})
    said: list[str] = []
    fake.no_leader_for = 3  # an election when recover starts
    fake.on_propose = [
        Unavailable("the leader died before answering"),  # add: it committed all the same
        MQStoreError("node 4 is already a voter"),  # promote: the client's retry of a call that committed
        None,  # remove
    ]
    result = recover.replace_node(object(), config, replace=3, wait_s=5, say=said.append)
    assert fake.proposals == [("add", 4), ("promote", 4), ("remove", 3)]  # each once: none made twice
    assert sorted(m["id"] for m in result["members"]) == [1, 2, 4]
    assert any(s.startswith("waiting: a leader, for the cluster's leader (node 2 knows no leader") for s in said), said
    # A change refused for what it is (not made) is an error, not a wait.
    fake.refuse = MQStoreError("removing node 2 would leave fewer than 2 sites")
    with pytest.raises(MQStoreError, match="fewer than 2 sites"):
        recover._Waiter(object(), 5, said.append).change("remove", 2, lambda m: m is None)
    assert fake.proposals[-1] == ("remove", 2) and 2 in [m["id"] for m in fake.members]


@pytest.fixture(autouse=True)
def _keep_sigpipe() -> Iterator[None]:
    """cli.main() run in this process makes SIGPIPE end it quietly (as the command does): undone after."""
    handler = signal.getsignal(signal.SIGPIPE)
    yield
    signal.signal(signal.SIGPIPE, handler)


def test_replace_of_an_id_that_never_was_a_member_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--replace 9`` (a typo for the lost node 3) is refused before anything is done, naming the
    members; ``--replace 3`` run again once node 3 was removed still finishes."""
    from mqstore import cli
    from mqstore.ops import recover, remote

    fake = _FakeCluster([{"id": n, "site": s, "address": f"127.0.0.1:{n}", "voter": True, "match_index": 10}
                         for n, s in ((1, "a"), (2, "b"), (3, "c"))])
    monkeypatch.setattr(remote, "leader_status", fake.leader_status)
    monkeypatch.setattr(remote, "change_membership", fake.change_membership)
    monkeypatch.setattr(recover, "_POLL_S", 0.01, raising=False)
    prepared: list[str] = []
    monkeypatch.setattr("mqstore.node.runtime.prepare_join", lambda config, cluster_id: prepared.append(cluster_id))
    conf = tmp_path / "node4.toml"
    conf.write_text(f'node_id = 4\nsite = "c"\nlisten = "127.0.0.1:4"\ndata_dir = "{tmp_path / "n4"}"\n'
                    f'key_file = "{tmp_path / "kek.key"}"\n'
                    'insecure = true\n[[peers]]\nid = 1\nsite = "a"\naddress = "127.0.0.1:1"\n')
    command = ["recover", "--config", str(conf), "--server", "127.0.0.1:1", "--wait", "5", "--json"]

    assert cli.main([*command, "--replace", "9"]) == 2
    error = json.loads(capsys.readouterr().out)
    assert error["error"] == "InvalidArgument", error
    assert "node 9 is not a member of cluster 'c1' and never was" in error["message"]
    assert "members: 1 (voter, site a), 2 (voter, site b), 3 (voter, site c)" in error["message"]
    assert fake.proposals == [] and prepared == []  # nothing was done

    assert cli.main([*command, "--replace", "3"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert "removed node 3 (its id is never reused)" in done["steps"]
    assert cli.main([*command, "--replace", "3"]) == 0  # run again: node 3 is gone already
    again = json.loads(capsys.readouterr().out)
    assert again["steps"][-1] == "node 3 was not a member any more"
    assert fake.proposals == [("add", 4), ("promote", 4), ("remove", 3)]


_RESEED_KILLED = """
import os, signal, sys
from mqstore import config as cfg
from mqstore.ops import recover
from mqstore.store import LogStore
def die(self, *a, **k):
    os.kill(os.getpid(), signal.SIGKILL)  # power lost while the new snapshot's file is written
LogStore.copy_to = die
recover.force_new_cluster(cfg.load(sys.argv[1], check_tls=False), "drill")
"""


def test_force_new_cluster_killed_while_copying_its_snapshot_leaves_no_old_membership(tmp_path: Path) -> None:
    """The membership rewrite committed first and the snapshot metadata only after the copy: a
    run killed in between left the survivor leading {1} with a snapshot naming {1, 2, 3}, and a
    node `recover` added caught up from it counting the lost nodes as voters (its members
    differed from the leader's; once promoted, it would need their votes)."""
    c = LocalCluster(tmp_path, ["a", "b", "c"], cluster_id="c1")
    try:
        _running_with_mail(c, 10)
        c.kill(2)
        c.kill(3)
        c.stop(1)
        child = subprocess.run([sys.executable, "-c", _RESEED_KILLED, str(c.config_path(1))], env=c.env,
                               capture_output=True, timeout=120)
        assert child.returncode == -9, child.stderr
        c.start(1)
        assert c.wait_for_leader(among=[1], timeout=30) == 1
        new = c.add_node("b")
        proc = subprocess.Popen([sys.executable, "-m", "mqstore", "recover", "--config", str(c.config_path(new)),
                                 "--server", c.nodes[1].address, "--wait", "60", "--json"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=c.env)
        assert wait_until(lambda: (c.data_dir(new) / "data.mdb").exists(), 30)
        c.start(new)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err

        def voters(n: int) -> list[int] | None:
            st = c.status(n)
            return sorted(m["id"] for m in st["members"] if m["voter"]) if st else None

        assert wait_until(lambda: voters(new) == voters(1) == [1, new], 15), (voters(1), voters(new))
        with Client([c.nodes[1].address], timeout=15) as client:
            assert len(client.list(limit=100)) == 10
    finally:
        c.close()
