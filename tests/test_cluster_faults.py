"""Faults injected into real multi-process clusters on 127.0.0.1 under a steady queue workload.

Each test starts a :class:`~mqstore.testing.cluster.LocalCluster` (one ``mqstore serve`` process
per node), runs a :class:`~mqstore.testing.history.Workload` (enqueuers and lease/ack/defer
workers, every call recorded), injects faults, heals, and then checks:

* the history against the final state (:func:`mqstore.testing.history.check`): no acknowledged
  enqueue lost, no duplicate from retries, no ack or defer accepted under a stale fencing token,
  no overlapping leases, acked recipients delivered;
* the replicas: converged on one leader and applied index; after a SIGKILL of every node, each
  data dir scans clean (``mqstore scan``) and all have identical queue state tables.

Scenarios: 3 nodes / 3 sites — kill -9 the leader (3 times, restarting it), SIGSTOP the leader
for 3 s, cut links through TCP proxies (isolate the leader; asymmetric cuts both ways; then slow
its links down), kill a follower's whole site, fill a follower's disk and then the leader's; 5
nodes placed 2/2/1 — kill -9 the leader's whole site (2 nodes); a lost node replaced with
``mqstore recover`` while leaders and the replacement are killed mid-way; and, with a 5 s election
timeout, a killed leader replaced long before that timeout (its followers see its connections
refused) while a paused one is not. Fast tests at the end check that the checker flags each kind
of violation and that the proxy cuts, heals, blackholes and delays.

Failover time = from the fault to the first write answered by another node, as the workload's
own clients saw it (client-side leader discovery and backoff included); the time until another
node reports itself leader is printed beside it. The median over the leader kills must be at
most 3 s. A leader that hangs (SIGSTOP, partition) costs a call the client's attempt timeout
(2 s here) before it tries another node, so those times are about 2 s even when the election
took 1.1 s. ``MQSTORE_FAULT_ROUNDS=n`` repeats every fault n times (soak runs); the default run
takes about 80 s on 2 cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mqstore.api import Message, RecipientStatus
from mqstore.client import Client
from mqstore.testing.cluster import LocalCluster, wait_until
from mqstore.testing.history import (
    OK,
    UNKNOWN,
    FinalState,
    Grant,
    History,
    Op,
    Report,
    Workload,
    WorkloadConfig,
    check,
    median,
    message_data,
    read_final_state,
    summarize,
)
from mqstore.testing.proxy import Proxy

ROUNDS = max(1, int(os.environ.get("MQSTORE_FAULT_ROUNDS", "1")))
FAILOVER_LIMIT_S = 3.0
NAMESPACE = "faults"

pytestmark = pytest.mark.timeout(300 + 120 * ROUNDS)


# --- harness -----------------------------------------------------------------------------------


@contextlib.contextmanager
def running(
    tmp_path: Path, sites: list[str], *, proxies: bool = False, config: WorkloadConfig | None = None
) -> Iterator[tuple[LocalCluster, Workload]]:
    """A started cluster (every link through a proxy when ``proxies``) with the workload running.
    On any failure, every node's log tail is printed."""
    cluster = LocalCluster(tmp_path / "cluster", sites)
    workload: Workload | None = None
    try:
        cluster.bootstrap()
        if proxies:
            cluster.proxy_all_links()
        cluster.start_all()
        cluster.wait_for_leader(30)
        workload = Workload(cluster.addresses(), config or WorkloadConfig(namespace=NAMESPACE))
        workload.prepare()
        workload.start()
        assert workload.wait_for_writes(20, timeout=30), "the workload made no progress on a healthy cluster"
        yield cluster, workload
    except BaseException:
        print(cluster.log_tails(60))
        raise
    finally:
        if workload is not None:
            with contextlib.suppress(Exception):
                workload.stop()
        cluster.close()


def leader_of(cluster: LocalCluster, among: list[int] | None = None) -> int:
    return cluster.wait_for_leader(30, among=among)


