"""The LMDB layer: environment, group-commit writer, and the append-only log."""

from __future__ import annotations

from mqstore.store.env import DATABASES, Environment
from mqstore.store.log import (
    Appended,
    LogStore,
    NewMessage,
    ScanReport,
    StoredMessage,
    WriteContext,
    index_key,
    keeps_live_body,
    key_index,
)
from mqstore.store.writer import Pending, Writer, WriterFailed

__all__ = [
    "DATABASES",
    "Appended",
    "Environment",
    "LogStore",
    "NewMessage",
    "Pending",
    "ScanReport",
    "StoredMessage",
    "WriteContext",
    "Writer",
    "WriterFailed",
    "index_key",
    "keeps_live_body",
    "key_index",
]
