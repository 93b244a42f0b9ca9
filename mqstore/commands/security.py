"""``mqstore certs``, ``mqstore tokens`` and ``mqstore config check``: a node's security material
and its configuration."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mqstore.commands._common import emit


def _list(value: str | None) -> list[str] | None:
    return None if value is None else [x.strip() for x in value.split(",") if x.strip()]


# --- certs -----------------------------------------------------------------------------------------


def cmd_certs_init(args: argparse.Namespace) -> int:
    from mqstore.security.certs import check_ca_name, check_days, init_ca

    check_ca_name(args.name, "--name")
    check_days(args.days, "--days")
    pair = init_ca(args.dir, name=args.name, days=args.days, overwrite=args.force)
    emit(args, {"ca": str(pair.cert), "key": str(pair.key)}, [
        f"created the cluster CA {pair.cert} (key {pair.key}, mode 0600: keep it offline once the certificates "
        "are issued)",
        f"next: mqstore certs issue node --dir {args.dir} --id 1 --host <name or IP clients use>",
    ])
    return 0


#: The passphrase of an encrypted ca.key, for `certs issue` (never a command-line argument: others
#: could read it in the process list).
CA_PASSPHRASE_ENV = "MQSTORE_CA_PASSPHRASE"


def cmd_certs_issue(args: argparse.Namespace) -> int:
    import os

    from cryptography import x509

    from mqstore.security.certs import CA

    ca = CA.load(args.dir, passphrase=os.environ.get(CA_PASSPHRASE_ENV) or None)
    out = args.out or args.dir
    capped = ca.capped(args.days)
    force = bool(getattr(args, "force", False))
    if args.kind == "node":
        pair = ca.issue_node(args.id, out, hosts=args.host or (), days=args.days, overwrite=force)
        what = f"node {args.id}"
    else:
        pair = ca.issue_client(args.name, out, roles=_list(args.roles) or [], namespaces=_list(args.namespaces),
                               days=args.days, overwrite=force)
        what = f"client {args.name!r} (roles {args.roles or 'none'})"
    not_after = x509.load_pem_x509_certificate(pair.cert.read_bytes()).not_valid_after_utc
    lines = [f"issued {what}: {pair.cert} (key {pair.key}), valid until {not_after:%Y-%m-%d %H:%M} UTC"]
    if capped:
        lines.append(f"note: cut to end with the CA ({not_after:%Y-%m-%d %H:%M} UTC), not in {args.days} days: no "
                     "certificate outlives its CA; create a new CA before then")
    emit(args, {"cert": str(pair.cert), "key": str(pair.key), "not_after": not_after.isoformat(),
                "capped_to_ca": capped}, lines)
    return 0


# --- tokens ----------------------------------------------------------------------------------------


def cmd_tokens_add(args: argparse.Namespace) -> int:
    from mqstore.security.tokens import TokenStore

    store = TokenStore(args.file, create=True)
    token = store.add(args.name, _list(args.roles) or [], _list(args.namespaces))
    emit(args, {"name": args.name, "token": token}, [
        token,
        f"# token {args.name!r}: shown once, only its hash is kept in {args.file}; nodes pick it up within a second",
    ])
    return 0


def cmd_tokens_list(args: argparse.Namespace) -> int:
    from mqstore.security.tokens import TokenStore, token_dict

    tokens = [token_dict(t) for t in TokenStore(args.file).list()]
    lines = [
        f"{t['name']:<24} roles {','.join(t['roles']):<28} namespaces "
        f"{'all' if t['namespaces'] is None else ','.join(t['namespaces'])}  created {t['created']}"
        for t in tokens
    ] or ["no tokens"]
    emit(args, tokens, lines)
    return 0


def cmd_tokens_remove(args: argparse.Namespace) -> int:
    from mqstore.errors import NotFound
    from mqstore.security.tokens import TokenStore

    if not TokenStore(args.file).remove(args.name):
        raise NotFound(f"no token named {args.name!r} in {args.file}")
    emit(args, {"removed": args.name}, [f"removed token {args.name!r}: nodes refuse it within a second"])
    return 0


# --- config check ----------------------------------------------------------------------------------


def cmd_config_check(args: argparse.Namespace) -> int:
    from mqstore import config as cfg
    from mqstore.security.certs import tls_warnings
    from mqstore.security.tokens import TokenStore

    c = cfg.load(args.file)
    warnings = tls_warnings(c.tls.ca, c.tls.cert, where=str(args.file)) if c.tls is not None else []
    tokens = len(TokenStore(c.auth.tokens_file).list()) if c.auth.tokens_file is not None else None
    bootstrapped = (Path(c.data_dir) / "data.mdb").exists()
    if not bootstrapped:
        # What `mqstore bootstrap` would refuse: the members' placement (once bootstrapped, the
        # membership lives in the store and changes through `mqstore cluster`).
        cfg.check_placement(c)
    _check_node_files(c, bootstrapped)
    payload: dict[str, Any] = {
        "file": str(args.file),
        "valid": True,
        "node_id": c.node_id,
        "site": c.site,
        "listen": c.listen,
        "tls": c.tls is not None,
        "insecure": c.insecure,
        "tokens": tokens,
        "metrics_listen": c.metrics_listen or None,
        "data_dir": str(c.data_dir),
        "bootstrapped": bootstrapped,
        "peers": [p.id for p in c.peers],
        "warnings": warnings,
    }
    lines = [
        f"{args.file}: valid",
        f"node {c.node_id} in site {c.site}, listening on {c.listen} "
        + ("with mutual TLS" if c.tls is not None else "IN PLAINTEXT (insecure = true)"),
        f"peers {[p.id for p in c.peers] or 'none'}; data dir {c.data_dir} "
        + ("(bootstrapped)" if bootstrapped else "(empty: run `mqstore bootstrap` or `mqstore join` first)"),
    ]
    if tokens is not None:
        lines.append(f"tokens file {c.auth.tokens_file}: {tokens} token(s)")
    if c.metrics_listen:
        lines.append(f"metrics on http://{c.metrics_listen}/metrics")
    lines += [f"warning: {w}" for w in warnings]
    emit(args, payload, lines)
    return 0


def _check_node_files(c: Any, bootstrapped: bool) -> None:
    """What `serve` would refuse about the files a config names, besides its TLS files: the key
    file (must exist, private and well-formed: bootstrap and join refuse a missing one too), the
    audit signing key when one is named (must exist), and a bootstrapped data dir that
    belongs to another node, site or cluster. Raises ConfigError naming the key."""
    from mqstore import config as cfg
    from mqstore.compliance.signing import read_signing_key
    from mqstore.crypto.providers import read_key_file
    from mqstore.errors import KeyFileError
    from mqstore.ops import facts

    where = str(c.source) if c.source else "config"
    try:
        if c.key_file is not None:
            read_key_file(c.key_file)  # as serve reads it: the header and a 32-byte key
        if c.audit_signing_key is not None:
            read_signing_key(c.audit_signing_key)
    except KeyFileError as exc:
        raise cfg.ConfigError(f"{where}: {exc}") from None
    if not bootstrapped:
        return
    with facts.open_env(c.data_dir) as env:
        raft = facts.raft_facts(env)
    if raft is None or not raft.node_id:
        raise cfg.ConfigError(f"{where}: data_dir {c.data_dir} holds an embedded store, not a cluster node's data")
    if raft.node_id != c.node_id:
        raise cfg.ConfigError(f"{where}: data_dir {c.data_dir} belongs to node {raft.node_id}, the config says "
                              f"node {c.node_id}")
    if c.cluster_id and raft.cluster_id != c.cluster_id:
        raise cfg.ConfigError(f"{where}: data_dir {c.data_dir} belongs to cluster {raft.cluster_id!r}, the config "
                              f"says {c.cluster_id!r}")
    site = dict(raft.conf.sites).get(c.node_id)
    if site is not None and site != c.site:
        raise cfg.ConfigError(f"{where}: data_dir {c.data_dir} holds node {c.node_id} of site {site!r}, the config "
                              f"says site {c.site!r}")


def register(sub: Any) -> None:
    certs = sub.add_parser("certs", help="a small CA for the cluster: node and client certificates")
    certs_sub = certs.add_subparsers(dest="certs_command", required=True)
    init = certs_sub.add_parser("init", help="create the cluster CA (ca.pem, ca.key) in --dir")
    init.add_argument("--dir", required=True, help="directory for the CA (and, by default, the certificates)")
    init.add_argument("--name", default="mqstore cluster CA", help="the CA's common name")
    init.add_argument("--days", type=int, default=3650, help="validity (1..36500; default: %(default)s days)")
    init.add_argument("--force", action="store_true", help="replace an existing CA (every certificate with it)")
    init.add_argument("--json", action="store_true", help="machine-readable output")
    init.set_defaults(func=cmd_certs_init)

    issue = certs_sub.add_parser("issue", help="issue a node's or a client's certificate, signed by the CA "
                                               f"(an encrypted ca.key: its passphrase in ${CA_PASSPHRASE_ENV})")
    issue.add_argument("kind", choices=["node", "client"])
    issue.add_argument("--dir", required=True, help="the CA's directory")
    issue.add_argument("--out", default=None, help="where to write the certificate and key (default: --dir)")
    issue.add_argument("--id", type=int, help="node: its node id")
    issue.add_argument("--host", action="append", help="node: a host name or IP clients use (repeat; default "
                                                       "localhost and 127.0.0.1)")
    issue.add_argument("--name", help="client: its name")
    issue.add_argument("--roles", help="client: roles, comma-separated (producer, worker, reader, admin, compliance)")
    issue.add_argument("--namespaces", help="client: limit its roles to these namespaces (comma-separated)")
    issue.add_argument("--days", type=int, default=397, help="validity (1..36500; default: %(default)s days; "
                                                              "never beyond the CA's)")
    issue.add_argument("--force", action="store_true", help="replace the certificate and key if they exist")
    issue.add_argument("--json", action="store_true", help="machine-readable output")
    issue.set_defaults(func=_checked_issue)

    tokens = sub.add_parser("tokens", help="bearer tokens of clients (stored hashed in a tokens file)")
    tokens_sub = tokens.add_subparsers(dest="tokens_command", required=True)
    add = tokens_sub.add_parser("add", help="create a token (printed once)")
    add.add_argument("name")
    add.add_argument("--file", required=True, help="the tokens file (auth.tokens_file); created if missing")
    add.add_argument("--roles", required=True, help="roles, comma-separated")
    add.add_argument("--namespaces", help="limit the roles to these namespaces (comma-separated)")
    add.add_argument("--json", action="store_true", help="machine-readable output")
    add.set_defaults(func=cmd_tokens_add)
    lst = tokens_sub.add_parser("list", help="the tokens' names, roles and namespaces (never the tokens)")
    lst.add_argument("--file", required=True)
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    lst.set_defaults(func=cmd_tokens_list)
    rm = tokens_sub.add_parser("remove", help="revoke a token")
    rm.add_argument("name")
    rm.add_argument("--file", required=True)
    rm.add_argument("--json", action="store_true", help="machine-readable output")
    rm.set_defaults(func=cmd_tokens_remove)

    config = sub.add_parser("config", help="node configuration files")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="validate a node's config file (exit 0: valid, 2: not)")
    check.add_argument("file")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(func=cmd_config_check)


def _checked_issue(args: argparse.Namespace) -> int:
    from mqstore.errors import InvalidArgument
    from mqstore.security.certs import check_days, check_hosts, check_name, check_roles

    if args.kind == "node" and args.id is None:
        raise InvalidArgument("certs issue node needs --id")
    if args.kind == "client" and (not args.name or not args.roles):
        raise InvalidArgument("certs issue client needs --name and --roles")
    check_days(args.days, "--days")
    if args.kind == "node" and args.host:
        check_hosts(args.host, "--host")
    if args.kind == "client":
        check_name(args.name, "--name")
        if not check_roles(_list(args.roles) or [], "--roles"):  # as `tokens add`: a client acts only by its roles
            raise InvalidArgument(f"--roles names no role ({args.roles!r}): give at least one, comma-separated")
    return cmd_certs_issue(args)