def wait_caught_up(cluster: LocalCluster, node_id: int, timeout: float = 30.0) -> None:
    """Wait until ``node_id`` has applied everything the leader had committed when called."""
    leader = leader_of(cluster)
    st = cluster.status(leader)
    target = st["commit_index"] if st else 0

    def caught_up() -> bool:
        mine = cluster.status(node_id, timeout=1.0)
        return mine is not None and mine["applied_index"] >= target

    assert wait_until(caught_up, timeout, 0.1), f"node {node_id} did not catch up to index {target} in {timeout} s"


def new_leader_after(cluster: LocalCluster, old: int, t0: float, timeout: float = 30.0) -> float:
    """Seconds from ``t0`` until a running node other than ``old`` reports itself leader."""
    others = [n for n in cluster.nodes if n != old]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for node_id in others:
            st = cluster.status(node_id, timeout=0.5) if cluster.alive(node_id) else None
            if st is not None and st["role"] == "leader":
                return time.time() - t0
        time.sleep(0.02)
    raise TimeoutError(f"no node other than {old} became leader within {timeout} s")


def leader_fault(
    cluster: LocalCluster, workload: Workload, fault: Callable[[int], None], leader: int | None = None
) -> tuple[float, float]:
    """Apply ``fault`` to the leader; returns (seconds until another node reports itself leader,
    seconds until the workload had a write answered by another node), both from the fault."""
    leader = leader or leader_of(cluster)
    address = cluster.nodes[leader].address
    t0 = time.time()
    fault(leader)
    elected = new_leader_after(cluster, leader, t0)
    return elected, workload.failover_time(t0, address, timeout=30)


def kill_nodes(cluster: LocalCluster, victims: list[int]) -> None:
    """SIGKILL ``victims`` at once (as one power loss would)."""
    for node_id in victims:
        proc = cluster.nodes[node_id].process
        if proc is not None:
            proc.kill()
    for node_id in victims:
        cluster.kill(node_id)  # reap


def assert_failover_within_limit(times: list[float]) -> None:
    assert median(times) <= FAILOVER_LIMIT_S, (
        f"median failover {median(times):.2f} s > {FAILOVER_LIMIT_S} s: {[round(t, 2) for t in times]}"
    )


def verify(cluster: LocalCluster, workload: Workload, label: str) -> Report:
    """Stop the workload, let the leases run out, check the history and the replicas."""
    assert workload.wait_for_writes(20, timeout=30), "the workload made no progress after healing"
    workload.stop()
    assert not workload.crashes, workload.crashes
    cluster.heal()
    down = [n for n in cluster.nodes if not cluster.alive(n)]
    assert not down, f"verify needs every node running; down: {down}"
    # Leases are short: once none is held, maintenance has nothing left to do and the log is still.
    lease_s = workload.config.lease_seconds
    with Client(cluster.addresses(), timeout=10) as client:
        def no_leases() -> bool:
            return int(client.stats()["recipients"].get("leased", 0)) == 0

        assert wait_until(no_leases, lease_s + 15, 0.2), "leases did not expire after the workload stopped"
    applied = cluster.wait_converged(30)
    final = read_final_state(cluster.addresses(), NAMESPACE, workload.history)
    report = check(workload.history, final, NAMESPACE)
    print(f"[{label}] {report}")
    assert report.ok, str(report)
    assert report.counts["keys_acked"] > 0 and report.counts["acks_ok"] > 0, report.counts
    # Every replica: the same state, a clean log.
    procs = [cluster.nodes[n].process for n in cluster.nodes]
    for proc in procs:
        if proc is not None:
            proc.kill()
    for node_id in cluster.nodes:
        cluster.kill(node_id)
    digests = {n: cluster.state_digest(n) for n in cluster.nodes}
    scans = {n: cluster.scan(n) for n in cluster.nodes}
    print(f"[{label}] converged at {applied}; digests {({n: d[1][:12] for n, d in digests.items()})}")
    dirty = {n: s for n, s in scans.items() if not s["clean"] or s["exit_code"] != 0}
    assert not dirty, f"mqstore scan found damage: {dirty}"
    assert len({d for d in digests.values()}) == 1, f"replicas differ (applied index, state digest): {digests}"
    return report


# --- scenarios ---------------------------------------------------------------------------------


