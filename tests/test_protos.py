"""The committed gRPC code matches proto/mqstore/v1/*.proto (regenerate: python proto/generate.py)."""

from __future__ import annotations

import re
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


def test_only_the_generators_version_stamps_are_ignored() -> None:
    """A newer grpcio-tools stamps its version into the code it writes: that alone is not stale,
    a changed message or service is."""
    sys.path.insert(0, str(ROOT / "proto"))
    try:
        import generate
    finally:
        sys.path.remove(str(ROOT / "proto"))
    grpc_code = (ROOT / "mqstore" / "proto" / "queue_pb2_grpc.py").read_text()
    pb2_code = (ROOT / "mqstore" / "proto" / "queue_pb2.py").read_text()
    assert "GRPC_GENERATED_VERSION = '" in grpc_code and "ValidateProtobufRuntimeVersion(" in pb2_code
    newer_grpc = re.sub(r"GRPC_GENERATED_VERSION = '[^']*'", "GRPC_GENERATED_VERSION = '9.99.9'", grpc_code)
    newer_pb2 = re.sub(r"(Domain\.PUBLIC,\s*)\d+,\s*\d+,\s*\d+,", r"\g<1>99,\n    98,\n    97,", pb2_code)
    newer_pb2 = re.sub(r"Protobuf Python Version: .*", "Protobuf Python Version: 99.98.97", newer_pb2)
    assert newer_grpc != grpc_code and newer_pb2 != pb2_code
    assert generate.normalized(newer_grpc) == generate.normalized(grpc_code)
    assert generate.normalized(newer_pb2) == generate.normalized(pb2_code)
    renamed = grpc_code.replace("/mqstore.v1.Queue/Enqueue", "/mqstore.v1.Queue/Enqueue2")
    changed = pb2_code.replace("mail_from", "mail_frm")
    assert generate.normalized(renamed) != generate.normalized(grpc_code)
    assert generate.normalized(changed) != generate.normalized(pb2_code)
