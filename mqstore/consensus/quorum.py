"""Quorum arithmetic: which index is committed, who won an election.

Two rules, deliberately different:

- **Commit** (``committed_index``): an index is committed when the voters that durably hold it
  (acknowledged it after persisting it) are a majority AND sit in at least ``min_sites`` distinct
  sites. A site-aware rule protects acknowledged mail against the loss of a whole site.
- **Election and leadership** (``vote_result``): plain majorities. That is safe because every
  commit quorum is in particular a majority, so every election quorum intersects every commit
  quorum (the Raft argument is unchanged).

In a joint configuration both halves must agree: the committed index is the smaller of the two,
an election is won only when both halves granted it.

The ``*_simple`` functions compute the same answers by brute force over subsets of voters. They
are a second, obviously-correct implementation that tests (hypothesis) and the simulator's
invariant checks compare against: a bug would have to be made twice, differently, to go unseen.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from enum import IntEnum

from mqstore.consensus.types import NodeId

#: What an empty voter set "commits": no constraint at all, so that in a joint configuration with
#: an empty outgoing half only the incoming half decides. Never used as a real index (the core
#: caps it at its last index, and a configuration with no voters is refused by validation).
NO_LIMIT = 2**64 - 1

#: Voters one brute-force check enumerates subsets of (2**n subsets): the simple version is for
#: tests and the simulator, never for production paths.
SIMPLE_VOTERS_MAX = 16


class VoteResult(IntEnum):
    PENDING = 1  # neither won nor lost yet: some voters have not answered
    LOST = 2
    WON = 3


def majority(voter_count: int) -> int:
    """Smallest number of voters that is more than half of ``voter_count``."""
    assert voter_count >= 0
    return voter_count // 2 + 1


def committed_index(
    voters: Collection[NodeId], acked: Mapping[NodeId, int], sites: Mapping[NodeId, str], min_sites: int
) -> int:
    """Largest index held by a majority of ``voters`` spanning at least ``min_sites`` sites.

    ``acked[v]`` is the highest index voter ``v`` durably holds (missing means 0); ``sites[v]`` is
    its site. Returns ``NO_LIMIT`` for an empty voter set and 0 when nothing qualifies.
    """
    if not voters:
        return NO_LIMIT
    assert min_sites >= 1, min_sites
    # Walk the voters from the highest acknowledged index down. After k voters, the k seen so
    # far all hold at least the index of the k-th: the first k that is a majority spanning enough
    # sites gives the answer. (With ties it is still right: every voter holding that index sorts
    # before every voter that does not, so the optimal quorum is a prefix of this order.)
    ordered = sorted(((acked.get(v, 0), v) for v in voters), reverse=True)
    need = majority(len(ordered))
    seen_sites: set[str] = set()
    for k, (index, voter) in enumerate(ordered, start=1):
        seen_sites.add(sites[voter])
        if k >= need and len(seen_sites) >= min_sites:
            return index
    return 0


def joint_committed_index(
    incoming: Collection[NodeId],
    outgoing: Collection[NodeId],
    acked: Mapping[NodeId, int],
    sites: Mapping[NodeId, str],
    min_sites: int,
) -> int:
    """``committed_index`` of a (possibly joint) configuration: both halves must hold it."""
    return min(
        committed_index(incoming, acked, sites, min_sites), committed_index(outgoing, acked, sites, min_sites)
    )


def vote_result(voters: Collection[NodeId], votes: Mapping[NodeId, bool]) -> VoteResult:
    """Outcome of an election (or any majority poll) among ``voters``; ``votes`` maps a voter to
    its answer, missing means no answer yet. Votes of non-voters are ignored. An empty voter set
    wins (it is the absent half of a non-joint configuration)."""
    if not voters:
        return VoteResult.WON
    granted = missing = 0
    for v in voters:
        answer = votes.get(v)
        if answer is None:
            missing += 1
        elif answer:
            granted += 1
    need = majority(len(voters))
    if granted >= need:
        return VoteResult.WON
    if granted + missing >= need:
        return VoteResult.PENDING
    return VoteResult.LOST


def joint_vote_result(
    incoming: Collection[NodeId], outgoing: Collection[NodeId], votes: Mapping[NodeId, bool]
) -> VoteResult:
    """``vote_result`` of a (possibly joint) configuration: won only if both halves won, lost as
    soon as one half lost."""
    a = vote_result(incoming, votes)
    b = vote_result(outgoing, votes)
    if a == b:
        return a
    if VoteResult.LOST in (a, b):
        return VoteResult.LOST
    return VoteResult.PENDING


# --- the simple second implementation -----------------------------------------------------------


def committed_index_simple(
    voters: Collection[NodeId], acked: Mapping[NodeId, int], sites: Mapping[NodeId, str], min_sites: int
) -> int:
    """Same answer as ``committed_index``, by trying every subset of voters: the best commit
    quorum is the qualifying subset whose lowest acknowledged index is highest."""
    if not voters:
        return NO_LIMIT
    members = sorted(voters)
    assert len(members) <= SIMPLE_VOTERS_MAX, "brute force is for small configurations"
    best = 0
    for mask in range(1, 1 << len(members)):
        subset = [members[i] for i in range(len(members)) if mask >> i & 1]
        if 2 * len(subset) <= len(members):
            continue  # not a majority
        if len({sites[v] for v in subset}) < min_sites:
            continue  # too few sites
        best = max(best, min(acked.get(v, 0) for v in subset))
    return best


def joint_committed_index_simple(
    incoming: Collection[NodeId],
    outgoing: Collection[NodeId],
    acked: Mapping[NodeId, int],
    sites: Mapping[NodeId, str],
    min_sites: int,
) -> int:
    return min(
        committed_index_simple(incoming, acked, sites, min_sites),
        committed_index_simple(outgoing, acked, sites, min_sites),
    )


def vote_result_simple(voters: Collection[NodeId], votes: Mapping[NodeId, bool]) -> VoteResult:
    """Same answer as ``vote_result``: won if the yes-votes are a majority; lost if even counting
    every missing answer as yes they could not be."""
    members = set(voters)
    if not members:
        return VoteResult.WON
    yes = {v for v in members if votes.get(v) is True}
    maybe = {v for v in members if v not in votes}
    if 2 * len(yes) > len(members):
        return VoteResult.WON
    if 2 * (len(yes) + len(maybe)) > len(members):
        return VoteResult.PENDING
    return VoteResult.LOST


def joint_vote_result_simple(
    incoming: Collection[NodeId], outgoing: Collection[NodeId], votes: Mapping[NodeId, bool]
) -> VoteResult:
    results = {vote_result_simple(incoming, votes), vote_result_simple(outgoing, votes)}
    if results == {VoteResult.WON}:
        return VoteResult.WON
    if VoteResult.LOST in results:
        return VoteResult.LOST
    return VoteResult.PENDING
