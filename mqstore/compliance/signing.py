"""The audit signing key: an Ed25519 key that signs the audit log's Merkle checkpoints.

It is separate from the data keys on purpose: the key-encryption key opens mail, this one only
vouches for the audit log, and either can be rotated or handed to an auditor without the other.

Key file format: one line ``mqstore-audit-signing-v1:<64 hex digits>`` (the raw 32-byte Ed25519
private key, RFC 8032), mode 0600. The same rules as the KEK file apply: a file other local users
could read or change is refused. Each node of a cluster signs the checkpoints it derives with its
own key: the records and Merkle roots are the same on every replica, and since Ed25519
signatures are deterministic, nodes given the same key write byte-identical checkpoints.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mqstore.crypto.providers import read_secret_file, write_secret_file
from mqstore.errors import InvalidArgument, KeyFileError

SIGNING_KEY_HEADER = "mqstore-audit-signing-v1"
SIGNING_KEY_BYTES = 32
PUBLIC_KEY_BYTES = 32
#: Bytes of SHA-256(raw public key) kept as the key id (shown as 32 hex digits).
KEY_ID_BYTES = 16
_WHAT = "audit signing key file"
_KEK_HEADER = "mqstore-kek-v1"


def read_signing_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Read the signing key from ``path``, refusing unsafe permissions and malformed contents."""
    header, raw_key = read_secret_file(path, _WHAT)
    if header == _KEK_HEADER:
        raise KeyFileError(
            f"{path} is a key-encryption key file, not an audit signing key: the audit signing key must be "
            "a separate key (create one with `create=True`)"
        )
    if header != SIGNING_KEY_HEADER:
        raise KeyFileError(f"{path} is not an mqstore audit signing key file (expected '{SIGNING_KEY_HEADER}:<hex>')")
    if len(raw_key) != SIGNING_KEY_BYTES:
        raise KeyFileError(f"{_WHAT} {path}: the key is {len(raw_key)} bytes, expected {SIGNING_KEY_BYTES}")
    return Ed25519PrivateKey.from_private_bytes(raw_key)


def create_signing_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Create a new random signing key in ``path`` (mode 0600). Never overwrites a file."""
    raw_key = os.urandom(SIGNING_KEY_BYTES)
    write_secret_file(path, _WHAT, SIGNING_KEY_HEADER, raw_key)
    return Ed25519PrivateKey.from_private_bytes(raw_key)


def load_or_create_signing_key(path: str | os.PathLike[str], create: bool,
                               signed_by: str | None = None) -> Ed25519PrivateKey:
    """The signing key in ``path``; with ``create``, a new one when the file does not exist,
    unless ``signed_by`` (the key id of the checkpoints the store's audit log holds already, see
    :func:`mqstore.compliance.audit.signed_by`) says the store had a key: a new one would make
    each of those checkpoints fail ``audit verify``, so the missing file is a KeyFileError saying
    how to go on (a store restored from a backup, which never holds the key, needs its key back)."""
    p = Path(path)
    if create and signed_by is not None and not os.path.lexists(p):
        raise KeyFileError(
            f"{_WHAT} {p} does not exist, but this store's audit log holds checkpoints signed by key {signed_by}: "
            "a new key would make every one of them fail `mqstore audit verify`. Put the key file back (backups of "
            "a store do not hold it), or name where it is (audit_signing_key; `audit_signing_key` in a node's "
            "config). If it is lost for good, create a new key on purpose with "
            f"mqstore.compliance.signing.create_signing_key({str(p)!r}); checkpoints signed before then verify "
            "only against the old key's public key (`mqstore audit verify --public-key <hex>`)"
        )
    if create and not os.path.lexists(p):
        try:
            return create_signing_key(p)
        except KeyFileError:
            if not os.path.lexists(p):
                raise
            # Another process created it between our check and our create: use theirs.
    return read_signing_key(p)


def raw_public_key(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(Encoding.Raw, PublicFormat.Raw)


def public_key_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The raw 32-byte public key, as hex (what an exported checkpoint carries)."""
    return raw_public_key(key).hex()


def public_key_from_hex(text: str) -> Ed25519PublicKey:
    """The public key from its hex form; :class:`InvalidArgument` when it is not one."""
    try:
        raw = bytes.fromhex(text.strip())
    except (ValueError, AttributeError):
        raise InvalidArgument("an audit public key is 64 hexadecimal digits") from None
    if len(raw) != PUBLIC_KEY_BYTES:
        raise InvalidArgument(f"an audit public key is {PUBLIC_KEY_BYTES} bytes, not {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def key_id(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """Hex of the first 16 bytes of SHA-256(raw public key): names a signing key in checkpoints."""
    return hashlib.sha256(raw_public_key(key)).digest()[:KEY_ID_BYTES].hex()


__all__ = [
    "KEY_ID_BYTES",
    "SIGNING_KEY_HEADER",
    "create_signing_key",
    "key_id",
    "load_or_create_signing_key",
    "public_key_from_hex",
    "public_key_hex",
    "raw_public_key",
    "read_signing_key",
]
