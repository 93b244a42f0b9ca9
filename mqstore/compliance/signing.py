"""The audit signing key: an Ed25519 key that signs the audit log's Merkle checkpoints.

It is separate from the data keys on purpose: the key-encryption key opens mail, this one only
vouches for the audit log, and either can be rotated or handed to an auditor without the other.

Key file format: one line ``mqstore-audit-signing-v1:<64 hex digits>`` (the raw 32-byte Ed25519
private key, RFC 8032), mode 0600. The same rules as the KEK file apply: a file other local users
could read or change is refused. Every replica of a cluster must hold the same signing key: the
checkpoints are part of the replicated state, and Ed25519 signatures are deterministic, so the
same key gives every replica byte-identical checkpoints.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mqstore.errors import InvalidArgument, KeyFileError

SIGNING_KEY_HEADER = "mqstore-audit-signing-v1"
SIGNING_KEY_BYTES = 32
PUBLIC_KEY_BYTES = 32
#: Bytes of SHA-256(raw public key) kept as the key id (shown as 32 hex digits).
KEY_ID_BYTES = 16
_KEY_FILE_BYTES_MAX = 4096
_KEK_HEADER = "mqstore-kek-v1"


def _check_mode(path: Path, mode: int) -> None:
    # Mirrors mqstore.crypto.providers: group read is allowed (a service group may share the file);
    # world access and group write never are.
    if not stat.S_ISREG(mode):
        raise KeyFileError(f"audit signing key file {path} is not a regular file")
    if mode & 0o007:
        raise KeyFileError(
            f"audit signing key file {path} is accessible to every user (mode {stat.S_IMODE(mode):04o}); "
            f"run `chmod 600 {path}`"
        )
    if mode & 0o020:
        raise KeyFileError(
            f"audit signing key file {path} is writable by its group (mode {stat.S_IMODE(mode):04o}); "
            f"run `chmod 600 {path}`"
        )


def read_signing_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Read the signing key from ``path``, refusing unsafe permissions and malformed contents."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise KeyFileError(f"audit signing key file {p} does not exist") from None
    except OSError as exc:
        raise KeyFileError(f"cannot open audit signing key file {p}: {exc.strerror}") from None
    try:
        _check_mode(p, os.fstat(fd).st_mode)
        raw = os.read(fd, _KEY_FILE_BYTES_MAX)
    finally:
        os.close(fd)
    text = raw.decode("ascii", errors="replace").strip()
    header, _, hex_key = text.partition(":")
    if header == _KEK_HEADER:
        raise KeyFileError(
            f"{p} is a key-encryption key file, not an audit signing key: the audit signing key must be "
            "a separate key (create one with `create=True`)"
        )
    if header != SIGNING_KEY_HEADER:
        raise KeyFileError(f"{p} is not an mqstore audit signing key file (expected '{SIGNING_KEY_HEADER}:<hex>')")
    try:
        raw_key = bytes.fromhex(hex_key.strip())
    except ValueError:
        raise KeyFileError(f"audit signing key file {p}: the key is not hexadecimal") from None
    if len(raw_key) != SIGNING_KEY_BYTES:
        raise KeyFileError(f"audit signing key file {p}: the key is {len(raw_key)} bytes, expected {SIGNING_KEY_BYTES}")
    return Ed25519PrivateKey.from_private_bytes(raw_key)


def create_signing_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Create a new random signing key in ``path`` (mode 0600). Never overwrites a file."""
    p = Path(path)
    raw_key = os.urandom(SIGNING_KEY_BYTES)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise KeyFileError(f"audit signing key file {p} already exists; refusing to overwrite a key") from None
    except OSError as exc:
        raise KeyFileError(f"cannot create audit signing key file {p}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)  # the umask can only narrow the mode; be explicit anyway
        os.write(fd, f"{SIGNING_KEY_HEADER}:{raw_key.hex()}\n".encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    dir_fd = os.open(p.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the new name must survive a crash too
    finally:
        os.close(dir_fd)
    return Ed25519PrivateKey.from_private_bytes(raw_key)


def load_or_create_signing_key(path: str | os.PathLike[str], create: bool) -> Ed25519PrivateKey:
    """The signing key in ``path``; with ``create``, a new one when the file does not exist."""
    p = Path(path)
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
