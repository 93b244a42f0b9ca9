"""``mqstore recover``: rebuild a lost node from its peers under a new node id, and the explicit
procedure for a cluster that lost its majority.

Replacing a node (the normal case: a disk died, a site burned down). A data dir is never reused
under another id and an id never comes back: the replacement gets a new node id, is added as a
learner, catches up from the leader (snapshot, then log), is promoted to voter once caught up, and
only then is the failed id removed (and recorded as removed, so it can never rejoin). Placement
rules are checked by the leader at each step, and by ``recover`` on every step of its plan before
it does anything (a membership that ends or passes through a refused configuration is refused
up front; when only the promoted step would be refused, the failed id is removed first).

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
from mqstore.consensus.raft import members_of, next_conf_state, validate_conf
from mqstore.consensus.types import (
    ConfChange,
    ConfChangeItem,
    ConfChangeType,
    ConfState,
    HardState,
    InvalidConfig,
    SnapshotMeta,
)
from mqstore.errors import InvalidArgument, MQStoreError, NotFound, NotLeader, Overloaded, Unavailable
from mqstore.ops import facts
from mqstore.ops.facts import META_FOUNDING, META_RECOVERY_LOG, META_RESTORED_FROM
from mqstore.store import LogStore, WriteContext
from mqstore.store.env import fsync_path

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
    previous_cluster_id: str | None = None,
) -> dict[str, Any]:
    """Make the (stopped) store in the config's data dir the only voter of ``cluster_id``, keeping
    its data: the shared core of ``recover --force-new-cluster`` and ``restore --config``.

    Entries in the log after the applied index will commit once the node leads: a survivor keeps
    them (``keep_unapplied``: they may be acknowledged writes), a restored backup is cut back to its
    applied index (the point the backup describes; ``previous_cluster_id``: the cluster it came
    from, which a restored store no longer names). A configuration change a survivor had not
    applied must not take effect after the rewrite: each one is replaced by a no-op entry of the
    same index and term (``config_replaced``), and the entries around it are kept."""
    from mqstore.node.raftlog import LmdbRaftStorage
    from mqstore.node.replica import MemberInfo
    from mqstore.node.runtime import founding_digest

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
            "previous_cluster_id": raft.cluster_id or previous_cluster_id or "",
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

        # The snapshot a new member receives first carries the new membership. Its metadata is
        # written with the rewrite (one transaction) and its file copied after: a run killed
        # during the copy leaves the metadata naming a file that is missing, which the node makes
        # anew when a member needs it — never the old snapshot, whose members would come back
        # with it (before, the old metadata stayed until the copy had finished).
        snap_dir = path / SNAPSHOT_DIR
        snap_dir.mkdir(mode=0o700, exist_ok=True)
        for old in snap_dir.glob("*.mdb"):
            old.unlink(missing_ok=True)
        term = storage.term(applied) if applied > BOOTSTRAP_INDEX else 1
        meta = SnapshotMeta(index=max(applied, BOOTSTRAP_INDEX), term=term, conf_state=new_conf)

        def fn(ctx: WriteContext) -> None:
            if cut_from is not None:
                ctx.truncate_suffix(cut_from)
            for index, term in replaced:
                noop = codec.encode_record(RecordType.NOOP, 0, term, index, 0, 0, b"")
                ctx.txn.put(_U64.pack(index), noop, db=ctx.dbs[b"log"])
            ctx.put(b"meta", b"node.id", me.to_bytes(8, "big"))
            ctx.put(b"meta", b"cluster.id", cluster_id.encode())
            # Founded anew: two survivors reseeded apart (or a backup seeded twice) refuse each other.
            ctx.put(b"meta", META_FOUNDING, founding_digest(cluster_id, new_conf, os.urandom(16)))
            storage.set_conf_state(ctx, new_conf)
            storage.set_hard_state(ctx, HardState(term=hard.term, vote=hard.vote, commit=commit))
            ctx.put(b"meta", b"member." + str(me).encode(), MemberInfo(me, config.site, config.address).encode())
            ctx.put(b"meta", b"cluster.removed", ",".join(str(n) for n in removed).encode())
            ctx.delete(b"meta", META_RESTORED_FROM)
            storage.set_snapshot_meta(ctx, meta)
            _record(log, ctx, entry)

        log.write(fn)
        if cut_from is not None:
            log.reset_bounds()
        if applied > BOOTSTRAP_INDEX:  # the snapshot's file (index 1 is the metadata-only bootstrap one)
            work = snap_dir / f"tmp-{applied}-{uuid.uuid4().hex[:8]}"
            copied = log.copy_to(work)
            fsync_path(copied)
            os.replace(copied, snap_dir / f"snap-{applied:020d}.mdb")
            work.rmdir()
            fsync_path(snap_dir)
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
    the command again after an interruption continues where it stopped.

    The cluster may be electing a leader at any point (the leader just died, say): every step
    waits for one (up to ``wait_s`` each, saying what it waits for), and a membership change an
    election lost is proposed again. A change counts as made when the leader's membership shows
    it, so a change that committed although its call failed (or whose retry was refused as
    already made) is not an error."""
    from mqstore.node.runtime import prepare_join
    from mqstore.ops import remote

    waiter = _Waiter(client, wait_s, say)
    lead = waiter.leader("the cluster's leader")
    cluster_id = lead["cluster_id"]
    me = config.node_id
    if me in lead["removed_ids"]:
        raise InvalidArgument(f"node id {me} was removed from this cluster: node ids are never reused, pick a new one")
    if replace is not None and replace == me:
        raise InvalidArgument("the new node needs a new node id (node ids are never reused)")
    if replace is not None and _member(lead, replace) is None and replace not in lead["removed_ids"]:
        # Not a member, and never removed: a typo for the lost node's id. Going on would leave the
        # lost node a voter while saying it was replaced.
        members = ", ".join(f"{m['id']} ({'voter' if m['voter'] else 'learner'}, site {m['site']})"
                            for m in lead["members"])
        raise InvalidArgument(f"--replace {replace}: node {replace} is not a member of cluster {cluster_id!r} and "
                              f"never was (members: {members or 'none'}): give the lost node's id")
    # The placement rules are the leader's to enforce at each step, but a step it refuses after
    # the new node was added (or promoted) leaves the cluster half changed: check every step of
    # the plan against them first, from the membership the leader shows.
    order = _plan(lead, me, config.site, replace)
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
    if waiter.change("add", me, lambda m: m is not None, site=config.site, address=config.address):
        steps.append(f"added node {me} (site {config.site}, {config.address}) as a learner")
        say(steps[-1])
    say(f"waiting for node {me} to run and catch up: start it now (mqstore serve --config <its config>)")

    def caught_up(member: dict[str, Any] | None, lead: dict[str, Any]) -> bool:
        return member is not None and member["match_index"] >= lead["commit_index"] > 0

    remote.wait_member(client, me, caught_up, wait_s, progress, "catching up")
    steps.append(f"node {me} caught up with the leader")
    say(steps[-1])

    def promote() -> None:
        waiter.change("promote", me, lambda m: m is not None and bool(m["voter"]))
        steps.append(f"node {me} promoted to voter")
        say(steps[-1])

    def remove() -> None:
        assert replace is not None
        if waiter.change("remove", replace, lambda m: m is None):
            steps.append(f"removed node {replace} (its id is never reused)"
                         + (" before promoting the new node (the placement rules refuse the other order)"
                            if order == _REMOVE_FIRST else ""))
        else:
            steps.append(f"node {replace} was not a member any more")
        say(steps[-1])

    if order == _REMOVE_FIRST:
        remove()
        promote()
    else:
        promote()
        if replace is not None:
            remove()
    final = waiter.leader("the final membership")
    return {"node_id": me, "cluster_id": cluster_id, "replaced": replace, "steps": steps,
            "members": final["members"]}


