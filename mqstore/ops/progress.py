"""A progress bar for long operations (verify, backup, restore, recover, bulk changes).

Drawn on stderr only when stderr is a terminal and the command is not producing ``--json``;
otherwise every call is a no-op, so scripts and pipes see nothing but the command's output.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

_REDRAW_S = 0.1  # at most ten redraws a second
_WIDTH = 30


def _human(n: float, unit: str) -> str:
    if unit != "B":
        return f"{int(n):,}"
    for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or suffix == "TiB":
            return f"{n:.0f} {suffix}" if suffix == "B" else f"{n:.1f} {suffix}"
        n /= 1024
    return f"{n:.1f} TiB"


class Progress:
    """``update(done, total)`` as work advances; ``close()`` (or leave the ``with`` block) ends the
    line. ``total`` 0 means unknown (a counter is shown instead of a bar)."""

    def __init__(self, label: str, *, enabled: bool, unit: str = "", stream: TextIO | None = None) -> None:
        self.label = label
        self.unit = unit
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self._last_draw = 0.0
        self._drawn = False
        self._start = time.monotonic()
        self.done = 0
        self.total = 0

    @classmethod
    def for_args(cls, args: object, label: str, unit: str = "") -> Progress:
        """A bar unless the command runs with ``--json`` (or without a terminal on stderr)."""
        return cls(label, enabled=not getattr(args, "json", False), unit=unit)

    def phase(self, label: str, *, unit: str | None = None) -> None:
        """Start a new phase on a new line; ``unit`` (None: the current one) is what it counts
        ("B": bytes; "": records, messages)."""
        if self._drawn:
            self._draw(force=True)
            self.stream.write("\n")
            self._drawn = False
        self.label = label
        if unit is not None:
            self.unit = unit
        self.done = self.total = 0
        self._start = time.monotonic()

    def update(self, done: int, total: int = 0) -> None:
        self.done, self.total = done, total
        if self.enabled:
            self._draw()

    def advance(self, n: int = 1) -> None:
        self.update(self.done + n, self.total)

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < _REDRAW_S:
            return
        self._last_draw = now
        elapsed = now - self._start
        if self.total > 0:
            frac = min(1.0, self.done / self.total)
            filled = int(frac * _WIDTH)
            bar = "#" * filled + "-" * (_WIDTH - filled)
            text = (f"\r{self.label} [{bar}] {frac * 100:5.1f}% "
                    f"{_human(self.done, self.unit)}/{_human(self.total, self.unit)} {elapsed:.0f}s")
        else:
            text = f"\r{self.label} {_human(self.done, self.unit)} {elapsed:.0f}s"
        self.stream.write(text + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self.enabled and self._drawn:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Progress"]
