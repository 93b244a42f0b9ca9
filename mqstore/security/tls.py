"""TLS credentials for nodes, peers and clients, and bearer tokens on client channels.

A node with TLS serves every gRPC service (Queue, Admin, Raft, health, reflection) on one port
with **mutual** TLS: every connection, a peer's or a client's, must present a certificate signed
by the cluster CA. (gRPC's Python API can either require a client certificate or not ask for one
at all; it cannot ask for an optional one, and a peer must prove which node it is, so the port
requires one.) A client's certificate admits it; its identity, and so its roles, come from a
bearer token when it sends one, else from the certificate (see :mod:`mqstore.security.auth`).

Peers dial each other with the peer's DNS name ``node-<id>.mqstore`` as the TLS target name, so
the handshake checks the dialed node's identity whatever address or proxy the link goes through;
the receiving node checks the sender's certificate against each message's ``from``.

A node's key is refused when other users can read it or its group can change it (as the KEK is):
whoever reads it can join the cluster as that node.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from mqstore.config import TLSFiles
from mqstore.crypto.providers import read_private_file
from mqstore.errors import InvalidArgument, KeyFileError
from mqstore.node.transport import CHANNEL_OPTIONS
from mqstore.security.certs import TLSWording, check_tls_material, node_dns_name

AUTHORIZATION = "authorization"
BEARER = "Bearer "


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read the {what} {path}: {exc.strerror}") from None


def _read_node_key(path: Path) -> bytes:
    """A node's TLS key, refused when other users could read or change it (as the KEK is)."""
    try:
        return read_private_file(path, "the node's TLS key (tls.key)")
    except KeyFileError as exc:
        raise InvalidArgument(str(exc)) from None


# --- node side ---------------------------------------------------------------------------------------


def server_credentials(tls: TLSFiles) -> grpc.ServerCredentials:
    """Mutual TLS for a node's port: its certificate, and the cluster CA for every caller's."""
    return grpc.ssl_server_credentials(
        [(_read_node_key(tls.key), _read(tls.cert, "TLS certificate"))],
        root_certificates=_read(tls.ca, "CA certificate"),
        require_client_auth=True,
    )


class PeerChannelFactory:
    """Channels from a node to its peers: mutual TLS with the node's own certificate; each peer
    is verified as ``node-<id>.mqstore`` (see :meth:`for_peer`)."""

    def __init__(self, tls: TLSFiles, options: Sequence[tuple[str, Any]] = CHANNEL_OPTIONS) -> None:
        self.credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(tls.ca, "CA certificate"),
            private_key=_read_node_key(tls.key),
            certificate_chain=_read(tls.cert, "TLS certificate"),
        )
        self.options = list(options)

    def __call__(self, address: str) -> grpc.Channel:
        return grpc.secure_channel(address, self.credentials, options=self.options)

    def for_peer(self, address: str, peer_id: int) -> grpc.Channel:
        options = [*self.options, ("grpc.ssl_target_name_override", node_dns_name(peer_id))]
        return grpc.secure_channel(address, self.credentials, options=options)


def presented_node_id(tls: TLSFiles, address: str, timeout: float = 2.0) -> int | None:
    """The node id in the certificate the node at ``address`` presents (verified against the
    cluster CA, this node's certificate offered as the client's), whatever id it was dialed as;
    None when it names no node. Raises OSError (ssl.SSLError included) when it cannot be reached
    or the handshake fails. For a check that must tell "another node answers there" from "nothing
    answers there", which a channel dialed as a given node id cannot (both fail its handshake)."""
    import socket
    import ssl

    from cryptography import x509

    from mqstore.security.certs import identity_of

    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # the identity is read from the certificate below
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(tls.ca))
    context.load_cert_chain(str(tls.cert), str(tls.key))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=timeout) as raw, \
            context.wrap_socket(raw, server_hostname=None) as conn:
        der = conn.getpeercert(binary_form=True)
    if der is None:
        return None
    ident = identity_of(x509.load_der_x509_certificate(der))
    return ident.node_id if ident is not None and ident.kind == "node" else None