def test_kill_leader_3_sites(tmp_path: Path) -> None:
    """kill -9 the leader three times (restarting it each time): failover median <= 3 s."""
    elections: list[float] = []
    times: list[float] = []
    with running(tmp_path, ["a", "b", "c"]) as (cluster, workload):
        for _ in range(3 * ROUNDS):
            leader = leader_of(cluster)
            elected, served = leader_fault(cluster, workload, cluster.kill, leader)
            elections.append(elected)
            times.append(served)
            assert workload.wait_for_writes(20, timeout=20), "no writes after the failover"
            cluster.start(leader)
            wait_caught_up(cluster, leader)
        report = verify(cluster, workload, "kill leader")
    print(f"[kill leader] new leader elected after (s): {[round(t, 2) for t in elections]} -> {summarize(elections)}")
    print(f"[kill leader] first write via the new leader after (s): {[round(t, 2) for t in times]} -> "
          f"{summarize(times)}")
    assert report.counts["keys"] > 50
    assert_failover_within_limit(times)


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "mutual-tls"])
def test_followers_elect_at_once_when_the_leader_process_dies(tmp_path: Path, tls: bool) -> None:
    """The followers see the dead leader's connections refused and elect another leader without
    waiting out their election timeout (5-10 s here), over plaintext and mutual TLS alike. The
    control (plaintext run): a SIGSTOPped leader keeps its connections open, so the followers wait
    out the timeout as they would without the report."""
    with LocalCluster(tmp_path / "cluster", ["a", "b", "c"], election_tick=50, tls=tls) as cluster:
        cluster.bootstrap()
        cluster.start_all()
        leader = cluster.wait_for_leader(60)
        with Client(cluster.addresses(), timeout=10, **cluster.client_options()) as client:
            before = client.enqueue(mail_from="a@example.org", recipients=["b@example.net"], data=b"before")
            t0 = time.time()
            cluster.kill(leader)
            elected = new_leader_after(cluster, leader, t0)
            assert elected < 5.0, f"a new leader after {elected:.2f} s: the followers waited for their timeout"
            after = client.enqueue(mail_from="a@example.org", recipients=["b@example.net"], data=b"after")
            assert [client.get(m).data for m in (before, after)] == [b"before", b"after"]
            print(f"[leader killed] new leader after {elected:.2f} s (election timeout 5-10 s)")
            if tls:
                return
            cluster.start(leader)
            wait_caught_up(cluster, leader)
            leader = leader_of(cluster)
            t0 = time.time()
            cluster.pause(leader)
            try:
                elected = new_leader_after(cluster, leader, t0)
            finally:
                cluster.resume(leader)
            # Not at once: a follower waits its election timeout (50 ticks, 5-10 s), counted from
            # the last heartbeat it had (up to a heartbeat before t0) in whole ticks of its own (up
            # to one more): so at least ~4.8 s after t0 (a CI run measured 4.96 s against the 5.0
            # this asserted before), where "at once" is ~0.1 s.
            assert elected >= 4.5, f"a new leader after {elected:.2f} s although the paused leader's connections held"
            assert client.get(after).data == b"after"


def test_pause_leader(tmp_path: Path) -> None:
    """SIGSTOP the leader for 3 s, then SIGCONT: another node takes over, the old leader rejoins
    as a follower, and nothing it accepted before the pause is lost or served twice."""
    elections: list[float] = []
    times: list[float] = []
    with running(tmp_path, ["a", "b", "c"]) as (cluster, workload):
        for _ in range(ROUNDS):
            leader = leader_of(cluster)
            t0 = time.time()
            try:
                elected, served = leader_fault(cluster, workload, cluster.pause, leader)
                elections.append(elected)
                times.append(served)
                time.sleep(max(0.0, t0 + 3.0 - time.time()))
            finally:
                cluster.resume(leader)
            assert workload.wait_for_writes(20, timeout=20), "no writes after the paused leader resumed"
            wait_caught_up(cluster, leader)
        verify(cluster, workload, "pause leader")
    print(f"[pause leader] new leader elected after (s): {summarize(elections)}; "
          f"first write via another node after (s): {summarize(times)}")


