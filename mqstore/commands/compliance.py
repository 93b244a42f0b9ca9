"""Compliance commands: ``audit verify|export-checkpoint|tail|query``, ``keys rotate|shred|list``,
``policy set|show``, ``legal-hold add|remove``, ``retention extend``.

They work on a running cluster (``--server``) or on a store on disk (``--data-dir``; a stopped
node's or an embedded store). Every change goes through the same enforcement function as any
other path and is audited; a refusal exits 2 with the reason (``mqstore.Immutable`` or
``PermissionDenied``). ``audit verify`` exits 1 when it finds a problem and names the first bad
record.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

from mqstore import limits
from mqstore.api import AUDIT_KEY_FILE
from mqstore.commands._common import emit
from mqstore.commands.ops import Target, _config, _data_dir, add_target_args
from mqstore.errors import InvalidArgument, PermissionDenied


def _when(text: str) -> float:
    """Epoch seconds from ``2033-01-31``, ``2033-01-31T12:00:00Z`` or a number of seconds."""
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not 0 <= seconds <= limits.EPOCH_SECONDS_MAX:  # 1970 to the year 9999; refuses nan and infinity
            raise InvalidArgument(f"{text!r} is not a time from 1970 to the year 9999 (epoch seconds)")
        return seconds
    try:
        parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidArgument(f"{text!r} is not a date (2033-01-31, 2033-01-31T12:00:00Z) or epoch seconds") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


def _iso(ms: int | None) -> str:
    if not ms:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _record_line(r: dict[str, Any]) -> str:
    bits = [f"#{r['seq']}", _iso(r.get("time")), str(r.get("outcome", "")).upper(), str(r.get("op", "")),
            str(r.get("target", "")), f"by {r.get('actor')} ({r.get('auth')}, {r.get('source')})"]
    if r.get("bypass"):
        bits.append(f"bypass: {r.get('bypass_reason')!r}")
    if r.get("reason"):
        bits.append(f"- {r['reason']}")
    return "  ".join(bits)


# --- audit ------------------------------------------------------------------------------------------


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from mqstore.compliance import audit, signing

    trusted = None
    if args.trusted_checkpoint:
        try:
            trusted = audit.Checkpoint.from_json(Path(args.trusted_checkpoint).read_bytes())
        except OSError as exc:
            raise InvalidArgument(f"cannot read {args.trusted_checkpoint}: {exc.strerror}") from None
    public_key = None
    if args.public_key:
        public_key = signing.public_key_from_hex(args.public_key)
    elif args.signing_key:
        public_key = signing.read_signing_key(args.signing_key).public_key()
    with Target(args) as target:
        if target.remote:
            raise InvalidArgument("audit verify reads a store on disk: run it on a node's data dir (--data-dir), "
                                  "or on a backup restored somewhere")
        if public_key is None:
            # The store's own key checks its own checkpoints, with or without a trusted checkpoint:
            # on a cluster that one may have been signed by another node (each signs with its own
            # key; the records and roots are the same on every replica).
            conf = _config(args)
            if conf is not None and conf.audit_signing_key is not None:
                public_key = signing.read_signing_key(conf.audit_signing_key).public_key()  # the node's key
            else:
                own = Path(target.where) / AUDIT_KEY_FILE  # the store's (or a node's default) own signing key
                if own.exists():
                    public_key = signing.read_signing_key(own).public_key()
        if public_key is None and trusted is None:
            # Without a key nothing tells a re-signed or unsigned rewrite from the real log.
            raise InvalidArgument(
                f"no audit signing key to check the checkpoints with: {Path(target.where) / AUDIT_KEY_FILE} does "
                "not exist; give --signing-key FILE, --public-key HEX, --config (a node's audit_signing_key) or "
                "--trusted-checkpoint FILE (a checkpoint exported earlier, with its public key)")
        report = target.queue.audit_verify(trusted=trusted, public_key=public_key)
    out = report.to_dict()
    lines = []
    if report.ok:
        lines.append(f"audit log OK: {report.records_checked} records, {report.checkpoints_checked} checkpoints, "
                     f"{report.signatures_checked} signatures checked; head {report.head_seq}, root {report.root}")
    else:
        where = f"record {report.first_bad}" if report.first_bad is not None else (
            f"checkpoint {report.first_bad_checkpoint}" if report.first_bad_checkpoint is not None else "the log")
        lines.append(f"audit log TAMPERED or damaged: first bad: {where}")
        lines.extend(f"  {p}" for p in report.problems)
        if report.problems_omitted:
            lines.append(f"  ... and {report.problems_omitted} more")
    lines.extend(f"  note: {n}" for n in report.notes)
    emit(args, out, lines)
    return 0 if report.ok else 1


def _open_out(out: Path, force: bool) -> tuple[int, Path]:
    """Open where ``export-checkpoint`` writes, before anything is signed: ``out`` itself,
    created exclusively (it must not exist), or with ``force`` a new file beside it that replaces
    it once written. Returns the descriptor and the path it has now."""
    if os.path.isdir(out):
        raise InvalidArgument(f"{out} is a directory: name the file to write")
    if not force and os.path.lexists(out):
        raise InvalidArgument(f"{out} exists (pass --force to replace it)")
    try:
        if force:
            fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
            os.fchmod(fd, 0o644)  # as the file it replaces would be made: a checkpoint is no secret
            return fd, Path(name)
        return os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), out
    except FileExistsError:
        raise InvalidArgument(f"{out} exists (pass --force to replace it)") from None
    except OSError as exc:
        raise InvalidArgument(f"cannot write {out}: {exc.strerror}") from None


def cmd_audit_export(args: argparse.Namespace) -> int:
    # The output is opened first: a bad --out must not sign a checkpoint (a log entry, replicated
    # on a cluster) and then fail.
    out = None if args.out == "-" else Path(args.out)
    fd, written = -1, None
    if out is not None:
        fd, written = _open_out(out, args.force)
    try:
        with Target(args, write=True) as target:
            ckpt = target.queue.audit_checkpoint()
            node = None if ckpt is None else _signing_node(target, ckpt.size)
            remote = target.remote
        if ckpt is None:
            raise InvalidArgument("the audit log is empty: nothing to checkpoint yet")
        text = ckpt.to_json()
        text = text if text.endswith("\n") else text + "\n"
        if out is None or written is None:
            sys.stdout.write(text)
            return 0
        with os.fdopen(fd, "w") as f:
            fd = -1
            f.write(text)
        if written != out:
            os.replace(written, out)
        written = None
    finally:
        if fd >= 0:
            os.close(fd)
        if written is not None:
            written.unlink(missing_ok=True)  # created above, never filled: nothing left behind
    signer = f"key {ckpt.key_id}" if ckpt.signed else "no key (unsigned)"
    if node is not None:
        signer = f"node {node}'s {signer}"
    out_json = json.loads(text)
    out_json["node_id"] = node  # not part of the checkpoint (the file holds the checkpoint alone)
    emit(args, out_json, [
        f"checkpoint of {ckpt.size} audit records (root {ckpt.root}) signed with {signer}, written to {out}",
        "keep it somewhere the store's operators cannot change it; check later with: "
        + _verify_hint(args, out, remote),
    ])
    return 0


def _signing_node(target: Target, size: int) -> int | None:
    """The node that signed the checkpoint ``audit export-checkpoint`` just got: the node the
    checkpoint request's audit record (the last record it covers) names. None when that record is
    not the request (another checkpoint came in between) or cannot be read."""
    from mqstore.errors import MQStoreError
    from mqstore.queue.machine import CHECKPOINT_OP

    try:
        records = target.queue.audit_records(after=size - 1, limit=1)
    except MQStoreError:
        return None
    if not records or records[0].get("seq") != size or records[0].get("op") != CHECKPOINT_OP:
        return None
    node = records[0].get("node")
    return node if isinstance(node, int) and not isinstance(node, bool) and node > 0 else None


def _verify_hint(args: argparse.Namespace, out: Path, remote: bool) -> str:
    """The ``audit verify`` command that checks a store against the checkpoint just written: the
    same store on disk, or after an export from a cluster any node's data dir (each node's log
    verifies against it, with that node's own key for its own checkpoints)."""
    words = ["mqstore", "audit", "verify", "--trusted-checkpoint", shlex.quote(str(out))]
    if remote:
        words += ["--config", "NODE.toml", "(any node's config, or --data-dir DIR --key-file KEK: each node's log "
                  "checks against it)"]
        return " ".join(words)
    if getattr(args, "data_dir", None):
        words += ["--data-dir", shlex.quote(str(args.data_dir))]
    elif getattr(args, "config", None):
        words += ["--config", shlex.quote(str(args.config))]
    else:
        words += ["--data-dir", shlex.quote(str(_data_dir(args)))]
    if getattr(args, "key_file", None):
        words += ["--key-file", shlex.quote(str(args.key_file))]
    if getattr(args, "data_dir", None) and getattr(args, "config", None):
        words += ["--config", shlex.quote(str(args.config))]
    return " ".join(words)


