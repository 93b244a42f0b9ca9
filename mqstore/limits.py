"""Every limit mqstore enforces, in one place.

Names carry their unit last (``_bytes_max``, ``_count_max``, ``_ms``). Limits that depend on
each other are asserted together at the bottom of this module, so a change that breaks a
relation fails at import time instead of in production.

Why these values:
- ``MESSAGE_BYTES_MAX`` (50 MiB) is above every common MTA default (Postfix 10 MB, Exchange
  35 MB, Gmail 25 MB) so the spool never refuses what the MTA accepted; it is small enough that
  one message cannot stall the group-commit writer for long.
- ``RECIPIENTS_MAX`` (1000) is Postfix's ``smtpd_recipient_limit`` default.
- ``ADDRESS_BYTES_MAX`` (320) is 64 (local part) + 1 + 255 (domain), RFC 5321 section 4.5.3.1.
"""

from __future__ import annotations

# --- record framing (mqstore.codec) -------------------------------------------------------------

#: Size of the fixed record header, in bytes (see mqstore/codec/_types.py for the layout).
RECORD_HEADER_BYTES = 40

#: Largest message body (raw RFC 5322 bytes) accepted.
MESSAGE_BYTES_MAX = 50 * 1024 * 1024

#: Largest encoded envelope.
ENVELOPE_BYTES_MAX = 512 * 1024

#: Bytes the sealing layer adds around a payload: message id (16) + namespace length (1) +
#: namespace (<= NAMESPACE_BYTES_MAX) + nonce (12) + GCM tag (16), rounded up generously.
SEAL_OVERHEAD_BYTES_MAX = 1024

#: Largest record payload the codec encodes or accepts while decoding. zstd output of an
#: incompressible input can exceed its input by a small bound, which the margin covers.
RECORD_PAYLOAD_BYTES_MAX = MESSAGE_BYTES_MAX + ENVELOPE_BYTES_MAX + SEAL_OVERHEAD_BYTES_MAX + 64 * 1024

# --- envelope -----------------------------------------------------------------------------------

RECIPIENTS_MAX = 1000
ADDRESS_BYTES_MAX = 320
DOMAIN_BYTES_MAX = 255
LOCAL_PART_BYTES_MAX = 64
NAMESPACE_BYTES_MAX = 64
IDEMPOTENCY_KEY_BYTES_MAX = 256
PRIORITY_MIN = -128
PRIORITY_MAX = 127
#: Times are milliseconds since the Unix epoch, stored as signed 64-bit integers.
TIME_MS_MAX = 2**63 - 1
#: A recipient's attempt count is a u16 in its state row: it counts up to this and stays there
#: (attempts go on; only the count stops), so no attempt can fail to be stored.
RECIPIENT_ATTEMPTS_MAX = 2**16 - 1
#: The latest time a caller may give in epoch seconds: 9999-12-31T23:59:59Z.
EPOCH_SECONDS_MAX = 253_402_300_799

# --- log store (mqstore.store) ------------------------------------------------------------------

#: Initial LMDB map size. The map grows on MapFullError (doubling) up to MAP_SIZE_BYTES_MAX.
MAP_SIZE_BYTES_DEFAULT = 256 * 1024 * 1024
MAP_SIZE_BYTES_MIN = 1024 * 1024
MAP_SIZE_BYTES_MAX = 1 << 40  # 1 TiB of address space; LMDB only uses disk for pages written.

#: Free space kept on the store's disk: below the larger of these, new enqueues are refused up
#: front (StorageFull; a node also reports NOT_SERVING) while leasing, settling and deleting go on,
#: since they are what frees space. Postfix's queue_minfree is the same idea.
DISK_FREE_MIN_BYTES_DEFAULT = 256 * 1024 * 1024
DISK_FREE_MIN_PERCENT_DEFAULT = 1.0
#: How long a reading of the disk's free space is used before it is taken again.
DISK_CHECK_INTERVAL_S = 0.25

#: Pending write requests the group-commit writer accepts before callers block (back-pressure).
WRITE_QUEUE_ITEMS_MAX = 4096
#: Write requests the writer drains into one transaction.
WRITE_BATCH_ITEMS_MAX = 1024
#: Payload bytes the writer drains into one transaction (a request is never split).
WRITE_BATCH_BYTES_MAX = 64 * 1024 * 1024
#: The longest the group-commit writer waits for returning callers to fill a batch (see writer.py).
WRITE_LINGER_MAX_US = 2_000
#: The longest a Raft leader holds client operations for the callers its last round answered
#: to come back, so that they share one round (see Node._propose_now).
PROPOSE_LINGER_MAX_US = 10_000
#: Records one append call may carry.
APPEND_RECORDS_MAX = 4096
#: How long a caller waits for room in a full write queue before ``Overloaded`` is raised.
WRITE_QUEUE_WAIT_MS = 30_000

#: Records returned by one range read.
READ_RANGE_RECORDS_MAX = 65_536
#: Bytes of recently persisted Raft entries a node keeps in memory to read them back without
#: LMDB (payloads plus a per-entry estimate; see mqstore/node/raftlog.py).
RAFT_ENTRY_CACHE_BYTES = 32 * 1024 * 1024
#: A learner is promoted to voter only when its log is at most this many entries behind the
#: leader's commit index and it answered the leader lately: a voter that cannot keep up (or
#: does not run) would count towards the quorum without helping to reach it.
PROMOTE_LAG_ENTRIES_MAX = 1_000

# --- compression and encryption (mqstore.crypto) -----------------------------------------------

