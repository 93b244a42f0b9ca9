"""Admin-CLI review (stop 31): bulk changes and listings that end early say how far they got, a
blank --server is refused, bounce reports the leased recipients it left, requeue counts only
what it changes, Ctrl-C keeps `queue list --all --json` one document, qshape --state checks its
namespace. Run in this process on embedded stores (cli.main), with the queue's calls patched
where a race or a lost cluster is simulated."""

from __future__ import annotations

import argparse
import json
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import mqstore
from mqstore import cli
from mqstore.api import QueueBase, Store
from mqstore.crypto import create_key_file
from mqstore.errors import InvalidArgument, NotFound, NotLeader, Unavailable
from mqstore.store import LogStore

RAW = b"From: a@example.org\r\nSubject: hi\r\n\r\nbody\r\n"


@pytest.fixture(autouse=True)
def _keep_sigpipe() -> Iterator[None]:
    """cli.main() run in this process makes SIGPIPE end it quietly: undone after."""
    handler = signal.getsignal(signal.SIGPIPE)
    yield
    signal.signal(signal.SIGPIPE, handler)


def _store(tmp_path: Path, n: int = 5, sender: str = "spam@bad.example") -> tuple[list[str], list[str]]:
    """An embedded store of ``n`` messages; returns the ids and the target options."""
    key = create_key_file(tmp_path / "kek.key")
    path = tmp_path / "store"
    with mqstore.open(path, key_file=key, background=False) as s:
        ids = s.enqueue_many([{"mail_from": sender, "recipients": [f"r{i}@x.example"], "data": RAW}
                              for i in range(n)])
    return ids, ["--data-dir", str(path), "--key-file", str(key)]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    """cli.main(argv + --json): exit code, the parsed stdout (one JSON document), stderr."""
    code = cli.main([*argv, "--json"])
    out, err = capsys.readouterr()
    return code, json.loads(out), err


def _held(target: list[str]) -> int:
    log = LogStore(Path(target[1]), key_file=target[3], readonly=True, create=False)
    try:
        return sum(1 for _ in QueueBase(log, lambda: 0.0).list(state="held", limit=1000))
    finally:
        log.close()


# --- 1: a message gone between list and get; a listing that fails ------------------------------------


