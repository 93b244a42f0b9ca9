"""Regressions from a review of the compliance features: each test checks what a user sees.

- ``mqstore verify`` (and ``verify_path``, which ``verify --server`` runs inside the node) checks
  the audit checkpoints' signatures, and reports unsigned ones when it has no key;
- ``mqstore audit verify --config`` uses the config's ``audit_signing_key``, and refuses to pass a
  log when it has no key at all;
- a refused forced compaction changes nothing but the audit log (before, it moved the message's
  housekeeping retention to the end of its lock);
- audit queries find records past the first million (before, the scan stopped there silently);
- a second legal hold on the same case is audited; a release by an actor without ``legal_hold``
  is refused as such (audited), not answered "no such hold";
- ``mqstore audit export-checkpoint`` with a bad ``--out`` signs nothing and writes no entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import mqstore
from mqstore.actor import Actor
from mqstore.compliance import audit
from mqstore.compliance.signing import create_signing_key, key_id
from mqstore.crypto import create_key_file
from mqstore.errors import Immutable, NotFound, PermissionDenied
from mqstore.ops.facts import open_env
from mqstore.ops.verify import verify_path
from mqstore.queue.kv import LmdbKV

BODY = b"Subject: hi\r\n\r\nbody\r\n"
DAY_S = 86_400.0


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-W", "ignore", "-m", "mqstore", *args], capture_output=True, text=True,
                          timeout=120)


def _rewrite_audit(path: Path, edit: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
                   signer: Ed25519PrivateKey | None = None) -> None:
    """What someone with write access to the files (but not the signing key) does: change records,
    re-chain them, recompute every checkpoint at the same sizes and times (unsigned, or signed by
    ``signer``) and the state in meta, so the log is consistent in itself."""
    with open_env(path, readonly=False) as env, env.env.begin(write=True) as txn:
        kv = LmdbKV(txn, env.dbs)
        recs = audit.records(kv, None, audit.AUDIT_READ_RECORDS_MAX)
        ck_times = {c.size: c.time for c in audit.checkpoints(kv)}
        old = audit._State.load(kv)
        for r in recs:
            del r["prev"], r["seq"]
        recs = edit(recs)
        txn.drop(env.dbs[b"audit"], delete=False)
        txn.drop(env.dbs[b"audit_ckpt"], delete=False)
        prev, frontier, ck_size, ck_time = audit.ZERO_HASH, [], 0, old.ckpt_time
        for seq, r in enumerate(recs, start=1):
            r["seq"], r["prev"] = seq, prev
            data = audit.canonical(r)
            kv.put(b"audit", audit._seq_key(seq), data)
            audit.frontier_push(frontier, seq - 1, audit.leaf_hash(data))
            prev = hashlib.sha256(data).hexdigest()
            if seq in ck_times:
                root, t = audit.frontier_root(frontier).hex(), ck_times[seq]
                sig = "" if signer is None else signer.sign(audit.signed_message(seq, root, t)).hex()
                kid = "" if signer is None else key_id(signer.public_key())
                kv.put(b"audit_ckpt", audit._seq_key(seq), audit.Checkpoint(seq, root, t, sig, kid).encode())
                ck_size, ck_time = seq, t
        state = audit._State(len(recs), bytes.fromhex(prev), recs[-1]["time"], ck_size, ck_time, frontier)
        kv.put(b"meta", audit.META_STATE, state.encode())


def _blame_someone_else(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for r in recs:
        if r["op"] == "delete":
            r["actor"] = "someone-else"
    return recs


def _store_with_refused_delete(path: Path, **kwargs: Any) -> None:
    s = mqstore.open(path, background=False, **kwargs)
    try:
        s.set_policy("fin", mode="compliance", retention_days=30)
        mid = s.enqueue("a@x.org", ["b@y.net"], BODY, namespace="fin")
        with pytest.raises(Immutable):
            s.delete(mid)
        s.audit_checkpoint()
        assert s.audit_verify().ok
    finally:
        s.close()


# --- 1: mqstore verify checks the audit signatures ---------------------------------------------------


def test_verify_reports_an_audit_log_rewritten_with_unsigned_checkpoints(tmp_path: Path) -> None:
    data = tmp_path / "q"
    _store_with_refused_delete(data)
    clean = _cli("verify", "--data-dir", str(data), "--json")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert json.loads(clean.stdout)["audit"]["signatures_checked"] >= 1  # the store's own key is used

    _rewrite_audit(data, _blame_someone_else)
    full = _cli("verify", "--data-dir", str(data), "--json")
    report = json.loads(full.stdout)
    assert full.returncode == 1 and not report["audit"]["ok"]
    assert any("not signed" in p for p in report["audit"]["problems"]), report["audit"]

    # Without any key (the key file moved away): an unsigned checkpoint is still a problem.
    (data / "audit-signing.key").rename(tmp_path / "elsewhere.key")
    nokey = verify_path(data)
    assert not nokey.audit["ok"]  # type: ignore[index]
    assert any("not signed" in p for p in nokey.audit["problems"])  # type: ignore[index]
    # What `verify --server` runs inside the node: the node's public key, passed in.
    from mqstore.compliance.signing import read_signing_key

    public = read_signing_key(tmp_path / "elsewhere.key").public_key()
    node_view = verify_path(data, audit_public_key=public)
    assert not node_view.audit["ok"] and node_view.audit["signatures_checked"] >= 1  # type: ignore[index]


def test_verify_without_a_key_passes_a_signed_log_and_says_it_did_not_check(tmp_path: Path) -> None:
    data = tmp_path / "q"
    _store_with_refused_delete(data)
    (data / "audit-signing.key").rename(tmp_path / "elsewhere.key")
    report = verify_path(data)
    assert report.audit["ok"], report.audit  # type: ignore[index]
    assert any("not checked" in n for n in report.audit["notes"])  # type: ignore[index]
    # ... and with the key named (a node's audit_signing_key), it checks them.
    checked = verify_path(data, audit_signing_key=tmp_path / "elsewhere.key")
    assert checked.audit["ok"] and checked.audit["signatures_checked"] >= 1  # type: ignore[index]


# --- 2: audit verify --config uses the config's key ----------------------------------------------------


def test_audit_verify_with_config_uses_its_signing_key_and_fails_without_any_key(tmp_path: Path) -> None:
    data, etc = tmp_path / "data", tmp_path / "etc"
    etc.mkdir(mode=0o700)
    kek, signing_key = etc / "kek.key", etc / "audit-1.key"
    create_key_file(kek)
    create_signing_key(signing_key)
    _store_with_refused_delete(data, audit_signing_key=signing_key, key_file=kek)
    conf = tmp_path / "node.toml"
    conf.write_text(f'node_id = 1\nsite = "a"\nlisten = "127.0.0.1:17999"\ndata_dir = "{data}"\n'
                    f'key_file = "{kek}"\naudit_signing_key = "{signing_key}"\ninsecure = true\n')
    ok = _cli("audit", "verify", "--config", str(conf), "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["signatures_checked"] >= 1, ok.stdout + ok.stderr

    _rewrite_audit(data, _blame_someone_else)
    bad = _cli("audit", "verify", "--config", str(conf), "--json")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert any("not signed" in p for p in json.loads(bad.stdout)["problems"])

    # No key anywhere (none in the data dir, none named): a clear error, not a pass.
    nokey = _cli("audit", "verify", "--data-dir", str(data), "--key-file", str(kek))
    assert nokey.returncode != 0
    assert "no audit signing key" in nokey.stderr + nokey.stdout


# --- 3: a refused forced compaction changes nothing ------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.wall = time.time()
        self.mono = 1000.0

    def __call__(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono


def _retention_table(s: mqstore.Store) -> list[tuple[bytes, bytes]]:
    with s.log.env.read() as txn:
        return list(LmdbKV(txn, s.log.env.dbs).scan(b"retention", b""))


def _delivered(s: mqstore.Store, namespace: str) -> str:
    mid = s.enqueue("a@x.org", ["b@y.net"], BODY, namespace=namespace)
    for lease in s.lease("w", max_messages=1, namespace=namespace):
        s.ack(lease.token)
    return mid


def test_refused_forced_compaction_changes_nothing_but_the_audit_log(tmp_path: Path) -> None:
    clock = _Clock()
    s = mqstore.open(tmp_path / "q", background=False, clock=clock, monotonic=clock.monotonic)
    try:
        s.set_policy("fin", mode="governance", retention_days=30)
        mid = _delivered(s, "fin")
        before = (s.get(mid).retain_until, _retention_table(s))
        head = s.audit_head()
        with pytest.raises(Immutable):
            s.compact_messages([mid])
        assert (s.get(mid).retain_until, _retention_table(s)) == before
        assert s.audit_records(after=head)[-1]["outcome"] == "denied"
        # The officer disposes of it early (a governance bypass): maintenance compacts it at once.
        s.extend_retention(mid, until=clock.wall - 3600, bypass_governance=True, reason="disposal approved")
        clock.wall += 0.01
        clock.mono += 0.01
        s.maintain()
        with pytest.raises(NotFound):
            s.get(mid)
    finally:
        s.close()
    assert verify_path(tmp_path / "q").clean


def test_refused_scheduled_compaction_is_put_off_without_changing_the_message(tmp_path: Path) -> None:
    """The wall clock runs two days ahead of the compliance clock (it does not follow the wall
    clock): maintenance finds the message due by the index but its lock has not ended. The refusal
    is audited once, the message's retention stays as it was, and a bypass shortening the lock
    makes it compactable at once."""
    clock = _Clock()
    path = tmp_path / "q"
    s = mqstore.open(path, background=False, clock=clock, monotonic=clock.monotonic)
    try:
        s.set_policy("fin", mode="governance", retention_days=1)
        mid = _delivered(s, "fin")
        retain_until = s.get(mid).retain_until
        clock.wall += 2 * DAY_S  # the compliance clock stays (no monotonic time passed)
        head = s.audit_head()
        s.maintain()
        denials = [r for r in s.audit_records(after=head) if r["op"] == "compact"]
        assert [r["outcome"] for r in denials] == ["denied"]
        assert s.get(mid).retain_until == retain_until
        s.maintain()  # put off: not tried (nor audited) again at every pass
        assert [r for r in s.audit_records(after=head) if r["op"] == "compact"] == denials
    finally:
        s.close()
    report = verify_path(path)  # the put-off index entry is where the message's row says it is
    assert report.clean, report.problems
    s = mqstore.open(path, background=False, clock=clock, monotonic=clock.monotonic)
    try:
        s.extend_retention(mid, until=clock.wall - 3 * DAY_S, bypass_governance=True, reason="disposal approved")
        s.maintain()
        with pytest.raises(NotFound):
            s.get(mid)
    finally:
        s.close()


def test_put_off_entries_cost_a_maintenance_pass_a_bounded_scan(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Put-off entries stay at the head of the retention index (keyed at their old due time):
    after a downtime there may be very many. A pass of plan_compact and next_timer_ms (the
    maintenance loop calls it every second) reads at most PUT_OFF_SCAN_MAX of them; before, every
    one on every call (about 1 s per call at a million)."""
    from mqstore.queue import machine

    clock = _Clock()
    s = mqstore.open(tmp_path / "q", background=False, clock=clock, monotonic=clock.monotonic)
    try:
        s.set_policy("fin", mode="governance", retention_days=1)
        for _ in range(12):
            _delivered(s, "fin")
        clock.wall += 2 * DAY_S  # due by the index; the lock (compliance clock) has not ended
        s.maintain()
        monkeypatch.setattr(machine, "PUT_OFF_SCAN_MAX", 5)
        read: list[bytes] = []

        class Counted:  # the store's KV, counting the retention index rows read
            def __init__(self, inner: LmdbKV) -> None:
                self.inner = inner

            def __getattr__(self, name: str) -> Any:
                return getattr(self.inner, name)

            def scan(self, table: bytes, *args: Any) -> Any:
                for row in self.inner.scan(table, *args):
                    if table == b"retention":
                        read.append(row[0])
                    yield row

        with s.log.env.read() as txn:
            kv: Any = Counted(LmdbKV(txn, s.log.env.dbs))
            now_ms = int(clock.wall * 1000)
            assert machine.plan_compact(kv, now_ms, 1000) == []
            assert len(read) == 5
            read.clear()
            assert machine.next_timer_ms(kv) is not None
            assert len(read) <= 6
    finally:
        s.close()


