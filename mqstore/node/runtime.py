"""The node runtime: drives the consensus core over the LMDB log, the network and the clock.

One thread (the *raft thread*) owns the :class:`~mqstore.consensus.raft.RawNode`. It takes
messages from peers, client operations, ticks and reads from one inbox, and runs the Ready loop:

1. persist the Ready's entries and hard state **and** apply its committed entries to the queue
   state machine, in one LMDB transaction (one fsync; the applied index is in it too);
2. only then send its messages (so nothing is acknowledged before it is durable);
3. answer the clients whose entries were applied; ``advance``.

Client operations are *planned* on the leader against the applied state (which recipients to
lease, whether a token is stale) and turned into log entries; their results come from applying
those entries, so every replica computes the same thing. Operations that arrive while a Ready is
being persisted share the next one: concurrent client writes share one commit and one
replication round (group commit on the leader).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import random
import re
import shutil
import struct
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mqstore import limits
from mqstore.codec import RecordType
from mqstore.config import NodeConfig, bootstrap_conf
from mqstore.consensus import raft as raftcore
from mqstore.consensus.raft import Config as RaftConfig
from mqstore.consensus.raft import RawNode, decode_conf_change
from mqstore.consensus.types import (
    ConfChange,
    ConfChangeType,
    ConfState,
    HardState,
    Message,
    ProposalDropped,
    Ready,
    Role,
    Snapshot,
    SnapshotMeta,
)
from mqstore.consensus.types import NotLeader as CoreNotLeader
from mqstore.crypto import KeyProvider
from mqstore.crypto.keyring import ACTION_CREATE, META_SCRUB_PENDING, KeyEvent
from mqstore.errors import InvalidArgument, MQStoreError, NotLeader, Unavailable
from mqstore.node.clocks import PeerClocks
from mqstore.node.raftlog import RECORD_META_BYTES, LmdbRaftStorage, entry_payload, split_payload
from mqstore.node.replica import Applier, MemberInfo, read_members
from mqstore.node.transport import ChannelFactory, Transport, insecure_channel
from mqstore.queue.kv import LmdbKV
from mqstore.standstill import StandStillWarning
from mqstore.store import LogStore, WriteContext, keeps_live_body
from mqstore.store.env import DATA_FILE, Environment, StoreInUse, fsync_path

log = logging.getLogger(__name__)

META_NODE_ID = b"node.id"
META_CLUSTER_ID = b"cluster.id"
META_REMOVED = b"cluster.removed"  # node ids that left: never reused
META_FOUNDING = b"cluster.founding"  # digest of the founding member list (founding_digest; as ops/facts.py)
META_STAMP = b"raft.stamp_ms"  # the largest time stamp applied: a new leader never stamps earlier
BOOTSTRAP_INDEX = 1
INBOX_ITEMS_PER_LOOP_MAX = 4096
#: Operations carrying this many messages together are proposed without waiting for more.
_LINGER_ENTRIES_MAX = 64
#: A snapshot (a compacted copy of the store) is taken every this many applied entries; then the
#: log is compacted, keeping this many entries so a follower a little behind needs no snapshot.
SNAPSHOT_EVERY_ENTRIES = 100_000
KEEP_ENTRIES_AFTER_SNAPSHOT = 10_000
SNAPSHOT_DIR = "snapshots"
SCRUB_RETRY_S = 5  # a scrub put off while another process had the store open: tried again after this
INSTALL_WAIT_S = 1.0  # how long a snapshot install waits for such a process before swapping anyway
SCRUB_REWRITE_WAIT_S = 1.0  # how long a scrub waits for such a process (the raft thread waits with it)
#: What this code writes in ``snapshots/`` besides ``snap-<index>.mdb``: snapshots being received
#: (server.py), copies being written (``_write_snapshot_file``), a scrub's copy of the database,
#: a received snapshot being prepared for installing. Left behind only by a crash: removed at start.
# (``ops-``: the copy a Backup or Verify call of the Admin service streams from.)
_SNAPSHOT_DIR_SCRAPS = re.compile(r"(?:incoming-[0-9a-f]{32}\.mdb)|(?:ops-[0-9a-f]{32})"
                                  r"|(?:tmp|scrub|install)-[0-9]+-[0-9a-f]{8}")
_SNAPSHOT_FILE = re.compile(r"snap-[0-9]{20}\.mdb")
OPERATION_TIMEOUT_S = 10.0
#: How long a new leader holds operations until it applied an entry of its term (see
#: Node._term_ready): less than OPERATION_TIMEOUT_S, so a caller hears "nothing was written".
TERM_WAIT_MAX_S = OPERATION_TIMEOUT_S / 2
# A leader whose address in the replicated directory is stale proposes it again this often while
# an attempt fails (see Node._advertise_if_stale).
ADVERTISE_RETRY_S = 2.0
#: Reads (ReadIndex) the raft thread holds at once; more are refused (Unavailable) until some end.
READS_PENDING_MAX = raftcore.READ_REQUESTS_PENDING_MAX
_U64 = struct.Struct(">Q")


class NotBootstrapped(MQStoreError):
    """The data directory holds no cluster state: bootstrap a new cluster or join one."""


# --- data directory setup ----------------------------------------------------------------------


def _open_log(config: NodeConfig, key_provider: KeyProvider | None, create: bool) -> LogStore:
    if key_provider is not None:
        return LogStore(config.data_dir, key_provider=key_provider, create=create)
    return LogStore(config.data_dir, key_file=config.key_file, create=create)


def founding_digest(cluster_id: str, conf: ConfState, salt: bytes = b"") -> bytes:
    """The digest a cluster is founded with: of its id and the founding member list (voters,
    learners, each member's site, ``min_sites``), not of addresses (a peer's address in a config is that node's
    own way to reach it). Every initial member computes the same one from the same list, in any
    order; a node bootstrapped with another list gets another, and the nodes refuse each other's
    messages (Raft's log matching assumes one founding state per cluster: two under one id would
    vote in, and overwrite, each other's logs). A reseed (``recover --force-new-cluster``,
    ``restore --cluster-id``) founds anew with a random ``salt``: two survivors reseeded apart are
    two clusters, each refusing the other."""
    canonical = json.dumps(
        {
            "cluster_id": cluster_id,
            "voters": sorted(conf.voters),
            "learners": sorted(conf.learners),
            "min_sites": conf.min_sites,
            "sites": sorted([node_id, site] for node_id, site in conf.sites),
            "salt": salt.hex(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(b"mqstore-founding-v1\0" + canonical.encode()).digest()[:16]


def _initialize(
    config: NodeConfig, cluster_id: str, conf: ConfState | None, key_provider: KeyProvider | None
) -> None:
    data_dir = Path(config.data_dir)
    if (data_dir / "data.mdb").exists():
        if _never_written(data_dir):
            raise InvalidArgument(
                f"{config.data_dir} holds an empty store and no node: a bootstrap or join that was interrupted "
                "(or a store opened and never written). Nothing is in it: remove its data.mdb and lock.mdb and "
                "run the command again"
            )
        raise InvalidArgument(f"{config.data_dir} already holds a store: refusing to overwrite it")
    if conf is not None:
        raftcore.validate_conf(conf)  # before anything is written: a refused config leaves nothing
    existed = data_dir.exists()
    before = set(os.listdir(data_dir)) if existed else set()
    try:
        _write_initial_state(config, cluster_id, conf, key_provider)
    except BaseException:
        # Nothing of a half-made store may stay behind: the corrected command must just run.
        if not existed:
            shutil.rmtree(data_dir, ignore_errors=True)
        else:
            for name in set(os.listdir(data_dir)) - before:
                _remove(data_dir / name)
        raise


def _never_written(data_dir: Path) -> bool:
    """Whether the store in ``data_dir`` holds nothing: no node rows and no log record (what a
    bootstrap killed between creating the store and writing its first state leaves)."""
    from mqstore.ops import facts

    try:
        with facts.open_env(data_dir) as env:
            first, last = facts.log_bounds(env)
            return facts.raft_facts(env) is None and last < first
    except Exception:
        return False


def _write_initial_state(
    config: NodeConfig, cluster_id: str, conf: ConfState | None, key_provider: KeyProvider | None
) -> None:
    store = _open_log(config, key_provider, create=True)
    try:
        storage = LmdbRaftStorage(store)

        def fn(ctx: WriteContext) -> None:
            ctx.put(b"meta", META_NODE_ID, _U64.pack(config.node_id))
            ctx.put(b"meta", META_CLUSTER_ID, cluster_id.encode())
            if conf is not None:
                meta = SnapshotMeta(index=BOOTSTRAP_INDEX, term=1, conf_state=conf)
                storage.set_snapshot_meta(ctx, meta)
                storage.set_conf_state(ctx, conf)
                ctx.put(b"meta", META_FOUNDING, founding_digest(cluster_id, conf))
                storage.set_hard_state(ctx, HardState(term=1, vote=0, commit=BOOTSTRAP_INDEX))
                storage.set_applied(ctx, BOOTSTRAP_INDEX)
                ctx.put(b"meta", b"log.first", _U64.pack(BOOTSTRAP_INDEX + 1))
                members = [(config.node_id, config.site, config.address)]
                members += [(p.id, p.site, p.address) for p in config.peers]
                for node_id, site, address in members:
                    info = MemberInfo(node_id, site, address)
                    ctx.put(b"meta", b"member." + str(node_id).encode(), info.encode())

        store.write(fn)
    finally:
        store.close()


def bootstrap(config: NodeConfig, cluster_id: str, key_provider: KeyProvider | None = None) -> ConfState:
    """Create a new cluster's first state in an empty data dir. Every initial member runs this
    with the same member list (its own node plus ``peers``) and cluster id."""
    conf = bootstrap_conf(config)
    _initialize(config, cluster_id, conf, key_provider)  # validates the placement rules
    return conf


def prepare_join(config: NodeConfig, cluster_id: str, key_provider: KeyProvider | None = None) -> None:
    """Prepare an empty data dir for a node being added to an existing cluster (``cluster add``
    on the leader): it starts empty and receives the leader's snapshot."""
    _initialize(config, cluster_id, None, key_provider)