def test_a_sender_filtered_hold_skips_a_message_deleted_while_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Until stop 31 a message listed and then deleted before its envelope was read aborted the
    whole `hold --sender` with a bare NotFound (exit 2, no summary) after holding part of them."""
    ids, target = _store(tmp_path)
    victim = ids[3]
    real_list = Store.list
    deleted: list[str] = []

    def list_then_delete(self: Store, *a: Any, **k: Any) -> Any:
        page = real_list(self, *a, **k)
        if not deleted and any(s.message_id == victim for s in page):
            self.delete(victim)  # another operator (or the MTA) removes it meanwhile
            deleted.append(victim)
        return page

    monkeypatch.setattr(Store, "list", list_then_delete)
    code, out, _ = _run(capsys, "hold", *target, "--sender", "spam@bad.example")
    assert code == 0, out
    assert (out["matched"], out["changed"], out["refused"]) == (4, 4, 0)
    assert "error" not in out
    assert _held(target) == 4


def test_queue_list_by_sender_skips_a_message_gone_before_its_envelope_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ids, target = _store(tmp_path)
    real_get = QueueBase.get

    def get(self: QueueBase, mid: str) -> Any:
        if mid == ids[1]:
            raise NotFound(f"no message {mid}")  # delivered and removed between list and get
        return real_get(self, mid)

    monkeypatch.setattr(QueueBase, "get", get)
    code, out, _ = _run(capsys, "queue", "list", *target, "--sender", "spam@bad.example", "--all")
    assert code == 0, out
    assert out["count"] == 4 and "error" not in out
    assert [m["message_id"] for m in out["messages"]] == [i for i in ids if i != ids[1]]


def _pages_then(error: BaseException, size: int = 2, pages: int = 1) -> Callable[..., Any]:
    """A list() that answers ``pages`` pages of ``size`` then raises ``error``."""
    real_list = QueueBase.list
    calls = {"n": 0}

    def fake(self: QueueBase, *a: Any, **k: Any) -> Any:
        calls["n"] += 1
        if calls["n"] > pages:
            raise error
        k["limit"] = size
        return real_list(self, *a, **k)

    return fake


def test_a_bulk_change_whose_listing_fails_still_prints_its_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, target = _store(tmp_path)
    monkeypatch.setattr(Store, "list", _pages_then(Unavailable("no leader")))
    code, out, _ = _run(capsys, "hold", *target, "--all")
    assert code == 2
    assert out["changed"] == 2 and out["error"] == "Unavailable" and out["message"] == "no leader"
    assert out["not_attempted"] is None  # selected by filter: the rest was not counted
    assert out["uncertain"] is None
    monkeypatch.setattr(Store, "list", _pages_then(Unavailable("no leader")))
    code = cli.main(["release", *target, "--all"])  # the human report, and the error on stderr
    text, err = capsys.readouterr()
    assert code == 2
    assert "release: changed 2 of 2 matching message(s)" in text and "STOPPED: Unavailable: no leader" in text
    assert "the rest of the selection not attempted" in text
    assert "mqstore: error: release stopped early: Unavailable: no leader" in err


# --- 2: the cluster lost part-way: stop, do not wait out every message -------------------------------


@pytest.mark.parametrize("by", ["ids", "filter"])
def test_a_bulk_change_stops_when_the_cluster_stops_answering(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], by: str
) -> None:
    """Until stop 31 each message after a lost quorum waited the whole --timeout and was counted as
    refused (exit 1): 10,000 messages at 15 s took 40 h."""
    ids, target = _store(tmp_path, n=6)
    real_delete = Store.delete
    calls: list[str] = []

    def delete(self: Store, mid: str, *a: Any, **k: Any) -> Any:
        calls.append(mid)
        if len(calls) >= 3:
            raise NotLeader("no leader answered (6 attempt(s) in 2 s); last: node 1 is not the leader")
        return real_delete(self, mid, *a, **k)

    monkeypatch.setattr(Store, "delete", delete)
    selection = ids if by == "ids" else ["--all"]
    code, out, _ = _run(capsys, "delete", *target, *selection)
    assert code == 2, out
    assert len(calls) == 3  # nothing tried after the first NotLeader
    assert (out["changed"], out["refused"], out["error"]) == (2, 0, "NotLeader")
    assert out["uncertain"] == ids[2]
    assert out["not_attempted"] == (3 if by == "ids" else None)


def test_a_stop_on_a_refusal_before_anything_was_done_names_no_uncertain_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ids, target = _store(tmp_path, n=3)

    def hold(self: Store, mid: str, *a: Any, **k: Any) -> None:
        raise Unavailable("refused before it was proposed", not_applied=True)

    monkeypatch.setattr(Store, "hold", hold)
    code = cli.main(["hold", *target, *ids])
    text, _ = capsys.readouterr()
    assert code == 2
    assert "hold: changed 0 of 1 matching message(s)" in text
    assert "2 message(s) not attempted" in text and "may or may not" not in text


def test_a_bulk_delete_stopped_says_the_last_message_may_or_may_not_be_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ids, target = _store(tmp_path, n=2)

    def delete(self: Store, mid: str, *a: Any, **k: Any) -> None:
        raise Unavailable("delete may or may not have been applied")

    monkeypatch.setattr(Store, "delete", delete)
    code = cli.main(["delete", *target, *ids])
    text, _ = capsys.readouterr()
    assert code == 2
    assert f"{ids[0]} may or may not have been deleted" in text
    assert "1 message(s) not attempted" in text


# --- 3: --server "" -------------------------------------------------------------------------------


def _server_commands() -> list[list[str]]:
    """Every subcommand (path of names) whose parser takes --server."""
    found: list[list[str]] = []

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*path, name])
            elif "--server" in action.option_strings:
                found.append(path)

    walk(cli.build_parser(), [])
    return found


def test_every_command_with_server_refuses_a_blank_one(capsys: pytest.CaptureFixture[str]) -> None:
    commands = _server_commands()
    assert ["hold"] in commands and ["recover"] in commands and ["cluster", "add"] in commands
    for path in commands:
        for blank in ("", "  "):
            with pytest.raises(SystemExit) as exited:
                cli.main([*path, "--server", blank, "--json"])
            assert exited.value.code == 2, path
            out, _ = capsys.readouterr()
            doc = json.loads(out)
            assert doc["error"] == "InvalidArgument" and "--server is empty" in doc["message"], (path, doc)


def test_hold_with_a_blank_server_leaves_the_local_store_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Until stop 31 `mqstore hold --server "$S" --all` with S empty held every message of
    ./mqstore-data (or $MQSTORE_DATA_DIR), exit 0."""
    _, target = _store(tmp_path)
    monkeypatch.setenv("MQSTORE_DATA_DIR", target[1])
    monkeypatch.delenv("MQSTORE_SERVER", raising=False)
    with pytest.raises(SystemExit) as exited:
        cli.main(["hold", "--server", "", "--all"])
    assert exited.value.code == 2
    assert "--server is empty" in capsys.readouterr().err
    assert _held(target) == 0


