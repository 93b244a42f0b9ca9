"""Model-based test of the queue semantics: the real store against a deliberately simple model.

A hypothesis state machine runs the same random sequence of operations (enqueue, lease, ack,
defer, bounce, hold, release, requeue, delete, bounce_message, maintenance, reopen) and clock moves on the real
:class:`mqstore.Store` and on :class:`Model` below: plain dicts and lists, no indexes, no
cleverness. After every step every observable must agree: return values and errors, every
message (``get``), ``stats``, ``list`` (with each state filter) and ``qshape``.

Time is a fake clock that only moves forward. The "default" namespace has an explicit retry
schedule (exact next-attempt times); "bulk" keeps the default Postfix backoff, whose +-10% jitter
the model cannot know: the model checks each deferral's delay is within the jitter bounds and then
takes the store's exact time, so later leasing is still compared exactly.

Besides the single operations there is a worker's round (wait, lease, settle each lease) so retry
histories of several attempts occur, rules that jump the clock exactly onto deadlines, due times
and expiry (boundaries), and a check that maintenance leaves nothing due (a second ``maintain()`` at
the same time does nothing and writes nothing: the background thread loops while anything is due).
The random part of message ids comes from a seeded generator, so failing examples replay and shrink.

``MQSTORE_MODEL_EXAMPLES`` sets the number of examples (default 60); ``MQSTORE_MODEL_STEPS`` the
steps per example (default 40). Minimal reproductions of what the model found are at the end.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import mqstore
import mqstore.ids
from mqstore import InvalidArgument, NotFound, StaleLease
from mqstore.crypto import create_key_file

EXAMPLES = int(os.environ.get("MQSTORE_MODEL_EXAMPLES", "60"))
STEPS = int(os.environ.get("MQSTORE_MODEL_STEPS", "40"))
#: Stores live in memory when possible: every commit is fsynced, and shrinking a failure replays
#: thousands of steps.
SCRATCH_DIR = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None

# --- the world the test draws from ----------------------------------------------------------------

START_MS = 1_800_000_000_000
SECOND = 1000
DAY = 86_400 * SECOND
LIFETIME_MS = 5 * DAY  # the default message lifetime
DEDUP_WINDOW_MS = DAY  # the default idempotency window
#: Retention of finished messages: 0 by default, but one with an expired recipient is kept at least
#: 7 days (policy ``expired_retention``) so the MTA can find it and send the DSN.
RETENTION_MS = 0
EXPIRED_RETENTION_MS = 7 * DAY

NAMESPACES = ("default", "bulk")
#: Explicit retry schedules (seconds; the last step repeats). Namespaces not listed keep the default.
SCHEDULES = {"default": (60, 300, 900)}
BACKOFF_MIN_MS = 300 * SECOND  # the default policy: 300 s doubling up to 4000 s, +-10% jitter
BACKOFF_MAX_MS = 4000 * SECOND

SENDERS = ("", "bounces@sender.example", "news@sender.example")
ADDRESSES = (
    "alice@a.example",
    "bob@a.example",
    "carol@B.Example",  # mixed case: its domain is b.example
    "dave@b.example",
    "erin@c.example",
    "frank@c.example",
    "grace@d.example",
)
FOREIGN_ADDRESS = "mallory@z.example"  # never a recipient
DOMAIN_FILTERS = (None, "a.example", "b.example", "B.EXAMPLE", "c.example", "d.example", "z.example")
BODIES = (b"", b"Subject: hi\r\n\r\nhello\r\n", b"x" * 300, bytes(range(256)))
KEYS = ("k1", "k2", "k3")
WORKERS = ("w1", "w2")
REASONS = ("", "451 4.7.1 try again later", "550 5.1.1 no such user")
UNKNOWN_ID = "0" * 26  # a well-formed id that is never issued (its time is 1970)
UNKNOWN_TOKENS = (0, 10**12)
ATTEMPTS_MAX = 65_535  # a recipient's attempt count stops there

QUEUED, LEASED, DEFERRED = "queued", "leased", "deferred"
DELIVERED, BOUNCED, EXPIRED = "delivered", "bounced", "expired"
STATES = (QUEUED, LEASED, DEFERRED, DELIVERED, BOUNCED, EXPIRED)
WAITING = (QUEUED, DEFERRED)
FINAL = (DELIVERED, BOUNCED, EXPIRED)
LIST_FILTERS = (None, *STATES, "held", "active", "done")
QSHAPE_BUCKETS_MIN = (0, 5, 10, 20, 40, 80, 160, 320, 640, 1280)


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


def backoff_bounds_ms(namespace: str, attempts: int) -> tuple[int, int]:
    """The delay after ``attempts`` attempts: (lowest, highest) allowed, in ms."""
    schedule = SCHEDULES.get(namespace)
    if schedule is not None:
        delay = schedule[min(attempts, len(schedule)) - 1] * SECOND
        return delay, delay
    base = min(BACKOFF_MIN_MS * 2 ** (attempts - 1), BACKOFF_MAX_MS)
    # +-10% of the base, never outside Postfix's minimum and maximum; 1 ms of slack below for the
    # store's float arithmetic truncating.
    return max(base * 9 // 10 - 1, BACKOFF_MIN_MS), min(base * 11 // 10, BACKOFF_MAX_MS)


class SeededRandomness:
    """Stands in for ``random_bytes`` inside :mod:`mqstore.ids`, so the random part of message ids
    comes from a seeded generator: ids decide lease order among equals and the jitter of the default
    backoff, so with OS randomness a failing example would not replay (nor shrink)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def __call__(self, n: int) -> bytes:
        return self.rng.randbytes(n)


_REAL_RANDOM_BYTES = vars(mqstore.ids)["random_bytes"]


def use_id_randomness(source: object) -> None:
    """Replace the function :mod:`mqstore.ids` takes its randomness from."""
    vars(mqstore.ids)["random_bytes"] = source