# --- operations ------------------------------------------------------------------------------------

Plan = list[tuple[int, bytes]]  # (record type, entry payload) to propose


@dataclass(slots=True)
class Operation:
    """A client request the raft thread turns into log entries. ``plan`` runs in the raft
    thread on the leader (it may raise to refuse the request, nothing changes); ``finish`` turns
    the applied entries' results into the answer."""

    plan: Callable[[Node], Plan]
    #: Turns ``[(log index, apply result), ...]`` (one per planned entry, in order) into the answer.
    finish: Callable[[list[tuple[int, object]]], object] = lambda results: results
    future: Future[object] = field(default_factory=Future)
    indices: list[tuple[int, int]] = field(default_factory=list)
    results: dict[int, object] = field(default_factory=dict)
    reserved: set[bytes] = field(default_factory=set)
    #: When it was made (monotonic): a new leader holds it at most TERM_WAIT_MAX_S from then.
    made: float = field(default_factory=time.monotonic)
    #: Lease tokens this operation settles (planned, not applied yet): see ``Node.settling``.
    settling: set[int] = field(default_factory=set)
    #: Per planned entry (same order as the plan), what applying it can use instead of decoding
    #: the entry again (the leader already has each new message's envelope); None: nothing.
    hints: list[object] | None = None


