"""Process-level helpers for hot paths: a fork generation, and buffered OS randomness.

Both replace a system call per operation (``getpid`` to notice a fork, ``getrandom`` for each
nonce and message id) by an attribute read, and both stay correct across ``fork()``: the child
starts a new generation and drops the parent's unused random bytes, so parent and child can
never hand out the same bytes (a repeated AES-GCM nonce under one key would be fatal).

Keys are never drawn from here: they come from ``os.urandom`` directly.
"""

from __future__ import annotations

import os
import threading

_REFILL_BYTES = 4096

_generation = 0
_lock = threading.Lock()
_buffer = b""
_offset = 0


def fork_generation() -> int:
    """A number that changes in a child process after ``fork()``."""
    return _generation


def random_bytes(n: int) -> bytes:
    """``n`` bytes from the OS's cryptographically secure source, each handed out once."""
    global _buffer, _offset
    if n > _REFILL_BYTES // 4:
        return os.urandom(n)
    with _lock:
        start = _offset
        if start + n > len(_buffer):
            _buffer, start = os.urandom(_REFILL_BYTES), 0
        _offset = start + n
        return _buffer[start : start + n]


def _after_fork_in_child() -> None:
    global _generation, _buffer, _offset, _lock
    _generation += 1
    _lock = threading.Lock()  # another thread may have held it at the fork
    _buffer, _offset = b"", 0


os.register_at_fork(after_in_child=_after_fork_in_child)
