"""Benchmark: the queue's lifecycle (enqueue -> lease -> ack) with durable commits, and lease
latency against queue size.

1. Lifecycle of 2 KiB email-like messages (one recipient each), every step a durable commit,
   measured in the same run and on the same disk as the baseline:

     mqstore, 1 caller:  enqueue, lease(max_messages=1), ack per message      (3 commits / message)
     mqstore, batched:   enqueue_many(256), lease(max_messages=256), ack_many  (3 commits / 256)
     persist-queue (baseline): SQLiteAckQueue(path, auto_commit=True, multithreading=False),
         put -> get -> ack per message (3 commits / message), once as it comes (acked rows stay
         in its table, and every get scans past them from the start) and once calling
         clear_acked_data(keep_latest=0) every 100 messages (timed too); the faster of the two is
         the baseline. Also its put alone.

   persist-queue uses SQLite in WAL mode; its synchronous setting is read back and printed (SQLite's
   default FULL syncs the WAL on every commit; anything weaker is raised to FULL so the baseline
   is as durable as mqstore, and the output says so).

   The floor: the batched lifecycle's rows and crypto done by raw py-lmdb, zstandard and
   cryptography with no queue logic (see ``bench_floor``): what any Python implementation of this
   design pays at least, so floor / persist-queue is the best ratio the machine allows.

2. Lease latency against queue size: stores holding 1,000 and 1,000,000 (``--big``) queued 200-byte
   messages, built with enqueue_many(4096) and reopened; then ``--iterations`` times per store
   (after 20 warm-up rounds) lease(max_messages=1) and ack that lease, with the real clock (every
   message is due). The two stores take turns in blocks of 50 rounds, so disk or host noise hits
   both alike. The lease call's latency is reported on its own and with the ack.

Targets: batched mqstore lifecycle >= 10 x persist-queue lifecycle; lease p50 at 1M <= 2 x at 1K.

Lifecycle cases run ``--runs`` times (default 3; the median by rate is reported); the big-queue
case runs once.

Run:  python benchmarks/bench_queue.py              (about 1 minute on 2 cores; the 1M build takes ~30 s)
      python benchmarks/bench_queue.py --quick      (1/10 counts, one run, 100k queue: a smoke test)
      python benchmarks/bench_queue.py --big 300000 --json out.json

The baseline needs persist-queue (``pip install 'mqstore[bench]'``); without it it is skipped.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sqlite3
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mqstore
from mqstore import codec
from mqstore.crypto import create_key_file
from mqstore.testing.figures import write_json
from mqstore.testing.mail import MailFactory

try:
    import persistqueue
except ImportError:  # the baseline is optional: pip install 'mqstore[bench]'
    persistqueue = None  # type: ignore[assignment]

WORKER = "bench"
BATCH = 256
BUILD_BATCH = 4096
SMALL_QUEUE = 1_000
SMALL_BODY = 200
WARMUP = 20
LEASE_BLOCK = 50  # lease rounds per turn when the queue sizes take turns
PQ_CLEAR_EVERY = 100
SQLITE_SYNC_NAMES = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}

Mail = tuple[str, list[str], bytes]
U64_BE = struct.Struct(">Q")


class Result:
    """A case's throughput and latencies; ``unit`` is what one latency sample covers."""

    def __init__(
        self,
        name: str,
        msgs: int,
        seconds: float,
        latencies: list[float],
        *,
        unit: str = "msg",
        commits: int = 0,
        ops: dict[str, list[float]] | None = None,
    ) -> None:
        self.name = name
        self.msgs = msgs
        self.seconds = seconds
        self.latencies = sorted(latencies)
        self.unit = unit
        self.commits = commits
        self.ops = {k: sorted(v) for k, v in (ops or {}).items()}

    @property
    def rate(self) -> float:
        return self.msgs / self.seconds

    def pct(self, q: float, op: str | None = None) -> float:
        """The ``q`` quantile in µs, of the whole unit or of one operation."""
        return _pct(self.latencies if op is None else self.ops[op], q)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "msgs": self.msgs,
            "seconds": self.seconds,
            "msgs_per_s": self.rate,
            "latency_unit": self.unit,
            "p50_us": self.pct(0.5),
            "p99_us": self.pct(0.99),
            "commits": self.commits,
            "ops": {op: {"p50_us": self.pct(0.5, op), "p99_us": self.pct(0.99, op)} for op in self.ops},
        }


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))] * 1e6


