"""The operator commands (mqstore/commands/ops.py), run as the installed ``mqstore`` command against
real data dirs (embedded stores) and a real 3-node cluster: every command, its ``--json`` output
parsed, its exit codes (0 ok, 1 a problem found, 2 an error)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest

import mqstore
from mqstore.client import Client
from mqstore.crypto import create_key_file
from mqstore.ids import format_id, parse_id
from mqstore.testing.cluster import LocalCluster


def run(*args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("mqstore", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "mqstore"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, input=stdin)


def run_bytes(*args: str) -> bytes:
    """stdout as bytes (``--raw``)."""
    exe = shutil.which("mqstore", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "mqstore"]
    out = subprocess.run([*cmd, *args], capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def ok(*args: str, stdin: str | None = None, code: int = 0) -> Any:
    """Run with --json; check the exit code; return the parsed output."""
    out = run(*args, "--json", stdin=stdin)
    assert out.returncode == code, f"mqstore {' '.join(args)} -> {out.returncode}\n{out.stdout}\n{out.stderr}"
    return json.loads(out.stdout)


def fails(*args: str) -> dict[str, Any]:
    """An error (exit 2) reported as JSON."""
    out = run(*args, "--json")
    assert out.returncode == 2, f"mqstore {' '.join(args)} -> {out.returncode}\n{out.stdout}\n{out.stderr}"
    result: dict[str, Any] = json.loads(out.stdout)
    return result


RAW = b"From: a@example.org\r\nSubject: hello\r\n\r\nbody\r\n"


def _build_store(path: Path, key: Path) -> dict[str, list[str]]:
    """An embedded store with messages in every interesting state."""
    made: dict[str, list[str]] = {}
    with mqstore.open(path, key_file=key, background=False) as store:
        made["plain"] = store.enqueue_many([
            {"mail_from": f"sender{i % 2}@example.org", "recipients": [f"u{i}@d{i % 3}.example"], "data": RAW}
            for i in range(12)
        ])
        made["bulk"] = store.enqueue_many([
            {"mail_from": "news@example.org", "recipients": [f"n{i}@news.example", f"m{i}@d0.example"],
             "data": RAW, "namespace": "bulk"}
            for i in range(5)
        ])
        leases = store.lease("w1", max_messages=6, namespace="default")
        for i, lease in enumerate(leases):
            if i % 2:
                store.defer(lease.token, reason="451 4.7.1 try later")
            else:
                store.ack(lease.token)
        made["deferred"] = [lease.message_id for i, lease in enumerate(leases) if i % 2]
        made["delivered"] = [lease.message_id for i, lease in enumerate(leases) if not i % 2]
        store.hold(made["bulk"][0])
    return made


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, dict[str, list[str]]]]:
    """A read-only store shared by the inspection tests."""
    root = tmp_path_factory.mktemp("shop")
    key = create_key_file(root / "kek.key")
    made = _build_store(root / "store", key)
    yield root / "store", key, made


@pytest.fixture
def fresh(tmp_path: Path) -> tuple[Path, Path, dict[str, list[str]]]:
    """A store of its own for a test that changes it."""
    key = create_key_file(tmp_path / "kek.key")
    made = _build_store(tmp_path / "store", key)
    return tmp_path / "store", key, made


HELP = [
    ["status"], ["queue", "list"], ["message", "show"], ["qshape"], ["hold"], ["release"], ["requeue"], ["delete"],
    ["bounce"], ["verify"], ["repair"], ["backup"], ["restore"], ["recover"], ["cluster", "add"],
    ["cluster", "promote"], ["cluster", "remove"], ["cluster", "transfer-leader"],
]


def test_every_command_has_help() -> None:
    for args in HELP:
        out = run(*args, "--help")
        assert out.returncode == 0 and "usage: mqstore" in out.stdout, (args, out.stderr)


def test_status_offline(shop: tuple[Path, Path, dict[str, list[str]]]) -> None:
    path, _key, _made = shop
    st = ok("status", "--data-dir", str(path))
    assert st["kind"] == "embedded" and st["role"] == "stopped"
    assert st["stats"]["messages"] == 17 and st["stats"]["recipients"]["delivered"] == 3
    assert st["stats"]["recipients"]["deferred"] == 3 and st["last_index"] >= 17
    assert st["disk_used_bytes"] > 0 and st["quarantined"] == 0
    human = run("status", "--data-dir", str(path))
    assert human.returncode == 0 and "embedded store" in human.stdout and "recipients:" in human.stdout
    assert fails("status", "--data-dir", str(path.parent / "nothing"))["error"] == "NotFound"
    assert fails("status", "--data-dir", str(path), "--server", "127.0.0.1:1")["error"] == "InvalidArgument"


def test_queue_list_filters_and_paging(shop: tuple[Path, Path, dict[str, list[str]]]) -> None:
    path, key, made = shop
    base = ("queue", "list", "--data-dir", str(path), "--key-file", str(key))
    every = ok(*base, "--limit", "1000")
    assert every["count"] == 17 and every["next_after"] is None
    ids = [m["message_id"] for m in every["messages"]]
    assert ids == sorted(ids)
    assert {m["message_id"] for m in ok(*base, "--state", "deferred")["messages"]} == set(made["deferred"])
    assert {m["message_id"] for m in ok(*base, "--state", "held")["messages"]} == {made["bulk"][0]}
    assert {m["message_id"] for m in ok(*base, "--namespace", "bulk")["messages"]} == set(made["bulk"])
    d1 = ok(*base, "--domain", "d1.example")["messages"]
    assert len(d1) == 4
    senders = ok(*base, "--sender", "SENDER1@example.org")["messages"]
    assert len(senders) == 6
    assert ok(*base, "--older-than", "1h")["count"] == 0
    assert ok(*base, "--newer-than", "1h")["count"] == 17
    target = made["bulk"][2]
    for n in (26, 24, 20, 10):
        prefix = target[:n]
        got = [m["message_id"] for m in ok(*base, "--id-prefix", prefix.lower())["messages"]]
        assert target in got and all(g.startswith(prefix) for g in got)
        assert got == [i for i in ids if i.startswith(prefix)]
    # Paging: 5 at a time walks every message once, in order.
    seen: list[str] = []
    after: list[str] = []
    while True:
        page = ok(*base, "--limit", "5", *after)
        seen += [m["message_id"] for m in page["messages"]]
        if page["next_after"] is None:
            break
        after = ["--after", page["next_after"]]
    assert seen == ids
    # --all streams the whole listing as one JSON document.
    streamed = ok(*base, "--all", "--domain", "d0.example")
    assert streamed["count"] == len(streamed["messages"]) == 9
    human = run(*base, "--limit", "3")
    assert human.returncode == 0 and "--after" in human.stdout and "NAMESPACE" in human.stdout
    assert fails(*base, "--id-prefix", "!!")["error"] == "InvalidArgument"
    assert fails(*base, "--state", "nonsense")["error"] == "InvalidArgument"


def test_message_show_raw_history_and_qshape(shop: tuple[Path, Path, dict[str, list[str]]], tmp_path: Path) -> None:
    path, key, made = shop
    mid = made["deferred"][0]
    shown = ok("message", "show", mid, "--data-dir", str(path), "--key-file", str(key))
    assert shown["message_id"] == mid and shown["stored"] and shown["mail_from"].endswith("@example.org")
    assert [r["state"] for r in shown["recipients"]] == ["deferred"]
    assert shown["recipients"][0]["last_reason"] == "451 4.7.1 try later"
    events = [e["event"] for e in shown["history"]["events"]]
    assert events == ["enqueued", "leased", "deferred"]
    assert run_bytes("message", "show", mid, "--data-dir", str(path), "--key-file", str(key), "--raw") == RAW
    out = tmp_path / "m.eml"
    assert run("message", "show", mid, "--data-dir", str(path), "--key-file", str(key), "--raw", "--out",
               str(out)).returncode == 0
    assert out.read_bytes() == RAW
    human = run("message", "show", mid, "--data-dir", str(path), "--key-file", str(key))
    assert "RECIPIENT" in human.stdout and "deferred" in human.stdout and "history:" in human.stdout
    missing = format_id(b"\x00" * 15 + b"\x01")
    assert fails("message", "show", missing, "--data-dir", str(path), "--key-file", str(key))["error"] == "NotFound"
    wrong_key = create_key_file(tmp_path / "other.key")
    assert fails("message", "show", mid, "--data-dir", str(path), "--key-file", str(wrong_key))["error"] == "WrongKey"
    shape = ok("qshape", "--data-dir", str(path), "--key-file", str(key))
    # Waiting: 6 queued + 3 deferred in default, 8 queued in bulk (the held message's 2 are not waiting).
    assert sum(shape["total"]) == 17 and shape["buckets_minutes"][0] == "0-5"
    assert sum(shape["domains"]["news.example"]) == 4
    assert sum(ok("qshape", "--data-dir", str(path), "--key-file", str(key), "--namespace", "bulk")["total"]) == 8
    # Like Postfix's "qshape deferred": one kind of waiting recipient at a time.
    by_state = {s: ok("qshape", "--data-dir", str(path), "--key-file", str(key), "--state", s)
                for s in ("queued", "deferred", "held")}
    assert [sum(by_state[s]["total"]) for s in ("queued", "deferred", "held")] == [14, 3, 2]
    assert set(by_state["held"]["domains"]) == {"news.example", "d0.example"}
    human = run("qshape", "--data-dir", str(path), "--key-file", str(key), "--state", "deferred")
    assert human.returncode == 0 and "deferred recipients by domain" in human.stdout


def test_bulk_changes_by_id_and_by_filter(fresh: tuple[Path, Path, dict[str, list[str]]]) -> None:
    path, key, made = fresh
    target = ("--data-dir", str(path), "--key-file", str(key))
    plain = made["plain"]
    queued = [m for m in plain if m not in made["deferred"] + made["delivered"]]
    # By ids (arguments): a dry run counts and changes nothing.
    dry = ok("hold", *queued[:3], *target, "--dry-run")
    assert dry["would_change"] == 3 and dry["changed"] == 0
    assert ok("queue", "list", *target, "--state", "held")["count"] == 1
    done = ok("hold", *queued[:3], *target)
    assert done["changed"] == 3 and done["refused"] == 0
    assert ok("queue", "list", *target, "--state", "held")["count"] == 4
    # Ids from stdin; the already-held ones need no change.
    again = ok("hold", "-", *target, stdin="\n".join(queued[:4]) + "\n")
    assert again["matched"] == 4 and again["changed"] == 1 and again["unchanged"] == 3
    # By filter: release every held message.
    released = ok("release", *target, "--state", "held")
    assert released["changed"] == 5 and ok("queue", "list", *target, "--state", "held")["count"] == 0
    # Requeue: only messages with deferred recipients change.
    assert ok("requeue", *target, "--all", "--dry-run")["would_change"] == 3
    assert ok("requeue", *target, "--namespace", "default")["changed"] == 3
    # Delete by filter.
    assert ok("delete", *target, "--namespace", "bulk", "--dry-run")["would_change"] == 5
    deleted = ok("delete", *target, "--namespace", "bulk")
    assert deleted["changed"] == 5 and ok("queue", "list", *target, "--namespace", "bulk")["count"] == 0
    # A missing id is counted and makes the exit code 1; a malformed one changes nothing at all.
    missing = format_id(b"\x00" * 15 + b"\x02")
    partial = ok("hold", queued[5], missing, *target, code=1)
    assert partial["changed"] == 1 and partial["missing"] == 1
    assert fails("release", queued[5], "not-an-id", *target)["error"] == "InvalidArgument"
    assert ok("queue", "list", *target, "--state", "held")["count"] == 1
    # No selection at all is refused (a bare "delete" must never mean "everything").
    assert fails("delete", *target)["error"] == "InvalidArgument"
    assert fails("hold", queued[0], *target, "--state", "queued")["error"] == "InvalidArgument"
    # Bounce: the dry run counts the messages with a queued or deferred recipient (12 in default,
    # 3 of them delivered) and changes nothing; the real run bounces them with the reason.
    dry = ok("bounce", *target, "--namespace", "default", "--dry-run")
    assert (dry["would_change"], dry["unchanged"], dry["changed"]) == (9, 3, 0)
    assert ok("queue", "list", *target, "--state", "bounced")["count"] == 0
    one = ok("bounce", queued[4], *target, "--reason", "550 5.7.1 spam run")
    assert (one["changed"], one["bounced_recipients"], one["left_leased"]) == (1, 1, 0)
    shown = ok("message", "show", queued[4], *target)
    assert shown["recipients"][0]["state"] == "bounced"
    assert shown["recipients"][0]["last_reason"] == "550 5.7.1 spam run"
    assert shown["history"]["events"][-1]["event"] == "bounced by the operator"
    rest = ok("bounce", *target, "--namespace", "default")
    assert (rest["changed"], rest["unchanged"], rest["bounced_recipients"]) == (8, 4, 8)
    assert ok("queue", "list", *target, "--state", "bounced")["count"] == 9
    assert ok("bounce", *target, "--namespace", "default", "--dry-run")["would_change"] == 0
    human = run("bounce", *target, "--all")
    assert human.returncode == 0 and human.stdout.startswith("bounce: changed 0 of ")
    verified = ok("verify", *target)  # the log replays to the same state
    assert verified["clean"] and verified["replayed"]
    human = run("hold", *target, "--domain", "d2.example", "--dry-run")
    assert human.returncode == 0 and human.stdout.startswith("dry run: hold would change")


def test_qshape_top_takes_a_count_of_domains(shop: tuple[Path, Path, dict[str, list[str]]]) -> None:
    path, key, _made = shop
    target = ("--data-dir", str(path), "--key-file", str(key))
    every = ok("qshape", *target, "--top", "0")
    assert len(every["domains"]) > 1
    human = run("qshape", *target, "--top", "1")
    assert human.returncode == 0 and f"... {len(every['domains']) - 1} more domain(s)" in human.stdout
    for bad in ("-1", "-5", "x"):
        out = run("qshape", *target, "--top", bad)
        assert out.returncode == 2 and "argument --top" in out.stderr and "0 or more" in out.stderr, out.stderr
        assert out.stdout == ""


@pytest.mark.parametrize("op", ["hold", "release", "requeue", "delete"])
@pytest.mark.parametrize("dry_run", [False, True])
def test_bulk_changes_on_a_dir_without_a_store_create_nothing(tmp_path: Path, op: str, dry_run: bool) -> None:
    typo = tmp_path / "typo"
    out = run(op, "--data-dir", str(typo), "--all", *(["--dry-run"] if dry_run else []))
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr == f"mqstore: error: no mqstore store at {typo}\n"
    assert not typo.exists()


def test_bulk_changes_on_a_cluster_node_data_dir_are_refused_dry_run_or_not(tmp_path: Path) -> None:
    data = tmp_path / "n1"
    conf = tmp_path / "n1.toml"
    conf.write_text(f'node_id = 1\nsite = "a"\nlisten = "127.0.0.1:1"\ndata_dir = "{data}"\ninsecure = true\n'
                    f'key_file = "{create_key_file(tmp_path / "kek.key")}"\n')
    assert run("bootstrap", "--config", str(conf), "--cluster-id", "c1").returncode == 0
    for dry_run in ((), ("--dry-run",)):
        for target in (("--data-dir", str(data), "--key-file", str(tmp_path / "kek.key")), ("--config", str(conf))):
            refused = fails("hold", *target, "--all", *dry_run)
            assert "is the data dir of a cluster node" in refused["message"], (target, dry_run, refused)


def _locked_store(path: Path, key: Path) -> dict[str, str]:
    """A store with a message under COMPLIANCE retention, one under a legal hold (GOVERNANCE),
    one under GOVERNANCE retention only and one unprotected."""
    with mqstore.open(path, key_file=key, background=False) as store:
        store.set_policy("locked", mode="compliance", retention_days=1)
        store.set_policy("gov", mode="governance", retention_days=1)
        made = {
            "compliance": store.enqueue(mail_from="a@example.org", recipients=["x@example.net"], data=RAW,
                                        namespace="locked"),
            "legal_hold": store.enqueue(mail_from="a@example.org", recipients=["y@example.net"], data=RAW,
                                        namespace="gov"),
            "governance": store.enqueue(mail_from="a@example.org", recipients=["z@example.net"], data=RAW,
                                        namespace="gov"),
            "plain": store.enqueue(mail_from="a@example.org", recipients=["w@example.net"], data=RAW),
        }
        store.add_legal_hold(made["legal_hold"], case="CASE-1")
    return made


def test_bulk_delete_dry_run_counts_what_retention_and_legal_holds_refuse(tmp_path: Path) -> None:
    key = create_key_file(tmp_path / "kek.key")
    made = _locked_store(tmp_path / "store", key)
    target = ("--data-dir", str(tmp_path / "store"), "--key-file", str(key))
    dry = ok("delete", *target, "--all", "--dry-run", code=1)
    assert (dry["matched"], dry["would_change"], dry["refused"]) == (4, 1, 3)
    refused = {r["message_id"]: r for r in dry["refusals"]}
    assert set(refused) == {made["compliance"], made["legal_hold"], made["governance"]}
    assert "COMPLIANCE retention until" in refused[made["compliance"]]["message"]
    assert "legal hold(s) CASE-1" in refused[made["legal_hold"]]["message"]
    assert "GOVERNANCE retention until" in refused[made["governance"]]["message"]
    assert {r["error"] for r in dry["refusals"]} == {"Immutable"}
    human = run("delete", *target, "--all", "--dry-run")
    assert human.returncode == 1
    assert human.stdout.startswith("dry run: delete would change 1 of 4 matching message(s), 3 would be REFUSED\n")
    # By ids too; with the governance bypass (and a reason), only the governance-only one is let through.
    by_id = ok("delete", made["governance"], made["legal_hold"], *target, "--dry-run", "--bypass-governance",
               "--reason", "court order", code=1)
    assert (by_id["would_change"], by_id["refused"]) == (1, 1)
    assert [r["message_id"] for r in by_id["refusals"]] == [made["legal_hold"]]
    assert ok("delete", made["plain"], *target, "--dry-run")["would_change"] == 1
    # Nothing changed; the real run does what the dry run said, refusals included.
    real = ok("delete", *target, "--all", code=1)
    assert (real["changed"], real["refused"]) == (dry["would_change"], dry["refused"])
    assert {r["message_id"] for r in real["refusals"]} == set(refused)


def test_a_dry_run_through_a_node_judges_retention_at_the_leaders_compliance_time(tmp_path: Path) -> None:
    # The leader's clock is two days behind this host's: a message locked for a day is still
    # locked there. The dry run used to judge it by this host's clock and say it would go.
    from mqstore.testing.secure import InProcessCluster

    cluster = InProcessCluster(tmp_path, ["a"], node_options={1: {"clock": lambda: time.time() - 2 * 86400}})
    try:
        queue = cluster.leader().queue
        queue.set_policy("locked", mode="compliance", retention_days=1)
        mid = queue.enqueue(mail_from="a@example.org", recipients=["x@example.net"], data=RAW, namespace="locked")
        plain = queue.enqueue(mail_from="a@example.org", recipients=["w@example.net"], data=RAW)
        server = ("--server", cluster.address(1))
        dry = ok("delete", mid, plain, *server, "--dry-run", code=1)
        assert (dry["would_change"], dry["refused"]) == (1, 1)
        assert [r["message_id"] for r in dry["refusals"]] == [mid]
        assert "COMPLIANCE retention until" in dry["refusals"][0]["message"]
        real = ok("delete", mid, plain, *server, code=1)
        assert (real["changed"], real["refused"]) == (dry["would_change"], dry["refused"])
    finally:
        cluster.close()


def _tamper(path: Path, table: bytes) -> bytes:
    """Delete the first entry of a state table behind mqstore's back; returns its key."""
    env = lmdb.open(str(path), max_dbs=64, create=False)
    try:
        db = env.open_db(table, create=False)
        with env.begin(write=True) as txn:
            key = bytes(next(iter(txn.cursor(db=db)))[0])
            txn.delete(key, db=db)
        return key
    finally:
        env.close()


