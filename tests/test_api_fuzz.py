"""The embedded API and the Client, fuzzed with wrong types and extreme values: every public call
of ``mqstore.Store`` (and the same call of ``mqstore.Client`` on a one-node cluster) given
arguments drawn from valid ones (real message ids, live lease tokens, addresses) and wrong ones
(None, bools, huge and negative numbers, NaN, bytes for text, nested lists, dicts) either works
or raises an ``MQStoreError`` (InvalidArgument, NotFound, StaleLease…) with a message — never a
TypeError, ValueError or AttributeError from deep inside — and a refused call changes nothing:
the log does not grow and the counts stay the same.

``MQSTORE_FUZZ_EXAMPLES`` sets the number of calls (default 300).
"""

from __future__ import annotations

import datetime as dt
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mqstore
from mqstore.client import Client
from mqstore.codec import RecordType
from mqstore.crypto import create_key_file
from mqstore.errors import Immutable, MQStoreError, PermissionDenied
from mqstore.testing.secure import InProcessCluster

NOW = 1_780_000_000.0
RAW = b"From: a@example.org\r\nSubject: fuzz\r\n\r\nbody\r\n"

_WRONG: list[Any] = [
    None, True, False, 0, -1, 1, 2**70, -(2**70), 1.5, -0.5, 0.0004, math.nan, math.inf, "", " ", "x", "\x00", "\ud800",
    "a" * 5000,
    b"bytes", bytearray(b"x"), [], [[]], [None], [1, 2], {}, {"a": 1}, (), object(), dt.datetime(2020, 1, 1),
    dt.timedelta(seconds=5),
]


#: The log each target writes to (the node's, for the client), to see what a call appended.
LOGS: dict[int, Any] = {}
#: Entries a node's own maintenance appends at any time (expiring leases and messages, compacting).
_MAINTENANCE = {RecordType.EXPIRE, RecordType.COMPACT, RecordType.NOOP}


@pytest.fixture(scope="module", params=["embedded", "client"])
def store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """An embedded store (no background maintenance, a fixed clock), or a Client of a one-node
    cluster (same calls, same errors; its node expires short leases on its own meanwhile)."""
    path = tmp_path_factory.mktemp(f"api-fuzz-{request.param}")
    if request.param == "embedded":
        s = mqstore.open(path / "q", key_file=create_key_file(path / "kek.key"), clock=lambda: NOW, background=False)
        LOGS[id(s)] = s.log
        try:
            yield s
        finally:
            s.close()
        return
    cluster = InProcessCluster(path / "cluster", ["a"])
    client = Client(cluster.address(1), timeout=10)
    LOGS[id(client)] = cluster.leader().node.log
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def _counts(store: Any) -> tuple[int, Any]:
    """The log's last index and (embedded: nothing else changes it) the counts of messages,
    recipients and bytes."""
    stats = store.stats() if isinstance(store, mqstore.Store) else None
    if stats is not None:
        stats.pop("oldest_age_seconds", None)
        stats.pop("log", None)
        stats.pop("disk", None)  # free space moves with everything else on the disk
        stats.pop("compliance_time", None)  # a clock: it moves by itself
    return LOGS[id(store)].last_index, stats


def _unchanged(store: Any, before: tuple[int, Any]) -> list[str]:
    """What changed since ``before`` other than the node's own maintenance: [] if nothing."""
    log = LOGS[id(store)]
    index, stats = _counts(store)
    changes = [RecordType(r.type).name for r in log.read_range(before[0] + 1, index + 1)
               if r.type not in _MAINTENANCE] if index > before[0] else []
    if stats != before[1]:
        changes.append("counts")
    return changes


