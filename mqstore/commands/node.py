"""``mqstore serve``, ``bootstrap`` and ``join``: running storage nodes."""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from mqstore.commands._common import default_data_dir, emit
from mqstore.errors import MQStoreError, WrongKey

TRIAL_LISTEN = "127.0.0.1:7070"


def _load_config(args: argparse.Namespace) -> Any:
    from mqstore import config as cfg

    if args.config:
        return cfg.load(args.config)
    # No config: a single-node trial store on 127.0.0.1 in the embedded default data dir.
    return cfg.parse(
        {
            "node_id": 1,
            "site": "local",
            "listen": args.listen or TRIAL_LISTEN,
            "data_dir": str(args.data_dir),
            "insecure": True,  # a trial on 127.0.0.1: plaintext, said loudly at start
            **({"key_file": args.key_file} if args.key_file else {}),
        },
        "<trial defaults>",
    )


def _check_listen_free(listen: str) -> None:
    """Raise InvalidArgument (as NodeServer would) when ``listen`` cannot be listened on."""
    from mqstore.errors import InvalidArgument

    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host or None, int(port), type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: a port in TIME_WAIT is free
            sock.bind(infos[0][4])
    except (OSError, ValueError, IndexError):
        raise InvalidArgument(f"cannot listen on {listen} (listen): the address is in use or not one of this "
                              "machine's") from None


def _failed_to_start(config: Any, exc: MQStoreError) -> int:
    """A node that could not start (an address in use...): exit status 2, the error said as every
    other error of the command line, or with log_json as a JSON log line (logger mqstore.serve)."""
    if not config.log_json:
        raise exc
    logging.getLogger("mqstore.serve").error("error: %s", exc)
    return 2


def cmd_serve(args: argparse.Namespace) -> int:
    """Run a storage node until SIGTERM/SIGINT (graceful: leadership handed over first)."""
    import threading

    from mqstore import logs
    from mqstore.node.runtime import bootstrap
    from mqstore.server import NodeServer

    config = _load_config(args)
    handler = logs.configure(args.log_level or config.log_level, json_lines=config.log_json, node_id=config.node_id)

    def say(text: str, level: int = logging.INFO) -> None:
        """A line for the operator: with log_json through the log (one JSON object per line,
        like every other line), else as it always was."""
        if config.log_json:
            logging.getLogger("mqstore.serve").log(level, text)
        else:
            print(f"mqstore: {'WARNING: ' if level == logging.WARNING else ''}{text}", file=sys.stderr, flush=True)

    if config.insecure:
        say(
            "INSECURE: this node speaks PLAINTEXT (insecure = true): no TLS, no peer "
            "or client certificates; anyone who can reach "
            f"{config.listen} can read and change the queue" + ("" if config.auth.tokens_file else
                                                                " (and, with no tokens file, do anything)")
            + ". Use it for tests and trials only.",
            logging.WARNING,
        )
    if config.tls is not None:
        from mqstore.security.certs import tls_warnings

        for warning in tls_warnings(config.tls.ca, config.tls.cert, where=str(args.config or "")):
            say(warning, logging.WARNING)  # a certificate that outlives its CA: as config check says
    try:
        if not args.config and not (Path(config.data_dir) / "data.mdb").exists():
            _check_listen_free(config.listen)  # a trial that cannot start leaves no store behind
            bootstrap(config, "trial")
            say(f"bootstrapped a single-node trial store in {config.data_dir}")
        server = NodeServer(config)
    except MQStoreError as exc:
        return _failed_to_start(config, exc)
    logs.set_term_source(handler, lambda: server.node.raw.term)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # A write past the process's file size limit (ulimit -f) then fails with EFBIG, which the
    # node reports and stops on like a full disk, instead of the kernel killing it without a word.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        server.start()
    except MQStoreError as exc:
        return _failed_to_start(config, exc)

    def watch_failure() -> None:
        server.node.failed.wait()
        stop.set()

    threading.Thread(target=watch_failure, name="mqstore-failure-watch", daemon=True).start()
    say(
        f"node {config.node_id} (site {config.site}) serving on {config.listen} "
        + ("(mutual TLS)" if config.tls is not None else "(PLAINTEXT)")
        + f", data in {config.data_dir}"
        + (f", metrics on http://{config.metrics_listen.rpartition(':')[0]}:{server.metrics_port}/metrics"
           if server.metrics_port else "")
    )
    stop.wait()
    if server.node.failed.is_set():
        failure = server.node.failure
        advice = ("a restart fails the same way until its key_file holds the cluster's key-encryption key"
                  if isinstance(failure, WrongKey) else "it applies its log again on start")
        say(f"node {config.node_id} failed ({failure!r}); stopping so that it can be restarted ({advice})",
            logging.ERROR)
        server.stop(grace=1.0)
        return 1
    say(f"node {config.node_id} shutting down")
    server.stop()
    return 0


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from mqstore import config as cfg
    from mqstore.node.runtime import bootstrap, founding_digest

    cfg.check_cluster_id(args.cluster_id, "--cluster-id")  # as a config's cluster_id: an empty one checks nothing
    config = cfg.load(args.config)
    conf = bootstrap(config, args.cluster_id)
    founding = founding_digest(args.cluster_id, conf).hex()
    payload = {
        "node_id": config.node_id,
        "cluster_id": args.cluster_id,
        "voters": sorted(conf.voters),
        "sites": dict(conf.sites),
        "min_sites": conf.min_sites,
        "founding": founding,
        "data_dir": str(config.data_dir),
    }
    emit(args, payload, [
        f"bootstrapped node {config.node_id} of new cluster {args.cluster_id!r} in {config.data_dir}",
        f"voters {sorted(conf.voters)} in sites {sorted(set(dict(conf.sites).values()))}, min_sites {conf.min_sites}",
        f"founding {founding}: every initial member's bootstrap prints the same (else their member lists differ, "
        "and the nodes will refuse each other)",
    ])
    return 0


