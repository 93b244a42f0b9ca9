"""The key-value view the queue state machine works on.

The machine never touches LMDB or any I/O directly: it reads and writes named tables through a
:class:`KV`. The store passes an LMDB write transaction wrapped as :class:`LmdbKV`; tests and the
simulator pass :class:`MemoryKV`. Both order keys bytewise, so every scan sees the same order.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Any, Protocol


class KV(Protocol):
    def get(self, table: bytes, key: bytes) -> bytes | None: ...

    def put(self, table: bytes, key: bytes, value: bytes) -> None: ...

    def delete(self, table: bytes, key: bytes) -> bool: ...

    def scan(self, table: bytes, start: bytes, stop: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        """Items with ``start <= key < stop`` (no upper bound when ``stop`` is None), ascending.

        The caller must not write to ``table`` while the iterator is alive."""
        ...


class LmdbKV:
    """A KV over an LMDB transaction (read-only or write) and the store's named databases."""

    __slots__ = ("_dbs", "_txn")

    def __init__(self, txn: Any, dbs: dict[bytes, Any]) -> None:
        self._txn = txn
        self._dbs = dbs

    # Positional arguments: py-lmdb parses keywords noticeably slower, and these are hot.
    def get(self, table: bytes, key: bytes) -> bytes | None:
        value = self._txn.get(key, None, self._dbs[table])
        return None if value is None else bytes(value)

    def put(self, table: bytes, key: bytes, value: bytes) -> None:
        self._txn.put(key, value, True, True, False, self._dbs[table])

    def delete(self, table: bytes, key: bytes) -> bool:
        return bool(self._txn.delete(key, b"", self._dbs[table]))

    def last(self, table: bytes) -> tuple[bytes, bytes] | None:
        """The item with the greatest key, if any."""
        with self._txn.cursor(db=self._dbs[table]) as cur:
            if not cur.last():
                return None
            return bytes(cur.key()), bytes(cur.value())

    def scan(self, table: bytes, start: bytes, stop: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        with self._txn.cursor(db=self._dbs[table]) as cur:
            if not cur.set_range(start):
                return
            for key, value in cur.iternext():
                if stop is not None and key >= stop:
                    return
                yield bytes(key), bytes(value)


class MemoryKV:
    """An in-memory KV with sorted keys (tests, models, the simulator)."""

    def __init__(self) -> None:
        self._tables: dict[bytes, dict[bytes, bytes]] = {}
        self._sorted: dict[bytes, list[bytes]] = {}

    def _table(self, table: bytes) -> tuple[dict[bytes, bytes], list[bytes]]:
        if table not in self._tables:
            self._tables[table] = {}
            self._sorted[table] = []
        return self._tables[table], self._sorted[table]

    def get(self, table: bytes, key: bytes) -> bytes | None:
        return self._table(table)[0].get(key)

    def put(self, table: bytes, key: bytes, value: bytes) -> None:
        data, keys = self._table(table)
        if key not in data:
            bisect.insort(keys, key)
        data[key] = value

    def delete(self, table: bytes, key: bytes) -> bool:
        data, keys = self._table(table)
        if key not in data:
            return False
        del data[key]
        keys.pop(bisect.bisect_left(keys, key))
        return True

    def scan(self, table: bytes, start: bytes, stop: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        data, keys = self._table(table)
        i = bisect.bisect_left(keys, start)
        snapshot = keys[i:] if stop is None else keys[i : bisect.bisect_left(keys, stop)]
        for key in snapshot:
            yield key, data[key]

    def tables(self) -> dict[bytes, dict[bytes, bytes]]:
        """Every table's contents (for comparing two states)."""
        return {name: dict(data) for name, data in self._tables.items() if data}


def prefix_end(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key starting with ``prefix`` (None: no such key)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes((stripped[-1] + 1,))


def first(kv: KV, table: bytes, start: bytes, stop: bytes | None = None) -> tuple[bytes, bytes] | None:
    for item in kv.scan(table, start, stop):
        return item
    return None


__all__ = ["KV", "LmdbKV", "MemoryKV", "first", "prefix_end"]
