"""Backups: a consistent copy of a store, compressed, checksummed, in one file; and restore.

File format (version 1), integers little-endian::

    16 B   magic            b"MQSTORE-BACKUP\\n\\x01"
    u32    header length, u32 CRC32C of the header, header (JSON: source, indexes, counts, and
           the id of the key that signed the audit checkpoints, when any are signed)
    frames, each:  u32 raw length (> 0), u32 compressed length, u32 CRC32C of the compressed
                   bytes, zstd-compressed bytes of the next piece of the database file
    end:           u32 0, u32 trailer length, u32 CRC32C of the trailer, trailer (JSON:
                   SHA-256 and size of the whole database file, frame count)

The database file is an LMDB copy taken in one read transaction (``mdb_env_copy2`` with
compaction), so it is one consistent state of the store: for a node, the state tables, the
applied index and the log as of one commit. Records stay as they are on disk (sealed): a backup
holds no key, and restoring it needs the store's KEK to read messages. Nor does it hold the audit
signing key: the header names it (key id, and the public key when the backup was taken beside
the key file), and restore says where the restored store needs it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from mqstore import __version__
from mqstore.codec import crc32c
from mqstore.errors import Corruption, InvalidArgument
from mqstore.ops.facts import (
    META_CLUSTER_ID,
    META_FOUNDING,
    META_MEMBER_PREFIX,
    META_NODE_ID,
    META_REMOVED,
    META_RESTORED_FROM,
    log_bounds,
    open_env,
    queue_counts,
    raft_facts,
)
from mqstore.ops.scratch import owned_temporary, remove_unowned
from mqstore.queue.kv import LmdbKV
from mqstore.store.env import LOCK_FILE, Environment, fsync_path

MAGIC = b"MQSTORE-BACKUP\n\x01"
FORMAT_VERSION = 1
FRAME_RAW_BYTES = 4 * 1024 * 1024
ZSTD_LEVEL = 3
_U32 = struct.Struct("<I")
_U64_BE = struct.Struct(">Q")
_FRAME = struct.Struct("<III")
_HEADER_BYTES_MAX = 1 << 20
_TRAILER_BYTES_MAX = 1 << 16

ProgressFn = Callable[[int, int], None]


def copy_store(source: Path, work_dir: Path) -> Path:
    """A consistent, compacted copy of the store in ``source`` (running or not; no key needed):
    ``work_dir/data.mdb``."""
    with open_env(source) as env:
        work_dir.mkdir(parents=True, exist_ok=True)
        env.copy_to(work_dir)
    return work_dir / "data.mdb"


def describe_copy(copy_dir: Path, source: dict[str, Any], signing_key_file: Path | None = None) -> dict[str, Any]:
    """The backup header for the copy in ``copy_dir``: where it came from and what it holds.
    ``signing_key_file``: the audit signing key of the store copied (default: the one in its
    ``data_dir``), read for its public key only."""
    data_file = copy_dir / "data.mdb"
    with open_env(copy_dir) as env:
        first, last = log_bounds(env)
        raft = raft_facts(env)
        counts = queue_counts(env, int(time.time() * 1000))
        signing = audit_key_facts(env)
    header: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "mqstore_version": __version__,
        "created_ms": int(time.time() * 1000),
        "source": dict(source),
        "first_index": first,
        "last_index": last,
        "applied_index": raft.applied_index if raft is not None else last,
        "commit_index": raft.commit_index if raft is not None else last,
        "term": raft.term if raft is not None else 0,
        "messages": counts["messages"],
        "messages_active": counts["messages_active"],
        "data_bytes": data_file.stat().st_size,
    }
    if signing is not None:
        # Which key signed the audit checkpoints (the key is not in the backup: it must be copied
        # beside the restored store for ``audit verify``), and its public key when it is known here.
        data_dir = source.get("data_dir")
        if signing_key_file is None and data_dir:
            signing_key_file = Path(data_dir) / AUDIT_KEY_FILE
        if signing_key_file is not None:
            found, public = _signing_key_id(signing_key_file)
            if found == signing["key_id"] and public is not None:
                signing["public_key"] = public
        header["audit_signing_key"] = {**signing, "file": AUDIT_KEY_FILE}
    if raft is not None:
        header["source"].setdefault("node_id", raft.node_id)
        header["source"].setdefault("cluster_id", raft.cluster_id)
        header["source"]["kind"] = "node" if raft.node_id else header["source"].get("kind", "store")
    else:
        header["source"].setdefault("kind", "store")
    return header


#: The file an embedded store (and, unless its config names another, a node) keeps its audit
#: signing key in, inside its data directory (see :class:`mqstore.api.Store`).
AUDIT_KEY_FILE = "audit-signing.key"


def audit_key_facts(env: Environment) -> dict[str, Any] | None:
    """Which key signed the store's audit checkpoints: ``{"checkpoints": n, "key_id": ...}`` (the
    latest checkpoint's key id: the first 16 bytes of SHA-256 of the Ed25519 public key, hex), or
    None when no checkpoint is signed. The key itself is never in the store (nor in a backup)."""
    from mqstore.compliance import audit

    if b"audit_ckpt" not in env.dbs:
        return None
    with env.read() as txn:
        count = int(txn.stat(env.dbs[b"audit_ckpt"])["entries"])
        try:
            latest = audit.latest_checkpoint(LmdbKV(txn, env.dbs)) if count else None
        except Corruption:
            latest = None  # verify reports it
    if latest is None or not latest.key_id:
        return None
    return {"checkpoints": count, "key_id": latest.key_id}


def _signing_key_id(path: Path) -> tuple[str | None, str | None]:
    """(key id, public key hex) of the audit signing key file ``path``; (None, None) when it
    cannot be read (missing, refused for its permissions, not a signing key)."""
    from mqstore.compliance.signing import key_id, public_key_hex, read_signing_key
    from mqstore.errors import MQStoreError

    try:
        key = read_signing_key(path)
    except (MQStoreError, OSError):
        return None, None
    return key_id(key), public_key_hex(key)


def signing_key_status(env: Environment, key_file: Path) -> dict[str, Any] | None:
    """What the restored store in ``env`` needs to verify its audit log: the signing key with the
    key id of its checkpoints, in ``key_file``. None when no checkpoint is signed (a new key does)."""
    facts = audit_key_facts(env)
    if facts is None:
        return None
    have, _ = _signing_key_id(key_file)
    return {**facts, "file": str(key_file), "present": os.path.lexists(key_file),
            "matches": None if have is None else have == facts["key_id"]}


def backup_bytes(data_file: Path, header: dict[str, Any], progress: ProgressFn | None = None) -> Iterator[bytes]:
    """The backup file of ``data_file``, piece by piece (memory stays at one frame)."""
    head = json.dumps(header, sort_keys=True).encode()
    yield MAGIC + _U32.pack(len(head)) + _U32.pack(crc32c(head)) + head
    total = data_file.stat().st_size
    digest = hashlib.sha256()
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    done = frames = 0
    with data_file.open("rb") as f:
        while True:
            raw = f.read(FRAME_RAW_BYTES)
            if not raw:
                break
            digest.update(raw)
            packed = compressor.compress(raw)
            frames += 1
            done += len(raw)
            yield _FRAME.pack(len(raw), len(packed), crc32c(packed)) + packed
            if progress is not None:
                progress(done, total)
    trailer = json.dumps({"sha256": digest.hexdigest(), "data_bytes": done, "frames": frames}).encode()
    yield _FRAME.pack(0, len(trailer), crc32c(trailer)) + trailer


def _read_exact(src: BinaryIO, n: int, offset: int, what: str) -> bytes:
    data = src.read(n)
    if len(data) != n:
        raise Corruption(f"backup ends early at byte {offset + len(data)} (in {what})")
    return data


def _json_object(raw: bytes, what: str, offset: int) -> dict[str, Any]:
    """``raw`` (which passed its CRC) as a JSON object; Corruption if it is not one (e.g. a damaged
    frame length made a data frame look like the trailer)."""
    try:
        value = json.loads(raw)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        value = None
    if not isinstance(value, dict):
        raise Corruption(f"backup {what} at byte {offset} is not a JSON object (damaged file)")
    return value


def _read_header(src: BinaryIO) -> tuple[dict[str, Any], int]:
    """The header at the start of a backup stream (checked), and the offset after it."""
    magic = src.read(len(MAGIC))
    if magic != MAGIC:
        raise Corruption("not an mqstore backup (bad magic), or a backup format this version does not read")
    offset = len(MAGIC)
    length, crc = struct.unpack("<II", _read_exact(src, 8, offset, "header"))
    if length > _HEADER_BYTES_MAX:
        raise Corruption(f"backup header length {length} is implausible")
    offset += 8
    head = _read_exact(src, length, offset, "header")
    if crc32c(head) != crc:
        raise Corruption(f"backup header at byte {offset} fails its CRC")
    header = _json_object(head, "header", offset)
    offset += length
    if header.get("format") != FORMAT_VERSION:
        raise Corruption(f"backup format {header.get('format')} is not supported (this version reads 1)")
    total = header.get("data_bytes", 0)
    if not isinstance(total, int) or isinstance(total, bool) or total < 0:
        raise Corruption(f"backup header names an impossible data size {total!r}")
    header.setdefault("data_bytes", 0)
    return header, offset


def read_header(path: Path) -> dict[str, Any]:
    """The header of the backup file ``path`` (checked; the rest of the file is not read)."""
    with path.open("rb") as f:
        return _read_header(f)[0]


def read_backup(
    src: BinaryIO, target: BinaryIO | None = None, progress: ProgressFn | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check a backup stream end to end (every CRC, the SHA-256 of the data) and write the database
    file to ``target`` if given. Returns (header, trailer). Raises Corruption naming the offset."""
    header, offset = _read_header(src)
    total = header["data_bytes"]
    digest = hashlib.sha256()
    decompressor = zstandard.ZstdDecompressor()
    done = 0
    while True:
        raw_len, packed_len, crc = _FRAME.unpack(_read_exact(src, _FRAME.size, offset, "frame header"))
        frame_at = offset
        offset += _FRAME.size
        if raw_len == 0:
            if packed_len > _TRAILER_BYTES_MAX:
                raise Corruption(f"backup trailer length {packed_len} is implausible")
            tail = _read_exact(src, packed_len, offset, "trailer")
            if crc32c(tail) != crc:
                raise Corruption(f"backup trailer at byte {offset} fails its CRC")
            trailer = _json_object(tail, "trailer", offset)
            break
        if raw_len > FRAME_RAW_BYTES or packed_len > 2 * FRAME_RAW_BYTES:
            raise Corruption(f"backup frame at byte {frame_at} has implausible lengths")
        packed = _read_exact(src, packed_len, offset, "frame")
        if crc32c(packed) != crc:
            raise Corruption(f"backup frame at byte {frame_at} fails its CRC (damaged file)")
        try:
            raw = decompressor.decompress(packed, max_output_size=raw_len)
        except zstandard.ZstdError as exc:
            raise Corruption(f"backup frame at byte {frame_at} does not decompress: {exc}") from None
        if len(raw) != raw_len:
            raise Corruption(f"backup frame at byte {frame_at} decompresses to the wrong size")
        offset += packed_len
        digest.update(raw)
        done += raw_len
        if target is not None:
            target.write(raw)
        if progress is not None:
            progress(done, total)
    if src.read(1):
        raise Corruption(f"backup has bytes after its trailer (at byte {offset + packed_len})")
    if trailer.get("data_bytes") != done or digest.hexdigest() != trailer.get("sha256"):
        raise Corruption("backup data does not match its SHA-256 checksum")
    if total and total != done:
        raise Corruption(f"backup holds {done} bytes of data; its header says {total}")
    return header, trailer


