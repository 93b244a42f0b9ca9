"""``mqstore recover``: rebuild a lost node from its peers under a new node id, and the explicit
procedure for a cluster that lost its majority.

Replacing a node (the normal case: a disk died, a site burned down). A data dir is never reused
under another id and an id never comes back: the replacement gets a new node id, is added as a
learner, catches up from the leader (snapshot, then log), is promoted to voter once caught up, and
only then is the failed id removed (and recorded as removed, so it can never rejoin). Placement
rules are checked by the leader at each step.

Losing a majority (``--force-new-cluster``). With a majority of voters gone for good no entry can
commit, and nothing in mqstore will ever decide on its own to continue without them. An operator
may: on one stopped survivor, the membership is rewritten to that node alone (every other member
is recorded as removed), any configuration change it had not applied is replaced by a no-op entry
(everything else in its log is kept), a fresh snapshot is taken, and the action is recorded in
the store (``ops.recovery_log`` in ``meta``, shown by ``mqstore status``) and in ``RECOVERY.log``
beside the data. Entries the lost majority committed but this survivor never received are lost:
choose the survivor with the highest last index (``mqstore status --data-dir``). Then start it
and add new nodes with ``recover``.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import struct
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mqstore import codec
from mqstore.codec import RecordType
from mqstore.config import NodeConfig
from mqstore.consensus.raft import members_of, validate_conf
from mqstore.consensus.types import ConfState, HardState, SnapshotMeta
from mqstore.errors import InvalidArgument, MQStoreError, NotFound
from mqstore.ops import facts
from mqstore.ops.facts import META_RECOVERY_LOG, META_RESTORED_FROM
from mqstore.store import LogStore, WriteContext

BOOTSTRAP_INDEX = 1
SNAPSHOT_DIR = "snapshots"
RECOVERY_FILE = "RECOVERY.log"
_U64 = struct.Struct(">Q")  # a log record's key: its index

ProgressFn = Callable[[str, int, int], None]


def _open(config: NodeConfig, data_dir: Path | None = None) -> LogStore:
    path = data_dir or Path(config.data_dir)
    if not (path / "data.mdb").exists():
        raise NotFound(f"no store at {path}")
    return LogStore(path, key_file=config.key_file, create=False)


def _record(log: LogStore, ctx: WriteContext, entry: dict[str, Any]) -> None:
    old = ctx.get(b"meta", META_RECOVERY_LOG) or b""
    ctx.put(b"meta", META_RECOVERY_LOG, old + json.dumps(entry, sort_keys=True).encode() + b"\n")


def _append_file(path: Path, entry: dict[str, Any]) -> None:
    with (path / RECOVERY_FILE).open("a") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def reseed(
    config: NodeConfig,
    cluster_id: str,
    *,
    action: str,
    reason: str,
    data_dir: Path | None = None,
    keep_unapplied: bool = True,
) -> dict[str, Any]:
    """Make the (stopped) store in the config's data dir the only voter of ``cluster_id``, keeping
    its data: the shared core of ``recover --force-new-cluster`` and ``restore --config``.

    Entries in the log after the applied index will commit once the node leads: a survivor keeps
    them (``keep_unapplied``: they may be acknowledged writes), a restored backup is cut back to its
    applied index (the point the backup describes). A configuration change a survivor had not
    applied must not take effect after the rewrite: each one is replaced by a no-op entry of the
    same index and term (``config_replaced``), and the entries around it are kept."""
    from mqstore.node.raftlog import LmdbRaftStorage
    from mqstore.node.replica import MemberInfo

    path = data_dir or Path(config.data_dir)
    log = _open(config, path)
    try:
        raft = facts.raft_facts(log.env)
        if raft is None:
            raise InvalidArgument(
                f"{path} holds an embedded store (no Raft state): only a cluster node's data (or a node's backup) "
                "can become a cluster node"
            )
        storage = LmdbRaftStorage(log)
        hard, old_conf = storage.initial_state()
        applied = storage.applied_index()
        me = config.node_id
        old_members = set(members_of(old_conf)) | set(raft.removed)
        if raft.node_id and raft.node_id != me:
            raise InvalidArgument(f"{path} belongs to node {raft.node_id}, the config names node {me}")
        if me in raft.removed:
            raise InvalidArgument(f"node id {me} was removed from this cluster: node ids are never reused")
        new_conf = ConfState(voters=frozenset({me}), sites=((me, config.site),), min_sites=1)
        validate_conf(new_conf)
        cut_from = applied + 1 if not keep_unapplied and applied < log.last_index else None
        # A configuration change this node had not applied must not come back after the rewrite:
        # it becomes a no-op (same index and term, so the log stays the same length and every
        # entry after it, maybe an acknowledged write, keeps its place).
        replaced = [(record.index, record.term) for record in log.iter_records(applied + 1)
                    if record.type == RecordType.CONFIG] if applied < log.last_index and cut_from is None else []
        new_last = (cut_from - 1) if cut_from is not None else log.last_index
        commit = max(applied, min(hard.commit, new_last))
        removed = sorted(old_members - {me})
        entry = {
            "action": action,
            "time_ms": int(time.time() * 1000),
            "operator": _operator(),
            "host": socket.gethostname(),
            "reason": reason,
            "node_id": me,
            "cluster_id": cluster_id,
            "previous_cluster_id": raft.cluster_id,
            "previous_voters": sorted(old_conf.voters),
            "previous_learners": sorted(old_conf.learners),
            "removed_ids": removed,
            "term": hard.term,
            "applied_index": applied,
            "commit_index_before": hard.commit,
            "last_index_before": log.last_index,
            "log_cut_from": cut_from,
            "config_replaced": [index for index, _ in replaced],
        }

        def fn(ctx: WriteContext) -> None:
            if cut_from is not None:
                ctx.truncate_suffix(cut_from)
            for index, term in replaced:
                noop = codec.encode_record(RecordType.NOOP, 0, term, index, 0, 0, b"")
                ctx.txn.put(_U64.pack(index), noop, db=ctx.dbs[b"log"])
            ctx.put(b"meta", b"node.id", me.to_bytes(8, "big"))
            ctx.put(b"meta", b"cluster.id", cluster_id.encode())
            storage.set_conf_state(ctx, new_conf)
            storage.set_hard_state(ctx, HardState(term=hard.term, vote=hard.vote, commit=commit))
            ctx.put(b"meta", b"member." + str(me).encode(), MemberInfo(me, config.site, config.address).encode())
            ctx.put(b"meta", b"cluster.removed", ",".join(str(n) for n in removed).encode())
            ctx.delete(b"meta", META_RESTORED_FROM)
            _record(log, ctx, entry)

        log.write(fn)
        if cut_from is not None:
            log.reset_bounds()
        # A fresh snapshot with the new membership: what a new member receives first.
        snap_dir = path / SNAPSHOT_DIR
        snap_dir.mkdir(mode=0o700, exist_ok=True)
        if applied > BOOTSTRAP_INDEX:
            term = storage.term(applied)
            work = snap_dir / f"tmp-{applied}-{uuid.uuid4().hex[:8]}"
            copied = log.copy_to(work)
            final = snap_dir / f"snap-{applied:020d}.mdb"
            os.replace(copied, final)
            work.rmdir()
        else:
            term, final = 1, None
        meta = SnapshotMeta(index=max(applied, BOOTSTRAP_INDEX), term=term, conf_state=new_conf)
        log.write(lambda ctx: storage.set_snapshot_meta(ctx, meta))
        for old in snap_dir.glob("*.mdb"):
            if old != final:
                old.unlink(missing_ok=True)
        _append_file(path, entry)
        return entry
    finally:
        log.close()


def _operator() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def force_new_cluster(config: NodeConfig, reason: str) -> dict[str, Any]:
    """``recover --force-new-cluster``: this survivor alone becomes the cluster (same cluster id)."""
    path = Path(config.data_dir)
    with facts.open_env(path) as env:
        raft = facts.raft_facts(env)
    if raft is None or not raft.node_id:
        raise InvalidArgument(f"{path} is not a cluster node's data dir")
    return reseed(config, raft.cluster_id, action="force-new-cluster", reason=reason)


# --- replacing a node from its peers ------------------------------------------------------------------


def replace_node(
    client: Any,
    config: NodeConfig,
    *,
    replace: int | None,
    wait_s: float,
    say: Callable[[str], None],
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Prepare ``config``'s data dir (if empty) as a new member, add it as a learner, wait until it
    runs and caught up, promote it, then remove ``replace``. Each step is idempotent, so running
    the command again after an interruption continues where it stopped."""
    from mqstore.node.runtime import prepare_join
    from mqstore.ops import remote

    lead = remote.leader_status(client)
    cluster_id = lead["cluster_id"]
    me = config.node_id
    members = {m["id"]: m for m in lead["members"]}
    if me in lead["removed_ids"]:
        raise InvalidArgument(f"node id {me} was removed from this cluster: node ids are never reused, pick a new one")
    if replace is not None and replace == me:
        raise InvalidArgument("the new node needs a new node id (node ids are never reused)")
    steps: list[str] = []
    path = Path(config.data_dir)
    if not (path / "data.mdb").exists():
        prepare_join(config, cluster_id)
        steps.append(f"prepared {path} for node {me} of cluster {cluster_id!r}")
        say(steps[-1])
    else:
        with facts.open_env(path) as env:
            raft = facts.raft_facts(env)
        if raft is None or raft.node_id != me or raft.cluster_id != cluster_id:
            raise InvalidArgument(f"{path} already holds a store that is not node {me} of cluster {cluster_id!r}: "
                                  "a replacement starts from an empty data dir")
    if me not in members:
        remote.change_membership(client, "add", me, config.site, config.address)
        steps.append(f"added node {me} (site {config.site}, {config.address}) as a learner")
        say(steps[-1])
    say(f"waiting for node {me} to run and catch up: start it now (mqstore serve --config <its config>)")

    def caught_up(member: dict[str, Any] | None, lead: dict[str, Any]) -> bool:
        return member is not None and member["match_index"] >= lead["commit_index"] > 0

    remote.wait_member(client, me, caught_up, wait_s, progress, "catching up")
    steps.append(f"node {me} caught up with the leader")
    say(steps[-1])

    def voter(member: dict[str, Any] | None, lead: dict[str, Any]) -> bool:
        return member is not None and bool(member["voter"])

    lead = remote.leader_status(client)
    if not next((m["voter"] for m in lead["members"] if m["id"] == me), False):
        _retry(lambda: remote.change_membership(client, "promote", me), wait_s)
    remote.wait_member(client, me, voter, wait_s, None, "promotion")
    steps.append(f"node {me} promoted to voter")
    say(steps[-1])
    if replace is not None:
        lead = remote.leader_status(client)
        if any(m["id"] == replace for m in lead["members"]):
            _retry(lambda: remote.change_membership(client, "remove", replace), wait_s)
            remote.wait_member(client, replace, lambda member, _lead: member is None, wait_s, None, "removal")
            steps.append(f"removed node {replace} (its id is never reused)")
        else:
            steps.append(f"node {replace} was not a member any more")
        say(steps[-1])
    final = remote.leader_status(client)
    return {"node_id": me, "cluster_id": cluster_id, "replaced": replace, "steps": steps,
            "members": final["members"]}


def _retry(fn: Callable[[], object], wait_s: float) -> None:
    """Membership changes are refused while another one is being applied: retry for a while."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fn()
            return
        except MQStoreError as exc:
            transient = "not applied yet" in str(exc) or "has not committed" in str(exc)
            if not transient or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


__all__ = ["RECOVERY_FILE", "force_new_cluster", "replace_node", "reseed"]
