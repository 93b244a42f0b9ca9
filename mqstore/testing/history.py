"""A concurrent queue workload that records its history, and a checker for that history.

In the manner of Jepsen, simplified. :class:`Workload` runs client threads against a cluster,
each with its own :class:`mqstore.client.Client` on every node address:

* *enqueuers* enqueue messages, each with an idempotency key the checker knows
  (``<run>-e<thread>-<n>``; the key is also in the message's subject and body). When an enqueue
  fails without an answer (Unavailable: it may or may not be stored) the thread retries it with
  the same key, as an MTA would — so duplicates from retries would show.
* *workers* lease messages with short leases and settle each lease: ack (most), defer, or
  abandon it — an abandoned lease is acked anyway once its deadline has passed ("late ack"): a
  probe of the fencing tokens, since by then the recipients may have been leased to someone else.

Every operation is an :class:`Op` with its invocation and completion times (epoch seconds, the
clock the servers stamp leases with: every process runs on this machine) and its outcome:

* ``ok`` — the call returned;
* ``fail`` — refused for certain, nothing changed (InvalidArgument, NotFound);
* ``stale`` — StaleLease. For a settle this is ambiguous: the client retries a settle whose
  answer was lost, and the retry finds the lease settled (see mqstore.client);
* ``unknown`` — no answer (Unavailable, NotLeader when time ran out, anything unexpected): it may
  or may not have taken effect.

After the faults are healed and the cluster converged, :func:`read_final_state` reads the
namespace through a client and :func:`check` holds the history against it:

(a) **no acknowledged enqueue lost**: every id an enqueue returned is stored, with its key, data
    and recipients (finished messages are retained: the namespace's retention is an hour);
(b) **no duplicates**: at most one stored message per idempotency key (exactly one for a key
    that was acknowledged), and every attempt with one key returned the same id;
(c) **fencing**: no lease token was granted twice; two grants of one recipient never overlap (a
    later grant before the earlier lease's deadline needs a settle of the earlier one first); an
    ack that returned ok under token ``t1`` means no later lease ``t2 > t1`` of the same recipient
    was ever granted (that ack would have been accepted under a stale token) and the recipient
    ends up delivered; a defer that returned ok was not invoked after a later grant was seen;
    every delivered recipient was acked by someone.

Replica convergence (d) is checked on the cluster: :meth:`LocalCluster.wait_converged`,
:meth:`LocalCluster.state_digest`, :meth:`LocalCluster.scan`.
"""

from __future__ import annotations

import itertools
import random
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from mqstore import errors
from mqstore.api import Lease, Message
from mqstore.client import Client

OK = "ok"
FAIL = "fail"
STALE = "stale"
UNKNOWN = "unknown"

#: Operation kinds that change state when they succeed (a lease only when it granted something).
WRITES = frozenset(("enqueue", "lease", "ack", "defer", "late_ack"))
SETTLES = frozenset(("ack", "defer", "late_ack"))
ACKS = frozenset(("ack", "late_ack"))

#: Slack for comparing a lease's deadline (stamped in ms by the leader) with this process's clock.
CLOCK_SLACK_S = 0.01

T = TypeVar("T")


