"""Node configuration files (TOML), validated on load with errors that name the key.

Example ``node.toml``::

    node_id   = 1
    site      = "ams"                 # data-center site of this node
    listen    = "127.0.0.1:7001"      # gRPC address to bind
    advertise = "127.0.0.1:7001"      # address peers and clients use (default: listen)
    data_dir  = "/var/lib/mqstore/n1"
    key_file  = "/etc/mqstore/kek.key"
    audit_signing_key = "/etc/mqstore/audit-1.key"   # Ed25519 key signing this node's audit
                                      # checkpoints (default: <data_dir>/audit-signing.key, created)
    min_sites = 2                     # an index commits only when voters in 2 sites hold it
                                      # (default: 2, or 1 when all members share one site)

    [[peers]]                         # the other members this node knows at start
    id      = 2
    site    = "fra"
    address = "127.0.0.1:7002"        # where THIS node dials peer 2 (may be a local proxy)

Security and operations (see README, "Security and operations of nodes")::

    insecure = false                  # true: plaintext everything (tests, trials); loudly warned
    [tls]                             # required unless insecure = true
    ca   = "/etc/mqstore/ca.pem"      # the cluster CA: peers and clients must present a cert it signed
    cert = "/etc/mqstore/node-1.pem"  # this node's certificate (names node 1: mqstore certs issue node)
    key  = "/etc/mqstore/node-1.key"
    [auth]
    tokens_file = "/etc/mqstore/tokens.json"   # bearer tokens, hashed (mqstore tokens add|list|remove)
    anonymous = false                 # calls without credentials act with every role (default:
                                      # true only when insecure and no tokens_file)
    [[auth.clients]]                  # roles of a client certificate's name (overrides its own)
    name = "mta-1"
    roles = ["producer"]
    namespaces = ["default"]          # omit: every namespace
    [limits]                          # refused at the edge (defaults: mqstore/limits.py)
    message_bytes_max = 52428800
    recipients_max = 1000
    batch_messages_max = 4096
    request_bytes_max = 67108864
    requests_per_second = 5000        # per client; unary calls over it get RESOURCE_EXHAUSTED
    requests_burst = 10000
    streams_per_client_max = 16
    deadline_required = true          # Queue calls without a deadline are refused
    [metrics]
    listen = "127.0.0.1:9464"         # Prometheus endpoint (/metrics); omit: none
    [health]
    disk_free_min_bytes = 1073741824  # NOT_SERVING (and enqueues refused) below this much free
    disk_free_min_percent = 2.0       # ... or below this share of the disk

``address`` of a peer is a local override: a node dials each peer at the address in its own
config, so a test can put a proxy on any single link.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mqstore import limits
from mqstore.errors import InvalidArgument

if TYPE_CHECKING:
    from mqstore.consensus.types import ConfState

_KEYS = {"node_id", "site", "listen", "advertise", "data_dir", "key_file", "audit_signing_key", "min_sites",
         "peers", "cluster_id",
         "election_tick", "heartbeat_ms", "max_clock_offset_ms", "log_level", "log_json",
         "insecure", "tls", "auth", "limits", "metrics", "health"}
_TLS_KEYS = {"ca", "cert", "key"}
_AUTH_KEYS = {"tokens_file", "anonymous", "clients"}
_CLIENT_KEYS = {"name", "roles", "namespaces"}
_METRICS_KEYS = {"listen"}
_HEALTH_KEYS = {"disk_free_min_bytes", "disk_free_min_percent"}
_PEER_KEYS = {"id", "site", "address"}


class ConfigError(InvalidArgument):
    """A configuration file is invalid; the message names the file, the key and the problem."""


@dataclass(frozen=True, slots=True)
class Peer:
    id: int
    site: str
    address: str


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """A node's TLS material: the cluster CA, its certificate and key (PEM files)."""

    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class ClientRoles:
    """``[[auth.clients]]``: the roles of the client certificate named ``name``."""

    name: str
    roles: frozenset[str]
    namespaces: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class AuthConfig:
    tokens_file: Path | None = None
    #: Calls without credentials act as an "anonymous" actor with every role (None: true only
    #: when the node is insecure and has no tokens file).
    anonymous: bool | None = None
    clients: tuple[ClientRoles, ...] = ()


