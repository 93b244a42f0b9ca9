"""Unit and scripted interaction tests of the consensus core (mqstore.consensus).

The ``Cluster`` harness below drives real ``RawNode`` s over ``MemoryStorage`` with a perfect,
synchronous network that tests can cut: every Ready is persisted, then its messages are queued,
then its committed entries applied, as the driver loop in ``mqstore.consensus.types`` says.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqstore.consensus import quorum
from mqstore.consensus.quorum import VoteResult
from mqstore.consensus.raft import (
    CONFIG,
    NOOP,
    Config,
    ProgressState,
    RawNode,
    _RaftLog,
    bootstrap,
    decode_conf_change,
    decode_conf_state,
    decode_snapshot_meta,
    encode_conf_change,
    encode_conf_state,
    encode_snapshot_meta,
    next_conf_state,
    validate_conf,
)
from mqstore.consensus.storage import MemoryStorage
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

BLOB = 18
SITES3 = {1: "a", 2: "b", 3: "c"}
SITES5 = {1: "a", 2: "a", 3: "b", 4: "b", 5: "c"}


def conf_of(
    sites: dict[int, str], min_sites: int = 2, learners: Iterable[int] = (), voters: Iterable[int] | None = None
) -> ConfState:
    learner_set = frozenset(learners)
    voter_set = frozenset(voters) if voters is not None else frozenset(sites) - learner_set
    return ConfState(voters=voter_set, learners=learner_set, sites=tuple(sorted(sites.items())), min_sites=min_sites)


def add(node: int, site: str = "", learner: bool = False) -> ConfChangeItem:
    return ConfChangeItem(ConfChangeType.ADD_LEARNER if learner else ConfChangeType.ADD_VOTER, node, site)


def remove(node: int) -> ConfChangeItem:
    return ConfChangeItem(ConfChangeType.REMOVE, node)


class Cluster:
    """Real nodes, a synchronous network with cuttable links, storage that never loses a write."""

    def __init__(
        self,
        sites: dict[int, str],
        min_sites: int = 2,
        learners: Iterable[int] = (),
        seed: int = 0,
        **config: int | bool,
    ) -> None:
        self.seed = seed
        self.config = config
        self.sites = dict(sites)
        conf = conf_of(sites, min_sites, learners)
        self.storage: dict[int, MemoryStorage] = {}
        self.nodes: dict[int, RawNode] = {}
        self.applied: dict[int, list[Entry]] = {}
        self.read_states: dict[int, list[ReadState]] = {}
        self.sent: list[Message] = []
        self.queue: list[Message] = []
        self.cut: set[tuple[int, int]] = set()
        self.down: set[int] = set()
        self.drop: Callable[[Message], bool] = lambda m: False
        for node in sites:
            storage = MemoryStorage()
            bootstrap(storage, conf)
            self.storage[node] = storage
            self._start(node)

    def _start(self, node: int, applied: int = 0) -> None:
        cfg = Config(id=node, applied=applied, **self.config)  # type: ignore[arg-type]
        self.nodes[node] = RawNode(cfg, self.storage[node], random.Random(self.seed * 1000 + node))
        self.applied.setdefault(node, [])
        self.read_states.setdefault(node, [])

    def add_node(self, node: int) -> RawNode:
        """A new, empty node (to be added to the configuration)."""
        self.storage[node] = MemoryStorage()
        self._start(node)
        return self.nodes[node]

    def restart(self, node: int) -> RawNode:
        """Drop the node's memory; restart from its storage (which kept everything)."""
        self.down.discard(node)
        applied = self.applied[node][-1].index if self.applied[node] else 0
        self._start(node, applied=max(applied, self.storage[node].first_index() - 1))
        return self.nodes[node]

    def process(self, node: int) -> None:
        raw = self.nodes[node]
        while raw.has_ready():
            rd = raw.ready()
            self.persist(node, rd)
            self.queue.extend(rd.messages)
            self.sent.extend(rd.messages)
            self.apply(node, rd)
            raw.advance(rd)

    def persist(self, node: int, rd: Ready) -> None:
        storage = self.storage[node]
        if rd.snapshot is not None:
            storage.apply_snapshot(rd.snapshot)
        storage.append(rd.entries)
        if rd.hard_state is not None:
            storage.set_hard_state(rd.hard_state)

    def apply(self, node: int, rd: Ready) -> None:
        raw = self.nodes[node]
        self.read_states[node].extend(rd.read_states)
        for e in rd.committed_entries:
            self.applied[node].append(e)
            if e.rtype == CONFIG:
                self.storage[node].set_conf_state(raw.apply_conf_change(decode_conf_change(e.payload)))

    def deliver(self, rounds: int = 1000) -> None:
        for _ in range(rounds):
            for node in sorted(self.nodes):
                if node not in self.down:
                    self.process(node)
            if not self.queue:
                return
            batch, self.queue = self.queue, []
            for m in batch:
                if m.to in self.down or m.frm in self.down or (m.frm, m.to) in self.cut or self.drop(m):
                    continue
                if m.to in self.nodes:
                    self.nodes[m.to].step(m)
        raise AssertionError("the cluster did not quiesce")

    def tick(self, n: int = 1, only: Iterable[int] | None = None) -> None:
        ids = sorted(only) if only is not None else sorted(self.nodes)
        for _ in range(n):
            for node in ids:
                if node not in self.down:
                    self.nodes[node].tick()
            self.deliver()

    def isolate(self, node: int) -> None:
        for other in self.nodes:
            if other != node:
                self.cut.add((node, other))
                self.cut.add((other, node))

    def heal(self) -> None:
        self.cut.clear()
        self.drop = lambda m: False

    def elect(self, node: int) -> RawNode:
        self.nodes[node].campaign()
        self.deliver()
        assert self.nodes[node].role == Role.LEADER, f"n{node} is {self.nodes[node].role.name}"
        return self.nodes[node]

    def propose(self, node: int, payload: bytes) -> None:
        self.nodes[node].propose(BLOB, payload)
        self.deliver()

    def payloads(self, node: int) -> list[bytes]:
        return [e.payload for e in self.applied[node] if e.rtype == BLOB]

    def log_of(self, node: int) -> list[tuple[int, int]]:
        raw = self.nodes[node]
        return [(e.index, e.term) for e in raw.entries(raw.first_index, raw.last_index + 1)]


# --- quorum ---------------------------------------------------------------------------------------