def classify(exc: BaseException) -> tuple[str, str]:
    """(outcome, error text) of a call that raised ``exc``."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, errors.StaleLease):
        return STALE, text
    if isinstance(exc, (errors.InvalidArgument, errors.NotFound)):
        return FAIL, text
    return UNKNOWN, text


# --- the history -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grant:
    """One lease a worker received."""

    token: int
    message_id: str
    recipients: tuple[str, ...]
    deadline: float
    worker: str


@dataclass
class Op:
    """One client call: who, what, when, and how it ended."""

    process: str
    kind: str  # enqueue | lease | ack | defer | late_ack
    invoke: float
    complete: float = 0.0
    outcome: str = UNKNOWN
    error: str = ""
    node: str = ""  # the address that answered (ok calls)
    # enqueue
    key: str = ""
    attempt: int = 0
    recipients: tuple[str, ...] = ()
    message_id: str = ""
    # lease (grants) / settles (token)
    token: int = 0
    grants: tuple[Grant, ...] = ()

    @property
    def is_write(self) -> bool:
        return self.outcome == OK and self.kind in WRITES and (self.kind != "lease" or bool(self.grants))

    def describe(self) -> str:
        what = {
            "enqueue": f"enqueue key={self.key} attempt={self.attempt}",
            "lease": f"lease -> {[g.token for g in self.grants]}",
        }.get(self.kind, f"{self.kind} token={self.token}")
        result = self.outcome + (f" ({self.error})" if self.error else "")
        if self.message_id:
            result += f" id={self.message_id}"
        return f"[{self.process} {self.invoke:.3f}..{self.complete:.3f} via {self.node or '?'}] {what}: {result}"


class History:
    """The operations of a run, appended as they complete (thread safe)."""

    def __init__(self) -> None:
        self._ops: list[Op] = []
        self._lock = threading.Lock()

    def add(self, op: Op) -> None:
        with self._lock:
            self._ops.append(op)

    @property
    def ops(self) -> list[Op]:
        with self._lock:
            return sorted(self._ops, key=lambda o: o.invoke)

    def __len__(self) -> int:
        with self._lock:
            return len(self._ops)

    def write_count(self) -> int:
        with self._lock:
            return sum(1 for o in self._ops if o.is_write)

    def first_write_after(self, t0: float, *, not_via: str = "") -> Op | None:
        """The first successful write that completed after ``t0`` and was answered by a node
        other than ``not_via`` (the address of a node that was killed, say)."""
        with self._lock:
            writes = [o for o in self._ops if o.is_write and o.complete > t0 and o.node != not_via]
        return min(writes, key=lambda o: o.complete, default=None)

    def write_gaps(self, start: float, end: float) -> float:
        """The longest time within [start, end] with no successful write completing."""
        times = sorted(o.complete for o in self.ops if o.is_write and start <= o.complete <= end)
        edges = [start, *times, end]
        return max(b - a for a, b in itertools.pairwise(edges))

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for o in self.ops:
            out[f"{o.kind}.{o.outcome}"] += 1
            if o.kind == "lease":
                out["grants"] += len(o.grants)
        return dict(sorted(out.items()))


# --- the workload ------------------------------------------------------------------------------


@dataclass
class WorkloadConfig:
    namespace: str = "faults"
    enqueuers: int = 2
    workers: int = 2
    #: Pause between one key's enqueue and the next, per enqueuer thread (seconds).
    enqueue_interval: float = 0.03
    #: Attempts per key (the first plus retries after an unknown outcome).
    enqueue_attempts: int = 4
    #: A second recipient for this share of messages.
    two_recipients: float = 0.5
    lease_seconds: float = 3.0
    max_messages: int = 4
    #: How workers settle a lease: ack, defer; the rest are abandoned and acked late.
    ack_share: float = 0.8
    defer_share: float = 0.1
    #: An abandoned lease is acked this long after its deadline.
    late_ack_after: float = 1.0
    defer_backoff: float = 1.0
    #: Each call's time, retries included; one attempt may use half of it (then the client tries
    #: another node), so a hung leader costs a call 2 s.
    client_timeout: float = 4.0
    seed: int = 0


class Workload:
    """Client threads running enqueue / lease / ack / defer against ``addresses`` until stopped."""

    def __init__(self, addresses: list[str], config: WorkloadConfig | None = None, *, run_id: str = "") -> None:
        self.addresses = list(addresses)
        self.config = config or WorkloadConfig()
        self.run_id = run_id or f"r{random.randrange(16**6):06x}"
        self.history = History()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.crashes: list[str] = []  # a thread that died of an unexpected exception

    # --- life ---------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Keep finished messages (so the checker finds every one) and retry deferred
        recipients soon. Call once, before :meth:`start`."""
        with Client(self.addresses, timeout=30) as client:
            client.set_namespace_policy(
                self.config.namespace, retention=3600, backoff=[self.config.defer_backoff]
            )

    def start(self) -> None:
        cfg = self.config
        for i in range(cfg.enqueuers):
            self._spawn(f"enq{i}", self._enqueuer, i)
        for i in range(cfg.workers):
            self._spawn(f"wrk{i}", self._worker, i)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the threads (each finishes its current call; calls are bounded by the client's
        timeout)."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            raise RuntimeError(f"workload threads did not stop within {timeout} s: {alive}")

    def __enter__(self) -> Workload:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, name: str, target: Callable[[int], None], i: int) -> None:
        def run() -> None:
            try:
                target(i)
            except BaseException as exc:  # recorded: the test fails on it
                self.crashes.append(f"{name}: {type(exc).__name__}: {exc}")
                raise

        t = threading.Thread(target=run, name=f"{self.run_id}-{name}", daemon=True)
        self._threads.append(t)
        t.start()

    def wait_for(self, predicate: Callable[[History], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.history):
                return True
            time.sleep(0.02)
        return predicate(self.history)

    def wait_for_writes(self, n: int, timeout: float = 30.0) -> bool:
        """Wait until ``n`` more successful writes than now have completed."""
        start = self.history.write_count()
        return self.wait_for(lambda h: h.write_count() >= start + n, timeout)

    def failover_time(self, t0: float, killed_address: str, timeout: float = 30.0) -> float:
        """Seconds from ``t0`` (a leader's kill) to the first successful write answered by another
        node, waiting up to ``timeout`` for it (raises TimeoutError)."""
        found: list[Op] = []

        def seen(h: History) -> bool:
            op = h.first_write_after(t0, not_via=killed_address)
            if op is not None:
                found.append(op)
            return op is not None

        if not self.wait_for(seen, timeout):
            raise TimeoutError(f"no write served by a node other than {killed_address} within {timeout} s")
        return found[-1].complete - t0

    # --- client threads -----------------------------------------------------------------------------

    def _call(self, client: Client, op: Op, fn: Callable[[], T]) -> T | None:
        try:
            result = fn()
        except errors.MQStoreError as exc:
            op.outcome, op.error = classify(exc)
            op.complete = time.time()
            self.history.add(op)
            return None
        op.complete = time.time()
        op.outcome = OK
        op.node = client.leader or ""
        return result

    def _enqueuer(self, i: int) -> None:
        cfg = self.config
        rng = random.Random(f"{cfg.seed}-enq-{i}")
        with Client(self.addresses, timeout=cfg.client_timeout) as client:
            n = 0
            while not self._stop.is_set():
                n += 1
                key = f"{self.run_id}-e{i}-{n}"
                recipients = [f"u{i}x{n}@d{n % 3}.example"]
                if rng.random() < cfg.two_recipients:
                    recipients.append(f"v{i}x{n}@d{(n + 1) % 3}.example")

                def enqueue(key: str = key, recipients: list[str] = recipients) -> str:
                    data = message_data(key)
                    return client.enqueue("sender@example.org", recipients, data, cfg.namespace, idempotency_key=key)

                for attempt in range(1, cfg.enqueue_attempts + 1):
                    op = Op(f"enq{i}", "enqueue", time.time(), key=key, attempt=attempt, recipients=tuple(recipients))
                    mid = self._call(client, op, enqueue)
                    if mid is None:
                        if op.outcome == UNKNOWN and not self._stop.is_set():
                            continue  # no answer: it may be stored; try again with the same key
                        break
                    op.message_id = mid
                    self.history.add(op)
                    break
                self._stop.wait(cfg.enqueue_interval)

    def _worker(self, i: int) -> None:
        cfg = self.config
        rng = random.Random(f"{cfg.seed}-wrk-{i}")
        name = f"wrk{i}"
        late: list[tuple[float, Grant]] = []  # (when to ack, abandoned lease)
        with Client(self.addresses, timeout=cfg.client_timeout) as client:
            while not self._stop.is_set():
                now = time.time()
                for due, grant in [x for x in late if x[0] <= now]:
                    late.remove((due, grant))
                    self._settle(client, name, "late_ack", grant)
                op = Op(name, "lease", time.time())
                leases = self._call(
                    client,
                    op,
                    lambda: client.lease(
                        name, max_messages=cfg.max_messages, lease_seconds=cfg.lease_seconds,
                        namespace=cfg.namespace,
                    ),
                )
                if leases is None:
                    self._stop.wait(0.05)
                    continue
                op.grants = tuple(_grant(lease, name) for lease in leases)
                self.history.add(op)
                if not leases:
                    self._stop.wait(0.05)
                    continue
                for grant in op.grants:
                    if self._stop.is_set():
                        break
                    r = rng.random()
                    if r < cfg.ack_share:
                        self._settle(client, name, "ack", grant)
                    elif r < cfg.ack_share + cfg.defer_share:
                        self._settle(client, name, "defer", grant)
                    else:
                        late.append((grant.deadline + cfg.late_ack_after, grant))

    def _settle(self, client: Client, name: str, kind: str, grant: Grant) -> None:
        op = Op(name, kind, time.time(), token=grant.token, message_id=grant.message_id)

        def settle() -> bool:
            if kind == "defer":
                client.defer(grant.token, reason="4.4.1 test deferral")
            else:
                client.ack(grant.token)
            return True

        if self._call(client, op, settle):
            self.history.add(op)


def _grant(lease: Lease, worker: str) -> Grant:
    return Grant(lease.token, lease.message_id, tuple(lease.recipients), lease.deadline, worker)


def message_data(key: str) -> bytes:
    """The RFC 5322 bytes of the workload's message with idempotency key ``key``."""
    return (
        f"From: <sender@example.org>\r\nTo: <undisclosed>\r\nSubject: {key}\r\n"
        f"Message-ID: <{key}@mqstore.test>\r\n\r\nkey={key}\r\n"
    ).encode()


# --- the final state ---------------------------------------------------------------------------


@dataclass
class FinalState:
    """The namespace as read after the run: every message (with recipient states) by id."""

    messages: dict[str, Message] = field(default_factory=dict)
    #: Ids from the history that were not listed, with what get() said about them.
    not_found: dict[str, str] = field(default_factory=dict)


def read_final_state(addresses: list[str], namespace: str, history: History, timeout: float = 30.0) -> FinalState:
    """List and get every message of ``namespace`` (and any id the history names that the
    listing lacks) through a client: linearizable reads on the leader."""
    state = FinalState()
    with Client(addresses, timeout=timeout) as client:
        after: str | None = None
        while True:
            page = client.list(namespace=namespace, limit=1000, after=after)
            for summary in page:
                state.messages[summary.message_id] = client.get(summary.message_id)
            if page.next_after is None:
                break
            after = page.next_after
        named = {o.message_id for o in history.ops if o.message_id and o.outcome == OK}
        named |= {g.message_id for o in history.ops for g in o.grants}
        for mid in sorted(named - set(state.messages)):
            try:
                state.messages[mid] = client.get(mid)
            except errors.NotFound as exc:
                state.not_found[mid] = str(exc)
    return state


# --- the checker -------------------------------------------------------------------------------


@dataclass
class Report:
    """What :func:`check` found: ``problems`` (empty when every invariant holds) and counts."""

    problems: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, text: str) -> None:
        self.problems.append(text)

    def __str__(self) -> str:
        head = ", ".join(f"{k}={v}" for k, v in self.counts.items())
        if self.ok:
            return f"history OK ({head})"
        shown = self.problems[:40]
        more = f"\n  ... and {len(self.problems) - len(shown)} more" if len(self.problems) > len(shown) else ""
        return f"{len(self.problems)} violation(s) ({head}):\n  " + "\n  ".join(shown) + more