class FakeClock:
    """Epoch seconds for the store, kept as integer milliseconds so the model's times are exact."""

    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> float:
        return self.ms / 1000


# --- the model ---------------------------------------------------------------------------------------


class ModelStale(Exception):
    """The model says the store must raise StaleLease."""


class ModelNotFound(Exception):
    """The model says the store must raise NotFound."""


@dataclass
class Rcpt:
    address: str
    due_ms: int
    state: str = QUEUED
    attempts: int = 0
    token: int = 0  # while leased
    deadline_ms: int = 0  # while leased
    reason: str | None = None
    #: After a deferral under the jittered default backoff: the (lowest, highest) due time allowed.
    due_bounds: tuple[int, int] | None = None

    @property
    def domain(self) -> str:
        return domain_of(self.address)


@dataclass
class Msg:
    mid: str
    namespace: str
    mail_from: str
    data: bytes
    priority: int
    created_ms: int
    not_before_ms: int | None
    expires_at_ms: int
    idempotency_key: str | None
    rcpts: list[Rcpt]
    held: bool = False
    done: bool = False
    retain_until_ms: int = 0  # when done
    given_up: bool = False  # the operator bounced some recipients: kept like an expired message

    def count(self, state: str) -> int:
        return sum(1 for r in self.rcpts if r.state == state)


@dataclass
class ModelLease:
    mid: str
    deadline_ms: int
    ordinals: list[int]  # still held (settling some removes them)


