"""``mqstore recover`` checks the placement rules on every step of its plan before it does
anything: a replacement whose site breaks them (node 3 of site c lost, node 4 put in site a) was
added, caught up and promoted, and only removing node 3 was refused, leaving four voters (one
dead) and a re-run that repeated every step and failed again."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mqstore.consensus.raft import next_conf_state
from mqstore.consensus.types import ConfChange, ConfChangeItem, ConfChangeType, ConfState, InvalidConfig
from mqstore.errors import MQStoreError


class _PlacementCluster:
    """The leader as ``recover`` sees it through ``mqstore.ops.remote``, refusing a membership
    change as the real leader does (``next_conf_state``)."""

    def __init__(self, members: list[tuple[int, str]], min_sites: int = 1) -> None:
        self.conf = ConfState(voters=frozenset(n for n, _ in members), sites=tuple(sorted(members)),
                              min_sites=min_sites)
        self.proposals: list[tuple[str, int]] = []
        self.removed: list[int] = []

    def leader_status(self, client: Any, first: Any = None) -> dict[str, Any]:
        members = [{"id": n, "site": s, "address": f"127.0.0.1:{n}", "voter": n in self.conf.voters,
                    "match_index": 10} for n, s in self.conf.sites]
        return {"node_id": 1, "term": 2, "role": "leader", "cluster_id": "c1", "removed_ids": list(self.removed),
                "commit_index": 10, "min_sites": self.conf.min_sites, "members": members}

    def change_membership(self, client: Any, op: str, node_id: int, site: str = "", address: str = "") -> list[Any]:
        self.proposals.append((op, node_id))
        kind = {"add": ConfChangeType.ADD_LEARNER, "promote": ConfChangeType.ADD_VOTER,
                "remove": ConfChangeType.REMOVE}[op]
        try:
            self.conf = next_conf_state(self.conf, ConfChange(items=(ConfChangeItem(kind, node_id, site),)))
        except InvalidConfig as exc:
            raise MQStoreError(str(exc)) from None
        if op == "remove":
            self.removed.append(node_id)
        return []


@pytest.fixture(autouse=True)
def _keep_sigpipe() -> Iterator[None]:
    handler = signal.getsignal(signal.SIGPIPE)
    yield
    signal.signal(signal.SIGPIPE, handler)


def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
         fake: _PlacementCluster, node: int, site: str, replace: int) -> tuple[int, dict[str, Any], list[str]]:
    from mqstore import cli
    from mqstore.ops import recover, remote

    monkeypatch.setattr(remote, "leader_status", fake.leader_status)
    monkeypatch.setattr(remote, "change_membership", fake.change_membership)
    monkeypatch.setattr(recover, "_POLL_S", 0.01, raising=False)
    monkeypatch.setattr(recover, "REFUSED_CHANGE_SHOWS_WITHIN_S", 0.1, raising=False)
    prepared: list[str] = []
    monkeypatch.setattr("mqstore.node.runtime.prepare_join", lambda config, cluster_id: prepared.append(cluster_id))
    conf = tmp_path / f"node{node}.toml"
    conf.write_text(f'node_id = {node}\nsite = "{site}"\nlisten = "127.0.0.1:{node}"\n'
                    f'data_dir = "{tmp_path / f"n{node}"}"\nkey_file = "{tmp_path / "kek.key"}"\n'
                    'insecure = true\n[[peers]]\nid = 1\nsite = "a"\naddress = "127.0.0.1:1"\n')
    code = cli.main(["recover", "--config", str(conf), "--server", "127.0.0.1:1", "--wait", "5", "--json",
                     "--replace", str(replace)])
    return code, json.loads(capsys.readouterr().out), prepared


def test_a_replacement_whose_site_breaks_the_placement_is_refused_before_anything_is_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = _PlacementCluster([(1, "a"), (2, "b"), (3, "c")])
    code, out, prepared = _run(tmp_path, monkeypatch, capsys, fake, 4, "a", 3)
    assert code == 2, out
    assert out["error"] == "InvalidArgument", out
    assert "replacing node 3 by node 4 in site 'a' would break the placement rules" in out["message"], out
    assert "site 'a' holds 2 of the 3 voters, a majority" in out["message"], out
    assert "nothing was done" in out["message"], out
    assert fake.proposals == [] and prepared == []  # not added, not promoted: the cluster as it was
    assert sorted(fake.conf.voters) == [1, 2, 3] and not fake.conf.learners


def test_a_replacement_the_promoted_step_would_break_removes_the_lost_node_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Four voters, two in site a: replacing node 1 (site a) by node 5 in site a ends valid, but
    five voters with three in site a are not: node 1 is removed first, then node 5 promoted."""
    fake = _PlacementCluster([(1, "a"), (2, "a"), (3, "b"), (4, "c")])
    code, out, _ = _run(tmp_path, monkeypatch, capsys, fake, 5, "a", 1)
    assert code == 0, out
    assert fake.proposals == [("add", 5), ("remove", 1), ("promote", 5)]
    assert sorted(fake.conf.voters) == [2, 3, 4, 5] and not fake.conf.learners
    assert any(s.startswith("removed node 1 (its id is never reused) before promoting") for s in out["steps"]), out


def test_a_replacement_no_order_of_single_steps_reaches_is_refused_before_anything_is_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two sites of two voters: node 5 (site a) for node 1 (site a) ends valid, but five voters
    with three in a, or three with two in b, are not: refused up front, naming the step."""
    fake = _PlacementCluster([(1, "a"), (2, "a"), (3, "b"), (4, "b")])
    code, out, prepared = _run(tmp_path, monkeypatch, capsys, fake, 5, "a", 1)
    assert code == 2, out
    assert "ends in a valid membership" in out["message"], out
    assert "site 'a' holds 3 of the 5 voters" in out["message"], out
    assert fake.proposals == [] and prepared == []
