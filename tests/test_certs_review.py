"""Review fixes of ``mqstore certs``, the TLS checks of ``config check``/``serve`` and of clients:
a CA that can never verify (expired, not a CA, a key that is not its own) is refused; a certificate
never outlives its CA; an encrypted ca.key is a clear error (or opened with
``MQSTORE_CA_PASSPHRASE``); file modes do not depend on the umask and ``certs issue`` does not
replace files without ``--force``; a client's TLS mistakes are refused at once, naming the file."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mqstore import cli
from mqstore.client import Client
from mqstore.crypto import create_key_file
from mqstore.errors import InvalidArgument
from mqstore.security.certs import CA, check_tls_files, init_ca
from mqstore.security.tls import ClientTLS

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(autouse=True)
def _keep_sigpipe() -> Iterator[None]:
    """cli.main() run in this process makes SIGPIPE end it quietly (as the command does): undone after."""
    handler = signal.getsignal(signal.SIGPIPE)
    yield
    signal.signal(signal.SIGPIPE, handler)


def _cli(*args: str, env: dict[str, str] | None = None,
         monkeypatch: pytest.MonkeyPatch | None = None) -> tuple[int, str, str]:
    if env:
        assert monkeypatch is not None
        for k, v in env.items():
            monkeypatch.setenv(k, v)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(list(args))
    return code, out.getvalue(), err.getvalue()


# --- PKI built by hand (what `certs init` cannot make: past dates, a non-CA as the CA) ---------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> None:
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc))


def _make_ca(d: Path, *, start: dt.datetime, end: dt.datetime, ca: bool = True,
             cn: str = "hand-made CA") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    d.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None if not ca else 0), critical=True)
            .sign(key, hashes.SHA256()))
    (d / "ca.pem").write_bytes(_pem(cert))
    _write_key(d / "ca.key", key)
    return cert, key


def _make_leaf(d: Path, name: str, issuer: x509.Certificate, issuer_key: ec.EllipticCurvePrivateKey, *,
               start: dt.datetime, end: dt.datetime, uri: str, ca: bool = False) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(issuer.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri),
                                                        x509.DNSName("localhost")]), critical=False)
            .sign(issuer_key, hashes.SHA256()))
    (d / f"{name}.pem").write_bytes(_pem(cert))
    _write_key(d / f"{name}.key", key)
    return d / f"{name}.pem", d / f"{name}.key"


def _node_config(tmp_path: Path, ca: Path, cert: Path, key: Path) -> Path:
    kek = create_key_file(tmp_path / "kek.key")
    conf = tmp_path / "node1.toml"
    conf.write_text(f'node_id = 1\nsite = "a"\nlisten = "127.0.0.1:17001"\ndata_dir = "{tmp_path / "n1"}"\n'
                    f'key_file = "{kek}"\n[tls]\nca = "{ca}"\ncert = "{cert}"\nkey = "{key}"\n')
    return conf


# --- 1. a CA that can never verify -----------------------------------------------------------------


def test_certs_issue_refuses_an_expired_ca(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    _make_ca(pki, start=dt.datetime(2020, 1, 1, tzinfo=dt.UTC), end=dt.datetime(2021, 1, 1, tzinfo=dt.UTC))
    code, out, err = _cli("certs", "issue", "node", "--dir", str(pki), "--id", "1")
    assert code == 2, (out, err)
    assert f"the CA certificate {pki / 'ca.pem'} is valid from 2020-01-01 00:00 to 2021-01-01 00:00 UTC" in err
    assert "not now (expired)" in err
    assert not (pki / "node-1.pem").exists() and not (pki / "node-1.key").exists()
    code, out, _ = _cli("certs", "issue", "client", "--dir", str(pki), "--name", "ops", "--roles", "reader", "--json")
    assert code == 2 and json.loads(out)["error"] == "InvalidArgument" and "expired" in json.loads(out)["message"]


def test_certs_issue_refuses_a_certificate_that_is_not_a_ca(tmp_path: Path) -> None:
    good = tmp_path / "good"
    init_ca(good)
    pair = CA.load(good).issue_node(1, good)
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "ca.pem").write_bytes(pair.cert.read_bytes())
    _write_key(fake / "ca.key", serialization.load_pem_private_key(pair.key.read_bytes(), None))  # type: ignore[arg-type]
    code, _, err = _cli("certs", "issue", "node", "--dir", str(fake), "--id", "2")
    assert code == 2
    assert f"the CA certificate {fake / 'ca.pem'} is not a CA certificate (its basic constraints do not say CA:TRUE)" \
        in err
    assert not (fake / "node-2.pem").exists()


def test_certs_issue_refuses_a_ca_key_of_another_ca(tmp_path: Path) -> None:
    good, other, mixed = tmp_path / "good", tmp_path / "other", tmp_path / "mixed"
    init_ca(good)
    init_ca(other)
    mixed.mkdir()
    (mixed / "ca.pem").write_bytes((good / "ca.pem").read_bytes())
    _write_key(mixed / "ca.key", serialization.load_pem_private_key((other / "ca.key").read_bytes(), None))  # type: ignore[arg-type]
    code, _, err = _cli("certs", "issue", "node", "--dir", str(mixed), "--id", "3")
    assert code == 2
    assert f"the CA key {mixed / 'ca.key'} is not the key of the CA certificate {mixed / 'ca.pem'}" in err
    assert not (mixed / "node-3.pem").exists()


def test_an_issued_certificate_never_outlives_its_ca(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    assert _cli("certs", "init", "--dir", str(pki), "--days", "30")[0] == 0
    ca_end = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes()).not_valid_after_utc
    code, out, err = _cli("certs", "issue", "node", "--dir", str(pki), "--id", "1", "--days", "397")
    assert code == 0, err
    cert = x509.load_pem_x509_certificate((pki / "node-1.pem").read_bytes())
    assert cert.not_valid_after_utc == ca_end
    assert f"note: cut to end with the CA ({ca_end:%Y-%m-%d %H:%M} UTC), not in 397 days" in out
    code, out, err = _cli("certs", "issue", "client", "--dir", str(pki), "--name", "ops", "--roles", "reader",
                          "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["capped_to_ca"] is True and dt.datetime.fromisoformat(doc["not_after"]) == ca_end
    # One that ends before the CA is left alone, and says so.
    code, out, _ = _cli("certs", "issue", "client", "--dir", str(pki), "--name", "short", "--roles", "reader",
                        "--days", "2", "--json")
    assert code == 0 and json.loads(out)["capped_to_ca"] is False
    # The config check of a node with such a certificate and CA has nothing to warn about.
    conf = _node_config(tmp_path, pki / "ca.pem", pki / "node-1.pem", pki / "node-1.key")
    code, out, err = _cli("config", "check", str(conf), "--json")
    assert code == 0, err
    assert json.loads(out)["warnings"] == []


def test_config_check_refuses_an_expired_ca_and_a_non_ca(tmp_path: Path) -> None:
    # An expired CA whose node certificate (issued before it expired, say, by hand) is valid now.
    old = tmp_path / "old"
    ca, ca_key = _make_ca(old, start=NOW - dt.timedelta(days=400), end=NOW - dt.timedelta(days=1))
    cert, key = _make_leaf(old, "node-1", ca, ca_key, start=NOW - dt.timedelta(days=10),
                           end=NOW + dt.timedelta(days=10), uri="mqstore://node/1")
    with pytest.raises(InvalidArgument, match=r"cfg tls.ca: .*ca.pem is valid from .* not now \(expired\): every "
                                              r"handshake would fail"):
        check_tls_files(old / "ca.pem", cert, key, node_id=1, where="cfg")
    conf = _node_config(tmp_path, old / "ca.pem", cert, key)
    code, out, err = _cli("config", "check", str(conf))
    assert code == 2 and "tls.ca" in err and "not now (expired)" in err, (out, err)

    # A CA certificate without CA:TRUE (a node's certificate named as tls.ca).
    fake = tmp_path / "fake"
    ca, ca_key = _make_ca(fake, start=NOW - dt.timedelta(days=1), end=NOW + dt.timedelta(days=100), ca=False)
    cert, key = _make_leaf(fake, "node-1", ca, ca_key, start=NOW - dt.timedelta(days=1),
                           end=NOW + dt.timedelta(days=10), uri="mqstore://node/1")
    with pytest.raises(InvalidArgument, match=r"cfg tls.ca: .*ca.pem is not a CA certificate \(its basic "
                                              r"constraints do not say CA:TRUE\)"):
        check_tls_files(fake / "ca.pem", cert, key, node_id=1, where="cfg")


def test_config_check_warns_about_a_certificate_that_outlives_its_ca(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    ca, ca_key = _make_ca(pki, start=NOW - dt.timedelta(days=1), end=NOW + dt.timedelta(days=30))
    cert, key = _make_leaf(pki, "node-1", ca, ca_key, start=NOW - dt.timedelta(days=1),
                           end=NOW + dt.timedelta(days=397), uri="mqstore://node/1")
    check_tls_files(pki / "ca.pem", cert, key, node_id=1, where="cfg")  # valid today...
    conf = _node_config(tmp_path, pki / "ca.pem", cert, key)
    code, out, err = _cli("config", "check", str(conf))
    assert code == 0, err
    # ...and says when it stops working.
    assert f"warning: {conf} tls.cert: {cert} is valid until" in out
    assert f"but its CA {pki / 'ca.pem'} expires {ca.not_valid_after_utc:%Y-%m-%d %H:%M} UTC" in out
    code, out, err = _cli("config", "check", str(conf), "--json")
    assert code == 0 and len(json.loads(out)["warnings"]) == 1
    # serve says it too, first thing (here it then stops: the data dir was never bootstrapped)
    served = subprocess.run([sys.executable, "-m", "mqstore", "serve", "--config", str(conf)],
                            capture_output=True, text=True, timeout=60)
    assert f"mqstore: WARNING: {conf} tls.cert: {cert} is valid until" in served.stderr, served.stderr


# --- 2. an encrypted ca.key ------------------------------------------------------------------------


def test_certs_issue_with_an_encrypted_ca_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pki = tmp_path / "pki"
    init_ca(pki)
    key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    _write_key(pki / "ca.key", key, password=b"s3cret")  # type: ignore[arg-type]
    monkeypatch.delenv("MQSTORE_CA_PASSPHRASE", raising=False)
    code, out, err = _cli("certs", "issue", "node", "--dir", str(pki), "--id", "1", "--json")
    assert code == 2, (out, err)
    assert json.loads(out) == {"error": "InvalidArgument", "message": f"the CA key {pki / 'ca.key'} is encrypted: "
                                                                      "set MQSTORE_CA_PASSPHRASE to its passphrase"}
    code, out, err = _cli("certs", "issue", "node", "--dir", str(pki), "--id", "1")
    assert code == 2 and "is encrypted: set MQSTORE_CA_PASSPHRASE" in err and "Traceback" not in err
    code, out, err = _cli("certs", "issue", "node", "--dir", str(pki), "--id", "1", env={"MQSTORE_CA_PASSPHRASE": "x"},
                          monkeypatch=monkeypatch)
    assert code == 2 and "cannot be decrypted with the passphrase given" in err
    assert not (pki / "node-1.pem").exists()
    code, out, err = _cli("certs", "issue", "node", "--dir", str(pki), "--id", "1",
                          env={"MQSTORE_CA_PASSPHRASE": "s3cret"}, monkeypatch=monkeypatch)
    assert code == 0, err
    issued = x509.load_pem_x509_certificate((pki / "node-1.pem").read_bytes())
    issued.verify_directly_issued_by(x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes()))


# --- 3. file modes and overwriting ---------------------------------------------------------------


def test_certs_issue_refuses_a_ca_key_other_users_can_read(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    init_ca(pki)
    os.chmod(pki / "ca.key", 0o644)
    code, _, err = _cli("certs", "issue", "client", "--dir", str(pki), "--name", "x", "--roles", "admin")
    assert code == 2
    assert f"the CA key {pki / 'ca.key'} is accessible to every user (mode 0644); run `chmod 600" in err
    assert not (pki / "client-x.pem").exists()


def test_modes_do_not_depend_on_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        assert _cli("certs", "init", "--dir", str(tmp_path / "a" / "pki"))[0] == 0
        assert _cli("certs", "issue", "node", "--dir", str(tmp_path / "a" / "pki"), "--id", "1",
                    "--out", str(tmp_path / "b" / "node-1"))[0] == 0
    finally:
        os.umask(old)

    def mode(p: Path) -> int:
        return stat.S_IMODE(p.stat().st_mode)

    assert [mode(tmp_path / d) for d in ("a", "a/pki", "b", "b/node-1")] == [0o700] * 4
    assert mode(tmp_path / "a/pki/ca.key") == 0o600 and mode(tmp_path / "b/node-1/node-1.key") == 0o600
    assert mode(tmp_path / "a/pki/ca.pem") == 0o644 and mode(tmp_path / "b/node-1/node-1.pem") == 0o644
    # A strict umask does not take the certificates' read bits away either.
    old = os.umask(0o077)
    try:
        assert _cli("certs", "issue", "client", "--dir", str(tmp_path / "a" / "pki"), "--name", "c",
                    "--roles", "reader")[0] == 0
    finally:
        os.umask(old)
    assert mode(tmp_path / "a/pki/client-c.pem") == 0o644 and mode(tmp_path / "a/pki/client-c.key") == 0o600
    assert not [p.name for p in (tmp_path / "a/pki").iterdir() if p.name.startswith(".")]  # no temporary left


def test_certs_issue_replaces_files_only_with_force(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    init_ca(pki)
    (pki / "node-1.key").write_text("an operator's key\n")
    os.chmod(pki / "node-1.key", 0o644)
    code, _, err = _cli("certs", "issue", "node", "--dir", str(pki), "--id", "1")
    assert code == 2 and f"{pki / 'node-1.key'} already exists: refusing to replace it (--force replaces it)" in err
    assert (pki / "node-1.key").read_text() == "an operator's key\n" and not (pki / "node-1.pem").exists()
    assert _cli("certs", "issue", "node", "--dir", str(pki), "--id", "1", "--force")[0] == 0
    assert stat.S_IMODE((pki / "node-1.key").stat().st_mode) == 0o600  # replaced, not rewritten in place
    first = (pki / "node-1.pem").read_bytes()
    code, _, err = _cli("certs", "issue", "node", "--dir", str(pki), "--id", "1")
    assert code == 2 and "node-1.pem already exists" in err and (pki / "node-1.pem").read_bytes() == first
    assert _cli("certs", "issue", "client", "--dir", str(pki), "--name", "c", "--roles", "reader")[0] == 0
    code, _, err = _cli("certs", "issue", "client", "--dir", str(pki), "--name", "c", "--roles", "reader")
    assert code == 2 and "client-c.pem already exists" in err


# --- 4. a client's TLS mistakes --------------------------------------------------------------------


@pytest.fixture(scope="module")
def client_pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("client-pki")
    init_ca(root / "ca")
    ca = CA.load(root / "ca")
    adm = ca.issue_client("adm", root / "ca", roles=["admin"])
    rd = ca.issue_client("rd", root / "ca", roles=["reader"])
    old = ca.issue_client("old", root / "ca", roles=["admin"], not_before=NOW - dt.timedelta(days=30),
                          not_after=NOW - dt.timedelta(days=1))
    init_ca(root / "other")
    foreign = CA.load(root / "other").issue_client("adm", root / "other", roles=["admin"])
    (root / "garbage.pem").write_text("not a pem\n")
    return {"ca": root / "ca" / "ca.pem", "adm.pem": adm.cert, "adm.key": adm.key, "rd.key": rd.key,
            "old.pem": old.cert, "old.key": old.key, "other.ca": root / "other" / "ca.pem",
            "foreign.pem": foreign.cert, "foreign.key": foreign.key, "garbage": root / "garbage.pem"}


@pytest.mark.parametrize("ca, cert, key, message", [
    ("ca", "adm.pem", "rd.key", "the client key {rd.key} is not the key of the client certificate {adm.pem}"),
    ("garbage", "adm.pem", "adm.key", "the CA certificate {garbage} is not a PEM certificate"),
    ("ca", "garbage", "adm.key", "the client certificate {garbage} is not a PEM certificate"),
    ("ca", "adm.pem", "garbage", "the client key {garbage} is not an unencrypted PEM private key"),
    ("ca", "old.pem", "old.key", "the client certificate {old.pem} is valid from"),
    ("ca", "foreign.pem", "foreign.key", "the client certificate {foreign.pem} is not signed by the CA in {ca}"),
    ("other.ca", "adm.pem", "adm.key", "the client certificate {adm.pem} is not signed by the CA in {other.ca}"),
    ("adm.pem", "adm.pem", "adm.key", "the client certificate {adm.pem} is not signed by the CA in {adm.pem}"),
])
def test_a_clients_tls_mistakes_are_refused_at_once(client_pki: dict[str, Path], ca: str, cert: str, key: str,
                                                    message: str) -> None:
    tls = ClientTLS(client_pki[ca], client_pki[cert], client_pki[key])
    expected = message
    for name, path in client_pki.items():
        expected = expected.replace("{" + name + "}", str(path))
    started = time.monotonic()
    with pytest.raises(InvalidArgument) as err:
        Client("127.0.0.1:1", timeout=15, tls=tls)
    assert time.monotonic() - started < 5
    assert expected in str(err.value), str(err.value)
    if cert == "old.pem":
        assert "not now (expired): nodes refuse it" in str(err.value)


def test_a_valid_client_setup_and_a_chain_through_an_intermediate_pass(client_pki: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    Client("127.0.0.1:1", timeout=1, tls=ClientTLS(client_pki["ca"], client_pki["adm.pem"], client_pki["adm.key"])
           ).close()
    root, root_key = _make_ca(tmp_path / "root", start=NOW - dt.timedelta(days=1), end=NOW + dt.timedelta(days=9))
    mid_pem, mid_key_path = _make_leaf(tmp_path, "mid", root, root_key, start=NOW - dt.timedelta(days=1),
                                       end=NOW + dt.timedelta(days=9), uri="urn:x", ca=True)
    mid = x509.load_pem_x509_certificate(mid_pem.read_bytes())
    mid_key = serialization.load_pem_private_key(mid_key_path.read_bytes(), None)
    leaf_pem, leaf_key = _make_leaf(tmp_path, "leaf", mid, mid_key, start=NOW - dt.timedelta(days=1),  # type: ignore[arg-type]
                                    end=NOW + dt.timedelta(days=9), uri="mqstore://client/x?roles=reader")
    chain = tmp_path / "chain.pem"
    chain.write_bytes(leaf_pem.read_bytes() + mid_pem.read_bytes())
    Client("127.0.0.1:1", timeout=1, tls=ClientTLS(tmp_path / "root" / "ca.pem", chain, leaf_key)).close()
    with pytest.raises(InvalidArgument, match="is not signed by the CA"):  # without the intermediate
        Client("127.0.0.1:1", timeout=1, tls=ClientTLS(tmp_path / "root" / "ca.pem", leaf_pem, leaf_key))


def test_the_cli_says_what_is_wrong_with_the_client_files_at_once(client_pki: dict[str, Path]) -> None:
    env = dict(os.environ, MQSTORE_CA=str(client_pki["ca"]), MQSTORE_CERT=str(client_pki["adm.pem"]),
               MQSTORE_KEY=str(client_pki["rd.key"]))
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "mqstore", "status", "--server", "127.0.0.1:1", "--timeout", "15",
                        "--json"], capture_output=True, text=True, env=env, timeout=60)
    assert time.monotonic() - started < 10  # not after the whole --timeout
    assert r.returncode == 2 and r.stderr == "", r.stderr  # no gRPC core error lines
    assert json.loads(r.stdout) == {
        "error": "InvalidArgument",
        "message": f"the client key {client_pki['rd.key']} is not the key of the client certificate "
                   f"{client_pki['adm.pem']}",
    }


def test_a_node_still_refuses_what_the_client_now_refuses_up_front(tmp_path: Path) -> None:
    """The client's checks are for its user; a node does not rely on them: a foreign or expired
    certificate presented over a raw channel is still refused by the handshake."""
    import grpc

    from mqstore.proto import queue_pb2, queue_pb2_grpc
    from mqstore.testing.secure import InProcessCluster, Pki, status_of

    pki, other = Pki(tmp_path / "pki"), Pki(tmp_path / "other")
    cluster = InProcessCluster(tmp_path / "cluster", ["a"], pki=pki)
    try:
        cluster.leader()
        address = cluster.address(1)
        admin = pki.client("admin", ["admin", "reader"])
        with Client(address, timeout=10, tls=pki.client_tls(admin)) as c:
            assert "recipients" in c.stats()
        foreign = other.client("intruder", ["admin"])
        expired = pki.client("old-admin", ["admin", "reader"], expired=True)
        for tls, message in [(pki.client_tls(foreign), "is not signed by the CA in"),
                             (pki.client_tls(expired), r"not now \(expired\): nodes refuse it"),
                             (pki.client_tls(admin, ca=other.ca_pem), "is not signed by the CA in")]:
            with pytest.raises(InvalidArgument, match=message):
                Client(address, timeout=1.5, tls=tls)
        def stats(ch: grpc.Channel) -> str:
            with ch:
                stub = queue_pb2_grpc.QueueStub(ch)
                return status_of(lambda: stub.Stats(queue_pb2.StatsRequest(), timeout=3))[0]

        assert stats(pki.channel(address, foreign)) == "UNAVAILABLE"
        assert stats(pki.channel(address, expired)) == "UNAVAILABLE"
        creds = grpc.ssl_channel_credentials(other.ca_pem.read_bytes(), admin.key.read_bytes(),
                                             admin.cert.read_bytes())
        assert stats(grpc.secure_channel(address, creds)) == "UNAVAILABLE"
    finally:
        cluster.close()


# --- 5. a CA bundle (a CA rotation): the node checks its files as the client and gRPC do ---------------


def _rotation(tmp_path: Path, *, old_end: dt.datetime, new_cn: str = "new CA") -> dict[str, Path]:
    """An old CA (ending ``old_end``) and a new one, a node and a client certificate of each (made by
    hand: no key identifiers), and the bundles [new, old] and [old, new] as a ca.pem during the rotation."""
    old, old_key = _make_ca(tmp_path / "old", start=NOW - dt.timedelta(days=400), end=old_end, cn="old CA")
    new, new_key = _make_ca(tmp_path / "new", start=NOW - dt.timedelta(days=1), end=NOW + dt.timedelta(days=3650),
                            cn=new_cn)
    out: dict[str, Path] = {}
    for tag, ca, key in (("old", old, old_key), ("new", new, new_key)):
        end = min(NOW + dt.timedelta(days=30), ca.not_valid_after_utc)
        out[f"node.{tag}"], out[f"node.{tag}.key"] = _make_leaf(
            tmp_path / tag, "node-1", ca, key, start=NOW - dt.timedelta(days=100), end=end, uri="mqstore://node/1")
        out[f"client.{tag}"], out[f"client.{tag}.key"] = _make_leaf(
            tmp_path / tag, "client-ops", ca, key, start=NOW - dt.timedelta(days=100), end=end,
            uri="mqstore://client/ops?roles=reader")
    (tmp_path / "new-old.pem").write_bytes(_pem(new) + _pem(old))
    (tmp_path / "old-new.pem").write_bytes(_pem(old) + _pem(new))
    out["new-old"], out["old-new"] = tmp_path / "new-old.pem", tmp_path / "old-new.pem"
    return out


def _handshake(ca: Path, node: tuple[Path, Path], client: tuple[Path, Path]) -> bool:
    """Whether gRPC completes a mutual TLS handshake between a node and a client, both with ``ca``."""
    from concurrent import futures

    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(1))
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
        [(node[1].read_bytes(), node[0].read_bytes())], root_certificates=ca.read_bytes(), require_client_auth=True))
    server.start()
    try:
        creds = grpc.ssl_channel_credentials(ca.read_bytes(), client[1].read_bytes(), client[0].read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{port}", creds,
                                 options=[("grpc.ssl_target_name_override", "localhost")]) as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=2)
            except grpc.FutureTimeoutError:
                return False
            return True
    finally:
        server.stop(0)


def test_a_ca_bundle_vouches_for_a_node_signed_by_its_second_ca(tmp_path: Path) -> None:
    """During a CA rotation ca.pem holds the new CA and the old one: a node whose certificate the
    old CA signed is accepted by `config check` and `serve` (until stop 30 only the first CA of
    tls.ca was read: "is not signed by the CA in"), as gRPC and a client with the same bundle do."""
    old, new = tmp_path / "old", tmp_path / "new"
    for args in (["init", "--dir", str(old)], ["issue", "node", "--dir", str(old), "--id", "1"],
                 ["issue", "client", "--dir", str(old), "--name", "ops", "--roles", "reader"],
                 ["init", "--dir", str(new)]):  # both CAs named as `certs init` names them
        assert _cli("certs", *args)[0] == 0
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes((new / "ca.pem").read_bytes() + (old / "ca.pem").read_bytes())
    node, client = (old / "node-1.pem", old / "node-1.key"), (old / "client-ops.pem", old / "client-ops.key")
    check_tls_files(bundle, *node, node_id=1, where="cfg")
    conf = _node_config(tmp_path, bundle, *node)
    code, out, err = _cli("config", "check", str(conf), "--json")
    assert code == 0, (out, err)
    assert json.loads(out)["valid"] is True and json.loads(out)["warnings"] == []
    Client("127.0.0.1:1", timeout=1, tls=ClientTLS(bundle, *client)).close()  # the client side: as before
    assert _handshake(bundle, node, client)  # what both checks stand for
    # CAs made elsewhere (no key identifiers) with names of their own: the same.
    f = _rotation(tmp_path / "by-hand", old_end=NOW + dt.timedelta(days=365))
    for tag in ("old", "new"):
        check_tls_files(f["new-old"], f[f"node.{tag}"], f[f"node.{tag}.key"], node_id=1, where="cfg")
        Client("127.0.0.1:1", timeout=1, tls=ClientTLS(f["new-old"], f[f"client.{tag}"], f[f"client.{tag}.key"])
               ).close()
    assert _handshake(f["new-old"], (f["node.old"], f["node.old.key"]), (f["client.old"], f["client.old.key"]))


def test_same_named_cas_a_certificate_cannot_tell_apart_are_refused(tmp_path: Path) -> None:
    """Two CAs of one name, and certificates that do not say which signed them (no key identifiers):
    a handshake tries one CA of that name, here the wrong one, and fails: both checks say so."""
    f = _rotation(tmp_path, old_end=NOW + dt.timedelta(days=365), new_cn="old CA")
    assert not _handshake(f["new-old"], (f["node.old"], f["node.old.key"]), (f["client.old"], f["client.old.key"]))
    message = (f"{f['new-old']} holds several CA certificates named CN=old CA and nothing in the certificate that "
               "one of them signed says which (no matching key identifiers): a handshake may check it against the "
               "wrong one and fail")
    with pytest.raises(InvalidArgument) as err:
        check_tls_files(f["new-old"], f["node.old"], f["node.old.key"], node_id=1, where="cfg")
    assert str(err.value).startswith(f"cfg tls.ca: {message}"), str(err.value)
    with pytest.raises(InvalidArgument) as err:
        Client("127.0.0.1:1", timeout=1, tls=ClientTLS(f["new-old"], f["client.old"], f["client.old.key"]))
    assert str(err.value).startswith(f"the CA certificate {message}"), str(err.value)


def test_an_expired_ca_in_a_bundle_is_named_and_only_when_it_is_the_one_that_counts(tmp_path: Path) -> None:
    f = _rotation(tmp_path, old_end=NOW - dt.timedelta(days=1))  # the old CA has expired
    # [old, new]: the certificate the new CA signed is fine (until stop 30: the old, first, CA was
    # read and found expired).
    check_tls_files(f["old-new"], f["node.new"], f["node.new.key"], node_id=1, where="cfg")
    # The certificate the expired CA signed: refused, naming which CA of the bundle, on both sides.
    with pytest.raises(InvalidArgument) as err:
        check_tls_files(f["new-old"], f["node.old"], f["node.old.key"], node_id=1, where="cfg")
    assert str(err.value).startswith(f"cfg tls.ca: {f['new-old']} (its certificate 2 of 2, CN=old CA) "
                                     "is valid from "), str(err.value)
    assert "not now (expired): every handshake would fail (create a new CA" in str(err.value)
    with pytest.raises(InvalidArgument) as err:
        Client("127.0.0.1:1", timeout=1, tls=ClientTLS(f["new-old"], f["client.old"], f["client.old.key"]))
    assert str(err.value).startswith(f"the CA certificate {f['new-old']} (its certificate 2 of 2, CN=old CA) "
                                     "is valid from "), str(err.value)
    assert str(err.value).endswith("not now (expired): nodes refuse the certificates it signed")


def test_the_outlives_its_ca_warning_is_about_the_ca_that_signed_the_certificate(tmp_path: Path) -> None:
    f = _rotation(tmp_path, old_end=NOW + dt.timedelta(days=10))  # the old CA ends before the certificates
    # A certificate the old CA signed that outlives it (made by hand: `certs issue` cuts it): warned
    # about the OLD CA, though the bundle's first CA (the new one) lasts ten years.
    old_ca = x509.load_pem_x509_certificates(f["new-old"].read_bytes())[1]
    long_cert, long_key = _make_leaf(tmp_path, "node-1-long", old_ca,
                                     serialization.load_pem_private_key(  # type: ignore[arg-type]
                                         (tmp_path / "old" / "ca.key").read_bytes(), None),
                                     start=NOW - dt.timedelta(days=1), end=NOW + dt.timedelta(days=30),
                                     uri="mqstore://node/1")
    conf = _node_config(tmp_path, f["new-old"], long_cert, long_key)
    code, out, err = _cli("config", "check", str(conf), "--json")
    assert code == 0, (out, err)
    assert json.loads(out)["warnings"] == [
        f"{conf} tls.cert: {long_cert} is valid until {NOW + dt.timedelta(days=30):%Y-%m-%d %H:%M} UTC, but its CA "
        f"{f['new-old']} (its certificate 2 of 2, CN=old CA) expires "
        f"{old_ca.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: every handshake fails from then on (create a new CA "
        "before then)"]
    # The certificate the new CA signed, with the short-lived old CA first in the bundle: nothing to
    # warn about (until stop 30: measured against the bundle's first certificate, the old CA).
    (tmp_path / "second").mkdir()
    conf = _node_config(tmp_path / "second", f["old-new"], f["node.new"], f["node.new.key"])
    code, out, err = _cli("config", "check", str(conf), "--json")
    assert code == 0, (out, err)
    assert json.loads(out)["warnings"] == []


def test_a_ca_file_that_holds_no_ca_is_named_on_both_sides(tmp_path: Path) -> None:
    f = _rotation(tmp_path, old_end=NOW + dt.timedelta(days=365))
    # The node's own certificate given as tls.ca (tls.ca and tls.cert swapped, say).
    with pytest.raises(InvalidArgument) as err:
        check_tls_files(f["node.new"], f["node.new"], f["node.new.key"], node_id=1, where="cfg")
    assert str(err.value) == (f"cfg tls.cert: {f['node.new']} is not signed by the CA in {f['node.new']}; "
                              f"{f['node.new']} is not a CA certificate (its basic constraints do not say CA:TRUE)")
    with pytest.raises(InvalidArgument, match=r"is not signed by the CA in .*; .* is not a CA certificate .*: the "
                                              r"nodes' CA must sign it"):
        Client("127.0.0.1:1", timeout=1, tls=ClientTLS(f["client.new"], f["client.new"], f["client.new.key"]))
