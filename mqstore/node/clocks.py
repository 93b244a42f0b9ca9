"""How far each peer's wall clock is from this node's, and the clock a node stamps entries with.

The leader stamps every entry it proposes with its wall clock, and the queue's time (lease
deadlines, when a deferred recipient falls due, message age and expiry) is those stamps, which
never go backwards. A leader whose clock is an hour ahead therefore moves the queue's time an hour
ahead; when a leader with a correct clock follows it, time in the queue stands still for that
hour: no lease expires and no deferred recipient falls due. A leader an hour behind stands still
in the same way from the moment it is elected.

So every message on the Raft streams carries three times in microseconds on the sender's wall
clock: when it was sent, and the send time and local arrival time of the last message the sender
received from its addressee. With its own arrival time the addressee has the four times of an NTP
exchange: the sender's clock is ``((T2 - T1) + (T3 - T4)) / 2`` ahead of its own, within half the
round trip ``(T4 - T1) - (T3 - T2)``. Each peer's estimate is the sample with the shortest round
trip of the last ``WINDOW_S`` seconds (one kept per second), so queueing on a loaded node widens
the error bound but does not bias the estimate.

What a node does with them:

- reports them: each member's offset and error in ``mqstore status`` (the leader's view) and the
  ``mqstore_peer_clock_offset_seconds{peer}`` metric, and logs a warning when a peer's clock is
  more than ``max_clock_offset_ms`` off its own (and when it agrees again);
- corrects its own stamps. A leader takes the median of the voters' clocks (its own included, at
  least three of them and a majority heard from within ``WINDOW_S``): when that median is more
  than ``max_clock_offset_ms`` from its own clock, it stamps with its clock moved to the median.
  Followers hear only from their leader, so each message also carries its sender's correction
  when the sender knows it, and a follower takes its leader's: its clock moved to the leader's
  corrected one, when the two are more than ``max_clock_offset_ms`` apart. A node thus has its
  correction before it is elected, and one node with a wrong clock, leader or not, does not move
  the queue's time; in a cluster whose clocks disagree with no majority, the leader keeps its own
  clock (and a correction it had already);
- notices its own clock being stepped (NTP, a VM resumed, an operator): the wall clock moved more
  than ``STEP_MS_MIN`` more (or less) than the monotonic clock since it last looked. The
  correction then takes the step back, so the time it stamps with goes on as the monotonic clock
  does, and every sample taken with the old clock is dropped; fresh samples decide again within a
  few heartbeats; with too few voters heard from to decide within ``WINDOW_S``, it stamps with its
  own clock as it is then. Without this a leader's clock stepped an hour ahead moved the queue's
  time an hour ahead for good (its samples from before the step still said the voters agreed with
  it): mail expired untried, finished mail was compacted early, then time stood still for an hour.
  A peer's step shows as a sample beyond both error bounds of the last one: the peer's older
  samples are dropped (else a follower would keep its leader's pre-step offset beside the
  leader's new correction, and take its own good clock for a wrong one).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

#: How long a sample counts towards a peer's estimate.
WINDOW_S = 30.0
#: Samples are kept one per this many seconds (the one with the shortest round trip).
SAMPLE_SLOT_S = 1.0
#: A negative round trip down to this is the clocks' rounding, beyond it a clock that was stepped.
_ROUNDING_US_MAX = 10
#: A correction larger than this is not applied (a clock that far off is not a clock to follow).
CORRECTION_MS_MAX = 10 * 366 * 86_400_000
#: The wall clock moving this much more (or less) than the monotonic clock between two looks is a
#: step, not drift (NTP slews at most 0.5 ms per second).
STEP_MS_MIN = 200


@dataclass(frozen=True, slots=True)
class ClockOffset:
    """A peer's wall clock minus this node's, in milliseconds, within +/- ``error_ms``."""

    offset_ms: float
    error_ms: float


class _PeerSamples:
    __slots__ = ("correction_ms", "known_correction_ms", "last_in", "slots")

    def __init__(self) -> None:
        self.last_in: tuple[int, int] | None = None  # (peer's send time, our arrival time), us
        self.correction_ms: int | None = None  # the peer's own correction, as it last said
        #: The last correction the peer said it had decided (kept when it stops saying, until its
        #: clock steps): its clock plus this is the cluster's time as last decided.
        self.known_correction_ms: int | None = None
        # (slot start on the monotonic clock, offset us, round trip us): the best of each slot
        self.slots: deque[tuple[float, float, int]] = deque(maxlen=int(WINDOW_S / SAMPLE_SLOT_S) + 1)


class PeerClocks:
    """Clock offsets of one node's peers, and the correction its stamps get (thread safe: peer
    sender threads call :meth:`stamp`, the Raft service's handlers :meth:`observe`, the Raft
    thread :meth:`update`)."""

    def __init__(
        self,
        node_id: int,
        clock: Callable[[], float],
        max_offset_ms: int,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node_id = node_id
        self._clock = clock
        self._monotonic = monotonic
        self.max_offset_ms = max_offset_ms
        self._peers: dict[int, _PeerSamples] = {}
        self._lock = threading.Lock()
        #: The correction as decided (or kept, or set back by a step), before any cap (see
        #: _capped): what :attr:`correction_ms` is unless this node leads undecided.
        self._uncapped_ms = 0
        #: Milliseconds added to this node's clock for the stamps of new entries (see module doc).
        self._correction_ms = 0
        self._capped_by: int | None = None  # the voter whose time caps this leader's (logged)
        self._steps = 0  # this node's clock steps noticed (update() does not overwrite one's effect)
        #: Whether :attr:`correction_ms` was decided from the voters' clocks or a leader's
        #: (sent to peers only then).
        self.decided = False
        self._off: set[int] = set()  # peers whose clocks are off by more than the limit (logged)
        #: (wall clock us, monotonic s) when this node last looked at its clock (step detection).
        self._looked: tuple[int, float] | None = None
        #: This node's wall clock (us) right after its last step: echoes of earlier times mix clocks.
        self._stepped_at_us = 0
        #: Until when (monotonic) a step taken back into the correction is kept while no fresh
        #: samples decide (None: no step waits for them; see :meth:`update`).
        self._step_kept_until: float | None = None

    @property
    def correction_ms(self) -> int:
        """Milliseconds added to this node's clock for the stamps of new entries."""
        return self._correction_ms

    @correction_ms.setter
    def correction_ms(self, value: int) -> None:
        self._correction_ms = self._uncapped_ms = value

    def _check_step(self) -> None:
        """Notice a step of this node's wall clock (see the module doc): take it back into the
        correction, drop every sample. Called before anything reads the clock for a decision."""
        wall, mono = self._now_us(), self._monotonic()
        with self._lock:
            looked, self._looked = self._looked, (wall, mono)
            if looked is None:
                return
            step_ms = ((wall - looked[0]) - (mono - looked[1]) * 1_000_000) / 1000
            if abs(step_ms) < STEP_MS_MIN or not self._peers:
                return  # (a node without peers has no clocks to decide again from: it keeps its own)
            for samples in self._peers.values():
                samples.slots.clear()
                samples.last_in = None
            self._stepped_at_us = wall
            self._correction_ms -= round(step_ms)
            self._uncapped_ms -= round(step_ms)
            self._steps += 1
            self._step_kept_until = mono + WINDOW_S
            self.decided = False
        log.warning("node %d: this node's clock was stepped %.3f s %s: its stamps go on from the time before the "
                    "step (correction %d ms) until fresh samples of the voters' clocks decide again",
                    self.node_id, abs(step_ms) / 1000, "forward" if step_ms > 0 else "back", self.correction_ms)

    def _now_us(self) -> int:
        return round(self._clock() * 1_000_000)

    def _samples(self, peer: int) -> _PeerSamples:
        s = self._peers.get(peer)
        if s is None:
            s = self._peers[peer] = _PeerSamples()
        return s

    def stamp(self, peer: int, message: Any) -> None:
        """Set the clock fields of ``message`` (a ``RaftMessage``) just before it goes to ``peer``."""
        with self._lock:
            s = self._peers.get(peer)
            last = s.last_in if s is not None else None
        if last is not None:
            message.clock_echo_us, message.clock_echo_received_us = last
        if self.decided:
            message.clock_correction_ms = self.correction_ms
        message.clock_sent_us = self._now_us()

    def observe(self, peer: int, sent_us: int, echo_us: int, echo_received_us: int,
                correction_ms: int | None = None) -> None:
        """A message from ``peer`` arrived with these clock fields (0: not set, e.g. an older peer;
        ``correction_ms`` None: the peer did not say)."""
        if sent_us <= 0:
            return
        self._check_step()
        arrived = self._now_us()
        with self._lock:
            s = self._samples(peer)
            s.last_in = (sent_us, arrived)
            s.correction_ms = correction_ms
            if correction_ms is not None:
                s.known_correction_ms = correction_ms
            if echo_us <= 0 or echo_received_us <= 0 or echo_us < self._stepped_at_us:
                return  # (an echo of a time before this node's clock was stepped: no sample)
            round_trip = (arrived - echo_us) - (sent_us - echo_received_us)
            if round_trip < 0:
                if round_trip < -_ROUNDING_US_MAX:
                    return  # a clock was stepped between the two messages: no sample
                round_trip = 0  # a round trip shorter than the clocks' rounding
            offset = ((echo_received_us - echo_us) + (sent_us - arrived)) / 2
            now = self._monotonic()
            slots = s.slots
            if slots and abs(offset - slots[-1][1]) > (round_trip + slots[-1][2]) / 2 + STEP_MS_MIN * 1000:
                # Beyond both error bounds: the peer's clock was stepped (this node's own step is
                # noticed by _check_step). Its older samples describe a clock that is gone, and
                # so does the correction it had.
                slots.clear()
                if correction_ms is None:
                    s.known_correction_ms = None
            if slots and now - slots[-1][0] < SAMPLE_SLOT_S:
                if round_trip < slots[-1][2]:
                    slots[-1] = (slots[-1][0], offset, round_trip)
            else:
                slots.append((now, offset, round_trip))

    def offset(self, peer: int) -> ClockOffset | None:
        """``peer``'s clock minus this node's (None: no sample within ``WINDOW_S``)."""
        now = self._monotonic()
        with self._lock:
            s = self._peers.get(peer)
            fresh = [x for x in s.slots if now - x[0] <= WINDOW_S] if s is not None else []
        if not fresh:
            return None
        _, offset_us, round_trip_us = min(fresh, key=lambda x: x[2])
        return ClockOffset(offset_us / 1000, round_trip_us / 2000)

    def offsets(self, peers: Iterable[int]) -> dict[int, ClockOffset | None]:
        return {p: self.offset(p) for p in peers if p != self.node_id}

    def update(self, voters: Iterable[int], members: Iterable[int], leader: int) -> None:
        """Log peers whose clocks are off (or agree again) and set :attr:`correction_ms` (see
        the module doc; ``leader``: the leader this node knows, itself included, 0: none).
        Called by the Raft thread every heartbeat and when it becomes leader."""
        self._check_step()
        steps = self._steps
        limit = self.max_offset_ms
        for peer, est in self.offsets(members).items():
            off = est is not None and abs(est.offset_ms) - est.error_ms > limit
            if off and peer not in self._off:
                assert est is not None
                self._off.add(peer)
                log.warning(
                    "node %d: node %d's clock is %.3f s %s this node's (within %.3f ms), more than "
                    "max_clock_offset_ms = %d: check NTP on both", self.node_id, peer, abs(est.offset_ms) / 1000,
                    "ahead of" if est.offset_ms > 0 else "behind", est.error_ms, limit,
                )
            elif est is not None and not off and peer in self._off:
                self._off.discard(peer)
                log.info("node %d: node %d's clock agrees with this node's again (%.3f ms off)",
                         self.node_id, peer, est.offset_ms)
        decided = self._decide(list(voters), leader)
        if decided is None:
            self.decided = False
            if self._step_kept_until is not None and self._monotonic() >= self._step_kept_until:
                # No clocks to go by since the step (too few voters heard from): this node's own
                # clock, as it is now, is all there is. (Not the correction from before the step:
                # that one was for the old clock, and exactly wrong when the step was the fix.)
                self._uncapped_ms = 0
                self._step_kept_until = None
                log.warning("node %d: no voters' clocks decided after this node's clock was stepped: it stamps with "
                            "its clock as it is now", self.node_id)
            # Nothing new to go by: keep the correction as it is, capped while this node leads
            # (recomputed each time: a cap ends when the voter's clock agrees again).
            effective = self._capped(voters, limit) if leader == self.node_id else self._uncapped_ms
            with self._lock:
                if self._steps == steps:  # else a step (another thread) moved it meanwhile: next time
                    self._correction_ms = effective
            return
        self._step_kept_until = None
        correction, source = decided
        if abs(correction) > CORRECTION_MS_MAX:
            self.decided = False
            return
        if abs(correction) <= limit:
            correction = 0
        if (correction != 0) != (self.correction_ms != 0):
            if correction:
                log.warning(
                    "node %d: this node's clock is %.3f s %s %s, more than max_clock_offset_ms = %d: it stamps "
                    "new entries with that time until its clock is fixed (check NTP)", self.node_id,
                    abs(correction) / 1000, "behind" if correction > 0 else "ahead of", source, limit,
                )
            else:
                log.info("node %d: this node's clock agrees with %s again: it stamps with its own", self.node_id,
                         source)
        self.correction_ms = correction
        self._capped_by = None
        self.decided = True

    def _capped(self, voters: Iterable[int], limit: int) -> int:
        """The correction a leader whose voters' clocks cannot decide (too few heard from) stamps
        with: its own (uncapped), but never more than ``limit`` ahead of a voter it hears from —
        else the earliest such voter's time. A voter's time is its clock plus the correction it
        last said it had decided (a clock the voters' median showed wrong is not taken as it is).
        Of two clocks that disagree nobody can tell which is right, but only one ahead does lasting
        harm: stamps never go back, so time it moved ahead stays (leases and lifetimes end early,
        then the queue stands still until the clocks catch up), where one behind only holds the
        queue still while it lasts. (Before, a node an hour ahead elected after a restart — no
        correction learned yet — with one voter down moved the queue an hour ahead for good.)"""
        base = self._uncapped_ms
        if (self._capped_by is not None and self._step_kept_until is not None
                and self.offset(self._capped_by) is None):
            # This node's clock was stepped while capped: every sample was dropped, so nothing
            # says yet where the capping voter is. The capped time carries on (the step taken back)
            # until a fresh sample does; the uncapped one would jump to the clock the cap held back.
            return min(base, self._correction_ms)
        ahead: list[tuple[int, int]] = []
        for peer, est in self.offsets(voters).items():
            if est is None:
                continue
            with self._lock:
                s = self._peers.get(peer)
                known = s.known_correction_ms if s is not None else None
            their_time = est.offset_ms + (known or 0)
            if base - their_time > limit + est.error_ms and abs(their_time) <= CORRECTION_MS_MAX:
                ahead.append((round(their_time), peer))
        if not ahead:
            if self._capped_by is not None:
                log.info("node %d: no voter's clock is behind this node's any more: it stamps with its own",
                         self.node_id)
                self._capped_by = None
            return base
        capped, peer = min(ahead)
        if self._capped_by != peer:
            log.warning(
                "node %d: too few voters' clocks to decide the cluster's time, and this node's is %.3f s ahead of "
                "node %d's: it stamps with node %d's time while that lasts (a clock ahead would move the queue's "
                "time ahead for good; check NTP)", self.node_id, (base - capped) / 1000, peer, peer,
            )
            self._capped_by = peer
        return capped

    def _decide(self, voters: list[int], leader: int) -> tuple[int, str] | None:
        """The correction the clocks heard call for, and whose clocks those are; None when they
        do not say (too few voters heard from, no leader that knows its own)."""
        if leader == self.node_id:
            values = [0.0] + [e.offset_ms for e in self.offsets(voters).values() if e is not None]
            if len(values) < 3 or len(values) <= len(voters) // 2:
                return None
            values.sort()
            n = len(values)
            median = values[n // 2] if n % 2 else min(values[n // 2 - 1], values[n // 2], key=abs)
            return round(median), "the median of the voters' clocks"
        if leader == 0:
            return None
        est = self.offset(leader)
        with self._lock:
            s = self._peers.get(leader)
            theirs = s.correction_ms if s is not None else None
        if est is None or theirs is None:
            return None
        return round(est.offset_ms) + theirs, f"the cluster's time (as leader {leader} keeps it)"

    def now_ms(self) -> int:
        """This node's clock in epoch milliseconds, corrected as :meth:`update` decided (and for
        a step of its clock noticed now)."""
        self._check_step()
        return round(self._clock() * 1000) + self.correction_ms


__all__ = ["CORRECTION_MS_MAX", "SAMPLE_SLOT_S", "STEP_MS_MIN", "WINDOW_S", "ClockOffset", "PeerClocks"]