_PROMOTE_FIRST = "promote first"
_REMOVE_FIRST = "remove first"


def _plan(lead: dict[str, Any], me: int, site: str, replace: int | None) -> str:
    """The order of :func:`replace_node`'s membership steps (promote the new node, then remove
    ``replace``; or, when the placement rules refuse the promoted step only, the other way round),
    each step checked against the placement rules (``validate_conf``, as the leader checks it) from
    the leader's membership ``lead``. Raises InvalidArgument, before anything is done, when the
    membership it ends with breaks them, or when neither order gets there one step at a time."""
    members = lead["members"]
    sites = {m["id"]: m["site"] for m in members}
    current = ConfState(voters=frozenset(m["id"] for m in members if m["voter"]),
                        learners=frozenset(m["id"] for m in members if not m["voter"]),
                        sites=tuple(sorted(sites.items())), min_sites=int(lead.get("min_sites") or 1))
    site = sites.get(me, site)  # a re-run: the leader keeps the site it was added with
    gone = replace is not None and replace in sites
    add = [] if me in sites else [ConfChangeItem(ConfChangeType.ADD_LEARNER, me, site)]
    promote = [] if me in current.voters else [ConfChangeItem(ConfChangeType.ADD_VOTER, me)]
    remove = [ConfChangeItem(ConfChangeType.REMOVE, replace)] if gone and replace is not None else []

    def refusal(items: list[ConfChangeItem]) -> str | None:
        conf = current
        try:
            for item in items:
                conf = next_conf_state(conf, ConfChange(items=(item,)))
        except InvalidConfig as exc:
            return str(exc)
        return None

    voters = sorted(current.voters - ({replace} if replace is not None else set()) | {me})
    final = ", ".join(f"{n} ({sites.get(n, site)})" for n in voters)
    what = (f"replacing node {replace} by node {me} in site {site!r}" if gone
            else f"adding node {me} in site {site!r} as a voter")
    try:
        validate_conf(ConfState(voters=frozenset(voters),
                                sites=tuple(sorted((n, sites.get(n, site)) for n in voters)),
                                min_sites=current.min_sites))
    except InvalidConfig as exc:
        raise InvalidArgument(
            f"{what} would break the placement rules: {exc} (voters {final}, min_sites "
            f"{current.min_sites}); nothing was done: give the new node a site that keeps them"
        ) from None
    first = refusal(add + promote + remove)
    if first is None:
        return _PROMOTE_FIRST
    if refusal(add + remove + promote) is None:
        return _REMOVE_FIRST
    raise InvalidArgument(
        f"{what} ends in a valid membership (voters {final}), but the placement rules refuse a step on the way "
        f"(one change at a time, whichever of promoting it and removing node {replace} comes first): "
        f"{first}; nothing was done"
    )


