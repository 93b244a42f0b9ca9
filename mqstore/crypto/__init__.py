"""Compression and encryption: key providers (the KEK), namespace keys, and record sealing.

See :mod:`mqstore.crypto.providers`, :mod:`mqstore.crypto.keyring` and :mod:`mqstore.crypto.seal`.
"""

from __future__ import annotations

from mqstore.crypto.keyring import SYSTEM_NAMESPACE, KeyEvent, KeyRing, KeyShredded
from mqstore.crypto.providers import (
    AesKeyProvider,
    FileKeyProvider,
    KeyProvider,
    create_key_file,
    kek_fingerprint,
    read_key_file,
)
from mqstore.crypto.seal import Opened, Sealed, Sealer, train_dictionary

__all__ = [
    "SYSTEM_NAMESPACE",
    "AesKeyProvider",
    "FileKeyProvider",
    "KeyEvent",
    "KeyProvider",
    "KeyRing",
    "KeyShredded",
    "Opened",
    "Sealed",
    "Sealer",
    "create_key_file",
    "kek_fingerprint",
    "read_key_file",
    "train_dictionary",
]