# --- client side -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientTLS:
    """What a client needs to reach TLS nodes: the cluster CA, and its own certificate and key
    (nodes require one). ``server_name`` overrides the name checked in the node's certificate
    (default: the host of the address dialed)."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise InvalidArgument("give both a client certificate and its key, or neither")
        if self.cert is None or self.key is None:
            # Refused here rather than by every node's handshake, which a client only sees as
            # "Socket closed" after retrying until its timeout.
            raise InvalidArgument(
                "mqstore nodes require a client certificate on every TLS connection: give the certificate and "
                "its key (MQSTORE_CERT and MQSTORE_KEY); a bearer token only sets the roles the calls get"
            )
        ca_pem = _read(self.ca, "CA certificate")
        key_pem = _read(self.key, "client key")
        cert_pem = _read(self.cert, "client certificate")
        check_client_files(self.ca, ca_pem, self.cert, cert_pem, self.key, key_pem)
        return grpc.ssl_channel_credentials(root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem)


#: How far a client's clock may be from the nodes' when its own certificate's dates are checked
#: (the nodes check them with theirs).
_CLIENT_CLOCK_SKEW = _dt.timedelta(minutes=5)


def check_client_files(ca_path: Path, ca_pem: bytes, cert_path: Path, cert_pem: bytes, key_path: Path,
                       key_pem: bytes) -> None:
    """What every node's handshake (or this client's) would refuse about a client's TLS files,
    refused at once with InvalidArgument naming the file and the problem, rather than seen as
    "Socket closed" after retrying until the timeout: the CA, the certificate (chain) and the key
    must be PEM, the key the certificate's, the certificate valid now (give or take
    ``_CLIENT_CLOCK_SKEW``) and signed (through the chain it carries) by a certificate of the CA
    file (a bundle may hold several) that is a CA valid now. The same checks as a node's files
    (:func:`mqstore.security.certs.check_tls_material`), worded for a client."""
    words = TLSWording(
        Path(ca_path), Path(cert_path), Path(key_path), "the CA certificate", "the client certificate",
        "the client key", "the client certificate", "nodes refuse the certificates it signed",
        cert_refused=": nodes refuse it",
        not_signed=": the nodes' CA must sign it, and the CA file (MQSTORE_CA) must be that CA: the cluster's ca.pem",
    )
    check_tls_material(ca_pem, cert_pem, key_pem, words, skew=_CLIENT_CLOCK_SKEW)


def client_settings_from_env(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``tls`` and ``token`` for :class:`mqstore.client.Client` from ``MQSTORE_CA``,
    ``MQSTORE_CERT``, ``MQSTORE_KEY``, ``MQSTORE_TLS_SERVER_NAME`` and ``MQSTORE_TOKEN`` (the CLI's
    defaults); empty when none is set."""
    e = os.environ if env is None else env
    out: dict[str, Any] = {}
    if e.get("MQSTORE_CA"):
        out["tls"] = ClientTLS(
            Path(e["MQSTORE_CA"]),
            Path(e["MQSTORE_CERT"]) if e.get("MQSTORE_CERT") else None,
            Path(e["MQSTORE_KEY"]) if e.get("MQSTORE_KEY") else None,
            e.get("MQSTORE_TLS_SERVER_NAME") or None,
        )
    if e.get("MQSTORE_TOKEN"):
        out["token"] = e["MQSTORE_TOKEN"]
    return out


def _with_token(metadata: Any, token: str) -> list[tuple[str, str | bytes]]:
    out = [(k, v) for k, v in (metadata or ()) if k != AUTHORIZATION]
    out.append((AUTHORIZATION, BEARER + token))
    return out


class _TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Adds ``authorization: Bearer <token>`` to every call of a blocking channel."""

    def __init__(self, token: str) -> None:
        self.token = token

    def _details(self, d: Any) -> Any:
        return _CallDetails(d.method, d.timeout, _with_token(d.metadata, self.token), d.credentials,
                            d.wait_for_ready, getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)


class _CallDetails(grpc.ClientCallDetails):  # type: ignore[misc]
    def __init__(self, method: str, timeout: float | None, metadata: Any, credentials: Any,
                 wait_for_ready: bool | None, compression: Any) -> None:
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


def _aio_details(d: Any, token: str) -> Any:
    return grpc.aio.ClientCallDetails(d.method, d.timeout, _with_token(d.metadata, token), d.credentials,
                                      d.wait_for_ready)


class _AioUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, token: str) -> None:
        self.token = token

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_aio_details(details, self.token), request)


class _AioStreamStream(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, token: str) -> None:
        self.token = token

    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(_aio_details(details, self.token), request_iterator)


class _AioStreamUnary(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, token: str) -> None:
        self.token = token

    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(_aio_details(details, self.token), request_iterator)


class _AioUnaryStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, token: str) -> None:
        self.token = token

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_aio_details(details, self.token), request)


def _check_token(token: str | None) -> None:
    if token is not None and (not isinstance(token, str) or not token or "\n" in token or len(token) > 256):
        raise InvalidArgument("a token is a non-empty string of at most 256 characters")


def channel_factory(tls: ClientTLS | None, token: str | None,
                    options: Sequence[tuple[str, Any]]) -> Callable[[str], grpc.Channel]:
    """A factory of blocking channels: TLS with ``tls`` (plaintext without), the token on every call."""
    _check_token(token)
    credentials = tls.credentials() if tls is not None else None
    opts = list(options)
    if tls is not None and tls.server_name:
        opts.append(("grpc.ssl_target_name_override", tls.server_name))

    def make(address: str) -> grpc.Channel:
        if credentials is not None:
            channel = grpc.secure_channel(address, credentials, options=opts)
        else:
            channel = grpc.insecure_channel(address, options=opts)
        if token:
            channel = grpc.intercept_channel(channel, _TokenInterceptor(token))
        return channel

    return make


def aio_channel_factory(tls: ClientTLS | None, token: str | None,
                        options: Sequence[tuple[str, Any]]) -> Callable[[str], grpc.aio.Channel]:
    """The asyncio twin of :func:`channel_factory`."""
    _check_token(token)
    credentials = tls.credentials() if tls is not None else None
    opts = list(options)
    if tls is not None and tls.server_name:
        opts.append(("grpc.ssl_target_name_override", tls.server_name))
    interceptors: list[Any] = []
    if token:
        interceptors = [_AioUnaryUnary(token), _AioUnaryStream(token), _AioStreamUnary(token),
                        _AioStreamStream(token)]

    def make(address: str) -> grpc.aio.Channel:
        if credentials is not None:
            return grpc.aio.secure_channel(address, credentials, options=opts, interceptors=interceptors or None)
        return grpc.aio.insecure_channel(address, options=opts, interceptors=interceptors or None)

    return make


__all__ = [
    "AUTHORIZATION",
    "BEARER",
    "ClientTLS",
    "PeerChannelFactory",
    "aio_channel_factory",
    "channel_factory",
    "check_client_files",
    "client_settings_from_env",
    "server_credentials",
]
