"""Immutability: modes, the compliance clock, the request context, and THE enforcement function.

Every path that could change or remove a message, a retention period, a hold, a namespace's mode
or a key — the embedded API, gRPC, the CLI, applying a replicated entry, compaction, restore and
repair — decides through :func:`check`, inside the write transaction that would make the change.
Modes (per namespace; captured per message at enqueue, so changing a namespace's default never
changes existing messages):

NONE        no lock.
GOVERNANCE  until ``lock_until``, deleting or shortening needs the ``bypass_governance``
            permission AND an explicit bypass flag AND a reason (S3 Object Lock governance).
COMPLIANCE  until ``lock_until`` nobody may delete, overwrite or shorten, the local administrator
            included; extending is allowed; a namespace in COMPLIANCE mode can never leave it.

A legal hold (named by case id, several per message, no expiry) locks a message whatever its
retention, and no bypass lifts it.

Time for these decisions is the **compliance clock**: it starts from the wall clock when a store
is created, then advances only with the process's monotonic clock and is persisted, so setting
the wall clock ahead (or back) unlocks nothing. While no node runs, it does not advance: retention
is then effectively extended by the downtime, which errs on the safe side.

An entry's compliance time counts only up to :data:`COMPLIANCE_AHEAD_MAX_MS` (one day) ahead of
the time stamp the writer put on the entry itself (:func:`bounded`): a request context carried
from elsewhere, or an entry damaged or slipped into the log, can move the compliance clock (and
the judgement of that entry) at most that far past the queue's own time. An honest writer's
entries stay within it: its compliance clock runs at the rate of its time stamps, and gets ahead
of them only while the stamps stand still because the clock was set back (by more than a day,
retention is then judged a little later: the safe side).
"""

from __future__ import annotations

import dataclasses
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from mqstore.actor import LOCAL_ADMIN, Actor
from mqstore.errors import Corruption, InvalidArgument

SYSTEM_ACTOR = Actor("mqstore-system", frozenset({"admin", "compliance"}), auth="local", source="maintenance")
REASON_BYTES_MAX = 1024
SITE_BYTES_MAX = 255
#: How far ahead of its entry's own time stamp a request context's compliance time counts.
COMPLIANCE_AHEAD_MAX_MS = 86_400_000


class Mode(IntEnum):
    NONE = 0
    GOVERNANCE = 1
    COMPLIANCE = 2

    @classmethod
    def parse(cls, value: object) -> Mode:
        if isinstance(value, Mode):
            return value
        if isinstance(value, str) and value.upper() in cls.__members__:
            return cls[value.upper()]
        raise InvalidArgument(f"mode must be 'none', 'governance' or 'compliance', not {value!r}")


