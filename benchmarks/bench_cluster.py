"""Benchmark: a 3-node mqstore cluster against NATS JetStream R3 and etcd, on one machine.

Everything runs on 127.0.0.1, one system at a time (the others stopped), data on the same disk.
Messages are seeded 2 KiB email-like messages (``MailFactory``), one recipient each.

mqstore: 3 ``mqstore serve`` processes in sites a, b, c (``LocalCluster``); an enqueue is
acknowledged once a quorum spanning 2 sites has fsynced it and the leader applied it.

  seq        one ``Client.enqueue`` at a time;
  c64        64 concurrent clients doing single enqueues: ``--procs`` load-generator processes
             (multiprocessing, spawn) x threads, one ``Client`` (own gRPC connection) per thread,
             so the GIL of one benchmarking process does not cap the offered load;
  stream     one ``Client.enqueue_stream`` (latency: from the client taking the message off the
             iterable to its id coming back, so it includes the client's send window);
  batch256   one client, ``enqueue_many`` of 256 messages per call (latency per call);
  failover   SIGKILL the leader, then the time until a write is served again: a probe calling
             Enqueue on the surviving nodes directly every 10 ms, and a ``Client`` as an MTA would
             use it (its retry backoff included). The killed node is restarted and caught up
             between rounds; median of ``--failovers``.

Peers, installed with apt-get when missing (root) or found on PATH, measured in the same run:

  NATS JetStream 2.9 (Debian's nats-server): 3 clustered servers, file storage, a stream with
  replicas=3; nats-py ``js.publish_async`` (``--nats-procs`` processes, one connection each, up
  to 4000 unacknowledged publishes per connection; latency: publish -> ack) and sequential
  ``js.publish`` for reference. Its ack means "stored in memory on a majority", NOT fsynced.

  etcd 3.4 (Debian's etcd-server): 3 members; Put of a 2 KiB value to a fresh key, over etcd's
  gRPC API (``/etcdserverpb.KV/Put``, request encoded by hand: no generated stubs, no etcd Python
  client), to the leader (found through the HTTP/JSON gateway's Maintenance.Status, untimed),
  with exactly the load generator the mqstore c64 case uses (same processes x threads, one
  blocking call at a time per client), and sequentially.

The floor (a reference, not a peer; run with the c64 case): the same 64-client load against a
Python gRPC server that stores nothing and answers each call when a thread ends its next 2 ms
round (as the Raft thread answers a round's waiting callers), once with the thread-pool server
mqstore's nodes run (same worker count) and once with ``grpc.aio``: the most calls/s a Python
gRPC server serves on this machine when every message is one blocking call, as in c64.

Each case runs ``--runs`` times (default 3); the median (by throughput) is reported. During each
case the CPU time of every server process, of the load generator and of the whole machine is
sampled (/proc), to show what saturates; the machine's load before the start is measured too and
a warning names the busiest processes when something else already uses the CPUs. ``--profile
DIR`` runs each mqstore case once more under py-spy and prints, per node, the cores each thread
used and the Python functions that used them. Targets checked:

  mqstore stream (and batch256) >= 1.0 x NATS R3 async publish
  mqstore c64                   >= 1.0 x etcd 64 clients
  leader kill -> writes again   <= 3 s (goal 1 s)

Run:  python benchmarks/bench_cluster.py             (about 4 minutes on 2 cores)
      python benchmarks/bench_cluster.py --quick     (one run of 2 s per case: about 1 minute)
      python benchmarks/bench_cluster.py --json out.json --skip nats --profile /tmp/prof
      python benchmarks/bench_cluster.py --cases failover --failovers 5 --heartbeat-ms 50
      python benchmarks/bench_cluster.py --cases c64 --clients 8 --skip nats   (fewer concurrent clients)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from mqstore.testing.figures import write_json

warnings.filterwarnings("ignore", message="mqstore created a key-encryption key")

MESSAGE_BYTES = 2048
SENDER = "sender@example.org"
CLIENTS = 64
BATCH = 256
NATS_MAX_PENDING = 4000
_CLK_TCK = os.sysconf("SC_CLK_TCK")

# --- results ----------------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    msgs: int
    seconds: float
    latencies: list[float]  # seconds, sorted
    cpu: dict[str, float] = field(default_factory=dict)  # what -> cores used (CPU seconds / wall second)
    errors: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.msgs / self.seconds if self.seconds > 0 else 0.0

    def pct_ms(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        return self.latencies[min(len(self.latencies) - 1, int(q * len(self.latencies)))] * 1e3

    def line(self) -> str:
        cpu = " ".join(f"{k} {v:.2f}" for k, v in self.cpu.items())
        return (
            f"{self.name:34s} {self.rate:9,.0f} msg/s  p50 {self.pct_ms(0.5):8.2f} ms  p99 {self.pct_ms(0.99):8.2f} ms"
            + (f"  errors {self.errors}" if self.errors else "")
            + (f"\n{'':36s}cores: {cpu}" if cpu else "")
        )

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "msgs": self.msgs,
            "seconds": self.seconds,
            "msgs_per_s": self.rate,
            "p50_ms": self.pct_ms(0.5),
            "p99_ms": self.pct_ms(0.99),
            "errors": self.errors,
            "cores": self.cpu,
            **self.extra,
        }


def _round(d: dict[Any, float]) -> dict[Any, float]:
    return {k: round(v, 2) for k, v in d.items()}


def median_result(runs: list[Result]) -> Result:
    ordered = sorted(runs, key=lambda r: r.rate)
    return ordered[len(ordered) // 2]


# --- CPU accounting (/proc) ----------------------------------------------------------------------------


def _pid_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process used so far; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _machine_busy_s() -> float:
    """CPU seconds all cores spent not idle, so far."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / _CLK_TCK