def test_committed_index_plain_majority() -> None:
    sites = {1: "a", 2: "b", 3: "c"}
    assert quorum.committed_index({1, 2, 3}, {1: 5, 2: 3, 3: 1}, sites, 1) == 3
    assert quorum.committed_index({1, 2, 3}, {1: 5}, sites, 1) == 0
    assert quorum.committed_index(set(), {}, sites, 1) == quorum.NO_LIMIT


def test_committed_index_needs_min_sites() -> None:
    # Placement 3/2 (which validation refuses; the quorum layer still must be right): the three
    # voters of site a hold index 9, a majority, but one site only.
    sites = {1: "a", 2: "a", 3: "a", 4: "b", 5: "b"}
    acked = {1: 9, 2: 9, 3: 9, 4: 4, 5: 2}
    assert quorum.committed_index(set(sites), acked, sites, 1) == 9
    assert quorum.committed_index(set(sites), acked, sites, 2) == 4
    assert quorum.committed_index(set(sites), acked, sites, 3) == 0


def test_joint_committed_index_is_the_smaller_half() -> None:
    sites = {n: s for n, s in zip(range(1, 7), "abcabc", strict=True)}
    acked = {1: 10, 2: 10, 3: 1, 4: 7, 5: 7, 6: 7}
    assert quorum.joint_committed_index({1, 2, 3}, {4, 5, 6}, acked, sites, 2) == 7
    assert quorum.joint_committed_index({1, 2, 3}, set(), acked, sites, 2) == 10


def test_vote_results() -> None:
    assert quorum.vote_result({1, 2, 3}, {1: True, 2: True}) == VoteResult.WON
    assert quorum.vote_result({1, 2, 3}, {1: True, 2: False}) == VoteResult.PENDING
    assert quorum.vote_result({1, 2, 3}, {1: False, 2: False}) == VoteResult.LOST
    assert quorum.vote_result(set(), {}) == VoteResult.WON
    assert quorum.joint_vote_result({1, 2, 3}, {3, 4, 5}, {1: True, 2: True, 3: True}) == VoteResult.PENDING
    assert quorum.joint_vote_result({1, 2, 3}, {3, 4, 5}, {1: True, 2: True, 4: False, 5: False}) == VoteResult.LOST


@st.composite
def _quorum_cases(draw: st.DrawFn) -> tuple[set[int], set[int], dict[int, int], dict[int, str], int, dict[int, bool]]:
    nodes = list(range(1, draw(st.integers(1, 9)) + 1))
    sites = {n: draw(st.sampled_from("abcd")) for n in nodes}
    incoming = set(draw(st.lists(st.sampled_from(nodes), min_size=1, max_size=7, unique=True)))
    outgoing = set(draw(st.lists(st.sampled_from(nodes), max_size=7, unique=True)))
    acked = {n: draw(st.integers(0, 12)) for n in nodes if draw(st.booleans()) or n % 3}
    votes = {n: draw(st.booleans()) for n in nodes if draw(st.booleans())}
    return incoming, outgoing, acked, sites, draw(st.integers(1, 4)), votes


@settings(max_examples=1500, deadline=None)
@given(_quorum_cases())
def test_quorum_matches_the_simple_version(
    case: tuple[set[int], set[int], dict[int, int], dict[int, str], int, dict[int, bool]],
) -> None:
    incoming, outgoing, acked, sites, min_sites, votes = case
    assert quorum.committed_index(incoming, acked, sites, min_sites) == quorum.committed_index_simple(
        incoming, acked, sites, min_sites
    )
    assert quorum.joint_committed_index(
        incoming, outgoing, acked, sites, min_sites
    ) == quorum.joint_committed_index_simple(incoming, outgoing, acked, sites, min_sites)
    assert quorum.vote_result(incoming, votes) == quorum.vote_result_simple(incoming, votes)
    assert quorum.joint_vote_result(incoming, outgoing, votes) == quorum.joint_vote_result_simple(
        incoming, outgoing, votes
    )


# --- configuration validation and encodings -----------------------------------------------------------


def test_valid_configurations() -> None:
    validate_conf(conf_of({1: "a"}, min_sites=1))  # the one-node trial
    validate_conf(conf_of({1: "a", 2: "a", 3: "a"}, min_sites=1))  # one site: no site majority rule
    validate_conf(conf_of(SITES3))
    validate_conf(conf_of(SITES5))
    validate_conf(conf_of(SITES5, min_sites=3))
    validate_conf(conf_of({**SITES3, 4: "a"}, learners=[4]))


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        (ConfState(voters=frozenset({1, 2}), sites=((1, "a"),), min_sites=1), "have no site"),
        (
            ConfState(voters=frozenset({1, 2, 3}), learners=frozenset({4}), sites=tuple(SITES3.items()), min_sites=2),
            "have no site",
        ),
        (conf_of({1: "a", 2: "a", 3: "b"}), "holds 2 of the 3 voters"),
        (conf_of({1: "a", 2: "a", 3: "a", 4: "b", 5: "c"}), "holds 3 of the 5 voters"),
        (conf_of(SITES3, min_sites=4), "min_sites is 4"),
        (conf_of({1: "a", 2: "a"}, min_sites=2), "min_sites is 2"),
        (conf_of(SITES3, min_sites=0), "min_sites must be at least 1"),
        (ConfState(min_sites=1), "no voters"),
        (conf_of({**SITES3, 9: "z"}, voters=[1, 2, 3], learners=[]), "not members"),
        (conf_of({1: "a", 2: "b", 2**64: "c"}), "node id must be 1"),
    ],
)
def test_invalid_configurations(conf: ConfState, message: str) -> None:
    with pytest.raises(InvalidConfig, match=message):
        validate_conf(conf)


def test_bootstrap_enforces_validation_and_empty_storage() -> None:
    with pytest.raises(InvalidConfig, match="holds 2 of the 3"):
        bootstrap(MemoryStorage(), conf_of({1: "a", 2: "a", 3: "b"}))
    storage = MemoryStorage()
    bootstrap(storage, conf_of(SITES3))
    with pytest.raises(InvalidArgument, match="empty storage"):
        bootstrap(storage, conf_of(SITES3))


def test_node_refuses_a_stored_invalid_configuration() -> None:
    storage = MemoryStorage()
    bootstrap(storage, conf_of(SITES3))
    storage.set_conf_state(conf_of({1: "a", 2: "a", 3: "b"}))
    with pytest.raises(InvalidConfig):
        RawNode(Config(id=1), storage, random.Random(1))


