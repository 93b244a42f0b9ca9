"""A small certificate authority for a cluster: the CA, node certificates and client certificates
(``mqstore certs init|issue``), and reading an identity back out of a peer's certificate.

Identities live in the subject alternative name, as URIs a verifier can match exactly:

- a node: ``mqstore://node/<id>``, plus the DNS name ``node-<id>.mqstore`` (a node dials a peer
  with that name as the TLS target name, so the handshake itself checks that the node it reached
  is the node it meant, whatever address or proxy it went through), plus the host names and IP
  addresses clients use to reach it;
- a client: ``mqstore://client/<name>?roles=producer,worker&namespaces=a,b`` (no ``namespaces``:
  every namespace). The CA vouches for the roles; ``[[auth.clients]]`` in a node's config can
  override them per name.

Keys are ECDSA P-256 (fast handshakes), written with mode 0600 (certificates 0644, directories
created 0700, whatever the umask), each file replaced atomically. The CA is checked before it signs
anything: its certificate must say CA:TRUE and be valid now, and ``ca.key`` must be its key and
private to its owner (it may be passphrase-protected: ``CA.load(..., passphrase=)``, the CLI's
``MQSTORE_CA_PASSPHRASE``). A certificate never outlives its CA: its end is capped at the CA's.
Certificates are for a test or a first deployment: an organisation with its own PKI issues
certificates with the same SAN URIs.
"""

from __future__ import annotations

import datetime as _dt
import errno
import functools
import ipaddress
import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mqstore.actor import ROLES
from mqstore.crypto.providers import read_private_file
from mqstore.errors import InvalidArgument, KeyFileError

NODE_URI_PREFIX = "mqstore://node/"
CLIENT_URI_PREFIX = "mqstore://client/"
CA_DAYS_DEFAULT = 3650
CERT_DAYS_DEFAULT = 397  # what browsers accept for a leaf certificate; renew yearly
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}\Z")
_HOST_RE = re.compile(r"(?:\*\.)?[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?\.?\Z")
_CLOCK_SKEW = _dt.timedelta(minutes=5)  # certificates start a little in the past
DAYS_MAX = 36500  # a century: what a certificate's validity in days may be (1..DAYS_MAX)
_CN_CHARS_MAX = 64  # the longest common name X.509 allows (ub-common-name)


def node_dns_name(node_id: int) -> str:
    """The DNS name in node ``node_id``'s certificate that peers verify when they dial it."""
    return f"node-{node_id}.mqstore"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a certificate names: a node (``node_id``) or a client (``name``, roles, namespaces:
    None means "not stated in the certificate" for roles and "every namespace" for namespaces)."""

    kind: str  # "node" or "client"
    name: str
    node_id: int = 0
    roles: frozenset[str] | None = None
    namespaces: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class CertPair:
    cert: Path
    key: Path


def check_name(name: object, what: str = "name") -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidArgument(f"{what} must be 1-128 characters from A-Z a-z 0-9 . _ @ -, not {name!r}")
    return name


def check_roles(roles: object, what: str = "roles") -> frozenset[str]:
    if isinstance(roles, str) or not isinstance(roles, (list, tuple, set, frozenset)):
        raise InvalidArgument(f"{what} must be a list of roles from {sorted(ROLES)}")
    bad = sorted(repr(r) if not isinstance(r, str) else r for r in roles if not isinstance(r, str) or r not in ROLES)
    if bad:
        raise InvalidArgument(f"{what}: unknown role(s) {bad}; roles are {sorted(ROLES)}")
    return frozenset(str(r) for r in roles)


def check_namespaces(namespaces: object, what: str = "namespaces") -> frozenset[str] | None:
    from mqstore import validate

    if namespaces is None:
        return None
    if isinstance(namespaces, str) or not isinstance(namespaces, (list, tuple, set, frozenset)):
        raise InvalidArgument(f"{what} must be a list of namespaces (omit it for every namespace)")
    return frozenset(validate.namespace(n, what) for n in namespaces)


def check_granted_namespaces(namespaces: object, what: str = "namespaces") -> frozenset[str] | None:
    """:func:`check_namespaces` for an identity being created (a certificate, a token): an empty
    list is refused — it would allow no namespace at all, surely not what was meant."""
    spaces = check_namespaces(namespaces, what)
    if spaces is not None and not spaces:
        raise InvalidArgument(f"{what}: an empty list would allow no namespace at all: name at least one, or "
                              f"leave {what} out for every namespace")
    return spaces


# --- writing -----------------------------------------------------------------------------------


def _make_dirs(directory: Path) -> None:
    """Create ``directory`` and its missing parents with mode 0700 (whatever the umask); an
    existing directory is left as it is."""
    missing: list[Path] = []
    d = directory
    while not d.exists() and d != d.parent:
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            continue
        os.chmod(d, 0o700)
    if not directory.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(directory))


def _write_file(path: Path, data: bytes, mode: int, *, overwrite: bool) -> None:
    """Write ``path`` with ``mode`` (whatever the umask), never visible half-written or with a
    wider mode: a temporary file created with ``mode`` in the same directory, then renamed over
    ``path`` (``overwrite``) or linked to it (refused when ``path`` exists)."""
    _make_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    except OSError as exc:  # named as the file it was to be, not the temporary one
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise InvalidArgument(f"{path} already exists: refusing to replace it") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def _check_new(paths: tuple[Path, ...], overwrite: bool) -> None:
    if overwrite:
        return
    for path in paths:
        if os.path.lexists(path):
            raise InvalidArgument(f"{path} already exists: refusing to replace it (--force replaces it)")


def _write_pair(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, cert_path: Path, key_path: Path, *,
                overwrite: bool = True) -> CertPair:
    """Write a certificate (0644) and its key (0600); with ``overwrite`` false, refuse (before
    writing anything) when either file exists."""
    _check_new((cert_path, key_path), overwrite)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    _write_file(key_path, key_pem, 0o600, overwrite=overwrite)
    _write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644, overwrite=overwrite)
    return CertPair(cert_path, key_path)


def check_days(days: object, what: str = "days") -> int:
    """A certificate's validity in days: an integer 1..DAYS_MAX (0 would issue one already expired)."""
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= DAYS_MAX:
        raise InvalidArgument(f"{what} must be a number of days 1..{DAYS_MAX}, not {days!r}")
    return days


