"""Prometheus metrics of a node (``[metrics] listen = "host:port"`` serves ``/metrics``).

Counted as calls are served (by the edge interceptor, :mod:`mqstore.security.edge`):

- ``mqstore_requests_total{method,code}``: gRPC calls by method and status code;
- ``mqstore_errors_total{kind}``: calls that failed, by kind (the mqstore error class, or the
  status code when the failure came from the edge or gRPC);
- ``mqstore_refused_total{reason}``: calls refused at the edge (unauthenticated, permission,
  rate, limit, busy, disk, no_leader, deadline, malformed);
- ``mqstore_enqueued_messages_total``, ``mqstore_leased_messages_total``,
  ``mqstore_settled_total{outcome}`` (ack, defer, bounce): rates are ``rate()`` of these;
- ``mqstore_commit_latency_seconds{operation}``: from a write's arrival to its committed answer;
- ``mqstore_fsync_latency_seconds``: each LMDB transaction commit (its fsyncs).

Read from the node when scraped:

- ``mqstore_queue_recipients{namespace,state}``, ``mqstore_queue_messages{namespace}`` (active),
  ``mqstore_queue_bytes{namespace}``, ``mqstore_oldest_message_age_seconds``: the applied state
  (on a follower: as replicated so far);
- ``mqstore_term``, ``mqstore_is_leader``, ``mqstore_leader_id``, ``mqstore_commit_index``,
  ``mqstore_applied_index``, ``mqstore_leader_changes_total`` (leader changes this node saw);
- ``mqstore_replication_lag_entries{peer}`` (on the leader: its last index minus the peer's match);
- ``mqstore_disk_used_bytes`` (the data file), ``mqstore_disk_free_bytes``,
  ``mqstore_disk_total_bytes``; ``mqstore_serving`` (1: the health service says SERVING);
- ``mqstore_client_calls_in_flight``, ``mqstore_peer_messages_dropped_total``;
- ``mqstore_peer_clock_offset_seconds{peer}`` (a peer's wall clock minus this node's, as
  estimated from the Raft streams) and ``mqstore_clock_correction_seconds`` (what this node adds
  to its clock for its stamps: nonzero when its clock is off the voters'; see node/clocks.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from mqstore.errors import InvalidArgument

log = logging.getLogger(__name__)

#: Write latencies: from a fsync's ~0.2 ms to a slow quorum's seconds.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
FSYNC_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)


class NodeMetrics:
    """One node's metrics in a registry of their own (several nodes may share a process).
    ``read_state()`` returns what the scrape-time collector reports (see :class:`_NodeCollector`)."""

    def __init__(self, read_state: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("mqstore_requests", "gRPC calls served, by method and status code",
                                ["method", "code"], registry=r)
        self.errors = Counter("mqstore_errors", "Failed calls by kind of error", ["kind"], registry=r)
        self.refused = Counter("mqstore_refused", "Calls refused at the edge, by reason", ["reason"], registry=r)
        self.enqueued = Counter("mqstore_enqueued_messages", "Messages enqueued (committed)", registry=r)
        self.leased = Counter("mqstore_leased_messages", "Messages leased to workers", registry=r)
        self.settled = Counter("mqstore_settled", "Leases settled, by outcome", ["outcome"], registry=r)
        self.commit_latency = Histogram(
            "mqstore_commit_latency_seconds", "Time from a write's arrival to its committed answer",
            ["operation"], buckets=LATENCY_BUCKETS_S, registry=r,
        )
        self.fsync_latency = Histogram(
            "mqstore_fsync_latency_seconds", "Time of each durable LMDB transaction commit (its fsyncs)",
            buckets=FSYNC_BUCKETS_S, registry=r,
        )
        self.leader_changes = Counter("mqstore_leader_changes", "Leader changes this node saw", registry=r)
        self.read_state = read_state
        r.register(_NodeCollector(self))
        self._http: Any = None
        self._http_thread: threading.Thread | None = None
        self.http_port = 0

    def observe_fsync(self, seconds: float) -> None:
        self.fsync_latency.observe(seconds)

    def serve(self, listen: str) -> int:
        """Serve ``/metrics`` over HTTP on ``listen`` (``host:port``); returns the port."""
        host, _, port = listen.rpartition(":")
        try:
            self._http, self._http_thread = start_http_server(int(port), addr=host.strip("[]"), registry=self.registry)
        except OSError as exc:
            raise InvalidArgument(f"metrics.listen {listen}: cannot listen there: {exc.strerror or exc}") from None
        self.http_port = int(self._http.server_address[1])
        return self.http_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _NodeCollector(Collector):
    def __init__(self, metrics: NodeMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Any]:
        return []  # collected only when scraped: reading the node at registration would be wasted

    def collect(self) -> Iterator[Any]:
        try:
            s = self.metrics.read_state()
        except Exception:  # a scrape must not fail because the node is starting or stopping
            log.debug("metrics: reading the node's state failed", exc_info=True)
            return
        gauges: list[tuple[str, str, Any]] = [
            ("mqstore_term", "Current Raft term", s.get("term")),
            ("mqstore_is_leader", "1 when this node is the leader", s.get("is_leader")),
            ("mqstore_leader_id", "The leader this node knows (0: none)", s.get("leader_id")),
            ("mqstore_commit_index", "Highest log index known committed", s.get("commit_index")),
            ("mqstore_applied_index", "Highest log index applied", s.get("applied_index")),
            ("mqstore_disk_used_bytes", "Size of the node's data file", s.get("disk_used_bytes")),
            ("mqstore_disk_free_bytes", "Free space on the data directory's disk", s.get("disk_free_bytes")),
            ("mqstore_disk_total_bytes", "Size of the data directory's disk", s.get("disk_total_bytes")),
            ("mqstore_serving", "1 when the health service reports SERVING", s.get("serving")),
            ("mqstore_client_calls_in_flight", "Client calls being served", s.get("client_calls_in_flight")),
            ("mqstore_oldest_message_age_seconds", "Age of the oldest unfinished message", s.get("oldest_age_seconds")),
            ("mqstore_clock_correction_seconds", "What this node adds to its clock for the stamps of new entries",
             s.get("clock_correction_seconds")),
        ]
        for name, doc, value in gauges:
            if value is not None:
                yield GaugeMetricFamily(name, doc, value=float(value))
        dropped = s.get("peer_messages_dropped")
        if dropped is not None:
            yield CounterMetricFamily("mqstore_peer_messages_dropped", "Messages to peers dropped (queue full)",
                                      value=float(dropped))
        queue = s.get("queue")
        if queue:
            rcpt = GaugeMetricFamily("mqstore_queue_recipients", "Recipients by namespace and state",
                                     labels=["namespace", "state"])
            msgs = GaugeMetricFamily("mqstore_queue_messages", "Active (unfinished) messages by namespace",
                                     labels=["namespace"])
            size = GaugeMetricFamily("mqstore_queue_bytes", "Bytes of stored messages by namespace",
                                     labels=["namespace"])
            for ns, v in queue.items():
                for state, count in v["recipients"].items():
                    rcpt.add_metric([ns, state], float(count))
                msgs.add_metric([ns], float(v["messages_active"]))
                size.add_metric([ns], float(v["bytes"]))
            yield rcpt
            yield msgs
            yield size
        offsets = s.get("clock_offsets")
        if offsets:
            g = GaugeMetricFamily("mqstore_peer_clock_offset_seconds",
                                  "A peer's wall clock minus this node's (estimated from the Raft streams)",
                                  labels=["peer"])
            for peer, seconds in sorted(offsets.items()):
                g.add_metric([str(peer)], float(seconds))
            yield g
        lag = s.get("replication_lag")
        if lag is not None:
            g = GaugeMetricFamily("mqstore_replication_lag_entries",
                                  "Entries the leader holds that a peer does not (leader only)", labels=["peer"])
            for peer, entries in sorted(lag.items()):
                g.add_metric([str(peer)], float(entries))
            yield g


__all__ = ["FSYNC_BUCKETS_S", "LATENCY_BUCKETS_S", "NodeMetrics"]