class CpuMeter:
    """Cores used by named processes (and the whole machine) between start() and stop()."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.t0 = 0.0
        self.before: dict[str, float] = {}

    def start(self) -> CpuMeter:
        self.t0 = time.monotonic()
        self.before = {k: _pid_cpu_s(p) for k, p in self.pids.items()}
        self.before["machine"] = _machine_busy_s()
        self.before["bench"] = time.process_time()
        return self

    def stop(self, extra: dict[str, float] | None = None) -> dict[str, float]:
        wall = max(1e-9, time.monotonic() - self.t0)
        out = {k: (_pid_cpu_s(p) - self.before[k]) / wall for k, p in self.pids.items()}
        out["bench"] = (time.process_time() - self.before["bench"]) / wall
        for k, v in (extra or {}).items():
            out[k] = v / wall
        out["machine"] = (_machine_busy_s() - self.before["machine"]) / wall
        return out


def other_load(seconds: float = 1.0) -> tuple[float, list[tuple[float, str]]]:
    """Cores the machine is busy with before the benchmark starts, and the busiest processes."""

    def snapshot() -> dict[int, float]:
        out = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                out[int(d.name)] = _pid_cpu_s(int(d.name))
        return out

    busy0, before = _machine_busy_s(), snapshot()
    time.sleep(seconds)
    busy1, after = _machine_busy_s(), snapshot()
    top = []
    for pid, cpu in after.items():
        used = (cpu - before.get(pid, cpu)) / seconds
        if used >= 0.05 and pid != os.getpid():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                cmd = "?"
            top.append((used, f"pid {pid}: {cmd[:100]}"))
    return (busy1 - busy0) / seconds, sorted(top, reverse=True)[:5]


#: Frames where a thread waits (py-spy's idle detection misses some): left out of the function tables.
_WAITS = frozenset(
    (
        "Condition.wait",
        "Pending.wait",
        "Event.wait",
        "Queue.get",
        "_serve",
        "_wait_once",
        "_StreamUnaryMultiCallable._blocking",
        "_UnaryUnaryMultiCallable._blocking",
        "consume_request_iterator",
        "_consume_request_iterator.<locals>.consume_request_iterator",
        "Future.result",
    )
)
_NOT_INTERESTING = ("Thread.", "_WorkItem.run", "_worker", "_bootstrap")


def _thread_cpu_s(pid: int) -> dict[int, float]:
    out = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        if task.name.isdigit():
            out[int(task.name)] = _pid_cpu_s_path(task / "stat")
    return out


def _pid_cpu_s_path(path: Path) -> float:
    try:
        fields = path.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _frame(text: str) -> str:
    """py-spy's "func (path/file.py:line)" as "func (file.py)"."""
    func, _, where = text.rpartition(" (")
    return f"{func} ({where.rsplit('/', 1)[-1].split(':')[0]})" if func else text


class Profiler:
    """While a case runs (an extra, unmeasured run): every thread's CPU time from /proc, named by
    py-spy, and py-spy's samples of the node processes (which Python functions use the CPU)."""

    def __init__(self, pids: dict[str, int], out_dir: Path, case: str) -> None:
        self.pids = pids
        self.out_dir = out_dir
        self.case = case
        self.rate = 100
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.t0 = 0.0
        self.wall = 0.0
        self.cpu0: dict[str, dict[int, float]] = {}
        self.cpu1: dict[str, dict[int, float]] = {}

    @staticmethod
    def executable() -> str | None:
        beside = Path(sys.executable).parent / "py-spy"
        return str(beside) if beside.exists() else shutil.which("py-spy")

    def __enter__(self) -> Profiler:
        exe = self.executable()
        assert exe is not None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, pid in self.pids.items():
            out = self.out_dir / f"{self.case}-{name}.txt"
            argv = [exe, "record", "--pid", str(pid), "--rate", str(self.rate), "--format", "raw", "--threads"]
            argv += ["--nonblocking", "--output", str(out)]
            self.procs[name] = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # let py-spy attach
        self.cpu0 = {name: _thread_cpu_s(pid) for name, pid in self.pids.items()}
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.monotonic() - self.t0
        self.cpu1 = {name: _thread_cpu_s(pid) for name, pid in self.pids.items()}
        for p in self.procs.values():
            p.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        for p in self.procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()

    def summary(self, top: int = 10) -> str:
        """Per process: cores used per thread (from /proc; gRPC's handler pool summed), then the
        functions on top of the stack in py-spy's samples (waits left out) and the functions most
        often anywhere on the stack, as % of the samples that were not waiting."""

        lines = []
        for name, pid in self.pids.items():
            path = self.out_dir / f"{self.case}-{name}.txt"
            names: dict[int, str] = {}
            own: dict[str, int] = {}
            inclusive: dict[str, int] = {}
            working = 0
            text = path.read_text() if path.exists() else ""
            for row in text.splitlines():
                stack, _, count = row.rpartition(" ")
                if not stack or not count.isdigit():
                    continue
                frames = stack.split(";")
                head = frames[0]  # 'thread (TID): NAME'
                if head.startswith("thread (") and "): " in head:
                    tid_text = head[8 : head.index(")")]
                    if tid_text.isdigit():
                        names[int(tid_text)] = head.split("): ", 1)[1]
                calls = [_frame(f) for f in frames[1:]]
                if not calls or calls[-1].split(" (")[0] in _WAITS:
                    continue
                n = int(count)
                working += n
                own[calls[-1]] = own.get(calls[-1], 0) + n
                for f in set(calls):
                    if not f.startswith(_NOT_INTERESTING):
                        inclusive[f] = inclusive.get(f, 0) + n
            cores: dict[str, float] = {}
            for tid, cpu in self.cpu1.get(name, {}).items():
                used = (cpu - self.cpu0.get(name, {}).get(tid, 0.0)) / max(self.wall, 1e-9)
                label = names.get(tid, f"tid {tid}")
                if label.startswith("ThreadPoolExecutor"):
                    label = "grpc-handlers"
                cores[label] = cores.get(label, 0.0) + used
            total = sum(cores.values())
            busiest = sorted(cores.items(), key=lambda x: -x[1])[:7]
            lines.append(
                f"    {name} (pid {pid}): {total:.2f} cores; threads: "
                + ", ".join(f"{t} {c:.2f}" for t, c in busiest if c >= 0.005)
            )
            if not working:
                lines.append("      (no py-spy samples: is ptrace permitted?)")
                continue
            lines.append(
                "      on top: "
                + "; ".join(f"{f} {n / working:.0%}" for f, n in sorted(own.items(), key=lambda x: -x[1])[:top])
            )
            lines.append(
                "      on stack: "
                + "; ".join(f"{f} {n / working:.0%}" for f, n in sorted(inclusive.items(), key=lambda x: -x[1])[:top])
            )
        return "\n".join(lines)


# --- the load generator: processes x threads of blocking calls ------------------------------------------


def _grpc_options(local_pool: bool = True) -> list[tuple[str, Any]]:
    from mqstore.client import CLIENT_CHANNEL_OPTIONS

    # A connection of its own per client: without this, gRPC shares one subchannel (one TCP
    # connection) among all channels of a process that have the same target and options.
    return [*CLIENT_CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1 if local_pool else 0)]