def check(history: History, final: FinalState, namespace: str) -> Report:
    """Hold ``history`` against ``final`` (see the module doc for the invariants)."""
    ops = history.ops
    report = Report()
    _check_enqueues(ops, final, namespace, report)
    grants = _check_grants(ops, final, report)
    _check_settles(ops, grants, final, report)
    c = history.counts()
    delivered = sum(1 for m in final.messages.values() for r in m.recipients if r.state == "delivered")
    report.counts = {
        "keys": len({o.key for o in ops if o.kind == "enqueue"}),
        "keys_acked": len({o.key for o in ops if o.kind == "enqueue" and o.outcome == OK}),
        "keys_retried": len({o.key for o in ops if o.kind == "enqueue" and o.attempt > 1}),
        "enqueue_unknown": c.get("enqueue.unknown", 0),
        "stored": len(final.messages),
        "grants": c.get("grants", 0),
        "acks_ok": c.get("ack.ok", 0),
        "acks_stale": c.get("ack.stale", 0),
        "acks_unknown": c.get("ack.unknown", 0),
        "defers_ok": c.get("defer.ok", 0),
        "late_acks_ok": c.get("late_ack.ok", 0),
        "late_acks_stale": c.get("late_ack.stale", 0),
        "delivered": delivered,
    }
    return report