def median_result(runs: list[Result]) -> Result:
    ordered = sorted(runs, key=lambda r: r.rate)
    return ordered[len(ordered) // 2]


def make_mail(count: int, size: int, seed: int) -> list[Mail]:
    factory = MailFactory(seed=seed)
    out = []
    for _ in range(count):
        sender, rcpt = factory.address(), factory.address()
        out.append((sender, [rcpt], factory.message(size, recipients=[rcpt], sender=sender)))
    return out


# --- mqstore ----------------------------------------------------------------------------------------


def _new_store_dir(workdir: Path) -> tuple[Path, Path]:
    base = Path(tempfile.mkdtemp(dir=workdir))
    return base / "store", create_key_file(base / "bench.key")


def _open(path: Path, key: Path) -> mqstore.Store:
    return mqstore.open(path, key_file=key, background=False)


def bench_mq_single(workdir: Path, mail: list[Mail], count: int) -> Result:
    path, key = _new_store_dir(workdir)
    store = _open(path, key)
    enq: list[float] = []
    lease: list[float] = []
    ack: list[float] = []
    total: list[float] = []
    n = len(mail)
    commits0 = store.log.commits
    start = time.perf_counter()
    for i in range(count):
        sender, rcpts, data = mail[i % n]
        t0 = time.perf_counter()
        mid = store.enqueue(sender, rcpts, data)
        t1 = time.perf_counter()
        leases = store.lease(WORKER, max_messages=1)
        t2 = time.perf_counter()
        store.ack(leases[0].token)
        t3 = time.perf_counter()
        if len(leases) != 1 or leases[0].message_id != mid:
            raise AssertionError(f"leased {[x.message_id for x in leases]}, expected [{mid}]")
        enq.append(t1 - t0)
        lease.append(t2 - t1)
        ack.append(t3 - t2)
        total.append(t3 - t0)
    elapsed = time.perf_counter() - start
    commits = store.log.commits - commits0
    store.close()
    shutil.rmtree(path.parent)
    return Result(
        "mqstore 1 caller, 1 msg/call",
        count,
        elapsed,
        total,
        commits=commits,
        ops={"enqueue": enq, "lease": lease, "ack": ack},
    )


def bench_mq_batched(workdir: Path, mail: list[Mail], batches: int, regulated: bool = False) -> Result:
    """The batched lifecycle; ``regulated``: in a COMPLIANCE-mode namespace, where every enqueue,
    lease and ack also writes a hash-chained audit record (HMAC'd recipients) in its transaction."""
    path, key = _new_store_dir(workdir)
    store = _open(path, key)
    ns = "regulated" if regulated else "default"
    if regulated:
        store.set_policy(ns, mode="compliance", retention_days=1)
    n = len(mail)
    requests = [
        [
            {"mail_from": s, "recipients": r, "data": d, "namespace": ns}
            for s, r, d in (mail[(b * BATCH + j) % n] for j in range(BATCH))
        ]
        for b in range(batches)
    ]
    enq: list[float] = []
    lease: list[float] = []
    ack: list[float] = []
    total: list[float] = []
    commits0 = store.log.commits
    start = time.perf_counter()
    for batch in requests:
        t0 = time.perf_counter()
        ids = store.enqueue_many(batch)
        t1 = time.perf_counter()
        leases = store.lease(WORKER, max_messages=BATCH, namespace=ns)
        t2 = time.perf_counter()
        store.ack_many([x.token for x in leases])
        t3 = time.perf_counter()
        if len(leases) != BATCH or {x.message_id for x in leases} != set(ids):
            raise AssertionError(f"leased {len(leases)} messages, not the {BATCH} just enqueued")
        enq.append(t1 - t0)
        lease.append(t2 - t1)
        ack.append(t3 - t2)
        total.append(t3 - t0)
    elapsed = time.perf_counter() - start
    commits = store.log.commits - commits0
    store.close()
    shutil.rmtree(path.parent)
    return Result(
        f"mqstore batched, {BATCH}/call" + (", COMPLIANCE namespace (audited)" if regulated else ""),
        batches * BATCH,
        elapsed,
        total,
        unit=f"batch of {BATCH}",
        commits=commits,
        ops={"enqueue_many": enq, "lease": lease, "ack_many": ack},
    )


# --- the floor: the same rows and crypto with no queue logic ------------------------------------------

#: The tables the floor writes: the log and the state tables one message's lifecycle touches in
#: mqstore (see mqstore/queue/model.py).
FLOOR_DBS = (b"log", b"messages", b"recipients", b"ready", b"ready_dom", b"leases", b"lease_due", b"expiry",
             b"retention", b"live", b"msg_ns")


def bench_floor(workdir: Path, mail: list[Mail], batches: int) -> Result:
    """What the batched lifecycle cannot avoid, done by raw py-lmdb, zstandard and cryptography
    with no queue logic: per batch of BATCH messages three durable commits (LMDB with mqstore's
    flags and tables) that write, read and delete the rows mqstore's lifecycle does, with values of
    the same sizes — enqueue: compress (on every core, in one zstd call) and AES-256-GCM each body,
    append it and 8 state rows; lease: walk the ready index, read 2 rows, delete 2, write 5, read
    each body back, decrypt and decompress it; ack: read 3 rows, delete 4, write 4. Any Python
    implementation of this design pays at least this much, so ``mqstore / floor`` is what the queue
    logic costs and ``floor / persist-queue`` the best ratio this machine allows."""
    import lmdb
    import zstandard
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    path = Path(tempfile.mkdtemp(dir=workdir))
    env = lmdb.open(str(path), map_size=8 << 30, sync=True, metasync=True, writemap=False, meminit=True,
                    max_dbs=len(FLOOR_DBS), max_spare_txns=0)
    db = {name: env.open_db(name) for name in FLOOR_DBS}
    compressor = zstandard.ZstdCompressor(level=3)
    decompressor = zstandard.ZstdDecompressor()
    aead = AESGCM(os.urandom(32))
    aad = b"x" * 40
    u64 = U64_BE.pack
    rcpt_row, msg_row, lease_row, small_record = b"r" * 42, b"m" * 84, b"l" * 31, b"e" * 64
    ns0 = b"default\x00"
    n = len(mail)
    index = 0
    lat: list[float] = []
    start = time.perf_counter()
    for b in range(batches):
        t0 = time.perf_counter()
        bodies = [mail[(b * BATCH + j) % n][2] for j in range(BATCH)]
        frames = compressor.multi_compress_to_buffer(bodies, threads=-1)
        mids = [os.urandom(16) for _ in range(BATCH)]
        first_index = index + 1
        with env.begin(write=True) as txn:
            for j, mid in enumerate(mids):
                index += 1
                nonce = os.urandom(12)
                txn.put(u64(index), nonce + aead.encrypt(nonce, frames[j].tobytes(), aad), db=db[b"log"], append=True)
                ordinal = mid + b"\x00\x00"
                txn.put(ordinal, rcpt_row, db=db[b"recipients"])
                txn.put(ns0 + b"\x7f" + u64(index) + ordinal, b"example.net", db=db[b"ready"])
                txn.put(ns0 + b"example.net\x00\x7f" + u64(index) + ordinal, b"", db=db[b"ready_dom"])
                txn.put(mid, msg_row, db=db[b"messages"])
                txn.put(mid, b"", db=db[b"live"])
                txn.put(ns0 + mid, b"", db=db[b"msg_ns"])
                txn.put(u64(index) + mid, b"", db=db[b"expiry"])
        tokens = []
        with env.begin(write=True) as txn:
            with txn.cursor(db=db[b"ready"]) as cur:
                due = [bytes(k) for k in itertools.islice(cur.iternext(values=False), BATCH)]
            for j, key in enumerate(due):
                mid, ordinal = key[-18:-2], key[-18:]
                txn.get(mid, db=db[b"messages"])
                txn.get(ordinal, db=db[b"recipients"])
                txn.delete(key, db=db[b"ready"])
                txn.delete(ns0 + b"example.net\x00" + key[len(ns0):], db=db[b"ready_dom"])
                txn.put(ordinal, rcpt_row, db=db[b"recipients"])
                txn.put(mid, msg_row, db=db[b"messages"])
                index += 1
                txn.put(u64(index), small_record, db=db[b"log"], append=True)
                txn.put(u64(index), lease_row, db=db[b"leases"])
                txn.put(u64(index) + u64(index), b"", db=db[b"lease_due"])
                tokens.append((index, mid, ordinal, first_index + j))
                sealed = txn.get(u64(first_index + j), db=db[b"log"])
                if decompressor.decompress(aead.decrypt(sealed[:12], sealed[12:], aad)) != bodies[j]:
                    raise AssertionError(f"the floor read back the wrong body for message {j} of batch {b}")
        with env.begin(write=True) as txn:
            for token, mid, ordinal, enqueued in tokens:
                txn.get(u64(token), db=db[b"leases"])
                txn.get(mid, db=db[b"messages"])
                txn.get(ordinal, db=db[b"recipients"])
                index += 1
                txn.put(u64(index), small_record, db=db[b"log"], append=True)
                txn.put(ordinal, rcpt_row, db=db[b"recipients"])
                txn.delete(u64(token), db=db[b"leases"])
                txn.delete(u64(token) + u64(token), db=db[b"lease_due"])
                txn.delete(mid, db=db[b"live"])
                txn.delete(u64(enqueued) + mid, db=db[b"expiry"])
                txn.put(u64(index) + mid, b"", db=db[b"retention"])
                txn.put(mid, msg_row, db=db[b"messages"])
        lat.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    env.close()
    shutil.rmtree(path)
    return Result(f"floor: raw LMDB + zstd + AES-GCM, {BATCH}/commit", batches * BATCH, elapsed, lat,
                  unit=f"batch of {BATCH}", commits=3 * batches)


# --- persist-queue (baseline) -------------------------------------------------------------------------


def _open_pq(path: Path) -> tuple[Any, dict[str, Any]]:
    """A SQLiteAckQueue as the brief configures it, and its SQLite durability settings (raised
    to synchronous=FULL if its default is weaker, so every commit syncs the WAL)."""
    queue = persistqueue.SQLiteAckQueue(str(path), auto_commit=True, multithreading=False)
    conn = queue._putter  # the connection its writes go through (the only one without multithreading)
    journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
    default_sync = int(conn.execute("PRAGMA synchronous").fetchone()[0])
    forced = default_sync < 2
    if forced:
        conn.execute("PRAGMA synchronous=FULL")
    sync = int(conn.execute("PRAGMA synchronous").fetchone()[0])
    settings = {
        "persist_queue": getattr(persistqueue, "__version__", "?"),
        "sqlite": sqlite3.sqlite_version,
        "journal_mode": journal,
        "synchronous_default": SQLITE_SYNC_NAMES.get(default_sync, str(default_sync)),
        "synchronous_used": SQLITE_SYNC_NAMES.get(sync, str(sync)),
        "forced_full": forced,
    }
    return queue, settings


def pq_settings(workdir: Path) -> dict[str, Any]:
    path = Path(tempfile.mkdtemp(dir=workdir))
    queue, settings = _open_pq(path)
    queue.close()
    shutil.rmtree(path)
    return settings


def bench_pq_put(workdir: Path, mail: list[Mail], count: int) -> Result:
    path = Path(tempfile.mkdtemp(dir=workdir))
    queue, _ = _open_pq(path)
    lat: list[float] = []
    n = len(mail)
    start = time.perf_counter()
    for i in range(count):
        t0 = time.perf_counter()
        queue.put(mail[i % n])
        lat.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    queue.close()
    shutil.rmtree(path)
    return Result("persist-queue put only", count, elapsed, lat, commits=count)


def bench_pq_lifecycle(workdir: Path, mail: list[Mail], count: int, clear_every: int = 0) -> Result:
    path = Path(tempfile.mkdtemp(dir=workdir))
    queue, _ = _open_pq(path)
    put: list[float] = []
    get: list[float] = []
    ack: list[float] = []
    total: list[float] = []
    n = len(mail)
    clears = 0
    start = time.perf_counter()
    for i in range(count):
        t0 = time.perf_counter()
        pqid = queue.put(mail[i % n])
        t1 = time.perf_counter()
        item = queue.get(block=False, raw=True)
        t2 = time.perf_counter()
        queue.ack(id=item["pqid"])
        t3 = time.perf_counter()
        if clear_every and (i + 1) % clear_every == 0:
            queue.clear_acked_data(max_delete=clear_every * 2, keep_latest=0)
            clears += 1
        t4 = time.perf_counter()
        if item["pqid"] != pqid:
            raise AssertionError(f"got item {item['pqid']}, expected {pqid}")
        put.append(t1 - t0)
        get.append(t2 - t1)
        ack.append(t3 - t2)
        total.append(t4 - t0)
    elapsed = time.perf_counter() - start
    queue.close()
    shutil.rmtree(path)
    name = "persist-queue put+get+ack" + (f", clear acked /{clear_every}" if clear_every else "")
    return Result(name, count, elapsed, total, commits=3 * count + clears, ops={"put": put, "get": get, "ack": ack})


# --- lease latency against queue size -------------------------------------------------------------------


def build_queue(workdir: Path, count: int) -> tuple[Path, Path, float]:
    """A store holding ``count`` queued (due) messages of SMALL_BODY bytes; returns its path, key
    and the build time in seconds."""
    path, key = _new_store_dir(workdir)
    pool = [
        {"mail_from": s, "recipients": r, "data": d}
        for s, r, d in make_mail(min(count, BUILD_BATCH), SMALL_BODY, seed=count)
    ]
    store = _open(path, key)
    start = time.perf_counter()
    done = 0
    while done < count:
        k = min(BUILD_BATCH, count - done)
        store.enqueue_many(pool[:k])
        if (done + k) // 100_000 > done // 100_000:
            el = time.perf_counter() - start
            print(f"  built {done + k:,} / {count:,} in {el:.1f} s ({(done + k) / el:,.0f} msg/s)", file=sys.stderr)
        done += k
    elapsed = time.perf_counter() - start
    store.close()
    return path, key, elapsed


def measure_leases(stores: dict[int, mqstore.Store], iterations: int) -> dict[int, dict[str, float]]:
    """lease(max_messages=1) then ack, ``iterations`` times per store after WARMUP rounds; the
    stores take turns in blocks of LEASE_BLOCK rounds so that disk or host noise hits every size
    alike."""
    lease: dict[int, list[float]] = {size: [] for size in stores}
    both: dict[int, list[float]] = {size: [] for size in stores}

    def rounds(size: int, store: mqstore.Store, n: int, keep: bool) -> None:
        for _ in range(n):
            t0 = time.perf_counter()
            leases = store.lease(WORKER, max_messages=1)
            t1 = time.perf_counter()
            if len(leases) != 1:
                raise AssertionError(f"lease found {len(leases)} messages in a queue of {size:,}")
            store.ack(leases[0].token)
            t2 = time.perf_counter()
            if keep:
                lease[size].append(t1 - t0)
                both[size].append(t2 - t0)

    for size, store in stores.items():
        rounds(size, store, WARMUP, False)
    for done in range(0, iterations, LEASE_BLOCK):
        for size, store in stores.items():
            rounds(size, store, min(LEASE_BLOCK, iterations - done), True)
    out = {}
    for size in stores:
        lease[size].sort()
        both[size].sort()
        out[size] = {
            "lease_p50_us": _pct(lease[size], 0.5),
            "lease_p99_us": _pct(lease[size], 0.99),
            "lease_ack_p50_us": _pct(both[size], 0.5),
            "lease_ack_p99_us": _pct(both[size], 0.99),
        }
    return out


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# --- driver ---------------------------------------------------------------------------------------


def _print_result(r: Result) -> None:
    ops = "  ".join(f"{op} {r.pct(0.5, op):,.0f}/{r.pct(0.99, op):,.0f}" for op in r.ops)
    per_msg = f"  ({r.commits / r.msgs:.3f} commits/msg)" if r.commits else ""
    print(
        f"[lifecycle] {r.name:38s} {r.rate:9,.0f} msg/s  p50 {r.pct(0.5):9,.0f} µs  p99 {r.pct(0.99):9,.0f} µs"
        f" per {r.unit}{per_msg}",
        flush=True,
    )
    if ops:
        print(f"[lifecycle] {'':38s} per call p50/p99 µs: {ops}", flush=True)


def run_lifecycle(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    scale = args.scale
    count = max(10, int(2000 * scale))
    batches = max(2, int(80 * scale))
    mail = make_mail(2048, 2048, seed=2048)
    print(f"[lifecycle] 2 KiB messages, 1 recipient each; {count:,} msgs per single case, "
          f"{batches * BATCH:,} batched; median of {args.runs} run(s)", flush=True)
    cases: dict[str, Callable[[], Result]] = {
        "mq_single": lambda: bench_mq_single(workdir, mail, count),
        "mq_batched": lambda: bench_mq_batched(workdir, mail, batches),
        "mq_batched_audited": lambda: bench_mq_batched(workdir, mail, batches, regulated=True),
        "floor": lambda: bench_floor(workdir, mail, batches),
    }
    settings: dict[str, Any] | None = None
    if persistqueue is None:
        print(
            "[lifecycle] persist-queue is not installed (pip install 'mqstore[bench]'): "
            "skipping the baseline and its ratios",
            flush=True,
        )
    else:
        settings = pq_settings(workdir)
        print(
            f"[lifecycle] baseline persist-queue {settings['persist_queue']} (SQLite {settings['sqlite']}): "
            f"journal_mode={settings['journal_mode']}, synchronous={settings['synchronous_default']} by default"
            + (", raised to FULL for this run" if settings["forced_full"] else " (WAL synced on every commit)"),
            flush=True,
        )
        cases["pq_put"] = lambda: bench_pq_put(workdir, mail, count)
        cases["pq_lifecycle"] = lambda: bench_pq_lifecycle(workdir, mail, count)
        cases["pq_lifecycle_clear"] = lambda: bench_pq_lifecycle(workdir, mail, count, PQ_CLEAR_EVERY)
    # The cases take turns (each once, then again), so a disk or CPU that drifts during the run
    # weighs on every case alike.
    runs: dict[str, list[Result]] = {key: [] for key in cases}
    for turn in range(args.runs):
        for key, fn in cases.items():
            runs[key].append(fn())
        print(f"[lifecycle] turn {turn + 1}/{args.runs} done", flush=True)
    results: dict[str, Result] = {key: median_result(rs) for key, rs in runs.items()}
    for r in results.values():
        _print_result(r)
    ratios: dict[str, float] = {
        "mqstore batched, audited COMPLIANCE namespace / unaudited": results["mq_batched_audited"].rate
        / results["mq_batched"].rate,
        "mqstore batched / floor (what the queue logic costs)": results["mq_batched"].rate / results["floor"].rate,
    }
    baseline_name = None
    if persistqueue is not None:
        base = max((results["pq_lifecycle"], results["pq_lifecycle_clear"]), key=lambda r: r.rate)
        baseline_name = base.name
        ratios["mqstore batched / persist-queue lifecycle (target >= 10)"] = results["mq_batched"].rate / base.rate
        ratios["floor / persist-queue lifecycle (the most this machine allows)"] = results["floor"].rate / base.rate
        ratios["mqstore 1 caller / persist-queue lifecycle"] = results["mq_single"].rate / base.rate
        ratios["mqstore enqueue / persist-queue put, by p50 latency"] = results["pq_put"].pct(0.5) / results[
            "mq_single"
        ].pct(0.5, "enqueue")
        print(f"[lifecycle] baseline for the ratios: {base.name} (the faster persist-queue lifecycle)", flush=True)
    for name, value in ratios.items():
        print(f"[lifecycle] ratio {name:58s} {value:7.2f}", flush=True)
    return {
        "messages_per_case": {"single": count, "batched": batches * BATCH},
        "persist_queue": settings,
        "baseline": baseline_name,
        "results": {k: r.as_dict() for k, r in results.items()},
        "ratios": ratios,
    }


def measure_listing(store: mqstore.Store, repeats: int = 20) -> dict[str, float]:
    """What ``mqstore queue list`` costs on this store: the first page of 100, ten pages walked
    with the ``after`` cursor, a filter nothing matches (it examines a bounded number of rows and
    returns a partial page with a cursor), and the peak Python memory of one page."""
    import tracemalloc

    def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
        t0 = time.perf_counter()
        result = fn()
        return time.perf_counter() - t0, result

    first = sorted(timed(lambda: store.list(limit=100))[0] for _ in range(repeats))
    walk: list[float] = []
    after = None
    for _ in range(10):
        took, page = timed(lambda: store.list(limit=100, after=after))
        walk.append(took)
        after = page.next_after
        if after is None:
            break
    none_s, none_page = timed(lambda: store.list(state="deferred", limit=100))
    tracemalloc.start()
    store.list(limit=100)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "list_first_page_p50_us": first[len(first) // 2] * 1e6,
        "list_walk_page_p50_us": sorted(walk)[len(walk) // 2] * 1e6,
        "list_no_match_ms": none_s * 1e3,
        "list_no_match_partial": none_page.next_after is not None,
        "list_page_peak_kib": peak / 1024,
    }


def run_lease_scaling(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"iterations": args.iterations, "warmup": WARMUP, "body_bytes": SMALL_BODY, "queues": {}}
    sizes = (SMALL_QUEUE, args.big)
    built: dict[int, tuple[Path, Path]] = {}
    stores: dict[int, mqstore.Store] = {}
    try:
        for size in sizes:
            print(f"[lease] building a queue of {size:,} messages of {SMALL_BODY} B ...", file=sys.stderr, flush=True)
            path, key, build_s = build_queue(workdir, size)
            built[size] = (path, key)
            out["queues"][str(size)] = {
                "build_s": build_s,
                "build_msgs_per_s": size / build_s,
                "disk_bytes": disk_bytes(path),
            }
        for size in sizes:
            t0 = time.perf_counter()
            stores[size] = _open(*built[size])
            out["queues"][str(size)]["open_s"] = time.perf_counter() - t0
        for size, figures in measure_leases(stores, args.iterations).items():
            out["queues"][str(size)].update(figures)
        for size in sizes:
            out["queues"][str(size)].update(measure_listing(stores[size]))
    finally:
        for store in stores.values():
            store.close()
        for path, _ in built.values():
            shutil.rmtree(path.parent, ignore_errors=True)
    for size in sizes:
        f = out["queues"][str(size)]
        print(
            f"[lease] {size:>9,} queued: built in {f['build_s']:6.1f} s ({f['build_msgs_per_s']:8,.0f} msg/s, "
            f"{f['disk_bytes'] / 1e6:,.0f} MB), reopened in {f['open_s'] * 1e3:5.1f} ms; "
            f"lease p50 {f['lease_p50_us']:6,.0f} µs p99 {f['lease_p99_us']:6,.0f} µs; "
            f"lease+ack p50 {f['lease_ack_p50_us']:6,.0f} µs p99 {f['lease_ack_p99_us']:6,.0f} µs",
            flush=True,
        )
    for size in sizes:
        f = out["queues"][str(size)]
        print(
            f"[list]  {size:>9,} queued: first page of 100 p50 {f['list_first_page_p50_us']:7,.0f} µs; "
            f"next pages p50 {f['list_walk_page_p50_us']:7,.0f} µs; a filter matching nothing "
            f"{f['list_no_match_ms']:7,.1f} ms "
            f"({'partial page + cursor' if f['list_no_match_partial'] else 'complete'}); "
            f"peak memory of a page {f['list_page_peak_kib']:,.0f} KiB",
            flush=True,
        )
    small, big = out["queues"][str(SMALL_QUEUE)], out["queues"][str(args.big)]
    label = f"{args.big // 1000:,}K" if args.big % 1_000_000 else f"{args.big // 1_000_000:,}M"
    out["ratios"] = {
        f"lease p50 {label} / 1K (target <= 2)": big["lease_p50_us"] / small["lease_p50_us"],
        f"lease+ack p50 {label} / 1K": big["lease_ack_p50_us"] / small["lease_ack_p50_us"],
        f"lease p99 {label} / 1K": big["lease_p99_us"] / small["lease_p99_us"],
        f"list first page p50 {label} / 1K": big["list_first_page_p50_us"] / small["list_first_page_p50_us"],
        f"list page memory {label} / 1K": big["list_page_peak_kib"] / small["list_page_peak_kib"],
    }
    for name, value in out["ratios"].items():
        print(f"[lease] ratio {name:62s} {value:7.2f}", flush=True)
    return out



def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs per lifecycle case; the median is reported")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the lifecycle cases' message counts")
    parser.add_argument("--big", type=int, default=1_000_000, help="messages in the big queue (default 1,000,000)")
    parser.add_argument("--iterations", type=int, default=500, help="lease+ack rounds measured per queue size")
    parser.add_argument("--quick", action="store_true", help="one run at 1/10 scale, a 100k big queue (smoke test)")
    parser.add_argument("--skip-lease", action="store_true", help="only the lifecycle cases")
    parser.add_argument("--skip-lifecycle", action="store_true", help="only the lease-latency case")
    parser.add_argument("--dir", default=os.environ.get("MQSTORE_BENCH_DIR"), help="where to put the stores")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.scale, args.big = 1, 0.1, 100_000
    if args.iterations + WARMUP > SMALL_QUEUE:
        parser.error(f"--iterations must be at most {SMALL_QUEUE - WARMUP} (the small queue holds {SMALL_QUEUE})")
    if args.big < args.iterations + WARMUP or args.runs < 1:
        parser.error("--big must hold at least --iterations + 20 messages, and --runs must be >= 1")
    if codec.IMPLEMENTATION != "cython":
        print("warning: mqstore is using the pure-Python codec; figures are not representative", file=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="mqstore-bench-queue-", dir=args.dir))
    report: dict[str, Any] = {"codec": codec.IMPLEMENTATION, "runs": args.runs, "cpus": os.cpu_count()}
    start = time.perf_counter()
    try:
        if not args.skip_lifecycle:
            report["lifecycle"] = run_lifecycle(args, workdir)
        if not args.skip_lease:
            report["lease"] = run_lease_scaling(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["total_s"] = time.perf_counter() - start
    print(f"total {report['total_s']:.0f} s", flush=True)
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