def test_partitions_through_proxies(tmp_path: Path) -> None:
    """Every link through a proxy. Isolate the leader from both followers; then cut only what the
    leader sends (it still hears the others); then only what it receives (its heartbeats still go
    out, the answers do not). Each time another node must serve writes; after healing, all agree.
    Then slow the leader's links down (150 ms each way): writes go on."""
    times: dict[str, list[tuple[float, float]]] = {"isolated": [], "outbound cut": [], "inbound cut": []}
    cuts = {
        "isolated": {"outbound": True, "inbound": True},
        "outbound cut": {"outbound": True, "inbound": False},
        "inbound cut": {"outbound": False, "inbound": True},
    }
    with running(tmp_path, ["a", "b", "c"], proxies=True) as (cluster, workload):
        for _ in range(ROUNDS):
            for name, sides in cuts.items():
                leader = leader_of(cluster)
                try:

                    def cut(node_id: int, sides: dict[str, bool] = sides) -> None:
                        cluster.isolate(node_id, outbound=sides["outbound"], inbound=sides["inbound"])

                    times[name].append(leader_fault(cluster, workload, cut, leader))
                    assert workload.wait_for_writes(10, timeout=20), f"{name}: no writes while partitioned"
                finally:
                    cluster.heal()
                assert workload.wait_for_writes(20, timeout=20), f"{name}: no writes after healing"
                wait_caught_up(cluster, leader)
            # A slow leader: 150 ms each way on all its links. Writes go on (slower).
            for proxy in cluster.links_of(leader_of(cluster)):
                proxy.delay(0.15)
            try:
                assert workload.wait_for_writes(20, timeout=30), "no writes with the leader's links slowed down"
            finally:
                cluster.heal()
        refused = sum(p.stats.refused for p in cluster.proxies.values())
        verify(cluster, workload, "partitions")
    assert refused > 0, "the cuts refused no connection: were the links really routed through the proxies?"
    for name, values in times.items():
        print(f"[partitions] {name}: new leader elected after (s): {summarize(e for e, _ in values)}; "
              f"first write via another node after (s): {summarize(w for _, w in values)}")


def test_kill_a_follower_site_3_sites(tmp_path: Path) -> None:
    """Kill a whole site holding a follower (1 of 3 nodes): writes go on without a pause worth the
    name; the site comes back and catches up."""
    gaps: list[float] = []
    with running(tmp_path, ["a", "b", "c"]) as (cluster, workload):
        for _ in range(ROUNDS):
            leader = leader_of(cluster)
            site = next(s.site for n, s in cluster.nodes.items() if n != leader)
            t0 = time.time()
            victims = cluster.kill_site(site)
            assert workload.wait_for_writes(40, timeout=20), f"no writes with site {site} down"
            gaps.append(workload.history.write_gaps(t0, time.time()))
            for node_id in victims:
                cluster.start(node_id)
            for node_id in victims:
                wait_caught_up(cluster, node_id)
        verify(cluster, workload, "kill follower site")
    print(f"[kill follower site] longest write gap while the site was down (s): {summarize(gaps)}")


def test_a_full_disk_stops_the_node_and_it_catches_up_once_there_is_room(tmp_path: Path) -> None:
    """A node whose disk fills up cannot persist its log: it stops and ``mqstore serve`` exits
    with status 1 naming what ran out, while the others go on (a follower's disk: writes go on;
    the leader's: another node is elected). Restarted with room, it catches up, and no
    acknowledged write is lost."""
    with running(tmp_path, ["a", "b", "c"]) as (cluster, workload):
        for _ in range(ROUNDS):
            for role in ("follower", "leader"):
                leader = leader_of(cluster)
                victim = leader if role == "leader" else next(n for n in cluster.nodes if n != leader)
                spec = cluster.nodes[victim]
                assert spec.process is not None and spec.log_path is not None
                t0 = time.time()
                limit = cluster.fill_disk(victim)
                assert spec.process.wait(120) == 1, f"the {role} with a full disk did not exit with status 1"
                stopped = time.time()
                log_text = spec.log_path.read_text(errors="replace")
                assert f"process's file size limit ({limit} bytes, ulimit -f)" in log_text, log_text[-3000:]
                assert "stopping so that it can be restarted" in log_text
                if role == "leader":
                    print(f"[full disk] leader {victim} stopped {stopped - t0:.2f} s after its disk filled (at its "
                          f"first write the disk could not take); another node reported itself leader "
                          f"{new_leader_after(cluster, victim, stopped):.2f} s after that")
                assert workload.wait_for_writes(20, timeout=30), f"no writes after the {role}'s disk filled"
                cluster.start(victim)
                wait_caught_up(cluster, victim)
        verify(cluster, workload, "full disk")


