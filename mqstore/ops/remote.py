"""The admin side of a running cluster, for the CLI: node status, membership, and the operations
RPCs (ReadRecords, Repair, Verify, Backup, MessageHistory) of ``proto/mqstore/v1/admin.proto``.

Calls go through a :class:`mqstore.client.Client` so they use its channels (and whatever channel
factory, e.g. TLS, it was built with). A call pinned to one node (``address``) talks to that node
only; the others follow the leader like every client call.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from mqstore.client import Client, _map_error, _status
from mqstore.errors import InvalidArgument, MQStoreError, Unavailable
from mqstore.ops.backup import write_file
from mqstore.proto import admin_pb2

ProgressFn = Callable[[str, int, int], None]
LONG_CALL_TIMEOUT_S = 3600.0


def stub(client: Client, address: str) -> Any:
    """The Admin stub of the node at ``address`` (on the client's channel to it)."""
    return client._get_stubs(address).admin


def _status_dict(p: Any) -> dict[str, Any]:
    """What ``Client.status`` gives, plus what an operator's ``status`` shows."""
    return {
        **_status(p),
        "cluster_id": p.cluster_id,
        "removed_ids": list(p.removed_ids),
        "snapshot_index": p.snapshot_index,
        "quarantined": p.quarantined,
        "clock_correction_ms": p.clock_correction_ms,
    }


def node_status(client: Client, address: str) -> dict[str, Any]:
    """Admin.Status of the node at ``address`` (that node only)."""
    return _status_dict(client._call("Status", admin_pb2.StatusRequest(), admin=True, address=address))


def answering(client: Client) -> tuple[str, dict[str, Any]]:
    """The first of the client's addresses whose node answers, and its status: with several
    ``--server`` addresses a node that is down (when one runs status, recover or a backup) is
    passed over. Raises the last node's error when none answers."""
    last: MQStoreError | None = None
    for address in client.addresses:
        try:
            return address, node_status(client, address)
        except Unavailable as exc:  # down, or no answer within the timeout
            last = exc
    assert last is not None
    raise last


def leader_status(client: Client, first: dict[str, Any] | None = None) -> dict[str, Any]:
    """The leader's status (following the answering node's leader hint); Unavailable when no
    leader is known."""
    seen: set[str] = set()
    st = first or answering(client)[1]
    for _ in range(5):
        if st["role"] == "leader":
            return st
        address = st["leader_address"]
        if not address or address in seen:
            break
        seen.add(address)
        st = node_status(client, address)
    raise Unavailable(f"node {st['node_id']} knows no leader right now (role {st['role']}, term {st['term']})")


def cluster_status(client: Client, address: str | None = None) -> dict[str, Any]:
    """The status of the node at ``address`` (default: the first that answers), with the leader's
    view of the members (replication lag) and the queue counts (from the leader) when that node
    is not the leader."""
    st = node_status(client, address) if address is not None else answering(client)[1]
    try:
        lead = leader_status(client, st)
    except MQStoreError as exc:
        st["leader_error"] = str(exc)
        return st
    if lead["node_id"] != st["node_id"]:
        st["members"] = lead["members"]
        st["stats"] = lead["stats"]
        st["leader_commit_index"] = lead["commit_index"]
    else:
        st["leader_commit_index"] = st["commit_index"]
    for m in st["members"]:
        # Entries the leader has that this member is not known to hold (None: not known yet).
        if m["id"] == lead["node_id"]:
            m["lag"] = 0
        else:
            m["lag"] = max(0, lead["last_index"] - m["match_index"]) if m["match_index"] else None
    return st


# --- membership ------------------------------------------------------------------------------------

_OPS = {
    "add": admin_pb2.MembershipRequest.ADD_LEARNER,
    "promote": admin_pb2.MembershipRequest.PROMOTE,
    "remove": admin_pb2.MembershipRequest.REMOVE,
}


def change_membership(client: Client, op: str, node_id: int, site: str = "", address: str = "") -> list[dict[str, Any]]:
    """Propose a membership change on the leader (placement rules are checked there)."""
    request = admin_pb2.MembershipRequest(op=_OPS[op], node_id=node_id, site=site, address=address)
    response = client._call("ChangeMembership", request, admin=True)
    return [{"id": m.id, "site": m.site, "address": m.address, "voter": m.voter} for m in response.members]


def transfer_leader(client: Client, to: int = 0) -> int:
    return int(client._call("TransferLeader", admin_pb2.TransferLeaderRequest(to=to), admin=True).leader_id)


def snapshot(client: Client, address: str) -> dict[str, Any]:
    """Snapshot the node at ``address`` now (Admin.Snapshot) and compact its log behind it."""
    response = client._call("Snapshot", admin_pb2.SnapshotRequest(), admin=True, address=address)
    st = node_status(client, address)
    return {"address": address, "node_id": st["node_id"], "index": int(response.index), "term": int(response.term),
            "first_index": st["first_index"], "applied_index": st["applied_index"]}


def wait_member(
    client: Client,
    node_id: int,
    predicate: Callable[[dict[str, Any] | None, dict[str, Any]], bool],
    timeout: float,
    progress: ProgressFn | None = None,
    phase: str = "",
) -> dict[str, Any]:
    """Poll the leader's status until ``predicate(member or None, leader status)``; returns the
    leader status. Raises Unavailable on timeout."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            lead = leader_status(client)
            member = next((m for m in lead["members"] if m["id"] == node_id), None)
            if progress is not None and member is not None:
                progress(phase, min(member["match_index"], lead["commit_index"]), lead["commit_index"])
            if predicate(member, lead):
                return lead
        except MQStoreError as exc:
            last_error = exc
        if time.monotonic() > deadline:
            raise Unavailable(f"timed out after {timeout:.0f} s waiting for node {node_id} ({phase})"
                              + (f"; last error: {last_error}" if last_error else ""))
        time.sleep(0.2)


# --- operations RPCs ------------------------------------------------------------------------------------


def history(client: Client, message_id: str) -> dict[str, Any]:
    response = client._call("MessageHistory", admin_pb2.HistoryRequest(message_id=message_id), admin=True)
    result: dict[str, Any] = json.loads(response.json)
    return result


def state_shape(client: Client, namespace: str | None, state: str) -> dict[str, Any]:
    request = admin_pb2.StateShapeRequest(namespace=namespace or "", state=state)
    result: dict[str, Any] = json.loads(client._call("StateShape", request, admin=True).json)
    return result


def repair(client: Client, address: str, indices: list[int], scan: bool, dry_run: bool) -> dict[str, Any]:
    request = admin_pb2.RepairRequest(indices=indices, scan=scan, dry_run=dry_run)
    try:
        response = stub(client, address).Repair(request, timeout=LONG_CALL_TIMEOUT_S)
    except grpc.RpcError as exc:
        raise _map_error(exc) from None
    result: dict[str, Any] = json.loads(response.report_json)
    return result


def read_records(client: Client, address: str, indices: list[int], timeout: float = 30.0) -> Any:
    try:
        return stub(client, address).ReadRecords(admin_pb2.ReadRecordsRequest(indices=indices), timeout=timeout)
    except grpc.RpcError as exc:
        raise _map_error(exc) from None


def verify(client: Client, address: str, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Run Verify on the node at ``address``; returns its report."""
    report: dict[str, Any] | None = None
    try:
        for event in stub(client, address).Verify(admin_pb2.VerifyRequest(), timeout=LONG_CALL_TIMEOUT_S):
            if event.report_json:
                report = json.loads(event.report_json)
            elif progress is not None and event.HasField("progress"):
                progress(event.progress.phase, event.progress.done, event.progress.total)
    except grpc.RpcError as exc:
        raise _map_error(exc) from None
    if report is None:
        raise Unavailable(f"node {address} ended Verify without a report")
    return report


def backup(
    client: Client,
    address: str,
    out: Path,
    *,
    min_applied_index: int = 0,
    wait_s: float = 30.0,
    progress: ProgressFn | None = None,
) -> int:
    """Stream a backup of the node at ``address`` into ``out`` (written durably; checked by the
    caller). Returns its size."""
    if out.exists():
        raise InvalidArgument(f"{out} exists: refusing to overwrite a backup")
    if not 0 < wait_s <= (2**32 - 1) / 1000:  # also refuses nan
        raise InvalidArgument(f"wait_s must be more than 0 and at most {(2**32 - 1) // 1000} seconds, not {wait_s}")
    # At least 1 ms: 0 would ask for the node's default wait.
    wait_ms = min(2**32 - 1, max(1, math.ceil(wait_s * 1000)))
    request = admin_pb2.BackupRequest(min_applied_index=min_applied_index, wait_ms=wait_ms)
    expected = 0

    def pieces() -> Any:
        nonlocal expected
        for chunk in stub(client, address).Backup(request, timeout=LONG_CALL_TIMEOUT_S):
            if chunk.offset != expected:
                raise Unavailable(f"backup stream from {address} skipped bytes "
                                  f"(at {chunk.offset}, expected {expected})")
            expected += len(chunk.data)
            if progress is not None and chunk.HasField("progress"):
                progress(chunk.progress.phase or "backup", chunk.progress.done, chunk.progress.total)
            yield chunk.data

    try:
        return write_file(out, pieces())
    except grpc.RpcError as exc:
        raise _map_error(exc) from None


def peer_fetcher(client: Client, peers: list[str], cluster_id: str) -> Callable[[list[int]], tuple[
        dict[int, tuple[bytes, str]], list[str]]]:
    """A ``repair.Fetch`` that asks ``peers`` (addresses) in turn for committed copies."""

    def fetch(indices: list[int]) -> tuple[dict[int, tuple[bytes, str]], list[str]]:
        found: dict[int, tuple[bytes, str]] = {}
        notes: list[str] = []
        for address in peers:
            wanted = [i for i in indices if i not in found]
            if not wanted:
                break
            try:
                response = read_records(client, address, wanted)
            except MQStoreError as exc:
                notes.append(f"peer {address}: {exc}")
                continue
            if cluster_id and response.cluster_id != cluster_id:
                notes.append(f"peer {address} belongs to cluster {response.cluster_id!r}, not {cluster_id!r}: ignored")
                continue
            for rec in response.records:
                if rec.data and not rec.error:
                    found[rec.index] = (bytes(rec.data), f"node {response.node_id} ({address})")
                elif rec.error:
                    notes.append(f"node {response.node_id} ({address}), index {rec.index}: {rec.error}")
        return found, notes

    return fetch


__all__ = [
    "backup",
    "change_membership",
    "cluster_status",
    "history",
    "leader_status",
    "node_status",
    "peer_fetcher",
    "read_records",
    "repair",
    "snapshot",
    "state_shape",
    "stub",
    "transfer_leader",
    "verify",
    "wait_member",
]