def _messages(seed: int, count: int) -> list[bytes]:
    from mqstore.testing.mail import MailFactory

    mail = MailFactory(seed=seed)
    return [mail.message(MESSAGE_BYTES) for _ in range(count)]


def _recipient(i: int) -> str:
    return f"rcpt{i % 997}@example.net"


def _mqstore_caller(addresses: list[str], seed: int) -> tuple[Callable[[int], object], Callable[[], None]]:
    from mqstore.client import Client

    options = _grpc_options()
    client = Client(addresses, timeout=30.0, channel_factory=lambda a: grpc.insecure_channel(a, options=options))
    messages = _messages(seed, 64)

    def call(i: int) -> object:
        return client.enqueue(SENDER, [_recipient(i)], messages[i % 64])

    return call, client.close


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def etcd_put_request(key: bytes, value: bytes) -> bytes:
    """etcdserverpb.PutRequest{key = 1; value = 2} in protobuf wire format."""
    return b"\x0a" + _varint(len(key)) + key + b"\x12" + _varint(len(value)) + value


def _raw_caller(
    address: str, method: str, request: Callable[[int, bytes], bytes], seed: int
) -> tuple[Callable[[int], object], Callable[[], None]]:
    """Blocking calls of ``method`` with hand-encoded requests (no generated stubs): call ``i``
    sends ``request(i, message)``."""
    channel = grpc.insecure_channel(address, options=_grpc_options())
    send = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    messages = _messages(seed, 64)

    def call(i: int) -> object:
        return send(request(i, messages[i % 64]), timeout=30.0)

    return call, channel.close


def _etcd_caller(addresses: list[str], seed: int) -> tuple[Callable[[int], object], Callable[[], None]]:
    prefix = f"bench/{seed}/{uuid.uuid4().hex[:8]}/".encode()
    return _raw_caller(
        addresses[0], "/etcdserverpb.KV/Put", lambda i, m: etcd_put_request(prefix + str(i).encode(), m), seed
    )


FLOOR_METHOD = "/mqstore.bench.Floor/Call"


def _floor_caller(addresses: list[str], seed: int) -> tuple[Callable[[int], object], Callable[[], None]]:
    return _raw_caller(addresses[0], FLOOR_METHOD, lambda i, m: m, seed)


_CALLERS = {"mqstore": _mqstore_caller, "etcd": _etcd_caller, "floor": _floor_caller}


def _load_worker(
    kind: str,
    addresses: list[str],
    threads: int,
    seed: int,
    ready: Any,
    go: Any,
    window: Any,
    out: Any,
) -> None:
    """One load-generator process: ``threads`` clients, each calling in a loop between the window's
    start and end (monotonic clock, shared by all processes on Linux)."""
    callers = [_CALLERS[kind](addresses, seed * 1000 + t) for t in range(threads)]
    for call, _ in callers:
        call(0)  # connect (and for mqstore, find the leader) before the clock starts
    ready.put(os.getpid())
    go.wait()
    start, end = window[0], window[1]
    results: list[tuple[int, int, list[float]]] = [(0, 0, [])] * threads
    usage0 = resource.getrusage(resource.RUSAGE_SELF)

    def run(t: int) -> None:
        call = callers[t][0]
        count = errors = 0
        lat: list[float] = []
        i = 1
        now = time.monotonic()
        while now < end:
            t0 = now
            try:
                call(i)
            except Exception:
                errors += 1
            now = time.monotonic()
            i += 1
            if t0 >= start and now <= end:
                count += 1
                lat.append(now - t0)
        results[t] = (count, errors, lat)

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    out.put((sum(r[0] for r in results), sum(r[1] for r in results), [x for r in results for x in r[2]], cpu))
    for _, close in callers:
        close()