#: How long a proposed membership change may take to show in the leader's membership before it is
#: proposed again (an election can drop a proposal without an error reaching the caller).
CHANGE_SHOWS_WITHIN_S = 10.0
#: How long the leader's membership is watched for a change its call was refused as made already.
REFUSED_CHANGE_SHOWS_WITHIN_S = 2.0
_POLL_S = 0.2


def _transient(exc: MQStoreError) -> bool:
    """Whether ``exc`` says "not now" (no leader, an election, a change still being applied)
    rather than anything about the request."""
    text = str(exc)
    return (isinstance(exc, Unavailable | NotLeader | Overloaded) or "not applied yet" in text
            or "has not committed" in text)


class _Waiter:
    """The leader lookups and membership changes of :func:`replace_node`, each retried while the
    cluster cannot answer (no leader, an election, another change being applied), for up to
    ``wait_s``; ``say`` tells the operator what it waits for (once per new reason)."""

    def __init__(self, client: Any, wait_s: float, say: Callable[[str], None]) -> None:
        self.client = client
        self.wait_s = wait_s
        self.say = say
        self._said = ""

    def _waiting(self, text: str) -> None:
        if text != self._said:
            self._said = text
            self.say(f"waiting: {text}")

    def leader(self, what: str, deadline: float | None = None) -> dict[str, Any]:
        """The leader's status; while there is none (or it cannot be reached), wait for one."""
        from mqstore.ops import remote

        deadline = deadline if deadline is not None else time.monotonic() + self.wait_s
        while True:
            try:
                return remote.leader_status(self.client)
            except MQStoreError as exc:
                if not _transient(exc) or time.monotonic() > deadline:
                    raise
                self._waiting(f"a leader, for {what} ({exc})")
            time.sleep(_POLL_S)

    def change(
        self, op: str, node_id: int, done: Callable[[dict[str, Any] | None], bool], site: str = "", address: str = ""
    ) -> bool:
        """Make membership change ``op`` of ``node_id`` take effect: ``done(member or None)`` on the
        leader's membership. Returns False when it had taken effect already (nothing proposed)."""
        from mqstore.ops import remote

        what = f"{'adding' if op == 'add' else 'promoting' if op == 'promote' else 'removing'} node {node_id}"
        deadline = time.monotonic() + self.wait_s
        proposed = False
        while True:
            lead = self.leader(what, deadline)
            if done(_member(lead, node_id)):
                return proposed
            try:
                remote.change_membership(self.client, op, node_id, site, address)
                proposed = True
            except MQStoreError as exc:
                if not _transient(exc):
                    # Refused: maybe because it was made already (a retried call whose first
                    # attempt committed: "already a member", "not a member"). What counts is the
                    # membership the leader shows, once it applied what it committed.
                    grace = time.monotonic() + REFUSED_CHANGE_SHOWS_WITHIN_S
                    if self._shows(node_id, done, what, min(deadline, grace)):
                        return True
                    raise
                if time.monotonic() > deadline:
                    raise Unavailable(f"{what}: gave up after {self.wait_s:.0f} s: {exc}") from None
                self._waiting(f"{what} ({exc})")
                time.sleep(_POLL_S)
                continue
            # Proposed: wait until it shows. An election may drop it; then it is proposed again.
            if self._shows(node_id, done, what, min(deadline, time.monotonic() + CHANGE_SHOWS_WITHIN_S),
                           leader=(lead["node_id"], lead["term"])):
                return True
            if time.monotonic() > deadline:
                raise Unavailable(f"{what}: the change did not take effect within {self.wait_s:.0f} s")

    def _shows(self, node_id: int, done: Callable[[dict[str, Any] | None], bool], what: str, until: float,
               leader: tuple[int, int] | None = None) -> bool:
        """Whether the leader's membership shows ``done`` before ``until`` (stops early, False,
        when the leader that took a proposal is no longer the leader in that term)."""
        from mqstore.ops import remote

        while True:
            try:
                lead = remote.leader_status(self.client)
            except MQStoreError as exc:
                if not _transient(exc):
                    raise
                self._waiting(f"a leader, for {what} ({exc})")
            else:
                if done(_member(lead, node_id)):
                    return True
                if leader is not None and (lead["node_id"], lead["term"]) != leader:
                    return False
            if time.monotonic() > until:
                return False
            time.sleep(_POLL_S)


def _member(lead: dict[str, Any], node_id: int) -> dict[str, Any] | None:
    return next((m for m in lead["members"] if m["id"] == node_id), None)


__all__ = ["RECOVERY_FILE", "force_new_cluster", "replace_node", "reseed"]
