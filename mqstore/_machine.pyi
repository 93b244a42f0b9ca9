"""Type stub for the compiled hot paths of the queue state machine (ext/_machine.pyx)."""

from collections import defaultdict
from typing import Any

from mqstore.codec import Envelope

def enqueue(
    txn: Any, dbs: dict[bytes, Any], deltas: defaultdict[tuple[str, str], int], index: int, env: Envelope,
    size_bytes: int, key_id: int, idem: bytes, dedup_until: int,
) -> bytes | bool | None: ...
def lease(
    txn: Any, dbs: dict[bytes, Any], deltas: defaultdict[tuple[str, str], int], token: int, mid: bytes,
    ordinals: tuple[int, ...], now_ms: int, deadline_ms: int, worker: bytes,
) -> tuple[tuple[int, ...], int, int] | bool | None: ...
def settle(
    txn: Any, dbs: dict[bytes, Any], c: Any, kv: Any, target: int, token: int, mid: bytes,
    lease_ordinals: tuple[int, ...], lease_deadline_ms: int, worker: bytes, ordinals: tuple[int, ...],
    now_ms: int, next_attempt_ms: tuple[int, ...], reason: bytes,
) -> bool | None: ...
def due_ordinals(txn: Any, db: Any, mid: bytes, now_ms: int, domain: bytes | None) -> tuple[int, ...]: ...