def test_fuzzed_calls_work_or_raise_clear_errors_and_change_nothing(store: Any) -> None:
    ids = store.enqueue_many([{"mail_from": "a@example.org", "recipients": [f"r{i}@example.net", "x@example.com"],
                               "data": RAW} for i in range(30)])
    tokens = [lease.token for lease in store.lease("w", max_messages=10, lease_seconds=10**6)]
    good: dict[str, list[Any]] = {
        "id": [*ids[:3], ids[-1].lower(), "0" * 26],
        "token": tokens[:3],
        "address": ["b@example.net", "x@example.com", "r0@example.net"],
        "addresses": [["b@example.net"], ["r1@example.net", "x@example.com"]],
        "text": ["default", "w", "example.net", "451 4.7.1 later"],
        "number": [0, 1, 10, 300, 3600],
        "state": ["queued", "leased", "deferred", "delivered", "bounced", "expired", "held", "active", "done"],
        "data": [RAW, b""],
    }

    def arg(kind: str) -> st.SearchStrategy[Any]:
        return st.one_of(st.sampled_from(good[kind]), st.sampled_from(_WRONG))

    def message() -> st.SearchStrategy[Any]:
        return st.one_of(
            st.fixed_dictionaries({"mail_from": arg("address"), "recipients": arg("addresses"), "data": arg("data")},
                                  optional={"namespace": arg("text"), "priority": arg("number"),
                                            "not_before": arg("number"), "expires_in": arg("number"),
                                            "idempotency_key": arg("text"), "surplus": arg("text")}),
            st.sampled_from(_WRONG),
        )

    calls: dict[str, tuple[Callable[..., Any], st.SearchStrategy[dict[str, Any]]]] = {
        "enqueue": (store.enqueue, st.fixed_dictionaries(
            {"mail_from": arg("address"), "recipients": arg("addresses"), "data": arg("data")},
            optional={"namespace": arg("text"), "priority": arg("number"), "not_before": arg("number"),
                      "expires_in": arg("number"), "idempotency_key": arg("text")})),
        "enqueue_many": (store.enqueue_many, st.fixed_dictionaries(
            {"messages": st.one_of(st.lists(message(), max_size=3), st.sampled_from(_WRONG))})),
        "lease": (store.lease, st.fixed_dictionaries(
            {"worker": arg("text")},
            optional={"max_messages": arg("number"), "lease_seconds": arg("number"), "namespace": arg("text"),
                      "domain": arg("text")})),
        "ack": (store.ack, st.fixed_dictionaries({"token": arg("token")}, optional={"recipients": arg("addresses")})),
        "defer": (store.defer, st.fixed_dictionaries(
            {"token": arg("token")}, optional={"recipients": arg("addresses"), "reason": arg("text")})),
        "bounce": (store.bounce, st.fixed_dictionaries(
            {"token": arg("token")}, optional={"recipients": arg("addresses"), "reason": arg("text")})),
        "ack_many": (store.ack_many, st.fixed_dictionaries(
            {"tokens": st.one_of(st.lists(arg("token"), max_size=3), st.sampled_from(_WRONG))})),
        "hold": (store.hold, st.fixed_dictionaries({"message_id": arg("id")})),
        "release": (store.release, st.fixed_dictionaries({"message_id": arg("id")})),
        "requeue": (store.requeue, st.fixed_dictionaries({"message_id": arg("id")})),
        "delete": (store.delete, st.fixed_dictionaries({"message_id": arg("id")})),
        "bounce_message": (store.bounce_message, st.fixed_dictionaries(
            {"message_id": arg("id")}, optional={"reason": arg("text")})),
        "get": (store.get, st.fixed_dictionaries({"message_id": arg("id")})),
        "list": (store.list, st.fixed_dictionaries(
            {}, optional={"state": arg("state"), "namespace": arg("text"), "domain": arg("text"),
                          "older_than": arg("number"), "limit": arg("number"), "after": arg("id")})),
        "qshape": (store.qshape, st.fixed_dictionaries({}, optional={"namespace": arg("text")})),
        "set_namespace_policy": (store.set_namespace_policy, st.fixed_dictionaries(
            {"namespace": arg("text")},
            optional={"backoff": st.one_of(st.lists(arg("number"), max_size=3), st.sampled_from(_WRONG)),
                      "lifetime": arg("number"), "retention": arg("number"), "dedup_window": arg("number"),
                      "expired_retention": arg("number")})),
        # Compliance: modes, holds, retention, keys, the audit log.
        "set_policy": (store.set_policy, st.fixed_dictionaries(
            {"namespace": arg("text")},
            optional={"mode": st.one_of(st.sampled_from(["none", "governance", "compliance"]), st.sampled_from(_WRONG)),
                      "retention_days": arg("number"), "bypass_governance": st.booleans(), "reason": arg("text")})),
        "get_policy": (store.get_policy, st.fixed_dictionaries({"namespace": arg("text")})),
        "add_legal_hold": (store.add_legal_hold, st.fixed_dictionaries({"message_id": arg("id"), "case": arg("text")})),
        "remove_legal_hold": (store.remove_legal_hold, st.fixed_dictionaries(
            {"message_id": arg("id"), "case": arg("text")})),
        "extend_retention": (store.extend_retention, st.fixed_dictionaries(
            {"message_id": arg("id"), "until": st.one_of(st.sampled_from([NOW + 86_400, NOW - 10]), arg("number"))})),
        "compact_messages": (store.compact_messages, st.fixed_dictionaries(
            {"message_ids": st.one_of(st.lists(arg("id"), max_size=3), st.sampled_from(_WRONG))})),
        "rotate_key": (store.rotate_key, st.fixed_dictionaries({"namespace": arg("text")})),
        "shred_key": (store.shred_key, st.fixed_dictionaries({"key_id": arg("number")})),
        "audit_records": (store.audit_records, st.fixed_dictionaries(
            {}, optional={"after": arg("number"), "limit": arg("number")})),
        "audit_query": (store.audit_query, st.fixed_dictionaries(
            {}, optional={"where": st.one_of(st.just({"op": "enqueue"}), st.sampled_from(_WRONG)),
                          "since_ms": arg("number"), "until_ms": arg("number"), "after": arg("number"),
                          "limit": arg("number")})),
    }
    seen: dict[str, set[str]] = {}

    def one(call: tuple[str, dict[str, Any]]) -> None:
        name, kwargs = call
        fn = calls[name][0]
        before = _counts(store)
        try:
            fn(**kwargs)
        except MQStoreError as exc:
            seen.setdefault(name, set()).add(type(exc).__name__)
            assert str(exc), f"{name}({kwargs!r}) raised {type(exc).__name__} without a message"
            changed = _unchanged(store, before)
            if isinstance(exc, (Immutable, PermissionDenied)):  # refused and audited: the entry stays
                changed = [c for c in changed if c == "counts"]
            assert not changed, f"{name}({kwargs!r}) raised {exc!r} but changed the store: {changed}"
            return
        seen.setdefault(name, set()).add("ok")

    def fuzz(strategy: st.SearchStrategy[tuple[str, dict[str, Any]]], examples: int) -> None:
        settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))(
            given(strategy)(one)
        )()

    fuzz(st.sampled_from(sorted(calls)).flatmap(lambda name: st.tuples(st.just(name), calls[name][1])),
         int(os.environ.get("MQSTORE_FUZZ_EXAMPLES", "300")))
    # Hypothesis does not draw the calls evenly: a short run can pass one by (it happened, one
    # run in many). Each call it missed is then fuzzed on its own, on the store as it is now.
    for name in sorted(set(calls) - set(seen)):
        fuzz(st.tuples(st.just(name), calls[name][1]), 20)
    print({name: sorted(outcomes) for name, outcomes in sorted(seen.items())})
    assert len(seen) == len(calls), f"never called: {sorted(set(calls) - set(seen))}"
    if isinstance(store, mqstore.Store):
        assert store.log.scan().clean