def cmd_join(args: argparse.Namespace) -> int:
    from mqstore import config as cfg
    from mqstore.node.runtime import prepare_join

    cfg.check_cluster_id(args.cluster_id, "--cluster-id")
    config = cfg.load(args.config)
    prepare_join(config, args.cluster_id)
    emit(args, {"node_id": config.node_id, "cluster_id": args.cluster_id, "data_dir": str(config.data_dir)}, [
        f"prepared {config.data_dir} for node {config.node_id} to join cluster {args.cluster_id!r}:",
        f"start it (mqstore serve --config {args.config}), then on the cluster: "
        f"mqstore cluster add --id {config.node_id} --site {config.site} --address {config.address}",
    ])
    return 0


def register(sub: Any) -> None:
    serve = sub.add_parser(
        "serve", help="run a storage node (no --config: a single-node trial store on 127.0.0.1:7070)"
    )
    serve.add_argument("--config", help="node configuration file (TOML)")
    serve.add_argument("--data-dir", default=str(default_data_dir()), help="trial mode: data directory")
    serve.add_argument("--key-file", default=None, help="trial mode: key file (default <data-dir>/kek.key)")
    serve.add_argument("--listen", default=None, help=f"trial mode: address to listen on (default {TRIAL_LISTEN})")
    serve.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=cmd_serve, json=False)

    boot = sub.add_parser("bootstrap", help="create a new cluster: run on each initial member's empty data dir")
    boot.add_argument("--config", required=True, help="node configuration file (TOML)")
    boot.add_argument("--cluster-id", required=True, help="name of the new cluster (the same on every member): "
                      "1-64 letters, digits, '-' or '_'")
    boot.add_argument("--json", action="store_true", help="machine-readable output")
    boot.set_defaults(func=cmd_bootstrap)

    join = sub.add_parser("join", help="prepare an empty data dir for a node to be added to a cluster")
    join.add_argument("--config", required=True, help="node configuration file (TOML)")
    join.add_argument("--cluster-id", required=True, help="the cluster to join")
    join.add_argument("--json", action="store_true", help="machine-readable output")
    join.set_defaults(func=cmd_join)
