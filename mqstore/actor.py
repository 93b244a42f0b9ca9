"""Who is asking: actors, roles and permissions.

Every mutation takes an actor. Embedded use without one acts as :data:`LOCAL_ADMIN` (every role,
but still bound by COMPLIANCE immutability: nobody can lift that). Network callers get an actor
from how they authenticated (client certificate, bearer token).

Roles grant permissions, optionally only in some namespaces:

=============  ===========================================================================
role           permissions
=============  ===========================================================================
producer       enqueue
worker         lease, settle (ack, defer, bounce)
reader         read (get, list, qshape, stats, audit records)
admin          hold, release, requeue, delete, policy, membership, keys
compliance     bypass_governance, legal_hold, retention (extend), read, audit
=============  ===========================================================================
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from mqstore.errors import Corruption, InvalidArgument

ROLES: dict[str, frozenset[str]] = {
    "producer": frozenset({"enqueue"}),
    "worker": frozenset({"lease", "settle"}),
    "reader": frozenset({"read"}),
    "admin": frozenset({"hold", "release", "requeue", "delete", "policy", "membership", "keys", "read"}),
    "compliance": frozenset({"bypass_governance", "legal_hold", "retention", "read", "audit"}),
}
PERMISSIONS: frozenset[str] = frozenset().union(*ROLES.values())
AUTH_METHODS = ("local", "token", "mtls", "none")
_NAME_BYTES_MAX = 128
#: Encoded lengths an actor's fields must fit (see :meth:`Actor.encode`): a field over its limit
#: is refused when the actor is made, never cut short in a log entry (which could not be decoded).
SOURCE_BYTES_MAX = 255
NAMESPACES_BYTES_MAX = 65_534  # the namespace names joined with commas, after a one-byte marker


@dataclass(frozen=True, slots=True)
class Actor:
    """An authenticated identity. ``namespaces`` limits its roles to those namespaces (None:
    all). ``source`` says where the request came from (``embedded``, ``cli``, a peer address)."""

    name: str
    roles: frozenset[str]
    auth: str = "local"
    namespaces: frozenset[str] | None = None
    source: str = "embedded"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or len(_utf8(self.name, "name")) > _NAME_BYTES_MAX:
            raise InvalidArgument(f"an actor's name is 1..{_NAME_BYTES_MAX} bytes")
        unknown = set(self.roles) - set(ROLES)
        if unknown:
            raise InvalidArgument(f"unknown role(s) {sorted(unknown)}; roles are {sorted(ROLES)}")
        if self.auth not in AUTH_METHODS:
            raise InvalidArgument(f"auth must be one of {AUTH_METHODS}, not {self.auth!r}")
        if not isinstance(self.source, str) or len(_utf8(self.source, "source")) > SOURCE_BYTES_MAX:
            raise InvalidArgument(f"an actor's source is a string of at most {SOURCE_BYTES_MAX} bytes (UTF-8)")
        if self.namespaces is not None:
            if isinstance(self.namespaces, str) or not all(
                    isinstance(ns, str) and ns and "," not in ns for ns in self.namespaces):
                raise InvalidArgument("an actor's namespaces are a set of non-empty names without commas (or None)")
            joined = ",".join(sorted(self.namespaces))
            if len(_utf8(joined, "namespaces")) > NAMESPACES_BYTES_MAX:
                raise InvalidArgument(f"an actor's namespaces take at most {NAMESPACES_BYTES_MAX} bytes together")

    def permissions(self) -> frozenset[str]:
        return frozenset().union(*(ROLES[r] for r in self.roles)) if self.roles else frozenset()

    def can(self, permission: str, namespace: str | None = None) -> bool:
        """Whether this actor holds ``permission`` (in ``namespace`` when one is given)."""
        if permission not in PERMISSIONS:
            raise AssertionError(f"unknown permission {permission!r}")
        if permission not in self.permissions():
            return False
        return self.namespaces is None or namespace is None or namespace in self.namespaces

    # --- encoding (actors travel in log entries so every replica audits the same thing) ----------

    def encode(self) -> bytes:
        name = self.name.encode()
        source = self.source.encode()
        roles = ",".join(sorted(self.roles)).encode()
        spaces = b"\x00" if self.namespaces is None else b"\x01" + ",".join(sorted(self.namespaces)).encode()
        return (
            struct.pack("<BB", 1, AUTH_METHODS.index(self.auth))
            + bytes((len(name),)) + name
            + bytes((len(source),)) + source
            + struct.pack("<H", len(roles)) + roles
            + struct.pack("<H", len(spaces)) + spaces
        )

    @classmethod
    def decode(cls, raw: bytes) -> tuple[Actor, int]:
        """The actor encoded at the start of ``raw`` and how many bytes it took."""
        try:
            version, auth = struct.unpack_from("<BB", raw)
            off = 2
            n = raw[off]
            name = raw[off + 1 : off + 1 + n].decode()
            off += 1 + n
            n = raw[off]
            source = raw[off + 1 : off + 1 + n].decode()
            off += 1 + n
            (n,) = struct.unpack_from("<H", raw, off)
            roles = raw[off + 2 : off + 2 + n].decode()
            off += 2 + n
            (n,) = struct.unpack_from("<H", raw, off)
            spaces = raw[off + 2 : off + 2 + n]
            off += 2 + n
        except (struct.error, IndexError, UnicodeDecodeError):
            raise Corruption("malformed actor") from None
        if version != 1 or auth >= len(AUTH_METHODS) or not spaces:
            raise Corruption("malformed actor")
        try:
            namespaces = None if spaces[:1] == b"\x00" else frozenset(x for x in spaces[1:].decode().split(",") if x)
            actor = cls(name, frozenset(r for r in roles.split(",") if r), AUTH_METHODS[auth], namespaces, source)
        except (UnicodeDecodeError, InvalidArgument) as exc:  # an unknown role, an empty name...
            raise Corruption(f"malformed actor: {exc}") from None
        return actor, off


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:
        raise InvalidArgument(f"an actor's {what} is not valid Unicode (a lone surrogate)") from None


#: The local administrator: embedded use without an explicit actor. Holds every role, and is
#: still bound by COMPLIANCE mode.
LOCAL_ADMIN = Actor("local-admin", frozenset(ROLES), auth="local", source="embedded")


__all__ = ["AUTH_METHODS", "LOCAL_ADMIN", "PERMISSIONS", "ROLES", "Actor"]