def test_config_validation() -> None:
    storage = MemoryStorage()
    with pytest.raises(InvalidArgument, match="election_tick"):
        RawNode(Config(id=1, election_tick=2, heartbeat_tick=2), storage, random.Random(1))
    with pytest.raises(InvalidArgument, match="node id"):
        RawNode(Config(id=0), storage, random.Random(1))
    with pytest.raises(InvalidArgument, match="max_inflight_msgs"):
        RawNode(Config(id=1, max_inflight_msgs=0), storage, random.Random(1))


def test_encodings_round_trip() -> None:
    cc = ConfChange((add(4, "site-ü"), remove(2), add(5, "b", learner=True)), auto_leave=False)
    assert decode_conf_change(encode_conf_change(cc)) == cc
    leave = ConfChange((), leave_joint=True)
    assert decode_conf_change(encode_conf_change(leave)) == leave
    joint = next_conf_state(conf_of({**SITES5, 6: "d"}, learners=[6]), ConfChange((add(6), add(1, learner=True))))
    assert joint.learners_next == {1} and joint.auto_leave
    assert decode_conf_state(encode_conf_state(joint)) == joint
    meta = SnapshotMeta(index=12, term=3, conf_state=joint)
    assert decode_snapshot_meta(encode_snapshot_meta(meta)) == meta


@pytest.mark.parametrize("cut", [1, 3, 10])
def test_corrupt_encodings_are_refused(cut: int) -> None:
    data = encode_conf_change(ConfChange((add(4, "d"), remove(2))))
    with pytest.raises(Corruption):
        decode_conf_change(data[:-cut])
    with pytest.raises(Corruption):
        decode_conf_change(data + b"x")
    with pytest.raises(Corruption, match="version"):
        decode_conf_change(b"\x09" + data[1:])
    with pytest.raises(Corruption):
        decode_conf_state(encode_conf_state(conf_of(SITES3))[:-cut])


_ITEMS = st.builds(
    ConfChangeItem,
    st.sampled_from(list(ConfChangeType)),
    st.integers(1, 9),
    st.sampled_from(["", "a", "b", "c", "d"]),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.lists(_ITEMS, min_size=0, max_size=4), st.booleans()), max_size=12))
def test_configuration_changes_keep_the_rules(steps: list[tuple[list[ConfChangeItem], bool]]) -> None:
    conf = conf_of(SITES5)
    for items, auto_leave in steps:
        cc = ConfChange((), leave_joint=True) if not items and conf.voters_outgoing else ConfChange(tuple(items))
        cc = ConfChange(cc.items, leave_joint=cc.leave_joint, auto_leave=auto_leave)
        assert decode_conf_change(encode_conf_change(cc)) == cc
        try:
            new = next_conf_state(conf, cc)
        except InvalidConfig:
            continue
        validate_conf(new)
        assert decode_conf_state(encode_conf_state(new)) == new
        if len(cc.items) == 1:
            assert len(new.voters ^ conf.voters) <= 1 and not new.voters_outgoing
        elif cc.items:
            assert new.voters_outgoing == conf.voters and new.auto_leave == auto_leave
        else:
            assert new.voters == conf.voters and not new.voters_outgoing and not new.learners_next
        conf = new


# --- storage --------------------------------------------------------------------------------------


def test_memory_storage() -> None:
    s = MemoryStorage()
    assert (s.first_index(), s.last_index()) == (1, 0)
    s.append([Entry(1, i, BLOB, b"x" * 10) for i in range(1, 6)])
    assert s.last_index() == 5 and s.term(0) == 0
    assert len(s.entries(1, 6, 2**20)) == 5
    assert len(s.entries(1, 6, 1)) == 1  # at least one entry, even over the size limit
    assert len(s.entries(1, 6, 70)) == 2
    s.append([Entry(2, 4, BLOB), Entry(2, 5, BLOB)])  # a conflicting suffix is replaced
    assert [s.term(i) for i in range(1, 6)] == [1, 1, 1, 2, 2]
    with pytest.raises(InvalidArgument, match="snapshot only covers"):
        s.compact(3)
    s.create_snapshot(3, conf_of(SITES3), b"state")
    s.compact(3)
    assert s.first_index() == 4 and s.term(3) == 1
    with pytest.raises(Compacted):
        s.term(2)
    with pytest.raises(Compacted):
        s.entries(3, 5, 100)
    with pytest.raises(Unavailable):
        s.term(6)
    with pytest.raises(AssertionError, match="gap"):
        s.append([Entry(2, 9, BLOB)])
    snap = Snapshot(SnapshotMeta(10, 4, conf_of(SITES3)), b"later")
    s.apply_snapshot(snap)
    assert (s.first_index(), s.last_index(), s.snapshot()) == (11, 10, snap)
    with pytest.raises(InvalidArgument, match="not newer"):
        s.apply_snapshot(Snapshot(SnapshotMeta(9, 4, conf_of(SITES3))))


# --- elections --------------------------------------------------------------------------------------


def test_one_node_trial_elects_itself_and_commits_only_what_it_persisted() -> None:
    c = Cluster({1: "a"}, min_sites=1)
    node = c.nodes[1]
    node.campaign()
    assert node.role == Role.LEADER  # a quorum of one
    rd = node.ready()
    assert [e.rtype for e in rd.entries] == [NOOP] and rd.must_sync
    # Its own copy is not counted before it is persisted: nothing to apply yet.
    assert rd.committed_entries == [] and node.commit_index == 1
    c.persist(1, rd)
    node.advance(rd)
    assert node.commit_index == 2
    rd = node.ready()
    assert [e.index for e in rd.committed_entries] == [2]
    node.advance(rd)
    c.propose(1, b"hello")
    assert c.payloads(1) == [b"hello"]


def test_election_after_randomized_timeout() -> None:
    c = Cluster(SITES3, pre_vote=False)
    timeouts = {n._randomized_election_timeout for n in c.nodes.values()}
    assert all(10 <= t < 20 for t in timeouts)
    for _ in range(20):
        c.tick()
    leaders = [n for n in c.nodes.values() if n.role == Role.LEADER]
    assert len(leaders) == 1
    assert all(n.leader == leaders[0].id for n in c.nodes.values())


