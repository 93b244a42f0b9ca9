"""The mail-queue state machine (pure, deterministic) and its tables and entries."""

from __future__ import annotations

from mqstore.errors import StaleLease
from mqstore.queue.kv import KV, LmdbKV, MemoryKV
from mqstore.queue.machine import Counters, apply_entry, decode_entry
from mqstore.queue.model import (
    BOUNCED,
    DEFERRED,
    DELIVERED,
    EXPIRED,
    LEASED,
    QUEUED,
    STATE_BY_NAME,
    STATE_NAMES,
    Policy,
)

__all__ = [
    "BOUNCED",
    "DEFERRED",
    "DELIVERED",
    "EXPIRED",
    "KV",
    "LEASED",
    "QUEUED",
    "STATE_BY_NAME",
    "STATE_NAMES",
    "Counters",
    "LmdbKV",
    "MemoryKV",
    "Policy",
    "StaleLease",
    "apply_entry",
    "decode_entry",
]