def _corrupt(path: Path, index: int) -> None:
    env = lmdb.open(str(path), max_dbs=64, create=False)
    try:
        db = env.open_db(b"log", create=False)
        with env.begin(write=True) as txn:
            stored = txn.get(index.to_bytes(8, "big"), db=db)
            assert stored is not None
            raw = bytearray(stored)
            raw[-1] ^= 0x40
            txn.put(index.to_bytes(8, "big"), bytes(raw), db=db)
    finally:
        env.close()


def test_verify_names_problems_and_repair_rebuilds_state(fresh: tuple[Path, Path, dict[str, list[str]]]) -> None:
    path, key, made = fresh
    target = ("--data-dir", str(path), "--key-file", str(key))
    clean = ok("verify", *target)
    assert clean["clean"] and clean["replayed"] and clean["messages_checked"] == 17
    assert clean["sealed_checked"] >= 17 and clean["problems"] == []
    # A lost index entry: named by the state check and by the replay.
    _tamper(path, b"ready")
    report = ok("verify", *target, code=1)
    tables = {p.get("table") for p in report["problems"]}
    assert "ready" in tables and report["problems_by_check"].keys() >= {"state", "replay"}
    human = run("verify", *target)
    assert human.returncode == 1 and "NOT CLEAN" in human.stdout and "ready" in human.stdout
    assert ok("repair", *target, "--rebuild-state", "--dry-run")["rebuild_state"]["possible"] is True
    rebuilt = ok("repair", *target, "--rebuild-state")
    assert rebuilt["rebuild_state"]["rebuilt"] and rebuilt["unresolved"] == []
    assert ok("verify", *target)["clean"]
    # A damaged record: named by index; an embedded store has no replica to repair it from.
    index = ok("message", "show", made["plain"][-1], *target)["history"]["events"][0]["index"]
    _corrupt(path, index)
    damaged = ok("verify", *target, code=1)
    assert {"check": "records", "index": index} in [{k: p[k] for k in ("check", "index")} for p in damaged["problems"]]
    assert "damaged records must be repaired first" in damaged["replay_note"]
    unrepaired = ok("repair", *target, code=1)
    assert unrepaired["unresolved"] == [index]
    assert any("no peers" in n for n in unrepaired["notes"])
    assert fails("repair", *target, "--no-scan", "--index", str(index), "--rebuild-state")["error"] == "Corruption"
    assert ok("status", "--data-dir", str(path))["quarantined"] == 1