@dataclass(frozen=True, slots=True)
class EdgeLimits:
    """``[limits]``: what a node refuses at the network edge, before a call reaches the queue."""

    message_bytes_max: int = limits.MESSAGE_BYTES_MAX
    recipients_max: int = limits.RECIPIENTS_MAX
    batch_messages_max: int = limits.BATCH_MESSAGES_MAX
    request_bytes_max: int = limits.REQUEST_BYTES_MAX
    requests_per_second: int = limits.CLIENT_REQUESTS_PER_SECOND_DEFAULT
    requests_burst: int = limits.CLIENT_REQUESTS_BURST_DEFAULT
    streams_per_client_max: int = limits.CLIENT_STREAMS_MAX_DEFAULT
    deadline_required: bool = True


#: Health (see limits.py): named here because the ``limits`` field of NodeConfig hides the module.
DISK_FREE_MIN_BYTES_DEFAULT = limits.DISK_FREE_MIN_BYTES_DEFAULT
DISK_FREE_MIN_PERCENT_DEFAULT = limits.DISK_FREE_MIN_PERCENT_DEFAULT


@dataclass(frozen=True, slots=True)
class NodeConfig:
    node_id: int
    site: str
    listen: str
    data_dir: Path
    key_file: Path | None = None
    audit_signing_key: Path | None = None  # None: <data_dir>/audit-signing.key, created if missing
    advertise: str = ""
    min_sites: int | None = None  # None: 2, or 1 when every member is in one site
    peers: tuple[Peer, ...] = ()
    cluster_id: str = ""
    election_tick: int = 10
    heartbeat_ms: int = 100
    #: Clock offsets beyond this are logged, and a node this far off the voters' median clock
    #: stamps with the median (mqstore/node/clocks.py).
    max_clock_offset_ms: int = 500
    log_level: str = "info"
    log_json: bool = False
    insecure: bool = False
    tls: TLSFiles | None = None
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: EdgeLimits = field(default_factory=EdgeLimits)
    metrics_listen: str = ""
    disk_free_min_bytes: int = DISK_FREE_MIN_BYTES_DEFAULT
    disk_free_min_percent: float = DISK_FREE_MIN_PERCENT_DEFAULT
    source: str = "<dict>"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return self.advertise or self.listen

    def peer_address(self, node_id: int) -> str | None:
        for p in self.peers:
            if p.id == node_id:
                return p.address
        return None


def _addr(value: object, where: str) -> str:
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(f"{where} must be 'host:port', not {value!r}")
    host, _, port = value.rpartition(":")
    if not host or not _port_text(port) or not 0 < int(port) < 65536:
        raise ConfigError(f"{where} must be 'host:port' with a port 1..65535, not {value!r}")
    if any(c.isspace() or c in ",/" or not c.isprintable() for c in host):
        raise ConfigError(f"{where} must be one 'host:port' (no spaces, commas or slashes), not {value!r}")
    return value


def check_address(value: object, where: str = "address") -> str:
    """A node's address as a config, a membership change and the command line take it."""
    return _addr(value, where)


def check_site(value: object, where: str = "site") -> str:
    """A site name as a config, a membership change and the command line take it."""
    return _name(value, where)


def _port_text(port: str) -> bool:
    """Whether ``port`` is written in ASCII digits (str.isdigit also takes '²' or Arabic-Indic
    digits, which int() refuses or reads as another number)."""
    return port.isascii() and port.isdigit()