def _check_enqueues(ops: list[Op], final: FinalState, namespace: str, report: Report) -> None:
    """(a) nothing acknowledged lost, stored as sent; (b) one message per key."""
    by_key: dict[str, list[Op]] = defaultdict(list)
    for o in ops:
        if o.kind == "enqueue":
            by_key[o.key].append(o)
    for key, attempts in by_key.items():
        ids = {o.message_id for o in attempts if o.outcome == OK}
        if len(ids) > 1:
            report.problem(f"RETRY DUPLICATE: key {key}: attempts returned different ids {sorted(ids)}")
        for mid in sorted(ids):
            m = final.messages.get(mid)
            if m is None:
                acked = next(o for o in attempts if o.message_id == mid)
                report.problem(
                    f"LOST: key {key} was acknowledged as {mid} ({acked.describe()}) but is not stored "
                    f"({final.not_found.get(mid, 'not listed')})"
                )
                continue
            want_rcpts = attempts[0].recipients
            if m.idempotency_key != key or m.data != message_data(key) or m.namespace != namespace:
                report.problem(f"CORRUPT: message {mid} of key {key} has key {m.idempotency_key!r}, "
                               f"namespace {m.namespace!r}, data {m.data[:80]!r}")
            if tuple(r.address for r in m.recipients) != want_rcpts:
                report.problem(f"CORRUPT: message {mid} of key {key} has recipients "
                               f"{[r.address for r in m.recipients]}, enqueued with {list(want_rcpts)}")
    stored: dict[str, list[str]] = defaultdict(list)
    for mid, m in final.messages.items():
        stored[m.idempotency_key or ""].append(mid)
    for key, mids in sorted(stored.items()):
        if key not in by_key:
            report.problem(f"UNEXPECTED: message(s) {mids} with idempotency key {key!r} that no one enqueued")
        elif len(mids) > 1:
            report.problem(f"DUPLICATE: key {key} is stored {len(mids)} times: {sorted(mids)} "
                           f"(attempts: {[o.describe() for o in by_key[key]]})")