def run_load(
    kind: str, name: str, addresses: list[str], clients: int, procs: int, seconds: float, pids: dict[str, int]
) -> Result:
    """``clients`` concurrent blocking clients spread over ``procs`` processes for ``seconds``."""
    ctx = mp.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    window = ctx.Array("d", 2)
    per = [clients // procs + (1 if p < clients % procs else 0) for p in range(procs)]
    workers = [
        ctx.Process(target=_load_worker, args=(kind, addresses, n, p + 1, ready, go, window, out), daemon=True)
        for p, n in enumerate(per)
        if n
    ]
    for w in workers:
        w.start()
    try:
        worker_pids = [ready.get(timeout=120) for _ in workers]
        meter = CpuMeter(pids | {f"loadgen{i}": pid for i, pid in enumerate(worker_pids)})
        start = time.monotonic() + 0.05
        window[0], window[1] = start, start + seconds
        meter.start()
        go.set()
        parts = [out.get(timeout=seconds + 120) for _ in workers]
        cores = meter.stop()
    finally:
        for w in workers:
            w.join(30)
            if w.is_alive():
                w.kill()
    loadgen = sum(v for k, v in cores.items() if k.startswith("loadgen"))
    cores = {k: v for k, v in cores.items() if not k.startswith("loadgen") and k != "bench"}
    cores["loadgen"] = loadgen
    return Result(
        name,
        sum(p[0] for p in parts),
        seconds,
        sorted(x for p in parts for x in p[2]),
        cores,
        errors=sum(p[1] for p in parts),
        extra={"clients": clients, "processes": len(workers)},
    )


# --- mqstore -------------------------------------------------------------------------------------------


class MqstoreBench:
    def __init__(self, root: Path, args: argparse.Namespace) -> None:
        from mqstore.testing.cluster import LocalCluster

        self.args = args
        self.cluster = LocalCluster(
            root, ["a", "b", "c"], election_tick=args.election_tick, heartbeat_ms=args.heartbeat_ms, metrics=True
        )
        self.messages = _messages(7, 2048)

    def __enter__(self) -> MqstoreBench:
        self.cluster.bootstrap()
        self.cluster.start_all()
        self.cluster.wait_for_leader(60)
        return self

    def __exit__(self, *exc: object) -> None:
        self.cluster.close()

    def client(self) -> Any:
        from mqstore.client import Client

        return Client(self.cluster.addresses(), timeout=30.0)

    def pids(self) -> dict[str, int]:
        """Node processes named by role: leader, follower1, follower2."""
        leader = self.cluster.wait_for_leader(60)
        out: dict[str, int] = {}
        followers = 0
        for node_id, spec in self.cluster.nodes.items():
            if spec.process is None:
                continue
            if node_id == leader:
                out["leader"] = spec.process.pid
            else:
                followers += 1
                out[f"follower{followers}"] = spec.process.pid
        return out

    def scrape(self, node_id: int) -> dict[str, float]:
        """The node's Prometheus samples, as {'name{label="v",...}': value}."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(self.cluster.metrics_url(node_id), timeout=10) as r:
            text = r.read().decode()
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
        return out

    def check_metrics(self, acked: dict[str, tuple[int, int, int]]) -> dict[str, Any]:
        """Scrape every node once the cluster is quiet and compare the series with what the
        benchmark itself saw: ``acked[case] = (enqueued counter delta on the leader, messages the
        case acknowledged, messages sent outside its timed window)``."""
        leader = self.cluster.wait_for_leader(60)
        nodes = list(self.cluster.nodes)
        deadline = time.monotonic() + 30
        while True:
            m = {i: self.scrape(i) for i in nodes}
            applied = {i: m[i]["mqstore_applied_index"] for i in nodes}
            if len(set(applied.values())) == 1 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        queued = 'mqstore_queue_recipients{namespace="default",state="queued"}'
        lead = m[leader]
        problems = []
        for case, (delta, msgs, outside) in acked.items():
            if not msgs <= delta <= msgs + outside:
                problems.append(f"{case}: enqueued counter rose by {delta:.0f}, the case had {msgs} acknowledged "
                                f"(+ up to {outside} outside its window)")
        for i in nodes:
            if m[i].get(queued) != lead["mqstore_enqueued_messages_total"]:
                problems.append(f"node {i}: {queued} = {m[i].get(queued)}, the leader enqueued "
                                f"{lead['mqstore_enqueued_messages_total']:.0f} one-recipient messages")
            if m[i]["mqstore_fsync_latency_seconds_count"] <= 0:
                problems.append(f"node {i}: no fsync observed")
            if m[i]["mqstore_term"] != lead["mqstore_term"]:
                problems.append(f"node {i}: term {m[i]['mqstore_term']}, the leader's {lead['mqstore_term']}")
        lags = {k: v for k, v in lead.items() if k.startswith("mqstore_replication_lag_entries")}
        if len(lags) != len(nodes) - 1 or any(v != 0 for v in lags.values()):
            problems.append(f"replication lag once quiet: {lags}")
        if sum(m[i]["mqstore_is_leader"] for i in nodes) != 1:
            problems.append("not exactly one node reports mqstore_is_leader 1")
        writes = sum(v for k, v in lead.items() if k.startswith("mqstore_commit_latency_seconds_count"))
        summary = {
            "leader": leader,
            "enqueued_total": lead["mqstore_enqueued_messages_total"],
            "queued_per_node": {i: m[i].get(queued) for i in nodes},
            "applied_index": applied,
            "fsyncs_per_node": {i: m[i]["mqstore_fsync_latency_seconds_count"] for i in nodes},
            "fsync_mean_ms": {i: 1e3 * m[i]["mqstore_fsync_latency_seconds_sum"]
                              / max(1.0, m[i]["mqstore_fsync_latency_seconds_count"]) for i in nodes},
            "commit_latency_observations": writes,
            "commit_latency_mean_ms": 1e3 * sum(v for k, v in lead.items()
                                                if k.startswith("mqstore_commit_latency_seconds_sum"))
            / max(1.0, writes),
            "replication_lag": lags,
            "disk_used_bytes": {i: m[i]["mqstore_disk_used_bytes"] for i in nodes},
            "cases": {k: {"counter_delta": d, "acknowledged": n} for k, (d, n, _) in acked.items()},
            "problems": problems,
        }
        return summary

    def _msg(self, i: int) -> dict[str, Any]:
        return {"mail_from": SENDER, "recipients": [_recipient(i)], "data": self.messages[i % len(self.messages)]}

    def warm_up(self) -> None:
        with self.client() as c:
            for i in range(20):
                c.enqueue(SENDER, [_recipient(i)], self.messages[i])
            c.enqueue_many([self._msg(i) for i in range(BATCH)])

    def sequential(self, seconds: float) -> Result:
        with self.client() as c:
            c.enqueue(SENDER, [_recipient(0)], self.messages[0])
            meter = CpuMeter(self.pids()).start()
            lat: list[float] = []
            i = 0
            start = time.monotonic()
            end = start + seconds
            now = start
            while now < end:
                t0 = now
                c.enqueue(SENDER, [_recipient(i)], self.messages[i % len(self.messages)])
                now = time.monotonic()
                lat.append(now - t0)
                i += 1
            cores = meter.stop()
        return Result("mqstore seq enqueue", i, now - start, sorted(lat), cores)

    def concurrent(self, seconds: float) -> Result:
        return run_load(
            "mqstore",
            f"mqstore {self.args.clients} clients enqueue",
            self.cluster.addresses(),
            self.args.clients,
            self.args.procs,
            seconds,
            self.pids(),
        )

    def stream(self, seconds: float) -> Result:
        taken: list[float] = []
        lat: list[float] = []
        with self.client() as c:
            c.enqueue(SENDER, [_recipient(0)], self.messages[0])
            meter = CpuMeter(self.pids()).start()
            start = time.monotonic()
            end = start + seconds

            def source() -> Iterator[dict[str, Any]]:
                i = 0
                while time.monotonic() < end:
                    taken.append(time.monotonic())
                    yield self._msg(i)
                    i += 1

            n = 0
            now = start
            for _ in c.enqueue_stream(source()):
                now = time.monotonic()
                lat.append(now - taken[n])
                n += 1
            cores = meter.stop()
        return Result("mqstore stream", n, now - start, sorted(lat), cores)

    def batched(self, seconds: float) -> Result:
        with self.client() as c:
            c.enqueue(SENDER, [_recipient(0)], self.messages[0])
            meter = CpuMeter(self.pids()).start()
            lat: list[float] = []
            n = 0
            start = time.monotonic()
            end = start + seconds
            now = start
            while now < end:
                batch = [self._msg(n + j) for j in range(BATCH)]
                t0 = time.monotonic()
                c.enqueue_many(batch)
                now = time.monotonic()
                lat.append(now - t0)
                n += BATCH
            cores = meter.stop()
        return Result(f"mqstore batch {BATCH} (per call)", n, now - start, sorted(lat), cores)

    # --- failover --------------------------------------------------------------------------------

    def _probe(self, addresses: list[str], t_kill: float, found: dict[str, float], stop: threading.Event) -> None:
        """Call Enqueue on each surviving node directly (no client retry logic) until one stores it."""
        from mqstore.proto import queue_pb2, queue_pb2_grpc

        channels = [grpc.insecure_channel(a, options=_grpc_options()) for a in addresses]
        stubs = [queue_pb2_grpc.QueueStub(ch) for ch in channels]
        try:
            while not stop.is_set():
                for stub in stubs:
                    request = queue_pb2.EnqueueRequest(
                        message=queue_pb2.NewMessage(
                            mail_from=SENDER,
                            recipients=[_recipient(1)],
                            data=self.messages[1],
                            namespace="default",
                            idempotency_key=uuid.uuid4().hex,
                        )
                    )
                    try:
                        stub.Enqueue(request, timeout=0.5)
                    except grpc.RpcError:
                        continue
                    found["probe"] = time.monotonic() - t_kill
                    return
                time.sleep(0.01)
        finally:
            for ch in channels:
                ch.close()

    def failover_once(self) -> dict[str, float]:
        cluster = self.cluster
        leader = cluster.wait_for_leader(60)
        survivors = [n for n in cluster.nodes if n != leader]
        with self.client() as c:
            c.enqueue(SENDER, [_recipient(0)], self.messages[0])  # the client knows the leader
            found: dict[str, float] = {}
            stop = threading.Event()
            t_kill = time.monotonic()
            cluster.kill(leader)
            probe = threading.Thread(
                target=self._probe, args=(cluster.addresses(survivors), t_kill, found, stop), daemon=True
            )
            probe.start()
            try:
                c.enqueue(SENDER, [_recipient(2)], self.messages[2])
                found["client"] = time.monotonic() - t_kill
            except Exception as exc:
                found["client"] = float("nan")
                print(f"  failover: the client's write failed: {exc}", file=sys.stderr)
            probe.join(30)
            stop.set()
        new_leader = cluster.wait_for_leader(60, among=survivors)
        # Bring the killed node back and let it catch up before the next round.
        cluster.start(leader)
        target = (cluster.status(new_leader) or {}).get("commit_index", 0)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            st = cluster.status(leader)
            if st is not None and st.get("applied_index", 0) >= target:
                break
            time.sleep(0.1)
        found["caught_up"] = time.monotonic() - t_kill
        return found


def bench_mqstore(root: Path, args: argparse.Namespace, report: dict[str, Any]) -> dict[str, Result]:
    results: dict[str, Result] = {}
    t0 = time.monotonic()
    with MqstoreBench(root / "mqstore", args) as mq:
        print(f"mqstore: 3 nodes up (sites a, b, c) in {time.monotonic() - t0:.1f} s", flush=True)
        mq.warm_up()
        s = args.seconds
        cases: dict[str, Callable[[], Result]] = {
            "seq": lambda: mq.sequential(s),
            "c64": lambda: mq.concurrent(s),
            "stream": lambda: mq.stream(s),
            "batch256": lambda: mq.batched(s),
        }
        acked: dict[str, tuple[int, int, int]] = {}
        enqueued = "mqstore_enqueued_messages_total"
        for key, fn in cases.items():
            if key not in args.cases:
                continue
            leader = mq.cluster.wait_for_leader(60)
            before = mq.scrape(leader)[enqueued]
            runs = [fn() for _ in range(args.runs)]
            # one untimed enqueue per run (connecting); c64: calls straddling the window
            outside = args.runs * (4 * args.clients if key == "c64" else 1)
            acked[key] = (int(mq.scrape(leader)[enqueued] - before), sum(r.msgs for r in runs), outside)
            results[key] = median_result(runs)
            print("  " + results[key].line(), flush=True)
            if args.profile:
                with Profiler(mq.pids(), Path(args.profile), key) as prof:
                    fn()
                print(f"  profile of an extra {key} run (py-spy, {args.profile}):\n{prof.summary()}", flush=True)
        if acked:
            seen = mq.check_metrics(acked)
            report["metrics"] = seen
            print(
                f"  metrics (Prometheus, scraped from each node): leader enqueued "
                f"{seen['enqueued_total']:.0f}; queued per node {seen['queued_per_node']}; fsyncs per node "
                f"{seen['fsyncs_per_node']} (mean ms {_round(seen['fsync_mean_ms'])}); commit latency mean "
                f"{seen['commit_latency_mean_ms']:.1f} ms over {seen['commit_latency_observations']:.0f} writes; "
                f"lag {seen['replication_lag']}",
                flush=True,
            )
            print("  metrics check: " + ("ok (counters match what the benchmark saw)" if not seen["problems"]
                                         else "PROBLEMS: " + "; ".join(seen["problems"])), flush=True)
        if "failover" in args.cases and args.failovers > 0:
            rounds = []
            for _ in range(args.failovers):
                rounds.append(mq.failover_once())
                r = rounds[-1]
                print(
                    f"  leader kill -> probe write served {r.get('probe', float('nan')):.2f} s, "
                    f"Client.enqueue served {r['client']:.2f} s (killed node back in sync after "
                    f"{r['caught_up']:.1f} s)",
                    flush=True,
                )
            probe = statistics.median(r.get("probe", float("nan")) for r in rounds)
            client = statistics.median(r["client"] for r in rounds)
            report["failover"] = {"rounds": rounds, "probe_median_s": probe, "client_median_s": client}
            print(f"  failover median of {len(rounds)}: probe {probe:.2f} s, client {client:.2f} s", flush=True)
    return results


# --- NATS JetStream --------------------------------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    from mqstore.testing.cluster import free_port

    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return list(ports)


class Processes:
    """Server processes started by the benchmark, killed on exit."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], log: Path) -> None:
        with log.open("ab") as out:
            self.procs[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def pids(self) -> dict[str, int]:
        return {k: p.pid for k, p in self.procs.items()}

    def check(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}")

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


def start_nats(root: Path, procs: Processes) -> list[str]:
    ports = _free_ports(6)
    client_ports, route_ports = ports[:3], ports[3:]
    for i in range(3):
        store = root / f"nats{i + 1}"
        store.mkdir(parents=True)
        routes = ", ".join(f'"nats-route://127.0.0.1:{p}"' for j, p in enumerate(route_ports) if j != i)
        conf = root / f"nats{i + 1}.conf"
        conf.write_text(
            f'server_name: "n{i + 1}"\n'
            f"listen: 127.0.0.1:{client_ports[i]}\n"
            f"max_payload: 1048576\n"
            f'jetstream {{\n  store_dir: "{store}"\n  max_file_store: 20G\n  max_memory_store: 256M\n}}\n'
            f'cluster {{\n  name: "bench"\n  listen: 127.0.0.1:{route_ports[i]}\n  routes: [{routes}]\n}}\n'
        )
        procs.start(f"nats{i + 1}", ["nats-server", "-c", str(conf)], root / f"nats{i + 1}.log")
    return [f"nats://127.0.0.1:{p}" for p in client_ports]


async def _quiet(exc: Exception) -> None:
    """nats-py's error callback (its default logs every refused connection with a traceback)."""


async def _nats_connect(urls: list[str], **options: Any) -> Any:
    import nats

    return await nats.connect(servers=urls, error_cb=_quiet, **options)


def wait_for_ports(addresses: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for address in addresses:
        host, _, port = address.rpartition("/")[2].rpartition(":")
        while True:
            try:
                with socket.create_connection((host, int(port)), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"nothing listens on {address}") from None
                time.sleep(0.1)


async def _nats_setup(urls: list[str], subject: str, stream: str, timeout: float) -> None:
    from nats.js.api import StorageType, StreamConfig

    deadline = time.monotonic() + timeout
    nc = await _nats_connect(urls, connect_timeout=2, max_reconnect_attempts=-1)
    try:
        js = nc.jetstream(timeout=5)
        config = StreamConfig(name=stream, subjects=[subject], storage=StorageType.FILE, num_replicas=3)
        while True:
            try:
                await js.add_stream(config)
                await js.publish(subject, b"hello", timeout=5)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
    finally:
        await nc.close()


async def _nats_purge(urls: list[str], stream: str) -> None:
    nc = await _nats_connect(urls)
    try:
        await nc.jetstream(timeout=30).purge_stream(stream)
    finally:
        await nc.close()


async def _nats_publish(
    urls: list[str], subject: str, mode: str, seed: int, ready: Any, go: Any, window: Any
) -> tuple[int, int, list[float], float]:
    messages = _messages(seed, 64)
    nc = await _nats_connect(urls, pending_size=64 * 1024 * 1024)
    js = nc.jetstream(timeout=30, publish_async_max_pending=NATS_MAX_PENDING)
    await js.publish(subject, messages[0])  # connect and warm up before the clock starts
    ready.put(os.getpid())
    while not go.is_set():
        await asyncio.sleep(0.001)
    start, end = window[0], window[1]
    lat: list[float] = []
    counted = [0, 0]  # acks in the window, errors
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    i = 0
    if mode == "sync":
        now = time.monotonic()
        while now < end:
            t0 = now
            try:
                await js.publish(subject, messages[i % 64])
            except Exception:
                counted[1] += 1
            now = time.monotonic()
            i += 1
            if t0 >= start and now <= end:
                counted[0] += 1
                lat.append(now - t0)
    else:

        def acked(t0: float, fut: asyncio.Future[Any]) -> None:
            now = time.monotonic()
            if fut.cancelled() or fut.exception() is not None:
                counted[1] += 1
            elif t0 >= start and now <= end:
                counted[0] += 1
                lat.append(now - t0)

        while time.monotonic() < end:
            t0 = time.monotonic()
            fut = await js.publish_async(subject, messages[i % 64])
            fut.add_done_callback(lambda f, t0=t0: acked(t0, f))
            i += 1
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(js.publish_async_completed(), 30)
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    await nc.close()
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    return counted[0], counted[1], lat, cpu


def _nats_worker(
    urls: list[str], subject: str, mode: str, seed: int, ready: Any, go: Any, window: Any, out: Any
) -> None:
    out.put(asyncio.run(_nats_publish(urls, subject, mode, seed, ready, go, window)))


def run_nats_load(
    name: str, urls: list[str], subject: str, mode: str, nprocs: int, seconds: float, pids: dict[str, int]
) -> Result:
    ctx = mp.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    window = ctx.Array("d", 2)
    workers = [
        ctx.Process(target=_nats_worker, args=(urls, subject, mode, p + 1, ready, go, window, out), daemon=True)
        for p in range(nprocs)
    ]
    for w in workers:
        w.start()
    try:
        worker_pids = [ready.get(timeout=120) for _ in workers]
        meter = CpuMeter(pids)
        start = time.monotonic() + 0.05
        window[0], window[1] = start, start + seconds
        meter.start()
        go.set()
        parts = [out.get(timeout=seconds + 120) for _ in workers]
        cores = meter.stop({"loadgen": sum(p[3] for p in parts)})
    finally:
        for w in workers:
            w.join(30)
            if w.is_alive():
                w.kill()
    cores.pop("bench", None)
    del worker_pids
    return Result(
        name,
        sum(p[0] for p in parts),
        seconds,
        sorted(x for p in parts for x in p[2]),
        cores,
        errors=sum(p[1] for p in parts),
        extra={"processes": nprocs},
    )


def bench_nats(root: Path, args: argparse.Namespace) -> dict[str, Result]:
    results: dict[str, Result] = {}
    procs = Processes()
    subject, stream = "bench.mail", "BENCH"
    try:
        t0 = time.monotonic()
        urls = start_nats(root / "nats", procs)
        wait_for_ports(urls, 30)
        asyncio.run(_nats_setup(urls, subject, stream, 60))
        procs.check()
        print(f"NATS JetStream: 3 servers up, stream R3 on file storage, in {time.monotonic() - t0:.1f} s", flush=True)
        s = args.seconds
        cases: dict[str, Callable[[], Result]] = {
            "async": lambda: run_nats_load(
                f"NATS R3 async publish x{args.nats_procs}", urls, subject, "async", args.nats_procs, s, procs.pids()
            ),
            "sync": lambda: run_nats_load("NATS R3 sync publish", urls, subject, "sync", 1, s, procs.pids()),
        }
        for key, fn in cases.items():
            runs = []
            for _ in range(args.runs):
                runs.append(fn())
                asyncio.run(_nats_purge(urls, stream))
            results[key] = median_result(runs)
            print("  " + results[key].line(), flush=True)
    finally:
        procs.close()
    return results


# --- etcd --------------------------------------------------------------------------------------------


def start_etcd(root: Path, procs: Processes) -> list[str]:
    ports = _free_ports(6)
    client_ports, peer_ports = ports[:3], ports[3:]
    initial = ",".join(f"e{i + 1}=http://127.0.0.1:{p}" for i, p in enumerate(peer_ports))
    for i in range(3):
        data = root / f"etcd{i + 1}"
        data.mkdir(parents=True)
        argv = [
            "etcd",
            f"--name=e{i + 1}",
            f"--data-dir={data}",
            f"--listen-client-urls=http://127.0.0.1:{client_ports[i]}",
            f"--advertise-client-urls=http://127.0.0.1:{client_ports[i]}",
            f"--listen-peer-urls=http://127.0.0.1:{peer_ports[i]}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_ports[i]}",
            f"--initial-cluster={initial}",
            "--initial-cluster-state=new",
            "--initial-cluster-token=mqstore-bench",
            "--logger=zap",
            "--log-level=warn",
            "--quota-backend-bytes=8589934592",
        ]
        procs.start(f"etcd{i + 1}", argv, root / f"etcd{i + 1}.log")
    return [f"127.0.0.1:{p}" for p in client_ports]


def _etcd_status(address: str) -> dict[str, Any]:
    """Maintenance.Status through etcd's HTTP/JSON gateway (setup only, never timed)."""
    request = urllib.request.Request(f"http://{address}/v3/maintenance/status", data=b"{}", method="POST")
    with urllib.request.urlopen(request, timeout=2) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


def etcd_leader(addresses: list[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        for address in addresses:
            try:
                st = _etcd_status(address)
            except OSError:
                continue
            if st.get("leader") and st["leader"] == st.get("header", {}).get("member_id"):
                return address
        if time.monotonic() > deadline:
            raise TimeoutError("no etcd leader")
        time.sleep(0.2)


def etcd_sequential(address: str, seconds: float, pids: dict[str, int]) -> Result:
    call, close = _etcd_caller([address], 99)
    try:
        call(0)
        meter = CpuMeter(pids).start()
        lat: list[float] = []
        i = 1
        start = time.monotonic()
        end = start + seconds
        now = start
        while now < end:
            t0 = now
            call(i)
            now = time.monotonic()
            lat.append(now - t0)
            i += 1
        cores = meter.stop()
    finally:
        close()
    return Result("etcd seq put", len(lat), now - start, sorted(lat), cores)


def bench_etcd(root: Path, args: argparse.Namespace) -> dict[str, Result]:
    results: dict[str, Result] = {}
    procs = Processes()
    try:
        t0 = time.monotonic()
        addresses = start_etcd(root / "etcd", procs)
        leader = etcd_leader(addresses, 60)
        procs.check()
        print(f"etcd: 3 members up in {time.monotonic() - t0:.1f} s (clients call the leader)", flush=True)
        s = args.seconds
        cases: dict[str, Callable[[], Result]] = {
            "c64": lambda: run_load(
                "etcd", f"etcd {args.clients} clients put", [leader], args.clients, args.procs, s, procs.pids()
            ),
            "seq": lambda: etcd_sequential(leader, s, procs.pids()),
        }
        for key, fn in cases.items():
            results[key] = median_result([fn() for _ in range(args.runs)])
            print("  " + results[key].line(), flush=True)
    finally:
        procs.close()
    return results


# --- the floor: a Python gRPC server that does no work ----------------------------------------------

FLOOR_ROUND_S = 0.002


def _floor_rounds(pending: list[Any], lock: threading.Lock) -> None:
    """Answer every waiting call each FLOOR_ROUND_S, as the Raft thread answers a round's callers."""
    while True:
        time.sleep(FLOOR_ROUND_S)
        with lock:
            due = pending[:]
            pending.clear()
        for answer in due:
            answer(b"")


def _floor_server(mode: str, workers: int, port_out: Any) -> None:
    """One process: a gRPC server whose only method stores nothing and answers each call when the
    next round ends. ``sync`` is the thread-pool server mqstore's nodes run (same worker count);
    ``aio`` is grpc.aio's asyncio server."""
    from concurrent import futures

    pending: list[Any] = []
    lock = threading.Lock()
    threading.Thread(target=_floor_rounds, args=(pending, lock), daemon=True).start()
    service, name = FLOOR_METHOD.strip("/").split("/")
    if mode == "sync":

        def handle(request: bytes, context: Any) -> bytes:
            done: futures.Future[bytes] = futures.Future()
            with lock:
                pending.append(done.set_result)
            return done.result()

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            service, {name: grpc.unary_unary_rpc_method_handler(handle)})])
        port_out.put(server.add_insecure_port("127.0.0.1:0"))
        server.start()
        server.wait_for_termination()
        return

    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def handle(request: bytes, context: Any) -> bytes:
            done: asyncio.Future[bytes] = loop.create_future()

            def answer(value: bytes) -> None:
                loop.call_soon_threadsafe(done.set_result, value)

            with lock:
                pending.append(answer)
            return await done

        server = grpc.aio.server()
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            service, {name: grpc.unary_unary_rpc_method_handler(handle)})])
        port_out.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def bench_floor(args: argparse.Namespace) -> dict[str, Result]:
    """The 64-client load against a server that does no work: the most calls/s a Python gRPC
    server on this machine serves for one blocking call per message (a reference, not a peer)."""
    from mqstore import limits

    results: dict[str, Result] = {}
    ctx = mp.get_context("spawn")
    for mode in ("sync", "aio"):
        port_out = ctx.Queue()
        server = ctx.Process(target=_floor_server, args=(mode, limits.SERVER_THREADS_DEFAULT, port_out), daemon=True)
        server.start()
        try:
            address = f"127.0.0.1:{port_out.get(timeout=60)}"
            assert server.pid is not None
            pids = {"server": server.pid}
            name = f"{mode} gRPC server, no work, {args.clients} clients"
            results[mode] = median_result([
                run_load("floor", name, [address], args.clients, args.procs, args.seconds, pids)
                for _ in range(args.runs)
            ])
            print("  " + results[mode].line(), flush=True)
        finally:
            server.kill()
            server.join(10)
    return results


