"""Run a real multi-process mqstore cluster on 127.0.0.1 (for tests and benchmarks).

Each node is a separate ``python -m mqstore serve --config nodeN.toml`` process with its own data
dir; all share one KEK file. ``LocalCluster`` writes the configs, bootstraps the data dirs,
starts, stops (SIGTERM), kills (SIGKILL), pauses (SIGSTOP/SIGCONT) and restarts nodes, and finds
the leader. ``peer_address`` overrides let a test route any single link through a proxy.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mqstore.crypto import create_key_file


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class NodeSpec:
    node_id: int
    site: str
    port: int
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    #: Where this node dials each peer (peer id -> address); default: the peer's own port.
    peer_address: dict[int, str] = field(default_factory=dict)

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
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.key_file = create_key_file(self.root / "kek.key")
        self.cluster_id = cluster_id
        self.min_sites = min_sites
        self.election_tick = election_tick
        self.heartbeat_ms = heartbeat_ms
        self.env = {**os.environ, **(env or {})}
        self.nodes = {i + 1: NodeSpec(i + 1, site, free_port()) for i, site in enumerate(sites)}

    # --- configuration --------------------------------------------------------------------------

    def config_path(self, node_id: int) -> Path:
        return self.root / f"node{node_id}.toml"

    def data_dir(self, node_id: int) -> Path:
        return self.root / f"n{node_id}"

    def write_config(self, node_id: int, members: list[int] | None = None) -> Path:
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
        for peer_id in members:
            if peer_id == node_id:
                continue
            peer = self.nodes[peer_id]
            address = spec.peer_address.get(peer_id, peer.address)
            lines += ["", "[[peers]]", f"id = {peer_id}", f'site = "{peer.site}"', f'address = "{address}"']
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
            self.write_config(node_id)
            config = str(self.config_path(node_id))
            proc = self._mqstore("bootstrap", "--config", config, "--cluster-id", self.cluster_id)
            if proc.wait(60) != 0:
                raise RuntimeError(f"bootstrap of node {node_id} failed")

    # --- processes ----------------------------------------------------------------------------------

    def start(self, node_id: int) -> None:
        spec = self.nodes[node_id]
        if spec.process is not None and spec.process.poll() is None:
            return
        self.write_config(node_id)
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

    def close(self) -> None:
        for node_id in self.nodes:
            self.resume(node_id)
            self.kill(node_id)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- observation ----------------------------------------------------------------------------

    def addresses(self, node_ids: list[int] | None = None) -> list[str]:
        return [self.nodes[i].address for i in (node_ids or list(self.nodes))]

    def status(self, node_id: int, timeout: float = 2.0) -> dict[str, Any] | None:
        from mqstore.client import Client

        try:
            with Client([self.nodes[node_id].address], timeout=timeout) as client:
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


__all__ = ["LocalCluster", "NodeSpec", "free_port"]
