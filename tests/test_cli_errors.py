"""Arguments and configs the ``mqstore`` command refuses, and what it still does for an operator:
every refusal is one line naming the key or the option (exit 2), never a traceback, and nothing is
written before it."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from mqstore.crypto import create_key_file
from mqstore.security.certs import CA, init_ca


def _mqstore(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("mqstore", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "mqstore"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def _refused(*args: str, cwd: Path | None = None) -> str:
    """The one-line error of a refused command (exit 2), as a person sees it."""
    out = _mqstore(*args, cwd=cwd)
    assert out.returncode == 2, f"mqstore {' '.join(args)} -> {out.returncode}\n{out.stdout}\n{out.stderr}"
    assert out.stderr.startswith("mqstore: error: ") and out.stderr.count("\n") == 1, out.stderr
    assert out.stdout == ""
    return out.stderr


def _node_toml(tmp_path: Path, extra: str = "", *, data: str = "data", insecure: bool = True) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(f'node_id = 1\nsite = "a"\nlisten = "127.0.0.1:1"\ndata_dir = "{tmp_path / data}"\n'
                    f'key_file = "{tmp_path / "kek.key"}"\n' + ("insecure = true\n" if insecure else "") + extra)
    return path


# --- config check -----------------------------------------------------------------------------------


@pytest.mark.parametrize("line, key", [
    ('listen = "127.0.0.1:\u00b2"', "listen"),
    ('listen = "127.0.0.1:\u0661\u0662"', "listen"),
    ('[metrics]\nlisten = "127.0.0.1:\u00b2"', "metrics.listen"),
    ("cluster_id = false", "cluster_id"),
    ('cluster_id = ""', "cluster_id"),
    ("advertise = 0", "advertise"),
])
def test_config_check_names_the_key_of_a_bad_value(tmp_path: Path, line: str, key: str) -> None:
    conf = tmp_path / "c.toml"
    listen = "" if line.startswith("listen") else 'listen = "127.0.0.1:7001"\n'
    conf.write_text(f'node_id = 1\nsite = "a"\n{listen}data_dir = "d"\ninsecure = true\n{line}\n', encoding="utf-8")
    assert _refused("config", "check", str(conf)).startswith(f"mqstore: error: {conf}: {key} must be ")


def test_a_clusters_key_file_is_made_with_keys_new_kek_and_checked_before_bootstrap(tmp_path: Path) -> None:
    """A member's key_file must exist before `bootstrap`: `config check` says so naming the file,
    `bootstrap` refuses writing nothing, and `mqstore keys new-kek` makes one (0600, never over an
    existing file) with which both go through."""
    conf = _node_toml(tmp_path, '\n[[peers]]\nid = 2\nsite = "b"\naddress = "127.0.0.1:2"\n')
    key = tmp_path / "kek.key"
    assert f"key file {key} does not exist" in _refused("config", "check", str(conf))
    assert f"key file {key} does not exist" in _refused("bootstrap", "--config", str(conf), "--cluster-id", "c1")
    assert not (tmp_path / "data").exists()
    made = _mqstore("keys", "new-kek", str(key), "--json")
    assert made.returncode == 0 and json.loads(made.stdout) == {"key_file": str(key)}, made.stderr
    assert key.stat().st_mode & 0o777 == 0o600
    before = key.read_bytes()
    assert "refusing to overwrite a key" in _refused("keys", "new-kek", str(key))
    assert key.read_bytes() == before
    assert _mqstore("config", "check", str(conf)).returncode == 0
    done = _mqstore("bootstrap", "--config", str(conf), "--cluster-id", "c1")
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("text, said", [
    ("mqstore-kek-v1:" + "ab" * 4 + "\n", "32"),  # a 4-byte "KEK"
    ("mqstore-audit-ed25519-v1:" + "11" * 32 + "\n", "is not an mqstore key file"),  # another secret file
    ("garbage\n", ""),
])
def test_config_check_reads_the_key_file_as_serve_does(tmp_path: Path, text: str, said: str) -> None:
    """Before, `config check` only parsed HEADER:HEX and called these valid; serve refused them."""
    conf = _node_toml(tmp_path)
    key = tmp_path / "kek.key"
    key.write_text(text)
    key.chmod(0o600)
    message = _refused("config", "check", str(conf))
    assert message.startswith(f"mqstore: error: {conf}: ") and f"key file {key}" in message and said in message
    assert f"key file {key}" in _refused("bootstrap", "--config", str(conf), "--cluster-id", "c1")  # as serve


@pytest.mark.parametrize("peers, min_sites, problem", [
    ([(2, "b")], 3, "the voters span 2 site(s) (a, b); min_sites is 3"),
    ([(2, "a"), (3, "b")], None, "site 'a' holds 2 of the 3 voters, a majority"),
])
def test_config_check_refuses_members_bootstrap_refuses(tmp_path: Path, peers: list[tuple[int, str]],
                                                        min_sites: int | None, problem: str) -> None:
    create_key_file(tmp_path / "kek.key")
    extra = (f"min_sites = {min_sites}\n" if min_sites else "") + "".join(
        f'[[peers]]\nid = {i}\nsite = "{site}"\naddress = "127.0.0.1:{i}"\n' for i, site in peers)
    conf = _node_toml(tmp_path, extra)
    message = _refused("config", "check", str(conf))
    assert message.startswith(f"mqstore: error: {conf}: ") and "placement rules" in message and problem in message
    # What bootstrap says about the same config (nothing else is compared: bootstrap is another's).
    boot = _mqstore("bootstrap", "--config", str(conf), "--cluster-id", "c1")
    assert boot.returncode == 2 and problem in boot.stderr
    # A config bootstrap takes is valid.
    good = _node_toml(tmp_path, 'min_sites = 2\n[[peers]]\nid = 2\nsite = "b"\naddress = "127.0.0.1:2"\n'
                      '[[peers]]\nid = 3\nsite = "c"\naddress = "127.0.0.1:3"\n', data="other")
    checked = _mqstore("config", "check", str(good), "--json")
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["valid"] is True


def test_config_check_refuses_what_serve_refuses_about_the_files(tmp_path: Path) -> None:
    """`config check` says "valid" only for a config `serve` would start with: the key file
    private and present once bootstrapped, a named audit signing key present, and a data dir that
    is this node's, of this site and cluster."""
    key = create_key_file(tmp_path / "kek.key")
    conf = _node_toml(tmp_path)
    text = conf.read_text()
    before = _mqstore("config", "check", str(conf), "--json")  # before bootstrap: it creates a missing key
    assert before.returncode == 0, before.stderr
    assert _mqstore("bootstrap", "--config", str(conf), "--cluster-id", "c1").returncode == 0
    assert _mqstore("config", "check", str(conf)).returncode == 0
    key.chmod(0o644)
    assert "is accessible to every user (mode 0644)" in _refused("config", "check", str(conf))
    key.chmod(0o600)
    cases = [
        (f'audit_signing_key = "{tmp_path / "nope.key"}"\n', "does not exist"),
        ('cluster_id = "other"\n', "belongs to cluster 'c1', the config says 'other'"),
    ]
    for extra, problem in cases:
        assert problem in _refused("config", "check", str(_node_toml(tmp_path, extra))), extra
    other = tmp_path / "other.toml"
    other.write_text(text.replace('site = "a"', 'site = "b"'))
    assert "holds node 1 of site 'a', the config says site 'b'" in _refused("config", "check", str(other))
    other.write_text(text.replace("node_id = 1", "node_id = 2"))
    assert "belongs to node 1, the config says node 2" in _refused("config", "check", str(other))
    conf.write_text(text)
    assert _mqstore("config", "check", str(conf)).returncode == 0
    key.unlink()
    assert "does not exist" in _refused("config", "check", str(conf))