# --- finding or installing the peers ---------------------------------------------------------------------

_DEBIAN = {"nats": ("nats-server", "nats-server"), "etcd": ("etcd", "etcd-server")}


def ensure_peers(wanted: list[str], install: bool) -> dict[str, str]:
    """Which peers can run: name -> "" if ready, else the reason it cannot."""
    status: dict[str, str] = {}
    missing = [pkg for name, (exe, pkg) in _DEBIAN.items() if name in wanted and shutil.which(exe) is None]
    if missing and install and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"installing {' '.join(missing)} with apt-get ...", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
        if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True)
            subprocess.run(cmd, env=env, capture_output=True)
    for name, (exe, pkg) in _DEBIAN.items():
        if name not in wanted:
            continue
        path = shutil.which(exe)
        status[name] = "" if path else f"{exe} not found (apt-get install {pkg}{'' if install else '; or --install'})"
    if "nats" in wanted and not status["nats"]:
        try:
            import nats
        except ImportError:
            if install:
                print("installing nats-py with pip ...", flush=True)
                subprocess.run([sys.executable, "-m", "pip", "install", "-q", "nats-py"], check=False)
            try:
                import nats  # noqa: F401
            except ImportError:
                status["nats"] = "the nats-py client is missing (pip install -e '.[bench]')"
    return status


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return "?"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "?"