def _check_grants(ops: list[Op], final: FinalState, report: Report) -> dict[int, tuple[Grant, Op]]:
    """(c) every token granted once; grants of one recipient never overlap."""
    grants: dict[int, tuple[Grant, Op]] = {}
    for o in ops:
        for g in o.grants:
            if g.token in grants:
                other, other_op = grants[g.token]
                report.problem(f"TOKEN REUSED: lease token {g.token} granted twice: {other} ({other_op.describe()}) "
                               f"and {g} ({o.describe()})")
                continue
            grants[g.token] = (g, o)
            m = final.messages.get(g.message_id)
            if m is None:
                report.problem(f"LEASE OF A MISSING MESSAGE: lease {g.token} of {g.message_id} ({o.describe()})")
            elif not set(g.recipients) <= {r.address for r in m.recipients}:
                report.problem(f"BAD LEASE: lease {g.token} names recipients {g.recipients} not all of "
                               f"{g.message_id}'s {[r.address for r in m.recipients]}")
    settles_of: dict[int, list[Op]] = defaultdict(list)
    for o in ops:
        if o.kind in SETTLES:
            settles_of[o.token].append(o)
    for (mid, rcpt), chain in _by_recipient(grants).items():
        for (g1, _), (g2, op2) in itertools.pairwise(chain):
            if op2.complete >= g1.deadline - CLOCK_SLACK_S:
                continue  # the earlier lease had run out when the later one was granted
            settled = [o for o in settles_of[g1.token] if o.invoke <= op2.complete and o.outcome != FAIL]
            if not settled:
                report.problem(
                    f"OVERLAPPING LEASES: recipient {rcpt} of {mid}: lease {g2.token} was granted "
                    f"(by {op2.complete:.3f}) before lease {g1.token} ran out ({g1.deadline:.3f}) and no settle "
                    f"of lease {g1.token} had been attempted"
                )
    return grants