class ComplianceClock:
    """Milliseconds that never go backwards and do not follow the wall clock once started.

    A store that has none persisted yet starts it when it is first needed: from the time of the
    first entry it applies that carries one (a new replica takes the cluster's compliance time,
    whatever its own clock says), or else from ``wall_ms()`` (a node gives its clock corrected to
    the voters', see mqstore/node/clocks.py; a new embedded store the wall clock)."""

    def __init__(self, persisted_ms: int, wall_ms: Callable[[], int],
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._wall_ms = wall_ms
        self._lock = threading.Lock()
        self._base: int | None = persisted_ms if persisted_ms > 0 else None
        self._start = monotonic()

    def _now(self) -> int:  # with the lock held
        if self._base is None:
            self._base, self._start = self._wall_ms(), self._monotonic()
        return self._base + max(0, round((self._monotonic() - self._start) * 1000))

    def now_ms(self) -> int:
        with self._lock:
            return self._now()

    def observe(self, ms: int) -> None:
        """Never be behind ``ms`` (a time applied from the log, e.g. stamped by another leader)."""
        if ms <= 0:
            return
        with self._lock:
            if self._base is None:
                self._base, self._start = ms, self._monotonic()
                return
            now = self._now()
            if ms > now:
                self._base += ms - now


_CTX_HEAD = struct.Struct("<BQqqB")  # version, node id, wall ms, compliance ms, bypass


@dataclass(frozen=True, slots=True)
class Ctx:
    """Who asked, where and when: carried in every mutation entry, so every replica decides and
    audits the same thing."""

    actor: Actor = LOCAL_ADMIN
    node_id: int = 0
    site: str = ""
    wall_ms: int = 0
    compliance_ms: int = 0
    bypass: bool = False
    reason: str = ""

    def __post_init__(self) -> None:
        # Fields are refused when over what their encoding holds, never cut (a cut could split a
        # character, and the entry would not decode on any replica).
        if _utf8_len(self.site) > SITE_BYTES_MAX:
            raise InvalidArgument(f"a request context's site is a string of at most {SITE_BYTES_MAX} bytes (UTF-8)")
        if _utf8_len(self.reason) > REASON_BYTES_MAX:
            raise InvalidArgument(f"a reason is a string of at most {REASON_BYTES_MAX} bytes (UTF-8)")

    def encode(self) -> bytes:
        site = self.site.encode()
        reason = self.reason.encode()
        return (
            _CTX_HEAD.pack(1, self.node_id, self.wall_ms, self.compliance_ms, int(self.bypass))
            + bytes((len(site),)) + site
            + struct.pack("<H", len(reason)) + reason
            + self.actor.encode()
        )

    @classmethod
    def decode(cls, raw: bytes) -> Ctx:
        raw = bytes(raw)
        hit = _decoded_ctx.get(raw)
        if hit is not None:
            return hit
        try:
            version, node_id, wall, compliance, bypass = _CTX_HEAD.unpack_from(raw)
            off = _CTX_HEAD.size
            n = raw[off]
            site = raw[off + 1 : off + 1 + n].decode()
            off += 1 + n
            (m,) = struct.unpack_from("<H", raw, off)
            reason = raw[off + 2 : off + 2 + m].decode()
            off += 2 + m
            rest = raw[off:]
            decoded = _decoded_actor.get(rest)
            if decoded is None:
                decoded = Actor.decode(rest)
                _remember(_decoded_actor, rest, decoded)
            actor, used = decoded
        except (struct.error, IndexError, UnicodeDecodeError):
            raise Corruption("malformed request context") from None
        if version != 1 or off + used != len(raw):
            raise Corruption("malformed request context")
        ctx = cls(actor, node_id, site, wall, compliance, bool(bypass), reason)
        _remember(_decoded_ctx, raw, ctx)
        return ctx


def bounded(ctx: Ctx, stamp_ms: int) -> Ctx:
    """``ctx`` with its compliance time counted at most :data:`COMPLIANCE_AHEAD_MAX_MS` ahead of
    ``stamp_ms``, the time stamp of the entry that carries it (``ctx`` itself when within it).
    Deterministic: every replica applying the entry judges it at the same time."""
    limit = max(stamp_ms, 0) + COMPLIANCE_AHEAD_MAX_MS
    if ctx.compliance_ms <= limit:
        return ctx
    return dataclasses.replace(ctx, compliance_ms=limit)


#: Contexts and actors already decoded, by their bytes (both are immutable). A replica applying
#: a round decodes the context of every entry: the entries of one request (a stream frame, a
#: batch) share theirs, and a client's requests share its actor. Bounded; emptied when full.
_DECODED_MAX = 1024
_decoded_ctx: dict[bytes, Ctx] = {}
_decoded_actor: dict[bytes, tuple[Actor, int]] = {}


def _remember(cache: dict[bytes, Any], raw: bytes, value: Any) -> None:
    if len(cache) >= _DECODED_MAX:
        cache.clear()
    cache[raw] = value


def _utf8_len(text: object) -> int:
    """The UTF-8 length of ``text``; past every limit when it is not a string or not encodable."""
    if not isinstance(text, str):
        return 1 << 62
    try:
        return len(text.encode())
    except UnicodeEncodeError:  # a lone surrogate
        return 1 << 62


def check_reason(bypass: bool, reason: str | None) -> str:
    if isinstance(reason, str) and _utf8_len(reason) == 1 << 62:
        raise InvalidArgument("reason is not valid Unicode (lone surrogate)")
    if reason is not None and _utf8_len(reason) > REASON_BYTES_MAX:
        raise InvalidArgument(f"reason must be a string of at most {REASON_BYTES_MAX} bytes")
    if not isinstance(bypass, bool):
        raise InvalidArgument("bypass_governance must be True or False")
    return reason or ""


# --- the enforcement function ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lock:
    """A message's immutability as the enforcement function sees it."""

    namespace: str
    mode: Mode
    lock_until_ms: int
    holds: tuple[str, ...]


def _time(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request was refused; ``kind`` is ``permission`` (the actor may not do this at all)
    or ``immutable`` (retention, a legal hold or COMPLIANCE mode forbid it)."""

    reason: str
    kind: str = "immutable"


def check(op: str, ctx: Ctx, lock: Lock | None = None, *, permission: str | None = None,
          namespace: str | None = None, new_until_ms: int | None = None, new_mode: Mode | None = None,
          new_default_ms: int | None = None, current_mode: Mode | None = None,
          current_default_ms: int | None = None) -> Refusal | None:
    """Why ``op`` must be refused, or None if it may proceed. Pure: every input is passed in.

    ``op`` is one of ``delete`` (a message, by a person), ``compact`` (retention and housekeeping
    passed; never bypasses), ``retention`` (set a message's lock to ``new_until_ms``), ``hold``,
    ``release_hold``, ``policy`` (a namespace's mode and default retention), ``shred`` (a key) and
    ``drop`` (a namespace) — for the last two, ``lock`` is the most restrictive message concerned.
    """
    actor = ctx.actor
    ns = namespace if namespace is not None else (lock.namespace if lock is not None else None)
    if permission is not None and not actor.can(permission, ns):
        where = f" in namespace {ns!r}" if ns else ""
        return Refusal(f"actor {actor.name!r} lacks the {permission!r} permission{where}", "permission")
    why = _immutable(op, ctx, lock, ns, new_until_ms, new_mode, new_default_ms, current_mode, current_default_ms)
    return None if why is None else Refusal(why)


def _immutable(op: str, ctx: Ctx, lock: Lock | None, ns: str | None, new_until_ms: int | None,
               new_mode: Mode | None, new_default_ms: int | None, current_mode: Mode | None,
               current_default_ms: int | None) -> str | None:
    now = ctx.compliance_ms
    if op in ("delete", "compact", "shred", "drop"):
        if lock is None:
            return None
        if lock.holds:
            return f"legal hold(s) {', '.join(sorted(lock.holds))} lock the message; no bypass lifts a legal hold"
        if lock.mode == Mode.NONE or now >= lock.lock_until_ms:
            return None
        if lock.mode == Mode.COMPLIANCE:
            return (f"COMPLIANCE retention until {_time(lock.lock_until_ms)}: nobody can remove it before then, "
                    "an administrator included")
        if op == "delete" and _may_bypass(ctx, ns):
            return None
        return (f"GOVERNANCE retention until {_time(lock.lock_until_ms)}: removing it earlier needs the "
                "bypass_governance permission, bypass_governance=True and a reason")
    if op == "retention":
        assert lock is not None and new_until_ms is not None
        if lock.holds and new_until_ms < lock.lock_until_ms:
            return f"legal hold(s) {', '.join(sorted(lock.holds))} lock the message"
        if new_until_ms >= lock.lock_until_ms or lock.mode == Mode.NONE:
            return None
        if lock.mode == Mode.COMPLIANCE:
            return "COMPLIANCE retention can only be extended, never shortened"
        if _may_bypass(ctx, ns):
            return None
        return ("shortening GOVERNANCE retention needs the bypass_governance permission, bypass_governance=True "
                "and a reason")
    if op in ("hold", "release_hold"):
        return None
    if op == "policy":
        assert new_mode is not None and current_mode is not None
        assert new_default_ms is not None and current_default_ms is not None
        if current_mode == Mode.COMPLIANCE:
            if new_mode != Mode.COMPLIANCE:
                return "a namespace in COMPLIANCE mode can never leave it"
            if new_default_ms < current_default_ms:
                return "COMPLIANCE retention can only be extended, never shortened"
            return None
        if current_mode == Mode.GOVERNANCE and (new_mode == Mode.NONE or new_default_ms < current_default_ms):
            if _may_bypass(ctx, ns):
                return None
            return ("weakening GOVERNANCE mode or its retention needs the bypass_governance permission, "
                    "bypass_governance=True and a reason")
        return None
    raise AssertionError(f"unknown compliance operation {op!r}")


def _may_bypass(ctx: Ctx, namespace: str | None) -> bool:
    return ctx.bypass and bool(ctx.reason.strip()) and ctx.actor.can("bypass_governance", namespace)


__all__ = ["COMPLIANCE_AHEAD_MAX_MS", "SYSTEM_ACTOR", "ComplianceClock", "Ctx", "Lock", "Mode", "Refusal", "bounded",
           "check", "check_reason"]
