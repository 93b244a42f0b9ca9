"""Node operations a review found wrong: a leader handing over to a crashed voter, a removed node
still SERVING, cancelled streams counted OK, serve's startup failure not a JSON line with
log_json, offline status shaped unlike online status, snapshot files readable by others."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mqstore.client import Client
from mqstore.crypto import create_key_file
from mqstore.ops import remote
from mqstore.proto import queue_pb2, queue_pb2_grpc
from mqstore.testing.cluster import free_port
from mqstore.testing.secure import InProcessCluster

MAIL = b"Subject: review\r\n\r\nhello\r\n"


def _crash(cluster: InProcessCluster, node_id: int) -> None:
    """Stop node ``node_id`` abruptly (as kill -9 would: no leadership handed over, no goodbye)."""
    s = cluster.servers.pop(node_id)
    s.grpc.stop(0).wait(5)
    s.health.stop()
    s.queue.close()
    s.node.stop(transfer_leadership=False)


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        try:
            return int(health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status)
        except grpc.RpcError:
            return -1


def _wait(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _requests(server: Any, method: str) -> dict[str, float]:
    """mqstore_requests_total of ``method`` by code."""
    return {s.labels["code"]: s.value for m in server.metrics.requests.collect() for s in m.samples
            if s.name == "mqstore_requests_total" and s.labels["method"] == method}


def _idle_cluster(tmp_path: Path, sites: list[str]) -> tuple[InProcessCluster, Any]:
    cluster = InProcessCluster(tmp_path, sites)
    leader = cluster.leader()
    with Client([cluster.address(i) for i in cluster.servers], timeout=10) as c:
        c.enqueue(mail_from="a@example.org", recipients=["b@example.net"], data=MAIL)
    # every follower caught up: their match indexes tie (the old choice then took the lowest id)
    last = leader.node.raw.last_index
    assert _wait(lambda: all(s.node.applied_index >= last for s in cluster.servers.values()))
    time.sleep(0.5)
    return cluster, leader


# --- 1. leadership is handed to a voter in contact, never to a crashed one -----------------------


def test_graceful_stop_hands_leadership_to_a_live_voter_not_a_crashed_one(tmp_path: Path) -> None:
    cluster, leader = _idle_cluster(tmp_path, ["a", "a", "b", "b", "c"])
    try:
        victim = min(i for i in cluster.servers if i != leader.node.node_id)
        _crash(cluster, victim)
        time.sleep(1.5)  # past an election timeout: the leader has not heard from it since
        live = [i for i in cluster.servers if i != leader.node.node_id]
        started = time.monotonic()
        handed = leader.node.hand_over_leadership(5.0)
        took = time.monotonic() - started
        assert handed, "the leader was still leader after the whole grace"
        assert took < 2.5, f"the hand-over took {took:.1f} s (it waited for the crashed node {victim})"
        new = cluster.leader(among=live)
        assert new.node.node_id != victim
        with Client([cluster.address(i) for i in live], timeout=10) as c:
            c.enqueue(mail_from="a@example.org", recipients=["b@example.net"], data=MAIL)
        assert time.monotonic() - started < 3.5, "writes were refused for long after the hand-over"
    finally:
        cluster.close()


def test_transfer_leader_without_to_never_names_a_crashed_voter(tmp_path: Path) -> None:
    cluster, leader = _idle_cluster(tmp_path, ["a", "b", "c"])
    try:
        victim = min(i for i in cluster.servers if i != leader.node.node_id)
        _crash(cluster, victim)
        time.sleep(1.5)
        (live,) = [i for i in cluster.servers if i != leader.node.node_id]
        assert leader.node.call(leader.node.transfer_candidates) == [live]
        with Client([leader.node.config.address], timeout=10) as c:
            to = remote.transfer_leader(c)
        assert to == live, f"transfer-leader said it hands leadership to node {to} (crashed: {victim})"
        assert cluster.leader(5.0, among=[live]).node.node_id == live
    finally:
        cluster.close()


# --- 2. a removed node that keeps running serves nothing and says so -----------------------------


def test_a_removed_node_is_not_serving_and_its_status_says_removed(tmp_path: Path) -> None:
    cluster = InProcessCluster(tmp_path, ["a", "b", "c"])
    try:
        leader = cluster.leader()
        victim = max(i for i in cluster.servers if i != leader.node.node_id)
        address = cluster.address(victim)
        assert _wait(lambda: _health(address) == health_pb2.HealthCheckResponse.SERVING)
        with Client([leader.node.config.address], timeout=10) as c:
            remote.change_membership(c, "remove", victim)
        assert _wait(lambda: _health(address) == health_pb2.HealthCheckResponse.NOT_SERVING, 5), \
            "the removed node still reports SERVING"
        server = cluster.servers[victim]
        assert server._metrics_state()["serving"] == 0
        with Client([address], timeout=10) as c:
            assert remote.node_status(c, address)["role"] == "removed"
        # the members that stay serve on
        assert all(_health(cluster.address(i)) == health_pb2.HealthCheckResponse.SERVING
                   for i in cluster.servers if i != victim)
    finally:
        cluster.close()


# --- 3. a cancelled or timed-out stream is not counted OK ----------------------------------------


def test_cancelled_and_timed_out_enqueue_streams_are_counted_as_such(tmp_path: Path) -> None:
    cluster = InProcessCluster(tmp_path, ["a"])
    try:
        server = cluster.leader()
        frame = queue_pb2.EnqueueBatchRequest(messages=[queue_pb2.NewMessage(
            mail_from="a@example.org", recipients=["b@example.net"], data=MAIL)])

        def one_frame_then_wait(wait: float) -> Any:
            yield frame
            time.sleep(wait)

        with grpc.insecure_channel(cluster.address(1)) as channel:
            stub = queue_pb2_grpc.QueueStub(channel)
            call = stub.EnqueueStream(one_frame_then_wait(5), timeout=60)
            assert len(next(call).message_ids) == 1
            call.cancel()
            assert _wait(lambda: _requests(server, "EnqueueStream").get("CANCELLED") == 1, 5), \
                _requests(server, "EnqueueStream")
            try:
                for _ in stub.EnqueueStream(one_frame_then_wait(3), timeout=1.0):
                    pass
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert _wait(lambda: _requests(server, "EnqueueStream").get("DEADLINE_EXCEEDED") == 1, 5), \
                _requests(server, "EnqueueStream")
            assert list(stub.EnqueueStream(iter([frame]), timeout=10))  # a stream that ends well: OK
        assert _wait(lambda: _requests(server, "EnqueueStream") ==
                     {"CANCELLED": 1, "DEADLINE_EXCEEDED": 1, "OK": 1}, 5), _requests(server, "EnqueueStream")
    finally:
        cluster.close()


# --- 4. serve's startup failure is a JSON line with log_json -------------------------------------


def test_a_startup_failure_is_a_json_log_line_with_log_json(tmp_path: Path) -> None:
    from mqstore.config import load
    from mqstore.node.runtime import bootstrap

    metrics_port = free_port()
    config = tmp_path / "node.toml"
    config.write_text(
        f'node_id = 1\nsite = "a"\nlisten = "127.0.0.1:{free_port()}"\ndata_dir = "{tmp_path / "data"}"\n'
        f'key_file = "{create_key_file(tmp_path / "kek.key")}"\ninsecure = true\nlog_json = true\n'
        f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
    )
    bootstrap(load(config), "t")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", metrics_port))
        taken.listen()
        out = subprocess.run([sys.executable, "-m", "mqstore", "serve", "--config", str(config)],
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    lines = [json.loads(line) for line in out.stderr.splitlines() if line.strip()]  # every line JSON
    last = lines[-1]
    assert last["level"] == "error" and last["logger"] == "mqstore.serve", last
    assert "cannot listen there" in last["message"] and str(metrics_port) in last["message"]


def test_a_trial_serve_on_an_address_in_use_leaves_no_store_behind(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        out = subprocess.run([sys.executable, "-m", "mqstore", "serve", "--listen", listen,
                              "--data-dir", str(tmp_path / "trial")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert f"cannot listen on {listen} (listen): the address is in use" in out.stderr
    assert "bootstrapped" not in out.stderr
    assert not (tmp_path / "trial" / "data.mdb").exists()


# --- 5. `status --json` has one shape, online and offline ----------------------------------------


def test_offline_status_json_has_the_online_shape(tmp_path: Path) -> None:
    cluster = InProcessCluster(tmp_path, ["a"])
    data_dir = Path(cluster.configs[1].data_dir)
    try:
        cluster.leader()
        with Client([cluster.address(1)], timeout=10) as c:
            c.enqueue(mail_from="a@example.org", recipients=["b@example.net"], data=MAIL, namespace="default")
        on = subprocess.run([sys.executable, "-m", "mqstore", "status", "--server", cluster.address(1), "--json"],
                            capture_output=True, text=True, timeout=60)
        assert on.returncode == 0, on.stderr
    finally:
        cluster.close()
    off = subprocess.run([sys.executable, "-m", "mqstore", "status", "--data-dir", str(data_dir), "--json"],
                         capture_output=True, text=True, timeout=60)
    assert off.returncode == 0, off.stderr
    online, offline = json.loads(on.stdout), json.loads(off.stdout)
    assert offline["stats"]["namespaces"] == online["stats"]["namespaces"]
    assert offline["stats"]["namespaces"]["default"]["messages"] == 1
    # the same meaning: the data file's size (not the whole directory with its snapshots and keys)
    assert offline["disk_used_bytes"] == (data_dir / "data.mdb").stat().st_size
    assert online["disk_used_bytes"] == offline["disk_used_bytes"]


# --- 6. snapshot files are as private as data.mdb ------------------------------------------------


def test_snapshot_files_are_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        cluster = InProcessCluster(tmp_path, ["a"])
        try:
            node = cluster.leader().node
            with Client([cluster.address(1)], timeout=10) as c:
                c.enqueue(mail_from="a@example.org", recipients=["b@example.net"], data=MAIL)
            meta = node.snapshot_now()
            path = node.snapshot_file(meta.index)
            assert path.exists()
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, oct(path.stat().st_mode)
            assert stat.S_IMODE((Path(node.config.data_dir) / "data.mdb").stat().st_mode) == 0o600
        finally:
            cluster.close()
    finally:
        os.umask(old)


def test_offline_counts_are_built_as_the_online_stats(tmp_path: Path) -> None:
    """Offline status (``facts.queue_counts``, the store's files read without its key) and a running
    store's ``stats()`` give the same counts, overall and per namespace: one function builds both
    (``mqstore.api.stats_counts``), so they cannot drift apart when one is edited."""
    import mqstore
    from mqstore.ops import facts

    key = create_key_file(tmp_path / "kek.key")
    with mqstore.open(tmp_path / "store", key_file=key, background=False) as s:
        s.enqueue(mail_from="a@example.org", recipients=["b@example.net", "c@example.net"], data=MAIL,
                  namespace="default")
        s.enqueue(mail_from="a@example.org", recipients=["d@example.com"], data=MAIL * 3, namespace="bulk")
        (lease,) = s.lease("w", max_messages=1, namespace="default")
        s.ack(lease.token, [lease.recipients[0]])
        online = s.stats()
    with facts.open_env(tmp_path / "store") as env:
        offline = facts.queue_counts(env, int(time.time() * 1000))
    shared = ["recipients", "messages", "messages_active", "bytes", "namespaces"]
    assert {k: offline[k] for k in shared} == {k: online[k] for k in shared}
    assert set(offline) == {*shared, "oldest_age_seconds"} and offline["oldest_age_seconds"] >= 0
    assert sorted(offline["namespaces"]) == ["bulk", "default"]
    assert offline["namespaces"]["default"]["messages"] == 1 and offline["messages"] == 2
    assert sum(offline["namespaces"]["default"]["recipients"].values()) == 2


_PINGING_CLIENT = """
import sys, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
options = [("grpc.keepalive_time_ms", 1000), ("grpc.keepalive_timeout_ms", 5000),
           ("grpc.http2.max_pings_without_data", 0), ("grpc.keepalive_permit_without_calls", 1)]
with grpc.insecure_channel(sys.argv[1], options=options) as channel:
    stub = health_pb2_grpc.HealthStub(channel)
    stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
    time.sleep(6)  # idle: keepalive pings only
    stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
print("ok")
"""


def test_a_node_takes_its_clients_keepalive_pings_without_goaway(tmp_path: Path) -> None:
    """Nodes and clients ping every 10 s, calls or not; gRPC's server default allows one ping per
    5 minutes without data and answered the third with GOAWAY "too_many_pings" (the connection
    dropped, a gRPC core error line on an idle client's stderr every ~30 s). Pings here come every
    second, so the default's GOAWAY comes within ~3 s."""
    c = InProcessCluster(tmp_path, ["a"])
    try:
        c.leader()
        out = subprocess.run([sys.executable, "-c", _PINGING_CLIENT, c.address(1)], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
        assert "too_many_pings" not in out.stderr and "GOAWAY" not in out.stderr, out.stderr
    finally:
        c.close()
