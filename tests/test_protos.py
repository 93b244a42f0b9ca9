"""The committed gRPC code matches proto/mqstore/v1/*.proto (regenerate: python proto/generate.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_not_stale() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate.py"), "--check"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_generated_modules_import_as_a_package() -> None:
    from mqstore.proto import admin_pb2_grpc, queue_pb2, queue_pb2_grpc, raft_pb2_grpc

    assert queue_pb2.EnqueueRequest(message=queue_pb2.NewMessage(mail_from="a@example.org")).message.mail_from
    assert hasattr(queue_pb2_grpc, "QueueServicer")
    assert hasattr(admin_pb2_grpc, "AdminServicer") and hasattr(raft_pb2_grpc, "RaftServicer")
