"""The clients' namespace policy calls and argument checks, compared with the embedded store's.

Every test makes the same calls on an embedded store (``mqstore.open``) and through a client
(blocking and asyncio) of a one-node in-process cluster, and asserts that a user sees the same:
the same Policy, or the same exception with the same message. What they used to see instead:

* ``set_namespace_policy`` on a GOVERNANCE or COMPLIANCE namespace failed ("mode governance
  needs a retention period"): the request's lock retention went out as 0, "set to 0", not -1,
  "keep". The client's method also lacked ``mode``, ``lock_retention``, ``bypass_governance`` and
  ``reason``, and its answer always said mode 0 and lock retention 0.
* ``get_policy`` and ``set_policy`` answered the Postfix defaults (no backoff, a 5-day lifetime,
  retention 0) in place of the namespace's queue policy.
* Arguments of the wrong type that the store refuses were sent and stored: ``mail_from=None``
  (an empty sender), ``extend_retention(until="<number>")`` or ``until=True``,
  ``set_policy(retention_days="5")`` or ``True``, and a ``retention_days`` that rounds to the
  wire's -1 ("keep") was taken as "keep".
* ``audit_query(foo=1)`` raised a bare TypeError where the store raises InvalidArgument.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import mqstore
from mqstore.api import Store
from mqstore.client import Client
from mqstore.crypto import create_key_file
from mqstore.testing.cluster import free_port
from mqstore.testing.facade import AsyncFacade
from mqstore.testing.secure import InProcessCluster

KINDS = ["sync", "async"]
RAW = b"Subject: hi\r\n\r\nbody\r\n"
_NAMESPACES = itertools.count()


def make_client(kind: str, address: str, timeout: float = 10.0) -> Any:
    return Client([address], timeout=timeout) if kind == "sync" else AsyncFacade([address], timeout=timeout)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessCluster]:
    logging.getLogger("mqstore").setLevel(logging.ERROR)
    c = InProcessCluster(tmp_path_factory.mktemp("cluster"), ["a"])
    try:
        c.leader()
        yield c
    finally:
        c.close()


@pytest.fixture(params=KINDS)
def client(request: pytest.FixtureRequest, cluster: InProcessCluster) -> Iterator[Any]:
    c = make_client(str(request.param), cluster.address(1))
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = mqstore.open(tmp_path / "embedded", key_file=create_key_file(tmp_path / "kek.key"), background=False)
    try:
        yield s
    finally:
        s.close()


def _ns() -> str:
    """A namespace no other test used (the cluster is shared by the module's tests)."""
    return f"pol{next(_NAMESPACES)}"


def outcome(call: Callable[..., Any], *args: Any) -> tuple[str, Any]:
    """What a user sees of ``call(*args)``: ("ok", the result) or (the exception's class name, its message)."""
    try:
        return ("ok", call(*args))
    except Exception as exc:
        return (type(exc).__name__, str(exc))


def same(store: Store, client: Any, call: Callable[..., Any], *args: Any) -> tuple[str, Any]:
    """``call(store, *args)`` and ``call(client, *args)``: the same result or the same error."""
    embedded = outcome(call, store, *args)
    remote = outcome(call, client, *args)
    assert remote == embedded
    return embedded


# --- policies ----------------------------------------------------------------------------------------


def test_policy_answers_are_the_namespaces_whole_policy(store: Store, client: Any) -> None:
    bulk, fin = _ns(), _ns()
    steps: list[Callable[[Any], Any]] = [
        lambda a: a.get_policy(bulk),  # never set: the defaults
        lambda a: a.set_namespace_policy(bulk, backoff=[120, 300], lifetime=3600, retention=60, dedup_window=600,
                                         expired_retention=86400),
        lambda a: a.get_policy(bulk),
        lambda a: a.set_policy(bulk, mode="governance", retention_days=1),
        lambda a: a.get_policy(bulk),
        # a queue policy change in a GOVERNANCE namespace keeps its mode and lock retention
        lambda a: a.set_namespace_policy(bulk, lifetime=7200),
        lambda a: a.set_namespace_policy(bulk, backoff=[]),
        lambda a: a.get_policy(bulk),
        lambda a: a.set_policy(fin, mode="compliance", retention_days=2),
        lambda a: a.set_namespace_policy(fin, backoff=[60], retention=30),
        lambda a: a.set_policy(fin, mode="compliance"),  # None keeps the retention
        lambda a: a.get_policy(fin),
    ]
    results = [same(store, client, step) for step in steps]
    assert all(kind == "ok" for kind, _ in results), results
    # what an operator reads back is what was set, not the Postfix defaults
    final_bulk, final_fin = results[7][1], results[11][1]
    assert (final_bulk.backoff_ms, final_bulk.lifetime_ms, final_bulk.retention_ms) == ((), 7_200_000, 60_000)
    assert (final_bulk.mode, final_bulk.lock_retention_ms) == (1, 86_400_000)
    assert (final_fin.backoff_ms, final_fin.retention_ms, final_fin.lock_retention_ms) == ((60_000,), 30_000,
                                                                                           172_800_000)


def test_set_namespace_policy_takes_the_embedded_compliance_arguments(store: Store, client: Any) -> None:
    ns = _ns()
    steps: list[Callable[[Any], Any]] = [
        lambda a: a.set_namespace_policy(ns, mode="governance", lock_retention=3600, lifetime=600),
        lambda a: a.get_policy(ns),
        lambda a: a.set_namespace_policy(ns, lock_retention=7200),  # the mode is kept
        # weakening GOVERNANCE needs a bypass, and a bypass needs a reason
        lambda a: a.set_namespace_policy(ns, mode="none"),
        lambda a: a.set_namespace_policy(ns, mode="none", bypass_governance=True),
        lambda a: a.get_policy(ns),
        lambda a: a.set_namespace_policy(ns, mode="none", bypass_governance=True, reason="retired"),
        lambda a: a.get_policy(ns),
        lambda a: a.set_namespace_policy(ns, mode="compliance", lock_retention=60),
        lambda a: a.set_namespace_policy(ns, lock_retention=30),  # COMPLIANCE never shortens
        lambda a: a.set_namespace_policy(ns, mode="none"),  # nor leaves
        lambda a: a.get_policy(ns),
    ]
    results = [same(store, client, step) for step in steps]
    kinds = [kind for kind, _ in results]
    assert kinds == ["ok", "ok", "ok", "Immutable", "Immutable", "ok", "ok", "ok", "ok", "Immutable",
                     "Immutable", "ok"], results
    assert results[2][1].mode == 1 and results[2][1].lock_retention_ms == 7_200_000
    assert results[7][1].mode == 0 and results[7][1].lock_retention_ms == 0
    # the mode applies to what is enqueued afterwards, through either
    locked = [a.get(a.enqueue("a@example.org", ["b@example.net"], RAW, namespace=ns)) for a in (store, client)]
    assert [m.retention_mode for m in locked] == ["compliance", "compliance"]


@pytest.mark.parametrize("args", [
    {"mode": "sometimes"},
    {"mode": ""},
    {"mode": 1},
    {"lock_retention": -1},
    {"lock_retention": "60"},
    {"lock_retention": True},
    {"lock_retention": 101 * 365 * 86400},
    {"mode": "governance", "lock_retention": 0},
    {"mode": "governance", "lock_retention": 0.0004},
    {"mode": "governance", "lock_retention": 36_501 * 86400},
    {"bypass_governance": "yes", "reason": "r"},
    {"reason": "x" * 5000},
    {"reason": "\udcff"},
])
def test_set_namespace_policy_refuses_what_the_store_refuses(store: Store, client: Any, args: dict[str, Any]) -> None:
    ns = _ns()
    kind, _ = same(store, client, lambda a: a.set_namespace_policy(ns, **args))
    assert kind == "InvalidArgument"
    same(store, client, lambda a: a.get_policy(ns))  # nothing changed


@pytest.mark.parametrize("retention_days", ["5", True, -1, -1 / 86_400_000, math.nan, 1e30])
def test_set_policy_refuses_a_retention_the_store_refuses(store: Store, client: Any, retention_days: Any) -> None:
    fresh, fin = _ns(), _ns()
    for a in (store, client):
        a.set_policy(fin, mode="compliance", retention_days=2)
    for ns, mode in ((fresh, "governance"), (fin, "compliance")):
        kind, message = same(store, client, lambda a, ns, mode: a.set_policy(ns, mode, retention_days), ns, mode)
        assert kind == "InvalidArgument", message
        assert message.startswith("retention_days ")
        same(store, client, lambda a, ns: a.get_policy(ns), ns)  # unchanged: fresh has no mode, fin keeps 2 days


# --- wrong-typed arguments: refused before anything is sent -------------------------------------------


def test_enqueue_without_a_sender_string_stores_nothing(store: Store, client: Any) -> None:
    ns = _ns()

    def count(a: Any) -> int:
        return len(a.list(namespace=ns, limit=100))

    for mail_from in (None, 5, b"a@example.org", "a\udcff@example.org", "not an address"):
        kind, _ = same(store, client, lambda a, m: a.enqueue(m, ["b@example.net"], RAW, namespace=ns), mail_from)
        assert kind == "InvalidArgument"
        message = {"mail_from": mail_from, "recipients": ["b@example.net"], "data": RAW, "namespace": ns}
        kind, _ = same(store, client, lambda a, m: list(
            (a.enqueue_many if isinstance(a, Store) else a.enqueue_stream)([m])), message)
        assert kind == "InvalidArgument"
    assert count(store) == count(client) == 0
    # the null sender (a bounce's) is a sender
    same(store, client, lambda a: a.get(a.enqueue("", ["b@example.net"], RAW, namespace=ns)).mail_from)
    assert count(store) == count(client) == 1


@pytest.mark.parametrize("until", ["1900000000", True, math.nan, -1, 0, 0.0004, 1e30, 253402300800])
def test_extend_retention_refuses_a_time_the_store_refuses(store: Store, client: Any, until: Any) -> None:
    ns = _ns()
    locked_until = []
    for a in (store, client):
        a.set_policy(ns, mode="compliance", retention_days=1)
        mid = a.enqueue("a@example.org", ["b@example.net"], RAW, namespace=ns)
        before = a.get(mid).locked_until
        kind = outcome(lambda a, mid: a.extend_retention(mid, until=until), a, mid)
        locked_until.append((kind, a.get(mid).locked_until == before))
    assert locked_until[1] == locked_until[0]
    assert locked_until[0][0][0] == "InvalidArgument" and locked_until[0][1]  # refused, the lock unchanged


def test_audit_query_with_an_unknown_filter_is_invalid(store: Store, client: Any) -> None:
    kind, message = same(store, client, lambda a: a.audit_query(foo=1))
    assert kind == "InvalidArgument" and "['foo']" in message
    kind, _ = same(store, client, lambda a: a.audit_query(where={"op": "policy"}, outcome="denied"))
    assert kind == "InvalidArgument"


@pytest.mark.parametrize("kind", KINDS)
def test_refusals_happen_before_anything_is_sent(kind: str, store: Store) -> None:
    """Nothing listens at the client's address: every refusal must come before a call (else it
    would be Unavailable), with the embedded store's words."""
    mid = "01M8XEP1JTA8SSGH0VGEGBCJ1V"  # any id: the time is checked before the message is looked up
    calls: list[Callable[[Any], Any]] = [
        lambda a: a.enqueue(None, ["b@example.net"], RAW),
        lambda a: a.extend_retention(mid, until="1900000000"),
        lambda a: a.extend_retention(mid, until=True),
        lambda a: a.set_policy("fin", "compliance", retention_days="5"),
        lambda a: a.set_policy("fin", "governance", retention_days=True),
        lambda a: a.set_policy("fin", "compliance", retention_days=-1 / 86_400_000),
        lambda a: a.set_namespace_policy("fin", mode="bogus"),
        lambda a: a.set_namespace_policy("fin", lock_retention="1"),
        lambda a: a.audit_query(foo=1),
        lambda a: a.audit_records(after=-1),
        lambda a: a.audit_records(after=True),
    ]
    c = make_client(kind, f"127.0.0.1:{free_port()}", timeout=1.0)
    try:
        for call in calls:
            embedded = outcome(call, store)
            assert embedded[0] == "InvalidArgument"
            assert outcome(call, c) == embedded
    finally:
        c.close()
