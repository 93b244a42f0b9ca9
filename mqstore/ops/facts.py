"""What a store directory is, read without its key: node identity, Raft state, membership, log
bounds, queue counters, disk use. Works on a stopped node's data dir, an embedded store, a restored
backup, or (read-only, beside the writer) a running one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mqstore.api import stats_counts
from mqstore.consensus.raft import decode_conf_state, decode_snapshot_meta
from mqstore.consensus.types import ConfState
from mqstore.errors import NotFound
from mqstore.queue import machine
from mqstore.queue.kv import LmdbKV
from mqstore.store.env import DATA_FILE, DATABASES, LOCK_FILE, Environment

_U64 = struct.Struct(">Q")
_HARD = struct.Struct(">QQQ")

# Meta keys written by mqstore.store.log and mqstore.node (read here, never written here except
# by the recovery tools, which say so).
META_NODE_ID = b"node.id"
META_CLUSTER_ID = b"cluster.id"
META_REMOVED = b"cluster.removed"
META_FOUNDING = b"cluster.founding"
META_HARD_STATE = b"raft.hard_state"
META_CONF_STATE = b"raft.conf_state"
META_APPLIED = b"raft.applied"
META_SNAPSHOT = b"raft.snapshot"
META_COMPACTED = b"raft.compacted"
META_FIRST_INDEX = b"log.first"
META_CREATED = b"store.created_ms"
META_STAMP = b"stamp.last_ms"
META_MEMBER_PREFIX = b"member."
#: Written by ``mqstore restore``: the backup's header (JSON) the store came from.
META_RESTORED_FROM = b"ops.restored_from"
#: Written by the recovery tools: one JSON line per explicit recovery action, oldest first.
META_RECOVERY_LOG = b"ops.recovery_log"

#: Tables that are not derived by applying the log although they sit among the state tables: the
#: audit log is appended by the node's queue with its signing key (``mqstore audit verify`` checks it).
NOT_DERIVED = (b"audit", b"audit_ckpt")
#: The state tables: derived only by applying the log (see mqstore/queue/model.py), i.e. every
#: named database from ``messages`` on, except :data:`NOT_DERIVED`.
STATE_TABLES = tuple(t for t in DATABASES[DATABASES.index(b"messages"):] if t not in NOT_DERIVED)


def _u64(raw: bytes | None) -> int | None:
    return None if raw is None else int(_U64.unpack(raw[:8])[0])


@contextlib.contextmanager
def open_env(path: str | os.PathLike[str], *, readonly: bool = True) -> Iterator[Environment]:
    """The store's LMDB environment (no key needed). NotFound when there is no store there."""
    path = Path(path)
    if not (path / "data.mdb").exists():
        raise NotFound(f"no mqstore store at {path} (no data.mdb)")
    env = Environment(path, readonly=readonly)
    try:
        yield env
    finally:
        env.close()


@dataclass(frozen=True, slots=True)
class RaftFacts:
    node_id: int
    cluster_id: str
    term: int
    vote: int
    commit_index: int
    applied_index: int
    snapshot_index: int
    compacted_index: int
    conf: ConfState
    removed: tuple[int, ...]
    members: dict[int, tuple[str, str]]  # node id -> (site, advertised address)
    founding: str = ""  # hex digest of the founding member list ("" unknown: joined, no snapshot yet)


def _get(txn: Any, env: Environment, key: bytes) -> bytes | None:
    value = txn.get(key, db=env.dbs[b"meta"])
    return None if value is None else bytes(value)


def raft_facts(env: Environment) -> RaftFacts | None:
    """The Raft state of a node's data dir (None for an embedded store)."""
    from mqstore.node.replica import MemberInfo

    with env.read() as txn:
        hard_raw = _get(txn, env, META_HARD_STATE)
        applied = _u64(_get(txn, env, META_APPLIED))
        node_id = _u64(_get(txn, env, META_NODE_ID))
        if hard_raw is None and applied is None and node_id is None:
            return None
        term, vote, commit = _HARD.unpack(hard_raw) if hard_raw else (0, 0, 0)
        conf_raw = _get(txn, env, META_CONF_STATE)
        snap_raw = _get(txn, env, META_SNAPSHOT)
        compacted_raw = _get(txn, env, META_COMPACTED)
        removed_raw = _get(txn, env, META_REMOVED)
        cluster = (_get(txn, env, META_CLUSTER_ID) or b"").decode()
        founding = (_get(txn, env, META_FOUNDING) or b"").hex()
        members: dict[int, tuple[str, str]] = {}
        with txn.cursor(db=env.dbs[b"meta"]) as cur:
            if cur.set_range(META_MEMBER_PREFIX):
                for key, value in cur:
                    if not bytes(key).startswith(META_MEMBER_PREFIX):
                        break
                    info = MemberInfo.decode(bytes(value))
                    members[info.node_id] = (info.site, info.address)
    snap = decode_snapshot_meta(snap_raw) if snap_raw else None
    return RaftFacts(
        node_id=node_id or 0,
        cluster_id=cluster,
        term=int(term),
        vote=int(vote),
        commit_index=int(commit),
        applied_index=applied or 0,
        snapshot_index=snap.index if snap else 0,
        compacted_index=int(_U64.unpack(compacted_raw[:8])[0]) if compacted_raw else (snap.index if snap else 0),
        conf=decode_conf_state(conf_raw) if conf_raw else ConfState(),
        removed=tuple(int(x) for x in removed_raw.decode().split(",") if x) if removed_raw else (),
        members=members,
        founding=founding,
    )


