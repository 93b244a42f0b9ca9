"""Run a real multi-process mqstore cluster on 127.0.0.1 (for tests and benchmarks).

Each node is a separate ``python -m mqstore serve --config nodeN.toml`` process with its own data
dir; all share one KEK file. ``LocalCluster`` writes the configs, bootstraps the data dirs,
starts, stops (SIGTERM), kills (SIGKILL), pauses (SIGSTOP/SIGCONT) and restarts nodes, and finds
the leader. ``peer_address`` overrides let a test route any single link through a proxy:
:meth:`LocalCluster.proxy_link` (or :meth:`LocalCluster.proxy_all_links`) does that with a
:class:`~mqstore.testing.proxy.Proxy`, and :meth:`LocalCluster.isolate` / :meth:`LocalCluster.heal`
cut and heal them. After a run, :meth:`LocalCluster.wait_converged`, :meth:`LocalCluster.scan` and
:meth:`LocalCluster.state_digest` check that the replicas agree.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mqstore.crypto import create_key_file
from mqstore.testing.proxy import Direction, Proxy

#: The tables derived only by applying the log: equal on every replica at the same applied index.
STATE_TABLES = (
    b"messages", b"recipients", b"ready", b"ready_dom", b"leases", b"lease_due", b"expiry", b"retention",
    b"live", b"msg_ns", b"dedup", b"dedup_exp", b"stats", b"policies",
)


def state_digest(data_dir: Path, key_file: Path) -> tuple[int, str]:
    """(applied index, SHA-256 of the state tables) of the store in ``data_dir`` (not running):
    replicas that applied the same log have equal digests."""
    from mqstore.node.raftlog import LmdbRaftStorage
    from mqstore.store import LogStore

    digest = hashlib.sha256()
    with LogStore(data_dir, key_file=key_file, readonly=True, create=False) as store:
        applied = LmdbRaftStorage(store).applied_index()
        with store.env.read() as txn:
            for table in STATE_TABLES:
                digest.update(b"\x00table:" + table)
                with txn.cursor(db=store.env.dbs[table]) as cur:
                    for key, value in cur:
                        digest.update(len(key).to_bytes(4, "big") + key + len(value).to_bytes(4, "big") + value)
    return applied, digest.hexdigest()


_PORTS_GIVEN: set[int] = set()
_PORTS_LOW = 10_000


def _ephemeral_low() -> int:
    """The first port the kernel hands out to outgoing connections (Linux; 32768 elsewhere)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1, below the kernel's ephemeral range (a
    port from that range can be taken by any outgoing connection before the server binds it: a
    busy test run then sees 'Address already in use'), and never one this process handed out before."""
    rng = random.Random()
    high = _ephemeral_low()
    for _ in range(200):
        port = rng.randrange(_PORTS_LOW, high) if high > _PORTS_LOW + 1000 else 0
        if port in _PORTS_GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = int(s.getsockname()[1])
        if port not in _PORTS_GIVEN:
            _PORTS_GIVEN.add(port)
            return port
    raise RuntimeError("no free TCP port found on 127.0.0.1")


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true (returns True) or ``timeout`` seconds passed (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


@dataclass
class NodeSpec:
    node_id: int
    site: str
    port: int
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    #: Where this node dials each peer (peer id -> address); default: the peer's own port.
    peer_address: dict[int, str] = field(default_factory=dict)
    #: The port of its Prometheus endpoint (0: none).
    metrics_port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


class LocalCluster:
    """A cluster of node processes. ``sites`` lists each node's site, e.g. ["a", "b", "c"]."""

    def __init__(
        self,
        root: Path,
        sites: list[str],
        *,
        min_sites: int | None = None,
        cluster_id: str = "test",
        election_tick: int = 10,
        heartbeat_ms: int = 100,
        env: dict[str, str] | None = None,
        tls: bool = False,
        extra_config: str = "",
        token: str | None = None,
        metrics: bool = False,
    ) -> None:
        """``tls``: a CA and node certificates in ``root/certs`` (mutual TLS everywhere; the
        cluster's own calls use the client certificate ``certs/client-admin``); otherwise the
        nodes are plaintext (``insecure = true``). ``extra_config`` is TOML appended to every
        node's config (``[limits]``, ``[auth]``, ``[metrics]``, ...; it must start with a table).
        ``token``: the bearer token the cluster's own calls send (when ``[auth]`` needs one).
        ``metrics``: each node serves Prometheus metrics on a port of its own (``metrics_url``)."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.key_file = create_key_file(self.root / "kek.key")
        self.cluster_id = cluster_id
        self.min_sites = min_sites
        self.election_tick = election_tick
        self.heartbeat_ms = heartbeat_ms
        self.env = {**os.environ, **(env or {})}
        self.nodes = {i + 1: NodeSpec(i + 1, site, free_port()) for i, site in enumerate(sites)}
        if metrics:
            for spec in self.nodes.values():
                spec.metrics_port = free_port()
        self.tls = tls
        self.extra_config = extra_config
        self.token = token
        self.certs = self.root / "certs"
        if tls:
            from mqstore.security.certs import CA, init_ca

            init_ca(self.certs, overwrite=True)
            ca = CA.load(self.certs)
            for node_id in self.nodes:
                ca.issue_node(node_id, self.certs)
            ca.issue_client("admin", self.certs, roles=["admin", "reader", "producer", "worker", "compliance"])
        #: Proxies made by proxy_link, by link (dialing node, dialed node).
        self.proxies: dict[tuple[int, int], Proxy] = {}

    # --- configuration --------------------------------------------------------------------------

    def metrics_url(self, node_id: int) -> str:
        return f"http://127.0.0.1:{self.nodes[node_id].metrics_port}/metrics"

    def config_path(self, node_id: int) -> Path:
        return self.root / f"node{node_id}.toml"

    def data_dir(self, node_id: int) -> Path:
        return self.root / f"n{node_id}"

    def write_config(self, node_id: int, members: list[int] | None = None, *, overrides: bool = True) -> Path:
        """Write the node's config. With ``overrides`` (the default) a peer is dialed at the
        node's ``peer_address`` for it when set; bootstrap writes the peers' own addresses (they
        go into the replicated member directory, which clients are redirected through)."""
        spec = self.nodes[node_id]
        members = members if members is not None else list(self.nodes)
        lines = [
            f"node_id = {node_id}",
            f'site = "{spec.site}"',
            f'listen = "{spec.address}"',
            f'data_dir = "{self.data_dir(node_id)}"',
            f'key_file = "{self.key_file}"',
            f"election_tick = {self.election_tick}",
            f"heartbeat_ms = {self.heartbeat_ms}",
        ]
        if self.min_sites is not None:
            lines.append(f"min_sites = {self.min_sites}")
        if not self.tls:
            lines.append("insecure = true")
        for peer_id in members:
            if peer_id == node_id:
                continue
            peer = self.nodes[peer_id]
            address = spec.peer_address.get(peer_id, peer.address) if overrides else peer.address
            lines += ["", "[[peers]]", f"id = {peer_id}", f'site = "{peer.site}"', f'address = "{address}"']
        if self.tls:
            lines += ["", "[tls]", f'ca = "{self.certs / "ca.pem"}"', f'cert = "{self.certs / f"node-{node_id}.pem"}"',
                      f'key = "{self.certs / f"node-{node_id}.key"}"']
        if spec.metrics_port:
            lines += ["", "[metrics]", f'listen = "127.0.0.1:{spec.metrics_port}"']
        if self.extra_config:
            lines += ["", self.extra_config]
        path = self.config_path(node_id)
        path.write_text("\n".join(lines) + "\n")
        return path

    def _mqstore(self, *args: str, log_path: Path | None = None) -> subprocess.Popen[bytes]:
        out = log_path.open("ab") if log_path is not None else subprocess.DEVNULL
        return subprocess.Popen(
            [sys.executable, "-m", "mqstore", *args], stdout=out, stderr=subprocess.STDOUT, env=self.env
        )

    def bootstrap(self) -> None:
        for node_id in self.nodes:
            self.write_config(node_id, overrides=False)
            config = str(self.config_path(node_id))
            proc = self._mqstore("bootstrap", "--config", config, "--cluster-id", self.cluster_id)
            if proc.wait(60) != 0:
                raise RuntimeError(f"bootstrap of node {node_id} failed")

    # --- processes ----------------------------------------------------------------------------------

    def start(self, node_id: int, members: list[int] | None = None) -> None:
        """Start the node (``members``: the peers its config lists, default every node)."""
        spec = self.nodes[node_id]
        if spec.process is not None and spec.process.poll() is None:
            return
        self.write_config(node_id, members)
        spec.log_path = self.root / f"node{node_id}.log"
        spec.process = self._mqstore("serve", "--config", str(self.config_path(node_id)), log_path=spec.log_path)

    def start_all(self) -> None:
        for node_id in self.nodes:
            self.start(node_id)

    def kill(self, node_id: int) -> None:
        """SIGKILL: no shutdown of any kind."""
        spec = self.nodes[node_id]
        if spec.process is not None and spec.process.poll() is None:
            spec.process.kill()
            spec.process.wait(30)

    def stop(self, node_id: int, timeout: float = 30) -> None:
        """SIGTERM: graceful (leadership handed over, in-flight calls finished)."""
        spec = self.nodes[node_id]
        if spec.process is not None and spec.process.poll() is None:
            spec.process.send_signal(signal.SIGTERM)
            try:
                spec.process.wait(timeout)
            except subprocess.TimeoutExpired:
                spec.process.kill()
                spec.process.wait(30)

    def fill_disk(self, node_id: int) -> int:
        """Fill the running node's disk, as far as it can tell: its file size limit (RLIMIT_FSIZE)
        becomes its data file's size now, so every write that needs the file to grow fails as on
        a full disk (EFBIG: ``mqstore serve`` ignores SIGXFSZ). A restart lifts it. Returns the limit."""
        spec = self.nodes[node_id]
        if spec.process is None or spec.process.poll() is not None:
            raise RuntimeError(f"node {node_id} is not running")
        size = (self.data_dir(node_id) / "data.mdb").stat().st_size
        resource.prlimit(spec.process.pid, resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))
        return size

    def pause(self, node_id: int) -> None:
        spec = self.nodes[node_id]
        if spec.process is not None:
            spec.process.send_signal(signal.SIGSTOP)

    def resume(self, node_id: int) -> None:
        spec = self.nodes[node_id]
        if spec.process is not None:
            spec.process.send_signal(signal.SIGCONT)

    def alive(self, node_id: int) -> bool:
        spec = self.nodes[node_id]
        return spec.process is not None and spec.process.poll() is None

    def restart(self, node_id: int) -> None:
        """Start a node that was killed or stopped (its config is written again)."""
        self.kill(node_id)
        self.start(node_id)

    def site_nodes(self, site: str) -> list[int]:
        return [n for n, spec in self.nodes.items() if spec.site == site]

    def kill_site(self, site: str) -> list[int]:
        """SIGKILL every node of ``site`` (at once, as a site-wide power loss would); their ids."""
        victims = self.site_nodes(site)
        for node_id in victims:
            spec = self.nodes[node_id]
            if spec.process is not None and spec.process.poll() is None:
                spec.process.kill()
        for node_id in victims:
            self.kill(node_id)  # reap
        return victims

    def close(self) -> None:
        for node_id in self.nodes:
            self.resume(node_id)
            self.kill(node_id)
        for proxy in self.proxies.values():
            proxy.close()
        self.proxies.clear()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- links through proxies -------------------------------------------------------------------

    def proxy_link(self, src: int, dst: int) -> Proxy:
        """Route what node ``src`` sends to node ``dst`` through a new :class:`Proxy` (returned;
        also kept in ``proxies[(src, dst)]``). Takes effect when ``src`` (re)starts: call it after
        :meth:`bootstrap` and before :meth:`start`. The reverse direction is a separate link."""
        if src == dst or src not in self.nodes or dst not in self.nodes:
            raise ValueError(f"no link {src} -> {dst} in a cluster of nodes {sorted(self.nodes)}")
        old = self.proxies.pop((src, dst), None)
        if old is not None:
            old.close()
        proxy = Proxy(self.nodes[dst].address, name=f"link-{src}-{dst}").start()
        self.proxies[(src, dst)] = proxy
        self.nodes[src].peer_address[dst] = proxy.address
        return proxy

    def proxy_all_links(self) -> dict[tuple[int, int], Proxy]:
        """A proxy on every link, both directions (``n * (n - 1)`` proxies)."""
        for src in self.nodes:
            for dst in self.nodes:
                if src != dst:
                    self.proxy_link(src, dst)
        return dict(self.proxies)

    def links_of(self, node_id: int, *, outbound: bool = True, inbound: bool = True) -> list[Proxy]:
        """The proxied links that ``node_id`` sends on (outbound) and/or receives on (inbound)."""
        return [
            p
            for (src, dst), p in self.proxies.items()
            if (outbound and src == node_id) or (inbound and dst == node_id)
        ]

    def isolate(
        self, node_id: int, *, outbound: bool = True, inbound: bool = True, direction: Direction = "both"
    ) -> None:
        """Cut ``node_id``'s proxied links: all of them (a full partition of that node), or only
        those it sends on (``inbound=False``) or receives on (``outbound=False``), an asymmetric
        partition. Only links made with :meth:`proxy_link` can be cut."""
        links = self.links_of(node_id, outbound=outbound, inbound=inbound)
        if not links:
            raise ValueError(f"node {node_id} has no proxied links: call proxy_link before starting it")
        for proxy in links:
            proxy.cut(direction)

    def heal(self) -> None:
        """Heal every proxied link (cuts, blackholes and delays end)."""
        for proxy in self.proxies.values():
            proxy.heal()
            proxy.delay(0)

    # --- observation ----------------------------------------------------------------------------

    def addresses(self, node_ids: list[int] | None = None) -> list[str]:
        return [self.nodes[i].address for i in (node_ids or list(self.nodes))]

    def client_options(self) -> dict[str, Any]:
        """``tls`` and ``token`` for :class:`mqstore.client.Client` (what the cluster's own calls use)."""
        out: dict[str, Any] = {"token": self.token} if self.token else {}
        if self.tls:
            from mqstore.security.tls import ClientTLS

            out["tls"] = ClientTLS(self.certs / "ca.pem", self.certs / "client-admin.pem",
                                   self.certs / "client-admin.key")
        return out

    def status(self, node_id: int, timeout: float = 2.0) -> dict[str, Any] | None:
        from mqstore.client import Client

        try:
            with Client([self.nodes[node_id].address], timeout=timeout, **self.client_options()) as client:
                return client.status(self.nodes[node_id].address)
        except Exception:
            return None

    def wait_for_leader(self, timeout: float = 30.0, among: list[int] | None = None) -> int:
        """The id of a node that reports itself leader (polling every 50 ms)."""
        deadline = time.monotonic() + timeout
        candidates = among or list(self.nodes)
        while time.monotonic() < deadline:
            for node_id in candidates:
                if not self.alive(node_id):
                    continue
                st = self.status(node_id, timeout=1.0)
                if st is not None and st.get("role") == "leader":
                    return node_id
            time.sleep(0.05)
        raise TimeoutError(f"no leader among {candidates} within {timeout} s")

    def log_tail(self, node_id: int, lines: int = 40) -> str:
        path = self.nodes[node_id].log_path
        if path is None or not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def log_tails(self, lines: int = 40) -> str:
        """Every node's log tail, headed by the node's id, site and state (for failure reports)."""
        parts = []
        for node_id, spec in self.nodes.items():
            state = "running" if self.alive(node_id) else "down"
            parts.append(f"----- node {node_id} (site {spec.site}, {state}) {spec.log_path} -----")
            parts.append(self.log_tail(node_id, lines))
        return "\n".join(parts)

    def statuses(self, node_ids: list[int] | None = None) -> dict[int, dict[str, Any] | None]:
        """Admin status of each running node (None for one that does not answer)."""
        ids = node_ids or list(self.nodes)
        return {n: self.status(n, timeout=2.0) if self.alive(n) else None for n in ids}

    def wait_converged(self, timeout: float = 30.0, node_ids: list[int] | None = None) -> dict[int, int]:
        """Wait until the running nodes (or ``node_ids``) agree on one leader and all have applied
        everything it has committed: every applied index equals the leader's commit index, twice in
        a row (maintenance may append an entry at any time). Returns node id -> applied index;
        raises TimeoutError naming what differed."""
        ids = node_ids or [n for n in self.nodes if self.alive(n)]
        last: dict[int, dict[str, Any] | None] = {}
        settled = 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            last = self.statuses(ids)
            agree = all(st is not None for st in last.values())
            if agree:
                leaders = {st["leader_id"] for st in last.values() if st is not None}
                commits = {st["commit_index"] for st in last.values() if st is not None and st["role"] == "leader"}
                applied = {st["applied_index"] for st in last.values() if st is not None}
                agree = len(leaders) == 1 and 0 not in leaders and len(commits) == 1 and applied == commits
            settled = settled + 1 if agree else 0
            if settled >= 2:
                return {n: st["applied_index"] for n, st in last.items() if st is not None}
            time.sleep(0.2)
        keys = ("role", "term", "leader_id", "commit_index", "applied_index")
        summary = {n: None if st is None else {k: st[k] for k in keys} for n, st in last.items()}
        raise TimeoutError(f"nodes {ids} did not converge within {timeout} s: {summary}")

    def scan(self, node_id: int) -> dict[str, Any]:
        """``mqstore scan --json`` of a node's data dir (the node must be stopped): records_checked,
        first_index, last_index, clean, corrupt."""
        if self.alive(node_id):
            raise RuntimeError(f"node {node_id} is running: stop it before scanning its data dir")
        out = subprocess.run(
            [sys.executable, "-m", "mqstore", "scan", "--data-dir", str(self.data_dir(node_id)),
             "--key-file", str(self.key_file), "--json"],
            capture_output=True, env=self.env, timeout=120,
        )
        try:
            report: dict[str, Any] = json.loads(out.stdout)
        except ValueError:
            raise RuntimeError(f"mqstore scan of node {node_id} failed ({out.returncode}): {out.stderr!r}") from None
        report["exit_code"] = out.returncode
        return report

    def state_digest(self, node_id: int) -> tuple[int, str]:
        """(applied index, SHA-256 of the state tables) of a stopped node's data dir: replicas that
        applied the same log have equal digests."""
        if self.alive(node_id):
            raise RuntimeError(f"node {node_id} is running: stop it before reading its data dir")
        return state_digest(self.data_dir(node_id), self.key_file)


    # --- operations drills (mqstore/ops, tests/test_drills.py) ----------------------------------

    def add_node(self, site: str) -> int:
        """A new node (the next id never used in this cluster, a new port) in ``site``, with its
        config written (every other node as a peer); its data dir is not prepared. Returns its id."""
        node_id = max(self.nodes) + 1
        self.nodes[node_id] = NodeSpec(node_id, site, free_port())
        self.write_config(node_id)
        return node_id

    def wipe(self, node_id: int) -> None:
        """Delete a (killed) node's data dir: a lost disk."""
        import shutil

        if self.alive(node_id):
            raise RuntimeError(f"node {node_id} is running: kill it before wiping its data dir")
        shutil.rmtree(self.data_dir(node_id))

    def corrupt_record(self, node_id: int, index: int, offset: int = -1) -> int:
        """Flip one bit of the stored log record at ``index`` in node ``node_id``'s data dir, as bit
        rot would (through LMDB's own locking, so the node may be running). ``offset`` into the
        framed record (default: its last byte). Returns the record's type."""
        import lmdb

        env = lmdb.open(str(self.data_dir(node_id)), max_dbs=64, subdir=True, create=False)
        try:
            db = env.open_db(b"log", create=False)
            with env.begin(write=True) as txn:
                key = index.to_bytes(8, "big")
                raw = txn.get(key, db=db)
                if raw is None:
                    raise KeyError(f"node {node_id} has no log record at {index}")
                damaged = bytearray(raw)
                damaged[offset] ^= 0x01
                txn.put(key, bytes(damaged), db=db)
                return int(raw[3])
        finally:
            env.close()

    def mqstore(self, *args: str, timeout: float = 120, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run the ``mqstore`` command (this Python's) with the cluster's environment."""
        return subprocess.run([sys.executable, "-m", "mqstore", *args], capture_output=True, text=True,
                              env=self.env, timeout=timeout, input=input)

    def servers(self, node_ids: list[int] | None = None) -> str:
        """``--server`` value: the running nodes' (or ``node_ids``') addresses, comma-separated."""
        ids = node_ids or [n for n in self.nodes if self.alive(n)]
        return ",".join(self.nodes[n].address for n in ids)

__all__ = ["STATE_TABLES", "LocalCluster", "NodeSpec", "free_port", "wait_until"]