def test_votes_go_only_to_up_to_date_logs() -> None:
    c = Cluster(SITES3, pre_vote=False, check_quorum=False)
    c.elect(1)
    c.isolate(3)
    c.propose(1, b"x")  # 3 misses it
    c.heal()
    c.nodes[3].campaign()
    c.deliver()
    assert c.nodes[3].role != Role.LEADER  # 1 and 2 refuse: their logs are longer
    assert c.nodes[3].term > c.nodes[2].term - 1
    c.tick(30)
    assert any(n.role == Role.LEADER and n.id != 3 for n in c.nodes.values())


def test_one_vote_per_term_and_it_is_synced_before_it_is_sent() -> None:
    c = Cluster(SITES3, pre_vote=False)
    n2 = c.nodes[2]
    n2.step(Message(MessageType.VOTE, to=2, frm=1, term=5, index=1, log_term=1))
    n2.step(Message(MessageType.VOTE, to=2, frm=3, term=5, index=1, log_term=1))
    rd = n2.ready()
    assert rd.hard_state == HardState(term=5, vote=1, commit=1) and rd.must_sync
    answers = [(m.to, m.reject) for m in rd.messages]
    assert answers == [(1, False), (3, True)]


def test_pre_vote_keeps_a_partitioned_node_from_raising_its_term() -> None:
    c = Cluster(SITES3)
    c.elect(1)
    term = c.nodes[1].term
    c.isolate(3)
    c.tick(100)
    assert c.nodes[3].term == term  # pre-votes failed: the term did not move
    assert c.nodes[3].role == Role.PRE_CANDIDATE
    c.heal()
    c.tick(5)
    assert c.nodes[1].role == Role.LEADER and c.nodes[1].term == term  # not disrupted


def test_without_pre_vote_a_rejoining_node_disrupts() -> None:
    c = Cluster(SITES3, pre_vote=False, check_quorum=False)
    c.elect(1)
    term = c.nodes[1].term
    c.isolate(3)
    c.tick(50)
    assert c.nodes[3].term > term + 1
    c.heal()
    c.tick(25)  # 3 ignores the leader's (lower-term) messages and campaigns again
    assert c.nodes[1].term > term  # the disruption pre-vote avoids


def test_check_quorum_makes_an_isolated_leader_step_down() -> None:
    c = Cluster(SITES3)
    c.elect(1)
    c.isolate(1)
    # Between one and two election timeouts: the round in progress still saw everyone active.
    c.tick(20, only=[1])
    assert c.nodes[1].role == Role.FOLLOWER
    with pytest.raises(NotLeader):
        c.nodes[1].propose(BLOB, b"x")


def test_followers_in_lease_ignore_votes() -> None:
    c = Cluster(SITES3)
    c.elect(1)
    term = c.nodes[1].term
    # A node that is not partitioned but campaigns anyway (e.g. a removed node that does not know):
    # followers heard from their leader within the election timeout and ignore it.
    c.nodes[2].step(Message(MessageType.VOTE, to=2, frm=3, term=term + 1, index=100, log_term=term))
    assert c.nodes[2].term == term
    assert not c.nodes[2].has_ready() or all(m.type != MessageType.VOTE_RESPONSE for m in c.nodes[2].ready().messages)


def _ticks_until_leader(c: Cluster, among: set[int], limit: int) -> int | None:
    for n in range(1, limit + 1):
        c.tick(only=among)
        if any(c.nodes[i].role == Role.LEADER for i in among):
            return n
    return None


@pytest.mark.parametrize(
    ("sites", "told", "expected"),
    [
        (SITES3, {2, 3}, 1),  # node 2 (rank 0) campaigns on the next tick; node 3 (rank 1) grants
        (SITES5, {2, 3, 4, 5}, 1),
        # Only some followers told: the others defend the lease of the leader they heard from
        # until it runs out (10 ticks), as without the report.
        (SITES3, {3}, None),
        (SITES5, {4, 5}, None),
    ],
)
def test_followers_told_their_leader_is_down_elect_a_new_one_within_ticks(
    sites: dict[int, str], told: set[int], expected: int | None
) -> None:
    c = Cluster(sites)
    c.elect(1)
    c.propose(1, b"acked")
    term = c.nodes[1].term
    c.down.add(1)  # killed: its connections are refused from now on
    for node in told:
        c.nodes[node].report_peer_down(1)
        assert c.nodes[node].leader == NONE
    others = set(sites) - {1}
    ticks = _ticks_until_leader(c, others, 20)
    if expected is None:
        assert ticks is not None and 10 <= ticks < 20 + 2  # a randomized timeout of 10-19 ticks, then the vote
    else:
        assert ticks == expected
    leader = next(i for i in others if c.nodes[i].role == Role.LEADER)
    assert c.nodes[leader].term == term + 1  # one election, no split vote
    c.propose(leader, b"after")
    assert c.payloads(leader) == [b"acked", b"after"]


def test_without_the_report_the_followers_wait_out_the_election_timeout() -> None:
    c = Cluster(SITES3)
    c.elect(1)
    c.down.add(1)
    ticks = _ticks_until_leader(c, {2, 3}, 40)
    assert ticks is not None and ticks >= 10  # the baseline the report improves on


def test_a_wrong_report_about_a_live_leader_disrupts_nothing() -> None:
    c = Cluster(SITES3)
    c.elect(1)
    term = c.nodes[1].term
    c.nodes[2].report_peer_down(1)  # e.g. one connection reset, the leader is fine
    c.tick(15)
    assert c.nodes[1].role == Role.LEADER and c.nodes[1].term == term  # node 3 refused the pre-vote
    assert c.nodes[2].leader == 1 and c.nodes[2].role == Role.FOLLOWER  # the heartbeats brought it back
    c.propose(1, b"x")
    assert c.payloads(2) == [b"x"]


def test_a_report_about_another_peer_or_from_a_non_follower_changes_nothing() -> None:
    c = Cluster(SITES3)
    c.elect(1)
    c.nodes[2].report_peer_down(3)  # not its leader
    assert c.nodes[2].leader == 1
    c.nodes[1].report_peer_down(2)  # a leader keeps leading; its transport probes the peer
    assert c.nodes[1].role == Role.LEADER
    c.down.add(1)
    c.tick(5, only={2, 3})
    assert all(c.nodes[i].role == Role.FOLLOWER for i in (2, 3))