def backup_local(source: Path, out: Path, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Back up the store in ``source`` (a stopped node, an embedded store, or a running embedded
    store read beside its writer) to ``out``. Returns the header."""
    if out.exists():
        raise InvalidArgument(f"{out} exists: refusing to overwrite a backup")
    with _owned_temporary(out, COPY_MARK, directory=True) as (tmp, _fd):
        copy = copy_store(source, tmp / "copy")
        header = describe_copy(tmp / "copy", {"kind": "store", "data_dir": str(source.resolve())})
        write_file(out, backup_bytes(copy, header, progress))
    return header


#: The temporary files of a backup to ``OUT``, beside it: ``OUT.partial-XXXXXXXX``, the file being
#: written (it becomes ``OUT`` only by an atomic link once complete and synced), and
#: ``OUT.copy-XXXXXXXX``, the directory of the database copy it is made from. Each name is unique
#: to its run, and the run holds an exclusive lock (flock) on it while it runs: one that nobody
#: holds was left by a run that was killed.
PARTIAL_MARK = "partial"
COPY_MARK = "copy"


def _owned_temporary(out: Path, mark: str, *, directory: bool) -> contextlib.AbstractContextManager[tuple[Path, int]]:
    """A new file or directory ``OUT.<mark>-XXXXXXXX`` beside ``out``, locked by this run."""
    return owned_temporary(out.parent, f"{out.name}.{mark}-", directory=directory)


def clear_leftovers(out: Path) -> tuple[list[Path], list[Path]]:
    """Temporary files that killed backups to ``out`` left beside it: removes those of this
    version's runs that no running backup holds, and returns them, with those an earlier mqstore
    may have left (``OUT.partial``, ``mqstore-backup-*``: not removed, since whether a backup of
    that version still runs is not known)."""
    older = [
        path for path in sorted(out.parent.glob("*"))
        if path.name == f"{out.name}.partial" or (path.name.startswith("mqstore-backup-") and path.is_dir())
    ] if out.parent.is_dir() else []
    removed = remove_unowned(out.parent, (f"{out.name}.{PARTIAL_MARK}-", f"{out.name}.{COPY_MARK}-"))
    return removed, older


def write_file(out: Path, pieces: Iterator[bytes]) -> int:
    """Write ``pieces`` to ``out`` durably: a temporary name of this run's own (``OUT.partial-*``),
    fsync, then ``out`` appears at once, complete (a hard link: never over a file of that name,
    such as another run's backup finished first), and the directory is synced. Returns the size
    written."""
    size = 0
    with _owned_temporary(out, PARTIAL_MARK, directory=False) as (partial, fd):
        with os.fdopen(os.dup(fd), "wb") as f:  # (mode 0600, as mkstemp makes it)
            for piece in pieces:
                f.write(piece)
                size += len(piece)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(partial, out)
        except FileExistsError:
            raise InvalidArgument(f"{out} exists: refusing to overwrite a backup (another backup to it "
                                  "finished first?)") from None
        except OSError as exc:  # a file system without hard links: a rename, once out is known absent
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            if out.exists():
                raise InvalidArgument(f"{out} exists: refusing to overwrite a backup") from None
            os.rename(partial, out)
    fsync_path(out.parent)
    return size


def check_file(path: Path, progress: ProgressFn | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    with path.open("rb") as f:
        return read_backup(f, None, progress)


def restore(
    backup: Path,
    data_dir: Path,
    progress: ProgressFn | None = None,
    *,
    node: bool = False,
    finish: Callable[[Path], None] | None = None,
    signing_key_file: Path | None = None,
) -> dict[str, Any]:
    """Restore ``backup`` into the new store directory ``data_dir`` (it must hold no store).
    Returns ``{"header": the backup's header, "log": what was done to the node's log or None,
    "audit_signing_key": what the restored store needs to verify its audit log, or None,
    "leftovers_removed": the staging directories of killed restores into ``data_dir`` removed}``.

    A backup holds no key, the audit signing key neither: when the store's audit checkpoints are
    signed, the key that signed them must be copied to ``signing_key_file`` (default
    ``data_dir/audit-signing.key``, where an embedded store looks for it) for ``audit verify``;
    the result says which key (its id), whether that file is there, and whether it is that key.

    The restored store is no cluster member: the node identity of a node's backup is removed (a
    restored copy started as its old node would hold less than that node acknowledged), and the
    backup's header is recorded in ``meta``. Open it offline (``--data-dir``), as an embedded store,
    or seed a new cluster from it (``mqstore restore --config ... --cluster-id ...``).

    Without ``node`` (the caller does not make a node of it) a node's backup becomes an embedded
    store: an embedded store applies each record in the commit that appends it, so its log must
    end where its state does. The node's Raft state is dropped and its log is cut back to its
    applied index: entries after it were not applied (and maybe not committed); the backup
    describes the state at the applied index. With ``node`` the Raft state is kept for
    :func:`mqstore.ops.recover.reseed`, which cuts the log the same way.

    All or nothing: the store is built in a new sibling directory of ``data_dir`` and moved into
    place only after ``finish(that directory)`` (the caller's seeding and checks) returned. When
    anything fails, that directory is removed and ``data_dir`` is as it was (not even created).
    """
    if data_dir.exists() and not data_dir.is_dir():
        raise InvalidArgument(f"{data_dir} exists and is not a directory")
    if (data_dir / "data.mdb").exists():
        raise InvalidArgument(f"{data_dir} already holds a store: restore into a new directory")
    header = read_header(backup)  # a missing or foreign file is refused before anything is written
    if node and header.get("source", {}).get("kind") != "node" and not header.get("term"):
        raise InvalidArgument("the backup holds an embedded store (no Raft state): only a cluster node's backup "
                              "can seed a cluster")
    leftovers = clear_restore_leftovers(data_dir)
    with _staging(data_dir) as work:
        with backup.open("rb") as src, (work / "data.mdb").open("xb") as dst:
            header, _ = read_backup(src, dst, progress)
            dst.flush()
            os.fsync(dst.fileno())
            os.fchmod(dst.fileno(), 0o600)
        with open_env(work, readonly=False) as env:
            if node:
                _check_seedable(env)
            done = None if node else _make_embedded(env)
            with env.env.begin(write=True) as txn:
                meta = env.dbs[b"meta"]
                txn.delete(META_NODE_ID, db=meta)
                txn.delete(META_CLUSTER_ID, db=meta)
                txn.delete(META_FOUNDING, db=meta)
                txn.put(META_RESTORED_FROM, json.dumps(header, sort_keys=True).encode(), db=meta)
            signing = signing_key_status(env, signing_key_file or data_dir / AUDIT_KEY_FILE)
        if finish is not None:
            finish(work)
    return {"header": header, "log": done, "audit_signing_key": signing,
            "leftovers_removed": [str(p) for p in leftovers]}


#: Files of a store directory that are not its data (LMDB's lock file and mqstore's writer lock):
#: never moved into the restored directory (they are made again when the store is opened).
_LOCK_FILES = ("lock.mdb", LOCK_FILE)


def _staging_prefix(data_dir: Path) -> str:
    return f".{data_dir.name}.restoring-"


def clear_restore_leftovers(data_dir: Path) -> list[Path]:
    """Remove the staging directories beside ``data_dir`` left by restores into it that were
    killed (each running restore holds a lock on its own, which is kept); returns them."""
    return remove_unowned(data_dir.absolute().parent, [_staging_prefix(data_dir)])


@contextlib.contextmanager
def _staging(data_dir: Path) -> Iterator[Path]:
    """A new directory beside ``data_dir`` to build a store in, locked by this run (see
    mqstore/ops/scratch.py: one nobody holds was left by a killed restore); when the block ends
    without an error its contents are moved into ``data_dir`` (created if missing; the store's
    ``data.mdb`` comes last, so ``data_dir`` holds a store only once it holds all of it). On an
    error it is removed, and so are the parents of ``data_dir`` that were made for it."""
    made: list[Path] = []
    parent = data_dir.absolute().parent
    for p in [parent, *parent.parents]:
        if p.exists():
            break
        made.append(p)
    for p in reversed(made):
        p.mkdir()
    try:
        with owned_temporary(parent, _staging_prefix(data_dir), directory=True) as (work, _fd):
            yield work
            for name in _LOCK_FILES:
                (work / name).unlink(missing_ok=True)
            if not data_dir.exists():
                os.rename(work, data_dir)  # (owned_temporary's removal then finds nothing)
            else:
                entries = sorted(work.iterdir(), key=lambda e: e.name == "data.mdb")
                taken = [e.name for e in entries if os.path.lexists(data_dir / e.name)]
                if taken:
                    raise InvalidArgument(f"{data_dir} already holds {', '.join(taken)}: restore into a new directory")
                for entry in entries:
                    os.rename(entry, data_dir / entry.name)
                fsync_path(data_dir)
        fsync_path(parent)
    except BaseException:
        for p in made:
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


def _check_seedable(env: Environment) -> None:
    """InvalidArgument unless the store in ``env`` can seed a cluster (it has a node's Raft state,
    and its applied index says which entries its state holds)."""
    raft = raft_facts(env)
    if raft is None:
        raise InvalidArgument("the backup holds an embedded store (no Raft state): only a cluster node's backup "
                              "can seed a cluster")
    _, last = log_bounds(env)
    if not raft.node_id and last > raft.applied_index:
        raise InvalidArgument(
            f"the backup is of a store restored from a node's backup by an earlier mqstore and written to since "
            f"(applied index {raft.applied_index}, log to {last}): which entries its state holds is not known, "
            "so it cannot seed a cluster")


#: Meta keys of a node that an embedded store has no use for (``raft.*``, ``member.*`` and these).
_NODE_META_KEYS = (META_NODE_ID, META_CLUSTER_ID, META_FOUNDING, META_REMOVED)
_NODE_META_PREFIXES = (b"raft.", META_MEMBER_PREFIX)
_META_LOG_TERM = b"log.term"


def _make_embedded(env: Environment) -> dict[str, Any] | None:
    """Make the node's store in ``env`` an embedded store (see :func:`restore`): cut its log back
    to its applied index and drop its Raft state, in one transaction. Returns what was done (None:
    nothing to do, it is an embedded store already)."""
    raft = raft_facts(env)
    if raft is None:
        return None
    first, last = log_bounds(env)
    applied = raft.applied_index
    if not raft.node_id and last > applied:
        # Restored by an earlier mqstore and written to as an embedded store since: the entries
        # after the applied index may be applied writes. Left as it is; verify and repair say why.
        return {"embedded": False, "applied_index": applied, "last_index": last, "log_cut_from": None,
                "entries_dropped": 0}
    cut_from = max(applied + 1, first)
    dropped = 0
    with env.env.begin(write=True) as txn:
        for table in (b"log", b"quarantine"):
            if table not in env.dbs:
                continue
            db = env.dbs[table]
            with txn.cursor(db=db) as cur:
                doomed = list(cur.iternext(values=False)) if cur.set_range(_U64_BE.pack(cut_from)) else []
            for key in doomed:
                txn.delete(key, db=db)
            if table == b"log":
                dropped = len(doomed)
        meta = env.dbs[b"meta"]
        with txn.cursor(db=meta) as cur:
            node_keys = [bytes(k) for k in cur.iternext(values=False)
                         if bytes(k).startswith(_NODE_META_PREFIXES) or bytes(k) in _NODE_META_KEYS]
        for key in node_keys:
            txn.delete(key, db=meta)
        # Records the embedded store appends continue the node's terms.
        txn.put(_META_LOG_TERM, _U64_BE.pack(raft.term), db=meta)
    return {"embedded": True, "applied_index": applied, "last_index": min(last, applied),
            "log_cut_from": cut_from if dropped else None, "entries_dropped": dropped}


__all__ = [
    "AUDIT_KEY_FILE",
    "FORMAT_VERSION",
    "MAGIC",
    "audit_key_facts",
    "backup_bytes",
    "backup_local",
    "check_file",
    "clear_leftovers",
    "copy_store",
    "describe_copy",
    "read_backup",
    "read_header",
    "restore",
    "signing_key_status",
    "write_file",
]