# --- bootstrap / join --cluster-id ------------------------------------------------------------------


@pytest.mark.parametrize("command", ["bootstrap", "join"])
@pytest.mark.parametrize("cluster_id", ["", "bad id!", "x" * 65, "caf\u00e9 "])
def test_a_cluster_id_a_config_refuses_is_refused_on_the_command_line(tmp_path: Path, command: str,
                                                                      cluster_id: str) -> None:
    create_key_file(tmp_path / "kek.key")
    conf = _node_toml(tmp_path)
    message = _refused(command, "--config", str(conf), "--cluster-id", cluster_id)
    assert message == (f"mqstore: error: --cluster-id must be a name of 1-64 letters, digits, '-' or '_', "
                       f"not {cluster_id!r}\n")
    assert not (tmp_path / "data").exists()
    made = _mqstore(command, "--config", str(conf), "--cluster-id", "prod-1_a", "--json")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["cluster_id"] == "prod-1_a"


# --- a node whose certificate expired: offline commands still work ----------------------------------


def _expired_node(tmp_path: Path) -> Path:
    """A bootstrapped node whose config names a TLS certificate that expired yesterday."""
    create_key_file(tmp_path / "kek.key")
    conf = _node_toml(tmp_path)
    boot = _mqstore("bootstrap", "--config", str(conf), "--cluster-id", "c1")
    assert boot.returncode == 0, boot.stderr
    pki = tmp_path / "pki"
    init_ca(pki)
    now = dt.datetime.now(dt.UTC)
    pair = CA.load(pki).issue_node(1, pki, not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1))
    return _node_toml(tmp_path, f'[tls]\nca = "{pki / "ca.pem"}"\ncert = "{pair.cert}"\nkey = "{pair.key}"\n',
                      insecure=False)