def check_ca_name(name: object, what: str = "a CA's name") -> str:
    """A CA's common name: 1-64 printable characters (what X.509 allows)."""
    if not isinstance(name, str) or not 1 <= len(name) <= _CN_CHARS_MAX or not name.isprintable():
        raise InvalidArgument(f"{what} must be 1-{_CN_CHARS_MAX} printable characters, not {name!r}")
    return name


def check_hosts(hosts: object, what: str = "hosts") -> list[x509.GeneralName]:
    """A node certificate's host names and IP addresses as subject alternative names: each an IP
    address or an ASCII DNS name (an internationalized name written as its A-label, xn--...)."""
    if isinstance(hosts, str) or not isinstance(hosts, (list, tuple)):
        raise InvalidArgument(f"{what} must be a list of host names or IP addresses")
    out: list[x509.GeneralName] = []
    for host in hosts:
        if isinstance(host, str):
            try:
                out.append(x509.IPAddress(ipaddress.ip_address(host)))
                continue
            except ValueError:
                pass
        if not isinstance(host, str) or not _HOST_RE.match(host):
            raise InvalidArgument(
                f"{what}: {host!r} is not an IP address or a DNS name of ASCII letters, digits, '-', '_' and dots "
                "(write an internationalized name as its A-label, xn--...)"
            )
        try:
            out.append(x509.DNSName(host))
        except ValueError as exc:
            raise InvalidArgument(f"{what}: {host!r}: {exc}") from None
    return out


def _validity(days: int, not_before: _dt.datetime | None, not_after: _dt.datetime | None) -> tuple[_dt.datetime, ...]:
    now = _dt.datetime.now(_dt.UTC)
    if not_after is None:
        check_days(days)
    start = not_before or now - _CLOCK_SKEW
    end = not_after or now + _dt.timedelta(days=days)
    if end <= start:
        raise InvalidArgument("a certificate must end after it starts")
    return start, end