def test_a_blank_server_in_a_namespace_built_by_hand_is_refused() -> None:
    from mqstore.commands import ops

    with pytest.raises(InvalidArgument, match="--server is empty"):
        ops._remote(argparse.Namespace(server=" ", data_dir=None, config=None))
    with pytest.raises(InvalidArgument, match="--server is empty"):
        ops.cmd_cluster(argparse.Namespace(server="", cluster_command="snapshot", json=True, timeout=1.0))


# --- 4: bounce and leased recipients ---------------------------------------------------------------


def test_bounce_counts_the_leased_recipients_of_messages_it_leaves_unchanged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = create_key_file(tmp_path / "kek.key")
    path = tmp_path / "store"
    with mqstore.open(path, key_file=key, background=False) as s:
        s.enqueue(mail_from="a@x.example", recipients=["r1@y.example", "r2@y.example"], data=RAW)
        s.lease("w", max_messages=1, lease_seconds=600)
        s.enqueue(mail_from="a@x.example", recipients=["r3@y.example", "r4@y.example"], data=RAW)
        s.lease("w", max_messages=1, lease_seconds=600)
        s.enqueue(mail_from="a@x.example", recipients=["r5@y.example"], data=RAW)
    target = ["--data-dir", str(path), "--key-file", str(key)]
    code = cli.main(["bounce", *target, "--all", "--reason", "550 given up"])
    text, _ = capsys.readouterr()
    assert code == 0
    assert "bounce: changed 1 of 3 matching message(s), 2 needed no change" in text
    assert "1 recipient(s) bounced; 4 leased recipient(s) left to their worker" in text
    code, out, _ = _run(capsys, "bounce", *target, "--all")
    assert code == 0
    assert (out["changed"], out["unchanged"], out["bounced_recipients"], out["left_leased"]) == (0, 3, 0, 4)


# --- 5: Ctrl-C during queue list --all --json --------------------------------------------------------


