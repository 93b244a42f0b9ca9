"""The gRPC Compliance service of a storage node (proto/mqstore/v1/compliance.proto).

A thin mapping onto the node's queue (:class:`mqstore.node.cluster_queue.ClusterQueue`): the
queue attributes every call to the actor the edge authenticated and decides through the same
enforcement function as every other path.
"""

from __future__ import annotations

import json
from typing import Any

import grpc

from mqstore.compliance.rules import Mode
from mqstore.errors import InvalidArgument
from mqstore.proto import compliance_pb2, compliance_pb2_grpc


def _policy_info(namespace: str, policy: Any) -> Any:
    return compliance_pb2.PolicyInfo(namespace=namespace, mode=Mode(policy.mode).name.lower(),
                                     retention_ms=policy.lock_retention_ms,
                                     backoff_ms=list(policy.backoff_ms), lifetime_ms=policy.lifetime_ms,
                                     finished_retention_ms=policy.retention_ms,
                                     dedup_window_ms=policy.dedup_window_ms,
                                     expired_retention_ms=policy.expired_retention_ms)


def _records(records: list[dict[str, Any]]) -> Any:
    return compliance_pb2.AuditRecordsResponse(
        records_json=[json.dumps(r, sort_keys=True, separators=(",", ":"), ensure_ascii=False) for r in records]
    )


#: The longest ``where_json`` an AuditQuery may send (a few field names and values).
WHERE_JSON_CHARS_MAX = 64 * 1024


class ComplianceService(compliance_pb2_grpc.ComplianceServicer):  # type: ignore[misc]
    def __init__(self, queue: Any, in_flight: Any) -> None:
        from mqstore.server import handled

        self.queue = queue
        self.in_flight = in_flight
        # Wrap every RPC in the server's error mapping (mqstore errors -> gRPC statuses).
        for name in ("SetPolicy", "GetPolicy", "AddLegalHold", "RemoveLegalHold", "ExtendRetention",
                     "DropNamespace", "CompactMessages", "RotateKey", "ShredKey", "ListKeys", "AuditRecords",
                     "AuditQuery", "AuditHead", "AuditCheckpoint"):
            setattr(self, name, handled(getattr(type(self), name)).__get__(self))

    def SetPolicy(self, request: Any, context: grpc.ServicerContext) -> Any:
        days = None if request.retention_ms == -1 else request.retention_ms / 86_400_000
        policy = self.queue.set_policy(request.namespace, mode=request.mode or "none", retention_days=days,
                                       bypass_governance=request.bypass_governance, reason=request.reason or None)
        return _policy_info(request.namespace, policy)

    def GetPolicy(self, request: Any, context: grpc.ServicerContext) -> Any:
        return _policy_info(request.namespace, self.queue.get_policy(request.namespace))

    def AddLegalHold(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.queue.add_legal_hold(request.message_id, case=request.case)
        return compliance_pb2.ComplianceResponse()

    def RemoveLegalHold(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.queue.remove_legal_hold(request.message_id, case=request.case)
        return compliance_pb2.ComplianceResponse()

    def ExtendRetention(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.queue.extend_retention(request.message_id, until=request.until_ms / 1000,
                                    bypass_governance=request.bypass_governance, reason=request.reason or None)
        return compliance_pb2.ComplianceResponse()

    def DropNamespace(self, request: Any, context: grpc.ServicerContext) -> Any:
        return compliance_pb2.CountResponse(count=self.queue.drop_namespace(request.namespace))

    def CompactMessages(self, request: Any, context: grpc.ServicerContext) -> Any:
        return compliance_pb2.CountResponse(count=self.queue.compact_messages(list(request.message_ids)))

    def RotateKey(self, request: Any, context: grpc.ServicerContext) -> Any:
        return compliance_pb2.CountResponse(count=self.queue.rotate_key(request.namespace))

    def ShredKey(self, request: Any, context: grpc.ServicerContext) -> Any:
        return compliance_pb2.CountResponse(count=self.queue.shred_key(request.key_id))

    def ListKeys(self, request: Any, context: grpc.ServicerContext) -> Any:
        return compliance_pb2.ListKeysResponse(keys=[compliance_pb2.KeyInfo(**k) for k in self.queue.list_keys()])

    def AuditRecords(self, request: Any, context: grpc.ServicerContext) -> Any:
        return _records(self.queue.audit_records(after=request.after or None, limit=request.limit or 1000))

    def AuditQuery(self, request: Any, context: grpc.ServicerContext) -> Any:
        if len(request.where_json) > WHERE_JSON_CHARS_MAX:
            raise InvalidArgument(f"where_json is {len(request.where_json)} characters, over the "
                                  f"{WHERE_JSON_CHARS_MAX} a query may have")
        try:
            where = json.loads(request.where_json) if request.where_json else {}
        except RecursionError:
            raise InvalidArgument("where_json is nested too deeply") from None
        except ValueError:
            raise InvalidArgument("where_json is not JSON") from None
        if not isinstance(where, dict):
            raise InvalidArgument("where_json must be a JSON object")
        return _records(self.queue.audit_query(
            where=where, since_ms=request.since_ms or None, until_ms=request.until_ms or None,
            after=request.after or None, limit=request.limit or 1000))

    def AuditHead(self, request: Any, context: grpc.ServicerContext) -> Any:
        return compliance_pb2.AuditHeadResponse(seq=self.queue.audit_head())

    def AuditCheckpoint(self, request: Any, context: grpc.ServicerContext) -> Any:
        ckpt = self.queue.audit_checkpoint()
        return compliance_pb2.CheckpointResponse(checkpoint_json="" if ckpt is None else ckpt.to_json())


__all__ = ["ComplianceService"]