def _int(value: object, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{where} must be an integer {lo}..{hi}, not {value!r}")
    return value


def _name(value: object, where: str) -> str:
    plain = isinstance(value, str) and value.replace("-", "").replace("_", "").isalnum()
    if not isinstance(value, str) or not plain or len(value) > 64:
        raise ConfigError(f"{where} must be a name of 1-64 letters, digits, '-' or '_', not {value!r}")
    return value


def check_cluster_id(value: object, where: str = "cluster_id") -> str:
    """A cluster id: what a config's ``cluster_id`` and ``mqstore bootstrap|join --cluster-id``
    accept (a name of 1-64 letters, digits, '-' or '_')."""
    return _name(value, where)


def parse(data: dict[str, Any], source: str = "<dict>", *, check_tls: bool = True) -> NodeConfig:
    """Validate a configuration mapping (as read from TOML). ``check_tls=False``: the [tls] table
    is checked, not the files it names (see :func:`load`)."""
    where = f"{source}:"
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise ConfigError(f"{where} unknown key(s) {unknown}; known keys: {sorted(_KEYS)}")
    for required in ("node_id", "site", "listen", "data_dir"):
        if required not in data:
            raise ConfigError(f"{where} missing required key '{required}'")
    node_id = _int(data["node_id"], f"{where} node_id", 1, 2**63 - 1)
    site = _name(data["site"], f"{where} site")
    listen = _addr(data["listen"], f"{where} listen")
    advertise = _addr(data["advertise"], f"{where} advertise") if "advertise" in data else ""
    data_dir = _path(data["data_dir"], f"{where} data_dir")
    key_file = _path(data["key_file"], f"{where} key_file") if "key_file" in data else None
    signing_key = (_path(data["audit_signing_key"], f"{where} audit_signing_key")
                   if "audit_signing_key" in data else None)
    min_sites = _int(data["min_sites"], f"{where} min_sites", 1, 64) if "min_sites" in data else None
    peers_raw = data.get("peers", [])
    if not isinstance(peers_raw, list):
        raise ConfigError(f"{where} peers must be an array of tables ([[peers]])")
    peers = []
    seen = {node_id}
    for i, p in enumerate(peers_raw):
        pw = f"{where} peers[{i}]"
        if not isinstance(p, dict):
            raise ConfigError(f"{pw} must be a table with id, site, address")
        bad = sorted(set(p) - _PEER_KEYS)
        if bad:
            raise ConfigError(f"{pw}: unknown key(s) {bad}")
        for required in ("id", "site", "address"):
            if required not in p:
                raise ConfigError(f"{pw}: missing '{required}'")
        pid = _int(p["id"], f"{pw}.id", 1, 2**63 - 1)
        if pid in seen:
            raise ConfigError(f"{pw}.id {pid} is used twice (node ids are unique)")
        seen.add(pid)
        peers.append(Peer(pid, _name(p["site"], f"{pw}.site"), _addr(p["address"], f"{pw}.address")))
    if peers and key_file is None:
        # Without it each node would make a key of its own in its data dir: the followers could
        # not open the first namespace key the leader replicates, and their Raft threads stop.
        raise ConfigError(
            f"{where} key_file is required for a cluster member: every member needs the same key-encryption "
            "key file (create it once with `mqstore keys new-kek FILE` and copy it to each node)"
        )
    cluster_id = check_cluster_id(data["cluster_id"], f"{where} cluster_id") if "cluster_id" in data else ""
    log_level = data.get("log_level", "info")
    if log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"{where} log_level must be debug, info, warning or error, not {log_level!r}")
    log_json = data.get("log_json", False)
    if not isinstance(log_json, bool):
        raise ConfigError(f"{where} log_json must be true or false")
    insecure = data.get("insecure", False)
    if not isinstance(insecure, bool):
        raise ConfigError(f"{where} insecure must be true or false, not {insecure!r}")
    tls = _tls(data.get("tls"), where, node_id, insecure, check_tls)
    return NodeConfig(
        insecure=insecure,
        tls=tls,
        auth=_auth(data.get("auth", {}), where),
        limits=_limits(data.get("limits", {}), where),
        metrics_listen=_metrics(data.get("metrics", {}), where),
        **_health(data.get("health", {}), where),
        node_id=node_id,
        site=site,
        listen=listen,
        advertise=advertise,
        data_dir=data_dir,
        key_file=key_file,
        audit_signing_key=signing_key,
        min_sites=min_sites,
        peers=tuple(peers),
        cluster_id=cluster_id,
        election_tick=_int(data.get("election_tick", 10), f"{where} election_tick", 2, 1000),
        heartbeat_ms=_int(data.get("heartbeat_ms", 100), f"{where} heartbeat_ms", 10, 10_000),
        max_clock_offset_ms=_int(data.get("max_clock_offset_ms", 500), f"{where} max_clock_offset_ms", 1, 86_400_000),
        log_level=log_level,
        log_json=log_json,
        source=source,
    )