def cmd_audit_tail(args: argparse.Namespace) -> int:
    with Target(args) as target:
        head = target.queue.audit_head()
        after = 0 if args.count <= 0 else max(0, head - args.count)  # -n 0 (or less): every record
        records = _records_after(target, after, head)
    emit(args, records, [_record_line(r) for r in records])
    return 0


def _records_after(target: Target, after: int, head: int) -> list[dict[str, Any]]:
    """Records ``after + 1`` .. ``head``, read a page at a time (one call returns at most
    AUDIT_READ_RECORDS_MAX)."""
    from mqstore.compliance.audit import AUDIT_READ_RECORDS_MAX

    out: list[dict[str, Any]] = []
    while after < head:
        page = target.queue.audit_records(after=after, limit=min(AUDIT_READ_RECORDS_MAX, head - after))
        if not page:
            break
        out.extend(page)
        after = page[-1]["seq"]
    return out


def cmd_audit_query(args: argparse.Namespace) -> int:
    where: dict[str, Any] = {}
    for name in ("op", "actor", "target", "outcome", "namespace"):
        value = getattr(args, name)
        if value is not None:
            where[name] = value
    filters: dict[str, Any] = {"where": where, "limit": args.limit}
    if args.since:
        filters["since_ms"] = round(_when(args.since) * 1000)
    if args.until:
        filters["until_ms"] = round(_when(args.until) * 1000)
    if args.after is not None:
        filters["after"] = args.after
    with Target(args) as target:
        records = target.queue.audit_query(**filters)
    emit(args, records, [_record_line(r) for r in records] or ["no matching audit records"])
    return 0


