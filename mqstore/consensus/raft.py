"""The Raft consensus core: a sans-IO state machine in the mould of etcd-io/raft.

``RawNode`` never touches a disk, a socket, a clock or a thread. The driver feeds it ticks,
messages and proposals, and carries out the ``Ready`` it hands back: persist, sync, send, apply,
``advance`` (see ``mqstore.consensus.types`` for the loop). Randomness (the election timeout
jitter) comes only from the ``random.Random`` the caller passes in, so the same inputs and seed
give the same outputs.

What differs from textbook Raft, and why:

- **Durable acknowledgements only.** A follower's append response leaves in a ``Ready`` that is
  sent after the entries were persisted, and the leader counts *its own* copy only once the
  driver advanced the ``Ready`` that persisted it. So the commit index never counts a copy that a
  crash could still erase.
- **Site-aware commit.** An index commits when a majority of voters spanning ``min_sites`` sites
  holds it (``quorum.py``). Elections, CheckQuorum and ReadIndex use plain majorities.
- **Configuration takes effect when applied**, as in etcd: the driver calls
  ``apply_conf_change`` for each committed CONFIG entry it applies. One change may be pending at
  a time, and a new leader proposes none until an entry of its own term is committed (the fix for
  the single-server change bug of the Raft dissertation).

Errors: ``NotLeader``/``ProposalDropped``/``InvalidConfig`` are the caller's to handle (no state
changed). ``AssertionError`` is a bug: an invariant that cannot fail in a correct cluster (two
leaders in one term, a committed entry about to be overwritten...). Assertions stay on.
"""

from __future__ import annotations

import random
import struct
from collections import Counter, deque
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol

from mqstore.consensus import quorum
from mqstore.consensus.quorum import VoteResult
from mqstore.consensus.storage import Storage, limit_size
from mqstore.consensus.types import (
    NONE,
    Compacted,
    ConfChange,
    ConfChangeItem,
    ConfChangeType,
    ConfState,
    Entry,
    HardState,
    InvalidConfig,
    Message,
    MessageType,
    NodeId,
    NotLeader,
    ProposalDropped,
    ReadState,
    Ready,
    Role,
    Snapshot,
    SnapshotMeta,
    Unavailable,
)
from mqstore.errors import Corruption, InvalidArgument

# Record types the core itself writes (mqstore.codec.RecordType; not imported to keep the core free
# of the codec's compiled extension). Everything else is application data the core never reads.
NOOP = 1
CONFIG = 2

#: Context of a VOTE sent because of a leadership transfer: it must not be ignored by followers
#: that still hear from the (stepping-down) leader, i.e. it overrides the CheckQuorum lease.
CAMPAIGN_TRANSFER = b"mqstore:transfer"

#: Read requests a leader keeps waiting for their heartbeat round (and reads waiting for the
#: leader's first commit in its term). More are refused: the caller retries.
READ_REQUESTS_PENDING_MAX = 4096
#: Members a configuration may have (bounds encodings and the per-tick work of a leader).
CONF_MEMBERS_MAX = 255
#: Items one configuration change may carry.
CONF_CHANGE_ITEMS_MAX = 64
#: UTF-8 bytes of a site name.
SITE_NAME_BYTES_MAX = 255