def test_offline_commands_read_a_config_whose_certificate_expired(tmp_path: Path) -> None:
    conf = _expired_node(tmp_path)
    # The node itself (config check, serve) refuses the certificate, naming it...
    assert "tls.cert" in _refused("config", "check", str(conf)) and "not now" in _refused("config", "check", str(conf))
    # ...while the offline commands, which need only its data dir, key file and node id, work.
    status = _mqstore("status", "--config", str(conf), "--json")
    assert status.returncode == 0, status.stderr
    st: dict[str, Any] = json.loads(status.stdout)
    assert (st["node_id"], st["cluster_id"], st["role"]) == (1, "c1", "stopped")
    verify = _mqstore("verify", "--config", str(conf), "--json")
    assert verify.returncode == 0, verify.stderr
    assert json.loads(verify.stdout)["clean"] is True
    listed = _mqstore("queue", "list", "--config", str(conf), "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout)["count"] == 0, listed.stderr
    backup = _mqstore("backup", "--config", str(conf), "--out", str(tmp_path / "b.mqbak"), "--json")
    assert backup.returncode == 0, backup.stderr


# --- certs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["issue", "node", "--id", "1", "--days", "0"], "--days must be a number of days 1..36500, not 0"),
    (["issue", "node", "--id", "1", "--days", "-3"], "--days must be a number of days 1..36500, not -3"),
    (["issue", "node", "--id", "1", "--days", "100000000"], "--days must be a number of days 1..36500"),
    (["issue", "client", "--name", "x", "--roles", "producer", "--days", "36501"], "--days must be"),
    (["issue", "node", "--id", "1", "--host", "\u00e9.example"], "--host: '\u00e9.example' is not an IP address"),
    (["issue", "node", "--id", "1", "--host", "a b"], "--host: 'a b' is not an IP address"),
    (["issue", "node", "--id", "1", "--host", ""], "--host: '' is not an IP address"),
    (["issue", "client", "--name", "x", "--roles", ",,"], "--roles names no role (',,')"),
    (["issue", "client", "--name", "x", "--roles", "boss"], "--roles: unknown role(s) ['boss']"),
    (["issue", "client", "--name", "a b", "--roles", "producer"], "--name must be 1-128 characters"),
])
def test_certs_issue_refuses_bad_arguments_naming_them(tmp_path: Path, args: list[str], message: str) -> None:
    init_ca(tmp_path / "pki")
    before = sorted(p.name for p in (tmp_path / "pki").iterdir())
    assert message in _refused("certs", *args, "--dir", str(tmp_path / "pki"))
    assert sorted(p.name for p in (tmp_path / "pki").iterdir()) == before  # nothing written


@pytest.mark.parametrize("args, message", [
    (["--name", ""], "--name must be 1-64 printable characters, not ''"),
    (["--name", "x" * 65], "--name must be 1-64 printable characters"),
    (["--days", "0"], "--days must be a number of days 1..36500, not 0"),
    (["--days", "100000000"], "--days must be a number of days 1..36500"),
])
def test_certs_init_refuses_bad_arguments_naming_them(tmp_path: Path, args: list[str], message: str) -> None:
    assert message in _refused("certs", "init", "--dir", str(tmp_path / "pki"), *args)
    assert not (tmp_path / "pki").exists()


def test_certs_issue_takes_the_limits_and_ascii_names(tmp_path: Path) -> None:
    init_ca(tmp_path / "pki")
    pki = str(tmp_path / "pki")
    out = _mqstore("certs", "issue", "node", "--dir", pki, "--id", "1", "--days", "1", "--host", "xn--9ca.example",
                   "--host", "10.0.0.1", "--host", "*.mq.example.net")
    assert out.returncode == 0, out.stderr
    cert = x509.load_pem_x509_certificate((tmp_path / "pki" / "node-1.pem").read_bytes())
    assert dt.timedelta(hours=23) < cert.not_valid_after_utc - dt.datetime.now(dt.UTC) <= dt.timedelta(days=1)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "xn--9ca.example" in sans.get_values_for_type(x509.DNSName)
    out = _mqstore("certs", "issue", "client", "--dir", pki, "--name", "mta", "--roles", "producer,,", "--days",
                   "36500")
    assert out.returncode == 0, out.stderr