@dataclass
class Model:
    now_ms: int
    msgs: dict[str, Msg] = field(default_factory=dict)
    gone: set[str] = field(default_factory=set)  # deleted or compacted
    leases: dict[int, ModelLease] = field(default_factory=dict)
    dedup: dict[tuple[str, str], tuple[str, int]] = field(default_factory=dict)  # -> (id, until)
    namespaces: set[str] = field(default_factory=set)  # namespaces that ever stored a message
    tokens: list[int] = field(default_factory=list)  # every token ever granted, in order
    ids: list[str] = field(default_factory=list)  # every id ever issued, in arrival order
    #: Namespace keys: the store makes its system key (1) when created, then one per namespace
    #: on first use, a batch's new namespaces in sorted order.
    keys: dict[str, int] = field(default_factory=dict)

    def assign_keys(self, namespaces: set[str]) -> None:
        for ns in sorted(namespaces):
            self.keys.setdefault(ns, 2 + len(self.keys))

    # -- enqueue --

    def duplicate_of(self, namespace: str, key: str | None) -> str | None:
        if key is None:
            return None
        hit = self.dedup.get((namespace, key))
        if hit is not None and self.now_ms < hit[1]:
            return hit[0]
        return None

    @staticmethod
    def lifetime_ms(spec: dict[str, Any]) -> int:
        return LIFETIME_MS if spec["expires_in"] is None else int(spec["expires_in"]) * SECOND

    @classmethod
    def refuses(cls, spec: dict[str, Any]) -> bool:
        """A message that would expire before its first attempt (its not_before at or after its
        expiry) is refused, and so is the whole call that carries it."""
        nb = spec["not_before_s"]
        return nb is not None and nb * SECOND >= cls.lifetime_ms(spec)

    def add(self, mid: str, spec: dict[str, Any]) -> None:
        ns = spec["namespace"]
        nb = spec["not_before_ms"]
        lifetime = self.lifetime_ms(spec)
        due = max(nb or 0, self.now_ms)
        self.msgs[mid] = Msg(
            mid=mid,
            namespace=ns,
            mail_from=spec["mail_from"],
            data=spec["data"],
            priority=spec["priority"],
            created_ms=self.now_ms,
            not_before_ms=nb,
            expires_at_ms=self.now_ms + lifetime,
            idempotency_key=spec["idempotency_key"],
            rcpts=[Rcpt(a, due) for a in spec["recipients"]],
        )
        self.namespaces.add(ns)
        self.ids.append(mid)
        if spec["idempotency_key"] is not None:
            self.dedup[(ns, spec["idempotency_key"])] = (mid, self.now_ms + DEDUP_WINDOW_MS)

    # -- time-driven changes (at lease and maintain) --

    def finish_if_done(self, m: Msg) -> None:
        if not m.done and all(r.state in FINAL for r in m.rcpts):
            m.done = True
            expired = m.given_up or any(r.state == EXPIRED for r in m.rcpts)
            m.retain_until_ms = self.now_ms + (max(RETENTION_MS, EXPIRED_RETENTION_MS) if expired else RETENTION_MS)

    def expire(self) -> None:
        now = self.now_ms
        for token, lease in sorted(self.leases.items()):
            if lease.deadline_ms > now:
                continue
            del self.leases[token]
            m = self.msgs[lease.mid]
            for o in lease.ordinals:
                r = m.rcpts[o]
                r.attempts = min(r.attempts + 1, ATTEMPTS_MAX)
                r.state = EXPIRED if now >= m.expires_at_ms else DEFERRED
                r.due_ms = now
                r.token = r.deadline_ms = 0
            self.finish_if_done(m)
        for m in self.msgs.values():
            if not m.done and m.expires_at_ms <= now:
                for r in m.rcpts:
                    if r.state in WAITING:
                        r.state = EXPIRED
                self.finish_if_done(m)

    def compact(self) -> int:
        """Maintenance's compaction: returns how many items (messages, dedup keys) it removed."""
        removed = 0
        for mid in [mid for mid, m in self.msgs.items() if m.done and m.retain_until_ms <= self.now_ms]:
            self.remove(mid)
            removed += 1
        for dkey in [k for k, (_, until) in self.dedup.items() if until <= self.now_ms]:
            del self.dedup[dkey]
            removed += 1
        return removed

    def remove(self, mid: str) -> None:
        del self.msgs[mid]
        self.gone.add(mid)
        for token in [t for t, lease in self.leases.items() if lease.mid == mid]:
            del self.leases[token]

    # -- leasing --

    def plan_lease(self, max_messages: int, namespace: str | None, domain: str | None) -> list[tuple[str, list[int]]]:
        def eligible(m: Msg, r: Rcpt) -> bool:
            return (
                r.state in WAITING
                and not m.held
                and r.due_ms <= self.now_ms
                and self.now_ms < m.expires_at_ms  # a message past its lifetime is never leased
                and (namespace is None or m.namespace == namespace)
                and (domain is None or r.domain == domain)
            )

        candidates = sorted(
            (-m.priority, r.due_ms, m.mid, o)
            for m in self.msgs.values()
            for o, r in enumerate(m.rcpts)
            if eligible(m, r)
        )
        picked: list[str] = []
        for _, _, mid, _ in candidates:
            if mid not in picked:
                picked.append(mid)
        out = []
        for mid in picked[:max_messages]:
            m = self.msgs[mid]
            out.append((mid, [o for o, r in enumerate(m.rcpts) if eligible(m, r)]))
        return out

    def grant(self, mid: str, ordinals: list[int], token: int, deadline_ms: int) -> None:
        for o in ordinals:
            r = self.msgs[mid].rcpts[o]
            r.state = LEASED
            r.token = token
            r.deadline_ms = deadline_ms
        self.leases[token] = ModelLease(mid, deadline_ms, list(ordinals))
        self.tokens.append(token)

    # -- settling --

    def settle(self, kind: str, token: int, addresses: list[str] | None, reason: str | None) -> list[int]:
        """ack / defer / bounce; returns the settled ordinals. Raises ModelStale (no change)."""
        lease = self.leases.get(token)
        if lease is None:
            raise ModelStale
        m = self.msgs[lease.mid]
        if addresses is None:
            ordinals = list(lease.ordinals)
        else:
            held = {m.rcpts[o].address: o for o in lease.ordinals}
            if any(a not in held for a in addresses) or len(set(addresses)) != len(addresses):
                raise ModelStale
            ordinals = [held[a] for a in addresses]
        for o in ordinals:
            r = m.rcpts[o]
            r.attempts = min(r.attempts + 1, ATTEMPTS_MAX)
            r.token = r.deadline_ms = 0
            if reason:
                r.reason = reason
            if kind == "ack":
                r.state = DELIVERED
            elif kind == "bounce":
                r.state = BOUNCED
            elif self.now_ms >= m.expires_at_ms:
                r.state = EXPIRED
            else:
                r.state = DEFERRED
                lo, hi = backoff_bounds_ms(m.namespace, r.attempts)
                if lo == hi:
                    r.due_ms = self.now_ms + lo
                else:
                    r.due_bounds = (self.now_ms + lo, self.now_ms + hi)
            lease.ordinals.remove(o)
        if not lease.ordinals:
            del self.leases[token]
        self.finish_if_done(m)
        return ordinals

    # -- administration --

    def admin(self, kind: str, mid: str) -> None:
        m = self.msgs.get(mid)
        if m is None:
            raise ModelNotFound
        if kind == "hold":
            m.held = True
        elif kind == "release":
            m.held = False
        elif kind == "requeue":
            for r in m.rcpts:
                if r.state == DEFERRED and r.due_ms > self.now_ms:
                    r.due_ms = self.now_ms
        elif kind == "delete":
            self.remove(mid)
        else:
            raise AssertionError(kind)

    def bounce_message(self, mid: str, reason: str | None) -> tuple[int, int]:
        """The operator's bounce: waiting recipients (held or not) bounce, counted as an attempt;
        leased ones are left. Returns (bounced, left leased)."""
        m = self.msgs.get(mid)
        if m is None:
            raise ModelNotFound
        bounced = 0
        for r in m.rcpts:
            if r.state in WAITING:
                r.state = BOUNCED
                r.attempts = min(r.attempts + 1, ATTEMPTS_MAX)
                r.reason = reason or "bounced by the operator"
                r.due_bounds = None
                bounced += 1
        m.given_up = m.given_up or bounced > 0
        self.finish_if_done(m)
        return bounced, m.count(LEASED)

    # -- what the store should show --

    def message(self, m: Msg) -> mqstore.Message:
        return mqstore.Message(
            message_id=m.mid,
            namespace=m.namespace,
            mail_from=m.mail_from,
            recipients=tuple(
                mqstore.RecipientStatus(
                    address=r.address,
                    state=r.state,
                    attempts=r.attempts,
                    next_attempt=r.due_ms / 1000 if r.state in WAITING else None,
                    last_reason=r.reason,
                    lease_token=r.token or None,
                    lease_deadline=r.deadline_ms / 1000 if r.token else None,
                )
                for r in m.rcpts
            ),
            data=m.data,
            priority=m.priority,
            created=m.created_ms / 1000,
            not_before=m.not_before_ms / 1000 if m.not_before_ms else None,
            expires_at=m.expires_at_ms / 1000,
            held=m.held,
            done=m.done,
            size=len(m.data),
            idempotency_key=m.idempotency_key,
            retain_until=m.retain_until_ms / 1000 if m.done else None,
            key_id=self.keys[m.namespace],
        )

    def summary(self, m: Msg) -> mqstore.MessageSummary:
        return mqstore.MessageSummary(
            message_id=m.mid,
            namespace=m.namespace,
            created=m.created_ms / 1000,
            priority=m.priority,
            size=len(m.data),
            held=m.held,
            done=m.done,
            recipients=len(m.rcpts),
            states={s: m.count(s) for s in STATES if m.count(s)},
        )

    def listing(
        self,
        state: str | None = None,
        namespace: str | None = None,
        domain: str | None = None,
        older_than_s: int | None = None,
    ) -> list[mqstore.MessageSummary]:
        def matches(m: Msg) -> bool:
            if namespace is not None and m.namespace != namespace:
                return False
            if older_than_s is not None and m.created_ms > self.now_ms - older_than_s * SECOND:
                return False
            if domain is not None and all(r.domain != domain for r in m.rcpts):
                return False
            if state == "held":
                return m.held
            if state == "active":
                return not m.done
            if state == "done":
                return m.done
            return state is None or m.count(state) > 0

        return [self.summary(m) for mid, m in sorted(self.msgs.items()) if matches(m)]

    def stats(self) -> dict[str, Any]:
        def block(msgs: list[Msg]) -> dict[str, Any]:
            return {
                "recipients": {s: sum(m.count(s) for m in msgs) for s in STATES},
                "messages": len(msgs),
                "messages_active": sum(1 for m in msgs if not m.done),
                "bytes": sum(len(m.data) for m in msgs),
            }

        msgs = list(self.msgs.values())
        live = [m.created_ms for m in msgs if not m.done]
        out = block(msgs)
        out["oldest_age_seconds"] = (self.now_ms - min(live)) / 1000 if live else 0.0
        out["namespaces"] = {
            ns: block([m for m in msgs if m.namespace == ns]) for ns in sorted(self.namespaces)
        }
        return out

    def qshape(self) -> mqstore.QShape:
        labels = (*(f"{a}-{b}" for a, b in itertools.pairwise(QSHAPE_BUCKETS_MIN)), f"{QSHAPE_BUCKETS_MIN[-1]}+")
        total = [0] * len(labels)
        domains: dict[str, list[int]] = {}
        for m in self.msgs.values():
            if m.held:
                continue
            age_min = max(0, self.now_ms - m.created_ms) / 60_000
            bucket = sum(1 for b in QSHAPE_BUCKETS_MIN[1:] if age_min >= b)
            for r in m.rcpts:
                if r.state in WAITING:
                    total[bucket] += 1
                    domains.setdefault(r.domain, [0] * len(labels))[bucket] += 1
        ordered = sorted(domains.items(), key=lambda kv: (-sum(kv[1]), kv[0]))
        return mqstore.QShape(labels, tuple(total), {d: tuple(c) for d, c in ordered})


