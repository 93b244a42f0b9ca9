"""Who is calling (authentication) and whether they may (authorization), for a node's gRPC calls.

Authentication turns a call's credentials into an :class:`~mqstore.actor.Actor`:

1. a bearer token (``authorization: Bearer <token>`` metadata) found in the tokens file: the
   token's name, roles and namespaces (``auth="token"``);
2. else a verified client certificate (``mqstore://client/<name>?roles=...``): its name, with the
   roles of ``[[auth.clients]]`` for that name when the config lists it, else the roles the
   certificate carries (``auth="mtls"``); a node's certificate (another member) is a reader;
3. else, when the node allows it (``auth.anonymous``; by default only insecure nodes without a
   tokens file), the actor ``anonymous`` with every role (``auth="none"``);
4. else UNAUTHENTICATED.

The actor of the call being served is in :data:`current_actor` (a context variable) while the
servicer runs, so the queue code can read it without every layer passing it on.

Authorization maps each RPC to the permission it needs (:data:`METHODS`) and checks it, in the
namespaces the request names, before the call reaches the queue. A request that names no
namespace where one could be named (``Lease`` without a namespace, ``Stats``) covers every
namespace, so an actor limited to some namespaces must name one. Calls that name only a message
id or a lease token are checked in the namespace of that message (looked up by the node); such an
actor refused there is not told the namespace, nor whether the message exists (the edge says
"not found, or not in the namespaces this identity may use"; the audit record has the detail).
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mqstore.actor import ROLES, Actor
from mqstore.config import NodeConfig
from mqstore.errors import PermissionDenied, Unauthenticated
from mqstore.security.certs import Identity, identity_from_pem
from mqstore.security.tls import AUTHORIZATION, BEARER
from mqstore.security.tokens import TokenStore

#: The actor of the gRPC call being served (None outside a call).
current_actor: contextvars.ContextVar[Actor | None] = contextvars.ContextVar("mqstore_current_actor", default=None)
#: The node id a peer's certificate names, while a Raft call is served over TLS (None: insecure).
current_peer_node: contextvars.ContextVar[int | None] = contextvars.ContextVar("mqstore_peer_node", default=None)

ALL_ROLES = frozenset(ROLES)
#: The roles of a caller presenting a node's certificate (another member of the cluster).
NODE_ROLES = frozenset({"reader"})


# --- the permission each RPC needs --------------------------------------------------------------------

#: How a request names the namespaces it touches: a list, or None for "every namespace".
Namespaces = Callable[[Any], "list[str] | None"]


@dataclass(frozen=True, slots=True)
class Method:
    """What one RPC needs. ``kind``: ``client`` (authenticated and authorized), ``peer`` (a
    cluster node's certificate) or ``open`` (health checks, reflection). ``namespaces`` says
    which namespaces the request touches; ``lookup`` says the request names ``messages`` (ids)
    or ``tokens`` (lease tokens) whose namespaces the node looks up; ``keys`` extracts them.
    ``copies_store``: the call copies the node's whole store (disk and I/O of its size), so the
    edge lets only a few run at once on a node. ``nodes``: a caller presenting a cluster node's
    certificate may make the call without ``permission`` (a peer repairing its log)."""

    kind: str
    permission: str = ""
    namespaces: Namespaces | None = None
    lookup: str = ""
    keys: Callable[[Any], Sequence[Any]] | None = None
    enqueue: bool = False
    write: bool = False
    copies_store: bool = False
    nodes: bool = False


def _every(_: Any) -> list[str] | None:
    return None


def _optional_ns(r: Any) -> list[str] | None:
    return [r.namespace] if r.namespace else None


def _named_ns(r: Any) -> list[str]:
    return [r.namespace]


def _message_ns(r: Any) -> list[str]:
    return [r.message.namespace or "default"]


def _batch_ns(r: Any) -> list[str]:
    return sorted({m.namespace or "default" for m in r.messages})


_Q = "/mqstore.v1.Queue/"
_A = "/mqstore.v1.Admin/"
_C = "/mqstore.v1.Compliance/"

METHODS: dict[str, Method] = {
    _Q + "Enqueue": Method("client", "enqueue", _message_ns, enqueue=True, write=True),
    _Q + "EnqueueBatch": Method("client", "enqueue", _batch_ns, enqueue=True, write=True),
    _Q + "EnqueueStream": Method("client", "enqueue", _batch_ns, enqueue=True, write=True),
    _Q + "Lease": Method("client", "lease", _optional_ns, write=True),
    _Q + "Ack": Method("client", "settle", lookup="tokens", keys=lambda r: [r.token], write=True),
    _Q + "Defer": Method("client", "settle", lookup="tokens", keys=lambda r: [r.token], write=True),
    _Q + "Bounce": Method("client", "settle", lookup="tokens", keys=lambda r: [r.token], write=True),
    _Q + "AckMany": Method("client", "settle", lookup="tokens", keys=lambda r: list(r.tokens), write=True),
    _Q + "Get": Method("client", "read", lookup="messages", keys=lambda r: [r.message_id]),
    _Q + "Hold": Method("client", "hold", lookup="messages", keys=lambda r: [r.message_id], write=True),
    _Q + "Release": Method("client", "release", lookup="messages", keys=lambda r: [r.message_id], write=True),
    _Q + "Requeue": Method("client", "requeue", lookup="messages", keys=lambda r: [r.message_id], write=True),
    _Q + "Delete": Method("client", "delete", lookup="messages", keys=lambda r: [r.message_id], write=True),
    # Bouncing a whole message ends its delivery for good, as deleting it does: ``delete``.
    _Q + "BounceMessage": Method("client", "delete", lookup="messages", keys=lambda r: [r.message_id], write=True),
    _Q + "List": Method("client", "read", _optional_ns),
    _Q + "QShape": Method("client", "read", _optional_ns),
    _Q + "Stats": Method("client", "read", _every),
    _Q + "SetNamespacePolicy": Method("client", "policy", _named_ns, write=True),
    _A + "Status": Method("client", "read", _every),
    _A + "ChangeMembership": Method("client", "membership", write=True),
    _A + "TransferLeader": Method("client", "membership", write=True),
    _A + "Snapshot": Method("client", "membership", write=True),
    # Raw log records hold everything, the audit log's entries included: the ``audit``
    # permission (role compliance), or a node's certificate (a peer repairing damaged records).
    _A + "ReadRecords": Method("client", "audit", _every, nodes=True),
    _A + "Repair": Method("client", "membership", write=True),
    _A + "Verify": Method("client", "read", _every, copies_store=True),
    _A + "Backup": Method("client", "membership", copies_store=True),
    _A + "MessageHistory": Method("client", "read", lookup="messages", keys=lambda r: [r.message_id]),
    _A + "StateShape": Method("client", "read", _optional_ns),
    # The Compliance service: what the queue checks again deeper (mqstore/queue/machine.py), so
    # the edge never refuses what the roles grant nor lets through what the queue will refuse.
    _C + "SetPolicy": Method("client", "policy", _named_ns, write=True),
    _C + "GetPolicy": Method("client", "read", _named_ns),
    _C + "AddLegalHold": Method("client", "legal_hold", lookup="messages", keys=lambda r: [r.message_id], write=True),
    _C + "RemoveLegalHold": Method("client", "legal_hold", lookup="messages", keys=lambda r: [r.message_id],
                                   write=True),
    _C + "ExtendRetention": Method("client", "retention", lookup="messages", keys=lambda r: [r.message_id],
                                   write=True),
    _C + "DropNamespace": Method("client", "delete", _named_ns, write=True),
    _C + "CompactMessages": Method("client", "delete", lookup="messages", keys=lambda r: list(r.message_ids),
                                   write=True),
    _C + "RotateKey": Method("client", "keys", _named_ns, write=True),
    # A key id names no namespace the edge can look up: shredding needs ``keys`` everywhere.
    _C + "ShredKey": Method("client", "keys", _every, write=True),
    _C + "ListKeys": Method("client", "read", _every),
    # The audit log covers every namespace (and who did what in each): the ``audit`` permission
    # (role compliance), in every namespace; a checkpoint is signed and appended (a write).
    _C + "AuditRecords": Method("client", "audit", _every),
    _C + "AuditQuery": Method("client", "audit", _every),
    _C + "AuditHead": Method("client", "audit", _every),
    _C + "AuditCheckpoint": Method("client", "audit", _every, write=True),
    "/mqstore.v1.Raft/Send": Method("peer"),
    "/mqstore.v1.Raft/InstallSnapshot": Method("peer"),
    "/mqstore.v1.Raft/RecordDenials": Method("peer"),
    "/grpc.health.v1.Health/Check": Method("open"),
    "/grpc.health.v1.Health/Watch": Method("open"),
    "/grpc.health.v1.Health/List": Method("open"),
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": Method("open"),
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": Method("open"),
}

#: RPCs not in METHODS (added to a .proto and not yet here) need the admin role's ``membership``:
#: closed by default, never open. Every RPC of mqstore's own protos has its entry (a test checks
#: it: a missing one made whole services admin-only); add others with :func:`register_method`.
UNKNOWN_METHOD = Method("client", "membership", write=True)


def register_method(path: str, method: Method) -> None:
    """Declare the permission a new RPC (``/package.Service/Method``) needs."""
    METHODS[path] = method


def method_rule(path: str) -> Method:
    return METHODS.get(path, UNKNOWN_METHOD)


def describe(permission: str) -> str:
    roles = sorted(r for r, perms in ROLES.items() if permission in perms)
    return f"the '{permission}' permission (role {' or '.join(roles)})" if roles else f"'{permission}'"


def check(actor: Actor, permission: str, namespace: str | None = None) -> None:
    """Raise PermissionDenied unless ``actor`` holds ``permission`` (in ``namespace``; None: in
    every namespace)."""
    if actor.can(permission, namespace) and (namespace is not None or actor.namespaces is None):
        return
    who = f"{actor.name!r} ({actor.auth}, roles {', '.join(sorted(actor.roles)) or 'none'}"
    who += "" if actor.namespaces is None else f", namespaces {', '.join(sorted(actor.namespaces))}"
    who += ")"
    if permission not in actor.permissions():
        raise PermissionDenied(f"{who} may not do this: it needs {describe(permission)}")
    if namespace is None:
        raise PermissionDenied(f"{who} may only act in its namespaces: name one (this request covers every namespace)")
    raise PermissionDenied(f"{who} may not act in namespace {namespace!r}")


# --- authentication ------------------------------------------------------------------------------------


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == AUTHORIZATION:
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
            if not text.startswith(BEARER):
                raise Unauthenticated("the authorization metadata must be 'Bearer <token>'")
            return text[len(BEARER):].strip()
    return None


def peer_identity(context: Any) -> Identity | None:
    """The identity in the verified certificate of the caller (None: no certificate)."""
    auth = context.auth_context()
    pem = auth.get("x509_pem_cert") if auth else None
    if not pem:
        return None
    return identity_from_pem(pem[0])


class Authenticator:
    """Credentials of a call -> an Actor (see the module's docstring)."""

    def __init__(self, config: NodeConfig) -> None:
        auth = config.auth
        self.tokens = TokenStore(auth.tokens_file) if auth.tokens_file is not None else None
        self.anonymous = auth.anonymous if auth.anonymous is not None else (config.insecure and self.tokens is None)
        self.clients = {c.name: c for c in auth.clients}
        self.tls = config.tls is not None
        #: Node ids removed from the cluster (the node fills it in): their certificates admit nothing.
        self.removed: Callable[[], frozenset[int]] = frozenset

    @functools.lru_cache(maxsize=4096)  # noqa: B019 (one Authenticator per node, kept for its life)
    def _actor(self, name: str, roles: frozenset[str], auth: str, namespaces: frozenset[str] | None,
               source: str) -> Actor:
        return Actor(name, roles, auth=auth, namespaces=namespaces, source=source)

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]] | None, context: Any) -> Actor:
        source = context.peer() or "network"
        token = bearer_token(metadata)
        if token is not None:
            if self.tokens is None:
                raise Unauthenticated("this node accepts no bearer tokens (its config has no auth.tokens_file)")
            info = self.tokens.lookup(token)
            if info is None:
                raise Unauthenticated("unknown or revoked token")
            return self._actor(info.name, info.roles, "token", info.namespaces, source)
        ident = peer_identity(context) if self.tls else None
        if ident is not None:
            if ident.kind == "node":
                if ident.node_id in self.removed():
                    raise Unauthenticated(removed_node_refusal(ident.node_id))
                # Nodes read from each other (repair fetches records from peers); they hold the
                # cluster's key anyway, so reading grants them nothing they lack.
                return self._actor(ident.name, NODE_ROLES, "mtls", None, source)
            configured = self.clients.get(ident.name)
            if configured is not None:
                return self._actor(ident.name, configured.roles, "mtls", configured.namespaces, source)
            return self._actor(ident.name, ident.roles or frozenset(), "mtls", ident.namespaces, source)
        if self.tls and context.auth_context().get("x509_pem_cert"):
            raise Unauthenticated(
                "the client certificate names no mqstore client (a SAN URI mqstore://client/<name>): issue one "
                "with `mqstore certs issue client`"
            )
        if self.anonymous:
            return self._actor("anonymous", ALL_ROLES, "none", None, source)
        raise Unauthenticated(
            "no credentials: send a bearer token (authorization: Bearer <token>) or connect with a client certificate"
        )


def removed_node_refusal(node_id: int | None) -> str:
    return (f"node {node_id} was removed from this cluster: its certificate admits it no more (a removed "
            "node id is never a member again)")


def unauthenticated_actor(context: Any) -> Actor:
    """The actor audit records name for a caller who could not be authenticated."""
    try:
        source = context.peer() or "network"
    except Exception:
        source = "network"
    return Actor("unauthenticated", frozenset(), auth="none", source=source[:255])


__all__ = [
    "METHODS",
    "NODE_ROLES",
    "UNKNOWN_METHOD",
    "Authenticator",
    "Method",
    "bearer_token",
    "check",
    "current_actor",
    "current_peer_node",
    "describe",
    "method_rule",
    "peer_identity",
    "register_method",
    "removed_node_refusal",
    "unauthenticated_actor",
]