# --- main ----------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mqstore import codec

    root = Path(tempfile.mkdtemp(prefix="mqstore-bench-cluster-", dir=args.dir))
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "codec": codec.IMPLEMENTATION},
        "settings": {
            "runs": args.runs,
            "seconds": args.seconds,
            "procs": args.procs,
            "nats_procs": args.nats_procs,
            "election_tick": args.election_tick,
            "heartbeat_ms": args.heartbeat_ms,
        },
        "peers": {},
        "results": {},
        "ratios": {},
    }
    busy, busiest = other_load()
    report["machine"]["busy_before_start_cores"] = busy
    if busy > 0.25:
        print(
            f"WARNING: the machine is already busy ({busy:.2f} of {os.cpu_count()} cores) before the benchmark "
            "starts: its figures are NOT representative. Busiest processes:",
            flush=True,
        )
        for used, what in busiest:
            print(f"  {used:.2f} cores  {what}", flush=True)
    if args.profile and Profiler.executable() is None:
        print("--profile needs py-spy (pip install py-spy): profiling is off", flush=True)
        args.profile = None
    peers = [p for p in ("nats", "etcd") if p not in args.skip]
    status = ensure_peers(peers, args.install)
    for name in peers:
        if status[name]:
            print(f"peer {name}: CANNOT RUN: {status[name]}", flush=True)
        else:
            exe = _DEBIAN[name][0]
            print(f"peer {name}: {_version([exe, '--version'])} ({shutil.which(exe)})", flush=True)
        report["peers"][name] = status[name] or "ran"
    print(
        f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, codec {codec.IMPLEMENTATION}; "
        f"{args.runs} run(s) x {args.seconds:g} s per case; load generator {args.procs} processes",
        flush=True,
    )
    results: dict[str, Result] = {}
    try:
        if "mqstore" not in args.skip:
            for k, r in bench_mqstore(root, args, report).items():
                results[f"mqstore_{k}"] = r
        if "floor" not in args.skip and "c64" in args.cases:
            print("floor: the 64-client load against a Python gRPC server that does no work", flush=True)
            for k, r in bench_floor(args).items():
                results[f"floor_{k}"] = r
        for name, fn in (("nats", bench_nats), ("etcd", bench_etcd)):
            if name in peers and not status[name]:
                try:
                    for k, r in fn(root, args).items():
                        results[f"{name}_{k}"] = r
                except Exception as exc:
                    print(f"peer {name}: FAILED: {exc!r}", flush=True)
                    report["peers"][name] = f"failed: {exc!r}"
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report["results"] = {k: r.summary() for k, r in results.items()}

    def ratio(a: str, b: str) -> float | None:
        if a in results and b in results and results[b].rate > 0:
            return results[a].rate / results[b].rate
        return None

    ratios = {
        "mqstore stream / NATS R3 async (target >= 1.0)": ratio("mqstore_stream", "nats_async"),
        "mqstore batch256 / NATS R3 async (target >= 1.0)": ratio("mqstore_batch256", "nats_async"),
        f"mqstore {args.clients} clients / etcd {args.clients} clients"
        + (" (target >= 1.0)" if args.clients == CLIENTS else " (reference)"): ratio("mqstore_c64", "etcd_c64"),
        f"mqstore {args.clients} clients / sync gRPC floor (reference)": ratio("mqstore_c64", "floor_sync"),
        f"etcd {args.clients} clients / sync gRPC floor (reference)": ratio("etcd_c64", "floor_sync"),
        "aio gRPC floor / sync gRPC floor (reference)": ratio("floor_aio", "floor_sync"),
        "mqstore seq / etcd seq (reference)": ratio("mqstore_seq", "etcd_seq"),
        "mqstore seq / NATS R3 sync (reference)": ratio("mqstore_seq", "nats_sync"),
    }
    print("\nsummary", flush=True)
    for k, r in results.items():
        print(f"  {k:18s} {r.rate:10,.0f} msg/s  p50 {r.pct_ms(0.5):8.2f} ms  p99 {r.pct_ms(0.99):8.2f} ms")
    for name, value in ratios.items():
        shown = f"{value:6.2f}" if value is not None else "   n/a (peer not run)"
        print(f"  ratio {name:58s} {shown}")
    if "failover" in report:
        f = report["failover"]
        verdict = "meets 3 s" if f["probe_median_s"] <= 3 else "MISSES 3 s"
        goal = "meets" if f["probe_median_s"] <= 1 else "misses"
        print(
            f"  leader kill -> writes served again: {f['probe_median_s']:.2f} s (probe), "
            f"{f['client_median_s']:.2f} s (Client)  [target <= 3 s: {verdict}; goal 1 s: {goal}]"
        )
    report["ratios"] = ratios
    return report