# --- strategies ----------------------------------------------------------------------------------------

message_specs = st.fixed_dictionaries(
    {
        "mail_from": st.sampled_from(SENDERS),
        "recipients": st.lists(st.sampled_from(ADDRESSES), min_size=1, max_size=4, unique=True),
        "data": st.sampled_from(BODIES),
        "namespace": st.sampled_from(NAMESPACES),
        "priority": st.integers(-2, 2),
        "not_before_s": st.one_of(st.none(), st.none(), st.none(), st.integers(0, 600)),
        # Round values make lease deadlines, due times and expiry coincide (boundaries).
        "expires_in": st.one_of(st.none(), st.sampled_from([60, 300, 600, 3600]), st.integers(60, 20_000)),
        "idempotency_key": st.none() | st.sampled_from(KEYS),
    }
)

# Mostly small steps (leases last 30..600 s, the retry schedules 60..4000 s), sometimes up to
# 5000 s or a millisecond, rarely a jump past the idempotency window or the message lifetime.
_small_steps = st.integers(0, 300).map(lambda s: s * SECOND)
clock_steps_ms = st.one_of(
    _small_steps,
    _small_steps,
    _small_steps,
    _small_steps,
    st.integers(0, 5000).map(lambda s: s * SECOND),
    st.sampled_from([1, 999]),
    st.sampled_from([3600 * SECOND, DAY, DAY + 1, LIFETIME_MS + 1]),
)


# --- the state machine ------------------------------------------------------------------------------


@settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
class QueueMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="mqstore-model-", dir=SCRATCH_DIR))
        self.key_file = create_key_file(self.dir / "kek.key")
        self.clock = FakeClock(START_MS)
        self.model = Model(START_MS)
        self.store = self._open()

    def _open(self) -> mqstore.Store:
        return mqstore.open(self.dir / "store", clock=self.clock, background=False, key_file=self.key_file)

    @initialize(seed=st.integers(0, 2**32 - 1))
    def set_up(self, seed: int) -> None:
        use_id_randomness(SeededRandomness(seed))
        for ns, schedule in SCHEDULES.items():
            self.store.set_namespace_policy(ns, backoff=list(schedule))

    def teardown(self) -> None:
        try:
            self.store.close()
        finally:
            use_id_randomness(_REAL_RANDOM_BYTES)
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers --

    def _request(self, spec: dict[str, Any]) -> dict[str, Any]:
        nb = spec["not_before_s"]
        return {
            "mail_from": spec["mail_from"],
            "recipients": spec["recipients"],
            "data": spec["data"],
            "namespace": spec["namespace"],
            "priority": spec["priority"],
            "not_before": None if nb is None else (self.model.now_ms + nb * SECOND) / 1000,
            "expires_in": spec["expires_in"],
            "idempotency_key": spec["idempotency_key"],
        }

    def _record_enqueued(self, specs: list[dict[str, Any]], ids: list[str]) -> None:
        assert len(ids) == len(specs)
        self.model.assign_keys({spec["namespace"] for spec in specs})
        for spec, mid in zip(specs, ids, strict=True):
            earlier = self.model.duplicate_of(spec["namespace"], spec["idempotency_key"])
            if earlier is not None:
                assert mid == earlier, "an idempotency key inside its window must return the earlier id"
                continue
            assert mid not in self.model.ids, f"id {mid} issued twice"
            if self.model.ids:
                # Ids are time-ordered: a new message sorts after every earlier one (list order is
                # arrival order).
                assert mid > max(self.model.ids), f"new id {mid} sorts before an earlier id {max(self.model.ids)}"
            nb = spec["not_before_s"]
            self.model.add(mid, {**spec, "not_before_ms": None if nb is None else self.model.now_ms + nb * SECOND})

    @staticmethod
    def _weighted(data: st.DataObject, options: list[tuple[int, list[Any]]], label: str) -> Any:
        """One of the values, choosing among the non-empty lists by weight (earlier lists shrink first)."""
        live = [(w, values) for w, values in options if values]
        pick = data.draw(st.integers(0, sum(w for w, _ in live) - 1), label=f"{label} kind")
        for w, values in live:
            if pick < w:
                return data.draw(st.sampled_from(values), label=label)
            pick -= w
        raise AssertionError("unreachable")

    def _pick_token(self, data: st.DataObject) -> int:
        """Mostly a live lease; sometimes a settled/expired one or one never granted."""
        m = self.model
        return int(self._weighted(data, [(8, sorted(m.leases)), (2, m.tokens), (1, list(UNKNOWN_TOKENS))], "token"))

    def _pick_addresses(self, data: st.DataObject, token: int) -> list[str] | None:
        """None (all of the lease), a subset of what it holds, or a list that may name others."""
        lease = self.model.leases.get(token)
        if lease is not None:
            pool = [r.address for r in self.model.msgs[lease.mid].rcpts]
            held = [pool[o] for o in lease.ordinals]
        else:
            pool, held = list(ADDRESSES), []
        kind = self._weighted(data, [(4, ["all"]), (4, ["subset"] if held else []), (1, ["any"])], "recipients")
        if kind == "all":
            return None
        if kind == "subset":
            return data.draw(st.lists(st.sampled_from(held), min_size=1, max_size=len(held), unique=True))
        return data.draw(st.lists(st.sampled_from([*pool, FOREIGN_ADDRESS]), min_size=1, max_size=3))

    def _pick_id(self, data: st.DataObject, prefer: list[str]) -> str:
        """Mostly a stored message (often one of ``prefer``); sometimes a deleted or compacted one, or
        one never issued."""
        m = self.model
        options = [(6, prefer), (4, sorted(m.msgs)), (2, sorted(m.gone)), (1, [UNKNOWN_ID])]
        return str(self._weighted(data, options, "id"))

    def _adopt_jittered_dues(self, mid: str, ordinals: list[int]) -> None:
        """After a deferral under the jittered default backoff: check the store's next attempt is
        within the bounds, then take it as the model's (exact from here on)."""
        m = self.model.msgs[mid]
        got = self.store.get(mid)
        for o in ordinals:
            r = m.rcpts[o]
            if r.due_bounds is None:
                continue
            lo, hi = r.due_bounds
            nxt = got.recipients[o].next_attempt
            assert nxt is not None, f"deferred recipient {r.address} has no next attempt"
            due = round(nxt * 1000)
            assert lo <= due <= hi, (
                f"{r.address}: next attempt {due - self.model.now_ms} ms after the deferral, expected "
                f"{lo - self.model.now_ms}..{hi - self.model.now_ms} (attempts {r.attempts})"
            )
            r.due_ms = due
            r.due_bounds = None

    # -- rules: time --

    @rule(ms=clock_steps_ms)
    def advance(self, ms: int) -> None:
        self.clock.ms += ms
        self.model.now_ms = self.clock.ms

    @rule(data=st.data())
    def advance_to_event(self, data: st.DataObject) -> None:
        """Move the clock to just before, at or just after a time something becomes due."""
        m = self.model
        times = {lease.deadline_ms for lease in m.leases.values()}
        for msg in m.msgs.values():
            times.add(msg.expires_at_ms)
            times.update(r.due_ms for r in msg.rcpts if r.state in WAITING)
        times.update(until for _, until in m.dedup.values())
        future = sorted(t for t in times if t > m.now_ms)
        if not future:
            return
        target = data.draw(st.sampled_from(future), label="event") + data.draw(st.sampled_from([0, -1, 1]))
        self.clock.ms = m.now_ms = max(m.now_ms, target)

    # -- rules: enqueue --

    @rule(spec=message_specs)
    def enqueue(self, spec: dict[str, Any]) -> None:
        request = self._request(spec)
        if self.model.refuses(spec):
            with pytest.raises(InvalidArgument, match="would expire before its first attempt"):
                self.store.enqueue(**request)
            return
        mid = self.store.enqueue(**request)
        assert isinstance(mid, str)
        self._record_enqueued([spec], [mid])

    @rule(specs=st.lists(message_specs, min_size=2, max_size=6))
    def enqueue_many(self, specs: list[dict[str, Any]]) -> None:
        requests = [self._request(s) for s in specs]
        if any(self.model.refuses(s) for s in specs):
            with pytest.raises(InvalidArgument, match="would expire before its first attempt"):
                self.store.enqueue_many(requests)
            return
        ids = self.store.enqueue_many(requests)
        self._record_enqueued(specs, ids)

    # -- rules: leasing and settling --

    @rule()
    def lease_any(self) -> None:
        """The common case (Hypothesis favours rules without arguments): lease the two messages due first."""
        self._lease("w1", 2, 300, None, None)

    @rule(
        worker=st.sampled_from(WORKERS),
        max_messages=st.integers(1, 5),
        lease_seconds=st.sampled_from([30, 60, 300, 600]) | st.integers(30, 600),
        namespace=st.none() | st.sampled_from(NAMESPACES),
        domain=st.one_of(st.none(), st.sampled_from(DOMAIN_FILTERS)),
    )
    def lease(self, worker: str, max_messages: int, lease_seconds: int, namespace: str | None,
              domain: str | None) -> None:
        self._lease(worker, max_messages, lease_seconds, namespace, domain)

    def _lease(self, worker: str, max_messages: int, lease_seconds: int, namespace: str | None,
               domain: str | None) -> list[mqstore.Lease]:
        got = self.store.lease(worker, max_messages=max_messages, lease_seconds=lease_seconds, namespace=namespace,
                               domain=domain)
        m = self.model
        m.expire()
        plans = m.plan_lease(max_messages, namespace, None if domain is None else domain.lower())
        deadline_ms = m.now_ms + lease_seconds * SECOND
        assert [(g.message_id, g.recipients) for g in got] == [
            (mid, tuple(m.msgs[mid].rcpts[o].address for o in ords)) for mid, ords in plans
        ]
        last_token = max(m.tokens, default=0)
        for lease, (mid, ords) in zip(got, plans, strict=True):
            msg = m.msgs[mid]
            assert lease.token > last_token, f"token {lease.token} is not above the last one {last_token}"
            last_token = lease.token
            want = mqstore.Lease(
                message_id=mid,
                token=lease.token,
                namespace=msg.namespace,
                mail_from=msg.mail_from,
                recipients=tuple(msg.rcpts[o].address for o in ords),
                data=msg.data,
                attempts=max(msg.rcpts[o].attempts for o in ords),
                deadline=deadline_ms / 1000,
                priority=msg.priority,
            )
            assert lease == want
            m.grant(mid, ords, lease.token, deadline_ms)
        return got

    @rule(
        wait=st.sampled_from(["next retry", "next retry", 0, 60, 1200]),
        outcomes=st.lists(st.sampled_from(["defer", "defer", "ack", "bounce", "split", "hold", "keep"]), min_size=3,
                          max_size=3),
        reason=st.sampled_from(REASONS),
        to_expiry=st.sampled_from([False, False, False, True]),
    )
    def work_round(self, wait: int | str, outcomes: list[str], reason: str, to_expiry: bool) -> None:
        """A worker's round, so that retries pile up attempts: wait (seconds, or until the earliest
        deferred recipient is due), lease, maybe move the clock to exactly when the first leased
        message expires, then settle each lease (split: defer the first recipient, ack the others;
        hold: hold the message, then defer; keep: leave it leased)."""
        m = self.model
        if wait == "next retry":
            retries = [r.due_ms for x in m.msgs.values() for r in x.rcpts if r.state == DEFERRED and not x.held]
            self.clock.ms = m.now_ms = max(m.now_ms, min(retries, default=m.now_ms))
        else:
            assert isinstance(wait, int)
            self.advance(wait * SECOND)
        leases = self._lease("w2", len(outcomes), 300, None, None)
        if to_expiry and leases:
            first = min(self.model.msgs[x.message_id].expires_at_ms for x in leases)
            self.clock.ms = self.model.now_ms = max(self.model.now_ms, first)
        for lease, outcome in zip(leases, outcomes, strict=False):
            if outcome == "split" and len(lease.recipients) > 1:
                self._settle("defer", lease.token, [lease.recipients[0]], reason)
                self._settle("ack", lease.token, list(lease.recipients[1:]), None)
                continue
            if outcome == "hold":
                self._admin("hold", lease.message_id)
            if outcome in ("defer", "split", "hold"):
                self._settle("defer", lease.token, None, reason)
            elif outcome != "keep":
                self._settle(outcome, lease.token, None, None if outcome == "ack" else reason)

    def _settle(self, kind: str, token: int, addresses: list[str] | None, reason: str | None) -> None:
        mid = self.model.leases[token].mid if token in self.model.leases else None
        try:
            ordinals = self.model.settle(kind, token, addresses, reason)
        except ModelStale:
            stale = True
        else:
            stale = False
        try:
            if kind == "ack":
                self.store.ack(token, addresses)
            elif kind == "defer":
                self.store.defer(token, addresses, reason=reason or "")
            else:
                self.store.bounce(token, addresses, reason=reason or "")
        except StaleLease:
            assert stale, f"{kind}({token}, {addresses}) raised StaleLease; the model says the lease holds them"
            return
        assert not stale, f"{kind}({token}, {addresses}) succeeded; the model says it must raise StaleLease"
        if kind == "defer":
            assert mid is not None
            self._adopt_jittered_dues(mid, ordinals)

    def _settle_drawn(self, kind: str, data: st.DataObject) -> None:
        token = self._pick_token(data)
        addresses = self._pick_addresses(data, token)
        reason = None if kind == "ack" else data.draw(st.sampled_from(REASONS), label="reason")
        self._settle(kind, token, addresses, reason)

    @precondition(lambda self: bool(self.model.leases))
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        self._settle_drawn("ack", data)

    @precondition(lambda self: bool(self.model.leases))
    @rule(data=st.data())
    def defer(self, data: st.DataObject) -> None:
        self._settle_drawn("defer", data)

    @precondition(lambda self: bool(self.model.leases))
    @rule(data=st.data())
    def bounce(self, data: st.DataObject) -> None:
        self._settle_drawn("bounce", data)

    @rule(
        kind=st.sampled_from(["ack", "defer", "bounce"]),
        addresses=st.none() | st.lists(st.sampled_from([*ADDRESSES, FOREIGN_ADDRESS]), min_size=1, max_size=2),
        data=st.data(),
    )
    def settle_stale(self, kind: str, addresses: list[str] | None, data: st.DataObject) -> None:
        """A token that was settled, expired or never granted: StaleLease, nothing changes."""
        m = self.model
        old = [t for t in m.tokens if t not in m.leases]
        token = int(self._weighted(data, [(3, old), (1, list(UNKNOWN_TOKENS))], "stale token"))
        self._settle(kind, token, addresses, None if kind == "ack" else REASONS[1])

    @precondition(lambda self: bool(self.model.leases))
    @rule(data=st.data())
    def ack_many(self, data: st.DataObject) -> None:
        n = data.draw(st.integers(0, 3), label="n")
        tokens = [self._pick_token(data) for _ in range(n)]
        repeated = len(set(tokens)) != len(tokens)
        held = all(t in self.model.leases for t in tokens)
        try:
            self.store.ack_many(tokens)
        except InvalidArgument:
            assert repeated, f"ack_many({tokens}) raised InvalidArgument; no token is repeated"
            return
        except StaleLease:
            assert not repeated and not held, f"ack_many({tokens}) raised StaleLease; the model says all are held"
            return
        assert held and not repeated, f"ack_many({tokens}) succeeded; the model says a token is stale or repeated"
        for t in tokens:
            self.model.settle("ack", t, None, None)

    # -- rules: administration --

    def _admin(self, kind: str, mid: str) -> None:
        try:
            self.model.admin(kind, mid)
        except ModelNotFound:
            missing = True
        else:
            missing = False
        try:
            getattr(self.store, kind)(mid)
        except NotFound:
            assert missing, f"{kind}({mid}) raised NotFound; the model has the message"
            return
        assert not missing, f"{kind}({mid}) succeeded; the model says the message does not exist"

    @rule(kind=st.sampled_from(["hold", "release", "requeue", "delete"]), data=st.data())
    def admin(self, kind: str, data: st.DataObject) -> None:
        msgs = self.model.msgs
        if kind == "hold":  # holding a message while some of it is leased is the interesting case
            prefer = sorted(k for k, m in msgs.items() if any(r.state == LEASED for r in m.rcpts))
        else:
            prefer = sorted(k for k, m in msgs.items() if not m.done)
        self._admin(kind, self._pick_id(data, prefer))

    @rule(reason=st.sampled_from([None, *REASONS]), data=st.data())
    def bounce_message(self, reason: str | None, data: st.DataObject) -> None:
        """The operator gives up on a message: often one with leased recipients (they are left)."""
        msgs = self.model.msgs
        prefer = sorted(k for k, m in msgs.items() if not m.done and any(r.state == LEASED for r in m.rcpts))
        mid = self._pick_id(data, prefer or sorted(k for k, m in msgs.items() if not m.done))
        try:
            want: tuple[int, int] | None = self.model.bounce_message(mid, reason)
        except ModelNotFound:
            want = None
        try:
            got = self.store.bounce_message(mid, reason=reason)
        except NotFound:
            assert want is None, f"bounce_message({mid}) raised NotFound; the model has the message"
            return
        assert want is not None, f"bounce_message({mid}) succeeded; the model says the message does not exist"
        assert (got.message_id, got.bounced, got.left_leased) == (mid, *want)

    def _deferred_not_due(self) -> list[str]:
        now = self.model.now_ms
        return sorted(
            k for k, m in self.model.msgs.items() if any(r.state == DEFERRED and r.due_ms > now for r in m.rcpts)
        )

    @precondition(lambda self: bool(self._deferred_not_due()))
    @rule(data=st.data())
    def requeue_deferred(self, data: st.DataObject) -> None:
        self._admin("requeue", data.draw(st.sampled_from(self._deferred_not_due()), label="id"))

    @precondition(lambda self: any(m.held for m in self.model.msgs.values()))
    @rule(data=st.data())
    def release_held(self, data: st.DataObject) -> None:
        held = sorted(k for k, m in self.model.msgs.items() if m.held)
        self._admin("release", data.draw(st.sampled_from(held), label="id"))

    @rule()
    def maintain(self) -> None:
        done = self.store.maintain()
        self.model.expire()
        removed = self.model.compact()
        assert done["compacted"] == removed, f"maintain() compacted {done['compacted']} items, expected {removed}"
        # Maintenance leaves nothing due at this time: another pass does nothing and writes nothing
        # (the background thread runs maintain() again at once while anything is due).
        records = self.store.stats()["log"]["last_index"]
        again = self.store.maintain()
        assert again == {"expired": 0, "compacted": 0, "log_records_removed": 0}, f"second maintain(): {again}"
        assert self.store.stats()["log"]["last_index"] == records, "a second maintain() at the same time wrote"

    @rule(delete_newest=st.booleans(), then_enqueue=st.none() | message_specs)
    def reopen(self, delete_newest: bool, then_enqueue: dict[str, Any] | None) -> None:
        """Close and reopen: everything reads the same. Optionally delete the newest message first
        and enqueue right after (in the same millisecond): the reopened store's ids must still sort
        after every id issued before, deleted or compacted ones included."""
        if delete_newest and self.model.msgs:
            self._admin("delete", max(self.model.msgs))
        before = self._snapshot()
        self.store.close()
        self.store = self._open()
        assert self._snapshot() == before, "the store reads differently after closing and reopening it"
        if then_enqueue is not None:
            self.enqueue(then_enqueue)

    # -- reading --

    @rule(
        state=st.sampled_from(LIST_FILTERS),
        namespace=st.none() | st.sampled_from(NAMESPACES),
        domain=st.sampled_from(DOMAIN_FILTERS),
        older_than=st.none() | st.sampled_from([0, 60, 3600, 86_400]),
        limit=st.integers(1, 4),
    )
    def list_pages(self, state: str | None, namespace: str | None, domain: str | None, older_than: int | None,
                   limit: int) -> None:
        want = self.model.listing(state, namespace, None if domain is None else domain.lower(), older_than)
        got: list[mqstore.MessageSummary] = []
        after: str | None = None
        for _ in range(len(want) + 2):
            page = self.store.list(state=state, namespace=namespace, domain=domain, older_than=older_than,
                                   limit=limit, after=after)
            assert len(page) <= limit
            got.extend(page)
            after = page.next_after
            if after is None:
                break
            assert after == page[-1].message_id
        assert after is None, "list() kept returning pages"
        assert got == want

    def _snapshot(self) -> dict[str, Any]:
        messages: dict[str, mqstore.Message | None] = {}
        for mid in [*self.model.ids, UNKNOWN_ID]:
            try:
                messages[mid] = self.store.get(mid)
            except NotFound:
                messages[mid] = None
        stats = self.store.stats()
        # The log's and the disk's figures are not queue state; the compliance clock runs on the
        # process's monotonic clock, not the model's.
        del stats["log"], stats["disk"], stats["compliance_time"]
        return {
            "messages": messages,
            "stats": stats,
            "lists": {s: list(self.store.list(state=s)) for s in LIST_FILTERS},
            "qshape": self.store.qshape(),
        }

    @invariant()
    def store_matches_model(self) -> None:
        m = self.model
        for mid in m.ids:
            if mid in m.msgs:
                assert self.store.get(mid) == m.message(m.msgs[mid])
            else:
                try:
                    got = self.store.get(mid)
                except NotFound:
                    continue
                raise AssertionError(f"get({mid}) found a message the model deleted or compacted: {got}")
        try:
            self.store.get(UNKNOWN_ID)
        except NotFound:
            pass
        else:
            raise AssertionError("get() of an id never issued found something")
        stats = self.store.stats()
        # The log's and the disk's figures are not queue state; the compliance clock runs on the
        # process's monotonic clock, not the model's.
        del stats["log"], stats["disk"], stats["compliance_time"]
        assert stats == m.stats()
        for state in LIST_FILTERS:
            page = self.store.list(state=state)
            assert page.next_after is None
            assert list(page) == m.listing(state), f"list(state={state!r})"
        assert self.store.qshape() == m.qshape()