# --- 4: audit queries are not cut short ----------------------------------------------------------------


def test_audit_query_matches_a_plain_filter_over_the_whole_log(tmp_path: Path) -> None:
    s = mqstore.open(tmp_path / "q", background=False)
    try:
        s.set_policy("fin", mode="governance", retention_days=1)  # the first record
        log = s.audit.log
        base = s.audit_records(after=s.audit_head() - 1)[0]["time"]
        ops = ("lease", "ack", "delete", "défer")

        def fill(ctx: Any) -> None:
            kv = LmdbKV(ctx.txn, ctx.dbs)
            for i in range(3000):
                log.append(kv, {"op": ops[i % 4 if i % 7 else 2], "target": f"m{i % 13}", "n": i % 5,
                                "outcome": "denied" if i % 11 == 0 else "allowed",
                                **({"reason": "x"} if i % 11 == 0 else {})}, base + i // 3)
        s.log.write(fill)
        every = s.audit_records(after=0, limit=audit.AUDIT_READ_RECORDS_MAX)
        cases: list[dict[str, Any]] = [
            {}, {"where": {"op": "delete"}}, {"where": {"op": "défer", "outcome": "denied"}},
            {"where": {"n": 3}}, {"where": {"n": True}}, {"since_ms": base + 500}, {"until_ms": base + 700},
            {"since_ms": base + 100, "until_ms": base + 101, "where": {"target": "m4"}},
            {"since_ms": base + 10_000}, {"after": 1500, "where": {"op": "ack"}, "limit": 7},
            {"since_ms": base + 300, "after": 100, "limit": 50},
        ]
        for case in cases:
            where = case.get("where", {})
            expected = [r for r in every
                        if all(r.get(k) == v for k, v in where.items())
                        and r["time"] >= case.get("since_ms", 0) and r["time"] < case.get("until_ms", 2**62)
                        and r["seq"] > case.get("after", 0)][:case.get("limit", 1000)]
            assert s.audit_query(**case) == expected, case
    finally:
        s.close()


@pytest.mark.slow
def test_audit_query_finds_a_refusal_after_a_million_records(tmp_path: Path) -> None:
    path = tmp_path / "q"
    s = mqstore.open(path, background=False, map_size=2 << 30)
    try:
        s.set_policy("fin", mode="compliance", retention_days=30)
        mid = s.enqueue("a@x.org", ["b@y.net"], BODY, namespace="fin")
        log = s.audit.log
        base = s.audit_records(after=s.audit_head() - 1)[0]["time"]

        def fill(ctx: Any) -> None:
            kv = LmdbKV(ctx.txn, ctx.dbs)
            for _ in range(1_000_001):
                log.append(kv, {"op": "lease", "target": "x", "namespace": "fin", "outcome": "allowed"}, base)
        s.log.write(fill)
        with pytest.raises(Immutable):
            s.delete(mid)
        last = s.audit_records(after=s.audit_head() - 1)[0]
        assert [r["seq"] for r in s.audit_query(where={"op": "delete", "outcome": "denied"})] == [last["seq"]]
        assert last in s.audit_query(since_ms=last["time"])
    finally:
        s.close()
    r = _cli("audit", "query", "--data-dir", str(path), "--op", "delete", "--outcome", "denied", "--json")
    assert r.returncode == 0 and [x["seq"] for x in json.loads(r.stdout)] == [last["seq"]], r.stdout + r.stderr


# --- 5: legal holds: every request audited, the permission checked first --------------------------------


def test_a_second_hold_on_the_same_case_is_audited(tmp_path: Path) -> None:
    s = mqstore.open(tmp_path / "q", background=False)
    try:
        s.set_policy("fin", mode="governance", retention_days=1)
        mid = s.enqueue("a@x.org", ["b@y.net"], BODY, namespace="fin")
        alice = Actor("alice", frozenset({"compliance"}), auth="mtls")
        bob = Actor("bob", frozenset({"compliance"}), auth="mtls")
        s.add_legal_hold(mid, case="SEC-1", actor=alice)
        head = s.audit_head()
        s.add_legal_hold(mid, case="SEC-1", actor=bob)
        (rec,) = s.audit_records(after=head)
        assert (rec["op"], rec["actor"], rec["outcome"], rec["case"]) == ("legal_hold", "bob", "allowed", "SEC-1")
        assert rec["before"] == rec["after"] and rec["after"]["holds"] == ["SEC-1"]
        assert "already" in rec["unchanged"]
        assert list(s.get(mid).legal_holds) == ["SEC-1"]
    finally:
        s.close()


def test_releasing_a_hold_without_the_permission_is_refused_before_the_case_is_looked_up(tmp_path: Path) -> None:
    s = mqstore.open(tmp_path / "q", background=False)
    try:
        s.set_policy("fin", mode="governance", retention_days=1)
        mid = s.enqueue("a@x.org", ["b@y.net"], BODY, namespace="fin")
        admin = Actor("ops", frozenset({"admin"}), auth="token")
        head = s.audit_head()
        with pytest.raises(PermissionDenied):
            s.remove_legal_hold(mid, case="NO-SUCH-CASE", actor=admin)
        (rec,) = s.audit_records(after=head)
        assert (rec["op"], rec["actor"], rec["outcome"]) == ("release_legal_hold", "ops", "denied")
        with pytest.raises(PermissionDenied):
            s.add_legal_hold(mid, case="SEC-2", actor=admin)
        officer = Actor("officer", frozenset({"compliance"}), auth="mtls")
        with pytest.raises(NotFound):  # someone allowed to ask is told there is no such hold
            s.remove_legal_hold(mid, case="NO-SUCH-CASE", actor=officer)
    finally:
        s.close()


# --- 6: export-checkpoint checks --out before it signs ----------------------------------------------------


def test_export_checkpoint_with_a_bad_out_writes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "q"
    s = mqstore.open(data, background=False)
    s.set_policy("fin", mode="compliance", retention_days=1)
    s.close()

    def state() -> tuple[int, int, int]:
        with mqstore.open(data, background=False) as st:
            with st.log.env.read() as txn:
                checkpoints = len(list(audit.checkpoints(LmdbKV(txn, st.log.env.dbs))))
            return st.audit_head(), st.log.last_index, checkpoints

    existing = tmp_path / "already-there.json"
    existing.write_text("keep me\n")
    start = state()
    for out in (existing, tmp_path / "no-such-dir" / "ckpt.json", tmp_path):
        r = _cli("audit", "export-checkpoint", "--data-dir", str(data), "--out", str(out))
        assert r.returncode != 0, (out, r.stdout)
        assert state() == start, out
    assert existing.read_text() == "keep me\n"
    assert not (tmp_path / "no-such-dir").exists()

    # Good paths work: a new file, and --force replacing the existing one.
    fresh = tmp_path / "ckpt.json"
    assert _cli("audit", "export-checkpoint", "--data-dir", str(data), "--out", str(fresh)).returncode == 0
    assert audit.Checkpoint.from_json(fresh.read_text()).size == start[0] + 1
    forced = _cli("audit", "export-checkpoint", "--data-dir", str(data), "--out", str(existing), "--force")
    assert forced.returncode == 0, forced.stderr
    assert audit.Checkpoint.from_json(existing.read_text()).public_key is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["already-there.json", "ckpt.json", "q"]
    assert os.stat(existing).st_mode & 0o777 == 0o644