def test_without_pre_vote_a_report_only_forgets_the_leader() -> None:
    # A real campaign would raise the term and depose a leader that may be alive.
    c = Cluster(SITES3, pre_vote=False)
    c.elect(1)
    term = c.nodes[1].term
    c.nodes[2].report_peer_down(1)
    assert c.nodes[2].leader == NONE
    c.tick(5)
    assert c.nodes[2].leader == 1 and c.nodes[1].term == term


# --- replication and log repair ---------------------------------------------------------------------


def test_log_repair_after_a_partition() -> None:
    c = Cluster(SITES5, check_quorum=False)
    c.elect(1)
    c.propose(1, b"a")
    # The leader is cut off with node 2; what it appends now can never commit.
    for x in (1, 2):
        for y in (3, 4, 5):
            c.cut |= {(x, y), (y, x)}
    for i in range(5):
        c.nodes[1].propose(BLOB, b"lost%d" % i)
    c.deliver()
    assert c.nodes[2].last_index == c.nodes[1].last_index  # replicated, not committed
    c.elect(3)
    c.propose(3, b"b")
    c.propose(3, b"c")
    c.heal()
    c.tick(3)
    assert c.nodes[1].role == Role.FOLLOWER
    logs = {n: c.log_of(n)[-4:] for n in c.nodes}
    assert len(set(map(tuple, logs.values()))) == 1, logs
    for n in c.nodes:
        assert c.payloads(n) == [b"a", b"b", b"c"]


def test_follower_never_truncates_committed_entries() -> None:
    storage = MemoryStorage()
    storage.append([Entry(1, i, BLOB) for i in range(1, 4)])
    log = _RaftLog(storage)
    log.committed = 3
    with pytest.raises(AssertionError, match="conflicts with committed"):
        log.maybe_append(1, 1, 3, (Entry(2, 2, BLOB),))


def test_follower_commit_is_capped_at_the_last_new_entry() -> None:
    # Our log is longer than what the leader sent, and the tail is stale: the leader's commit
    # index must not make us commit entries it did not vouch for.
    storage = MemoryStorage()
    storage.append([Entry(1, 1, BLOB), Entry(1, 2, BLOB), Entry(1, 3, BLOB), Entry(1, 4, BLOB)])
    log = _RaftLog(storage)
    assert log.maybe_append(1, 1, 10, (Entry(1, 2, BLOB),)) == 2
    assert log.committed == 2


def test_leader_only_commits_entries_of_its_term_by_counting() -> None:
    # Raft paper, figure 8: an entry of an older term stored on a majority is not committed until
    # an entry of the leader's term is (else a node with a later term could still overwrite it).
    c = Cluster(SITES3, pre_vote=False, check_quorum=False, max_size_per_msg=1)
    c.elect(1)  # term 2
    c.isolate(1)
    c.nodes[1].propose(BLOB, b"old")  # term 2, on node 1 only
    c.deliver()
    old_index = c.nodes[1].last_index
    # Node 2 leads term 3 with 3's vote; its noop (at old_index) never leaves it.
    c.drop = lambda m: m.type == MessageType.APPEND and m.frm == 2 and bool(m.entries)
    c.elect(2)
    assert c.nodes[2].term_at(old_index) == 3
    c.isolate(2)
    c.cut -= {(1, 3), (3, 1)}
    # Node 1 restarts and leads term 4 with 3's vote (its term-3 campaign loses: 3 voted for 2) and
    # replicates "old"; once "old" reached 3, its own noop is held back.
    old_sent: list[bool] = []

    def hold_noop(m: Message) -> bool:
        if m.type != MessageType.APPEND:
            return False
        if any(e.payload == b"old" for e in m.entries):
            old_sent.append(True)
        return bool(old_sent) and any(e.rtype == NOOP and e.term == 4 for e in m.entries)

    c.drop = hold_noop
    c.restart(1)
    c.nodes[1].campaign()
    c.deliver()
    c.elect(1)
    leader = c.nodes[1]
    assert leader.term == 4 and leader.term_at(old_index) == 2
    assert leader.progress()[3].match == old_index  # a majority (1 and 3) holds "old"...
    assert leader.commit_index < old_index  # ...and it is not committed
    c.drop = lambda m: False
    c.tick(2, only=[1, 3])
    assert leader.commit_index == leader.last_index  # the term-4 noop commits both
    assert c.payloads(1) == [b"old"]


def test_inflight_window_and_message_size_limit() -> None:
    c = Cluster(SITES3, max_inflight_msgs=2, max_size_per_msg=100)
    c.elect(1)
    c.isolate(2)
    c.isolate(3)
    c.sent.clear()
    leader = c.nodes[1]
    for i in range(6):
        leader.propose(BLOB, b"%d" % i * 60)  # ~84-byte entries: one per message
    c.deliver()
    to2 = [m for m in c.sent if m.to == 2 and m.type == MessageType.APPEND]
    assert len(to2) == 2, "at most max_inflight_msgs appends in flight"
    assert all(len(m.entries) == 1 for m in to2)
    assert leader.progress()[2].inflight == 2
    c.heal()
    c.tick(4)
    assert leader.commit_index == leader.last_index


def test_uncommitted_bytes_limit() -> None:
    c = Cluster(SITES3, max_uncommitted_bytes=100)
    c.elect(1)
    c.isolate(1)
    c.nodes[1].propose(BLOB, b"x" * 150)  # the first one always fits
    with pytest.raises(ProposalDropped, match="waiting to commit"):
        c.nodes[1].propose(BLOB, b"y")


def test_follower_acknowledges_only_in_the_ready_that_persists() -> None:
    c = Cluster(SITES3)
    c.elect(1)
    c.nodes[1].propose(BLOB, b"x")
    c.process(1)
    append = next(m for m in c.queue if m.to == 2 and m.type == MessageType.APPEND and m.entries)
    c.queue.clear()
    n2 = c.nodes[2]
    n2.step(append)
    rd = n2.ready()
    assert rd.entries and rd.must_sync
    assert any(m.type == MessageType.APPEND_RESPONSE and m.index == rd.entries[-1].index for m in rd.messages)


def test_proposals_on_followers_name_the_leader() -> None:
    c = Cluster(SITES3)
    with pytest.raises(NotLeader) as no_leader:
        c.nodes[2].propose(BLOB, b"x")
    assert no_leader.value.leader_hint == 0
    c.elect(1)
    with pytest.raises(NotLeader) as hint:
        c.nodes[2].propose(BLOB, b"x")
    assert hint.value.leader_hint == 1
    with pytest.raises(NotLeader):
        c.nodes[3].propose_conf_change(ConfChange((add(4, "d", learner=True),)))