# --- keys, policy, holds, retention -----------------------------------------------------------------


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    with Target(args, write=True) as target:
        key_id = target.queue.rotate_key(args.namespace)
    emit(args, {"namespace": args.namespace, "key_id": key_id},
         [f"namespace {args.namespace!r}: new key {key_id}; new messages are sealed under it, older ones keep theirs"])
    return 0


def cmd_keys_shred(args: argparse.Namespace) -> int:
    if not args.yes:
        raise InvalidArgument(f"shredding key {args.key_id} makes every record sealed under it unreadable forever: "
                              "pass --yes to confirm")
    with Target(args, write=True) as target:
        before = _keys_if_listable(target)
        removed = target.queue.shred_key(args.key_id)
        after = _keys_if_listable(target) if before else []
    out: dict[str, Any] = {"key_id": args.key_id, "messages_removed": removed}
    lines = [f"key {args.key_id} shredded; {removed} finished message(s) sealed under it removed"]
    shredded = next((k for k in before if k["key_id"] == args.key_id), None)
    if shredded is not None and shredded["current"]:
        # Shredding a namespace's current key makes its newest live key current again: say so,
        # for an operator who rotated away from that older key because it was suspect.
        ns = shredded["namespace"]
        current = next((k["key_id"] for k in after if k["namespace"] == ns and k["current"]), None)
        out.update(namespace=ns, current_key_id=current)
        lines.append(f"it was namespace {ns!r}'s current key: new messages are now sealed under its older key "
                     f"{current} (run `mqstore keys rotate {ns}` for a new one)" if current is not None
                     else f"it was namespace {ns!r}'s last live key: its next message creates a new one")
    emit(args, out, lines)
    return 0


def _keys_if_listable(target: Target) -> list[dict[str, Any]]:
    """Every key (list_keys), or [] when this caller may not list them (listing needs read
    access to every namespace; shredding may be allowed without it)."""
    try:
        keys: list[dict[str, Any]] = target.queue.list_keys()
        return keys
    except PermissionDenied:
        return []


