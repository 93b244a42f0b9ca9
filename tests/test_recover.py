"""``mqstore recover`` as an operator runs it (the installed command, ``--json`` parsed), against
real node processes: ``--force-new-cluster`` on a survivor whose log holds committed writes after
a membership change it had not applied."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mqstore.client import Client
from mqstore.codec import RecordType
from mqstore.consensus.raft import encode_conf_change
from mqstore.consensus.types import ConfChange, ConfChangeItem, ConfChangeType, HardState
from mqstore.ids import format_id
from mqstore.node.raftlog import LmdbRaftStorage
from mqstore.store import LogStore, NewMessage
from mqstore.testing.cluster import LocalCluster

RAW = b"Subject: x\r\n\r\nbody\r\n"


def ok(c: LocalCluster, *args: str) -> Any:
    out = c.mqstore(*args, "--json")
    assert out.returncode == 0, f"mqstore {' '.join(args)} -> {out.returncode}\n{out.stdout}\n{out.stderr}"
    return json.loads(out.stdout)


@pytest.fixture
def survivor(tmp_path: Path) -> Iterator[LocalCluster]:
    """A one-node cluster with mail in it, stopped."""
    c = LocalCluster(tmp_path, ["a"], cluster_id="c1")
    try:
        c.bootstrap()
        c.start_all()
        c.wait_for_leader()
        with Client(c.addresses(), timeout=15) as client:
            client.enqueue_many([{"mail_from": "a@example.org", "recipients": [f"r{i}@d.example"], "data": RAW}
                                 for i in range(5)])
        c.wait_converged()
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
    entry = ok(c, "recover", "--force-new-cluster", "--config", str(c.config_path(1)), "--reason", "test",
               "--i-understand-acknowledged-writes-may-be-lost")
    assert entry["config_replaced"] == [config_index] and entry["log_cut_from"] is None
    human = (c.data_dir(1) / "RECOVERY.log").read_text()
    assert f'"config_replaced": [{config_index}]' in human
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
