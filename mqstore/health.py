"""A node's health: the standard gRPC health service (``grpc.health.v1.Health``), a watcher
that keeps it current, and the refusal of new enqueues while the node cannot take them.

A node reports NOT_SERVING (for ``""`` and ``mqstore.v1.Queue``) while it knows no leader, once
it was removed from the cluster, or while its disk is nearly full: less free space than the
larger of ``health.disk_free_min_bytes`` and ``health.disk_free_min_percent`` of the disk. The
pages its data file has free inside count as free space (the file never shrinks; LMDB reuses
them first: see :mod:`mqstore.diskspace`), so a node that drained serves again.
Meanwhile it refuses new enqueues at the edge, before anything is written, with UNAVAILABLE (no
leader: retry elsewhere or later) or RESOURCE_EXHAUSTED (disk nearly full: nothing is taken until
space is freed), instead of failing half-way through a commit. Leasing, settling and reading go
on: they free space.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from mqstore.diskspace import DiskSpace
from mqstore.errors import MQStoreError, Unavailable

log = logging.getLogger(__name__)

SERVICES = ("", "mqstore.v1.Queue")
CHECK_INTERVAL_S = 0.25


class NodeHealthServicer(health.HealthServicer):  # type: ignore[misc]
    """grpcio-health's servicer, answering only for the services a node reports (SERVICES):
    another name is NOT_FOUND, and is not remembered. (The library keeps every name ever
    watched, for ever: a caller watching new names would grow the node's memory without bound.)"""

    def Check(self, request: Any, context: grpc.ServicerContext) -> Any:
        if request.service not in SERVICES:
            return self._unknown(request, context)
        return super().Check(request, context)

    def Watch(self, request: Any, context: grpc.ServicerContext,
              send_response_callback: Callable[[Any], None] | None = None) -> Any:
        if request.service not in SERVICES:
            return self._unknown_watch(request, context)
        return super().Watch(request, context, send_response_callback)

    @staticmethod
    def _unknown(request: Any, context: grpc.ServicerContext) -> Any:
        context.set_code(grpc.StatusCode.NOT_FOUND)
        context.set_details(_unknown_details(request.service))
        return health_pb2.HealthCheckResponse()

    @staticmethod
    def _unknown_watch(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        # SERVICE_UNKNOWN (what the protocol sends for a name it does not know yet), then the
        # call ends: the name will never be known here.
        yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
        context.set_code(grpc.StatusCode.NOT_FOUND)
        context.set_details(_unknown_details(request.service))


def _unknown_details(service: str) -> str:
    shown = service if len(service) <= 64 else service[:64] + "..."
    return f"unknown service {shown!r}: this node reports {', '.join(repr(s) for s in SERVICES)}"


class NodeHealth:
    """Watches a node (``leader_id()``) and its data directory's disk; drives ``servicer``."""

    def __init__(
        self,
        node_id: int,
        data_dir: Path,
        leader_id: Callable[[], int],
        *,
        disk_free_min_bytes: int,
        disk_free_min_percent: float,
        on_leader_change: Callable[[int, int], None] | None = None,
        removed: Callable[[], bool] | None = None,
    ) -> None:
        self.node_id = node_id
        self.data_dir = Path(data_dir)
        self.leader_id = leader_id
        self.on_leader_change = on_leader_change
        self.removed = removed
        self.servicer = NodeHealthServicer()
        self.disk = DiskSpace(self.data_dir, disk_free_min_bytes, disk_free_min_percent, what=f"node {node_id}",
                              settings="health.disk_free_min_bytes / disk_free_min_percent")
        self.serving = False
        self._last_leader = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.update()

    def update(self) -> None:
        nearly_full = self.disk.update()
        leader = self.leader_id()
        if leader != self._last_leader:
            if leader and self.on_leader_change is not None:
                self.on_leader_change(self._last_leader, leader)
            self._last_leader = leader
        # A node removed from the cluster serves nothing any more (it may still know a leader).
        serving = leader != 0 and not nearly_full and not (self.removed is not None and self.removed())
        if serving != self.serving or self._thread is None:
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            for service in SERVICES:
                self.servicer.set(service, status)
        self.serving = serving

    def enqueue_refusal(self) -> MQStoreError | None:
        """Why a new enqueue must be refused now (None: it may go ahead). Only the leader's disk
        counts: a follower lets the call through to answer with the leader's address (it stores
        the leader's entries whatever it answers a client)."""
        leader = self.leader_id()
        if leader == 0:
            return Unavailable(f"node {self.node_id} knows no leader (an election is under way): retry shortly",
                               not_applied=True)
        if leader != self.node_id:
            return None
        return self.disk.refusal()  # read every CHECK_INTERVAL_S by the watcher thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"mqstore-health-{self.node_id}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(CHECK_INTERVAL_S):
            try:
                self.update()
            except Exception:
                log.exception("node %d: health check failed", self.node_id)

    def stop(self) -> None:
        self._stop.set()
        self.servicer.enter_graceful_shutdown()
        if self._thread is not None:
            self._thread.join(2)


__all__ = ["CHECK_INTERVAL_S", "SERVICES", "NodeHealth", "NodeHealthServicer"]
