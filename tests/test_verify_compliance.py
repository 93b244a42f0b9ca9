"""`mqstore verify` and `mqstore audit verify` against compliance state changed behind mqstore's
back by someone who can write the data dir (not the KEK, not the audit signing key):

- the persisted compliance clock and the latest batch stamp moved ten years ahead, which lets an
  ordinary delete remove a COMPLIANCE-locked message: the audit records' times run ahead of the
  wall clock they were written at (until stop 31 both commands passed such a store);
- on a compacted store (no replay), a legal hold's row deleted, a lock shortened in a message's
  row, or a namespace's policy weakened: the audit log, signed and never compacted, derives the
  locks, holds and policies, and verify compares them with the state tables (until stop 31 such a
  store verified clean, and after the message was deleted so did its audit log).

And no false positives: stores that went through holds and releases, retention extension,
governance bypass, compaction, a dropped namespace, a shredded key, a clock set back and ahead,
verify clean.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lmdb
import pytest

import mqstore
from mqstore.actor import Actor
from mqstore.compliance import audit as audit_mod
from mqstore.errors import Immutable
from mqstore.ids import parse_id
from mqstore.ops.verify import verify_path
from mqstore.queue.model import MessageRow, Policy

OFFICER = Actor("j.doe", frozenset({"compliance"}), auth="mtls", source="test")
SUPER = Actor("super-admin", frozenset({"admin", "compliance"}), auth="mtls", source="test")
TEN_YEARS_MS = 10 * 365 * 86_400_000
DAY = 86_400.0


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mqstore", *args], capture_output=True, text=True, timeout=120)


def _verify(path: Path) -> tuple[int, dict[str, Any]]:
    out = _cli("verify", "--data-dir", str(path), "--json")
    return out.returncode, json.loads(out.stdout)


def _audit_verify(path: Path, trusted: Path | None = None) -> tuple[int, dict[str, Any]]:
    args = ["audit", "verify", "--data-dir", str(path), "--json"]
    if trusted is not None:
        args += ["--trusted-checkpoint", str(trusted)]
    out = _cli(*args)
    return out.returncode, json.loads(out.stdout)


def _export(store: Any, where: Path) -> Path:
    ckpt = store.audit_checkpoint()
    assert ckpt is not None
    where.write_text(ckpt.to_json())
    return where


def _env(path: Path) -> Any:
    return lmdb.open(str(path), max_dbs=32, subdir=True, lock=True, map_size=1 << 30)


def _enqueue(store: Any, namespace: str, n: int = 1) -> list[str]:
    return [store.enqueue("cfo@example.org", ["board@example.net"], b"Subject: q%d\r\n\r\nbody" % i,
                          namespace=namespace) for i in range(n)]


def _problems(report: dict[str, Any], check: str) -> list[dict[str, Any]]:
    return [p for p in report["problems"] if p["check"] == check]


# --- finding 1: the compliance clock moved forward ----------------------------------------------------


def test_a_compliance_clock_moved_forward_is_reported_by_verify_and_audit_verify(tmp_path: Path) -> None:
    path = tmp_path / "store"
    s = mqstore.open(path, background=False)
    s.set_policy("finance", mode="compliance", retention_days=2555)
    mid = _enqueue(s, "finance", 2)[1]
    with pytest.raises(Immutable):
        s.delete(mid)
    trusted = _export(s, tmp_path / "ckpt.json")
    s.close()
    assert _verify(path)[0] == 0
    assert _audit_verify(path, trusted)[0] == 0

    env = _env(path)
    qmeta, meta = env.open_db(b"qmeta"), env.open_db(b"meta")
    with env.begin(write=True) as txn:
        clock = struct.unpack("<q", txn.get(b"compliance.clock", db=qmeta))[0]
        stamp = struct.unpack(">Q", txn.get(b"stamp.last_ms", db=meta))[0]
        txn.put(b"compliance.clock", struct.pack("<q", clock + TEN_YEARS_MS), db=qmeta)
        txn.put(b"stamp.last_ms", struct.pack(">Q", stamp + TEN_YEARS_MS), db=meta)
    env.close()
    s = mqstore.open(path, background=False)
    s.delete(mid)  # the store still takes the forged clock (refusing it at open is another fix)
    seq = s.audit_records(after=None, limit=1000)[-1]["seq"]
    s.close()

    for code, report in (_audit_verify(path, trusted), _audit_verify(path)):
        assert code == 1, report
        assert report["first_bad"] == seq
        moved = [p for p in report["problems"] if "the compliance clock was moved forward" in p]
        assert moved and moved[0].startswith(f"record {seq} (delete {mid})"), report["problems"]
        assert any(f"record {seq} (delete {mid}): allowed, but" in p and "COMPLIANCE retention ran until" in p
                   for p in report["problems"]), report["problems"]
    code, report = _verify(path)
    assert code == 1
    assert any(f"record {seq} (delete {mid}): the compliance clock was moved forward" in p["problem"]
               for p in _problems(report, "audit")), report["problems"]


def test_small_forward_moves_add_up_against_a_trusted_checkpoint() -> None:
    """Each move under the bound, the records after a trusted checkpoint are measured from it."""
    day = 86_400_000
    records: list[dict[str, Any]] = []
    t = w = 1_800_000_000_000
    for _ in range(4):
        records.append({"seq": len(records) + 1, "time": t, "wall": w, "op": "lease", "target": "x"})
        t += 3 * day // 2
        w += 1000
    found: list[tuple[str, int]] = []
    check = audit_mod._ClockCheck(lambda text, seq: found.append((text, seq)))
    check.record(records[0])
    check.trusted(1, records[0]["time"])
    for r in records[1:]:
        check.record(r)
    assert [seq for _, seq in found] == [3]  # 3.0 days past the trusted checkpoint's time
    assert "the compliance clock was moved forward" in found[0][0]


# --- finding 2: state tables changed on a compacted store ---------------------------------------------


def _compacted(path: Path, namespace: str, mode: str | None) -> tuple[Any, str]:
    s = mqstore.open(path, background=False)
    if mode is not None:
        s.set_policy(namespace, mode=mode, retention_days=2555)
    mid = _enqueue(s, namespace)[0]
    return s, mid


def test_a_legal_hold_row_deleted_on_a_compacted_store_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "store"
    s, mid = _compacted(path, "legal", None)
    s.add_legal_hold(mid, case="SEC-2026-17", actor=OFFICER)
    with pytest.raises(Immutable):
        s.delete(mid)
    assert s.compact_log() > 0 and s.log.first_index > 1
    trusted = _export(s, tmp_path / "ckpt.json")
    s.close()
    code, report = _verify(path)
    assert code == 0 and not report["replayed"], report

    env = _env(path)
    holds = env.open_db(b"holds")
    with env.begin(write=True) as txn:
        keys = [bytes(k) for k, _ in txn.cursor(db=holds)]
        for key in keys:
            txn.delete(key, db=holds)
    env.close()
    code, report = _verify(path)
    assert code == 1
    found = _problems(report, "compliance")
    assert len(found) == 1 and found[0]["message_id"] == mid, report["problems"]
    assert "legal holds [] (the audit records say [SEC-2026-17])" in found[0]["problem"]

    s = mqstore.open(path, background=False)
    s.delete(mid)  # the hold is gone from the store: the delete is allowed (and audited)
    seq = s.audit_records()[-1]["seq"]
    s.close()
    code, report = _verify(path)
    assert code == 1
    texts = [p["problem"] for p in _problems(report, "audit")]
    assert any(t.startswith(f"record {seq} (delete {mid}): when this record was written the message had legal "
                            "holds [] (the audit records before it say [SEC-2026-17])") for t in texts), texts
    assert any(t.startswith(f"record {seq} (delete {mid}): allowed, but by the audit records before it it was "
                            "under legal hold(s) SEC-2026-17") for t in texts), texts
    code, audit_report = _audit_verify(path, trusted)
    assert code == 1 and audit_report["first_bad"] == seq, audit_report


def test_a_lock_shortened_in_a_row_on_a_compacted_store_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "store"
    s, mid = _compacted(path, "finance", "compliance")
    assert s.compact_log() > 0 and s.log.first_index > 1
    s.close()
    env = _env(path)
    messages = env.open_db(b"messages")
    with env.begin(write=True) as txn:
        row = MessageRow.decode(txn.get(parse_id(mid), db=messages))
        until = row.lock_until_ms
        row.lock_until_ms = 1
        txn.put(parse_id(mid), row.encode(), db=messages)
    env.close()
    code, report = _verify(path)
    assert code == 1 and not report["replayed"]
    found = _problems(report, "compliance")
    assert len(found) == 1 and found[0]["message_id"] == mid and found[0]["table"] == "messages", report
    assert "retention until 1970-01-01T00:00:00Z (the audit records say " in found[0]["problem"]
    assert audit_mod._iso(until) in found[0]["problem"]

    s = mqstore.open(path, background=False)
    s.delete(mid)
    seq = s.audit_records()[-1]["seq"]
    s.close()
    code, report = _audit_verify(path)
    assert code == 1 and report["first_bad"] == seq
    assert any(p.startswith(f"record {seq} (delete {mid}): allowed, but by the audit records before it its "
                            "COMPLIANCE retention ran until") for p in report["problems"]), report["problems"]
    assert _verify(path)[0] == 1


def test_a_weakened_policy_row_and_a_missing_locked_row_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "store"
    s, mid = _compacted(path, "finance", "compliance")
    s.compact_log()
    s.close()
    env = _env(path)
    policies, messages = env.open_db(b"policies"), env.open_db(b"messages")
    with env.begin(write=True) as txn:
        txn.put(b"finance", Policy().encode(), db=policies)
        txn.delete(parse_id(mid), db=messages)
    env.close()
    code, report = _verify(path)
    assert code == 1
    found = {p.get("table"): p for p in _problems(report, "compliance")}
    assert "namespace 'finance': the store's policy is mode none" in found["policies"]["problem"]
    assert found["messages"]["message_id"] == mid
    assert "the audit log records no removal of this message, but its row is gone" in found["messages"]["problem"]


# --- no false positives ----------------------------------------------------------------------------------


class Clock:
    """Wall and monotonic clocks under the test's control (the wall one can be set back)."""

    def __init__(self) -> None:
        self.wall = 1_800_000_000.0
        self.mono = 1000.0

    def __call__(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def test_an_untampered_store_with_every_compliance_operation_verifies_clean(tmp_path: Path) -> None:
    path, clock = tmp_path / "store", Clock()

    def open_store() -> Any:
        return mqstore.open(path, clock=clock, monotonic=clock.monotonic, background=False)

    s = open_store()
    s.set_policy("finance", mode="compliance", retention_days=1)
    s.set_policy("gov", mode="governance", retention_days=1)
    s.set_policy("drop", mode="governance", retention_days=1)
    s.set_policy("shred", mode="compliance", retention_days=1)
    fin = _enqueue(s, "finance", 3)
    gov = _enqueue(s, "gov", 2)
    plain = _enqueue(s, "plain", 2)
    _enqueue(s, "drop", 2)
    _enqueue(s, "shred", 2)
    s.add_legal_hold(fin[0], case="SEC-1", actor=OFFICER)
    s.add_legal_hold(fin[0], case="SEC-1", actor=OFFICER)  # again: unchanged, audited
    s.add_legal_hold(fin[0], case="SEC-2", actor=OFFICER)
    s.add_legal_hold(plain[0], case="SEC-3", actor=OFFICER)
    s.extend_retention(fin[2], until=clock.wall + 30 * DAY, actor=OFFICER)
    for mid in (fin[0], plain[0]):
        with pytest.raises(Immutable):
            s.delete(mid)
    s.delete(gov[0], actor=SUPER, bypass_governance=True, reason="court order 17")
    for ns in ("finance", "gov", "plain", "drop", "shred"):
        for lease in s.lease("w1", namespace=ns, max_messages=100):
            s.ack(lease.token)
    trusted = _export(s, tmp_path / "ckpt.json")
    clock.wall -= 3 * DAY  # the wall clock set back: the compliance clock goes on
    clock.mono += 3600
    s.set_policy("finance", mode="compliance", retention_days=3)
    s.remove_legal_hold(fin[0], case="SEC-1", actor=OFFICER)
    clock.wall += 3 * DAY
    s.close()
    s = open_store()
    clock.advance(2 * DAY)  # every one-day lock has ended (the compliance clock runs while a store is open)
    s.maintain()  # compacts what is due, audited in the namespaces with a mode
    s.drop_namespace("drop", actor=SUPER)
    key_id = s.rotate_key("shred", actor=SUPER)
    old = [k["key_id"] for k in s.list_keys() if k["namespace"] == "shred" and k["key_id"] != key_id]
    for k in old:
        s.shred_key(k, actor=SUPER)
    s.remove_legal_hold(fin[0], case="SEC-2", actor=OFFICER)
    s.remove_legal_hold(plain[0], case="SEC-3", actor=OFFICER)
    clock.advance(2 * DAY)
    s.maintain()
    s.compact_log()
    assert s.log.first_index > 1
    ops = {(r["op"], r["outcome"]) for r in s.audit_records(limit=1000)}
    s.close()
    assert {("compact", "allowed"), ("drop_namespace", "allowed"), ("shred_key", "allowed"),
            ("legal_hold", "allowed"), ("release_legal_hold", "allowed"), ("retention", "allowed"),
            ("delete", "allowed"), ("delete", "denied")} <= ops, ops
    report = verify_path(path)
    assert report.clean, report.lines()
    assert not report.replayed  # compacted: the audit log is what checks the locks and holds
    code, audit_report = _audit_verify(path, trusted)
    assert code == 0, audit_report


def test_a_cluster_with_leader_changes_verifies_clean_on_every_node(tmp_path: Path) -> None:
    from test_node import InProcessCluster

    from mqstore.client import Client

    cluster = InProcessCluster(tmp_path, {1: "a", 2: "b", 3: "c"}, [1, 2, 3])
    try:
        first = cluster.leader()
        with Client(cluster.addresses(), timeout=20) as client:
            client.set_policy("finance", mode="compliance", retention_days=2555)
            mids = [client.enqueue(mail_from="cfo@example.org", recipients=["board@example.net"],
                                   data=b"Subject: x\r\n\r\ny", namespace="finance") for _ in range(3)]
            client.add_legal_hold(mids[0], case="SEC-1")
            with pytest.raises(Immutable):
                client.delete(mids[0])
        stopped = first.node.node_id
        cluster.stop(stopped)  # hands leadership over
        second = cluster.leader()
        assert second.node.node_id != stopped
        with Client(cluster.addresses(), timeout=20) as client:
            client.extend_retention(mids[1], until=time.time() + 3000 * 86400)
            client.remove_legal_hold(mids[0], case="SEC-1")
            client.add_legal_hold(mids[2], case="SEC-2")
            with pytest.raises(Immutable):
                client.delete(mids[1])
        cluster.start(stopped)
        index = second.node.applied_index
        cluster.wait_applied(stopped, index, timeout=30)
        for i in cluster.servers:
            cluster.wait_applied(i, index, timeout=30)
        data_dirs = {i: Path(server.config.data_dir) for i, server in cluster.servers.items()}
    finally:
        cluster.close()
    for i, data_dir in data_dirs.items():
        report = verify_path(data_dir, key_file=str(cluster.key))
        assert report.clean, (i, report.lines())
        assert report.audit is not None and report.audit["ok"] and report.audit["records_checked"] >= 8, report.audit


# --- a wall clock set ahead, then corrected (until stop 31 reported as a forged clock) ------------------


def _ahead_then_corrected(path: Path, retention_days: int, days_after: int) -> tuple[Any, str]:
    """A store whose wall clock ran three days ahead for one write and was corrected at once, then
    written to once a day for ``days_after`` days (real time passes the mistaken one)."""
    clock = Clock()
    s = mqstore.open(path, clock=clock, monotonic=clock.monotonic, background=False)
    s.set_policy("finance", mode="compliance", retention_days=retention_days)
    mid = _enqueue(s, "finance")[0]
    for lease in s.lease("w1", namespace="finance"):
        s.ack(lease.token)
    clock.wall += 3 * DAY  # NTP or an operator set it three days ahead
    _enqueue(s, "finance")
    clock.wall -= 3 * DAY  # corrected a moment later
    for _ in range(days_after):
        clock.advance(DAY)
        _enqueue(s, "finance")
    return s, mid


def test_a_wall_clock_set_ahead_then_corrected_verifies_clean(tmp_path: Path) -> None:
    path = tmp_path / "store"
    s, _ = _ahead_then_corrected(path, 30, 4)
    s.close()
    code, report = _verify(path)
    assert code == 0, report["problems"]
    code, audit_report = _audit_verify(path)
    assert code == 0, audit_report["problems"]


def test_a_compaction_after_retention_on_a_store_whose_wall_clock_once_ran_ahead_verifies_clean(
        tmp_path: Path) -> None:
    """The message's five-day COMPLIANCE retention really ended: its compaction on day six is no
    removal of a locked message (until stop 31 it was judged three days early: "removed while it
    was locked")."""
    path = tmp_path / "store"
    s, mid = _ahead_then_corrected(path, 5, 6)
    s.maintain()
    compacted = [r for r in s.audit_records(limit=1000) if r["op"] == "compact" and r["target"] == mid]
    assert compacted and compacted[0]["outcome"] == "allowed"
    trusted = _export(s, tmp_path / "ckpt.json")
    s.close()
    code, audit_report = _audit_verify(path)
    assert code == 0, audit_report["problems"]
    assert _audit_verify(path, trusted)[0] == 0
    code, report = _verify(path)
    assert code == 0, report["problems"]


_DAY_MS = 86_400_000
_HOUR_MS = 3_600_000


def _clock_problems(walls_and_times: list[tuple[int, int]], trusted_at: int | None = None) -> list[tuple[str, int]]:
    found: list[tuple[str, int]] = []
    check = audit_mod._ClockCheck(lambda text, seq: found.append((text, seq)))
    for i, (wall, t) in enumerate(walls_and_times, 1):
        check.record({"seq": i, "time": t, "wall": wall, "op": "enqueue", "target": "x"})
        if trusted_at == i:
            check.trusted(i, t)
    return found


def _honest(events: list[tuple[str, int]], start: int = 1_800_000_000_000) -> list[tuple[int, int]]:
    """(wall, time) of an honest writer's records: ("write", wall offset), ("run", ms) or ("down", ms).
    Its compliance time follows real time while it runs, counted at most a day ahead of its stamps
    (which follow the wall clock and never go back)."""
    real = comp = stamp = time_ = start
    out = []
    for what, ms in events:
        if what == "run":
            real += ms
            comp += ms
        elif what == "down":
            real += ms
        else:
            wall = real + ms
            stamp = max(stamp, wall)
            time_ = max(time_, min(comp, stamp + _DAY_MS))
            comp = max(comp, time_)
            out.append((wall, time_))
    return out


@pytest.mark.parametrize("name, events", [
    # the reproducer: three days ahead for one write, corrected, a write a day for four days
    ("ahead once, dense", [("write", 0), ("write", 3 * _DAY_MS)] + [("run", _DAY_MS), ("write", 0)] * 5),
    # corrected while no write came: the next one after real time passed the mistaken one
    ("ahead once, sparse", [("write", 0), ("write", 3 * _DAY_MS), ("run", 4 * _DAY_MS), ("write", 0),
                            ("run", 4 * _DAY_MS), ("write", 0)]),
    ("ten years ahead for an hour of writes", [("write", 0)] + [("run", 600_000), ("write", 3650 * _DAY_MS)] * 6
     + [("run", _HOUR_MS), ("write", 0)] + [("run", 12 * _HOUR_MS), ("write", 0)] * 10),
    ("a day and a half ahead, then set back three days after a stop",
     [("write", 0), ("write", 36 * _HOUR_MS), ("run", 60_000), ("write", 0), ("down", 3 * _DAY_MS),
      ("write", 0), ("write", 0), ("run", _HOUR_MS), ("write", -3 * _DAY_MS)]
     + [("run", 12 * _HOUR_MS), ("write", -3 * _DAY_MS)] * 8 + [("write", 0), ("run", _DAY_MS), ("write", 0)]),
    # nodes' clocks a few hundred ms apart, one three days ahead serving a request, one 1.5 days behind
    ("a cluster's clocks", [step for i in range(60) for step in (
        ("run", 2 * _HOUR_MS),
        ("write", (300, -200, 3 * _DAY_MS if i == 6 else 0, -36 * _HOUR_MS if 20 <= i < 30 else 100)[i % 4]))]),
])
def test_wall_clocks_ahead_back_and_apart_are_no_moved_compliance_clock(name: str,
                                                                        events: list[tuple[str, int]]) -> None:
    records = _honest(events)
    assert _clock_problems(records) == [], name
    assert _clock_problems(records, trusted_at=2) == [], name


def test_a_forged_clock_is_still_reported_after_downtime_and_a_wall_clock_once_ahead() -> None:
    day = _DAY_MS
    records = _honest([("write", 0), ("write", 3 * day), ("run", 60_000), ("write", 0), ("down", 5 * day)]
                      + [("write", 0), ("run", _HOUR_MS)] * 4)
    wall, t = records[-1]
    # the persisted clock moved three days ahead: a jump, and the lead over the downtime's lag
    assert [seq for _, seq in _clock_problems([*records, (wall + 60_000, t + 3 * day)])] == [len(records) + 1]
    # ten years ahead on the next write after a wall clock set back (as a forger might)
    forged = _clock_problems([*records, (wall - 3 * day, t + 3650 * day)])
    assert [seq for _, seq in forged] == [len(records) + 1]
    assert "the compliance clock was moved forward" in forged[0][0]
