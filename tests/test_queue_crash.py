"""kill -9 during enqueue/lease/ack load: no acknowledged operation is lost, the state tables stay
consistent with each other, and no recipient is ever held by two live leases.

Half of ``MQSTORE_CRASH_KILLS`` is the number of kills here (default 30 // 2 = 15); ``MQSTORE_CRASH_SEED`` the seed.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path

import pytest

import mqstore
from mqstore.crypto import create_key_file
from mqstore.ids import parse_id
from mqstore.queue import machine
from mqstore.queue.kv import LmdbKV
from mqstore.queue.model import LEASED, STATE_NAMES, LeaseRow, MessageRow, RecipientRow
from mqstore.testing.kill import run_and_kill

KILLS = max(1, int(os.environ.get("MQSTORE_CRASH_KILLS", "30")) // 2)
SEED = int(os.environ.get("MQSTORE_CRASH_SEED", "20261128"))


def _check_tables(store: mqstore.Store) -> None:
    """Every derived table agrees with the others: counters, leases, recipient rows."""
    with store.log.env.read() as txn:
        kv = LmdbKV(txn, store.log.env.dbs)
        counts: Counter[str] = Counter()
        leased_by_token: dict[int, set[tuple[bytes, int]]] = {}
        for key, value in kv.scan(b"recipients", b""):
            r = RecipientRow.decode(value)
            counts[STATE_NAMES[r.state]] += 1
            if r.state == LEASED:
                leased_by_token.setdefault(r.token, set()).add((key[:16], int.from_bytes(key[16:18], "big")))
            else:
                assert r.token == 0, "a recipient that is not leased still names a lease"
        leases = {int.from_bytes(k, "big"): LeaseRow.decode(v) for k, v in kv.scan(b"leases", b"")}
        # A leased recipient belongs to exactly one live lease, and that lease holds exactly the
        # recipients that name it: never two workers for one recipient.
        assert set(leases) == set(leased_by_token)
        for token, lease in leases.items():
            assert {(lease.mid, o) for o in lease.ordinals} == leased_by_token[token]
        stats = machine.read_stats(kv)
        for state in STATE_NAMES.values():
            assert sum(v.get(state, 0) for v in stats.values()) == counts[state], state
        for key, value in kv.scan(b"messages", b""):
            row = MessageRow.decode(value)
            per_state = Counter(STATE_NAMES[r.state] for _, r in machine.recipients_of(kv, key))
            assert {STATE_NAMES[s]: row.count(s) for s in STATE_NAMES if row.count(s)} == dict(per_state)


@pytest.mark.timeout(max(600, KILLS * 20))  # a soak (MQSTORE_CRASH_KILLS) gets time in proportion
def test_kill9_during_queue_load_loses_no_acknowledged_operation(tmp_path: Path) -> None:
    path = tmp_path / "queue"
    key = create_key_file(tmp_path / "queue.key")
    rng = random.Random(SEED)
    enqueued: dict[str, int] = {}
    final: dict[tuple[str, str], str] = {}  # (message id, address) -> state an acked op made final
    ops = 0
    for cycle in range(KILLS):
        args = [str(path), str(key), str(cycle)]
        for line in run_and_kill("mqstore.testing.crash_queue", args, rng.uniform(0.2, 1.2)):
            kind, *rest = line.split()
            ops += 1
            if kind == "enq":
                enqueued[rest[0]] = int(rest[1])
            elif kind in ("ack", "bounce"):
                for address in rest[2].split(","):
                    final[(rest[1], address)] = "delivered" if kind == "ack" else "bounced"
        with mqstore.open(path, key_file=key, background=False) as store:
            assert store.log.scan().clean
            for mid, n in enqueued.items():
                msg = store.get(mid)  # NotFound here would be a lost acknowledged enqueue
                assert len(msg.recipients) == n
            states = {}
            for mid in {m for m, _ in final}:
                for r in store.get(mid).recipients:
                    states[(mid, r.address)] = r.state
            for (mid, address), state in final.items():
                assert states[(mid, address)] == state, f"{mid} {address}: acknowledged {state} was lost"
            _check_tables(store)
            assert all(parse_id(m) for m in enqueued)
    assert len(enqueued) >= KILLS and len(final) >= KILLS, (len(enqueued), len(final), ops)