def test_rebuild_state_over_damaged_records_names_a_command_that_exists(
    fresh: tuple[Path, Path, dict[str, list[str]]],
) -> None:
    """The refusal of --rebuild-state while records are damaged tells the operator what to run:
    every option it names is one ``mqstore repair`` has."""
    from mqstore import cli

    path, key, _made = fresh
    target = ("--data-dir", str(path), "--key-file", str(key))
    _corrupt(path, 3)
    error = fails("repair", *target, "--rebuild-state")
    assert error["error"] == "Corruption" and "mqstore repair --data-dir" in error["message"], error
    assert "restore a backup" in error["message"]
    parser = cli.build_parser()
    repair = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["repair"]
    known = {o for a in repair._actions for o in a.option_strings}
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", error["message"]))
    assert named and named <= known, (named - known, error["message"])


def test_repair_dry_run_writes_nothing_and_works_beside_a_running_store(
    fresh: tuple[Path, Path, dict[str, list[str]]],
) -> None:
    path, key, _made = fresh
    target = ("--data-dir", str(path), "--key-file", str(key))
    _corrupt(path, 3)
    data = (path / "data.mdb").read_bytes()
    report = ok("repair", *target, "--dry-run", "--rebuild-state", code=1)
    assert report["dry_run"] and report["unresolved"] == [3] and report["rebuild_state"]["possible"] is True
    assert (path / "data.mdb").read_bytes() == data
    assert ok("status", "--data-dir", str(path))["quarantined"] == 0
    with mqstore.open(path, key_file=key, background=False):  # the store in use by its application
        beside = ok("repair", *target, "--dry-run", code=1)
        assert beside["unresolved"] == [3]
        assert fails("repair", *target)["error"] == "StoreLocked"  # a real repair needs the writer lock


