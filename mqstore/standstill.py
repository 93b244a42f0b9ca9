"""A warning for when the queue's time stands still because the wall clock is behind it.

Time stamps never go backwards (every batch of the embedded store, every entry a node's leader
proposes is stamped with ``max(clock, latest stamp)``), so a clock set back by an hour — or a
store moved to a machine whose clock is behind, or a leader elected with a slow clock — holds
the queue's time still until the clock catches up: no lease expires and no deferred recipient
falls due meanwhile. That is the safe choice, and a silent one; this says so in the log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

#: How far behind the latest stamp the clock must be before it is worth a warning.
BEHIND_MS_MIN = 1_000
#: The warning is repeated at most this often while the clock stays behind.
REPEAT_S = 60.0


class StandStillWarning:
    def __init__(self, what: str, logger: logging.Logger, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.what = what
        self.log = logger
        self._monotonic = monotonic
        self._warned_at: float | None = None

    def check(self, clock_ms: int, stamp_ms: int) -> None:
        """Called with the clock and the latest stamp each time a stamp is taken (cheap when the
        clock is not behind)."""
        behind = stamp_ms - clock_ms
        if behind < BEHIND_MS_MIN:
            if self._warned_at is not None:
                self._warned_at = None
                self.log.info("%s: the clock caught up with the queue's time", self.what)
            return
        now = self._monotonic()
        if self._warned_at is None or now - self._warned_at >= REPEAT_S:
            self._warned_at = now
            self.log.warning(
                "%s: the clock is %.3f s behind the latest time stamp (set back, or behind the machine "
                "that stamped before): time in the queue stands still until it catches up, so no lease "
                "expires and no deferred recipient falls due meanwhile; check the clock (NTP)",
                self.what, behind / 1000,
            )


__all__ = ["BEHIND_MS_MIN", "REPEAT_S", "StandStillWarning"]
