"""mqstore: a replicated, durable mail-queue storage engine.

Messages are stored compressed and encrypted in an append-only log on LMDB.
"""

from __future__ import annotations

from mqstore.actor import Actor
from mqstore.errors import (
    Corruption,
    DecryptionFailed,
    Immutable,
    InvalidArgument,
    KeyFileError,
    MQStoreError,
    NotFound,
    NotLeader,
    Overloaded,
    PermissionDenied,
    StaleLease,
    StorageFull,
    StoreClosed,
    StoreLocked,
    Unauthenticated,
    Unavailable,
    UnknownKey,
    WrongKey,
)

__version__ = "0.1.0"

from mqstore.api import BounceResult, Lease, Message, MessageSummary, Page, QShape, RecipientStatus, Store, open


def __getattr__(name: str) -> object:
    # The network clients import grpc: only pay for it when they are used.
    if name in ("Client", "AsyncClient"):
        from mqstore import client

        return getattr(client, name)
    raise AttributeError(f"module 'mqstore' has no attribute {name!r}")

__all__ = [
    "Actor",
    "AsyncClient",
    "BounceResult",
    "Client",
    "Corruption",
    "DecryptionFailed",
    "Immutable",
    "InvalidArgument",
    "KeyFileError",
    "Lease",
    "MQStoreError",
    "Message",
    "MessageSummary",
    "NotFound",
    "NotLeader",
    "Overloaded",
    "Page",
    "PermissionDenied",
    "QShape",
    "RecipientStatus",
    "StaleLease",
    "StorageFull",
    "Store",
    "StoreClosed",
    "StoreLocked",
    "Unauthenticated",
    "Unavailable",
    "UnknownKey",
    "WrongKey",
    "__version__",
    "open",
]
