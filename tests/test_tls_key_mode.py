"""A node's TLS private key is its identity in the cluster (whoever reads it can speak Raft as that
node): like the KEK and the audit signing key, it is refused when other users can read it or its
group can change it, by ``mqstore config check`` and by a node loading it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mqstore.config import ConfigError, TLSFiles, parse
from mqstore.errors import InvalidArgument
from mqstore.security.tls import PeerChannelFactory, server_credentials
from mqstore.testing.cluster import free_port
from mqstore.testing.secure import Pki


def _config(tmp_path: Path, tls: dict[str, str]) -> dict[str, Any]:
    return {"node_id": 1, "site": "a", "listen": f"127.0.0.1:{free_port()}", "data_dir": str(tmp_path / "data"),
            "tls": tls}


def test_issued_keys_are_private(tmp_path: Path) -> None:
    tls = Pki(tmp_path / "pki").node_tls(1)
    assert os.stat(tls["key"]).st_mode & 0o777 == 0o600


@pytest.mark.parametrize(("mode", "problem"), [
    (0o644, "accessible to every user (mode 0644)"),
    (0o666, "accessible to every user (mode 0666)"),
    (0o660, "writable by its group (mode 0660)"),
])
def test_a_tls_key_other_users_can_read_or_change_is_refused(tmp_path: Path, mode: int, problem: str) -> None:
    tls = Pki(tmp_path / "pki").node_tls(1)
    os.chmod(tls["key"], mode)
    with pytest.raises(ConfigError) as err:
        parse(_config(tmp_path, tls))
    assert "tls.key" in str(err.value) and problem in str(err.value)
    assert f"chmod 600 {tls['key']}" in str(err.value)
    # A node loading it (a config parsed without the file checks) refuses it too.
    files = TLSFiles(Path(tls["ca"]), Path(tls["cert"]), Path(tls["key"]))
    with pytest.raises(InvalidArgument, match=problem.replace("(", r"\(").replace(")", r"\)")):
        server_credentials(files)
    with pytest.raises(InvalidArgument, match="TLS key"):
        PeerChannelFactory(files)


def test_config_check_names_the_tls_key_mode(tmp_path: Path) -> None:
    tls = Pki(tmp_path / "pki").node_tls(1)
    os.chmod(tls["key"], 0o644)
    toml = tmp_path / "node.toml"
    toml.write_text(f'node_id = 1\nsite = "a"\nlisten = "127.0.0.1:{free_port()}"\ndata_dir = "{tmp_path}/data"\n'
                    f'[tls]\nca = "{tls["ca"]}"\ncert = "{tls["cert"]}"\nkey = "{tls["key"]}"\n')
    run = subprocess.run([sys.executable, "-m", "mqstore", "config", "check", str(toml)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode != 0, run.stdout
    assert "tls.key" in run.stdout + run.stderr and "accessible to every user" in run.stdout + run.stderr
    os.chmod(tls["key"], 0o600)
    run = subprocess.run([sys.executable, "-m", "mqstore", "config", "check", str(toml)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_a_group_readable_key_and_a_link_to_a_private_key_are_accepted(tmp_path: Path) -> None:
    """Group read stays allowed (a service group may share a key, as for the KEK), and a key
    reached through a symbolic link (how secret stores mount them) is checked where it leads."""
    tls = Pki(tmp_path / "pki").node_tls(1)
    os.chmod(tls["key"], 0o640)
    parse(_config(tmp_path, tls))
    link = tmp_path / "key-link.pem"
    link.symlink_to(tls["key"])
    files = TLSFiles(Path(tls["ca"]), Path(tls["cert"]), link)
    server_credentials(files)
    os.chmod(tls["key"], 0o644)
    with pytest.raises(InvalidArgument, match="accessible to every user"):
        server_credentials(files)