def test_restart_keeps_term_vote_and_log() -> None:
    c = Cluster(SITES3)
    c.elect(1)
    c.propose(1, b"x")
    term, last = c.nodes[2].term, c.nodes[2].last_index
    n2 = c.restart(2)
    assert (n2.term, n2.vote, n2.last_index) == (term, 1, last)
    assert n2.applied_index == c.applied[2][-1].index
    c.tick(3)
    c.propose(1, b"y")
    assert c.payloads(2)[-1] == b"y"


# --- snapshots --------------------------------------------------------------------------------------


def _compact(c: Cluster, node: int) -> None:
    raw = c.nodes[node]
    c.storage[node].create_snapshot(raw.applied_index, raw.conf_state, b"state@%d" % raw.applied_index)
    c.storage[node].compact(raw.applied_index)


def test_snapshot_to_a_lagging_follower() -> None:
    c = Cluster(SITES3)
    c.elect(1)
    c.isolate(3)
    for i in range(10):
        c.propose(1, b"%d" % i)
    _compact(c, 1)
    c.heal()
    received: list[Snapshot] = []
    persist = c.persist

    def spy(node: int, rd: Ready) -> None:
        if node == 3 and rd.snapshot is not None:
            received.append(rd.snapshot)
        persist(node, rd)

    c.persist = spy  # type: ignore[method-assign]
    c.tick(3)
    assert [s.meta.index for s in received] == [c.storage[1].snapshot().meta.index]
    assert received[0].data == b"state@%d" % received[0].meta.index
    c.propose(1, b"after")
    assert c.nodes[3].applied_index == c.nodes[1].applied_index
    assert c.payloads(3) == [b"after"]  # the rest came inside the snapshot
    assert c.nodes[1].progress()[3].state == ProgressState.REPLICATE


def test_lost_snapshot_is_resent_after_the_transport_reports_it() -> None:
    c = Cluster(SITES3)
    c.elect(1)
    c.isolate(3)
    for i in range(5):
        c.propose(1, b"%d" % i)
    _compact(c, 1)
    c.heal()
    c.drop = lambda m: m.type == MessageType.SNAPSHOT
    c.tick(2)
    assert c.nodes[1].progress()[3].state == ProgressState.SNAPSHOT
    c.nodes[1].report_snapshot(3, success=False)
    c.drop = lambda m: False
    c.tick(3)
    assert c.nodes[3].applied_index == c.nodes[1].applied_index


# --- learners and membership ------------------------------------------------------------------------


def test_learner_replicates_but_never_votes_or_counts() -> None:
    c = Cluster({**SITES3, 4: "a"}, learners=[4])
    c.elect(1)
    c.propose(1, b"x")
    assert c.payloads(4) == [b"x"]
    c.isolate(2)
    c.isolate(3)
    c.cut -= {(1, 4), (4, 1)}
    c.nodes[1].propose(BLOB, b"y")
    c.deliver()
    assert c.nodes[4].last_index == c.nodes[1].last_index
    assert b"y" not in c.payloads(1)  # the learner's copy does not count
    c.tick(100, only=[4])
    assert c.nodes[4].role == Role.FOLLOWER and c.nodes[4].term == c.nodes[1].term  # never campaigns


def _change(c: Cluster, leader: int, cc: ConfChange) -> None:
    c.nodes[leader].propose_conf_change(cc)
    c.deliver()


def test_single_voter_changes_add_promote_remove() -> None:
    c = Cluster(SITES3)
    c.elect(1)
    c.add_node(4)
    _change(c, 1, ConfChange((add(4, "d", learner=True),)))
    c.tick(3)
    assert c.nodes[1].conf_state.learners == {4}
    assert c.nodes[4].conf_state.learners == {4}  # it learned through the snapshot and the log
    _change(c, 1, ConfChange((add(4),)))
    assert c.nodes[1].conf_state.voters == {1, 2, 3, 4}
    _change(c, 1, ConfChange((remove(3),)))
    conf = c.nodes[1].conf_state
    assert conf.voters == {1, 2, 4} and dict(conf.sites) == {1: "a", 2: "b", 4: "d"}
    c.isolate(2)
    c.propose(1, b"x")  # commits with 1 and 4 (sites a and d)
    assert b"x" in c.payloads(4)


def test_one_change_pending_at_a_time() -> None:
    c = Cluster(SITES3)
    c.elect(1)
    c.isolate(1)
    c.nodes[1].propose_conf_change(ConfChange((add(4, "d", learner=True),)))
    with pytest.raises(ProposalDropped, match="not applied yet"):
        c.nodes[1].propose_conf_change(ConfChange((add(5, "e", learner=True),)))


def test_new_leader_changes_nothing_before_committing_in_its_term() -> None:
    c = Cluster(SITES3)
    c.drop = lambda m: m.type == MessageType.APPEND_RESPONSE  # its noop never commits
    c.nodes[1].campaign()
    c.deliver()
    assert c.nodes[1].role == Role.LEADER and c.nodes[1].commit_index < c.nodes[1].last_index
    with pytest.raises(ProposalDropped, match="not committed an entry of its term"):
        c.nodes[1].propose_conf_change(ConfChange((add(4, "d", learner=True),)))
    c.drop = lambda m: False
    c.tick(2)
    c.nodes[1].propose_conf_change(ConfChange((add(4, "d", learner=True),)))


def test_invalid_change_is_refused_without_effect() -> None:
    c = Cluster(SITES5)
    c.elect(1)
    before = (c.nodes[1].last_index, c.nodes[1].conf_state)
    bad = [
        (ConfChange((add(6, "a"), add(7, "a"))), "holds 4 of the 7"),  # a majority in site a
        (ConfChange((add(6),)), "site is required"),
        (ConfChange((remove(9),)), "not a member"),
        (ConfChange((add(1),)), "already a voter"),
        (ConfChange((add(3, "z"),)), "cannot move"),
        (ConfChange((), leave_joint=True), "not in a joint"),
        (ConfChange(()), "at least one item"),
        (ConfChange((remove(1), remove(1))), "each node once"),
        (ConfChange((add(2**64, "c"),)), r"node id must be 1\.\.18446744073709551615"),  # was struct.error
    ]
    for cc, message in bad:
        with pytest.raises(InvalidConfig, match=message):
            c.nodes[1].propose_conf_change(cc)
        assert (c.nodes[1].last_index, c.nodes[1].conf_state) == before
    # Removing site c's only node leaves a:2 b:2: valid for min_sites=2, not for min_sites=3.
    c3 = Cluster(SITES5, min_sites=3)
    c3.elect(1)
    with pytest.raises(InvalidConfig, match="span 2 site"):
        c3.nodes[1].propose_conf_change(ConfChange((remove(5),)))