def cmd_keys_new_kek(args: argparse.Namespace) -> int:
    """A new random KEK in a file of its own. Every member of a cluster needs the same one (what
    replicates is ciphertext): create it once, copy it to each node before its bootstrap or join."""
    from mqstore.crypto import create_key_file

    path = create_key_file(args.file)
    emit(args, {"key_file": str(path)}, [
        f"created the key-encryption key {path} (mode 0600)",
        "copy this same file to every member of the cluster before its `mqstore bootstrap` or `mqstore join`, "
        "and keep a copy apart from the data (without it no message can be read)",
    ])
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    with Target(args) as target:
        keys = target.queue.list_keys()
    emit(args, keys, [f"{k['key_id']:>6}  {k['namespace']:<24} {'shredded' if k['shredded'] else 'live':<9} "
                      f"{'current' if k['current'] else ''}" for k in keys] or ["no keys"])
    return 0


def cmd_policy_set(args: argparse.Namespace) -> int:
    with Target(args, write=True) as target:
        policy = target.queue.set_policy(args.namespace, mode=args.mode, retention_days=args.retention_days,
                                         bypass_governance=args.bypass_governance, reason=args.reason)
    out = {"namespace": args.namespace, "mode": _mode_name(policy.mode),
           "retention_days": policy.lock_retention_ms / 86_400_000}
    emit(args, out, [f"namespace {args.namespace!r}: mode {out['mode']}, retention {out['retention_days']:g} days "
                     "for messages enqueued from now on"])
    return 0


def _mode_name(mode: int) -> str:
    from mqstore.compliance.rules import Mode

    return Mode(mode).name.lower()


def cmd_policy_show(args: argparse.Namespace) -> int:
    with Target(args) as target:
        policy = target.queue.get_policy(args.namespace)
    out = {"namespace": args.namespace, "mode": _mode_name(policy.mode),
           "retention_days": policy.lock_retention_ms / 86_400_000,
           "lifetime_s": policy.lifetime_ms / 1000, "housekeeping_retention_s": policy.retention_ms / 1000}
    emit(args, out, [f"namespace {args.namespace!r}: mode {out['mode']}, retention {out['retention_days']:g} days, "
                     f"message lifetime {out['lifetime_s']:g} s"])
    return 0


def cmd_hold(args: argparse.Namespace) -> int:
    with Target(args, write=True) as target:
        if args.action == "add":
            target.queue.add_legal_hold(args.message_id, case=args.case)
        else:
            target.queue.remove_legal_hold(args.message_id, case=args.case)
        holds = list(target.queue.get(args.message_id).legal_holds)
    verb = "placed" if args.action == "add" else "removed"
    emit(args, {"message_id": args.message_id, "legal_holds": holds},
         [f"legal hold {args.case!r} {verb}; holds now: {', '.join(holds) or 'none'}"])
    return 0


def cmd_retention_extend(args: argparse.Namespace) -> int:
    until = _when(args.until)
    with Target(args, write=True) as target:
        target.queue.extend_retention(args.message_id, until=until, bypass_governance=args.bypass_governance,
                                      reason=args.reason)
        m = target.queue.get(args.message_id)
    emit(args, {"message_id": args.message_id, "locked_until": m.locked_until},
         [f"message {args.message_id} locked ({m.retention_mode}) until {_iso(round((m.locked_until or 0) * 1000))}"])
    return 0


def _bypass_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bypass-governance", action="store_true",
                   help="lift GOVERNANCE retention (needs the bypass_governance permission and --reason)")
    p.add_argument("--reason", default=None, help="why (recorded in the audit log)")