def _table(value: object, where: str, known: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a table ([{where.rsplit(' ', 1)[-1]}])")
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    return value


def _path(value: object, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a path, not {value!r}")
    if "\x00" in value:
        raise ConfigError(f"{where} must be a path: it contains a NUL character")
    return Path(value)


def _tls(value: object, where: str, node_id: int, insecure: bool, check_files: bool) -> TLSFiles | None:
    from mqstore.security.certs import check_tls_files

    if value is None:
        if insecure:
            return None
        raise ConfigError(
            f"{where} TLS is required: set [tls] ca, cert and key (create them with `mqstore certs init` and "
            "`mqstore certs issue node`), or insecure = true for plaintext (tests and trials only)"
        )
    t = _table(value, f"{where} tls", _TLS_KEYS)
    for required in ("ca", "cert", "key"):
        if required not in t:
            raise ConfigError(f"{where} tls: missing '{required}' (the [tls] table needs ca, cert and key)")
    files = TLSFiles(_path(t["ca"], f"{where} tls.ca"), _path(t["cert"], f"{where} tls.cert"),
                     _path(t["key"], f"{where} tls.key"))
    if insecure:
        raise ConfigError(f"{where} insecure = true and a [tls] table: choose one")
    if not check_files:
        return files
    try:
        check_tls_files(files.ca, files.cert, files.key, node_id=node_id, where=where)
    except InvalidArgument as exc:
        raise ConfigError(str(exc)) from None
    return files


def _auth(value: object, where: str) -> AuthConfig:
    from mqstore.security.certs import check_name, check_namespaces, check_roles

    a = _table(value, f"{where} auth", _AUTH_KEYS)
    tokens_file = _path(a["tokens_file"], f"{where} auth.tokens_file") if "tokens_file" in a else None
    anonymous = a.get("anonymous")
    if anonymous is not None and not isinstance(anonymous, bool):
        raise ConfigError(f"{where} auth.anonymous must be true or false, not {anonymous!r}")
    raw = a.get("clients", [])
    if not isinstance(raw, list):
        raise ConfigError(f"{where} auth.clients must be an array of tables ([[auth.clients]])")
    clients = []
    seen: set[str] = set()
    for i, c in enumerate(raw):
        cw = f"{where} auth.clients[{i}]"
        c = _table(c, cw, _CLIENT_KEYS)
        if "name" not in c or "roles" not in c:
            raise ConfigError(f"{cw}: needs name and roles")
        try:
            name = check_name(c["name"], f"{cw}.name")
            roles = check_roles(c["roles"], f"{cw}.roles")
            spaces = check_namespaces(c.get("namespaces"), f"{cw}.namespaces")
        except InvalidArgument as exc:
            raise ConfigError(str(exc)) from None
        if name in seen:
            raise ConfigError(f"{cw}.name {name!r} is listed twice")
        seen.add(name)
        clients.append(ClientRoles(name, roles, spaces))
    return AuthConfig(tokens_file, anonymous, tuple(clients))


def _limits(value: object, where: str) -> EdgeLimits:
    t = _table(value, f"{where} limits", set(EdgeLimits.__dataclass_fields__))
    d = EdgeLimits()
    bounds = {
        "message_bytes_max": (1, limits.MESSAGE_BYTES_MAX),
        "recipients_max": (1, limits.RECIPIENTS_MAX),
        "batch_messages_max": (1, limits.BATCH_MESSAGES_MAX),
        "request_bytes_max": (1024, limits.REQUEST_BYTES_MAX),
        "requests_per_second": (1, 10_000_000),
        "requests_burst": (1, 100_000_000),
        "streams_per_client_max": (1, 10_000),
    }
    out: dict[str, Any] = {}
    for key, (lo, hi) in bounds.items():
        out[key] = _int(t[key], f"{where} limits.{key}", lo, hi) if key in t else getattr(d, key)
    required = t.get("deadline_required", True)
    if not isinstance(required, bool):
        raise ConfigError(f"{where} limits.deadline_required must be true or false, not {required!r}")
    if out["requests_burst"] < out["requests_per_second"]:
        raise ConfigError(f"{where} limits.requests_burst must be >= limits.requests_per_second")
    return EdgeLimits(**out, deadline_required=required)


def _metrics(value: object, where: str) -> str:
    t = _table(value, f"{where} metrics", _METRICS_KEYS)
    if "listen" not in t:
        return ""
    value = t["listen"]
    host, _, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
    if not host or not _port_text(port) or not 0 <= int(port) < 65536:  # port 0: any free port (tests)
        raise ConfigError(f"{where} metrics.listen must be 'host:port' with a port 0..65535, not {value!r}")
    return str(value)


def _health(value: object, where: str) -> dict[str, Any]:
    t = _table(value, f"{where} health", _HEALTH_KEYS)
    out: dict[str, Any] = {}
    if "disk_free_min_bytes" in t:
        out["disk_free_min_bytes"] = _int(t["disk_free_min_bytes"], f"{where} health.disk_free_min_bytes", 0, 2**63 - 1)
    if "disk_free_min_percent" in t:
        pct = t["disk_free_min_percent"]
        if isinstance(pct, bool) or not isinstance(pct, (int, float)) or not 0 <= pct <= 100:
            raise ConfigError(f"{where} health.disk_free_min_percent must be a number 0..100, not {pct!r}")
        out["disk_free_min_percent"] = float(pct)
    return out


def bootstrap_conf(config: NodeConfig) -> ConfState:
    """The first membership ``mqstore bootstrap`` gives a new cluster from ``config``: this node
    and its ``peers`` as voters, in their sites; ``min_sites`` defaults to 2, or 1 for a cluster
    in a single site (a one-node trial, say)."""
    from mqstore.consensus.types import ConfState

    sites = sorted({(config.node_id, config.site), *((p.id, p.site) for p in config.peers)})
    distinct = len({s for _, s in sites})
    min_sites = config.min_sites if config.min_sites is not None else (2 if distinct > 1 else 1)
    return ConfState(voters=frozenset(n for n, _ in sites), sites=tuple(sites), min_sites=min_sites)


def check_placement(config: NodeConfig) -> ConfState:
    """Raise ConfigError naming the file unless the membership ``mqstore bootstrap`` would create
    from ``config`` (:func:`bootstrap_conf`) follows the placement rules, checked by the same
    function bootstrap and every membership change use
    (:func:`mqstore.consensus.raft.validate_conf`)."""
    from mqstore.consensus.raft import validate_conf
    from mqstore.consensus.types import InvalidConfig

    conf = bootstrap_conf(config)
    try:
        validate_conf(conf)
    except InvalidConfig as exc:
        raise ConfigError(
            f"{config.source}: min_sites, site and [[peers]]: this node and its peers break the placement rules "
            f"(`mqstore bootstrap` refuses them): {exc}"
        ) from None
    return conf


def load(path: str | Path, *, check_tls: bool = True) -> NodeConfig:
    """Read and validate a TOML configuration file.

    ``check_tls=False`` leaves out reading the TLS files (readable, matching, signed by the CA,
    valid now, naming the node): for commands that read a stopped node's config only for its
    data dir, key file and node id, which work on the store whatever state its certificate is in
    (expired, say: exactly when an operator needs them)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    return parse(data, str(p), check_tls=check_tls)


__all__ = ["AuthConfig", "ClientRoles", "ConfigError", "EdgeLimits", "NodeConfig", "Peer", "TLSFiles", "bootstrap_conf",
           "check_address", "check_cluster_id", "check_placement", "check_site", "load", "parse"]
