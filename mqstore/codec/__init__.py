"""Record framing, CRC32C and envelope encoding.

Two implementations with identical bytes and identical errors:

- ``mqstore._codec``: Cython (built from ``ext/_codec.pyx``), used by default;
- ``mqstore.codec._reference``: pure Python, used when ``MQSTORE_PURE_PYTHON=1`` is set or the
  extension is not built. Slow, but complete: differential tests hold the two together.

``IMPLEMENTATION`` says which one this process uses ("cython" or "python").
"""

from __future__ import annotations

import os

from mqstore.codec import _reference
from mqstore.codec._types import (
    ENVELOPE_SCHEMA_VERSION,
    FORMAT_VERSION,
    HEADER_SIZE,
    KNOWN_FLAGS,
    KNOWN_RECORD_TYPES,
    MAGIC,
    MESSAGE_ID_BYTES,
    Envelope,
    Flags,
    Record,
    RecordType,
)

IMPLEMENTATION: str
if os.environ.get("MQSTORE_PURE_PYTHON", "") not in ("", "0"):
    from mqstore.codec._reference import (
        crc32c,
        decode_envelope,
        decode_record,
        decode_records,
        encode_envelope,
        encode_record,
        encode_records,
    )

    IMPLEMENTATION = "python"
else:
    try:
        from mqstore._codec import (
            crc32c,
            decode_envelope,
            decode_record,
            decode_records,
            encode_envelope,
            encode_record,
            encode_records,
        )

        IMPLEMENTATION = "cython"
    except ImportError as exc:  # pragma: no cover - exercised only on a broken build
        raise ImportError(
            "mqstore's compiled codec (mqstore._codec) is not built: reinstall with "
            "`pip install -e .` (needs gcc), or set MQSTORE_PURE_PYTHON=1 to use the slow "
            f"pure-Python codec ({exc})"
        ) from exc

reference = _reference

__all__ = [
    "ENVELOPE_SCHEMA_VERSION",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "IMPLEMENTATION",
    "KNOWN_FLAGS",
    "KNOWN_RECORD_TYPES",
    "MAGIC",
    "MESSAGE_ID_BYTES",
    "Envelope",
    "Flags",
    "Record",
    "RecordType",
    "crc32c",
    "decode_envelope",
    "decode_record",
    "decode_records",
    "encode_envelope",
    "encode_record",
    "encode_records",
    "reference",
]