#: Calls the fuzzer found raising TypeError, ValueError, OverflowError or struct.error (kept as
#: regressions; the Client's were the recipients and tokens of settle calls and the namespace or
#: key id of the compliance calls).
FOUND = [
    ("ack_many", {"tokens": None}),
    ("ack", {"token": 2**70}),
    ("ack_many", {"tokens": [2**70]}),
    ("defer", {"token": 2**70, "reason": "later"}),
    ("bounce", {"token": 2**70}),
    ("defer", {"token": "live", "recipients": True}),
    ("enqueue", {"mail_from": "a@example.org", "recipients": ["b@example.net"], "data": RAW, "not_before": math.inf}),
    ("ack_many", {"tokens": ["live", "live"]}),  # the Client's: one settled, then StaleLease
    ("list", {"state": [[]]}),
    ("ack", {"token": 1, "recipients": -(2**70)}),
    ("bounce", {"token": 1, "recipients": -0.5}),
    ("set_namespace_policy", {"namespace": [], "retention": 5}),
    ("audit_query", {"after": object()}),
    ("audit_query", {"where": dt.datetime(2020, 1, 1)}),
    ("audit_query", {"since_ms": ""}),
    ("audit_query", {"until_ms": "x", "where": {"op": "enqueue"}}),
    ("compact_messages", {"message_ids": 2**70}),
    ("get_policy", {"namespace": True}),
    ("rotate_key", {"namespace": object()}),
    ("shred_key", {"key_id": {}}),
    ("shred_key", {"key_id": -(2**70)}),
    # Lone surrogates in free text (UnicodeEncodeError from inside the embedded store before).
    ("lease", {"worker": "\ud800"}),
    ("defer", {"token": "live", "reason": "451 \ud800"}),
    ("bounce", {"token": "live", "reason": "550 \udcff"}),
]


@pytest.mark.parametrize(("name", "kwargs"), FOUND, ids=[f"{n}-{i}" for i, (n, _) in enumerate(FOUND)])
def test_calls_the_fuzzer_found_are_refused_clearly(store: Any, name: str, kwargs: dict[str, Any]) -> None:
    tokens = kwargs.get("tokens")
    if "live" in (kwargs.get("token"), *(tokens if isinstance(tokens, list) else ())):  # a lease granted now
        store.enqueue(mail_from="a@example.org", recipients=["b@example.net"], data=RAW)
        live = store.lease("w", max_messages=1, lease_seconds=3600)[0].token
        kwargs = {k: live if v == "live" else [live if t == "live" else t for t in v] if k == "tokens" else v
                  for k, v in kwargs.items()}
    before = _counts(store)
    with pytest.raises(MQStoreError) as info:
        getattr(store, name)(**kwargs)
    assert str(info.value)
    assert not _unchanged(store, before)
