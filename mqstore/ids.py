"""Message ids: 128 bits, time-ordered, printable.

Layout: 48-bit Unix time in milliseconds, then 80 bits that are random for the first id of a
millisecond and incremented for later ids of the same millisecond in this process, so ids sort
by creation order (per process) and bytewise order equals numeric order. The printable form is
26 characters of Crockford base32 (digits and upper-case letters without I, L, O, U), which also
sorts in id order; parsing accepts lower case.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from mqstore._proc import random_bytes
from mqstore.errors import InvalidArgument

MESSAGE_ID_BYTES = 16
MESSAGE_ID_CHARS = 26
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_DECODE = {c: i for i, c in enumerate(_ALPHABET)} | {c.lower(): i for i, c in enumerate(_ALPHABET)}
_RANDOM_BITS = 80
_RANDOM_MAX = (1 << _RANDOM_BITS) - 1
_TIME_MS_MAX = (1 << 48) - 1


class MessageIdGenerator:
    """Generates strictly increasing ids in one process. Thread safe."""

    def __init__(self, clock_ms: Callable[[], int] | None = None) -> None:
        #: Where ids take their time from (a node sets its corrected clock: node/clocks.py).
        self.clock_ms: Callable[[], int] = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._lock = threading.Lock()
        self._last = 0

    def next(self) -> bytes:
        return self.next_many(1)[0]

    def next_many(self, count: int) -> list[bytes]:
        """``count`` increasing ids (one read of OS randomness for all of them)."""
        noise = random_bytes(10 * count)
        out = []
        with self._lock:
            now = min(max(self.clock_ms(), 0), _TIME_MS_MAX) << _RANDOM_BITS
            last = self._last
            for i in range(count):
                candidate = now | int.from_bytes(noise[10 * i : 10 * i + 10], "big")
                # A clock that stands still or steps back must not give an id <= the last one.
                if candidate <= last:
                    candidate = last + 1
                last = candidate
                out.append(candidate.to_bytes(MESSAGE_ID_BYTES, "big"))
            self._last = last
        return out

    @property
    def last(self) -> int:
        """The largest id issued or observed (as an integer; 0 when none)."""
        return self._last

    def observe(self, message_id: bytes) -> None:
        """Never generate an id <= ``message_id`` (used after reopening a store)."""
        value = int.from_bytes(message_id, "big")
        with self._lock:
            self._last = max(self._last, value)


# Two characters per 10 bits: 13 table lookups format an id (ids are formatted on every lease).
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]


def format_id(message_id: bytes) -> str:
    """The 26-character printable form of a 16-byte id."""
    if len(message_id) != MESSAGE_ID_BYTES:
        raise InvalidArgument(f"a message id is {MESSAGE_ID_BYTES} bytes, not {len(message_id)}")
    value = int.from_bytes(message_id, "big")
    pairs = _PAIRS
    return "".join([pairs[(value >> shift) & 1023] for shift in range(120, -10, -10)])


def parse_id(text: str) -> bytes:
    """Parse the printable form back to 16 bytes; raises InvalidArgument naming the problem."""
    if not isinstance(text, str):
        raise InvalidArgument(f"a message id is a string of {MESSAGE_ID_CHARS} characters, not {type(text).__name__}")
    if len(text) != MESSAGE_ID_CHARS:
        raise InvalidArgument(f"a message id has {MESSAGE_ID_CHARS} characters, {text!r} has {len(text)}")
    value = 0
    for ch in text:
        digit = _DECODE.get(ch)
        if digit is None:
            raise InvalidArgument(f"{text!r} is not a message id: {ch!r} is not a base32 character")
        value = (value << 5) | digit
    if value >> 128:
        raise InvalidArgument(f"{text!r} is not a message id: it is larger than 128 bits")
    return value.to_bytes(MESSAGE_ID_BYTES, "big")


def id_time_ms(message_id: bytes) -> int:
    """The creation time (ms since the epoch) carried in an id."""
    return int.from_bytes(message_id[:6], "big")
