"""Benchmark: durable appends of email-like messages, against their irreducible parts.

Measured in the same run, on the same disk:

  (a) raw py-lmdb, one put + durable commit per message (same flags as mqstore);
  (b) raw py-lmdb, 256 puts per durable commit;
  (c) zstd (level 3) + AES-256-GCM alone in a loop (and with a trained dictionary);
  (d) the group-commit floor: 16 threads that each compress + encrypt a message and hand it to one
      writer thread, which puts all pending into one raw py-lmdb transaction per durable commit
      and wakes them (the thread pattern of 16 concurrent callers with nothing else);

then mqstore's ``LogStore.append_messages`` (validate, encode envelope, compress, derive the
per-message key, encrypt, frame, CRC, group commit):

  1 caller, one message per append;  16 concurrent callers, one message per append;
  batches of 256 messages per append; the same with a trained dictionary;
  and the Cython codec against the pure-Python reference.

Each case runs ``--runs`` times (default 3), the cases taking turns; the median rate is reported,
and each ratio is the median of the ratios measured within one turn. Targets of the engine
foundation:

  batch 256  >= 0.8 x 1 / (t_codec(c) + t_lmdb(b))
  16 callers >= 5 x (a)
  1 caller   >= 0.8 x (a)
  Cython codec >= 5 x reference (encode + decode)

Run:  python benchmarks/bench_log.py            (about 4 minutes on 2 cores)
      python benchmarks/bench_log.py --quick    (smaller counts, one run: a smoke test)
      python benchmarks/bench_log.py --json out.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lmdb
import zstandard as zstd
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mqstore import _codec as compiled
from mqstore import codec
from mqstore.codec import Envelope, RecordType
from mqstore.codec import _reference as reference
from mqstore.crypto import create_key_file, train_dictionary
from mqstore.store import LogStore, NewMessage
from mqstore.testing.figures import write_json
from mqstore.testing.mail import MailFactory

warnings.filterwarnings("ignore", message="mqstore created a key-encryption key")


class Result:
    def __init__(self, name: str, msgs: int, seconds: float, raw_bytes: int, latencies: list[float]) -> None:
        self.name = name
        self.msgs = msgs
        self.seconds = seconds
        self.raw_bytes = raw_bytes
        self.latencies = sorted(latencies)

    @property
    def rate(self) -> float:
        return self.msgs / self.seconds

    @property
    def mb_s(self) -> float:
        return self.raw_bytes / self.seconds / 1e6

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        return self.latencies[min(len(self.latencies) - 1, int(q * len(self.latencies)))] * 1e6


def median_result(runs: list[Result]) -> Result:
    ordered = sorted(runs, key=lambda r: r.rate)
    return ordered[len(ordered) // 2]


def _lmdb_env(path: Path) -> Any:
    return lmdb.open(
        str(path),
        map_size=8 << 30,
        sync=True,
        metasync=True,
        writemap=False,
        meminit=True,
        readahead=False,
        max_dbs=4,
        max_spare_txns=0,
    )


def bench_lmdb(workdir: Path, messages: list[bytes], per_commit: int, count: int) -> Result:
    path = Path(tempfile.mkdtemp(dir=workdir))
    env = _lmdb_env(path)
    db = env.open_db(b"log")
    lat: list[float] = []
    index = 0
    start = time.perf_counter()
    for b in range(count // per_commit):
        t0 = time.perf_counter()
        with env.begin(write=True) as txn:
            for j in range(per_commit):
                index += 1
                txn.put(index.to_bytes(8, "big"), messages[(b * per_commit + j) % len(messages)], db=db, append=True)
        lat.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    env.close()
    shutil.rmtree(path)
    n = (count // per_commit) * per_commit
    return Result(f"lmdb {per_commit}/commit", n, elapsed, sum(len(messages[i % len(messages)]) for i in range(n)), lat)


#: Bytes a stored record carries besides its ciphertext: the record header, message id, namespace
#: and nonce (the GCM tag is in the ciphertext). mqstore's records are a little larger still (the
#: envelope is sealed with the body), so baselines writing these values are, if anything, faster.
RECORD_OVERHEAD = 96


def sealed_values(messages: list[bytes]) -> list[bytes]:
    """What the baselines (a), (b) write: each message compressed (zstd-3) and encrypted
    (AES-256-GCM) as mqstore stores it, with its framing, prepared outside any timed region. Raw
    2 KiB values would each take an LMDB overflow page (mqstore's ~1.3 KiB records fit three to a
    page) and make the baselines slower than the work mqstore cannot avoid."""
    comp = zstd.ZstdCompressor(level=3)
    aead = AESGCM(os.urandom(32))
    head = bytes(RECORD_OVERHEAD - 12)
    return [head + (nonce := os.urandom(12)) + aead.encrypt(nonce, comp.compress(m), b"x" * 40) for m in messages]


def bench_codec_alone(messages: list[bytes], count: int, dictionary: bytes | None) -> Result:
    if dictionary:
        comp = zstd.ZstdCompressor(level=3, dict_data=zstd.ZstdCompressionDict(dictionary))
    else:
        comp = zstd.ZstdCompressor(level=3)
    aead = AESGCM(os.urandom(32))
    aad = b"x" * 40
    urandom = os.urandom
    compress = comp.compress
    encrypt = aead.encrypt
    n = len(messages)
    start = time.perf_counter()
    for i in range(count):
        encrypt(urandom(12), compress(messages[i % n]), aad)
    elapsed = time.perf_counter() - start
    return Result(
        "zstd+aes" + (" +dict" if dictionary else ""),
        count,
        elapsed,
        sum(len(messages[i % n]) for i in range(count)),
        [],
    )


def bench_codec_cores(messages: list[bytes], count: int) -> Result:
    """(c, all cores) The codec as a batch of 256 can use it at best: zstd-3 on every core at once
    (one call per batch, threads=-1), then AES-256-GCM of each record here, as mqstore seals a
    batch (its compression pool takes a share of every batch of 64 or more)."""
    comp = zstd.ZstdCompressor(level=3)
    aead = AESGCM(os.urandom(32))
    aad = b"x" * 40
    n = len(messages)
    batches = [[messages[(b * 256 + j) % n] for j in range(256)] for b in range(max(1, count // 256))]
    start = time.perf_counter()
    for batch in batches:
        packed = comp.multi_compress_to_buffer(batch, threads=-1)
        for i in range(len(packed)):
            aead.encrypt(os.urandom(12), packed[i].tobytes(), aad)
    elapsed = time.perf_counter() - start
    total = len(batches) * 256
    return Result("zstd+aes, all cores", total, elapsed, sum(len(m) for batch in batches for m in batch), [])


def _run_callers(caller: Callable[[int], None], callers: int, barrier: threading.Barrier) -> float:
    """Start ``callers`` threads running ``caller(c)``, release them together through ``barrier``
    (which they wait on too) and return the seconds until the last one finished."""
    threads = [threading.Thread(target=caller, args=(c,)) for c in range(callers)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def bench_group_floor(workdir: Path, messages: list[bytes], callers: int, count: int) -> Result:
    """(d) The group-commit pattern with nothing else: ``callers`` threads each compress and encrypt
    one message (zstd-3 + AES-256-GCM, each with its own compressor), hand it to one writer thread
    and wait; the writer puts everything pending into one raw py-lmdb transaction, commits
    durably and wakes each waiter. No validation, envelope, key derivation or framing: what any
    Python implementation of "many callers, one writer, one fsync per round" pays at least."""
    path = Path(tempfile.mkdtemp(dir=workdir))
    env = _lmdb_env(path)
    db = env.open_db(b"log")
    aead = AESGCM(os.urandom(32))
    aad = b"x" * 40
    pending: list[tuple[bytes, threading.Event]] = []
    cond = threading.Condition()
    done = False
    commits = 0
    per_caller = count // callers
    latencies: list[list[float]] = [[] for _ in range(callers)]
    barrier = threading.Barrier(callers + 1)

    def writer() -> None:
        nonlocal commits
        index = 0
        while True:
            with cond:
                while not pending and not done:
                    cond.wait()
                if not pending:
                    return
                batch = pending[:]
                pending.clear()
            with env.begin(write=True) as txn:
                for payload, _ in batch:
                    index += 1
                    txn.put(index.to_bytes(8, "big"), payload, db=db, append=True)
            commits += 1
            for _, event in batch:
                event.set()

    def caller(c: int) -> None:
        compress = zstd.ZstdCompressor(level=3).compress
        event = threading.Event()
        lat = latencies[c]
        barrier.wait()
        for k in range(per_caller):
            t0 = time.perf_counter()
            nonce = os.urandom(12)
            payload = nonce + aead.encrypt(nonce, compress(messages[(c * 7919 + k) % len(messages)]), aad)
            event.clear()
            with cond:
                pending.append((payload, event))
                cond.notify()
            event.wait()
            lat.append(time.perf_counter() - t0)

    writer_thread = threading.Thread(target=writer)
    writer_thread.start()
    elapsed = _run_callers(caller, callers, barrier)
    with cond:
        done = True
        cond.notify()
    writer_thread.join()
    env.close()
    shutil.rmtree(path)
    total = per_caller * callers
    raw = sum(len(messages[(c * 7919 + k) % len(messages)]) for c in range(callers) for k in range(per_caller))
    samples = [x for lat in latencies for x in lat]
    result = Result(f"group-commit floor, {callers} callers", total, elapsed, raw, samples)
    result.commits = commits  # type: ignore[attr-defined]
    return result


def _new_message(data: bytes, i: int) -> NewMessage:
    return NewMessage(
        mail_from="sender@example.org",
        recipients=[f"rcpt{i % 97}@example.net", "list@example.com", f"user{i % 13}@example.org"],
        data=data,
        namespace="bench",
    )


def _open_store(workdir: Path, dictionary: bytes | None) -> tuple[LogStore, Path]:
    path = Path(tempfile.mkdtemp(dir=workdir))
    key = create_key_file(path / "bench.key")
    store = LogStore(path / "store", key_file=key, map_size=1 << 30)
    store.ensure_keys(["bench"])
    if dictionary:
        store.use_dictionary(store.add_dictionary(dictionary))
    return store, path


def bench_mqstore(
    workdir: Path, messages: list[bytes], *, callers: int, batch: int, count: int, dictionary: bytes | None = None
) -> Result:
    store, path = _open_store(workdir, dictionary)
    items = [_new_message(m, i) for i, m in enumerate(messages)]
    n_items = len(items)
    per_caller = count // callers // batch * batch
    latencies: list[list[float]] = [[] for _ in range(callers)]
    barrier = threading.Barrier(callers + 1)

    def caller(c: int) -> None:
        lat = latencies[c]
        append = store.append_messages
        offset = c * 7919
        barrier.wait()
        for k in range(0, per_caller, batch):
            chunk = [items[(offset + k + j) % n_items] for j in range(batch)]
            t0 = time.perf_counter()
            append(chunk)
            lat.append(time.perf_counter() - t0)

    elapsed = _run_callers(caller, callers, barrier)
    total = per_caller * callers
    commits = store.commits
    store.close()
    shutil.rmtree(path)
    name = f"mqstore {callers} caller{'s' if callers > 1 else ''}, {batch}/append" + (" +dict" if dictionary else "")
    raw = sum(len(messages[i % len(messages)]) for i in range(total))
    result = Result(name, total, elapsed, raw, [x for lat in latencies for x in lat])
    result.commits = commits  # type: ignore[attr-defined]
    return result


def bench_codec_impls(messages: list[bytes], count: int) -> dict[str, float]:
    """µs per record for encode_record + decode_record, and envelope encode + decode, per codec."""
    out: dict[str, float] = {}
    env = Envelope(
        b"m" * 16, "bench", "sender@example.org", ("a@example.net", "b@example.com", "c@example.org"), 0, 1, 0, 0, None
    )
    payloads = [m[: int(len(m) * 0.6)] for m in messages[:64]]  # ~ compressed+sealed size
    for name, impl in (("cython", compiled), ("reference", reference)):
        n = count if name == "cython" else max(200, count // 50)
        enc, dec = impl.encode_record, impl.decode_record
        start = time.perf_counter()
        for i in range(n):
            dec(enc(RecordType.ENQUEUE, 3, 1, i + 1, 1, 0, payloads[i % 64]), i + 1)
        out[f"{name} record µs"] = (time.perf_counter() - start) / n * 1e6
        start = time.perf_counter()
        for _ in range(n):
            impl.decode_envelope(impl.encode_envelope(env))
        out[f"{name} envelope µs"] = (time.perf_counter() - start) / n * 1e6
    out["record speedup"] = out["reference record µs"] / out["cython record µs"]
    out["envelope speedup"] = out["reference envelope µs"] / out["cython envelope µs"]
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="mqstore-bench-", dir=args.dir))
    report: dict[str, Any] = {"codec": codec.IMPLEMENTATION, "runs": args.runs, "sizes": {}}
    if codec.IMPLEMENTATION != "cython":
        print("warning: mqstore is using the pure-Python codec; figures are not representative", file=sys.stderr)
    try:
        for size in args.sizes:
            mail = MailFactory(seed=size)
            messages = [mail.message(size) for _ in range(2048)]
            dictionary = train_dictionary([mail.message(size) for _ in range(2000)], 64 * 1024)
            scale = args.scale
            sealed = sealed_values(messages)
            cases: dict[str, Callable[[], Result]] = {
                "a": lambda: bench_lmdb(workdir, sealed, 1, int(1500 * scale)),
                "b": lambda: bench_lmdb(workdir, sealed, 256, int(256 * 200 * scale)),
                "c": lambda: bench_codec_alone(messages, int(40_000 * scale), None),
                "c_dict": lambda: bench_codec_alone(messages, int(40_000 * scale), dictionary),
                "c_cores": lambda: bench_codec_cores(messages, int(40_000 * scale)),
                "single_1": lambda: bench_mqstore(workdir, messages, callers=1, batch=1, count=int(1500 * scale)),
                "single_16": lambda: bench_mqstore(workdir, messages, callers=16, batch=1, count=int(8000 * scale)),
                "d": lambda: bench_group_floor(workdir, messages, 16, int(8000 * scale)),
                "batch_256": lambda: bench_mqstore(
                    workdir, messages, callers=1, batch=256, count=int(256 * 120 * scale)
                ),
                "batch_256_dict": lambda: bench_mqstore(
                    workdir, messages, callers=1, batch=256, count=int(256 * 120 * scale), dictionary=dictionary
                ),
            }
            # The cases run in turns (a, b, c, ..., then again), so a disk or CPU that drifts during
            # the run weighs on every case alike; each ratio is the median of the ratios of one turn.
            runs: dict[str, list[Result]] = {key: [] for key in cases}
            for turn in range(args.runs):
                for key, fn in cases.items():
                    runs[key].append(fn())
                print(f"[{size} B] turn {turn + 1}/{args.runs} done", file=sys.stderr, flush=True)
            results: dict[str, Result] = {key: median_result(list(rs)) for key, rs in runs.items()}
            for r in results.values():
                print(
                    f"[{size} B] {r.name:34s} {r.rate:11,.0f} msg/s {r.mb_s:8.1f} MB/s"
                    + (f"  p50 {r.pct(0.5):8.0f} µs  p99 {r.pct(0.99):8.0f} µs" if r.latencies else "")
                    + (f"  ({r.msgs / r.commits:.1f} msgs/commit)" if getattr(r, "commits", 0) else ""),
                    flush=True,
                )

            def turn_ratios(f: Callable[[dict[str, Result]], float]) -> float:
                return statistics.median(f({k: rs[t] for k, rs in runs.items()}) for t in range(args.runs))

            def limit_of(r: dict[str, Result], c: str) -> float:
                return 1 / (1 / r[c].rate + 1 / r["b"].rate)

            limit = limit_of(results, "c")
            limit_dict = limit_of(results, "c_dict")
            ratios = {
                "batch_256 / limit (target >= 0.8)": turn_ratios(lambda r: r["batch_256"].rate / limit_of(r, "c")),
                "batch_256_dict / limit_dict (target >= 0.8)": turn_ratios(
                    lambda r: r["batch_256_dict"].rate / limit_of(r, "c_dict")
                ),
                "batch_256 / limit, codec on all cores (reference)": turn_ratios(
                    lambda r: r["batch_256"].rate / limit_of(r, "c_cores")
                ),
                "single_16 / a (target >= 5)": turn_ratios(lambda r: r["single_16"].rate / r["a"].rate),
                "d / a (the most 16 callers can reach here)": turn_ratios(lambda r: r["d"].rate / r["a"].rate),
                "single_16 / d": turn_ratios(lambda r: r["single_16"].rate / r["d"].rate),
                "single_1 / a (target >= 0.8)": turn_ratios(lambda r: r["single_1"].rate / r["a"].rate),
            }
            codec_figures = bench_codec_impls(messages, int(50_000 * scale))
            ratios["cython codec / reference (target >= 5)"] = codec_figures["record speedup"]
            for name, value in ratios.items():
                print(f"[{size} B] ratio {name:46s} {value:6.2f}", flush=True)
            for name, value in codec_figures.items():
                print(f"[{size} B] codec {name:46s} {value:8.2f}", flush=True)
            report["sizes"][str(size)] = {
                "results": {
                    k: {
                        "name": r.name,
                        "msgs_per_s": r.rate,
                        "mb_per_s": r.mb_s,
                        "p50_us": r.pct(0.5),
                        "p99_us": r.pct(0.99),
                    }
                    for k, r in results.items()
                },
                "limit_msgs_per_s": limit,
                "limit_dict_msgs_per_s": limit_dict,
                "ratios": ratios,
                "codec": codec_figures,
            }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return report



def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs per case; the median is reported")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192], help="message sizes in bytes")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every case's message count")
    parser.add_argument("--quick", action="store_true", help="one run at 1/10 scale (smoke test)")
    parser.add_argument("--dir", default=os.environ.get("MQSTORE_BENCH_DIR"), help="where to put the stores")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.scale = 1, 0.1
    report = run(args)
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
