"""``mqstore repair``: put damaged log records back from healthy replicas, and rebuild the state
tables from the log.

Damaged records. Committed entries are identical on every replica (Raft's log matching), and the
sealed bytes are what replicate, so a good copy of a damaged record at index ``i`` is the record a
peer holds at ``i`` if the peer has ``i`` committed. A copy is written only after it decodes with
its CRC and index and, for sealed records, opens with this store's key. This works on a stopped
node (``--data-dir``: the peers are asked directly) and on a running one (``--server``: the node
asks its peers and writes through its own writer, so nothing races the Raft thread; readers see
the damaged bytes or the good ones, never a mix).

State tables. They are derived from the log only, so they can be rebuilt by applying the log
again — but only while the log still holds every entry since the store began. Once compaction
(or a snapshot) dropped the head of the log, the state cannot be recomputed from the log alone:
then restore a backup, or (cluster member) rebuild the node from its peers with ``mqstore recover``.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from typing import Any

from mqstore import codec
from mqstore.codec import Record, RecordType
from mqstore.errors import Corruption, InvalidArgument, MQStoreError
from mqstore.ops.facts import STATE_TABLES
from mqstore.ops.verify import applied_index_of, applier_for, replay_chunk, replay_problem
from mqstore.queue.model import U64
from mqstore.store import LogStore, WriteContext

#: Indices one ReadRecords call may ask for (and records one repair fetches per round).
READ_RECORDS_MAX = 1024
READ_RECORDS_BYTES_MAX = 32 * 1024 * 1024

#: fetch(indices) -> {index: (framed record, where it came from)}, plus notes on what failed.
Fetch = Callable[[list[int]], tuple[dict[int, tuple[bytes, str]], list[str]]]


def find_damaged(log: LogStore, indices: list[int], scan: bool) -> dict[int, str]:
    """Damaged records: quarantined ones, those in ``indices`` that really are damaged, and (with
    ``scan``) every one a full scan finds. Returns index -> what is wrong."""
    damaged: dict[int, str] = {}
    if scan:
        damaged.update(dict(log.scan().corrupt))
    for index in indices:
        try:
            log.read(index)
        except Corruption as exc:
            damaged[index] = exc.reason
        except MQStoreError:
            continue  # outside the log: nothing to repair
    for index, reason in log.quarantined().items():
        if index in damaged:
            continue
        try:
            log.read(index)  # quarantined earlier; maybe repaired since
        except Corruption as exc:
            damaged[index] = exc.reason or reason
        except MQStoreError:
            continue
    return dict(sorted(damaged.items()))


def _check_copy(log: LogStore, index: int, raw: bytes) -> str | None:
    """Why ``raw`` is not a usable copy of record ``index`` (None: it is)."""
    try:
        record = codec.decode_record(raw, index)
    except Corruption as exc:
        return f"the copy is damaged too: {exc.reason}"
    try:
        if record.type == RecordType.ENQUEUE:
            log.open_message(record)
        elif record.type == RecordType.DICTIONARY:
            log.sealer.open(record)
    except MQStoreError as exc:
        return f"the copy does not open with this store's key: {exc}"
    return None


def repair_records(log: LogStore, damaged: dict[int, str], fetch: Fetch, *, dry_run: bool) -> dict[str, Any]:
    """Fetch good copies of ``damaged`` records and write them (unless ``dry_run``)."""
    results: list[dict[str, Any]] = []
    good: dict[int, bytes] = {}
    notes: list[str] = []
    wanted = sorted(damaged)
    for lo in range(0, len(wanted), READ_RECORDS_MAX):
        batch = wanted[lo : lo + READ_RECORDS_MAX]
        found, batch_notes = fetch(batch)
        notes += batch_notes
        for index in batch:
            item: dict[str, Any] = {"index": index, "damage": damaged[index]}
            copy = found.get(index)
            if copy is None:
                item["status"] = "unavailable"
                item["problem"] = "no reachable replica has this index committed"
            else:
                raw, source = copy
                problem = _check_copy(log, index, raw)
                item["source"] = source
                if problem is not None:
                    item["status"] = "unavailable"
                    item["problem"] = problem
                else:
                    item["status"] = "would repair" if dry_run else "repaired"
                    good[index] = raw
            results.append(item)
    if good and not dry_run:
        log.rewrite_records(good)
        for item in results:
            if item["status"] == "repaired":
                try:
                    log.read(item["index"])
                except MQStoreError as exc:  # pragma: no cover - rewrite_records checked the copy
                    item["status"] = "failed"
                    item["problem"] = f"still unreadable after the rewrite: {exc}"
    unresolved = [r["index"] for r in results if r["status"] in ("unavailable", "failed")]
    return {
        "damaged": len(damaged),
        "repaired": sum(1 for r in results if r["status"] == "repaired"),
        "would_repair": sum(1 for r in results if r["status"] == "would repair"),
        "unresolved": unresolved,
        "records": results,
        "notes": notes,
        "dry_run": dry_run,
    }


def serve_records(log: LogStore, indices: list[int], commit_index: int) -> list[tuple[int, bytes, str]]:
    """What a node answers to ReadRecords: each index's framed record if it is committed here and
    intact, else why not."""
    if len(indices) > READ_RECORDS_MAX:
        raise InvalidArgument(f"at most {READ_RECORDS_MAX} indices per call, not {len(indices)}")
    out: list[tuple[int, bytes, str]] = []
    total = 0
    db = log.env.dbs[b"log"]
    with log.env.read() as txn:
        for index in indices:
            if index < 1 or index > commit_index:
                out.append((index, b"", f"index {index} is not committed here (commit index {commit_index})"))
                continue
            raw = txn.get(U64.pack(index), db=db)
            if raw is None:
                out.append((index, b"", f"index {index} is not in this node's log (compacted)"))
                continue
            raw = bytes(raw)
            try:
                codec.decode_record(raw, index)
            except Corruption as exc:
                out.append((index, b"", f"damaged here too: {exc.reason}"))
                continue
            total += len(raw)
            if total > READ_RECORDS_BYTES_MAX:
                out.append((index, b"", "answer size limit reached: ask again for the rest"))
                continue
            out.append((index, raw, ""))
    return out


# --- state tables ------------------------------------------------------------------------------------


def rebuild_state(log: LogStore, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Drop the state tables and apply the log again, in one transaction (all or nothing). Refuses
    when the log no longer holds every entry since the start, or when records are damaged."""
    why = replay_problem(log)
    if why is not None:
        raise InvalidArgument(
            f"cannot rebuild the state tables of {log.path}: {why}. Restore a backup "
            "(mqstore restore), or on a cluster member rebuild the node from its peers (mqstore recover)"
        )
    scan = log.scan()
    if not scan.clean:
        listed = ", ".join(str(i) for i, _ in scan.corrupt[:20])
        raise Corruption(f"damaged log records ({listed}{', ...' if len(scan.corrupt) > 20 else ''}) must be "
                         f"repaired first: mqstore repair --data-dir {shlex.quote(str(log.path))} puts back "
                         "committed copies from the node's peers (or --peer HOST:PORT); an embedded store has "
                         "no replicas: restore a backup (mqstore restore)")
    applied = applied_index_of(log)
    first = log.first_index
    total = max(0, applied - first + 1)

    applier = applier_for(log)

    def fn(ctx: WriteContext) -> int:
        for name in STATE_TABLES:
            ctx.txn.drop(ctx.dbs[name], delete=False)
        db = ctx.dbs[b"log"]
        index = first
        done = 0
        while index <= applied:
            chunk: list[Record] = []
            with ctx.txn.cursor(db=db) as cur:
                ok = cur.set_range(U64.pack(index))
                while ok and len(chunk) < 4096:
                    i = int(U64.unpack(bytes(cur.key()))[0])
                    if i > applied:
                        break
                    chunk.append(codec.decode_record(bytes(cur.value()), i))
                    ok = cur.next()
            if not chunk:
                break
            done += replay_chunk(applier, ctx, chunk)
            if progress is not None:
                progress(done, total)
            index = chunk[-1].index + 1
        return done

    applied_records = log.write(fn)
    return {"rebuilt": True, "from_index": first, "to_index": applied, "entries_applied": applied_records,
            "tables": [t.decode() for t in STATE_TABLES]}


__all__ = ["READ_RECORDS_MAX", "Fetch", "find_damaged", "rebuild_state", "repair_records", "serve_records"]