def test_rebuild_refuses_a_compacted_log(fresh: tuple[Path, Path, dict[str, list[str]]]) -> None:
    path, key, _made = fresh
    with mqstore.open(path, key_file=key, background=False) as store:
        store.compact_log()
    target = ("--data-dir", str(path), "--key-file", str(key))
    report = ok("verify", *target)
    assert report["clean"] and not report["replayed"] and "compacted" in report["replay_note"]
    error = fails("repair", *target, "--rebuild-state")
    assert error["error"] == "InvalidArgument" and "restore a backup" in error["message"].lower()


@pytest.mark.parametrize("damage", ["meta pages zeroed", "cut short"])
def test_a_damaged_data_file_is_a_corruption_error_naming_it(
    fresh: tuple[Path, Path, dict[str, list[str]]], tmp_path: Path, damage: str
) -> None:
    path, key, _made = fresh
    data = path / "data.mdb"
    if damage == "meta pages zeroed":
        with data.open("r+b") as f:
            f.write(bytes(8192))
    else:
        os.truncate(data, data.stat().st_size // 2)
    target = ("--data-dir", str(path), "--key-file", str(key))
    for args in (("verify", *target), ("status", "--data-dir", str(path)), ("queue", "list", *target),
                 ("backup", "--data-dir", str(path), "--out", str(tmp_path / "b.mqbak")), ("repair", *target)):
        error = fails(*args)  # exit 2 and one JSON document, not a traceback or a SIGBUS
        assert error["error"] == "Corruption" and str(data) in error["message"], (args, error)
        human = run(*args)
        assert human.returncode == 2 and human.stderr.startswith(f"mqstore: error: {data}"), (args, human.stderr)
    assert not (tmp_path / "b.mqbak").exists()


def test_backup_and_restore_offline(fresh: tuple[Path, Path, dict[str, list[str]]], tmp_path: Path) -> None:
    path, key, _made = fresh
    out = tmp_path / "spool.mqbak"
    backup = ok("backup", "--data-dir", str(path), "--out", str(out))
    assert backup["header"]["messages"] == 17 and len(backup["sha256"]) == 64 and out.exists()
    assert fails("backup", "--data-dir", str(path), "--out", str(out))["error"] == "InvalidArgument"
    restored = tmp_path / "restored"
    result = ok("restore", "--in", str(out), "--data-dir", str(restored), "--key-file", str(key))
    assert result["verify"]["clean"] and result["header"]["applied_index"] == backup["header"]["applied_index"]
    before = ok("queue", "list", "--data-dir", str(path), "--key-file", str(key), "--all")["messages"]
    after = ok("queue", "list", "--data-dir", str(restored), "--key-file", str(key), "--all")["messages"]
    assert [m["message_id"] for m in after] == [m["message_id"] for m in before]
    st = ok("status", "--data-dir", str(restored))
    assert st["kind"] == "restored" and st["restored_from"]["applied_index"] == backup["header"]["applied_index"]
    shown = run("status", "--data-dir", str(restored))
    assert (f"restored from a backup of the embedded store at {path.resolve()} at applied index "
            f"{backup['header']['applied_index']}") in shown.stdout, shown.stdout
    assert fails("restore", "--in", str(out), "--data-dir", str(restored))["error"] == "InvalidArgument"
    # A damaged backup is refused, naming where.
    data = bytearray(out.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "bad.mqbak"
    bad.write_bytes(bytes(data))
    error = fails("restore", "--in", str(bad), "--data-dir", str(tmp_path / "r2"), "--key-file", str(key))
    assert error["error"] == "Corruption" and "byte" in error["message"]
    assert not (tmp_path / "r2" / "data.mdb").exists()


# --- a running cluster --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path_factory.mktemp("cli-cluster"), ["a", "b", "c"])
    try:
        c.bootstrap()
        c.start_all()
        c.wait_for_leader()
        with Client(c.addresses(), timeout=15) as client:
            client.enqueue_many([
                {"mail_from": f"s{i % 2}@example.org", "recipients": [f"r{i}@d{i % 3}.example"], "data": RAW}
                for i in range(30)
            ])
            for lease in client.lease("w", max_messages=4):
                client.defer(lease.token, reason="452 mailbox full")
        c.wait_converged()
        yield c
    except BaseException:
        print(c.log_tails())
        raise
    finally:
        c.close()


def test_status_over_the_cluster(cluster: LocalCluster) -> None:
    follower = next(n for n in cluster.nodes if n != cluster.wait_for_leader())
    st = ok("status", "--server", cluster.nodes[follower].address)
    assert st["node_id"] == follower and st["role"] == "follower" and st["cluster_id"] == "test"
    assert {m["id"] for m in st["members"]} == {1, 2, 3} and all(m["voter"] for m in st["members"])
    assert all(m["lag"] is not None and m["lag"] >= 0 for m in st["members"])
    assert st["stats"]["messages"] == 30 and st["stats"]["recipients"]["deferred"] == 4
    assert st["applied_index"] > 30 and st["disk_used_bytes"] > 0
    # The leader's estimate of each member's clock: one machine, one clock, so ~0 within the error
    # (known once the leader has had a round trip with each since it was elected).
    deadline = time.monotonic() + 10
    while not all("clock_offset_ms" in m for m in st["members"]) and time.monotonic() < deadline:
        time.sleep(0.2)
        st = ok("status", "--server", cluster.nodes[follower].address)
    for m in st["members"]:
        assert abs(m["clock_offset_ms"]) <= m["clock_error_ms"] + 1, m
    assert st["clock_correction_ms"] == 0
    assert st["stats"]["disk"]["accepting_enqueues"] is True
    human = run("status", "--server", cluster.servers())
    assert human.returncode == 0 and "members:" in human.stdout and "LAG" in human.stdout
    assert "CLOCK" in human.stdout and re.search(r"^the leader's disk: .* free of .*; new enqueues accepted$",
                                                 human.stdout, re.M), human.stdout
    assert fails("status", "--server", "127.0.0.1:1", "--timeout", "1")["error"] == "Unavailable"


def test_inspection_and_bulk_over_the_cluster(cluster: LocalCluster) -> None:
    srv = ("--server", cluster.servers())
    listed = ok("queue", "list", *srv, "--limit", "1000")
    assert listed["count"] == 30
    deferred = ok("queue", "list", *srv, "--state", "deferred")["messages"]
    assert len(deferred) == 4
    assert ok("queue", "list", *srv, "--sender", "s1@example.org")["count"] == 15
    mid = deferred[0]["message_id"]
    shown = ok("message", "show", mid, *srv)
    assert shown["recipients"][0]["last_reason"] == "452 mailbox full"
    assert [e["event"] for e in shown["history"]["events"]] == ["enqueued", "leased", "deferred"]
    assert run_bytes("message", "show", mid, *srv, "--raw") == RAW
    assert sum(ok("qshape", *srv)["total"]) == 30
    held = ok("hold", *srv, "--domain", "d1.example")
    assert held["changed"] == 10 and ok("queue", "list", *srv, "--state", "held")["count"] == 10
    assert sum(ok("qshape", *srv)["total"]) == 20
    assert sum(ok("qshape", *srv, "--state", "held")["total"]) == 10
    assert sum(ok("qshape", *srv, "--state", "queued")["total"]) + \
        sum(ok("qshape", *srv, "--state", "deferred")["total"]) == 20
    assert ok("release", *srv, "--state", "held")["changed"] == 10
    assert sum(ok("qshape", *srv, "--state", "deferred")["total"]) == 4
    assert ok("requeue", *srv, "--state", "deferred")["changed"] == 4


def test_cluster_membership_and_verify_over_the_cluster(cluster: LocalCluster) -> None:
    srv = ("--server", cluster.servers())
    lead = cluster.wait_for_leader()
    other = next(n for n in cluster.nodes if n != lead)
    moved = ok("cluster", "transfer-leader", *srv, "--to", str(other))
    assert moved["leader_id"] == other
    assert cluster.wait_for_leader(timeout=10) == other or cluster.wait_for_leader(timeout=10) in cluster.nodes
    # Placement and identity rules are checked on the leader.
    assert "already a member" in fails("cluster", "add", *srv, "--id", "2", "--site", "b",
                                       "--address", "127.0.0.1:1")["message"]
    assert fails("cluster", "promote", *srv, "--id", "9")["error"] == "NotFound"
    report = ok("verify", "--server", cluster.nodes[lead].address)
    assert report["clean"] and report["replayed"] and report["node_id"] == lead
    assert report["messages_checked"] == 30
    assert report["consistent_copy"] is True  # checked on the node's own copy (until stop 30: false)


def test_history_of_a_deleted_message(cluster: LocalCluster) -> None:
    srv = ("--server", cluster.servers())
    with Client(cluster.addresses(), timeout=15) as client:
        mid = client.enqueue("a@example.org", ["gone@d9.example"], RAW)
    assert ok("delete", mid, *srv)["changed"] == 1
    gone = ok("message", "show", mid, *srv, code=1)
    assert gone["stored"] is False
    assert [e["event"] for e in gone["history"]["events"]] == ["enqueued", "deleted"]
    assert parse_id(mid)


def test_bounce_over_the_cluster_leaves_leased_recipients(cluster: LocalCluster) -> None:
    srv = ("--server", cluster.servers())
    with Client(cluster.addresses(), timeout=15) as client:
        client.set_namespace_policy("giveup", retention=3600)
        first = client.enqueue("a@example.org", ["q1@gq.example", "l1@gl.example"], RAW, namespace="giveup")
        second = client.enqueue("a@example.org", ["q2@gq.example"], RAW, namespace="giveup")
        only_leased = client.enqueue("a@example.org", ["l3@gl.example"], RAW, namespace="giveup")
        leases = client.lease("w", namespace="giveup", domain="gl.example", lease_seconds=600)
        assert sorted(lease.message_id for lease in leases) == sorted([first, only_leased])
        dry = ok("bounce", *srv, "--namespace", "giveup", "--dry-run")
        assert (dry["matched"], dry["would_change"], dry["unchanged"], dry["changed"]) == (3, 2, 1, 0)
        assert {r.state for r in client.get(second).recipients} == {"queued"}
        done = ok("bounce", *srv, "--namespace", "giveup", "--reason", "550 5.7.1 given up")
        assert (done["changed"], done["unchanged"], done["refused"]) == (2, 1, 0)
        # left_leased: l1 of the first message, and l3 of the one left unchanged (until stop 31 not counted)
        assert (done["bounced_recipients"], done["left_leased"]) == (2, 2)
        assert {r.address: r.state for r in client.get(first).recipients} == {"q1@gq.example": "bounced",
                                                                             "l1@gl.example": "leased"}
        assert client.get(second).recipients[0].last_reason == "550 5.7.1 given up"
        for lease in leases:  # the worker settles what it held
            client.ack(lease.token)
        assert client.get(first).done and client.get(only_leased).done
    human = run("bounce", only_leased, *srv, "--dry-run")
    assert human.returncode == 0 and human.stdout.startswith("dry run: bounce would change 0 of 1"), human.stdout
    cluster.wait_converged()
    report = ok("verify", "--server", cluster.nodes[cluster.wait_for_leader()].address)
    assert report["clean"] and report["replayed"]


class _Tty:
    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.text = ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        pass


def test_progress_bar_only_on_a_terminal_and_never_under_json() -> None:
    from mqstore.ops.progress import Progress

    shown = _Tty(True)
    with Progress("verify", enabled=True, stream=shown) as bar:  # type: ignore[arg-type]
        bar.update(5, 10)
    assert "verify [" in shown.text and "50.0%" in shown.text and shown.text.endswith("\n")
    for tty, enabled in ((False, True), (True, False)):
        quiet = _Tty(tty)
        with Progress("verify", enabled=enabled, stream=quiet) as bar:  # type: ignore[arg-type]
            bar.update(5, 10)
        assert quiet.text == ""


def test_long_commands_are_quiet_in_a_pipe(fresh: tuple[Path, Path, dict[str, list[str]]]) -> None:
    path, key, _ = fresh
    out = run("verify", "--data-dir", str(path), "--key-file", str(key))
    assert out.returncode == 0 and out.stderr == ""
    out = run("hold", "--data-dir", str(path), "--key-file", str(key), "--all", "--json")
    assert out.returncode == 0 and out.stderr == "" and json.loads(out.stdout)["changed"] > 0


# --- operator slips the CLI refuses or survives -------------------------------------------------


def test_an_empty_id_prefix_selects_nothing_and_the_null_sender_is_a_sender(tmp_path: Path) -> None:
    """`delete --id-prefix "$P"` with P unset deleted every message ("changed 10 of 10"); and
    `--sender ""` (the null sender of bounces) was refused as needing envelopes."""
    key = create_key_file(tmp_path / "kek.key")
    with mqstore.open(tmp_path / "s", key_file=key, background=False) as store:
        store.enqueue_many([{"mail_from": "" if i % 2 else f"s{i}@example.org", "recipients": [f"r{i}@example.net"],
                             "data": RAW} for i in range(6)])
    target = ("--data-dir", str(tmp_path / "s"), "--key-file", str(key))
    for op in ("delete", "hold", "bounce"):
        assert "id prefix '' is not the start of a message id" in fails(op, *target, "--id-prefix", "")["message"]
    assert ok("queue", "list", *target)["count"] == 6
    assert ok("queue", "list", *target, "--sender", "")["count"] == 3
    assert ok("hold", *target, "--sender", "", "--dry-run")["would_change"] == 3


def test_command_line_values_a_node_config_would_refuse_are_refused(tmp_path: Path) -> None:
    for args in (["cluster", "add", "--id", "5", "--site", "a", "--address", "10.0.0.1:7001,10.0.0.2:7001"],
                 ["cluster", "add", "--id", "5", "--site", "a b", "--address", "127.0.0.1:7001"],
                 ["cluster", "add", "--id", "5", "--site", "a", "--address", "127.0.0.1:99999"],
                 ["recover", "--config", str(tmp_path / "n.toml"), "--wait", "nan"],
                 ["recover", "--config", str(tmp_path / "n.toml"), "--wait", "0"]):
        out = run(*args, "--server", "127.0.0.1:1")
        assert out.returncode == 2 and "argument --" in out.stderr, (args, out.stderr)
    # A port gRPC would take modulo 65536 (83130 -> 17594) is refused before anything is dialed.
    assert "the port must be 1..65535" in fails("status", "--server", "127.0.0.1:83130")["message"]
    assert "(default 600)" in run("cluster", "snapshot", "--help").stdout


def test_ctrl_c_ends_a_command_without_a_traceback(tmp_path: Path) -> None:
    exe = shutil.which("mqstore", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "mqstore"]
    for extra, said in (([], "mqstore: interrupted\n"), (["--json"], "")):
        proc = subprocess.Popen([*cmd, "status", "--server", "127.0.0.1:1", "--timeout", "60", *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(2)  # retrying to reach a node that is not there
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, (out, err)
        assert "Traceback" not in err and err.endswith(said)
        if extra:
            assert json.loads(out) == {"error": "Interrupted", "message": "interrupted (Ctrl-C)"}


def test_several_servers_the_first_of_them_down(cluster: LocalCluster) -> None:
    """status, verify and backup used only the first --server address: with that node down (the
    moment one needs them) they failed while the others answered."""
    srv = ("--server", "127.0.0.1:1," + cluster.servers(), "--timeout", "5")
    st = ok("status", *srv)
    assert st["cluster_id"] == "test" and {m["id"] for m in st["members"]} == {1, 2, 3}
    assert ok("verify", *srv)["clean"] is True


def test_options_that_would_be_ignored_are_refused_before_anything_runs(
        fresh: tuple[Path, Path, dict[str, list[str]]], tmp_path: Path) -> None:
    """Each was silently ignored (or, for --scratch, refused only after the long record check)."""
    path, key, made = fresh
    target = ("--data-dir", str(path), "--key-file", str(key))
    mid = made["plain"][0]
    said = fails("delete", mid, *target, "--reason", "cleanup")["message"]
    assert "--reason goes with --bypass-governance" in said
    assert ok("message", "show", mid, *target)["message_id"] == mid  # still there
    out = str(tmp_path / "m.eml")
    assert "--out goes with --raw" in fails("message", "show", mid, *target, "--out", out)["message"]
    assert not (tmp_path / "m.eml").exists()
    assert "is not a directory" in fails("verify", *target, "--scratch", str(tmp_path / "nowhere"))["message"]