@pytest.fixture(autouse=True)
def _keep_sigpipe() -> Iterator[None]:
    """cli.main() run in this process makes SIGPIPE end it quietly (as the command does): undone after."""
    handler = signal.getsignal(signal.SIGPIPE)
    yield
    signal.signal(signal.SIGPIPE, handler)


OUT_OF_RANGE = [
    (["backup", "--server", "127.0.0.1:1", "--no-wait", "--wait", "-1", "--out", "{tmp}/b1.mqbak"], "--wait", "-1"),
    (["backup", "--server", "127.0.0.1:1", "--no-wait", "--wait", "1e7", "--out", "{tmp}/b2.mqbak"], "--wait", "1e7"),
    (["backup", "--server", "127.0.0.1:1", "--no-wait", "--wait", "0", "--out", "{tmp}/b3.mqbak"], "--wait", "0"),
    (["repair", "--data-dir", "{store}", "--index", "99999999999999999999"], "--index", "99999999999999999999"),
    (["repair", "--server", "127.0.0.1:1", "--index", "-1"], "--index", "-1"),
    (["cluster", "promote", "--server", "127.0.0.1:1", "--id", "-1"], "--id", "-1"),
    (["cluster", "remove", "--server", "127.0.0.1:1", "--id", "0"], "--id", "0"),
    (["cluster", "transfer-leader", "--server", "127.0.0.1:1", "--to", "-1"], "--to", "-1"),
    (["cluster", "add", "--server", "127.0.0.1:1", "--id", str(2**64), "--site", "d", "--address", "10.0.0.1:7001"],
     "--id", str(2**64)),
    (["recover", "--config", "{tmp}/node.toml", "--server", "127.0.0.1:1", "--wait", "1", "--timeout", "1",
      "--replace", "-3"], "--replace", "-3"),
]


@pytest.mark.parametrize(("template", "option", "value"), OUT_OF_RANGE,
                         ids=[f"{t[0]} {o} {v}" for t, o, v in OUT_OF_RANGE])
def test_out_of_range_numbers_are_refused_by_name_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], template: list[str], option: str, value: str
) -> None:
    """Ids, log indexes and waits out of range (negative, zero, past 64 bits, a wait past what a
    node is asked for) are refused naming the option, before any call: no traceback, exit 2."""
    import mqstore
    from mqstore import cli

    store = tmp_path / "store"
    with mqstore.open(store, key_file=create_key_file(tmp_path / "kek.key"), background=False):
        pass
    _node_toml(tmp_path)
    args = [a.format(tmp=tmp_path, store=store) for a in template]
    with pytest.raises(SystemExit) as exited:
        cli.main([*args, "--json"])
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert f"error: argument {option}: '{value}' is not " in err, err
    assert "Traceback" not in err
    doc = json.loads(out)  # --json: the same error as one JSON object on stdout, as for every error
    assert doc["error"] == "InvalidArgument" and f"argument {option}: '{value}' is not " in doc["message"], doc


def test_a_sub_millisecond_backup_wait_is_not_the_nodes_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--wait 0.0001`` asks the node to wait 1 ms, not 0 ms (which the node reads as its
    default of 30 s)."""
    from mqstore import cli
    from mqstore.ops import remote

    asked: list[Any] = []

    class Stub:
        def Backup(self, request: Any, timeout: float) -> Any:
            asked.append(request)
            return iter(())

    monkeypatch.setattr(remote, "stub", lambda client, address: Stub())
    monkeypatch.setattr(remote, "answering", lambda client: (client.addresses[0], {}))  # no node there
    cli.main(["backup", "--server", "127.0.0.1:1", "--no-wait", "--wait", "0.0001", "--out",
              str(tmp_path / "b.mqbak"), "--json"])
    capsys.readouterr()
    assert [r.wait_ms for r in asked] == [1]


def test_repair_of_a_running_node_refuses_peer_addresses_it_would_ignore() -> None:
    """`--peer` names where a stopped node fetches copies; a running node asks its members, so
    `repair --server ... --peer ...` is refused before anything is asked (it was ignored)."""
    message = _refused("repair", "--server", "127.0.0.1:1", "--peer", "127.0.0.1:2")
    assert "--peer is for a stopped node" in message, message
