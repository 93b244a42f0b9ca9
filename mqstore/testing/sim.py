"""Deterministic simulation of whole consensus clusters (in the spirit of TigerBeetle's VOPR).

``run_seed(seed)`` builds a cluster of real ``RawNode`` s, each with a simulated disk and a
simulated network, and drives it for a number of ticks while faults run: message loss,
duplication, reordering and delay; partitions (random, one site against the rest, one-way);
crashes at any point of the driver loop (dropping writes that were not synced); the loss of a
whole site with its disks; membership changes (learners added and promoted, nodes removed, joint
changes, the nodes of a lost site replaced) and leadership transfers. Clients propose unique
opaque entries (BLOB) and read with ReadIndex. Then every fault heals and the cluster must
converge.

Every step is checked (any violation raises ``SimulationFailure`` naming the seed and how to
replay it):

- at most one leader per term;
- log matching: two logs with an entry of the same index and term hold the same entry, preceded by
  an entry of the same term (checked on every append, so by induction the same prefix);
- a leader's commit index only covers entries durably held (synced) by a majority of the voters
  of its configuration spanning ``min_sites`` sites (checked against the disks, with the simple
  quorum implementation);
- committed entries never change: every index is committed with one term, every node applies the
  same entry at each index, in order, so applied sequences are prefixes of one global sequence; a
  node's commit index never goes back while it runs; installed snapshots carry the state of that
  global sequence;
- every acknowledged proposal (committed and applied by the leader that accepted it) is in the log
  of every later leader; no proposal is applied twice;
- a ReadIndex answer is at least the index of every write acknowledged before the read was asked;
- after healing, all live members converge (same applied sequence) and accept a new write within
  a bounded number of ticks.

Everything is derived from the seed: same seed, same run.
"""

from __future__ import annotations

import hashlib
import heapq
import os
import random
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from mqstore.consensus import quorum
from mqstore.consensus.raft import (
    CONFIG,
    Config,
    RawNode,
    bootstrap,
    decode_conf_change,
    is_joint,
    members_of,
    next_conf_state,
)
from mqstore.consensus.storage import MemoryStorage
from mqstore.consensus.types import (
    NONE,
    Compacted,
    ConfChange,
    ConfChangeItem,
    ConfChangeType,
    ConfState,
    ConsensusError,
    Entry,
    InvalidConfig,
    Message,
    MessageType,
    NodeId,
    NotLeader,
    ProposalDropped,
    Ready,
    Role,
    Snapshot,
    Unavailable,
)
from mqstore.errors import InvalidArgument

BLOB = 18  # mqstore.codec.RecordType.BLOB: opaque application data

REPLAY_HINT = "MQSTORE_SIM_SEED={seed} python -m pytest tests/test_sim.py -k replay"

#: Cluster shapes: name -> (sites of nodes 1..n, min_sites).
SCENARIOS: dict[str, tuple[tuple[str, ...], int]] = {
    "3x3": (("a", "b", "c"), 2),  # three nodes, one per site
    "5x221": (("a", "a", "b", "b", "c"), 2),  # five nodes placed 2/2/1
    # 2/2/1 with min_sites=3: every commit needs the lone node of site c. With min_sites=2 the
    # placement rules already force every majority across two sites, so this shape is the one
    # where the site-aware rule changes what commits.
    "5x221-min3": (("a", "a", "b", "b", "c"), 3),
}
_SCENARIO_WEIGHTS = (("3x3", 45), ("5x221", 45), ("5x221-min3", 10))

_CRASH_POINTS = ("before_persist", "before_sync", "before_send", "mid_send", "mid_apply", "before_advance")
_GENESIS = bytes(16)
_SNAP_DATA = struct.Struct("<Q16s")
_MEMBERS_MAX = 8  # keep membership churn small enough for the brute-force quorum checks


class SimulationFailure(AssertionError):
    """An invariant broke. The message says how to replay the seed."""

    def __init__(self, seed: int, tick: int, reason: str, trace: list[str] | None = None) -> None:
        self.seed = seed
        self.tick = tick
        self.reason = reason
        lines = [f"seed {seed}, tick {tick}: {reason}", "replay: " + REPLAY_HINT.format(seed=seed)]
        if trace:
            lines.append("last events:")
            lines.extend("  " + t for t in trace)
        else:
            lines.append("(set MQSTORE_SIM_TRACE=1 to see the events leading to it)")
        super().__init__("\n".join(lines))
        self._trace = trace

    def __reduce__(self) -> tuple[type[SimulationFailure], tuple[int, int, str, list[str] | None]]:
        return (SimulationFailure, (self.seed, self.tick, self.reason, self._trace))


@dataclass
class SimResult:
    seed: int
    scenario: str
    ticks: int = 0
    proposals: int = 0
    acked: int = 0
    leaders: int = 0
    max_term: int = 0
    crashes: int = 0
    ready_crashes: int = 0
    partitions: int = 0
    messages: int = 0
    dropped: int = 0
    snapshots_sent: int = 0
    snapshots_installed: int = 0
    conf_changes: int = 0
    conf_refused: int = 0
    transfers: int = 0
    reads_answered: int = 0
    reads_cancelled: int = 0
    down_reports: int = 0
    site_lost: str = ""
    converge_ticks: int = 0
    final_index: int = 0
    options: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _AppState:
    """The simulated state machine: the applied index and a hash chain over what was applied."""

    applied: int
    digest: bytes


def _chain(digest: bytes, e: Entry) -> bytes:
    h = hashlib.blake2b(digest, digest_size=16)
    h.update(struct.pack("<QQB", e.index, e.term, e.rtype))
    h.update(e.payload)
    return h.digest()


@dataclass(slots=True)
class _DiskState:
    storage: MemoryStorage
    app: _AppState

    def copy(self) -> _DiskState:
        return _DiskState(self.storage.copy(), self.app)


_Op = Callable[[_DiskState], None]


