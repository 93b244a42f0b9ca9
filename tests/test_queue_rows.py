"""The encodings of the queue's state rows and log-entry payloads (``mqstore.queue.model``).

Every replica decodes the entries it applies and every read decodes rows, so for each type:
decoding what was encoded gives the same value back; a cut-off, over-long or wrongly versioned
encoding raises ``Corruption``; and altered bytes either decode to a value of the type or raise
``Corruption`` — never another exception (an ``IndexError`` or ``InvalidArgument`` from deep
inside would be reported as a bug in the caller, not as damaged data).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mqstore.actor import AUTH_METHODS, ROLES, Actor
from mqstore.compliance.rules import Ctx
from mqstore.errors import Corruption
from mqstore.queue.model import (
    NO_CTX,
    AdminEntry,
    BounceMessageEntry,
    DenialEntry,
    LeaseEntry,
    LeaseRow,
    LegalHoldEntry,
    MaintenanceEntry,
    MessageRow,
    NamespaceEntry,
    Policy,
    PolicyEntry,
    RecipientRow,
    RetentionEntry,
    SettleEntry,
)

I64 = st.integers(-(2**63), 2**63 - 1)
U64 = st.integers(0, 2**64 - 1)
U32 = st.integers(0, 2**32 - 1)
U16 = st.integers(0, 2**16 - 1)
U8 = st.integers(0, 255)
MID = st.binary(min_size=16, max_size=16)
TEXT8 = st.text(max_size=40)  # at most 160 UTF-8 bytes: fits a one-byte length
TEXT16 = st.text(max_size=200)
ORDINALS = st.lists(U16, max_size=12).map(tuple)
NAME = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters=","), min_size=1, max_size=20)

ACTORS = st.builds(
    Actor,
    name=NAME,
    roles=st.frozensets(st.sampled_from(sorted(ROLES))),
    auth=st.sampled_from(AUTH_METHODS),
    namespaces=st.none() | st.frozensets(NAME, max_size=3),
    source=st.text(max_size=30),
)
CTXS = st.just(NO_CTX) | st.builds(
    Ctx,
    actor=ACTORS,
    node_id=U64,
    site=st.text(max_size=20),
    wall_ms=I64,
    compliance_ms=I64,
    bypass=st.booleans(),
    reason=st.text(max_size=60),
)
POLICIES = st.builds(
    Policy,
    backoff_ms=st.lists(I64, max_size=10).map(tuple),
    lifetime_ms=I64,
    retention_ms=I64,
    dedup_window_ms=I64,
    expired_retention_ms=I64,
    mode=U8,
    lock_retention_ms=I64,
)

CASES: dict[str, st.SearchStrategy[Any]] = {
    "MessageRow": st.builds(
        MessageRow,
        namespace=TEXT8,
        priority=st.integers(-128, 127),
        n_rcpts=U16,
        enqueue_index=U64,
        created_ms=I64,
        expires_at_ms=I64,
        size_bytes=U32,
        idempotency_key=TEXT16,
        flags=U8,
        counts=st.lists(U16, min_size=6, max_size=6),
        finished_ms=I64,
        retain_until_ms=I64,
        lock_mode=U8,
        lock_until_ms=I64,
        key_id=U32,
    ),
    "RecipientRow": st.builds(
        RecipientRow,
        state=U8,
        domain=TEXT8,
        attempts=U16,
        due_ms=I64,
        token=U64,
        deadline_ms=I64,
        reason=st.binary(max_size=300),
    ),
    "LeaseRow": st.builds(LeaseRow, mid=MID, deadline_ms=I64, ordinals=ORDINALS, worker=TEXT8),
    "Policy": POLICIES,
    "LeaseEntry": st.builds(
        LeaseEntry, now_ms=I64, deadline_ms=I64, mid=MID, ordinals=ORDINALS, worker=TEXT8, ctx=CTXS
    ),
    "SettleEntry": st.builds(
        SettleEntry,
        now_ms=I64,
        token=U64,
        ordinals=ORDINALS,
        next_attempt_ms=st.lists(I64, max_size=12).map(tuple),
        reason=st.binary(max_size=300),
        ctx=CTXS,
    ),
    "AdminEntry": st.builds(AdminEntry, now_ms=I64, mid=MID, ctx=CTXS),
    "MaintenanceEntry": st.builds(
        MaintenanceEntry,
        now_ms=I64,
        items=st.lists(st.tuples(U8, st.binary(max_size=40)), max_size=8).map(tuple),
        ctx=CTXS,
    ),
    "PolicyEntry": st.builds(PolicyEntry, now_ms=I64, namespace=TEXT8, policy=POLICIES, ctx=CTXS),
    "LegalHoldEntry": st.builds(LegalHoldEntry, now_ms=I64, mid=MID, case=TEXT8, add=st.booleans(), ctx=CTXS),
    "RetentionEntry": st.builds(RetentionEntry, now_ms=I64, mid=MID, until_ms=I64, ctx=CTXS),
    "DenialEntry": st.builds(DenialEntry, now_ms=I64, op=TEXT8, target=TEXT16, reason=TEXT16, ctx=CTXS),
    "NamespaceEntry": st.builds(NamespaceEntry, now_ms=I64, namespace=TEXT8, ctx=CTXS),
    "BounceMessageEntry": st.builds(BounceMessageEntry, now_ms=I64, mid=MID, reason=st.binary(max_size=300), ctx=CTXS),
}

EXAMPLES = settings(
    max_examples=int(os.environ.get("MQSTORE_ROW_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _decoder(value: Any) -> Callable[[bytes], Any]:
    return type(value).decode  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_row_or_entry_decodes_to_what_was_encoded(name: str) -> None:
    @EXAMPLES
    @given(CASES[name])
    def check(value: Any) -> None:
        assert _decoder(value)(value.encode()) == value

    check()


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_cut_off_or_over_long_encoding_is_corruption(name: str) -> None:
    @EXAMPLES
    @given(CASES[name], st.binary(min_size=1, max_size=3))
    def check(value: Any, extra: bytes) -> None:
        raw = value.encode()
        decode = _decoder(value)
        for cut in range(len(raw)):
            with pytest.raises(Corruption):
                decode(raw[:cut])
        with pytest.raises(Corruption):
            decode(raw + extra)

    check()


@pytest.mark.parametrize("name", sorted(CASES))
def test_an_unknown_version_is_corruption(name: str) -> None:
    @EXAMPLES
    @given(CASES[name], U8)
    def check(value: Any, version: int) -> None:
        raw = value.encode()
        if version == raw[0]:
            return
        with pytest.raises(Corruption, match=r"version|malformed|bad length"):
            _decoder(value)(bytes((version,)) + raw[1:])

    check()


@pytest.mark.parametrize("name", sorted(CASES))
def test_altered_bytes_decode_to_a_value_or_raise_corruption(name: str) -> None:
    @EXAMPLES
    @given(CASES[name], st.data())
    def check(value: Any, data: st.DataObject) -> None:
        raw = bytearray(value.encode())
        for _ in range(data.draw(st.integers(1, 4), label="changes")):
            at = data.draw(st.integers(0, len(raw) - 1), label="at")
            raw[at] = data.draw(U8.filter(lambda b, old=raw[at]: b != old), label="byte")
        try:
            decoded = _decoder(value)(bytes(raw))
        except Corruption:
            return
        assert type(decoded) is type(value)

    check()
