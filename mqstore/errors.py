"""The errors mqstore raises.

Every error derives from :class:`MQStoreError`. Errors caused by the caller (bad input, a stale
lease) change no state. Errors that mean the store's data is damaged (:class:`Corruption`) name
the damaged place. Anything else escaping mqstore (``AssertionError`` included) is a bug.
"""

from __future__ import annotations


class MQStoreError(Exception):
    """Base class of every error mqstore raises on purpose.

    ``request_id``: on an error a :class:`mqstore.Client` call got from a node, the call's
    request id, which the node's log lines of that call carry (None otherwise).
    """

    request_id: str | None = None


class InvalidArgument(MQStoreError, ValueError):
    """The caller passed something mqstore does not accept. Nothing was changed."""


class Corruption(MQStoreError):
    """Stored bytes failed validation (checksum, framing, authentication tag).

    ``index`` is the log index of the damaged record when it is known, ``reason`` says what is
    wrong with it. A corrupt record is never reported as absent.
    """

    def __init__(self, reason: str, index: int | None = None) -> None:
        self.reason = reason
        self.index = index
        super().__init__(reason if index is None else f"log index {index}: {reason}")

    def with_index(self, index: int) -> Corruption:
        """The same error, naming ``index`` (used by callers that know where the bytes came from)."""
        return Corruption(self.reason, index)


class DecryptionFailed(Corruption):
    """A record's authentication tag did not verify: wrong key, wrong message id or tampering."""


class KeyError_(MQStoreError):
    """Base of key-management errors (named with a trailing underscore to avoid the builtin)."""


class WrongKey(KeyError_):
    """The key-encryption key does not open this store's keys."""


class KeyFileError(KeyError_):
    """The key file is missing, malformed, or has unsafe permissions."""


class UnknownKey(KeyError_):
    """A record names a key id or dictionary id this store does not have."""


class StoreLocked(MQStoreError):
    """Another process has this store open for writing."""


class StoreClosed(MQStoreError):
    """The store was closed (or the process forked after opening it)."""


class Overloaded(MQStoreError):
    """A bounded queue stayed full for longer than the caller was willing to wait."""


class StorageFull(Overloaded):
    """The disk holding the store is full, or below the free-space floor kept for draining the
    queue: nothing was stored. Deliveries, deletes and compaction free space; retry later (an MTA
    answers 452 4.3.1 "Insufficient system storage" meanwhile)."""


class NotFound(MQStoreError, LookupError):
    """The named object (log index, message, key) does not exist."""


class NotLeader(MQStoreError):
    """This node is not the leader; ``leader_id``/``leader_address`` name the one it knows (0/""
    when it knows none). Nothing was changed: retry at the leader."""

    def __init__(self, message: str, leader_id: int = 0, leader_address: str = "") -> None:
        super().__init__(message)
        self.leader_id = leader_id
        self.leader_address = leader_address


class Unavailable(MQStoreError):
    """The cluster cannot serve the request right now (no leader, shutting down, timed out
    waiting for a quorum). Retrying later is safe: writes carry idempotency keys.

    ``not_applied``: the request was refused before it was proposed, so it did nothing and any
    request (even one that is not idempotent) may be sent again. A node says so to clients in the
    ``mqstore-not-applied`` trailer."""

    def __init__(self, message: str = "", *, not_applied: bool = False) -> None:
        super().__init__(message)
        self.not_applied = not_applied


class Immutable(MQStoreError):
    """Immutability (retention, legal hold, COMPLIANCE mode) forbids this change. Nothing was
    changed; the refusal was written to the audit log."""


class PermissionDenied(MQStoreError):
    """The actor lacks a permission this request needs. Nothing was changed; the refusal was
    written to the audit log."""


class Unauthenticated(MQStoreError):
    """The caller presented no credentials a node accepts (no token, an unknown or revoked token,
    a certificate that names no client). Nothing was changed; the refusal was audited."""


class StaleLease(MQStoreError):
    """The lease token is unknown, expired or settled, or does not hold these recipients.
    Nothing was changed."""


__all__ = [
    "Corruption",
    "DecryptionFailed",
    "Immutable",
    "InvalidArgument",
    "KeyError_",
    "KeyFileError",
    "MQStoreError",
    "NotFound",
    "NotLeader",
    "Overloaded",
    "PermissionDenied",
    "StaleLease",
    "StorageFull",
    "StoreClosed",
    "StoreLocked",
    "Unauthenticated",
    "Unavailable",
    "UnknownKey",
    "WrongKey",
]