class SimDisk:
    """A node's disk: a durable part, and writes made but not synced yet. Reads see both (the
    page cache); a crash keeps the durable part plus a random prefix of the unsynced writes (the
    OS may have flushed some of them, in order) and loses the rest."""

    def __init__(self) -> None:
        self.durable = _DiskState(MemoryStorage(), _AppState(0, _GENESIS))
        self.live = self.durable.copy()
        self.pending: list[_Op] = []

    def write(self, op: _Op) -> None:
        op(self.live)
        self.pending.append(op)

    def sync(self) -> None:
        for op in self.pending:
            op(self.durable)
        self.pending.clear()

    def crash(self, rng: random.Random) -> None:
        keep = rng.randint(0, len(self.pending)) if self.pending else 0
        for op in self.pending[:keep]:
            op(self.durable)
        self.pending.clear()
        self.live = self.durable.copy()


class _Crash(Exception):
    """Raised inside the driver loop to abandon a node at a crash point."""


@dataclass
class _Node:
    id: NodeId
    site: str
    disk: SimDisk
    raw: RawNode | None = None
    lost: bool = False
    restart_at: int = 0
    commit_seen: int = 0
    pending_props: dict[bytes, int] = field(default_factory=dict)  # payload -> tick proposed
    pending_reads: dict[bytes, int] = field(default_factory=dict)  # context -> acked floor
    cancelled_reads: set[bytes] = field(default_factory=set)  # forwarded, then given up
    leader_commit_checked: int = 0
    crash_soon: bool = False
    leader_term: int = 0


@dataclass(frozen=True)
class _Options:
    scenario: str
    profile: str
    fault_ticks: int
    heal_ticks_max: int
    election_tick: int
    heartbeat_tick: int
    max_inflight: int
    max_size_per_msg: int
    pre_vote: bool
    check_quorum: bool
    loss: float
    dup: float
    reorder: float
    long_delay: float
    crash_per_tick: float
    crash_per_ready: float
    down_ticks_max: int
    flush_per_ready: float
    partition_per_tick: float
    partition_ticks_max: int
    propose_per_tick: float
    read_per_tick: float
    membership_per_tick: float
    transfer_per_tick: float
    site_loss: bool
    compact_every: int
    down_reports: float


def _choose_options(rng: random.Random, scenario: str | None, ticks: int | None) -> _Options:
    names = [n for n, _ in _SCENARIO_WEIGHTS]
    drawn = rng.choices(names, weights=[w for _, w in _SCENARIO_WEIGHTS])[0]
    scenario = drawn if scenario is None else scenario  # drawn anyway: the other options stay put
    if scenario not in SCENARIOS:
        raise InvalidArgument(f"unknown scenario {scenario!r}: one of {sorted(SCENARIOS)}")
    # Three profiles. "calm": few faults, so that a lot commits and logs get long. "normal": every
    # fault now and then. "chaos": short election timeouts, frequent crashes (often inside the
    # driver loop) and short partitions, small messages: many elections with partly replicated
    # logs, which is where subtle commit-rule bugs (Raft's "figure 8") show up.
    profile = rng.choices(("calm", "normal", "chaos"), weights=(10, 55, 35))[0]
    calm = profile == "calm"
    chaos = profile == "chaos"
    max_inflight = rng.choice((1, 2, 4, 16, 256))
    sizes = (1, 1, 512) if chaos and max_inflight > 2 else (512, 4096, 1 << 20)
    return _Options(
        scenario=scenario,
        profile=profile,
        fault_ticks=ticks if ticks is not None else rng.randint(500, 1000),
        heal_ticks_max=1000,
        election_tick=rng.randint(3, 6) if chaos else rng.randint(8, 12),
        heartbeat_tick=1 if chaos else rng.choice((1, 2, 2, 3)),
        max_inflight=max_inflight,
        max_size_per_msg=rng.choice(sizes),
        pre_vote=rng.random() < 0.85,
        check_quorum=rng.random() < 0.85,
        loss=0.0 if calm else rng.choice((0.0, 0.01, 0.05, 0.15)),
        dup=0.0 if calm else rng.choice((0.0, 0.01, 0.05)),
        reorder=0.0 if calm else rng.choice((0.0, 0.05, 0.3)),
        long_delay=0.0 if calm else rng.choice((0.0, 0.002, 0.01)),
        crash_per_tick=rng.choice((0.03, 0.06)) if chaos else 0.0 if calm else rng.choice((0.0, 0.003, 0.01, 0.02)),
        crash_per_ready=rng.choice((0.01, 0.03)) if chaos else 0.0 if calm else rng.choice((0.0, 0.001, 0.005)),
        down_ticks_max=10 if chaos else 40,
        flush_per_ready=rng.choice((0.0, 0.05, 0.3)),
        partition_per_tick=0.05 if chaos else 0.0 if calm else rng.choice((0.0, 0.005, 0.02)),
        partition_ticks_max=20 if chaos else 80,
        propose_per_tick=rng.choice((0.2, 0.5, 1.0)),
        read_per_tick=rng.choice((0.0, 0.05, 0.2)),
        membership_per_tick=rng.choice((0.0, 0.01, 0.03)),
        transfer_per_tick=rng.choice((0.0, 0.002, 0.01)),
        site_loss=scenario != "5x221-min3" and rng.random() < 0.3,
        compact_every=rng.choice((5, 20, 80)),
        # Drawn last (and used with a generator of its own) so the runs of seeds without
        # reports are the runs those seeds had before reports existed.
        down_reports=rng.choice((0.0, 0.0, 0.5, 0.9)),
    )


