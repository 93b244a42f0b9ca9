"""mqstore: a replicated, durable mail-queue storage engine.

Messages are stored compressed and encrypted in an append-only log on LMDB.
"""

from __future__ import annotations

from mqstore.errors import (
    Corruption,
    DecryptionFailed,
    InvalidArgument,
    KeyFileError,
    MQStoreError,
    NotFound,
    Overloaded,
    StoreClosed,
    StoreLocked,
    UnknownKey,
    WrongKey,
)

__version__ = "0.1.0"

__all__ = [
    "Corruption",
    "DecryptionFailed",
    "InvalidArgument",
    "KeyFileError",
    "MQStoreError",
    "NotFound",
    "Overloaded",
    "StoreClosed",
    "StoreLocked",
    "UnknownKey",
    "WrongKey",
    "__version__",
]