def test_kill_leader_site_5_nodes_2_2_1(tmp_path: Path) -> None:
    """5 nodes in sites a,a,b,b,c: kill -9 both nodes of the leader's site (or of site a when the
    leader is alone in c). Three nodes in two sites still make a quorum: writes go on, nothing
    acknowledged is lost; the site comes back and catches up."""
    times: list[float] = []
    with running(tmp_path, ["a", "a", "b", "b", "c"]) as (cluster, workload):
        for _ in range(ROUNDS):
            leader = leader_of(cluster)
            site = cluster.nodes[leader].site
            if len(cluster.site_nodes(site)) < 2:
                site = "a"
            victims = cluster.site_nodes(site)
            if leader in victims:

                def kill_site(_: int, victims: list[int] = victims) -> None:
                    kill_nodes(cluster, victims)

                times.append(leader_fault(cluster, workload, kill_site, leader)[1])
            else:
                kill_nodes(cluster, victims)
            assert workload.wait_for_writes(40, timeout=30), f"no writes with site {site} down"
            for node_id in victims:
                cluster.start(node_id)
            for node_id in victims:
                wait_caught_up(cluster, node_id)
        verify(cluster, workload, "kill site 2/2/1")
    print(f"[kill site 2/2/1] failover times when the leader's site died (s): {summarize(times)}")
    if times:
        assert_failover_within_limit(times)


def test_replace_a_lost_node_under_load_while_leaders_die(tmp_path: Path) -> None:
    """An operator replaces a node whose disk died (``mqstore recover --replace``) while the
    workload runs, and processes die in the middle of it: the leader while the replacement is a
    learner not yet started, the replacement while it catches up, and the leader again as soon as
    the replacement votes and the lost node's removal is due. The operator reruns ``recover``
    should it stop with an error. In the end the old id is removed for good, the new node votes,
    and the history and the replicas check out as after any other fault."""
    with running(tmp_path, ["a", "b", "c"]) as (cluster, workload):
        for _ in range(ROUNDS):
            _replace_a_lost_node(cluster, workload)
        verify(cluster, workload, "replace node")