def test_joint_change_with_auto_leave() -> None:
    c = Cluster(SITES3)
    c.elect(1)
    for n, site in ((4, "d"), (5, "e")):
        c.add_node(n)
        _change(c, 1, ConfChange((add(n, site, learner=True),)))
    c.tick(3)
    cc = ConfChange((add(4), add(5), remove(2), remove(3)))
    c.nodes[1].propose_conf_change(cc)
    c.process(1)
    c.queue.clear()
    # Not yet applied: the configuration is unchanged until the entry is applied.
    assert c.nodes[1].conf_state.voters == {1, 2, 3}
    with pytest.raises(ProposalDropped, match="not applied yet"):
        c.nodes[1].propose_conf_change(ConfChange((remove(4),)))
    c.tick(2)
    conf = c.nodes[1].conf_state
    assert conf.voters == {1, 4, 5} and not conf.voters_outgoing  # entered, then left automatically
    ccs = [decode_conf_change(e.payload) for e in c.applied[1] if e.rtype == CONFIG]
    assert ccs[-2] == cc and ccs[-1].leave_joint
    assert all(c.nodes[n].conf_state == conf for n in (1, 4, 5))


def test_joint_change_with_explicit_leave_and_demotion() -> None:
    c = Cluster(SITES5)
    c.elect(1)
    c.add_node(6)
    _change(c, 1, ConfChange((add(6, "d", learner=True),)))
    c.tick(3)
    _change(c, 1, ConfChange((add(6), add(2, learner=True)), auto_leave=False))
    conf = c.nodes[1].conf_state
    assert conf.voters == {1, 3, 4, 5, 6} and conf.voters_outgoing == {1, 2, 3, 4, 5}
    assert conf.learners_next == {2} and not conf.auto_leave
    with pytest.raises(InvalidConfig, match="leave it"):
        c.nodes[1].propose_conf_change(ConfChange((remove(3),)))
    # Commits need both halves: with 3, 4 and 5 cut off, neither half has a majority.
    for n in (3, 4, 5):
        c.isolate(n)
    c.nodes[1].propose(BLOB, b"stuck")
    c.deliver()
    assert b"stuck" not in c.payloads(1)
    c.heal()
    c.tick(2)
    _change(c, 1, ConfChange((), leave_joint=True))
    conf = c.nodes[1].conf_state
    assert conf.voters == {1, 3, 4, 5, 6} and conf.learners == {2} and not conf.voters_outgoing


def test_removed_leader_steps_down() -> None:
    c = Cluster(SITES5)
    c.elect(1)
    _change(c, 1, ConfChange((remove(1),)))
    assert c.nodes[1].role == Role.FOLLOWER
    c.tick(30, only=[2, 3, 4, 5])
    assert any(c.nodes[n].role == Role.LEADER for n in (2, 3, 4, 5))
    c.tick(30, only=[1])
    assert c.nodes[1].role == Role.FOLLOWER  # no longer a member: never campaigns


# --- leadership transfer and reads --------------------------------------------------------------------


def test_leadership_transfer() -> None:
    c = Cluster(SITES3)
    c.elect(1)
    c.isolate(3)
    c.propose(1, b"x")
    c.heal()
    c.nodes[1].transfer_leadership(3)  # 3 lags: it is caught up first, then told to campaign
    with pytest.raises(ProposalDropped, match="transferred"):
        c.nodes[1].propose(BLOB, b"y")
    c.deliver()
    assert c.nodes[3].role == Role.LEADER and c.nodes[1].role == Role.FOLLOWER
    c.propose(3, b"z")
    assert c.payloads(1) == [b"x", b"z"]


def test_leadership_transfer_times_out_and_refuses_learners() -> None:
    c = Cluster({**SITES3, 4: "a"}, learners=[4])
    c.elect(1)
    with pytest.raises(InvalidArgument, match="not a voter"):
        c.nodes[1].transfer_leadership(4)
    c.down.add(3)
    c.nodes[1].transfer_leadership(3)
    assert c.nodes[1].lead_transferee == 3
    c.tick(10, only=[1, 2])
    assert c.nodes[1].lead_transferee == 0 and c.nodes[1].role == Role.LEADER
    c.propose(1, b"ok")


def test_read_index_on_leader_and_follower() -> None:
    c = Cluster(SITES3)
    c.elect(1)
    c.propose(1, b"x")
    c.nodes[1].read_index(b"r1")
    assert c.read_states[1] == []  # not before a heartbeat round confirmed leadership
    c.deliver()
    assert c.read_states[1] == [ReadState(index=c.nodes[1].commit_index, context=b"r1")]
    c.nodes[2].read_index(b"r2")
    c.deliver()
    assert c.read_states[2] == [ReadState(index=c.nodes[1].commit_index, context=b"r2")]


def test_read_index_on_a_deposed_leader_never_answers() -> None:
    c = Cluster(SITES3, check_quorum=False)
    c.elect(1)
    c.isolate(1)
    c.nodes[1].read_index(b"stale")
    c.deliver()
    c.elect(2)
    c.propose(2, b"new")
    c.tick(5, only=[1])
    assert c.read_states[1] == []


def test_read_index_waits_for_the_new_leaders_first_commit() -> None:
    c = Cluster(SITES3, check_quorum=False)
    c.elect(1)
    c.drop = lambda m: m.type == MessageType.APPEND_RESPONSE
    c.nodes[2].campaign()
    c.deliver()
    leader = c.nodes[2]
    assert leader.role == Role.LEADER and leader.commit_index < leader.last_index
    leader.read_index(b"r")
    c.deliver()
    assert c.read_states[2] == []
    c.drop = lambda m: False
    c.tick(2)
    assert [r.context for r in c.read_states[2]] == [b"r"]
    assert c.read_states[2][0].index >= leader.last_index - 1


