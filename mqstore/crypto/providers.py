"""Key providers: where the key-encryption key (KEK) lives.

mqstore never stores a data key in the clear. Namespace keys are wrapped (encrypted) by a key
provider and only the wrapped form is written to the store. A provider is anything with
``wrap``/``unwrap``: the default reads a KEK from a key file; a KMS or HSM provider implements the
same two methods by calling its service, so the KEK never has to leave it.

A provider may also have ``fingerprint()``: a short digest naming its KEK without revealing it
(:func:`kek_fingerprint`). Nodes send it with their Raft messages and refuse a peer whose KEK
differs: a node given another key file can then neither lead nor receive entries it could not
read.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path
from typing import Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mqstore.errors import InvalidArgument, KeyFileError, WrongKey

KEK_BYTES = 32
_WRAP_VERSION = 1
_WRAP_AAD_PREFIX = b"mqstore-wrap-v1:"
_KEY_FILE_HEADER = "mqstore-kek-v1"
#: Length of a KEK fingerprint (:func:`kek_fingerprint`).
KEK_FINGERPRINT_BYTES = 16
_FINGERPRINT_LABEL = b"mqstore kek fingerprint v1"


@runtime_checkable
class KeyProvider(Protocol):
    """Wraps and unwraps small secrets (namespace keys) under a key-encryption key."""

    @property
    def description(self) -> str:
        """Where the KEK comes from, for error messages (never the key itself)."""
        ...

    def wrap(self, secret: bytes, context: bytes) -> bytes:
        """Encrypt ``secret``; ``context`` is bound to the result (unwrap must give the same one)."""
        ...

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        """Decrypt what :meth:`wrap` produced; raise :class:`~mqstore.errors.WrongKey` if this
        provider's KEK did not wrap it or the context differs."""
        ...


class AesKeyProvider:
    """A provider holding a 32-byte KEK in memory; wraps with AES-256-GCM.

    Wrapped form: ``version (1) | nonce (12) | ciphertext + tag``; the AAD is a fixed prefix plus
    the caller's context, so a wrapped key copied to another key id does not unwrap.
    """

    def __init__(self, kek: bytes, description: str = "an in-memory key") -> None:
        if not isinstance(kek, bytes) or len(kek) != KEK_BYTES:
            raise KeyFileError(f"a key-encryption key is {KEK_BYTES} bytes")
        self._aead = AESGCM(kek)
        self._description = description
        # HMAC-SHA256 is a PRF keyed by the KEK: its output names the key without revealing it.
        self._fingerprint = hmac.new(kek, _FINGERPRINT_LABEL, hashlib.sha256).digest()[:KEK_FINGERPRINT_BYTES]

    @property
    def description(self) -> str:
        return self._description

    def fingerprint(self) -> bytes:
        """HMAC-SHA256(KEK, "mqstore kek fingerprint v1"), first 16 bytes: the same for every
        provider holding this KEK, different for another KEK, and no help to find the KEK."""
        return self._fingerprint

    def wrap(self, secret: bytes, context: bytes) -> bytes:
        nonce = os.urandom(12)
        return bytes([_WRAP_VERSION]) + nonce + self._aead.encrypt(nonce, secret, _WRAP_AAD_PREFIX + context)

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        if len(wrapped) < 1 + 12 + 16 or wrapped[0] != _WRAP_VERSION:
            raise WrongKey(f"wrapped key for {context!r} is malformed (unknown version or too short)")
        try:
            return self._aead.decrypt(wrapped[1:13], wrapped[13:], _WRAP_AAD_PREFIX + context)
        except InvalidTag:
            raise WrongKey(
                f"the key-encryption key from {self._description} does not open {context!r}: "
                "this store was created with a different key"
            ) from None


def _check_secret_mode(path: Path, mode: int, what: str) -> None:
    # Refuse what other local users could read or change. Group read stays allowed so a
    # service group may share a key file; world access and group write never are.
    if not stat.S_ISREG(mode):
        raise KeyFileError(f"{what} {path} is not a regular file")
    if mode & 0o007:
        raise KeyFileError(
            f"{what} {path} is accessible to every user (mode {stat.S_IMODE(mode):04o}); run `chmod 600 {path}`"
        )
    if mode & 0o020:
        raise KeyFileError(
            f"{what} {path} is writable by its group (mode {stat.S_IMODE(mode):04o}); run `chmod 600 {path}`"
        )