def _replace_a_lost_node(cluster: LocalCluster, workload: Workload) -> None:
    leader = leader_of(cluster)
    lost = next(n for n in cluster.nodes if n != leader)
    site = cluster.nodes[lost].site
    cluster.kill(lost)
    cluster.wipe(lost)
    assert workload.wait_for_writes(20, timeout=30), "no writes with one node lost"
    new = cluster.add_node(site)  # (its config still names the lost node as a peer, as an operator's would)
    del cluster.nodes[lost]
    runs: list[subprocess.CompletedProcess[str]] = []
    done = threading.Event()

    def operator() -> None:
        servers = ",".join(spec.address for spec in cluster.nodes.values())  # the new node's too
        try:
            for _attempt in range(8):
                runs.append(cluster.mqstore("recover", "--config", str(cluster.config_path(new)), "--server", servers,
                                            "--replace", str(lost), "--wait", "30", "--json", timeout=120))
                if runs[-1].returncode == 0:
                    return
                time.sleep(0.5)
        finally:
            done.set()

    def member() -> dict[str, Any] | None:
        st = cluster.status(leader_of(cluster), timeout=1.0)
        return None if st is None else next((m for m in st["members"] if m["id"] == new), None)

    def kill_and_restart(node_id: int, down_s: float) -> None:
        cluster.kill(node_id)
        time.sleep(down_s)
        cluster.start(node_id)

    threading.Thread(target=operator, daemon=True).start()
    try:
        # The leader dies while the replacement is a learner not yet started (with one voter
        # lost already, writes wait for the leader to come back).
        assert wait_until(lambda: member() is not None, 60), f"node {new} was not added: {runs}"
        kill_and_restart(leader_of(cluster), 0.5)
        # The replacement starts, and dies while it catches up.
        cluster.start(new)
        assert wait_until(lambda: (member() or {}).get("match_index", 0) > 0, 60, 0.02)
        kill_and_restart(new, 0.3)
        # The leader dies as soon as the replacement votes: the lost node's removal is due.
        assert wait_until(lambda: bool((member() or {}).get("voter")), 90, 0.02), \
            f"node {new} was never promoted: {[r.stdout + r.stderr for r in runs]}"
        kill_and_restart(leader_of(cluster), 0.5)
        assert done.wait(300), "recover did not finish"
    finally:
        done.wait(150)
    outputs = [f"exit {r.returncode}: {r.stdout}{r.stderr}" for r in runs]
    assert runs and runs[-1].returncode == 0, outputs
    result = json.loads(runs[-1].stdout)
    assert result["node_id"] == new and result["replaced"] == lost, outputs
    members = {m["id"]: m for m in result["members"]}
    assert set(members) == set(cluster.nodes) and members[new]["voter"], outputs
    shown = cluster.mqstore("status", "--server", cluster.servers(), "--json")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert lost in json.loads(shown.stdout)["removed_ids"], shown.stdout
    for r in runs[:-1]:
        print(f"[replace node] recover stopped with exit {r.returncode}: {(r.stdout + r.stderr).strip()[-300:]}")
    print(f"[replace node] node {new} replaced node {lost}; recover ran {len(runs)} time(s)")
    assert workload.wait_for_writes(20, timeout=30), "no writes after the replacement"
    for node_id in cluster.nodes:
        wait_caught_up(cluster, node_id)


# --- the checker itself: it must flag each kind of violation ----------------------------------


def _message(mid: str, key: str, states: dict[str, str]) -> Message:
    recipients = tuple(RecipientStatus(a, s, 0, None, None, None, None) for a, s in states.items())
    return Message(
        mid, NAMESPACE, "sender@example.org", recipients, message_data(key), 0, 0.0, None, None, False, False, 0,
        key, None,
    )


def _enqueue(key: str, mid: str, outcome: str = OK, rcpts: tuple[str, ...] = ("r@d.example",)) -> Op:
    return Op("enq0", "enqueue", 1.0, 1.1, outcome, node="n1", key=key, attempt=1, recipients=rcpts,
              message_id=mid if outcome == OK else "")


def _lease(token: int, mid: str, at: float, deadline: float, rcpts: tuple[str, ...] = ("r@d.example",)) -> Op:
    return Op("wrk0", "lease", at - 0.01, at, OK, node="n1", grants=(Grant(token, mid, rcpts, deadline, "wrk0"),))


def _settle(kind: str, token: int, mid: str, at: float, outcome: str = OK) -> Op:
    return Op("wrk0", kind, at - 0.01, at, outcome, node="n1", token=token, message_id=mid)


def _history(*ops: Op) -> History:
    h = History()
    for o in ops:
        h.add(o)
    return h


