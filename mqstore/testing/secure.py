"""Test helpers for secured nodes: a PKI in a directory (:class:`Pki`) and in-process clusters of
:class:`~mqstore.server.NodeServer` with TLS or plaintext (:class:`InProcessCluster`)."""

from __future__ import annotations

import datetime as _dt
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from mqstore.config import NodeConfig, parse
from mqstore.crypto import create_key_file
from mqstore.security.certs import CA, CertPair, init_ca
from mqstore.security.tls import ClientTLS
from mqstore.testing.cluster import free_port


class Pki:
    """A cluster CA in ``root`` and certificates issued on demand."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not (self.root / "ca.pem").exists():
            init_ca(self.root)
        self.ca = CA.load(self.root)

    @property
    def ca_pem(self) -> Path:
        return self.root / "ca.pem"

    def node(self, node_id: int, **kwargs: Any) -> CertPair:
        return self.ca.issue_node(node_id, self.root, **kwargs)

    def client(self, name: str, roles: list[str], namespaces: list[str] | None = None, *,
               expired: bool = False, prefix: str | None = None) -> CertPair:
        extra: dict[str, Any] = {}
        if expired:
            now = _dt.datetime.now(_dt.UTC)
            extra = {"not_before": now - _dt.timedelta(days=30), "not_after": now - _dt.timedelta(days=1)}
        return self.ca.issue_client(name, self.root, roles=roles, namespaces=namespaces, prefix=prefix, **extra)

    def channel(self, address: str, pair: CertPair) -> grpc.Channel:
        """A raw gRPC channel to ``address`` presenting ``pair`` (a client's or a node's certificate),
        for calls a test makes without mqstore.Client."""
        creds = grpc.ssl_channel_credentials(self.ca_pem.read_bytes(), pair.key.read_bytes(), pair.cert.read_bytes())
        return grpc.secure_channel(address, creds)

    def client_tls(self, pair: CertPair | None = None, ca: Path | None = None) -> ClientTLS:
        return ClientTLS(ca or self.ca_pem, pair.cert if pair else None, pair.key if pair else None)

    def node_tls(self, node_id: int) -> dict[str, str]:
        """The ``[tls]`` table of node ``node_id``'s config (its certificate issued if needed)."""
        cert, key = self.root / f"node-{node_id}.pem", self.root / f"node-{node_id}.key"
        if not cert.exists():
            self.node(node_id)
        return {"ca": str(self.ca_pem), "cert": str(cert), "key": str(key)}


def status_of(call: Callable[..., object]) -> tuple[str, str]:
    """Run ``call`` (a raw gRPC call); its status code's name and details ("OK", "" on success)."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or ""
    return "OK", ""


class InProcessCluster:
    """``len(sites)`` NodeServers in this process (one site each unless ``sites`` repeats one),
    bootstrapped and started. ``pki``: TLS (else ``insecure = true``). ``extra``: more config keys
    for every node (``auth``, ``limits``, ``metrics``, ``health``). ``node_options``: keyword
    arguments of a node's :class:`mqstore.node.runtime.Node` by node id (e.g. a ``clock``)."""

    def __init__(self, root: Path, sites: list[str], *, pki: Pki | None = None, extra: dict[str, Any] | None = None,
                 configs: dict[int, NodeConfig] | None = None,
                 node_options: dict[int, dict[str, Any]] | None = None) -> None:
        from mqstore.node.runtime import bootstrap
        from mqstore.server import NodeServer

        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.pki = pki
        key = create_key_file(self.root / "kek.key")
        ids = list(range(1, len(sites) + 1))
        self.addresses = {i: f"127.0.0.1:{free_port()}" for i in ids}
        self.configs: dict[int, NodeConfig] = {}
        for i in ids:
            data: dict[str, Any] = {
                "node_id": i,
                "site": sites[i - 1],
                "listen": self.addresses[i],
                "data_dir": str(self.root / f"n{i}"),
                "key_file": str(key),
                "peers": [{"id": j, "site": sites[j - 1], "address": self.addresses[j]} for j in ids if j != i],
                **(extra or {}),
            }
            if pki is not None:
                data["tls"] = pki.node_tls(i)
            else:
                data["insecure"] = True
            self.configs[i] = parse(data)
        self.configs.update(configs or {})
        self.servers: dict[int, NodeServer] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in ids:
                bootstrap(self.configs[i], "test")
            for i in ids:
                self.servers[i] = NodeServer(self.configs[i], **(node_options or {}).get(i, {}))
        for s in self.servers.values():
            s.start()

    def leader(self, timeout: float = 20.0, among: list[int] | None = None) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, s in self.servers.items():
                if (among is None or i in among) and s.node.is_leader:
                    return s
            time.sleep(0.02)
        raise AssertionError("no leader elected")

    def address(self, node_id: int) -> str:
        return self.addresses[node_id]

    def close_and_scan(self) -> list[Any]:
        """Stop every node, then read each node's whole log back: one ScanReport per node (every
        record decodes, checksums and decrypts when ``report.clean``)."""
        from mqstore.store import LogStore

        self.close()
        reports = []
        for config in self.configs.values():
            with LogStore(config.data_dir, key_file=config.key_file, readonly=True) as store:
                reports.append(store.scan())
        return reports

    def close(self) -> None:
        for s in self.servers.values():
            try:
                s.grpc.stop(0).wait(5)
                s.health.stop()
                s.queue.close()
                s.node.stop(transfer_leadership=False)
                if s.metrics is not None:
                    s.metrics.close()
            except Exception:
                pass
        self.servers.clear()


__all__ = ["InProcessCluster", "Pki"]