# --- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Config:
    """Parameters of one node. Ticks are the driver's unit of time (``tick()`` calls)."""

    id: NodeId
    election_tick: int = 10  # a follower that hears no leader for [election_tick, 2*election_tick) campaigns
    heartbeat_tick: int = 1  # a leader sends heartbeats every heartbeat_tick ticks
    max_size_per_msg: int = 1 << 20  # bytes of entries per append message (at least one entry is sent)
    max_inflight_msgs: int = 256  # append messages in flight to one follower in the replicate state
    max_uncommitted_bytes: int = 64 << 20  # payload bytes a leader accepts before they commit
    pre_vote: bool = True
    check_quorum: bool = True
    applied: int = 0  # index the driver's state machine has applied (0: from the snapshot)
    max_committed_bytes_per_ready: int = 16 << 20  # bytes of committed entries one Ready hands out

    def validate(self) -> None:
        if self.id <= NONE:
            raise InvalidArgument(f"node id must be > 0, got {self.id}")
        if self.heartbeat_tick < 1:
            raise InvalidArgument(f"heartbeat_tick must be >= 1, got {self.heartbeat_tick}")
        if self.election_tick <= self.heartbeat_tick:
            raise InvalidArgument(
                f"election_tick ({self.election_tick}) must be greater than heartbeat_tick ({self.heartbeat_tick})"
            )
        for name in ("max_size_per_msg", "max_inflight_msgs", "max_uncommitted_bytes", "max_committed_bytes_per_ready"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.applied < 0:
            raise InvalidArgument(f"applied must be >= 0, got {self.applied}")


# --- cluster configurations -----------------------------------------------------------------------


def members_of(conf: ConfState) -> frozenset[NodeId]:
    """Every node of a configuration: voters of both halves and learners (current and next)."""
    return conf.voters | conf.voters_outgoing | conf.learners | conf.learners_next


def is_joint(conf: ConfState) -> bool:
    return bool(conf.voters_outgoing)


#: Node ids are u64 on the wire and in CONFIG entries.
NODE_ID_MAX = 2**64 - 1


def validate_conf(conf: ConfState) -> None:
    """Raise ``InvalidConfig`` unless ``conf`` follows the placement rules.

    Structure: voters exist, no node is both voter and learner, every member has exactly one site
    and nothing else has one. Placement, for each half of a joint configuration: when voters sit in
    more than one site, no site holds a majority of them (losing that one site would lose the
    cluster); voters span at least ``min_sites`` sites; ``min_sites >= 1``. A single voter in a
    single site with ``min_sites == 1`` is valid (a one-node trial).
    """
    if conf.min_sites < 1:
        raise InvalidConfig(f"min_sites must be at least 1, got {conf.min_sites}")
    if not conf.voters:
        raise InvalidConfig("the configuration has no voters")
    members = members_of(conf)
    if len(members) > CONF_MEMBERS_MAX:
        raise InvalidConfig(f"{len(members)} members: at most {CONF_MEMBERS_MAX}")
    for node in sorted(members):
        if not NONE < node <= NODE_ID_MAX:
            raise InvalidConfig(f"node id must be 1..{NODE_ID_MAX}, got {node}")
    both = conf.voters & conf.learners
    if both:
        raise InvalidConfig(f"nodes {sorted(both)} are both voters and learners")
    if conf.learners & conf.voters_outgoing:
        raise InvalidConfig(
            f"nodes {sorted(conf.learners & conf.voters_outgoing)} are learners and outgoing voters "
            "(a demoted voter is in learners_next until the joint configuration is left)"
        )
    if conf.learners_next and not is_joint(conf):
        raise InvalidConfig("learners_next is only allowed in a joint configuration")
    if not conf.learners_next <= conf.voters_outgoing or conf.learners_next & (conf.voters | conf.learners):
        raise InvalidConfig("learners_next must be outgoing voters that are neither voters nor learners")
    if conf.auto_leave and not is_joint(conf):
        raise InvalidConfig("auto_leave is only meaningful in a joint configuration")
    site_of: dict[NodeId, str] = {}
    previous = NONE
    for node, site in conf.sites:
        if node <= previous:
            raise InvalidConfig("sites must be sorted by node with each node once")
        previous = node
        if not site or len(site.encode()) > SITE_NAME_BYTES_MAX:
            raise InvalidConfig(f"node {node}: site name must be 1..{SITE_NAME_BYTES_MAX} UTF-8 bytes, got {site!r}")
        site_of[node] = site
    missing = sorted(members - site_of.keys())
    if missing:
        raise InvalidConfig(f"nodes {missing} have no site")
    extra = sorted(site_of.keys() - members)
    if extra:
        raise InvalidConfig(f"sites are given for nodes {extra}, which are not members")
    halves = [("voters", conf.voters)]
    if is_joint(conf):
        halves.append(("outgoing voters", conf.voters_outgoing))
    for name, voters in halves:
        per_site = Counter(site_of[v] for v in voters)
        if len(per_site) > 1:
            site, count = max(sorted(per_site.items()), key=lambda kv: kv[1])
            if count >= quorum.majority(len(voters)):
                raise InvalidConfig(
                    f"site {site!r} holds {count} of the {len(voters)} {name}, a majority: "
                    "losing that one site would lose the cluster"
                )
        if len(per_site) < conf.min_sites:
            raise InvalidConfig(
                f"the {name} span {len(per_site)} site(s) ({', '.join(sorted(per_site))}); "
                f"min_sites is {conf.min_sites}"
            )


def next_conf_state(conf: ConfState, cc: ConfChange) -> ConfState:
    """The configuration ``cc`` leads to from ``conf``, validated. Raises ``InvalidConfig``.

    One item is a simple change (it changes at most one voter, applied directly); several items
    enter a joint configuration (outgoing = the current voters, incoming = the result), which the
    empty ``leave_joint`` change leaves.
    """
    if cc.leave_joint:
        if cc.items:
            raise InvalidConfig("a leave-joint change carries no items")
        if not is_joint(conf):
            raise InvalidConfig("not in a joint configuration: nothing to leave")
        left_learners = conf.learners | conf.learners_next
        left_members = conf.voters | left_learners
        new = ConfState(
            voters=conf.voters,
            learners=left_learners,
            sites=tuple((n, s) for n, s in conf.sites if n in left_members),
            min_sites=conf.min_sites,
        )
        validate_conf(new)
        return new
    if not cc.items:
        raise InvalidConfig("a configuration change needs at least one item")
    if len(cc.items) > CONF_CHANGE_ITEMS_MAX:
        raise InvalidConfig(f"{len(cc.items)} items: at most {CONF_CHANGE_ITEMS_MAX} per change")
    if is_joint(conf):
        raise InvalidConfig("the configuration is joint: leave it before changing it again")
    nodes = [item.node for item in cc.items]
    if len(set(nodes)) != len(nodes):
        raise InvalidConfig(f"a change names each node once, got {nodes}")
    joint = len(cc.items) > 1
    voters = set(conf.voters)
    learners = set(conf.learners)
    learners_next: set[NodeId] = set()
    sites = dict(conf.sites)
    for item in cc.items:
        _apply_item(item, voters, learners, learners_next, sites, joint)
    outgoing = conf.voters if joint else frozenset()
    members = voters | learners | learners_next | outgoing
    if not joint:
        assert len(voters ^ conf.voters) <= 1, "a simple change changes at most one voter"
    new = ConfState(
        voters=frozenset(voters),
        learners=frozenset(learners),
        voters_outgoing=frozenset(outgoing),
        sites=tuple(sorted((n, s) for n, s in sites.items() if n in members)),
        min_sites=conf.min_sites,
        learners_next=frozenset(learners_next),
        auto_leave=joint and cc.auto_leave,
    )
    validate_conf(new)
    return new


def _apply_item(
    item: ConfChangeItem,
    voters: set[NodeId],
    learners: set[NodeId],
    learners_next: set[NodeId],
    sites: dict[NodeId, str],
    joint: bool,
) -> None:
    node = item.node
    if not NONE < node <= NODE_ID_MAX:
        raise InvalidConfig(f"node id must be 1..{NODE_ID_MAX}, got {node}")
    if item.type in (ConfChangeType.ADD_VOTER, ConfChangeType.ADD_LEARNER):
        known = sites.get(node)
        if known is None:
            if not item.site:
                raise InvalidConfig(f"node {node} is new: its site is required")
            sites[node] = item.site
        elif item.site and item.site != known:
            raise InvalidConfig(f"node {node} is at site {known!r}; it cannot move to {item.site!r}")
    if item.type == ConfChangeType.ADD_VOTER:
        if node in voters:
            raise InvalidConfig(f"node {node} is already a voter")
        learners.discard(node)  # promotion
        voters.add(node)
    elif item.type == ConfChangeType.ADD_LEARNER:
        if node in learners:
            raise InvalidConfig(f"node {node} is already a learner")
        if node in voters:
            voters.discard(node)  # demotion: in a joint change it still votes in the outgoing half
            (learners_next if joint else learners).add(node)
        else:
            learners.add(node)
    elif item.type == ConfChangeType.REMOVE:
        if node not in voters and node not in learners:
            raise InvalidConfig(f"node {node} is not a member")
        voters.discard(node)
        learners.discard(node)
    else:  # pragma: no cover - IntEnum makes this unreachable from typed callers
        raise InvalidConfig(f"unknown change type {item.type}")


# --- encodings of configuration records -----------------------------------------------------------

_CC_VERSION = 1
_CC_LEAVE_JOINT = 0x01
_CC_AUTO_LEAVE = 0x02
_CS_VERSION = 1
_CS_AUTO_LEAVE = 0x01
_HEADER = struct.Struct("<BBH")  # version, flags, count (or min_sites)
_ITEM = struct.Struct("<BQB")  # type, node, site length
_U16 = struct.Struct("<H")
_U64 = struct.Struct("<Q")
_SITE = struct.Struct("<QB")  # node, site length
_META = struct.Struct("<QQ")  # index, term


def _encode_site(site: str) -> bytes:
    raw = site.encode()
    if len(raw) > SITE_NAME_BYTES_MAX:
        raise InvalidArgument(f"site name longer than {SITE_NAME_BYTES_MAX} bytes")
    return raw


def encode_conf_change(cc: ConfChange) -> bytes:
    """Payload of a CONFIG entry: u8 version, u8 flags, u16 item count, then per item u8 type,
    u64 node, u8 site length and the UTF-8 site. Little-endian."""
    if len(cc.items) > CONF_CHANGE_ITEMS_MAX:
        raise InvalidArgument(f"{len(cc.items)} items: at most {CONF_CHANGE_ITEMS_MAX}")
    flags = (_CC_LEAVE_JOINT if cc.leave_joint else 0) | (_CC_AUTO_LEAVE if cc.auto_leave else 0)
    parts = [_HEADER.pack(_CC_VERSION, flags, len(cc.items))]
    for item in cc.items:
        site = _encode_site(item.site)
        parts.append(_ITEM.pack(int(item.type), item.node, len(site)))
        parts.append(site)
    return b"".join(parts)


class _Reader:
    """Bounds-checked reads of a record; anything malformed is ``Corruption``."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise Corruption(f"{self.what}: truncated at byte {self.pos}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, s: struct.Struct) -> tuple[int, ...]:
        return s.unpack(self.take(s.size))

    def site(self, length: int) -> str:
        try:
            return self.take(length).decode()
        except UnicodeDecodeError as e:
            raise Corruption(f"{self.what}: site name is not UTF-8") from e

    def end(self) -> None:
        if self.pos != len(self.data):
            raise Corruption(f"{self.what}: {len(self.data) - self.pos} trailing bytes")


def decode_conf_change(data: bytes) -> ConfChange:
    r = _Reader(data, "configuration change")
    version, flags, count = r.unpack(_HEADER)
    if version != _CC_VERSION:
        raise Corruption(f"configuration change: unknown version {version}")
    if flags & ~(_CC_LEAVE_JOINT | _CC_AUTO_LEAVE):
        raise Corruption(f"configuration change: unknown flags {flags:#x}")
    if count > CONF_CHANGE_ITEMS_MAX:
        raise Corruption(f"configuration change: {count} items")
    items = []
    for _ in range(count):
        rtype, node, length = r.unpack(_ITEM)
        try:
            ctype = ConfChangeType(rtype)
        except ValueError as e:
            raise Corruption(f"configuration change: unknown item type {rtype}") from e
        items.append(ConfChangeItem(ctype, node, r.site(length)))
    r.end()
    return ConfChange(tuple(items), leave_joint=bool(flags & _CC_LEAVE_JOINT), auto_leave=bool(flags & _CC_AUTO_LEAVE))


def encode_conf_state(conf: ConfState) -> bytes:
    """u8 version, u8 flags, u16 min_sites; four node lists (voters, learners, outgoing voters,
    learners_next), each a u16 count and sorted u64 ids; the sites as a u16 count and per site
    u64 node, u8 length, UTF-8 name. Little-endian."""
    parts = [_HEADER.pack(_CS_VERSION, _CS_AUTO_LEAVE if conf.auto_leave else 0, conf.min_sites)]
    for nodes in (conf.voters, conf.learners, conf.voters_outgoing, conf.learners_next):
        if len(nodes) > CONF_MEMBERS_MAX:
            raise InvalidArgument(f"{len(nodes)} nodes: at most {CONF_MEMBERS_MAX}")
        parts.append(_U16.pack(len(nodes)))
        parts.extend(_U64.pack(n) for n in sorted(nodes))
    if len(conf.sites) > CONF_MEMBERS_MAX:
        raise InvalidArgument(f"{len(conf.sites)} sites: at most {CONF_MEMBERS_MAX}")
    parts.append(_U16.pack(len(conf.sites)))
    for node, site in conf.sites:
        raw = _encode_site(site)
        parts.append(_SITE.pack(node, len(raw)))
        parts.append(raw)
    return b"".join(parts)


def _decode_conf_state(r: _Reader) -> ConfState:
    version, flags, min_sites = r.unpack(_HEADER)
    if version != _CS_VERSION:
        raise Corruption(f"configuration: unknown version {version}")
    if flags & ~_CS_AUTO_LEAVE:
        raise Corruption(f"configuration: unknown flags {flags:#x}")
    lists: list[frozenset[NodeId]] = []
    for _ in range(4):
        (count,) = r.unpack(_U16)
        if count > CONF_MEMBERS_MAX:
            raise Corruption(f"configuration: {count} nodes")
        lists.append(frozenset(r.unpack(_U64)[0] for _ in range(count)))
    (count,) = r.unpack(_U16)
    if count > CONF_MEMBERS_MAX:
        raise Corruption(f"configuration: {count} sites")
    sites = []
    for _ in range(count):
        node, length = r.unpack(_SITE)
        sites.append((node, r.site(length)))
    return ConfState(
        voters=lists[0],
        learners=lists[1],
        voters_outgoing=lists[2],
        learners_next=lists[3],
        sites=tuple(sites),
        min_sites=min_sites,
        auto_leave=bool(flags & _CS_AUTO_LEAVE),
    )


def decode_conf_state(data: bytes) -> ConfState:
    r = _Reader(data, "configuration")
    conf = _decode_conf_state(r)
    r.end()
    return conf


def encode_snapshot_meta(meta: SnapshotMeta) -> bytes:
    """u64 index, u64 term, then the configuration (``encode_conf_state``)."""
    return _META.pack(meta.index, meta.term) + encode_conf_state(meta.conf_state)


def decode_snapshot_meta(data: bytes) -> SnapshotMeta:
    r = _Reader(data, "snapshot metadata")
    index, term = r.unpack(_META)
    conf = _decode_conf_state(r)
    r.end()
    return SnapshotMeta(index=index, term=term, conf_state=conf)


class BootstrapStorage(Protocol):
    def last_index(self) -> int: ...
    def initial_state(self) -> tuple[HardState, ConfState]: ...
    def apply_snapshot(self, snapshot: Snapshot) -> None: ...
    def set_hard_state(self, hard_state: HardState) -> None: ...


def bootstrap(storage: BootstrapStorage, conf: ConfState) -> None:
    """Write the first state of a new cluster into empty storage: a snapshot at index 1 (term 1)
    holding ``conf``. Every node of the initial configuration is bootstrapped with the same
    ``conf``; nodes added later start from empty storage and receive that snapshot (or a later
    one) from the leader, so no node ever replays membership from nothing.

    Raises ``InvalidConfig`` for a configuration that breaks the placement rules, and
    ``InvalidArgument`` if the storage is not empty (never bootstrap over existing data).
    """
    validate_conf(conf)
    if is_joint(conf):
        raise InvalidConfig("a cluster cannot start in a joint configuration")
    hard_state, _ = storage.initial_state()
    if storage.last_index() != 0 or hard_state != HardState():
        raise InvalidArgument("bootstrap needs empty storage")
    storage.apply_snapshot(Snapshot(SnapshotMeta(index=1, term=1, conf_state=conf)))
    storage.set_hard_state(HardState(term=1, vote=NONE, commit=1))


# --- the log ------------------------------------------------------------------------------------


class _Unstable:
    """Entries (and possibly a snapshot) the core has but the driver has not yet persisted.

    ``entries[i]`` has index ``offset + i``; everything below ``offset`` is in storage (or, with a
    pending ``snapshot``, superseded by it).
    """

    __slots__ = ("entries", "offset", "snapshot")

    def __init__(self, offset: int) -> None:
        self.snapshot: Snapshot | None = None
        self.entries: list[Entry] = []
        self.offset = offset

    def maybe_first_index(self) -> int | None:
        return None if self.snapshot is None else self.snapshot.meta.index + 1

    def maybe_last_index(self) -> int | None:
        if self.entries:
            return self.offset + len(self.entries) - 1
        return None if self.snapshot is None else self.snapshot.meta.index

    def maybe_term(self, index: int) -> int | None:
        if index < self.offset:
            if self.snapshot is not None and self.snapshot.meta.index == index:
                return self.snapshot.meta.term
            return None
        if index >= self.offset + len(self.entries):
            return None
        return self.entries[index - self.offset].term

    def stable_to(self, index: int, term: int) -> None:
        # Only if the entry persisted is still the one we hold: a later truncation may have
        # replaced it, in which case the new entry still has to be persisted.
        if index < self.offset or self.maybe_term(index) != term:
            return
        del self.entries[: index + 1 - self.offset]
        self.offset = index + 1

    def stable_snap_to(self, index: int) -> None:
        if self.snapshot is not None and self.snapshot.meta.index == index:
            self.snapshot = None

    def restore(self, snapshot: Snapshot) -> None:
        self.offset = snapshot.meta.index + 1
        self.entries = []
        self.snapshot = snapshot

    def truncate_and_append(self, entries: list[Entry]) -> None:
        first = entries[0].index
        if first == self.offset + len(self.entries):
            self.entries.extend(entries)
        elif first <= self.offset:
            # Replaces stable entries too: they must be persisted again (the driver's append
            # truncates its stored suffix from ``first``).
            self.offset = first
            self.entries = list(entries)
        else:
            del self.entries[first - self.offset :]
            self.entries.extend(entries)

    def slice(self, lo: int, hi: int) -> list[Entry]:
        assert self.offset <= lo <= hi <= self.offset + len(self.entries), (lo, hi, self.offset, len(self.entries))
        return self.entries[lo - self.offset : hi - self.offset]


class _RaftLog:
    """Storage plus unstable entries: the node's whole log, and its commit/apply positions."""

    __slots__ = ("applied", "committed", "storage", "unstable")

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.unstable = _Unstable(storage.last_index() + 1)
        self.committed = storage.first_index() - 1
        self.applied = storage.first_index() - 1

    def first_index(self) -> int:
        index = self.unstable.maybe_first_index()
        return index if index is not None else self.storage.first_index()

    def last_index(self) -> int:
        index = self.unstable.maybe_last_index()
        return index if index is not None else self.storage.last_index()

    def persisted_index(self) -> int:
        """Last index the driver has persisted (and synced) that is still part of this log."""
        return min(self.last_index(), self.unstable.offset - 1)

    def term(self, index: int) -> int:
        if index < self.first_index() - 1:
            raise Compacted(f"term of {index}: compacted up to {self.first_index() - 1}")
        if index > self.last_index():
            raise Unavailable(f"term of {index}: last index is {self.last_index()}")
        term = self.unstable.maybe_term(index)
        return term if term is not None else self.storage.term(index)

    def zero_term(self, index: int) -> int:
        try:
            return self.term(index)
        except (Compacted, Unavailable):
            return 0

    def last_term(self) -> int:
        return self.term(self.last_index())

    def match_term(self, index: int, term: int) -> bool:
        try:
            return self.term(index) == term
        except (Compacted, Unavailable):
            return False

    def is_up_to_date(self, last_index: int, term: int) -> bool:
        """Raft's election restriction: is a log ending at (last_index, term) at least as
        up-to-date as ours?"""
        our_term = self.last_term()
        return term > our_term or (term == our_term and last_index >= self.last_index())

    def maybe_append(self, index: int, log_term: int, committed: int, entries: tuple[Entry, ...]) -> int | None:
        """A follower's append: if our log matches the leader's at (index, log_term), make it
        match up to the last entry sent and return that entry's index; else None."""
        if not self.match_term(index, log_term):
            return None
        for k, e in enumerate(entries):
            assert e.index == index + 1 + k, f"append message entries not contiguous after {index}"
        last_new = index + len(entries)
        for e in entries:
            if not self.match_term(e.index, e.term):
                # Log Matching: from the first conflict on, the leader's suffix replaces ours.
                assert e.index > self.committed, (
                    f"entry {e.index} (term {e.term}) conflicts with committed index {self.committed}"
                )
                self.append(list(entries[e.index - index - 1 :]))
                break
        self.commit_to(min(committed, last_new))
        return last_new

    def append(self, entries: list[Entry]) -> int:
        if entries:
            assert entries[0].index - 1 >= self.committed, (
                f"appending at {entries[0].index} would overwrite committed index {self.committed}"
            )
            self.unstable.truncate_and_append(entries)
        return self.last_index()

    def find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """Largest i <= index whose term is <= term (or unknown), and its term (0 if unknown): a
        guess of where our log stops matching one whose entry at ``index`` has ``term``."""
        while index > 0:
            try:
                our = self.term(index)
            except (Compacted, Unavailable):
                return index, 0
            if our <= term:
                return index, our
            index -= 1
        return 0, 0

    def slice(self, lo: int, hi: int, max_size: int) -> list[Entry]:
        """Entries [lo, hi) within max_size bytes (at least one). Raises Compacted."""
        assert lo <= hi, (lo, hi)
        if lo < self.first_index():
            raise Compacted(f"entries from {lo}: compacted up to {self.first_index() - 1}")
        assert hi <= self.last_index() + 1, (hi, self.last_index())
        if lo == hi:
            return []
        offset = self.unstable.offset
        out: list[Entry] = []
        if lo < offset:
            stored_hi = min(hi, offset)
            out = self.storage.entries(lo, stored_hi, max_size)
            if len(out) < stored_hi - lo:
                return out  # the size limit stopped inside storage
        if hi > offset:
            out = out + self.unstable.slice(max(lo, offset), hi)
        return limit_size(out, max_size)

    def commit_to(self, index: int) -> None:
        if index > self.committed:
            assert index <= self.last_index(), (
                f"commit index {index} beyond the last index {self.last_index()}: log lost or corrupted"
            )
            self.committed = index

    def maybe_commit(self, index: int, term: int) -> bool:
        # Only entries of the leader's term are committed by counting (Raft paper, section 5.4.2);
        # earlier ones commit with them.
        if index > self.committed and self.zero_term(index) == term:
            self.commit_to(index)
            return True
        return False

    def applied_to(self, index: int) -> None:
        assert self.applied <= index <= self.committed, (self.applied, index, self.committed)
        self.applied = index

    def has_next_committed(self) -> bool:
        if self.unstable.snapshot is not None:
            return False  # the snapshot must be installed before anything after it is applied
        return self.committed > max(self.applied, self.first_index() - 1)

    def next_committed(self, max_size: int) -> list[Entry]:
        if not self.has_next_committed():
            return []
        return self.slice(max(self.applied + 1, self.first_index()), self.committed + 1, max_size)

    def restore(self, snapshot: Snapshot) -> None:
        self.committed = snapshot.meta.index
        self.unstable.restore(snapshot)


# --- progress of followers ------------------------------------------------------------------------


class ProgressState(IntEnum):
    PROBE = 1  # we do not know where the follower's log matches ours: one append at a time
    REPLICATE = 2  # streaming appends optimistically, bounded by the in-flight window
    SNAPSHOT = 3  # a snapshot is on its way; nothing else is sent


class _Inflights:
    """Append messages sent to one follower and not yet acknowledged, as (last index, bytes)."""

    __slots__ = ("capacity", "items")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: deque[tuple[int, int]] = deque()

    def add(self, last_index: int, size: int) -> None:
        assert not self.full(), "in-flight window overflow"
        assert not self.items or last_index > self.items[-1][0], "in-flight indexes must increase"
        self.items.append((last_index, size))

    def free_le(self, index: int) -> None:
        while self.items and self.items[0][0] <= index:
            self.items.popleft()

    def full(self) -> bool:
        return len(self.items) >= self.capacity

    def reset(self) -> None:
        self.items.clear()


class _Progress:
    __slots__ = ("inflights", "is_learner", "match", "next", "paused", "pending_snapshot", "recent_active", "state")

    def __init__(self, match: int, next_index: int, inflight_max: int, is_learner: bool) -> None:
        self.match = match  # highest index known durably held by the follower
        self.next = next_index  # next index to send
        self.state = ProgressState.PROBE
        self.pending_snapshot = 0
        self.recent_active = False  # heard from since the last CheckQuorum round
        self.paused = False  # probe sent and not answered / in-flight window full
        self.inflights = _Inflights(inflight_max)
        self.is_learner = is_learner

    def _reset_state(self, state: ProgressState) -> None:
        self.paused = False
        self.pending_snapshot = 0
        self.state = state
        self.inflights.reset()

    def become_probe(self) -> None:
        if self.state == ProgressState.SNAPSHOT:
            # A snapshot that arrived moved the follower to its index; resume after it.
            pending = self.pending_snapshot
            self._reset_state(ProgressState.PROBE)
            self.next = max(self.match + 1, pending + 1)
        else:
            self._reset_state(ProgressState.PROBE)
            self.next = self.match + 1

    def become_replicate(self) -> None:
        self._reset_state(ProgressState.REPLICATE)
        self.next = self.match + 1

    def become_snapshot(self, snapshot_index: int) -> None:
        self._reset_state(ProgressState.SNAPSHOT)
        self.pending_snapshot = snapshot_index
        self.next = snapshot_index + 1

    def sent_entries(self, count: int, size: int) -> None:
        if self.state == ProgressState.REPLICATE:
            if count:
                last = self.next + count - 1
                self.next = last + 1  # optimistic: assume it arrives
                self.inflights.add(last, size)
            self.paused = self.inflights.full()
        elif self.state == ProgressState.PROBE:
            self.paused = True  # every append in probe state is a probe: wait for its answer

    def maybe_update(self, index: int) -> bool:
        updated = False
        if self.match < index:
            self.match = index
            updated = True
            self.paused = False
        self.next = max(self.next, index + 1)
        return updated

    def maybe_decr_to(self, rejected: int, match_hint: int) -> bool:
        """A rejection of an append at index ``rejected``. False if it is stale."""
        if self.state == ProgressState.REPLICATE:
            if rejected <= self.match:
                return False
            self.next = self.match + 1
            return True
        # Probes go one at a time, so a rejection of anything but the last probe is stale (a
        # best effort under reordering: a wrong guess only costs another probe).
        if self.next - 1 != rejected:
            return False
        self.next = max(min(rejected, match_hint + 1), self.match + 1)
        self.paused = False
        return True

    def is_paused(self) -> bool:
        return True if self.state == ProgressState.SNAPSHOT else self.paused


@dataclass(frozen=True, slots=True)
class ProgressStatus:
    """Read-only view of the leader's knowledge about one member (for tests and diagnostics)."""

    match: int
    next: int
    state: ProgressState
    recent_active: bool
    is_learner: bool
    inflight: int


@dataclass(slots=True)
class _ReadRequest:
    index: int
    frm: NodeId
    context: bytes
    acks: set[NodeId] = field(default_factory=set)


# --- the node -----------------------------------------------------------------------------------


class RawNode:
    """One Raft replica. See the module docstring and ``mqstore.consensus.types`` for the loop.

    Not thread-safe: the driver owns it and calls it from one thread.
    """

    def __init__(self, config: Config, storage: Storage, rng: random.Random) -> None:
        config.validate()
        self._cfg = config
        self._id = config.id
        self._storage = storage
        self._rng = rng
        hard_state, conf = storage.initial_state()
        self._log = _RaftLog(storage)
        if conf.voters:
            validate_conf(conf)  # a configuration that breaks the rules never starts
        elif members_of(conf) or self._log.last_index() != 0:
            raise Corruption("the stored configuration has no voters but the node has a log or members")
        if hard_state.commit > self._log.last_index():
            raise Corruption(
                f"hard state commit {hard_state.commit} is beyond the last log index {self._log.last_index()}"
            )
        self._log.committed = max(self._log.committed, hard_state.commit)
        if config.applied:
            if config.applied < self._log.first_index() - 1:
                raise InvalidArgument(
                    f"applied index {config.applied} is below the snapshot at {self._log.first_index() - 1}: "
                    "restore the state machine from the snapshot first"
                )
            if config.applied > self._log.last_index():
                raise InvalidArgument(f"applied index {config.applied} is beyond the log ({self._log.last_index()})")
            # The state machine is durable on its own; the commit index in the hard state is only
            # synced with entries and votes, so it may lag what was applied (applied implies
            # committed).
            self._log.committed = max(self._log.committed, config.applied)
            self._log.applied = config.applied
        self._term = hard_state.term
        self._vote = hard_state.vote
        self._role = Role.FOLLOWER
        self._lead = NONE
        self._conf = ConfState()
        self._progress: dict[NodeId, _Progress] = {}
        self._votes: dict[NodeId, bool] = {}
        self._msgs: list[Message] = []
        self._read_states: list[ReadState] = []
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_election_timeout = config.election_tick
        self._lead_transferee = NONE
        self._pending_conf_index = 0
        self._uncommitted_bytes = 0
        self._read_requests: dict[bytes, _ReadRequest] = {}
        self._read_queue: deque[bytes] = deque()
        self._reads_waiting: list[tuple[bytes, NodeId]] = []  # until the leader commits in its term
        #: Reads this node (a follower) forwarded to its leader and still expects an answer for,
        #: oldest first (bounded: the oldest is forgotten when full; its caller times out).
        self._reads_forwarded: dict[bytes, None] = {}
        self._switch_config(conf)
        self._become_follower(self._term, NONE)
        self._prev_hard_state = hard_state
        self._prev_soft_state = (NONE, Role.FOLLOWER)
        self._outstanding: Ready | None = None

    # --- read-only state -------------------------------------------------------------------------

    @property
    def id(self) -> NodeId:
        return self._id

    @property
    def term(self) -> int:
        return self._term

    @property
    def role(self) -> Role:
        return self._role

    @property
    def leader(self) -> NodeId:
        return self._lead

    @property
    def vote(self) -> NodeId:
        return self._vote

    @property
    def commit_index(self) -> int:
        return self._log.committed

    @property
    def applied_index(self) -> int:
        return self._log.applied

    @property
    def conf_state(self) -> ConfState:
        return self._conf

    @property
    def last_index(self) -> int:
        return self._log.last_index()

    @property
    def first_index(self) -> int:
        return self._log.first_index()

    @property
    def lead_transferee(self) -> NodeId:
        return self._lead_transferee

    def term_at(self, index: int) -> int:
        """Term of the entry at ``index`` in this node's log (raises Compacted / Unavailable)."""
        return self._log.term(index)

    def entries(self, lo: int, hi: int) -> list[Entry]:
        """Entries [lo, hi) of this node's log, persisted or not (for tests and diagnostics)."""
        return self._log.slice(lo, hi, 2**63)

    def progress(self) -> dict[NodeId, ProgressStatus]:
        """The leader's view of every member (empty unless this node leads)."""
        if self._role != Role.LEADER:
            return {}
        return {
            node: ProgressStatus(pr.match, pr.next, pr.state, pr.recent_active, pr.is_learner, len(pr.inflights.items))
            for node, pr in sorted(self._progress.items())
        }

    # --- inputs ----------------------------------------------------------------------------------

    def tick(self) -> None:
        """Advance logical time by one tick."""
        if self._role == Role.LEADER:
            self._tick_heartbeat()
        else:
            self._tick_election()

    def campaign(self) -> None:
        """Start an election now (with a pre-vote round when pre_vote is on)."""
        self._hup(transfer=False)

    def propose(self, rtype: int, payload: bytes) -> None:
        """Append an application entry. Raises ``NotLeader`` (with the leader this node knows of)
        on a non-leader and ``ProposalDropped`` when the leader cannot take it now."""
        self.propose_many([(rtype, payload)])

    def propose_many(self, items: list[tuple[int, bytes]]) -> int:
        """Append several application entries at once (all or none) and send them to each
        follower in one append message where they fit; returns the index of the first one.
        Raises like :meth:`propose`."""
        if not items:
            raise InvalidArgument("nothing to propose")
        for rtype, _ in items:
            if rtype == CONFIG:
                raise InvalidArgument("configuration changes go through propose_conf_change")
            if not 0 < rtype < 256:
                raise InvalidArgument(f"record type must be 1..255, got {rtype}")
        self._check_can_propose()
        first = self._log.last_index() + 1
        entries = [
            Entry(term=self._term, index=first + i, rtype=rtype, payload=payload)
            for i, (rtype, payload) in enumerate(items)
        ]
        if not self._increase_uncommitted(sum(len(p) for _, p in items)):
            raise ProposalDropped(
                f"{self._uncommitted_bytes} bytes are already waiting to commit (max {self._cfg.max_uncommitted_bytes})"
            )
        self._append_entries(entries)
        return first

    def propose_conf_change(self, cc: ConfChange) -> None:
        """Propose a membership change. Raises ``NotLeader``, ``ProposalDropped`` (another change is
        pending, or this leader has not committed an entry of its term yet) or ``InvalidConfig``
        (the result would break the rules); nothing changes when it raises."""
        self._check_can_propose()
        if self._log.zero_term(self._log.committed) != self._term:
            raise ProposalDropped("the leader has not committed an entry of its term yet")
        if self._pending_conf_index > self._log.applied:
            raise ProposalDropped(
                f"a configuration change (index {self._pending_conf_index}) is not applied yet "
                f"(applied {self._log.applied})"
            )
        next_conf_state(self._conf, cc)  # validate against the configuration it will apply to
        payload = encode_conf_change(cc)
        if not self._increase_uncommitted(len(payload)):
            raise ProposalDropped("too many bytes are waiting to commit")
        index = self._log.last_index() + 1
        self._append_entries([Entry(term=self._term, index=index, rtype=CONFIG, payload=payload)])
        self._pending_conf_index = index

    def apply_conf_change(self, cc: ConfChange) -> ConfState:
        """The driver applies a committed CONFIG entry: switch to the configuration it leads to and
        return it (the driver persists it with its applied index)."""
        new = next_conf_state(self._conf, cc)
        self._switch_config(new)
        if self._role == Role.LEADER:
            if self._id not in new.voters | new.voters_outgoing:
                # Removed or demoted: a leader must be a voter. The others elect a new leader.
                self._become_follower(self._term, NONE)
            else:
                if self._maybe_commit():
                    self._bcast_append()
                else:
                    for node in sorted(self._progress):
                        if node != self._id:
                            self._maybe_send_append(node, send_if_empty=False)
                if self._lead_transferee != NONE and self._lead_transferee not in new.voters:
                    self._abort_leader_transfer()
        elif self._role in (Role.PRE_CANDIDATE, Role.CANDIDATE) and not self._promotable():
            # Removed or demoted in the middle of an election: the votes it gathers may still
            # make a quorum of the new voters, but a node outside them must not lead.
            self._become_follower(self._term, NONE)
        return self._conf

    def transfer_leadership(self, to: NodeId) -> None:
        """Hand leadership to voter ``to``: once its log is caught up it is told to campaign at
        once (TIMEOUT_NOW). Proposals are refused meanwhile; the transfer is abandoned after one
        election timeout."""
        if self._role != Role.LEADER:
            raise NotLeader(f"node {self._id} is not the leader", self._lead)
        pr = self._progress.get(to)
        if pr is None or pr.is_learner:
            raise InvalidArgument(f"node {to} is not a voter")
        if to == self._id:
            self._abort_leader_transfer()
            return
        if self._lead_transferee != NONE:
            if self._lead_transferee == to:
                return
            self._abort_leader_transfer()
        self._election_elapsed = 0  # the transfer must finish within one election timeout
        self._lead_transferee = to
        if pr.match == self._log.last_index():
            self._send_timeout_now(to)
        else:
            self._maybe_send_append(to, send_if_empty=True)

    def read_index(self, context: bytes) -> None:
        """Ask for a linearizable read point. The answer, a ``ReadState(index, context)``, comes in
        a later ``Ready`` once the leader confirmed with a heartbeat round that it still leads;
        reading after applying ``index`` is linearizable. ``context`` must be unique. No answer
        ever comes if leadership is lost meanwhile: the caller times out and retries."""
        if not context:
            raise InvalidArgument("read_index needs a non-empty, unique context")
        if self._role == Role.LEADER:
            self._leader_read_index(context, self._id)
        elif self._role == Role.FOLLOWER and self._lead != NONE:
            if len(self._reads_forwarded) >= READ_REQUESTS_PENDING_MAX:
                del self._reads_forwarded[next(iter(self._reads_forwarded))]
            self._reads_forwarded[context] = None
            self._send(Message(MessageType.READ_INDEX, to=self._lead, frm=self._id, term=self._term, context=context))
        else:
            raise NotLeader(f"node {self._id} knows no leader", self._lead)

    def cancel_read(self, context: bytes) -> None:
        """Forget the read ``context`` asked for with :meth:`read_index` (its caller gave up): no
        answer comes for it, and it no longer counts against the reads a leader holds. Unknown or
        already answered contexts are ignored."""
        if self._read_requests.pop(context, None) is not None:
            self._read_queue.remove(context)
        if any(c == context for c, _ in self._reads_waiting):
            self._reads_waiting = [(c, frm) for c, frm in self._reads_waiting if c != context]
        self._reads_forwarded.pop(context, None)

    def report_snapshot(self, to: NodeId, success: bool) -> None:
        """The transport finished (or failed) streaming a snapshot to ``to``."""
        pr = self._progress.get(to)
        if self._role != Role.LEADER or pr is None or pr.state != ProgressState.SNAPSHOT:
            return
        if not success:
            pr.pending_snapshot = 0
        pr.become_probe()
        # Wait for the follower's answer (or the next heartbeat response) before probing.
        pr.paused = True

    def report_unreachable(self, to: NodeId) -> None:
        """The transport could not reach ``to``: stop streaming optimistically, probe instead."""
        pr = self._progress.get(to)
        if self._role == Role.LEADER and pr is not None and pr.state == ProgressState.REPLICATE:
            pr.become_probe()

    def report_peer_down(self, node: NodeId) -> None:
        """The transport saw the connection to ``node`` refused or reset: its process is most
        likely gone (killed, crashed, restarting). When ``node`` is this follower's leader, the
        follower forgets it, so it grants other candidates' votes at once instead of defending
        the leader's lease for a whole election timeout, and (with PreVote) it campaigns after a
        short delay instead of its randomized election timeout: 1, 3, 5... ticks by its rank
        among the other voters, so that followers noticing together do not split the vote.

        Safe when the guess is wrong: a pre-vote changes no term, and every node that still hears
        from a live leader refuses it; the leader's next message makes this node its follower
        again. Without PreVote the node only forgets the leader (a real campaign would raise the
        term and depose a live leader)."""
        if self._role != Role.FOLLOWER or self._lead != node or node in (NONE, self._id):
            return
        self._lead = NONE
        if not self._cfg.pre_vote or not self._promotable():
            return
        others = [v for v in self._voter_ids() if v != node]
        rank = others.index(self._id) if self._id in others else len(others)
        self._election_elapsed = max(self._election_elapsed, self._randomized_election_timeout - (1 + 2 * rank))

    def step(self, m: Message) -> None:
        """Handle a message from another node."""
        if m.to != self._id:
            raise InvalidArgument(f"message for node {m.to} given to node {self._id}")
        if m.frm == NONE or m.frm == self._id:
            raise InvalidArgument(f"message from invalid sender {m.frm}")
        self._step(m)

    # --- Ready -----------------------------------------------------------------------------------

    def _hard_state(self) -> HardState:
        return HardState(term=self._term, vote=self._vote, commit=self._log.committed)

    def has_ready(self) -> bool:
        if self._outstanding is not None:
            return False
        return bool(
            self._msgs
            or self._read_states
            or self._log.unstable.entries
            or self._log.unstable.snapshot is not None
            or (self._lead, self._role) != self._prev_soft_state
            or self._hard_state() != self._prev_hard_state
            or self._log.has_next_committed()
        )

    def ready(self) -> Ready:
        """What to persist, send and apply now. Call ``advance`` with it before the next one."""
        assert self._outstanding is None, "ready() called again before advance()"
        rd = Ready(
            entries=list(self._log.unstable.entries),
            snapshot=self._log.unstable.snapshot,
            committed_entries=self._log.next_committed(self._cfg.max_committed_bytes_per_ready),
            messages=self._msgs,
            read_states=self._read_states,
        )
        self._msgs = []
        self._read_states = []
        soft = (self._lead, self._role)
        if soft != self._prev_soft_state:
            rd.soft_state = soft
            self._prev_soft_state = soft
        hard = self._hard_state()
        previous = self._prev_hard_state
        if hard != previous:
            rd.hard_state = hard
            self._prev_hard_state = hard
        # A term or vote must be durable before any message shows it (else a restarted node could
        # vote twice in a term); entries must be durable before they are acknowledged. A commit
        # index alone need not be synced: it is recovered from the leader.
        rd.must_sync = bool(
            rd.entries or rd.snapshot is not None or hard.term != previous.term or hard.vote != previous.vote
        )
        self._outstanding = rd
        return rd

    def advance(self, rd: Ready) -> None:
        """The driver persisted, sent and applied ``rd``."""
        assert rd is self._outstanding, "advance() with a Ready that is not the outstanding one"
        self._outstanding = None
        if rd.snapshot is not None:
            self._log.unstable.stable_snap_to(rd.snapshot.meta.index)
            # Installing the snapshot replaced the driver's state machine.
            self._log.applied = max(self._log.applied, rd.snapshot.meta.index)
        if rd.entries:
            last = rd.entries[-1]
            self._log.unstable.stable_to(last.index, last.term)
            pr = self._progress.get(self._id)
            # The leader's own copy counts only now that it is durable.
            if (
                self._role == Role.LEADER
                and pr is not None
                and pr.maybe_update(self._log.persisted_index())
                and self._maybe_commit()
            ):
                self._bcast_append()
        if rd.committed_entries:
            self._log.applied_to(rd.committed_entries[-1].index)
            if self._role == Role.LEADER:
                self._uncommitted_bytes = max(
                    0, self._uncommitted_bytes - sum(len(e.payload) for e in rd.committed_entries)
                )
                self._maybe_auto_leave()

    # --- internals: time -------------------------------------------------------------------------

    def _reset_randomized_election_timeout(self) -> None:
        self._randomized_election_timeout = self._rng.randrange(self._cfg.election_tick, 2 * self._cfg.election_tick)

    def _tick_election(self) -> None:
        self._election_elapsed += 1
        if self._promotable() and self._election_elapsed >= self._randomized_election_timeout:
            self._election_elapsed = 0
            self._hup(transfer=False)

    def _tick_heartbeat(self) -> None:
        self._heartbeat_elapsed += 1
        self._election_elapsed += 1
        if self._election_elapsed >= self._cfg.election_tick:
            self._election_elapsed = 0
            if self._cfg.check_quorum:
                # CheckQuorum: a leader that has not heard from a quorum within an election
                # timeout steps down, so a partitioned leader stops serving and its lease ends.
                if not self._quorum_active():
                    self._become_follower(self._term, NONE)
                    return
                for node, pr in self._progress.items():
                    if node != self._id:
                        pr.recent_active = False
            if self._lead_transferee != NONE:
                self._abort_leader_transfer()  # the transfer did not complete in time
        if self._heartbeat_elapsed >= self._cfg.heartbeat_tick:
            self._heartbeat_elapsed = 0
            self._bcast_heartbeat()

    def _quorum_active(self) -> bool:
        active = {node: pr.recent_active or node == self._id for node, pr in self._progress.items()}
        return quorum.joint_vote_result(self._conf.voters, self._conf.voters_outgoing, active) == VoteResult.WON

    # --- internals: roles ------------------------------------------------------------------------

    def _promotable(self) -> bool:
        pr = self._progress.get(self._id)
        return pr is not None and not pr.is_learner and self._log.unstable.snapshot is None

    def _reset(self, term: int) -> None:
        if self._term != term:
            self._term = term
            self._vote = NONE
        self._lead = NONE
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._reset_randomized_election_timeout()
        self._lead_transferee = NONE
        self._votes = {}
        last = self._log.last_index()
        for node, pr in list(self._progress.items()):
            fresh = _Progress(0, last + 1, self._cfg.max_inflight_msgs, pr.is_learner)
            if node == self._id:
                fresh.match = self._log.persisted_index()
                fresh.recent_active = True
            self._progress[node] = fresh
        self._pending_conf_index = 0
        self._uncommitted_bytes = 0
        self._read_requests = {}
        self._read_queue = deque()
        self._reads_waiting = []
        self._reads_forwarded = {}

    def _become_follower(self, term: int, lead: NodeId) -> None:
        self._reset(term)
        self._lead = lead
        self._role = Role.FOLLOWER

    def _become_pre_candidate(self) -> None:
        assert self._role != Role.LEADER, "leader -> pre-candidate is not a transition"
        # Neither the term nor the vote changes: a pre-vote disturbs nobody.
        self._votes = {}
        self._lead = NONE
        self._role = Role.PRE_CANDIDATE

    def _become_candidate(self) -> None:
        assert self._role != Role.LEADER, "leader -> candidate is not a transition"
        self._reset(self._term + 1)
        self._vote = self._id
        self._role = Role.CANDIDATE

    def _become_leader(self) -> None:
        assert self._role == Role.CANDIDATE, f"only a candidate becomes leader, not a {self._role.name}"
        self._reset(self._term)
        self._lead = self._id
        self._role = Role.LEADER
        pr = self._progress[self._id]
        pr.become_replicate()
        pr.match = self._log.persisted_index()
        pr.next = self._log.last_index() + 1
        # The empty entry of the new term: committing it commits everything before it (entries of
        # earlier terms are never committed by counting). Not subject to the uncommitted limit.
        self._append_entries([Entry(term=self._term, index=self._log.last_index() + 1, rtype=NOOP)])
        # Conservatively, no configuration change until everything up to here is applied: the
        # log may hold an unapplied change, and the noop must commit first anyway.
        self._pending_conf_index = self._log.last_index()

    def _hup(self, transfer: bool) -> None:
        if self._role == Role.LEADER or not self._promotable():
            return
        if self._has_unapplied_conf_changes():
            # Its outcome decides who votes: campaign once it is applied.
            return
        if self._cfg.pre_vote and not transfer:
            self._campaign_pre_vote()
        else:
            self._campaign(transfer)

    def _has_unapplied_conf_changes(self) -> bool:
        lo = max(self._log.applied + 1, self._log.first_index())
        if lo > self._log.committed:
            return False
        return any(e.rtype == CONFIG for e in self._log.slice(lo, self._log.committed + 1, 2**63))

    def _voter_ids(self) -> list[NodeId]:
        return sorted(self._conf.voters | self._conf.voters_outgoing)

    def _campaign_pre_vote(self) -> None:
        self._become_pre_candidate()
        if self._poll(self._id, True) == VoteResult.WON:
            self._campaign(transfer=False)
            return
        self._send_vote_requests(MessageType.PRE_VOTE, self._term + 1, b"")

    def _campaign(self, transfer: bool) -> None:
        self._become_candidate()
        if self._poll(self._id, True) == VoteResult.WON:
            self._become_leader()
            return
        self._send_vote_requests(MessageType.VOTE, self._term, CAMPAIGN_TRANSFER if transfer else b"")

    def _send_vote_requests(self, mtype: MessageType, term: int, context: bytes) -> None:
        last_index = self._log.last_index()
        last_term = self._log.last_term()
        for node in self._voter_ids():
            if node != self._id:
                self._send(
                    Message(
                        mtype, to=node, frm=self._id, term=term, index=last_index, log_term=last_term, context=context
                    )
                )

    def _poll(self, node: NodeId, granted: bool) -> VoteResult:
        self._votes.setdefault(node, granted)
        return quorum.joint_vote_result(self._conf.voters, self._conf.voters_outgoing, self._votes)

    # --- internals: messages ---------------------------------------------------------------------

    def _send(self, m: Message) -> None:
        assert m.to != self._id and m.to != NONE, f"message to {m.to}"
        self._msgs.append(m)

    def _step(self, m: Message) -> None:
        if m.term > self._term:
            if m.type in (MessageType.VOTE, MessageType.PRE_VOTE):
                in_lease = (
                    self._cfg.check_quorum
                    and self._lead != NONE
                    and self._election_elapsed < self._cfg.election_tick
                )
                if in_lease and m.context != CAMPAIGN_TRANSFER:
                    # We heard from a live leader within the election timeout: ignore the
                    # candidate (it is partitioned, removed or impatient) rather than let it
                    # depose a working leader. Only a leadership transfer overrides this.
                    return
            if m.type == MessageType.PRE_VOTE:
                pass  # a pre-vote never changes our term
            elif m.type == MessageType.PRE_VOTE_RESPONSE and not m.reject:
                pass  # granted for the term we will campaign in; the term moves when we win
            elif m.type in (MessageType.APPEND, MessageType.HEARTBEAT, MessageType.SNAPSHOT):
                self._become_follower(m.term, m.frm)
            else:
                self._become_follower(m.term, NONE)
        elif m.term < self._term:
            if m.type in (MessageType.APPEND, MessageType.HEARTBEAT) and (
                self._cfg.check_quorum or self._cfg.pre_vote
            ):
                # A stale leader. With CheckQuorum/PreVote our higher term might never reach it
                # through votes, so tell it, or it would keep leading its minority forever.
                self._send(Message(MessageType.APPEND_RESPONSE, to=m.frm, frm=self._id, term=self._term))
            elif m.type == MessageType.PRE_VOTE:
                self._send(
                    Message(MessageType.PRE_VOTE_RESPONSE, to=m.frm, frm=self._id, term=self._term, reject=True)
                )
            return  # everything else from an older term is ignored
        if m.type in (MessageType.VOTE_RESPONSE, MessageType.PRE_VOTE_RESPONSE) and m.reject and m.commit:
            self._learn_commit(m)
        if m.type in (MessageType.VOTE, MessageType.PRE_VOTE):
            self._handle_vote_request(m)
        elif self._role == Role.LEADER:
            self._step_leader(m)
        elif self._role == Role.FOLLOWER:
            self._step_follower(m)
        else:
            self._step_candidate(m)

    def _handle_vote_request(self, m: Message) -> None:
        response = MessageType.VOTE_RESPONSE if m.type == MessageType.VOTE else MessageType.PRE_VOTE_RESPONSE
        can_vote = (
            self._vote == m.frm  # a repeated request (e.g. a duplicated message)
            or (self._vote == NONE and self._lead == NONE)  # we have not voted and know no leader
            or (m.type == MessageType.PRE_VOTE and m.term > self._term)  # a pre-vote for a later term
        )
        if can_vote and self._log.is_up_to_date(m.index, m.log_term):
            # Learners answer too: one may have been promoted without knowing it yet, and its vote
            # counts only if the candidate's configuration says it is a voter.
            self._send(Message(response, to=m.frm, frm=self._id, term=m.term))
            if m.type == MessageType.VOTE:
                self._election_elapsed = 0
                self._vote = m.frm
        else:
            # The refusal carries our commit index (capped at the candidate's last index) and the
            # term of its entry: a candidate whose log holds that same entry learns that its
            # prefix is committed (see _learn_commit).
            commit = min(self._log.committed, m.index)
            commit_term = self._log.zero_term(commit)
            self._send(Message(response, to=m.frm, frm=self._id, term=self._term, reject=True,
                               commit=commit if commit_term else 0, log_term=commit_term))

    def _learn_commit(self, m: Message) -> None:
        """A vote refusal told us that the voter's log is committed up to ``m.commit``, whose entry
        has term ``m.log_term``. If our log holds an entry with that index and term, Log Matching
        makes our prefix up to it identical to the voter's, hence committed: we may commit it.

        Standard Raft learns commit indexes only from a leader. This closes a liveness hole of
        applying configuration changes when they commit (etcd-io/etcd#12359): after a joint change
        that demotes a voter, the demoted node may know the change committed (and be a learner,
        so it never campaigns) while the remaining voters do not, so they still count it as a
        voter of the outgoing half, whose vote they need and cannot get (its log is newer). Once
        they learn the commit they apply the new configuration and elect among themselves."""
        if self._role == Role.LEADER or m.commit <= self._log.committed or m.commit > self._log.last_index():
            return
        if self._log.match_term(m.commit, m.log_term):
            self._log.commit_to(m.commit)

    def _step_leader(self, m: Message) -> None:
        t = m.type
        if t in (MessageType.APPEND, MessageType.HEARTBEAT, MessageType.SNAPSHOT, MessageType.TIMEOUT_NOW):
            raise AssertionError(f"node {self._id} leads term {self._term} but node {m.frm} sent {t.name} in it")
        if t == MessageType.READ_INDEX:
            self._leader_read_index(m.context, m.frm)
            return
        pr = self._progress.get(m.frm)
        if pr is None:
            return  # not (or no longer) a member
        if t == MessageType.APPEND_RESPONSE:
            self._handle_append_response(m, pr)
        elif t == MessageType.HEARTBEAT_RESPONSE:
            self._handle_heartbeat_response(m, pr)
        # Vote responses (from our own campaign) and read-index responses are stale here.

    def _handle_append_response(self, m: Message, pr: _Progress) -> None:
        pr.recent_active = True
        if m.reject:
            next_probe = m.reject_hint
            if m.log_term > 0:
                # The follower told us the term at its hint: skip every entry of ours with a
                # larger term in one go instead of probing them one by one.
                next_probe, _ = self._log.find_conflict_by_term(m.reject_hint, m.log_term)
            if pr.maybe_decr_to(m.index, next_probe):
                if pr.state == ProgressState.REPLICATE:
                    pr.become_probe()
                self._maybe_send_append(m.frm, send_if_empty=True)
            return
        if pr.maybe_update(m.index) or (pr.match == m.index and pr.state == ProgressState.PROBE):
            if pr.state == ProgressState.PROBE:
                pr.become_replicate()
            elif pr.state == ProgressState.SNAPSHOT and pr.match + 1 >= self._log.first_index():
                # The snapshot (or enough appends) arrived: stream from here on.
                pr.become_probe()
                pr.become_replicate()
            elif pr.state == ProgressState.REPLICATE:
                pr.inflights.free_le(m.index)
            if self._maybe_commit():
                self._bcast_append()
            # Send what the window now allows.
            for _ in range(self._cfg.max_inflight_msgs):
                if not self._maybe_send_append(m.frm, send_if_empty=False):
                    break
            if m.frm == self._lead_transferee and pr.match == self._log.last_index():
                self._send_timeout_now(m.frm)

    def _handle_heartbeat_response(self, m: Message, pr: _Progress) -> None:
        pr.recent_active = True
        pr.paused = False
        # Even with a full in-flight window send an (empty) append: if every message of the window
        # was lost, its answer (ack or reject) is what unblocks the follower.
        if pr.match < self._log.last_index() or pr.state == ProgressState.PROBE:
            self._maybe_send_append(m.frm, send_if_empty=True)
        if not m.context:
            return
        request = self._read_requests.get(m.context)
        if request is None:
            return
        request.acks.add(m.frm)
        acks = dict.fromkeys(request.acks, True)
        if quorum.joint_vote_result(self._conf.voters, self._conf.voters_outgoing, acks) != VoteResult.WON:
            return
        # A quorum confirmed we still lead after this request arrived: it and every earlier
        # request are answered with the commit index recorded when each arrived.
        while self._read_queue:
            context = self._read_queue.popleft()
            done = self._read_requests.pop(context)
            self._answer_read(done.index, done.context, done.frm)
            if context == m.context:
                break

    def _step_candidate(self, m: Message) -> None:
        t = m.type
        mine = MessageType.PRE_VOTE_RESPONSE if self._role == Role.PRE_CANDIDATE else MessageType.VOTE_RESPONSE
        if t in (MessageType.APPEND, MessageType.HEARTBEAT, MessageType.SNAPSHOT):
            # A leader exists in our term (a pre-candidate's term is the old one): follow it.
            self._become_follower(m.term, m.frm)
            self._step_follower(m)
        elif t == mine:
            result = self._poll(m.frm, not m.reject)
            if not self._promotable():
                # No longer a voter (a configuration applied, a snapshot pending): it cannot win.
                self._become_follower(self._term, NONE)
            elif result == VoteResult.WON:
                if self._role == Role.PRE_CANDIDATE:
                    self._campaign(transfer=False)
                else:
                    self._become_leader()
                    self._bcast_append()
            elif result == VoteResult.LOST:
                self._become_follower(self._term, NONE)
        # TIMEOUT_NOW, READ_INDEX(_RESPONSE), the other vote response type: nothing to do.

    def _step_follower(self, m: Message) -> None:
        t = m.type
        if t in (MessageType.APPEND, MessageType.HEARTBEAT, MessageType.SNAPSHOT):
            assert self._lead in (NONE, m.frm), (
                f"node {self._id} follows {self._lead} in term {self._term} but {m.frm} sent {t.name} in it"
            )
            self._election_elapsed = 0
            self._lead = m.frm
            if t == MessageType.APPEND:
                self._handle_append(m)
            elif t == MessageType.HEARTBEAT:
                self._handle_heartbeat(m)
            else:
                self._handle_snapshot(m)
        elif t == MessageType.TIMEOUT_NOW:
            self._hup(transfer=True)
        # An answer counts only for a read still asked for: not one cancelled, answered already
        # or forgotten.
        elif t == MessageType.READ_INDEX_RESPONSE and self._reads_forwarded.pop(m.context, 0) is None:
            self._read_states.append(ReadState(index=m.index, context=m.context))
        # A READ_INDEX reaching a follower was meant for a leader that is gone: the asking node
        # times out and retries. Vote responses are stale.

    def _handle_append(self, m: Message) -> None:
        if m.index < self._log.committed:
            # Everything up to our commit index matches any leader's log: tell it where we are.
            self._send(
                Message(
                    MessageType.APPEND_RESPONSE, to=m.frm, frm=self._id, term=self._term, index=self._log.committed
                )
            )
            return
        last_new = self._log.maybe_append(m.index, m.log_term, m.commit, m.entries)
        if last_new is not None:
            # Sent only after the Ready holding these entries was persisted: a durable ack.
            self._send(Message(MessageType.APPEND_RESPONSE, to=m.frm, frm=self._id, term=self._term, index=last_new))
            return
        hint_index = min(m.index, self._log.last_index())
        hint_index, hint_term = self._log.find_conflict_by_term(hint_index, m.log_term)
        self._send(
            Message(
                MessageType.APPEND_RESPONSE,
                to=m.frm,
                frm=self._id,
                term=self._term,
                index=m.index,
                reject=True,
                reject_hint=hint_index,
                log_term=hint_term,
            )
        )

    def _handle_heartbeat(self, m: Message) -> None:
        # The leader caps the commit index it sends us at what we hold, so this never points past
        # our log or at an entry that differs from the leader's.
        self._log.commit_to(m.commit)
        self._send(
            Message(MessageType.HEARTBEAT_RESPONSE, to=m.frm, frm=self._id, term=self._term, context=m.context)
        )

    def _handle_snapshot(self, m: Message) -> None:
        assert m.snapshot is not None, "SNAPSHOT message without a snapshot"
        index = self._log.last_index() if self._restore(m.snapshot) else self._log.committed
        self._send(Message(MessageType.APPEND_RESPONSE, to=m.frm, frm=self._id, term=self._term, index=index))

    def _restore(self, snapshot: Snapshot) -> bool:
        meta = snapshot.meta
        if meta.index <= self._log.committed:
            return False  # old news (a duplicate, or we caught up meanwhile)
        assert self._role == Role.FOLLOWER, "only a follower installs a snapshot"
        # Unlike etcd-io/raft, a snapshot whose configuration does not include us is installed: a
        # node added after the leader's latest snapshot gets exactly that, and learns that it is a
        # member from the log that follows. Until then it is no member and never campaigns.
        if self._log.match_term(meta.index, meta.term):
            # We hold the snapshot's last entry: our log up to there is the leader's. Just commit.
            self._log.commit_to(meta.index)
            return False
        self._log.restore(snapshot)
        self._switch_config(meta.conf_state)
        return True

    # --- internals: leader -----------------------------------------------------------------------

    def _check_can_propose(self) -> None:
        if self._role != Role.LEADER:
            raise NotLeader(f"node {self._id} is not the leader", self._lead)
        if self._lead_transferee != NONE:
            raise ProposalDropped(f"leadership is being transferred to node {self._lead_transferee}")
        if self._id not in self._progress:
            raise ProposalDropped(f"node {self._id} is no longer a member")

    def _increase_uncommitted(self, size: int) -> bool:
        # An empty log of uncommitted entries always accepts one, however large: a single proposal
        # bigger than the limit must not be refused forever.
        limit = self._cfg.max_uncommitted_bytes
        if self._uncommitted_bytes > 0 and size > 0 and self._uncommitted_bytes + size > limit:
            return False
        self._uncommitted_bytes += size
        return True

    def _append_entries(self, entries: list[Entry]) -> None:
        # The leader's own progress is NOT advanced here: its copy counts once it is persisted
        # (see advance()).
        self._log.append(entries)
        self._bcast_append()

    def _maybe_commit(self) -> bool:
        acked = {node: pr.match for node, pr in self._progress.items()}
        index = quorum.joint_committed_index(
            self._conf.voters, self._conf.voters_outgoing, acked, dict(self._conf.sites), self._conf.min_sites
        )
        index = min(index, self._log.last_index())
        if not self._log.maybe_commit(index, self._term):
            return False
        self._release_waiting_reads()
        return True

    def _bcast_append(self) -> None:
        for node in sorted(self._progress):
            if node != self._id:
                self._maybe_send_append(node, send_if_empty=True)

    def _bcast_heartbeat(self) -> None:
        context = self._read_queue[-1] if self._read_queue else b""
        for node in sorted(self._progress):
            if node != self._id:
                self._send_heartbeat(node, context)

    def _send_heartbeat(self, to: NodeId, context: bytes) -> None:
        commit = min(self._progress[to].match, self._log.committed)
        self._send(Message(MessageType.HEARTBEAT, to=to, frm=self._id, term=self._term, commit=commit, context=context))

    def _maybe_send_append(self, to: NodeId, send_if_empty: bool) -> bool:
        pr = self._progress[to]
        if pr.is_paused():
            return False
        prev_index = pr.next - 1
        assert prev_index <= self._log.last_index(), (to, pr.next, self._log.last_index())
        try:
            prev_term = self._log.term(prev_index)
        except Compacted:
            return self._maybe_send_snapshot(to, pr)
        entries: list[Entry] = []
        # With a full window only empty appends go out: their answers unblock a window whose
        # messages were all lost.
        if pr.state != ProgressState.REPLICATE or not pr.inflights.full():
            try:
                entries = self._log.slice(pr.next, self._log.last_index() + 1, self._cfg.max_size_per_msg)
            except Compacted:
                return self._maybe_send_snapshot(to, pr)
        if not entries and not send_if_empty:
            return False
        self._send(
            Message(
                MessageType.APPEND,
                to=to,
                frm=self._id,
                term=self._term,
                index=prev_index,
                log_term=prev_term,
                entries=tuple(entries),
                commit=self._log.committed,
            )
        )
        pr.sent_entries(len(entries), sum(e.size() for e in entries))
        return True

    def _maybe_send_snapshot(self, to: NodeId, pr: _Progress) -> bool:
        if not pr.recent_active:
            return False  # do not stream a snapshot to a node that may well be down
        try:
            snapshot = self._storage.snapshot()
        except Unavailable:
            return False  # being created: retry on a later heartbeat response
        assert snapshot.meta.index >= self._log.first_index() - 1, "the snapshot does not cover the compacted log"
        pr.become_snapshot(snapshot.meta.index)
        self._send(Message(MessageType.SNAPSHOT, to=to, frm=self._id, term=self._term, snapshot=snapshot))
        return True

    def _send_timeout_now(self, to: NodeId) -> None:
        self._send(Message(MessageType.TIMEOUT_NOW, to=to, frm=self._id, term=self._term))

    def _abort_leader_transfer(self) -> None:
        self._lead_transferee = NONE

    def _maybe_auto_leave(self) -> None:
        if not (self._conf.auto_leave and is_joint(self._conf)):
            return
        if self._log.applied < self._pending_conf_index or self._id not in self._progress:
            return
        # The joint configuration is applied: propose leaving it. Like the noop, this bypasses the
        # uncommitted-bytes limit (it must not be refusable).
        index = self._log.last_index() + 1
        payload = encode_conf_change(ConfChange((), leave_joint=True))
        self._append_entries([Entry(term=self._term, index=index, rtype=CONFIG, payload=payload)])
        self._pending_conf_index = index

    # --- internals: reads ------------------------------------------------------------------------

    def _answer_read(self, index: int, context: bytes, to: NodeId) -> None:
        if to == self._id:
            self._read_states.append(ReadState(index=index, context=context))
        else:
            self._send(
                Message(
                    MessageType.READ_INDEX_RESPONSE, to=to, frm=self._id, term=self._term, index=index, context=context
                )
            )

    def _leader_read_index(self, context: bytes, frm: NodeId) -> None:
        if self._log.zero_term(self._log.committed) != self._term:
            # A new leader does not know the commit index of its predecessor until an entry of its
            # own term commits: hold the read until then.
            if len(self._reads_waiting) >= READ_REQUESTS_PENDING_MAX:
                if frm == self._id:
                    raise ProposalDropped("too many reads waiting")
                return
            self._reads_waiting.append((context, frm))
            return
        voters = self._conf.voters
        if not self._conf.voters_outgoing and voters == {self._id}:
            self._answer_read(self._log.committed, context, frm)  # a one-voter cluster: we are the quorum
            return
        if context in self._read_requests:
            return  # a duplicate
        if len(self._read_requests) >= READ_REQUESTS_PENDING_MAX:
            if frm == self._id:
                raise ProposalDropped("too many reads pending")
            return
        self._read_requests[context] = _ReadRequest(self._log.committed, frm, context, {self._id})
        self._read_queue.append(context)
        self._bcast_heartbeat()

    def _release_waiting_reads(self) -> None:
        if not self._reads_waiting or self._log.zero_term(self._log.committed) != self._term:
            return
        waiting, self._reads_waiting = self._reads_waiting, []
        for context, frm in waiting:
            self._leader_read_index(context, frm)

    # --- internals: configuration ----------------------------------------------------------------

    def _switch_config(self, conf: ConfState) -> None:
        self._conf = conf
        voters = conf.voters | conf.voters_outgoing
        members = members_of(conf)
        last = self._log.last_index()
        for node in list(self._progress):
            if node not in members:
                del self._progress[node]
        for node in sorted(members):
            pr = self._progress.get(node)
            if pr is None:
                pr = _Progress(0, last + 1, self._cfg.max_inflight_msgs, node not in voters)
                # New members count as active, or CheckQuorum could depose the leader before they
                # had a chance to answer.
                pr.recent_active = True
                if node == self._id:
                    pr.match = self._log.persisted_index()
                self._progress[node] = pr
            pr.is_learner = node not in voters