def init_ca(directory: str | os.PathLike[str], *, name: str = "mqstore cluster CA", days: int = CA_DAYS_DEFAULT,
            overwrite: bool = False) -> CertPair:
    """Create a CA (``ca.pem``, ``ca.key``) in ``directory``; refuses to replace one unless told."""
    d = Path(directory)
    pair = CertPair(d / "ca.pem", d / "ca.key")
    if not overwrite and (pair.cert.exists() or pair.key.exists()):
        raise InvalidArgument(f"{d} already holds a CA (ca.pem/ca.key): refusing to replace it")
    check_ca_name(name)
    start, end = _validity(days, None, None)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write_pair(cert, key, pair.cert, pair.key, overwrite=overwrite)


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _period(cert: x509.Certificate) -> str:
    return f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} to {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"


def _not_a_ca(cert: x509.Certificate) -> str | None:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = constraints.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        return "is not a CA certificate (its basic constraints do not say CA:TRUE)"
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not usage.key_cert_sign:
            return "is not a CA certificate (its key usage does not allow signing certificates)"
    except x509.ExtensionNotFound:
        pass
    return None


def _not_valid_now(cert: x509.Certificate, now: _dt.datetime) -> str | None:
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        state = "expired" if now > cert.not_valid_after_utc else "not valid yet"
        return f"is valid from {_period(cert)}, not now ({state})"
    return None


def ca_problem(cert: x509.Certificate, now: _dt.datetime | None = None) -> str | None:
    """What makes ``cert`` unable to be a CA that a TLS handshake accepts (None: nothing): it
    must say CA:TRUE, may sign certificates when it has a key usage, and must be valid now."""
    return _not_a_ca(cert) or _not_valid_now(cert, now or _dt.datetime.now(_dt.UTC))


@dataclass(frozen=True, slots=True)
class CA:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, passphrase: bytes | str | None = None) -> CA:
        """The CA in ``directory`` (``ca.pem``, ``ca.key``), refused (InvalidArgument naming the
        file) unless it can sign certificates a handshake accepts: ``ca.pem`` a CA certificate
        valid now, ``ca.key`` its key, private to its owner (as a node's TLS key), decrypted
        with ``passphrase`` when it is encrypted."""
        d = Path(directory)
        cert_path, key_path = d / "ca.pem", d / "ca.key"
        missing = f"no CA in {d} (ca.pem and ca.key): create one with `mqstore certs init`"
        try:
            cert_pem = cert_path.read_bytes()
        except FileNotFoundError:
            raise InvalidArgument(missing) from None
        except OSError as exc:
            raise InvalidArgument(f"cannot read the CA certificate {cert_path}: {exc.strerror}") from None
        if not os.path.lexists(key_path):
            raise InvalidArgument(missing)
        try:
            # Whoever reads the CA key can issue certificates for any node or client.
            key_pem = read_private_file(key_path, "the CA key")
        except KeyFileError as exc:
            raise InvalidArgument(str(exc)) from None
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            raise InvalidArgument(f"the CA certificate {cert_path} is not a PEM certificate") from None
        password = passphrase.encode() if isinstance(passphrase, str) else passphrase
        try:
            key = serialization.load_pem_private_key(key_pem, password=password or None)
        except TypeError:
            if not password:  # encrypted, and no passphrase given
                raise InvalidArgument(
                    f"the CA key {key_path} is encrypted: set MQSTORE_CA_PASSPHRASE to its passphrase") from None
            try:  # a passphrase given for a key that is not encrypted: it needs none
                key = serialization.load_pem_private_key(key_pem, password=None)
            except (ValueError, TypeError):
                raise InvalidArgument(f"the CA key {key_path} is not a PEM private key") from None
        except ValueError:
            if password:
                raise InvalidArgument(f"the CA key {key_path} cannot be decrypted with the passphrase given "
                                      "(MQSTORE_CA_PASSPHRASE), or is not a PEM private key") from None
            raise InvalidArgument(f"the CA key {key_path} is not a PEM private key") from None
        except UnsupportedAlgorithm:
            raise InvalidArgument(f"the CA key {key_path} is of an unsupported kind") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise InvalidArgument(f"the CA key {key_path} is not an EC key")
        problem = _not_a_ca(cert)
        if problem is not None:
            raise InvalidArgument(f"the CA certificate {cert_path} {problem}: --dir must hold the CA's own "
                                  "certificate and key")
        problem = _not_valid_now(cert, _dt.datetime.now(_dt.UTC))
        if problem is not None:
            raise InvalidArgument(f"the CA certificate {cert_path} {problem}: certificates it signed would not "
                                  "verify; create a new CA (`mqstore certs init`) and issue every certificate again")
        if _spki(key.public_key()) != _spki(cert.public_key()):
            raise InvalidArgument(f"the CA key {key_path} is not the key of the CA certificate {cert_path}: "
                                  "certificates it signed would not verify")
        return cls(cert, key)

    def capped(self, days: int) -> bool:
        """Whether a certificate of ``days`` from now would outlive the CA (and so be cut to end with it)."""
        return _dt.datetime.now(_dt.UTC) + _dt.timedelta(days=days) > self.cert.not_valid_after_utc

    def _issue(self, subject_cn: str, sans: list[x509.GeneralName], usages: list[x509.ObjectIdentifier], days: int,
               not_before: _dt.datetime | None, not_after: _dt.datetime | None,
               ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        start, end = _validity(days, not_before, not_after)
        # A certificate is worthless once its CA expires: it ends with the CA at the latest.
        end = min(end, self.cert.not_valid_after_utc)
        if end <= start:
            raise InvalidArgument(f"a certificate must end after it starts, and the CA ends "
                                  f"{self.cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.cert.public_key()),  # type: ignore[arg-type]
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return cert, key

    def issue_node(self, node_id: int, out_dir: str | os.PathLike[str], *, hosts: list[str] | tuple[str, ...] = (),
                   days: int = CERT_DAYS_DEFAULT, not_before: _dt.datetime | None = None,
                   not_after: _dt.datetime | None = None, prefix: str | None = None,
                   overwrite: bool = True) -> CertPair:
        """A node's certificate (``node-<id>.pem``/``.key``): server and client use, naming the node
        and every host name or IP address in ``hosts`` (default: localhost, 127.0.0.1). Ends with
        the CA at the latest. ``overwrite`` false: refuse when either file exists."""
        if isinstance(node_id, bool) or not isinstance(node_id, int) or node_id < 1:
            raise InvalidArgument(f"a node id is an integer >= 1, not {node_id!r}")
        sans: list[x509.GeneralName] = [
            x509.UniformResourceIdentifier(f"{NODE_URI_PREFIX}{node_id}"),
            x509.DNSName(node_dns_name(node_id)),
            *check_hosts(list(hosts or ("localhost", "127.0.0.1"))),
        ]
        d = Path(out_dir)
        name = prefix or f"node-{node_id}"
        _check_new((d / f"{name}.pem", d / f"{name}.key"), overwrite)
        cert, key = self._issue(f"node-{node_id}", sans, [ExtendedKeyUsageOID.SERVER_AUTH,
                                                          ExtendedKeyUsageOID.CLIENT_AUTH],
                                days, not_before, not_after)
        return _write_pair(cert, key, d / f"{name}.pem", d / f"{name}.key", overwrite=overwrite)

    def issue_client(self, name: str, out_dir: str | os.PathLike[str], *, roles: list[str] | tuple[str, ...] = (),
                     namespaces: list[str] | tuple[str, ...] | None = None, days: int = CERT_DAYS_DEFAULT,
                     not_before: _dt.datetime | None = None, not_after: _dt.datetime | None = None,
                     prefix: str | None = None, overwrite: bool = True) -> CertPair:
        """A client's certificate (``client-<name>.pem``/``.key``) carrying its roles (and, when
        given, the namespaces they are limited to). Ends with the CA at the latest. ``overwrite``
        false: refuse when either file exists."""
        check_name(name, "a client's name")
        role_set = check_roles(list(roles))
        spaces = check_granted_namespaces(namespaces)
        query = {"roles": ",".join(sorted(role_set))}
        if spaces is not None:
            query["namespaces"] = ",".join(sorted(spaces))
        uri = f"{CLIENT_URI_PREFIX}{urllib.parse.quote(name)}?{urllib.parse.urlencode(query, safe=',')}"
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
        d = Path(out_dir)
        base = prefix or f"client-{name}"
        _check_new((d / f"{base}.pem", d / f"{base}.key"), overwrite)
        cert, key = self._issue(name, sans, [ExtendedKeyUsageOID.CLIENT_AUTH], days, not_before, not_after)
        return _write_pair(cert, key, d / f"{base}.pem", d / f"{base}.key", overwrite=overwrite)


# --- reading -----------------------------------------------------------------------------------


def identity_of(cert: x509.Certificate) -> Identity | None:
    """The node or client a certificate names (None: it names neither)."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(NODE_URI_PREFIX):
            text = uri[len(NODE_URI_PREFIX):]
            if text.isdigit() and int(text) > 0:
                return Identity("node", f"node-{int(text)}", node_id=int(text))
        elif uri.startswith(CLIENT_URI_PREFIX):
            parsed = urllib.parse.urlsplit(uri)
            name = urllib.parse.unquote(parsed.path.lstrip("/"))
            # Blank values kept: ``namespaces=`` is an empty list (no namespace), never "every
            # namespace" (which is what leaving ``namespaces`` out says).
            query = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
            try:
                check_name(name)
                roles = check_roles([r for r in ",".join(query.get("roles", [])).split(",") if r])
                spaces = None
                if "namespaces" in query:
                    spaces = check_namespaces([n for n in ",".join(query["namespaces"]).split(",") if n])
            except InvalidArgument:
                return None
            return Identity("client", name, roles=roles, namespaces=spaces)
    return None


@functools.lru_cache(maxsize=4096)
def identity_from_pem(pem: bytes) -> Identity | None:
    """:func:`identity_of` a PEM certificate (as gRPC's auth context gives it), cached: every call
    on a connection presents the same certificate."""
    try:
        return identity_of(x509.load_pem_x509_certificate(pem))
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class TLSWording:
    """How :func:`check_tls_material` names TLS files in what it refuses, and what it adds: a
    node's checks say ``node.toml tls.cert: /etc/mqstore/node-1.pem ...``, a client's ``the client
    certificate /home/ops/client.pem ...``."""

    ca_path: Path
    cert_path: Path
    key_path: Path
    ca: str  # a problem of the CA file starts with this, then the path: "node.toml tls.ca:"
    cert: str  # ... of the certificate file: "node.toml tls.cert:"
    key: str  # ... of the key file: "node.toml tls.key:"
    cert_object: str  # the certificate as the key's: "... is not the key of <cert_object> <cert_path>"
    ca_refused: str  # what follows from a problem of a CA: "every handshake would fail"
    ca_expired: str = ""  # added after ca_refused when a CA is not valid now
    cert_refused: str = ""  # added after a certificate's dates that are not now: ": nodes refuse it"
    not_signed: str = ""  # added after "... is not signed by the CA in <ca_path>"


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


_PATHS_MAX = 64  # ways from a certificate to the CA file considered (a file of many cross-signed certificates)


def _trust_paths(leaf: x509.Certificate, carried: list[x509.Certificate], roots: list[x509.Certificate],
                 ) -> list[tuple[tuple[x509.Certificate, ...], x509.Certificate]]:
    """Every way ``leaf`` is signed by a certificate of the CA file (``roots``), directly or
    through intermediates ``carried`` after it in its own file (as a handshake sends them): the
    intermediates on the way and the root, shortest first."""
    out: list[tuple[tuple[x509.Certificate, ...], x509.Certificate]] = []
    frontier: list[tuple[x509.Certificate, tuple[x509.Certificate, ...]]] = [(leaf, ())]
    for _ in range(len(carried) + 1):
        following: list[tuple[x509.Certificate, tuple[x509.Certificate, ...]]] = []
        for cert, via in frontier:
            out.extend((via, root) for root in roots if _issued_by(cert, root))
            following.extend((c, (*via, c)) for c in carried
                             if c != leaf and c not in via and _issued_by(cert, c))
        frontier = following[:_PATHS_MAX]
        if not frontier or len(out) >= _PATHS_MAX:
            break
    return out[:_PATHS_MAX]


def _in_file(path: Path, certs: list[x509.Certificate], cert: x509.Certificate) -> str:
    """``path``, and which of its certificates ``cert`` is when it holds several (a CA bundle)."""
    if len(certs) < 2:
        return str(path)
    return f"{path} (its certificate {certs.index(cert) + 1} of {len(certs)}, {cert.subject.rfc4514_string()})"


def _key_id(cert: x509.Certificate, kind: type[x509.AuthorityKeyIdentifier | x509.SubjectKeyIdentifier],
            ) -> bytes | None:
    try:
        value = cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
    return value.key_identifier if isinstance(value, x509.AuthorityKeyIdentifier) else value.digest


def _may_have_issued(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether a TLS library would try ``issuer``'s signature on ``cert`` (OpenSSL's
    X509_check_issued): the names match, and the key identifiers when both have one."""
    if cert.issuer != issuer.subject:
        return False
    akid, skid = _key_id(cert, x509.AuthorityKeyIdentifier), _key_id(issuer, x509.SubjectKeyIdentifier)
    return akid is None or skid is None or akid == skid


def _path_problem(leaf: x509.Certificate, via: tuple[x509.Certificate, ...], root: x509.Certificate,
                  roots: list[x509.Certificate], words: TLSWording, now: _dt.datetime) -> str | None:
    """What a handshake would refuse about the CAs on one way from a certificate to the CA file."""
    signed = via[-1] if via else leaf
    if any(not _issued_by(signed, other) for other in roots if _may_have_issued(signed, other)):
        # A handshake tries one CA of those it cannot tell apart, maybe the wrong one.
        return (f"{words.ca} {words.ca_path} holds several CA certificates named {root.subject.rfc4514_string()} "
                "and nothing in the certificate that one of them signed says which (no matching key "
                "identifiers): a handshake may check it against the wrong one and fail; give the CAs different "
                "names, or issue the certificate again (`mqstore certs issue` says which CA signed it)")
    for middle in via:
        problem = ca_problem(middle, now)
        if problem is not None:
            return (f"{words.cert} {words.cert_path}: the intermediate certificate it carries "
                    f"({middle.subject.rfc4514_string()}) {problem}: {words.ca_refused}")
    problem = _not_a_ca(root)
    if problem is not None:
        return f"{words.ca} {_in_file(words.ca_path, roots, root)} {problem}: {words.ca_refused}"
    problem = _not_valid_now(root, now)
    if problem is not None:
        return f"{words.ca} {_in_file(words.ca_path, roots, root)} {problem}: {words.ca_refused}{words.ca_expired}"
    return None


def _anchor(leaf: x509.Certificate, carried: list[x509.Certificate], roots: list[x509.Certificate],
            words: TLSWording, now: _dt.datetime,
            ) -> tuple[tuple[x509.Certificate, ...], x509.Certificate] | str | None:
    """The way from ``leaf`` to the CA file a handshake would take: the first with nothing wrong
    (a CA bundle may hold an expired CA beside the one that counts), else what is wrong with the
    first (a str); None when no certificate of the CA file signs it."""
    paths = _trust_paths(leaf, carried, roots)
    problems = []
    for via, root in paths:
        problem = _path_problem(leaf, via, root, roots, words, now)
        if problem is None:
            return via, root
        problems.append(problem)
    return problems[0] if problems else None


def check_tls_material(ca_pem: bytes, cert_pem: bytes, key_pem: bytes, words: TLSWording, *,
                       skew: _dt.timedelta = _dt.timedelta(0), now: _dt.datetime | None = None,
                       ) -> x509.Certificate:
    """What a TLS handshake would refuse about a certificate, its key and the CA file that must
    vouch for it, raised as InvalidArgument worded by ``words`` (naming the file and the problem);
    returns the certificate. The checks of a node's files (:func:`check_tls_files`) and of a
    client's (:func:`mqstore.security.tls.check_client_files`), so that both accept what gRPC does:

    - the CA file, the certificate file and the key are PEM; the CA file may hold several
      certificates (a bundle: during a CA rotation, the old CA and the new one), the certificate
      file the intermediates after the certificate (its chain);
    - the key is the certificate's;
    - a certificate of the CA file signs the certificate, directly or through the chain it
      carries; that CA (and every intermediate) says CA:TRUE, may sign certificates and is valid now;
    - the certificate is valid now, give or take ``skew``."""
    try:
        roots = x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        raise InvalidArgument(f"{words.ca} {words.ca_path} is not a PEM certificate") from None
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise InvalidArgument(f"{words.cert} {words.cert_path} is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise InvalidArgument(f"{words.key} {words.key_path} is not an unencrypted PEM private key") from None
    leaf = chain[0]
    if _spki(key.public_key()) != _spki(leaf.public_key()):
        raise InvalidArgument(f"{words.key} {words.key_path} is not the key of {words.cert_object} "
                              f"{words.cert_path}")
    now = now or _dt.datetime.now(_dt.UTC)
    found = _anchor(leaf, chain[1:], roots, words, now)
    if isinstance(found, str):
        raise InvalidArgument(found)
    if found is None:
        hint = ""  # a node's or a client's certificate named as the CA, say:
        if len(roots) == 1 and _not_a_ca(roots[0]) is not None:
            hint = f"; {words.ca_path} {_not_a_ca(roots[0])}"
        elif all(_not_a_ca(root) is not None for root in roots):
            hint = f"; no certificate of {words.ca_path} is a CA certificate"
        raise InvalidArgument(f"{words.cert} {words.cert_path} is not signed by the CA in {words.ca_path}"
                              f"{hint}{words.not_signed}")
    if not leaf.not_valid_before_utc - skew <= now <= leaf.not_valid_after_utc + skew:
        state = "expired" if now > leaf.not_valid_after_utc else "not valid yet"
        raise InvalidArgument(f"{words.cert} {words.cert_path} is valid from {_period(leaf)}, not now ({state})"
                              f"{words.cert_refused}")
    return leaf


def check_tls_files(ca_path: Path, cert_path: Path, key_path: Path, *, node_id: int | None = None,
                    where: str = "") -> None:
    """Check a node's TLS material; raises InvalidArgument naming the key and the problem: files
    readable, the key private to its owner (no access for other users, no group write), what
    :func:`check_tls_material` checks (the CA file may be a bundle of several CAs, as during a CA
    rotation; the certificate file may carry its chain; its dates are taken as they are, with no
    clock skew allowed: a client allows some, as the nodes judge its certificate with their clocks),
    and (with ``node_id``) the certificate names that node. (A certificate that outlives its CA is
    valid until the CA expires: :func:`tls_warnings` says so.)"""
    def read(path: Path, key: str) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise InvalidArgument(f"{where} {key}: cannot read {path}: {exc.strerror}") from None

    ca_pem, cert_pem = read(ca_path, "tls.ca"), read(cert_path, "tls.cert")
    try:
        # The node's identity: whoever reads the key can join the cluster as this node.
        key_pem = read_private_file(key_path, "the TLS key")
    except KeyFileError as exc:
        raise InvalidArgument(f"{where} tls.key: {exc}") from None
    cert = check_tls_material(ca_pem, cert_pem, key_pem, _node_wording(ca_path, cert_path, key_path, where))
    if node_id is not None:
        ident = identity_of(cert)
        if ident is None or ident.kind != "node" or ident.node_id != node_id:
            named = "no node" if ident is None or ident.kind != "node" else f"node {ident.node_id}"
            raise InvalidArgument(
                f"{where} tls.cert: {cert_path} names {named}, but node_id is {node_id} "
                f"(issue one with `mqstore certs issue node --id {node_id}`)"
            )


def _node_wording(ca_path: Path, cert_path: Path, key_path: Path, where: str) -> TLSWording:
    return TLSWording(
        Path(ca_path), Path(cert_path), Path(key_path), f"{where} tls.ca:", f"{where} tls.cert:",
        f"{where} tls.key:", "the certificate", "every handshake would fail",
        ca_expired=" (create a new CA with `mqstore certs init` and issue every certificate again)",
    )


def tls_warnings(ca_path: Path, cert_path: Path, *, where: str = "") -> list[str]:
    """What is not yet wrong with TLS files :func:`check_tls_files` accepted but will be: a
    certificate that outlives the CA that signed it (of a bundle: the one a handshake verifies it
    with) stops working the day that CA expires."""
    try:
        roots = x509.load_pem_x509_certificates(Path(ca_path).read_bytes())
        chain = x509.load_pem_x509_certificates(Path(cert_path).read_bytes())
    except (OSError, ValueError):
        return []
    cert = chain[0]
    found = _anchor(cert, chain[1:], roots, _node_wording(ca_path, cert_path, Path(), where),
                    _dt.datetime.now(_dt.UTC))
    if not isinstance(found, tuple):
        return []
    ca = found[1]
    if cert.not_valid_after_utc > ca.not_valid_after_utc:
        return [f"{where} tls.cert: {cert_path} is valid until {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, but "
                f"its CA {_in_file(Path(ca_path), roots, ca)} expires {ca.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: "
                "every handshake fails from then on (create a new CA before then)".strip()]
    return []


__all__ = [
    "CA",
    "CA_DAYS_DEFAULT",
    "CERT_DAYS_DEFAULT",
    "CLIENT_URI_PREFIX",
    "DAYS_MAX",
    "NODE_URI_PREFIX",
    "CertPair",
    "Identity",
    "TLSWording",
    "ca_problem",
    "check_ca_name",
    "check_days",
    "check_hosts",
    "check_name",
    "check_namespaces",
    "check_roles",
    "check_tls_files",
    "check_tls_material",
    "identity_from_pem",
    "identity_of",
    "init_ca",
    "node_dns_name",
    "tls_warnings",
]