class _Sim:
    def __init__(self, seed: int, opts: _Options, trace: bool, driver_bug: str | None) -> None:
        self.seed = seed
        self.rng = random.Random(seed)  # everything the run decides (options have their own)
        #: Which forwarded reads a follower gives up on. Its own generator: a follower's
        #: cancel_read sends nothing, so the run's messages and draws stay those of the seed.
        self.cancel_rng = random.Random(seed ^ 0x5CA9CE1)
        self.opts = opts
        self.tick = 0
        self.trace_on = trace
        self.trace_messages = trace and os.environ.get("MQSTORE_SIM_TRACE") == "messages"
        self.trace: deque[str] = deque(maxlen=400)
        self.driver_bug = driver_bug
        self.result = SimResult(seed=seed, scenario=opts.scenario)
        self.nodes: dict[NodeId, _Node] = {}
        self.net: list[tuple[int, int, Message]] = []
        self.net_seq = 0
        self.blocked: set[tuple[NodeId, NodeId]] = set()
        self.partition_until = 0
        self.faults = True
        # "Connection refused or reset" seen by a node's transport: (tick due, node, peer).
        # Delivered between Readys, as the runtime does; a generator of their own (see options).
        self.report_rng = random.Random(seed ^ 0xD0D0)
        self.reports: list[tuple[int, NodeId, NodeId]] = []
        # Global knowledge, for the invariants.
        self.leaders: dict[int, NodeId] = {}
        self.committed_term: dict[int, int] = {0: 0, 1: 1}
        self.max_committed = 1
        self.applied_entries: dict[int, tuple[int, int, bytes]] = {}
        self.digests: dict[int, bytes] = {1: _GENESIS}
        self.payload_index: dict[bytes, int] = {}
        self.log_ids: dict[tuple[int, int], tuple[int, bytes, int]] = {}
        self.acked: list[tuple[int, int, bytes]] = []
        self.acked_payloads: set[bytes] = set()
        self.acked_max_index = 0
        self.proposal_seq = 0
        self.read_seq = 0
        self.believed_leader: NodeId = NONE
        self.next_node_id = 1
        self.lost_site = ""
        self.site_loss_at = 0
        self.membership_busy_until = 0
        self.membership_base: ConfState | None = None
        sites, min_sites = SCENARIOS[opts.scenario]
        conf = ConfState(
            voters=frozenset(range(1, len(sites) + 1)),
            sites=tuple((i + 1, s) for i, s in enumerate(sites)),
            min_sites=min_sites,
        )
        for site in sites:
            node = self._new_node(site)
            bootstrap(node.disk.durable.storage, conf)
            node.disk.durable.app = _AppState(1, _GENESIS)
            node.disk.live = node.disk.durable.copy()
            self._start(node)
        if opts.site_loss:
            self.site_loss_at = self.rng.randint(opts.fault_ticks // 10, opts.fault_ticks // 2)

    # --- helpers ---------------------------------------------------------------------------------

    def fail(self, reason: str) -> SimulationFailure:
        return SimulationFailure(self.seed, self.tick, reason, list(self.trace) if self.trace_on else None)

    def log(self, text: str) -> None:
        if self.trace_on:
            self.trace.append(f"t{self.tick} {text}")

    def _new_node(self, site: str) -> _Node:
        node = _Node(id=self.next_node_id, site=site, disk=SimDisk())
        self.next_node_id += 1
        self.nodes[node.id] = node
        return node

    def _config(self, node: _Node) -> Config:
        o = self.opts
        return Config(
            id=node.id,
            election_tick=o.election_tick,
            heartbeat_tick=o.heartbeat_tick,
            max_size_per_msg=o.max_size_per_msg,
            max_inflight_msgs=o.max_inflight,
            max_uncommitted_bytes=64 * 1024,
            pre_vote=o.pre_vote,
            check_quorum=o.check_quorum,
            applied=node.disk.live.app.applied,
            max_committed_bytes_per_ready=self.rng.choice((1, 4096, 1 << 20)),
        )

    def _start(self, node: _Node) -> None:
        raw = RawNode(self._config(node), node.disk.live.storage, random.Random(self.rng.getrandbits(64)))
        node.raw = raw
        node.commit_seen = raw.commit_index
        node.pending_props.clear()
        node.pending_reads.clear()
        node.cancelled_reads.clear()
        node.crash_soon = False
        # What survived must still agree with what was committed.
        self._check_commit_matches(node, raw)
        self.log(f"n{node.id} start term={raw.term} commit={raw.commit_index} last={raw.last_index}")

    def _crash(self, node: _Node, why: str) -> None:
        assert node.raw is not None
        node.raw = None
        node.disk.crash(self.rng)
        node.restart_at = self.tick + self.rng.randint(1, self.opts.down_ticks_max)
        self.result.crashes += 1
        self.log(f"n{node.id} crash ({why})")
        # Its connections break: peers that can reach it see them reset, usually within a tick.
        for other in self.up():
            if (other.id, node.id) not in self.blocked:
                self._report_down(other.id, node.id, self.opts.down_reports)

    def _report_down(self, node: NodeId, peer: NodeId, p: float) -> None:
        if p and self.report_rng.random() < p:
            self.reports.append((self.tick + self.report_rng.randint(0, 2), node, peer))

    def _deliver_reports(self) -> None:
        due = [r for r in self.reports if r[0] <= self.tick]
        if not due:
            return
        self.reports = [r for r in self.reports if r[0] > self.tick]
        for _, node_id, peer in due:
            node = self.nodes.get(node_id)
            if node is None or node.raw is None:
                continue
            node.raw.report_peer_down(peer)
            self.result.down_reports += 1
            self.log(f"n{node_id} told n{peer} is down")
            self.observe(node)

    def up(self) -> list[_Node]:
        return [n for n in self.nodes.values() if n.raw is not None]

    def _leader(self) -> _Node | None:
        best: _Node | None = None
        for n in self.up():
            assert n.raw is not None
            if n.raw.role == Role.LEADER and (best is None or best.raw is None or n.raw.term > best.raw.term):
                best = n
        return best

    # --- invariants ------------------------------------------------------------------------------

    def _check_commit_matches(self, node: _Node, raw: RawNode) -> None:
        c = raw.commit_index
        if c > self.max_committed:
            raise self.fail(f"n{node.id} commit index {c} is beyond anything a leader committed ({self.max_committed})")
        try:
            term = raw.term_at(c)
        except Compacted:
            return
        except Unavailable:
            raise self.fail(f"n{node.id} commit index {c} is beyond its log ({raw.last_index})") from None
        if self.committed_term.get(c) != term:
            raise self.fail(
                f"n{node.id} has term {term} at its commit index {c}, committed as {self.committed_term.get(c)}"
            )

    def observe(self, node: _Node) -> None:
        raw = node.raw
        if raw is None:
            return
        if raw.role == Role.LEADER:
            holder = self.leaders.setdefault(raw.term, raw.id)
            if holder != raw.id:
                raise self.fail(f"two leaders in term {raw.term}: n{holder} and n{raw.id}")
            if node.leader_term != raw.term:
                node.leader_term = raw.term
                node.leader_commit_checked = raw.commit_index
                self._on_new_leader(node, raw)
                if self.faults and self.opts.profile == "chaos" and self.rng.random() < 0.2:
                    node.crash_soon = True  # a leader that dies before its first entry spreads
            if raw.commit_index > node.leader_commit_checked:
                self._check_new_commits(node, raw, node.leader_commit_checked, raw.commit_index)
                node.leader_commit_checked = raw.commit_index
                if self.faults and self.opts.profile == "chaos" and self.rng.random() < 0.1:
                    node.crash_soon = True
        if raw.commit_index < node.commit_seen:
            raise self.fail(f"n{node.id} commit index went back from {node.commit_seen} to {raw.commit_index}")
        if raw.commit_index != node.commit_seen:
            node.commit_seen = raw.commit_index
            self._check_commit_matches(node, raw)

    def _on_new_leader(self, node: _Node, raw: RawNode) -> None:
        self.result.leaders += 1
        self.result.max_term = max(self.result.max_term, raw.term)
        self.log(f"n{node.id} leads term {raw.term} (last={raw.last_index} commit={raw.commit_index})")
        for index, term, payload in self.acked:
            try:
                have = raw.term_at(index)
            except Compacted:
                continue  # inside its snapshot, which holds the committed prefix
            except Unavailable:
                have = 0
            if have != term:
                raise self.fail(
                    f"acknowledged entry {payload!r} at {index} (term {term}) missing from new leader n{node.id} "
                    f"of term {raw.term} (has term {have})"
                )

    def _check_new_commits(self, node: _Node, raw: RawNode, lo: int, hi: int) -> None:
        conf = raw.conf_state
        sites = dict(conf.sites)
        voters = conf.voters | conf.voters_outgoing
        for index in range(lo + 1, hi + 1):
            term = raw.term_at(index)
            known = self.committed_term.setdefault(index, term)
            if known != term:
                raise self.fail(f"index {index} committed with term {known}, now n{node.id} commits term {term}")
            holders = {v: 1 for v in voters if _holds(self.nodes[v].disk.durable.storage, index, term)}
            ok = quorum.joint_committed_index_simple(
                conf.voters, conf.voters_outgoing, holders, sites, conf.min_sites
            )
            if ok < 1:
                raise self.fail(
                    f"n{node.id} (term {raw.term}) committed index {index} but only {sorted(holders)} hold it durably; "
                    f"voters {sorted(conf.voters)} outgoing {sorted(conf.voters_outgoing)} min_sites {conf.min_sites}"
                )
        self.max_committed = max(self.max_committed, hi)

    # --- network ---------------------------------------------------------------------------------

    def send(self, m: Message) -> None:
        self.result.messages += 1
        if self.trace_messages:
            self.log(
                f"n{m.frm}->n{m.to} {m.type.name} term={m.term} index={m.index} log_term={m.log_term} "
                f"entries={len(m.entries)} commit={m.commit} reject={m.reject} hint={m.reject_hint}"
            )
        if m.type == MessageType.SNAPSHOT:
            self.result.snapshots_sent += 1
        copies = 1
        if self.faults:
            if self.rng.random() < self.opts.loss:
                self._dropped(m)
                return
            if self.rng.random() < self.opts.dup:
                copies = 2
        for _ in range(copies):
            delay = 1
            if self.faults:
                if self.rng.random() < self.opts.reorder:
                    delay += self.rng.randint(0, 6)
                if self.rng.random() < self.opts.long_delay:
                    delay += self.rng.randint(20, 80)
            self.net_seq += 1
            heapq.heappush(self.net, (self.tick + delay, self.net_seq, m))

    def _dropped(self, m: Message, why: str = "loss") -> None:
        self.result.dropped += 1
        sender = self.nodes[m.frm]
        if sender.raw is None:
            return
        # A message to a dead node meets a refused connection; a cut link (a proxy closing it)
        # sometimes looks the same; and now and then a live peer's connection just resets.
        p = self.opts.down_reports
        self._report_down(m.frm, m.to, p if why == "down" else p / 4 if why == "blocked" else p / 50)
        # A real transport learns that a snapshot stream or a connection failed.
        if m.type == MessageType.SNAPSHOT:
            sender.raw.report_snapshot(m.to, success=False)
            self.observe(sender)
        elif self.rng.random() < 0.2:
            sender.raw.report_unreachable(m.to)

    def deliver_due(self) -> None:
        touched: dict[NodeId, _Node] = {}
        while self.net and self.net[0][0] <= self.tick:
            _, _, m = heapq.heappop(self.net)
            target = self.nodes.get(m.to)
            if target is None or target.raw is None or (m.frm, m.to) in self.blocked:
                self._dropped(m, "down" if target is None or target.raw is None else "blocked")
                continue
            target.raw.step(m)
            self.observe(target)
            if m.type == MessageType.SNAPSHOT:
                sender = self.nodes[m.frm]
                if sender.raw is not None:
                    sender.raw.report_snapshot(m.to, success=True)
                    self.observe(sender)
            touched[target.id] = target
            # Sometimes handle the Ready after each message, sometimes batch (group commit).
            if self.rng.random() < 0.3:
                self.process(target)
        for node in touched.values():
            self.process(node)

    # --- the driver loop -------------------------------------------------------------------------

    def process(self, node: _Node) -> None:
        for _ in range(1000):
            raw = node.raw
            if raw is None or not raw.has_ready():
                return
            try:
                self._handle_ready(node, raw, raw.ready())
            except _Crash:
                return
        raise self.fail(f"n{node.id} keeps producing Ready objects")

    def _handle_ready(self, node: _Node, raw: RawNode, rd: Ready) -> None:
        point = ""
        if self.faults:
            chance = self.opts.crash_per_ready
            if rd.hard_state is not None and rd.must_sync and not rd.entries:
                chance *= 10  # a new term or vote: crashing before it is durable is interesting
            if node.crash_soon:
                # Persist but do not send: the node's news (a new entry, a new commit index) stays
                # with it. Raft's "figure 8" needs exactly that.
                node.crash_soon = False
                point = self.rng.choice(("before_send", "mid_send"))
                self.result.ready_crashes += 1
            elif self.rng.random() < chance:
                point = self.rng.choice(_CRASH_POINTS)
                self.result.ready_crashes += 1
        disk = node.disk
        if rd.soft_state is not None:
            self.log(f"n{node.id} soft {rd.soft_state[1].name} leader=n{rd.soft_state[0]} term={raw.term}")
        if point == "before_persist":
            self._crash(node, point)
            raise _Crash
        if rd.snapshot is not None:
            self._persist_snapshot(node, rd.snapshot)
        if rd.entries:
            self._persist_entries(node, rd.entries)
        if rd.hard_state is not None:
            hs = rd.hard_state
            disk.write(lambda d: d.storage.set_hard_state(hs))
        if point == "before_sync":
            self._crash(node, point)
            raise _Crash
        if rd.must_sync and self.driver_bug != "no_sync":
            disk.sync()
        elif self.rng.random() < self.opts.flush_per_ready:
            disk.sync()  # the OS flushes on its own now and then
        if point == "before_send":
            self._crash(node, point)
            raise _Crash
        cut = self.rng.randint(0, len(rd.messages)) if point == "mid_send" else len(rd.messages)
        for m in rd.messages[:cut]:
            self.send(m)
        if point == "mid_send":
            self._crash(node, point)
            raise _Crash
        for rs in rd.read_states:
            self._read_answered(node, rs.index, rs.context)
        if rd.committed_entries:
            self._apply(node, raw, rd.committed_entries, crash=point == "mid_apply")
        if point == "before_advance":
            self._crash(node, point)
            raise _Crash
        raw.advance(rd)
        self.observe(node)
        self._maybe_compact(node, raw)

    def _persist_snapshot(self, node: _Node, snap: Snapshot) -> None:
        index = snap.meta.index
        if snap.data:
            data_index, digest = _SNAP_DATA.unpack(snap.data)
        else:
            data_index, digest = 1, _GENESIS  # the bootstrap snapshot
        if data_index != index or self.digests.get(index) != digest:
            raise self.fail(f"n{node.id} got a snapshot at {index} whose state does not match the applied sequence")
        app = _AppState(index, digest)

        def op(d: _DiskState) -> None:
            d.storage.apply_snapshot(snap)
            d.app = app

        node.disk.write(op)
        self.result.snapshots_installed += 1
        self.log(f"n{node.id} installs snapshot at {index} term {snap.meta.term}")

    def _persist_entries(self, node: _Node, entries: list[Entry]) -> None:
        node.disk.write(lambda d: d.storage.append(entries))
        storage = node.disk.live.storage
        try:
            prev_term = storage.term(entries[0].index - 1)
        except Compacted:
            prev_term = -1
        for e in entries:
            key = (e.index, e.term)
            ident = (e.rtype, e.payload, prev_term)
            seen = self.log_ids.setdefault(key, ident)
            if seen != ident and (seen[:2] != ident[:2] or -1 not in (seen[2], prev_term)):
                raise self.fail(
                    f"log matching: n{node.id} holds a different entry (or history) at index {e.index} term {e.term}"
                )
            prev_term = e.term

    def _apply(self, node: _Node, raw: RawNode, entries: list[Entry], crash: bool) -> None:
        app = node.disk.live.app
        cut = self.rng.randint(0, len(entries)) if crash else len(entries)
        for e in entries[:cut]:
            if e.index != app.applied + 1:
                raise self.fail(f"n{node.id} applies index {e.index} after {app.applied}")
            if e.index > self.max_committed or self.committed_term.get(e.index) != e.term:
                raise self.fail(f"n{node.id} applies index {e.index} (term {e.term}) that was not committed so")
            ident = (e.term, e.rtype, e.payload)
            seen = self.applied_entries.setdefault(e.index, ident)
            if seen != ident:
                raise self.fail(f"n{node.id} applies a different entry at {e.index} than another node did")
            digest = _chain(app.digest, e)
            if self.digests.setdefault(e.index, digest) != digest:
                raise self.fail(f"n{node.id} applied sequence differs from the global one at {e.index}")
            app = _AppState(e.index, digest)
            if e.rtype == BLOB:
                first = self.payload_index.setdefault(e.payload, e.index)
                if first != e.index:
                    raise self.fail(f"proposal {e.payload!r} applied at {first} and again at {e.index}")
                if node.pending_props.pop(e.payload, None) is not None:
                    self.acked.append((e.index, e.term, e.payload))
                    self.acked_payloads.add(e.payload)
                    self.acked_max_index = max(self.acked_max_index, e.index)
                    self.result.acked += 1
            elif e.rtype == CONFIG:
                conf = raw.apply_conf_change(decode_conf_change(e.payload))
                self.result.conf_changes += 1
                self.log(
                    f"n{node.id} applies conf at {e.index}: voters={sorted(conf.voters)} "
                    f"out={sorted(conf.voters_outgoing)} learners={sorted(conf.learners | conf.learners_next)}"
                )
                self.observe(node)
        if crash:
            self._crash(node, "mid_apply")
            raise _Crash
        final_app = app
        conf_now = raw.conf_state

        def op(d: _DiskState) -> None:
            d.app = final_app
            d.storage.set_conf_state(conf_now)

        node.disk.write(op)

    def _maybe_compact(self, node: _Node, raw: RawNode) -> None:
        disk = node.disk
        storage = disk.live.storage
        applied = disk.live.app.applied
        if applied - storage.first_index() < self.opts.compact_every or applied <= storage.snapshot().meta.index:
            return
        data = _SNAP_DATA.pack(applied, disk.live.app.digest)
        conf = raw.conf_state
        keep = self.rng.randint(0, self.opts.compact_every)
        compact_to = max(storage.first_index(), applied - keep)

        def op(d: _DiskState) -> None:
            d.storage.create_snapshot(applied, conf, data)
            if compact_to > d.storage.first_index() - 1:
                d.storage.compact(compact_to)

        disk.write(op)

    def _read_answered(self, node: _Node, index: int, context: bytes) -> None:
        if context in node.cancelled_reads:
            raise self.fail(f"read {context!r} on n{node.id} was answered after it was cancelled")
        floor = node.pending_reads.pop(context, None)
        if floor is None:
            return  # a read of an earlier incarnation, or a duplicate answer
        if index < floor:
            raise self.fail(f"read {context!r} on n{node.id} got index {index} < acknowledged write at {floor}")
        if index > self.max_committed:
            raise self.fail(f"read {context!r} got index {index} beyond the commit index")
        self.result.reads_answered += 1

    # --- faults and workload ---------------------------------------------------------------------

    def _faults_step(self) -> None:
        rng = self.rng
        o = self.opts
        for node in self.nodes.values():
            if node.raw is None and not node.lost and node.restart_at <= self.tick:
                self._start(node)
        if rng.random() < o.crash_per_tick:
            candidates = self.up()
            if candidates:
                self._crash(rng.choice(candidates), "tick")
        if self.partition_until and self.tick >= self.partition_until:
            self.blocked.clear()
            self.partition_until = 0
            self.log("partition healed")
        elif not self.partition_until and rng.random() < o.partition_per_tick:
            self._partition()
        if self.site_loss_at and self.tick >= self.site_loss_at and not self.lost_site:
            self._maybe_lose_site()

    def _partition(self) -> None:
        rng = self.rng
        ids = sorted(n.id for n in self.nodes.values() if not n.lost)
        kind = rng.choice(("split", "site", "one-way"))
        if kind == "split":
            rng.shuffle(ids)
            k = rng.randint(1, max(1, len(ids) - 1))
            a, b = set(ids[:k]), set(ids[k:])
        elif kind == "site":
            site = rng.choice(sorted({self.nodes[i].site for i in ids}))
            a = {i for i in ids if self.nodes[i].site == site}
            b = set(ids) - a
        else:
            a = {rng.choice(ids)}
            b = set(rng.sample(ids, rng.randint(1, len(ids)))) - a
        for x in a:
            for y in b:
                self.blocked.add((x, y))
                if kind != "one-way":
                    self.blocked.add((y, x))
        self.partition_until = self.tick + rng.randint(3, self.opts.partition_ticks_max)
        self.result.partitions += 1
        self.log(f"partition {kind}: {sorted(a)} | {sorted(b)}")

    def _maybe_lose_site(self) -> None:
        leader = self._leader()
        if leader is None or leader.raw is None:
            return
        conf = leader.raw.conf_state
        if is_joint(conf) or self._conf_change_in_flight(leader.raw):
            return  # only from a settled configuration: a pending change could need the lost site
        sites = dict(conf.sites)
        candidates = [
            site
            for site in sorted(set(sites.values()))
            if _available(conf, {n for n, s in sites.items() if s == site})
        ]
        if candidates:
            self._lose_site(self.rng.choice(candidates))
        else:
            self.site_loss_at = 0  # no site can go without losing the cluster: not in this run

    def _conf_change_in_flight(self, leader: RawNode) -> bool:
        """Is there a configuration change the leader has not applied, in any log that survives?"""
        for node in self.nodes.values():
            if node.lost:
                continue
            storage = node.disk.live.storage
            lo = max(storage.first_index(), leader.applied_index + 1)
            if any(e.rtype == CONFIG for e in storage.entries(lo, storage.last_index() + 1, 2**63)):
                return True
        lo = max(leader.first_index, leader.applied_index + 1)
        return any(e.rtype == CONFIG for e in leader.entries(lo, leader.last_index + 1))

    def _lose_site(self, site: str) -> None:
        self.lost_site = site
        self.result.site_lost = site
        for node in self.nodes.values():
            if node.site == site:
                node.lost = True
                if node.raw is not None:
                    node.raw = None
                    node.disk.crash(self.rng)  # the disk is gone; its durable part stays for the checks
        self.log(f"site {site} lost forever")

    def _propose(self) -> None:
        rng = self.rng
        candidates = self.up()
        if not candidates:
            return
        target = self.nodes.get(self.believed_leader)
        if target is None or target.raw is None or rng.random() < 0.2:
            target = rng.choice(candidates)
        assert target.raw is not None
        self.proposal_seq += 1
        payload = b"p%d:" % self.proposal_seq + bytes(rng.choice((0, 0, 10, 200, 3000)))
        try:
            target.raw.propose(BLOB, payload)
        except NotLeader as e:
            self.believed_leader = e.leader_hint
            return
        except ProposalDropped:
            return
        finally:
            self.observe(target)
        target.pending_props[payload] = self.tick
        self.result.proposals += 1
        if self.opts.profile == "chaos" and self.rng.random() < 0.2:
            # The leader crashes right after accepting a write, maybe before replicating it: the
            # divergent, partly replicated tails that elections must sort out.
            target.crash_soon = True

    def _read(self) -> None:
        candidates = self.up()
        if not candidates:
            return
        target = self.rng.choice(candidates)
        assert target.raw is not None
        self.read_seq += 1
        context = b"r%d" % self.read_seq
        try:
            target.raw.read_index(context)
        except (NotLeader, ProposalDropped):
            return
        target.pending_reads[context] = self.acked_max_index

    def _cancel_forwarded_read(self) -> None:
        """Now and then a follower's caller gives up on a read it forwarded: no answer may come."""
        if self.cancel_rng.random() >= 0.05:
            return
        for node in sorted(self.nodes.values(), key=lambda n: n.id):
            if node.raw is not None and node.raw.role == Role.FOLLOWER and node.pending_reads:
                context = self.cancel_rng.choice(sorted(node.pending_reads))
                node.raw.cancel_read(context)
                del node.pending_reads[context]
                node.cancelled_reads.add(context)
                self.result.reads_cancelled += 1
                return

    def _transfer(self) -> None:
        leader = self._leader()
        if leader is None or leader.raw is None:
            return
        voters = sorted(leader.raw.conf_state.voters - {leader.id})
        if not voters:
            return
        to = self.rng.choice(voters)
        try:
            leader.raw.transfer_leadership(to)
        except (NotLeader, InvalidArgument):
            return
        self.result.transfers += 1
        self.log(f"n{leader.id} transfers leadership to n{to}")

    # --- membership ------------------------------------------------------------------------------

    def _membership(self, necessary_only: bool = False) -> None:
        leader = self._leader()
        if leader is None or leader.raw is None:
            return
        raw = leader.raw
        conf = raw.conf_state
        if self.membership_base is not None and conf != self.membership_base:
            self.membership_base = None  # the last change was applied by the leader
            self.membership_busy_until = 0
        if self.membership_busy_until > self.tick:
            return
        lost = {n.id for n in self.nodes.values() if n.lost}
        cc = self._choose_change(conf, lost, necessary_only)
        if cc is None:
            return
        try:
            expected: ConfState | None = next_conf_state(conf, cc)
        except InvalidConfig:
            expected = None
        if expected is None:
            # The core must refuse it the same way, without changing anything.
            before = (raw.last_index, raw.conf_state)
            try:
                raw.propose_conf_change(cc)
            except InvalidConfig:
                pass
            except (ProposalDropped, NotLeader):
                return
            else:
                raise self.fail(f"n{leader.id} accepted an invalid configuration change {cc}")
            if (raw.last_index, raw.conf_state) != before:
                raise self.fail("a refused configuration change changed the leader's state")
            self.result.conf_refused += 1
            return
        if not _available(expected, lost):
            return
        try:
            raw.propose_conf_change(cc)
        except (ProposalDropped, NotLeader):
            return
        finally:
            self.observe(leader)
        for item in cc.items:
            if item.node not in self.nodes:
                node = self._new_node(item.site)
                assert node.id == item.node
                self._start(node)
        self.membership_base = conf
        self.membership_busy_until = self.tick + 300
        self.log(f"n{leader.id} proposes {cc}")

    def _choose_change(self, conf: ConfState, lost: set[NodeId], necessary_only: bool) -> ConfChange | None:
        rng = self.rng
        if is_joint(conf):
            return None if conf.auto_leave else ConfChange((), leave_joint=True)
        members = members_of(conf)
        sites = dict(conf.sites)
        lost_voters = sorted(conf.voters & lost)
        lost_learners = sorted(conf.learners & lost)
        if lost_voters or lost_learners:
            return self._replacement(conf, lost, lost_voters, lost_learners)
        if necessary_only:
            return None
        choice = rng.random()
        learners = sorted(conf.learners)
        voters = sorted(conf.voters)
        known_sites = sorted(set(sites.values()))
        if choice < 0.35 and len(members) < _MEMBERS_MAX:
            return self._add_learner(rng.choice(known_sites))
        if choice < 0.55 and learners:
            return ConfChange((ConfChangeItem(ConfChangeType.ADD_VOTER, rng.choice(learners)),))
        if choice < 0.65 and learners:
            return ConfChange((ConfChangeItem(ConfChangeType.REMOVE, rng.choice(learners)),))
        if choice < 0.75 and len(voters) > 3:
            return ConfChange((ConfChangeItem(ConfChangeType.REMOVE, rng.choice(voters)),))
        if choice < 0.8 and len(voters) > 3:
            return ConfChange((ConfChangeItem(ConfChangeType.ADD_LEARNER, rng.choice(voters)),))  # demote
        if choice < 0.95 and learners and voters:
            # A joint swap: promote a learner, and remove or demote a voter.
            gone = rng.choice(voters)
            kind = rng.choice((ConfChangeType.REMOVE, ConfChangeType.ADD_LEARNER))
            items = (ConfChangeItem(ConfChangeType.ADD_VOTER, rng.choice(learners)), ConfChangeItem(kind, gone))
            return ConfChange(items, auto_leave=rng.random() < 0.6)
        # Sometimes something invalid, to check it is refused without effect.
        return ConfChange((ConfChangeItem(ConfChangeType.ADD_VOTER, self.next_node_id, known_sites[0]),))

    def _replacement(
        self, conf: ConfState, lost: set[NodeId], lost_voters: list[NodeId], lost_learners: list[NodeId]
    ) -> ConfChange | None:
        """The next step of replacing the nodes of a lost site: the first of these that is valid
        and keeps the cluster available: promote fresh learners and remove the lost voters at once
        (joint), promote one fresh learner, remove a lost node, add a learner in the emptiest site."""
        rng = self.rng
        sites = dict(conf.sites)
        fresh = sorted(n for n in conf.learners if n not in lost)
        options: list[ConfChange] = []
        if lost_voters and len(fresh) >= len(lost_voters) and rng.random() < 0.4:
            items = [ConfChangeItem(ConfChangeType.ADD_VOTER, n) for n in fresh[: len(lost_voters)]]
            items += [ConfChangeItem(ConfChangeType.REMOVE, n) for n in lost_voters]
            options.append(ConfChange(tuple(items), auto_leave=rng.random() < 0.7))
        voters_per_site = {site: 0 for site in ("x", "y")}
        for n in conf.voters:
            if n not in lost:
                voters_per_site[sites[n]] = voters_per_site.get(sites[n], 0) + 1
        emptiest = min(sorted(voters_per_site), key=lambda site: voters_per_site[site])
        add_learner = [self._add_learner(emptiest)] if len(members_of(conf)) < _MEMBERS_MAX + 2 else []
        if len(fresh) < len(lost_voters):
            options += add_learner  # replace first, remove after
        options += [ConfChange((ConfChangeItem(ConfChangeType.ADD_VOTER, n),)) for n in fresh]
        options += [ConfChange((ConfChangeItem(ConfChangeType.REMOVE, n),)) for n in lost_learners + lost_voters]
        options += add_learner
        # Churn may have crowded one surviving site so that no lost voter can go without that site
        # holding a majority: thin it out first.
        crowded = max(sorted(voters_per_site), key=lambda site: voters_per_site[site])
        options += [
            ConfChange((ConfChangeItem(ConfChangeType.REMOVE, n),))
            for n in sorted(conf.voters)
            if sites[n] == crowded and n not in lost
        ]
        for cc in options:
            try:
                expected = next_conf_state(conf, cc)
            except InvalidConfig:
                continue
            if _available(expected, lost):
                return cc
        return None

    def _add_learner(self, site: str) -> ConfChange:
        return ConfChange((ConfChangeItem(ConfChangeType.ADD_LEARNER, self.next_node_id, site),))

    # --- phases ----------------------------------------------------------------------------------

    def tick_all(self) -> None:
        for node in list(self.nodes.values()):
            if node.raw is not None:
                node.raw.tick()
                self.observe(node)
                self.process(node)

    def step_tick(self) -> None:
        rng = self.rng
        o = self.opts
        if self.faults:
            self._faults_step()
            if rng.random() < o.membership_per_tick or (self.lost_site and rng.random() < 0.05):
                self._membership()
            if rng.random() < o.transfer_per_tick:
                self._transfer()
            for _ in range(3):
                if rng.random() < o.propose_per_tick:
                    self._propose()
            if rng.random() < o.read_per_tick:
                self._read()
            self._cancel_forwarded_read()
        self._deliver_reports()
        for node in list(self.nodes.values()):
            self.process(node)
        self.deliver_due()
        self.tick_all()
        self.tick += 1

    def heal(self) -> None:
        self.faults = False
        self.blocked.clear()
        self.partition_until = 0
        for node in self.nodes.values():
            if node.raw is None and not node.lost:
                self._start(node)
        self.log("healed")

    def converged(self) -> tuple[bool, str]:
        leader = self._leader()
        if leader is None or leader.raw is None:
            return False, "no leader"
        raw = leader.raw
        conf = raw.conf_state
        if is_joint(conf):
            return False, "still joint"
        lost_members = sorted(n for n in members_of(conf) if self.nodes[n].lost)
        if lost_members:
            return False, f"lost nodes {lost_members} not replaced yet"
        if raw.commit_index != raw.last_index or raw.applied_index != raw.commit_index:
            return False, f"leader n{leader.id} commit {raw.commit_index} last {raw.last_index}"
        digest = leader.disk.live.app.digest
        for member in sorted(members_of(conf)):
            node = self.nodes[member]
            if node.lost:
                continue
            app = node.disk.live.app
            if node.raw is None or app.applied != raw.commit_index or app.digest != digest:
                return False, f"n{member} applied {app.applied}, leader n{leader.id} at {raw.commit_index}"
        return True, ""

    def run(self) -> SimResult:
        o = self.opts
        while self.tick < o.fault_ticks:
            self.step_tick()
        self.heal()
        start = self.tick
        final_payload = b""
        final_at = 0
        why = ""
        while self.tick - start < o.heal_ticks_max:
            ok, why = self.converged()
            if ok and final_payload in self.acked_payloads:
                # Converged, and a write proposed after healing was acknowledged: live again.
                self.result.converge_ticks = self.tick - start
                break
            if ok and (not final_payload or self.tick - final_at > 100):
                # (Re)propose: a leader change may legitimately drop an uncommitted proposal.
                leader = self._leader()
                assert leader is not None and leader.raw is not None
                candidate = b"final-%d-%d" % (self.seed, self.tick)
                try:
                    leader.raw.propose(BLOB, candidate)
                except (NotLeader, ProposalDropped):
                    pass
                else:
                    final_payload, final_at = candidate, self.tick
                    leader.pending_props[candidate] = self.tick
                    self.observe(leader)
            elif not ok and self.rng.random() < 0.1:
                # Finish what must be finished: leave a joint configuration left explicitly,
                # replace the nodes of a lost site.
                self._membership(necessary_only=True)
            self.step_tick()
        else:
            raise self.fail(f"no convergence {o.heal_ticks_max} ticks after healing: {why}")
        leader = self._leader()
        assert leader is not None and leader.raw is not None
        self.result.final_index = leader.raw.commit_index
        self.result.ticks = self.tick
        return self.result


def _holds(storage: MemoryStorage, index: int, term: int) -> bool:
    try:
        return storage.term(index) == term
    except Compacted:
        return True  # inside the snapshot
    except Unavailable:
        return False


def _available(conf: ConfState, lost: set[NodeId]) -> bool:
    """Would ``conf`` still commit with the ``lost`` nodes gone for good?"""
    sites = dict(conf.sites)
    alive = {v: 1 for v in conf.voters | conf.voters_outgoing if v not in lost}
    return quorum.joint_committed_index_simple(conf.voters, conf.voters_outgoing, alive, sites, conf.min_sites) >= 1


def run_seed(
    seed: int,
    *,
    ticks: int | None = None,
    scenario: str | None = None,
    trace: bool | None = None,
    driver_bug: str | None = None,
) -> SimResult:
    """Run one seeded simulation; raise ``SimulationFailure`` if an invariant breaks.

    ``ticks`` overrides the length of the fault phase, ``scenario`` the cluster shape (see
    ``SCENARIOS``). ``trace`` (default: env ``MQSTORE_SIM_TRACE``) keeps the last events for the
    failure message. ``driver_bug`` makes the simulated driver misbehave on purpose (``"no_sync"``:
    never fsync) to show that the checks catch it.
    """
    if trace is None:
        trace = bool(os.environ.get("MQSTORE_SIM_TRACE"))
    options_rng = random.Random(seed ^ 0x5EED)
    opts = _choose_options(options_rng, scenario, ticks)
    sim = _Sim(seed, opts, trace, driver_bug)
    sim.result.options = {k: getattr(opts, k) for k in opts.__dataclass_fields__}
    try:
        return sim.run()
    except SimulationFailure:
        raise
    except (AssertionError, ConsensusError, InvalidArgument, KeyError, ValueError) as e:
        # An assertion inside the core is a bug it found by itself: report it the same way.
        raise sim.fail(f"{type(e).__name__} in the core or the driver: {e}") from e


__all__ = ["REPLAY_HINT", "SCENARIOS", "SimDisk", "SimResult", "SimulationFailure", "run_seed"]