TestQueueModel = QueueMachine.TestCase


# --- minimal reproductions of what the model found -------------------------------------------------------


def _open_fresh(tmp_path: Path, clock: FakeClock) -> mqstore.Store:
    return mqstore.open(tmp_path / "store", clock=clock, background=False, key_file=create_key_file(tmp_path / "k"))


def _reopen(store: mqstore.Store, tmp_path: Path, clock: FakeClock) -> mqstore.Store:
    store.close()
    return mqstore.open(tmp_path / "store", clock=clock, background=False, key_file=tmp_path / "k")


def _log_records(store: mqstore.Store) -> int:
    return int(store.stats()["log"]["last_index"])


def _mail(key: str | None = None) -> dict[str, Any]:
    return {"mail_from": "a@x.example", "recipients": ["b@y.example"], "data": b"hi", "idempotency_key": key}


def test_ids_issued_after_reopening_sort_after_earlier_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ids are time-ordered and ``list`` is in id (= arrival) order, also across restarts in the same
    millisecond (or after the clock stepped back)."""
    monkeypatch.setitem(vars(mqstore.ids), "random_bytes", SeededRandomness(1))
    clock = FakeClock(START_MS)
    store = _open_fresh(tmp_path, clock)
    try:
        ids = [store.enqueue(**_mail())]
        for _ in range(10):
            store = _reopen(store, tmp_path, clock)
            ids.append(store.enqueue(**_mail()))
        assert [s.message_id for s in store.list()] == sorted(ids)
        assert ids == sorted(ids), "ids issued after reopening sort before earlier ones"
    finally:
        store.close()


def test_ids_of_deleted_messages_are_not_issued_again_after_reopening(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reopened store must not issue an id it issued before, even if that message was deleted (or
    compacted) meanwhile: its idempotency key still names it, and would then name an unrelated
    message. Starting the new id generator above the newest *stored* id is not enough."""
    monkeypatch.setitem(vars(mqstore.ids), "random_bytes", SeededRandomness(0))  # a seed where the next id collides
    clock = FakeClock(START_MS)
    store = _open_fresh(tmp_path, clock)
    try:
        _, deleted = store.enqueue_many([_mail(), _mail("k")])
        store.delete(deleted)
        store = _reopen(store, tmp_path, clock)
        new = store.enqueue(**_mail())
        assert new != deleted, "the id of a deleted message was issued again"
        assert new > deleted
        assert store.enqueue(**_mail("k")) == deleted
        assert [s.message_id for s in store.list()][-1] == new
    finally:
        store.close()