def test_a_read_a_follower_forwarded_and_cancelled_is_never_answered() -> None:
    # The follower used to turn any answer from its leader into a ReadState, cancelled or not.
    c = Cluster(SITES3)
    c.elect(1)
    c.propose(1, b"x")
    follower = c.nodes[2]
    follower.read_index(b"given-up")
    follower.read_index(b"kept")
    follower.cancel_read(b"given-up")
    c.deliver()
    assert [r.context for r in c.read_states[2]] == [b"kept"]
    # An answer for a read it never asked for (or one answered already) is dropped too.
    follower.step(Message(MessageType.READ_INDEX_RESPONSE, to=2, frm=1, term=follower.term, index=1, context=b"kept"))
    follower.step(Message(MessageType.READ_INDEX_RESPONSE, to=2, frm=1, term=follower.term, index=1, context=b"other"))
    c.deliver()
    assert [r.context for r in c.read_states[2]] == [b"kept"]


def test_read_index_without_leader_raises() -> None:
    c = Cluster(SITES3)
    with pytest.raises(NotLeader):
        c.nodes[1].read_index(b"r")


# --- the site-aware commit rule -------------------------------------------------------------------


def test_site_aware_commit_five_nodes_221() -> None:
    # Sites: 1,2 in a; 3,4 in b; 5 in c. Leader 1. Acknowledgements from the two nodes of site a
    # only (the leader and 2) do not commit; one more from another site does.
    c = Cluster(SITES5)
    c.elect(1)
    for n in (3, 4, 5):
        c.isolate(n)
    c.cut -= {(1, 2), (2, 1)}
    c.nodes[1].propose(BLOB, b"x")
    c.deliver()
    leader = c.nodes[1]
    assert leader.progress()[2].match == leader.last_index  # site a holds it: not enough
    assert leader.commit_index < leader.last_index
    c.cut -= {(1, 5), (5, 1)}
    c.tick(2)
    assert leader.commit_index == leader.last_index  # a, a, c: a majority in two sites


def test_site_aware_commit_with_min_sites_three() -> None:
    # With min_sites=3, a majority in two sites is not enough: node 5 (the only one in site c)
    # must hold an entry for it to commit.
    c = Cluster(SITES5, min_sites=3)
    c.elect(1)
    c.isolate(5)
    c.nodes[1].propose(BLOB, b"x")
    c.deliver()
    leader = c.nodes[1]
    assert all(leader.progress()[n].match == leader.last_index for n in (2, 3, 4))
    assert leader.commit_index < leader.last_index
    c.heal()
    c.tick(2)
    assert leader.commit_index == leader.last_index
    assert c.payloads(5) == [b"x"]


def test_elections_use_plain_majorities_under_min_sites_three() -> None:
    c = Cluster(SITES5, min_sites=3)
    c.isolate(5)
    c.elect(1)  # votes from a, a, b: fine, elections need no site spread


# --- determinism ----------------------------------------------------------------------------------


def test_same_seed_same_behaviour() -> None:
    def run(seed: int) -> list[tuple[int, int, int, int]]:
        c = Cluster(SITES5, seed=seed)
        c.tick(40)
        c.propose(next(n.id for n in c.nodes.values() if n.role == Role.LEADER), b"x")
        return [(n.term, n.leader, n.commit_index, n.last_index) for n in c.nodes.values()]

    assert run(1) == run(1)
    assert {tuple(run(seed)) for seed in range(8)} != {tuple(run(1))}  # the seed matters


def _x_unheard_of_at_3() -> tuple[Cluster, int]:
    """Node 1 leads; entry x (payload b"x") reaches node 3, but no news that it committed does."""
    c = Cluster(SITES3, check_quorum=False)
    c.elect(1)
    c.drop = lambda m: m.to == 3 and (m.type == MessageType.HEARTBEAT
                                      or (m.type == MessageType.APPEND and not m.entries))
    c.propose(1, b"x")
    return c, c.nodes[1].last_index


def test_a_vote_refusal_teaches_the_candidate_what_is_committed() -> None:
    # Node 3 holds entry x but never heard that it committed; node 2 knows. Node 2 refuses node
    # 3's pre-vote (its log is newer) and says that it is committed up to x (term t): node 3's
    # entry x has term t, so its log up to x is node 2's, and it commits and applies x.
    c, x = _x_unheard_of_at_3()
    c.cut.add((1, 3))
    c.propose(1, b"y")
    assert c.nodes[3].last_index == x and c.nodes[3].commit_index < x <= c.nodes[2].commit_index
    assert c.payloads(3) == []
    c.nodes[3].campaign()
    c.deliver()
    assert c.nodes[3].commit_index == x and c.payloads(3) == [b"x"]
    refusal = next(m for m in c.sent if m.frm == 2 and m.to == 3 and m.type == MessageType.PRE_VOTE_RESPONSE)
    assert refusal.reject and (refusal.commit, refusal.log_term) == (x, c.nodes[2].term_at(x))


def test_a_vote_refusal_whose_entry_we_do_not_hold_teaches_nothing() -> None:
    c, x = _x_unheard_of_at_3()
    node = c.nodes[3]
    before = node.commit_index
    assert before < x
    term = node.term_at(x)
    for commit, log_term in ((x, term + 1), (x + 1, term)):  # another entry there; beyond our log
        node.step(Message(MessageType.PRE_VOTE_RESPONSE, to=3, frm=2, term=node.term, reject=True,
                          commit=commit, log_term=log_term))
        assert node.commit_index == before


@pytest.mark.parametrize("stage", [Role.PRE_CANDIDATE, Role.CANDIDATE])
def test_a_node_removed_during_its_election_steps_down_and_never_leads(stage: Role) -> None:
    # Simulator seed 7006916: node 5 began an election, then applied the configuration that
    # removed it; the remaining voters granted it their votes (they do not check membership), and
    # a node outside the configuration became leader. Now it steps down as the change applies, and
    # grants arriving afterwards change nothing.
    c = Cluster(SITES5, check_quorum=False, pre_vote=stage == Role.PRE_CANDIDATE)
    c.elect(1)
    node = c.nodes[5]
    node.campaign()
    assert node.role == stage
    term = node.term
    node.apply_conf_change(ConfChange((remove(5),)))
    assert node.role == Role.FOLLOWER and node.term == term
    grant = MessageType.PRE_VOTE_RESPONSE if stage == Role.PRE_CANDIDATE else MessageType.VOTE_RESPONSE
    for voter in (1, 2, 3, 4):
        node.step(Message(grant, to=5, frm=voter, term=term + (stage == Role.PRE_CANDIDATE), reject=False))
    assert node.role != Role.LEADER
