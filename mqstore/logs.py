"""Logging of a node: plain text or JSON lines, each with the node id, its current term and the
id of the request being served (``x-request-id`` metadata when the client sent one, else one the
node made up; also sent back as ``x-request-id`` initial metadata).

``log_level`` and ``log_json`` in the node's config (``mqstore serve --log-level`` overrides the
level) choose what is written, to stderr.
"""

from __future__ import annotations

import contextvars
import datetime as _dt
import json
import logging
import sys
from collections.abc import Callable
from typing import Any, TextIO

#: The id of the request being served (None outside a request).
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("mqstore_request_id", default=None)

LEVELS = ("debug", "info", "warning", "error")
_HANDLER_NAME = "mqstore-node"


class NodeContext(logging.Filter):
    """Adds ``node_id``, ``term`` and ``request_id`` to every record."""

    def __init__(self, node_id: int, term: Callable[[], int] | None = None) -> None:
        super().__init__()
        self.node_id = node_id
        self.term = term

    def filter(self, record: logging.LogRecord) -> bool:
        record.node_id = self.node_id
        try:
            record.term = self.term() if self.term is not None else 0
        except Exception:  # the node is starting or stopping: a log line must never fail
            record.term = 0
        record.request_id = request_id.get() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, node_id, term,
    request_id, and the exception when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": _dt.datetime.fromtimestamp(record.created, _dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "node_id": getattr(record, "node_id", None),
            "term": getattr(record, "term", None),
            "request_id": getattr(record, "request_id", None),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s node=%(node_id)s term=%(term)s req=%(request_id)s %(name)s: %(message)s"


def configure(level: str = "info", *, json_lines: bool = False, node_id: int = 0,
              term: Callable[[], int] | None = None, stream: TextIO | None = None) -> logging.Handler:
    """Send mqstore's (and every other) log records at ``level`` or above to ``stream`` (stderr),
    as JSON lines or text. Replaces a handler an earlier call installed; returns the new one."""
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {LEVELS}, not {level!r}")
    root = logging.getLogger()
    for h in list(root.handlers):
        if h.get_name() == _HANDLER_NAME:
            root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(NodeContext(node_id, term))
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    return handler


def set_term_source(handler: logging.Handler, term: Callable[[], int]) -> None:
    """Point a handler made by :func:`configure` at the node's term (once the node exists)."""
    for f in handler.filters:
        if isinstance(f, NodeContext):
            f.term = term


__all__ = ["LEVELS", "TEXT_FORMAT", "JsonFormatter", "NodeContext", "configure", "request_id", "set_term_source"]
