"""Every call of the Admin and Compliance services, fuzzed: well-formed requests whose every field
holds a random or extreme value (built from the services' protobuf descriptors, so a new method
or field is fuzzed without touching this file). A real node must answer each with OK or a clear
refusal carrying a message, never UNKNOWN or INTERNAL (an exception escaping a handler), and keep
serving: afterwards a write and a read still work and its log scans clean. The Queue service has
its own fuzzer, of malformed bytes too (tests/test_limits.py).

``MQSTORE_FUZZ_EXAMPLES`` sets the number of requests (default 300).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mqstore.client import Client
from mqstore.proto import admin_pb2, compliance_pb2
from mqstore.testing.secure import InProcessCluster

RAW = b"From: a@example.org\r\nSubject: fuzz\r\n\r\nbody\r\n"

#: What a fuzzer may get back: OK and clear refusals. Never UNKNOWN or INTERNAL.
CLEAR = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.ABORTED, grpc.StatusCode.UNIMPLEMENTED,
}

#: Calls the fuzzer leaves out, and why.
SKIPPED = {
    # Removing or demoting the only voter is refused, but adding random voters with random sites
    # may be accepted and leave a one-node cluster without a quorum (then every later call would
    # only test UNAVAILABLE). Membership checks are tested on their own in tests/test_node.py.
    "/mqstore.v1.Admin/ChangeMembership",
}

_INT_EDGES = [0, 1, -1, 2, 255, 256, 65_535, 2**31 - 1, -(2**31), 2**32 - 1, 2**53, 2**63 - 1, -(2**63)]
_TEXT_EDGES = ["", " ", "default", "regulated", "a@example.org", "x" * 300, "\x00", "é", "../../etc/passwd",
               "01ARZ3NDEKTSV4RRFFQ69G5FAV", "0" * 26, "Z" * 26, "2026-12-06T00:00:00Z", "compliance", "none"]


def _ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([v for v in _INT_EDGES if lo <= v <= hi]), st.integers(lo, hi))


def _scalar(field: FieldDescriptor, texts: list[str]) -> st.SearchStrategy[Any]:
    t = field.type
    if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return _ints(-(2**63), 2**63 - 1)
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return _ints(0, 2**64 - 1)
    if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32,
             FieldDescriptor.TYPE_ENUM):
        return _ints(-(2**31), 2**31 - 1)
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return _ints(0, 2**32 - 1)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.one_of(st.sampled_from([0.0, -1.0, 1e300, float("inf"), float("nan")]), st.floats(width=32))
    if t == FieldDescriptor.TYPE_STRING:
        return st.one_of(st.sampled_from(texts), st.text(max_size=40))
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    raise AssertionError(f"no strategy for {field.full_name} (type {t})")


@st.composite
def _fill(draw: st.DrawFn, desc: Descriptor, texts: list[str], depth: int = 0) -> Any:
    msg = message_factory.GetMessageClass(desc)()
    for field in desc.fields:
        if not draw(st.booleans()):
            continue  # left at its default
        is_message = field.type == FieldDescriptor.TYPE_MESSAGE
        if is_message and depth >= 2:
            continue
        if field.is_repeated:
            count = draw(st.integers(0, 4))
            target = getattr(msg, field.name)
            for _ in range(count):
                if is_message:
                    target.add().CopyFrom(draw(_fill(field.message_type, texts, depth + 1)))
                else:
                    target.append(draw(_scalar(field, texts)))
        elif is_message:
            getattr(msg, field.name).CopyFrom(draw(_fill(field.message_type, texts, depth + 1)))
        else:
            setattr(msg, field.name, draw(_scalar(field, texts)))
    return msg


def _methods() -> list[MethodDescriptor]:
    out = []
    for module, name in ((admin_pb2, "Admin"), (compliance_pb2, "Compliance")):
        for method in module.DESCRIPTOR.services_by_name[name].methods:
            if f"/mqstore.v1.{name}/{method.name}" not in SKIPPED:
                out.append(method)
    return out


def test_fuzzed_admin_and_compliance_calls_get_clear_answers(tmp_path: Path) -> None:
    cluster = InProcessCluster(tmp_path / "fuzz", ["a"])
    cluster.leader()
    address = cluster.address(1)
    with Client(address, timeout=10) as client:
        ids = client.enqueue_many([{"mail_from": "a@example.org", "recipients": [f"r{i}@example.net"], "data": RAW}
                                   for i in range(20)])
    texts = _TEXT_EDGES + ids[:5]
    methods = _methods()
    assert len(methods) >= 20, [m.name for m in methods]
    channel = grpc.insecure_channel(address)
    seen: dict[str, set[str]] = {}

    @settings(max_examples=int(os.environ.get("MQSTORE_FUZZ_EXAMPLES", "300")), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(methods).flatmap(lambda m: st.tuples(st.just(m), _fill(m.input_type, texts))))
    def one(call: tuple[MethodDescriptor, Any]) -> None:
        method, request = call
        path = f"/{method.containing_service.full_name}/{method.name}"
        out_class = message_factory.GetMessageClass(method.output_type)
        try:
            if method.server_streaming:
                stream = channel.unary_stream(path, request_serializer=lambda m: m.SerializeToString(),
                                              response_deserializer=out_class.FromString)
                for _ in stream(request, timeout=5):
                    pass
            else:
                unary = channel.unary_unary(path, request_serializer=lambda m: m.SerializeToString(),
                                            response_deserializer=out_class.FromString)
                unary(request, timeout=5)
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
        seen.setdefault(method.name, set()).add(code.name)
        assert code in CLEAR, f"{path} -> {code.name}: {details}\nrequest: {request}"
        if code != grpc.StatusCode.OK:
            assert details, f"{path} -> {code.name} without a message\nrequest: {request}"

    try:
        one()
        print({name: sorted(codes) for name, codes in sorted(seen.items())})
        assert len(seen) >= len(methods) // 2, f"only {sorted(seen)} were called"
        # The node keeps serving.
        with Client(address, timeout=10) as client:
            mid = client.enqueue(mail_from="a@example.org", recipients=["after@example.net"], data=RAW)
            assert client.get(mid).data == RAW
    finally:
        channel.close()
        [report] = cluster.close_and_scan()
    assert report.clean and report.records_checked > 0, report.corrupt