class Node:
    """A storage node: one member of a replicated mqstore cluster."""

    def __init__(
        self,
        config: NodeConfig,
        *,
        clock: Callable[[], float] = time.time,
        key_provider: KeyProvider | None = None,
        channel_factory: ChannelFactory = insecure_channel,
        snapshot_every: int = SNAPSHOT_EVERY_ENTRIES,
        keep_entries: int = KEEP_ENTRIES_AFTER_SNAPSHOT,
    ) -> None:
        if snapshot_every < 1 or keep_entries < 0:
            raise InvalidArgument("snapshot_every must be >= 1 and keep_entries >= 0")
        self.config = config
        self.clock = clock
        self.snapshot_every = snapshot_every
        self.keep_entries = keep_entries
        if not (Path(config.data_dir) / "data.mdb").exists():
            raise NotBootstrapped(
                f"{config.data_dir} is empty: run `mqstore bootstrap` to create a new cluster, or "
                "`mqstore join` to add this node to an existing one (an empty data dir never joins by accident)"
            )
        self.log = _open_log(config, key_provider, create=False)
        try:
            raw_id = self.log.meta_get(META_NODE_ID)
            if raw_id is None and self.log.last_index < self.log.first_index:
                raise NotBootstrapped(
                    f"{config.data_dir} holds an empty store and no node: a bootstrap or join that was interrupted "
                    "(or a store opened and never written). Nothing is in it: remove its data.mdb and lock.mdb and "
                    "run `mqstore bootstrap` or `mqstore join` again"
                )
            if raw_id is None:
                raise NotBootstrapped(
                    f"{config.data_dir} is not a cluster node's data dir: it holds an embedded store (one "
                    "`mqstore demo` or mqstore.open made there); give the node another directory (`mqstore serve "
                    "--data-dir DIR`, or data_dir in its config)"
                )
            stored_id = _U64.unpack(raw_id)[0]
            if stored_id != config.node_id:
                raise InvalidArgument(
                    f"{config.data_dir} belongs to node {stored_id}, but the config says node {config.node_id}"
                )
            self.cluster_id = (self.log.meta_get(META_CLUSTER_ID) or b"").decode()
            if config.cluster_id and config.cluster_id != self.cluster_id:
                raise InvalidArgument(
                    f"{config.data_dir} belongs to cluster {self.cluster_id!r}, the config says {config.cluster_id!r}"
                )
            #: Digest of the member list this node's cluster was founded with (b"": not known
            #: yet, a joined node before its first snapshot): see :func:`founding_digest`.
            self.founding = self.log.meta_get(META_FOUNDING) or b""
            self.storage = LmdbRaftStorage(self.log)
            self.applier = Applier(self.log)
            applied = self.storage.applied_index()
            self.raw = RawNode(
                RaftConfig(id=config.node_id, election_tick=config.election_tick, heartbeat_tick=1, applied=applied),
                self.storage,
                random.Random(os.urandom(16)),
            )
            stored_site = dict(self.raw.conf_state.sites).get(config.node_id)
            if stored_site is not None and stored_site != config.site:
                # The commit rule counts sites from the membership: a node that believed itself
                # elsewhere would report, audit and advertise one site while counting as another.
                raise InvalidArgument(
                    f"{config.data_dir} holds node {config.node_id} of site {stored_site!r}, but the config says site "
                    f"{config.site!r}: a member's site changes only by replacing it (add a new node, remove this one)"
                )
            raw_stamp = self.log.meta_get(META_STAMP)
            self.stamp_ms = _U64.unpack(raw_stamp)[0] if raw_stamp else 0
            #: Guards stamp_ms, which the Raft thread and the threads staging enqueues both raise.
            self._stamp_lock = threading.Lock()
            self.members: dict[int, MemberInfo] = read_members(self.log)
            #: Ids removed from the cluster (cached: the Raft service refuses their messages).
            self.removed: frozenset[int] = frozenset(self.removed_ids())
        except BaseException:
            self.log.close()
            raise
        #: Peers' clock offsets, and the correction this node's stamps get (see clocks.py).
        self.clocks = PeerClocks(config.node_id, clock, config.max_clock_offset_ms)
        # Message ids and creation times carry the corrected time too; messages are created at
        # the queue's time on this node, never earlier than a stamp it applied or a message it
        # created before (creating one raises the queue's time like any other entry).
        self.log.use_clock(self.clocks.now_ms, self.now_ms)
        self._standstill = StandStillWarning(f"node {config.node_id}", log)
        self.transport = Transport(self.cluster_id, self._address_of, self._unreachable, channel_factory,
                                   stamp=self.clocks.stamp)
        self.transport.founding = self.founding
        self.snapshot_dir = Path(config.data_dir) / SNAPSHOT_DIR
        self.snapshot_dir.mkdir(mode=0o700, exist_ok=True)
        self._snapshot_index = self.storage.snapshot_meta().index
        self._clean_snapshot_dir()
        #: A snapshot's file was missing when a peer needed it: take a new one between Readys.
        self._snapshot_wanted = False
        self._compactor: threading.Thread | None = None
        self._shreds_scrubbed = 0
        # a shred applied before a crash, whose scrub did not finish: do it once running
        self._scrub_pending = self.log.meta_get(META_SCRUB_PENDING) is not None
        self._scrub_retry_at = 0.0  # a scrub put off while another process had the store open: not before this
        self._incoming: dict[int, Path] = {}  # snapshot index -> received data file
        self._heard: dict[int, float] = {}  # peer -> when its last message arrived (monotonic)
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._pending: dict[int, tuple[int, Operation]] = {}  # index -> (term, operation)
        self._hints: dict[int, tuple[int, object]] = {}  # index -> (term, what applying can reuse)
        self._new_ops: list[Operation] = []  # arrived in this loop iteration, proposed together
        self._expect_ops = 0  # callers in play when the last round was answered (see _propose_now)
        self._advertising: Operation | None = None  # the last proposal of this node's directory entry
        self._advertise_after = 0.0  # monotonic time before which it is not proposed again
        self._outstanding = 0  # operations submitted and not answered yet
        self._outstanding_lock = threading.Lock()
        self._hold_until: float | None = None  # until when _new_ops wait for more
        self._linger_s = limits.PROPOSE_LINGER_MAX_US / 1e6
        self._reserved: set[bytes] = set()  # messages with a lease planned but not applied yet
        #: Lease tokens with a settle planned and not applied yet, with how many operations settle
        #: each: a plan that must settle all of its leases or none (ack_many) refuses one of them.
        self.settling: dict[int, int] = {}
        self._reads: dict[bytes, Future[int]] = {}
        self._read_waiters: list[tuple[int, Future[int]]] = []
        self._applied = applied
        try:
            self._applied_term = self.storage.term(applied)  # the term of the last entry applied
        except MQStoreError:
            self._applied_term = 0
        #: Founding digests snapshots were sent with, by snapshot index (note_snapshot_founding).
        self._snapshot_founding: dict[int, bytes] = {}
        self._role = Role.FOLLOWER
        self._leader = 0
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self._stop_called = False
        #: Set when the raft thread died of an error (e.g. a failed disk write): the node serves
        #: nothing more; ``mqstore serve`` then stops it and exits non-zero for its supervisor.
        self.failed = threading.Event()
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"mqstore-raft-{config.node_id}", daemon=True)
        self._status_lock = threading.Lock()
        self.on_apply: Callable[[int], None] | None = None  # test hook: called after each apply
        #: Called in the raft thread once what the queue may cache from the applied state changed
        #: under it: after applying a POLICY or DROP entry (whichever node proposed it; False),
        #: and after a snapshot replaced the whole state (True). The queue drops its caches then.
        self.on_state_changed: Callable[[bool], None] | None = None
        #: Called in the transaction that makes a received snapshot copy this node's state.
        self.on_snapshot_adopted: Callable[[LmdbKV], object] | None = None

    # --- public ----------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def node_id(self) -> int:
        return self.config.node_id

    @property
    def is_leader(self) -> bool:
        return self._role == Role.LEADER

    @property
    def leader_id(self) -> int:
        return self._leader

    @property
    def applied_index(self) -> int:
        return self._applied

    @property
    def is_removed(self) -> bool:
        """Whether this node was removed from the cluster (it may keep running: it then serves
        nothing, reports NOT_SERVING and the role "removed"). A node that knows no membership
        yet (joined, before the leader's snapshot arrived) is not removed."""
        if self.node_id in self.removed:
            return True
        sites = self.raw.conf_state.sites
        return bool(sites) and all(n != self.node_id for n, _ in sites)

    def removed_ids(self) -> list[int]:
        """Ids of members removed from the cluster: they are never given to a node again."""
        raw = self.log.meta_get(META_REMOVED)
        return [int(x) for x in raw.decode().split(",") if x] if raw else []

    def leader_address(self) -> str:
        return self._address_of(self._leader, for_clients=True) or "" if self._leader else ""

    def receive(self, message: Message) -> None:
        """A message from a peer (called by the Raft service)."""
        self._inbox.put(("msg", message))

    def note_snapshot_founding(self, index: int, founding: bytes) -> None:
        """The founding digest a snapshot at ``index`` was sent with (Raft service): a node that
        does not know its founding yet (joined) takes it when it installs that snapshot."""
        if founding and not self.founding:
            if len(self._snapshot_founding) >= 16:
                self._snapshot_founding.clear()
            self._snapshot_founding[index] = founding

    def submit(self, op: Operation, timeout: float = OPERATION_TIMEOUT_S) -> object:
        """Run ``op`` on the leader and wait for its entries to be applied here."""
        if self._stopping.is_set():
            raise Unavailable(f"node {self.node_id} is shutting down", not_applied=True)
        if not self.is_leader:
            raise self._not_leader()
        with self._outstanding_lock:
            self._outstanding += 1
        op.future.add_done_callback(self._answered)
        self._inbox.put(("op", op))
        try:
            return op.future.result(timeout)
        except TimeoutError:
            raise Unavailable(
                f"no quorum confirmed the write within {timeout:.0f} s (leader {self._leader}); it may "
                "still commit: retry with the same idempotency key"
            ) from None

    def _answered(self, _future: Future[object]) -> None:
        with self._outstanding_lock:
            self._outstanding -= 1

    def read_barrier(self, timeout: float = OPERATION_TIMEOUT_S) -> None:
        """Wait until a linearizable read of the local state is possible (ReadIndex): the leader
        confirms it still leads and this node has applied everything committed before the call."""
        if not self.is_leader:
            raise self._not_leader()
        future: Future[int] = Future()
        context = uuid.uuid4().bytes
        self._inbox.put(("read", (context, future)))
        try:
            future.result(timeout)
        except TimeoutError:
            # Nobody waits for this read any more: the raft thread forgets it (here and in the
            # consensus core), so reads that time out never pile up.
            self._inbox.put(("read-abandoned", (context, future)))
            raise Unavailable("the leader could not confirm its leadership in time") from None

    def call(self, fn: Callable[[], object], timeout: float = OPERATION_TIMEOUT_S) -> object:
        """Run ``fn`` in the raft thread (membership changes, leader transfer) and return its result."""
        future: Future[object] = Future()
        self._inbox.put(("call", (fn, future)))
        return future.result(timeout)

    def hand_over_leadership(self, timeout: float = 5.0) -> bool:
        """If leader, transfer leadership to the most up-to-date voter in contact (see
        :meth:`transfer_candidates`) and wait for it to take over; when that transfer is abandoned
        (the core gives up after one election timeout), try the next such voter, within
        ``timeout`` in all. Returns True when this node is no longer leader; a False is logged
        (the node then stops as leader: the others elect a new one after an election timeout)."""
        if not self.is_leader or len(self.raw.conf_state.voters) < 2:
            return not self.is_leader
        deadline = time.monotonic() + timeout
        tried: list[int] = []

        def next_target() -> int:  # raft thread; 0: this node leads no more
            if self.raw.role != Role.LEADER:
                return 0
            return self._transfer_to_best(exclude=set(tried))

        # A voter may be out of the replicate state for a moment (a new leader's first round, a
        # message lost): candidates are looked for during one election timeout.
        look_until = time.monotonic() + self.config.election_tick * self.config.heartbeat_ms / 1000
        while self.is_leader and time.monotonic() < deadline:
            try:
                target = int(self.call(next_target, timeout=1.0))  # type: ignore[call-overload]
            except Unavailable as exc:
                if self.is_leader and time.monotonic() < min(look_until, deadline):
                    time.sleep(self.config.heartbeat_ms / 1000)
                    continue
                if self.is_leader and not tried:  # else said below
                    log.warning("node %d: leadership not handed over: %s", self.node_id, exc)
                break
            except Exception as exc:
                if self.is_leader:
                    log.warning("node %d: leadership not handed over: %s", self.node_id, exc)
                break
            if target == 0:
                break
            tried.append(target)
            log.info("node %d: handing leadership over to node %d", self.node_id, target)
            while self.is_leader and time.monotonic() < deadline and self.raw.lead_transferee == target:
                time.sleep(0.02)
            time.sleep(0.05)  # a transfer that just completed: the new role is being taken up
        while self.is_leader and self.raw.role != Role.LEADER and time.monotonic() < deadline:
            time.sleep(0.01)  # stepped down in the core: the driver takes it up at once
        if self.is_leader and tried:
            log.warning("node %d: leadership not handed over within %.1f s (node(s) %s did not take over): the "
                        "other voters elect a new leader after an election timeout", self.node_id, timeout,
                        ", ".join(str(n) for n in tried))
        return not self.is_leader

    def stop(self, transfer_leadership: bool = True, timeout: float = 5.0) -> None:
        """Stop: hand leadership to another voter first (when leader), then stop the raft thread,
        the transport and the store."""
        with self._stop_lock:
            if self._stop_called:
                return
            self._stop_called = True
        if transfer_leadership and not self._stopping.is_set():
            self.hand_over_leadership(timeout)
        self._stopping.set()
        self._inbox.put(("stop", None))
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.transport.close()
        self._fail_all(Unavailable(f"node {self.node_id} stopped"))
        self._role, self._leader = Role.FOLLOWER, 0  # a stopped node leads nothing
        self.log.close()
        self._stopped.set()

    def status(self) -> dict[str, Any]:
        raw = self.raw
        with self._status_lock:
            conf = raw.conf_state
            progress = raw.progress() if self.is_leader else {}
            return {
                "node_id": self.node_id,
                "site": self.config.site,
                "role": self._role.name.lower().replace("_", "-"),
                "term": raw.term,
                "leader_id": self._leader,
                "leader_address": self.leader_address(),
                "commit_index": raw.commit_index,
                "applied_index": self._applied,
                "first_index": self.storage.first_index(),
                "last_index": raw.last_index,
                "min_sites": conf.min_sites,
                "members": [
                    {
                        "id": n,
                        "site": site,
                        "address": self._address_of(n, for_clients=True) or "",
                        "voter": n in conf.voters or n in conf.voters_outgoing,
                        "match_index": getattr(progress.get(n), "match", 0),
                        **self._clock_of(n),
                    }
                    for n, site in conf.sites
                ],
                "clock_correction_ms": self.clocks.correction_ms,
            }

    def _clock_of(self, node_id: int) -> dict[str, float]:
        """Member ``node_id``'s clock offset from this node's (nothing when not known)."""
        if node_id == self.node_id:
            return {"clock_offset_ms": 0.0, "clock_error_ms": 0.0}
        est = self.clocks.offset(node_id)
        return {} if est is None else {"clock_offset_ms": est.offset_ms, "clock_error_ms": est.error_ms}

    # --- helpers for operations (raft thread) ---------------------------------------------------

    def now_ms(self) -> int:
        """The time stamp for new entries (and new messages' creation time): never earlier than
        anything applied, in the log or stamped before. Any thread."""
        clock_ms = self.clocks.now_ms()
        self._standstill.check(clock_ms, self.stamp_ms)
        return self._raise_stamp(clock_ms)

    def _raise_stamp(self, stamp_ms: int) -> int:
        with self._stamp_lock:
            if stamp_ms > self.stamp_ms:
                self.stamp_ms = stamp_ms
            return self.stamp_ms

    def read_state(self) -> _ReadView:
        return _ReadView(self.log)

    # --- internals -------------------------------------------------------------------------------

    def _not_leader(self) -> NotLeader:
        if self._leader:
            return NotLeader(
                f"node {self.node_id} is not the leader; node {self._leader} is",
                self._leader,
                self.leader_address(),
            )
        return NotLeader(f"node {self.node_id} is not the leader and knows of none right now")

    def _address_of(self, node_id: int, for_clients: bool = False) -> str | None:
        if node_id == self.node_id:
            return self.config.address
        if not for_clients:
            local = self.config.peer_address(node_id)
            if local:
                return local  # a local override (e.g. a proxy) for this link
        info = self.members.get(node_id)
        if info is not None:
            return info.address
        return self.config.peer_address(node_id)

    def _unreachable(self, peer: int, down: bool) -> None:
        self._inbox.put(("unreachable", (peer, down)))

    def _run(self) -> None:
        tick_s = self.config.heartbeat_ms / 1000
        next_tick = time.monotonic() + tick_s
        try:
            while not self._stopping.is_set():
                wake = next_tick if self._hold_until is None else min(next_tick, self._hold_until)
                timeout = max(0.0, wake - time.monotonic())
                try:
                    items = [self._inbox.get(timeout=timeout)]
                except queue.Empty:
                    items = []
                while items and len(items) < INBOX_ITEMS_PER_LOOP_MAX:
                    try:
                        items.append(self._inbox.get_nowait())
                    except queue.Empty:
                        break
                for kind, item in items:
                    if kind == "stop":
                        return
                    self._handle(kind, item)
                if self._new_ops and self._propose_now():
                    ops, self._new_ops = self._new_ops, []
                    self._hold_until = None
                    self._start_ops(ops)
                now = time.monotonic()
                if now >= next_tick:
                    self.raw.tick()
                    next_tick = now + tick_s
                    conf = self.raw.conf_state
                    self.clocks.update(conf.voters, (n for n, _ in conf.sites), self._leader)
                    if self.is_leader:
                        self._advertise_if_stale(now)
                while self.raw.has_ready():
                    self._process_ready()
                if self._incoming:
                    self._drop_stale_incoming()
                if self._scrub_pending and time.monotonic() >= self._scrub_retry_at:
                    # a scrub a crash interrupted, or one put off: between Readys, as usual
                    self._scrub_pending = False
                    self.scrub_after_shred()
                if self._snapshot_wanted:
                    self._snapshot_wanted = False
                    self.create_snapshot()
        except BaseException as exc:
            log.exception("node %d: raft thread failed; the node stops", self.node_id)
            self.failure = exc
            self._stopping.set()
            self._role, self._leader = Role.FOLLOWER, 0  # a dead raft thread leads nothing
            self._fail_all(Unavailable(f"node {self.node_id} failed"))
            self.failed.set()

    def _propose_now(self) -> bool:
        """Propose the operations gathered so far, or wait a little for more? Callers that
        write, wait for the answer and write again (an MTA's delivery workers, clients each
        waiting for their last write) come back soon after a round answers them: holding the
        proposal until as many operations are here as callers were in play when the last round
        was answered, for at most ``limits.PROPOSE_LINGER_MAX_US``, puts them in one round (one
        fsync, one append per follower) instead of a trickle of small rounds, and merges groups
        that a burst split. A lone caller never waits. Raft messages are handled meanwhile."""
        if self.is_leader and not self._term_ready():
            return self._wait_for_term()
        if len(self._new_ops) >= self._expect_ops or not self.is_leader or not self._linger_s:
            return True
        if sum(len(op.hints) if op.hints else 1 for op in self._new_ops) >= _LINGER_ENTRIES_MAX:
            return True  # batches (enqueue_many, streams) are rounds big enough already
        now = time.monotonic()
        if self._hold_until is None:
            self._hold_until = now + self._linger_s
            return False
        return now >= self._hold_until

    def _term_ready(self) -> bool:
        """Whether this node applied an entry of its current term. A new leader's applied state
        may lack entries an earlier leader committed (and answered for): plans read that state (is
        a lease token live, does a message exist), so they wait until the leader applied the empty
        entry it appends on election, which comes after every entry committed before it."""
        return self._applied_term == self.raw.term

    def _wait_for_term(self) -> bool:
        """Hold new operations until :meth:`_term_ready` (polling every ms while the raft thread
        goes on); one held TERM_WAIT_MAX_S since it was made fails with Unavailable, nothing
        proposed. Returns False: nothing is to be proposed now."""
        now = time.monotonic()
        expired = [op for op in self._new_ops if now - op.made >= TERM_WAIT_MAX_S]
        if expired:
            self._new_ops = [op for op in self._new_ops if now - op.made < TERM_WAIT_MAX_S]
            for op in expired:
                op.future.set_exception(Unavailable(
                    f"leader {self.node_id} has not committed an entry of its term {self.raw.term} within "
                    f"{TERM_WAIT_MAX_S:g} s (no quorum answers it?): nothing was written, retry",
                    not_applied=True))
        # Poll while operations wait; none left: sleep as usual (a stale hold would spin the loop).
        self._hold_until = now + 0.001 if self._new_ops else None
        return False

    def _handle(self, kind: str, item: Any) -> None:
        if kind == "msg":
            self._heard[item.frm] = time.monotonic()
            try:
                self.raw.step(item)
            except (InvalidArgument, AssertionError):
                raise
            except MQStoreError as exc:
                log.debug("node %d: dropped message %s: %s", self.node_id, item.type, exc)
        elif kind == "op":
            self._new_ops.append(item)
        elif kind == "read":
            context, future = item
            if not self.is_leader:
                future.set_exception(self._not_leader())
                return
            if len(self._reads) + len(self._read_waiters) >= READS_PENDING_MAX:
                future.set_exception(Unavailable(
                    f"{READS_PENDING_MAX} reads are already waiting for the leader to confirm its leadership: retry"
                ))
                return
            try:
                self.raw.read_index(context)
            except CoreNotLeader:
                future.set_exception(self._not_leader())
                return
            except ProposalDropped as exc:
                # The consensus core holds as many reads as it takes (a new leader that cannot
                # commit in its term yet holds every read until it can): refuse this one.
                future.set_exception(Unavailable(f"the leader takes no more reads for now ({exc}): retry"))
                return
            self._reads[context] = future
        elif kind == "read-abandoned":
            context, future = item
            if self._reads.pop(context, None) is not None:
                self.raw.cancel_read(context)
            elif not future.done():
                self._read_waiters = [(i, f) for i, f in self._read_waiters if f is not future]
        elif kind == "call":
            fn, future = item
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)
        elif kind == "unreachable":
            peer, down = item
            self.raw.report_unreachable(peer)
            if down:
                # Its connection was refused or reset: if it was our leader, elect another one
                # now rather than after a whole election timeout (a wrong guess costs nothing).
                self.raw.report_peer_down(peer)
        elif kind == "snapshot-received":
            message, path = item
            assert message.snapshot is not None
            self._incoming[message.snapshot.meta.index] = path
            self.raw.step(message)
        elif kind == "snapshot-sent":
            peer, ok = item
            self.raw.report_snapshot(peer, ok)

    def _start_ops(self, ops: list[Operation]) -> None:
        """Plan every operation that arrived together and propose all their entries at once, so
        they share one append message per follower (and one commit on each)."""
        if not self.is_leader:
            for op in ops:
                op.future.set_exception(self._not_leader())
            return
        planned: list[tuple[Operation, Plan]] = []
        for op in ops:
            try:
                plan = op.plan(self)
            except BaseException as exc:
                op.future.set_exception(exc)
                continue
            if not plan:
                op.future.set_result(op.finish([]))
                continue
            planned.append((op, plan))
            self._reserved |= op.reserved  # later plans of this group must see these leases
            for token in op.settling:  # ... and these settles
                self.settling[token] = self.settling.get(token, 0) + 1
        if not planned:
            return
        items = [item for _, plan in planned for item in plan]
        try:
            index = self.raw.propose_many(items)
        except (ProposalDropped, CoreNotLeader) as exc:
            for op, _ in planned:
                self._release(op)
                op.future.set_exception(Unavailable(f"the leader refused the write for now: {exc}", not_applied=True))
            return
        term = self.raw.term
        for op, plan in planned:
            for k in range(len(plan)):
                op.indices.append((index, term))
                self._pending[index] = (term, op)
                if op.hints is not None and op.hints[k] is not None:
                    self._hints[index] = (term, op.hints[k])
                index += 1

    def _release(self, op: Operation) -> None:
        self._reserved -= op.reserved
        op.reserved = set()
        for token in op.settling:
            left = self.settling.get(token, 0) - 1
            if left > 0:
                self.settling[token] = left
            else:
                self.settling.pop(token, None)
        op.settling = set()

    def _process_ready(self) -> None:
        rd: Ready = self.raw.ready()
        if rd.soft_state is not None:
            self._on_soft_state(*rd.soft_state)
        if rd.snapshot is not None:
            self._install_snapshot(rd.snapshot)
        conf_after: ConfState | None = None
        removed: set[int] = set()
        for e in rd.committed_entries:
            if e.rtype == RecordType.CONFIG:
                cc = decode_conf_change(e.payload)
                conf_after = self.raw.apply_conf_change(cc)
                removed |= {item.node for item in cc.items if item.type == ConfChangeType.REMOVE}
        entries = rd.entries
        committed = rd.committed_entries
        hard = rd.hard_state
        # Every replica keeps the largest stamp applied (not only the stamps it made as leader):
        # it becomes the floor of its own stamps once it leads, even after the entries that
        # carried it were compacted away, and its snapshots carry it to the nodes they seed.
        stamp = self.stamp_ms
        for e in committed:
            entry_stamp = entry_stamp_ms(e.rtype, e.payload)
            if entry_stamp > stamp:
                stamp = entry_stamp
        hints = {}
        for e in committed:
            hint = self._hints.pop(e.index, None)
            if hint is not None and hint[0] == e.term:
                hints[e.index] = hint[1]

        # Answer the waiting calls while the transaction that applies their entries syncs:
        # those entries are committed (durable on a quorum) and applying is deterministic, so a
        # crash before this commit only means applying them again on restart; reads that must
        # see the result go through this thread (read barrier, planning), still in this write.
        # Only for entries whose effects live in the state tables alone: keys, dictionaries,
        # policies, membership and compliance changes also change what this process holds in
        # memory when their transaction commits, and their callers hear back after that.
        answer_early = bool(committed) and all(e.rtype in _ANSWER_BEFORE_SYNC for e in committed)

        def fn(ctx: WriteContext) -> dict[int, object]:
            self.storage.append(ctx, entries)
            if hard is not None:
                self.storage.set_hard_state(ctx, hard)
            results = self.applier.apply(ctx, committed, hints)
            if committed:
                self.storage.set_applied(ctx, committed[-1].index)
                ctx.put(b"meta", META_STAMP, _U64.pack(stamp))
                if answer_early:
                    ctx.before_commit(lambda: self._finish_applied(committed, results))
            if conf_after is not None:
                self.storage.set_conf_state(ctx, conf_after)
            if removed:
                known = set(self.removed_ids())
                ctx.put(b"meta", META_REMOVED, ",".join(str(n) for n in sorted(known | removed)).encode())
            return results

        if entries or hard is not None or committed or conf_after is not None:
            results = self.log.write(fn, size=sum(len(e.payload) for e in entries))
        else:
            results = {}
        if removed:
            self.removed = frozenset(self.removed_ids())
        regular = [m for m in rd.messages if m.snapshot is None or m.snapshot.meta.index == BOOTSTRAP_INDEX]
        self.transport.send(regular)
        for m in rd.messages:
            if m.snapshot is not None and m.snapshot.meta.index != BOOTSTRAP_INDEX:
                self._send_snapshot(m)
        if committed:
            self._raise_stamp(stamp)
            self._applied = committed[-1].index
            self._applied_term = committed[-1].term
            for e in committed:
                if e.rtype == RecordType.MEMBERS:
                    self.members = read_members(self.log)
                    break
            if self.on_state_changed is not None and any(e.rtype in _CACHED_TYPES for e in committed):
                self.on_state_changed(False)  # before any caller hears back (those never early)
            self._finish_applied(committed, results)
        for rs in rd.read_states:
            future = self._reads.pop(rs.context, None)
            if future is not None:
                self._read_waiters.append((rs.index, future))
        if self._read_waiters:
            ready = [(i, f) for i, f in self._read_waiters if i <= self._applied]
            self._read_waiters = [(i, f) for i, f in self._read_waiters if i > self._applied]
            for _, f in ready:
                f.set_result(self._applied)
        with self._status_lock:
            self.raw.advance(rd)
        if committed and self.on_apply is not None:
            self.on_apply(self._applied)
        if self.applier.shreds != self._shreds_scrubbed:
            self._shreds_scrubbed = self.applier.shreds
            self._scrub_pending = False
            self._scrub_retry_at = 0.0  # a new shred: compact the log now, even if a rewrite was put off
            self.scrub_after_shred()
        elif self._applied - self._snapshot_index >= self.snapshot_every:
            self.create_snapshot()

    def _finish_applied(self, committed: list[Any], results: dict[int, object]) -> None:
        answered = 0
        for e in committed:
            pending = self._pending.pop(e.index, None)
            if pending is None:
                continue
            term, op = pending
            if e.term != term:
                # Another leader's entry took this index: our proposal was lost.
                for index, _ in op.indices:
                    self._pending.pop(index, None)
                self._release(op)
                if not op.future.done():
                    op.future.set_exception(Unavailable("leadership changed before the write committed: retry"))
                continue
            op.results[e.index] = results.get(e.index)
            if len(op.results) == len(op.indices) and not op.future.done():
                self._release(op)
                answered += 1
                try:
                    op.future.set_result(op.finish([(i, op.results[i]) for i, _ in op.indices]))
                except BaseException as exc:
                    op.future.set_exception(exc)
        if answered:
            # Callers in play: those answered now (about to call again) and every caller still
            # waiting (its operation queued, held or in flight: it comes back after its answer).
            self._expect_ops = answered + self._outstanding

    def _on_soft_state(self, leader: int, role: Role) -> None:
        was_leader = self._role == Role.LEADER
        self._leader = leader
        self._role = role
        if role == Role.LEADER and not was_leader:
            log.info("node %d: leader in term %d", self.node_id, self.raw.term)
            conf = self.raw.conf_state  # the votes just won brought clock samples: use them now
            self.clocks.update(conf.voters, (n for n, _ in conf.sites), leader)
            self._raise_stamp_from_log()
            self._advertise_after = 0.0
            self._advertise_if_stale(time.monotonic())
        if was_leader and role != Role.LEADER:
            log.info("node %d: no longer leader (leader now %d)", self.node_id, leader)
            for future in self._reads.values():
                future.set_exception(self._not_leader())
            self._reads.clear()

    def _advertise_if_stale(self, now: float) -> None:
        """Advertise this node's address and site to clients through the replicated directory
        when its entry there lacks them (a new node, a changed ``advertise``): a leader proposes
        the entry on election and, while the attempt fails (a proposal dropped during a leadership
        transfer, a refused write), again every ``ADVERTISE_RETRY_S`` for as long as it leads.
        Raft thread."""
        if self._advertising is not None and not self._advertising.future.done():
            return
        if now < self._advertise_after:
            return
        mine = self.members.get(self.node_id)
        if mine is not None and mine.address == self.config.address and mine.site == self.config.site:
            return
        self._advertise_after = now + ADVERTISE_RETRY_S
        self._advertising = Operation(plan=lambda node: node._plan_member(self.node_id))
        self._inbox.put(("op", self._advertising))

    def _plan_member(self, node_id: int) -> Plan:
        info = MemberInfo(node_id, self.config.site, self.config.address)
        return [(RecordType.MEMBERS, entry_payload(0, 0, 0, info.encode()))]

    def unapplied_key_id_max(self) -> int:
        """The largest key id that a KEY entry in this node's log creates and that is not applied
        yet (0: none): a leader allocating a key id must go past it — the entry may be a previous
        leader's, which this leader's log will commit. Raft thread."""
        last = self.raw.last_index
        if self._applied >= last:
            return 0
        best = 0
        for e in self.raw.entries(max(self._applied + 1, self.storage.first_index()), last + 1):
            if e.rtype == RecordType.KEY:
                event, _ = KeyEvent.decode_prefix(split_payload(e.rtype, e.payload)[3])
                if event.action == ACTION_CREATE:
                    best = max(best, event.key_id)
        return best

    def _raise_stamp_from_log(self) -> None:
        """A new leader stamps no earlier than the entries already in its log (the previous
        leader's, applied or not), so time in the state machine never goes backwards."""
        lo = max(self._applied - 64, self.storage.first_index())
        try:
            for e in self.raw.entries(lo, self.raw.last_index + 1):
                self._raise_stamp(entry_stamp_ms(e.rtype, e.payload))
        except MQStoreError:
            pass

    def _install_snapshot(self, snapshot: Snapshot) -> None:
        """Make the leader's snapshot this node's state (the core decided to restore it).

        The received copy is the leader's database: it names the leader, holds the leader's hard
        state and its log after the snapshot point. A copy of it gets this node's rows first (see
        :meth:`_adopt_snapshot_copy`), then replaces the database in one rename, so a crash at any
        point leaves either the old state or the new one, each this node's. The received file
        itself becomes this node's snapshot file of that index: once leading, the node sends it
        to a follower that needs it."""
        meta = snapshot.meta
        hard = HardState(term=self.raw.term, vote=self.raw.vote, commit=max(self.raw.commit_index, meta.index))
        # The founding this node keeps: its own, else (joined) the one the snapshot came with.
        founding = self.founding or self._snapshot_founding.pop(meta.index, b"")
        self._snapshot_founding.clear()
        if meta.index == BOOTSTRAP_INDEX:
            self._record_bootstrap_snapshot(meta, hard, founding)
        else:
            received = self._incoming.pop(meta.index, None)
            if received is None:
                raise AssertionError(f"no data received for the snapshot at {meta.index}")
            if self._compactor is not None:
                self._compactor.join()  # it compacts the database about to be replaced
            staging = self.snapshot_dir / f"install-{meta.index}-{uuid.uuid4().hex[:8]}"
            staging.mkdir(mode=0o700)
            try:
                data = staging / DATA_FILE
                shutil.copyfile(received, data)
                fsync_path(data)
                self._adopt_snapshot_copy(staging, meta, hard, founding)
                final = self.snapshot_file(meta.index)
                os.chmod(received, 0o600)  # received with the umask's mode: private, as data.mdb
                os.replace(received, final)  # fsynced by the receiver; named before it is needed
                fsync_path(self.snapshot_dir)
                # The swap (renamed, the directory fsynced); the same LogStore: the applier and
                # the queue's hooks stay. A process reading the store (`mqstore verify`/`backup
                # --data-dir` beside the node) is waited for a second (the raft thread waits with
                # it), then left reading the old file (force, the default): the node cannot go on
                # without the snapshot.
                self.log.replace_data(data, wait_s=INSTALL_WAIT_S)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            for other in self._incoming.values():
                other.unlink(missing_ok=True)
            self._incoming.clear()
            self._drop_snapshots_but(final)
        self.log.reset_bounds()
        self.storage.reload()
        # A joined node learns its cluster's founding digest from its first snapshot; a founding
        # node's is unchanged (a snapshot sent with another was refused).
        self.founding = self.transport.founding = self.log.meta_get(META_FOUNDING) or b""
        self.removed = frozenset(self.removed_ids())
        self._applied = meta.index
        self._applied_term = meta.term
        self._snapshot_index = meta.index
        self._drop_pending_upto(meta.index)
        raw_stamp = self.log.meta_get(META_STAMP)
        if raw_stamp:
            self._raise_stamp(_U64.unpack(raw_stamp)[0])
        self.members = read_members(self.log)
        if self.log.meta_get(META_SCRUB_PENDING) is not None:
            # The leader copied its store while scrubbing a shredded key: its copy may still hold
            # the key's wrapped bytes in the log. Scrub here too, now (between Readys).
            self._scrub_pending = True
        if self.on_state_changed is not None:
            self.on_state_changed(True)
        log.info("node %d: installed the snapshot at index %d (term %d)", self.node_id, meta.index, meta.term)

    def _drop_pending_upto(self, index: int) -> None:
        """Operations with an entry at or below ``index`` that a snapshot just replaced: this node
        never applies those entries itself, so their callers hear now (their entries may well
        have committed) and their leases and settles are no longer counted as in flight."""
        covered = {id(op): op for i, (_, op) in self._pending.items() if i <= index}
        for op in covered.values():
            for i, _ in op.indices:
                self._pending.pop(i, None)
                self._hints.pop(i, None)
            self._release(op)
            if not op.future.done():
                op.future.set_exception(Unavailable(
                    f"node {self.node_id} installed a snapshot covering the write before applying it: it may have "
                    "committed; check before retrying (an enqueue: retry with the same idempotency key)"))

    def _record_bootstrap_snapshot(self, meta: SnapshotMeta, hard: HardState, founding: bytes) -> None:
        """A new member's snapshot is the cluster's first state (index 1): no data, only metadata
        (and the cluster's founding digest, which the snapshot came with)."""

        def fn(ctx: WriteContext) -> None:
            for key, value in self.storage.installed_snapshot_meta(meta, hard).items():
                ctx.put(b"meta", key, value)
            if founding:
                ctx.put(b"meta", META_FOUNDING, founding)
            if ctx.next_index > meta.index + 1:
                ctx.truncate_suffix(meta.index + 1)
            ctx.put(b"meta", b"log.first", _U64.pack(meta.index + 1))

        self.log.write(fn)

    def _adopt_snapshot_copy(self, directory: Path, meta: SnapshotMeta, hard: HardState, founding: bytes) -> None:
        """Turn the copy of another node's database in ``directory`` into this node's state at the
        snapshot ``meta``, in one durable transaction: this node's id and hard state, the snapshot
        point as snapshot, compaction point, configuration and applied index, and none of the
        sender's log after that point (its entries there may not be committed). What else the
        copy holds is replicated state, the same on every member at that index (the member
        directory, removed ids, keys, the audit log); the founding digest is this node's (or the
        one the snapshot came with)."""
        # Room for the rows this writes (the copy is compacted: every change takes new pages).
        room = 2 * (directory / DATA_FILE).stat().st_size + limits.MAP_SIZE_BYTES_MIN
        env = Environment(directory, map_size=min(max(limits.MAP_SIZE_BYTES_DEFAULT, room), limits.MAP_SIZE_BYTES_MAX))
        try:
            with env.env.begin(write=True) as txn:
                meta_db, log_db = env.dbs[b"meta"], env.dbs[b"log"]
                txn.put(META_NODE_ID, _U64.pack(self.node_id), db=meta_db)
                if founding:  # the sender's copy may hold none (its node joined before it knew)
                    txn.put(META_FOUNDING, founding, db=meta_db)
                for key, value in self.storage.installed_snapshot_meta(meta, hard).items():
                    txn.put(key, value, db=meta_db)
                txn.put(b"log.first", _U64.pack(meta.index + 1), db=meta_db)
                if self.on_snapshot_adopted is not None:  # the audit's checkpoints, signed by this node
                    self.on_snapshot_adopted(LmdbKV(txn, env.dbs))
                after = _U64.pack(meta.index + 1)
                for db in (log_db, env.dbs[b"quarantine"]):  # quarantine: the sender's records
                    with txn.cursor(db=db) as cur:
                        doomed = list(cur.iternext(values=False)) if cur.set_range(after) else []
                    for key in doomed:
                        txn.delete(key, db=db)
        finally:
            env.close()

    def _clean_snapshot_dir(self) -> None:
        """At start: remove what a crash left in ``snapshots/`` (a snapshot received and not
        installed, a copy being written, a scrub's copy, a copy being prepared for installing)
        and every snapshot file but the one the snapshot metadata names. Only names this code
        gives its files are touched."""
        keep = self.snapshot_file(self._snapshot_index).name
        for path in self.snapshot_dir.iterdir():
            name = path.name
            if _SNAPSHOT_DIR_SCRAPS.fullmatch(name) or (_SNAPSHOT_FILE.fullmatch(name) and name != keep):
                log.info("node %d: removing %s (left by an earlier run)", self.node_id, path)
                _remove(path)
            elif name == keep and path.is_file():
                os.chmod(path, 0o600)  # one an earlier version wrote with the umask's mode

    def create_snapshot(self) -> SnapshotMeta:
        """Raft thread, between Readys (so the copy is exactly the applied state): copy the store
        to ``snapshots/snap-<index>.mdb``, record it as the latest snapshot, then compact the log
        up to ``keep_entries`` before it (message bodies still referenced are kept)."""
        index = self._applied
        meta = SnapshotMeta(index=index, term=self.storage.term(index), conf_state=self.raw.conf_state)
        final = self._write_snapshot_file(index)
        self.log.write(lambda ctx: self.storage.set_snapshot_meta(ctx, meta))
        self._snapshot_index = index
        self._drop_snapshots_but(final)  # only once the new one is recorded (a crash keeps one)
        upto = index - self.keep_entries
        if upto > self.storage.compacted()[0]:
            point_term = self.storage.term(upto)
            self.log.write(lambda ctx: self.storage.set_compacted(ctx, upto, point_term))
            # One compaction at a time, in order, and never in this thread: an on-demand
            # snapshot may come while the last one's compaction still runs.
            previous = self._compactor

            def compact() -> None:
                if previous is not None:
                    previous.join()
                self._compact_log(upto)

            self._compactor = threading.Thread(target=compact, name=f"mqstore-compact-{self.node_id}", daemon=True)
            self._compactor.start()
        log.info("node %d: snapshot at index %d; log compacted up to %d", self.node_id, index, max(upto, 0))
        return meta

    def snapshot_now(self, timeout: float = OPERATION_TIMEOUT_S) -> SnapshotMeta:
        """Take a snapshot at the applied index now and compact the log behind it, as the node
        does by itself every ``snapshot_every`` applied entries (Admin.Snapshot, ``mqstore cluster
        snapshot``). Runs in the raft thread between Readys, which waits while the store is
        copied. Nothing applied since the last snapshot: returns that one, taking none."""

        def take() -> SnapshotMeta:
            if self._applied <= self._snapshot_index:
                return self.storage.snapshot_meta()
            return self.create_snapshot()

        try:
            meta = self.call(take, timeout)
        except TimeoutError:
            raise Unavailable(
                f"node {self.node_id}: the snapshot was not done after {timeout:.0f} s (it goes on in the background)"
            ) from None
        assert isinstance(meta, SnapshotMeta)
        return meta

    def scrub_after_shred(self) -> SnapshotMeta | None:
        """Raft thread, after a KEY shred was applied: no copy of the shredded key's wrapped bytes
        may stay in this node's files. Snapshot at the applied index and compact the log right up
        to it (the KEY record that carried the key goes; a follower further behind catches up
        from the snapshot), write the snapshot again from the compacted log, then replace the
        database by a compacted copy of itself (LMDB keeps old bytes in freed pages until they
        are reused). Each step leaves a usable snapshot on disk should the node crash.

        The database is not replaced while another process has the store open (`mqstore
        verify`/`backup --data-dir` beside the node, see Environment.replace_data): then the
        rewrite is put off (None; the log is compacted already), said in a warning, and the scrub
        tried again between Readys every SCRUB_RETRY_S seconds once that process is gone (and
        after a restart: the marker stays until it is done)."""
        if self._scrub_retry_at:  # put off before: nothing to redo while the other process is there
            holder = self.log.env.in_use_elsewhere()
            if holder is not None:
                self._put_off_scrub(holder)
                return None
        index = self._applied
        term = self.storage.term(index)
        meta = SnapshotMeta(index=index, term=term, conf_state=self.raw.conf_state)
        if self._compactor is not None:
            self._compactor.join()  # a compaction from an earlier snapshot: let it finish first
        final = self._write_snapshot_file(index)

        def record(ctx: WriteContext) -> None:
            self.storage.set_snapshot_meta(ctx, meta)
            if index > self.storage.compacted()[0]:
                self.storage.set_compacted(ctx, index, term)

        self.log.write(record)
        self._snapshot_index = index
        self._drop_snapshots_but(final)
        self._compact_log(index)
        self._write_snapshot_file(index)  # the same snapshot, now without the KEY record
        scratch = self.snapshot_dir / f"scrub-{index}-{uuid.uuid4().hex[:8]}"
        try:
            self.log.rewrite_compacted(scratch, wait_s=SCRUB_REWRITE_WAIT_S)
        except StoreInUse as exc:  # another process has the store open: the database is as it was
            self.storage.reload()
            self._put_off_scrub(str(exc))
            return None
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        self.storage.reload()
        self.log.write(lambda ctx: ctx.delete(b"meta", META_SCRUB_PENDING))  # done (a crash before: redo)
        self._scrub_retry_at = 0.0
        log.info("node %d: a key was shredded: log compacted up to %d and the database rewritten", self.node_id, index)
        return meta

    def _put_off_scrub(self, why: str) -> None:
        if not self._scrub_retry_at:
            log.warning("node %d: a key was shredded, but the database file is not rewritten while another process "
                        "has the store open (%s); it is tried again every %d s", self.node_id, why, SCRUB_RETRY_S)
        self._scrub_pending = True
        self._scrub_retry_at = time.monotonic() + SCRUB_RETRY_S

    def _write_snapshot_file(self, index: int) -> Path:
        """Copy the store (compacted) to the snapshot file of ``index``, atomically."""
        work = self.snapshot_dir / f"tmp-{index}-{uuid.uuid4().hex[:8]}"
        copied = self.log.copy_to(work)
        # LMDB makes the copy with the umask's mode: a snapshot is the whole store, as private as
        # data.mdb (the directories above are 0700, so nobody else could open it meanwhile).
        os.chmod(copied, 0o600)
        fsync_path(copied)  # whole before it has its name: a crash never leaves half a snapshot
        final = self.snapshot_file(index)
        os.replace(copied, final)
        work.rmdir()
        fsync_path(self.snapshot_dir)
        return final

    def _drop_snapshots_but(self, keep: Path) -> None:
        for old in self.snapshot_dir.glob("snap-*.mdb"):
            if old != keep:
                old.unlink(missing_ok=True)

    def _compact_log(self, upto: int) -> None:
        """Delete records up to ``upto`` except message bodies still referenced (their state
        rows point at them). Runs beside the raft thread: those records are below the
        compaction point, which nothing reads any more."""
        try:
            self.log.compact(upto + 1, keeps_live_body)
        except MQStoreError:
            log.warning("node %d: log compaction failed (it is retried after the next snapshot)", self.node_id)

    def snapshot_file(self, index: int) -> Path:
        return self.snapshot_dir / f"snap-{index:020d}.mdb"

    def _send_snapshot(self, message: Message) -> None:
        assert message.snapshot is not None
        path = self.snapshot_file(message.snapshot.meta.index)

        def done(ok: bool) -> None:
            self._inbox.put(("snapshot-sent", (message.to, ok)))

        if not path.exists():
            # Its file is gone (a crash between installing a snapshot and keeping its file, or a
            # file removed by hand): take a new snapshot between Readys; the core sends that one
            # when it tries again.
            log.warning("node %d: %s is missing: taking a new snapshot for node %d", self.node_id, path, message.to)
            self._snapshot_wanted = True
            done(False)
            return
        self.transport.send_snapshot(message, path, done)

    def _drop_stale_incoming(self) -> None:
        """Remove received snapshot data the core will never install: at or below the applied
        index (a copy sent twice, or one that arrived after the node caught up by the log)."""
        for index in [i for i in self._incoming if i <= self._applied]:
            self._incoming.pop(index).unlink(missing_ok=True)

    def receive_snapshot(self, message: Message, path: Path) -> None:
        """The Raft service received and verified a snapshot's data in ``path``."""
        self._inbox.put(("snapshot-received", (message, path)))

    def transfer_candidates(self, exclude: set[int] | frozenset[int] = frozenset()) -> list[int]:
        """The voters leadership may be handed to, best first (raft thread, on the leader): only
        those in contact (heard from within an election timeout) whose log is streamed to
        (replicate state, not probed or being sent a snapshot: a crashed or lagging voter would
        never take over); the most up-to-date first, then the most recently heard from."""
        progress = self.raw.progress()
        now = time.monotonic()
        recent_s = self.config.election_tick * self.config.heartbeat_ms / 1000
        ranked: list[tuple[int, float, int]] = []
        for n in self.raw.conf_state.voters:
            pr = progress.get(n)
            if n == self.node_id or n in exclude or pr is None or pr.is_learner:
                continue
            heard = self._heard.get(n)
            if pr.state != raftcore.ProgressState.REPLICATE or heard is None or now - heard >= recent_s:
                continue
            ranked.append((pr.match, heard, n))
        return [n for _, _, n in sorted(ranked, reverse=True)]

    def _transfer_to_best(self, exclude: set[int] | frozenset[int] = frozenset()) -> int:
        voters = [n for n in self.raw.conf_state.voters if n != self.node_id]
        if not voters:
            raise InvalidArgument("no other voter to transfer leadership to")
        candidates = self.transfer_candidates(exclude)
        if not candidates:
            raise Unavailable(
                "no other voter is in contact with the leader and caught up (down, unreachable or lagging: see "
                "`mqstore status`): leadership stays here; name one with --to to try anyway", not_applied=True)
        best = candidates[0]
        self.raw.transfer_leadership(best)
        return best

    def _fail_all(self, exc: Exception) -> None:
        for _, op in list(self._pending.values()):
            if not op.future.done():
                op.future.set_exception(exc)
        self._pending.clear()
        held, self._new_ops = self._new_ops, []  # never proposed: nothing was written
        while True:  # ... nor was what is still in the inbox
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "op":
                held.append(item)
        for op in held:
            if not op.future.done():
                op.future.set_exception(Unavailable(str(exc), not_applied=True))
        for future in self._reads.values():
            if not future.done():
                future.set_exception(exc)
        self._reads.clear()
        for _, future in self._read_waiters:
            if not future.done():
                future.set_exception(exc)
        self._read_waiters.clear()

    # --- operations used by the cluster queue ----------------------------------------------------

    def propose_conf_change(self, cc: ConfChange) -> None:
        self.raw.propose_conf_change(cc)

    def change_membership(self, cc: ConfChange, timeout: float = OPERATION_TIMEOUT_S) -> None:
        """Propose the membership change ``cc`` on the leader and wait until this node applied it
        (the new configuration is in force). Raises Unavailable when another leader's entry took
        its place (it never happened: retry) or when it did not commit within ``timeout`` (it may
        still: check the membership before retrying); the core's refusals as they are."""
        deadline = time.monotonic() + timeout
        op = Operation(plan=lambda node: [])

        def propose() -> None:
            self.raw.propose_conf_change(cc)
            index, term = self.raw.last_index, self.raw.term
            op.indices.append((index, term))
            self._pending[index] = (term, op)  # answered by _finish_applied, as writes are

        self.call(propose, timeout)
        try:
            op.future.result(max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise Unavailable(
                f"the membership change did not commit within {timeout:.0f} s (leader {self._leader}); it may "
                "still: check the membership before retrying"
            ) from None


class _ReadView:
    """A short read transaction over the applied state, as a KV (use as a context manager)."""

    def __init__(self, log: LogStore) -> None:
        self._log = log
        self._cm: Any = None

    def __enter__(self) -> LmdbKV:
        self._cm = self._log.env.read()
        txn = self._cm.__enter__()
        return LmdbKV(txn, self._log.env.dbs)

    def __exit__(self, *exc: object) -> None:
        self._cm.__exit__(*exc)


def _remove(path: Path) -> None:
    """Remove a file, or a directory with what it holds (a symbolic link itself, never its target)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


#: Entry types that change what the queue caches from the applied state (namespace policies).
_CACHED_TYPES = frozenset((RecordType.POLICY, RecordType.DROP))

_STAMPED = frozenset(
    (RecordType.LEASE, RecordType.ACK, RecordType.DEFER, RecordType.BOUNCE, RecordType.HOLD, RecordType.RELEASE,
     RecordType.REQUEUE, RecordType.DELETE, RecordType.EXPIRE, RecordType.COMPACT, RecordType.POLICY,
     RecordType.BOUNCE_MESSAGE, RecordType.LEGAL_HOLD, RecordType.RETENTION, RecordType.AUDIT, RecordType.DROP)
)


#: Entry types whose callers may hear back before the applying transaction's fsync (see
#: Node._process_ready): their effects are in the state tables only.
_ANSWER_BEFORE_SYNC = frozenset({
    RecordType.NOOP, RecordType.ENQUEUE, RecordType.LEASE, RecordType.ACK, RecordType.DEFER,
    RecordType.BOUNCE, RecordType.HOLD, RecordType.RELEASE, RecordType.REQUEUE, RecordType.DELETE,
    RecordType.EXPIRE, RecordType.BLOB, RecordType.BOUNCE_MESSAGE,
})


def entry_stamp_ms(rtype: int, payload: bytes) -> int:
    """The time stamped on an entry (0 when it has none): queue entries start with a version byte
    and the i64 stamp; a message's id carries its creation time. (Reads only those bytes: called
    for every committed entry.)"""
    if rtype in _STAMPED and len(payload) >= RECORD_META_BYTES + 9:
        return int.from_bytes(payload[RECORD_META_BYTES + 1:RECORD_META_BYTES + 9], "little", signed=True)
    if rtype == RecordType.ENQUEUE and len(payload) >= RECORD_META_BYTES + 16:
        return int.from_bytes(payload[RECORD_META_BYTES:RECORD_META_BYTES + 6], "big")
    return 0


__all__ = [
    "BOOTSTRAP_INDEX",
    "Node",
    "NotBootstrapped",
    "Operation",
    "bootstrap",
    "entry_stamp_ms",
    "prepare_join",
]