def register(sub: Any) -> None:
    p = sub.add_parser("audit", help="the tamper-evident audit log: verify, export-checkpoint, tail, query")
    asub = p.add_subparsers(dest="audit_command", required=True)
    v = asub.add_parser("verify", help="recompute the hash chain, Merkle checkpoints and signatures (exit 1: bad)")
    add_target_args(v, server=False)
    v.add_argument("--trusted-checkpoint", default=None, help="a checkpoint exported earlier: detects truncation "
                   "and rewriting up to it (checked with its own key; on a cluster any node's export checks every "
                   "node's log, whose checkpoints are checked with that node's key)")
    v.add_argument("--public-key", default=None, help="the signing key's public key (hex)")
    v.add_argument("--signing-key", default=None, help="the audit signing key file (default: <data-dir>'s own)")
    v.set_defaults(func=cmd_audit_verify)
    e = asub.add_parser("export-checkpoint", help="sign a checkpoint over every record so far and write it out")
    add_target_args(e)
    e.add_argument("--out", required=True, help="file to write (- for stdout)")
    e.add_argument("--force", action="store_true", help="replace an existing file")
    e.set_defaults(func=cmd_audit_export)
    t = asub.add_parser("tail", help="the last audit records")
    add_target_args(t)
    t.add_argument("-n", "--count", type=int, default=20, help="how many (default 20)")
    t.set_defaults(func=cmd_audit_tail)
    q = asub.add_parser("query", help="audit records matching fields and a time range")
    add_target_args(q)
    for name in ("op", "actor", "target", "outcome", "namespace"):
        q.add_argument(f"--{name}", default=None, help=f"records whose {name} is exactly this")
    q.add_argument("--since", default=None, help="from this time (date, ISO time or epoch seconds)")
    q.add_argument("--until", default=None, help="before this time")
    q.add_argument("--after", type=int, default=None, help="records after this sequence number (paging)")
    q.add_argument("--limit", type=int, default=1000, help="at most this many (default 1000)")
    q.set_defaults(func=cmd_audit_query)

    p = sub.add_parser("keys", help="namespace keys: rotate, shred (crypto-shredding), list")
    ksub = p.add_subparsers(dest="keys_command", required=True)
    r = ksub.add_parser("rotate", help="a new key for a namespace; old records still decrypt")
    add_target_args(r)
    r.add_argument("namespace")
    r.set_defaults(func=cmd_keys_rotate)
    s = ksub.add_parser("shred", help="destroy a key: its records become unreadable (refused while any is retained)")
    add_target_args(s)
    s.add_argument("key_id", type=int)
    s.add_argument("--yes", action="store_true", help="confirm: this cannot be undone")
    s.set_defaults(func=cmd_keys_shred)
    ls = ksub.add_parser("list", help="every key: namespace, live or shredded, current")
    add_target_args(ls)
    ls.set_defaults(func=cmd_keys_list)
    kek = ksub.add_parser("new-kek", help="create a key-encryption key file (0600) for a new cluster's members")
    kek.add_argument("file", help="where to write it (an existing file is never overwritten)")
    kek.add_argument("--json", action="store_true", help="machine-readable output")
    kek.set_defaults(func=cmd_keys_new_kek)

    p = sub.add_parser("policy", help="a namespace's immutability mode and retention")
    psub = p.add_subparsers(dest="policy_command", required=True)
    ps = psub.add_parser("set", help="mode none|governance|compliance and retention days for new messages")
    add_target_args(ps)
    ps.add_argument("namespace")
    ps.add_argument("--mode", required=True, choices=("none", "governance", "compliance"))
    ps.add_argument("--retention-days", type=float, default=None)
    _bypass_args(ps)
    ps.set_defaults(func=cmd_policy_set)
    pg = psub.add_parser("show", help="a namespace's mode and retention")
    add_target_args(pg)
    pg.add_argument("namespace")
    pg.set_defaults(func=cmd_policy_show)

    p = sub.add_parser("legal-hold", help="place or remove a named legal hold on a message")
    p.add_argument("action", choices=("add", "remove"))
    p.add_argument("message_id")
    p.add_argument("--case", required=True, help="the case id, e.g. SEC-2026-17")
    add_target_args(p)
    p.set_defaults(func=cmd_hold)

    p = sub.add_parser("retention", help="extend a message's retention")
    rsub = p.add_subparsers(dest="retention_command", required=True)
    x = rsub.add_parser("extend", help="lock the message until a later time (shortening needs a governance bypass)")
    add_target_args(x)
    x.add_argument("message_id")
    x.add_argument("--until", required=True, help="date, ISO time or epoch seconds")
    _bypass_args(x)
    x.set_defaults(func=cmd_retention_extend)


__all__ = ["register"]
