"""Types of the sans-IO Raft core (the interface between the core, its storage and the node).

The core (``mqstore.consensus.raft.RawNode``) never does I/O, never reads a clock, never draws
random numbers and never starts a thread: time advances only through ``tick()``, randomness
(election timeout jitter) comes from a seeded ``random.Random`` passed in by the caller, and
everything to persist, send or apply is handed out in a :class:`Ready`.

The driver's loop (the node runtime, or the simulator) is, as in etcd-io/raft::

    while True:
        feed tick() / step(message) / propose(...) as they happen
        if node.has_ready():
            rd = node.ready()
            if rd.snapshot:            storage.apply_snapshot(rd.snapshot)     # persist
            storage.append(rd.entries)                                         # persist
            if rd.hard_state:          storage.set_hard_state(rd.hard_state)   # persist
            if rd.must_sync:           fsync                                   # BEFORE sending
            send(rd.messages)
            apply(rd.committed_entries)   # CONFIG entries -> node.apply_conf_change(...)
            node.advance(rd)

Log entries are mqstore log records: ``Entry.rtype`` is a :class:`mqstore.codec.RecordType`
(NOOP for the empty entry a new leader appends, CONFIG for membership changes, anything else is
application data the core does not interpret).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from mqstore.errors import MQStoreError

NodeId = int  # > 0; 0 means "none"
NONE: NodeId = 0


class ConsensusError(MQStoreError):
    """Base of the consensus core's errors."""


class NotLeader(ConsensusError):
    """A proposal or read reached a node that is not the leader. ``leader_hint`` is the leader
    this node knows of (0 if none)."""

    def __init__(self, message: str, leader_hint: NodeId = NONE) -> None:
        super().__init__(message)
        self.leader_hint = leader_hint


class ProposalDropped(ConsensusError):
    """The leader refused a proposal (leadership transfer in progress, a configuration change
    already pending, too many bytes of uncommitted entries...). Safe to retry."""


class InvalidConfig(ConsensusError):
    """A cluster configuration breaks the placement rules (e.g. one site holds a majority of the
    voters, or fewer than ``min_sites`` sites have voters)."""


class Compacted(ConsensusError):
    """The requested index is below the first index still in the log (it is in a snapshot)."""


class Unavailable(ConsensusError):
    """The requested index is above the last index in the log."""


class Role(IntEnum):
    FOLLOWER = 1
    PRE_CANDIDATE = 2
    CANDIDATE = 3
    LEADER = 4


class MessageType(IntEnum):
    APPEND = 1  # entries + commit index (MsgApp)
    APPEND_RESPONSE = 2
    VOTE = 3
    VOTE_RESPONSE = 4
    PRE_VOTE = 5
    PRE_VOTE_RESPONSE = 6
    HEARTBEAT = 7
    HEARTBEAT_RESPONSE = 8
    SNAPSHOT = 9  # install a snapshot (MsgSnap)
    TIMEOUT_NOW = 10  # leadership transfer: campaign now, skipping pre-vote
    READ_INDEX = 11  # follower asks the leader for a read index (forwarded ReadIndex)
    READ_INDEX_RESPONSE = 12


@dataclass(frozen=True, slots=True)
class Entry:
    term: int
    index: int
    rtype: int  # mqstore.codec.RecordType
    payload: bytes = b""

    def size(self) -> int:
        return len(self.payload) + 24


@dataclass(frozen=True, slots=True)
class HardState:
    term: int = 0
    vote: NodeId = NONE
    commit: int = 0


@dataclass(frozen=True, slots=True)
class ConfState:
    """Cluster membership. ``sites`` maps every member (voters and learners, old and new) to its
    site. ``voters_outgoing`` is non-empty only during a joint configuration."""

    voters: frozenset[NodeId] = frozenset()
    learners: frozenset[NodeId] = frozenset()
    voters_outgoing: frozenset[NodeId] = frozenset()
    sites: tuple[tuple[NodeId, str], ...] = ()  # sorted (node, site) pairs
    min_sites: int = 1
    # Joint configurations only. ``learners_next``: voters of the outgoing half that become
    # learners when the joint configuration is left (a voter demoted inside a joint change cannot
    # be a learner yet: it still votes in the outgoing half). ``auto_leave``: the leader leaves the
    # joint configuration by itself once it is applied. Both are persisted so that a new leader,
    # or a restarted node, finishes a joint change the way it was started.
    learners_next: frozenset[NodeId] = frozenset()
    auto_leave: bool = False

    def site_of(self, node: NodeId) -> str:
        for n, s in self.sites:
            if n == node:
                return s
        raise KeyError(node)


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    index: int
    term: int
    conf_state: ConfState


@dataclass(frozen=True, slots=True)
class Snapshot:
    meta: SnapshotMeta
    data: bytes = b""  # opaque to the core (the node streams real state out of band)


class ConfChangeType(IntEnum):
    ADD_VOTER = 1
    ADD_LEARNER = 2
    REMOVE = 3


@dataclass(frozen=True, slots=True)
class ConfChangeItem:
    type: ConfChangeType
    node: NodeId
    site: str = ""  # required when adding


@dataclass(frozen=True, slots=True)
class ConfChange:
    """One or more membership changes. A single item changes one voter at a time (simple);
    several items are applied through a joint configuration (enter joint, then leave joint)."""

    items: tuple[ConfChangeItem, ...]
    leave_joint: bool = False  # the empty change that leaves a joint configuration
    auto_leave: bool = True  # several items: leave the joint configuration automatically (else explicitly)


@dataclass(frozen=True, slots=True)
class ReadState:
    """A ReadIndex result: once ``index`` is applied locally, a read is linearizable."""

    index: int
    context: bytes


@dataclass(frozen=True, slots=True)
class Message:
    type: MessageType
    to: NodeId
    frm: NodeId
    term: int
    log_term: int = 0
    index: int = 0
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    reject: bool = False
    reject_hint: int = 0
    snapshot: Snapshot | None = None
    context: bytes = b""


@dataclass(slots=True)
class Ready:
    """What the driver must do now, in this order: persist (``snapshot``, ``entries``,
    ``hard_state``; fsync if ``must_sync``), then send ``messages``, then apply
    ``committed_entries``, then call ``advance(ready)``."""

    hard_state: HardState | None = None
    entries: list[Entry] = field(default_factory=list)
    snapshot: Snapshot | None = None
    committed_entries: list[Entry] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    read_states: list[ReadState] = field(default_factory=list)
    must_sync: bool = False
    soft_state: tuple[NodeId, Role] | None = None  # (leader, role) when it changed