def log_bounds(env: Environment) -> tuple[int, int]:
    """(first index, last index) of the log (``first - 1`` as last when it is empty)."""
    with env.read() as txn:
        first = _u64(_get(txn, env, META_FIRST_INDEX)) or 1
        last = first - 1
        if b"log" in env.dbs:
            with txn.cursor(db=env.dbs[b"log"]) as cur:
                if cur.last():
                    last = max(last, int(_U64.unpack(bytes(cur.key()))[0]))
    return first, last


def data_file_size(path: Path) -> int:
    """The size of the store's data file (what a running node's status reports as its disk use)."""
    with contextlib.suppress(OSError):
        return (path / DATA_FILE).stat().st_size
    return 0


def queue_counts(env: Environment, now_ms: int) -> dict[str, Any]:
    """Recipients per state, messages, bytes and the oldest unfinished message's age (from the
    counters the state machine keeps; no decryption)."""
    with env.read() as txn:
        kv = LmdbKV(txn, env.dbs)
        per_ns = machine.read_stats(kv) if b"stats" in env.dbs else {}
        oldest = next(iter(kv.scan(b"live", b"")), None) if b"live" in env.dbs else None
    # the shape a running node's status shows (QueueBase.stats): built by the same function
    return stats_counts(per_ns, oldest[0] if oldest else None, now_ms)


def writer_running(path: Path) -> bool:
    """Whether a process holds the store open for writing (a running node or embedded store)."""
    lock = path / LOCK_FILE
    if not lock.exists():
        return False
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock taken here
    return False


def recovery_log(env: Environment) -> list[dict[str, Any]]:
    with env.read() as txn:
        raw = _get(txn, env, META_RECOVERY_LOG)
    return [json.loads(line) for line in raw.decode().splitlines() if line] if raw else []


def store_facts(path: str | os.PathLike[str], now_ms: int) -> dict[str, Any]:
    """Everything ``mqstore status --data-dir`` shows, as a dict."""
    path = Path(path)
    with open_env(path) as env:
        first, last = log_bounds(env)
        raft = raft_facts(env)
        with env.read() as txn:
            quarantined = sum(1 for _ in txn.cursor(db=env.dbs[b"quarantine"])) if b"quarantine" in env.dbs else 0
            restored = _get(txn, env, META_RESTORED_FROM)
            stamp = _u64(_get(txn, env, META_STAMP)) or 0
        counts = queue_counts(env, max(now_ms, stamp))
        recoveries = recovery_log(env)
    out: dict[str, Any] = {
        "data_dir": str(path.resolve()),
        "kind": "node" if raft is not None and raft.node_id else ("restored" if restored else "embedded"),
        "role": "running (read beside its writer)" if writer_running(path) else "stopped",
        "first_index": first,
        "last_index": last,
        "quarantined": quarantined,
        "disk_used_bytes": data_file_size(path),  # as online: data.mdb (snapshots etc. not counted)
        "stats": counts,
        "recoveries": recoveries,
    }
    if restored:
        out["restored_from"] = json.loads(restored)
    if raft is not None:
        conf = raft.conf
        out.update(
            node_id=raft.node_id,
            cluster_id=raft.cluster_id,
            founding=raft.founding,
            term=raft.term,
            vote=raft.vote,
            commit_index=raft.commit_index,
            applied_index=raft.applied_index,
            snapshot_index=raft.snapshot_index,
            min_sites=conf.min_sites,
            removed_ids=list(raft.removed),
            members=[
                {
                    "id": n,
                    "site": site,
                    "address": raft.members.get(n, ("", ""))[1],
                    "voter": n in conf.voters or n in conf.voters_outgoing,
                }
                for n, site in conf.sites
            ],
        )
    else:
        out["applied_index"] = last
        out["commit_index"] = last
    return out


__all__ = [
    "META_RECOVERY_LOG",
    "META_RESTORED_FROM",
    "STATE_TABLES",
    "RaftFacts",
    "data_file_size",
    "log_bounds",
    "open_env",
    "queue_counts",
    "raft_facts",
    "recovery_log",
    "store_facts",
]
