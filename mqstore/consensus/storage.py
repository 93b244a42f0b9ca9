"""The core's view of durable storage, and an in-memory implementation for tests and the simulator.

The core only *reads* storage (``Storage``); the driver writes to it what a ``Ready`` says, in
the order the ``Ready`` says, and syncs when ``must_sync`` is set. Whatever is in storage when a
``RawNode`` is built is taken to be durable.

Log layout (as in etcd-io/raft): entries ``[first_index, last_index]`` are readable; the entry
just before ``first_index`` (the compaction point, covered by a snapshot) still has a known term,
so ``term(first_index - 1)`` answers. An empty log has ``first_index() == 1`` and
``last_index() == 0``.
"""

from __future__ import annotations

import itertools
from typing import Protocol

from mqstore.consensus.types import (
    Compacted,
    ConfState,
    Entry,
    HardState,
    Snapshot,
    SnapshotMeta,
    Unavailable,
)
from mqstore.errors import InvalidArgument

_NOOP = 1  # RecordType.NOOP; the dummy entry below only carries an (index, term)


class Storage(Protocol):
    """What the consensus core reads. Implementations raise ``Compacted`` for an index below the
    compaction point and ``Unavailable`` for an index above ``last_index()``."""

    def initial_state(self) -> tuple[HardState, ConfState]:
        """The persisted hard state and the configuration as of the driver's applied index."""
        ...

    def entries(self, lo: int, hi: int, max_size: int) -> list[Entry]:
        """Entries ``[lo, hi)``, stopping before ``max_size`` bytes (``Entry.size()``) are
        exceeded, but always at least one entry when the range is not empty."""
        ...

    def term(self, index: int) -> int:
        """Term of the entry at ``index``; valid for ``first_index() - 1 <= index <= last_index()``."""
        ...

    def first_index(self) -> int: ...

    def last_index(self) -> int: ...

    def snapshot(self) -> Snapshot:
        """The latest snapshot. It must cover the compaction point (``meta.index >=
        first_index() - 1``) so that a follower that needs compacted entries can be served.
        ``Unavailable`` means "not ready yet, try later"."""
        ...


def limit_size(entries: list[Entry], max_size: int) -> list[Entry]:
    """The longest prefix of ``entries`` within ``max_size`` bytes, but at least one entry."""
    total = 0
    for i, e in enumerate(entries):
        total += e.size()
        if total > max_size and i > 0:
            return entries[:i]
    return entries


class MemoryStorage:
    """``Storage`` in memory, plus the writes a driver makes. Not thread-safe (nothing here is)."""

    def __init__(self) -> None:
        self._hard_state = HardState()
        self._conf_state = ConfState()
        self._snapshot = Snapshot(SnapshotMeta(index=0, term=0, conf_state=ConfState()))
        # _entries[0] is a dummy holding the compaction point's (index, term); real entries follow.
        self._entries: list[Entry] = [Entry(term=0, index=0, rtype=_NOOP)]

    # --- Storage ----------------------------------------------------------------------------------

    def initial_state(self) -> tuple[HardState, ConfState]:
        return self._hard_state, self._conf_state

    def entries(self, lo: int, hi: int, max_size: int) -> list[Entry]:
        offset = self._entries[0].index
        if lo <= offset:
            raise Compacted(f"entries from {lo}: compacted up to {offset}")
        if hi > self.last_index() + 1:
            raise Unavailable(f"entries up to {hi - 1}: last index is {self.last_index()}")
        if lo >= hi:
            return []
        return limit_size(self._entries[lo - offset : hi - offset], max_size)

    def term(self, index: int) -> int:
        offset = self._entries[0].index
        if index < offset:
            raise Compacted(f"term of {index}: compacted up to {offset}")
        if index - offset >= len(self._entries):
            raise Unavailable(f"term of {index}: last index is {self.last_index()}")
        return self._entries[index - offset].term

    def first_index(self) -> int:
        return self._entries[0].index + 1

    def last_index(self) -> int:
        return self._entries[0].index + len(self._entries) - 1

    def snapshot(self) -> Snapshot:
        return self._snapshot

    # --- writes (the driver's) ---------------------------------------------------------------------

    def set_hard_state(self, hard_state: HardState) -> None:
        self._hard_state = hard_state

    def set_conf_state(self, conf_state: ConfState) -> None:
        """The configuration as of the applied index (the driver persists it with what it applies)."""
        self._conf_state = conf_state

    def append(self, entries: list[Entry]) -> None:
        """Append ``entries``; the stored suffix from ``entries[0].index`` on is replaced (it is the
        suffix that conflicts with them: the core only hands out entries from the first index where
        its log differs from what it persisted). Entries below the compaction point are skipped."""
        if not entries:
            return
        for a, b in itertools.pairwise(entries):
            assert b.index == a.index + 1, f"entries not contiguous: {a.index} then {b.index}"
        first = self.first_index()
        if entries[-1].index < first:
            return  # all of them are already compacted (covered by the snapshot)
        if entries[0].index < first:
            entries = entries[first - entries[0].index :]
        position = entries[0].index - self._entries[0].index
        assert position <= len(self._entries), (
            f"gap in the log: appending at {entries[0].index} after last index {self.last_index()}"
        )
        del self._entries[position:]
        self._entries.extend(entries)

    def apply_snapshot(self, snapshot: Snapshot) -> None:
        """Replace the whole log by ``snapshot`` (a follower installing the leader's snapshot)."""
        meta = snapshot.meta
        if meta.index <= self._snapshot.meta.index:
            raise InvalidArgument(f"snapshot at {meta.index} is not newer than {self._snapshot.meta.index}")
        self._snapshot = snapshot
        self._entries = [Entry(term=meta.term, index=meta.index, rtype=_NOOP)]
        self._conf_state = meta.conf_state

    def create_snapshot(self, index: int, conf_state: ConfState, data: bytes) -> Snapshot:
        """Record a snapshot of the driver's state at ``index`` (which it has applied), with the
        configuration as of that index."""
        if index <= self._snapshot.meta.index:
            raise InvalidArgument(f"snapshot at {index} is not newer than {self._snapshot.meta.index}")
        snap = Snapshot(SnapshotMeta(index=index, term=self.term(index), conf_state=conf_state), data)
        self._snapshot = snap
        return snap

    def compact(self, index: int) -> None:
        """Drop the entries before ``index`` (``index`` becomes the compaction point). Only what a
        snapshot covers may go: a lagging follower must still be servable."""
        offset = self._entries[0].index
        if index <= offset:
            raise Compacted(f"compact to {index}: already compacted up to {offset}")
        if index > self.last_index():
            raise Unavailable(f"compact to {index}: last index is {self.last_index()}")
        if index > self._snapshot.meta.index:
            raise InvalidArgument(f"compact to {index}: the latest snapshot only covers {self._snapshot.meta.index}")
        keep = self._entries[index - offset :]
        self._entries = [Entry(term=keep[0].term, index=index, rtype=_NOOP), *keep[1:]]

    def copy(self) -> MemoryStorage:
        """An independent copy (entries are immutable, so the list is copied, not the entries)."""
        other = MemoryStorage()
        other._hard_state = self._hard_state
        other._conf_state = self._conf_state
        other._snapshot = self._snapshot
        other._entries = list(self._entries)
        return other