def test_maintenance_leaves_nothing_due_when_an_expired_message_is_still_leased(tmp_path: Path) -> None:
    """Maintenance leaves nothing due after a message expired with a recipient still leased. (Its entry
    in the expiry index used to stay, so every lease() and maintain() appended another EXPIRE record,
    and the background thread, which runs maintain() again at once while anything is due, spun
    writing about a thousand records a second until the lease ended.)"""
    clock = FakeClock(START_MS)
    with _open_fresh(tmp_path, clock) as store:
        store.enqueue(**_mail(), expires_in=60)
        assert len(store.lease("w", lease_seconds=600)) == 1
        clock.ms += 61 * SECOND
        store.maintain()
        records = _log_records(store)
        assert store.maintain() == {"expired": 0, "compacted": 0, "log_records_removed": 0}
        assert _log_records(store) == records


def test_maintenance_leaves_nothing_due_after_an_idempotency_key_is_reused(tmp_path: Path) -> None:
    """Maintenance leaves nothing due after an idempotency key is reused once its window passed but
    before maintenance removed it. (The new dedup entry used to leave the old one's expiry index key
    behind; compaction never removed it, so every maintain() appended a COMPACT record, forever, and
    the background thread spun writing them.)"""
    clock = FakeClock(START_MS)
    with _open_fresh(tmp_path, clock) as store:
        first = store.enqueue(**_mail("k"))
        clock.ms += DEDUP_WINDOW_MS + 1
        assert store.enqueue(**_mail("k")) != first
        store.maintain()
        records = _log_records(store)
        assert store.maintain() == {"expired": 0, "compacted": 0, "log_records_removed": 0}
        assert _log_records(store) == records