def _open_private(p: Path, what: str, *, follow: bool) -> int:
    """An open descriptor of private file ``p`` (blocking, ready to read), after the mode check;
    ``follow``: whether a symbolic link is followed (else refused). Raises KeyFileError."""
    try:
        # O_NONBLOCK: opening a FIFO (or a device) must not block waiting for a writer; what is
        # not a regular file is refused below, before anything is read from it.
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW))
    except FileNotFoundError:
        raise KeyFileError(f"{what} {p} does not exist") from None
    except OSError as exc:
        raise KeyFileError(f"cannot open {what} {p}: {exc.strerror}") from None
    try:
        _check_secret_mode(p, os.fstat(fd).st_mode, what)
        os.set_blocking(fd, True)  # a regular file: read it normally
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_private_file(path: str | os.PathLike[str], what: str, size_max: int = 1 << 20) -> bytes:
    """The bytes of a private key file other than mqstore's own secret files (a node's TLS key),
    refusing one other users could read or change, as :func:`read_secret_file` does (group read
    allowed). A symbolic link is followed (secret stores mount keys through them): the mode
    checked is the file's it leads to. Raises KeyFileError."""
    p = Path(path)
    fd = _open_private(p, what, follow=True)
    try:
        chunks = []
        size = 0
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > size_max:
                raise KeyFileError(f"{what} {p} is over {size_max} bytes: not a key")
        return b"".join(chunks)
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {p}: {exc.strerror}") from None
    finally:
        os.close(fd)


def read_secret_file(path: str | os.PathLike[str], what: str) -> tuple[str, bytes]:
    """Read a ``<header>:<hex>`` secret file (a KEK, an audit signing key), refusing symlinks,
    unsafe permissions and malformed contents; returns the header and the key bytes."""
    p = Path(path)
    fd = _open_private(p, what, follow=False)
    try:
        raw = os.read(fd, 4096)
    finally:
        os.close(fd)
    header, _, hex_key = raw.decode("ascii", errors="replace").strip().partition(":")
    try:
        return header, bytes.fromhex(hex_key.strip())
    except ValueError:
        raise KeyFileError(f"{what} {p}: the key is not hexadecimal") from None


def write_secret_file(path: str | os.PathLike[str], what: str, header: str, key: bytes) -> Path:
    """Create ``path`` (mode 0600, durably, never overwriting a file) holding ``<header>:<hex>``."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{what} {p} already exists; refusing to overwrite a key") from None
    except OSError as exc:
        raise KeyFileError(f"cannot create {what} {p}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)  # the umask could have narrowed it; never widened, but be explicit
        os.write(fd, f"{header}:{key.hex()}\n".encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    dir_fd = os.open(p.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the new name must survive a crash too
    finally:
        os.close(dir_fd)
    return p


def read_key_file(path: str | os.PathLike[str]) -> bytes:
    """Read a KEK from a key file, refusing unsafe permissions and malformed contents."""
    header, kek = read_secret_file(path, "key file")
    if header != _KEY_FILE_HEADER:
        raise KeyFileError(f"key file {path} is not an mqstore key file (expected '{_KEY_FILE_HEADER}:<hex>')")
    if len(kek) != KEK_BYTES:
        raise KeyFileError(f"key file {path}: the key is {len(kek)} bytes, expected {KEK_BYTES}")
    return kek


def create_key_file(path: str | os.PathLike[str]) -> Path:
    """Create a new random KEK in ``path`` with mode 0600. Never overwrites an existing file."""
    return write_secret_file(path, "key file", _KEY_FILE_HEADER, os.urandom(KEK_BYTES))


def kek_fingerprint(provider: object) -> bytes:
    """The fingerprint of ``provider``'s KEK (see :meth:`AesKeyProvider.fingerprint`); empty
    when the provider has no ``fingerprint()`` (a KMS provider with just ``wrap``/``unwrap``:
    its wrapping is randomized, so nothing common to every node holding the same KEK can be
    derived from it), and then no peer is refused for its key. Raises
    :class:`~mqstore.errors.InvalidArgument` for a fingerprint that is not 8 to 64 bytes."""
    method = getattr(provider, "fingerprint", None)
    if method is None:
        return b""
    value = method()
    if not isinstance(value, bytes) or not 8 <= len(value) <= 64:
        raise InvalidArgument(
            f"key provider {getattr(provider, 'description', type(provider).__name__)}: fingerprint() "
            "must return 8 to 64 bytes"
        )
    return value


class FileKeyProvider(AesKeyProvider):
    """The default provider: a KEK read from a key file (mode 0600, see :func:`read_key_file`)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        super().__init__(read_key_file(self.path), description=f"key file {self.path}")


__all__ = [
    "KEK_BYTES",
    "KEK_FINGERPRINT_BYTES",
    "AesKeyProvider",
    "FileKeyProvider",
    "KeyProvider",
    "create_key_file",
    "kek_fingerprint",
    "read_key_file",
    "read_private_file",
]