def _check_settles(ops: list[Op], grants: dict[int, tuple[Grant, Op]], final: FinalState, report: Report) -> None:
    """(c) no ack or defer accepted under a stale token; acked recipients stay delivered;
    nothing delivered that no one acked."""
    chains = _by_recipient(grants)
    states = {
        (mid, r.address): r.state for mid, m in final.messages.items() for r in m.recipients
    }
    for o in ops:
        if o.kind not in SETTLES or o.outcome != OK:
            continue
        found = grants.get(o.token)
        if found is None:
            report.problem(f"SETTLE OF AN UNKNOWN LEASE: {o.describe()}")
            continue
        g1 = found[0]
        for rcpt in g1.recipients:
            later = [(g2, op2) for g2, op2 in chains[(g1.message_id, rcpt)] if g2.token > g1.token]
            if o.kind in ACKS:
                for g2, op2 in later:
                    report.problem(
                        f"STALE ACK ACCEPTED: {o.describe()} settled recipient {rcpt} of {g1.message_id}, but "
                        f"lease {g2.token} of that recipient was granted later ({op2.describe()})"
                    )
                state = states.get((g1.message_id, rcpt))
                if state != "delivered":
                    report.problem(
                        f"ACK NOT DURABLE: {o.describe()} acked recipient {rcpt} of {g1.message_id}, "
                        f"which ended up {state!r}"
                    )
            else:
                for g2, op2 in later:
                    if op2.complete < o.invoke:
                        report.problem(
                            f"STALE DEFER ACCEPTED: {o.describe()} for recipient {rcpt} of {g1.message_id} "
                            f"after lease {g2.token} of that recipient had been granted ({op2.describe()})"
                        )
    acked: set[tuple[str, str]] = set()
    for o in ops:
        if o.kind in ACKS and o.outcome != FAIL and o.token in grants:
            g = grants[o.token][0]
            acked |= {(g.message_id, r) for r in g.recipients}
    for (mid, rcpt), state in sorted(states.items()):
        if state == "delivered" and (mid, rcpt) not in acked:
            report.problem(f"PHANTOM DELIVERY: recipient {rcpt} of {mid} is delivered but no ack of a lease "
                           f"holding it was attempted")


def _by_recipient(grants: dict[int, tuple[Grant, Op]]) -> dict[tuple[str, str], list[tuple[Grant, Op]]]:
    """Grants per (message id, recipient), in token (= log) order."""
    out: dict[tuple[str, str], list[tuple[Grant, Op]]] = defaultdict(list)
    for token in sorted(grants):
        g, o = grants[token]
        for rcpt in g.recipients:
            out[(g.message_id, rcpt)].append((g, o))
    return out


# --- small statistics helpers ------------------------------------------------------------------


def median(values: Iterable[float]) -> float:
    vals = list(values)
    return statistics.median(vals) if vals else float("nan")


def summarize(values: Iterable[float]) -> dict[str, Any]:
    vals = sorted(values)
    if not vals:
        return {"n": 0}
    return {"n": len(vals), "min": round(vals[0], 3), "median": round(statistics.median(vals), 3),
            "max": round(vals[-1], 3)}


__all__ = [
    "FAIL",
    "OK",
    "STALE",
    "UNKNOWN",
    "FinalState",
    "Grant",
    "History",
    "Op",
    "Report",
    "Workload",
    "WorkloadConfig",
    "check",
    "classify",
    "median",
    "message_data",
    "read_final_state",
    "summarize",
]
