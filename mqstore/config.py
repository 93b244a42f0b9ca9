"""Node configuration files (TOML), validated on load with errors that name the key.

Example ``node.toml``::

    node_id   = 1
    site      = "ams"                 # data-center site of this node
    listen    = "127.0.0.1:7001"      # gRPC address to bind
    advertise = "127.0.0.1:7001"      # address peers and clients use (default: listen)
    data_dir  = "/var/lib/mqstore/n1"
    key_file  = "/etc/mqstore/kek.key"
    min_sites = 2                     # an index commits only when voters in 2 sites hold it
                                      # (default: 2, or 1 when all members share one site)

    [[peers]]                         # the other members this node knows at start
    id      = 2
    site    = "fra"
    address = "127.0.0.1:7002"        # where THIS node dials peer 2 (may be a local proxy)

``address`` of a peer is a local override: a node dials each peer at the address in its own
config, so a test can put a proxy on any single link.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mqstore.errors import InvalidArgument

_KEYS = {"node_id", "site", "listen", "advertise", "data_dir", "key_file", "min_sites", "peers", "cluster_id",
         "election_tick", "heartbeat_ms", "log_level", "log_json"}
_PEER_KEYS = {"id", "site", "address"}


class ConfigError(InvalidArgument):
    """A configuration file is invalid; the message names the file, the key and the problem."""


@dataclass(frozen=True, slots=True)
class Peer:
    id: int
    site: str
    address: str


@dataclass(frozen=True, slots=True)
class NodeConfig:
    node_id: int
    site: str
    listen: str
    data_dir: Path
    key_file: Path | None = None
    advertise: str = ""
    min_sites: int | None = None  # None: 2, or 1 when every member is in one site
    peers: tuple[Peer, ...] = ()
    cluster_id: str = ""
    election_tick: int = 10
    heartbeat_ms: int = 100
    log_level: str = "info"
    log_json: bool = False
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
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{where} must be 'host:port' with a port 1..65535, not {value!r}")
    return value


def _int(value: object, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{where} must be an integer {lo}..{hi}, not {value!r}")
    return value


def _name(value: object, where: str) -> str:
    plain = isinstance(value, str) and value.replace("-", "").replace("_", "").isalnum()
    if not isinstance(value, str) or not plain or len(value) > 64:
        raise ConfigError(f"{where} must be a name of 1-64 letters, digits, '-' or '_', not {value!r}")
    return value


def parse(data: dict[str, Any], source: str = "<dict>") -> NodeConfig:
    """Validate a configuration mapping (as read from TOML)."""
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
    advertise = _addr(data["advertise"], f"{where} advertise") if data.get("advertise") else ""
    if not isinstance(data["data_dir"], str) or not data["data_dir"]:
        raise ConfigError(f"{where} data_dir must be a path")
    key_file = data.get("key_file")
    if key_file is not None and (not isinstance(key_file, str) or not key_file):
        raise ConfigError(f"{where} key_file must be a path")
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
    cluster_id = data.get("cluster_id", "")
    if cluster_id:
        _name(cluster_id, f"{where} cluster_id")
    log_level = data.get("log_level", "info")
    if log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"{where} log_level must be debug, info, warning or error, not {log_level!r}")
    log_json = data.get("log_json", False)
    if not isinstance(log_json, bool):
        raise ConfigError(f"{where} log_json must be true or false")
    return NodeConfig(
        node_id=node_id,
        site=site,
        listen=listen,
        advertise=advertise,
        data_dir=Path(data["data_dir"]),
        key_file=Path(key_file) if key_file else None,
        min_sites=min_sites,
        peers=tuple(peers),
        cluster_id=cluster_id,
        election_tick=_int(data.get("election_tick", 10), f"{where} election_tick", 2, 1000),
        heartbeat_ms=_int(data.get("heartbeat_ms", 100), f"{where} heartbeat_ms", 10, 10_000),
        log_level=log_level,
        log_json=log_json,
        source=source,
    )


def load(path: str | Path) -> NodeConfig:
    """Read and validate a TOML configuration file."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    return parse(data, str(p))


__all__ = ["ConfigError", "NodeConfig", "Peer", "load", "parse"]