CHECKER_CASES: dict[str, tuple[list[Op], dict[str, Message], str]] = {
    "clean": (
        [_enqueue("k1", "M1"), _lease(10, "M1", 2.0, 5.0), _settle("ack", 10, "M1", 2.5)],
        {"M1": _message("M1", "k1", {"r@d.example": "delivered"})},
        "",
    ),
    "lost": ([_enqueue("k1", "M1")], {}, "LOST: key k1"),
    "duplicate": (
        [_enqueue("k1", "M1"), _enqueue("k1", "", outcome=UNKNOWN)],
        {"M1": _message("M1", "k1", {"r@d.example": "queued"}), "M2": _message("M2", "k1", {"r@d.example": "queued"})},
        "DUPLICATE: key k1 is stored 2 times",
    ),
    "retry returned another id": (
        [_enqueue("k1", "M1"), _enqueue("k1", "M2")],
        {"M1": _message("M1", "k1", {"r@d.example": "queued"})},
        "RETRY DUPLICATE: key k1",
    ),
    "stale ack accepted": (
        [
            _enqueue("k1", "M1"),
            _lease(10, "M1", 2.0, 5.0),
            _lease(20, "M1", 5.5, 8.5),  # after lease 10 ran out: fine
            _settle("late_ack", 10, "M1", 6.0),  # ...but then lease 10's ack must have failed
        ],
        {"M1": _message("M1", "k1", {"r@d.example": "delivered"})},
        "STALE ACK ACCEPTED",
    ),
    "overlapping leases": (
        [_enqueue("k1", "M1"), _lease(10, "M1", 2.0, 5.0), _lease(20, "M1", 3.0, 6.0)],
        {"M1": _message("M1", "k1", {"r@d.example": "leased"})},
        "OVERLAPPING LEASES",
    ),
    "ack not durable": (
        [_enqueue("k1", "M1"), _lease(10, "M1", 2.0, 5.0), _settle("ack", 10, "M1", 2.5)],
        {"M1": _message("M1", "k1", {"r@d.example": "queued"})},
        "ACK NOT DURABLE",
    ),
    "token granted twice": (
        [_enqueue("k1", "M1"), _lease(10, "M1", 2.0, 5.0), _lease(10, "M1", 2.1, 5.1)],
        {"M1": _message("M1", "k1", {"r@d.example": "leased"})},
        "TOKEN REUSED",
    ),
    "phantom delivery": (
        [_enqueue("k1", "M1")],
        {"M1": _message("M1", "k1", {"r@d.example": "delivered"})},
        "PHANTOM DELIVERY",
    ),
    "stale defer accepted": (
        [
            _enqueue("k1", "M1"),
            _lease(10, "M1", 2.0, 5.0),
            _lease(20, "M1", 5.5, 8.5),
            _settle("defer", 10, "M1", 6.0),
        ],
        {"M1": _message("M1", "k1", {"r@d.example": "leased"})},
        "STALE DEFER ACCEPTED",
    ),
}


@pytest.mark.parametrize("case", list(CHECKER_CASES))
def test_checker_flags_violations(case: str) -> None:
    ops, messages, expected = CHECKER_CASES[case]
    report = check(_history(*ops), FinalState(messages=messages), NAMESPACE)
    if not expected:
        assert report.ok, str(report)
    else:
        assert not report.ok and any(expected in p for p in report.problems), str(report)


# --- the proxy ---------------------------------------------------------------------------------


@contextlib.contextmanager
def echo_server() -> Iterator[str]:
    """A TCP echo server on 127.0.0.1; yields its address."""
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    def echo(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(4096):
                conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{srv.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(2)
        srv.close()


def _connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=2)
    sock.settimeout(1.0)
    return sock


def _round_trip(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionResetError("closed")
        got += chunk
    return got


def test_proxy_cut_heal_blackhole_delay() -> None:
    with echo_server() as target, Proxy(target) as proxy:
        sock = _connect(proxy.address)
        assert _round_trip(sock, b"hello") == b"hello"
        # delay: each direction
        proxy.delay(0.2)
        t0 = time.monotonic()
        assert _round_trip(sock, b"slow") == b"slow"
        assert time.monotonic() - t0 >= 0.35
        proxy.delay(0)
        # cut: the open connection is reset, a new one is refused
        proxy.cut()
        with pytest.raises(OSError):
            _round_trip(sock, b"x")
        with pytest.raises(OSError):  # reset while connecting, or at the first read
            _round_trip(_connect(proxy.address), b"y")
        assert proxy.stats.refused >= 1
        # heal: new connections work again
        proxy.heal()
        sock = _connect(proxy.address)
        assert _round_trip(sock, b"healed") == b"healed"
        # one-way blackhole: what the dialer sends is dropped, the connection stays open
        proxy.cut("up")
        with pytest.raises(TimeoutError):
            _round_trip(sock, b"lost")
        proxy.heal()
        assert _round_trip(sock, b"back") == b"back"
        assert proxy.stats.dropped_up >= len(b"lost")
