"""Bearer tokens, stored hashed (``mqstore tokens add|list|remove``).

A token is ``mqs_`` + 32 random bytes (base64url). The tokens file (JSON, mode 0600) keeps, per
token, a name, roles, optional namespaces, and HMAC-SHA256(salt, token) with a random salt per
file: a copy of the file does not reveal any token, and the same token hashes differently in two
files. A keyed fast hash rather than scrypt: tokens carry 256 random bits, so there is nothing to
guess, and a node checks one on every call (microseconds, not the tens of milliseconds a password
hash costs).

A node re-reads the file when it changes (checked at most once a second), so tokens added or
removed take effect without a restart.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mqstore.crypto.providers import read_private_file
from mqstore.errors import InvalidArgument, KeyFileError
from mqstore.security.certs import check_granted_namespaces, check_name, check_namespaces, check_roles

FORMAT = "mqstore-tokens/1"
TOKEN_PREFIX = "mqs_"
TOKENS_MAX = 10_000
TOKEN_BYTES_MAX = 256
_RELOAD_CHECK_S = 1.0
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TokenInfo:
    name: str
    roles: frozenset[str]
    namespaces: frozenset[str] | None
    created: str
    digest: str


class TokensFileUnsafe(InvalidArgument):
    """The tokens file is missing, or other users could change or read it."""


class TokenStore:
    """The tokens file at ``path``. Thread safe."""

    def __init__(self, path: str | os.PathLike[str], *, create: bool = False) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._salt = b""
        self._by_digest: dict[str, TokenInfo] = {}
        self._stamp: tuple[int, ...] | None = None
        self._checked = 0.0
        if not self.path.exists():
            if not create:
                raise InvalidArgument(
                    f"tokens file {self.path} does not exist: create it with "
                    f"`mqstore tokens add --file {self.path} NAME --roles ROLE`"
                )
            self._salt = secrets.token_bytes(32)
            self._save([])
        self._load()

    # --- file ------------------------------------------------------------------------------------

    def _file_stamp(self) -> tuple[int, ...] | None:
        """What tells a changed file: its content (time, size), its mode (a chmod, to fix or to
        open it up) and the file itself (replaced by a rename)."""
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_mode, st.st_ino, st.st_ctime_ns

    def _load(self) -> None:
        stamp = self._file_stamp()
        try:
            # Refused when other local users could change it (they would give themselves a token:
            # the salt is in the file) or read it, as a key file is.
            text = read_private_file(self.path, "tokens file", size_max=64 << 20)
        except KeyFileError as exc:
            raise TokensFileUnsafe(str(exc)) from None
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise InvalidArgument(f"tokens file {self.path} cannot be read: {exc}") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT or not isinstance(raw.get("tokens"), list):
            raise InvalidArgument(f"tokens file {self.path} is not a {FORMAT} file")
        try:
            salt = bytes.fromhex(raw["salt"])
            by_digest = {}
            for i, t in enumerate(raw["tokens"]):
                info = TokenInfo(
                    check_name(t["name"], f"tokens[{i}].name"),
                    check_roles(t["roles"], f"tokens[{i}].roles"),
                    check_namespaces(t.get("namespaces"), f"tokens[{i}].namespaces"),
                    str(t.get("created", "")),
                    str(t["digest"]),
                )
                by_digest[info.digest] = info
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgument(f"tokens file {self.path} is damaged: {exc}") from None
        if len(salt) < 16:
            raise InvalidArgument(f"tokens file {self.path} is damaged: the salt is too short")
        self._salt, self._by_digest, self._stamp = salt, by_digest, stamp

    def _save(self, tokens: list[TokenInfo]) -> None:
        body = {
            "format": FORMAT,
            "salt": self._salt.hex(),
            "tokens": [
                {"name": t.name, "roles": sorted(t.roles),
                 "namespaces": None if t.namespaces is None else sorted(t.namespaces),
                 "created": t.created, "digest": t.digest}
                for t in tokens
            ],
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(body, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < _RELOAD_CHECK_S:
            return
        self._checked = now
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return
        try:
            self._load()
        except TokensFileUnsafe as exc:
            # Gone (removing the file revokes every token), or open to other users (anyone
            # could have added a token to it): no token is trusted until it is fixed.
            self._by_digest, self._stamp = {}, stamp
            log.error("%s: every token is refused until it is fixed", exc)
        except InvalidArgument as exc:
            # A half-edited file must not lock everyone out: the tokens read last stay valid
            # (a token removed in this edit too) until the file reads again.
            self._stamp = stamp
            log.error("%s: the tokens read before stay valid until it reads again (`mqstore tokens list "
                      "--file %s` checks it)", exc, self.path)

    def digest(self, token: str) -> str:
        return hmac.new(self._salt, token.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()

    # --- operations ------------------------------------------------------------------------------

    def lookup(self, token: str) -> TokenInfo | None:
        """The token's entry, or None when it is unknown (or was removed)."""
        if not token or len(token) > TOKEN_BYTES_MAX:
            return None
        with self._lock:
            self._refresh()
            return self._by_digest.get(self.digest(token))

    def add(self, name: str, roles: list[str] | tuple[str, ...],
            namespaces: list[str] | tuple[str, ...] | None = None) -> str:
        """Create a token; returns it (shown once: only its hash is kept)."""
        check_name(name, "a token's name")
        role_set = check_roles(list(roles))
        if not role_set:
            raise InvalidArgument("a token needs at least one role")
        spaces = check_granted_namespaces(None if namespaces is None else list(namespaces))
        with self._lock:
            self._load()
            if any(t.name == name for t in self._by_digest.values()):
                raise InvalidArgument(f"a token named {name!r} exists: remove it first")
            if len(self._by_digest) >= TOKENS_MAX:
                raise InvalidArgument(f"the tokens file holds {TOKENS_MAX} tokens, the limit")
            token = TOKEN_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
            created = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            info = TokenInfo(name, role_set, spaces, created, self.digest(token))
            self._save([*self._by_digest.values(), info])
            self._load()
        return token

    def remove(self, name: str) -> bool:
        with self._lock:
            self._load()
            keep = [t for t in self._by_digest.values() if t.name != name]
            if len(keep) == len(self._by_digest):
                return False
            self._save(keep)
            self._load()
        return True

    def list(self) -> list[TokenInfo]:
        with self._lock:
            self._load()
            return sorted(self._by_digest.values(), key=lambda t: t.name)


def token_dict(t: TokenInfo) -> dict[str, Any]:
    return {"name": t.name, "roles": sorted(t.roles),
            "namespaces": None if t.namespaces is None else sorted(t.namespaces), "created": t.created}


__all__ = ["TOKEN_PREFIX", "TokenInfo", "TokenStore", "token_dict"]