def test_ctrl_c_during_a_streamed_json_listing_ends_one_valid_document(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Until stop 31 stdout was the cut-off {"messages": [ ... followed by a second object."""
    ids, target = _store(tmp_path, n=5)
    monkeypatch.setattr(QueueBase, "list", _pages_then(KeyboardInterrupt(), size=2, pages=2))
    code, out, _ = _run(capsys, "queue", "list", *target, "--all")  # json.loads: one document
    assert code == 130
    assert out["count"] == 4 and out["next_after"] == ids[3]
    assert (out["error"], out["message"]) == ("Interrupted", "interrupted (Ctrl-C)")
    assert [m["message_id"] for m in out["messages"]] == ids[:4]


# --- 6: requeue counts only what it changes ----------------------------------------------------------


def test_requeue_of_already_due_recipients_changes_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = create_key_file(tmp_path / "kek.key")
    path = tmp_path / "store"
    with mqstore.open(path, key_file=key, background=False) as s:
        ids = [s.enqueue(mail_from="a@x.example", recipients=[f"b{i}@y.example"], data=RAW) for i in range(3)]
        for lease in s.lease("w", max_messages=3):
            s.defer(lease.token, reason="451 later")
    target = ["--data-dir", str(path), "--key-file", str(key)]

    def last_index() -> int:
        log = LogStore(path, key_file=key, readonly=True, create=False)
        try:
            return int(log.last_index)
        finally:
            log.close()

    code, out, _ = _run(capsys, "requeue", *target, "--all")
    assert (code, out["changed"], out["unchanged"]) == (0, 3, 0)
    before = last_index()
    code, out, _ = _run(capsys, "requeue", *target, "--all", "--dry-run")
    assert (code, out["would_change"], out["unchanged"]) == (0, 0, 3)
    code = cli.main(["requeue", *target, "--all"])
    text, _ = capsys.readouterr()
    assert code == 0 and "requeue: changed 0 of 3 matching message(s), 3 needed no change" in text
    code, out, _ = _run(capsys, "requeue", *target, ids[0])
    assert (code, out["changed"], out["unchanged"]) == (0, 0, 1)
    assert last_index() == before  # no REQUEUE entry written (nor audited) for what was already due


# --- 7: qshape --state checks its namespace ---------------------------------------------------------


@pytest.mark.parametrize("namespace", ["bad ns", "x" * 300])
def test_qshape_by_state_refuses_an_invalid_namespace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], namespace: str
) -> None:
    from mqstore.ops.inspect import qshape_by_state

    _, target = _store(tmp_path, n=1)
    for state in ("queued", "deferred", "held"):
        code, out, _ = _run(capsys, "qshape", *target, "--namespace", namespace, "--state", state)
        assert code == 2 and out["error"] == "InvalidArgument" and "is not valid" in out["message"]
    log = LogStore(Path(target[1]), key_file=target[3], readonly=True, create=False)
    try:  # the node's StateShape calls this function with the request's namespace
        with pytest.raises(InvalidArgument):
            qshape_by_state(log, namespace, "queued", 0)
        assert qshape_by_state(log, "default", "queued", 0)["total"] is not None
    finally:
        log.close()


def test_requeue_over_a_node_works_for_an_identity_limited_to_a_namespace(tmp_path: Path) -> None:
    """requeue --server reads the queue's time first (to count only what it changes); that read
    (Stats) needs every namespace, so an admin limited to one namespace, which may hold and
    release there, had its requeue refused before anything was done."""
    import os
    import subprocess
    import sys

    from mqstore.client import Client
    from mqstore.testing.secure import InProcessCluster, Pki

    pki = Pki(tmp_path / "pki")
    cluster = InProcessCluster(tmp_path / "c", ["a"], pki=pki)
    try:
        addr = cluster.address(1)
        cluster.leader()
        full = pki.client("root", ["admin", "producer", "worker"])
        with Client(addr, tls=pki.client_tls(full)) as client:
            mid = client.enqueue(mail_from="a@example.org", recipients=["b@example.net"], data=b"x", namespace="ns1")
            lease = client.lease("w", max_messages=1)[0]
            client.defer(lease.token, reason="4.0.0 try later")
        scoped = pki.client("ops-ns1", ["admin"], namespaces=["ns1"])
        env = dict(os.environ, MQSTORE_CA=str(pki.ca_pem), MQSTORE_CERT=str(scoped.cert), MQSTORE_KEY=str(scoped.key))
        done = subprocess.run([sys.executable, "-m", "mqstore", "requeue", "--server", addr, "--timeout", "10",
                               "--json", mid], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        assert json.loads(done.stdout)["changed"] == 1
        with Client(addr, tls=pki.client_tls(full)) as client:
            assert [lease.message_id for lease in client.lease("w", max_messages=5)] == [mid]  # due again
    finally:
        cluster.close()