def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs per case; the median is reported")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each timed case")
    parser.add_argument("--failovers", type=int, default=3, help="leader kills (median reported)")
    parser.add_argument("--procs", type=int, default=4, help="load-generator processes for the 64 clients")
    parser.add_argument(
        "--clients",
        type=int,
        default=CLIENTS,
        help="concurrent clients of the c64 case (mqstore and etcd alike; the targets are for 64)",
    )
    parser.add_argument("--nats-procs", type=int, default=1, help="NATS async publisher processes")
    parser.add_argument("--election-tick", type=int, default=10, help="mqstore election timeout in heartbeats")
    parser.add_argument("--heartbeat-ms", type=int, default=100, help="mqstore heartbeat interval")
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["seq", "c64", "stream", "batch256", "failover"],
        help="mqstore cases to run",
    )
    parser.add_argument("--skip", nargs="*", default=[], choices=["mqstore", "nats", "etcd", "floor"],
                        help="systems to skip (floor: the no-work gRPC servers of the c64 reference)")
    parser.add_argument(
        "--install",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="apt-get install nats-server / etcd-server (as root) and pip install nats-py when missing",
    )
    parser.add_argument("--quick", action="store_true", help="one run of 2 s per case, one failover (smoke test)")
    parser.add_argument("--dir", default=os.environ.get("MQSTORE_BENCH_DIR"), help="where to put the data dirs")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="after each mqstore case, run it once more under py-spy (node processes) and summarise",
    )
    args = parser.parse_args()
    if args.clients < 1 or args.procs < 1:
        parser.error("--clients and --procs must be at least 1")
    if args.quick:
        args.runs, args.seconds, args.failovers = 1, 2.0, 1
    report = run(args)
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