ZSTD_LEVEL_MIN = 1
ZSTD_LEVEL_MAX = 19
ZSTD_LEVEL_DEFAULT = 3
DICTIONARY_BYTES_MAX = 1024 * 1024
DICTIONARY_SAMPLES_MIN = 8
DICTIONARY_SAMPLES_MAX = 100_000
KEYS_PER_NAMESPACE_MAX = 10_000

# --- the network edge (mqstore.security.edge; each is a default that [limits] in the config lowers) --

#: Messages one EnqueueBatch request (or one EnqueueStream frame) may carry.
BATCH_MESSAGES_MAX = APPEND_RECORDS_MAX
#: Largest gRPC request a node reads (bigger ones are refused by gRPC before any Python runs).
REQUEST_BYTES_MAX = 64 * 1024 * 1024
#: Requests per second one client (one identity; one connection when unauthenticated) may make
#: on average, and the burst above that average it may use. A stream frame counts as a request.
#: A call over the rate waits for its turn (back-pressure, no CPU spent) when the wait is short
#: and the client has few calls waiting; otherwise it is refused (RESOURCE_EXHAUSTED).
CLIENT_REQUESTS_PER_SECOND_DEFAULT = 5_000
CLIENT_REQUESTS_BURST_DEFAULT = 10_000
#: A request counts as one against its client's rate, plus one per this many bytes it carries
#: (so a client cannot pour hundreds of megabytes a second into a node within its request rate).
RATE_COST_BYTES = 64 * 1024
#: Longest wait for its turn a unary call over its client's rate is given (else refused).
RATE_WAIT_MS_MAX = 1_000
#: Calls one client may have waiting for their turn at once (more: refused at once). Equal to the
#: streams a connection may open, so one connection can never get a refusal flood going.
CLIENT_WAITING_CALLS_MAX = 32
#: Streams (EnqueueStream) one client may hold open at once.
CLIENT_STREAMS_MAX_DEFAULT = 16
#: Client calls a node serves at once; the rest of its gRPC threads are kept for its peers'
#: replication streams and snapshots, so clients can never take every thread.
SERVER_THREADS_DEFAULT = 128
PEER_THREADS_RESERVED = 16
#: HTTP/2 streams one connection may have open at once (bounds a flooding client's in-flight calls;
#: a client's further calls queue on its side).
CONNECTION_STREAMS_MAX = 32
#: Identities the per-client rate limiter remembers (least recently seen ones are forgotten first).
RATE_LIMITED_CLIENTS_MAX = 65_536
#: Longest wait an EnqueueStream frame over its client's rate is held for, before the stream is refused.
STREAM_THROTTLE_WAIT_MS_MAX = 5_000

# --- relations ----------------------------------------------------------------------------------

assert RECORD_PAYLOAD_BYTES_MAX < 2**32, "payload length is a u32 in the record header"
assert MESSAGE_BYTES_MAX + ENVELOPE_BYTES_MAX + SEAL_OVERHEAD_BYTES_MAX <= RECORD_PAYLOAD_BYTES_MAX
assert RECIPIENTS_MAX * (ADDRESS_BYTES_MAX + 2) + 4096 <= ENVELOPE_BYTES_MAX
assert LOCAL_PART_BYTES_MAX + 1 + DOMAIN_BYTES_MAX <= ADDRESS_BYTES_MAX
assert ADDRESS_BYTES_MAX < 2**16 and IDEMPOTENCY_KEY_BYTES_MAX < 2**16, "u16 length prefixes"
assert NAMESPACE_BYTES_MAX < 2**8, "u8 length prefix"
assert -(2**7) <= PRIORITY_MIN < PRIORITY_MAX < 2**7, "priority is an i8"
assert MAP_SIZE_BYTES_MIN <= MAP_SIZE_BYTES_DEFAULT <= MAP_SIZE_BYTES_MAX
assert WRITE_BATCH_ITEMS_MAX <= WRITE_QUEUE_ITEMS_MAX
assert RECORD_PAYLOAD_BYTES_MAX <= WRITE_BATCH_BYTES_MAX, "one largest record must fit a batch"
assert ZSTD_LEVEL_MIN <= ZSTD_LEVEL_DEFAULT <= ZSTD_LEVEL_MAX
assert BATCH_MESSAGES_MAX <= APPEND_RECORDS_MAX, "one batch is one append"
assert MESSAGE_BYTES_MAX + ENVELOPE_BYTES_MAX <= REQUEST_BYTES_MAX, "one largest message fits one request"
assert PEER_THREADS_RESERVED < SERVER_THREADS_DEFAULT
assert CLIENT_REQUESTS_PER_SECOND_DEFAULT <= CLIENT_REQUESTS_BURST_DEFAULT

# --- compliance -----------------------------------------------------------------------------------

#: Longest retention a namespace (or one message) may be locked for: 100 years.
LOCK_RETENTION_MS_MAX = 100 * 366 * 24 * 3600 * 1000
#: Legal hold case ids are short labels ("SEC-2026-17").
LEGAL_HOLD_CASE_BYTES_MAX = 256
#: Legal holds one message may carry at once.
LEGAL_HOLDS_PER_MESSAGE_MAX = 64
assert CONNECTION_STREAMS_MAX <= CLIENT_WAITING_CALLS_MAX, "one connection's calls can all wait"
assert CLIENT_WAITING_CALLS_MAX <= (SERVER_THREADS_DEFAULT - PEER_THREADS_RESERVED) // 2
